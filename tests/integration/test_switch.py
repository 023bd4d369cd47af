"""The L2 switch process (``python -m vdev.switch``) with real ports.

Real parts only: the switch runs in a process of its own (launched with
``hostops.DeviceProcess``), its ports are :class:`vdev.net_switch.SwitchBackend` objects —
the very backend a net device uses — driven by a small :class:`~vdev.netbackend.FrameSink`
of this test on a :class:`vdev.switch.EventLoop`, and talk to it over ZeroMQ ``ipc://``.
A port that must die runs in a child process of its own. Assertions are on the frames
each port received and on the switch's per-port counters (``GET_STATS``). Nothing
sleeps: every wait is on the loop, a reply, or a process, with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from hostops.clock import monotonic
from hostops.process import DeviceProcess, python_argv
from hostops.rundir import RuntimeDir
from vdev.net_switch import SwitchBackend
from vdev.switch import EventLoop, SwitchClient, encode_hello
from vdev.virtio.net import GSO_TCPV4, HDR_F_NEEDS_CSUM, NetHdr
from vdev.virtio.packet import inet_checksum, ipv4_pseudo_sum

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TIMEOUT = 10.0
BCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes([2, 0, 0, 0, 0xAB, n])


def eth(dst: bytes, src: bytes, payload: bytes = b"\x00" * 46, ethertype: int = 0x88B5) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


# --------------------------------------------------------------------------- harness


class Sink:
    """The test's FrameSink: records frames, link changes and counters; ``buffers``
    says whether the "driver" has receive buffers."""

    def __init__(self, loop: EventLoop, name: str) -> None:
        self.loop = loop
        self.name = name
        self.frames: list[tuple[NetHdr, bytes]] = []
        self.link: bool | None = None
        self.counts: dict[str, int] = {}
        self.buffers = True

    def receive(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        if not self.buffers:
            return False
        self.frames.append((hdr, bytes(frame)))
        return True

    def rx_buffers_available(self) -> bool:
        return self.buffers

    def set_link(self, up: bool) -> None:
        self.link = up

    def watch(self, source: Any, callback: Callable[[], None]) -> None:
        self.loop.watch(source, callback)

    def unwatch(self, source: Any) -> None:
        self.loop.unwatch(source)

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Any:
        return self.loop.call_later(delay_s, callback)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def payloads(self) -> list[bytes]:
        return [f[14:] for _, f in self.frames]


def run_until(loop: EventLoop, done: Callable[[], bool], what: str, timeout: float = TIMEOUT):
    deadline = monotonic() + timeout
    while not done():
        remaining = deadline - monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {what}")
        loop.run_once(min(remaining, 0.5))


class Port:
    """One port: a SwitchBackend attached to a Sink."""

    def __init__(self, loop: EventLoop, endpoint: str, n: int, **kw: Any) -> None:
        self.mac = mac(n)
        self.sink = Sink(loop, f"p{n}")
        self.backend = SwitchBackend(endpoint, mac=self.mac, port_name=f"p{n}", **kw)
        self.backend.attach(self.sink)

    def send(self, frame: bytes, hdr: NetHdr | None = None) -> None:
        assert self.backend.send(hdr or NetHdr(), frame)


@pytest.fixture
def rundir() -> Iterator[RuntimeDir]:
    d = RuntimeDir.create()
    try:
        yield d
    finally:
        d.cleanup()


def start_switch(endpoint: str, *args: str, log: Path | None = None) -> DeviceProcess:
    proc = DeviceProcess.launch(
        python_argv("vdev.switch", "--listen", endpoint, *args),
        name="switch",
        log_path=str(log) if log else None,
    )
    try:
        with SwitchClient(endpoint) as c:  # the reply means it listens
            c.stats(timeout_s=TIMEOUT)
    except BaseException:
        proc.close()
        raise
    return proc


@pytest.fixture
def switch(rundir: RuntimeDir, tmp_path: Path) -> Iterator[tuple[str, DeviceProcess]]:
    ep = rundir.endpoint("sw")
    proc = start_switch(ep, log=tmp_path / "switch.log")
    try:
        yield ep, proc
    finally:
        proc.close()


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop()
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture
def ports(switch: tuple[str, DeviceProcess], loop: EventLoop) -> Iterator[list[Port]]:
    ep, _ = switch
    made = [Port(loop, ep, n) for n in (1, 2, 3)]
    try:
        run_until(loop, lambda: all(p.sink.link for p in made), "three links up")
        yield made
    finally:
        for p in made:
            p.backend.close()


def stats(endpoint: str) -> dict[str, Any]:
    with SwitchClient(endpoint) as c:
        return c.stats()


def by_name(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in st["ports"]}


# --------------------------------------------------------------------------- forwarding


def test_broadcast_floods_and_learned_unicast_reaches_only_its_port(
    switch: tuple[str, DeviceProcess], loop: EventLoop, ports: list[Port]
) -> None:
    ep, _ = switch
    a, b, c = ports
    station = bytes([2, 0, 0, 0, 0x5E, 1])  # a station "behind" port b: nobody registered it

    a.send(eth(BCAST, a.mac, b"bcast".ljust(46, b".")))
    run_until(loop, lambda: len(b.sink.frames) == 1 and len(c.sink.frames) == 1, "broadcast")
    a.send(eth(station, a.mac, b"unknown".ljust(46, b".")))  # unknown: flooded
    run_until(loop, lambda: len(b.sink.frames) == 2 and len(c.sink.frames) == 2, "flood")
    b.send(eth(BCAST, station, b"learn".ljust(46, b".")))  # the switch learns station -> b
    run_until(loop, lambda: len(a.sink.frames) == 1 and len(c.sink.frames) == 3, "learn")
    a.send(eth(station, a.mac, b"unicast".ljust(46, b".")))  # learned: b only
    a.send(eth(b.mac, a.mac, b"registered".ljust(46, b".")))  # registered at hello: b only
    a.send(eth(BCAST, a.mac, b"marker".ljust(46, b".")))  # FIFO: c sees it after anything
    run_until(loop, lambda: len(c.sink.frames) == 4 and len(b.sink.frames) == 5, "marker")

    assert [p[:6] for p in a.sink.payloads()] == [b"learn."]
    assert [p.rstrip(b".")[:10] for p in b.sink.payloads()] == [
        b"bcast",
        b"unknown",
        b"unicast",
        b"registered",
        b"marker",
    ]
    assert [p.rstrip(b".")[:10] for p in c.sink.payloads()] == [
        b"bcast",
        b"unknown",
        b"learn",
        b"marker",
    ]
    assert a.sink.frames[0][1][6:12] == station

    st = stats(ep)
    p = by_name(st)
    assert (p["p1"]["rx_frames"], p["p1"]["tx_frames"], p["p1"]["flooded"]) == (5, 1, 1)
    assert (p["p2"]["rx_frames"], p["p2"]["tx_frames"], p["p2"]["flooded"]) == (1, 5, 3)
    assert (p["p3"]["rx_frames"], p["p3"]["tx_frames"], p["p3"]["flooded"]) == (0, 4, 4)
    assert p["p2"]["tx_bytes"] == 5 * 60
    assert all(p[n]["dropped"] == 0 for n in ("p1", "p2", "p3"))
    sw = st["switch"]
    assert (sw["frames"], sw["forwarded"], sw["flooded"], sw["dropped"]) == (6, 2, 4, 0)
    macs = {m: port for m, port, _ in st["macs"]}
    assert macs["02:00:00:00:5e:01"] == p["p2"]["port"]
    # the backends counted the same traffic on their side
    assert a.backend.counters["switch_tx_frames"] == 5
    assert b.backend.counters["switch_rx_frames"] == 5
    assert c.sink.counts["switch_rx_frames"] == 4


_VICTIM = """
import sys
from vdev.net_switch import SwitchBackend
from vdev.switch import EventLoop

