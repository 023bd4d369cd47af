"""Hosted device sessions: several :class:`~vdev.runtime.DeviceRuntime` s served by one
:class:`vdev.switch.EventLoop` (what the switch does for its ring ports), driven by real
kernels of this process (``kernel.Attach``: the kernels' memfds, real ZeroMQ control
channels and doorbells, no device process).

A thread of the test runs the loop (:class:`LoopThread`); whatever must touch a hosted
session runs *on* that thread, between two rounds (:meth:`LoopThread.call`), as the
switch's own code would. Two virtio-net devices are wired to each other by a small
in-process backend (:class:`Wire`, a cable: what one transmits, the other receives --
from inside the sending session's drain, so the receiving session's interrupts are owed
and must be sent by its ``after_round``). Nothing sleeps: every wait is a kernel call
with a timeout, a thread join, or an event.
"""

from __future__ import annotations

import io
import os
import queue
import random
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import kernel
from hostops.rundir import RuntimeDir
from hostops.sync import start_thread
from vdev.examples.rng import RngDevice, SeededStream
from vdev.net import NetDevice
from vdev.netbackend import NetBackend
from vdev.runtime import DeviceRuntime
from vdev.session import DeviceSession
from vdev.switch import EventLoop
from vdev.virtio.errors import UsageError
from vdev.virtio.net import NetHdr
from vdev.virtio.packet import inet_checksum

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 20.0
MAC_A = bytes.fromhex("02000000aa01")
MAC_B = bytes.fromhex("02000000aa02")


# --------------------------------------------------------------------------- harness


class RecordingLoop(EventLoop):
    """The switch's loop, remembering which sessions it hosts right now."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions: list[DeviceSession] = []

    def host(self, session: Any) -> None:
        super().host(session)
        if session not in self.sessions:
            self.sessions.append(session)

    def unhost(self, session: Any) -> None:
        super().unhost(session)
        if session in self.sessions:
            self.sessions.remove(session)


class LoopThread:
    """Runs ``loop`` on a thread of its own; :meth:`call` runs a function on that
    thread between two rounds and returns its result."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self._jobs: queue.Queue[tuple[Callable[[], Any], list[Any], threading.Event]] = (
            queue.Queue()
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = start_thread(self._run, name="hosting-loop")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.loop.run_once(None)
            for _ in range(64):  # bounded: the test queues a handful
                try:
                    fn, out, done = self._jobs.get_nowait()
                except queue.Empty:
                    break
                try:
                    out.append(fn())
                except BaseException as e:  # handed to the caller
                    out.append(e)
                done.set()

    def call(self, fn: Callable[[], Any]) -> Any:
        out: list[Any] = []
        done = threading.Event()
        self._jobs.put((fn, out, done))
        self.loop.waker.wake()
        assert done.wait(TIMEOUT), "the loop thread did not run the job"
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self.loop.waker.wake()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the loop thread did not stop"
        self._thread = None


