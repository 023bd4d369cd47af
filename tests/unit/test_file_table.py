"""``k.sys`` as a file table, without processes: fds, socket calls, ``poll``.

Two kinds of file are written here, in the test, and plug into :class:`Syscalls`
without any change to it: an in-memory AF_INET datagram socket with its "stack"
(:class:`MemNet`, :class:`MemDgram`) and a ``/dev/null``-like device node
(:class:`NullNodes`, :class:`NullFile`). Waiting is sequenced with events (a test
socket says when a waiter registered with it), never with sleeps.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from kernel import files, syscalls
from kernel.files import (
    AF_INET,
    AF_INET6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MSG_PEEK,
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLNVAL,
    POLLOUT,
    SO_RCVBUF,
    SO_REUSEADDR,
    SO_TYPE,
    SOCK_CLOEXEC,
    SOCK_DGRAM,
    SOCK_NONBLOCK,
    SOCK_STREAM,
    SOL_SOCKET,
    File,
    SocketFile,
    Waiter,
    inet_address,
    socket_protocol,
)
from kernel.syscalls import FIRST_FD, Syscalls

pytestmark = pytest.mark.timeout(60)

#: How long a test waits for something that must happen (a bound, not a measurement).
WAIT_S = 30.0


# --------------------------------------------------------------------------- test kinds


class MemNet:
    """A network stack of in-memory datagram sockets (a test kind of socket)."""

    SUPPORTED = {(AF_INET, SOCK_DGRAM): (IPPROTO_UDP,)}

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bound: dict[tuple[str, int], MemDgram] = {}
        self.next_port = 40000
        self.delivered = 0
        self.dropped = 0
        self.pings: list[tuple[str, int, float]] = []

    def socket(self, family: int, type: int, proto: int) -> SocketFile:
        socket_protocol(family, type, proto, self.SUPPORTED)
        return MemDgram(self)

    def ping(self, addr: str, count: int, timeout: float) -> list[float]:
        self.pings.append((addr, count, timeout))
        return [0.001 * (i + 1) for i in range(count)] if addr == "127.0.0.1" else []

    def deliver(self, src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        with self.lock:
            s = self.bound.get(dst) or self.bound.get(("0.0.0.0", dst[1]))
            if s is None:
                self.dropped += 1
                return
            self.delivered += 1
        s.enqueue(src, data)


class MemDgram(SocketFile):
    """One in-memory datagram socket of :class:`MemNet`."""

    kind = "memdgram"
    family = AF_INET
    type = SOCK_DGRAM
    proto = IPPROTO_UDP

    def __init__(self, net: MemNet) -> None:
        super().__init__("socket:[MEMDGRAM]")
        self.net = net
        self.local: tuple[str, int] | None = None
        self.peer: tuple[str, int] | None = None
        self.queue: deque[tuple[bytes, tuple[str, int]]] = deque()
        self.qlock = threading.Lock()
        self.opts: dict[tuple[int, int], Any] = {}
        self.error = False
        self.hangup = False
        #: Set when a waiter registers (a poller or blocked call is about to sleep).
        self.waiting = threading.Event()
        #: Called once, inside the next readiness check, after the mask was computed.
        self.after_check: Callable[[], None] | None = None

    def add_waiter(self, w: Waiter) -> None:
        super().add_waiter(w)
        self.waiting.set()

    def poll(self) -> int:
        with self.qlock:
            mask = POLLOUT | (POLLIN if self.queue else 0)
        mask |= (POLLERR if self.error else 0) | (POLLHUP if self.hangup else 0)
        hook, self.after_check = self.after_check, None
        if hook is not None:
            hook()
        return mask

    def enqueue(self, src: tuple[str, int], data: bytes) -> None:
        with self.qlock:
            self.queue.append((bytes(data), src))
        self.wake()

    def fail(self, *, error: bool = False, hangup: bool = False) -> None:
        self.error, self.hangup = error, hangup
        self.wake()

    def bind(self, addr: tuple[str, int]) -> None:
        host, port = inet_address(addr)
        with self.net.lock:
            if self.local is not None:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            if port == 0:
                port = self.net.next_port
                self.net.next_port += 1
            if (host, port) in self.net.bound:
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
            self.net.bound[(host, port)] = self
            self.local = (host, port)

    def _src(self) -> tuple[str, int]:
        if self.local is None:
            self.bind(("", 0))
        assert self.local is not None
        host, port = self.local
        return ("127.0.0.1" if host == "0.0.0.0" else host, port)

    def connect(self, addr: tuple[str, int]) -> None:
        self.peer = inet_address(addr)
        self._src()

    def sendto(self, data: bytes | bytearray | memoryview, addr: tuple[str, int]) -> int:
        dst = inet_address(addr)
        self.net.deliver(self._src(), dst, bytes(data))
        return len(data)

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        if self.peer is None:
            raise OSError(errno.EDESTADDRREQ, os.strerror(errno.EDESTADDRREQ))
        return self.sendto(data, self.peer)

    def recvfrom(self, n: int, flags: int = 0) -> tuple[bytes, tuple[str, int]]:
        while True:  # another reader may take the datagram between wake-up and lock
            self.wait_for(POLLIN, self.timeout)
            with self.qlock:
                if self.queue:
                    data, src = self.queue[0] if flags & MSG_PEEK else self.queue.popleft()
                    return data[:n], src

    def recv(self, n: int, flags: int = 0) -> bytes:
        return self.recvfrom(n, flags)[0]

    def getsockname(self) -> tuple[str, int]:
        return self.local or ("0.0.0.0", 0)

    def getpeername(self) -> tuple[str, int]:
        if self.peer is None:
            return super().getpeername()
        return self.peer

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        if (level, option) not in ((SOL_SOCKET, SO_RCVBUF), (SOL_SOCKET, SO_REUSEADDR)):
            super().setsockopt(level, option, value)
        self.opts[(level, option)] = value

    def getsockopt(self, level: int, option: int) -> Any:
        if (level, option) == (SOL_SOCKET, SO_TYPE):
            return self.type
        if (level, option) in self.opts:
            return self.opts[(level, option)]
        return super().getsockopt(level, option)

    def close(self) -> None:
        with self.net.lock:
            if self.local is not None:
                self.net.bound.pop(self.local, None)
        super().close()


class NullFile(File):
    """A ``/dev/null``: reads are empty, writes vanish (a test kind of device node)."""

    kind = "null"

    def read(self, n: int) -> bytes:
        return b""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return len(memoryview(data))

    def fstat(self) -> os.stat_result:
        return NullNodes().stat("/dev/null") or os.stat_result((0,) * 10)


class NullNodes:
    """The node table of ``/dev/null``."""

    def __init__(self) -> None:
        self.opened: list[NullFile] = []

    def open(self, path: str, flags: int) -> File | None:
        if path not in ("/dev/null", "/dev/broken"):
            return None
        f = NullFile(path) if path == "/dev/null" else BrokenFile(path)
        self.opened.append(f)
        return f

    def stat(self, path: str) -> os.stat_result | None:
        if path != "/dev/null":
            return None
        return os.stat_result((stat.S_IFCHR | 0o666, 1, 0, 1, 0, 0, 0, 0, 0, 0))


class BrokenFile(NullFile):
    """A file whose readiness check raises (to see ``poll`` clean up)."""

    def poll(self) -> int:
        raise RuntimeError("poll broke")


@pytest.fixture
def net() -> MemNet:
    return MemNet()


@pytest.fixture
def nodes() -> NullNodes:
    return NullNodes()


@pytest.fixture
def ks(net: MemNet, nodes: NullNodes):
    s = Syscalls(lambda: {}, net=net)
    s.add_nodes(nodes)
    try:
        yield s
    finally:
        s.shutdown()


def _oserror(code: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> OSError:
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    assert ei.value.errno == code, ei.value
    return ei.value


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _finish(t: threading.Thread) -> None:
    t.join(WAIT_S)
    assert not t.is_alive(), "the thread did not finish"


def _memsock(ks: Syscalls, fd: int) -> MemDgram:
    f = ks._file(fd)
    assert isinstance(f, MemDgram)
    return f


# --------------------------------------------------------------------------- socket calls


def test_datagram_round_trip_through_the_socket_calls(ks, net):
    a = ks.socket()
    b = ks.socket(AF_INET, SOCK_DGRAM, IPPROTO_UDP)
    ks.bind(a, ("127.0.0.1", 5000))
    assert ks.getsockname(a) == ("127.0.0.1", 5000)
    assert ks.sendto(b, b"hello", ("127.0.0.1", 5000)) == 5
    src = ks.getsockname(b)
    assert src[1] == 40000  # autobound on first send
    assert ks.recvfrom(a, 100) == (b"hello", ("127.0.0.1", 40000))
    # connected: send/recv, and read/write on the fd are recv/send
    ks.connect(a, ("127.0.0.1", 40000))
    assert ks.getpeername(a) == ("127.0.0.1", 40000)
    assert ks.send(a, bytearray(b"back")) == 4
    assert ks.recv(b, 2) == b"ba"  # truncated, as a datagram is
    assert ks.write(a, memoryview(b"via write")) == 9
    assert ks.read(b, 100) == b"via write"
    assert (net.delivered, net.dropped) == (3, 0)
    ks.sendto(a, b"nobody", ("10.0.0.9", 9))
    assert net.dropped == 1
    # MSG_PEEK leaves the datagram queued
    ks.sendto(a, b"peek", ("127.0.0.1", 40000))
    assert ks.recv(b, 10, MSG_PEEK) == b"peek"
    assert ks.recv(b, 10) == b"peek"


def test_socket_options_names_and_stat(ks):
    fd = ks.socket()
    ks.setsockopt(fd, SOL_SOCKET, SO_RCVBUF, 65536)
    ks.setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, True)
    assert ks.getsockopt(fd, SOL_SOCKET, SO_RCVBUF) == 65536
    assert ks.getsockopt(fd, SOL_SOCKET, SO_REUSEADDR) == 1
    assert ks.getsockopt(fd, SOL_SOCKET, SO_TYPE) == SOCK_DGRAM
    _oserror(errno.ENOPROTOOPT, ks.setsockopt, fd, SOL_SOCKET, 999, 1)
    _oserror(errno.ENOPROTOOPT, ks.getsockopt, fd, SOL_SOCKET, 999)
    with pytest.raises(TypeError):
        ks.setsockopt(fd, SOL_SOCKET, SO_RCVBUF, "big")
    with pytest.raises(TypeError):
        ks.getsockopt(fd, "SOL_SOCKET", SO_RCVBUF)
    _oserror(errno.ENOTCONN, ks.getpeername, fd)
    assert ks.getsockname(fd) == ("0.0.0.0", 0)
    assert stat.S_ISSOCK(ks.fstat(fd).st_mode)
    # a socket has no position and nothing to sync
    _oserror(errno.ESPIPE, ks.pread, fd, 1, 0)
    _oserror(errno.ESPIPE, ks.pwrite, fd, b"x", 0)
    _oserror(errno.ESPIPE, ks.lseek, fd, 0, os.SEEK_SET)
    _oserror(errno.EINVAL, ks.fsync, fd)
    _oserror(errno.EINVAL, ks.fdatasync, fd)
    _oserror(errno.EDESTADDRREQ, ks.send, fd, b"x")


def test_socket_argument_checks_follow_the_socket_module(ks):
    fd = ks.socket()
    with pytest.raises(ValueError, match="negative buffersize in recv"):
        ks.recv(fd, -1)
    with pytest.raises(ValueError, match="negative buffersize in recvfrom"):
        ks.recvfrom(fd, -1)
    _oserror(errno.EINVAL, ks.read, fd, -1)  # os.read semantics
    with pytest.raises(TypeError, match="bytes-like"):
        ks.send(fd, "text")
    with pytest.raises(TypeError, match="bytes-like"):
        ks.sendto(fd, "text", ("127.0.0.1", 1))
    with pytest.raises(TypeError, match="bytes-like"):
        ks.write(fd, "text")
    with pytest.raises(TypeError, match="must be tuple"):
        ks.sendto(fd, b"x", "127.0.0.1:1")
    with pytest.raises(OverflowError, match="0-65535"):
        ks.sendto(fd, b"x", ("127.0.0.1", 70000))
    _oserror(errno.EINVAL, ks.sendto, fd, b"x", ("example.com", 1))
    _oserror(errno.EINVAL, ks.bind, fd, ("256.1.1.1", 1))
    with pytest.raises(TypeError):
        ks.recv(fd, 1, "flags")


def test_socket_creation_errnos(ks):
    _oserror(errno.EAFNOSUPPORT, ks.socket, AF_INET6, SOCK_DGRAM)  # the stack lacks it
    _oserror(errno.EAFNOSUPPORT, ks.socket, 200, SOCK_DGRAM)  # no such family at all
    _oserror(errno.EAFNOSUPPORT, ks.socket, -1, SOCK_DGRAM)
    _oserror(errno.ESOCKTNOSUPPORT, ks.socket, AF_INET, SOCK_STREAM)
    _oserror(errno.EPROTONOSUPPORT, ks.socket, AF_INET, SOCK_DGRAM, IPPROTO_TCP)
    _oserror(errno.EINVAL, ks.socket, AF_INET, 12)  # beyond SOCK_MAX
    _oserror(errno.EINVAL, ks.socket, AF_INET, SOCK_DGRAM | 0x10000)  # unknown flag
    with pytest.raises(TypeError):
        ks.socket("inet")
    fd = ks.socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC)
    assert ks.gettimeout(fd) == 0.0
    assert ks.gettimeout(ks.socket()) is None


def test_socket_protocol_rules():
    table = {(AF_INET, SOCK_DGRAM): (IPPROTO_UDP,), (AF_INET, SOCK_STREAM): (IPPROTO_TCP,)}
    assert socket_protocol(AF_INET, SOCK_DGRAM, 0, table) == IPPROTO_UDP
    assert socket_protocol(AF_INET, SOCK_STREAM, IPPROTO_TCP, table) == IPPROTO_TCP
    _oserror(errno.EPROTONOSUPPORT, socket_protocol, AF_INET, SOCK_STREAM, IPPROTO_UDP, table)
    _oserror(errno.ESOCKTNOSUPPORT, socket_protocol, AF_INET, 3, 0, table)
    _oserror(errno.EAFNOSUPPORT, socket_protocol, AF_INET6, SOCK_DGRAM, 0, table)
    _oserror(errno.EINVAL, socket_protocol, AF_INET, 11, 0, table)


def test_inet_address_checks():
    assert inet_address(("", 7)) == ("0.0.0.0", 7)
    assert inet_address(("<broadcast>", 7)) == ("255.255.255.255", 7)
    assert inet_address(("010.0.0.1", 65535)) == ("10.0.0.1", 65535)
    for bad in ["1.2.3", "1.2.3.4.5", "1.2.3.x", "1.2.3.256", "-1.2.3.4", "١.2.3.4", "a b"]:
        _oserror(errno.EINVAL, inet_address, (bad, 1))
    for bad_type in [("1.2.3.4",), ("1.2.3.4", 1, 2), [("1.2.3.4", 1)], (1234, 1), ("x", "1")]:
        with pytest.raises(TypeError):
            inet_address(bad_type)
    with pytest.raises(OverflowError):
        inet_address(("1.2.3.4", -1))


def test_without_a_stack_sockets_and_ping_fail():
    ks = Syscalls(lambda: {})
    try:
        _oserror(errno.EAFNOSUPPORT, ks.socket)
        _oserror(errno.EAFNOSUPPORT, ks.socket, AF_INET, SOCK_DGRAM, 0)
        _oserror(errno.ENETUNREACH, ks.ping, "10.0.0.1")
    finally:
        ks.shutdown()


def test_ping_checks_its_arguments_and_delegates(ks, net):
    assert ks.ping("127.0.0.1", count=2, timeout=0.5) == [0.001, 0.002]
    assert ks.ping("10.0.0.77") == []
    assert net.pings == [("127.0.0.1", 2, 0.5), ("10.0.0.77", 3, 1.0)]
    with pytest.raises(ValueError):
        ks.ping("127.0.0.1", count=0)
    with pytest.raises(ValueError):
        ks.ping("127.0.0.1", timeout=0)
    with pytest.raises(TypeError):
        ks.ping(("127.0.0.1", 0))
    with pytest.raises(TypeError):
        ks.ping("127.0.0.1", count=1.5)
    _oserror(errno.EINVAL, ks.ping, "localhost")
    assert len(net.pings) == 2  # refused calls never reached the stack


def test_timeouts_and_blocking(ks):
    fd = ks.socket()
    ks.bind(fd, ("127.0.0.1", 0))
    with pytest.raises(ValueError, match="out of range"):
        ks.settimeout(fd, -1)
    with pytest.raises(TypeError):
        ks.settimeout(fd, "1")
    with pytest.raises(TypeError):
        ks.settimeout(fd, True)
    ks.settimeout(fd, 2)
    assert ks.gettimeout(fd) == 2.0 and isinstance(ks.gettimeout(fd), float)
    ks.setblocking(fd, False)
    assert ks.gettimeout(fd) == 0.0
    with pytest.raises(BlockingIOError) as ei:
        ks.recv(fd, 10)
    assert ei.value.errno == errno.EAGAIN
    ks.setblocking(fd, 1)
    assert ks.gettimeout(fd) is None
    ks.settimeout(fd, 0.01)
    with pytest.raises(TimeoutError) as te:
        ks.recvfrom(fd, 10)
    assert te.value.errno == errno.ETIMEDOUT
    assert _memsock(ks, fd).waiter_count == 0


# --------------------------------------------------------------------------- the table


def test_fds_are_one_space_lowest_free_first(ks, nodes):
    a = ks.socket()
    b = ks.open("/dev/null", os.O_RDWR)
    c = ks.socket()
    assert (a, b, c) == (FIRST_FD, FIRST_FD + 1, FIRST_FD + 2)
    ks.close(b)
    assert ks.socket() == b  # the lowest free number, whatever kind held it
    ks.close(a)
    assert ks.open("/dev/null") == a
    assert ks.read(a, 10) == b"" and ks.write(a, b"gone") == 4
    assert stat.S_ISCHR(ks.fstat(a).st_mode) and stat.S_ISCHR(ks.stat("/dev/null").st_mode)
    _oserror(errno.ENOENT, ks.open, "/dev/vda")
    _oserror(errno.ENOENT, ks.stat, "/dev/vda")


def test_socket_calls_on_a_non_socket_are_enotsock(ks):
    fd = ks.open("/dev/null", os.O_RDWR)
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        (ks.bind, (("127.0.0.1", 1),)),
        (ks.connect, (("127.0.0.1", 1),)),
        (ks.sendto, (b"x", ("127.0.0.1", 1))),
        (ks.send, (b"x",)),
        (ks.recvfrom, (1,)),
        (ks.recv, (1,)),
        (ks.getsockname, ()),
        (ks.getpeername, ()),
        (ks.setsockopt, (SOL_SOCKET, SO_RCVBUF, 1)),
        (ks.getsockopt, (SOL_SOCKET, SO_RCVBUF)),
        (ks.settimeout, (1.0,)),
        (ks.gettimeout, ()),
        (ks.setblocking, (False,)),
    ]
    for fn, args in calls:
        _oserror(errno.ENOTSOCK, fn, fd, *args)
    _oserror(errno.ESPIPE, ks.pread, fd, 1, 0)  # File's defaults for what a kind lacks


def test_every_call_on_a_bad_fd_is_ebadf(ks):
    sock = ks.socket()
    ks.close(sock)
    for fd in (sock, 999, -1):
        for fn, args in [
            (ks.read, (1,)),
            (ks.write, (b"x",)),
            (ks.pread, (1, 0)),
            (ks.pwrite, (b"x", 0)),
            (ks.lseek, (0, os.SEEK_SET)),
            (ks.fsync, ()),
            (ks.fdatasync, ()),
            (ks.fstat, ()),
            (ks.close, ()),
            (ks.dup, ()),
            (ks.bind, (("127.0.0.1", 1),)),
            (ks.connect, (("127.0.0.1", 1),)),
            (ks.sendto, (b"x", ("127.0.0.1", 1))),
            (ks.send, (b"x",)),
            (ks.recvfrom, (1,)),
            (ks.recv, (1,)),
            (ks.getsockname, ()),
            (ks.getpeername, ()),
            (ks.setsockopt, (SOL_SOCKET, SO_RCVBUF, 1)),
            (ks.getsockopt, (SOL_SOCKET, SO_RCVBUF)),
            (ks.settimeout, (1.0,)),
            (ks.gettimeout, ()),
            (ks.setblocking, (False,)),
        ]:
            _oserror(errno.EBADF, fn, fd, *args)
    for bad in ("3", 3.0, None, True):
        with pytest.raises(TypeError):
            ks.read(bad, 1)
        with pytest.raises(TypeError):
            ks.close(bad)
        with pytest.raises(TypeError):
            ks.recv(bad, 1)


def test_close_releases_the_file_once_its_last_fd_goes(ks, net):
    fd = ks.socket()
    ks.bind(fd, ("127.0.0.1", 6000))
    sock = _memsock(ks, fd)
    twin = ks.dup(fd)
    assert twin == fd + 1 and ks.getsockname(twin) == ("127.0.0.1", 6000)
    ks.close(fd)
    assert not sock.closed and ("127.0.0.1", 6000) in net.bound
    ks.close(twin)
    assert sock.closed and ("127.0.0.1", 6000) not in net.bound
    _oserror(errno.EBADF, ks.close, twin)


def test_table_limit_is_emfile(ks, monkeypatch):
    monkeypatch.setattr(syscalls, "MAX_FDS", 4)
    fds = [ks.socket() for _ in range(4)]
    _oserror(errno.EMFILE, ks.socket)
    _oserror(errno.EMFILE, ks.open, "/dev/null")
    _oserror(errno.EMFILE, ks.dup, fds[0])
    ks.close(fds[2])
    assert ks.open("/dev/null") == fds[2]
    with pytest.raises(OSError) as ei:
        ks.poll([fds[0]] * 5, 0)
    assert ei.value.errno == errno.EINVAL


def test_shutdown_closes_every_file(net, nodes):
    ks = Syscalls(lambda: {}, net=net)
    ks.add_nodes(nodes)
    socks = [_memsock(ks, ks.socket()) for _ in range(3)]
    null = ks.open("/dev/null")
    ks.dup(null)
    blocked = socks[0]
    t, out = _in_thread(lambda: ks.recv(FIRST_FD, 10))
    assert blocked.waiting.wait(WAIT_S)
    ks.shutdown()
    _finish(t)
    assert isinstance(out.get("error"), OSError) and out["error"].errno == errno.EBADF
    assert all(s.closed for s in socks) and nodes.opened[0].closed
    assert net.bound == {}
    _oserror(errno.EBADF, ks.read, null, 1)
    _oserror(errno.ENODEV, ks.open, "/dev/null")
    _oserror(errno.ENODEV, ks.socket)
    assert ks.poll([(null, POLLIN)], 0) == [(null, POLLNVAL)]
    ks.shutdown()  # idempotent


def test_close_wakes_a_blocked_recv_with_ebadf(ks):
    fd = ks.socket()
    ks.bind(fd, ("127.0.0.1", 0))
    sock = _memsock(ks, fd)
    t, out = _in_thread(lambda: ks.recv(fd, 10))
    assert sock.waiting.wait(WAIT_S)  # it is about to sleep (or sleeping)
    ks.close(fd)
    _finish(t)
    assert isinstance(out.get("error"), OSError) and out["error"].errno == errno.EBADF
    assert sock.waiter_count == 0


def test_blocked_recv_gets_the_datagram_sent_later(ks):
    rx, tx = ks.socket(), ks.socket()
    ks.bind(rx, ("127.0.0.1", 7000))
    t, out = _in_thread(lambda: ks.recvfrom(rx, 100))
    assert _memsock(ks, rx).waiting.wait(WAIT_S)
    ks.sendto(tx, b"late", ("127.0.0.1", 7000))
    _finish(t)
    assert out.get("result") == (b"late", ("127.0.0.1", ks.getsockname(tx)[1])), out


# --------------------------------------------------------------------------- poll


def test_poll_reports_what_is_ready_at_once(ks):
    a, b = ks.socket(), ks.socket()
    null = ks.open("/dev/null")
    ks.bind(a, ("127.0.0.1", 8000))
    assert ks.poll([a, b], 0) == []  # plain fds mean POLLIN; nothing queued
    ks.sendto(b, b"x", ("127.0.0.1", 8000))
    assert ks.poll([a, b]) == [(a, POLLIN)]
    assert ks.poll([(b, POLLOUT), (a, POLLIN | POLLOUT), (null, POLLIN)], 0) == [
        (b, POLLOUT),
        (a, POLLIN | POLLOUT),
        (null, POLLIN),
    ]
    assert ks.poll([(a, POLLIN), (a, POLLOUT)], 0) == [(a, POLLIN), (a, POLLOUT)]  # duplicates
    assert ks.poll([(-1, POLLIN), (a, 0)], 0) == []  # negative fds ignored; nothing asked
    assert ks.poll([], 0) == []


def test_poll_always_reports_err_and_hup(ks):
    fd = ks.socket()
    sock = _memsock(ks, fd)
    sock.fail(error=True)
    assert ks.poll([(fd, 0)], 0) == [(fd, POLLERR)]
    sock.fail(hangup=True)
    assert ks.poll([(fd, POLLIN)], 0) == [(fd, POLLHUP)]


def test_poll_timeout_returns_an_empty_list(ks):
    fd = ks.socket()
    assert ks.poll([fd], 0) == []
    assert ks.poll([fd], 0.01) == []
    assert _memsock(ks, fd).waiter_count == 0


def test_poll_is_woken_by_another_thread(ks):
    rx, tx = ks.socket(), ks.socket()
    ks.bind(rx, ("127.0.0.1", 8100))
    t, out = _in_thread(lambda: ks.poll([(rx, POLLIN)], None))
    assert _memsock(ks, rx).waiting.wait(WAIT_S)
    ks.sendto(tx, b"wake", ("127.0.0.1", 8100))
    _finish(t)
    assert out.get("result") == [(rx, POLLIN)], out
    assert _memsock(ks, rx).waiter_count == 0


def test_poll_of_closed_fds_is_pollnval(ks):
    a, b = ks.socket(), ks.socket()
    ks.close(a)
    assert ks.poll([a, 12345, (b, POLLOUT)], 0) == [(a, POLLNVAL), (12345, POLLNVAL), (b, POLLOUT)]


def test_closing_a_polled_fd_wakes_the_poller_with_pollnval(ks):
    fd = ks.socket()
    sock = _memsock(ks, fd)
    t, out = _in_thread(lambda: ks.poll([fd], None))
    assert sock.waiting.wait(WAIT_S)
    ks.close(fd)
    reused = ks.socket()  # the number comes back at once, for another file
    assert reused == fd
    _finish(t)
    assert out.get("result") == [(fd, POLLNVAL)], out
    assert sock.waiter_count == 0


def test_closing_one_of_two_fds_wakes_its_poller(ks):
    fd = ks.socket()
    twin = ks.dup(fd)
    sock = _memsock(ks, fd)
    t, out = _in_thread(lambda: ks.poll([twin], None))
    assert sock.waiting.wait(WAIT_S)
    ks.close(twin)
    _finish(t)
    assert out.get("result") == [(twin, POLLNVAL)], out
    assert not sock.closed and sock.waiter_count == 0


def _without_a_timeout(ks: Syscalls, fd: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (a poll or blocking call on ``fd`` that waits forever) in a thread
    and return its result; if it is still waiting after WAIT_S a wake-up was lost:
    close ``fd`` to release it and fail."""
    t, out = _in_thread(fn)
    t.join(WAIT_S)
    if t.is_alive():
        ks.close(fd)
        _finish(t)
        pytest.fail("a wake-up was lost: the call slept through it")
    if "error" in out:
        raise out["error"]
    return out["result"]


