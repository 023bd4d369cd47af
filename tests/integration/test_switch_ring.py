"""The switch's ring ports (``python -m vdev switch --ring-ports N``): virtio-net devices
served by the switch process itself, kernels attached to them with ``kernel.Attach``.

Real parts only: a real switch process, real kernels (in this process, or in a child
process of their own -- :mod:`ringpeer` -- when one must be SIGKILLed), the kernels'
real memfds mapped by the switch, real ZeroMQ doorbells. Data is compared byte for
byte; the switch's core counters (per port) and the ring devices' metrics (the
``rings`` list of the switch's stats) are compared with what was sent. Nothing sleeps:
every wait is a reply, a process, or a bounded series of stats round trips.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ringpeer import RingPeer

import kernel
from hostops.clock import monotonic
from hostops.process import DeviceProcess, python_argv
from hostops.rundir import RuntimeDir
from hostops.sync import start_thread
from kernel.errors import culprit_of
from kernel.files import SHUT_WR, SOCK_STREAM
from vdev.switch import SwitchClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TIMEOUT = 20.0
SOL_SOCKET, SO_RCVBUF = 1, 8


# --------------------------------------------------------------------------- harness


class RingSwitch:
    """``python -m vdev switch --listen EP --ring-ports N --ring-mtu M`` in ``rundir``;
    returns once it answers a stats request (its ring ports are bound by then)."""

    def __init__(self, rundir: RuntimeDir, ports: int, mtu: int, log: Path) -> None:
        self.rundir = rundir
        self.endpoint = rundir.endpoint("sw")
        self.log = log
        self.argv = ["--listen", self.endpoint, "--ring-ports", str(ports), "--ring-mtu", str(mtu)]
        self._launch()

    def _launch(self) -> None:
        self.proc = DeviceProcess.launch(
            python_argv("vdev", "switch", *self.argv), name="switch", log_path=str(self.log)
        )
        try:
            self.stats()
        except BaseException:
            self.proc.close()
            raise

    def restart(self) -> None:
        """SIGKILL the switch and start it again on the same endpoint."""
        self.proc.kill()
        self.proc.wait(TIMEOUT)
        self.proc.close()
        self._launch()

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def ring(self, i: int) -> str:
        """The control endpoint of ring port ``i``."""
        return f"{self.endpoint}.ring{i}"

    def stats(self) -> dict[str, Any]:
        with SwitchClient(self.endpoint) as c:
            return c.stats(timeout_s=TIMEOUT)

    def until(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Stats once ``predicate`` holds. Ring ports do not move the switch's
        generation (they are ports for the switch's whole life), so this is a bounded
        series of stats round trips (each one a real request to the switch)."""
        deadline = monotonic() + TIMEOUT
        with SwitchClient(self.endpoint) as c:
            for _ in range(10_000):
                st = c.stats(timeout_s=TIMEOUT)
                if predicate(st):
                    return st
                if monotonic() > deadline:
                    break
        raise AssertionError(f"the switch never showed {what}; last rings: {st['rings']}")

    def stop(self) -> None:
        """SIGTERM: exits 0, and every ring port's control socket and doorbell is gone
        with it (the run directory is empty again)."""
        code = self.proc.stop(TIMEOUT)
        self.proc.close()
        assert code == 0, self.log.read_text()
        left = sorted(os.listdir(self.rundir.path))
        assert left == [], f"the switch left {left} behind"
        text = self.log.read_text()
        assert "Traceback" not in text and "internal error" not in text, text


@pytest.fixture
def switches(tmp_path: Path) -> Iterator[Callable[..., RingSwitch]]:
    """``switches(ports, mtu=1500)`` starts a ring switch; all are stopped (and checked
    to leave nothing behind) at the end."""
    made: list[tuple[RingSwitch, RuntimeDir]] = []

    def start(ports: int, mtu: int = 1500) -> RingSwitch:
        rd = RuntimeDir.create()
        try:
            sw = RingSwitch(rd, ports, mtu, tmp_path / f"switch{len(made)}.log")
        except BaseException:
            rd.cleanup()
            raise
        made.append((sw, rd))
        return sw

    try:
        yield start
    finally:
        errors: list[BaseException] = []
        for sw, rd in made:
            try:
                sw.stop()
            except BaseException as e:  # reported after every switch is stopped
                errors.append(e)
            finally:
                sw.proc.close()
                rd.cleanup()
        if errors:
            raise errors[0]


