"""UDP sockets over real stacks joined by an in-memory hub: data at every interesting
size (fragmentation and reassembly included), every errno of the socket calls, receive
buffers, broadcast, ICMP errors, and checksum offload."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest
from test_stack_helpers import Lan, eth, ip_of, ipv4, live_threads, pattern, udp

from hostops.sync import Event, start_thread
from kernel.files import (
    AF_INET,
    AF_INET6,
    IP_TTL,
    IPPROTO_TCP,
    MSG_DONTWAIT,
    MSG_PEEK,
    POLLERR,
    POLLIN,
    POLLNVAL,
    POLLOUT,
    SO_BROADCAST,
    SO_ERROR,
    SO_RCVBUF,
    SO_REUSEADDR,
    SO_TYPE,
    SOCK_DGRAM,
    SOCK_NONBLOCK,
    SOCK_RAW,
    SOCK_SEQPACKET,
    SOL_IP,
    SOL_SOCKET,
)
from kernel.net import MAX_UDP_PAYLOAD, UdpSocket
from kernel.net.link import RxInfo
from kernel.net.udp import DATAGRAM_OVERHEAD
from vdev.virtio.packet import complete_checksum, inet_sum, ipv4_pseudo_sum

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_thread_left_behind() -> Iterator[None]:
    before = live_threads()
    yield
    assert live_threads() <= before, "a timer, hub or test thread outlived its test"


SIZES = [
    1, 2, 7, 8, 9, 100, 1000, 1471, 1472, 1473, 1480, 1481, 2952, 2953, 4096, 8192,
    9000, 16384, 32768, 50000, 65000, 65499, 65506, MAX_UDP_PAYLOAD,
]  # fmt: skip


def _udp(st) -> UdpSocket:
    s = st.socket(AF_INET, SOCK_DGRAM, 0)
    assert isinstance(s, UdpSocket)
    return s


def _errno(exc_info: pytest.ExceptionInfo[OSError]) -> int | None:
    return exc_info.value.errno


def _fragments(n: int, mtu: int = 1500) -> int:
    per = (mtu - 20) & ~7
    total = 8 + n
    return 1 if total + 20 <= mtu else -(-total // per)


# ---------------------------------------------------------------- data both ways
@pytest.mark.parametrize("mtu", [1500, 576])
def test_datagrams_of_every_interesting_size_arrive_intact_both_ways(mtu: int) -> None:
    with Lan(2, mtu=mtu) as lan:
        a, b = lan.stacks
        sa, sb = _udp(a), _udp(b)
        sa.bind(("0.0.0.0", 5000))
        sb.bind((ip_of(1), 6000))
        a.ping(ip_of(1), count=1)  # resolve ARP both ways: then frames are data only
        for n in SIZES:
            for src, dst, dst_addr, src_addr, tx in (
                (sa, sb, (ip_of(1), 6000), (ip_of(0), 5000), a),
                (sb, sa, (ip_of(0), 5000), (ip_of(1), 6000), b),
            ):
                data = pattern(n, seed=n)
                frags_before = tx.stats["ip_frags_sent"]
                frames_before = tx.stats["tx_frames"]
                assert src.sendto(data, dst_addr) == n
                got, frm = dst.recvfrom(MAX_UDP_PAYLOAD)
                assert got == data, n
                assert frm == src_addr
                k = _fragments(n, mtu)
                assert tx.stats["tx_frames"] - frames_before == k
                assert tx.stats["ip_frags_sent"] - frags_before == (k if k > 1 else 0)
        fragmented = sum(1 for n in SIZES if _fragments(n, mtu) > 1)
        assert a.stats["ip_frag_reassembled"] == fragmented
        assert b.stats["ip_frag_reassembled"] == fragmented
        for st in (a, b):
            assert st.stats["udp_bad_checksum"] == 0
            assert st.reassembly_count() == 0 and st.reassembly_bytes() == 0


def test_every_size_up_to_two_fragments_both_ways() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        sa, sb = _udp(a), _udp(b)
        sa.bind(("", 5000))
        sb.bind(("", 6000))
        for n in range(1, 2953 + 1):
            data = pattern(n, seed=n)
            sa.sendto(data, (ip_of(1), 6000))
            assert sb.recv(4000) == data, n
            sb.sendto(data, (ip_of(0), 5000))
            assert sa.recv(4000) == data, n
        assert b.stats["ip_frag_reassembled"] == 2953 - 1472


def test_1472_is_one_frame_and_1473_two_fragments_at_mtu_1500() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 7))
        sa = _udp(a)
        sa.sendto(b"warm-up", (ip_of(1), 7))  # resolve ARP first
        sb.recv(100)
        lan.ports[0].sent.clear()
        sa.sendto(pattern(1472), (ip_of(1), 7))
        assert len(lan.ports[0].sent) == 1 and len(lan.ports[0].sent[0][0]) == 14 + 1500
        lan.ports[0].sent.clear()
        sa.sendto(pattern(1473, 3), (ip_of(1), 7))
        frames = [f for f, _ in lan.ports[0].sent]
        assert [len(f) for f in frames] == [14 + 1500, 14 + 21]
        ff = [struct.unpack_from("!H", f, 14 + 6)[0] for f in frames]
        assert ff == [0x2000, 1480 // 8]  # MF on the first; offset in 8-byte units
        assert sb.recv(2000) == pattern(1472)
        assert sb.recv(2000) == pattern(1473, 3)


def test_threaded_delivery_wakes_a_blocked_receiver() -> None:
    with Lan(2, threaded=True) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 9))
        sb.settimeout(10)
        sa = _udp(a)
        for i in range(20):
            sa.sendto(pattern(3000, i), (ip_of(1), 9))
            assert sb.recv(4000) == pattern(3000, i)
        assert sb.waiter_count == 0


# ---------------------------------------------------------------- addresses
def test_bind_errors_and_reuseaddr() -> None:
    with Lan(2) as lan:
        a = lan.stacks[0]
        s1 = _udp(a)
        s1.bind(("0.0.0.0", 4000))
        s2 = _udp(a)
        with pytest.raises(OSError) as e:
            s2.bind((ip_of(0), 4000))
        assert _errno(e) == errno.EADDRINUSE
        with pytest.raises(OSError) as e:
            s2.bind(("10.0.0.99", 4001))
        assert _errno(e) == errno.EADDRNOTAVAIL
        with pytest.raises(OSError) as e:
            s1.bind(("0.0.0.0", 4002))
        assert _errno(e) == errno.EINVAL  # already bound
        # SO_REUSEADDR on both: shared
        r1, r2, r3 = _udp(a), _udp(a), _udp(a)
        r1.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
        r2.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
        r1.bind(("", 4100))
        r2.bind(("", 4100))
        with pytest.raises(OSError) as e:
            r3.bind(("", 4100))  # only one side set it
        assert _errno(e) == errno.EADDRINUSE
        assert a.udp.bound_ports()[4100] == 2
        # closing frees the port
        s1.close()
        s3 = _udp(a)
        s3.bind(("", 4000))
        # bad addresses are the caller's fault, as the socket module says
        with pytest.raises(OverflowError):
            _udp(a).bind(("", 70000))
        with pytest.raises(TypeError):
            _udp(a).bind("10.0.0.1:80")  # type: ignore[arg-type]
        with pytest.raises(OSError) as e:
            _udp(a).bind(("localhost", 1))
        assert _errno(e) == errno.EINVAL


def test_ephemeral_port_on_first_send_and_names() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        s = _udp(a)
        assert s.getsockname() == ("0.0.0.0", 0)
        with pytest.raises(OSError) as e:
            s.getpeername()
        assert _errno(e) == errno.ENOTCONN
        s.sendto(b"x", (ip_of(1), 1))
        host, port = s.getsockname()
        assert host == "0.0.0.0" and 32768 <= port <= 60999
        c = _udp(a)
        c.connect((ip_of(1), 53))
        host, port = c.getsockname()
        assert host == ip_of(0) and 32768 <= port <= 60999  # connect narrows the address
        assert c.getpeername() == (ip_of(1), 53)
        z = _udp(a)
        z.bind(("", 0))
        assert 32768 <= z.getsockname()[1] <= 60999


def test_connected_socket_receives_only_from_its_peer() -> None:
    with Lan(3) as lan:
        a, b, c = lan.stacks
        sb = _udp(b)
        sb.bind(("", 8000))
        sb.connect((ip_of(0), 8001))
        sa = _udp(a)
        sa.bind(("", 8001))
        sc = _udp(c)
        sc.bind(("", 8001))
        sc.sendto(b"from c", (ip_of(1), 8000))  # not the peer: no socket for it
        assert b.stats["udp_no_port"] == 1
        sa.sendto(b"from a", (ip_of(1), 8000))
        assert sb.recvfrom(100) == (b"from a", (ip_of(0), 8001))
        assert sb.send(b"back") == 4
        assert sa.recvfrom(100) == (b"back", (ip_of(1), 8000))


# ---------------------------------------------------------------- send errors
def test_send_errors() -> None:
    with Lan(2) as lan:
        a = lan.stacks[0]
        s = _udp(a)
        with pytest.raises(OSError) as e:
            s.send(b"x")
        assert _errno(e) == errno.EDESTADDRREQ
        with pytest.raises(OSError) as e:
            s.sendto(bytes(MAX_UDP_PAYLOAD + 1), (ip_of(1), 9))
        assert _errno(e) == errno.EMSGSIZE
        with pytest.raises(OSError) as e:
            s.sendto(b"x", ("192.168.7.7", 9))
        assert _errno(e) == errno.ENETUNREACH
        with pytest.raises(OSError) as e:
            s.connect(("192.168.7.7", 9))
        assert _errno(e) == errno.ENETUNREACH
        with pytest.raises(OSError) as e:
            s.sendto(b"x", (ip_of(1), 0))
        assert _errno(e) == errno.EINVAL
        s.close()
        with pytest.raises(OSError) as e:
            s.sendto(b"x", (ip_of(1), 9))
        assert _errno(e) == errno.EBADF


def test_link_down_gives_enetdown_and_up_again_works() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 9))
        s = _udp(a)
        lan.ports[0].set_carrier(False)
        assert not a.interfaces["eth0"].up
        with pytest.raises(OSError) as e:
            s.sendto(b"x", (ip_of(1), 9))
        assert _errno(e) == errno.ENETDOWN
        with pytest.raises(OSError) as e:
            a.ping(ip_of(1), count=1)
        assert _errno(e) == errno.ENETDOWN
        lan.ports[0].set_carrier(True)
        s.sendto(b"again", (ip_of(1), 9))
        assert sb.recv(10) == b"again"
        assert a.stats["link_changes"] == 2


def test_enobufs_from_the_link_is_raised_to_the_sender_and_counted() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 9))
        s = _udp(a)
        s.sendto(b"1", (ip_of(1), 9))
        assert sb.recv(10) == b"1"
        lan.ports[0].fail_tx = errno.ENOBUFS
        with pytest.raises(OSError) as e:
            s.sendto(b"2", (ip_of(1), 9))
        assert _errno(e) == errno.ENOBUFS
        assert a.stats["tx_dropped_nobufs"] == 1
        # the stack's own replies are counted, not raised: B answers a ping it cannot send
        lan.ports[0].fail_tx = None
        lan.ports[1].fail_tx = errno.ENOBUFS
        with pytest.raises(TimeoutError):
            a.ping(ip_of(1), count=1, timeout=0.05)
        assert b.stats["tx_dropped_nobufs"] == 1
        lan.ports[1].fail_tx = None
        s.sendto(b"3", (ip_of(1), 9))
        assert sb.recv(10) == b"3"


# ---------------------------------------------------------------- receive calls
def test_recv_blocking_modes() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 9))
        sb.setblocking(False)
        with pytest.raises(BlockingIOError) as e:
            sb.recv(10)
        assert _errno(e) == errno.EAGAIN
        sb.settimeout(None)
        with pytest.raises(BlockingIOError):
            sb.recv(10, MSG_DONTWAIT)
        sb.settimeout(0.02)
        with pytest.raises(TimeoutError):
            sb.recvfrom(10)
        nb = b.socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK)
        with pytest.raises(BlockingIOError):
            nb.recv(1)
        with pytest.raises(ValueError):
            sb.recv(-1)
        assert sb.waiter_count == 0


def test_truncation_and_peek() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 9))
        s = _udp(a)
        s.sendto(b"0123456789", (ip_of(1), 9))
        s.sendto(b"second", (ip_of(1), 9))
        assert sb.recv(100, MSG_PEEK) == b"0123456789"
        assert sb.recv(3) == b"012"  # the rest of the datagram is gone
        assert sb.recv(100) == b"second"
        with pytest.raises(BlockingIOError):
            sb.recv(1, MSG_DONTWAIT)


def test_close_wakes_a_blocked_receiver_with_ebadf() -> None:
    with Lan(2) as lan:
        sb = _udp(lan.stacks[1])
        sb.bind(("", 9))
        entered = Event()
        result: list[BaseException] = []

        def reader() -> None:
            entered.set()
            try:
                sb.recv(10)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                result.append(exc)

        t = start_thread(reader, name="test-reader")
        assert entered.wait(10)
        sb.close()
        t.join(10)
        assert not t.is_alive()
        assert len(result) == 1 and isinstance(result[0], OSError)
        assert result[0].errno == errno.EBADF
        assert sb.poll() == POLLNVAL
        assert lan.stacks[1].udp.bound_ports() == {}


def test_poll_readiness() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 9))
        assert sb.poll() == POLLOUT
        _udp(a).sendto(b"x", (ip_of(1), 9))
        assert sb.poll() == POLLOUT | POLLIN
        sb.recv(1)
        assert sb.poll() == POLLOUT


# ---------------------------------------------------------------- options, rcvbuf
def test_so_rcvbuf_bounds_the_queue_and_drops_are_counted() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 9))
        sb.setsockopt(SOL_SOCKET, SO_RCVBUF, 4096)
        assert sb.getsockopt(SOL_SOCKET, SO_RCVBUF) == 4096
        s = _udp(a)
        for i in range(10):
            s.sendto(pattern(1000, i), (ip_of(1), 9))
        fits = 4096 // (1000 + DATAGRAM_OVERHEAD)  # 3
        assert b.stats["udp_rcvbuf_dropped"] == 10 - fits
        assert sb.drops == 10 - fits
        got = [sb.recv(2000, MSG_DONTWAIT) for _ in range(fits)]
        assert got == [pattern(1000, i) for i in range(fits)]
        with pytest.raises(BlockingIOError):
            sb.recv(1, MSG_DONTWAIT)
        # space again
        s.sendto(b"after", (ip_of(1), 9))
        assert sb.recv(10) == b"after"


def test_socket_options() -> None:
    with Lan(2) as lan:
        s = _udp(lan.stacks[0])
        assert s.getsockopt(SOL_SOCKET, SO_TYPE) == SOCK_DGRAM
        assert s.getsockopt(SOL_SOCKET, SO_ERROR) == 0
        assert s.getsockopt(SOL_SOCKET, SO_BROADCAST) == 0
        s.setsockopt(SOL_SOCKET, SO_BROADCAST, True)
        assert s.getsockopt(SOL_SOCKET, SO_BROADCAST) == 1
        s.setsockopt(SOL_SOCKET, SO_RCVBUF, 1)
        assert s.getsockopt(SOL_SOCKET, SO_RCVBUF) == 1024  # clamped
        assert s.getsockopt(SOL_IP, IP_TTL) == 64
        s.setsockopt(SOL_IP, IP_TTL, 5)
        assert s.getsockopt(SOL_IP, IP_TTL) == 5
        with pytest.raises(OSError) as e:
            s.setsockopt(SOL_IP, IP_TTL, 300)
        assert _errno(e) == errno.EINVAL
        with pytest.raises(OSError) as e:
            s.setsockopt(SOL_SOCKET, 999, 1)
        assert _errno(e) == errno.ENOPROTOOPT
        with pytest.raises(TypeError):
            s.setsockopt(SOL_SOCKET, SO_RCVBUF, "big")


def test_ttl_option_reaches_the_wire() -> None:
    with Lan(2) as lan:
        s = _udp(lan.stacks[0])
        s.setsockopt(SOL_IP, IP_TTL, 5)
        s.sendto(b"x", (ip_of(1), 9))
        frame = lan.ports[0].sent[-1][0]
        assert frame[14 + 8] == 5


def test_socket_kinds() -> None:
    with Lan(1) as lan:
        st = lan.stacks[0]
        for args, code in (
            ((AF_INET6, SOCK_DGRAM, 0), errno.EAFNOSUPPORT),
            ((AF_INET, SOCK_SEQPACKET, 0), errno.ESOCKTNOSUPPORT),
            ((AF_INET, SOCK_RAW, 0), errno.ESOCKTNOSUPPORT),
            ((AF_INET, SOCK_DGRAM, IPPROTO_TCP), errno.EPROTONOSUPPORT),
            ((AF_INET, 0x40000 | SOCK_DGRAM, 0), errno.EINVAL),
        ):
            with pytest.raises(OSError) as e:
                st.socket(*args)
            assert _errno(e) == code, args
        s = st.socket()
        assert (s.family, s.type, s.proto) == (AF_INET, SOCK_DGRAM, 17)


# ---------------------------------------------------------------- broadcast
@pytest.mark.parametrize("dest", ["10.0.0.255", "255.255.255.255"])
def test_broadcast_needs_so_broadcast_and_reaches_every_stack(dest: str) -> None:
    with Lan(3) as lan:
        socks = []
        for st in lan.stacks:
            s = _udp(st)
            s.bind(("", 6666))
            socks.append(s)
        sender = socks[0]
        with pytest.raises(OSError) as e:
            sender.sendto(b"hello all", (dest, 6666))
        assert _errno(e) == errno.EACCES
        with pytest.raises(OSError) as e:
            _udp(lan.stacks[0]).connect((dest, 6666))
        assert _errno(e) == errno.EACCES
        sender.setsockopt(SOL_SOCKET, SO_BROADCAST, 1)
        sender.sendto(b"hello all", (dest, 6666))
        for s in socks:  # the sender's own stack too: broadcasts loop back, as on Linux
            assert s.recvfrom(100) == (b"hello all", (ip_of(0), 6666))
        assert lan.stacks[0].stats["arp_requests_sent"] == 0  # no ARP for broadcast
        # nobody on the port: counted, no ICMP error for a broadcast
        sender.sendto(b"nobody", (dest, 7777))
        for st in lan.stacks:
            assert st.stats["udp_no_port"] == 1
            assert st.stats["icmp_unreach_sent"] == 0


# ---------------------------------------------------------------- ICMP errors
def test_port_unreachable_refuses_a_connected_socket_once() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        s = _udp(a)
        s.connect((ip_of(1), 9999))  # nobody there
        assert s.send(b"knock") == 5
        assert b.stats["udp_no_port"] == 1 and b.stats["icmp_unreach_sent"] == 1
        assert a.stats["icmp_errors_received"] == 1
        assert a.stats["udp_errors_delivered"] == 1
        assert s.poll() & POLLERR
        with pytest.raises(ConnectionRefusedError) as e:
            s.recv(10)
        assert _errno(e) == errno.ECONNREFUSED
        assert not s.poll() & POLLERR  # reported once
        s.send(b"again")  # ... and the next error is reported on the next call
        with pytest.raises(ConnectionRefusedError):
            s.send(b"third")
        s.send(b"fourth")
        assert s.getsockopt(SOL_SOCKET, SO_ERROR) == errno.ECONNREFUSED
        assert s.getsockopt(SOL_SOCKET, SO_ERROR) == 0


def test_unconnected_socket_ignores_icmp_errors() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        s = _udp(a)
        s.sendto(b"x", (ip_of(1), 9999))
        s.sendto(b"y", (ip_of(1), 9999))
        assert a.stats["icmp_errors_received"] == 2
        assert a.stats["udp_errors_ignored"] == 2
        assert s.poll() == POLLOUT
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(1)


# ---------------------------------------------------------------- checksum offload
def _udp_csum_ok(frame: bytes) -> bool:
    ihl = (frame[14] & 0xF) * 4
    seg = frame[14 + ihl :]
    pseudo = ipv4_pseudo_sum(frame[26:30], frame[30:34], 17, len(seg))
    return inet_sum(seg, pseudo) % 0xFFFF == 0


def test_tx_offload_leaves_the_pseudo_header_sum_for_the_link() -> None:
    with Lan(2, tx_csum=[True, False]) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 9))
        s = _udp(a)
        data = pattern(333)
        s.sendto(data, (ip_of(1), 9))
        frame, off = lan.ports[0].sent[-1]
        assert (off.csum_start, off.csum_offset) == (14 + 20, 6)
        field = struct.unpack_from("!H", frame, 34 + 6)[0]
        assert field == ipv4_pseudo_sum(frame[26:30], frame[30:34], 17, 8 + len(data))
        assert not _udp_csum_ok(frame)  # not complete on its own ...
        done = complete_checksum(frame, off.csum_start, off.csum_offset)
        assert _udp_csum_ok(done)  # ... and right once the link completes it
        assert sb.recv(1000) == data
        # B's link has no tx_csum: complete checksums, no offload
        sb.sendto(data, (ip_of(0), s.getsockname()[1]))
        frame_b, off_b = lan.ports[1].sent[-1]
        assert off_b.csum_start == -1 and _udp_csum_ok(frame_b)
        assert s.recv(1000) == data
        # a fragmented datagram cannot use the offload: every fragment plain
        lan.ports[0].sent.clear()
        s.sendto(pattern(4000), (ip_of(1), 9))
        assert len(lan.ports[0].sent) == 3
        assert all(o.csum_start == -1 for _, o in lan.ports[0].sent)
        assert sb.recv(5000) == pattern(4000)
        assert b.stats["udp_bad_checksum"] == 0


def test_partial_checksum_from_a_local_peer_is_accepted() -> None:
    # the hub hands frames on as virtio does between local peers: NEEDS_CSUM kept
    with Lan(2, tx_csum=True, partial_rx=True) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 9))
        _udp(a).sendto(b"partial", (ip_of(1), 9))
        assert sb.recv(100) == b"partial"
        assert b.stats["udp_bad_checksum"] == 0


def test_rx_checksum_rules() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 9))
        port_b, mac_a = lan.ports[1], lan.ports[0].mac

        def frame(csum: int | None) -> bytes:
            seg = udp(ip_of(0), ip_of(1), 1234, 9, b"payload", csum=csum)
            return eth(port_b.mac, mac_a, 0x0800, ipv4(ip_of(0), ip_of(1), 17, seg))

        port_b.inject(frame(0xBEEF))  # wrong: dropped
        assert b.stats["udp_bad_checksum"] == 1
        port_b.inject(frame(0xBEEF), RxInfo(csum_valid=True))  # the device vouched
        port_b.inject(frame(0))  # no checksum (RFC 768)
        port_b.inject(frame(None))
        assert [sb.recv(100) for _ in range(3)] == [b"payload"] * 3
        assert b.stats["udp_bad_checksum"] == 1
