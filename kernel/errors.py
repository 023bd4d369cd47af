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
request not completed in time              --                      ETIMEDOUT
device could not be brought up             DeviceProbeError        --
=========================================  ======================  ==================

Culprit
-------
Every ``OSError`` the I/O path raises or hands to a callback carries *why* in the
attribute ``culprit`` (read it with :func:`culprit_of`; the trace's ``fail`` events
carry it too), one of:

``"device-error"``
    the device answered the request with an error status (IOERR, UNSUPP, a short read);
``"device-broke-ring"``
    the device broke the ring protocol (bad used id, double completion, used length
    too big, used index jump) or set DEVICE_NEEDS_RESET;
``"device-gone"``
    the device process died or hung up and was not (or could no longer be) restarted;
``"timeout"``
    the device did not complete the request within the spec's ``request_timeout``;
``"shutdown"``
    the kernel was shut down while the request waited;
``"caller"``
    the caller's own arguments (EINVAL, ENXIO, EROFS, EBADF ... of the block layer).

Errors that are not about a device (the network stack's ECONNRESET, EHOSTUNREACH ...)
have ``culprit`` None.

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
    "culprit_of",
    "copy_error",
    "CULPRITS",
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


#: The values of an I/O error's ``culprit`` attribute (see the module docstring).
CULPRITS = ("device-error", "device-broke-ring", "device-gone", "timeout", "shutdown", "caller")


def io_error(
    code: int,
    detail: str | None = None,
    filename: str | None = None,
    *,
    culprit: str | None = None,
) -> OSError:
    """An ``OSError(code, strerror)`` as ``os`` raises it; ``detail`` is appended to the
    strerror (``"Input/output error (device vda died)"``) and ``filename`` is kept.
    ``culprit`` (one of :data:`CULPRITS`, or None for errors that are nobody's fault in
    this sense, e.g. the network stack's) is set as the error's ``culprit`` attribute."""
    if culprit is not None and culprit not in CULPRITS:
        raise ValueError(f"unknown culprit {culprit!r} (one of {CULPRITS})")
    text = os.strerror(code)
    if detail:
        text = f"{text} ({detail})"
    err = OSError(code, text, filename) if filename is not None else OSError(code, text)
    err.culprit = culprit  # type: ignore[attr-defined]
    return err


def culprit_of(err: BaseException) -> str | None:
    """The ``culprit`` of an I/O error (None when it has none)."""
    c = getattr(err, "culprit", None)
    return c if isinstance(c, str) else None


def copy_error(err: OSError) -> OSError:
    """A fresh ``OSError`` with the same errno, strerror and culprit (each waiting
    caller gets an exception object of its own)."""
    new = OSError(err.errno, err.strerror)
    new.culprit = culprit_of(err) or "device-gone"  # type: ignore[attr-defined]
    return new


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
    if isinstance(exc, DeviceSpecError):
        culprit = "device-broke-ring"
    elif isinstance(exc, DeviceGoneError):
        culprit = "device-gone"
    else:
        culprit = "device-error"
    return io_error(errno_for(exc), f"{where}{exc}", culprit=culprit)