def test_a_wake_up_between_check_and_sleep_is_not_lost(ks):
    """The datagram arrives (and wakes) right after the readiness check saw nothing,
    before the caller sleeps (it has no timeout): the call must still return it."""
    rx, tx = ks.socket(), ks.socket()
    ks.bind(rx, ("127.0.0.1", 8200))
    sock = _memsock(ks, rx)
    for i in range(200):
        sock.after_check = lambda: ks.sendto(tx, b"now", ("127.0.0.1", 8200))
        assert _without_a_timeout(ks, rx, lambda: ks.poll([rx], None)) == [(rx, POLLIN)], i
        assert ks.recv(rx, 10) == b"now"

        # the same for a blocking call (File.wait_for): its first check comes before
        # it registers, so the datagram arrives right after the second one
        def arm() -> None:
            sock.after_check = lambda: ks.sendto(tx, b"too", ("127.0.0.1", 8200))

        sock.after_check = arm
        assert _without_a_timeout(ks, rx, lambda: ks.recv(rx, 10)) == b"too", i
        assert sock.waiter_count == 0


def test_racing_sender_and_poller_many_times(ks):
    """A poller (no timeout) and a sender released together, many times: every poll
    returns the datagram (no wake-up lost, whatever the interleaving)."""
    rx, tx = ks.socket(), ks.socket()
    ks.bind(rx, ("127.0.0.1", 8300))
    sock = _memsock(ks, rx)
    rounds = 300
    go = [threading.Event() for _ in range(rounds)]

    def poller() -> list[list[tuple[int, int]]]:
        seen = []
        for ev in go:
            ev.set()
            seen.append(ks.poll([rx], None))
            ks.recv(rx, 1)
        return seen

    t, out = _in_thread(poller)
    for ev in go:
        assert ev.wait(WAIT_S)
        ks.sendto(tx, b"r", ("127.0.0.1", 8300))
    t.join(WAIT_S)
    if t.is_alive():
        ks.close(rx)
        _finish(t)
        pytest.fail("a wake-up was lost: the poller slept through it")
    assert "error" not in out, out
    assert out["result"] == [[(rx, POLLIN)]] * rounds
    assert sock.waiter_count == 0


