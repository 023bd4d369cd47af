"""TCP over real stacks on an in-memory (lossy) hub: handshake, data both ways,
half-close, refused and timed-out connections, loss/reorder/duplication with a 2 MiB
transfer, sequence wrap, zero window, Nagle, backlog, RFC 5961, bad segments, TSO."""

from __future__ import annotations

import errno
import hashlib

import pytest
from test_stack_helpers import eth, ipv4, pattern, wait_timers
from test_tcp_helpers import FAST, LossyHub, TcpLan, is_tcp, tcp_flags, tcp_segment, with_checksum

from hostops.sync import Event, start_thread
from kernel.files import (
    POLLHUP,
    POLLIN,
    POLLOUT,
    SHUT_WR,
    SO_ERROR,
    SO_KEEPALIVE,
    SO_RCVBUF,
    SO_REUSEADDR,
    SOCK_STREAM,
    SOL_SOCKET,
    SOL_TCP,
    TCP_NODELAY,
)
from kernel.net.tcp import ESTABLISHED, TcpSocket
from kernel.net.tcp_seq import seq_add, seq_lt, seq_sub
from kernel.net.tcp_wire import ACK, RST, SYN, SegmentError, parse_segment

A, B = "10.0.0.1", "10.0.0.2"


def _pair(lan: TcpLan, port: int = 5000, **server_opts: int) -> tuple[TcpSocket, TcpSocket]:
    """A connected (client on stack 0, server on stack 1) pair."""
    srv = lan.stacks[1].socket(type=SOCK_STREAM)
    assert isinstance(srv, TcpSocket)
    for opt, v in server_opts.items():
        srv.setsockopt(SOL_SOCKET, {"rcvbuf": SO_RCVBUF}[opt], v)
    srv.bind(("0.0.0.0", port))
    srv.listen(8)
    srv.settimeout(10)
    cli = lan.stacks[0].socket(type=SOCK_STREAM)
    assert isinstance(cli, TcpSocket)
    cli.settimeout(10)
    cli.connect((B, port))
    conn, addr = srv.accept()
    assert isinstance(conn, TcpSocket)
    assert addr == (A, cli.getsockname()[1])
    conn.settimeout(10)
    srv.close()
    return cli, conn


def _recv_all(s: TcpSocket, n: int) -> bytes:
    buf = bytearray()
    for _ in range(n + 1):  # bounded: every recv returns >= 1 byte or EOF
        if len(buf) >= n:
            break
        d = s.recv(min(65536, n - len(buf)))
        if not d:
            break
        buf += d
    return bytes(buf)


def test_seq_arithmetic_wraps() -> None:
    near = 0xFFFFFFF0
    assert seq_add(near, 0x20) == 0x10
    assert seq_lt(near, 0x10) and not seq_lt(0x10, near)
    assert seq_sub(0x10, near) == 0x20 and seq_sub(near, 0x10) == -0x20


def test_handshake_data_both_ways_and_close() -> None:
    with TcpLan() as lan:
        cli, conn = _pair(lan)
        assert cli.state == ESTABLISHED and conn.state == ESTABLISHED
        assert cli.getpeername() == (B, 5000) and conn.getpeername()[0] == A
        assert cli.poll() & POLLOUT and not cli.poll() & POLLIN
        cli.sendall(b"hello")
        assert conn.recv(100) == b"hello"
        data = pattern(300_000, 3)
        conn.sendall(data)
        assert _recv_all(cli, len(data)) == data
        cli.close()
        assert conn.recv(10) == b""  # EOF
        assert conn.poll() & POLLIN
        conn.close()
        wait_timers(lan.timers, FAST.time_wait_s + 0.05)
        st0, st1 = lan.stacks[0].stats, lan.stacks[1].stats
        assert st0["tcp_established"] == 1 and st1["tcp_established"] == 1
        assert st0["tcp_bad_checksum"] == 0 and st1["tcp_bad_checksum"] == 0
        assert lan.stacks[0].tcp.connections() == []
        assert lan.stacks[1].tcp.connections() == []


def test_half_close_keeps_the_other_direction() -> None:
    with TcpLan() as lan:
        cli, conn = _pair(lan)
        cli.sendall(b"request")
        cli.shutdown(SHUT_WR)
        assert _recv_all(conn, 100) == b"request"  # then EOF
        with pytest.raises(OSError) as e:
            cli.send(b"more")
        assert e.value.errno == errno.EPIPE
        reply = pattern(100_000, 9)
        conn.sendall(reply)
        conn.close()
        assert _recv_all(cli, len(reply) + 1) == reply
        assert cli.poll() & POLLHUP
        cli.close()


