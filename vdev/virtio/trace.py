"""Virtqueue tracing, sans-IO: the event kinds, the versioned JSON Lines schema, the
:class:`Tracer` that builds events, the payload decoders and the text format.

Theory of operation
-------------------
A trace is a stream of *events*, one JSON object per line (JSON Lines), written by
every process of a run (the kernel and each device process) to one shared file. Every
event carries the same header keys, so a later tool (Perfetto, pcapng, ring replay)
can be derived from the JSONL alone:

======== ==================================================================
key      meaning
======== ==================================================================
``v``    schema version (:data:`SCHEMA_VERSION`)
``ts``   CLOCK_MONOTONIC in nanoseconds (one clock for every process of a host)
``pid``  the process that wrote the event
``kpid`` the kernel's pid (the device's parent; ``null`` if not started by one)
``dev``  the device's name (``vda``, ``eth0``; a device process learns it from its
         environment)
``side`` ``"driver"`` (kernel) or ``"device"``
``q``    the queue index (``null`` for device-wide events)
``kind`` one of :data:`KINDS`
``seq``  the chain's position in the available ring, free-running (not wrapped at 16
         bits), or ``null``
``head`` the chain's head descriptor id, or ``null``
======== ==================================================================

then the kind's own fields (``docs/trace-format.md`` lists them; fields added later,
such as ``add``'s ``ids`` and the net frames' ``frame_hex`` / ``frame_len``, keep
version 1: readers ignore keys they do not know). :mod:`vdev.virtio.trace_formats`
turns a trace into Perfetto JSON, pcapng, statistics and ring views. ``seq`` correlates a
request across processes: the driver assigns it when it adds the chain (the avail
slot it writes, counted from the queue's creation) and the device when it pops it
(its ``last_avail``, extended past 16 bits with its own wrap counter,
:class:`SeqCounter`).

A :class:`Tracer` is bound to one process, one device and one side; it builds events
and hands each encoded line to a ``write`` callable (the I/O is the caller's:
:mod:`hostops.trace` buffers the lines and writes whole lines only). Nothing here reads
a clock or a pid of its own: both are given.

Decoders (:func:`decode_blk_request`, :func:`decode_net_hdr`, :func:`summarize_frame`)
turn payload bytes into small dicts/strings for the ``payload`` field; every length
they use is checked against the bytes present (a truncated frame says so, it never
raises). :func:`decode_line` validates one line of a trace and raises
:class:`TraceFormatError` naming what is wrong; :func:`format_text` renders an event as
one aligned human-readable line.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "FRAME_CAP",
    "KINDS",
    "HEADER_KEYS",
    "TraceFormatError",
    "Tracer",
    "SeqCounter",
    "encode",
    "decode_line",
    "read_events",
    "decode_blk_request",
    "decode_blk_status",
    "decode_net_hdr",
    "summarize_frame",
    "format_text",
    "format_payload",
]

#: Version of the event schema; bumped when a key changes meaning or goes away
#: (adding keys or kinds does not bump it: readers ignore what they do not know).
SCHEMA_VERSION = 1

#: The most frame bytes a net ``add`` / ``reap`` carries in ``frame_hex`` (the whole
#: frame up to 64 KiB, so a TSO super-frame fits; ``frame_len`` is the real length).
FRAME_CAP = 65536

#: Every event kind and what it records (see docs/trace-format.md for the fields).
KINDS: dict[str, str] = {
    "add": "driver added a chain: seq, head, descs [[addr, len, flags]...], indirect, ids, "
    "payload (net tx: frame_hex, frame_len)",
    "publish": "driver published avail.idx: old, new (u16), count",
    "kick": "driver kick decision: sent, old, new, event (avail_event) or no_notify",
    "kick_recv": "device received a kick for the queue",
    "kick_mode": "device wrote its kick suppression (§2.7.10): on, avail_event (EVENT_IDX, "
    "written when on) or flags (used.flags written)",
    "pop": "device popped a chain: seq, head, descs, rlen, wlen",
    "bad_chain": "device rejected a chain: seq, head, error (completed with length 0)",
    "keep": "device kept a chain to complete later (PENDING): seq, head",
    "push": "device pushed a used entry: seq, head, len",
    "irq": "device interrupt decision: sent, old, new, event (used_event) or no_interrupt",
    "irq_recv": "driver took an interrupt for the queue: reaped",
    "irq_mode": "driver wrote its interrupt suppression (§2.7.10): on, used_event (EVENT_IDX, "
    "written when on) or flags (avail.flags written)",
    "reap": "driver reaped a used entry: seq, head, len, lat_ns (since add), payload "
    "(net rx: frame_hex, frame_len)",
    "ctl": "control message: type, fields, reply or error",
    "status": "device status byte changed: old, new, names",
    "config": "configuration-change interrupt (sent by the device / taken by the driver)",
    "proc": "device process start / exit: event, argv or code",
    "ring_broken": "a ring was found broken: why",
    "fail": "the driver failed the device (died, needs reset, broke the rules): error, culprit",
    "recover": "the driver resets or restarts the device: culprit, why",
    "recovered": "the device is back after a reset or restart: restart, pid",
    "lost_irq": "completions found without their interrupt: reaped",
    "fault": "a fault of a fault plan fired (docs/faults.md): name (the action), details "
    "(rule, seq, params, event, fields)",
}

#: The keys every event has, in order.
HEADER_KEYS = ("v", "ts", "pid", "kpid", "dev", "side", "q", "kind", "seq", "head")

_SIDES = ("driver", "device")


class TraceFormatError(ValueError):
    """A line of a trace file is not a valid event (the file's fault)."""


def encode(event: dict[str, Any]) -> str:
    """One event as one JSON line (with its newline)."""
    return json.dumps(event, separators=(",", ":"), default=_default) + "\n"


def _default(obj: object) -> Any:
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).hex()
    if isinstance(obj, int):  # IntEnum / IntFlag
        return int(obj)
    return str(obj)


