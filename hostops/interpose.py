"""Interposing on Python's socket API: the host half of ``kernel.hijack``.

Theory of operation
-------------------
LKL's "hijack" library runs unmodified programs on LKL's network stack by interposing
on the C library's socket calls. The Python equivalent interposes on the modules every
Python networking library is written against: :func:`install` replaces, in the
modules themselves (so code that looks them up at call time sees the change):

* ``socket.socket`` by :class:`Socket`, a subclass of the host class (``isinstance(s,
  socket.socket)`` holds for every socket created while installed). Constructing one
  decides where the socket lives: AF_INET goes to the *stack* given to :func:`install`
  (a :class:`KernelSocket`), AF_UNIX stays a host socket, any other family fails with
  ``EAFNOSUPPORT`` (it is networking the stack cannot do, and the host's network is
  not the one the program was put on). ``socket.socketpair`` builds on this class, so
  it falls through to the host.
* ``socket.create_connection``, ``getaddrinfo``, ``gethostbyname``(``_ex``) and
  ``gethostbyaddr``: numeric IPv4 only. There is no resolver on the stack, and
  ``"localhost"`` names the host's loopback, which the stack does not have: both are a
  ``socket.gaierror`` saying so, never a silent answer from the host's network.
* ``select.select``, ``select.poll`` and the ``selectors`` classes (``DefaultSelector``,
  ``SelectSelector``, ``PollSelector``, ``EpollSelector``) by versions that wait on
  kernel sockets and host fds together (``socketserver``, ``http.server``, asyncio's
  selector loop and its self-pipe).

A kernel socket's ``fileno()`` is :data:`FILENO_BASE` plus its fd in the stack's table:
a number no host fd can have (:func:`install` checks that ``RLIMIT_NOFILE`` stays
below it), so the replaced ``select``/``selectors`` map it back without a table, and a
host call that gets one by mistake (``os.read``, a host epoll) fails with ``EBADF``
instead of touching another file.

Waiting on both worlds at once (:meth:`Interposer.wait`): kernel fds only -- the
stack's ``poll``; host fds only -- the host's ``poll``; both -- an eventfd is
registered with the kernel fds through the stack's ``watch`` (the stack rings it when
any of them may have become ready), then the loop checks the kernel fds without
blocking and host-polls the host fds plus the eventfd (blocking only if no kernel fd
was ready). Register, check, sleep: a readiness change between the check and the sleep
leaves the eventfd readable, so it is never lost.

The stack (:class:`Stack`) is anything with a ``sys`` object offering the ``k.sys``
socket calls and a ``watch`` method; ``kernel.hijack`` gives the kernel's. ``hostops``
never imports the kernel.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import select
import selectors
import socket as _socket_mod
import sys
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from hostops.clock import monotonic
from hostops.sync import Lock

__all__ = [
    "FILENO_BASE",
    "Stack",
    "Interposer",
    "Socket",
    "KernelSocket",
    "install",
    "uninstall",
    "active",
]

#: ``fileno()`` of a kernel socket is this plus its kernel fd. Above any host fd:
#: :func:`install` refuses to run when RLIMIT_NOFILE's hard limit reaches it.
FILENO_BASE = 1 << 30
#: One past the largest kernel fd a fileno may encode (k.sys has at most 65536 fds).
_KFD_LIMIT = 1 << 20

_HostSocket = _socket_mod.socket
_host_poll = select.poll
_host_select = select.select
_POLLIN = select.POLLIN
_POLLPRI = select.POLLPRI
_POLLOUT = select.POLLOUT
_POLLERR = select.POLLERR
_POLLHUP = select.POLLHUP
_POLLNVAL = select.POLLNVAL
_READISH = _POLLIN | _POLLERR | _POLLHUP | _POLLNVAL
_WRITEISH = _POLLOUT | _POLLERR | _POLLHUP | _POLLNVAL
_EAI_NONAME = _socket_mod.EAI_NONAME
_EAI_FAMILY = _socket_mod.EAI_FAMILY
_EAI_SERVICE = _socket_mod.EAI_SERVICE
_DEFAULT_TIMEOUT: Any = getattr(_socket_mod, "_GLOBAL_DEFAULT_TIMEOUT", object())


class Stack(Protocol):
    """What :func:`install` needs of a network stack."""

    #: The socket calls of ``k.sys`` (``socket``, ``bind``, ``poll``, ...).
    sys: Any

    def watch(self, fds: list[int], wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake()`` (from any thread) whenever the readiness of one of ``fds``
        may have changed, until the returned function is called."""
        ...


