"""Packet helpers both sides of a virtio-net link need (sans-IO).

The Internet checksum (RFC 1071) and what a NIC does when it offers checksum and
segmentation offload: complete a partial checksum (``NEEDS_CSUM``) and cut a TSO frame
(``GSO_TCPV4``) into wire-sized segments. The kernel's stack uses the checksum; the
device uses the offload helpers when its backend cannot take a frame as it is.

The checksum uses the fastest pure-CPython form measured on the development machine
(one big-integer modulo, ``int.from_bytes(b, "big") % 0xFFFF``): about 2.8 µs per
KiB — which is why the stack negotiates offloads instead of calling this on its fast
path.

Theory of operation (offload in software)
-----------------------------------------
*Checksum completion* (virtio §5.1.6.2, ``VIRTIO_NET_HDR_F_NEEDS_CSUM``): the sender
leaves the TCP/UDP checksum field holding the (non-inverted) pseudo-header sum and says
where the checksummed area starts (``csum_start``, from the start of the Ethernet frame)
and where the field is (``csum_offset``, from ``csum_start``). Completing it is one
Internet checksum over ``frame[csum_start:]`` — the partial sum in the field is part of
that area — stored at the field. A result of 0 is stored as 0xFFFF (the same value in
one's complement; UDP reserves 0 for "no checksum", RFC 768), as Linux does.

*TCPv4 segmentation* (``VIRTIO_NET_HDR_GSO_TCPV4``): a super-frame ``Ethernet | IPv4 |
TCP | payload`` with a payload larger than ``gso_size`` becomes one frame per
``gso_size`` bytes of payload, each with a copy of the headers in which

* IPv4 total length is the segment's, the identification counts up from the
  original's by one per segment, the header checksum is recomputed (RFC 791);
* the TCP sequence number advances by the payload already sent (RFC 793), FIN and
  PSH stay only on the last segment and CWR only on the first (RFC 3168 §6.1.2: CWR is
  set on the first new segment after a window reduction), and the TCP checksum is
  computed in full over the IPv4 pseudo-header, the TCP header and the payload.

Every length and offset is taken from the frame and checked before use; a frame that
cannot be parsed raises :class:`PacketError` naming the problem (the sender's fault).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "inet_sum",
    "inet_checksum",
    "fold",
    "PacketError",
    "ETHERTYPE_IPV4",
    "ETHERTYPE_VLAN",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "TCP_FIN",
    "TCP_SYN",
    "TCP_RST",
    "TCP_PSH",
    "TCP_ACK",
    "TCP_URG",
    "TCP_ECE",
    "TCP_CWR",
    "MAX_IPV4_TOTAL_LENGTH",
    "l3_offset",
    "ipv4_pseudo_sum",
    "ipv4_header_checksum",
    "complete_checksum",
    "complete_checksum_into",
    "gso_segment_tcpv4",
    "parse_tcpv4",
    "Tcpv4Offsets",
]

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_VLAN = 0x8100  # IEEE 802.1Q tag: 4 more bytes before the real ethertype
IPPROTO_TCP = 6
IPPROTO_UDP = 17

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

#: The IPv4 total length field is 16 bits (RFC 791 §3.1).
MAX_IPV4_TOTAL_LENGTH = 0xFFFF

_ETH_HLEN = 14
_IPV4_MIN = 20
_TCP_MIN = 20
_IP_MF = 0x2000
_IP_OFFMASK = 0x1FFF
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class PacketError(ValueError):
    """A frame that does not parse as what its header says it is (the sender's fault)."""


def inet_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The one's-complement sum of ``data`` as 16-bit big-endian words (odd length is
    padded with a zero byte), added to ``initial``, folded to 16 bits (not inverted).
    Sums can be chained: ``inet_sum(b, inet_sum(a))`` when ``a`` has even length."""
    n = len(data)
    if n & 1:
        data = bytes(data) + b"\x00"
    s = int.from_bytes(data, "big") % 0xFFFF if n else 0
    # x mod 0xFFFF is the one's-complement sum, except that a non-zero multiple of 0xFFFF
    # folds to 0 instead of 0xFFFF; both mean "zero" in one's complement, and inverting
    # gives 0xFFFF / 0 - the receiver's check of either accepts the packet.
    return fold(s + initial)


def fold(s: int) -> int:
    """Fold a sum of 16-bit words into 16 bits with end-around carry."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def inet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071): the inverted one's-complement sum of ``data``
    plus ``initial`` (e.g. a pseudo-header sum)."""
    return ~inet_sum(data, initial) & 0xFFFF


def ipv4_pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The folded (not inverted) sum of the IPv4 pseudo-header (RFC 793 §3.1, RFC 768):
    source and destination address, zero, protocol, and the L4 length."""
    if len(src) != 4 or len(dst) != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    if not 0 <= length <= 0xFFFF or not 0 <= proto <= 0xFF:
        raise ValueError(f"pseudo-header length {length} / protocol {proto} out of range")
    return inet_sum(src + dst + bytes((0, proto)) + _U16.pack(length))