def decode_line(line: str | bytes) -> dict[str, Any]:
    """Parse and validate one trace line; raises :class:`TraceFormatError` naming the
    problem (not JSON, not an object, a header key missing or of the wrong type)."""
    if isinstance(line, bytes):
        try:
            line = line.decode()
        except UnicodeDecodeError as e:
            raise TraceFormatError(f"not UTF-8: {e}") from None
    if not line.endswith("\n"):
        raise TraceFormatError("truncated line (no newline at the end)")
    try:
        ev = json.loads(line)
    except ValueError as e:
        raise TraceFormatError(f"not JSON: {e}") from None
    if not isinstance(ev, dict):
        raise TraceFormatError(f"not a JSON object: {type(ev).__name__}")
    v = ev.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise TraceFormatError("no schema version 'v'")
    if v > SCHEMA_VERSION:
        raise TraceFormatError(f"schema version {v} is newer than {SCHEMA_VERSION}")
    for key in ("ts", "pid"):
        if not isinstance(ev.get(key), int) or isinstance(ev.get(key), bool):
            raise TraceFormatError(f"{key!r} is not an integer")
    if not isinstance(ev.get("kind"), str):
        raise TraceFormatError("'kind' is not a string")
    if ev.get("side") not in _SIDES:
        raise TraceFormatError(f"'side' is {ev.get('side')!r}, not one of {_SIDES}")
    for key in ("kpid", "q", "seq", "head"):
        val = ev.get(key)
        if val is not None and (not isinstance(val, int) or isinstance(val, bool)):
            raise TraceFormatError(f"{key!r} is not an integer or null")
    if ev.get("dev") is not None and not isinstance(ev.get("dev"), str):
        raise TraceFormatError("'dev' is not a string or null")
    return ev


def read_events(
    lines: Iterable[str | bytes], *, max_events: int | None = None
) -> Iterator[dict[str, Any]]:
    """Decode ``lines``; a bad line raises :class:`TraceFormatError` whose message
    starts with ``line N:``. Blank lines are skipped. At most ``max_events`` events."""
    n = 0
    for number, line in enumerate(lines, 1):
        if max_events is not None and n >= max_events:
            return
        if not line.strip():
            continue
        try:
            yield decode_line(line)
        except TraceFormatError as e:
            raise TraceFormatError(f"line {number}: {e}") from None
        n += 1


class SeqCounter:
    """Extends a 16-bit ring index to a free-running sequence number: feed it every
    index in order (each at most 2**16 - 1 ahead of the previous, which a ring of at
    most 32768 entries guarantees, §2.7) and it counts the wraps."""

    __slots__ = ("_hi", "_low")

    def __init__(self, start: int = 0) -> None:
        self._hi = 0
        self._low = start & 0xFFFF

    @property
    def low(self) -> int:
        """The last 16-bit index fed (the start value before any)."""
        return self._low

    def extend(self, low: int) -> int:
        """The free-running value of 16-bit index ``low``."""
        if low < self._low:
            self._hi += 1
        self._low = low
        return (self._hi << 16) | low


