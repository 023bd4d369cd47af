"""Linux TAP interfaces: open ``/dev/net/tun``, configure it, read and write frames.

Theory of operation
-------------------
A TAP interface is a Linux network interface whose "wire" is a file descriptor: every
frame Linux transmits on it can be read from the fd, every frame written to the fd is
received by Linux as if it came from the wire. :meth:`Tap.open` does what
``Documentation/networking/tuntap.rst`` describes:

* ``open("/dev/net/tun")`` and ``TUNSETIFF`` with ``IFF_TAP | IFF_NO_PI |
  IFF_VNET_HDR``: an Ethernet (not IP) interface, no 4-byte packet-info prefix, and a
  ``virtio_net_hdr`` in front of every frame in both directions. The interface is
  created if it does not exist (it lives as long as the fd, being non-persistent) and
  attached to if it does.
* ``TUNSETVNETHDRSZ 12``: the header is the 12-byte VERSION_1 ``virtio_net_hdr``
  (with ``num_buffers``), the same bytes a virtio-net device puts on its rings.
* ``TUNSETOFFLOAD`` (:meth:`Tap.set_offload`) says what Linux may hand *to us*:
  ``TUN_F_CSUM`` frames whose checksum is left to the receiver (``NEEDS_CSUM``),
  ``TUN_F_TSO4`` TCPv4 super-frames (``GSO_TCPV4``). With 0, Linux completes checksums
  and segments before the frame reaches the fd. What *we* write may carry those
  offloads regardless: Linux finishes them itself (``virtio_net_hdr_to_skb``).
* The fd is non-blocking: :meth:`Tap.read_into` returns None when nothing is queued,
  and it can be watched by a poller (:meth:`Tap.fileno`, ``_pollable``). One read is
  one frame; one write (gathered from the header and the frame) is one frame.

A missing ``/dev/net/tun`` or a missing ``CAP_NET_ADMIN`` is reported as
:class:`TapError` (an ``OSError`` with the errno) whose message says what to do.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Sequence

__all__ = [
    "TUNSETIFF",
    "TUNSETVNETHDRSZ",
    "TUNSETOFFLOAD",
    "TUNGETFEATURES",
    "IFF_TAP",
    "IFF_NO_PI",
    "IFF_VNET_HDR",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "VNET_HDR_SIZE",
    "IFNAMSIZ",
    "TapError",
    "Tap",
    "check_ifname",
]

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
TUNSETOFFLOAD = 0x400454D0
TUNGETFEATURES = 0x800454CF
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02

#: The ``virtio_net_hdr`` size we ask for (VERSION_1: with ``num_buffers``).
VNET_HDR_SIZE = 12
#: ``struct ifreq`` name field size; names are at most 15 bytes plus the NUL.
IFNAMSIZ = 16

_TUN_PATH = "/dev/net/tun"
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: ifr_name, ifr_flags, rest of the union


class TapError(OSError):
    """The TAP interface cannot be opened or configured (errno + a message saying why)."""


def check_ifname(name: str) -> str:
    """Return ``name`` if it is a usable interface name (1..15 bytes, no ``/``, no
    whitespace, not ``.``/``..``); ValueError naming the problem otherwise."""
    raw = name.encode("utf-8", "surrogateescape")
    if not 1 <= len(raw) < IFNAMSIZ:
        raise ValueError(f"interface name must be 1..{IFNAMSIZ - 1} bytes: {name!r}")
    if "/" in name or ":" in name or name in (".", "..") or any(c.isspace() for c in name):
        raise ValueError(f"not a valid interface name: {name!r}")
    return name


class Tap:
    """An open TAP interface (see the module docstring). Close it to remove the
    interface (unless another process holds it too)."""

    def __init__(self, fd: int, ifname: str) -> None:
        self._fd: int | None = fd
        self._ifname = ifname
        self.offload_flags = 0
        """The last ``TUNSETOFFLOAD`` value."""

    @classmethod
    def open(cls, ifname: str) -> Tap:
        """Create (or attach to) TAP interface ``ifname`` with a 12-byte vnet header,
        non-blocking, no receive offloads. :class:`TapError` if that is not possible,
        ValueError for a bad name."""
        check_ifname(ifname)
        try:
            fd = os.open(_TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TapError(
                errno.ENOENT,
                f"{_TUN_PATH} does not exist (load the tun module, or give the "
                "container the device)",
            ) from None
        except PermissionError as e:
            raise TapError(
                e.errno,
                f"cannot open {_TUN_PATH}: permission denied (a TAP needs root or CAP_NET_ADMIN)",
            ) from None
        except OSError as e:
            raise TapError(e.errno, f"cannot open {_TUN_PATH}: {e.strerror}") from None
        try:
            features = _get_features(fd)
            if features is not None and not features & IFF_VNET_HDR:
                raise TapError(errno.ENOTSUP, "this kernel's tun driver lacks IFF_VNET_HDR")
            req = _IFREQ.pack(ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                out = fcntl.ioctl(fd, TUNSETIFF, req)
            except OSError as e:
                why = {
                    errno.EPERM: "permission denied (a TAP needs root or CAP_NET_ADMIN, and "
                    "an existing interface must be a TAP this user may attach to)",
                    errno.EBUSY: "the interface is busy (another process has it open)",
                    errno.EINVAL: "an interface of that name exists and is not a TAP",
                }.get(e.errno or 0, e.strerror)
                raise TapError(e.errno, f"cannot create TAP {ifname}: {why}") from None
            actual = _IFREQ.unpack(out)[0].split(b"\0", 1)[0].decode(errors="replace")
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        except TapError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise TapError(e.errno, f"cannot configure TAP {ifname}: {e.strerror}") from None
        return cls(fd, actual or ifname)

    @property
    def ifname(self) -> str:
        """The interface's name."""
        return self._ifname

    def _fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"TAP {self._ifname} is closed")
        return self._fd

    def fileno(self) -> int:
        """The non-blocking fd (readable when a frame is queued)."""
        return self._fileno()

    def _pollable(self) -> int:
        return self._fileno()

    def features(self) -> int:
        """``TUNGETFEATURES``: the ``IFF_*`` flags this kernel's tun driver supports."""
        f = _get_features(self._fileno())
        return 0 if f is None else f

    def set_offload(self, flags: int) -> None:
        """``TUNSETOFFLOAD``: which offloaded frames Linux may give us (``TUN_F_CSUM``,
        ``TUN_F_TSO4``; TSO requires CSUM). :class:`TapError` if refused."""
        if flags & ~(TUN_F_CSUM | TUN_F_TSO4):
            raise ValueError(f"unsupported offload flags {flags:#x}")
        if flags & TUN_F_TSO4 and not flags & TUN_F_CSUM:
            raise ValueError("TUN_F_TSO4 needs TUN_F_CSUM")
        try:
            fcntl.ioctl(self._fileno(), TUNSETOFFLOAD, flags)
        except OSError as e:
            raise TapError(
                e.errno, f"TUNSETOFFLOAD {flags:#x} on {self._ifname}: {e.strerror}"
            ) from None
        self.offload_flags = flags

    def read_into(self, buf: bytearray | memoryview) -> int | None:
        """Read one frame (vnet header first) into ``buf``; its length, or None if no
        frame is queued. A frame longer than ``buf`` is truncated by the kernel."""
        try:
            return os.readv(self._fileno(), [buf])
        except BlockingIOError:
            return None

    def write(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        """Write one frame gathered from ``parts`` (vnet header first); bytes written.
        OSError as the kernel reports it (EIO: interface down, EINVAL: a header Linux
        refuses, EAGAIN: its queue is full)."""
        return os.writev(self._fileno(), parts)

    def close(self) -> None:
        """Close the fd (a non-persistent interface disappears with it). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Tap {self._ifname}{' closed' if self._fd is None else ''}>"


def _get_features(fd: int) -> int | None:
    """``TUNGETFEATURES``, or None on kernels that do not know it."""
    try:
        out = fcntl.ioctl(fd, TUNGETFEATURES, b"\0\0\0\0")
    except OSError:
        return None
    value: int = struct.unpack("I", out)[0]
    return value