# =========================================================================== the state


class Interposer:
    """One installation: the stack, what was replaced, and the counters.

    Counters (plain ints): ``kernel_sockets`` (sockets made on the stack),
    ``host_sockets`` (AF_UNIX and adopted host fds that fell through),
    ``refused_sockets`` (families refused with EAFNOSUPPORT), ``kernel_waits`` /
    ``host_waits`` / ``mixed_waits`` (waits by what they waited on),
    ``resolve_refused`` (names the resolver refused).
    """

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.sys: Any = stack.sys
        self.kernel_sockets = 0
        self.host_sockets = 0
        self.refused_sockets = 0
        self.kernel_waits = 0
        self.host_waits = 0
        self.mixed_waits = 0
        self.resolve_refused = 0
        self._saved: list[tuple[Any, str, Any]] = []

    def stats(self) -> dict[str, int]:
        """The counters by name."""
        return {
            n: getattr(self, n)
            for n in (
                "kernel_sockets",
                "host_sockets",
                "refused_sockets",
                "kernel_waits",
                "host_waits",
                "mixed_waits",
                "resolve_refused",
            )
        }

    # -- fd numbers
    @staticmethod
    def owns(fd: int) -> bool:
        """Whether ``fd`` is a kernel socket's fileno."""
        return FILENO_BASE <= fd < FILENO_BASE + _KFD_LIMIT

    # -- waiting
    def wait(
        self, entries: list[tuple[int, int]], timeout_s: float | None
    ) -> list[tuple[int, int]]:
        """poll(2) over host fds and kernel filenos together: ``entries`` are ``(fd,
        events)``; returns ``(fd, revents)`` of the ready ones (``[]`` on timeout;
        ``timeout_s`` None waits forever)."""
        kern = [(fd - FILENO_BASE, ev) for fd, ev in entries if self.owns(fd)]
        host = [(fd, ev) for fd, ev in entries if not self.owns(fd)]
        if not kern:
            self.host_waits += 1
            return _poll_host(host, timeout_s)
        if not host:
            self.kernel_waits += 1
            got = self.sys.poll(kern, timeout_s)
            return [(fd + FILENO_BASE, rev) for fd, rev in got]
        self.mixed_waits += 1
        bell = _Bell()
        try:
            return self._wait_mixed(kern, host, timeout_s, bell)
        finally:
            bell.close()

    def _wait_mixed(
        self,
        kern: list[tuple[int, int]],
        host: list[tuple[int, int]],
        timeout_s: float | None,
        bell: _Bell,
    ) -> list[tuple[int, int]]:
        deadline = None if timeout_s is None else monotonic() + timeout_s
        cancel = self.stack.watch([fd for fd, _ in kern], bell.ring)
        try:
            p = _host_poll()
            for fd, ev in host:
                p.register(fd, ev)
            p.register(bell.fd, _POLLIN)
            # Bounded by the deadline: every pass either returns or sleeps until woken.
            while True:
                kr = [(fd + FILENO_BASE, rev) for fd, rev in self.sys.poll(kern, 0)]
                if kr:
                    wait_ms = 0
                elif deadline is None:
                    wait_ms = -1
                else:
                    wait_ms = math.ceil(max(0.0, deadline - monotonic()) * 1e3)
                hr = p.poll(wait_ms)
                ready = [(fd, rev) for fd, rev in hr if fd != bell.fd]
                if len(ready) != len(hr):
                    bell.drain()
                if kr or ready:
                    return kr + _merge_host(host, ready)
                if deadline is not None and monotonic() >= deadline:
                    return []
        finally:
            cancel()


