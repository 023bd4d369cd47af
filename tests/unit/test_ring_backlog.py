"""A ring port holds frames while its driver has no free receive buffer (the switch's
:class:`~vdev.switch._RingBackend` backlog) and hands them over, in order, when the
driver posts buffers; bounded; dropped when the device is reset; a port with no driver
attached drops at once. Through :class:`vdev.testing.DeviceHarness` (the real
DeviceSession and NetDevice, rings in a FlatMemory)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

import vdev.switch as sw
from vdev.net import NET_FEATURES, NetDevice
from vdev.testing import DeviceHarness
from vdev.virtio import F, bit
from vdev.virtio.net import NetHdr

pytestmark = pytest.mark.timeout(60)

MAC = bytes.fromhex("02aabbccddee")
RX = 0
PLAIN = NetHdr()


def frame(i: int, size: int = 60) -> bytes:
    """An Ethernet frame to MAC numbered ``i`` (in its payload)."""
    return (
        MAC + bytes.fromhex("020000000001") + b"\x88\xb5" + struct.pack("!I", i) + bytes(size - 18)
    )


@pytest.fixture
def port() -> Iterator[tuple[DeviceHarness, sw._RingBackend]]:
    backend = sw._RingBackend(None, 1)  # type: ignore[arg-type]  # send() is not used here
    h = DeviceHarness(NetDevice(backend, mac=MAC))
    try:
        h.negotiate(bit(F.VERSION_1) | bit(F.EVENT_IDX) | NET_FEATURES)
        yield h, backend
    finally:
        h.close()


def post(h: DeviceHarness, count: int) -> None:
    for _ in range(count):
        h.submit(RX, in_sizes=[2048])


def received(h: DeviceHarness) -> list[int]:
    h.run_pending()
    return [struct.unpack_from("!I", c.written, 12 + 14)[0] for c in h.take_completions(RX)]


def test_frames_wait_for_buffers_and_arrive_in_order(
    port: tuple[DeviceHarness, sw._RingBackend],
) -> None:
    h, b = port
    post(h, 2)
    assert [b.deliver(PLAIN, frame(i)) for i in range(5)] == [True] * 5
    assert received(h) == [0, 1]  # two buffers: two straight in, three wait
    assert len(b.backlog) == 3 and b.counters["ring_backlogged"] == 3
    assert b.deliver(PLAIN, frame(5)) is True  # behind the others, even with a buffer
    post(h, 2)  # buffers after none: the backlog goes out from the loop
    h.fire_timers()
    assert received(h) == [2, 3]
    post(h, 10)
    h.fire_timers()
    assert received(h) == [4, 5] and not b.backlog and b.backlog_bytes == 0
    assert h.device.metrics["rx_dropped_no_buffer"] == 0


def test_the_backlog_is_bounded(
    port: tuple[DeviceHarness, sw._RingBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    h, b = port
    monkeypatch.setattr(sw, "RING_BACKLOG_FRAMES", 3)
    assert [b.deliver(PLAIN, frame(i)) for i in range(5)] == [True, True, True, None, None]
    monkeypatch.setattr(sw, "RING_BACKLOG_FRAMES", 100)
    monkeypatch.setattr(sw, "RING_BACKLOG_BYTES", b.backlog_bytes + 100)
    assert b.deliver(PLAIN, frame(9, size=200)) is None  # over the byte bound
    assert len(b.backlog) == 3


def test_a_reset_drops_the_backlog_and_no_driver_means_no_queueing(
    port: tuple[DeviceHarness, sw._RingBackend],
) -> None:
    h, b = port
    assert b.deliver(PLAIN, frame(0)) is True and len(b.backlog) == 1
    h.reset()
    assert not b.backlog and b.counters["ring_backlog_dropped_reset"] == 1
    assert b.deliver(PLAIN, frame(1)) is False  # not active: the device drops it at once
    assert not b.backlog
