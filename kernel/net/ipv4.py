"""IPv4 (RFC 791): the header, fragmentation on send, reassembly on receive.

Theory of operation
-------------------
*Header.* We send 20-byte headers (no options), TTL from the config, a 16-bit
identification from a per-stack counter, DF as the caller asks, and the header checksum
(RFC 791 §3.1). On receive :func:`parse_header` checks, in this order, each check
citing the rule: at least 20 bytes; version 4; IHL >= 5 and within the data; the header
checksum; total length >= IHL*4 and within the data (bytes after it are Ethernet
padding and are cut off). Options are not interpreted but their length is honoured.

*Fragmentation* (RFC 791 §2.3, §3.2 "Fragmentation and Reassembly"): a packet larger
than the interface MTU is cut into fragments whose data is a multiple of 8 bytes (the
fragment offset counts 8-byte units), each with a copy of the header, MF set on all but
the last.

*Reassembly* (RFC 791 §3.2, RFC 815): fragments are keyed by (source, destination,
protocol, identification). Safety first, after RFC 5722 (which says it for IPv6 and
Linux does for IPv4 since 2018): a fragment that overlaps data already received
discards the whole datagram (``ip_frag_overlap``); an exact duplicate is dropped alone
(``ip_frag_duplicate``). Because nothing overlaps, the datagram is complete exactly
when the last fragment (MF clear) fixed the total length and the received byte count
equals it — no hole list needed. The rest are bounds:

* a non-last fragment whose data is not a multiple of 8, an empty fragment, or one
  that ends beyond 65535 - 20 bytes (the total length is 16 bits; "ping of death") is
  dropped (``ip_frag_bad``);
* a second last fragment with another end, or data beyond the end, drops the datagram
  (``ip_frag_inconsistent``);
* at most ``reasm_max_frags`` fragments per datagram (``ip_frag_too_many``);
* all partial datagrams together hold at most ``reasm_max_bytes`` (each fragment is
  charged its data plus :data:`FRAG_OVERHEAD`); a fragment that does not fit evicts
  the oldest datagrams first (``ip_frag_evicted``);
* a datagram not complete ``reasm_timeout_s`` after its first fragment is freed
  (``ip_frag_timeout``).

``ip_frag_bad`` and ``ip_frag_duplicate`` drop one fragment; the other reasons discard
the whole partial datagram and also count ``ip_frag_dropped`` (timeouts count only
``ip_frag_timeout``); completed datagrams count ``ip_frag_reassembled``. The
:class:`Reassembler` runs under the stack lock; its timers take the lock through the
host.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hostops.timers import TimerHandle, TimerHeap
from vdev.virtio.packet import inet_checksum, inet_sum

from .config import StackConfig

__all__ = [
    "IP_HDR",
    "IP_HLEN",
    "IP_DF",
    "IP_MF",
    "IP_OFFMASK",
    "MAX_IP_PAYLOAD",
    "FRAG_OVERHEAD",
    "IpHeader",
    "HeaderError",
    "parse_header",
    "build_header",
    "fragment",
    "Reassembler",
    "ReasmHost",
]

#: ver_ihl, tos, total length, id, flags|fragment offset, ttl, protocol, checksum, src, dst
IP_HDR = struct.Struct("!BBHHHBBHII")
IP_HLEN = 20
IP_DF = 0x4000
IP_MF = 0x2000
IP_OFFMASK = 0x1FFF
#: Largest payload behind a 20-byte header (total length is 16 bits, RFC 791 §3.1).
MAX_IP_PAYLOAD = 0xFFFF - IP_HLEN
#: Bytes charged per held fragment beyond its data (bookkeeping, roughly).
FRAG_OVERHEAD = 128


class HeaderError(ValueError):
    """A received IPv4 header breaks RFC 791; ``counter`` says which stat to bump."""

    def __init__(self, counter: str, message: str) -> None:
        super().__init__(message)
        self.counter = counter


@dataclass(frozen=True, slots=True)
class IpHeader:
    """The fields of a received header the stack uses."""

    ihl: int
    tos: int
    total: int
    ident: int
    flags_frag: int
    ttl: int
    proto: int
    src: int
    dst: int

    @property
    def more_fragments(self) -> bool:
        """MF flag."""
        return bool(self.flags_frag & IP_MF)

    @property
    def frag_offset(self) -> int:
        """Fragment offset in bytes."""
        return (self.flags_frag & IP_OFFMASK) * 8

    @property
    def is_fragment(self) -> bool:
        """MF set or a non-zero offset."""
        return bool(self.flags_frag & (IP_MF | IP_OFFMASK))


def parse_header(data: bytes | memoryview) -> IpHeader:
    """Validate and parse the header at the start of ``data`` (the Ethernet payload);
    :class:`HeaderError` names the broken rule."""
    n = len(data)
    if n < IP_HLEN:  # RFC 791 §3.1: the header is at least 5 words
        raise HeaderError("ip_bad_header", f"{n} bytes is shorter than an IPv4 header")
    ver_ihl, tos, total, ident, ff, ttl, proto, _csum, src, dst = IP_HDR.unpack_from(data)
    if ver_ihl >> 4 != 4:  # RFC 791 §3.1 Version
        raise HeaderError("ip_bad_header", f"IP version {ver_ihl >> 4}")
    ihl = (ver_ihl & 0x0F) * 4
    if ihl < IP_HLEN or ihl > n:  # RFC 791 §3.1 IHL: >= 5 words, inside the packet
        raise HeaderError("ip_bad_header", f"IHL {ihl // 4} with {n} bytes")
    if inet_sum(data[:ihl]) % 0xFFFF:  # RFC 791 §3.1 Header Checksum (sum is all ones)
        raise HeaderError("ip_bad_checksum", "bad IPv4 header checksum")
    if total < ihl or total > n:  # RFC 791 §3.1 Total Length: header..what arrived
        raise HeaderError("ip_bad_header", f"total length {total} with IHL {ihl}, {n} bytes")
    return IpHeader(ihl, tos, total, ident, ff, ttl, proto, src, dst)


def build_header(
    src: int,
    dst: int,
    proto: int,
    payload_len: int,
    ident: int,
    ttl: int,
    tos: int = 0,
    flags_frag: int = 0,
) -> bytearray:
    """A 20-byte IPv4 header with its checksum."""
    h = bytearray(
        IP_HDR.pack(0x45, tos, IP_HLEN + payload_len, ident, flags_frag, ttl, proto, 0, src, dst)
    )
    struct.pack_into("!H", h, 10, inet_checksum(h))
    return h


def fragment(header: bytes | bytearray, payload: bytes | bytearray, mtu: int) -> list[bytes]:
    """Cut one packet (``header`` of 20 bytes, no options) into fragments that fit
    ``mtu``, each a complete IP packet (RFC 791 §3.2: data in multiples of 8 bytes,
    MF on all but the last, offsets in 8-byte units)."""
    per = (mtu - IP_HLEN) & ~7
    if per <= 0:
        raise ValueError(f"MTU {mtu} cannot carry a fragment")
    ver_ihl, tos, _t, ident, ff, ttl, proto, _c, src, dst = IP_HDR.unpack_from(header)
    base = ff & IP_OFFMASK
    last_mf = ff & IP_MF
    flags = ff & IP_DF
    n = len(payload)
    out: list[bytes] = []
    mv = memoryview(payload)
    for off in range(0, n, per):  # bounded: n / per <= 65535 / 48 iterations
        chunk = mv[off : off + per]
        mf = IP_MF if off + per < n else last_mf
        h = build_header(
            src, dst, proto, len(chunk), ident, ttl, tos, flags | mf | (base + off // 8)
        )
        out.append(bytes(h) + chunk)
    return out


class ReasmHost(Protocol):
    """What a :class:`Reassembler` needs from the stack."""

    @property
    def timers(self) -> TimerHeap:
        """The kernel's timer heap."""
        ...

    @property
    def config(self) -> StackConfig:
        """The tunables."""
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add to a counter."""
        ...

    def run_locked(self, fn: Callable[[list[Callable[[], None]]], None]) -> None:
        """Run ``fn(out)`` under the stack lock."""
        ...


class _Partial:
    __slots__ = ("starts", "ends", "data", "total", "received", "charged", "header", "timer")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.data: list[bytes] = []
        self.total = -1
        self.received = 0
        self.charged = 0
        self.header: bytes | None = None
        self.timer: TimerHandle | None = None


Key = tuple[int, int, int, int]


class Reassembler:
    """Partial datagrams (see the module docstring)."""

    def __init__(self, host: ReasmHost) -> None:
        self._host = host
        self._table: dict[Key, _Partial] = {}  # insertion order = age
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._table)

    @property
    def bytes_held(self) -> int:
        """Bytes charged for all partial datagrams."""
        return self._bytes

    def add(self, hdr: IpHeader, header: bytes, data: bytes) -> tuple[bytes, bytes] | None:
        """Take one fragment (``header`` its IP header bytes, ``data`` its payload);
        returns ``(first fragment's header, whole payload)`` when the datagram is
        complete, else None."""
        host, cfg = self._host, self._host.config
        start = hdr.frag_offset
        end = start + len(data)
        mf = hdr.more_fragments
        # RFC 791 §3.2: every fragment but the last carries a multiple of 8 bytes; a
        # datagram is at most 65535 bytes including a header of at least 20.
        if not data or (mf and len(data) % 8) or end > MAX_IP_PAYLOAD:
            host.count("ip_frag_bad")
            return None
        key = (hdr.src, hdr.dst, hdr.proto, hdr.ident)
        p = self._table.get(key)
        if p is None:
            p = _Partial()
            self._table[key] = p
            p.timer = host.timers.call_later(
                cfg.reasm_timeout_s, lambda: host.run_locked(lambda out: self._expire(key, p))
            )
        if not mf:
            if (p.total >= 0 and p.total != end) or (p.ends and p.ends[-1] > end):
                self._discard(key, p, "ip_frag_inconsistent")
                return None
            p.total = end
        elif p.total >= 0 and end > p.total:
            self._discard(key, p, "ip_frag_inconsistent")
            return None
        i = bisect.bisect_left(p.starts, start)
        if i < len(p.starts) and p.starts[i] == start and p.ends[i] == end:
            host.count("ip_frag_duplicate")  # an exact copy: drop it alone
            return None
        # RFC 5722 §4 (the rule, applied to IPv4): any overlap discards the datagram.
        if (i > 0 and p.ends[i - 1] > start) or (i < len(p.starts) and p.starts[i] < end):
            self._discard(key, p, "ip_frag_overlap")
            return None
        if len(p.starts) >= cfg.reasm_max_frags:
            self._discard(key, p, "ip_frag_too_many")
            return None
        charge = len(data) + FRAG_OVERHEAD
        while self._bytes + charge > cfg.reasm_max_bytes:  # bounded by the table size
            oldest_key, oldest = next(iter(self._table.items()))
            self._discard(oldest_key, oldest, "ip_frag_evicted")
            if oldest is p:
                return None
        p.starts.insert(i, start)
        p.ends.insert(i, end)
        p.data.insert(i, data)
        p.received += len(data)
        p.charged += charge
        self._bytes += charge
        if start == 0:
            p.header = bytes(header)
        if p.total >= 0 and p.received == p.total:
            # no overlaps, all inside [0, total): the byte count says it is whole
            self._remove(key, p)
            host.count("ip_frag_reassembled")
            assert p.header is not None
            return p.header, b"".join(p.data)
        return None

    def clear(self) -> None:
        """Free everything (at stack close)."""
        for p in self._table.values():
            if p.timer is not None:
                p.timer.cancel()
        self._table.clear()
        self._bytes = 0

    def _remove(self, key: Key, p: _Partial) -> None:
        if self._table.get(key) is p:
            del self._table[key]
            self._bytes -= p.charged
            if p.timer is not None:
                p.timer.cancel()

    def _discard(self, key: Key, p: _Partial, why: str) -> None:
        self._remove(key, p)
        self._host.count(why)
        self._host.count("ip_frag_dropped")

    def _expire(self, key: Key, p: _Partial) -> None:
        if self._table.get(key) is p:
            self._remove(key, p)
            self._host.count("ip_frag_timeout")
