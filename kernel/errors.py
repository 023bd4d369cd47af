"""Kernel errors and the one place where virtio and transport failures become errnos.

Theory of operation
-------------------
Everything below the syscall layer fails in its own vocabulary: the device answers a
control request with an error reply (:class:`vdev.virtio.control.RemoteError`), the
host layer reports a broken channel (``hostops`` ``TransportError``), the driver finds
the device breaking the ring rules (:class:`vdev.virtio.DeviceSpecError`), a request
completes with a virtio-blk status byte. User-facing calls (``k.sys``, the block
layer) only ever raise :class:`OSError` with an errno, built here:

=========================================  ======================  ==================
what happened                              kernel-level exception  errno (I/O path)
=========================================  ======================  ==================
device replied with an error               DeviceControlError      EIO
control channel broke / device died       DeviceGoneError         EIO
device broke the ring rules                (queue marked broken)   EIO
device set DEVICE_NEEDS_RESET              (device marked broken)  EIO
request status IOERR / UNSUPP              --                      EIO / EOPNOTSUPP
device could not be brought up             DeviceProbeError        --
=========================================  ======================  ==================

:class:`DeviceProbeError` carries the tail of the device's log, so a device that
refuses to start says why in the exception message.
"""

from __future__ import annotations

import errno
import os

from vdev.virtio import BlkStatus, DeviceSpecError, VirtioError
from vdev.virtio.control import RemoteError

__all__ = [
    "KernelError",
    "DeviceProbeError",
    "DeviceControlError",
    "DeviceGoneError",
    "io_error",
    "blk_status_errno",
    "errno_for",
    "to_os_error",
]


class KernelError(Exception):
    """Base of the kernel's own (non-``OSError``) exceptions."""


class DeviceProbeError(KernelError):
    """A device could not be brought up (process did not start, no driver for its
    device id, feature negotiation refused, ...). ``device`` names it (``"vda"``) and
    ``log_tail`` holds the last lines of the device process's log, also appended to the
    message."""

    def __init__(self, device: str, reason: str, log_tail: str = "") -> None:
        self.device = device
        self.reason = reason
        self.log_tail = log_tail
        msg = f"cannot bring up device {device}: {reason}"
        if log_tail.strip():
            indented = "\n".join("    " + line for line in log_tail.rstrip().splitlines())
            msg += f"\n  device log (tail):\n{indented}"
        super().__init__(msg)


class DeviceControlError(KernelError):
    """The device answered a control request with an error reply. ``request`` is the
    message type, ``code``/``message`` are the device's own words."""

    def __init__(self, device: str, request: str, code: str, message: str) -> None:
        self.device = device
        self.request = request
        self.code = code
        self.message = message
        super().__init__(f"{device}: {request} refused by the device: {code}: {message}")


class DeviceGoneError(KernelError):
    """The control channel to the device broke: the process died, closed the channel
    or did not answer in time. ``cause`` describes it."""

    def __init__(self, device: str, request: str, cause: str) -> None:
        self.device = device
        self.request = request
        self.cause = cause
        super().__init__(f"{device}: {request}: device is gone ({cause})")


def io_error(code: int, detail: str | None = None, filename: str | None = None) -> OSError:
    """An ``OSError(code, strerror)`` as ``os`` raises it; ``detail`` is appended to the
    strerror (``"Input/output error (device vda died)"``) and ``filename`` is kept."""
    text = os.strerror(code)
    if detail:
        text = f"{text} ({detail})"
    if filename is not None:
        return OSError(code, text, filename)
    return OSError(code, text)


def blk_status_errno(status: int) -> int:
    """The errno for a virtio-blk status byte other than OK (§5.2.6): UNSUPP →
    EOPNOTSUPP, IOERR and anything unexpected (a device that never wrote it) → EIO."""
    if status == BlkStatus.UNSUPP:
        return errno.EOPNOTSUPP
    return errno.EIO


def errno_for(exc: BaseException) -> int:
    """The errno the I/O path reports for ``exc``: its own errno for an ``OSError``,
    EIO for every device-side failure (control error, device gone, spec violation)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if isinstance(
        exc, DeviceControlError | DeviceGoneError | DeviceSpecError | RemoteError | VirtioError
    ):
        return errno.EIO
    return errno.EIO


def to_os_error(exc: BaseException, device: str | None = None) -> OSError:
    """Turn any failure below the syscall layer into the ``OSError`` a caller sees; an
    ``OSError`` is returned unchanged."""
    if isinstance(exc, OSError):
        return exc
    where = f"{device}: " if device else ""
    return io_error(errno_for(exc), f"{where}{exc}")