class _Bell:
    """An eventfd the stack rings from any thread; a ring after :meth:`close` is
    ignored (the fd number may belong to someone else by then)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = Lock()
        self._open = True

    def ring(self) -> None:
        with self._lock:
            if self._open:
                try:
                    os.eventfd_write(self.fd, 1)
                except BlockingIOError:
                    pass  # the counter is at its maximum: readable already

    def drain(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            self._open = False
            os.close(self.fd)


def _poll_host(entries: list[tuple[int, int]], timeout_s: float | None) -> list[tuple[int, int]]:
    p = _host_poll()
    for fd, ev in entries:
        p.register(fd, ev)
    ms = -1 if timeout_s is None else math.ceil(timeout_s * 1e3)
    return _merge_host(entries, p.poll(ms))


def _merge_host(
    entries: list[tuple[int, int]], ready: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Host poll answers in the order of ``entries`` (duplicates each answered)."""
    got = dict(ready)
    return [(fd, got[fd]) for fd, _ in dict(entries).items() if fd in got]


_active: Interposer | None = None
_install_lock = Lock()


def active() -> Interposer | None:
    """The current installation (None when not installed)."""
    return _active


def _stack() -> Interposer:
    st = _active
    if st is None:
        raise OSError(errno.ENETDOWN, "the socket interposer is not installed")
    return st


# =========================================================================== sockets


class Socket(_socket_mod.socket):
    """``socket.socket`` while installed: an AF_INET socket becomes a
    :class:`KernelSocket` on the stack, an AF_UNIX one (or an adopted host fd) is a
    host socket, other families fail with EAFNOSUPPORT."""

    def __new__(cls, family: int = -1, type: int = -1, proto: int = -1, fileno: Any = None) -> Any:
        st = _active
        if st is not None and not issubclass(cls, KernelSocket):
            if fileno is not None:
                if isinstance(fileno, int) and st.owns(fileno):
                    return _HostSocket.__new__(_kernel_class(cls))
                st.host_sockets += 1
            elif family in (-1, _socket_mod.AF_INET):
                return _HostSocket.__new__(_kernel_class(cls))
            elif family == _socket_mod.AF_UNIX:
                st.host_sockets += 1
            else:
                st.refused_sockets += 1
                raise OSError(
                    errno.EAFNOSUPPORT,
                    f"address family {family} is not on the kernel's stack "
                    "(AF_INET goes to the kernel, AF_UNIX to the host)",
                )
        return _HostSocket.__new__(cls)


_kernel_classes: dict[type, type] = {}


def _kernel_class(cls: type) -> type:
    """The kernel-socket class for ``cls``: :class:`KernelSocket` for :class:`Socket`;
    for a program's own subclass of ``socket.socket``, a class with its methods first
    and :class:`KernelSocket` under them (its ``super()`` calls reach the kernel)."""
    if cls is Socket:
        return KernelSocket
    k = _kernel_classes.get(cls)
    if k is None:
        k = type(cls.__name__, (cls, KernelSocket), {"__module__": cls.__module__})
        _kernel_classes[cls] = k
    return k