class Tracer:
    """Builds the events of one process, one device, one side and writes each as one
    line through ``write`` (e.g. :meth:`hostops.trace.TraceSink.write`).

    ``clock`` returns nanoseconds (``time.monotonic_ns``); ``pid`` is this process's,
    ``kpid`` the kernel's; ``decode`` turns on payload decoding for ``dev_kind``
    (``"blk"``/``"net"``)."""

    __slots__ = ("write", "clock", "pid", "kpid", "dev", "side", "dev_kind")

    def __init__(
        self,
        write: Callable[[str], None],
        clock: Callable[[], int],
        *,
        pid: int,
        kpid: int | None,
        dev: str | None,
        side: str,
        dev_kind: str | None = None,
    ) -> None:
        if side not in _SIDES:
            raise ValueError(f"side must be one of {_SIDES}")
        self.write = write
        self.clock = clock
        self.pid = pid
        self.kpid = kpid
        self.dev = dev
        self.side = side
        self.dev_kind = dev_kind

    def bind(self, dev: str | None, dev_kind: str | None = None) -> Tracer:
        """A tracer like this one for device ``dev`` (same sink, clock and pids)."""
        return Tracer(
            self.write,
            self.clock,
            pid=self.pid,
            kpid=self.kpid,
            dev=dev,
            side=self.side,
            dev_kind=dev_kind,
        )

    def emit(
        self,
        kind: str,
        q: int | None = None,
        seq: int | None = None,
        head: int | None = None,
        **fields: Any,
    ) -> None:
        """Write one event of ``kind`` with the header keys and ``fields``."""
        ev: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "ts": self.clock(),
            "pid": self.pid,
            "kpid": self.kpid,
            "dev": self.dev,
            "side": self.side,
            "q": q,
            "kind": kind,
            "seq": seq,
            "head": head,
        }
        ev.update(fields)
        self.write(encode(ev))

    def fault(self, name: str, q: int | None = None, **details: Any) -> None:
        """The generic fault-injection hook: record that fault ``name`` happened."""
        self.emit("fault", q, name=name, details=details)


# --------------------------------------------------------------------------- decoders

_BLK_HDR = struct.Struct("<IIQ")  # §5.2.6: type, reserved, sector
_BLK_TYPES = {
    0: "IN",
    1: "OUT",
    4: "FLUSH",
    8: "GET_ID",
    10: "GET_LIFETIME",
    11: "DISCARD",
    13: "WRITE_ZEROES",
    14: "SECURE_ERASE",
}
_BLK_STATUS = {0: "OK", 1: "IOERR", 2: "UNSUPP"}
_DISCARD_SEG = struct.Struct("<QII")  # §5.2.6: sector, num_sectors, flags


def decode_blk_request(header: bytes, data_len: int, segment: bytes = b"") -> dict[str, Any]:
    """A virtio-blk request (§5.2.6) from its 16-byte header, the length of its data
    buffers and (DISCARD / WRITE_ZEROES) its first segment: ``type``, ``sector``,
    ``sectors``. A header shorter than 16 bytes gives ``{"error": ...}``."""
    if len(header) < _BLK_HDR.size:
        return {"error": f"header of {len(header)} bytes, want {_BLK_HDR.size}"}
    rtype, _, sector = _BLK_HDR.unpack_from(header)
    out: dict[str, Any] = {"type": _BLK_TYPES.get(rtype, f"type{rtype}"), "sector": sector}
    if rtype in (11, 13, 14) and len(segment) >= _DISCARD_SEG.size:
        seg_sector, nsect, _ = _DISCARD_SEG.unpack_from(segment)
        out["sector"] = seg_sector
        out["sectors"] = nsect
    else:
        out["sectors"] = data_len // 512  # §5.2.4: sectors are always 512 bytes
    return out


def decode_blk_status(status: bytes) -> str:
    """The name of a virtio-blk status byte (§5.2.6), or ``"?"`` if absent."""
    if not status:
        return "?"
    return _BLK_STATUS.get(status[0], f"status{status[0]}")


