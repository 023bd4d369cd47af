"""Open files of ``k.sys``: one fd space, one class per kind of file.

Theory of operation
-------------------
The fd table of :class:`kernel.syscalls.Syscalls` maps numbers to :class:`File`
objects. A kind of file (a block device node, a UDP socket, a TCP socket, later a
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
(``settimeout``/``setblocking``) are kept here, once. A socket kind blocks with
:meth:`File.wait_for` (``self.wait_for(POLLIN, self.timeout)``), which gives the socket
module's timeout semantics (``BlockingIOError``/``TimeoutError``) and fails with
``EBADF`` when the fd is closed meanwhile.

The Linux numeric constants of the socket API (``AF_INET``, ``SOCK_DGRAM``,
``SOL_SOCKET``, ``SO_REUSEADDR``, ``IPPROTO_UDP``, ``MSG_PEEK``, ...) are defined here,
once, with Linux's values: the kernel may not import :mod:`socket`.
:func:`socket_protocol` applies Linux's rules for ``socket(family, type, proto)``
(which errno for which mismatch) to a stack's table of supported kinds, and
:func:`inet_address` checks an ``(host, port)`` address as the socket module does.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from typing import Any, Protocol

from hostops.clock import monotonic
from hostops.sync import Condition, Lock

from .errors import io_error

__all__ = [
    "File",
    "SocketFile",
    "Waiter",
    "NodeTable",
    "check_buffersize",
    "byte_view",
    "BadBufferError",
    "BadBufferTypeError",
    "writable_view",
    "POLLIN",
    "POLLPRI",
    "POLLOUT",
    "POLLERR",
    "POLLHUP",
    "POLLNVAL",
    "deadline_after",
    "remaining",
    "socket_protocol",
    "inet_address",
    "AF_UNSPEC",
    "AF_UNIX",
    "AF_INET",
    "AF_INET6",
    "AF_PACKET",
    "SOCK_STREAM",
    "SOCK_DGRAM",
    "SOCK_RAW",
    "SOCK_SEQPACKET",
    "SOCK_MAX",
    "SOCK_NONBLOCK",
    "SOCK_CLOEXEC",
    "SOCK_TYPE_MASK",
    "SOL_SOCKET",
    "SO_DEBUG",
    "SO_REUSEADDR",
    "SO_TYPE",
    "SO_ERROR",
    "SO_DONTROUTE",
    "SO_BROADCAST",
    "SO_SNDBUF",
    "SO_RCVBUF",
    "SO_KEEPALIVE",
    "SO_LINGER",
    "SO_REUSEPORT",
    "SO_RCVTIMEO",
    "SO_SNDTIMEO",
    "IPPROTO_IP",
    "IPPROTO_ICMP",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "SOL_IP",
    "SOL_TCP",
    "SOL_UDP",
    "IP_TOS",
    "IP_TTL",
    "TCP_NODELAY",
    "MSG_OOB",
    "MSG_PEEK",
    "MSG_TRUNC",
    "MSG_DONTWAIT",
    "MSG_WAITALL",
    "SHUT_RD",
    "SHUT_WR",
    "SHUT_RDWR",
    "INADDR_ANY",
    "INADDR_BROADCAST",
]

# Linux's values (the ones :mod:`select` has; the kernel does not import it).
POLLIN = 0x001
POLLPRI = 0x002
POLLOUT = 0x004
POLLERR = 0x008
POLLHUP = 0x010
POLLNVAL = 0x020

# The socket API's numbers, as Linux (x86-64 and every other architecture but a few
# MIPS/SPARC/Alpha SO_* ones) defines them: include/linux/socket.h,
# include/linux/net.h, include/uapi/asm-generic/socket.h, include/uapi/linux/in.h.
AF_UNSPEC = 0
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_PACKET = 17

SOCK_STREAM = 1
SOCK_DGRAM = 2
SOCK_RAW = 3
SOCK_SEQPACKET = 5
#: One past the largest socket type (SOCK_PACKET = 10): ``socket()`` answers EINVAL
#: for a type at or above it.
SOCK_MAX = 11
#: Flags ``socket()`` accepts or-ed into ``type`` (``type & SOCK_TYPE_MASK`` is the type).
SOCK_NONBLOCK = 0o4000
SOCK_CLOEXEC = 0o2000000
SOCK_TYPE_MASK = 0xF

SOL_SOCKET = 1
SO_DEBUG = 1
SO_REUSEADDR = 2
SO_TYPE = 3
SO_ERROR = 4
SO_DONTROUTE = 5
SO_BROADCAST = 6
SO_SNDBUF = 7
SO_RCVBUF = 8
SO_KEEPALIVE = 9
SO_LINGER = 13
SO_REUSEPORT = 15
SO_RCVTIMEO = 20
SO_SNDTIMEO = 21

IPPROTO_IP = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
SOL_IP = IPPROTO_IP
SOL_TCP = IPPROTO_TCP
SOL_UDP = IPPROTO_UDP
IP_TOS = 1
IP_TTL = 2
TCP_NODELAY = 1

MSG_OOB = 0x01
MSG_PEEK = 0x02
MSG_TRUNC = 0x20
MSG_DONTWAIT = 0x40
MSG_WAITALL = 0x100

SHUT_RD = 0
SHUT_WR = 1
SHUT_RDWR = 2

INADDR_ANY = "0.0.0.0"
INADDR_BROADCAST = "255.255.255.255"


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


def socket_protocol(
    family: int, type: int, proto: int, supported: Mapping[tuple[int, int], tuple[int, ...]]
) -> int:
    """Linux's choice of protocol for ``socket(family, type, proto)``; returns it.

    ``supported`` maps ``(family, type)`` to the protocols a stack implements there,
    the first being the default (``{(AF_INET, SOCK_DGRAM): (IPPROTO_UDP,)}``).
    ``type`` must already be stripped of SOCK_NONBLOCK/SOCK_CLOEXEC. The errnos are
    those of ``__sock_create`` and ``inet_create`` (net/socket.c, net/ipv4/af_inet.c):
    a type outside ``[0, SOCK_MAX)`` is EINVAL, a family the stack has no socket of is
    EAFNOSUPPORT, a type the family lacks ESOCKTNOSUPPORT, a protocol the type lacks
    EPROTONOSUPPORT; ``proto`` 0 picks the default.
    """
    for name, v in (("family", family), ("type", type), ("proto", proto)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"socket {name} must be an int, not {v.__class__.__name__}")
    if not 0 <= type < SOCK_MAX:
        raise io_error(errno.EINVAL, f"socket type {type}")
    if not any(f == family for f, _ in supported):
        raise io_error(errno.EAFNOSUPPORT, f"address family {family}")
    protos = supported.get((family, type))
    if not protos:
        raise io_error(errno.ESOCKTNOSUPPORT, f"socket type {type} in family {family}")
    if proto == 0:
        return protos[0]
    if proto not in protos:
        raise io_error(errno.EPROTONOSUPPORT, f"protocol {proto} for socket type {type}")
    return proto


def inet_address(addr: Any, what: str = "address") -> tuple[str, int]:
    """Check an AF_INET address as the socket module does; returns ``(host, port)``
    with ``host`` a canonical dotted quad.

    ``addr`` must be a 2-tuple (``TypeError``), the port an int in 0..65535
    (``OverflowError``, as ``socket`` raises). The host is a dotted-quad IPv4 address
    (RFC 791 §3.2 addresses are 32 bits: four octets 0..255); ``""`` means
    ``INADDR_ANY`` and ``"<broadcast>"`` ``INADDR_BROADCAST`` as in the socket module.
    k.sys has no resolver, so a name is ``OSError(EINVAL)``.
    """
    if not isinstance(addr, tuple):
        raise TypeError(f"AF_INET {what} must be tuple, not {type(addr).__name__}")
    if len(addr) != 2:
        raise TypeError(f"AF_INET {what} must be a pair (host, port)")
    host, port = addr
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, not {type(host).__name__}")
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"port must be an int, not {type(port).__name__}")
    if not 0 <= port <= 0xFFFF:
        raise OverflowError("port must be 0-65535.")
    if host == "":
        return INADDR_ANY, port
    if host == "<broadcast>":
        return INADDR_BROADCAST, port
    parts = host.split(".")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
        raise io_error(errno.EINVAL, f"{host!r} is not a dotted-quad IPv4 address")
    octets = [int(p) for p in parts]
    if any(o > 255 for o in octets):
        raise io_error(errno.EINVAL, f"{host!r} is not a dotted-quad IPv4 address")
    return ".".join(map(str, octets)), port


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

    @property
    def waiter_count(self) -> int:
        """How many waiters are registered now (a counter tests assert on: every
        ``poll`` and blocking call deregisters on its way out)."""
        with self._waiters_lock:
            return len(self._waiters)

    def wait_for(self, events: int, timeout_s: float | None) -> int:
        """Block until ``poll()`` reports one of ``events`` (or POLLERR/POLLHUP, always
        reported); returns the ready mask. The socket module's timeout semantics:
        ``timeout_s`` None waits forever, 0 raises ``BlockingIOError`` (EAGAIN) when
        not ready, a positive number ``TimeoutError`` (ETIMEDOUT) when it passes. A
        file closed before or during the wait fails with EBADF.

        Register, then check, then sleep: a :meth:`wake` between the check and the
        sleep is kept by the :class:`Waiter`, so it is never lost.
        """
        want = events | POLLERR | POLLHUP
        if self.closed:
            raise io_error(errno.EBADF)
        ready = self.poll() & want
        if ready:
            return ready
        if timeout_s is not None and timeout_s <= 0:
            raise io_error(errno.EAGAIN)
        deadline = deadline_after(timeout_s)
        w = Waiter()
        self.add_waiter(w)
        try:
            while True:
                if self.closed:
                    raise io_error(errno.EBADF, "closed while waiting")
                ready = self.poll() & want
                if ready:
                    return ready
                left = remaining(deadline)
                if left is not None and left <= 0:
                    raise OSError(errno.ETIMEDOUT, "timed out")
                w.wait(left)
        finally:
            self.remove_waiter(w)

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

    def preadv(self, buffers: Any, offset: int) -> int:
        """Read at an offset into several buffers (files without positions: ESPIPE)."""
        raise io_error(errno.ESPIPE)

    def pwritev(self, buffers: Any, offset: int) -> int:
        """Write several buffers at an offset (files without positions: ESPIPE)."""
        raise io_error(errno.ESPIPE)

    def preadinto(self, buffer: Any, offset: int) -> int:
        """Read at an offset into one buffer (files without positions: ESPIPE)."""
        raise io_error(errno.ESPIPE)

    def fsync(self) -> None:
        """Flush to stable storage (files that cannot: EINVAL)."""
        raise io_error(errno.EINVAL)

    def fdatasync(self) -> None:
        """Flush the data to stable storage (by default what :meth:`fsync` does)."""
        self.fsync()

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


class NodeTable(Protocol):
    """A set of nodes ``k.sys.open``/``k.sys.stat`` can find by path (the block device
    nodes today, custom device nodes later). ``k.sys`` asks each table in turn; a table
    answers None for a path that is not one of its nodes."""

    def open(self, path: str, flags: int) -> File | None:
        """Open the node ``path`` (access mode already checked); None: not ours."""
        ...

    def stat(self, path: str) -> os.stat_result | None:
        """The node's ``os.stat_result``; None: not ours."""
        ...


