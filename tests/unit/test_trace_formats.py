"""The trace formats on a synthetic trace built with the real :class:`Tracer`: Perfetto
JSON checked by a Trace Event validator (required fields per phase, matched async
begin/end, paired flows, numeric counters, process/thread names), pcapng parsed block by
block (section, interfaces, packets, direction flags, comments, MRG_RXBUF joining), the
statistics' numbers, the ring model across a wrap with direct and indirect chains, and
the CLI's one-line errors for bad files."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from tools.cli import main as vlab
from vdev.virtio.trace import Tracer, decode_line
from vdev.virtio.trace_formats import (
    RingState,
    check_perfetto,
    format_stats,
    perfetto_json,
    queue_stats,
    render_ring,
    ring_html,
    ring_steps,
    sort_events,
    to_pcapng,
    to_perfetto,
)

__all__ = ["validate_trace_events", "parse_pcapng"]

KPID, DPID = 100, 200


# --------------------------------------------------------------------------- validators


def validate_trace_events(doc: dict[str, Any] | str) -> dict[str, int]:
    """Check ``doc`` (the JSON text as written, or the object) against the Trace Event
    format rules and every condition Perfetto's importer fails or warns on
    (:func:`check_perfetto`); returns how many events of each phase it has."""
    text = doc if isinstance(doc, str) else json.dumps(doc)
    assert check_perfetto(text) == []
    if isinstance(doc, str):
        doc = json.loads(doc)
    assert isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list)
    phases: dict[str, int] = {}
    async_open: dict[tuple[Any, Any, Any], float] = {}
    flows: dict[Any, list[str]] = {}
    named_pids: set[Any] = set()
    named_threads: set[tuple[Any, Any]] = set()
    used_threads: set[tuple[Any, Any]] = set()
    for ev in doc["traceEvents"]:
        for key in ("name", "ph", "ts", "pid", "tid"):
            assert key in ev, (key, ev)
        assert isinstance(ev["name"], str) and ev["name"]
        assert isinstance(ev["ts"], int | float) and ev["ts"] >= 0
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        ph = ev["ph"]
        phases[ph] = phases.get(ph, 0) + 1
        if ph == "M":
            assert ev["name"] in ("process_name", "thread_name")
            assert isinstance(ev["args"]["name"], str)
            if ev["name"] == "process_name":
                named_pids.add(ev["pid"])
            else:
                named_threads.add((ev["pid"], ev["tid"]))
        elif ph == "X":
            assert isinstance(ev["dur"], int | float) and ev["dur"] >= 0
            used_threads.add((ev["pid"], ev["tid"]))
        elif ph in ("b", "e"):
            assert isinstance(ev["cat"], str) and "id" in ev
            akey = (ev["cat"], ev["name"], ev["id"])
            if ph == "b":
                assert akey not in async_open, f"async id {akey} begun twice"
                async_open[akey] = ev["ts"]
            else:
                assert akey in async_open, f"async end without begin: {akey}"
                assert ev["ts"] >= async_open.pop(akey)
        elif ph in ("s", "f"):
            assert "id" in ev and isinstance(ev["cat"], str)
            if ph == "f":
                assert ev.get("bp") == "e"
            flows.setdefault(ev["id"], []).append(ph)
        elif ph == "C":
            assert ev["args"] and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in ev["args"].values()
            )
        else:
            raise AssertionError(f"unexpected phase {ph!r}")
    assert not async_open, f"async slices never ended: {list(async_open)[:3]}"
    assert all(v == ["s", "f"] for v in flows.values()), "every flow is one s then one f"
    assert used_threads <= named_threads, "every thread track has a name"
    assert {p for p, _ in used_threads} <= named_pids, "every process track has a name"
    return phases


def parse_pcapng(data: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A little pcapng reader for the tests: (interfaces, packets) with options."""
    assert struct.unpack_from("<I", data, 0)[0] == 0x0A0D0D0A
    assert struct.unpack_from("<I", data, 8)[0] == 0x1A2B3C4D
    ifaces: list[dict[str, Any]] = []
    packets: list[dict[str, Any]] = []
    off = 0
    for _ in range(len(data)):
        if off >= len(data):
            break
        btype, total = struct.unpack_from("<II", data, off)
        assert total % 4 == 0 and struct.unpack_from("<I", data, off + total - 4)[0] == total
        body = data[off + 8 : off + total - 4]

        def options(buf: bytes) -> dict[int, bytes]:
            out: dict[int, bytes] = {}
            i = 0
            while i + 4 <= len(buf):
                code, ln = struct.unpack_from("<HH", buf, i)
                if code == 0:
                    break
                out[code] = buf[i + 4 : i + 4 + ln]
                i += 4 + ln + (-ln % 4)
            return out

        if btype == 1:
            link, _, snap = struct.unpack_from("<HHI", body)
            ifaces.append({"link": link, "snaplen": snap, "opts": options(body[8:])})
        elif btype == 6:
            ifid, hi, lo, cap, orig = struct.unpack_from("<IIIII", body)
            pkt = body[20 : 20 + cap]
            opts = options(body[20 + cap + (-cap % 4) :])
            packets.append(
                {"if": ifid, "ts": (hi << 32) | lo, "data": pkt, "orig": orig, "opts": opts}
            )
        off += total
    return ifaces, packets


