"""The trace formats on real traces (real device processes, real shared memory, real
ZeroMQ): a TCP session over a loopback NIC traced end to end (every request's add →
publish → pop → push → reap, counts equal to the queue counters), its Perfetto JSON
validated, its pcapng read and dissected by ``tshark``, ``vlab trace stats`` equal to the
queue counters, ``vlab trace --format pcapng|perfetto -- PROGRAM``, and the rings that
``vlab trace ring`` reconstructs from the trace alone equal to the shared ring's bytes."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import kernel
from hostops.sync import Condition, Lock, start_thread
from kernel.files import SHUT_WR, SOCK_STREAM
from tests.integration.test_trace import VLAB, _by, _check_requests, _events
from tests.interop_require import require
from tests.unit.test_trace_formats import parse_pcapng, validate_trace_events
from vdev.virtio.trace_formats import RingState, queue_stats, ring_steps

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 60
DESC = struct.Struct("<QIHH")
USED = struct.Struct("<II")


def _vlab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VLAB, *args], cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )


def _tcp_session(k: Any, size: int) -> bytes:
    """Server and client sockets on one kernel, ``size`` bytes client → server and an
    echo of the first 1000 back; returns what the server received."""
    lfd = k.sys.socket(type=SOCK_STREAM)
    k.sys.bind(lfd, ("10.0.0.2", 9000))
    k.sys.listen(lfd, 4)
    cfd = k.sys.socket(type=SOCK_STREAM)
    k.sys.settimeout(cfd, 20.0)
    k.sys.settimeout(lfd, 20.0)
    k.sys.connect(cfd, ("10.0.0.2", 9000))
    sfd, _ = k.sys.accept(lfd)
    k.sys.settimeout(sfd, 20.0)
    got: list[bytes] = []

    def serve() -> None:
        while True:
            chunk = k.sys.recv(sfd, 65536)
            if not chunk:
                break
            got.append(chunk)
        k.sys.sendall(sfd, b"".join(got)[:1000])
        k.sys.shutdown(sfd, SHUT_WR)

    t = start_thread(serve, name="tcp-server")
    data = bytes(range(256)) * (size // 256)
    k.sys.sendall(cfd, data)
    k.sys.shutdown(cfd, SHUT_WR)
    echo = b""
    while True:
        chunk = k.sys.recv(cfd, 4096)
        if not chunk:
            break
        echo += chunk
    t.join(20.0)
    assert echo == data[:1000]
    for fd in (cfd, sfd, lfd):
        k.sys.close(fd)
    return b"".join(got)


def test_traced_tcp_session_and_its_formats(tmp_path: Path) -> None:
    trace = tmp_path / "tcp.jsonl"
    size = 256 * 1024
    with kernel.boot(devices=[kernel.Net(backend="loopback", ip="10.0.0.2/24")], trace=trace) as k:
        nic = k.devices[0]
        assert _tcp_session(k, size) == bytes(range(256)) * (size // 256)
    rxq, txq = nic.queues[0].stats, nic.queues[1].stats
    events = _events(trace)
    rx_adds = _check_requests(events, "eth0", 0, rxq)
    tx_adds = _check_requests(events, "eth0", 1, txq)
    assert rx_adds and tx_adds
    frames = [a["payload"]["frame"] for a in tx_adds.values()]
    assert any("TCP" in f and "[S]" in f for f in frames)
    assert any("TCP" in f and "F" in f.split("[")[1].split("]")[0] for f in frames if "[" in f)
    # every transmitted frame is in the trace, whole
    assert all(len(a["frame_hex"]) == 2 * a["frame_len"] for a in tx_adds.values())

    # stats: equal to the queues' own counters
    stats = queue_stats(events)
    for name, qs in (("eth0:0", rxq), ("eth0:1", txq)):
        s = stats[name]
        assert s["requests"] == qs.requests
        assert s["completions"] == qs.completions
        assert s["kicks_sent"] == qs.kicks_sent
        assert s["kicks_suppressed"] == qs.kicks_suppressed
        assert s["interrupts"] == qs.interrupts
        lats = sorted(r["lat_ns"] for r in _by(events, dev="eth0", q=int(name[-1]), kind="reap"))
        assert s["latency_ns"]["max"] == lats[-1]
        assert s["latency_ns"]["p50"] == lats[(len(lats) + 1) // 2 - 1]
        assert sum(s["occupancy"].values()) > 0
    r = _vlab("trace", "stats", str(trace), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(json.dumps(stats))

    # Perfetto
    perf = tmp_path / "tcp.json"
    r = _vlab("trace", "convert", str(trace), "-o", str(perf), "--format", "perfetto")
    assert r.returncode == 0, r.stderr
    text = perf.read_text()
    doc = json.loads(text)
    phases = validate_trace_events(text)  # incl. every Perfetto importer rule
    assert phases["b"] == rxq.requests + txq.requests
    pids = {e["pid"] for e in doc["traceEvents"] if e["ph"] == "X"}
    assert pids == {os.getpid(), nic.pid}
    assert phases["s"] >= rxq.completions + txq.completions  # push -> reap at least

    # pcapng, dissected by tshark
    pcap = tmp_path / "tcp.pcapng"
    r = _vlab("trace", "convert", str(trace), "-o", str(pcap), "--format", "pcapng")
    assert r.returncode == 0, r.stderr
    _, packets = parse_pcapng(pcap.read_bytes())
    rx_packets = [
        e
        for e in _by(events, dev="eth0", q=0, kind="reap")
        if "frame_hex" in e and not e["payload"].get("cont")
    ]
    assert len(packets) == len(tx_adds) + len(rx_packets)
    tshark = shutil.which("tshark")
    require(tshark is not None, "tshark is not installed")
    assert tshark is not None
    fields = ["frame.interface_name", "frame.protocols", "tcp.srcport", "tcp.seq_raw", "tcp.len"]
    out = subprocess.run(
        [tshark, "-r", str(pcap), "-T", "fields", *(x for f in fields for x in ("-e", f))],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert len(rows) == len(packets)
    assert all(row[1].startswith(("eth:ethertype:ip:tcp", "eth:ethertype:arp")) for row in rows), {
        row[1] for row in rows
    }
    assert {row[0] for row in rows} == {"eth0 q1 tx", "eth0 q0 rx"}
    # the payload bytes, each segment counted once (a retransmission is the same one):
    # out through the transmit queue and in through the receive queue
    for iface in ("eth0 q1 tx", "eth0 q0 rx"):
        segments = {(r[2], r[3], r[4]) for r in rows if r[0] == iface and r[4]}
        by_port: dict[str, int] = {}
        for port, _, length in segments:
            by_port[port] = by_port.get(port, 0) + int(length)
        assert sorted(by_port.values()) == [1000, size], (iface, by_port)


SCRIPT = textwrap.dedent(
    """
    import kernel
    with kernel.boot(devices=[kernel.Net(backend="loopback", ip="10.0.0.2/24")]) as k:
        s, c = k.sys.socket(), k.sys.socket()
        k.sys.bind(s, ("10.0.0.2", 7))
        k.sys.settimeout(s, 5.0)
        for i in range(5):
            k.sys.sendto(c, b"x" * (i + 1), ("10.0.0.2", 7))
            k.sys.recvfrom(s, 100)
    print("done")
    """
)


def test_vlab_trace_program_as_pcapng_and_perfetto(tmp_path: Path) -> None:
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT)
    pcap = tmp_path / "p.pcapng"
    r = _vlab("trace", "--format", "pcapng", "-o", str(pcap), "--", sys.executable, str(script))
    assert r.returncode == 0, r.stderr
    assert "done" in r.stdout
    _, packets = parse_pcapng(pcap.read_bytes())
    udp = [p for p in packets if p["data"][23:24] == b"\x11"]
    assert len(udp) == 10  # 5 sent, 5 received
    assert sorted(len(p["data"]) for p in udp) == sorted(2 * [42 + i + 1 for i in range(5)])
    perf = tmp_path / "p.json"
    r = _vlab("trace", "--format", "perfetto", "-o", str(perf), "--", sys.executable, str(script))
    assert r.returncode == 0, r.stderr
    phases = validate_trace_events(perf.read_text())
    assert phases["b"] == phases["e"] > 0 and phases["C"] > 0


def _real_ring(view: Any) -> RingState:
    """The rings as the shared memory holds them."""
    mem, n = view.memory, view.size
    st = RingState(n)
    for i in range(n):
        st.desc[i] = DESC.unpack_from(mem, view.desc + 16 * i)
    st.avail_flags, st.avail_idx = struct.unpack_from("<HH", mem, view.avail)
    st.avail = {i: struct.unpack_from("<H", mem, view.avail + 4 + 2 * i)[0] for i in range(n)}
    (st.used_event,) = struct.unpack_from("<H", mem, view.avail + 4 + 2 * n)
    st.used_flags, st.used_idx = struct.unpack_from("<HH", mem, view.used)
    st.used = {i: USED.unpack_from(mem, view.used + 4 + 8 * i) for i in range(n)}
    (st.avail_event,) = struct.unpack_from("<H", mem, view.used + 4 + 8 * n)
    return st


def test_ring_view_equals_the_shared_ring(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    trace = tmp_path / "ring.jsonl"
    qsize = 16
    with kernel.boot(devices=[kernel.Blk(str(img), queue_size=qsize)], trace=trace) as k:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        for i in range(3 * qsize + 5):  # the ring wraps three times
            k.sys.pwrite(fd, bytes([i]) * 512, (i % 64) * 512)
        blk = dev.block
        assert blk is not None
        blk.set_max_segment_size(4096)  # a batch with indirect chains
        done: list[Any] = []
        cond = Condition(Lock())

        def cb(result: Any) -> None:
            with cond:
                done.append(result)
                cond.notify_all()

        for i in range(6):
            blk.submit("read", i * 16384, 16384, cb, kick=False)
        blk.kick()
        with cond:
            assert cond.wait_for(lambda: len(done) == 6, 20.0)
        k.sys.close(fd)
        # quiescent: nothing in flight, and both sides armed -- hybrid polling arms a
        # ring when its window ends: the device's ended before it answers a control
        # request (the round after its last drain), the kernel's is waited for; the
        # device process's last events reach the file at the latest when it exits
        # (after this, only control messages follow)
        dev.metrics()
        dev.metrics()
        assert dev.transport.wait_armed(20.0)
        real = _real_ring(dev.ring_layout(0))
        stats = dev.queues[0].stats
    events = _events(trace)
    steps = ring_steps(events, "vda", 0)
    model = RingState()
    for _, ops in steps:
        model.apply(ops)
    r = _vlab("trace", "ring", str(trace), "--queue", "vda:0")
    html = tmp_path / "ring.html"
    rh = _vlab("trace", "ring", str(trace), "--queue", "vda:0", "--html", str(html))
    assert model.size == qsize
    assert (model.avail_idx, model.used_idx) == (real.avail_idx, real.used_idx)
    assert model.avail_idx == stats.requests & 0xFFFF
    assert model.last_avail == model.used_idx == model.last_used == stats.completions
    assert model.avail == real.avail  # every slot was written (it wrapped)
    assert model.used == real.used
    assert model.desc == {i: real.desc[i] for i in model.desc}
    # the trace names every descriptor the driver ever wrote (the rest are still zero)
    assert set(model.desc) == {i for i, d in real.desc.items() if d != (0, 0, 0, 0)}
    assert any(d[2] & 4 for d in model.desc.values()), "an indirect descriptor"
    # the event indices and flags words exactly: each side's writes are traced
    # (kick_mode / irq_mode, §2.7.10), not only what the other side last read
    assert (model.avail_event, model.used_event) == (real.avail_event, real.used_event)
    assert (model.avail_flags, model.used_flags) == (real.avail_flags, real.used_flags)
    assert model.avail_event == model.last_avail and model.used_event == model.last_used
    assert any(e["kind"] == "kick_mode" and e["side"] == "device" for e in events)
    assert any(e["kind"] == "irq_mode" and e["side"] == "driver" for e in events)
    assert r.returncode == 0, r.stderr
    assert f"avail.idx {real.avail_idx}  used.idx {real.used_idx}" in r.stdout
    assert f"avail_event {real.avail_event}  used_event {real.used_event}" in r.stdout
    assert rh.returncode == 0, rh.stderr
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script>" in page
