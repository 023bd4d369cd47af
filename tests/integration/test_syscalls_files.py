"""``k.sys`` as one file table over a real virtio-blk device and test sockets.

A real kernel (``kernel.boot``) with a RAM disk served by its own device process: the
block path goes through the new file table, and block fds share one fd space and one
``poll`` with sockets of a kind written here (:class:`PipeNet`, connected in-memory
stream sockets), which plug into :class:`kernel.syscalls.Syscalls` without any change
to it. Waits are events with timeouts, never sleeps.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import stat
import threading
from collections.abc import Callable
from typing import Any

import pytest

import kernel
from kernel.files import (
    AF_INET,
    IPPROTO_TCP,
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLNVAL,
    POLLOUT,
    SOCK_STREAM,
    SocketFile,
    Waiter,
    inet_address,
    socket_protocol,
)
from kernel.syscalls import FIRST_FD, Syscalls

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DISK = 1 << 20
WAIT_S = 30.0


class PipeNet:
    """A stack of in-memory connected stream sockets: ``bind`` names a socket,
    ``connect`` to that name joins the two (both ways)."""

    SUPPORTED = {(AF_INET, SOCK_STREAM): (IPPROTO_TCP,)}

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.named: dict[tuple[str, int], PipeSocket] = {}
        self.bytes_moved = 0

    def socket(self, family: int, type: int, proto: int) -> SocketFile:
        socket_protocol(family, type, proto, self.SUPPORTED)
        return PipeSocket(self)

    def ping(self, addr: str, count: int, timeout: float) -> list[float]:
        return []


class PipeSocket(SocketFile):
    """One end of a :class:`PipeNet` pipe (a test kind of socket)."""

    kind = "pipe"
    family = AF_INET
    type = SOCK_STREAM
    proto = IPPROTO_TCP

    def __init__(self, net: PipeNet) -> None:
        super().__init__("socket:[PIPE]")
        self.net = net
        self.name: tuple[str, int] | None = None
        self.peer: PipeSocket | None = None
        self.buf = bytearray()
        self.eof = False
        self.block = threading.Lock()
        self.waiting = threading.Event()

    def add_waiter(self, w: Waiter) -> None:
        super().add_waiter(w)
        self.waiting.set()

    def poll(self) -> int:
        with self.block:
            return POLLOUT | (POLLIN if self.buf else 0) | (POLLHUP if self.eof else 0)

    def bind(self, addr: tuple[str, int]) -> None:
        self.name = inet_address(addr)
        with self.net.lock:
            self.net.named[self.name] = self

    def connect(self, addr: tuple[str, int]) -> None:
        with self.net.lock:
            other = self.net.named.get(inet_address(addr))
        if other is None:
            raise OSError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
        self.peer, other.peer = other, self

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        peer = self.peer
        if peer is None:
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
        with peer.block:
            peer.buf += data
        with self.net.lock:
            self.net.bytes_moved += len(data)
        peer.wake()
        return len(data)

    def recv(self, n: int, flags: int = 0) -> bytes:
        while True:  # another reader may empty the buffer between wake-up and lock
            self.wait_for(POLLIN, self.timeout)
            with self.block:
                if self.buf or self.eof:
                    out = bytes(self.buf[:n])
                    del self.buf[:n]
                    return out

    def close(self) -> None:
        peer = self.peer
        if peer is not None:
            with peer.block:
                peer.eof = True
            peer.wake()
        super().close()


@pytest.fixture(scope="module")
def k():
    """One kernel with a 1 MiB RAM disk for the module (its own device process)."""
    kern = kernel.boot(devices=[kernel.Blk.memory(DISK)])
    try:
        yield kern
    finally:
        kern.shutdown()


@pytest.fixture
def net() -> PipeNet:
    return PipeNet()


@pytest.fixture
def ks(k, net):
    """A file table over the kernel's real block devices and ``net``."""
    s = Syscalls(lambda: {d.name: d.block for d in k.devices if d.block is not None}, net=net)
    try:
        yield s
    finally:
        s.shutdown()