class Sink:
    def __init__(self, loop): self.loop = loop
    def receive(self, hdr, frame): return True
    def rx_buffers_available(self): return True
    def set_link(self, up):
        if up: print("link up", flush=True)
    def watch(self, s, cb): self.loop.watch(s, cb)
    def unwatch(self, s): self.loop.unwatch(s)
    def call_later(self, d, cb): return self.loop.call_later(d, cb)
    def count(self, name, n=1): pass

loop = EventLoop()
SwitchBackend(sys.argv[1], mac=bytes.fromhex(sys.argv[2]), port_name="victim").attach(Sink(loop))
loop.run()
"""


def test_a_port_whose_process_dies_is_removed_with_its_macs(
    switch: tuple[str, DeviceProcess], loop: EventLoop, ports: list[Port], tmp_path: Path
) -> None:
    ep, _ = switch
    a, b, c = ports
    victim_mac = mac(9)
    victim = DeviceProcess.launch(
        [sys.executable, "-c", _VICTIM, ep, victim_mac.hex()],
        name="victim",
        log_path=str(tmp_path / "victim.log"),
    )
    try:
        with SwitchClient(ep) as client:
            st = client.wait(lambda s: "victim" in by_name(s), TIMEOUT)
            assert "02:00:00:00:ab:09" in {m for m, _, _ in st["macs"]}
            victim.kill()
            assert victim.wait(TIMEOUT) == -signal.SIGKILL
            st = client.wait(lambda s: "victim" not in by_name(s), TIMEOUT)
    finally:
        victim.close()
    assert st["switch"]["ports"] == 3 and st["switch"]["ports_removed"] == 1
    assert "02:00:00:00:ab:09" not in {m for m, _, _ in st["macs"]}
    # its MAC is unknown again: a frame for it is flooded to the ports that are left
    a.send(eth(victim_mac, a.mac, b"after".ljust(46, b".")))
    run_until(loop, lambda: len(b.sink.frames) == 1 and len(c.sink.frames) == 1, "flood")
    assert b.sink.payloads()[0].startswith(b"after") and c.sink.payloads()[0].startswith(b"after")


def test_a_net_device_process_attaches_with_its_mac_and_leaves_with_its_process(
    switch: tuple[str, DeviceProcess], rundir: RuntimeDir, tmp_path: Path
) -> None:
    ep, _ = switch
    argv = ["net", "--backend", "switch", "--switch", ep, "--mac", "02:00:00:00:ab:42"]
    dev = DeviceProcess.launch(
        python_argv("vdev", *argv, "--control", rundir.endpoint("net0")),
        name="net0",
        log_path=str(tmp_path / "net0.log"),
    )
    try:
        with SwitchClient(ep) as client:
            st = client.wait(lambda s: f"net-{dev.pid}" in by_name(s), TIMEOUT)
            port = by_name(st)[f"net-{dev.pid}"]
            assert (port["mac"], port["pid"]) == ("02:00:00:00:ab:42", dev.pid)
            assert port["accepts"] == ["csum", "tso4"]  # the device shapes what it receives
            assert dev.stop(TIMEOUT) == 0
            st = client.wait(lambda s: f"net-{dev.pid}" not in by_name(s), TIMEOUT)
    finally:
        dev.close()
    assert "02:00:00:00:ab:42" not in {m for m, _, _ in st["macs"]}


def test_link_goes_down_with_the_switch_and_up_with_a_new_one(
    rundir: RuntimeDir, loop: EventLoop, tmp_path: Path
) -> None:
    ep = rundir.endpoint("sw")
    proc = start_switch(ep, log=tmp_path / "sw1.log")
    a = b = None
    try:
        a, b = Port(loop, ep, 1), Port(loop, ep, 2)
        run_until(loop, lambda: bool(a.sink.link and b.sink.link), "links up")
        proc.kill()  # SIGKILL: the socket file stays behind
        proc.close()
        run_until(loop, lambda: a.sink.link is False and b.sink.link is False, "links down")
        assert not a.backend.send(NetHdr(), eth(BCAST, a.mac))  # no carrier: dropped
        assert a.backend.counters["switch_tx_no_link"] == 1
        proc = start_switch(ep, log=tmp_path / "sw2.log")
        run_until(loop, lambda: bool(a.sink.link and b.sink.link), "links up again")
        a.send(eth(BCAST, a.mac, b"again".ljust(46, b".")))
        run_until(loop, lambda: len(b.sink.frames) == 1, "a frame through the new switch")
        assert b.sink.payloads()[0].startswith(b"again")
        assert a.backend.counters["switch_link_changes"] == 3  # up, down, up
        assert by_name(stats(ep))["p1"]["rx_frames"] == 1
    finally:
        for p in (a, b):
            if p is not None:
                p.backend.close()
        proc.close()


def test_without_receive_buffers_the_port_stops_reading_and_the_switch_drops(
    rundir: RuntimeDir, loop: EventLoop, tmp_path: Path
) -> None:
    ep = rundir.endpoint("sw")
    proc = start_switch(ep, "--hwm", "8", log=tmp_path / "switch.log")
    a = Port(loop, ep, 1)
    b = Port(loop, ep, 2, hwm=4)
    c = Port(loop, ep, 3)
    try:
        run_until(loop, lambda: all(p.sink.link for p in (a, b, c)), "links up")
        b.sink.buffers = False
        sent = 200
        big = b"z" * 30000
        for i in range(sent):
            a.send(eth(b.mac, a.mac, struct.pack("!I", i) + big))
        # The switch handles a port's messages in order: once c has the marker, every
        # frame for b was either queued for b or dropped.
        a.send(eth(c.mac, a.mac, b"marker".ljust(46, b".")))
        run_until(loop, lambda: len(c.sink.frames) == 1, "the marker")
        p2 = by_name(stats(ep))["p2"]
        assert p2["tx_frames"] + p2["dropped"] == sent
        assert p2["dropped"] > 0, "nothing was dropped: the port kept reading"
        assert b.sink.frames == [] and b.backend.counters["switch_rx_paused"] >= 1
        b.sink.buffers = True
        b.backend.resume_rx()
        run_until(loop, lambda: len(b.sink.frames) == p2["tx_frames"], "the queued frames")
        got = [struct.unpack("!I", f[14:18])[0] for _, f in b.sink.frames]
        assert got == sorted(got)  # in order; and exactly what the switch queued
        assert b.backend.counters["switch_rx_frames"] == p2["tx_frames"]
    finally:
        for p in (a, b, c):
            p.backend.close()
        proc.close()


def test_a_hostile_connection_is_answered_or_dropped_and_counted(
    switch: tuple[str, DeviceProcess], loop: EventLoop
) -> None:
    ep, proc = switch
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    good = Port(loop, ep, 1)
    try:
        raw.connect(ep)

        def answer() -> bytes:
            assert raw.poll(int(TIMEOUT * 1000)), "the switch did not answer"
            reply: bytes = raw.recv()
            return reply

        raw.send(b"")  # empty
        raw.send(b"Zjunk")  # unknown kind
        raw.send_multipart([b"F", b"x"])  # more than one part
        raw.send(b"F" + bytes(12) + eth(BCAST, mac(7)))  # a frame before hello
        assert answer() == b"R"
        raw.send(b"H\xc1")  # not msgpack
        assert answer().startswith(b"Ehello is not msgpack")
        raw.send(b"".join(encode_hello(name="raw", mac=mac(7), accepts=frozenset(), pid=0)))
        assert answer().startswith(b"W")
        raw.send(b"F" + b"short")  # no room for the header
        raw.send(b"F" + NetHdr(flags=1, gso_type=3, gso_size=9).pack() + eth(BCAST, mac(7)))
        raw.send(b"F" + bytes(12) + b"\x00" * 10)  # a runt
        big.connect(ep)
        big.send(b"F" + bytes(200_000))  # beyond the message size cap: connection dropped
        run_until(loop, lambda: bool(good.sink.link), "link up")
        raw.send(b"S")
        reply = answer()
        assert reply[:1] == b"s"
        st = msgpack.unpackb(reply[1:], raw=False)["stats"]
        sw = st["switch"]
        assert (sw["malformed"], sw["unregistered"], sw["ports_refused"]) == (3, 1, 1)
        assert (sw["bad_hdr"], sw["runts"], sw["unwatched_ports"]) == (2, 1, 1)
        assert by_name(st)["raw"]["dropped"] == 3
        # and the switch still switches: a broadcast from the good port reaches "raw"
        good.send(eth(BCAST, good.mac, b"still-alive".ljust(46, b".")))
        msg = answer()
        assert msg[:1] == b"F" and msg[13 + 14 :].startswith(b"still-alive")
        assert proc.alive()
    finally:
        good.backend.close()
        raw.close(0)
        big.close(0)


# --------------------------------------------------------------------------- offloads


def _tcp_superframe(dst: bytes, src: bytes, payload: bytes, mss: int) -> tuple[NetHdr, bytes]:
    sip, dip = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    tcp_len = 20 + len(payload)
    ip = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 7, 0x4000, 64, 6, 0, sip, dip)
    )
    ip[10:12] = struct.pack("!H", inet_checksum(ip))
    partial = ipv4_pseudo_sum(sip, dip, 6, tcp_len)
    tcp = struct.pack("!HHIIBBHHH", 4000, 5000, 1000, 0, 5 << 4, 0x18, 65535, partial, 0)
    hdr = NetHdr(
        flags=HDR_F_NEEDS_CSUM,
        gso_type=GSO_TCPV4,
        hdr_len=54,
        gso_size=mss,
        csum_start=34,
        csum_offset=16,
    )
    return hdr, dst + src + b"\x08\x00" + bytes(ip) + tcp + payload


def _tcp_ok(frame: bytes) -> bool:
    seg = frame[34:]
    return inet_checksum(seg, ipv4_pseudo_sum(frame[26:30], frame[30:34], 6, len(seg))) == 0


def test_offloaded_frames_cross_as_they_are_or_are_finished_per_port(
    switch: tuple[str, DeviceProcess], loop: EventLoop
) -> None:
    ep, _ = switch
    a = Port(loop, ep, 1)
    plain = Port(loop, ep, 2, accepts=frozenset())  # takes neither offload
    full = Port(loop, ep, 3)  # csum + tso4 (the default)
    try:
        run_until(loop, lambda: all(p.sink.link for p in (a, plain, full)), "links up")
        payload = bytes(range(256)) * 12  # 3072 bytes: 4 segments of 1000 (last 72)
        hdr, sf = _tcp_superframe(BCAST, a.mac, payload, 1000)
        a.send(sf, hdr)
        run_until(loop, lambda: len(plain.sink.frames) == 4 and full.sink.frames, "delivery")
        [(fh, ff)] = full.sink.frames
        assert (fh.gso_type, fh.gso_size, fh.flags) == (GSO_TCPV4, 1000, HDR_F_NEEDS_CSUM)
        assert ff == sf
        segs = plain.sink.frames
        assert all(h == NetHdr() for h, _ in segs)
        assert b"".join(f[54:] for _, f in segs) == payload
        assert all(_tcp_ok(f) for _, f in segs)
        st = stats(ep)
        assert st["switch"]["segmented"] == 1
        p = by_name(st)
        assert (p["p2"]["tx_frames"], p["p3"]["tx_frames"]) == (4, 1)
    finally:
        for p in (a, plain, full):
            p.backend.close()


# --------------------------------------------------------------------------- the CLI


def _run(argv: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        python_argv("vdev.switch", *argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "--listen"),
        (["--listen", "tcp://127.0.0.1:5555"], "not an ipc:// endpoint"),
        (["--listen", "ipc://"], "not an ipc:// endpoint"),
        (["--listen", "ipc:///tmp/x", "--age", "0"], "positive number"),
        (["--listen", "ipc:///tmp/x", "--age", "soon"], "not a number"),
        (["--listen", "ipc:///tmp/x", "--max-macs", "0"], "not in 1.."),
        (["--listen", "ipc:///tmp/x", "--tap", "a/b"], "not an interface name"),
        (["--listen", "ipc:///tmp/x", "--bogus"], "unrecognized arguments"),
        (["--listen", "ipc:///nonexistent-vlab-dir/sw.sock"], "cannot listen"),
    ],
)
def test_bad_options_exit_2_with_one_line(args: list[str], says: str) -> None:
    r = _run(args)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_an_endpoint_in_use_is_refused(switch: tuple[str, DeviceProcess]) -> None:
    ep, proc = switch
    r = _run(["--listen", ep])
    assert r.returncode == 2 and "in use" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert proc.alive()
    stats(ep)  # the first switch still serves


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_exits_0_removes_the_socket_and_prints_the_counters(
    rundir: RuntimeDir, loop: EventLoop, tmp_path: Path, sig: signal.Signals
) -> None:
    ep = rundir.endpoint("sw")
    log = tmp_path / "switch.log"
    proc = start_switch(ep, "--age", "30", log=log)
    try:
        a, b = Port(loop, ep, 1), Port(loop, ep, 2)
        run_until(loop, lambda: bool(a.sink.link and b.sink.link), "links up")
        a.send(eth(BCAST, a.mac))
        run_until(loop, lambda: len(b.sink.frames) == 1, "a frame")
        # A stats round trip: the switch has finished with the frame when it answers
        # (SIGINT is Python's KeyboardInterrupt, which may land mid-callback).
        assert by_name(stats(ep))["p2"]["tx_frames"] == 1
        os.kill(proc.pid, sig)
        assert proc.wait(TIMEOUT) == 0
        run_until(loop, lambda: a.sink.link is False, "link down")
        a.backend.close()
        b.backend.close()
    finally:
        proc.close()
    assert not os.path.exists(ep[len("ipc://") :])
    out = [line for line in log.read_text().splitlines() if line.startswith("{")]
    assert len(out) == 1
    final = json.loads(out[0])
    assert final["switch"]["frames"] == 1 and final["switch"]["flooded"] == 1
    assert by_name(final)["p2"]["tx_frames"] == 1
    assert "Traceback" not in log.read_text()
