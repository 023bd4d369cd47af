"""Bad input from the wire: every malformed frame, header and fragment pattern is dropped
and counted, memory for reassembly stays bounded, and after each the stack still
carries a normal datagram."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from test_stack_helpers import Lan, eth, ip_of, ipv4, live_threads, pattern, udp, wait_timers

from kernel.net import Stack, StackConfig, UdpSocket
from kernel.net.ipv4 import FRAG_OVERHEAD, IP_MF
from vdev.virtio.packet import inet_checksum

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_thread_left_behind() -> Iterator[None]:
    before = live_threads()
    yield
    assert live_threads() <= before, "a timer, hub or test thread outlived its test"


A, B = ip_of(0), ip_of(1)


class Target:
    """Stack B with a socket on port 9, and a way to feed it frames from A."""

    def __init__(self, lan: Lan) -> None:
        self.lan = lan
        self.a, self.b = lan.stacks
        self.sock = self.b.socket()
        assert isinstance(self.sock, UdpSocket)
        self.sock.bind(("", 9))
        self.mac_a, self.mac_b = lan.ports[0].mac, lan.ports[1].mac

    def feed(self, ip_packet: bytes, ethertype: int = 0x0800) -> None:
        self.lan.ports[1].inject(eth(self.mac_b, self.mac_a, ethertype, ip_packet))

    def raw(self, frame: bytes) -> None:
        self.lan.ports[1].inject(frame)

    def still_works(self) -> None:
        """A normal datagram, big enough to be fragmented, still goes through."""
        s = self.a.socket()
        data = pattern(3000, 42)
        s.sendto(data, (B, 9))
        self.sock.setblocking(False)
        got = self.sock.recv(4000)
        assert got == data
        s.close()

    def stat(self, name: str) -> int:
        return self.b.stats[name]


def _frag(data: bytes, off: int, mf: bool, ident: int = 0x4242, proto: int = 17) -> bytes:
    return ipv4(A, B, proto, data, ident=ident, flags_frag=(IP_MF if mf else 0) | (off // 8))


@pytest.fixture
def target():
    with Lan(2, config=StackConfig(reasm_timeout_s=3600)) as lan:
        yield Target(lan)


# ---------------------------------------------------------------- Ethernet
def test_runts_unknown_ethertypes_and_other_macs(target: Target) -> None:
    for n in range(14):
        target.raw(bytes(n))
    assert target.stat("rx_runt") == 14
    target.feed(b"\x60" + bytes(39), ethertype=0x86DD)  # IPv6: not spoken here
    target.feed(bytes(46), ethertype=0x0050)  # an 802.3 length field
    assert target.stat("rx_unknown_ethertype") == 2
    assert target.stat("rx_bad_frames") == 16
    target.raw(eth(b"\x02\x00\x00\x00\x00\x77", target.mac_a, 0x0800, bytes(40)))
    target.raw(eth(b"\x01\x00\x5e\x00\x00\x01", target.mac_a, 0x0800, bytes(40)))
    assert target.stat("rx_other_mac") == 2
    target.still_works()


# ---------------------------------------------------------------- IPv4 header
def test_bad_ip_headers_are_dropped_and_counted(target: Target) -> None:
    seg = udp(A, B, 1, 9, b"x")
    good = ipv4(A, B, 17, seg)
    target.feed(good[:10])  # truncated header
    target.feed(ipv4(A, B, 17, seg, version=6))
    target.feed(ipv4(A, B, 17, seg, ihl=4))
    target.feed(ipv4(A, B, 17, seg, ihl=15)[:40])  # IHL beyond the packet
    target.feed(ipv4(A, B, 17, seg, total=len(good) + 1))  # total length beyond the data
    target.feed(ipv4(A, B, 17, seg, total=19))  # total length inside the header
    assert target.stat("ip_bad_header") == 6
    target.feed(ipv4(A, B, 17, seg, csum=0x1234))
    assert target.stat("ip_bad_checksum") == 1
    target.feed(ipv4("10.0.0.255", B, 17, seg))
    target.feed(ipv4("224.0.0.5", B, 17, seg))
    assert target.stat("ip_bad_source") == 2
    target.feed(ipv4(A, "10.0.0.77", 17, seg))
    assert target.stat("ip_not_for_us") == 1
    assert target.stat("udp_rx_datagrams") == 0
    target.still_works()


def test_padding_is_cut_and_options_are_skipped(target: Target) -> None:
    seg = udp(A, B, 1, 9, b"padded")
    target.feed(ipv4(A, B, 17, seg) + b"\xee" * 20)  # Ethernet padding after the packet
    target.feed(ipv4(A, B, 17, udp(A, B, 1, 9, b"options"), ihl=7))
    assert target.sock.recv(100) == b"padded"
    assert target.sock.recv(100) == b"options"
    assert target.stat("udp_bad_header") == 0 and target.stat("udp_bad_checksum") == 0


def test_unknown_protocol_is_answered_with_protocol_unreachable(target: Target) -> None:
    target.a.ping(B, count=1)  # B knows A's MAC: the error goes out at once
    target.feed(ipv4(A, B, 99, b"what is this"))
    assert target.stat("ip_unknown_protocol") == 1
    assert target.stat("icmp_unreach_sent") == 1
    assert target.a.stats["icmp_errors_received"] == 1
    target.still_works()


# ---------------------------------------------------------------- UDP header
def test_bad_udp_headers_and_checksums(target: Target) -> None:
    target.feed(ipv4(A, B, 17, b"\x00\x01\x00"))  # shorter than a UDP header
    seg = bytearray(udp(A, B, 1, 9, b"hello"))
    long_len = bytearray(seg)
    struct.pack_into("!H", long_len, 4, len(seg) + 1)  # length beyond the IP payload
    short_len = bytearray(seg)
    struct.pack_into("!H", short_len, 4, 7)  # length below the header
    target.feed(ipv4(A, B, 17, bytes(long_len)))
    target.feed(ipv4(A, B, 17, bytes(short_len)))
    assert target.stat("udp_bad_header") == 3
    bad = bytearray(seg)
    bad[-1] ^= 0xFF  # data changed, checksum not
    target.feed(ipv4(A, B, 17, bytes(bad)))
    assert target.stat("udp_bad_checksum") == 1
    trimmed = bytearray(udp(A, B, 1, 9, b"hi")) + b"junk"  # IP payload longer than UDP
    target.feed(ipv4(A, B, 17, bytes(trimmed)))
    assert target.sock.recv(100) == b"hi"
    target.still_works()


# ---------------------------------------------------------------- ICMP
def test_bad_icmp_messages(target: Target) -> None:
    target.feed(ipv4(A, B, 1, b"\x08\x00\x00"))
    msg = bytearray(struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"data")
    struct.pack_into("!H", msg, 2, inet_checksum(msg) ^ 1)
    target.feed(ipv4(A, B, 1, bytes(msg)))
    assert target.stat("icmp_bad_header") == 1 and target.stat("icmp_bad_checksum") == 1
    err = bytearray(struct.pack("!BBHI", 3, 3, 0, 0) + b"\x45" + bytes(10))  # quote too short
    struct.pack_into("!H", err, 2, inet_checksum(err))
    target.feed(ipv4(A, B, 1, bytes(err)))
    assert target.stat("icmp_bad_header") == 2
    assert target.stat("icmp_echo_replied") == 0
    target.still_works()


# ---------------------------------------------------------------- fragments
def test_out_of_order_fragments_reassemble(target: Target) -> None:
    seg = udp(A, B, 1, 9, pattern(100))
    parts = [(seg[0:48], 0, True), (seg[48:96], 48, True), (seg[96:], 96, False)]
    for data, off, mf in reversed(parts):
        target.feed(_frag(data, off, mf))
    assert target.sock.recv(200) == pattern(100)
    assert target.stat("ip_frag_reassembled") == 1
    assert target.b.reassembly_count() == 0 and target.b.reassembly_bytes() == 0


def test_exact_duplicate_fragment_is_dropped_alone(target: Target) -> None:
    seg = udp(A, B, 1, 9, pattern(40))
    target.feed(_frag(seg[:24], 0, True))
    target.feed(_frag(seg[:24], 0, True))
    assert target.stat("ip_frag_duplicate") == 1
    target.feed(_frag(seg[24:], 24, False))
    assert target.sock.recv(100) == pattern(40)


@pytest.mark.parametrize(
    ("second", "why"),
    [
        ((8, 16, True), "ip_frag_overlap"),  # inside the first
        ((0, 8, True), "ip_frag_overlap"),  # same start, other length
        ((16, 8, False), "ip_frag_overlap"),  # last fragment overlapping the first
        ((8, 24, True), "ip_frag_overlap"),  # straddles the first's end
    ],
)
def test_overlapping_fragments_discard_the_datagram(
    target: Target, second: tuple[int, int, bool], why: str
) -> None:
    seg = udp(A, B, 1, 9, pattern(64))
    target.feed(_frag(seg[:24], 0, True))
    off, n, mf = second
    target.feed(_frag(bytes(seg[off : off + n]), off, mf))
    assert target.stat(why) == 1
    assert target.stat("ip_frag_dropped") == 1
    assert target.b.reassembly_count() == 0 and target.b.reassembly_bytes() == 0
    # the rest of the datagram starts a new partial, which never completes
    target.feed(_frag(seg[24:], 24, False))
    assert target.b.reassembly_count() == 1
    assert target.stat("udp_rx_datagrams") == 0
    target.still_works()


def test_bad_fragments(target: Target) -> None:
    target.feed(_frag(b"\x00" * 12, 0, True))  # not a multiple of 8 with MF
    target.feed(_frag(b"", 8, True))  # empty
    target.feed(_frag(b"\x00" * 16, 65512, False))  # ends beyond 65515: ping of death
    assert target.stat("ip_frag_bad") == 3
    assert target.b.reassembly_count() == 0
    # two different ends
    target.feed(_frag(b"\x00" * 8, 8, False, ident=7))
    target.feed(_frag(b"\x00" * 16, 16, False, ident=7))
    assert target.stat("ip_frag_inconsistent") == 1
    # data beyond a known end
    target.feed(_frag(b"\x00" * 8, 8, False, ident=8))
    target.feed(_frag(b"\x00" * 8, 24, True, ident=8))
    assert target.stat("ip_frag_inconsistent") == 2
    assert target.b.reassembly_count() == 0
    target.still_works()


def test_too_many_fragments_per_datagram() -> None:
    with Lan(2, config=StackConfig(reasm_max_frags=4, reasm_timeout_s=3600)) as lan:
        t = Target(lan)
        for i in range(5):
            t.feed(_frag(b"\x00" * 8, 16 * i, True))  # gaps: never complete
        assert t.stat("ip_frag_too_many") == 1
        assert t.stat("ip_frag_dropped") == 1
        assert t.b.reassembly_count() == 0
        t.feed(_frag(b"\x00" * 8, 200, True, ident=9))
        assert t.b.reassembly_count() == 1


def test_never_completed_fragments_are_freed_on_timeout() -> None:
    cfg = StackConfig(reasm_timeout_s=0.05)
    with Lan(2, config=cfg) as lan:
        t = Target(lan)
        for ident in range(10):
            t.feed(_frag(pattern(800), 0, True, ident=ident))  # first halves only
        assert t.b.reassembly_count() == 10
        assert t.b.reassembly_bytes() == 10 * (800 + FRAG_OVERHEAD)
        wait_timers(lan.timers, cfg.reasm_timeout_s)
        assert t.b.reassembly_count() == 0 and t.b.reassembly_bytes() == 0
        assert t.stat("ip_frag_timeout") == 10
        t.still_works()


def test_a_fragment_flood_stays_within_the_memory_limit() -> None:
    limit = 64 * 1024
    cfg = StackConfig(reasm_max_bytes=limit, reasm_timeout_s=3600)
    with Lan(2, config=cfg) as lan:
        t = Target(lan)
        charge = 1000 + FRAG_OVERHEAD
        for ident in range(500):
            t.feed(_frag(pattern(1000, ident), 0, True, ident=ident))
            assert t.b.reassembly_bytes() <= limit
        held = limit // charge
        assert t.b.reassembly_count() == held
        assert t.b.reassembly_bytes() == held * charge
        assert t.stat("ip_frag_evicted") == 500 - held
        assert t.stat("ip_frag_dropped") == 500 - held
        # the newest survive: completing one of them works
        t.feed(_frag(b"\x00" * 8, 1000, False, ident=499))
        assert t.stat("ip_frag_reassembled") == 1
        t.still_works()
        assert t.b.reassembly_bytes() <= limit


def test_many_partials_from_a_flood_do_not_break_a_later_big_datagram() -> None:
    cfg = StackConfig(reasm_max_bytes=100_000, reasm_timeout_s=3600)
    with Lan(2, config=cfg) as lan:
        t = Target(lan)
        for ident in range(1000):
            t.feed(_frag(b"\x00" * 8, 8, True, ident=ident))  # never-completing junk
        assert t.b.reassembly_bytes() <= 100_000
        # a 64 KiB datagram needs 45 fragments; the junk is evicted to make room
        s = t.a.socket()
        data = pattern(60000, 5)
        s.sendto(data, (B, 9))
        t.sock.setblocking(False)
        assert t.sock.recv(65536) == data
        assert t.b.reassembly_bytes() <= 100_000


def test_stack_closes_with_partial_datagrams_and_timers_pending() -> None:
    with Lan(2, config=StackConfig(reasm_timeout_s=3600)) as lan:
        t = Target(lan)
        t.feed(_frag(b"\x00" * 8, 0, True))
        assert len(lan.timers) >= 1
        t.b.close()
        assert t.b.reassembly_count() == 0
        t.feed(_frag(b"\x00" * 8, 8, True))  # after close: ignored, no error
        assert isinstance(t.b, Stack) and t.b.closed