_NET_HDR = struct.Struct("<BBHHHHH")  # §5.1.6
_GSO = {0: "none", 1: "tcpv4", 3: "udp", 4: "tcpv6", 5: "udp_l4"}


def decode_net_hdr(data: bytes) -> dict[str, Any]:
    """``struct virtio_net_hdr`` (§5.1.6, 12 bytes with VERSION_1): flags (names),
    gso_type, gso_size, csum_start, csum_offset, num_buffers."""
    if len(data) < _NET_HDR.size:
        return {"error": f"virtio_net_hdr of {len(data)} bytes, want {_NET_HDR.size}"}
    flags, gso, hdr_len, gso_size, cstart, coff, nbufs = _NET_HDR.unpack_from(data)
    names = [n for b, n in ((1, "NEEDS_CSUM"), (2, "DATA_VALID"), (4, "RSC_INFO")) if flags & b]
    gso_name = _GSO.get(gso & 0x7F, f"gso{gso & 0x7F}") + ("|ecn" if gso & 0x80 else "")
    return {
        "flags": names,
        "gso_type": gso_name,
        "hdr_len": hdr_len,
        "gso_size": gso_size,
        "csum_start": cstart,
        "csum_offset": coff,
        "num_buffers": nbufs,
    }


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _ip(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def summarize_frame(frame: bytes) -> str:
    """One line about an Ethernet II frame: ARP, IPv4 with ICMP / UDP / TCP, or the
    ethertype. Every header length is checked against the bytes present (RFC 826,
    RFC 791 §3.1, RFC 792, RFC 768, RFC 9293 §3.1); a short frame says ``truncated``."""
    n = len(frame)
    if n < 14:  # IEEE 802.3: 6 + 6 + 2 header bytes
        return f"truncated ethernet ({n} bytes)"
    etype = int.from_bytes(frame[12:14], "big")
    if etype == 0x0806:
        if n < 14 + 28:  # RFC 826 for Ethernet/IPv4: 28 bytes
            return "ARP truncated"
        op = int.from_bytes(frame[20:22], "big")
        sha, spa = frame[22:28], frame[28:32]
        tpa = frame[38:42]
        if op == 1:
            return f"ARP who-has {_ip(tpa)} tell {_ip(spa)}"
        if op == 2:
            return f"ARP {_ip(spa)} is-at {_mac(sha)}"
        return f"ARP op {op}"
    if etype != 0x0800:
        return f"{_mac(frame[6:12])} > {_mac(frame[0:6])} ethertype {etype:#06x} len {n}"
    ip = frame[14:]
    if len(ip) < 20:  # RFC 791 §3.1: the fixed header is 20 bytes
        return "IPv4 truncated"
    ihl = (ip[0] & 0x0F) * 4
    if ip[0] >> 4 != 4 or ihl < 20 or len(ip) < ihl:
        return f"IPv4 bad header (version/IHL {ip[0]:#04x})"
    total = int.from_bytes(ip[2:4], "big")
    frag = int.from_bytes(ip[6:8], "big")
    ttl, proto = ip[8], ip[9]
    src, dst = _ip(ip[12:16]), _ip(ip[16:20])
    head = f"IPv4 {src} > {dst} ttl {ttl} len {total}"
    off = (frag & 0x1FFF) * 8
    if frag & 0x2000 or off:
        head += f" frag off {off}{' MF' if frag & 0x2000 else ''}"
        if off:
            return head + f" proto {proto}"
    l4 = ip[ihl:]
    if proto == 1:
        if len(l4) < 8:  # RFC 792: type, code, checksum, id, seq
            return head + " ICMP truncated"
        t = l4[0]
        ident = int.from_bytes(l4[4:6], "big")
        seq = int.from_bytes(l4[6:8], "big")
        name = {0: "echo reply", 8: "echo request", 3: "unreachable", 11: "time exceeded"}
        what = name.get(t, f"type {t}")
        if t in (0, 8):
            return head + f" ICMP {what} id {ident} seq {seq}"
        return head + f" ICMP {what} code {l4[1]}"
    if proto == 17:
        if len(l4) < 8:  # RFC 768: an 8-byte header
            return head + " UDP truncated"
        sport = int.from_bytes(l4[0:2], "big")
        dport = int.from_bytes(l4[2:4], "big")
        ulen = int.from_bytes(l4[4:6], "big")
        return head + f" UDP {sport} > {dport} len {max(0, ulen - 8)}"
    if proto == 6:
        if len(l4) < 20:  # RFC 9293 §3.1: a 20-byte header at least
            return head + " TCP truncated"
        sport = int.from_bytes(l4[0:2], "big")
        dport = int.from_bytes(l4[2:4], "big")
        seqn = int.from_bytes(l4[4:8], "big")
        ack = int.from_bytes(l4[8:12], "big")
        doff = (l4[12] >> 4) * 4
        fl = l4[13]
        win = int.from_bytes(l4[14:16], "big")
        flags = "".join(
            c for b, c in ((2, "S"), (1, "F"), (4, "R"), (8, "P"), (16, "."), (32, "U")) if fl & b
        )
        plen = max(0, total - ihl - doff)
        return head + f" TCP {sport} > {dport} [{flags}] seq {seqn} ack {ack} win {win} len {plen}"
    return head + f" proto {proto}"


# --------------------------------------------------------------------------- text

_TEXT_SKIP = set(HEADER_KEYS) | {"payload", "descs", "frame_hex", "ids"}


def format_payload(payload: Any) -> str:
    """The ``payload`` field of an event as text."""
    if not isinstance(payload, dict):
        return ""
    parts: list[str] = []
    blk = payload.get("blk")
    if isinstance(blk, dict):
        if "error" in blk:
            parts.append(f"blk {blk['error']}")
        else:
            parts.append(f"blk {blk.get('type')} sector {blk.get('sector')} x{blk.get('sectors')}")
    if "status" in payload:
        parts.append(f"status {payload['status']}")
    if payload.get("cont"):
        parts.append("(continues the packet above: MRG_RXBUF)")
    hdr = payload.get("net")
    if isinstance(hdr, dict) and "error" not in hdr:
        bits = [",".join(hdr.get("flags") or []) or "-"]
        if hdr.get("gso_type") not in (None, "none"):
            bits.append(f"gso {hdr.get('gso_type')}/{hdr.get('gso_size')}")
        if "NEEDS_CSUM" in (hdr.get("flags") or []):
            bits.append(f"csum {hdr.get('csum_start')}+{hdr.get('csum_offset')}")
        if hdr.get("num_buffers", 1) not in (0, 1):
            bits.append(f"bufs {hdr.get('num_buffers')}")
        parts.append("hdr " + " ".join(bits))
    if isinstance(payload.get("frame"), str):
        parts.append(payload["frame"])
    return " | ".join(parts)


def _descs_text(descs: Any) -> str:
    if not isinstance(descs, list):
        return ""
    out = []
    for d in descs[:8]:
        if isinstance(d, list) and len(d) >= 3:
            a, ln, fl = d[0], d[1], d[2]
            mode = "w" if isinstance(fl, int) and fl & 2 else "r"
            out.append(f"{a:#x}+{ln}{mode}" if isinstance(a, int) else str(d))
    more = f" +{len(descs) - 8}" if len(descs) > 8 else ""
    return "[" + " ".join(out) + more + "]"


def format_text(ev: dict[str, Any], t0: int = 0) -> str:
    """One event as one aligned line: time (ms since ``t0``), pid, device, side, queue,
    kind, seq/head, then the kind's fields and the decoded payload."""
    ts = (ev.get("ts", 0) - t0) / 1e6
    q = ev.get("q")
    qtxt = f"q{q}" if q is not None else "-"
    seq = ev.get("seq")
    head = ev.get("head")
    ids = ""
    if seq is not None:
        ids += f"seq={seq} "
    if head is not None:
        ids += f"head={head}"
    side = "drv" if ev.get("side") == "driver" else "dev"
    fields = " ".join(
        f"{k}={v}" for k, v in ev.items() if k not in _TEXT_SKIP and v is not None and v != ""
    )
    rest = fields
    if "descs" in ev:
        rest = f"{_descs_text(ev['descs'])} {rest}".strip()
    pay = format_payload(ev.get("payload"))
    if pay:
        rest = f"{rest}  {pay}" if rest else pay
    return (
        f"{ts:12.3f} {ev.get('pid', 0):>7} {str(ev.get('dev') or '-'):<6} {side} {qtxt:<3} "
        f"{str(ev.get('kind')):<9} {ids:<20} {rest}"
    ).rstrip()
