"""TCP through ``k.sys`` (the fd table over real stacks on the in-memory hub): socket,
bind, listen, accept, connect, sendall, recv_into, shutdown, poll readiness, socket
options, errnos; plus simultaneous open and close, and the negotiated options."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest
from test_stack_helpers import pattern, wait_timers
from test_tcp_helpers import FAST, TcpLan

from kernel.files import (
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLOUT,
    SHUT_RD,
    SHUT_RDWR,
    SHUT_WR,
    SO_KEEPALIVE,
    SO_RCVBUF,
    SO_SNDBUF,
    SO_TYPE,
    SOCK_NONBLOCK,
    SOCK_STREAM,
    SOL_SOCKET,
    SOL_TCP,
    TCP_NODELAY,
)
from kernel.net.tcp import CLOSED, ESTABLISHED, TIME_WAIT, TcpSocket
from kernel.syscalls import Syscalls

A, B = "10.0.0.1", "10.0.0.2"


@pytest.fixture
def lan() -> Iterator[TcpLan]:
    with TcpLan() as lan:
        yield lan


def _sys(lan: TcpLan, i: int) -> Syscalls:
    return Syscalls(lambda: {}, lan.stacks[i])


def test_listen_accept_sendall_recv_into_shutdown(lan: TcpLan) -> None:
    a, b = _sys(lan, 0), _sys(lan, 1)
    lfd = b.socket(type=SOCK_STREAM)
    b.bind(lfd, ("0.0.0.0", 8080))
    b.listen(lfd, 4)
    assert b.poll([(lfd, POLLIN)], 0) == []
    c = a.socket(type=SOCK_STREAM)
    a.settimeout(c, 10)
    a.connect(c, (B, 8080))
    assert b.poll([(lfd, POLLIN)], 10) == [(lfd, POLLIN)]
    s, addr = b.accept(lfd)
    b.settimeout(s, 10)
    assert addr == a.getsockname(c) and b.getpeername(s) == addr
    assert b.getsockopt(s, SOL_SOCKET, SO_TYPE) == SOCK_STREAM
    assert a.poll([(c, POLLOUT | POLLIN)], 0) == [(c, POLLOUT)]
    data = pattern(500_000, 2)
    a.sendall(c, data)
    a.shutdown(c, SHUT_WR)
    buf = bytearray(70000)
    got = bytearray()
    while True:  # ends at EOF
        n = b.recv_into(s, buf)
        if not n:
            break
        got += buf[:n]
    assert bytes(got) == data
    assert b.poll([(s, POLLIN)], 0) == [(s, POLLIN)]  # EOF is readable
    b.sendall(s, b"bye")
    b.shutdown(s, SHUT_RDWR)
    assert a.recv(c, 10) == b"bye" and a.recv(c, 10) == b""
    wait_timers(lan.timers, FAST.rto_max_s)
    assert a.poll([(c, 0)], 0)[0][1] & POLLHUP
    for sys_, fd in ((a, c), (b, s), (b, lfd)):
        sys_.close(fd)
    a.shutdown()
    b.shutdown()


def test_errnos(lan: TcpLan) -> None:
    a, b = _sys(lan, 0), _sys(lan, 1)
    fd = a.socket(type=SOCK_STREAM)
    for call, args in (
        (a.send, (b"x",)),
        (a.recv, (10,)),
        (a.getpeername, ()),
        (a.shutdown, (SHUT_WR,)),
    ):
        with pytest.raises(OSError) as e:
            call(fd, *args)  # type: ignore[operator]
        assert e.value.errno == errno.ENOTCONN, call
    with pytest.raises(OSError) as e:
        a.accept(fd)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        a.shutdown(fd, 7)
    assert e.value.errno == errno.EINVAL
    lfd = b.socket(type=SOCK_STREAM)
    b.bind(lfd, ("0.0.0.0", 9))
    b.listen(lfd)
    other = b.socket(type=SOCK_STREAM)
    with pytest.raises(OSError) as e:
        b.bind(other, ("0.0.0.0", 9))
    assert e.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError) as e:
        b.bind(other, ("10.9.9.9", 9))
    assert e.value.errno == errno.EADDRNOTAVAIL
    with pytest.raises(OSError) as e:
        b.connect(lfd, (A, 1))
    assert e.value.errno == errno.EINVAL
    nb = a.socket(type=SOCK_STREAM | SOCK_NONBLOCK)
    assert a.connect_ex(nb, (B, 9)) == errno.EINPROGRESS
    assert a.poll([(nb, POLLOUT)], 10) == [(nb, POLLOUT)]
    with pytest.raises(OSError) as e:
        a.connect(nb, (B, 9))
    assert e.value.errno == errno.EISCONN
    with pytest.raises(BlockingIOError):
        a.recv(nb, 10)
    s, _ = b.accept(lfd)
    b.close(s)  # no unread data: FIN
    a.settimeout(nb, 10)
    assert a.recv(nb, 10) == b""
    a.send(nb, b"after the peer closed")  # the peer answers with RST
    assert a._file(nb).wait_for(0, 10) & POLLERR  # the RST arrived
    with pytest.raises(OSError) as e:
        a.send(nb, b"x")
    assert e.value.errno == errno.ECONNRESET
    assert lan.stacks[1].stats["tcp_rst_sent"] == 1
    with pytest.raises(OSError) as e:
        a.send(nb, b"x")
    assert e.value.errno == errno.EPIPE
    a.shutdown()
    b.shutdown()


def test_options_and_window_follows_rcvbuf(lan: TcpLan) -> None:
    a, b = _sys(lan, 0), _sys(lan, 1)
    fd = a.socket(type=SOCK_STREAM)
    for opt, v in ((SO_RCVBUF, 100_000), (SO_SNDBUF, 50_000), (SO_KEEPALIVE, 1)):
        a.setsockopt(fd, SOL_SOCKET, opt, v)
        assert a.getsockopt(fd, SOL_SOCKET, opt) == v
    a.setsockopt(fd, SOL_TCP, TCP_NODELAY, True)
    assert a.getsockopt(fd, SOL_TCP, TCP_NODELAY) == 1
    with pytest.raises(OSError) as e:
        a.setsockopt(fd, SOL_TCP, 99, 1)
    assert e.value.errno == errno.ENOPROTOOPT
    lfd = b.socket(type=SOCK_STREAM)
    b.bind(lfd, ("0.0.0.0", 1234))
    b.listen(lfd)
    a.settimeout(fd, 10)
    a.connect(fd, (B, 1234))
    s, _ = b.accept(lfd)
    sock_a = a._file(fd)
    sock_b = b._file(s)
    assert isinstance(sock_a, TcpSocket) and isinstance(sock_b, TcpSocket)
    assert sock_a.rcv_wscale == 1 and sock_b.snd_wscale == 1  # 100000 >> 1 fits 16 bits
    assert sock_a.ts_ok and sock_b.ts_ok
    assert sock_a.mss == 1460 and sock_a.seg_size == 1448
    assert sock_b.snd_wnd <= 100_000
    for sys_, f in ((a, fd), (b, s), (b, lfd)):
        sys_.close(f)


def test_simultaneous_open_and_close(lan: TcpLan) -> None:
    s0 = lan.stacks[0].socket(type=SOCK_STREAM)
    s1 = lan.stacks[1].socket(type=SOCK_STREAM)
    assert isinstance(s0, TcpSocket) and isinstance(s1, TcpSocket)
    s0.bind(("0.0.0.0", 3000))
    s1.bind(("0.0.0.0", 3001))
    # ARP first, so that both SYNs cross on the wire
    s0.setblocking(False)
    s1.setblocking(False)
    lan.hub.drop = lambda f: f[12:14] == b"\x08\x00"
    assert s0.connect_ex((B, 3001)) == errno.EINPROGRESS
    assert s1.connect_ex((A, 3000)) == errno.EINPROGRESS
    lan.hub.drain()
    lan.hub.drop = None  # the retransmitted SYNs cross
    assert s0.wait_for(POLLOUT, 10) & POLLOUT and s1.wait_for(POLLOUT, 10) & POLLOUT
    assert s0.state == ESTABLISHED and s1.state == ESTABLISHED
    s0.settimeout(10)
    s1.settimeout(10)
    s0.sendall(b"ping")
    assert s1.recv(10) == b"ping"
    # simultaneous close: both FINs in flight at once
    lan.hub.drop = lambda f: f[12:14] == b"\x08\x00"
    s0.shutdown(SHUT_WR)
    s1.shutdown(SHUT_WR)
    lan.hub.drain()
    lan.hub.drop = None
    assert s0.recv(10) == b"" and s1.recv(10) == b""
    wait_timers(lan.timers, FAST.rto_max_s)
    assert s0.state in (TIME_WAIT, CLOSED) and s1.state in (TIME_WAIT, CLOSED)
    wait_timers(lan.timers, FAST.time_wait_s + 0.01)
    assert s0.state == CLOSED and s1.state == CLOSED
    assert s0.poll() & POLLHUP
    s0.close()
    s1.close()


def test_shut_rd_discards_and_reads_eof(lan: TcpLan) -> None:
    a, b = _sys(lan, 0), _sys(lan, 1)
    lfd = b.socket(type=SOCK_STREAM)
    b.bind(lfd, ("0.0.0.0", 4321))
    b.listen(lfd)
    c = a.socket(type=SOCK_STREAM)
    a.settimeout(c, 10)
    a.connect(c, (B, 4321))
    s, _ = b.accept(lfd)
    b.shutdown(s, SHUT_RD)
    assert b.recv(s, 10) == b""
    a.sendall(c, b"ignored")
    b.sendall(s, b"still sending")
    assert a.recv(c, 100) == b"still sending"
    for sys_, f in ((a, c), (b, s), (b, lfd)):
        sys_.close(f)
