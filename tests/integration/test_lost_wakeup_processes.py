"""The lost-wake-up guard under real load: thousands of requests, nothing stranded.

Both sides of the ring run the disable -> drain -> re-enable -> re-check loop; a
missing re-check strands a request that was published (or completed) just as the
other side went to sleep, and the caller hangs. Here a real device process serves a
real image through shared memory and ZeroMQ while the kernel's block layer is driven
from every direction at once:

* a serial phase at depth 1 (each completion resubmits the next request from the
  interrupt thread: the device goes idle and wakes up again for every request);
* *streams* that resubmit from their own completion callbacks (interrupt thread),
  sometimes with ``kick=False`` (the batch's refill must publish them);
* several submitter threads issuing batches of 1..2*queue_size requests, with
  ``kick=False`` for all and one ``kick()``, ``kick=True`` on the last only, or a kick
  decision per request, so the ring overflows into the software queue.

Every request must call back exactly once with the right data (each block has one
owner and at most one request in flight, so a model of the image is exact), the image
must equal the model afterwards, and the counters must add up and show that
notifications were suppressed -- with VIRTIO_RING_F_EVENT_IDX, and without it (then
the rings' NO_NOTIFY / NO_INTERRUPT flags are the only hints), and with a 4-entry ring
that is full nearly all the time. A hang fails with how many requests are still
pending, the queue counters and the ring indices as both sides left them.
"""

from __future__ import annotations

import itertools
import random
import struct
import threading
from dataclasses import dataclass

import pytest

import kernel
from vdev.virtio import DeviceId, F

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BLOCK = 4096
IMAGE_BLOCKS = 1024  # 4 MiB
#: How long to wait for all requests before calling it a hang (no timing claim: the
#: whole run takes a few seconds on a 2-core machine; this only bounds a real hang).
HANG_TIMEOUT_S = 60.0
U16 = struct.Struct("<H")


class NoEventIdx(kernel.BlkDriver):
    """The stock virtio-blk driver that does not accept VIRTIO_RING_F_EVENT_IDX."""

    supported_features = kernel.BlkDriver.supported_features & ~(1 << F.EVENT_IDX)


@dataclass(frozen=True)
class Scenario:
    event_idx: bool
    queue_size: int
    serial_ops: int  # depth-1 phase
    streams: int  # callback-driven streams (one request in flight each)
    stream_ops: int  # mean ops per stream (lengths vary, so the depth decays)
    threads: int  # submitter threads
    thread_ops: int  # ops per submitter thread
    segment: int | None = None  # cap data descriptors (2048: 4 KiB = 2 segments)
    suppression: bool = True  # enough depth that doorbells must be saved


SCENARIOS = {
    # 1000 + about 24*230 + 3*4500 = 20,000 requests; 4 KiB in two 2 KiB segments, so a
    # request takes one (indirect) descriptor: 128 in flight, the device interrupts
    # mid-round (its budget is 64) and the driver's re-check finds entries
    "event_idx": Scenario(True, 128, 1000, 24, 300, 3, 4500, segment=2048),
    "no_event_idx": Scenario(False, 128, 1000, 24, 200, 3, 2000, segment=2048),
    # header | data | status: three descriptors each, at most 42 requests in the ring,
    # batches of up to 256 wait in the software queue
    "event_idx_direct": Scenario(True, 128, 500, 16, 200, 3, 2000),
    # 4 KiB in two segments: one indirect descriptor each, four requests fill the ring
    "event_idx_q4_indirect": Scenario(True, 4, 500, 3, 400, 3, 1200, segment=2048),
    # header | data | status: three descriptors, one request fills the ring (depth 1)
    "no_event_idx_q4": Scenario(False, 4, 500, 3, 400, 3, 1200, suppression=False),
}


def _image_bytes() -> bytes:
    return random.Random(20240601).randbytes(IMAGE_BLOCKS * BLOCK)


@pytest.fixture
def image(tmp_path) -> str:
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.write(_image_bytes())
    return path


