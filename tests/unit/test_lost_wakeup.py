"""The disable–drain–re-enable–recheck loops, sans-IO and deterministic.

Three "threads" — the submitting driver, the device, and the driver's interrupt handler
— are generators that yield at every point where another thread could run. A scheduler
interleaves them: exhaustively (every interleaving of a small scenario) or randomly
(thousands of requests). A thread waiting for a doorbell yields a predicate and is not
runnable until it holds. When no thread can run, every request must have completed.

If a side ignores what ``enable_notifications()`` / ``enable_interrupts()`` return (the
re-check), some interleaving strands a request: that is the classic lost wake-up, shown
here to exist, and shown not to happen with the re-check.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from vdev.virtio import DeviceQueue, DriverQueue, FlatMemory, RingLayout

pytestmark = pytest.mark.timeout(60)

U16 = struct.Struct("<H")
ELEM = struct.Struct("<II")
TOKEN = struct.Struct("<Q")
MAGIC = 0x5A5A_0000_1234_5678
Wait = Callable[[], bool] | None
Thread = Generator[Wait, None, None]


@dataclass
class _T:
    gen: Thread
    wait: Wait = None
    done: bool = False


@dataclass
class World:
    """One ring, two peers, and their doorbells (plain flags)."""

    n: int = 4
    event_idx: bool = False
    requests: int = 2
    recheck_device: bool = True
    recheck_driver: bool = True
    batch: int = 1  # chains added per kick_prepare
    irq_per_push: bool = False  # device decides on an interrupt after every push
    preload: bool = False  # submit everything (and kick) before the threads start
    threads_on: tuple[str, ...] = ("submit", "device", "irq")
    start: int = 0  # ring indices at start (reached by cycling the ring)
    poll: int = 0  # hybrid polling: device looks this many steps before arming
    irq_poll: int = 0  # hybrid polling: interrupt handler looks this many steps
    kick: bool = False
    irq: bool = False
    completed: dict[int, int] = field(default_factory=dict)
    poll_hits: int = 0  # polls (either side) that found work
    poll_ends: int = 0  # poll windows that ended empty (then: arm + re-check)
    pushed: int = 0
    steps: int = 0

    def __post_init__(self) -> None:
        self.lay = RingLayout.packed(self.n, 0)
        self.data = (self.lay.end + 15) & ~15
        self.buf = bytearray(self.data + 16 * self.n)
        self.mem = FlatMemory(self.buf)
        self.d = DriverQueue(self.mem, self.lay, event_idx=self.event_idx)
        if self.start:
            _cycle(self, self.start)
        self.v = DeviceQueue(self.mem, self.lay, event_idx=self.event_idx, last_avail=self.start)
        assert self.v.enable_notifications() is False  # both sides armed and asleep
        assert self.d.enable_interrupts() is False
        self.slots = list(range(self.n))
        self.slot_of: dict[int, int] = {}
        self.unpublished = 0
        self.next_tok = 0
        if self.preload:
            while self.next_tok < self.requests:
                self._add()
            self._publish()
        self.threads = {
            name: _T(gen)
            for name, gen in (
                ("submit", self.submitter()),
                ("device", self.device()),
                ("irq", self.irq_handler()),
            )
            if name in self.threads_on
        }

    # -- scheduler interface
    def runnable(self) -> list[str]:
        return [
            name for name, t in self.threads.items() if not t.done and (t.wait is None or t.wait())
        ]

    def step(self, name: str) -> None:
        t = self.threads[name]
        self.steps += 1
        try:
            t.wait = next(t.gen)
        except StopIteration:
            t.done = True

    # -- driver: submit
    def _add(self) -> None:
        tok = self.next_tok
        slot = self.slots.pop()
        addr = self.data + 16 * slot
        TOKEN.pack_into(self.buf, addr, tok)
        self.buf[addr + 8 : addr + 16] = b"\xee" * 8
        self.d.add([(addr, 8)], [(addr + 8, 8)], tok)
        self.slot_of[tok] = slot
        self.next_tok += 1
        self.unpublished += 1

    def _publish(self) -> None:
        if self.d.kick_prepare():
            self.kick = True
        self.unpublished = 0

    def submitter(self) -> Thread:
        while self.next_tok < self.requests:
            if self.d.num_free < 2:  # ring full: publish what we have, wait for space
                if self.unpublished:
                    self._publish()
                    yield None
                yield lambda: self.d.num_free >= 2
            self._add()
            yield None
            if self.unpublished >= self.batch or self.next_tok == self.requests:
                self._publish()
                yield None

    # -- device
    def device(self) -> Thread:
        v = self.v
        while True:
            yield lambda: self.kick  # asleep until the doorbell rings
            self.kick = False
            while True:
                v.disable_notifications()
                yield None
                while True:
                    chain = v.pop()
                    yield None
                    if chain is None:
                        break
                    (tok,) = TOKEN.unpack(chain.read(0, 8))
                    chain.write(0, TOKEN.pack(tok ^ MAGIC))
                    v.push(chain.head, 8)
                    self.pushed += 1
                    yield None
                    if self.irq_per_push:
                        if v.should_interrupt():
                            self.irq = True
                        yield None
                if v.should_interrupt():
                    self.irq = True
                yield None
                if self.poll:
                    # hybrid polling: notifications stay off while we watch the ring
                    found = False
                    for _ in range(self.poll):
                        found = v.has_avail()
                        yield None
                        if found:
                            break
                    if found:
                        self.poll_hits += 1
                        continue  # drain again, still unarmed
                    self.poll_ends += 1
                again = v.enable_notifications()
                yield None
                if not (again and self.recheck_device):
                    break

    # -- driver: interrupt handler
    def irq_handler(self) -> Thread:
        d = self.d
        while True:
            yield lambda: self.irq  # asleep until interrupted
            self.irq = False
            d.disable_interrupts()
            yield None
            reaped = 0
            while True:
                got = d.get_used()
                yield None
                for tok, length in got:
                    assert tok not in self.completed, f"token {tok} completed twice"
                    assert length == 8
                    addr = self.data + 16 * self.slot_of.pop(tok)
                    assert TOKEN.unpack_from(self.buf, addr + 8)[0] == tok ^ MAGIC
                    self.completed[tok] = length
                    self.slots.append((addr - self.data) // 16)
                reaped += len(got)
                if got:
                    continue
                if self.irq_poll:
                    # hybrid polling: interrupts stay off while we watch the used ring
                    found = False
                    for _ in range(self.irq_poll):
                        found = d.has_used()
                        yield None
                        if found:
                            break
                    if found:
                        self.poll_hits += 1
                        continue
                    self.poll_ends += 1
                again = d.enable_interrupts()
                yield None
                if not (again and self.recheck_driver):
                    break
            d.note_interrupt(reaped)

    # -- outcome
    def stranded(self) -> bool:
        if "irq" in self.threads:
            return len(self.completed) < self.requests
        return self.pushed < self.requests


def _cycle(w: World, count: int) -> None:
    """Advance every ring index to ``count`` by running cheap requests through the
    driver, completing them by writing the used ring by hand."""
    d, n, used = w.d, w.n, w.lay.used
    done = 0
    while done < count:
        k = min(n, count - done)
        for j in range(k):
            head = d.add([(w.data, 1)], [], -1)
            ELEM.pack_into(w.buf, used + 4 + 8 * ((done + j) % n), head, 0)
        d.kick_prepare()
        U16.pack_into(w.buf, used + 2, (done + k) & 0xFFFF)
        assert len(d.get_used()) == k
        done += k


def run_random(w: World, rnd: random.Random, burst: int = 4, max_steps: int = 2_000_000) -> World:
    """Pick a runnable thread at random and run it for a random burst of steps."""
    while w.steps < max_steps:
        r = w.runnable()
        if not r:
            return w
        name = rnd.choice(r)
        for _ in range(rnd.randint(1, burst)):
            w.step(name)
            if name not in w.runnable():
                break
    raise AssertionError("did not quiesce")


def all_interleavings(
    make: Callable[[], World], max_preemptions: int | None = None, limit: int = 100_000
) -> Iterator[World]:
    """Every interleaving of the threads (depth-first, replaying from scratch). With
    ``max_preemptions`` only those that switch away from a still-runnable thread at
    most that many times (preemption bounding, as in CHESS): still exhaustive within
    the bound, and small bounds find the classic races."""
    prefix: list[int] = []
    runs = 0
    while True:
        w = make()
        choices: list[tuple[int, int]] = []
        prev: str | None = None
        used = 0
        while r := w.runnable():
            if prev in r:
                r.remove(prev)
                r.insert(0, prev)  # option 0: keep running the same thread
                if max_preemptions is not None and used >= max_preemptions:
                    r = [prev]
            k = prefix[len(choices)] if len(choices) < len(prefix) else 0
            choices.append((k, len(r)))
            if k and prev is not None and r[0] == prev:
                used += 1
            prev = r[k]
            w.step(prev)
        runs += 1
        assert runs <= limit, "state space larger than expected"
        yield w
        while choices and choices[-1][0] + 1 >= choices[-1][1]:
            choices.pop()
        if not choices:
            return
        prefix = [c for c, _ in choices[:-1]] + [choices[-1][0] + 1]


# --------------------------------------------------------------------------- hazards

DEVICE_SIDE = {"threads_on": ("submit", "device"), "requests": 2, "n": 4}
DRIVER_SIDE = {
    "threads_on": ("device", "irq"),
    "requests": 2,
    "n": 4,
    "preload": True,
    "irq_per_push": True,
}
THREE = {"requests": 2, "n": 2}
# scenario -> (World arguments, preemption bound: None = every interleaving)
SCENARIOS = {
    "device+submitter": (DEVICE_SIDE, None),
    "device+irq": (DRIVER_SIDE, 3),
    "all-three": (THREE, 2),
    # Hybrid polling (vdev.virtio.poll): a side that found its ring empty keeps the
    # notifications off and looks again for a few steps before it arms and re-checks.
    # The window ending is just another point where the peer can publish: every
    # interleaving must still complete, and arming without the re-check must still
    # strand a request.
    "device-polls": ({**DEVICE_SIDE, "poll": 2}, None),
    "driver-polls": ({**DRIVER_SIDE, "irq_poll": 2}, 3),
    "both-poll": ({**THREE, "poll": 1, "irq_poll": 1}, 2),
}


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize(
    ("scenario", "ignore"),
    [
        ("device+submitter", "recheck_device"),
        ("device+irq", "recheck_driver"),
        ("all-three", "recheck_device"),
        ("all-three", "recheck_driver"),
        ("device-polls", "recheck_device"),
        ("driver-polls", "recheck_driver"),
    ],
)
def test_ignoring_the_recheck_strands_a_request(
    event_idx: bool, scenario: str, ignore: str
) -> None:
    args, bound = SCENARIOS[scenario]
    runs = stranded = 0
    for w in all_interleavings(
        lambda: World(event_idx=event_idx, **args, **{ignore: False}), bound
    ):
        runs += 1
        if w.stranded():
            stranded += 1
            # stranded for real: the request is still in flight, nobody will wake up
            assert w.runnable() == []
            assert w.d.in_flight > 0
    assert runs > 50
    assert stranded > 0, "the hazard should exist when the re-check is ignored"


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_with_recheck_every_interleaving_completes(event_idx: bool, scenario: str) -> None:
    args, bound = SCENARIOS[scenario]
    runs = 0
    for w in all_interleavings(lambda: World(event_idx=event_idx, **args), bound):
        runs += 1
        assert not w.stranded(), f"interleaving {runs} stranded a request"
        assert w.pushed == w.requests
        if "irq" in w.threads:
            assert sorted(w.completed) == list(range(w.requests))
            assert w.d.in_flight == 0 and w.d.num_free == w.n
        assert w.d.broken is None and w.v.broken is None
    assert runs > 50


def test_polling_suppresses_the_doorbells_it_waits_for() -> None:
    """With EVENT_IDX, a device that drained and polls leaves avail_event behind the
    driver: the next publish needs no kick; once armed, the next one does."""
    w = World(threads_on=(), requests=3, event_idx=True, n=8)
    w._add()
    w._publish()
    assert w.kick is True
    w.kick = False
    w.v.disable_notifications()
    chain = w.v.pop()
    assert chain is not None
    w.v.push(chain.head, 0)
    assert w.v.pop() is None  # drained: polling now, nothing armed
    w._add()
    w._publish()
    assert w.kick is False and w.d.stats.kicks_suppressed == 1
    assert w.v.has_avail()  # the poll sees it
    assert w.v.pop() is not None
    assert w.v.enable_notifications() is False  # window over: armed, ring empty
    w._add()
    w._publish()
    assert w.kick is True


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize(("poll", "irq_poll"), [(1, 0), (0, 2), (3, 3)])
def test_polling_thousands_of_requests_complete(event_idx: bool, poll: int, irq_poll: int) -> None:
    w = World(
        n=8,
        event_idx=event_idx,
        requests=4000,
        batch=2,
        irq_per_push=True,
        poll=poll,
        irq_poll=irq_poll,
    )
    run_random(w, random.Random(poll * 10 + irq_poll), burst=4)
    assert sorted(w.completed) == list(range(4000))
    assert w.v.stats.chains == 4000 and w.d.in_flight == 0
    # both ways out of a window happened, many times
    assert w.poll_hits > 100 and w.poll_ends > 100


def test_explicit_lost_kick_schedule() -> None:
    """The race spelled out, no EVENT_IDX: the device finds the ring empty, the driver
    publishes while NO_NOTIFY is still set (kick suppressed), the device re-enables."""
    w = World(threads_on=(), requests=2)
    w._add()
    w._publish()
    assert w.kick is True  # first request: device was asleep, so it is kicked
    w.kick = False
    w.v.disable_notifications()
    chain = w.v.pop()
    assert chain is not None
    w.v.push(chain.head, 0)
    assert w.v.pop() is None  # drained ...
    w._add()
    w._publish()  # ... and the driver publishes in the window:
    assert w.kick is False and w.d.stats.kicks_suppressed == 1
    # the re-check is the only thing that notices
    assert w.v.enable_notifications() is True
    assert w.v.pop() is not None


# --------------------------------------------------------------------------- volume


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
def test_thousands_of_requests_complete(event_idx: bool, seed: int) -> None:
    w = World(n=8, event_idx=event_idx, requests=5000, batch=3, irq_per_push=seed == 2)
    run_random(w, random.Random(seed), burst=6)
    assert sorted(w.completed) == list(range(5000))
    assert w.pushed == 5000
    assert w.d.stats.requests == 5000 and w.d.stats.completions == 5000
    assert w.d.in_flight == 0 and w.d.num_free == 8
    assert w.v.stats.chains == 5000 and w.v.stats.bad_chains == 0
    ds, vs = w.d.stats, w.v.stats
    assert ds.kicks_sent + ds.kicks_suppressed > 0 and vs.interrupts_sent > 0
    if event_idx:
        # batching under EVENT_IDX: most doorbells are not needed
        assert ds.kicks_suppressed > 0
        assert vs.interrupts_suppressed > 0
        assert ds.interrupts_suppressed > 0
        assert ds.kicks_sent < 5000 and vs.interrupts_sent < 5000


@pytest.mark.parametrize("event_idx", [False, True])
def test_thousands_of_requests_across_the_u16_wrap(event_idx: bool) -> None:
    w = World(n=8, event_idx=event_idx, requests=5000, batch=2, start=65536 - 2500)
    run_random(w, random.Random(7), burst=5)
    assert sorted(w.completed) == list(range(5000))
    assert U16.unpack_from(w.buf, w.lay.avail + 2)[0] == (65536 - 2500 + 5000) & 0xFFFF
    assert w.v.last_avail == 2500 and w.v.used_idx == 2500


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("ignore", ["recheck_device", "recheck_driver"])
def test_random_schedules_find_the_hazard(event_idx: bool, ignore: str) -> None:
    found = 0
    for seed in range(300):
        w = World(n=4, event_idx=event_idx, requests=30, irq_per_push=True, **{ignore: False})
        run_random(w, random.Random(seed), burst=2)
        found += w.stranded()
        if found >= 3:
            break
    assert found >= 3


@settings(
    max_examples=25,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32),
    event_idx=st.booleans(),
    n=st.sampled_from([2, 4, 8]),
    batch=st.integers(1, 4),
    irq_per_push=st.booleans(),
    burst=st.integers(1, 8),
)
def test_hypothesis_schedules(
    seed: int, event_idx: bool, n: int, batch: int, irq_per_push: bool, burst: int
) -> None:
    w = World(n=n, event_idx=event_idx, requests=200, batch=batch, irq_per_push=irq_per_push)
    run_random(w, random.Random(seed), burst=burst)
    assert sorted(w.completed) == list(range(200))
    assert w.d.num_free == n and w.d.in_flight == 0