# --------------------------------------------------------------------------- a trace


class Clock:
    """A fake CLOCK_MONOTONIC: every reading is 1000 ns after the last."""

    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        self.now += 1000
        return self.now


def _udp_frame(n: int) -> bytes:
    payload = bytes([n]) * (10 + n)
    udp = struct.pack("!HHHH", 5000 + n, 7, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), n, 0, 64, 17, 0, b"\n\0\0\2", b"\n\0\0\2"
    )
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp


def _net_hdr(nbufs: int = 1) -> dict[str, Any]:
    return {
        "flags": [],
        "gso_type": "none",
        "hdr_len": 0,
        "gso_size": 0,
        "csum_start": 0,
        "csum_offset": 0,
        "num_buffers": nbufs,
    }


def build_trace(size: int = 4, n: int = 6) -> list[dict[str, Any]]:
    """A blk-like queue ``vda:0`` of ``size`` descriptors with ``n`` requests one at a
    time (the ring wraps; request 2 is indirect), and a net device with ``n`` transmit
    frames and ``n`` received ones (the last received packet in two buffers)."""
    lines: list[str] = []
    clock = Clock()
    drv = Tracer(lines.append, clock, pid=KPID, kpid=KPID, dev="vda", side="driver")
    dev = Tracer(lines.append, clock, pid=DPID, kpid=KPID, dev="vda", side="device")
    dev.emit("ctl", 0, type="SET_VRING_NUM", fields={"index": 0, "num": size}, reply={})
    free = list(range(size))
    for s in range(n):
        if s == 2:
            ids = [free.pop(0)]
            descs = [[0x9000, 16, 1], [0xA000, 512, 1], [0x9010, 1, 2]]
            indirect: int | None = 0x7000
        else:
            ids = [free.pop(0) for _ in range(2)]
            descs = [[0x1000 * (s + 1), 16, 1], [0x1000 * (s + 1) + 16, 1, 2]]
            indirect = None
        head = ids[0]
        drv.emit("add", 0, s, head, descs=descs, indirect=indirect, ids=ids, payload=None)
        drv.emit("publish", 0, old=s, new=s + 1, count=1, first_seq=s)
        drv.emit("kick", 0, sent=s % 2 == 0, old=s, new=s + 1, event=s)
        dev.emit("kick_recv", 0)
        dev.emit("pop", 0, s, head, descs=[[*d, False] for d in descs], rlen=16, wlen=1)
        dev.emit("push", 0, s, head, len=1)
        dev.emit("irq", 0, sent=s != 3, old=s, new=s + 1, event=s)
        if s != 3:
            drv.emit("irq_recv", 0, reaped=1)
        drv.emit("reap", 0, s, head, len=1, lat_ns=(s + 1) * 1000, payload={"status": "OK"})
        free.extend(ids)
    nd = drv.bind("eth0")
    nv = dev.bind("eth0")
    for s in range(n):
        frame = _udp_frame(s)
        nd.emit(
            "add",
            1,
            s,
            s,
            descs=[[0x5000, 12 + len(frame), 0]],
            indirect=None,
            ids=[s],
            payload={"net": _net_hdr(0), "frame": "x"},
            frame_hex=frame.hex(),
            frame_len=len(frame),
        )
        nv.emit("pop", 1, s, s, descs=[[0x5000, 12 + len(frame), 0, False]], rlen=1, wlen=0)
        nv.emit("push", 1, s, s, len=0)
        nd.emit("reap", 1, s, s, len=0, lat_ns=5, payload=None)
    for s in range(n):
        frame = _udp_frame(100 + s)
        last = s == n - 1
        first, rest = (frame[:30], frame[30:]) if last else (frame, b"")
        nd.emit(
            "reap",
            0,
            s,
            s,
            len=12 + len(first),
            lat_ns=5,
            payload={"net": _net_hdr(2 if last else 1), "frame": "x"},
            frame_hex=first.hex(),
            frame_len=len(first),
        )
        if last:
            nd.emit(
                "reap",
                0,
                s + 1,
                s + 1,
                len=len(rest),
                lat_ns=5,
                payload={"cont": True},
                frame_hex=rest.hex(),
                frame_len=len(rest),
            )
    return sort_events(decode_line(line) for line in lines)