class KernelSocket(Socket):
    """A socket on the stack: the ``socket.socket`` interface over the ``k.sys`` calls
    of its kernel fd (``fileno()`` is :data:`FILENO_BASE` + that fd)."""

    _kfd: int
    _kind: int
    _proto_num: int
    _owner: Interposer

    def __init__(
        self, family: int = -1, type: int = -1, proto: int = -1, fileno: Any = None
    ) -> None:
        st = _stack()
        if fileno is not None:
            kfd = int(fileno) - FILENO_BASE
            kind = type & 0xF if type != -1 else self._query_type(st, kfd)
            self._setup(st, kfd, kind, 0 if proto == -1 else proto)
            return
        t = _socket_mod.SOCK_STREAM if type == -1 else type
        p = 0 if proto == -1 else proto
        kfd = st.sys.socket(_socket_mod.AF_INET, t, p)
        st.kernel_sockets += 1
        self._setup(st, kfd, t & 0xF, p)
        default = _socket_mod.getdefaulttimeout()
        if default is not None and not t & getattr(_socket_mod, "SOCK_NONBLOCK", 0):
            st.sys.settimeout(kfd, default)

    @staticmethod
    def _query_type(st: Interposer, kfd: int) -> int:
        try:
            return int(st.sys.getsockopt(kfd, _socket_mod.SOL_SOCKET, _socket_mod.SO_TYPE))
        except OSError:
            return _socket_mod.SOCK_STREAM

    def _setup(self, st: Interposer, kfd: int, kind: int, proto: int) -> None:
        self._owner = st
        self._kfd = kfd
        self._kind = kind
        self._proto_num = proto
        self._io_refs = 0
        self._closed = False

    @classmethod
    def _wrap(cls, st: Interposer, kfd: int, kind: int, proto: int) -> KernelSocket:
        s: KernelSocket = _HostSocket.__new__(cls)
        s._setup(st, kfd, kind, proto)
        return s

    # -- identity
    @property
    def family(self) -> _socket_mod.AddressFamily:
        """Always ``AF_INET``."""
        return _socket_mod.AddressFamily.AF_INET

    @property
    def type(self) -> _socket_mod.SocketKind:
        """``SOCK_STREAM`` or ``SOCK_DGRAM``."""
        try:
            return _socket_mod.SocketKind(self._kind)
        except ValueError:
            return self._kind  # type: ignore[return-value]

    @property
    def proto(self) -> int:
        """The protocol given to the constructor (0: the type's default)."""
        return self._proto_num

    @property
    def timeout(self) -> float | None:
        """The timeout (None: blocking)."""
        return self.gettimeout()

    def fileno(self) -> int:
        """:data:`FILENO_BASE` + the kernel fd; -1 once closed."""
        return -1 if self._kfd < 0 else FILENO_BASE + self._kfd

    @property
    def kernel_fd(self) -> int:
        """The fd in the kernel's table (-1 once closed)."""
        return self._kfd

    def __repr__(self) -> str:
        state = " [closed]" if self._kfd < 0 else ""
        laddr = ""
        if self._kfd >= 0:
            try:
                laddr = f", laddr={self.getsockname()}"
            except OSError:
                pass
        return (
            f"<kernel socket fd={self.fileno()}{state}, family={self.family!s}, "
            f"type={self.type!s}, proto={self._proto_num}{laddr}>"
        )

    # -- lifetime
    def _real_close(self, _ss: Any = None) -> None:
        kfd, self._kfd = self._kfd, -1
        if kfd >= 0:
            try:
                self._owner.sys.close(kfd)
            except OSError:
                pass  # the kernel shut down first: its fds are gone already

    def detach(self) -> int:
        """Give up the socket without closing it; returns its fileno (which
        ``socket.socket(fileno=...)`` takes back)."""
        fd = self.fileno()
        self._kfd = -1
        self._closed = True
        return fd

    def dup(self) -> KernelSocket:
        """A new socket object on a duplicate of the kernel fd."""
        return self._wrap(self._owner, self._owner.sys.dup(self._kfd), self._kind, self._proto_num)

    def __del__(self) -> None:
        try:
            if getattr(self, "_kfd", -1) >= 0:
                self._real_close()
        except Exception:
            pass

    def get_inheritable(self) -> bool:
        """Kernel sockets never cross ``exec``."""
        return False

    def set_inheritable(self, inheritable: bool) -> None:
        """Only False is possible (EOPNOTSUPP for True)."""
        if inheritable:
            raise OSError(errno.EOPNOTSUPP, "a kernel socket cannot be inherited")

    # -- timeouts
    def settimeout(self, value: float | None) -> None:
        """As ``socket.settimeout``."""
        if value is not None:
            value = float(value)
            if value < 0 or math.isnan(value):
                raise ValueError("Timeout value out of range")
        self._owner.sys.settimeout(self._kfd, value)

    def gettimeout(self) -> float | None:
        """As ``socket.gettimeout``."""
        t: float | None = self._owner.sys.gettimeout(self._kfd)
        return t

    def setblocking(self, flag: bool) -> None:
        """As ``socket.setblocking``."""
        self._owner.sys.setblocking(self._kfd, bool(flag))

    def getblocking(self) -> bool:
        """False when the timeout is 0.0."""
        return self.gettimeout() != 0.0

    # -- connection set-up
    def bind(self, address: Any) -> None:
        """As ``socket.bind``."""
        self._owner.sys.bind(self._kfd, address)

    def connect(self, address: Any) -> None:
        """As ``socket.connect`` (non-blocking: ``BlockingIOError`` EINPROGRESS)."""
        self._owner.sys.connect(self._kfd, address)

    def connect_ex(self, address: Any) -> int:
        """As ``socket.connect_ex``: the errno (0 when connected)."""
        try:
            self._owner.sys.connect(self._kfd, address)
        except OSError as e:
            if e.errno is None:
                raise
            return e.errno
        return 0

    def listen(self, backlog: int = 128) -> None:
        """As ``socket.listen``."""
        self._owner.sys.listen(self._kfd, backlog)

    def accept(self) -> tuple[KernelSocket, Any]:
        """As ``socket.accept``: the new socket takes the default timeout."""
        kfd, addr = self._owner.sys.accept(self._kfd)
        conn = self._wrap(self._owner, kfd, self._kind, self._proto_num)
        self._owner.kernel_sockets += 1
        conn._owner.sys.settimeout(kfd, _socket_mod.getdefaulttimeout())
        return conn, addr

    def shutdown(self, how: int) -> None:
        """As ``socket.shutdown``."""
        self._owner.sys.shutdown(self._kfd, how)

    # -- data
    def send(self, data: Any, flags: int = 0) -> int:
        """As ``socket.send``."""
        n: int = self._owner.sys.send(self._kfd, data, flags)
        return n

    def sendall(self, data: Any, flags: int = 0) -> None:
        """As ``socket.sendall``."""
        self._owner.sys.sendall(self._kfd, data, flags)

    def sendto(self, data: Any, flags_or_addr: Any, addr: Any = None) -> int:
        """As ``socket.sendto(data[, flags], address)``."""
        if addr is None:
            addr = flags_or_addr
        n: int = self._owner.sys.sendto(self._kfd, data, addr)
        return n

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """As ``socket.recv``."""
        data: bytes = self._owner.sys.recv(self._kfd, bufsize, flags)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """As ``socket.recv_into``."""
        n: int = self._owner.sys.recv_into(self._kfd, buffer, nbytes, flags)
        return n

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        """As ``socket.recvfrom``."""
        got: tuple[bytes, Any] = self._owner.sys.recvfrom(self._kfd, bufsize, flags)
        return got

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        """As ``socket.recvfrom_into`` (the kernel writes straight into ``buffer``)."""
        got: tuple[int, Any] = self._owner.sys.recvfrom_into(self._kfd, buffer, nbytes, flags)
        return got

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """As ``socket.sendfile`` (always the ``send`` loop: no host ``sendfile``)."""
        n: int = getattr(self, "_sendfile_use_send")(file, offset, count)  # noqa: B009
        return n

    def sendmsg(self, *args: Any) -> int:
        """Not on kernel sockets (EOPNOTSUPP)."""
        raise OSError(errno.EOPNOTSUPP, "sendmsg is not supported on kernel sockets")

    def recvmsg(self, *args: Any) -> Any:
        """Not on kernel sockets (EOPNOTSUPP)."""
        raise OSError(errno.EOPNOTSUPP, "recvmsg is not supported on kernel sockets")

    def recvmsg_into(self, *args: Any) -> Any:
        """Not on kernel sockets (EOPNOTSUPP)."""
        raise OSError(errno.EOPNOTSUPP, "recvmsg_into is not supported on kernel sockets")

    # -- addresses and options
    def getsockname(self) -> Any:
        """As ``socket.getsockname``."""
        return self._owner.sys.getsockname(self._kfd)

    def getpeername(self) -> Any:
        """As ``socket.getpeername``."""
        return self._owner.sys.getpeername(self._kfd)

    def setsockopt(self, level: int, optname: int, value: Any, optlen: int | None = None) -> None:
        """As ``socket.setsockopt`` (an int or a bytes-like value)."""
        if value is None:
            raise OSError(errno.EINVAL, "setsockopt with a NULL value")
        self._owner.sys.setsockopt(self._kfd, level, optname, value)

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> Any:
        """As ``socket.getsockopt``: an int, or bytes when ``buflen`` is given."""
        v = self._owner.sys.getsockopt(self._kfd, level, optname)
        if buflen is None:
            return v
        raw = v.to_bytes(4, sys.byteorder, signed=True) if isinstance(v, int) else bytes(v)
        return raw[:buflen]


