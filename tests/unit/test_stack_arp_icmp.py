"""ARP (resolution, cache, expiry, retries, failure, bounded queue, gratuitous and bad
packets), ICMP echo and ping, routing and interface configuration. Time is driven by
small configured timeouts and waits on the timer heap's events — never sleeps."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest
from test_stack_helpers import Hub, Lan, eth, ip_of, ipv4, live_threads, wait_timers

from hostops.sync import Lock, start_thread
from hostops.timers import TimerHeap
from kernel.files import POLLERR
from kernel.net import Stack, StackConfig, UdpSocket
from kernel.net.addr import ip_aton
from kernel.net.arp import ARP_REPLY, ARP_REQUEST, arp_packet
from vdev.virtio.packet import inet_checksum

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_thread_left_behind() -> Iterator[None]:
    before = live_threads()
    yield
    assert live_threads() <= before, "a timer, hub or test thread outlived its test"


BCAST = b"\xff" * 6
FAST_ARP = StackConfig(arp_retry_s=0.01, arp_tries=3, arp_failed_hold_s=60.0)


def _udp(st: Stack) -> UdpSocket:
    s = st.socket()
    assert isinstance(s, UdpSocket)
    return s


def _arp_frame(op: int, sha: bytes, spa: str, tha: bytes, tpa: str, dst: bytes = BCAST) -> bytes:
    return eth(dst, sha, 0x0806, arp_packet(op, sha, ip_aton(spa), tha, ip_aton(tpa)))


# ---------------------------------------------------------------- ARP
def test_arp_resolves_once_and_both_sides_learn() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        assert a.arp_entries() == []
        sb = _udp(b)
        sb.bind(("", 9))
        s = _udp(a)
        for i in range(5):
            s.sendto(bytes([i]), (ip_of(1), 9))
        assert [sb.recv(1) for _ in range(5)] == [bytes([i]) for i in range(5)]
        (entry,) = a.arp_entries()
        assert (entry.ip, entry.mac, entry.state) == (ip_of(1), "02:00:00:00:00:02", "reachable")
        (learned,) = b.arp_entries()
        assert (learned.ip, learned.mac) == (ip_of(0), "02:00:00:00:00:01")
        assert a.stats["arp_requests_sent"] == 1
        assert b.stats["arp_replies_sent"] == 1
        assert b.stats["arp_learned"] == 1
        assert b.stats["arp_requests_sent"] == 0  # learned from the request: no own request


def test_arp_entries_expire_and_resolve_again() -> None:
    cfg = StackConfig(arp_reachable_s=0.05)
    with Lan(2, config=cfg) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 9))
        s = _udp(a)
        s.sendto(b"1", (ip_of(1), 9))
        wait_timers(lan.timers, cfg.arp_reachable_s)
        assert a.arp_entries() == [] and b.arp_entries() == []
        assert a.stats["arp_expired"] == 1 and b.stats["arp_expired"] == 1
        s.sendto(b"2", (ip_of(1), 9))
        assert a.stats["arp_requests_sent"] == 2
        assert [sb.recv(1), sb.recv(1)] == [b"1", b"2"]


def test_arp_failure_gives_ehostunreach_and_holds() -> None:
    with Lan(1, config=FAST_ARP) as lan:  # the hold (60 s) outlasts the test
        a = lan.stacks[0]
        s = _udp(a)
        s.connect(("10.0.0.9", 7))  # nobody has it
        assert s.send(b"lost") == 4  # queued while ARP runs
        s.settimeout(10)
        with pytest.raises(OSError) as e:  # woken by the timer thread
            s.recv(10)
        assert e.value.errno == errno.EHOSTUNREACH
        st = a.stats
        assert st["arp_requests_sent"] == FAST_ARP.arp_tries and st["arp_failed"] == 1
        assert st["arp_unresolved_dropped"] == 1
        assert st["udp_errors_delivered"] == 1
        assert a.arp_entries()[0].state == "failed"
        # within the hold: every send to it fails at once, connected or not
        with pytest.raises(OSError) as e:
            s.send(b"x")
        assert e.value.errno == errno.EHOSTUNREACH
        with pytest.raises(OSError) as e:
            _udp(a).sendto(b"x", ("10.0.0.9", 7))
        assert e.value.errno == errno.EHOSTUNREACH
        assert a.stats["arp_hold_refused"] == 2
        assert a.stats["arp_requests_sent"] == FAST_ARP.arp_tries  # nothing sent meanwhile


def test_after_the_hold_the_next_send_resolves_again() -> None:
    cfg = StackConfig(arp_retry_s=0.01, arp_tries=2, arp_failed_hold_s=0.01)
    with Lan(1, config=cfg) as lan:
        a = lan.stacks[0]
        s = _udp(a)
        s.connect(("10.0.0.9", 7))
        s.send(b"lost")
        s.settimeout(10)
        with pytest.raises(OSError) as e:
            s.recv(10)
        assert e.value.errno == errno.EHOSTUNREACH
        wait_timers(lan.timers, cfg.arp_failed_hold_s)  # the hold was armed before this
        assert a.arp_entries() == []
        assert a.stats["arp_requests_sent"] == cfg.arp_tries
        assert s.send(b"again") == 5  # queued for a new resolution ...
        assert a.stats["arp_requests_sent"] > cfg.arp_tries  # ... which asked at once


def test_unconnected_sender_sees_no_error_from_a_failed_resolution() -> None:
    with Lan(1, config=FAST_ARP) as lan:
        a = lan.stacks[0]
        s = _udp(a)
        s.sendto(b"x", ("10.0.0.9", 7))
        with pytest.raises(OSError) as e:  # a ping to it ends when ARP fails
            a.ping("10.0.0.9", count=1, timeout=10)
        assert e.value.errno == errno.EHOSTUNREACH
        assert a.stats["arp_failed"] == 1
        assert not s.poll() & POLLERR
        assert a.stats["udp_errors_ignored"] == 1


def test_arp_queue_is_bounded_and_drops_the_oldest() -> None:
    cfg = StackConfig(arp_queue_len=2, arp_retry_s=3600)
    with Lan(2, config=cfg) as lan:
        a, b = lan.stacks
        sb = _udp(b)
        sb.bind(("", 9))
        lan.hub.drop = lambda f: f[12:14] == b"\x08\x06"  # ARP lost: stays unresolved
        s = _udp(a)
        for i in range(5):
            s.sendto(bytes([i]), (ip_of(1), 9))
        assert a.stats["arp_queue_dropped"] == 3
        assert a.arp_entries()[0].queued == 2
        # now the peer's reply gets through: the two newest datagrams go out
        lan.hub.drop = None
        pa, mac_b = lan.ports[0], lan.ports[1].mac
        pa.inject(_arp_frame(ARP_REPLY, mac_b, ip_of(1), pa.mac, ip_of(0), dst=pa.mac))
        assert [sb.recv(1), sb.recv(1)] == [b"\x03", b"\x04"]


def test_gratuitous_arp_updates_only_existing_entries_and_conflicts_are_ignored() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        pa = lan.ports[0]
        a.ping(ip_of(1), count=1)
        new_mac = bytes.fromhex("020000000099")
        pa.inject(_arp_frame(ARP_REQUEST, new_mac, ip_of(1), b"\x00" * 6, ip_of(1)))
        assert [e.mac for e in a.arp_entries()] == ["02:00:00:00:00:99"]
        pa.inject(_arp_frame(ARP_REQUEST, new_mac, "10.0.0.7", b"\x00" * 6, "10.0.0.7"))
        assert [e.ip for e in a.arp_entries()] == [ip_of(1)]  # none created
        pa.inject(_arp_frame(ARP_REPLY, new_mac, ip_of(0), BCAST, ip_of(0)))  # claims ours
        assert a.stats["arp_conflict"] == 1
        assert [e.ip for e in a.arp_entries()] == [ip_of(1)]


def test_bad_arp_packets_are_dropped_and_counted() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        pa, mac_b = lan.ports[0], lan.ports[1].mac
        good = arp_packet(ARP_REQUEST, mac_b, ip_aton(ip_of(1)), b"\x00" * 6, ip_aton(ip_of(0)))
        bad_hrd = struct.pack("!H", 6) + good[2:]
        bad_op = good[:6] + struct.pack("!H", 9) + good[8:]
        group_sha = good[:8] + b"\x01\x00\x5e\x00\x00\x01" + good[14:]
        for payload in (good[:20], bad_hrd, bad_op, group_sha):
            pa.inject(eth(BCAST, mac_b, 0x0806, payload))
        assert a.stats["arp_bad"] == 4
        assert a.arp_entries() == []
        assert a.stats["arp_replies_sent"] == 0
        pa.inject(eth(BCAST, mac_b, 0x0806, good + b"\x00" * 18))  # padded to 60: fine
        assert a.stats["arp_replies_sent"] == 1
        a.ping(ip_of(1), count=1)


def test_arp_table_is_bounded() -> None:
    cfg = StackConfig(arp_max_entries=4)
    with Lan(1, config=cfg) as lan:
        a, pa = lan.stacks[0], lan.ports[0]
        for i in range(10):
            mac = bytes((2, 0, 0, 0, 1, i))
            pa.inject(_arp_frame(ARP_REQUEST, mac, f"10.0.0.{100 + i}", b"\x00" * 6, ip_of(0)))
        assert len(a.arp_entries()) == 4
        assert a.stats["arp_evicted"] == 6
        assert [e.ip for e in a.arp_entries()] == [f"10.0.0.{100 + i}" for i in range(6, 10)]


# ---------------------------------------------------------------- ping / ICMP
def test_ping_returns_round_trip_times() -> None:
    with Lan(2) as lan:
        a, b = lan.stacks
        rtts = a.ping(ip_of(1))
        assert len(rtts) == 3 and all(isinstance(t, float) and t >= 0 for t in rtts)
        assert len(b.ping(ip_of(0), count=5)) == 5
        assert b.stats["icmp_echo_replied"] == 3 and a.stats["icmp_echo_replied"] == 5
        assert len(a.ping(ip_of(0), count=2)) == 2  # our own address: looped back


def test_ping_errors() -> None:
    with Lan(2) as lan:
        a = lan.stacks[0]
        with pytest.raises(OSError) as e:
            a.ping("192.168.3.3")
        assert e.value.errno == errno.ENETUNREACH
        with pytest.raises(OSError) as e:
            a.ping("10.0.0.255")
        assert e.value.errno == errno.EACCES
        with pytest.raises(OSError) as e:
            a.ping("ten.0.0.1")
        assert e.value.errno == errno.EINVAL
        with pytest.raises(ValueError):
            a.ping(ip_of(1), count=0)
        lan.hub.drop = lambda f: len(f) > 34 and f[23] == 1  # every ICMP packet is lost
        with pytest.raises(TimeoutError):
            a.ping(ip_of(1), count=2, timeout=0.02)


def test_concurrent_pings_never_take_each_others_replies() -> None:
    with Lan(3, threaded=True) as lan:
        a = lan.stacks[0]
        results: list[list[float]] = []
        errors: list[BaseException] = []
        lock = Lock()

        def pinger(target: str) -> None:
            try:
                r = a.ping(target, count=5, timeout=10)
                with lock:
                    results.append(r)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                with lock:
                    errors.append(exc)

        threads = [start_thread(pinger, ip_of(1 + i % 2), name=f"test-ping-{i}") for i in range(6)]
        for t in threads:
            t.join(30)
        assert not errors
        assert sorted(len(r) for r in results) == [5] * 6
        assert a.stats["icmp_echo_reply_unmatched"] == 0


def test_broadcast_echo_requests_are_ignored() -> None:
    with Lan(2) as lan:
        b, pb, mac_a = lan.stacks[1], lan.ports[1], lan.ports[0].mac
        msg = bytearray(struct.pack("!BBHHH", 8, 0, 0, 77, 1) + b"abcd")
        struct.pack_into("!H", msg, 2, inet_checksum(msg))
        pb.inject(eth(BCAST, mac_a, 0x0800, ipv4(ip_of(0), "10.0.0.255", 1, bytes(msg))))
        assert b.stats["icmp_echo_ignored_broadcast"] == 1
        assert b.stats["icmp_echo_replied"] == 0
        pb.inject(eth(pb.mac, mac_a, 0x0800, ipv4(ip_of(0), ip_of(1), 1, bytes(msg))))
        assert b.stats["icmp_echo_replied"] == 1


# ---------------------------------------------------------------- routing, interfaces
def test_default_route_sends_through_the_gateway() -> None:
    with Lan(2, gateway="10.0.0.2") as lan:
        a, b = lan.stacks
        assert [str(r) for r in a.routes] == [
            "10.0.0.0/24 dev eth0 src 10.0.0.1",
            "default via 10.0.0.2 dev eth0 src 10.0.0.1",
        ]
        _udp(a).sendto(b"far away", ("192.168.50.1", 9))
        frame = lan.ports[0].sent[-1][0]
        assert frame[:6] == lan.ports[1].mac  # to the gateway's MAC
        assert frame[14 + 16 : 14 + 20] == bytes((192, 168, 50, 1))  # for the far address
        assert b.stats["ip_not_for_us"] == 1  # the gateway does not forward


def test_longest_prefix_wins() -> None:
    with Lan(3, gateway="10.0.0.2") as lan:
        a = lan.stacks[0]
        r = a.add_route("192.168.50.0/24", "10.0.0.3")
        assert str(r) == "192.168.50.0/24 via 10.0.0.3 dev eth0 src 10.0.0.1"
        assert a.route(ip_aton("192.168.50.1")) is r
        assert a.route(ip_aton("192.168.51.1")).gateway == ip_aton("10.0.0.2")
        assert a.route(ip_aton("10.0.0.77")).gateway is None
        _udp(a).sendto(b"x", ("192.168.50.1", 9))
        assert lan.ports[0].sent[-1][0][:6] == lan.ports[2].mac
        with pytest.raises(ValueError):
            a.add_route("192.168.60.1/24", "10.0.0.3")  # host bits
        with pytest.raises(ValueError):
            a.add_route("192.168.60.0/24", "172.16.0.1")  # gateway off-link


@pytest.mark.parametrize(
    ("ip", "gateway"),
    [
        ("10.0.0.2", None),  # no prefix
        ("10.0.0.256/24", None),
        ("10.0.0.2/33", None),
        ("10.0.0.0/24", None),  # network address
        ("10.0.0.255/24", None),  # broadcast address
        ("224.0.0.1/4", None),
        ("0.1.2.3/8", None),
        ("127.0.0.1/8", None),
        ("10.0.0.2/24", "10.0.1.1"),  # gateway off the subnet
        ("10.0.0.2/24", "10.0.0.2"),  # gateway is us
        ("10.0.0.2/24", "gateway"),
    ],
)
def test_bad_interface_configuration_is_a_one_line_value_error(
    ip: str, gateway: str | None
) -> None:
    timers = TimerHeap()
    st = Stack(timers)
    hub = Hub()
    try:
        with pytest.raises(ValueError) as e:
            st.add_interface(hub.port(), ip, gateway)
        assert "\n" not in str(e.value)
        assert st.interfaces == {}
    finally:
        st.close()
        timers.close()


def test_duplicate_interfaces_and_two_default_routes_are_refused() -> None:
    with Stack() as st:
        hub = Hub()
        st.add_interface(hub.port("eth0"), "10.0.0.1/24", "10.0.0.254")
        with pytest.raises(ValueError):
            st.add_interface(hub.port("eth0"), "10.0.1.1/24")
        with pytest.raises(ValueError):
            st.add_interface(hub.port("eth1"), "10.0.0.1/16")
        with pytest.raises(ValueError):
            st.add_interface(hub.port("eth1"), "10.1.0.1/16", "10.1.0.254")
        iface = st.add_interface(hub.port("eth1"), "10.1.0.1/16")
        assert iface.cidr == "10.1.0.1/16" and iface.broadcast == ip_aton("10.1.255.255")
        assert sorted(st.interfaces) == ["eth0", "eth1"]
    assert st.closed
    assert not st.timers.thread_alive  # its own heap, closed with it


def test_two_interfaces_route_by_subnet() -> None:
    timers = TimerHeap()
    hub1, hub2 = Hub(), Hub()
    a, b, c = Stack(timers), Stack(timers), Stack(timers)
    try:
        a.add_interface(hub1.port("eth0"), "10.0.0.1/24")
        a.add_interface(hub2.port("eth1"), "10.9.0.1/24")
        b.add_interface(hub1.port("eth0"), "10.0.0.2/24")
        c.add_interface(hub2.port("eth0"), "10.9.0.2/24")
        sb, sc = _udp(b), _udp(c)
        sb.bind(("", 9))
        sc.bind(("", 9))
        s = _udp(a)
        s.sendto(b"to b", ("10.0.0.2", 9))
        s.sendto(b"to c", ("10.9.0.2", 9))
        assert sb.recvfrom(10) == (b"to b", ("10.0.0.1", s.getsockname()[1]))
        assert sc.recvfrom(10) == (b"to c", ("10.9.0.1", s.getsockname()[1]))
    finally:
        for st in (a, b, c):
            st.close()
        timers.close()