# --------------------------------------------------------------------------- tests


def test_perfetto_is_valid_and_links_the_processes() -> None:
    events = build_trace()
    doc = to_perfetto(events)
    phases = validate_trace_events(doc)
    json.dumps(doc)  # serialisable
    adds = sum(e["kind"] == "add" for e in events)
    assert phases["b"] == phases["e"] == adds
    pops = sum(e["kind"] == "pop" for e in events)
    reaps = sum(e["kind"] == "reap" for e in events if e["q"] == 1 or e["dev"] == "vda")
    # publish -> pop for every pop (from the add where the trace has no publish, as the
    # net one here), push -> reap
    assert phases["s"] == phases["f"] == pops + reaps
    assert phases["X"] == len(events)
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M"}
    assert {f"kernel {KPID}", f"vda device {DPID}", "vda q0", "eth0 q1"} <= names
    counters = [e for e in doc["traceEvents"] if e["ph"] == "C" and "vda" in e["name"]]
    assert [c["args"]["in_flight"] for c in counters] == [1, 0] * 6


def test_pcapng_blocks_directions_comments_and_merged_buffers() -> None:
    events = build_trace()
    ifaces, packets = parse_pcapng(to_pcapng(events))
    assert [i["link"] for i in ifaces] == [1, 1]
    assert [i["opts"][2] for i in ifaces] == [b"eth0 q1 tx", b"eth0 q0 rx"]
    assert all(i["opts"][9] == b"\x09" for i in ifaces)  # nanoseconds
    assert len(packets) == 12
    tx = [p for p in packets if p["if"] == 0]
    rx = [p for p in packets if p["if"] == 1]
    assert [p["data"] for p in tx] == [_udp_frame(s) for s in range(6)]
    assert [p["data"] for p in rx] == [_udp_frame(100 + s) for s in range(6)]
    assert all(struct.unpack("<I", p["opts"][2])[0] == 2 for p in tx)  # outbound
    assert all(struct.unpack("<I", p["opts"][2])[0] == 1 for p in rx)  # inbound
    assert b"seq=3 head=3 ids=[3]" in tx[3]["opts"][1]
    assert b"num_buffers=2" in rx[-1]["opts"][1] and b"+6" in rx[-1]["opts"][1]
    assert all(p["orig"] == len(p["data"]) for p in packets)
    assert [p["ts"] for p in packets] == sorted(p["ts"] for p in packets)
    # truncated capture: frame_len larger than what the trace holds
    short = [dict(e) for e in events]
    for e in short:
        if e["kind"] == "add" and e["dev"] == "eth0":
            e["frame_len"] = 9000
    _, packets = parse_pcapng(to_pcapng(short))
    assert all(p["orig"] == 9000 for p in packets if p["if"] == 0)
    assert parse_pcapng(to_pcapng([])) == ([], [])