# =========================================================================== resolver


def _gaierror(code: int, msg: str) -> _socket_mod.gaierror:
    st = _active
    if st is not None:
        st.resolve_refused += 1
    return _socket_mod.gaierror(code, msg)


def _numeric_host(host: Any, passive: bool) -> str:
    if isinstance(host, bytes | bytearray):
        host = bytes(host).decode("idna")
    if host is None or host == "":
        if passive:
            return "0.0.0.0"
        raise _gaierror(
            _EAI_NONAME,
            "no host given and the kernel's stack has no loopback: give its address",
        )
    if not isinstance(host, str):
        raise TypeError(
            f"getaddrinfo() argument 1 must be string or None, not {type(host).__name__}"
        )
    try:
        packed = _socket_mod.inet_pton(_socket_mod.AF_INET, host)
    except OSError:
        why = (
            "'localhost' is the host's loopback, which the kernel's stack does not have"
            if host.lower().rstrip(".") == "localhost"
            else "the kernel's stack has no resolver"
        )
        raise _gaierror(_EAI_NONAME, f"{host!r}: numeric IPv4 addresses only ({why})") from None
    return _socket_mod.inet_ntop(_socket_mod.AF_INET, packed)


def _service(port: Any, kind: int) -> int:
    if port is None:
        return 0
    if isinstance(port, bytes | bytearray):
        port = bytes(port).decode()
    if isinstance(port, int) and not isinstance(port, bool):
        if not 0 <= port <= 0xFFFF:
            raise OverflowError("port must be 0-65535.")
        return port
    if isinstance(port, str):
        if port.isdigit():
            return int(port) & 0xFFFF
        proto = "udp" if kind == _socket_mod.SOCK_DGRAM else "tcp"
        try:
            return _socket_mod.getservbyname(port, proto)  # /etc/services, no network
        except OSError:
            raise _gaierror(_EAI_SERVICE, f"unknown service {port!r}") from None
    raise OSError("Int or String expected")