class Wire(NetBackend):
    """A cable between two devices: a frame one transmits is received by the other, at
    once, on the same loop (as a ring port's frame reaches another ring port)."""

    name = "wire"
    takes_views = True  # the other device's receive() copies the frame

    def __init__(self) -> None:
        super().__init__()
        self.peer: NetDevice | None = None

    def offloads(self) -> frozenset[str]:
        return frozenset({"csum", "tso4"})

    def send(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        return self.peer is not None and self.peer.receive(hdr, frame)


@dataclass
class Hosted:
    """Three devices hosted by one loop: an rng and two wired NICs."""

    rundir: RuntimeDir
    loop: RecordingLoop
    thread: LoopThread
    runtimes: dict[str, DeviceRuntime]
    logs: dict[str, io.StringIO]

    def endpoint(self, name: str) -> str:
        return self.runtimes[name].control_endpoint

    def socket_file(self, name: str) -> str:
        return self.endpoint(name)[len("ipc://") :]


@pytest.fixture
def hosted() -> Iterator[Hosted]:
    rundir = RuntimeDir.create()
    loop = RecordingLoop()
    thread = LoopThread(loop)
    wire_a, wire_b = Wire(), Wire()
    net_a = NetDevice(wire_a, mac=MAC_A)
    net_b = NetDevice(wire_b, mac=MAC_B)
    wire_a.peer, wire_b.peer = net_b, net_a
    devices = {"rng": RngDevice(seed=7), "net_a": net_a, "net_b": net_b}
    runtimes: dict[str, DeviceRuntime] = {}
    logs: dict[str, io.StringIO] = {}
    try:
        for name, device in devices.items():
            logs[name] = io.StringIO()
            rt = DeviceRuntime(
                device,
                rundir.endpoint(f"{name}.ctl"),
                watch_parent=False,
                log=logs[name],
                shm_by_name=True,
                poll_us=0,
                host=loop,
            )
            runtimes[name] = rt
            rt.start()  # before the loop thread runs: nothing else touches the loop
        thread.start()
        yield Hosted(rundir, loop, thread, runtimes, logs)
    finally:
        try:
            thread.stop()
        finally:
            for rt in runtimes.values():
                rt.close()
            hosting, errors = list(loop.sessions), loop.callback_errors
            loop.close()
            left = sorted(os.listdir(rundir.path))
            rundir.cleanup()
        assert hosting == [] and errors == 0, (hosting, errors)
        assert left == [], f"left behind: {left}"
        for name, log in logs.items():
            assert "internal error" not in log.getvalue(), (name, log.getvalue())


def udp_frame(dst_mac: bytes, src_ip: str, dst_ip: str, dport: int, payload: bytes) -> bytes:
    """An Ethernet/IPv4/UDP frame (UDP checksum 0: none, RFC 768)."""
    sip, dip = bytes(map(int, src_ip.split("."))), bytes(map(int, dst_ip.split(".")))
    udp = struct.pack("!HHHH", 9999, dport, 8 + len(payload), 0) + payload
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, sip, dip))
    ip[10:12] = struct.pack("!H", inet_checksum(bytes(ip)))
    return dst_mac + bytes.fromhex("02000000aa09") + b"\x08\x00" + bytes(ip) + udp


# --------------------------------------------------------------------------- serving


def test_hosted_devices_serve_kernels(hosted: Hosted) -> None:
    """An rng and two NICs in one loop: one kernel reads the rng's seeded stream and
    talks UDP (fragments included) with a second kernel over the wired NICs, both ways,
    byte for byte. The devices say they are served by this process."""
    rng_spec = kernel.Attach(hosted.endpoint("rng"))
    a_spec = kernel.Attach(hosted.endpoint("net_a"), ip="10.0.0.1/24")
    b_spec = kernel.Attach(hosted.endpoint("net_b"), ip="10.0.0.2/24")
    with kernel.boot(devices=[rng_spec, a_spec]) as ka, kernel.boot(devices=[b_spec]) as kb:
        assert [d.pid for d in (*ka.devices, *kb.devices)] == [os.getpid()] * 3
        fd = ka.sys.open("/dev/hwrng")
        got = b""
        for _ in range(100):  # bounded: each read returns at least one byte
            got += ka.sys.read(fd, 4096 - len(got))
            if len(got) == 4096:
                break
        ka.sys.close(fd)
        assert got == SeededStream(7).read(4096)
        assert ka.sys.ping("10.0.0.2", count=2, timeout=TIMEOUT)
        fa, fb = ka.sys.socket(), kb.sys.socket()
        ka.sys.bind(fa, ("0.0.0.0", 7001))
        kb.sys.bind(fb, ("0.0.0.0", 7002))
        ka.sys.settimeout(fa, TIMEOUT)
        kb.sys.settimeout(fb, TIMEOUT)
        r = random.Random(1)
        for n in (1, 1472, 1473, 9000, 30000):
            data = r.randbytes(n)
            ka.sys.sendto(fa, data, ("10.0.0.2", 7002))
            assert kb.sys.recvfrom(fb, 65536) == (data, ("10.0.0.1", 7001))
            data = r.randbytes(n)
            kb.sys.sendto(fb, data, ("10.0.0.1", 7001))
            assert ka.sys.recvfrom(fa, 65536) == (data, ("10.0.0.2", 7002))
        net_a = hosted.runtimes["net_a"].device
        net_b = hosted.runtimes["net_b"].device
        sent_a, sent_b = ka.devices[1].tx_frames, kb.devices[0].tx_frames
        m_a, m_b = hosted.thread.call(lambda: (net_a.metrics.snapshot(), net_b.metrics.snapshot()))
        assert (m_a["tx_frames"], m_b["rx_frames"]) == (sent_a, sent_a)
        assert (m_b["tx_frames"], m_a["rx_frames"]) == (sent_b, sent_b)
        assert m_a["rx_dropped_no_buffer"] == m_b["rx_dropped_no_buffer"] == 0
        assert len(hosted.loop.sessions) == 3
    for rt in hosted.runtimes.values():  # every kernel detached: reset, still serving
        assert not rt.driver_ok and not rt.session.stopping


