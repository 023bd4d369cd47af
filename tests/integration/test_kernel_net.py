"""The kernel's virtio-net driver against the real net device process (loopback backend):
frames go out through the transmit ring and come back through the receive ring."""

from __future__ import annotations

import os
import struct

import pytest

import kernel
from hostops.sync import Condition, Lock
from kernel.net.link import NO_OFFLOAD, RxInfo
from vdev.virtio.net import format_mac

pytestmark = pytest.mark.integration


class Collector:
    """Frames the link hands up, with a wait for a count (no sleeps)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.infos: list[RxInfo] = []
        self._cond = Condition(Lock())

    def __call__(self, frame: bytes | memoryview, info: RxInfo) -> None:
        with self._cond:
            self.frames.append(bytes(frame))
            self.infos.append(info)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[bytes]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.frames) >= n, timeout)
            assert ok, f"got {len(self.frames)} of {n} frames"
            return list(self.frames)


def _frame(mac: bytes, size: int, seq: int) -> bytes:
    """An Ethernet frame to ourselves with an experimental ethertype and a payload that
    encodes its size and sequence number."""
    head = mac + mac + b"\x88\xb5"
    body = struct.pack(">II", size, seq)
    fill = bytes((seq + i) & 0xFF for i in range(size - len(head) - len(body)))
    return head + body + fill


def _send_windowed(link, frames, got: Collector, window: int) -> None:
    """Send ``frames`` at most ``window`` ahead of what came back: a NIC drops what
    finds no receive buffer, so a test that wants every frame back paces itself."""
    for i in range(0, len(frames), window):
        _send_all(link, frames[i : i + window])
        got.wait_for(min(len(frames), i + window))


def _send_all(link, frames, *, reap: bool = False) -> None:
    """Transmit every frame; on ENOBUFS wait for the transmit interrupt (or, with
    ``reap``, when the interrupt thread is deliberately blocked, reap the transmit
    ring ourselves: bounded, the device is working on it)."""
    for f in frames:
        for _ in range(100000):
            try:
                link.transmit(f, NO_OFFLOAD)
                break
            except OSError as e:
                if e.errno != 105:  # ENOBUFS: wait for room, then retry
                    raise
                if reap:
                    link.transport.service_queue(link.txq)
                else:
                    link.wait_tx_room(1.0)
        else:
            raise AssertionError("the transmit ring never drained")


def test_loopback_every_frame_size_comes_back_intact() -> None:
    mtu = 1500
    with kernel.boot(devices=[kernel.Net(backend="loopback", mtu=mtu, queue_size=64)]) as k:
        dev = k.devices[0]
        assert dev.name == "eth0"
        link = dev.link
        assert link is not None and link.mtu == mtu
        assert "MRG_RXBUF" in dev.features and "MAC" in dev.features
        got = Collector()
        link.set_receiver(got)
        sizes = list(range(60, mtu + 14 + 1))
        # the kernel only ever sees frames addressed to it; the stack is not in the way
        frames = [_frame(link.mac, s, i) for i, s in enumerate(sizes)]
        _send_windowed(link, frames, got, 32)
        back = got.wait_for(len(frames))
        assert back == frames
        assert dev.tx_frames == len(frames)
        assert dev.rx_frames == len(frames)
        assert dev.rx_bad_frames == 0
        m = dev.metrics()["device"]
        assert m["tx_frames"] == len(frames)
        assert m["rx_frames"] == len(frames)
        assert dev.mac == format_mac(link.mac)


def test_jumbo_frame_spans_several_small_buffers_and_arrives_whole() -> None:
    spec = kernel.Net(backend="loopback", mtu=9000, queue_size=64, rx_buffer_size=1024)
    with kernel.boot(devices=[spec]) as k:
        dev = k.devices[0]
        link = dev.link
        assert link is not None and link.mergeable and link.rx_buf_bytes == 1024
        got = Collector()
        link.set_receiver(got)
        frames = [_frame(link.mac, 9014, i) for i in range(20)]
        _send_windowed(link, frames, got, 4)
        assert got.wait_for(len(frames)) == frames
        assert link.counters["rx_merged"] == len(frames)


def test_no_receive_buffer_drops_are_counted_by_the_device() -> None:
    """With a tiny receive ring, a burst bigger than the ring loses frames at the
    device (never blocks, never grows): the counts add up exactly."""
    with kernel.boot(devices=[kernel.Net(backend="loopback", queue_size=4)]) as k:
        dev = k.devices[0]
        link = dev.link
        assert link is not None
        got = Collector()
        # the receiver blocks the interrupt thread until every frame was sent, so the
        # receive ring cannot be refilled during the burst
        gate = Lock()
        gate.acquire()

        def slow(frame: bytes | memoryview, info: RxInfo) -> None:
            with gate:
                pass
            got(frame, info)

        link.set_receiver(slow)
        frames = [_frame(link.mac, 100, i) for i in range(200)]
        _send_all(link, frames, reap=True)
        # every frame is either delivered or dropped by the device: ask the device
        # (each GET_METRICS is a round trip through its loop; bounded, no sleeping)
        m = dev.metrics()["device"]
        deadline_ok = False
        for _ in range(20000):
            m = dev.metrics()["device"]
            if m["rx_frames"] + m["rx_dropped_no_buffer"] >= len(frames):
                deadline_ok = True
                break
        gate.release()
        assert deadline_ok, m
        assert m["rx_dropped_no_buffer"] > 0
        received = got.wait_for(m["rx_frames"])
        assert len(received) == m["rx_frames"]
        assert dev.rx_dropped_no_buffer == m["rx_dropped_no_buffer"]


def test_bad_net_arguments_are_one_line_value_errors() -> None:
    bad = [
        dict(backend="nope"),
        dict(backend="switch"),
        dict(backend="tap"),
        dict(backend="pcap"),
        dict(mtu=10),
        dict(mtu=70000),
        dict(ip="10.0.0.300/24"),
        dict(ip="10.0.0.1"),
        dict(mac="zz:00:00:00:00:00"),
        dict(mac="01:00:00:00:00:01"),
        dict(queue_size=3),
        dict(backend="loopback", switch="ipc:///tmp/x"),
        dict(offload="yes"),
    ]
    for kw in bad:
        with pytest.raises(ValueError) as ei:
            kernel.Net(**kw)
        msg = str(ei.value)
        assert "\n" not in msg and msg.startswith("Net") or "MAC" in msg, (kw, msg)


@pytest.mark.skipif(not os.path.exists("/dev/shm"), reason="no /dev/shm")
def test_region_is_sized_from_the_mtu() -> None:
    small = kernel.Net(mtu=1500).dma_bytes(256)
    big = kernel.Net(mtu=65535).dma_bytes(256)
    assert small < 4 << 20 < 16 << 20 < big


def test_several_nics_and_a_disk_in_one_boot() -> None:
    devices = [
        kernel.Net(backend="loopback", ip="10.1.0.2/24"),
        kernel.Blk.memory(1 << 20),
        kernel.Net(backend="loopback", ip="10.2.0.2/24", mtu=9000),
    ]
    with kernel.boot(devices=devices) as k:
        names = [d.name for d in k.devices]
        assert names == ["eth0", "vda", "eth1"]
        assert sorted(k.net.interfaces) == ["eth0", "eth1"]
        eth0, eth1 = k.device("eth0"), k.device("eth1")
        assert eth0.mac != eth1.mac and eth1.mtu == 9000
        # each interface's own address goes through its own loopback device
        assert len(k.sys.ping("10.1.0.2", count=2, timeout=2.0)) == 2
        assert len(k.sys.ping("10.2.0.2", count=3, timeout=2.0)) == 3
        assert eth0.tx_frames == 4 and eth1.tx_frames == 6  # requests + replies
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        s = k.sys.socket()
        assert fd != s  # one fd space for disks and sockets
        k.sys.pwrite(fd, b"x" * 512, 0)
        assert k.sys.pread(fd, 1, 0) == b"x"
