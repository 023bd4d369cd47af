"""Checksum completion and TCPv4 segmentation (vdev.virtio.packet) on hand-built packets.

Every checksum is verified with a reference written here, word by word as RFC 1071 §4.1
describes it, independent of the module's big-integer implementation; every header
field of every segment is read back with ``struct`` and checked against what RFC 791 /
RFC 793 / RFC 3168 say it must be.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdev.virtio.packet import (
    TCP_ACK,
    TCP_CWR,
    TCP_ECE,
    TCP_FIN,
    TCP_PSH,
    TCP_SYN,
    PacketError,
    complete_checksum,
    complete_checksum_into,
    gso_segment_tcpv4,
    inet_checksum,
    inet_sum,
    ipv4_header_checksum,
    ipv4_pseudo_sum,
    parse_tcpv4,
)

pytestmark = pytest.mark.timeout(60)

SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")
SRC_IP = bytes([10, 0, 0, 1])
DST_IP = bytes([10, 0, 0, 2])


# --------------------------------------------------------------------------- references


def ref_sum(data: bytes) -> int:
    """RFC 1071 §4.1: add 16-bit words into a 32-bit accumulator, fold the carries."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_csum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + bytes([0, proto]) + struct.pack("!H", length)


def verifies(data: bytes) -> bool:
    """A receiver's check: the sum over data including its checksum is all ones."""
    return ref_sum(data) == 0xFFFF


def ip_header(total: int, proto: int, ident: int = 0x1234, options: bytes = b"") -> bytearray:
    ihl = 5 + len(options) // 4
    h = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            total,
            ident,
            0x4000,  # DF
            64,
            proto,
            0,
            SRC_IP,
            DST_IP,
        )
        + options
    )
    struct.pack_into("!H", h, 10, ref_csum(bytes(h)))
    return h


