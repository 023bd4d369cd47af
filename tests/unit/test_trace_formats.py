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
    format_stats,
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


def validate_trace_events(doc: dict[str, Any]) -> dict[str, int]:
    """Check ``doc`` against the Trace Event format rules the Perfetto importer needs;
    returns how many events of each phase it has."""
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
    # publish -> pop for every vda pop (the net trace has no publish), push -> reap
    assert phases["s"] == phases["f"] == (pops - 6) + reaps
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