def test_rst_to_syn_is_econnrefused() -> None:
    with TcpLan() as lan:
        s = lan.stacks[0].socket(type=SOCK_STREAM)
        s.settimeout(10)
        with pytest.raises(ConnectionRefusedError):
            s.connect((B, 4444))
        assert lan.stacks[1].stats["tcp_rst_sent"] == 1
        assert lan.stacks[0].stats["tcp_conn_failed"] == 1
        s.close()
        # non-blocking: EINPROGRESS, then POLLOUT and SO_ERROR
        s = lan.stacks[0].socket(type=SOCK_STREAM)
        s.setblocking(False)
        assert s.connect_ex((B, 4444)) == errno.EINPROGRESS
        ready = s.wait_for(POLLOUT, 10)
        assert ready & POLLOUT
        assert s.getsockopt(SOL_SOCKET, SO_ERROR) == errno.ECONNREFUSED
        s.close()


def test_nonblocking_connect_ealready_eisconn() -> None:
    with TcpLan() as lan:
        srv = lan.stacks[1].socket(type=SOCK_STREAM)
        srv.bind(("0.0.0.0", 80))
        srv.listen(4)
        hub = lan.hub
        assert isinstance(hub, LossyHub)
        s = lan.stacks[0].socket(type=SOCK_STREAM)
        s.setblocking(False)
        hub.drop = is_tcp  # the SYN goes nowhere for now
        assert s.connect_ex((B, 80)) == errno.EINPROGRESS
        assert s.connect_ex((B, 80)) == errno.EALREADY
        hub.drop = None  # the retransmitted SYN gets through
        assert s.wait_for(POLLOUT, 10) & POLLOUT
        assert s.getsockopt(SOL_SOCKET, SO_ERROR) == 0
        assert s.connect_ex((B, 80)) == errno.EISCONN
        srv.settimeout(10)
        c, _ = srv.accept()
        for x in (s, c, srv):
            x.close()


def test_vanished_peer_times_out() -> None:
    with TcpLan() as lan:
        cli, conn = _pair(lan)
        lan.hub.drop = lambda f: True  # the wire goes dead
        cli.send(b"x" * 1000)
        with pytest.raises(OSError) as e:
            cli.recv(10)
        assert e.value.errno == errno.ETIMEDOUT
        st = lan.stacks[0].stats
        assert st["tcp_timeouts"] >= FAST.max_retries + 1
        assert st["tcp_retransmits"] >= FAST.max_retries
        # connect to a silent host fails the same way after the SYN retries
        s = lan.stacks[0].socket(type=SOCK_STREAM)
        s.settimeout(30)
        with pytest.raises(TimeoutError):
            s.connect((B, 9))
        for x in (s, cli, conn):
            x.close()


@pytest.mark.parametrize(
    ("seed", "tso", "loss"), [(1, False, 0.03), (2, False, 0.03), (3, True, 0.05)]
)
def test_two_mib_through_loss_reorder_and_duplication(seed: int, tso: bool, loss: float) -> None:
    # with TSO a 2 MiB transfer is only ~40 super-frames: a higher loss rate hits some
    hub = LossyHub(seed=seed, loss=loss, dup=0.05, reorder=0.05)
    with TcpLan(hub=hub, tso=tso) as lan:
        cli, conn = _pair(lan)
        data = pattern(2 * 1024 * 1024, seed)
        got: list[bytes] = []
        t = start_thread(lambda: got.append(_recv_all(conn, len(data) + 1)), name="rx")
        cli.sendall(data)
        cli.close()
        t.join(60)
        assert got and hashlib.sha256(got[0]).digest() == hashlib.sha256(data).digest()
        st = lan.stacks[0].stats
        assert st["tcp_retransmits"] > 0 and hub.lost > 0 and hub.duplicated > 0
        assert st["tcp_dup_acks"] > 0
        if not tso:  # (with TSO the window often holds one super-frame at a time)
            assert lan.stacks[1].stats["tcp_ooo_segments"] > 0
        conn.close()


def test_isn_near_wrap_both_sides() -> None:
    with TcpLan(config=FAST) as lan:
        for i in range(len(lan.stacks)):
            lan.with_config(i, isn=lambda i=i: 0xFFFFFFFF - 3000 - i * 7)
        cli, conn = _pair(lan)
        assert cli.iss == 0xFFFFFFFF - 3000
        data = pattern(200_000, 5)
        conn.sendall(data[:1000])
        cli.sendall(data)
        assert _recv_all(conn, len(data)) == data
        assert _recv_all(cli, 1000) == data[:1000]
        assert seq_lt(0xFFFFFFF0, cli.snd_una)  # it wrapped
        assert cli.snd_una < 0x100000
        cli.close()
        conn.close()


