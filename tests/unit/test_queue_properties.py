"""Property tests: a DriverQueue and a DeviceQueue on one ring, driven through random
interleavings by a hypothesis state machine, against an independent model.

The model predicts every notification decision exactly (NO_NOTIFY / NO_INTERRUPT flags,
or the EVENT_IDX window written as "event index in [old, new) mod 2**16"), and checks
the liveness claims the design relies on: a device that went to sleep after
re-enabling notifications is always kicked for new chains; a driver that went to sleep
after re-enabling interrupts is always interrupted for new completions. It also runs
from indices just below the u16 wrap (reached by cycling the ring, not by poking state).
"""

from __future__ import annotations

import functools
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from vdev.virtio import (
    Chain,
    DeviceQueue,
    DriverQueue,
    FlatMemory,
    QueueFull,
    RingLayout,
    UsageError,
)

pytestmark = pytest.mark.timeout(60)

U16 = struct.Struct("<H")
ELEM = struct.Struct("<II")
SLAB = 0x200  # per in-flight chain (<= 5 bufs of <= 24 bytes): readable @0x20*i,
#               writable @0xA0+0x20*j, indirect table @0x140
RING_BASE = 0x40
SENTINEL = 0xEE
M16 = 0xFFFF


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 131 + k * 7 + 3) & 0xFF for k in range(n))


def in_window(event: int, old: int, new: int) -> bool:
    """Our own statement of the EVENT_IDX rule: notify iff the other side's event index
    was published in this batch, i.e. lies in [old, new) modulo 2**16."""
    return (event - old) & M16 < (new - old) & M16


OPS = (
    ["add"] * 4
    + ["kick"] * 3
    + ["get_used"] * 2
    + ["enable_interrupts", "disable_interrupts"]
    + ["pop"] * 4
    + ["push"] * 4
    + ["should_interrupt"] * 2
    + ["enable_notifications", "disable_notifications"]
    + ["device_loop", "driver_loop"]
)


def _tracked(f: Callable[..., None]) -> Callable[..., None]:
    """Remember whether the last step finished, so teardown only drains healthy runs."""

    @functools.wraps(f)
    def step(self: RingMachine, *args: Any, **kwargs: Any) -> None:
        self.healthy = False
        f(self, *args, **kwargs)
        self.healthy = True

    return step


@dataclass
class Req:
    token: int
    head: int
    ndesc: int
    slab: int
    rdata: list[bytes]
    wbufs: list[tuple[int, int]]
    indirect: bool
    written: bytes = b""