def ipv4_header_checksum(header: bytes | bytearray | memoryview) -> int:
    """The checksum an IPv4 header should carry (RFC 791 §3.1): the Internet checksum
    of the header with its checksum field (bytes 10..11) taken as zero."""
    if len(header) < _IPV4_MIN:
        raise PacketError(f"IPv4 header of {len(header)} bytes (< 20)")
    h = bytearray(header)
    h[10:12] = b"\x00\x00"
    return inet_checksum(h)


def l3_offset(frame: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(offset, ethertype)`` of the network-layer header of an Ethernet II frame,
    skipping one 802.1Q tag. :class:`PacketError` if the frame is too short."""
    if len(frame) < _ETH_HLEN:
        raise PacketError(f"frame of {len(frame)} bytes is shorter than an Ethernet header")
    ethertype = _U16.unpack_from(frame, 12)[0]
    if ethertype == ETHERTYPE_VLAN:
        if len(frame) < _ETH_HLEN + 4:
            raise PacketError("802.1Q-tagged frame is shorter than its header")
        return _ETH_HLEN + 4, _U16.unpack_from(frame, 16)[0]
    return _ETH_HLEN, ethertype


def complete_checksum_into(buf: bytearray | memoryview, csum_start: int, csum_offset: int) -> None:
    """Complete a partial checksum in place (``NEEDS_CSUM``, virtio §5.1.6.2): store the
    Internet checksum of ``buf[csum_start:]`` at ``csum_start + csum_offset``.

    Raises :class:`PacketError` if the field does not lie inside the buffer (the
    driver-side rule of §5.1.6.2.1: the offsets must describe this packet)."""
    at = csum_start + csum_offset
    if csum_start < 0 or csum_offset < 0 or at + 2 > len(buf):
        raise PacketError(
            f"checksum field at {csum_start}+{csum_offset} does not fit a {len(buf)}-byte frame"
        )
    c = inet_checksum(memoryview(buf)[csum_start:])
    _U16.pack_into(buf, at, c or 0xFFFF)


def complete_checksum(
    frame: bytes | bytearray | memoryview, csum_start: int, csum_offset: int
) -> bytes:
    """A copy of ``frame`` with its partial checksum completed (see
    :func:`complete_checksum_into`)."""
    buf = bytearray(frame)
    complete_checksum_into(buf, csum_start, csum_offset)
    return bytes(buf)


@dataclass(frozen=True, slots=True)
class Tcpv4Offsets:
    """Where the parts of an ``Ethernet [802.1Q] | IPv4 | TCP | payload`` frame are:
    ``l3`` (IPv4 header), ``l4`` (TCP header), ``payload`` and ``end`` (where the IPv4
    packet ends by its total length; bytes after it are Ethernet padding)."""

    l3: int
    l4: int
    payload: int
    end: int


def parse_tcpv4(frame: bytes | bytearray | memoryview) -> Tcpv4Offsets:
    """Check that ``frame`` is an unfragmented IPv4/TCP packet whose header lengths
    fit, and say where its parts are. :class:`PacketError` naming the problem if not."""
    l3, ethertype = l3_offset(frame)
    if ethertype != ETHERTYPE_IPV4:
        raise PacketError(f"ethertype {ethertype:#06x}, not IPv4")
    n = len(frame)
    if n < l3 + _IPV4_MIN:
        raise PacketError(f"frame of {n} bytes is too short for an IPv4 header at {l3}")
    ver_ihl = frame[l3]
    ihl = (ver_ihl & 0x0F) * 4
    if ver_ihl >> 4 != 4 or ihl < _IPV4_MIN:  # RFC 791 §3.1: version 4, IHL >= 5
        raise PacketError(f"not an IPv4 header (version {ver_ihl >> 4}, IHL {ihl // 4})")
    total = _U16.unpack_from(frame, l3 + 2)[0]
    frag = _U16.unpack_from(frame, l3 + 6)[0]
    proto = frame[l3 + 9]
    if proto != IPPROTO_TCP:
        raise PacketError(f"IP protocol {proto}, not TCP")
    if frag & (_IP_MF | _IP_OFFMASK):
        raise PacketError("an IP fragment")
    l4 = l3 + ihl
    if total < ihl + _TCP_MIN or l3 + total > n:
        raise PacketError(
            f"IPv4 total length {total} does not fit headers of {ihl}+{_TCP_MIN} bytes "
            f"and a frame of {n} bytes"
        )
    thl = (frame[l4 + 12] >> 4) * 4
    if thl < _TCP_MIN or ihl + thl > total:  # RFC 793 §3.1: data offset >= 5
        raise PacketError(f"TCP data offset {thl // 4} does not fit the IPv4 packet")
    return Tcpv4Offsets(l3, l4, l4 + thl, l3 + total)


def gso_segment_tcpv4(frame: bytes | bytearray | memoryview, gso_size: int) -> list[bytes]:
    """Cut a TCPv4 super-frame into segments of at most ``gso_size`` payload bytes, as
    a NIC doing TSO would (see the module docstring for what changes per segment).

    The frame is ``Ethernet [802.1Q] | IPv4 | TCP | payload``; its IPv4 total length
    says where the packet ends (bytes after it are Ethernet padding and dropped); its
    TCP checksum field may hold anything (a pseudo-header sum, typically): every
    segment's checksums are computed in full. A payload of at most ``gso_size`` bytes
    gives one segment. :class:`PacketError` when the frame is not such a packet."""
    if gso_size <= 0:
        raise PacketError(f"gso_size {gso_size} must be > 0")
    try:
        o = parse_tcpv4(frame)
    except PacketError as e:
        raise PacketError(f"GSO_TCPV4 frame: {e}") from None
    l3, l4, payload_at, end = o.l3, o.l4, o.payload, o.end
    ihl, thl = l4 - l3, payload_at - l4
    mv = memoryview(bytes(frame))
    eth = mv[:l3]
    ip = bytearray(mv[l3:l4])
    tcp = bytearray(mv[l4:payload_at])
    payload = mv[payload_at:end]
    src, dst = bytes(ip[12:16]), bytes(ip[16:20])
    ip_id = _U16.unpack_from(ip, 4)[0]
    seq = _U32.unpack_from(tcp, 4)[0]
    flags = tcp[13]
    plen = len(payload)
    count = max(1, -(-plen // gso_size))  # at most 65535 (payload < 2**16): bounded
    out: list[bytes] = []
    for i in range(count):
        piece = payload[i * gso_size : (i + 1) * gso_size]
        last = i == count - 1
        seg_flags = flags
        if not last:
            seg_flags &= ~(TCP_FIN | TCP_PSH)
        if i:
            seg_flags &= ~TCP_CWR
        tcp[13] = seg_flags
        _U32.pack_into(tcp, 4, (seq + i * gso_size) & 0xFFFFFFFF)
        tcp[16:18] = b"\x00\x00"
        l4_len = thl + len(piece)
        csum = inet_checksum(piece, inet_sum(tcp, ipv4_pseudo_sum(src, dst, IPPROTO_TCP, l4_len)))
        _U16.pack_into(tcp, 16, csum)
        _U16.pack_into(ip, 2, ihl + l4_len)
        _U16.pack_into(ip, 4, (ip_id + i) & 0xFFFF)
        ip[10:12] = b"\x00\x00"
        _U16.pack_into(ip, 10, inet_checksum(ip))
        out.append(b"".join((eth, ip, tcp, piece)))
    return out