def test_zero_window_and_probe() -> None:
    with TcpLan() as lan:
        cli, conn = _pair(lan, rcvbuf=4096)
        data = pattern(20_000, 1)
        probed = Event()
        stats = lan.stacks[0]

        def watch(frame: bytes) -> bool:  # the hub shows us every frame; drops none
            if stats.stats["tcp_zero_window_probes"] > 0:
                probed.set()
            return False

        lan.hub.drop = watch
        t = start_thread(lambda: cli.sendall(data), name="tx")
        assert probed.wait(10)  # the window filled up and the sender probes it
        assert len(conn.rcvq) == 4096
        assert _recv_all(conn, len(data)) == data
        t.join(10)
        cli.close()
        conn.close()


def test_peer_vanishing_behind_a_closed_window_times_out() -> None:
    """A peer that closed its window and then vanished: zero-window probes that nobody
    answers count toward the retry limit (as Linux does), so a blocked sender gets
    ETIMEDOUT instead of probing forever; a peer that answers probes keeps it alive."""
    with TcpLan() as lan:
        cli, conn = _pair(lan, rcvbuf=4096)
        probing = Event()
        st = lan.stacks[0]

        def watch(frame: bytes) -> bool:
            if st.stats["tcp_zero_window_probes"] > 0:
                probing.set()
                return True  # from the first probe on, the wire is dead
            return False

        lan.hub.drop = watch
        errors: list[OSError] = []

        def send() -> None:
            try:
                cli.sendall(pattern(50_000, 3))
            except OSError as e:
                errors.append(e)

        t = start_thread(send, name="tx")
        assert probing.wait(10)
        cli.settimeout(30)
        with pytest.raises(OSError) as e:  # fails when the probes give up, not at 30 s
            cli.recv(10)
        assert e.value.errno == errno.ETIMEDOUT
        t.join(30)
        assert not t.is_alive()
        assert not errors or errors[0].errno == errno.ETIMEDOUT
        assert st.stats["tcp_timeouts"] >= FAST.max_retries + 1
        cli.close()
        conn.close()


def test_nagle_and_nodelay() -> None:
    with TcpLan() as lan:
        cli, conn = _pair(lan)
        sent = lan.ports[0].sent
        before = len(sent)
        lan.hub.drop = lambda f: True  # hold ACKs back: nothing is acknowledged
        for _ in range(5):
            cli.send(b"a")
        data_frames = [f for f, _o in sent[before:] if is_tcp(f) and len(f) > 66]
        assert len(data_frames) == 1  # Nagle: one small segment in flight
        lan.hub.drop = None
        assert _recv_all(conn, 5) == b"aaaaa"
        cli.setsockopt(SOL_TCP, TCP_NODELAY, 1)
        assert cli.getsockopt(SOL_TCP, TCP_NODELAY) == 1
        before = len(sent)
        lan.hub.drop = lambda f: True
        for _ in range(5):
            cli.send(b"b")
        data_frames = [f for f, _o in sent[before:] if is_tcp(f) and len(f) > 66]
        assert len(data_frames) == 5  # NODELAY: each goes at once
        lan.hub.drop = None
        assert _recv_all(conn, 5) == b"bbbbb"
        cli.close()
        conn.close()


def test_backlog_overflow_is_counted() -> None:
    with TcpLan() as lan:
        srv = lan.stacks[1].socket(type=SOCK_STREAM)
        srv.bind(("0.0.0.0", 7000))
        srv.listen(2)
        clients = []
        for _ in range(4):
            c = lan.stacks[0].socket(type=SOCK_STREAM)
            c.setblocking(False)
            assert c.connect_ex((B, 7000)) == errno.EINPROGRESS
            clients.append(c)
        lan.hub.drain()
        # at most 2 half-open and 2 unaccepted: at least one of the 4 SYNs was dropped
        assert lan.stacks[1].stats["tcp_syn_dropped_backlog"] >= 1
        assert len(srv._accept_queue) <= 2 and len(srv._syn_queue) <= 2
        srv.settimeout(10)
        accepted = [srv.accept()[0] for _ in range(4)]  # the dropped ones retry their SYN
        assert lan.stacks[1].stats["tcp_passive_opens"] == 4
        for c in (*accepted, srv, *clients):
            c.close()


