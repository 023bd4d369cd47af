"""vdev.testing.DeviceHarness: devices driven in-process through the real DriverQueue
and the real DeviceSession (rng, blk on a MemoryBackend, net on the loopback backend),
and the harness catching devices that break the ring rules."""

from __future__ import annotations

import argparse
import struct

import pytest

from vdev import PENDING, Chain, Device, Pending
from vdev.blk import BlkDevice, MemoryBackend
from vdev.examples.rng import MAX_FILL, RngDevice, SeededStream
from vdev.net import LoopbackBackend, NetDevice
from vdev.registry import DeviceKind, KindError, device_kwargs, lookup, register_kind
from vdev.testing import DeviceHarness, InvariantError, StillPending
from vdev.virtio import BlkStatus, BlkType, DeviceId, F, NetF, UsageError, bit
from vdev.virtio.net import NET_HDR_SIZE, NetHdr

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- rng


def test_rng_fills_buffers_from_its_seed() -> None:
    with DeviceHarness(RngDevice(seed=7)) as h:
        features = h.negotiate()
        assert features & bit(F.VERSION_1) and features & bit(F.EVENT_IDX)
        a = h.request(0, in_sizes=[100])
        b = h.request(0, in_sizes=[28, 900])  # a chain of two writable buffers
        assert (a.len, b.len) == (100, 928)
        assert a.written + b.written == SeededStream(7).read(1028)
        m = h.counters
        assert m["requests"] == 2 and m["bytes"] == 1028 and m["bad_requests"] == 0
        assert m["chains"] == 2 and h.in_flight(0) == 0


def test_rng_unseeded_and_capped() -> None:
    with DeviceHarness(RngDevice(), memory_size=1 << 20) as h:
        h.negotiate()
        c = h.request(0, in_sizes=[MAX_FILL + 4096])
        assert c.len == MAX_FILL and len(c.written) == MAX_FILL
        assert h.device.metrics["bytes"] == MAX_FILL


def test_rng_refuses_readable_buffers() -> None:
    """§5.4.6.2: driver-readable buffers break the rule: length 0, counted."""
    with DeviceHarness(RngDevice(seed=1)) as h:
        h.negotiate()
        c = h.request(0, out=[b"x" * 8], in_sizes=[16])
        assert c.len == 0 and c.written == b""
        assert h.counters["bad_requests"] == 1 and h.counters["bytes"] == 0


def test_rng_many_requests_exercise_event_idx() -> None:
    """More requests than the ring holds: kicks are suppressed while the device is busy
    only when the ring says so, and every used entry is reaped exactly once."""
    with DeviceHarness(RngDevice(seed=3), queue_size=8) as h:
        h.negotiate()
        got = b"".join(h.request(0, in_sizes=[n]).written for n in range(1, 40))
        assert got == SeededStream(3).read(sum(range(1, 40)))
        assert h.kicks[0] >= 1 and h.interrupts[0] >= 1


def test_negotiate_checks_the_offer() -> None:
    with DeviceHarness(RngDevice()) as h:
        with pytest.raises(ValueError, match="VERSION_1"):
            h.negotiate(accept=bit(F.EVENT_IDX))
        with pytest.raises(ValueError, match="not offered"):
            h.negotiate(accept=bit(F.VERSION_1) | bit(NetF.MAC))
        f = h.negotiate(accept=bit(F.VERSION_1))  # no EVENT_IDX: NO_NOTIFY/NO_INTERRUPT
        assert f == bit(F.VERSION_1)
        assert h.request(0, in_sizes=[4]).len == 4


# --------------------------------------------------------------------------- blk


def blk_hdr(kind: int, sector: int) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def test_blk_write_then_read_round_trip() -> None:
    backend = MemoryBackend(1 << 20)
    with DeviceHarness(BlkDevice(backend, queue_size=64)) as h:
        h.negotiate()
        data = bytes(range(256)) * 4  # two sectors
        w = h.request(0, out=[blk_hdr(BlkType.OUT, 3), data], in_sizes=[1])
        assert w.len == 1 and w.written == bytes([BlkStatus.OK])
        assert backend.data[3 * 512 : 5 * 512] == data
        r = h.request(0, out=[blk_hdr(BlkType.IN, 3)], in_sizes=[1024, 1])
        assert r.len == 1025 and r.written == data + bytes([BlkStatus.OK])
        beyond = h.request(0, out=[blk_hdr(BlkType.IN, 2048)], in_sizes=[512, 1])
        assert beyond.writable[-1] == BlkStatus.IOERR
        m = h.counters
        assert m["writes"] == 1 and m["bytes_written"] == 1024 and m["bytes_read"] == 1024
        assert m["bad_requests"] == 1