def ring_of(st: dict[str, Any], i: int) -> dict[str, Any]:
    ring: dict[str, Any] = st["rings"][i]
    return ring


def port_of(st: dict[str, Any], number: int) -> dict[str, Any]:
    [port] = [p for p in st["ports"] if p["port"] == number]
    out: dict[str, Any] = port
    return out


def delta(after: dict[str, Any], before: dict[str, Any], *names: str) -> tuple[int, ...]:
    return tuple(after[n] - before[n] for n in names)


def udp_both_ways(
    ka: kernel.Kernel, ip_a: str, kb: kernel.Kernel, ip_b: str, sizes: list[int], seed: int
) -> None:
    """For each size, one datagram a -> b and one b -> a, each compared byte for byte
    (and its source address) on arrival."""
    rng = random.Random(seed)
    fa, fb = ka.sys.socket(), kb.sys.socket()
    try:
        for k, fd, port in ((ka, fa, 7001), (kb, fb, 7002)):
            k.sys.setsockopt(fd, SOL_SOCKET, SO_RCVBUF, 4 << 20)
            k.sys.bind(fd, ("0.0.0.0", port))
            k.sys.settimeout(fd, TIMEOUT)
        for n in sizes:
            data = rng.randbytes(n)
            ka.sys.sendto(fa, data, (ip_b, 7002))
            assert kb.sys.recvfrom(fb, 65536) == (data, (ip_a, 7001)), n
            data = rng.randbytes(n)
            kb.sys.sendto(fb, data, (ip_a, 7001))
            assert ka.sys.recvfrom(fa, 65536) == (data, (ip_b, 7002)), n
    finally:
        ka.sys.close(fa)
        kb.sys.close(fb)


def at_rest(ka: kernel.Kernel, ip_a: str, kb: kernel.Kernel, ip_b: str) -> None:
    """An echo answered each way: every frame either kernel sent before has been taken
    by its device (a transmit ring is served in order) and every frame for it delivered
    (the paths are FIFO) -- counters read now are at rest. A ping lost on the way (a
    receive ring without a free buffer drops it; no retransmission) is asked again, a
    bounded number of times."""
    for k, ip in ((ka, ip_b), (kb, ip_a)):
        for _ in range(5):
            try:
                if k.sys.ping(ip, count=1, timeout=2.0):
                    break
            except TimeoutError:
                continue
            except OSError as e:  # ENOBUFS: its transmit ring was full for a moment
                if e.errno != errno.ENOBUFS:
                    raise
        else:
            raise AssertionError(f"no echo from {ip} in 5 tries")


def _recv_to_eof(k: kernel.Kernel, fd: int) -> bytes:
    out = bytearray()
    while True:  # ends at EOF (or the socket's timeout)
        d = k.sys.recv(fd, 1 << 20)
        if not d:
            return bytes(out)
        out += d


def tcp_transfer(
    sender: kernel.Kernel, receiver: kernel.Kernel, receiver_ip: str, data: bytes, port: int
) -> None:
    """``data`` from ``sender`` to a listener of ``receiver`` over one connection; the
    receiver answers with the sha256 and length of what it read: both are compared, and
    the bytes themselves too."""
    lfd = receiver.sys.socket(type=SOCK_STREAM)
    receiver.sys.bind(lfd, ("0.0.0.0", port))
    receiver.sys.listen(lfd, 1)
    receiver.sys.settimeout(lfd, TIMEOUT)
    got: list[bytes] = []
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            c, _ = receiver.sys.accept(lfd)
            try:
                receiver.sys.settimeout(c, TIMEOUT)
                body = _recv_to_eof(receiver, c)
                got.append(body)
                reply = f"{hashlib.sha256(body).hexdigest()} {len(body)}".encode()
                receiver.sys.sendall(c, reply)
            finally:
                receiver.sys.close(c)
        except BaseException as e:  # reported by the test's thread
            errors.append(e)

    t = start_thread(serve, name="ring-tcp-sink")
    fd = sender.sys.socket(type=SOCK_STREAM)
    try:
        sender.sys.settimeout(fd, TIMEOUT)
        sender.sys.connect(fd, (receiver_ip, port))
        sender.sys.sendall(fd, data)
        sender.sys.shutdown(fd, SHUT_WR)
        reply = _recv_to_eof(sender, fd).decode()
    finally:
        sender.sys.close(fd)
        t.join(TIMEOUT)
        receiver.sys.close(lfd)
    assert not t.is_alive() and not errors, errors
    assert reply == f"{hashlib.sha256(data).hexdigest()} {len(data)}"
    assert got == [data]


