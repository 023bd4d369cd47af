"""DeviceSession and the device API for devices that keep chains, in one process.

The rings live in a ``FlatMemory(bytearray)``; the driver side is a real
``DriverQueue`` on the same memory; the transport is a recorder of what the session asks
of it. Timers run on a fake clock (advanced by the test, never slept on); watched
sources are real pipes polled by the session's real poller.
"""

from __future__ import annotations

import os
import pickle
from collections import deque
from collections.abc import Callable, Iterator

import pytest

import vdev
from hostops.poll import Waker
from vdev import PENDING, Chain, Device, Pending
from vdev.session import DeviceSession, Ring
from vdev.virtio import DriverQueue, F, FlatMemory, RingLayout, UsageError, bit

pytestmark = pytest.mark.timeout(60)

QSIZE = 64
EVENT_IDX = bit(F.EVENT_IDX) | bit(F.VERSION_1)


class Recorder:
    """The transport: records interrupts, broken rings and config interrupts."""

    def __init__(self) -> None:
        self.interrupts: list[int] = []
        self.broken: list[tuple[int, str]] = []
        self.config = 0

    def interrupt(self, ring: Ring) -> None:
        self.interrupts.append(ring.index)

    def ring_broken(self, ring: Ring, why: str) -> None:
        self.broken.append((ring.index, why))

    def config_interrupt(self) -> None:
        self.config += 1


