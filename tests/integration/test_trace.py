"""Virtqueue tracing with real device processes, real shared memory and real ZeroMQ:
every request's add → publish → kick → pop → push → interrupt → reap in the trace,
matched by seq/head/length across the kernel and the device process, the counts equal
to the queues' own counters, the descriptors equal to what the shared ring holds; the
``vlab trace`` command on an unmodified script, and a SIGKILLed traced program."""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from callbacks import Done

import kernel
from hostops.rundir import sweep_stale_rundirs
from hostops.shm import sweep_stale_segments
from vdev.virtio.trace import read_events

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
VLAB = [sys.executable, "-c", "import sys; from tools.cli import main; sys.exit(main())"]
DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
RUN_TIMEOUT_S = 60


def _events(path: Path) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return sorted(read_events(f), key=lambda e: e["ts"])


def _by(events: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [e for e in events if all(e.get(k) == v for k, v in match.items())]


def _check_requests(events: list[dict[str, Any]], dev: str, q: int, stats: Any) -> dict[int, Any]:
    """Every reaped chain has its add, publish, pop and push, matching; the counts
    agree with the driver's counters. Returns the adds by seq."""
    drv = _by(events, dev=dev, q=q, side="driver")
    dv = _by(events, dev=dev, q=q, side="device")
    adds = {e["seq"]: e for e in _by(drv, kind="add")}
    reaps = {e["seq"]: e for e in _by(drv, kind="reap")}
    pops = {e["seq"]: e for e in _by(dv, kind="pop")}
    pushes = {e["seq"]: e for e in _by(dv, kind="push")}
    published: set[int] = set()
    for p in _by(drv, kind="publish"):
        published.update(range(p["first_seq"], p["first_seq"] + p["count"]))
    assert len(adds) == len(_by(drv, kind="add")), "a seq was given twice"
    assert sorted(adds) == list(range(len(adds))), "seq is the avail position from 0"
    assert len(adds) == stats.requests
    assert len(reaps) == stats.completions
    kicks = Counter(e["sent"] for e in _by(drv, kind="kick"))
    assert kicks[True] == stats.kicks_sent
    assert kicks[False] == stats.kicks_suppressed
    assert len(_by(drv, kind="irq_recv")) == stats.interrupts
    for seq, reap in reaps.items():
        add, pop, push = adds[seq], pops[seq], pushes[seq]
        assert seq in published
        assert add["head"] == pop["head"] == push["head"] == reap["head"]
        assert reap["len"] == push["len"]
        assert add["ts"] < pop["ts"] <= push["ts"]
        assert reap["ts"] > add["ts"] and reap["lat_ns"] > 0
        assert [d[:2] for d in pop["descs"]] == [d[:2] for d in add["descs"]]
        assert [d[2] & F_WRITE for d in pop["descs"]] == [d[2] & F_WRITE for d in add["descs"]]
        assert pop["wlen"] == sum(d[1] for d in add["descs"] if d[2] & F_WRITE)
    return adds


def _ring_chain(view: Any, head: int) -> tuple[int | None, list[list[int]]]:
    """The chain at ``head`` as the shared descriptor table holds it: (indirect table
    address or None, [[addr, len, flags], ...])."""
    mem = view.memory
    out: list[list[int]] = []
    i = head
    for _ in range(view.size):
        addr, length, flags, nxt = DESC.unpack_from(mem, view.desc + 16 * i)
        if flags & F_INDIRECT:
            table = [list(DESC.unpack_from(mem, addr + 16 * j)[:3]) for j in range(length // 16)]
            return addr, table
        out.append([addr, length, flags])
        if not flags & F_NEXT:
            return None, out
        i = nxt
    raise AssertionError("descriptor loop")


def _device_irqs(events: list[dict[str, Any]], dev: str) -> tuple[int, dict[str, int]]:
    irqs = sum(1 for e in _by(events, dev=dev, side="device", kind="irq") if e["sent"])
    exits = _by(events, dev=dev, side="device", kind="proc", event="exit")
    assert len(exits) == 1, "the device process recorded its exit"
    return irqs, exits[0]["counters"]


def test_traced_blk_session(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (4 << 20))
    trace = tmp_path / "blk.jsonl"
    with kernel.boot(devices=[kernel.Blk(str(img))], trace=str(trace)) as k:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        for i in range(20):  # one at a time: every kick and interrupt
            k.sys.pwrite(fd, bytes([i]) * 4096, i * 4096)
        k.sys.fsync(fd)
        assert k.sys.pread(fd, 4096, 4096) == b"\x01" * 4096
        # a batch in flight at once (several chains per kick, some interrupts saved),
        # big enough for multi-segment (indirect) chains
        dev.block.set_max_segment_size(16384)  # 4 data segments: an indirect table
        done = Done()
        n = 16
        for i in range(n):
            dev.block.submit("read", i * 65536, 65536, done, kick=False)
        dev.block.kick()
        done.wait_for(n)
        assert all(isinstance(r, bytes) for r in done.results)
        k.sys.close(fd)
        # quiescent: the descriptors of the last batch are still in the ring
        view = dev.ring_layout(0)
        k.trace_sink.flush()
        last = _by(_events(trace), dev="vda", side="driver", kind="add")[-n:]
        in_ring = {a["seq"]: _ring_chain(view, a["head"]) for a in last}
        del view
        irq_metric = dev.metrics()["queues"][0]["interrupts_sent"]
    stats = dev.queues[0].stats
    events = _events(trace)
    adds = _check_requests(events, "vda", 0, stats)
    assert stats.requests == stats.completions == 20 + 1 + 1 + n
    # the payload decoders saw the requests
    kinds = Counter(a["payload"]["blk"]["type"] for a in adds.values())
    assert kinds["OUT"] == 20 and kinds["IN"] == 1 + n and kinds["FLUSH"] == 1
    reaps = _by(events, dev="vda", side="driver", kind="reap")
    assert all(r["payload"] == {"status": "OK"} for r in reaps)
    assert adds[3]["payload"]["blk"] == {"type": "OUT", "sector": 24, "sectors": 8}
    # every traced descriptor is what the shared ring holds
    for seq, (table, descs) in in_ring.items():
        assert adds[seq]["indirect"] == table
        assert adds[seq]["descs"] == descs
    assert any(t is not None for t, _ in in_ring.values()), "no indirect chain exercised"
    irqs, counters = _device_irqs(events, "vda")
    assert irqs == irq_metric == counters["interrupts"]
    assert counters["chains"] == len(_by(events, dev="vda", side="device", kind="pop"))
    # control and status made it too
    statuses = [e["new"] for e in _by(events, dev="vda", kind="status")]
    assert statuses[:4] == [1, 3, 11, 15] and statuses[-1] == 0
    ctl = {e["type"] for e in _by(events, dev="vda", kind="ctl")}
    assert {"SET_MEM_TABLE", "SET_VRING_ADDR", "SET_STATUS"} <= ctl
    pids = {e["pid"] for e in events if e["side"] == "device"}
    assert pids == {dev.pid}
    assert {e["kpid"] for e in events} == {os.getpid()}


def test_traced_udp_session(tmp_path: Path) -> None:
    trace = tmp_path / "net.jsonl"
    with kernel.boot(devices=[kernel.Net(backend="loopback", ip="10.0.0.2/24")], trace=trace) as k:
        nic = k.devices[0]
        server, client = k.sys.socket(), k.sys.socket()
        k.sys.bind(server, ("10.0.0.2", 7))
        k.sys.settimeout(server, 5.0)
        count = 12
        for i in range(count):
            k.sys.sendto(client, b"%d" % i * (i + 1), ("10.0.0.2", 7))
            data, _ = k.sys.recvfrom(server, 2048)
            assert data == b"%d" % i * (i + 1)
        k.sys.close(server)
        k.sys.close(client)
        # the receive buffers still posted are in the ring as the trace says
        view = nic.ring_layout(0)
        k.trace_sink.flush()
        now = _events(trace)
        reaped = {e["seq"] for e in _by(now, dev="eth0", q=0, kind="reap")}
        posted = [a for a in _by(now, dev="eth0", q=0, kind="add") if a["seq"] not in reaped]
        posted = posted[-nic.queues[0].dq.in_flight :]
        in_ring = {a["seq"]: _ring_chain(view, a["head"]) for a in posted}
        del view
        metrics = nic.metrics()["queues"]
    events = _events(trace)
    rx_adds = _check_requests(events, "eth0", 0, nic.queues[0].stats)
    tx_adds = _check_requests(events, "eth0", 1, nic.queues[1].stats)
    assert in_ring and all(rx_adds[s]["descs"] == d for s, (_, d) in in_ring.items())
    # the device kept the receive buffers and completed them later
    kept = _by(events, dev="eth0", q=0, side="device", kind="keep")
    assert len(kept) >= nic.queues[0].stats.completions
    frames = [a["payload"]["frame"] for a in tx_adds.values()]
    assert sum("UDP" in f and "> 7 len" in f for f in frames) == count
    rx_frames = [r["payload"]["frame"] for r in _by(events, dev="eth0", q=0, kind="reap")]
    assert sum("UDP" in f for f in rx_frames) == count
    assert all("gso_type" in a["payload"]["net"] for a in tx_adds.values())
    irqs, counters = _device_irqs(events, "eth0")
    assert irqs == counters["interrupts"]
    assert irqs == metrics[0]["interrupts_sent"] + metrics[1]["interrupts_sent"]


SCRIPT = textwrap.dedent(
    """
    import os, sys, tempfile
    import kernel

    img = tempfile.NamedTemporaryFile(delete=False)
    img.truncate(1 << 20)
    img.close()
    forever = sys.argv[1:] == ["forever"]
    try:
        with kernel.boot(devices=[kernel.Blk(img.name)]) as k:
            fd = k.sys.open("/dev/vda", os.O_RDWR)
            i = 0
            while True:
                k.sys.pwrite(fd, bytes([i % 256]) * 512, (i % 64) * 512)
                i += 1
                if i == 300:
                    print("ready", os.getpid(), flush=True)
                if i >= 5 and not forever:
                    break
            print("read", k.sys.pread(fd, 3, 0).hex(), flush=True)
    finally:
        os.unlink(img.name)
    """
)


def _vlab(*args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VLAB, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_vlab_trace_traces_an_unmodified_script(tmp_path: Path) -> None:
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT)
    out = tmp_path / "t.jsonl"
    r = _vlab("trace", "--format", "jsonl", "-o", str(out), "--", sys.executable, str(script))
    assert r.returncode == 0, r.stderr
    assert "read 000000" in r.stdout
    events = _events(out)
    adds = _by(events, side="driver", kind="add")
    assert len(adds) == 5 + 1
    assert {e["side"] for e in events} == {"driver", "device"}
    # the same trace as text, from the file, and live from a run
    text = _vlab("trace", "--input", str(out))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert len(lines) == len(events)
    assert sum(" add " in line and "blk OUT" in line for line in lines) == 5
    live = _vlab("trace", "--", sys.executable, str(script))
    assert live.returncode == 0, live.stderr
    assert sum(" reap " in line and "status OK" in line for line in live.stdout.splitlines()) == 6


def _wait_gone(pids: set[int], timeout: float = 20.0) -> None:
    """Wait (on pidfds, no sleeps) until every pid has exited."""
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            p = select.poll()
            p.register(fd, select.POLLIN)
            assert p.poll(timeout * 1000), f"process {pid} did not exit"
        finally:
            os.close(fd)


def test_sigkill_leaves_a_valid_trace(tmp_path: Path) -> None:
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT)
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(
        [
            *VLAB,
            "trace",
            "--format",
            "jsonl",
            "-o",
            str(out),
            "--",
            sys.executable,
            str(script),
            "forever",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        victim = int(line.split()[1])
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGKILL
    assert err.strip().splitlines() == [f"vlab: trace: {sys.executable}: killed by SIGKILL"]
    data = out.read_bytes()
    assert data.endswith(b"\n")
    with open(out, "rb") as f:
        events = list(read_events(f))
    dev_pids = {e["pid"] for e in events if e["side"] == "device"}
    _wait_gone(dev_pids)  # they notice their parent's death and exit, flushing
    sweep_stale_rundirs()  # what the next boot() does for a killed kernel
    sweep_stale_segments()
    with open(out, "rb") as f:
        events = list(read_events(f))
    assert len(_by(events, pid=victim, kind="add")) >= 250  # batches reached the file
    exits = _by(events, kind="proc", event="exit")
    assert [e["reason"] for e in exits] == ["parent gone"]
    text = _vlab("trace", "--input", str(out))
    assert text.returncode == 0, text.stderr


def test_bad_trace_files_give_one_line_naming_the_line(tmp_path: Path) -> None:
    good = (
        '{"v":1,"ts":1,"pid":2,"kpid":2,"dev":"vda","side":"driver","q":0,"kind":"add",'
        '"seq":0,"head":0,"descs":[[4096,16,1]],"indirect":null,"payload":null}\n'
    )
    cases = {
        "garbage.jsonl": (good + "this is not json\n" + good, "line 2: not JSON"),
        "torn.jsonl": (good + good[:50], "line 2: truncated line"),
        "schema.jsonl": (good + good.replace('"side":"driver"', '"side":"x"'), "line 2: 'side'"),
        "future.jsonl": (good.replace('"v":1', '"v":99'), "line 1: schema version 99"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        r = _vlab("trace", "--input", str(path))
        assert r.returncode == 1, (name, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], lines
        assert "Traceback" not in r.stderr
    missing = _vlab("trace", "--input", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1 and "not found" in missing.stderr
    usage = _vlab("trace")
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


def test_demo_prints_its_live_trace() -> None:
    r = _vlab("demo", "--trace", "--size", "1M")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "demo: OK" in lines
    trace = [line for line in lines if line.startswith("trace ")]
    assert any(" add " in t and "blk OUT" in t for t in trace)
    assert any(" reap " in t and "status OK" in t for t in trace)
    assert any(" reap " in t and "UDP" in t for t in trace)
    assert any(" add " in t and "ICMP echo request" in t for t in trace)
    assert any(" irq " in t and "sent=" in t for t in trace)
    summary = [line for line in lines if line.startswith("trace: ")]
    assert len(summary) == 1 and int(summary[0].split()[1]) == len(trace)