# --------------------------------------------------------------------------- ring to ring


def test_udp_ring_to_ring_every_size_and_counters(switches: Callable[..., RingSwitch]) -> None:
    """Two kernels on two ring ports (MTU 65535): no device process -- the devices'
    pid is the switch's -- and datagrams of 64 B .. 65507 B cross both ways intact,
    one frame each; the switch's ports and the ring devices count exactly those."""
    sw = switches(2, mtu=65535)
    a = kernel.Attach(sw.ring(0), ip="10.0.0.1/24", offload=True)
    b = kernel.Attach(sw.ring(1), ip="10.0.0.2/24", offload=True)
    with kernel.boot(devices=[a]) as ka, kernel.boot(devices=[b]) as kb:
        da, db = ka.devices[0], kb.devices[0]
        assert da.pid == db.pid == sw.pid  # served by the switch itself
        assert da.mtu == db.mtu == 65535
        st = sw.stats()
        assert [r["attached"] for r in st["rings"]] == [True, True]
        assert [r["mac"] for r in st["rings"]] == [da.mac, db.mac]
        assert [r["endpoint"] for r in st["rings"]] == [sw.ring(0), sw.ring(1)]
        names = {p["port"]: p["name"] for p in st["ports"]}
        assert [names[r["port"]] for r in st["rings"]] == ["ring0", "ring1"]
        assert all(p["pid"] == sw.pid for p in st["ports"])
        assert ka.sys.ping("10.0.0.2", count=2, timeout=TIMEOUT)  # ARP resolved both ways
        before = sw.stats()
        ka_tx, kb_tx = da.tx_frames, db.tx_frames
        sizes = [64, 65, 1000, 1472, 1473, 4096, 9000, 30000, 65506, 65507]
        udp_both_ways(ka, "10.0.0.1", kb, "10.0.0.2", sizes, seed=1)
        after = sw.stats()
        n = len(sizes)  # datagrams each way, one frame each (no fragment at this MTU)
        assert (da.tx_frames - ka_tx, db.tx_frames - kb_tx) == (n, n)
        for i in (0, 1):
            r0, r1 = ring_of(before, i), ring_of(after, i)
            assert delta(r1["device"], r0["device"], "tx_frames", "rx_frames") == (n, n)
            assert delta(r1["device"], r0["device"], "tx_gso_frames", "rx_gso_frames") == (0, 0)
            assert r1["device"]["rx_dropped_no_buffer"] == 0
            assert r1["device"]["tx_bad_frames"] == r1["device"]["rx_bad_frames"] == 0
            p0, p1 = port_of(before, r0["port"]), port_of(after, r1["port"])
            assert delta(p1, p0, "rx_frames", "tx_frames", "dropped") == (n, n, 0)
        # the bytes: an Ethernet header, IPv4, UDP and the payload per frame
        wire = sum(14 + 20 + 8 + s for s in sizes)
        for i in (0, 1):
            number = ring_of(after, i)["port"]
            p0, p1 = port_of(before, number), port_of(after, number)
            assert delta(p1, p0, "rx_bytes", "tx_bytes") == (wire, wire)
        assert after["switch"]["dropped"] == after["switch"]["full"] == 0
        assert after["switch"]["callback_errors"] == 0
    st = sw.stats()  # both kernels gone: both ports free again
    assert [r["attached"] for r in st["rings"]] == [False, False]