class RingMachine(RuleBasedStateMachine):
    WRAP = False

    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.healthy = True

    # ------------------------------------------------------------------ setup

    @initialize(
        n=st.sampled_from([1, 2, 4, 8, 16]),
        event_idx=st.booleans(),
        indirect=st.booleans(),
        back=st.integers(1, 16),
    )
    def setup(self, n: int, event_idx: bool, indirect: bool, back: int) -> None:
        self.n = n
        self.event_idx = event_idx
        self.indirect = indirect
        self.lay = RingLayout.packed(n, RING_BASE)
        self.data_base = (self.lay.end + 0xFF) & ~0xFF
        self.buf = bytearray(self.data_base + SLAB * n)
        self.mem = FlatMemory(self.buf)
        self.d = DriverQueue(self.mem, self.lay, event_idx=event_idx, indirect=indirect)
        start = (65536 - back) if self.WRAP else 0
        if start:
            self._cycle_driver(start)
        # The device starts where the driver's ring stands (SET_VRING_BASE).
        self.v = DeviceQueue(
            self.mem, self.lay, event_idx=event_idx, indirect=indirect, last_avail=start
        )
        assert self.v.used_idx == start
        self.base_completions = self.d.stats.completions
        self.base_requests = self.d.stats.requests
        # Model.
        self.next_token = 0
        self.free_slabs = list(range(n))
        self.reqs: dict[int, Req] = {}
        self.unpublished: list[int] = []
        self.avail_q: deque[int] = deque()
        self.held: dict[int, Chain] = {}
        self.used_q: deque[tuple[int, int]] = deque()
        self.completed: set[int] = set()
        self.published = self.popped = self.used_count = self.reaped = start
        self.signalled = start
        # Both sides arm and go to sleep, as a freshly started pair would.
        assert self.v.enable_notifications() is False
        assert self.d.enable_interrupts() is False
        self.avail_event = self.used_event = start
        self.dev_notify_enabled = self.drv_int_enabled = True
        self.dev_asleep = self.drv_asleep = True
        self.ready = True

    def _cycle_driver(self, count: int) -> None:
        """Run ``count`` one-descriptor requests through the ring, completing each by
        writing the used ring by hand, so every index stands at ``count``."""
        d, n, used = self.d, self.n, self.lay.used
        buf = self.data_base
        done = 0
        while done < count:
            k = min(n, count - done)
            for j in range(k):
                head = d.add([], [(buf, 1)], done + j)
                ELEM.pack_into(self.buf, used + 4 + 8 * ((done + j) % n), head, 1)
            d.kick_prepare()
            U16.pack_into(self.buf, used + 2, (done + k) & M16)
            got = d.get_used()
            assert got == [(done + j, 1) for j in range(k)]
            done += k
        assert U16.unpack_from(self.buf, self.lay.avail + 2)[0] == count & M16
        assert d.num_free == n and d.in_flight == 0

    # ------------------------------------------------------------------ one step

    @rule(op=st.sampled_from(OPS), data=st.data())
    @_tracked
    def step(self, op: str, data: st.DataObject) -> None:
        """One operation of either side; ``OPS`` repeats some to weight the mix."""
        if op in ("add", "push", "device_loop"):
            getattr(self, op)(data)
        elif op == "get_used":
            self.get_used(data.draw(st.one_of(st.none(), st.integers(0, 3)), label="limit"))
        else:
            getattr(self, op)()

    # ------------------------------------------------------------------ driver

    def add(self, data: st.DataObject) -> None:
        # 1..min(N, 4) buffers, now and then one more than the ring can take
        count = data.draw(st.integers(1, min(self.n, 4) + 1), label="buffers")
        nr = data.draw(st.integers(0, count), label="readable")
        nw = count - nr
        use_indirect = data.draw(st.booleans(), label="indirect")
        use_indirect = use_indirect and self.indirect
        need = 1 if use_indirect else nr + nw
        free_before, inflight_before = self.d.num_free, self.d.in_flight
        if not self.free_slabs:
            assert free_before == 0
            with pytest.raises(QueueFull):
                self.d.add([(self.data_base, 1)], [], "nope")
            assert self.d.num_free == 0 and self.d.in_flight == inflight_before
            return
        slab = self.free_slabs.pop()
        tok = self.next_token
        base = self.data_base + SLAB * slab
        lens = data.draw(st.lists(st.integers(1, 24), min_size=nr + nw, max_size=nr + nw))
        rbufs = [(base + 0x20 * i, lens[i]) for i in range(nr)]
        wbufs = [(base + 0xA0 + 0x20 * j, lens[nr + j]) for j in range(nw)]
        rdata = []
        for i, (a, ln) in enumerate(rbufs):
            p = pattern(tok * 8 + i, ln)
            self.buf[a : a + ln] = p
            rdata.append(p)
        for a, ln in wbufs:
            self.buf[a : a + ln] = bytes([SENTINEL]) * ln
        table = base + 0x140 if use_indirect else None
        if use_indirect and nr + nw > self.n:  # §2.7.5.3.1: no chain longer than the queue
            with pytest.raises(UsageError):
                self.d.add(rbufs, wbufs, tok, indirect_table=table)
            assert self.d.num_free == free_before and self.d.in_flight == inflight_before
            self.free_slabs.append(slab)
            return
        if need > free_before:
            with pytest.raises(QueueFull):
                self.d.add(rbufs, wbufs, tok, indirect_table=table)
            assert self.d.num_free == free_before and self.d.in_flight == inflight_before
            self.free_slabs.append(slab)
            return
        head = self.d.add(rbufs, wbufs, tok, indirect_table=table)
        assert 0 <= head < self.n
        assert self.d.num_free == free_before - need
        self.next_token += 1
        self.reqs[tok] = Req(tok, head, need, slab, rdata, wbufs, use_indirect)
        self.unpublished.append(tok)

    def kick(self) -> None:
        new_chains = len(self.unpublished)
        old = self.published
        new = (old + new_chains) & M16
        notify = self.d.kick_prepare()
        if self.event_idx:
            expected = new_chains > 0 and in_window(self.avail_event, old, new)
        else:
            expected = new_chains > 0 and self.dev_notify_enabled
        assert notify is expected
        # Liveness: a device asleep (re-enabled, re-checked, found nothing) is kicked.
        if self.dev_asleep and new_chains:
            assert notify, "lost kick"
        if notify:
            self.dev_asleep = False  # the doorbell wakes it
        self.published = new
        self.avail_q.extend(self.unpublished)
        self.unpublished.clear()
        assert U16.unpack_from(self.buf, self.lay.avail + 2)[0] == new

    def get_used(self, limit: int | None) -> None:
        got = self.d.get_used(limit)
        take = len(self.used_q) if limit is None else min(limit, len(self.used_q))
        expected = [self.used_q.popleft() for _ in range(take)]
        assert got == expected
        for tok, ln in got:
            assert tok not in self.completed, "completed twice"
            self.completed.add(tok)
            r = self.reqs.pop(tok)
            assert len(r.written) == ln
            seen = b"".join(bytes(self.buf[a : a + n]) for a, n in r.wbufs)
            assert seen[:ln] == r.written  # what the device wrote
            assert seen[ln:] == bytes([SENTINEL]) * (len(seen) - ln)  # and nothing more
            self.free_slabs.append(r.slab)
        self.reaped = (self.reaped + len(got)) & M16
        if got:
            self.drv_asleep = False

    def enable_interrupts(self) -> None:
        again = self.d.enable_interrupts()
        assert again is bool(self.used_q)
        self.drv_int_enabled = True
        self.used_event = self.reaped
        self.drv_asleep = not again
        if self.event_idx:
            assert U16.unpack_from(self.buf, self.lay.avail + 4 + 2 * self.n)[0] == self.reaped
        else:
            assert U16.unpack_from(self.buf, self.lay.avail)[0] == 0

    def disable_interrupts(self) -> None:
        self.d.disable_interrupts()
        self.drv_int_enabled = False
        self.drv_asleep = False
        flags = U16.unpack_from(self.buf, self.lay.avail)[0]
        assert flags == (0 if self.event_idx else 1)

    # ------------------------------------------------------------------ device

    def pop(self) -> None:
        ch = self.v.pop()
        if not self.avail_q:
            assert ch is None
            return
        assert ch is not None
        tok = self.avail_q.popleft()
        r = self.reqs[tok]
        assert ch.head == r.head
        rlen = sum(len(p) for p in r.rdata)
        assert ch.readable_len == rlen
        assert ch.writable_len == sum(n for _, n in r.wbufs)
        assert ch.read(0, rlen) == b"".join(r.rdata)
        assert len(ch.segments) == len(r.rdata) + len(r.wbufs)
        assert all(s.indirect is r.indirect for s in ch.segments)
        assert [(s.addr, s.length) for s in ch.segments if s.writable] == r.wbufs
        self.held[tok] = ch
        self.popped = (self.popped + 1) & M16
        self.dev_asleep = False

    def push(self, data: st.DataObject) -> None:
        if not self.held:
            return
        tok = data.draw(st.sampled_from(sorted(self.held)))  # any order
        ch = self.held.pop(tok)
        written = data.draw(st.integers(0, ch.writable_len))
        payload = pattern(tok * 8 + 5, written)
        if written:
            ch.write(0, payload)
        self.v.push(ch.head, written)
        self.reqs[tok].written = payload
        self.used_q.append((tok, written))
        self.used_count = (self.used_count + 1) & M16
        assert U16.unpack_from(self.buf, self.lay.used + 2)[0] == self.used_count

    def should_interrupt(self) -> None:
        old, new = self.signalled, self.used_count
        pending = old != new
        irq = self.v.should_interrupt()
        if self.event_idx:
            expected = pending and in_window(self.used_event, old, new)
        else:
            expected = pending and self.drv_int_enabled
        assert irq is expected
        # Liveness: a driver asleep (re-enabled, re-checked, found nothing) is
        # interrupted for completions it has not reaped yet.
        if self.drv_asleep and self.used_q:
            assert irq, "lost interrupt"
        if irq:
            self.drv_asleep = False
        self.signalled = new

    def enable_notifications(self) -> None:
        again = self.v.enable_notifications()
        assert again is bool(self.avail_q)
        self.dev_notify_enabled = True
        self.avail_event = self.popped
        self.dev_asleep = not again

    def disable_notifications(self) -> None:
        self.v.disable_notifications()
        self.dev_notify_enabled = False
        self.dev_asleep = False
        flags = U16.unpack_from(self.buf, self.lay.used)[0]
        assert flags == (0 if self.event_idx else 1)

    # ------------------------------------------------------------------ whole loops

    def device_loop(self, data: st.DataObject) -> None:
        """What a device does on a kick: disable, drain (completing in any order),
        maybe interrupt, re-enable and re-check."""
        self.disable_notifications()
        while True:
            while self.avail_q:
                self.pop()
            self.pop()  # and sees nothing more
            while self.held:
                self.push(data)
            self.should_interrupt()
            self.enable_notifications()
            if not self.avail_q:
                assert self.dev_asleep
                return

    def driver_loop(self) -> None:
        """What the driver does on an interrupt: reap, re-enable, re-check."""
        while True:
            self.get_used(None)
            self.enable_interrupts()
            if not self.used_q:
                assert self.drv_asleep
                return

    # ------------------------------------------------------------------ invariants

    @invariant()
    @_tracked
    def accounting(self) -> None:
        if not self.ready:
            return
        live = self.reqs  # added and not reaped
        assert self.d.num_free + sum(r.ndesc for r in live.values()) == self.n
        assert self.d.in_flight == len(live)
        assert sorted(self.d.in_flight_tokens()) == sorted(live)
        assert self.d.has_used() is bool(self.used_q)
        assert self.v.has_avail() is bool(self.avail_q)
        assert self.v.last_avail == self.popped
        assert self.v.used_idx == self.used_count
        assert self.d.stats.completions - self.base_completions == len(self.completed)
        assert self.d.stats.requests - self.base_requests == self.next_token
        assert self.v.stats.bad_chains == 0 and not self.v.stats.rule_violations
        assert self.d.broken is None and self.v.broken is None

    def teardown(self) -> None:
        if not (self.ready and self.healthy):
            return  # a step failed: report that, do not pile a drain failure on it
        # Drain: every token ever added completes exactly once.
        self.kick()
        while self.avail_q:
            self.pop()
        while self.held:
            tok = min(self.held)
            ch = self.held.pop(tok)
            payload = pattern(tok * 8 + 5, ch.writable_len)
            ch.write(0, payload)
            self.v.push(ch.head, ch.writable_len)
            self.reqs[tok].written = payload
            self.used_q.append((tok, ch.writable_len))
            self.used_count = (self.used_count + 1) & M16
        self.should_interrupt()
        self.get_used(None)
        assert self.completed == set(range(self.next_token))
        assert self.d.num_free == self.n and self.d.in_flight == 0
        self.accounting()


