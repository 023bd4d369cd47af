"""Test a device in-process: :class:`DeviceHarness` plays the driver.

Theory of operation
-------------------
A device is normally served by a process of its own and driven by the kernel through
shared memory and ZeroMQ. To unit-test a :class:`~vdev.device.Device` none of that is
needed: the harness builds the rings in a ``FlatMemory(bytearray)``, plays the driver
with the real :class:`~vdev.virtio.queue.DriverQueue` on them, and serves the device
with the real :class:`~vdev.session.DeviceSession` — the same validation, drain,
kept-chain and timer code a device process runs — with the harness itself as the
session's transport (it records interrupts, broken rings and config interrupts). No
process, no ZeroMQ, no shared memory::

    from vdev.testing import DeviceHarness
    from vdev.examples.rng import RngDevice

    with DeviceHarness(RngDevice(seed=1)) as h:
        h.negotiate()                                  # offer, accept, DRIVER_OK
        c = h.request(0, in_sizes=[16])                # one chain: 16 writable bytes
        assert c.len == 16 and len(c.written) == 16
        assert h.device.metrics["bytes"] == 16

Each step (:meth:`~DeviceHarness.submit`, :meth:`~DeviceHarness.request`,
:meth:`~DeviceHarness.run_pending`, :meth:`~DeviceHarness.fire_timers`,
:meth:`~DeviceHarness.advance`) kicks as the driver would (only when
``kick_prepare`` says so: EVENT_IDX suppression is exercised), runs rounds of the
session's loop until no ring has work left (watched sources are polled with timeout 0,
due timers fire), then reaps every queue and checks the ring invariants:

* ``used.idx`` moved by at most the chains in flight, and only by completions: the
  used entries reaped so far equal what the session pushed (chains served + bad chains
  − chains kept + completions of kept chains);
* every used entry names a head that is in flight (no head completed twice, none
  invented, §2.7.8) and a length no larger than the chain's writable bytes
  (§2.7.8.2);
* no ring was found broken by the session.

A violation raises :class:`InvariantError` (an ``AssertionError``: the device or the
session is at fault, not the test). Timers run on the harness's own clock
(:attr:`DeviceHarness.clock`), which moves only when the test says so: nothing sleeps.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from hostops.shm import PageAllocator
from vdev.device import RING_FEATURES, Device
from vdev.session import DeviceSession, Ring
from vdev.virtio import DriverQueue, F, FlatMemory, RingLayout, bit
from vdev.virtio.ring import USED_ELEM

__all__ = [
    "DeviceHarness",
    "Completion",
    "Request",
    "InvariantError",
    "StillPending",
    "HarnessClock",
]

_ALIGN = 64
#: Most loop rounds one step runs (a device that always has work left is a bug).
MAX_ROUNDS = 10_000


class InvariantError(AssertionError):
    """A ring invariant was broken: the device (or the session) is at fault."""


class StillPending(Exception):
    """:meth:`DeviceHarness.request` found the chain kept by the device (use
    :meth:`DeviceHarness.submit` for chains the device answers later)."""


@dataclass(frozen=True)
class Completion:
    """A used entry as the driver reaps it: ``len`` bytes written, and those bytes
    (the start of the chain's writable buffers, concatenated). ``writable`` is the whole
    writable part as it was when reaped (a device that writes a status byte at the end
    and reports a shorter length, as virtio-blk on errors, shows it there; bytes the
    device did not touch read 0xA5)."""

    queue: int
    head: int
    len: int
    written: bytes
    writable: bytes = b""


@dataclass(eq=False)
class Request:
    """One chain made available by the harness. ``completion`` is set when the device
    completes it; ``released`` when a reset dropped it unanswered."""

    queue: int
    head: int
    out: list[bytes]
    writable: list[tuple[int, int]]
    block: int
    completion: Completion | None = None
    released: bool = False

    @property
    def done(self) -> bool:
        """The device completed the chain."""
        return self.completion is not None

    @property
    def writable_len(self) -> int:
        """Bytes the device may write into the chain."""
        return sum(n for _, n in self.writable)


class HarnessClock:
    """The session's monotonic clock, moved only by the test."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class _Queue:
    layout: RingLayout
    dq: DriverQueue | None = None
    last_used: int = 0
    inflight: dict[int, Request] = field(default_factory=dict)
    done: deque[Completion] = field(default_factory=deque)


class DeviceHarness:
    """Drive ``device`` in this process (see the module docstring).

    ``queue_size`` is every ring's size (default: the device's maximum, at most 256);
    ``memory_size`` the bytes available for request buffers; ``budget`` the session's
    chains per ring per round.
    """

    def __init__(
        self,
        device: Device,
        *,
        queue_size: int | None = None,
        memory_size: int = 4 << 20,
        budget: int = 64,
    ) -> None:
        size = queue_size if queue_size is not None else min(device.max_queue_size, 256)
        self.device = device
        self.queue_size = size
        self.clock = HarnessClock()
        #: The session's log (one line per event).
        self.log = io.StringIO()
        #: Used-buffer notifications the session sent, per queue.
        self.interrupts = [0] * device.num_queues
        #: Kicks the driver side sent (kick_prepare said so), per queue.
        self.kicks = [0] * device.num_queues
        #: Configuration-change interrupts the device raised.
        self.config_interrupts = 0
        #: ``(queue, why)`` of every ring the session found broken.
        self.broken: list[tuple[int, str]] = []
        #: Negotiated features (0 before :meth:`negotiate`).
        self.features = 0
        self._reaped = 0
        offset = 0
        self._queues: list[_Queue] = []
        for _ in range(device.num_queues):
            layout = RingLayout.packed(size, offset)
            self._queues.append(_Queue(layout))
            offset = (layout.end + 4095) & ~4095
        self.memory = FlatMemory(bytearray(offset + memory_size))
        self._alloc = PageAllocator(offset, memory_size, page=_ALIGN)
        self.session = DeviceSession(
            device, self, budget=budget, log_file=self.log, clock=self.clock
        )

    # ------------------------------------------------------------ the transport's part
    def interrupt(self, ring: Ring) -> None:
        """The session's used-buffer notification (counted)."""
        self.interrupts[ring.index] += 1

    def ring_broken(self, ring: Ring, why: str) -> None:
        """The session found ``ring`` broken (recorded; the step raises)."""
        self.broken.append((ring.index, why))

    def config_interrupt(self) -> None:
        """The device raised a configuration-change interrupt (counted)."""
        self.config_interrupts += 1

    # ------------------------------------------------------------ set-up
    @property
    def offered(self) -> int:
        """The features the device offers, ring features included (as GET_FEATURES)."""
        return (self.device.device_features() & ~RING_FEATURES) | RING_FEATURES

    def negotiate(self, accept: int | None = None) -> int:
        """Negotiate and set DRIVER_OK: accept ``accept`` (default: everything offered),
        start every ring, call ``device.activate``. Returns the features. ValueError if
        ``accept`` has bits that were not offered or lacks VERSION_1 (§3.1.1, §6.1).
        A second call resets the device first."""
        offered = self.offered
        features = offered if accept is None else accept
        if features & ~offered:
            raise ValueError(f"features {features & ~offered:#x} were not offered")
        if not features & bit(F.VERSION_1):
            raise ValueError("VERSION_1 must be accepted (no legacy interface)")
        if self.features:
            self.reset()
        s = self.session
        for ring, q in zip(s.rings, self._queues, strict=True):
            s.check_num(ring, self.queue_size, "harness")
            s.start_ring(ring, self.memory, q.layout, features)
            ring.enabled = True
            q.dq = DriverQueue(
                self.memory,
                q.layout,
                event_idx=bool(features & bit(F.EVENT_IDX)),
                indirect=bool(features & bit(F.INDIRECT_DESC)),
            )
            q.last_used = 0
        self.device.activate(features)
        self.features = features
        for ring in s.rings:
            s.schedule_ring(ring)
        self._step()
        return features

    def reset(self) -> None:
        """Reset the device (as RESET_DEVICE): kept chains are released, the driver's
        requests in flight are dropped (``released``); :meth:`negotiate` again."""
        self.session.reset()
        for q in self._queues:
            for req in q.inflight.values():
                req.released = True
                self._alloc.free(req.block)
            q.inflight.clear()
            q.dq = None
        self.features = 0

    # ------------------------------------------------------------ requests
    def submit(
        self, queue: int, out: Sequence[bytes] = (), in_sizes: Sequence[int] = ()
    ) -> Request:
        """Make one chain available on ``queue``: a readable buffer per ``out`` item,
        then a writable buffer per ``in_sizes`` item; kick if the ring asks for it and
        run the device. Returns the :class:`Request` (``.completion`` once answered)."""
        q = self._queue(queue)
        if q.dq is None:
            raise RuntimeError("negotiate() first")
        sizes = [len(b) for b in out] + list(in_sizes)
        if not sizes or any(n <= 0 for n in sizes):
            raise ValueError("a chain needs buffers, each of at least one byte")
        spans = [(n + _ALIGN - 1) // _ALIGN * _ALIGN for n in sizes]
        block = self._alloc.alloc(sum(spans))
        if block is None:
            raise MemoryError("harness memory full: complete or reset requests first")
        addr = block
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        for i, (n, span) in enumerate(zip(sizes, spans, strict=True)):
            if i < len(out):
                self.memory.view(addr, n)[:] = out[i]
                readable.append((addr, n))
            else:
                self.memory.view(addr, n)[:] = b"\xa5" * n  # not zero: catch short writes
                writable.append((addr, n))
            addr += span
        req = Request(queue, -1, [bytes(b) for b in out], writable, block)
        try:
            req.head = q.dq.add(readable, writable, req)
        except Exception:
            self._alloc.free(block)
            raise
        q.inflight[req.head] = req
        if q.dq.kick_prepare():
            self.kicks[queue] += 1
            self.session.kick(queue)
        self._step()
        return req

    def request(
        self, queue: int, out: Sequence[bytes] = (), in_sizes: Sequence[int] = ()
    ) -> Completion:
        """:meth:`submit` a chain and return its :class:`Completion`; raises
        :class:`StillPending` if the device kept it."""
        req = self.submit(queue, out, in_sizes)
        if req.completion is None:
            raise StillPending(
                f"queue {queue}: the device kept chain {req.head}; use submit() and "
                "run_pending() / fire_timers()"
            )
        q = self._queues[queue]
        q.done.remove(req.completion)  # handed to the caller: not in take_completions
        return req.completion

    def take_completions(self, queue: int) -> list[Completion]:
        """Completions of ``queue`` reaped since the last call (in used-ring order),
        except those :meth:`request` returned."""
        q = self._queue(queue)
        out = list(q.done)
        q.done.clear()
        return out

    def in_flight(self, queue: int) -> int:
        """Chains of ``queue`` made available and not yet completed."""
        return len(self._queue(queue).inflight)

    # ------------------------------------------------------------ running
    def run_pending(self) -> None:
        """Run the device's loop until no ring has work left: watched sources that are
        readable now, due timers, kicked rings; then reap and check."""
        self._step()

    def advance(self, seconds: float) -> int:
        """Move the clock ``seconds`` forward and run (timers now due fire); returns how
        many device timers fired."""
        if seconds < 0:
            raise ValueError("the clock does not go back")
        before = self.session.counters["timers_fired"]
        self.clock.now += seconds
        self._step()
        return self.session.counters["timers_fired"] - before

    def fire_timers(self) -> int:
        """Move the clock to the earliest pending timer (if any) and run; returns how
        many device timers fired."""
        live = [deadline for deadline, _, t, _ in self.session._timers if t.pending]
        if not live:
            return 0
        return self.advance(max(0.0, min(live) - self.clock.now))

    @property
    def counters(self) -> dict[str, int]:
        """The session's counters merged with the device's (what GET_METRICS says)."""
        return self.session.metrics()

    def close(self) -> None:
        """Close the session (kept chains released, ``device.close()``)."""
        self.session.close()

    def __enter__(self) -> DeviceHarness:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    def _queue(self, queue: int) -> _Queue:
        if not isinstance(queue, int) or not 0 <= queue < len(self._queues):
            raise ValueError(f"queue {queue!r} does not exist ({len(self._queues)} queues)")
        return self._queues[queue]

    def _step(self) -> None:
        s = self.session
        s.run_once(timeout=0)
        for _ in range(MAX_ROUNDS):
            if not s.has_pending:
                break
            s.run_once(timeout=0)
        else:
            raise InvariantError(f"the device still has work after {MAX_ROUNDS} rounds")
        for index in range(len(self._queues)):
            self._reap(index)
        if self.broken:
            raise InvariantError(f"ring broken: {self.broken}")
        c = s.counters
        pushed = c["chains"] + c["bad_chains"] - c["chains_kept"] + c["completions"]
        if pushed != self._reaped:
            raise InvariantError(
                f"the session pushed {pushed} used entries, the driver reaped {self._reaped}"
            )

    def _reap(self, index: int) -> None:
        q = self._queues[index]
        dq = q.dq
        if dq is None:
            return
        size = dq.size
        used = self.memory.view(q.layout.used, RingLayout.used_bytes(size))
        idx = int.from_bytes(used[2:4], "little")
        delta = (idx - q.last_used) & 0xFFFF
        seen: set[int] = set()
        for i in range(min(delta, size)):  # bounded by the queue size
            head, length = USED_ELEM.unpack_from(used, 4 + 8 * ((q.last_used + i) % size))
            req = q.inflight.get(head)
            if req is None or head in seen:
                raise InvariantError(
                    f"queue {index}: used entry for head {head}, which is not in flight "
                    "(completed twice or never made available, §2.7.8)"
                )
            if length > req.writable_len:
                raise InvariantError(
                    f"queue {index}: head {head} used length {length} > its "
                    f"{req.writable_len} writable bytes (§2.7.8.2)"
                )
            seen.add(head)
        used.release()
        if delta > len(q.inflight):
            raise InvariantError(
                f"queue {index}: used.idx moved by {delta} with {len(q.inflight)} in flight"
            )
        got = dq.get_used()
        if dq.broken is not None:
            raise InvariantError(f"queue {index}: {dq.broken}")
        if len(got) != delta:
            raise InvariantError(f"queue {index}: reaped {len(got)} of {delta} used entries")
        dq.enable_interrupts()
        q.last_used = idx
        for token, length in got:
            req = token
            assert isinstance(req, Request)
            whole = b"".join(bytes(self.memory.view(a, n)) for a, n in req.writable)
            req.completion = Completion(index, req.head, length, whole[:length], whole)
            del q.inflight[req.head]
            self._alloc.free(req.block)
            q.done.append(req.completion)
            self._reaped += 1