def test_tcp_ring_to_ring_with_tso(switches: Callable[..., RingSwitch]) -> None:
    """2 MiB over TCP between two ring ports at MTU 1500, TSO on both: the sender's
    superframes cross as they are (counted tx_gso_frames by its ring device, rx_gso_frames
    by the receiver's) and arrive byte for byte; the switch's core counts every frame a
    ring device sent as received on its port, and every frame a ring device took as
    sent to its port."""
    sw = switches(2)
    a = kernel.Attach(sw.ring(0), ip="10.0.0.1/24", offload=True)
    b = kernel.Attach(sw.ring(1), ip="10.0.0.2/24", offload=True)
    with kernel.boot(devices=[a]) as ka, kernel.boot(devices=[b]) as kb:
        da, db = ka.devices[0], kb.devices[0]
        assert da.link is not None and db.link is not None
        assert da.link.tso4 and db.link.tso4
        assert ka.sys.ping("10.0.0.2", count=1, timeout=TIMEOUT)
        data = random.Random(2).randbytes(2 << 20)
        tcp_transfer(ka, kb, "10.0.0.2", data, 5001)
        tcp_transfer(kb, ka, "10.0.0.1", data[::-1], 5002)  # and the other way
        at_rest(ka, "10.0.0.1", kb, "10.0.0.2")  # the last ACKs included
        st = sw.stats()
        gso_a, gso_b = da.link.counters["tx_gso_frames"], db.link.counters["tx_gso_frames"]
        assert gso_a > 0 and gso_b > 0
        ra, rb = ring_of(st, 0), ring_of(st, 1)
        assert (ra["device"]["tx_gso_frames"], rb["device"]["tx_gso_frames"]) == (gso_a, gso_b)
        # The receiving driver takes TSO (GUEST_TSO4): superframes are not cut up. (A
        # superframe that finds its receiver without buffers is dropped whole, counted
        # in rx_dropped_no_buffer with the rest, and sent again by TCP.)
        for r, gso_sent in ((ra, gso_b), (rb, gso_a)):
            assert 0 < r["device"]["rx_gso_frames"] <= gso_sent
            assert r["device"]["rx_segments"] == 0
            if r["device"]["rx_dropped_no_buffer"] == 0:
                assert r["device"]["rx_gso_frames"] == gso_sent
        for r, d in ((ra, da), (rb, db)):
            dev, port = r["device"], port_of(st, r["port"])
            assert (dev["tx_frames"], dev["rx_frames"]) == (d.tx_frames, d.rx_frames)
            assert (port["rx_frames"], port["tx_frames"]) == (dev["tx_frames"], dev["rx_frames"])
            # a frame for a driver that has no receive buffer free is dropped by the
            # receiving device and counted by both (TCP sends it again)
            assert port["dropped"] == dev["rx_dropped_no_buffer"]
            assert dev["tx_bad_frames"] == dev["rx_bad_frames"] == 0
        # what one ring device sent is what the other took or dropped, nothing else
        for src, dst in ((ra, rb), (rb, ra)):
            s_dev, d_dev = src["device"], dst["device"]
            assert s_dev["tx_frames"] == d_dev["rx_frames"] + d_dev["rx_dropped_no_buffer"]
        assert st["switch"]["frames"] == ra["device"]["tx_frames"] + rb["device"]["tx_frames"]
    assert st["switch"]["segmented"] == 0  # nothing to adapt between two ring ports


# --------------------------------------------------------------------------- ring and ZeroMQ