def test_stats_numbers() -> None:
    stats = queue_stats(build_trace())
    s = stats["vda:0"]
    assert s["requests"] == s["completions"] == 6
    assert s["latency_ns"] == {"p50": 3000, "p90": 6000, "p99": 6000, "max": 6000}
    assert (s["kicks_sent"], s["kicks_suppressed"]) == (3, 3)
    assert (s["interrupts_sent"], s["interrupts_suppressed"], s["interrupts"]) == (5, 1, 5)
    assert s["kicks_per_request"] == 0.5
    assert s["occupancy"] == {"0": 6, "1": 6}
    assert stats["eth0:1"]["requests"] == 6
    text = format_stats(stats)
    assert "vda:0: 6 requests, 6 completions" in text and "p50 3.0us" in text


def test_ring_reconstruction_across_a_wrap() -> None:
    events = build_trace(size=4, n=6)
    steps = ring_steps(events, "vda", 0)
    assert steps[0][1] == [("reset", 4)]
    st = RingState()
    for _, ops in steps:
        st.apply(ops)
    assert st.size == 4
    assert (st.avail_idx, st.used_idx, st.last_avail, st.last_used) == (6, 6, 6, 6)
    assert (st.avail_event, st.used_event) == (5, 5)
    # the free list hands out [0,1] [2,3] [0 indirect] [1,2] [3,0] [1,2]
    assert st.avail == {0: 3, 1: 1, 2: 0, 3: 1}  # seq 4, 5 over seq 0, 1
    assert st.used == {0: (3, 1), 1: (1, 1), 2: (0, 1), 3: (1, 1)}
    assert st.desc == {
        0: (0x5010, 1, 2, 0),
        1: (0x6000, 16, 1, 2),
        2: (0x6010, 1, 2, 0),
        3: (0x5000, 16, 1, 0),
    }
    # half-way: the indirect request's single descriptor points at its table
    mid = RingState()
    for _, ops in steps[: 1 + 2 * 9 + 1]:  # through request 2's add
        mid.apply(ops)
    assert mid.desc[0] == (0x7000, 48, 4, 0)
    assert mid.chains[0] == [[0x9000, 16, 1], [0xA000, 512, 1], [0x9010, 1, 2]]


@pytest.mark.parametrize("event_idx", [True, False])
def test_ring_event_indices_and_flags_from_the_writes(event_idx: bool) -> None:
    """With kick_mode / irq_mode in the trace, avail_event / used_event and the flags
    words are the values written, not what the other side last read."""
    lines: list[str] = []
    clock = Clock()
    drv = Tracer(lines.append, clock, pid=KPID, kpid=KPID, dev="vda", side="driver")
    dev = Tracer(lines.append, clock, pid=DPID, kpid=KPID, dev="vda", side="device")
    dev.emit("ctl", 0, type="SET_VRING_NUM", fields={"index": 0, "num": 8}, reply={})
    marks = [len(lines)]  # the model is looked at after these many events
    for s in range(3):
        drv.emit("add", 0, s, s, descs=[[0x1000, 16, 2]], indirect=None, ids=[s], payload=None)
        drv.emit("publish", 0, old=s, new=s + 1, count=1, first_seq=s)
        drv.emit("kick", 0, sent=True, old=s, new=s + 1, event=99)  # a stale read
        if event_idx:
            dev.emit("kick_mode", 0, on=False)
        else:
            dev.emit("kick_mode", 0, on=False, flags=1)
        marks.append(len(lines))
        dev.emit("pop", 0, s, s, descs=[[0x1000, 16, 2, False]], rlen=0, wlen=16)
        dev.emit("push", 0, s, s, len=16)
        dev.emit("irq", 0, sent=True, old=s, new=s + 1, event=77)  # a stale read
        if event_idx:
            dev.emit("kick_mode", 0, on=True, avail_event=s + 1)
            drv.emit("irq_mode", 0, on=False)
        else:
            dev.emit("kick_mode", 0, on=True, flags=0)
            drv.emit("irq_mode", 0, on=False, flags=1)
        marks.append(len(lines))
        drv.emit("reap", 0, s, s, len=16, lat_ns=1, payload=None)
        if event_idx:
            drv.emit("irq_mode", 0, on=True, used_event=s + 1)
        else:
            drv.emit("irq_mode", 0, on=True, flags=0)
        marks.append(len(lines))
    steps = ring_steps(sort_events(decode_line(x) for x in lines), "vda", 0)
    assert len(steps) == len(lines)
    seen: list[tuple[Any, ...]] = []
    for m in marks:
        st = RingState()
        for _, ops in steps[:m]:
            st.apply(ops)
        seen.append((st.avail_event, st.used_event, st.avail_flags, st.used_flags))
    if event_idx:  # (avail_event, used_event, avail.flags, used.flags)
        want = [(0, 0, 0, 0)]
        for s in range(3):
            want += [(s, s, 0, 0), (s + 1, s, 0, 0), (s + 1, s + 1, 0, 0)]
    else:
        want = [(0, 0, 0, 0)] + [(0, 0, 0, 1), (0, 0, 1, 0), (0, 0, 0, 0)] * 3
    assert seen == want
    text = render_ring(st)
    assert f"avail_event {want[-1][0]}  used_event {want[-1][1]}" in text
    assert "avail.flags 0  used.flags 0" in text