def test_rst_out_of_window_and_challenge_ack() -> None:
    with TcpLan() as lan:
        cli, conn = _pair(lan)
        port = lan.ports[1]
        srcmac, dstmac = lan.ports[0].mac, port.mac
        lport, cport = conn.lport, conn.rport

        def inject(seq: int, flags: int) -> None:
            seg = with_checksum(A, B, tcp_segment(cport, lport, seq, 0, flags))
            port.inject(eth(dstmac, srcmac, 0x0800, ipv4(A, B, 6, seg)))

        acks0 = lan.stacks[1].stats["tcp_challenge_acks"]
        inject(seq_add(conn.rcv_nxt, 100), RST)  # in the window, not RCV.NXT
        assert lan.stacks[1].stats["tcp_challenge_acks"] == acks0 + 1
        inject(seq_add(conn.rcv_nxt, 1 << 30), RST)  # outside the window
        assert lan.stacks[1].stats["tcp_out_of_window"] >= 1
        inject(conn.rcv_nxt, SYN)  # SYN in ESTABLISHED
        assert lan.stacks[1].stats["tcp_challenge_acks"] == acks0 + 2
        assert conn.state == ESTABLISHED
        cli.sendall(b"still here")
        assert conn.recv(100) == b"still here"
        inject(conn.rcv_nxt, RST)  # exact: resets
        with pytest.raises(ConnectionResetError):
            conn.recv(10)
        cli.close()
        conn.close()


def test_bad_segments_are_counted_and_dropped() -> None:
    with TcpLan() as lan:
        srv = lan.stacks[1].socket(type=SOCK_STREAM)
        srv.bind(("0.0.0.0", 81))
        srv.listen(4)
        port = lan.ports[1]
        srcmac, dstmac = lan.ports[0].mac, port.mac

        def inject(seg: bytes) -> None:
            port.inject(eth(dstmac, srcmac, 0x0800, ipv4(A, B, 6, seg)))

        st = lan.stacks[1]
        inject(with_checksum(A, B, tcp_segment(1234, 81, 1, 0, SYN), bad=True))
        assert st.stats["tcp_bad_checksum"] == 1
        inject(with_checksum(A, B, tcp_segment(1234, 81, 1, 0, SYN, offset=15)))
        inject(with_checksum(A, B, tcp_segment(1234, 81, 1, 0, SYN, offset=3)))
        inject(with_checksum(A, B, tcp_segment(1234, 81, 1, 0, SYN, options=b"\x01\x01\x02\x05")))
        inject(with_checksum(A, B, tcp_segment(1234, 81, 1, 0, SYN, options=b"\x03\x04\x01\x00")))
        assert st.stats["tcp_bad_header"] == 4
        assert st.stats["tcp_passive_opens"] == 0 and st.stats["tcp_rst_sent"] == 0
        with pytest.raises(SegmentError):
            parse_segment(b"\x00" * 19)  # shorter than the fixed header
        for raw in (b"\x02\x05\x05", b"\x08\x0a", b"\x02\x01", b"\x01\x01\x01\x04"):
            with pytest.raises(SegmentError):
                parse_segment(tcp_segment(1, 2, 3, 4, SYN, options=raw + b"\0" * (-len(raw) % 4)))
        srv.close()


def test_syn_flood_memory_bounded() -> None:
    with TcpLan() as lan:
        srv = lan.stacks[1].socket(type=SOCK_STREAM)
        srv.bind(("0.0.0.0", 82))
        srv.listen(16)
        port = lan.ports[1]
        srcmac, dstmac = lan.ports[0].mac, port.mac
        lan.hub.drop = is_tcp  # no RST from the spoofed "clients" clears the queue
        for i in range(500):
            seg = with_checksum(A, B, tcp_segment(10000 + i, 82, i * 1000, 0, SYN))
            port.inject(eth(dstmac, srcmac, 0x0800, ipv4(A, B, 6, seg)))
        st = lan.stacks[1].stats
        assert st["tcp_passive_opens"] == 16 and st["tcp_syn_dropped_backlog"] == 484
        assert len(lan.stacks[1].tcp.connections()) == 16
        srv.close()
        assert lan.stacks[1].tcp.connections() == []


def test_rst_for_no_listener_and_reuseaddr() -> None:
    with TcpLan() as lan:
        cli, conn = _pair(lan, port=6000)
        cli.close()
        conn.close()
        s = lan.stacks[1].socket(type=SOCK_STREAM)
        s.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 6000))  # the old connection may still be in TIME-WAIT
        s.listen(1)
        t = lan.stacks[1].socket(type=SOCK_STREAM)
        with pytest.raises(OSError) as e:
            t.bind(("0.0.0.0", 6000))
        assert e.value.errno == errno.EADDRINUSE
        s.close()
        t.close()