@pytest.mark.parametrize("plain", ["ring", "zmq"])
def test_ring_port_and_zmq_port_udp_and_tcp(
    switches: Callable[..., RingSwitch], plain: str
) -> None:
    """A ring port and an ordinary ZeroMQ port (``kernel.Net(backend="switch")``, a
    device process) on one switch exchange UDP and TCP intact. The side named by
    ``plain`` has its offloads off: the TSO superframes the other side sends reach it
    cut into segments by its device (``rx_segments``), never as superframes."""
    sw = switches(1)
    ring_spec = kernel.Attach(sw.ring(0), ip="10.0.0.1/24", offload=plain != "ring")
    zmq_spec = kernel.Net(
        backend="switch", switch=sw.endpoint, ip="10.0.0.2/24", offload=plain != "zmq"
    )
    with kernel.boot(devices=[ring_spec]) as kr, kernel.boot(devices=[zmq_spec]) as kz:
        dr, dz = kr.devices[0], kz.devices[0]
        assert dr.pid == sw.pid and dz.pid not in (None, sw.pid)  # a process of its own
        assert dr.link is not None and dz.link is not None
        assert (dr.link.tso4, dz.link.tso4) == (plain != "ring", plain != "zmq")
        assert kz.sys.ping("10.0.0.1", count=1, timeout=TIMEOUT)
        before = sw.stats()
        tx_r, tx_z = dr.tx_frames, dz.tx_frames
        sizes = [64, 1472, 1473, 5000, 65507]  # fragmented at MTU 1500 beyond 1472
        udp_both_ways(kr, "10.0.0.1", kz, "10.0.0.2", sizes, seed=3)
        after = sw.stats()
        number = ring_of(before, 0)["port"]
        rp0, rp1 = port_of(before, number), port_of(after, number)
        [zp1] = [p for p in after["ports"] if p["pid"] == dz.pid]
        [zp0] = [p for p in before["ports"] if p["pid"] == dz.pid]
        # every frame one kernel sent reached the other port, none other
        sent_r, sent_z = dr.tx_frames - tx_r, dz.tx_frames - tx_z
        assert sent_r > len(sizes) and sent_z > len(sizes)  # fragments
        assert delta(rp1, rp0, "rx_frames", "tx_frames", "dropped") == (sent_r, sent_z, 0)
        assert delta(zp1, zp0, "rx_frames", "tx_frames", "dropped") == (sent_z, sent_r, 0)
        rd0, rd1 = ring_of(before, 0)["device"], ring_of(after, 0)["device"]
        assert delta(rd1, rd0, "tx_frames", "rx_frames") == (sent_r, sent_z)

        data = random.Random(4).randbytes(2 << 20)
        sender, receiver, receiver_ip = (kz, kr, "10.0.0.1") if plain == "ring" else (
            kr, kz, "10.0.0.2"
        )  # fmt: skip
        tcp_transfer(sender, receiver, receiver_ip, data, 5003)
        tx_link, rx_dev = (dz, dr) if plain == "ring" else (dr, dz)
        assert tx_link.link is not None
        gso_sent = tx_link.link.counters["tx_gso_frames"]
        assert gso_sent > 0
        at_rest(kr, "10.0.0.1", kz, "10.0.0.2")
        rx_metrics = rx_dev.metrics()["device"]
        # the superframes reached the plain driver only as segments its device cut
        assert rx_metrics["rx_gso_frames"] == 0
        assert rx_metrics["rx_segments"] > 0
        assert rx_dev.link is not None
        assert rx_dev.link.counters["rx_frames"] == rx_metrics["rx_frames"]
        # every segment cut was delivered or dropped for want of a receive buffer
        assert rx_metrics["rx_segments"] <= (
            rx_metrics["rx_frames"] + rx_metrics["rx_dropped_no_buffer"]
        )
        st = sw.stats()
        assert st["switch"]["segmented"] == 0  # the device cut them, not the switch
        ring = ring_of(st, 0)
        dropped = port_of(st, ring["port"])["dropped"]
        if plain == "ring":
            assert ring["device"]["rx_segments"] == rx_metrics["rx_segments"]
            # the switch counts a superframe refused, the device each segment it dropped
            assert dropped <= ring["device"]["rx_dropped_no_buffer"]
        else:
            assert ring["device"]["tx_gso_frames"] == gso_sent
            assert dropped == ring["device"]["rx_dropped_no_buffer"]


# --------------------------------------------------------------------------- attach and detach