class WrapMachine(RingMachine):
    WRAP = True


# No "explain" phase: it traces every line, far too slow with the wrap-up cycling.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
_fast = settings(
    phases=_PHASES,
    max_examples=60,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_wrap = settings(
    phases=_PHASES,
    max_examples=15,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_long = settings(
    phases=_PHASES,
    max_examples=5,
    stateful_step_count=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TestRing = RingMachine.TestCase
TestRing.settings = _fast
TestRingNearWrap = WrapMachine.TestCase
TestRingNearWrap.settings = _wrap
TestRingLongRunsNearWrap = WrapMachine.TestCase
TestRingLongRunsNearWrap.settings = _long


# ---------------------------------------------------------------------- API edges


def _pair(n: int = 4, **kw: bool) -> tuple[bytearray, DriverQueue, DeviceQueue]:
    buf = bytearray(0x4000)
    mem = FlatMemory(buf)
    lay = RingLayout.packed(n, 0)
    return buf, DriverQueue(mem, lay, **kw), DeviceQueue(mem, lay, **kw)


def test_add_rejects_bad_calls_and_changes_nothing() -> None:
    buf, d, v = _pair()
    for kwargs in (
        {"readable": [], "writable": []},
        {"readable": [(0x1000, 0)], "writable": []},
        {"readable": [(0x1000, 2**32)], "writable": []},
        {"readable": [(-1, 4)], "writable": []},
        {"readable": [(0x1000, 4)], "writable": [], "indirect_table": 0x2000},  # not negotiated
    ):
        with pytest.raises(UsageError):
            d.add(token="t", **kwargs)  # type: ignore[arg-type]
        assert d.num_free == 4 and d.in_flight == 0
    assert d.kick_prepare() is False  # nothing was published
    assert d.stats.requests == 0
    assert U16.unpack_from(buf, d.layout.avail + 2)[0] == 0


def test_queue_full_then_indirect_fits() -> None:
    buf, d, v = _pair(n=2, indirect=True)
    d.add([(0x1000, 1)], [(0x1100, 1)], "a")
    with pytest.raises(QueueFull):
        d.add([(0x1000, 1)], [], "b")
    assert d.num_free == 0 and d.in_flight == 1
    d.kick_prepare()
    ch = v.pop()
    assert ch is not None
    v.push(ch.head, 1)
    assert d.get_used() == [("a", 1)]
    d.add([(0x1000, 1)], [(0x1100, 1)], "c", indirect_table=0x2000)
    assert d.num_free == 1
    with pytest.raises(UsageError):  # §2.7.5.3.1: a table longer than the queue
        d.add([(0x1000, 1), (0x1010, 1)], [(0x1100, 1)], "d", indirect_table=0x2000)


def test_push_rejects_bad_arguments() -> None:
    buf, d, v = _pair()
    for head, written in ((4, 0), (-1, 0), (0, -1), (0, 2**32)):
        with pytest.raises(UsageError):
            v.push(head, written)
    assert v.used_idx == 0 and U16.unpack_from(buf, v.layout.used + 2)[0] == 0


def test_kick_prepare_without_new_chains_is_false() -> None:
    for ev in (False, True):
        buf, d, v = _pair(event_idx=ev)
        assert d.kick_prepare() is False
        d.add([(0x1000, 1)], [], 1)
        assert d.kick_prepare() is True
        assert d.kick_prepare() is False
        assert (d.stats.kicks_sent, d.stats.kicks_suppressed) == (1, 0)