class Load:
    """Drives one block device and keeps the exact model of what the image holds."""

    def __init__(self, dev: kernel.VirtioDevice, expected: int) -> None:
        self.dev = dev
        self.blk = dev.block
        self.model = bytearray(_image_bytes())
        self.expected = expected
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.outstanding: set[int] = set()
        self.completed = 0
        self.reads = 0
        self.writes = 0
        self.errors: list[str] = []
        self.finished = threading.Event()  # all expected callbacks arrived, or an error
        self.max_pending = 0  # deepest software-queue backlog seen (ring full)

    # ------------------------------------------------------------------ bookkeeping
    def expect(self, total: int) -> None:
        """Expect ``total`` callbacks in all (from now on)."""
        with self.lock:
            self.expected = total
            self.finished.clear()
            if self.completed >= total or self.errors:
                self.finished.set()

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)
        self.finished.set()

    def _block(self, b: int) -> bytes:
        return bytes(self.model[b * BLOCK : (b + 1) * BLOCK])

    def submit(self, b: int, data: bytes | None, then, *, kick: bool) -> bool:
        """Read (``data`` None) or write block ``b``; ``then()`` runs after the request
        completed and was checked. Returns False if the submit was refused."""
        rid = next(self.ids)
        with self.lock:
            self.outstanding.add(rid)
            if data is None:
                self.reads += 1
            else:
                self.writes += 1

        def callback(result: object) -> None:
            try:
                with self.lock:
                    if rid not in self.outstanding:
                        self.errors.append(f"request {rid} (block {b}) called back twice")
                        self.finished.set()
                        return
                    self.outstanding.discard(rid)
                if isinstance(result, BaseException):
                    self.error(f"request {rid} on block {b} failed: {result!r}")
                    return
                if data is None:
                    if result != self._block(b):
                        self.error(f"read of block {b} returned the wrong bytes")
                        return
                else:
                    if result != BLOCK:
                        self.error(f"write of block {b} returned {result!r}, not {BLOCK}")
                        return
                    self.model[b * BLOCK : (b + 1) * BLOCK] = data
                with self.lock:
                    self.completed += 1
                    if self.completed == self.expected:
                        self.finished.set()
                    elif self.completed > self.expected:
                        self.errors.append(f"{self.completed} callbacks, {self.expected} sent")
                        self.finished.set()
                then()
            except BaseException as e:  # noqa: BLE001 - the block layer would swallow it
                self.error(f"callback of request {rid} raised {e!r}")

        try:
            if data is None:
                self.blk.submit("read", b * BLOCK, BLOCK, callback, kick=kick)
            else:
                self.blk.submit("write", b * BLOCK, data, callback, kick=kick)
        except OSError as e:
            with self.lock:
                self.outstanding.discard(rid)
            self.error(f"submit of block {b} refused: {e!r}")
            return False
        pending = self.blk.pending
        if pending > self.max_pending:
            self.max_pending = pending
        return True

    # ------------------------------------------------------------------ load shapes
    def stream(self, blocks: list[int], ops: int, seed: int, *, kick: bool = True) -> None:
        """A chain of ``ops`` requests on ``blocks``, one in flight at a time; each
        completion submits the next (on the interrupt thread), half of them with
        ``kick=False`` (the refill after the batch must publish those)."""
        rng = random.Random(seed)
        left = [ops]

        def step(kick: bool) -> None:
            if left[0] == 0:
                return
            left[0] -= 1
            b = rng.choice(blocks)
            data = rng.randbytes(BLOCK) if rng.random() < 0.5 else None
            self.submit(b, data, lambda: step(rng.random() < 0.5), kick=kick)

        step(kick)

    def submitter(self, blocks: list[int], ops: int, seed: int, max_batch: int) -> None:
        """Batches of distinct blocks from one thread; waits for each batch."""
        rng = random.Random(seed)
        left = ops
        while left and not self.errors:
            n = min(left, rng.randint(1, max_batch))
            chosen = rng.sample(blocks, n)
            mode = rng.choice(("kick_call", "kick_last", "kick_each"))
            batch_left = [n]
            batch_done = threading.Event()
            batch_lock = threading.Lock()

            def one_done(batch_left=batch_left, batch_done=batch_done, batch_lock=batch_lock):
                with batch_lock:
                    batch_left[0] -= 1
                    if batch_left[0] == 0:
                        batch_done.set()

            for i, b in enumerate(chosen):
                kick = mode == "kick_each" or (mode == "kick_last" and i == n - 1)
                data = rng.randbytes(BLOCK) if rng.random() < 0.5 else None
                if not self.submit(b, data, one_done, kick=kick):
                    return
            if mode == "kick_call":
                self.blk.kick()
            if not batch_done.wait(HANG_TIMEOUT_S):
                self.error(f"a batch of {n} ({mode}) has {batch_left[0]} requests pending")
                return
            left -= n

    # ------------------------------------------------------------------ diagnosis
    def diagnose(self) -> str:
        q = self.dev.queues[0]
        lines = [
            f"{self.expected - self.completed} of {self.expected} requests still pending "
            f"({len(self.outstanding)} outstanding ids); errors: {self.errors[:5]}",
            f"driver stats: {q.stats}",
            f"software queue: {self.blk.pending}, device failed: {self.dev.failed}",
        ]
        dq = q.dq
        if dq is not None:
            lines.append(
                f"ring of {q.size}: in flight {dq.in_flight}, free descriptors {dq.num_free}, "
                f"{_ring_words(self.dev)}"
            )
        try:
            lines.append(f"device metrics: {self.dev.metrics()}")
        except Exception as e:  # noqa: BLE001 - diagnosis only
            lines.append(f"device metrics unavailable: {e!r}")
        return "\n".join(lines)