def test_sigkilled_kernel_frees_its_ring_port_for_the_next(
    switches: Callable[..., RingSwitch],
) -> None:
    """A kernel (a child process) attached to ring port 0 is SIGKILLed: the switch
    resets the port at once (``attached`` False, ``kernels_gone`` 1), and a new kernel
    attaches to the same port and exchanges traffic with the kernel on port 1."""
    sw = switches(2)
    spec_b = kernel.Attach(sw.ring(1), ip="10.0.0.2/24")
    with kernel.boot(devices=[spec_b]) as kb:
        victim = RingPeer(endpoint=sw.ring(0), ip="10.0.0.1/24")
        try:
            assert victim.ready, victim.error
            assert kb.sys.ping("10.0.0.1", count=1, timeout=TIMEOUT)
            st = sw.stats()
            assert ring_of(st, 0)["attached"] and ring_of(st, 0)["mac"] == victim.mac
            victim.proc.kill()
            assert victim.proc.wait(TIMEOUT) == -signal.SIGKILL
            st = sw.until(lambda s: not ring_of(s, 0)["attached"], "ring port 0 detached")
            assert ring_of(st, 1)["attached"]  # the other port is not disturbed
        finally:
            victim.close()
        # a frame for the dead kernel (its MAC is still learned) is dropped and counted
        port0 = port_of(st, ring_of(st, 0)["port"])
        fd = kb.sys.socket()
        kb.sys.sendto(fd, b"for nobody", ("10.0.0.1", 9))
        kb.sys.close(fd)
        st2 = sw.until(lambda s: port_of(s, port0["port"])["dropped"] > 0, "a drop")
        assert delta(port_of(st2, port0["port"]), port0, "dropped", "tx_frames") == (1, 0)
        dev0, dev2 = ring_of(st, 0)["device"], ring_of(st2, 0)["device"]
        drops = ("rx_dropped_no_buffer", "rx_dropped_link_down")
        assert sum(delta(dev2, dev0, *drops)) == 1 and dev2["rx_frames"] == dev0["rx_frames"]
        assert st2["switch"]["callback_errors"] == 0
        # the dead kernel's own run directory is swept by the next boot (kernel.boot)
        with kernel.boot(devices=[kernel.Attach(sw.ring(0), ip="10.0.0.3/24")]) as ka:
            da = ka.devices[0]
            assert da.pid == sw.pid and da.mac == ring_of(st, 0)["mac"]
            assert da.metrics()["device"]["kernels_gone"] == 1
            assert sw.stats()["rings"][0]["attached"]
            assert ka.sys.ping("10.0.0.2", count=1, timeout=TIMEOUT)
            udp_both_ways(ka, "10.0.0.3", kb, "10.0.0.2", [64, 1472, 20000], seed=5)
            assert da.recovery["restarts"] == 0 and da.failed is None
    assert not [r for r in sw.stats()["rings"] if r["attached"]]


def test_the_switch_exits_under_attached_kernels_and_leaves_nothing(
    switches: Callable[..., RingSwitch],
) -> None:
    """SIGTERM while kernels are attached to its ring ports: the switch exits 0, its
    ring ports' control sockets and kick doorbells are gone at once; the kernels find
    their devices gone (EIO, "device-gone") and, shut down, take their own call
    doorbells with them -- the run directory is empty."""
    sw = switches(2)
    a = kernel.Attach(sw.ring(0), ip="10.0.0.1/24", reconnect_timeout=0.5)
    b = kernel.Attach(sw.ring(1), ip="10.0.0.2/24", reconnect_timeout=0.5)
    with kernel.boot(devices=[a]) as ka, kernel.boot(devices=[b]) as kb:
        assert ka.sys.ping("10.0.0.2", count=1, timeout=TIMEOUT)
        names = sorted(os.listdir(sw.rundir.path))
        assert names == [
            "sw",
            "sw.ring0",
            "sw.ring0.call",
            "sw.ring0.kick",
            "sw.ring1",
            "sw.ring1.call",
            "sw.ring1.kick",
        ]
        assert sw.proc.stop(TIMEOUT) == 0
        assert sorted(os.listdir(sw.rundir.path)) == ["sw.ring0.call", "sw.ring1.call"]
        for k in (ka, kb):
            failed = k.devices[0].wait_failed(TIMEOUT)
            assert failed is not None and culprit_of(failed) == "device-gone", failed
    assert os.listdir(sw.rundir.path) == []
    assert "Traceback" not in sw.log.read_text()


def test_a_second_kernel_of_the_same_process_is_refused(
    switches: Callable[..., RingSwitch],
) -> None:
    """A ring port in use by a kernel of this process: a second attach is refused at
    probe time with a one-line DeviceProbeError, and the first kernel goes on."""
    sw = switches(2)
    spec_b = kernel.Attach(sw.ring(1), ip="10.0.0.2/24")
    with kernel.boot(devices=[kernel.Attach(sw.ring(0), ip="10.0.0.1/24")]) as ka:
        with kernel.boot(devices=[spec_b]):
            with pytest.raises(kernel.DeviceProbeError) as ei:
                kernel.boot(devices=[kernel.Attach(sw.ring(0), ip="10.0.0.3/24")])
            msg = str(ei.value)
            assert "\n" not in msg
            assert f"a kernel of this process is attached to {sw.ring(0)} already" in msg
            assert ka.sys.ping("10.0.0.2", count=1, timeout=TIMEOUT)
            assert ka.devices[0].failed is None
            assert [r["attached"] for r in sw.stats()["rings"]] == [True, True]