def tcp_frame(
    payload: bytes,
    *,
    seq: int = 1000,
    flags: int = TCP_ACK | TCP_PSH,
    ident: int = 0x1234,
    ip_options: bytes = b"",
    tcp_options: bytes = b"",
    partial: bool = True,
    vlan: bool = False,
    padding: bytes = b"",
) -> bytes:
    """Ethernet | IPv4 | TCP | payload. ``partial``: the TCP checksum field holds the
    pseudo-header sum (what a NEEDS_CSUM sender leaves), else the full checksum."""
    thl = 20 + len(tcp_options)
    tcp = bytearray(
        struct.pack("!HHIIBBHHH", 40000, 80, seq, 777, (thl // 4) << 4, flags, 65535, 0, 0)
        + tcp_options
    )
    l4_len = thl + len(payload)
    if partial:
        struct.pack_into("!H", tcp, 16, ref_sum(pseudo(SRC_IP, DST_IP, 6, l4_len)))
    else:
        struct.pack_into(
            "!H", tcp, 16, ref_csum(pseudo(SRC_IP, DST_IP, 6, l4_len) + bytes(tcp) + payload)
        )
    ip = ip_header(20 + len(ip_options) + l4_len, 6, ident, ip_options)
    eth = DST_MAC + SRC_MAC + (b"\x81\x00\x00\x05" if vlan else b"") + b"\x08\x00"
    return eth + bytes(ip) + bytes(tcp) + payload + padding


def udp_frame(payload: bytes) -> bytes:
    """Ethernet | IPv4 | UDP with the pseudo-header sum in the checksum field."""
    length = 8 + len(payload)
    udp = bytearray(struct.pack("!HHHH", 5353, 53, length, 0))
    struct.pack_into("!H", udp, 6, ref_sum(pseudo(SRC_IP, DST_IP, 17, length)))
    ip = ip_header(20 + length, 17)
    return DST_MAC + SRC_MAC + b"\x08\x00" + bytes(ip) + bytes(udp) + payload


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


# --------------------------------------------------------------------------- checksum


def test_rfc1071_example() -> None:
    """The worked example of RFC 1071 §3: words 0001 f203 f4f5 f6f7 sum to ddf2."""
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert inet_sum(data) == ref_sum(data) == 0xDDF2
    assert inet_checksum(data) == 0x220D


@given(st.binary(max_size=2000), st.integers(0, 0xFFFF))
def test_checksum_matches_the_reference(data: bytes, initial: int) -> None:
    """Equal as one's-complement numbers (0 and 0xFFFF are both zero)."""
    want = ref_sum(data) + initial
    want = (want & 0xFFFF) + (want >> 16)
    assert inet_sum(data, initial) % 0xFFFF == want % 0xFFFF
    assert 0 <= inet_sum(data, initial) <= 0xFFFF
    assert inet_checksum(data, initial) == ~inet_sum(data, initial) & 0xFFFF


def test_pseudo_header_and_ip_header_checksums() -> None:
    assert ipv4_pseudo_sum(SRC_IP, DST_IP, 6, 1234) == ref_sum(pseudo(SRC_IP, DST_IP, 6, 1234))
    h = ip_header(1500, 6)
    assert ipv4_header_checksum(h) == struct.unpack_from("!H", h, 10)[0]
    with pytest.raises(ValueError):
        ipv4_pseudo_sum(b"\x01\x02\x03", DST_IP, 6, 10)
    with pytest.raises(PacketError):
        ipv4_header_checksum(b"\x45" * 19)


@pytest.mark.parametrize("n", [0, 1, 2, 17, 1000, 1461])
def test_complete_tcp_checksum(n: int) -> None:
    frame = tcp_frame(pattern(n, n))
    full = tcp_frame(pattern(n, n), partial=False)
    done = complete_checksum(frame, 34, 16)
    assert done == full, "same bytes as a checksum computed from scratch"
    seg = done[34:]
    assert verifies(pseudo(SRC_IP, DST_IP, 6, len(seg)) + seg)
    buf = bytearray(frame)
    complete_checksum_into(buf, 34, 16)
    assert bytes(buf) == full


def test_complete_udp_checksum_and_zero_becomes_ffff() -> None:
    frame = udp_frame(b"hello, world")
    done = complete_checksum(frame, 34, 6)
    seg = done[34:]
    assert verifies(pseudo(SRC_IP, DST_IP, 17, len(seg)) + seg)
    # choose the last payload word so that the checksum comes out as 0: RFC 768 says a
    # computed 0 is sent as 0xFFFF (0 means "no checksum" for UDP)
    base = udp_frame(b"\x00\x00")
    s = ref_sum(base[34:])  # includes the pseudo-header sum in the field
    word = (0xFFFF - s) & 0xFFFF  # makes the total 0xFFFF, i.e. checksum 0
    frame = udp_frame(struct.pack("!H", word))
    assert ref_csum(frame[34:]) == 0
    done = complete_checksum(frame, 34, 6)
    assert struct.unpack_from("!H", done, 40)[0] == 0xFFFF
    seg = done[34:]
    assert verifies(pseudo(SRC_IP, DST_IP, 17, len(seg)) + seg)


@pytest.mark.parametrize("start,offset", [(60, 0), (50, 9), (59, 0), (0, 59)])
def test_checksum_field_outside_the_frame(start: int, offset: int) -> None:
    with pytest.raises(PacketError, match="does not fit"):
        complete_checksum(bytes(60), start, offset)


# --------------------------------------------------------------------------- segmentation


def check_segments(
    original: bytes, segments: list[bytes], mss: int, *, l3: int = 14, ip_opt: int = 0
) -> None:
    """Every rule a TSO segment must follow, checked from the bytes."""
    ihl = 20 + ip_opt
    o_ip = original[l3 : l3 + ihl]
    o_total = struct.unpack_from("!H", o_ip, 2)[0]
    o_id = struct.unpack_from("!H", o_ip, 4)[0]
    l4 = l3 + ihl
    thl = (original[l4 + 12] >> 4) * 4
    o_seq = struct.unpack_from("!I", original, l4 + 4)[0]
    o_flags = original[l4 + 13]
    payload = original[l4 + thl : l3 + o_total]
    assert len(segments) == max(1, -(-len(payload) // mss))
    got = b""
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        assert seg[:l3] == original[:l3], "Ethernet header copied"
        ip = seg[l3 : l3 + ihl]
        tcp = seg[l4 : l4 + thl]
        data = seg[l4 + thl :]
        assert ip[0] == original[l3] and ip[9] == 6
        assert ip[12:20] == o_ip[12:20] and ip[20:] == o_ip[20:], "addresses and options"
        assert struct.unpack_from("!H", ip, 2)[0] == len(seg) - l3, "total length"
        assert struct.unpack_from("!H", ip, 4)[0] == (o_id + i) & 0xFFFF, "ids count up"
        assert verifies(ip), "IPv4 header checksum"
        assert len(data) <= mss and (last or len(data) == mss)
        assert struct.unpack_from("!I", tcp, 4)[0] == (o_seq + len(got)) & 0xFFFFFFFF
        assert tcp[:4] == original[l4 : l4 + 4] and tcp[8:12] == original[l4 + 8 : l4 + 12]
        assert (
            tcp[14:16] == original[l4 + 14 : l4 + 16] and tcp[20:] == original[l4 + 20 : l4 + thl]
        )
        want = o_flags & ~(TCP_FIN | TCP_PSH | TCP_CWR)
        if last:
            want |= o_flags & (TCP_FIN | TCP_PSH)  # FIN/PSH only on the last
        if i == 0:
            want |= o_flags & TCP_CWR  # RFC 3168 §6.1.2: CWR only on the first
        assert tcp[13] == want, f"segment {i}: flags {tcp[13]:#x}, want {want:#x}"
        assert verifies(pseudo(ip[12:16], ip[16:20], 6, len(tcp) + len(data)) + tcp + data)
        got += data
    assert got == payload, "the payload reassembles"


@pytest.mark.parametrize(
    "n,mss",
    [(10000, 1448), (65495, 1460), (2896, 1448), (1, 1448), (0, 1448), (1448, 1448), (3001, 1000)],
)
def test_tso_segments(n: int, mss: int) -> None:
    frame = tcp_frame(pattern(n, 7), flags=TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR | TCP_ECE)
    segs = gso_segment_tcpv4(frame, mss)
    check_segments(frame, segs, mss)


def test_tso_with_options_vlan_and_padding() -> None:
    ts = bytes([1, 1, 8, 10]) + bytes(8)  # NOP NOP timestamps
    opt = bytes([1, 1, 1, 0])  # NOPs, EOL: 4 bytes of IP options
    frame = tcp_frame(
        pattern(5000, 3), ip_options=opt, tcp_options=ts, vlan=True, padding=b"\xaa" * 6
    )
    segs = gso_segment_tcpv4(frame, 1200)
    check_segments(frame, segs, 1200, l3=18, ip_opt=4)
    assert all(b"\xaa" * 6 not in s[-6:] for s in segs), "Ethernet padding is not payload"


def test_tso_wraps_sequence_numbers_and_ids() -> None:
    frame = tcp_frame(pattern(4000), seq=0xFFFFFF00, ident=0xFFFF, flags=TCP_ACK)
    segs = gso_segment_tcpv4(frame, 1000)
    check_segments(frame, segs, 1000)
    assert struct.unpack_from("!I", segs[1], 38)[0] == (0xFFFFFF00 + 1000) & 0xFFFFFFFF
    assert struct.unpack_from("!H", segs[1], 18)[0] == 0


def test_tso_checksum_field_content_does_not_matter() -> None:
    a = bytearray(tcp_frame(pattern(3000)))
    b = bytearray(a)
    b[50:52] = b"\xde\xad"
    assert gso_segment_tcpv4(a, 1000) == gso_segment_tcpv4(b, 1000)


def _corrupt(frame: bytes, at: int, value: bytes) -> bytes:
    b = bytearray(frame)
    b[at : at + len(value)] = value
    return bytes(b)


GOOD = tcp_frame(pattern(3000))


@pytest.mark.parametrize(
    "frame,mss,match",
    [
        (GOOD, 0, "gso_size"),
        (GOOD[:13], 1000, "shorter than an Ethernet header"),
        (_corrupt(GOOD, 12, b"\x86\xdd"), 1000, "not IPv4"),
        (GOOD[:30], 1000, "too short"),
        (_corrupt(GOOD, 14, b"\x65"), 1000, "not an IPv4 header"),
        (_corrupt(GOOD, 14, b"\x44"), 1000, "not an IPv4 header"),
        (_corrupt(GOOD, 23, b"\x11"), 1000, "not TCP"),
        (_corrupt(GOOD, 20, b"\x20\x00"), 1000, "fragment"),
        (_corrupt(GOOD, 20, b"\x00\x10"), 1000, "fragment"),
        (_corrupt(GOOD, 16, b"\xff\xff"), 1000, "total length"),
        (_corrupt(GOOD, 16, b"\x00\x20"), 1000, "total length"),
        (_corrupt(GOOD, 46, b"\x40"), 1000, "data offset"),
        (_corrupt(_corrupt(GOOD, 46, b"\xf0"), 16, b"\x00\x30"), 1000, "data offset"),
        (GOOD[:100], 1000, "total length"),
    ],
)
def test_tso_refuses_what_it_cannot_parse(frame: bytes, mss: int, match: str) -> None:
    with pytest.raises(PacketError, match=match):
        gso_segment_tcpv4(frame, mss)


def test_parse_tcpv4_offsets() -> None:
    o = parse_tcpv4(tcp_frame(b"x" * 10, tcp_options=bytes(12), vlan=True, padding=bytes(4)))
    assert (o.l3, o.l4, o.payload) == (18, 38, 70)
    assert o.end == 80


def test_many_tiny_segments_stay_bounded() -> None:
    frame = tcp_frame(pattern(3000), flags=TCP_SYN | TCP_ACK)
    segs = gso_segment_tcpv4(frame, 1)
    assert len(segs) == 3000
    check_segments(frame, segs, 1)