def test_ring_text_and_html() -> None:
    events = build_trace(size=4, n=6)
    steps = ring_steps(events, "vda", 0)
    st = RingState()
    for _, ops in steps[:3]:  # reset, add, publish of request 0
        st.apply(ops)
    text = render_ring(st, "t")
    assert "avail.idx 1  used.idx 0" in text
    assert "0x1000+16 NEXT next 1" in text
    page = ring_html(steps, "vda:0")
    assert page.startswith("<!DOCTYPE html>") and "<script>" in page
    assert "http" not in page.replace("http-equiv", "")  # no network
    data = json.loads(page.split("const D=", 1)[1].split(";\n", 1)[0])
    assert len(data["steps"]) == len(steps)


BAD = (
    '{"v":1,"ts":1,"pid":2,"kpid":2,"dev":"vda","side":"driver","q":0,"kind":"add",'
    '"seq":0,"head":0,"descs":[[4096,16,1]],"indirect":null,"payload":null}\n'
)


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "{}", "--format", "perfetto", "-o", "{out}"],
        ["convert", "{}", "--format", "pcapng", "-o", "{out}"],
        ["stats", "{}"],
        ["ring", "{}", "--queue", "vda:0"],
    ],
)
def test_bad_files_give_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    for content, message in (
        (BAD + "not json\n", "line 2: not JSON"),
        (BAD + BAD[:40], "line 2: truncated line"),
    ):
        path = tmp_path / "t.jsonl"
        path.write_text(content)
        argv = [a.replace("{out}", str(tmp_path / "out")).format(path) for a in args]
        assert vlab(["trace", *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and str(path) in err[0], err


def test_ring_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in build_trace()))
    assert vlab(["trace", "ring", str(path), "--queue", "vda"]) == 2
    assert vlab(["trace", "ring", str(path), "--queue", "vdb:0"]) == 1
    assert vlab(["trace", "ring", str(path), "--queue", "vda:0", "--at", "999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "DEV:INDEX" in err[0] and "no events" in err[1]
    assert vlab(["trace", "ring", str(path), "--queue", "vda:0", "--at", "3"]) == 0
    out = capsys.readouterr().out
    assert "after event 3/" in out and "avail.idx 1" in out


# --------------------------------------------------------------------------- Perfetto rules


def _doc(*events: dict[str, Any], **top: Any) -> str:
    """A Trace Event document with a named process 1 and thread (1, 2) and ``events``."""
    meta = [
        {"name": "process_name", "ph": "M", "ts": 0, "pid": 1, "tid": 0, "args": {"name": "p"}},
        {"name": "thread_name", "ph": "M", "ts": 0, "pid": 1, "tid": 2, "args": {"name": "t"}},
    ]
    return json.dumps({"traceEvents": meta + list(events), **top})


def _x(ts: float, dur: float, name: str = "x") -> dict[str, Any]:
    return {"name": name, "cat": "c", "ph": "X", "ts": ts, "dur": dur, "pid": 1, "tid": 2}


def _fl(ph: str, ts: float, fid: Any = 7, **more: Any) -> dict[str, Any]:
    ev = {"name": "f", "cat": "flow", "ph": ph, "id": fid, "ts": ts, "pid": 1, "tid": 2}
    if ph == "f":
        ev["bp"] = "e"
    return {**ev, **more}


def _async(ph: str, ts: float, rid: Any = 3, name: str = "r") -> dict[str, Any]:
    return {"name": name, "cat": "request", "ph": ph, "id": rid, "ts": ts, "pid": 1, "tid": 2}


GOOD = (_x(1, 1), _fl("s", 1.5), _x(3, 1), _fl("f", 3), _async("b", 1), _async("e", 4))


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[" + _doc(*GOOD) + "]", "must be a JSON object"),
        (_doc(*GOOD)[:-5], "not one complete JSON document"),
        (_doc(*GOOD) + "{}", "not one complete JSON document"),
        (json.dumps({"events": []}), "no traceEvents array"),
        (_doc(*GOOD, displayTimeUnit="ns"), "json_display_time_unit"),
        (_doc(*GOOD, _x(9, 1, name="\U0001f600")), "surrogate"),
        (_doc(*GOOD, {"name": "x", "ts": 9, "pid": 1, "tid": 2}), "no ph"),
        (_doc(*GOOD, {"name": "x", "ph": "Q", "ts": 9, "pid": 1, "tid": 2}), "phase 'Q'"),
        (_doc(*GOOD, {**_x(9, 1), "ts": "soon"}), "ts is not a number"),
        (_doc(*GOOD, {**_x(9, 1), "dur": None}), "dur is not a number"),
        (_doc(*GOOD, {k: v for k, v in _x(9, 1).items() if k != "dur"}), "X without dur"),
        (_doc(*GOOD, _x(9, -1)), "slice_negative_duration"),
        (_doc(*GOOD, {**_x(9, 1), "pid": -1}), "pid -1"),
        (_doc(*GOOD, {**_x(9, 1), "pid": 1 << 32}), "pid 4294967296"),
        (_doc(*GOOD, {**_x(9, 1), "args": [1]}), "args is not an object"),
        (_doc(*GOOD, {**_x(9, 1), "bind_id": 4}), "flow_without_direction"),
        (_doc(*GOOD, _x(9, 2), _x(10, 2)), "slice_spill_overlapping_complete_event"),
        (_doc(*GOOD, *[_x(9, 0) for _ in range(513)]), "slice_max_depth_exceeded"),
        (_doc(*GOOD, {k: v for k, v in _async("b", 5).items() if k != "id"}), "without pid or id"),
        (_doc(*GOOD, _async("b", 5, rid=9)), "never ends"),
        (_doc(*GOOD, _async("e", 5, rid=9)), "async end without a begin"),
        (_doc(*GOOD, _async("b", 5, rid=9), _async("e", 6, rid=9, name="q")), "without a begin"),
        (_doc(*GOOD, _async("b", 5, rid=9), _async("b", 6, rid=9)), "begun twice"),
        (_doc(*GOOD, _fl("s", 3.5, fid=8)), "has no end"),
        (_doc(*GOOD, _fl("s", 1.2), _fl("f", 3.5)), "flow_duplicate_id"),
        (_doc(*GOOD, _fl("f", 1.5, fid=8), _fl("s", 3.5, fid=8)), "flow_end_without_start"),
        (_doc(*GOOD, _fl("t", 1.5, fid=8)), "flow_step_without_start"),
        (_doc(*GOOD, _fl("s", 1.5, fid="zz")), "flow_invalid_id"),
        (_doc(*GOOD, _fl("s", 1.5, fid=8), _fl("f", 3.5, fid=8, bp=None)), "bp 'e'"),
        (_doc(_fl("s", 0.5, fid=8), *GOOD, _fl("f", 3.5, fid=8)), "flow_no_enclosing_slice"),
        (_doc(*GOOD, _fl("s", 2.5, fid=8), _fl("f", 3.5, fid=8)), "flow_no_enclosing_slice"),
        (_doc(*GOOD, {"name": "c", "ph": "C", "ts": 9, "pid": 1, "tid": 0}), "counter without"),
        (
            _doc(*GOOD, {"name": "c", "ph": "C", "ts": 9, "pid": 1, "tid": 0, "args": {"n": "x"}}),
            "is not a number",
        ),
        (
            _doc(*GOOD, {"name": "thread_name", "ph": "M", "pid": 1, "tid": 5, "args": {}}),
            "args.name",
        ),
        (_doc(*GOOD, {**_x(9, 1), "tid": 5}), "has no thread_name"),
        (_doc(*GOOD, {**_x(9, 1), "pid": 4, "tid": 4}), "process 4 has no process_name"),
        (_doc(*GOOD, {"name": "i", "ph": "i", "ts": 9, "pid": 1, "tid": 2, "s": "x"}), "scope"),
    ],
)
def test_check_perfetto_names_each_importer_problem(text: str, problem: str) -> None:
    assert check_perfetto(_doc(*GOOD)) == []
    found = check_perfetto(text)
    assert found and any(problem in p for p in found), found