# --------------------------------------------------------------------------- net


def raw_frame(n: int) -> bytes:
    dst, src = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
    return dst + src + b"\x88\xb5" + bytes(i & 0xFF for i in range(n - 14))


def test_net_loopback_frame_comes_back_on_rx() -> None:
    dev = NetDevice(LoopbackBackend(), mac=b"\x02\x00\x00\x00\x00\x01", queue_size=64)
    with DeviceHarness(dev) as h:
        h.negotiate()
        rx = [h.submit(0, in_sizes=[1526]) for _ in range(4)]
        assert not any(r.done for r in rx) and h.counters["chains_kept"] == 4
        frame = raw_frame(200)
        tx = h.request(1, out=[NetHdr().pack() + frame])
        assert tx.len == 0
        [back] = h.take_completions(0)
        assert back.len == NET_HDR_SIZE + len(frame)
        assert back.written[NET_HDR_SIZE:] == frame
        assert NetHdr.unpack(back.written).num_buffers == 1
        assert sum(r.done for r in rx) == 1 and h.in_flight(0) == 3
        m = h.counters
        assert m["tx_frames"] == m["rx_frames"] == 1 and m["completions"] == 1


def test_net_device_takes_receive_buffers_posted_without_a_kick() -> None:
    """A frame that finds no kept receive buffer makes the device look at the ring
    (Device.pull_available): buffers the driver published without kicking are used,
    nothing is dropped."""
    dev = NetDevice(LoopbackBackend(), mac=b"\x02\x00\x00\x00\x00\x01", queue_size=64)
    with DeviceHarness(dev) as h:
        h.negotiate()
        rx = [h.submit(0, in_sizes=[1526], kick=False) for _ in range(3)]
        assert h.counters["chains_kept"] == 0 and h.kicks[0] == 0  # not seen yet
        frame = raw_frame(300)
        assert h.request(1, out=[NetHdr().pack() + frame]).len == 0
        [back] = h.take_completions(0)
        assert back.written[NET_HDR_SIZE:] == frame
        m = h.counters
        assert m["rx_frames"] == 1 and m["rx_dropped_no_buffer"] == 0
        assert m["chains_kept"] == 3 and h.in_flight(0) == 2
        assert sum(r.done for r in rx) == 1


def test_pull_available_serves_a_ring_once_and_not_inside_its_own_drain() -> None:
    class Keeper(Device):
        device_id = 0x7C
        name = "keeper"
        num_queues = 2

        def __init__(self) -> None:
            super().__init__()
            self.pulled: list[int] = []

        def handle(self, queue: int, chain: Chain) -> int | Pending:
            if queue == 1:  # a request on queue 1 pulls queue 0, then itself
                self.pulled += [self.pull_available(0), self.pull_available(1)]
                return 0
            return PENDING

    dev = Keeper()
    assert dev.pull_available(0) == 0  # not attached: nothing to serve
    with pytest.raises(UsageError):
        dev.pull_available(2)
    with DeviceHarness(dev) as h:
        h.negotiate()
        for _ in range(5):
            h.submit(0, in_sizes=[64], kick=False)
        h.request(1, out=[b"go"])
        assert dev.pulled == [5, 0]  # queue 1 is being drained: its own pull is 0
        assert dev.kept(0) == 5 and dev.pull_available(0) == 0  # nothing new
        with pytest.raises(UsageError):
            dev.pull_available(-1)


def test_reset_releases_kept_chains() -> None:
    dev = NetDevice(LoopbackBackend(), mac=b"\x02\x00\x00\x00\x00\x01", queue_size=64)
    with DeviceHarness(dev) as h:
        h.negotiate()
        rx = [h.submit(0, in_sizes=[1526]) for _ in range(3)]
        h.reset()
        assert all(r.released and not r.done for r in rx)
        assert h.counters["chains_released"] == 3
        h.negotiate()
        h.submit(0, in_sizes=[1526])
        h.request(1, out=[NetHdr().pack() + raw_frame(60)])
        assert [c.written[NET_HDR_SIZE:] for c in h.take_completions(0)] == [raw_frame(60)]