def getaddrinfo(
    host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
) -> list[tuple[Any, Any, int, str, tuple[str, int]]]:
    """``socket.getaddrinfo`` on the stack: numeric IPv4 only (see the module doc)."""
    if family not in (_socket_mod.AF_UNSPEC, _socket_mod.AF_INET):
        raise _gaierror(_EAI_FAMILY, f"address family {family} is not on the kernel's stack")
    addr = _numeric_host(host, bool(flags & _socket_mod.AI_PASSIVE))
    kinds: list[tuple[int, int]] = [
        (_socket_mod.SOCK_STREAM, _socket_mod.IPPROTO_TCP),
        (_socket_mod.SOCK_DGRAM, _socket_mod.IPPROTO_UDP),
        (_socket_mod.SOCK_RAW, 0),
    ]
    if type:
        kinds = [(k, p) for k, p in kinds if k == type] or [(type, proto)]
    if proto:
        kinds = [(k, proto) for k, p in kinds if p in (proto, 0)]
    canon = addr if flags & _socket_mod.AI_CANONNAME else ""
    out = []
    for k, p in kinds:
        out.append(
            (
                _socket_mod.AddressFamily.AF_INET,
                _socket_mod.SocketKind(k),
                p,
                canon,
                (addr, _service(port, k)),
            )
        )
    return out