def test_a_kernel_of_another_process_is_refused_a_busy_port(
    switches: Callable[..., RingSwitch],
) -> None:
    """A kernel of another process that attaches to a busy port is refused (a
    DeviceProbeError saying the device is in use), and the kernel attached first keeps
    its port."""
    sw = switches(2)
    with (
        kernel.boot(devices=[kernel.Attach(sw.ring(0), ip="10.0.0.1/24")]) as ka,
        kernel.boot(devices=[kernel.Attach(sw.ring(1), ip="10.0.0.2/24")]) as kb,
    ):
        assert ka.sys.ping("10.0.0.2", count=1, timeout=TIMEOUT)
        intruder = RingPeer(endpoint=sw.ring(0), ip="10.0.0.3/24", reconnect_timeout=2.0)
        try:
            assert not intruder.ready, "a kernel of another process took the busy port over"
            assert intruder.error.startswith("DeviceProbeError") and sw.ring(0) in intruder.error
            assert "in use" in intruder.error
        finally:
            intruder.close()
        assert kb.sys.ping("10.0.0.1", count=1, timeout=TIMEOUT)
        assert ka.devices[0].failed is None and ka.devices[0].recovery["recoveries"] == 0


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--ring-ports", "65"], "--ring-ports: 65 is not in 0..64"),
        (["--ring-ports", "x"], "--ring-ports: not a whole number: 'x'"),
        (["--ring-mtu", "10"], "--ring-mtu: 10 is not in 68..65535"),
    ],
)
def test_bad_ring_options_exit_2_with_one_line(args: list[str], says: str, tmp_path: Path) -> None:
    ep = f"ipc://{tmp_path}/sw.sock"
    r = subprocess.run(
        python_argv("vdev", "switch", "--listen", ep, *args),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert says in r.stderr, r.stderr
    assert r.stdout == ""
    assert os.listdir(tmp_path) == []  # it never listened


def test_vlab_bench_net_on_ring_ports_reports_them(tmp_path: Path) -> None:
    """``vlab bench net --ring``: both kernels on ring ports; the JSON says so and the
    rows carry traffic; ``--ring`` with ``--queue-pairs`` is a usage error."""
    import json
    import sys

    vlab = [sys.executable, "-m", "tools.cli", "bench", "net"]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run(
        [*vlab, "--ring", "--seconds", "0.2", "--json", "--only", "udp-1024"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.splitlines()[-1])
    assert doc["ports"] == "ring" and doc["queue_pairs"] == 1
    assert [row["name"] for row in doc["rows"]] == ["udp-1024"]
    assert doc["rows"][0]["virtio"] > 0 and doc["rows"][0]["native"] > 0
    bad = subprocess.run(
        [*vlab, "--ring", "--queue-pairs", "2"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_kernels_come_back_when_the_switch_is_restarted(
    switches: Callable[..., RingSwitch],
) -> None:
    """The switch is SIGKILLed under two attached kernels and started again on the same
    endpoint: each kernel finds its device without its state, brings it up again and
    resubmits its receive buffers (Attach's recovery), the ports keep their MACs (made
    from the endpoint), and traffic flows again."""
    sw = switches(2)
    with (
        kernel.boot(devices=[kernel.Attach(sw.ring(0), ip="10.0.0.1/24")]) as ka,
        kernel.boot(devices=[kernel.Attach(sw.ring(1), ip="10.0.0.2/24")]) as kb,
    ):
        assert ka.sys.ping("10.0.0.2", count=1, timeout=TIMEOUT)
        macs = [r["mac"] for r in sw.stats()["rings"]]
        assert macs == [ka.devices[0].mac, kb.devices[0].mac]
        sw.restart()
        for _ in range(20):  # bounded: the kernels notice and reconnect meanwhile
            try:
                if ka.sys.ping("10.0.0.2", count=1, timeout=1.0):
                    break
            except OSError:
                continue
        else:
            raise AssertionError(f"no ping after the restart: {ka.devices[0].recovery}")
        st = sw.until(lambda st: all(r["attached"] for r in st["rings"]), "both kernels back")
        assert [r["mac"] for r in st["rings"]] == macs
        for k in (ka, kb):
            dev = k.devices[0]
            assert dev.failed is None and dev.recovery["restarts"] >= 1, dev.recovery
        assert kb.sys.ping("10.0.0.1", count=1, timeout=TIMEOUT)