def check_buffersize(n: Any, what: str) -> int:
    """A receive size as the socket module checks it: an int (``TypeError``), not
    negative (``ValueError("negative buffersize in recv")``)."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"{what}: buffersize must be an int, not {type(n).__name__}")
    if n < 0:
        raise ValueError(f"negative buffersize in {what}")
    return n


def byte_view(data: Any) -> bytes | bytearray | memoryview:
    """``data`` as a flat byte buffer, as the socket module accepts it: bytes,
    bytearray or any C-contiguous buffer (cast to bytes); anything else
    (``str`` included) is ``TypeError``."""
    if isinstance(data, bytes | bytearray):
        return data
    if isinstance(data, str):
        raise TypeError("a bytes-like object is required, not 'str'")
    try:
        mv = memoryview(data)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not {type(data).__name__!r}") from None
    if not mv.c_contiguous:
        raise TypeError("a contiguous bytes-like object is required")
    return mv if mv.ndim == 1 and mv.itemsize == 1 and mv.format == "B" else mv.cast("B")


class BadBufferError(OSError, ValueError):
    """A receive size that does not fit the caller's buffer (or is negative):
    ``OSError(EINVAL)`` as Linux reports a bad ``recv`` length, and a ``ValueError``
    as the socket module raises it (``except ValueError`` keeps working)."""


class BadBufferTypeError(OSError, TypeError):
    """A receive buffer that is not a writable, contiguous bytes-like object:
    ``OSError(EINVAL)``, and a ``TypeError`` as the socket module raises it."""


def writable_view(buffer: Any, nbytes: Any, what: str) -> memoryview:
    """The first ``nbytes`` bytes (0: all) of ``buffer`` as a flat writable memoryview,
    for ``recv_into``-style calls. A buffer that is not writable, contiguous and
    bytes-like is :class:`BadBufferTypeError`; ``nbytes`` that is not an int is
    ``TypeError``; negative or larger than the buffer, :class:`BadBufferError` (both
    EINVAL)."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool):
        raise TypeError(f"{what}: nbytes must be an int, not {type(nbytes).__name__}")
    try:
        mv = memoryview(buffer)
    except TypeError:
        raise BadBufferTypeError(
            errno.EINVAL, f"{what}: a writable bytes-like object is required"
        ) from None
    if mv.readonly:
        raise BadBufferTypeError(errno.EINVAL, f"{what}: the buffer is read-only")
    if not mv.c_contiguous:
        raise BadBufferTypeError(errno.EINVAL, f"{what}: the buffer is not contiguous")
    if mv.ndim != 1 or mv.itemsize != 1 or mv.format != "B":
        mv = mv.cast("B")
    if nbytes < 0:
        raise BadBufferError(errno.EINVAL, f"negative buffersize in {what}")
    if nbytes > mv.nbytes:
        raise BadBufferError(errno.EINVAL, f"{what}: buffer too small for requested bytes")
    return mv[:nbytes] if nbytes else mv


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

    def listen(self, backlog: int) -> None:
        """Accept connections (stream sockets)."""
        raise _not_supported("listen")

    def accept(self) -> tuple[SocketFile, tuple[str, int]]:
        """The next connection and its peer's address (stream sockets)."""
        raise _not_supported("accept")

    def shutdown(self, how: int) -> None:
        """Shut down reading (SHUT_RD), writing (SHUT_WR) or both (SHUT_RDWR)."""
        raise _not_supported("shutdown")

    def connect_ex(self, addr: tuple[str, int]) -> int:
        """``connect`` that returns the errno (0: connected) instead of raising."""
        try:
            self.connect(addr)
        except OSError as e:
            return e.errno or errno.EIO
        return 0

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        """Send all of ``data`` with repeated :meth:`send` calls."""
        mv = memoryview(data).cast("B")
        off = 0
        while off < mv.nbytes:  # bounded: each send returns >= 1 or raises
            n = self.send(mv[off:], flags)
            if n <= 0:
                raise io_error(errno.EIO, "send made no progress")
            off += n

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Receive into ``buffer`` (at most ``nbytes``; 0: its size); the count. This
        default goes through :meth:`recv`'s bytes (sockets override it to copy once)."""
        mv = writable_view(buffer, nbytes, "recv_into")
        data = self.recv(mv.nbytes, flags)
        mv[: len(data)] = data
        return len(data)

    def recvfrom_into(
        self, buffer: Any, nbytes: int = 0, flags: int = 0
    ) -> tuple[int, tuple[str, int]]:
        """Receive into ``buffer`` (at most ``nbytes``; 0: its size): the count and
        the sender's address. This default goes through :meth:`recvfrom`'s bytes."""
        mv = writable_view(buffer, nbytes, "recvfrom_into")
        data, addr = self.recvfrom(mv.nbytes, flags)
        mv[: len(data)] = data
        return len(data), addr

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
        """``read`` on a socket is ``recv`` (a negative count: EINVAL, as ``os.read``)."""
        if isinstance(n, int) and not isinstance(n, bool) and n < 0:
            raise io_error(errno.EINVAL, f"negative count {n}")
        return self.recv(check_buffersize(n, "read"))

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """``write`` on a socket is ``send``."""
        return self.send(byte_view(data))

    def fstat(self) -> os.stat_result:
        """A socket's stat: S_IFSOCK, size 0."""
        uid, gid = os.getuid(), os.getgid()
        return os.stat_result((stat.S_IFSOCK | 0o777, 0, 0, 1, uid, gid, 0, 0, 0, 0))
