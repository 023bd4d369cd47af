"""What a virtqueue trace becomes, sans-IO: Perfetto / Chrome Trace Event JSON, pcapng
of the virtio-net frames, per-queue statistics and the ring reconstructed at any event.

Theory of operation
-------------------
Everything here takes the decoded events of a trace (:func:`vdev.virtio.trace.read_events`,
put in time order by :func:`sort_events`) and returns a value: a dict to dump as JSON,
the bytes of a pcapng file, a statistics dict, the rings at an event. Nothing reads a
file or a clock. Every event field used is checked for its type first; an event that
lacks what a format needs is left out of that format (it is still a valid event: fields
may be added later, :data:`~vdev.virtio.trace.SCHEMA_VERSION` stays 1).

*Perfetto* (:func:`to_perfetto`, the Trace Event format that ui.perfetto.dev and
chrome://tracing open): one process track per writing pid (the kernel, each device
process) named from the events, one thread track per (device, queue) in that process;
every event is a complete slice (``ph: X``) on its thread; every request is an async
slice (``b``/``e``, ``cat: request``) from its ``add`` to its ``reap``; flow arrows
(``s``/``f``, ``bp: e``) go from the ``publish`` that made a chain visible to its
``pop`` in the device process, and from the ``push`` to its ``reap``; a counter track
per queue holds the ring occupancy (chains published and not yet used). Times are in
microseconds (fractions keep the nanoseconds). :func:`perfetto_json` is the text to
write; :func:`check_perfetto` checks a text against every condition under which
Perfetto's JSON importer fails or counts a problem (docs/trace-format.md lists them).

*pcapng* (:func:`to_pcapng`, draft-ietf-opsawg-pcapng): a Section Header Block, one
Interface Description Block (LINKTYPE_ETHERNET, nanosecond timestamps) per (device,
queue) that carried frames, and one Enhanced Packet Block per frame: transmit frames
from the driver's ``add`` (outbound), received frames from its ``reap`` (inbound; the
buffers of a MRG_RXBUF packet are joined), each with ``opt_comment`` holding the
virtio-net header and the request's seq/head/descriptor ids. The frame bytes come from
the events' ``frame_hex`` (at most :data:`~vdev.virtio.trace.FRAME_CAP` bytes;
``frame_len`` is the original length).

*Statistics* (:func:`queue_stats`): per queue the requests, completions, add→reap
latency percentiles (nearest rank), kicks and interrupts sent / suppressed and per
request, and an occupancy histogram (published − used, sampled at every publish and
push, in power-of-two buckets).

*Ring reconstruction* (:func:`ring_steps`, :class:`RingState`): each event of one queue
becomes a list of writes (:data:`Op`) to a model of the split virtqueue (§2.7): the
descriptor table (from ``add``'s ``descs`` and ``ids``; an indirect chain takes one
descriptor pointing at its table), the available ring (slot ``seq mod size``, avail.idx
from ``publish``), the used ring (one slot per ``push``, in the device's order), the
device's last-seen avail index (``pop`` / ``bad_chain``), the driver's last-seen used
index (``reap``), and the event indices and flags words as each side writes them
(``kick_mode``: the device's avail_event / used.flags; ``irq_mode``: the driver's
used_event / avail.flags; a trace without them falls back to what the other side last
read: ``kick``'s ``event`` is avail_event, ``irq``'s is used_event).
``SET_VRING_NUM`` starts the queue over with its size. Applying the writes in order
gives the rings after any event; :func:`render_ring` draws them as text and
:func:`ring_html` as one self-contained HTML page whose slider replays the same writes.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from .trace import format_text

__all__ = [
    "Op",
    "sort_events",
    "queue_key",
    "to_perfetto",
    "perfetto_json",
    "check_perfetto",
    "to_pcapng",
    "queue_stats",
    "format_stats",
    "RingState",
    "ring_steps",
    "render_ring",
    "ring_html",
    "PCAPNG_SHB",
    "PCAPNG_IDB",
    "PCAPNG_EPB",
    "LINKTYPE_ETHERNET",
]

#: One write to the ring model: ``(what, *values)`` (see :meth:`RingState.apply`).
Op = tuple[Any, ...]

PCAPNG_SHB = 0x0A0D0D0A  # Section Header Block
PCAPNG_IDB = 0x00000001  # Interface Description Block
PCAPNG_EPB = 0x00000006  # Enhanced Packet Block
LINKTYPE_ETHERNET = 1
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_COMMENT = 0, 1
_IF_NAME, _IF_TSRESOL = 2, 9
_EPB_FLAGS = 2
_INBOUND, _OUTBOUND = 1, 2  # epb_flags bits 0-1
_SNAPLEN = 262144
_MAX_DESCS = 1 << 16  # a chain never has more (§2.7.5.3.1: an indirect table's bound)
_U32 = 0xFFFFFFFF


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def sort_events(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events in time order (ties keep their file order)."""
    return sorted(events, key=lambda e: e["ts"])


def queue_key(ev: dict[str, Any]) -> str:
    """The name of an event's queue as the tools print it: ``vda:0``."""
    return f"{ev.get('dev') or '-'}:{ev.get('q')}"


# --------------------------------------------------------------------------- Perfetto