def test_interrupts_owed_by_a_completion_outside_the_drain(hosted: Hosted) -> None:
    """A frame handed to a NIC from outside its session's drain (here: between two
    rounds; on the switch: from another ring port's drain) completes one of the
    buffers the device keeps: the session owes the driver an interrupt, so
    ``round_timeout()`` is 0 -- the loop must not sleep -- until ``after_round`` has
    sent it; the kernel gets the datagram."""
    a_spec = kernel.Attach(hosted.endpoint("net_a"), ip="10.0.0.1/24")
    with kernel.boot(devices=[a_spec]) as ka:
        fd = ka.sys.socket()
        ka.sys.bind(fd, ("0.0.0.0", 7001))
        ka.sys.settimeout(fd, TIMEOUT)
        rt = hosted.runtimes["net_a"]
        device = rt.device
        assert isinstance(device, NetDevice)
        session = rt.session
        payload = b"owed interrupt" * 10
        frame = udp_frame(MAC_A, "10.0.0.9", "10.0.0.1", 7001, payload)

        def inject() -> tuple[float | None, bool]:
            taken = device.receive(NetHdr(), frame)
            return session.round_timeout(), taken

        # The driver's receive buffers are taken a budget per round: once they all are,
        # the session has nothing to do and no timer -- the loop may sleep for it.
        for _ in range(100):  # bounded: 256 buffers take a few rounds
            if hosted.thread.call(session.round_timeout) is None:
                break
        else:
            raise AssertionError("the session never came to rest")
        owed, taken = hosted.thread.call(inject)
        assert taken and owed == 0.0
        assert ka.sys.recvfrom(fd, 65536) == (payload, ("10.0.0.9", 9999))
        assert hosted.thread.call(session.round_timeout) is None  # nothing owed now
        ka.sys.close(fd)


# --------------------------------------------------------------------------- misuse


def test_a_hosted_session_has_no_loop_of_its_own(hosted: Hosted) -> None:
    session = hosted.runtimes["rng"].session
    with pytest.raises(UsageError, match="hosted session"):
        hosted.thread.call(session.run_once)
    assert session in hosted.loop.sessions  # refused, and still hosted


def test_hosting_refuses_polling_signals_and_the_parent_watch() -> None:
    loop = RecordingLoop()
    rundir = RuntimeDir.create()
    try:
        ep = rundir.endpoint("rng.ctl")
        for kw in (
            {"poll_us": 200.0, "watch_parent": False},
            {"poll_us": 0, "watch_parent": True},
            {"poll_us": 0, "watch_parent": False, "signal_wakeup": True},
        ):
            with pytest.raises(UsageError, match="hosted runtime"):
                DeviceRuntime(RngDevice(), ep, host=loop, **kw)
        # a session that busy-polls cannot join a host either
        rt = DeviceRuntime(RngDevice(), ep, watch_parent=False, poll_us=200)
        try:
            with pytest.raises(UsageError, match="poll_us=0"):
                rt.session.open(loop)
            assert loop.sessions == []
            with pytest.raises(UsageError, match="hosted runtime"):
                rt.start()  # start() is for a hosted runtime
        finally:
            rt.close()
        assert os.listdir(rundir.path) == []  # nothing was bound
    finally:
        loop.close()
        rundir.cleanup()


def test_stop_closes_a_hosted_runtime_and_the_others_go_on(hosted: Hosted) -> None:
    """``stop()`` on a hosted runtime (on the loop's thread, as the switch would) closes
    it at once: its control socket is gone and the loop no longer hosts it; the other
    devices in the loop still serve a kernel."""
    rng = hosted.runtimes["rng"]
    path = hosted.socket_file("rng")
    assert os.path.exists(path)
    hosted.thread.call(lambda: rng.stop("test"))
    assert not os.path.exists(path)
    assert rng.session not in hosted.loop.sessions and len(hosted.loop.sessions) == 2
    assert rng.exit_reason == "test"
    with pytest.raises(kernel.DeviceProbeError, match="nothing is listening"):
        kernel.boot(devices=[kernel.Attach(hosted.endpoint("rng"))])
    a_spec = kernel.Attach(hosted.endpoint("net_a"), ip="10.0.0.1/24")
    b_spec = kernel.Attach(hosted.endpoint("net_b"), ip="10.0.0.2/24")
    with kernel.boot(devices=[a_spec]) as ka, kernel.boot(devices=[b_spec]):
        assert ka.sys.ping("10.0.0.2", count=1, timeout=TIMEOUT)