# --------------------------------------------------------------------------- timers


class Delayed(Device):
    """Answers each request after ``delay`` seconds (a timer), echoing it."""

    device_id = 0x7D
    name = "delayed"

    def __init__(self, delay: float = 0.5) -> None:
        super().__init__()
        self.delay = delay

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        def answer() -> None:
            data = chain.read(0, min(chain.readable_len, chain.writable_len))
            chain.write(0, data)
            self.complete(queue, chain, len(data))

        self.call_later(self.delay, answer)
        return PENDING


def test_timers_complete_kept_chains() -> None:
    with DeviceHarness(Delayed(0.5)) as h:
        h.negotiate()
        with pytest.raises(StillPending):
            h.request(0, out=[b"ping"], in_sizes=[8])
        req = h.submit(0, out=[b"pong"], in_sizes=[8])
        assert h.advance(0.25) == 0 and not req.done
        assert h.fire_timers() == 2
        assert req.completion is not None and req.completion.written == b"pong"
        # the one request() gave up on and the submitted one, in used-ring order
        assert [c.written for c in h.take_completions(0)] == [b"ping", b"pong"]
        assert h.fire_timers() == 0


# --------------------------------------------------------------------------- invariants


class TooLong(Device):
    """A buggy device: claims to have written more than the chain holds, via complete()
    bypassing the session's checks."""

    device_id = 0x7C
    name = "toolong"

    def handle(self, queue: int, chain: Chain) -> int:
        session = self._session
        assert session is not None
        ring = session.rings[queue]  # type: ignore[attr-defined]
        assert ring.dq is not None
        ring.dq.push(chain.head, chain.writable_len + 1)  # behind the session's back
        return PENDING  # type: ignore[return-value]


class Twice(Device):
    """A buggy device: pushes the same head twice."""

    device_id = 0x7B
    name = "twice"

    def handle(self, queue: int, chain: Chain) -> int:
        ring = self._session.rings[queue]  # type: ignore[union-attr]
        ring.dq.push(chain.head, 0)
        return 0


@pytest.mark.parametrize(
    "device, says",
    [(TooLong(), "writable bytes"), (Twice(), "not in flight")],
    ids=["used-len-too-big", "head-twice"],
)
def test_harness_catches_ring_rule_violations(device: Device, says: str) -> None:
    with DeviceHarness(device) as h:
        h.negotiate()
        with pytest.raises(InvariantError, match=says):
            h.submit(0, in_sizes=[4])


def test_handler_bug_is_counted_not_fatal() -> None:
    class Crashes(Device):
        device_id = 0x7A
        name = "crashes"

        def handle(self, queue: int, chain: Chain) -> int:
            raise RuntimeError("boom")

    with DeviceHarness(Crashes()) as h:
        h.negotiate()
        assert h.request(0, in_sizes=[4]).len == 0
        assert h.counters["handler_errors"] == 1
        assert "boom" in h.log.getvalue()


# --------------------------------------------------------------------------- registry


def test_registry_lookup_and_kwargs() -> None:
    assert lookup("rng").load() is RngDevice
    assert lookup("vdev.examples.rng:RngDevice").load() is RngDevice
    with pytest.raises(KindError, match="invalid choice"):
        lookup("nosuchkind")
    with pytest.raises(KindError, match="not a vdev.Device"):
        lookup("vdev.examples.rng:SeededStream").load()
    with pytest.raises(KindError, match="cannot import"):
        lookup("no_such_pkg.mod:Cls").load()
    register_kind(DeviceKind("rng-test", "vdev.examples.rng:RngDevice"), replace=True)
    kind = lookup("rng-test")
    cls = kind.load()
    hook = kind.options_hook(cls)
    assert hook is not None
    parser = argparse.ArgumentParser()
    hook(parser)
    args = parser.parse_args(["--seed", "9"])
    dev = cls(**device_kwargs(args, ["seed", "queue_size"]))
    assert isinstance(dev, RngDevice) and dev.seed == 9 and dev.max_queue_size == 256
    assert dev.device_id == DeviceId.ENTROPY
    with pytest.raises(ValueError, match="exists"):
        register_kind(DeviceKind("rng", "vdev.examples.rng:RngDevice"))