def to_perfetto(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The trace as a Chrome Trace Event JSON object (``{"traceEvents": [...]}``)."""
    out: list[dict[str, Any]] = []
    tids: dict[tuple[int, str | None, int | None], int] = {}
    pnames: dict[int, str] = {}

    def us(ts: int) -> float:
        return ts / 1000.0

    def tid_of(ev: dict[str, Any]) -> int:
        key = (ev["pid"], ev.get("dev"), ev.get("q"))
        if key not in tids:
            tids[key] = len(tids) + 1
        return tids[key]

    for ev in events:
        pid = ev["pid"]
        if pid not in pnames:
            if ev["side"] == "driver":
                pnames[pid] = f"kernel {pid}"
            else:
                pnames[pid] = f"{ev.get('dev') or 'device'} device {pid}"
    # the complete slices: one per event, as long as the gap to the next on its thread
    by_thread: dict[int, list[dict[str, Any]]] = {}
    for ev in events:
        by_thread.setdefault(tid_of(ev), []).append(ev)
    slice_at: dict[int, tuple[int, float]] = {}  # id(ev) -> (tid, ts in µs)
    for tid, evs in by_thread.items():
        for i, ev in enumerate(evs):
            nxt = evs[i + 1]["ts"] if i + 1 < len(evs) else ev["ts"] + 1000
            dur = max(0, min(1000, nxt - ev["ts"]))
            args = {k: v for k, v in ev.items() if k not in ("v", "ts", "pid", "kind")}
            args.pop("frame_hex", None)
            out.append(
                {
                    "name": ev["kind"],
                    "cat": "virtqueue",
                    "ph": "X",
                    "ts": us(ev["ts"]),
                    "dur": dur / 1000.0,
                    "pid": ev["pid"],
                    "tid": tid,
                    "args": args,
                }
            )
            slice_at[id(ev)] = (tid, us(ev["ts"]))
    # requests: async slices add -> reap; flows publish -> pop and push -> reap
    adds: dict[tuple[Any, ...], dict[str, Any]] = {}
    publishes: dict[tuple[Any, ...], dict[str, Any]] = {}
    pops: dict[tuple[Any, ...], dict[str, Any]] = {}
    pushes: dict[tuple[Any, ...], dict[str, Any]] = {}
    open_req: dict[tuple[Any, ...], int] = {}
    next_id = 1
    last_ts = events[-1]["ts"] if events else 0
    occupancy: dict[tuple[Any, ...], list[int]] = {}

    def flow(src: dict[str, Any], dst: dict[str, Any], name: str) -> None:
        nonlocal next_id
        if src["ts"] > dst["ts"]:
            return  # an arrow back in time: Perfetto would count an end without a start
        fid, next_id = next_id, next_id + 1
        stid, sts = slice_at[id(src)]
        dtid, dts = slice_at[id(dst)]
        base = {"name": name, "cat": "flow", "id": fid}
        out.append({**base, "ph": "s", "ts": sts, "pid": src["pid"], "tid": stid})
        out.append({**base, "ph": "f", "bp": "e", "ts": dts, "pid": dst["pid"], "tid": dtid})

    def count(ev: dict[str, Any], qk: tuple[Any, ...], pub: int, used: int) -> None:
        occ = occupancy.setdefault(qk, [0, 0])
        occ[0] += pub
        occ[1] += used
        kpid = _int(ev.get("kpid"))
        pid = kpid if kpid is not None and 0 < kpid <= _U32 else ev["pid"]
        pnames.setdefault(pid, f"kernel {pid}")  # every process track has a name
        out.append(
            {
                "name": f"{ev.get('dev')} q{ev.get('q')} occupancy",
                "ph": "C",
                "ts": us(ev["ts"]),
                "pid": pid,
                "tid": 0,
                "args": {"in_flight": max(0, occ[0] - occ[1])},
            }
        )

    for ev in events:
        kind = ev["kind"]
        qk = (ev.get("kpid"), ev.get("dev"), ev.get("q"))
        seq = _int(ev.get("seq"))
        if kind == "add" and seq is not None:
            key = (*qk, seq)
            adds[key] = ev
            rid, next_id = next_id, next_id + 1
            open_req[key] = rid
            out.append(
                {
                    "name": f"{ev.get('dev')} q{ev.get('q')} request",
                    "cat": "request",
                    "ph": "b",
                    "id": rid,
                    "ts": us(ev["ts"]),
                    "pid": ev["pid"],
                    "tid": slice_at[id(ev)][0],
                    "args": {"seq": seq, "head": ev.get("head")},
                }
            )
        elif kind == "publish":
            first, n = _int(ev.get("first_seq")), _int(ev.get("count"))
            if first is not None and n is not None and 0 < n <= 1 << 16:
                for s in range(first, first + n):
                    publishes[(*qk, s)] = ev
                count(ev, qk, n, 0)
        elif kind in ("pop", "bad_chain") and seq is not None:
            key = (*qk, seq)
            pops[key] = ev
            src = publishes.get(key)
            if src is None or src["ts"] > ev["ts"]:
                # the driver stamps its publish after the store that let the device
                # pop: an arrow must not go back in time (Perfetto would drop it),
                # so it starts at the add, which is always stamped before
                src = adds.get(key)
            if src is not None:
                flow(src, ev, "publish→pop")
        elif kind == "push" and seq is not None:
            pushes[(*qk, seq)] = ev
            count(ev, qk, 0, 1)
        elif kind == "reap" and seq is not None:
            key = (*qk, seq)
            src = pushes.pop(key, None)
            pop = pops.pop(key, None)
            if src is None or src["ts"] > ev["ts"]:
                src = pop  # the push was stamped after the driver reaped it: from the pop
            if src is not None:
                flow(src, ev, "push→reap")
            rid_done = open_req.pop(key, None)
            add = adds.pop(key, None)
            if rid_done is not None and add is not None:
                out.append(
                    {
                        "name": f"{add.get('dev')} q{add.get('q')} request",
                        "cat": "request",
                        "ph": "e",
                        "id": rid_done,
                        "ts": us(ev["ts"]),
                        "pid": add["pid"],
                        "tid": slice_at[id(add)][0],
                        "args": {"len": ev.get("len")},
                    }
                )
    for key, rid in open_req.items():  # still in flight when the trace ends
        add = adds[key]
        out.append(
            {
                "name": f"{add.get('dev')} q{add.get('q')} request",
                "cat": "request",
                "ph": "e",
                "id": rid,
                "ts": us(last_ts),
                "pid": add["pid"],
                "tid": slice_at[id(add)][0],
                "args": {"unfinished": True},
            }
        )
    meta: list[dict[str, Any]] = []
    for pid, name in pnames.items():
        meta.append(
            {
                "name": "process_name",
                "ph": "M",
                "ts": 0,
                "pid": pid,
                "tid": 0,
                "args": {"name": name},
            }
        )
    for (pid, dev, q), tid in tids.items():
        tname = f"{dev or '-'} q{q}" if q is not None else f"{dev or '-'}"
        meta.append(
            {
                "name": "thread_name",
                "ph": "M",
                "ts": 0,
                "pid": pid,
                "tid": tid,
                "args": {"name": tname},
            }
        )
    # no "displayTimeUnit": Perfetto ignores it and counts it (json_display_time_unit)
    return {"traceEvents": meta + out}


_SURROGATE_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def perfetto_json(events: Sequence[dict[str, Any]]) -> str:
    """:func:`to_perfetto` as the JSON text to write (ASCII, one line): a character
    outside the Basic Multilingual Plane or a lone surrogate in any string (a frame
    summary, a control message's field) becomes U+FFFD, because Perfetto's JSON parser
    refuses ``\\uD800``-``\\uDFFF`` escapes and fails the whole import."""
    text = json.dumps(to_perfetto(events), separators=(",", ":"))
    return _SURROGATE_ESCAPE.sub(r"\1\\ufffd", text)


#: Trace Event phases the Perfetto importer handles (json_trace_parser.cc).
_PHASES = frozenset("BEXbenIiRCMstfTP")
_MAX_DEPTH = 512  # slice_tracker.h: deeper slices are dropped (slice_max_depth_exceeded)


def _ts_ns(value: Any) -> int | None:
    """A Trace Event time in µs as the importer turns it into ns (an integral value
    times 1000, else rounded), or None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return int(value) * 1000 if value == int(value) else round(value * 1000)
    return value * 1000


def check_perfetto(text: str) -> list[str]:
    """Every condition under which Perfetto's JSON importer fails a trace or counts a
    problem (an error, data-loss or info stat), checked on ``text``; returns one
    message per problem found (at most 50), empty when the trace imports cleanly.
    docs/trace-format.md lists the conditions and the importer sources they come from.
    """
    problems: list[str] = []

    def bad(msg: str) -> None:
        if len(problems) < 50:
            problems.append(msg)

    start = text.lstrip()[:1]
    if start != "{":
        return [f'the file must be a JSON object {{"traceEvents": [...]}}, not {start!r}']
    if _SURROGATE_ESCAPE.search(text):
        bad("a \\u escape of a surrogate: the importer's string parser fails the import")
    try:
        doc = json.loads(text)
    except ValueError as e:  # incomplete, trailing data, bad syntax
        return [f"not one complete JSON document: {e}"]
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return ["no traceEvents array"]
    if "displayTimeUnit" in doc:
        bad("displayTimeUnit is set: counted as json_display_time_unit (and ignored)")
    if "systemTraceEvents" in doc and not isinstance(doc["systemTraceEvents"], str):
        bad("systemTraceEvents is not a string")
    order: list[tuple[int, int, int, dict[str, Any]]] = []
    for i, ev in enumerate(doc["traceEvents"]):
        where = f"traceEvents[{i}]"
        if not isinstance(ev, dict):
            bad(f"{where}: not an object")
            continue
        if not ev:
            continue  # {} is skipped silently
        ph = ev.get("ph")
        if not isinstance(ph, str) or not ph:
            bad(f"{where}: no ph (json_tokenizer_failure)")
            continue
        ph = ph[0]
        if ph not in _PHASES:
            bad(f"{where}: phase {ph!r} is not one the importer handles")
            continue
        ts = _ts_ns(ev.get("ts"))
        if ts is None and ph != "M":
            bad(f"{where}: ts is not a number (json_tokenizer_failure)")
            continue
        if ts is not None and ts < 0:
            bad(f"{where}: negative ts")
        for key in ("dur", "tts", "tdur"):
            if key in ev and _ts_ns(ev[key]) is None:
                bad(f"{where}: {key} is not a number (json_tokenizer_failure)")
        for key in ("pid", "tid"):
            v = ev.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _U32:
                bad(f"{where}: {key} {v!r} is not an integer in 0..2^32-1 (it becomes 0)")
        if "args" in ev and not isinstance(ev["args"], dict):
            bad(f"{where}: args is not an object")
        if "bind_id" in ev and not (ev.get("flow_in") is True or ev.get("flow_out") is True):
            bad(f"{where}: bind_id without flow_in / flow_out (flow_without_direction)")
        if ph == "X":
            if _ts_ns(ev.get("dur")) is None:
                bad(f"{where}: X without dur (json_parser_failure)")
                continue
            if ev["dur"] < 0:
                bad(f"{where}: negative dur (slice_negative_duration)")
                continue
        # the order the importer parses in: by ts, then E first and X longest first
        # (the sorter's slow mode, on as soon as the trace has an X), then file order
        if ph == "E":
            rank = -(1 << 62)
        elif ph == "X":
            rank = -(_ts_ns(ev["dur"]) or 0)
        else:
            rank = 0
        order.append((ts or 0, rank, i, ev))
    order.sort(key=lambda t: t[:3])
    stacks: dict[tuple[Any, Any], list[list[Any]]] = {}  # thread -> [start, end, name]
    async_open: dict[tuple[Any, ...], int] = {}
    flows_begun: set[tuple[Any, ...]] = set()
    flows_ended: set[tuple[Any, ...]] = set()
    named_pids: set[Any] = set()
    named_threads: set[tuple[Any, Any]] = set()
    used: set[tuple[Any, Any]] = set()
    for ts, _, i, ev in order:
        where = f"traceEvents[{i}] ({ev.get('ph')} {ev.get('name')!r})"
        ph = ev["ph"][0]
        pid, tid = ev.get("pid"), ev.get("tid")
        thread = (pid, tid if tid else pid)  # tid 0 means the process's main thread
        raw_args = ev.get("args")
        args: dict[str, Any] = raw_args if isinstance(raw_args, dict) else {}
        if ph == "M":
            name = ev.get("name")
            if name in ("process_name", "thread_name"):
                if not isinstance(args.get("name"), str) or not args.get("name"):
                    bad(f"{where}: args.name is not a non-empty string (json_parser_failure)")
                elif name == "process_name":
                    named_pids.add(pid)
                else:
                    named_threads.add(thread)
            elif name in ("process_sort_index", "thread_sort_index"):
                if _ts_ns(args.get("sort_index")) is None:
                    bad(f"{where}: sort_index is not a number (json_parser_failure)")
            continue
        if ph in "XBEiIR":
            used.add(thread)
        if ph == "X":
            dur = _ts_ns(ev["dur"]) or 0
            stack = stacks.setdefault(thread, [])
            while stack:  # slice_tracker.cc MaybeCloseStack: pop what ended before
                top_start, top_end, top_name = stack[-1]
                if top_end < ts or (top_end == ts and not (top_end == top_start and dur == 0)):
                    stack.pop()
                    continue
                if ts + dur > top_end:
                    bad(
                        f"{where}: overlaps {top_name!r} at {top_start} ns on its thread "
                        "without nesting (slice_spill_overlapping_complete_event)"
                    )
                break
            if len(stack) >= _MAX_DEPTH:
                bad(f"{where}: slices nested deeper than 512 (slice_max_depth_exceeded)")
            stack.append([ts, ts + dur, ev.get("name")])
        elif ph in "ben":
            cookie, id2 = ev.get("id"), ev.get("id2")
            if cookie is None and isinstance(id2, dict):
                cookie = id2.get("local", id2.get("global"))
            if "pid" not in ev or cookie is None:
                bad(f"{where}: async event without pid or id (json_parser_failure)")
                continue
            akey = (pid, ev.get("cat"), ev.get("name"), str(cookie))
            if ph == "b":
                if akey in async_open:
                    bad(f"{where}: async slice begun twice while open")
                async_open[akey] = ts
            elif ph == "e":
                if akey not in async_open:
                    bad(f"{where}: async end without a begin of the same name, cat and id")
                else:
                    async_open.pop(akey)
        elif ph in "stf":
            fid = ev.get("id")
            if isinstance(fid, str):
                try:
                    fid = int(fid, 16)
                except ValueError:
                    fid = None
            if isinstance(fid, bool) or not isinstance(fid, int) or fid < 0:
                bad(f"{where}: flow id is not a number or hex string (flow_invalid_id)")
                continue
            fkey = (fid, ev.get("cat"), ev.get("name"))
            if ph == "s":
                if fkey in flows_begun:
                    bad(f"{where}: flow id begun twice (flow_duplicate_id)")
                flows_begun.add(fkey)
            elif fkey not in flows_begun:
                stat = "flow_end_without_start" if ph == "f" else "flow_step_without_start"
                bad(f"{where}: flow {'end' if ph == 'f' else 'step'} before its start ({stat})")
            elif ph == "f":
                if fkey in flows_ended:
                    bad(f"{where}: flow id ended twice")
                flows_ended.add(fkey)
            if ph == "f" and ev.get("bp") != "e":
                bad(f"{where}: flow end without bp 'e' binds to the next slice, not its own")
            stack = stacks.get(thread) or []
            if not stack or not stack[-1][0] <= ts <= stack[-1][1]:
                bad(f"{where}: no slice encloses the flow on its thread (flow_no_enclosing_slice)")
        elif ph == "C":
            values = list(args.values())
            if not values:
                bad(f"{where}: counter without args (json_parser_failure)")
            for v in values:
                if _ts_ns(v) is None and not (isinstance(v, str) and _is_number(v)):
                    bad(f"{where}: counter value {v!r} is not a number (json_parser_failure)")
            used.add((pid, pid))
        elif ph in "iIR":
            scope = ev.get("s", "t")
            if scope not in ("g", "p", "t"):
                bad(f"{where}: instant scope {scope!r} (json_parser_failure)")
        elif ph == "T" and _ts_ns(ev.get("dur")) is None:
            bad(f"{where}: thread state without dur (json_parser_failure)")
    for akey in list(async_open)[:5]:
        bad(f"async slice {akey} never ends (shown as not finished)")
    for fkey in list(flows_begun - flows_ended)[:5]:
        bad(f"flow {fkey} has no end")
    for thread in sorted(used - named_threads, key=str)[:5]:
        if thread[0] != thread[1]:
            bad(f"thread {thread} has no thread_name")
    for pid in sorted({p for p, _ in used} - named_pids, key=str)[:5]:
        bad(f"process {pid} has no process_name")
    return problems


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- pcapng


def _block(btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _frame_bytes(ev: dict[str, Any]) -> bytes | None:
    hx = ev.get("frame_hex")
    if not isinstance(hx, str):
        return None
    try:
        return bytes.fromhex(hx)
    except ValueError:
        return None


def _hdr_comment(payload: Any) -> str:
    hdr = payload.get("net") if isinstance(payload, dict) else None
    if not isinstance(hdr, dict) or "error" in hdr:
        return "virtio_net_hdr ?"
    return (
        f"virtio_net_hdr flags={','.join(hdr.get('flags') or []) or '-'} "
        f"gso={hdr.get('gso_type')}/{hdr.get('gso_size')} hdr_len={hdr.get('hdr_len')} "
        f"csum={hdr.get('csum_start')}+{hdr.get('csum_offset')} "
        f"num_buffers={hdr.get('num_buffers')}"
    )


def to_pcapng(events: Sequence[dict[str, Any]]) -> bytes:
    """The virtio-net frames of the trace as a pcapng file (see the module docstring).
    A trace without frames gives a file with a section header only."""
    shb_opts = _option(_OPT_COMMENT, b"virtio-lab trace") + _option(_OPT_END, b"")
    parts = [
        _block(
            PCAPNG_SHB,
            struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + shb_opts,
        )
    ]
    ifaces: dict[tuple[Any, ...], int] = {}
    pending: dict[tuple[Any, ...], list[Any]] = {}  # rx packet being joined (MRG_RXBUF)

    def iface(ev: dict[str, Any]) -> int:
        key = (ev.get("kpid"), ev.get("dev"), ev.get("q"))
        if key not in ifaces:
            ifaces[key] = len(ifaces)
            direction = "rx" if ev["kind"] == "reap" else "tx"
            name = f"{ev.get('dev') or '-'} q{ev.get('q')} {direction}".encode()
            opts = _option(_IF_NAME, name) + _option(_IF_TSRESOL, bytes([9]))
            opts += _option(_OPT_END, b"")
            body = struct.pack("<HHI", LINKTYPE_ETHERNET, 0, _SNAPLEN) + opts
            parts.append(_block(PCAPNG_IDB, body))
        return ifaces[key]

    def packet(ev: dict[str, Any], data: bytes, orig: int, flags: int, comment: str) -> None:
        ifid = iface(ev)
        ts = ev["ts"]
        data = data[:_SNAPLEN]
        body = struct.pack(
            "<IIIII",
            ifid,
            (ts >> 32) & 0xFFFFFFFF,
            ts & 0xFFFFFFFF,
            len(data),
            max(orig, len(data)),
        )
        body += data + b"\0" * (-len(data) % 4)
        body += _option(_OPT_COMMENT, comment.encode())
        body += _option(_EPB_FLAGS, struct.pack("<I", flags)) + _option(_OPT_END, b"")
        parts.append(_block(PCAPNG_EPB, body))

    def flush(key: tuple[Any, ...]) -> None:
        p = pending.pop(key, None)
        if p is not None:
            ev, chunks, orig, ids, _ = p
            comment = f"{ev.get('dev')} q{ev.get('q')} rx {ids} {_hdr_comment(ev.get('payload'))}"
            packet(ev, b"".join(chunks), orig, _INBOUND, comment)

    for ev in events:
        kind = ev["kind"]
        if ev["side"] != "driver" or kind not in ("add", "reap"):
            continue
        data = _frame_bytes(ev)
        if data is None:
            continue
        orig = _int(ev.get("frame_len"))
        orig = len(data) if orig is None else orig
        ids = f"seq={ev.get('seq')} head={ev.get('head')}"
        if isinstance(ev.get("ids"), list):
            ids += f" ids={ev['ids']}"
        if kind == "add":
            packet(
                ev,
                data,
                orig,
                _OUTBOUND,
                f"{ev.get('dev')} q{ev.get('q')} tx {ids} {_hdr_comment(ev.get('payload'))}",
            )
            continue
        key = (ev.get("kpid"), ev.get("dev"), ev.get("q"))
        payload = ev.get("payload")
        if isinstance(payload, dict) and payload.get("cont"):
            p = pending.get(key)
            if p is not None:
                p[1].append(data)
                p[2] += orig
                p[3] += f" +{ev.get('seq')}"
                p[4] -= 1
                if p[4] <= 0:
                    flush(key)
            continue
        flush(key)
        hdr = payload.get("net") if isinstance(payload, dict) else None
        nbufs = _int(hdr.get("num_buffers")) if isinstance(hdr, dict) else None
        pending[key] = [ev, [data], orig, ids, (nbufs or 1) - 1]
        if (nbufs or 1) <= 1:
            flush(key)
    for key in list(pending):
        flush(key)
    return b"".join(parts)


# --------------------------------------------------------------------------- stats


def _percentile(sorted_vals: list[int], p: float) -> int | None:
    if not sorted_vals:
        return None
    rank = max(1, -(-len(sorted_vals) * p // 100))  # nearest rank
    return sorted_vals[int(rank) - 1]


def _bucket(n: int) -> str:
    if n <= 1:
        return str(n)
    lo = 1 << (n.bit_length() - 1)
    return f"{lo}-{2 * lo - 1}"


def queue_stats(events: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per queue (``"vda:0"``; prefixed ``"KPID/"`` when the trace holds several
    kernels): ``requests``, ``completions``, ``latency_ns`` (p50/p90/p99/max),
    ``kicks_sent``, ``kicks_suppressed``, ``kicks_per_request``, ``interrupts_sent`` /
    ``interrupts_suppressed`` (device decisions), ``interrupts`` (taken by the driver),
    ``interrupts_per_request``, ``occupancy`` (bucket → samples)."""
    kpids = {e.get("kpid") for e in events if e.get("q") is not None}
    raw: dict[str, dict[str, Any]] = {}
    for ev in events:
        q = ev.get("q")
        if q is None:
            continue
        name = queue_key(ev)
        if len(kpids) > 1:
            name = f"{ev.get('kpid')}/{name}"
        s = raw.get(name)
        if s is None:
            s = raw[name] = {
                "requests": 0,
                "completions": 0,
                "lat": [],
                "kicks_sent": 0,
                "kicks_suppressed": 0,
                "interrupts_sent": 0,
                "interrupts_suppressed": 0,
                "interrupts": 0,
                "published": 0,
                "used": 0,
                "occupancy": {},
            }
        kind = ev["kind"]
        sample = False
        if kind == "add":
            s["requests"] += 1
        elif kind == "reap" and ev.get("seq") is not None:
            s["completions"] += 1
            lat = _int(ev.get("lat_ns"))
            if lat is not None:
                s["lat"].append(lat)
        elif kind == "kick":
            s["kicks_sent" if ev.get("sent") else "kicks_suppressed"] += 1
        elif kind == "irq":
            s["interrupts_sent" if ev.get("sent") else "interrupts_suppressed"] += 1
        elif kind == "irq_recv":
            s["interrupts"] += 1
        elif kind == "publish":
            s["published"] += _int(ev.get("count")) or 0
            sample = True
        elif kind == "push":
            s["used"] += 1
            sample = True
        if sample:
            b = _bucket(max(0, s["published"] - s["used"]))
            s["occupancy"][b] = s["occupancy"].get(b, 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(raw):
        s = raw[name]
        lats: list[int] = sorted(s.pop("lat"))
        s.pop("published")
        s.pop("used")
        s["latency_ns"] = {
            "p50": _percentile(lats, 50),
            "p90": _percentile(lats, 90),
            "p99": _percentile(lats, 99),
            "max": lats[-1] if lats else None,
        }
        req = s["requests"]
        s["kicks_per_request"] = s["kicks_sent"] / req if req else 0.0
        s["interrupts_per_request"] = (
            s["interrupts"] / s["completions"] if s["completions"] else 0.0
        )
        s["occupancy"] = dict(
            sorted(s["occupancy"].items(), key=lambda kv: int(kv[0].split("-")[0]))
        )
        out[name] = s
    return out


def format_stats(stats: dict[str, dict[str, Any]]) -> str:
    """:func:`queue_stats` as text, a block per queue."""
    lines: list[str] = []

    def us(v: int | None) -> str:
        return "-" if v is None else f"{v / 1000:.1f}us"

    for name, s in stats.items():
        lat = s["latency_ns"]
        lines.append(f"{name}: {s['requests']} requests, {s['completions']} completions")
        lines.append(
            f"  latency add->reap  p50 {us(lat['p50'])}  p90 {us(lat['p90'])}  "
            f"p99 {us(lat['p99'])}  max {us(lat['max'])}"
        )
        lines.append(
            f"  kicks {s['kicks_sent']} sent, {s['kicks_suppressed']} suppressed "
            f"({s['kicks_per_request']:.2f}/request)"
        )
        lines.append(
            f"  interrupts {s['interrupts_sent']} sent, {s['interrupts_suppressed']} "
            f"suppressed, {s['interrupts']} taken ({s['interrupts_per_request']:.2f}/request)"
        )
        total = sum(s["occupancy"].values()) or 1
        lines.append("  occupancy (published - used)")
        for b, n in s["occupancy"].items():
            bar = "#" * max(1, round(40 * n / total))
            lines.append(f"    {b:>11} {n:>7} {bar}")
    return "\n".join(lines) + ("\n" if lines else "")


# --------------------------------------------------------------------------- rings


class RingState:
    """A split virtqueue (§2.7) as the trace says it is: ``desc`` (id → (addr, len,
    flags, next)), ``avail`` (slot → head), ``used`` (slot → (id, len)), ``avail_idx``,
    ``used_idx`` (u16), ``last_avail`` (device), ``last_used`` (driver),
    ``avail_event`` / ``used_event`` and the flags words ``avail_flags`` (driver's) /
    ``used_flags`` (device's) as last written (None: unknown), ``chains`` (head → the
    buffers of the chain, for an indirect one its table), ``size``."""

    def __init__(self, size: int = 0) -> None:
        self._reset(size)

    def _reset(self, size: int) -> None:
        self.size = size
        self.desc: dict[int, tuple[int, int, int, int]] = {}
        self.avail: dict[int, int] = {}
        self.used: dict[int, tuple[int, int]] = {}
        self.avail_idx = 0
        self.used_idx = 0
        self.last_avail = 0
        self.last_used = 0
        self.avail_event: int | None = None
        self.used_event: int | None = None
        self.avail_flags: int | None = None
        self.used_flags: int | None = None
        self.chains: dict[int, list[list[int]]] = {}

    def apply(self, ops: Iterable[Op]) -> None:
        """Apply writes from :func:`ring_steps`."""
        for op in ops:
            what = op[0]
            if what == "reset":
                self._reset(op[1])
            elif what == "desc":
                self.desc[op[1]] = (op[2], op[3], op[4], op[5])
            elif what == "chain":
                self.chains[op[1]] = op[2]
            elif what == "avail":
                self.avail[op[1]] = op[2]
            elif what == "used":
                self.used[op[1]] = (op[2], op[3])
            elif what in (
                "avail_idx",
                "used_idx",
                "last_avail",
                "last_used",
                "avail_event",
                "used_event",
                "avail_flags",
                "used_flags",
            ):
                setattr(self, what, op[1])


def ring_steps(
    events: Sequence[dict[str, Any]], dev: str, q: int, kpid: int | None = None
) -> list[tuple[dict[str, Any], list[Op]]]:
    """The events of queue ``q`` of ``dev`` (of kernel ``kpid``; default the first
    one seen) in time order, each with its writes to the ring model.

    The event indices and flags words come from the writes themselves (``kick_mode``:
    the device's ``avail_event`` / used.flags, ``irq_mode``: the driver's ``used_event``
    / avail.flags) when the trace records that side's writes; they then start at 0
    when the queue is set up (the driver zeroes new rings). A trace that does not
    (older files; a Linux guest's driver half) falls back to the value the other side
    last read (``kick``'s ``event`` is avail_event, ``irq``'s is used_event)."""
    mine: list[dict[str, Any]] = []
    for ev in events:
        if ev.get("dev") != dev or ev.get("q") != q:
            continue
        if kpid is None:
            kpid = ev.get("kpid")
        if ev.get("kpid") == kpid:
            mine.append(ev)
    dev_writes = any(ev["kind"] == "kick_mode" for ev in mine)
    drv_writes = any(ev["kind"] == "irq_mode" for ev in mine)
    steps: list[tuple[dict[str, Any], list[Op]]] = []
    size = 0
    pushed = popped = reaped = 0
    for ev in mine:
        ops: list[Op] = []
        kind = ev["kind"]
        seq, head = _int(ev.get("seq")), _int(ev.get("head"))
        if kind == "ctl" and ev.get("type") == "SET_VRING_NUM":
            fields = ev.get("fields")
            num = _int(fields.get("num")) if isinstance(fields, dict) else None
            # §2.7: a queue size is a power of 2 of at most 32768
            if num is not None and 0 < num <= 32768:
                size = num
                pushed = popped = reaped = 0
                ops.append(("reset", size))
                if dev_writes:
                    ops += [("avail_event", 0), ("used_flags", 0)]
                if drv_writes:
                    ops += [("used_event", 0), ("avail_flags", 0)]
        elif not size:
            pass  # no size known yet: nothing to place
        elif kind == "add" and seq is not None and head is not None and 0 <= head < size:
            descs = ev.get("descs")
            descs = descs[:_MAX_DESCS] if isinstance(descs, list) else []
            table = _int(ev.get("indirect"))
            ids = ev.get("ids")
            chain = [list(d[:3]) for d in descs if isinstance(d, list) and len(d) >= 3]
            ops.append(("chain", head, chain))
            if table is not None:
                ops.append(("desc", head, table, 16 * len(chain), 4, 0))  # VRING_DESC_F_INDIRECT
            elif isinstance(ids, list) and len(ids) == len(chain):
                for i, (d, ident) in enumerate(zip(chain, ids, strict=True)):
                    if not isinstance(ident, int) or not 0 <= ident < size:
                        break
                    nxt = ids[i + 1] if i + 1 < len(ids) else 0
                    ops.append(("desc", ident, d[0], d[1], d[2], nxt))
            elif chain:  # an older trace without ids: only the head is known
                d = chain[0]
                ops.append(("desc", head, d[0], d[1], d[2], 0))
            ops.append(("avail", seq % size, head))
        elif kind == "publish":
            new = _int(ev.get("new"))
            if new is not None:
                ops.append(("avail_idx", new & 0xFFFF))
        elif kind == "kick" and not dev_writes:
            event = _int(ev.get("event"))
            if event is not None:
                ops.append(("avail_event", event & 0xFFFF))
        elif kind == "kick_mode":
            _mode_ops(ev, "avail_event", "used_flags", ops)
        elif kind in ("pop", "bad_chain"):
            popped += 1
            ops.append(("last_avail", popped & 0xFFFF))
        elif kind == "push" and head is not None:
            length = _int(ev.get("len")) or 0
            ops.append(("used", pushed % size, head, length))
            pushed += 1
            ops.append(("used_idx", pushed & 0xFFFF))
        elif kind == "irq" and not drv_writes:
            event = _int(ev.get("event"))
            if event is not None:
                ops.append(("used_event", event & 0xFFFF))
        elif kind == "irq_mode":
            _mode_ops(ev, "used_event", "avail_flags", ops)
        elif kind == "reap":
            reaped += 1
            ops.append(("last_used", reaped & 0xFFFF))
        steps.append((ev, ops))
    return steps


def _mode_ops(ev: dict[str, Any], event_key: str, flags_key: str, ops: list[Op]) -> None:
    """The writes of a ``kick_mode`` / ``irq_mode`` event: the event index (u16) or
    the flags word (u16) it names (§2.7.10); a disable under EVENT_IDX writes nothing."""
    event = _int(ev.get(event_key))
    if event is not None:
        ops.append((event_key, event & 0xFFFF))
    flags = _int(ev.get("flags"))
    if flags is not None:
        ops.append((flags_key, flags & 0xFFFF))


def _in_window(slot: int, start: int, end: int, size: int) -> bool:
    """Whether ring slot ``slot`` lies in [start, end) of free-running u16 indices."""
    span = (end - start) & 0xFFFF
    return (slot - start) % size < span if span < size else True


def _flags_text(flags: int | None, name: str) -> str:
    """A ring's flags word: ``?`` (unknown), ``0`` or its bit 0's name (§2.7.6/§2.7.8)."""
    if flags is None:
        return "?"
    if flags == 1:
        return f"1 ({name})"
    return str(flags)


def render_ring(state: RingState, title: str = "") -> str:
    """The rings as text: the descriptor table (entries the trace wrote, chains
    followed from the heads in the rings), the avail and used rings with the positions
    of their indices, the last-seen and event indices."""
    n = state.size
    lines = [title] if title else []
    lines.append(
        f"size {n}  avail.idx {state.avail_idx}  used.idx {state.used_idx}  "
        f"device last_avail {state.last_avail}  driver last_used {state.last_used}  "
        f"avail_event {state.avail_event if state.avail_event is not None else '?'}  "
        f"used_event {state.used_event if state.used_event is not None else '?'}"
    )
    lines.append(
        f"avail.flags {_flags_text(state.avail_flags, 'NO_INTERRUPT')}  "
        f"used.flags {_flags_text(state.used_flags, 'NO_NOTIFY')}"
    )
    lines.append(
        f"in flight: {(state.avail_idx - state.used_idx) & 0xFFFF} published, "
        f"{(state.used_idx - state.last_used) & 0xFFFF} used not yet reaped"
    )
    lines.append("descriptor table (id: addr+len flags next)")
    for i in sorted(state.desc):
        a, ln, fl, nx = state.desc[i]
        names = (
            "|".join(nm for b, nm in ((1, "NEXT"), (2, "WRITE"), (4, "INDIRECT")) if fl & b) or "-"
        )
        more = f" next {nx}" if fl & 1 else ""
        chain = ""
        if fl & 4 and i in state.chains:
            chain = "  table: " + " ".join(
                f"{d[0]:#x}+{d[1]}{'w' if d[2] & 2 else 'r'}" for d in state.chains[i][:8]
            )
        lines.append(f"  {i:>5}: {a:#x}+{ln} {names}{more}{chain}")
    lines.append("avail ring (slot: head)   > = avail.idx, * = device's last_avail")
    at = {state.avail_idx % n, state.last_avail % n} if n else set()
    for slot in sorted(set(state.avail) | at):
        marks = ""
        if n and slot == state.avail_idx % n:
            marks += ">"
        if n and slot == state.last_avail % n:
            marks += "*"
        live = "live" if n and _in_window(slot, state.last_avail, state.avail_idx, n) else ""
        head = state.avail.get(slot, "-")
        lines.append(f"  {marks:>2} {slot:>5}: {head:<5} {live}".rstrip())
    lines.append("used ring (slot: id len)  > = used.idx, * = driver's last_used")
    at = {state.used_idx % n, state.last_used % n} if n else set()
    for slot in sorted(set(state.used) | at):
        marks = ""
        if n and slot == state.used_idx % n:
            marks += ">"
        if n and slot == state.last_used % n:
            marks += "*"
        entry = state.used.get(slot)
        ident, used_len = (str(entry[0]), str(entry[1])) if entry else ("-", "-")
        live = "unreaped" if n and _in_window(slot, state.last_used, state.used_idx, n) else ""
        lines.append(f"  {marks:>2} {slot:>5}: {ident:<5} {used_len:<8} {live}".rstrip())
    return "\n".join(lines) + "\n"


_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>virtqueue __TITLE__</title>
<style>
body{font:13px monospace;margin:1em}
#ev{white-space:pre;background:#eef;padding:4px}
table{border-collapse:collapse;margin:4px 16px 4px 0;display:inline-table;vertical-align:top}
td,th{border:1px solid #bbb;padding:1px 4px;text-align:right}
.cur{background:#fd8}.live{background:#cfc}.new{outline:2px solid #e33}
</style></head><body>
<h3>virtqueue __TITLE__ (size <span id="size"></span>)</h3>
<input type="range" id="s" min="0" value="0" style="width:90%">
<button id="prev">&lt;</button><button id="next">&gt;</button>
<div>event <span id="no"></span> of <span id="total"></span></div>
<div id="ev"></div><div id="idx"></div><div id="rings"></div>
<script>
const D=__DATA__;
const s=document.getElementById('s');s.max=D.steps.length-1;
document.getElementById('total').textContent=D.steps.length;
function state(k){let st={size:0,desc:{},avail:{},used:{},chains:{},avail_idx:0,used_idx:0,
last_avail:0,last_used:0,avail_event:null,used_event:null,avail_flags:null,used_flags:null,
touched:new Set()};
for(let i=0;i<=k;i++){for(const op of D.steps[i][1]){const w=op[0];
if(i===k)st.touched.add(w+':'+op[1]);
if(w==='reset'){const t=st.touched;st={size:op[1],desc:{},avail:{},used:{},chains:{},avail_idx:0,
used_idx:0,last_avail:0,last_used:0,avail_event:null,used_event:null,avail_flags:null,
used_flags:null,touched:t};}
else if(w==='desc')st.desc[op[1]]=op.slice(2);else if(w==='chain')st.chains[op[1]]=op[2];
else if(w==='avail')st.avail[op[1]]=op[2];else if(w==='used')st.used[op[1]]=op.slice(2);
else st[w]=op[1];}}return st;}
function hex(v){return '0x'+v.toString(16);}
function live(slot,a,b,n){const span=(b-a)&0xffff;return span>=n||((slot-a)%n+n)%n<span;}
function draw(){const k=+s.value,st=state(k),n=st.size;
document.getElementById('no').textContent=k+1;
document.getElementById('size').textContent=n;
document.getElementById('ev').textContent=D.steps[k][0];
document.getElementById('idx').textContent='avail.idx '+st.avail_idx+'  used.idx '+st.used_idx+
'  device last_avail '+st.last_avail+'  driver last_used '+st.last_used+'  avail_event '+
(st.avail_event??'?')+'  used_event '+(st.used_event??'?')+'  avail.flags '+
(st.avail_flags??'?')+'  used.flags '+(st.used_flags??'?');
let h='<table><tr><th colspan=5>descriptor table</th></tr>'+
'<tr><th>id</th><th>addr</th><th>len</th><th>flags</th><th>next</th></tr>';
for(const i of Object.keys(st.desc).map(Number).sort((a,b)=>a-b)){const d=st.desc[i];
const f=[[1,'N'],[2,'W'],[4,'I']].filter(x=>d[2]&x[0]).map(x=>x[1]).join('')||'-';
h+='<tr class="'+(st.touched.has('desc:'+i)?'new':'')+'"><td>'+i+'</td><td>'+hex(d[0])+
'</td><td>'+d[1]+
'</td><td>'+f+'</td><td>'+(d[2]&1?d[3]:'')+'</td></tr>';}
h+='</table><table><tr><th colspan=2>avail ring</th></tr><tr><th>slot</th><th>head</th></tr>';
for(let i=0;i<n;i++){if(!(i in st.avail))continue;
let c=live(i,st.last_avail,st.avail_idx,n)?'live':'';
if(i===st.avail_idx%n)c='cur';if(st.touched.has('avail:'+i))c+=' new';
h+='<tr class="'+c+'"><td>'+i+(i===st.avail_idx%n?' &lt;idx':'')+
(i===st.last_avail%n?' &lt;dev':'')+
'</td><td>'+st.avail[i]+'</td></tr>';}
h+='</table><table><tr><th colspan=3>used ring</th></tr>'+
'<tr><th>slot</th><th>id</th><th>len</th></tr>';
for(let i=0;i<n;i++){if(!(i in st.used))continue;let c=live(i,st.last_used,st.used_idx,n)?'live':'';
if(i===st.used_idx%n)c='cur';if(st.touched.has('used:'+i))c+=' new';
h+='<tr class="'+c+'"><td>'+i+(i===st.used_idx%n?' &lt;idx':'')+(i===st.last_used%n?' &lt;drv':'')+
'</td><td>'+st.used[i][0]+'</td><td>'+st.used[i][1]+'</td></tr>';}
document.getElementById('rings').innerHTML=h+'</table>';}
s.oninput=draw;
document.getElementById('prev').onclick=()=>{s.value=Math.max(0,+s.value-1);draw();};
document.getElementById('next').onclick=()=>{s.value=Math.min(+s.max,+s.value+1);draw();};
s.value=s.max;draw();
</script></body></html>
"""


def ring_html(steps: Sequence[tuple[dict[str, Any], list[Op]]], title: str) -> str:
    """One self-contained HTML page (inline CSS and JS, no network) with a slider over
    ``steps`` (from :func:`ring_steps`) that redraws the rings after each event."""
    t0 = steps[0][0]["ts"] if steps else 0
    data = {"steps": [[format_text(ev, t0), ops] for ev, ops in steps]}
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    safe_title = "".join(c for c in title if c.isalnum() or c in ":._- ")
    return _HTML.replace("__TITLE__", safe_title).replace("__DATA__", blob)
