"""The TCP header on the wire: parsing (with every length checked) and building.

Theory of operation
-------------------
:func:`parse_segment` takes the IP payload of a TCP packet and returns a
:class:`Segment` or raises :class:`SegmentError` naming the counter to bump. The checks
are RFC 9293 §3.1: the fixed header is 20 bytes; Data Offset counts 32-bit words and
must be at least 5 and inside the payload; options are TLVs (kinds 0 End and 1 NOP
are one byte, every other kind has a length byte >= 2 that must stay inside the option
area). Known options with a wrong length (MSS 4, RFC 9293 §3.2; Window Scale 3 and
Timestamps 10, RFC 7323 §2.2/§3.2; SACK-permitted 2, RFC 2018) make the segment
malformed; unknown kinds are skipped. The option loop is bounded by the 40 bytes an
option area can have.

:func:`build_segment` makes a header (options padded to a multiple of 4) with the
checksum field holding the pseudo-header sum, so that IP or the device completes it
(``csum_offset`` 16).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "TCP_HDR",
    "TCP_CSUM_OFFSET",
    "FIN",
    "SYN",
    "RST",
    "PSH",
    "ACK",
    "URG",
    "Segment",
    "SegmentError",
    "parse_segment",
    "build_segment",
    "flag_names",
]

TCP_HDR = struct.Struct("!HHIIBBHHH")
#: Offset of the checksum field in the TCP header.
TCP_CSUM_OFFSET = 16

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

_OPT_END = 0
_OPT_NOP = 1
_OPT_MSS = 2
_OPT_WS = 3
_OPT_SACK_OK = 4
_OPT_TS = 8


class SegmentError(ValueError):
    """A malformed segment; ``counter`` is the stack counter to add one to."""

    def __init__(self, counter: str, message: str) -> None:
        super().__init__(message)
        self.counter = counter


@dataclass(slots=True)
class Segment:
    """One parsed TCP segment (``data`` may be a view into the driver's buffer)."""

    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    wnd: int
    data: bytes | memoryview
    mss: int | None = None
    wscale: int | None = None
    ts: tuple[int, int] | None = None
    sack_ok: bool = False

    @property
    def seg_len(self) -> int:
        """SEG.LEN: data bytes plus one each for SYN and FIN (RFC 9293 §3.4)."""
        return len(self.data) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)


def parse_segment(payload: bytes | memoryview) -> Segment:
    """Parse and check a TCP header (see the module docstring)."""
    n = len(payload)
    if n < 20:  # RFC 9293 §3.1: the fixed header is 20 bytes
        raise SegmentError("tcp_bad_header", f"{n} bytes are shorter than a TCP header")
    sport, dport, seq, ack, off, flags, wnd, _csum, _urg = TCP_HDR.unpack_from(payload)
    hlen = (off >> 4) * 4
    if hlen < 20 or hlen > n:  # RFC 9293 §3.1 Data Offset: >= 5 words, inside the segment
        raise SegmentError("tcp_bad_header", f"data offset {hlen} with {n} bytes")
    seg = Segment(sport, dport, seq, ack, flags & 0x3F, wnd, payload[hlen:])
    i = 20
    for _ in range(40):  # bounded: at most 40 option bytes, each step consumes >= 1
        if i >= hlen:
            break
        kind = payload[i]
        if kind == _OPT_END:
            break
        if kind == _OPT_NOP:
            i += 1
            continue
        if i + 1 >= hlen:  # RFC 9293 §3.2: every other option has a length byte
            raise SegmentError("tcp_bad_header", f"option {kind} truncated")
        olen = payload[i + 1]
        if olen < 2 or i + olen > hlen:  # the length covers kind and length, inside
            raise SegmentError("tcp_bad_header", f"option {kind} length {olen}")
        if kind == _OPT_MSS:
            if olen != 4:  # RFC 9293 §3.2
                raise SegmentError("tcp_bad_header", f"MSS option length {olen}")
            seg.mss = (payload[i + 2] << 8) | payload[i + 3]
        elif kind == _OPT_WS:
            if olen != 3:  # RFC 7323 §2.2
                raise SegmentError("tcp_bad_header", f"window scale option length {olen}")
            seg.wscale = min(payload[i + 2], 14)  # RFC 7323 §2.3: larger is taken as 14
        elif kind == _OPT_TS:
            if olen != 10:  # RFC 7323 §3.2
                raise SegmentError("tcp_bad_header", f"timestamps option length {olen}")
            seg.ts = struct.unpack_from("!II", payload, i + 2)
        elif kind == _OPT_SACK_OK:
            if olen != 2:  # RFC 2018 §2
                raise SegmentError("tcp_bad_header", f"SACK-permitted option length {olen}")
            seg.sack_ok = True
        i += olen
    return seg


def build_segment(
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    wnd: int,
    pseudo: int,
    data: bytes | bytearray | memoryview = b"",
    *,
    mss: int | None = None,
    wscale: int | None = None,
    ts: tuple[int, int] | None = None,
) -> bytearray:
    """A TCP segment whose checksum field holds ``pseudo`` (the pseudo-header sum of
    the whole segment's length, see :func:`vdev.virtio.packet.ipv4_pseudo_sum`)."""
    opts = bytearray()
    if mss is not None:
        opts += struct.pack("!BBH", _OPT_MSS, 4, mss)
    if wscale is not None:
        opts += struct.pack("!BBBB", _OPT_NOP, _OPT_WS, 3, wscale)
    if ts is not None:
        opts += struct.pack("!BBBBII", _OPT_NOP, _OPT_NOP, _OPT_TS, 10, ts[0], ts[1])
    hlen = 20 + len(opts)
    seg = bytearray(
        TCP_HDR.pack(sport, dport, seq, ack, (hlen // 4) << 4, flags, min(wnd, 0xFFFF), pseudo, 0)
    )
    seg += opts
    seg += data
    return seg


def flag_names(flags: int) -> str:
    """``"SYN|ACK"`` for logs and reprs."""
    pairs = ((SYN, "SYN"), (FIN, "FIN"), (RST, "RST"), (PSH, "PSH"), (ACK, "ACK"))
    return "|".join(n for b, n in pairs if flags & b) or "-"