class Keeper(Device):
    """Keeps every chain; the test answers them (upper-cased echo) when it likes."""

    device_id = 0x7E
    name = "keeper"
    num_queues = 2
    max_queue_size = QSIZE

    def __init__(self) -> None:
        super().__init__()
        self.waiting: dict[int, deque[Chain]] = {0: deque(), 1: deque()}
        self.stale: list[Chain] = []
        self.released_calls: list[tuple[int, int, int]] = []
        self.kept_at_reset: tuple[int, int] | None = None
        self.on_handle: Callable[[int, Chain], int | Pending] | None = None

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        if self.on_handle is not None:
            return self.on_handle(queue, chain)
        self.waiting[queue].append(chain)
        return PENDING

    def answer(self, queue: int) -> Chain:
        chain = self.waiting[queue].popleft()
        data = chain.read(0, min(chain.readable_len, chain.writable_len)).upper()
        chain.write(0, data)
        self.complete(queue, chain, len(data))
        return chain

    def released(self, queue: int) -> None:
        self.released_calls.append((queue, len(self.waiting[queue]), self.kept(queue)))
        self.stale.extend(self.waiting[queue])
        self.waiting[queue].clear()

    def reset(self) -> None:
        self.kept_at_reset = (self.kept(0), self.kept(1))
        super().reset()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A session serving ``device`` on two rings in one memory, and their drivers."""

    def __init__(self, device: Keeper, features: int = EVENT_IDX) -> None:
        self.device = device
        self.transport = Recorder()
        self.clock = Clock()
        self.session = DeviceSession(device, self.transport, clock=self.clock)
        self.memory = FlatMemory(bytearray(1 << 20))
        self.features = features
        self.layouts = [RingLayout.packed(QSIZE, 0), RingLayout.packed(QSIZE, 0x4000)]
        self.drivers = [
            DriverQueue(self.memory, lay, event_idx=bool(features & bit(F.EVENT_IDX)))
            for lay in self.layouts
        ]
        self.top = 0x10000
        self.bufs: dict[int, int] = {}  # token -> writable address
        self.token = 0
        for ring in self.session.rings:
            self.start(ring)

    def restart(self) -> None:
        """After a reset: fresh driver rings, every ring started again from 0."""
        for i, lay in enumerate(self.layouts):
            self.drivers[i] = DriverQueue(
                self.memory, lay, event_idx=bool(self.features & bit(F.EVENT_IDX))
            )
        for ring in self.session.rings:
            self.start(ring)

    def start(self, ring: Ring) -> None:
        self.session.start_ring(ring, self.memory, self.layouts[ring.index], self.features)
        ring.enabled = True

    def alloc(self, n: int) -> int:
        addr = self.top
        self.top += (n + 63) & ~63
        return addr

    def submit(self, queue: int, data: bytes, wlen: int = 16, serve: bool = True) -> int:
        r = self.alloc(len(data))
        self.memory.view(r, len(data))[:] = data
        w = self.alloc(wlen)
        self.token += 1
        self.bufs[self.token] = w
        self.drivers[queue].add([(r, len(data))], [(w, wlen)], self.token)
        self.drivers[queue].kick_prepare()
        if serve:
            assert self.session.kick(queue)
            self.session.serve_pending()
        return self.token

    def used(self, queue: int) -> list[tuple[int, int, bytes]]:
        return [
            (t, n, bytes(self.memory.view(self.bufs[t], n)))
            for t, n in self.drivers[queue].get_used()
        ]

    def ring_metrics(self, queue: int) -> dict[str, int]:
        return self.session.ring_metrics(self.session.rings[queue])


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(Keeper())
    try:
        yield r
    finally:
        r.session.close()


# --------------------------------------------------------------------------- PENDING


def test_pending_is_one_sentinel_exported_by_vdev() -> None:
    assert Pending() is PENDING and repr(PENDING) == "vdev.PENDING"
    assert pickle.loads(pickle.dumps(PENDING)) is PENDING
    assert vdev.PENDING is PENDING and vdev.Chain is Chain


# --------------------------------------------------------------------------- keep + complete


def test_kept_chains_are_completed_later_with_their_data(rig: Rig) -> None:
    t1, t2, t3 = (rig.submit(0, w) for w in (b"one", b"two", b"three"))
    assert rig.device.kept(0) == 3 and rig.device.kept(1) == 0
    assert rig.used(0) == [], "nothing is pushed for a kept chain"
    c = rig.session.counters
    assert c["chains"] == 3 and c["chains_kept"] == 3 and c["completions"] == 0

    view = rig.device.waiting[0][1].writable[0]
    rig.device.answer(0)
    chain = rig.device.answer(0)
    assert rig.used(0) == [(t1, 3, b"ONE"), (t2, 3, b"TWO")]
    assert rig.device.kept(0) == 1 and c["completions"] == 2
    # after complete() the views are released: the buffer belongs to the driver again
    assert chain.readable == [] and chain.writable == [] and chain.writable_len == 0
    with pytest.raises(ValueError):
        view[0]
    rig.device.answer(0)
    assert rig.used(0) == [(t3, 5, b"THREE")]
    assert rig.ring_metrics(0)["kept"] == 0 and c["stale_completions"] == 0


def test_complete_refuses_what_is_not_kept_and_changes_nothing(rig: Rig) -> None:
    dev, c = rig.device, rig.session.counters
    rig.submit(0, b"abc", wlen=4)
    chain = dev.answer(0)
    assert len(rig.used(0)) == 1
    with pytest.raises(UsageError, match="not kept"):
        dev.complete(0, chain, 0)  # completed already
    assert c["stale_completions"] == 1

    rig.submit(0, b"kept", wlen=4)
    kept = dev.waiting[0][0]
    with pytest.raises(UsageError, match="not kept"):
        dev.complete(1, kept, 0)  # kept, but on queue 0
    for bad in (5, -1, True, 1.5, None):
        with pytest.raises(UsageError, match="used length"):
            dev.complete(0, kept, bad)  # type: ignore[arg-type]
    for queue in (2, -1, "0"):
        with pytest.raises(UsageError, match="queue"):
            dev.complete(queue, kept, 0)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="not kept"):
        dev.complete(0, "not a chain", 0)  # type: ignore[arg-type]
    assert c["stale_completions"] == 3 and dev.kept(0) == 1 and rig.used(0) == []

    # a chain answered synchronously was never kept
    seen: list[Chain] = []
    dev.on_handle = lambda q, ch: seen.append(ch) or 0
    rig.submit(0, b"sync")
    with pytest.raises(UsageError, match="not kept"):
        dev.complete(0, seen[0], 0)
    assert c["stale_completions"] == 4
    assert [n for _, n, _ in rig.used(0)] == [0]
    dev.on_handle = None
    dev.complete(0, kept, 4)  # still kept, still completes
    assert [n for _, n, _ in rig.used(0)] == [4]


def test_device_api_needs_a_runtime() -> None:
    dev = Keeper()
    memory = FlatMemory(bytearray(64))
    chain = Chain(0, [], [memory.view(0, 8)], 0, 8, [])
    with pytest.raises(UsageError, match="not attached"):
        dev.complete(0, chain, 0)
    with pytest.raises(UsageError, match="not attached"):
        dev.notify_config_change()
    assert dev.kept(1) == 0
    with pytest.raises(UsageError):
        dev.kept(2)


# --------------------------------------------------------------------------- resets


def test_reset_releases_every_kept_chain_then_resets_the_device(rig: Rig) -> None:
    dev, c = rig.device, rig.session.counters
    for w in (b"a", b"b", b"c"):
        rig.submit(0, w)
    for w in (b"d", b"e"):
        rig.submit(1, w)
    view = dev.waiting[1][0].readable[0]
    assert rig.session.reset() == ""
    assert c["chains_released"] == 5 and c["resets"] == 1
    # released() per queue, before reset(), with the session already empty
    assert dev.released_calls == [(0, 3, 0), (1, 2, 0)]
    assert dev.kept_at_reset == (0, 0)
    assert rig.ring_metrics(0)["chains_released"] == 3
    assert rig.ring_metrics(1)["chains_released"] == 2
    with pytest.raises(ValueError):
        bytes(view)  # released: the region can be unmapped
    assert all(ch.readable == [] and ch.writable == [] for ch in dev.stale)
    for chain in dev.stale:
        with pytest.raises(UsageError, match="not kept"):
            dev.complete(0, chain, 0)
    assert c["stale_completions"] == 5 and c["completions"] == 0
    assert rig.used(0) == [] and rig.used(1) == [], "a released chain is never pushed"


def test_stopping_a_ring_releases_its_chains_and_keeps_its_position(rig: Rig) -> None:
    dev, ring = rig.device, rig.session.rings[0]
    rig.submit(0, b"x")
    rig.submit(0, b"y")
    rig.submit(1, b"z")
    rig.session.stop_ring(ring)
    assert ring.dq is None and ring.base == 2
    assert dev.released_calls == [(0, 2, 0)] and dev.kept(1) == 1
    assert not rig.session.kick(5)  # no such ring
    assert rig.session.kick(0)  # a stopped ring is not served
    rig.session.serve_pending()
    assert not rig.session.has_pending
    # restarted where it stood: the next chain is served, the released ones are not
    rig.start(ring)
    t = rig.submit(0, b"w")
    dev.answer(0)
    assert rig.used(0) == [(t, 1, b"W")]


def test_a_broken_ring_is_reported_and_not_served(rig: Rig) -> None:
    rig.submit(0, b"keep")
    avail = rig.memory.view(rig.layouts[0].avail, 4)
    avail[2:4] = (1 + 2 * QSIZE).to_bytes(2, "little")  # avail.idx jumps (§2.7.6)
    assert rig.session.kick(0)
    rig.session.serve_pending()
    assert [i for i, _ in rig.transport.broken] == [0]
    assert "AVAIL_IDX_JUMP" in rig.transport.broken[0][1]
    assert rig.session.counters["ring_errors"] == 1 and rig.ring_metrics(0)["ring_errors"] == 1
    assert rig.ring_metrics(0)["rule:AVAIL_IDX_JUMP"] == 1
    assert rig.session.kick(0) and not rig.session.has_pending
    rig.session.stop_ring(rig.session.rings[0])  # kept chains go when the ring stops
    assert rig.session.counters["chains_released"] == 1


def test_a_head_made_available_again_while_kept_breaks_the_ring(rig: Rig) -> None:
    """A hostile driver cannot make the device keep more than a queue size of chains."""
    rig.submit(0, b"once")
    head = rig.device.waiting[0][0].head
    a16 = rig.memory.view(rig.layouts[0].avail, 4 + 2 * QSIZE).cast("H")
    for i in range(1, QSIZE + 1):  # the same head, QSIZE more times (§2.7.6 allows idx)
        a16[2 + i % QSIZE] = head
    a16[1] = 1 + QSIZE
    assert rig.session.kick(0)
    rig.session.serve_pending()
    assert rig.device.kept(0) == QSIZE, "at most a queue size is kept"
    assert rig.session.counters["ring_errors"] == 1
    assert "head reused" in rig.transport.broken[0][1]
    assert rig.device.waiting[0][-1].writable == [], "the extra chain was released"
    assert not rig.session.has_pending


# --------------------------------------------------------------------------- interrupts


def test_completions_from_a_callback_share_one_event_idx_decision(rig: Rig) -> None:
    dev, session, drv = rig.device, rig.session, rig.drivers[0]
    for i in range(8):
        rig.submit(0, b"%d" % i)
    assert rig.transport.interrupts == []  # nothing completed yet
    # the driver asked for an interrupt at the first completion (used_event = 0)
    dev.call_later(0, lambda: [dev.answer(0) for _ in range(8)])
    session.run_once(0)
    assert rig.transport.interrupts == [0], "8 completions, one decision, one interrupt"
    assert session.counters["completions"] == 8 and session.counters["interrupts"] == 1
    # the driver has not reaped: used_event is still 0, EVENT_IDX suppresses (§2.7.10)
    for _ in range(4):
        rig.submit(0, b"x")
    dev.call_later(0, lambda: [dev.answer(0) for _ in range(4)])
    session.run_once(0)
    m = rig.ring_metrics(0)
    assert rig.transport.interrupts == [0] and session.counters["interrupts"] == 1
    assert m["interrupts_sent"] == 1 and m["interrupts_suppressed"] == 1
    # the driver reaps and re-arms: the next completion interrupts again
    assert len(rig.used(0)) == 12
    assert not drv.enable_interrupts()
    rig.submit(0, b"y")
    dev.call_later(0, lambda: dev.answer(0))
    session.run_once(0)
    assert rig.transport.interrupts == [0, 0] and session.counters["completions"] == 13


def test_completing_another_queue_inside_handle_is_flushed_after_the_drain(rig: Rig) -> None:
    dev = rig.device
    rig.submit(0, b"kept")

    def handle(queue: int, chain: Chain) -> int:
        dev.answer(0)  # a frame that arrived on queue 1's request, delivered on queue 0
        return 0

    dev.on_handle = handle
    rig.submit(1, b"go")
    assert sorted(rig.transport.interrupts) == [0, 1]
    assert rig.ring_metrics(0)["interrupts_sent"] == 1
    assert [(n, d) for _, n, d in rig.used(0)] == [(4, b"KEPT")]


def test_config_change_goes_to_the_transport(rig: Rig) -> None:
    rig.device.notify_config_change()
    assert rig.transport.config == 1


# --------------------------------------------------------------------------- timers


def test_timers_fire_in_deadline_order_once_and_can_be_cancelled() -> None:
    fired: list[str] = []

    class Timed(Keeper):
        def __init__(self) -> None:
            super().__init__()
            self.early = self.call_later(1.5, lambda: fired.append("early"))

    dev = Timed()
    rig = Rig(dev)
    try:
        session, clock = rig.session, rig.clock
        a = dev.call_later(2.0, lambda: fired.append("a"))
        b = dev.call_later(1.0, lambda: fired.append("b"))
        assert b.pending and not b.cancelled
        c = dev.call_later(3.0, lambda: fired.append("c"))
        assert session._timer_timeout() == 1.0, "the poll waits until the earliest timer"
        assert c.cancel() and not c.cancel() and c.cancelled
        clock.now += 2.5
        session.run_once(0)
        assert fired == ["b", "early", "a"]
        assert not a.cancel() and not a.pending
        clock.now += 10
        session.run_once(0)
        assert fired == ["b", "early", "a"], "a cancelled timer never runs"
        assert session.counters["timers_fired"] == 3

        def boom() -> None:
            raise RuntimeError("timer bug")

        dev.call_later(0, boom)
        dev.call_later(0, lambda: fired.append("after"))
        session.run_once(0)
        assert fired[-1] == "after" and session.counters["handler_errors"] == 1
        with pytest.raises(UsageError):
            dev.call_later(-1, lambda: None)
        with pytest.raises(UsageError):
            dev.call_later(float("nan"), lambda: None)

        # many cancelled timers do not pile up in the heap
        handles = [dev.call_later(5.0, lambda: fired.append("x")) for _ in range(100)]
        for h in handles[:90]:
            h.cancel()
        assert len(session._timers) <= 60
        clock.now += 6
        session.run_once(0)
        assert fired.count("x") == 10
    finally:
        rig.session.close()


# --------------------------------------------------------------------------- watches


class PipeDevice(Keeper):
    """Watches a pipe from ``__init__``: each byte read answers one kept chain."""

    def __init__(self) -> None:
        super().__init__()
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.calls = 0
        self.fail = False
        self.watch(self.r, self.readable)

    def readable(self) -> None:
        self.calls += 1
        if self.fail:
            raise RuntimeError("callback bug")
        for _ in range(QSIZE):  # bounded
            try:
                data = os.read(self.r, 64)
            except BlockingIOError:
                return
            for _ in data:
                if self.waiting[0]:
                    self.answer(0)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def test_watched_pipe_drives_completions_and_survives_reset() -> None:
    dev = PipeDevice()
    rig = Rig(dev)
    session = rig.session
    try:
        session.open()
        tokens = [rig.submit(0, b"p"), rig.submit(0, b"q")]
        os.write(dev.w, b"..")
        session.run_once(5.0)  # returns as soon as the pipe is readable
        assert dev.calls == 1
        assert [(t, d) for t, _, d in rig.used(0)] == [(tokens[0], b"P"), (tokens[1], b"Q")]
        assert rig.transport.interrupts == [0]

        dev.fail = True  # a bug in the callback: counted, the loop goes on
        os.write(dev.w, b".")
        session.run_once(5.0)
        assert session.counters["handler_errors"] == 1
        dev.fail = False
        rig.submit(0, b"r")
        session.run_once(5.0)  # the byte is still there: level-triggered
        assert [d for _, _, d in rig.used(0)] == [b"R"]

        session.reset()  # watches are not removed by a reset
        rig.restart()
        rig.submit(0, b"s")
        os.write(dev.w, b".")
        session.run_once(5.0)
        assert [d for _, _, d in rig.used(0)] == [b"S"]

        dev.unwatch(dev.r)
        calls = dev.calls
        os.write(dev.w, b".")
        session.run_once(0)
        assert dev.calls == calls, "an unwatched source is not polled"
        dev.unwatch(dev.r)  # unknown: ignored
    finally:
        session.close()


def test_watch_takes_fds_fileno_objects_and_pollables(rig: Rig) -> None:
    dev, session = rig.device, rig.session
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    waker = Waker()
    got: list[str] = []

    class File:
        def fileno(self) -> int:
            return r

    f = File()
    try:
        session.open()
        dev.watch(f, lambda: got.append("file") or os.read(r, 1))
        dev.watch(waker, lambda: got.append("waker") or waker.drain())
        os.write(w, b"x")
        waker.wake()
        session.run_once(5.0)
        assert sorted(got) == ["file", "waker"]
        dev.watch(f, lambda: got.append("again") or os.read(r, 1))  # replaces
        os.write(w, b"x")
        session.run_once(5.0)
        assert got[-1] == "again"
        for bad in (-1, "3", object(), True):
            with pytest.raises(UsageError):
                dev.watch(bad, lambda: None)
        with pytest.raises(UsageError):
            dev.watch(r, "not callable")  # type: ignore[arg-type]
        dev.unwatch(f)
        dev.unwatch(waker)
    finally:
        waker.close()
        os.close(r)
        os.close(w)


def test_bad_handle_results_are_device_bugs(rig: Rig) -> None:
    dev = rig.device
    for result in (None, True, 17, -1, "4"):
        dev.on_handle = lambda q, ch, r=result: r  # type: ignore[misc]
        rig.submit(0, b"zz")
    assert [n for _, n, _ in rig.used(0)] == [0] * 5
    assert rig.session.counters["handler_errors"] == 5
    assert rig.ring_metrics(0)["handler_errors"] == 5
