"""Open files of ``k.sys``: one fd space, one class per kind of file.

Theory of operation
-------------------
The fd table of :class:`kernel.syscalls.Syscalls` maps numbers to :class:`File`
objects. A kind of file (a block device node, a UDP socket, later a TCP socket or a
custom device node) is a subclass that implements the operations it supports; every
other operation fails as Linux fails it (``EINVAL``/``ESPIPE``/``ENOTSOCK`` ...), so
adding a kind of file adds a class, never a branch in ``Syscalls``.

Readiness and waiting (what ``poll`` and blocking calls are built on): a file reports
its current readiness with :meth:`File.poll` (a mask of ``POLLIN``/``POLLOUT``/
``POLLERR``/``POLLHUP``/``POLLNVAL`` as in :mod:`select`), and whenever that may have
changed (data arrived, buffer space freed, an error happened, it was closed) it calls
:meth:`File.wake`, which wakes every :class:`Waiter` registered with it.
``k.sys.poll`` registers one :class:`Waiter` with each file, checks readiness, and
sleeps on the waiter until woken or the timeout passes — the classic
check-after-register order, so a wake-up between the check and the sleep is never
lost. A blocking ``recv`` does the same on its own file.

:class:`SocketFile` is the base of sockets: every socket call defaults to
``EOPNOTSUPP`` so that a socket kind implements just what it supports; timeouts
(``settimeout``/``setblocking``) are kept here, once.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from hostops.clock import monotonic
from hostops.sync import Condition, Lock

from .errors import io_error

__all__ = [
    "File",
    "SocketFile",
    "Waiter",
    "POLLIN",
    "POLLOUT",
    "POLLERR",
    "POLLHUP",
    "POLLNVAL",
    "deadline_after",
    "remaining",
]

# Linux's values (the ones :mod:`select` has; the kernel does not import it).
POLLIN = 0x001
POLLOUT = 0x004
POLLERR = 0x008
POLLHUP = 0x010
POLLNVAL = 0x020


class Waiter:
    """A one-shot-at-a-time wake-up flag that any number of files can set.

    ``wait(timeout)`` returns True when woken (and clears the flag), False on timeout.
    """

    __slots__ = ("_cond", "_woken")

    def __init__(self) -> None:
        self._cond = Condition(Lock())
        self._woken = False

    def wake(self) -> None:
        """Set the flag and wake the sleeper (any thread)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def wait(self, timeout_s: float | None) -> bool:
        """Sleep until woken or ``timeout_s`` passes (None: forever)."""
        with self._cond:
            if not self._woken:
                self._cond.wait(timeout_s)
            woken = self._woken
            self._woken = False
            return woken