def gethostbyname(hostname: str) -> str:
    """``socket.gethostbyname``: the canonical dotted quad of a numeric address."""
    return _numeric_host(hostname, False)


def gethostbyname_ex(hostname: str) -> tuple[str, list[str], list[str]]:
    """``socket.gethostbyname_ex`` for a numeric address."""
    a = _numeric_host(hostname, False)
    return a, [], [a]


def gethostbyaddr(ip: str) -> tuple[str, list[str], list[str]]:
    """``socket.gethostbyaddr``: no reverse lookups on the stack (``herror``)."""
    raise _socket_mod.herror(1, "Unknown host (no resolver on the kernel's stack)")


def create_connection(
    address: tuple[str, int],
    timeout: Any = _DEFAULT_TIMEOUT,
    source_address: Any = None,
    *,
    all_errors: bool = False,
) -> Any:
    """``socket.create_connection`` on the stack (numeric IPv4 addresses)."""
    host, port = address
    errors: list[OSError] = []
    for af, kind, proto, _, sa in getaddrinfo(host, port, 0, _socket_mod.SOCK_STREAM):
        sock = None
        try:
            sock = Socket(af, kind, proto)
            if timeout is not _DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sa)
            return sock
        except OSError as e:
            errors.append(e)
            if sock is not None:
                sock.close()
    if not errors:
        raise OSError("getaddrinfo returns an empty list")
    if all_errors:
        raise ExceptionGroup("create_connection failed", errors)
    raise errors[0]


# =========================================================================== select