def test_check_perfetto_follows_the_importers_order_at_one_timestamp() -> None:
    # at one ts the importer takes X (longest first) before flows, so a flow stamped
    # with its slice's start is enclosed even when written before the slice
    text = _doc(_fl("s", 1), _x(1, 1), _fl("f", 3), _x(3, 0.5))
    assert check_perfetto(text) == []
    # but a zero-length slice ranks with the flows: file order decides, and the flow
    # would bind to the slice before
    assert (
        "flow_no_enclosing_slice"
        in check_perfetto(_doc(_fl("s", 1), _x(1, 1), _fl("f", 3), _x(3, 0)))[0]
    )
    # adjacent slices do not overlap; two zero-length ones at one ts stack
    assert check_perfetto(_doc(_x(1, 1), _x(2, 1), _x(5, 0), _x(5, 0))) == []


def test_perfetto_json_replaces_what_the_importer_cannot_read() -> None:
    events = build_trace()
    odd = dict(events[0], note="smile \U0001f600 lone \udc80 ok é →")
    text = perfetto_json([odd, *events[1:]])
    assert check_perfetto(text) == []
    assert "\\ud83d" not in text and "\\udc80" not in text
    arg = json.loads(text)["traceEvents"]
    notes = [e["args"]["note"] for e in arg if e.get("args", {}).get("note")]
    assert notes == ["smile \ufffd\ufffd lone \ufffd ok é →"]
    assert "displayTimeUnit" not in json.loads(text)