def deadline_after(timeout_s: float | None) -> float | None:
    """The monotonic deadline ``timeout_s`` from now (None stays None)."""
    return None if timeout_s is None else monotonic() + timeout_s


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never negative; None stays None)."""
    return None if deadline is None else max(0.0, deadline - monotonic())


class File:
    """Base of every open file of ``k.sys``.

    Subclasses override what they support. The defaults fail as Linux does for a file
    that lacks the operation. ``path`` is what ``open`` was given (or a description
    such as ``"socket:[UDP]"``).
    """

    #: A short kind name for messages and ``repr`` ("block", "udp", ...).
    kind = "file"

    def __init__(self, path: str) -> None:
        self.path = path
        self.closed = False
        self._waiters: set[Waiter] = set()
        self._waiters_lock = Lock()

    # -- readiness
    def poll(self) -> int:
        """Current readiness: a mask of POLLIN / POLLOUT / POLLERR / POLLHUP. The
        default (a disk) is always readable and writable."""
        return POLLIN | POLLOUT

    def add_waiter(self, w: Waiter) -> None:
        """Wake ``w`` at every later readiness change (until :meth:`remove_waiter`)."""
        with self._waiters_lock:
            self._waiters.add(w)

    def remove_waiter(self, w: Waiter) -> None:
        """Stop waking ``w`` (unknown waiters are ignored)."""
        with self._waiters_lock:
            self._waiters.discard(w)

    def wake(self) -> None:
        """Readiness may have changed: wake every registered waiter (any thread)."""
        with self._waiters_lock:
            waiters = list(self._waiters)
        for w in waiters:
            w.wake()

    # -- operations
    def read(self, n: int) -> bytes:
        """Read up to ``n`` bytes."""
        raise io_error(errno.EINVAL, f"{self.kind} file cannot be read")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data``; returns the count."""
        raise io_error(errno.EINVAL, f"{self.kind} file cannot be written")

    def pread(self, n: int, offset: int) -> bytes:
        """Read at an offset (files without positions: ESPIPE)."""
        raise io_error(errno.ESPIPE)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write at an offset (files without positions: ESPIPE)."""
        raise io_error(errno.ESPIPE)

    def lseek(self, pos: int, how: int) -> int:
        """Move the file position (files without positions: ESPIPE)."""
        raise io_error(errno.ESPIPE)

    def fsync(self) -> None:
        """Flush to stable storage (files that cannot: EINVAL)."""
        raise io_error(errno.EINVAL)

    def fstat(self) -> os.stat_result:
        """``os.stat_result`` of the file."""
        raise io_error(errno.EINVAL)

    def close(self) -> None:
        """Release the file (called once, when its last fd is closed or at shutdown).
        Subclasses call ``super().close()`` last: it marks the file closed and wakes
        waiters (a blocked call then fails with EBADF)."""
        self.closed = True
        self.wake()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r}{' closed' if self.closed else ''}>"


def _not_supported(what: str) -> OSError:
    return io_error(errno.EOPNOTSUPP, f"{what} is not supported on this socket")


class SocketFile(File):
    """Base of sockets: Python ``socket``-module semantics, errors as ``OSError`` with a
    Linux errno (``TimeoutError`` for a timed-out blocking call).

    Addresses are ``(host, port)`` tuples with a dotted-quad ``host``. The timeout is
    the socket module's: None blocks forever, 0.0 is non-blocking (``EAGAIN``), a
    positive number raises ``TimeoutError`` when it passes.
    """

    kind = "socket"
    family = 0
    type = 0
    proto = 0

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.timeout: float | None = None

    # -- timeouts
    def settimeout(self, value: float | None) -> None:
        """``socket.settimeout``: None, 0.0 or a positive number of seconds."""
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"timeout must be a number or None, not {type(value).__name__}")
            if value < 0:
                raise ValueError("Timeout value out of range")
            value = float(value)
        self.timeout = value

    def gettimeout(self) -> float | None:
        """The current timeout (None: blocking)."""
        return self.timeout

    def setblocking(self, flag: bool) -> None:
        """``setblocking(False)`` is ``settimeout(0.0)``; ``True`` is ``None``."""
        self.timeout = None if flag else 0.0

    # -- the socket calls (defaults: not supported)
    def bind(self, addr: tuple[str, int]) -> None:
        """Bind to a local address."""
        raise _not_supported("bind")

    def connect(self, addr: tuple[str, int]) -> None:
        """Connect to a remote address."""
        raise _not_supported("connect")

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Send on a connected socket."""
        raise _not_supported("send")

    def sendto(self, data: bytes | bytearray | memoryview, addr: tuple[str, int]) -> int:
        """Send to ``addr``."""
        raise _not_supported("sendto")

    def recv(self, n: int, flags: int = 0) -> bytes:
        """Receive up to ``n`` bytes."""
        raise _not_supported("recv")

    def recvfrom(self, n: int, flags: int = 0) -> tuple[bytes, tuple[str, int]]:
        """Receive up to ``n`` bytes and the sender's address."""
        raise _not_supported("recvfrom")

    def getsockname(self) -> tuple[str, int]:
        """The local address."""
        raise _not_supported("getsockname")

    def getpeername(self) -> tuple[str, int]:
        """The remote address (ENOTCONN when not connected)."""
        raise io_error(errno.ENOTCONN)

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        """Set a socket option (unknown ones: ENOPROTOOPT)."""
        raise io_error(errno.ENOPROTOOPT)

    def getsockopt(self, level: int, option: int) -> Any:
        """Read a socket option (unknown ones: ENOPROTOOPT)."""
        raise io_error(errno.ENOPROTOOPT)

    def read(self, n: int) -> bytes:
        """``read`` on a socket is ``recv``."""
        return self.recv(n)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """``write`` on a socket is ``send``."""
        return self.send(data)

    def fstat(self) -> os.stat_result:
        """A socket's stat: S_IFSOCK, size 0."""
        uid, gid = os.getuid(), os.getgid()
        return os.stat_result((stat.S_IFSOCK | 0o777, 0, 0, 1, uid, gid, 0, 0, 0, 0))