def _oserror(code: int, fn: Callable[..., Any], *args: Any) -> OSError:
    with pytest.raises(OSError) as ei:
        fn(*args)
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


def _pair(ks: Syscalls, port: int) -> tuple[int, int]:
    a, b = ks.socket(AF_INET, SOCK_STREAM), ks.socket(AF_INET, SOCK_STREAM)
    ks.bind(a, ("127.0.0.1", port))
    ks.connect(b, ("127.0.0.1", port))
    return a, b


def test_block_path_of_k_sys_through_the_file_table(k):
    """The kernel's own ``k.sys``: a block fd is a file of the table, every call keeps
    its behaviour, socket calls on it are ENOTSOCK."""
    q = k.devices[0].queues[0].stats
    r0 = q.requests
    fd = k.sys.open("/dev/vda", os.O_RDWR)
    data = random.Random(1).randbytes(3000)
    assert k.sys.pwrite(fd, data, 777) == 3000  # unaligned: read-modify-write
    assert k.sys.pread(fd, 3000, 777) == data
    assert k.sys.lseek(fd, 777, os.SEEK_SET) == 777
    assert k.sys.read(fd, 10) == data[:10]
    assert k.sys.write(fd, b"0123456789") == 10
    assert k.sys.pread(fd, 20, 777) == data[:10] + b"0123456789"
    k.sys.fsync(fd)
    k.sys.fdatasync(fd)
    st = k.sys.fstat(fd)
    assert stat.S_ISBLK(st.st_mode) and st.st_size == DISK
    assert k.sys.stat("/dev/vda").st_size == DISK
    assert q.requests > r0
    for fn, args in [
        (k.sys.bind, (("127.0.0.1", 1),)),
        (k.sys.recv, (1,)),
        (k.sys.sendto, (b"x", ("127.0.0.1", 1))),
        (k.sys.settimeout, (1.0,)),
        (k.sys.getsockopt, (1, 2)),
    ]:
        _oserror(errno.ENOTSOCK, fn, fd, *args)
    assert k.sys.poll([(fd, POLLIN | POLLOUT)], 0) == [(fd, POLLIN | POLLOUT)]
    ro = k.sys.open("/dev/vda", os.O_RDONLY)
    _oserror(errno.EBADF, k.sys.write, ro, b"x")
    _oserror(errno.ENXIO, k.sys.pwrite, fd, b"x", DISK)
    k.sys.close(fd)
    k.sys.close(ro)
    _oserror(errno.EBADF, k.sys.pread, fd, 1, 0)
    assert k.sys.poll([fd], 0) == [(fd, POLLNVAL)]


def test_block_fds_and_sockets_share_the_fd_space(ks):
    disk = ks.open("/dev/vda", os.O_RDWR)
    s1 = ks.socket(AF_INET, SOCK_STREAM)
    s2 = ks.socket(AF_INET, SOCK_STREAM)
    ro = ks.open("/dev/vda")
    assert (disk, s1, s2, ro) == (FIRST_FD, FIRST_FD + 1, FIRST_FD + 2, FIRST_FD + 3)
    ks.close(s1)
    assert ks.open("/dev/vda") == s1  # lowest free, whichever kind held it
    ks.close(disk)
    assert ks.socket(AF_INET, SOCK_STREAM) == disk
    _oserror(errno.ENOTSOCK, ks.recv, s1, 1)  # now a block fd
    _oserror(errno.ESPIPE, ks.pread, disk, 1, 0)  # now a socket
    assert stat.S_ISSOCK(ks.fstat(disk).st_mode) and stat.S_ISBLK(ks.fstat(s1).st_mode)