def test_perfetto_flows_never_go_back_in_time() -> None:
    """A device may pop a chain before the driver's publish event is stamped (it is
    stamped after the store), and the driver may reap before the push is stamped: the
    arrows then start at the add / the pop, which always come first."""
    lines: list[str] = []
    clock = Clock()
    drv = Tracer(lines.append, clock, pid=KPID, kpid=KPID, dev="vda", side="driver")
    dev = Tracer(lines.append, clock, pid=DPID, kpid=KPID, dev="vda", side="device")
    dev.emit("ctl", 0, type="SET_VRING_NUM", fields={"index": 0, "num": 4}, reply={})
    drv.emit("add", 0, 0, 0, descs=[[0x1000, 16, 2]], indirect=None, ids=[0], payload=None)
    dev.emit("pop", 0, 0, 0, descs=[[0x1000, 16, 2, False]], rlen=0, wlen=16)
    drv.emit("publish", 0, old=0, new=1, count=1, first_seq=0)
    drv.emit("reap", 0, 0, 0, len=16, lat_ns=1, payload=None)
    dev.emit("push", 0, 0, 0, len=16)
    events = sort_events(decode_line(x) for x in lines)
    text = perfetto_json(events)
    assert check_perfetto(text) == []
    doc = json.loads(text)
    xs = {e["ts"]: e["name"] for e in doc["traceEvents"] if e["ph"] == "X"}
    arrows: dict[int, dict[str, str]] = {}
    for e in doc["traceEvents"]:
        if e["ph"] in ("s", "f"):
            arrows.setdefault(e["id"], {})[e["ph"]] = xs[e["ts"]]
    assert sorted((a["s"], a["f"]) for a in arrows.values()) == [("add", "pop"), ("pop", "reap")]