def _fd_of(obj: Any) -> int:
    if isinstance(obj, int):
        fd = obj
    else:
        try:
            fd = int(obj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {obj!r}") from None
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


def select_(
    rlist: Iterable[Any], wlist: Iterable[Any], xlist: Iterable[Any], timeout: float | None = None
) -> tuple[list[Any], list[Any], list[Any]]:
    """``select.select`` over host fds and kernel sockets."""
    st = _active
    r, w, x = list(rlist), list(wlist), list(xlist)
    if st is None or not any(st.owns(_fd_of(o)) for o in (*r, *w, *x)):
        return _host_select(r, w, x, timeout)
    if timeout is not None:
        timeout = float(timeout)
        if timeout < 0:
            raise ValueError("timeout must be non-negative")
    want: dict[int, int] = {}
    for objs, ev in ((r, _POLLIN), (w, _POLLOUT), (x, _POLLPRI)):
        for o in objs:
            fd = _fd_of(o)
            want[fd] = want.get(fd, 0) | ev
    ready = dict(st.wait(list(want.items()), timeout))
    if any(rev & _POLLNVAL for rev in ready.values()):
        raise OSError(errno.EBADF, "Bad file descriptor")
    return (
        [o for o in r if ready.get(_fd_of(o), 0) & (_POLLIN | _POLLERR | _POLLHUP)],
        [o for o in w if ready.get(_fd_of(o), 0) & (_POLLOUT | _POLLERR)],
        [o for o in x if ready.get(_fd_of(o), 0) & _POLLPRI],
    )


class Poll:
    """``select.poll()`` over host fds and kernel sockets."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def register(self, fd: Any, eventmask: int = _POLLIN | _POLLPRI | _POLLOUT) -> None:
        """Watch ``fd`` for ``eventmask``."""
        self._fds[_fd_of(fd)] = eventmask

    def modify(self, fd: Any, eventmask: int) -> None:
        """Change the events of a registered ``fd`` (ENOENT if it is not)."""
        n = _fd_of(fd)
        if n not in self._fds:
            raise OSError(errno.ENOENT, "No such file or directory")
        self._fds[n] = eventmask

    def unregister(self, fd: Any) -> None:
        """Stop watching ``fd`` (KeyError if it is not registered)."""
        del self._fds[_fd_of(fd)]

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        """Wait ``timeout`` milliseconds (None or negative: forever)."""
        t = None if timeout is None or timeout < 0 else timeout / 1e3
        st = _active
        if st is None:
            return _poll_host(list(self._fds.items()), t)
        return st.wait(list(self._fds.items()), t)


class Selector(selectors._BaseSelectorImpl):
    """A ``selectors`` selector over host fds and kernel sockets (asyncio's selector
    loop, ``socketserver``): poll semantics, level-triggered."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Wait up to ``timeout`` seconds (None: forever, <= 0: only check)."""
        if timeout is not None:
            timeout = max(0.0, timeout)
        entries: list[tuple[int, int]] = []
        keys = {key.fd: key for key in self.get_map().values()}
        for key in keys.values():
            ev = 0
            if key.events & selectors.EVENT_READ:
                ev |= _POLLIN
            if key.events & selectors.EVENT_WRITE:
                ev |= _POLLOUT
            entries.append((key.fd, ev))
        st = _active
        got = _poll_host(entries, timeout) if st is None else st.wait(entries, timeout)
        out = []
        for fd, rev in got:
            events = 0
            if rev & ~_POLLIN:
                events |= selectors.EVENT_WRITE
            if rev & ~_POLLOUT:
                events |= selectors.EVENT_READ
            found = keys.get(fd)
            if found is not None and events & found.events:
                out.append((found, events & found.events))
        return out


# =========================================================================== install


def _replacements() -> list[tuple[Any, str, Any]]:
    out: list[tuple[Any, str, Any]] = [
        (_socket_mod, "socket", Socket),
        (_socket_mod, "create_connection", create_connection),
        (_socket_mod, "getaddrinfo", getaddrinfo),
        (_socket_mod, "gethostbyname", gethostbyname),
        (_socket_mod, "gethostbyname_ex", gethostbyname_ex),
        (_socket_mod, "gethostbyaddr", gethostbyaddr),
        (select, "select", select_),
        (select, "poll", Poll),
    ]
    for name in ("DefaultSelector", "SelectSelector", "PollSelector", "EpollSelector"):
        if hasattr(selectors, name):
            out.append((selectors, name, Selector))
    ss = sys.modules.get("socketserver")
    if ss is not None and hasattr(ss, "_ServerSelector"):  # captured at its import
        out.append((ss, "_ServerSelector", Selector))
    return out


def install(stack: Stack) -> Interposer:
    """Route the socket API to ``stack`` (see the module doc); returns the installation.
    RuntimeError if one is already installed or RLIMIT_NOFILE could reach
    :data:`FILENO_BASE`."""
    global _active
    with _install_lock:
        if _active is not None:
            raise RuntimeError("the socket interposer is already installed")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY or hard >= FILENO_BASE:
            raise RuntimeError(
                f"RLIMIT_NOFILE hard limit {hard} reaches the kernel sockets' filenos "
                f"({FILENO_BASE}); lower it to interpose"
            )
        st = Interposer(stack)
        for mod, name, new in _replacements():
            st._saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, new)
        _active = st
        return st


def uninstall() -> None:
    """Put back everything :func:`install` replaced (no-op when not installed).
    Kernel sockets still open keep working until their kernel shuts down."""
    global _active
    with _install_lock:
        st, _active = _active, None
        if st is None:
            return
        for mod, name, old in reversed(st._saved):
            setattr(mod, name, old)
        st._saved.clear()