def test_poll_deregisters_when_a_check_raises(ks, nodes):
    fd = ks.socket()
    sock = _memsock(ks, fd)
    nodes_fd = ks.open("/dev/null")
    bfd = ks.open("/dev/broken")
    broken = nodes.opened[1]
    with pytest.raises(RuntimeError, match="poll broke"):
        ks.poll([fd, nodes_fd, bfd], None)
    assert sock.waiter_count == 0 and broken.waiter_count == 0
    assert nodes.opened[0].waiter_count == 0


def test_poll_argument_checks(ks):
    fd = ks.socket()
    with pytest.raises(ValueError):
        ks.poll([fd], -1)
    with pytest.raises(TypeError):
        ks.poll([fd], "1")
    with pytest.raises(ValueError):
        ks.poll([(fd, 0x10000)], 0)
    with pytest.raises(ValueError):
        ks.poll([(fd, -1)], 0)
    with pytest.raises(TypeError):
        ks.poll([(fd, POLLIN, 0)], 0)
    with pytest.raises(TypeError):
        ks.poll([str(fd)], 0)
    with pytest.raises(TypeError):
        ks.poll(fd, 0)
    assert ks.poll(iter([fd]), 0) == []  # any iterable


def test_waiter_keeps_a_wake_until_the_wait():
    w = Waiter()
    w.wake()
    assert w.wait(None) is True  # woken before the wait: returns at once
    assert w.wait(0) is False


def test_files_module_exports_the_linux_numbers():
    assert (files.AF_INET, files.SOCK_DGRAM, files.SOCK_STREAM, files.SOL_SOCKET) == (2, 2, 1, 1)
    assert (files.SO_REUSEADDR, files.SO_BROADCAST, files.SO_RCVBUF, files.SO_SNDBUF) == (
        2,
        6,
        8,
        7,
    )
    assert (files.IPPROTO_UDP, files.IPPROTO_TCP) == (17, 6)
    assert set(files.__all__) <= set(dir(files))