def test_one_poll_over_block_fds_and_sockets(ks, net):
    """Sockets and a block fd in one poll: the disk is always ready, a socket when data
    comes; data received on a socket goes to the disk and back out on the other."""
    disk = ks.open("/dev/vda", os.O_RDWR)
    a, b = _pair(ks, 9000)
    # only the disk is ready
    assert ks.poll([(disk, POLLOUT), a, b], 0) == [(disk, POLLOUT)]
    assert ks.poll([a, b], 0) == []
    # a poller of both sockets sleeps until the peer sends
    t, out = _in_thread(lambda: ks.poll([a, b], None))
    sock_b = ks._file(b)
    assert isinstance(sock_b, PipeSocket)
    assert sock_b.waiting.wait(WAIT_S)
    payload = random.Random(2).randbytes(5000)
    assert ks.send(a, payload) == 5000
    t.join(WAIT_S)
    assert not t.is_alive() and out.get("result") == [(b, POLLIN)], out
    # socket -> disk -> socket
    got = ks.recv(b, 10000)
    assert got == payload
    assert ks.pwrite(disk, got, 12345) == len(got)
    assert ks.send(b, ks.pread(disk, len(got), 12345)) == len(got)
    ready = ks.poll([(disk, POLLIN), (a, POLLIN), (b, POLLIN)], 0)
    assert ready == [(disk, POLLIN), (a, POLLIN)]
    assert ks.read(a, 10000) == payload
    assert net.bytes_moved == 10000
    # the peer closes: POLLHUP without asking, recv sees the end
    ks.close(a)
    assert ks.poll([(b, 0), (a, POLLIN), (disk, POLLOUT)], 0) == [
        (b, POLLHUP),
        (a, POLLNVAL),
        (disk, POLLOUT),
    ]
    assert ks.recv(b, 10) == b""


def test_closing_a_socket_wakes_a_poller_that_also_watches_the_disk(ks):
    disk = ks.open("/dev/vda", os.O_RDWR)
    a, _b = _pair(ks, 9100)
    sock_a = ks._file(a)
    assert isinstance(sock_a, PipeSocket)
    # the disk is watched for nothing (events 0), so only the socket can end the wait
    t, out = _in_thread(lambda: ks.poll([(disk, 0), (a, POLLIN)], None))
    assert sock_a.waiting.wait(WAIT_S)
    ks.close(a)
    t.join(WAIT_S)
    assert not t.is_alive() and out.get("result") == [(a, POLLNVAL)], out
    assert sock_a.waiter_count == 0 and ks._file(disk).waiter_count == 0


def test_block_io_from_threads_while_a_poller_waits(ks):
    """Threads doing block I/O through the table while another sleeps in poll on a
    socket: neither disturbs the other, data is intact."""
    disk = ks.open("/dev/vda", os.O_RDWR)
    a, b = _pair(ks, 9200)
    t, out = _in_thread(lambda: ks.poll([b], None))
    errors: list[BaseException] = []

    def io(n: int) -> None:
        rnd = random.Random(10 + n)
        base = n * (128 << 10)
        try:
            for _ in range(20):
                off = base + rnd.randrange(0, 100 << 10)
                data = rnd.randbytes(rnd.choice([512, 700, 4096]))
                assert ks.pwrite(disk, data, off) == len(data)
                assert ks.pread(disk, len(data), off) == data
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    workers = [threading.Thread(target=io, args=(n,)) for n in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(WAIT_S)
    assert not errors, errors
    assert "result" not in out  # nothing for the socket yet
    ks.send(a, b"done")
    t.join(WAIT_S)
    assert out.get("result") == [(b, POLLIN)], out


def test_a_dead_device_is_pollerr_and_eio():
    """A block fd whose device process died: calls fail with EIO, poll adds POLLERR."""
    with kernel.boot(devices=[kernel.Blk.memory(DISK)]) as kk:
        fd = kk.sys.open("/dev/vda", os.O_RDWR)
        assert kk.sys.pwrite(fd, b"alive", 0) == 5
        assert kk.sys.poll([(fd, POLLOUT)], 0) == [(fd, POLLOUT)]
        pid = kk.devices[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _oserror(errno.EIO, kk.sys.pread, fd, 512, 0)
        assert kk.sys.poll([(fd, POLLIN)], 0) == [(fd, POLLIN | POLLERR)]
        assert kk.sys.poll([(fd, 0)], 0) == [(fd, POLLERR)]