def _ring_words(dev: kernel.VirtioDevice) -> dict[str, int]:
    """The ring's index and flag words as they stand in shared memory."""
    lay = dev.ring_layout(0)
    mem, n = lay.memory, lay.size
    out = {
        "avail.flags": U16.unpack_from(mem, lay.avail)[0],
        "avail.idx": U16.unpack_from(mem, lay.avail + 2)[0],
        "used_event": U16.unpack_from(mem, lay.avail + 4 + 2 * n)[0],
        "used.flags": U16.unpack_from(mem, lay.used)[0],
        "used.idx": U16.unpack_from(mem, lay.used + 2)[0],
        "avail_event": U16.unpack_from(mem, lay.used + 4 + 8 * n)[0],
    }
    del mem, lay
    return out


def _run(image: str, sc: Scenario) -> None:
    bus = None
    if not sc.event_idx:
        bus = kernel.VirtioBus()
        bus.register_driver(DeviceId.BLOCK, NoEventIdx)
    rng = random.Random(7)
    stream_lengths = [
        rng.randint(sc.stream_ops // 4, sc.stream_ops * 7 // 4) for _ in range(sc.streams)
    ]
    total = sc.serial_ops + sum(stream_lengths) + sc.threads * sc.thread_ops
    # disjoint block ownership: 8 blocks per stream, the rest shared out to the threads
    blocks = list(range(IMAGE_BLOCKS))
    rng.shuffle(blocks)
    stream_blocks = [blocks[8 * i : 8 * i + 8] for i in range(sc.streams)]
    rest = blocks[8 * sc.streams :]
    thread_blocks = [rest[i :: sc.threads] for i in range(sc.threads)]

    k = kernel.boot(devices=[kernel.Blk(image, queue_size=sc.queue_size)], bus=bus)
    threads: list[threading.Thread] = []
    try:
        dev = k.devices[0]
        q = dev.queues[0]
        s = q.stats
        assert q.size == sc.queue_size
        assert ("EVENT_IDX" in dev.features) is sc.event_idx
        assert q.dq.event_idx is sc.event_idx
        if sc.segment is not None:
            dev.block.set_max_segment_size(sc.segment)
        assert (s.requests, s.kicks_sent, s.interrupts) == (0, 0, 0)
        dma_used0 = dev.transport.dma.used_bytes

        # phase 1: depth 1, each completion submits the next from the interrupt thread
        load = Load(dev, sc.serial_ops)
        left = [sc.serial_ops]
        srng = random.Random(1)

        def serial_step() -> None:
            if left[0]:
                left[0] -= 1
                b = srng.choice(stream_blocks[0])
                data = srng.randbytes(BLOCK) if srng.random() < 0.5 else None
                load.submit(b, data, serial_step, kick=True)

        serial_step()
        if not load.finished.wait(HANG_TIMEOUT_S) or load.errors:
            pytest.fail("the depth-1 phase failed or hung:\n" + load.diagnose())
        assert load.completed == sc.serial_ops and not load.outstanding
        assert s.requests == sc.serial_ops
        assert s.kicks_sent > 0 and s.interrupts > 0

        # phase 2: streams (started as one batch and one kick) + submitter threads
        load.expect(total)
        for i, (blks, n) in enumerate(zip(stream_blocks, stream_lengths, strict=True)):
            load.stream(blks, n, seed=100 + i, kick=False)
        load.blk.kick()
        for t in range(sc.threads):
            th = threading.Thread(
                target=load.submitter,
                args=(thread_blocks[t], sc.thread_ops, 200 + t, 2 * sc.queue_size),
                name=f"submitter-{t}",
                daemon=True,
            )
            threads.append(th)
            th.start()
        if not load.finished.wait(HANG_TIMEOUT_S) or load.errors:
            pytest.fail(
                ("errors:\n" if load.errors else "requests are stranded (lost wake-up?):\n")
                + load.diagnose()
            )
        for th in threads:
            th.join(HANG_TIMEOUT_S)
            assert not th.is_alive(), f"{th.name} did not finish"

        # every request called back exactly once with the right data
        assert load.completed == total and not load.outstanding and not load.errors
        assert load.reads + load.writes == total
        assert load.reads > total // 3 and load.writes > total // 3
        assert load.blk.pending == 0 and q.dq.in_flight == 0
        assert dev.transport.dma.used_bytes == dma_used0, "DMA buffers leaked"
        if sc.queue_size == 4:
            assert load.max_pending > 0, "the ring never filled up"

        # the counters add up (driver stats first: the device's can only be ahead)
        assert s.requests == total  # one 4 KiB request = one chain
        assert s.completions == total
        assert 0 < s.kicks_sent + s.kicks_suppressed <= total  # a decision publishes >= 1
        driver_interrupts = s.interrupts
        dev.metrics()  # two round trips: the single-threaded device has finished its
        m = dev.metrics()  # last drain round (notifications re-enabled) before the second
        mq = m["queues"][0]
        assert m["device"]["chains"] == mq["chains"] == total
        assert m["device"]["reads"] == load.reads and m["device"]["writes"] == load.writes
        assert m["device"]["bad_chains"] == m["device"]["handler_errors"] == 0
        assert m["device"]["ring_errors"] == 0
        assert 0 < mq["kicks_received"] <= s.kicks_sent  # the listener coalesces
        assert 0 < driver_interrupts <= mq["interrupts_sent"]

        # at rest both sides must have asked to be woken for the next entry, or the
        # next request would be stranded (the lost wake-up this file is about); with
        # hybrid polling "at rest" begins when the poll windows have ended: the device's
        # before it answered the metrics requests above, the kernel's here
        assert dev.transport.wait_armed(HANG_TIMEOUT_S), "the interrupt thread never armed"
        with q.lock:
            w = _ring_words(dev)
        assert w["avail.idx"] == w["used.idx"] == total & 0xFFFF, w
        if sc.event_idx:
            assert w["used_event"] == w["used.idx"], w  # interrupt me for the next one
            assert w["avail_event"] == w["avail.idx"], w  # kick me for the next one
        else:
            assert w["avail.flags"] == 0, w  # NO_INTERRUPT cleared after every reap
            assert w["used.flags"] == 0, w  # NO_NOTIFY cleared after every drain

        # suppression: doorbells saved (driver side: EVENT_IDX or NO_NOTIFY; batches
        # of completions reaped on one interrupt)
        if sc.suppression:
            assert s.kicks_suppressed > 0, s
            assert s.interrupts_suppressed > 0, s
            assert s.kicks_sent < total and s.interrupts < total, s

        # the data: through virtio and on the host
        want = bytes(load.model)
        step = 256 << 10
        got = b"".join(load.blk.read(off, step) for off in range(0, len(want), step))
        assert got == want
    finally:
        k.shutdown()
        for th in threads:
            th.join(10)
    with open(image, "rb") as f:
        assert f.read() == want


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_request_completes_under_load(image, name):
    _run(image, SCENARIOS[name])