def test_tso_hands_large_segments_to_the_link() -> None:
    with TcpLan(tso=True) as lan:
        cli, conn = _pair(lan)
        data = pattern(1_000_000, 4)
        cli.sendall(data)
        assert _recv_all(conn, len(data)) == data
        gso = [o for f, o in lan.ports[0].sent if o.gso_size]
        assert gso and all(o.gso_size == cli.seg_size for o in gso)
        assert all(o.hdr_len == 14 + 20 + 32 for o in gso)  # with timestamps
        assert lan.stacks[0].stats["tcp_gso_segments"] == len(gso)
        assert tcp_flags(lan.ports[0].sent[-1][0]) & ACK
        cli.close()
        conn.close()


def test_no_tso_segments_at_mss() -> None:
    with TcpLan() as lan:
        cli, conn = _pair(lan)
        cli.sendall(pattern(100_000))
        assert _recv_all(conn, 100_000) == pattern(100_000)
        assert all(len(f) <= 14 + 1500 for f, _o in lan.ports[0].sent)
        assert lan.stacks[0].stats["tcp_gso_segments"] == 0
        cli.close()
        conn.close()


def test_keepalive_probes_then_times_out() -> None:
    with TcpLan() as lan:
        for i in range(2):
            lan.with_config(i, keepalive_idle_s=0.05, keepalive_intvl_s=0.02, keepalive_probes=2)
        cli, conn = _pair(lan)
        answered = Event()
        st0 = lan.stacks[0]

        def watch(frame: bytes) -> bool:  # a frame from the peer after a probe
            if frame[6:12] == lan.ports[1].mac and st0.stats["tcp_keepalive_probes"]:
                answered.set()
            return False

        lan.hub.drop = watch
        cli.setsockopt(SOL_SOCKET, SO_KEEPALIVE, 1)
        assert answered.wait(10)  # idle: a probe went out and the peer answered it
        lan.hub.drain()
        assert cli.state == ESTABLISHED
        lan.hub.drop = is_tcp  # the peer vanishes
        with pytest.raises(OSError) as e:
            cli.recv(10)
        assert e.value.errno == errno.ETIMEDOUT
        cli.close()
        conn.close()


def test_delayed_ack_coalesces() -> None:
    with TcpLan() as lan:
        cli, conn = _pair(lan)
        cli.setsockopt(SOL_TCP, TCP_NODELAY, 1)
        before = len(lan.ports[1].sent)
        cli.send(b"x")  # one small segment: its ACK waits for the delayed-ACK timer
        assert conn.recv(10) == b"x"
        wait_timers(lan.timers, FAST.delack_s)
        lan.hub.drain()
        assert lan.stacks[1].stats["tcp_delayed_acks"] >= 1
        assert len(lan.ports[1].sent) - before == 1  # one pure ACK, after the delay
        cli.close()
        conn.close()


def test_ip_never_fragments_tcp() -> None:
    with TcpLan() as lan:
        st = lan.stacks[0]
        seg = bytearray(3000)
        seg[12] = 5 << 4  # data offset: 20 bytes
        dst = int.from_bytes(bytes(int(x) for x in B.split(".")), "big")
        with pytest.raises(OSError) as e:
            st.send_ip(dst, 6, seg, csum_offset=16, gso_size=1460)
        assert e.value.errno == errno.EMSGSIZE
        assert st.stats["ip_frags_sent"] == 0


def test_paws_drops_an_old_timestamp() -> None:
    with TcpLan() as lan:
        cli, conn = _pair(lan)
        cli.sendall(b"new")
        assert conn.recv(10) == b"new"
        port = lan.ports[1]
        old_ts = (conn.ts_recent - 1000) & 0xFFFFFFFF
        opts = b"\x01\x01\x08\x0a" + old_ts.to_bytes(4, "big") + b"\0\0\0\0"
        seg = tcp_segment(
            conn.rport, conn.lport, conn.rcv_nxt, conn.snd_nxt, ACK, data=b"old", options=opts
        )
        frame = ipv4(A, B, 6, with_checksum(A, B, seg))
        port.inject(eth(port.mac, lan.ports[0].mac, 0x0800, frame))
        assert lan.stacks[1].stats["tcp_paws_rejected"] == 1
        assert not conn.rcvq
        cli.sendall(b"fine")
        assert conn.recv(10) == b"fine"
        cli.close()
        conn.close()
