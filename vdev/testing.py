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
session is at fault, not the test; its ``rule`` names the invariant). Timers run on the
harness's own clock (:attr:`DeviceHarness.clock`), which moves only when the test says
so: nothing sleeps.

Device bugs at the device API are recorded as they happen in
:attr:`DeviceHarness.device_faults` (an exception out of ``handle()``, a bad length it
returned, a refused ``complete``): the harness wraps the device's ``handle``,
``complete`` and ``complete_many`` for that (results and exceptions pass through; the
wrappers are removed on :meth:`DeviceHarness.close`). Tools such as
:mod:`vdev.conformance` read these, never the log's wording.

Raw access, for drivers that break the rules on purpose: :meth:`DeviceHarness.layout`,
:meth:`~DeviceHarness.write_descriptors`, :meth:`~DeviceHarness.publish_raw` (any heads,
any ``avail.idx``; returns a :class:`RawResult`), :meth:`~DeviceHarness.alloc`;
:meth:`~DeviceHarness.reset` zeroes the rings and resynchronises the bookkeeping.

The hostile driver (:func:`hostile_driver`, :class:`HostileDriver`) is built on them:
every kind of :data:`HOSTILE_KINDS` (loops, ``next`` out of range, nested and giant
indirect tables, huge and out-of-range buffers, readable after writable, avail index
jumps, kicks before DRIVER_OK, zero-length and garbage chains) is mounted on a freshly
reset and negotiated device; the device must answer each malformed chain with length 0
(validation) or DEVICE_NEEDS_RESET (a broken ring), never let anything escape the
session, and serve a valid request afterwards. Cases are plain seeded ``random`` draws
(no test dependency); :class:`HostileCase` values can equally come from hypothesis.
:func:`write_case` lays a case out in any memory (a real device process's shared region
included).
"""

from __future__ import annotations

import io
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from hostops.shm import PageAllocator
from vdev.device import PENDING, RING_FEATURES, Device, Pending
from vdev.netbackend import NetBackend
from vdev.session import DeviceSession, Ring
from vdev.virtio import DriverQueue, F, FlatMemory, RingLayout, bit
from vdev.virtio.errors import UsageError
from vdev.virtio.net import NetHdr
from vdev.virtio.queue import Chain
from vdev.virtio.ring import DESC, USED_ELEM

__all__ = [
    "DeviceHarness",
    "Completion",
    "Request",
    "InvariantError",
    "StillPending",
    "HarnessClock",
    "DeviceFault",
    "RawResult",
    "HOSTILE_KINDS",
    "HostileCase",
    "HostileDriver",
    "HostileReport",
    "hostile_driver",
    "random_case",
    "write_case",
    "CASE_BLOCK_BYTES",
    "REFUSED_KINDS",
    "RING_KINDS",
    "RecordingBackend",
]

_ALIGN = 64
_U32 = 0xFFFF_FFFF
_COMPLETE_FAULTS = ("stale_complete", "complete_bad_length")
_U64 = (1 << 64) - 1
#: Most loop rounds one step runs (a device that always has work left is a bug).
MAX_ROUNDS = 10_000


class InvariantError(AssertionError):
    """A ring invariant was broken: the device (or the session) is at fault.

    ``rule`` names the invariant for tools that attribute failures (e.g.
    :mod:`vdev.conformance`): ``"used_len"`` (a used length beyond the chain's writable
    bytes, §2.7.8.2), ``"double_complete"`` (a head completed twice or never made
    available, §2.7.8), ``"used_idx"`` (used.idx moved by more than what is in flight),
    ``"ring_broken"`` (the session declared a ring broken), ``"reaped"`` (the session's
    count of pushed entries and the driver's disagree), ``"no_progress"`` (work left
    after :data:`MAX_ROUNDS` rounds)."""

    def __init__(self, message: str, rule: str = "") -> None:
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True)
class DeviceFault:
    """A device bug the harness saw at the device API, as it happened.

    ``kind``: ``"raised"`` (an exception escaped ``handle()``), ``"bad_length"``
    (``handle()`` returned something other than PENDING or an int in
    ``0..writable_len``), ``"complete_bad_length"`` / ``"stale_complete"``
    (``complete``/``complete_many`` refused: a length beyond the chain, or a chain that
    is not kept — completed twice or released by a reset). ``queue`` and ``detail``
    say where and what."""

    kind: str
    queue: int
    detail: str


@dataclass(frozen=True)
class RawResult:
    """What :meth:`DeviceHarness.publish_raw` observed: the used entries the device
    pushed (``(head, len)``, in used-ring order), the rings the session declared broken
    (``(queue, why)``: DEVICE_NEEDS_RESET), and the session's counters moved
    (``chains``: handed to the device, ``bad_chains``: refused by validation)."""

    used: list[tuple[int, int]]
    broken: list[tuple[int, str]]
    chains: int
    bad_chains: int


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
        #: Device bugs seen at the device API, in order (see :class:`DeviceFault`).
        self.device_faults: list[DeviceFault] = []
        self._watch_device_api(device)

    def _watch_device_api(self, device: Device) -> None:
        """Record :class:`DeviceFault` s by wrapping the device's ``handle``,
        ``complete`` and ``complete_many`` (instance attributes shadowing the methods;
        behaviour unchanged: results and exceptions pass through)."""
        faults = self.device_faults
        session = self.session
        orig_handle = device.handle
        orig_complete = device.complete
        orig_many = device.complete_many

        def handle(queue: int, chain: Chain) -> int | Pending:
            before = len(faults)
            try:
                n = orig_handle(queue, chain)
            except Exception as e:
                if not any(f.kind in _COMPLETE_FAULTS for f in faults[before:]):
                    faults.append(DeviceFault("raised", queue, f"{type(e).__name__}: {e}"))
                raise
            if n is not PENDING and (type(n) is not int or not 0 <= n <= chain.writable_len):
                faults.append(
                    DeviceFault(
                        "bad_length",
                        queue,
                        f"handle() returned {n!r} for {chain.writable_len} writable bytes",
                    )
                )
            return n

        def refused(queue: int, stale_before: int, e: UsageError) -> None:
            stale = session.counters["stale_completions"] != stale_before
            kind = "stale_complete" if stale else "complete_bad_length"
            faults.append(DeviceFault(kind, queue, str(e)))

        def complete(queue: int, chain: Chain, used_len: int) -> None:
            stale_before = session.counters["stale_completions"]
            try:
                orig_complete(queue, chain, used_len)
            except UsageError as e:
                refused(queue, stale_before, e)
                raise

        def complete_many(queue: int, completions: Sequence[tuple[Chain, int]]) -> None:
            stale_before = session.counters["stale_completions"]
            try:
                orig_many(queue, completions)
            except UsageError as e:
                refused(queue, stale_before, e)
                raise

        device.handle = handle  # type: ignore[method-assign]
        device.complete = complete  # type: ignore[method-assign]
        device.complete_many = complete_many  # type: ignore[method-assign]

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
        requests in flight are dropped (``released``) and the ring memory is zeroed, as
        a driver hands fresh rings to the re-negotiated device (a stale ``used.idx``
        would otherwise be reaped again); :meth:`negotiate` again."""
        self.session.reset()
        for q in self._queues:
            for req in q.inflight.values():
                req.released = True
                self._alloc.free(req.block)
            q.inflight.clear()
            q.dq = None
            q.last_used = 0
        self.zero_rings()
        self.broken.clear()
        self._resync()
        self.features = 0

    # ------------------------------------------------------------ raw access (hooks)
    def layout(self, queue: int) -> RingLayout:
        """Where ``queue``'s rings lie in :attr:`memory`."""
        return self._queue(queue).layout

    def zero_rings(self) -> None:
        """Zero every ring (descriptor table, avail and used rings)."""
        for q in self._queues:
            lay = q.layout
            view = self.memory.view(lay.desc, lay.end - lay.desc)
            view[:] = bytes(len(view))
            view.release()

    def alloc(self, nbytes: int) -> int:
        """Guest memory for hand-made buffers and tables (64-byte aligned): the
        address; :meth:`free` it. MemoryError when the harness memory is full."""
        block = self._alloc.alloc(max(1, nbytes))
        if block is None:
            raise MemoryError("harness memory full")
        return block

    def free(self, addr: int) -> None:
        """Give back what :meth:`alloc` returned."""
        self._alloc.free(addr)

    def write_descriptors(
        self, base: int, descs: Sequence[tuple[int, int, int, int]], first: int = 0
    ) -> None:
        """Write raw descriptors ``(addr, len, flags, next)`` (§2.7.5), nothing checked,
        into a table at guest address ``base`` (a ring's :meth:`layout` ``.desc``, or an
        indirect table), starting at entry ``first``."""
        view = self.memory.view(base + 16 * first, 16 * len(descs))
        for i, (addr, length, flags, nxt) in enumerate(descs):
            DESC.pack_into(view, 16 * i, addr & _U64, length & _U32, flags & 0xFFFF, nxt & 0xFFFF)
        view.release()

    def publish_raw(
        self,
        queue: int,
        heads: Sequence[int],
        *,
        avail_idx: int | None = None,
        kick: bool = True,
        rounds: int = 64,
    ) -> RawResult:
        """Put ``heads`` in ``queue``'s avail ring as they are (nothing checked), set
        ``avail.idx`` (default: advanced by ``len(heads)``; any u16 to test index
        jumps), kick, and run the session for at most ``rounds`` rounds and due timers
        (moving the clock). Returns what the device did. The harness's own driver does
        not know these chains: :meth:`reset` (then :meth:`negotiate`) before using
        :meth:`submit` again. Exceptions out of the session propagate."""
        lay = self._queue(queue).layout
        size = lay.size
        avail = self.memory.view(lay.avail, RingLayout.avail_bytes(size))
        used = self.memory.view(lay.used, RingLayout.used_bytes(size))
        try:
            idx = int.from_bytes(avail[2:4], "little")
            for k, head in enumerate(heads[:size]):  # bounded by the queue size
                pos = 4 + 2 * ((idx + k) % size)
                avail[pos : pos + 2] = (head & 0xFFFF).to_bytes(2, "little")
            new = (idx + len(heads)) & 0xFFFF if avail_idx is None else avail_idx & 0xFFFF
            used_before = int.from_bytes(used[2:4], "little")
            c = self.session.counters
            chains0, bad0 = c["chains"], c["bad_chains"]
            broken0 = len(self.broken)
            avail[2:4] = new.to_bytes(2, "little")
            if kick:
                self.session.kick(queue)
            self._run_raw(rounds)
            delta = (int.from_bytes(used[2:4], "little") - used_before) & 0xFFFF
            entries = [
                USED_ELEM.unpack_from(used, 4 + 8 * ((used_before + i) % size))
                for i in range(min(delta, size))  # bounded by the queue size
            ]
        finally:
            avail.release()
            used.release()
        self._resync()
        return RawResult(
            [(int(h), int(n)) for h, n in entries],
            self.broken[broken0:],
            c["chains"] - chains0,
            c["bad_chains"] - bad0,
        )

    def _run_raw(self, rounds: int) -> None:
        """Run the loop without reaping: rounds while work is pending, then due timers
        (the clock moved to each, bounded)."""
        s = self.session
        for _ in range(max(1, rounds)):
            s.run_once(timeout=0)
            if not s.has_pending:
                break
        for _ in range(rounds):
            live = [deadline for deadline, _, t, _ in s._timers if t.pending]
            if not live:
                break
            self.clock.now = max(self.clock.now, min(live))
            s.run_once(timeout=0)

    def _resync(self) -> None:
        """Take the session's count of pushed entries as reaped (after raw use or a
        reset, whose pushes the harness's driver never saw)."""
        c = self.session.counters
        self._reaped = c["chains"] + c["bad_chains"] - c["chains_kept"] + c["completions"]

    # ------------------------------------------------------------ requests
    def submit(
        self,
        queue: int,
        out: Sequence[bytes] = (),
        in_sizes: Sequence[int] = (),
        *,
        kick: bool = True,
    ) -> Request:
        """Make one chain available on ``queue``: a readable buffer per ``out`` item,
        then a writable buffer per ``in_sizes`` item; kick if the ring asks for it and
        run the device. Returns the :class:`Request` (``.completion`` once answered).
        ``kick=False`` publishes the chain and stops there -- no kick, the device does
        not run: a driver relying on the device to look (hybrid polling,
        :meth:`~vdev.Device.pull_available`)."""
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
        if q.dq.kick_prepare() and kick:
            self.kicks[queue] += 1
            self.session.kick(queue)
        if kick:
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
        """Close the session (kept chains released, ``device.close()``) and remove the
        wrappers around the device's methods."""
        try:
            self.session.close()
        finally:
            for name in ("handle", "complete", "complete_many"):
                self.device.__dict__.pop(name, None)

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
            raise InvariantError(
                f"the device still has work after {MAX_ROUNDS} rounds", "no_progress"
            )
        for index in range(len(self._queues)):
            self._reap(index)
        if self.broken:
            raise InvariantError(f"ring broken: {self.broken}", "ring_broken")
        c = s.counters
        pushed = c["chains"] + c["bad_chains"] - c["chains_kept"] + c["completions"]
        if pushed != self._reaped:
            raise InvariantError(
                f"the session pushed {pushed} used entries, the driver reaped {self._reaped}",
                "reaped",
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
                    "(completed twice or never made available, §2.7.8)",
                    "double_complete",
                )
            if length > req.writable_len:
                raise InvariantError(
                    f"queue {index}: head {head} used length {length} > its "
                    f"{req.writable_len} writable bytes (§2.7.8.2)",
                    "used_len",
                )
            seen.add(head)
        used.release()
        if delta > len(q.inflight):
            raise InvariantError(
                f"queue {index}: used.idx moved by {delta} with {len(q.inflight)} in flight",
                "used_idx",
            )
        got = dq.get_used()
        if dq.broken is not None:
            raise InvariantError(f"queue {index}: {dq.broken}", "used_idx")
        if len(got) != delta:
            raise InvariantError(
                f"queue {index}: reaped {len(got)} of {delta} used entries", "used_idx"
            )
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


# =========================================================================== hostile driver

#: Chain- and ring-level attacks :func:`hostile_driver` mounts (``HostileCase.kind``).
HOSTILE_KINDS: tuple[str, ...] = (
    "loop",  # next pointers form a cycle (§2.7.5.2: TTL = queue size)
    "next_out_of_range",  # next >= queue size (§2.7.5)
    "nested_indirect",  # an INDIRECT entry inside an indirect table (§2.7.5.3.1)
    "indirect_too_big",  # a table longer than the queue, up to giant (§2.7.5.3.1)
    "indirect_bad_length",  # table length 0 or not a multiple of 16 (§2.7.5.3.1)
    "indirect_with_next",  # INDIRECT and NEXT together (§2.7.5.3.1)
    "indirect_not_negotiated",  # INDIRECT without VIRTIO_F_INDIRECT_DESC
    "huge_length",  # a descriptor of 2..4 GiB
    "address_outside",  # a buffer beyond driver memory (§2.7.5)
    "address_wraps",  # addr + len past 2**64
    "readable_after_writable",  # §2.7.4.2
    "avail_idx_jump",  # avail.idx more than the queue size ahead (§2.7.6)
    "head_out_of_range",  # an avail entry naming no descriptor (§2.7.6)
    "kick_before_driver_ok",  # chains and a kick before negotiation (§3.1.1)
    "zero_length",  # a zero-length descriptor in an otherwise valid chain
    "garbage_payload",  # a valid chain full of random bytes
    "indirect_unaligned",  # a valid indirect table at an address not 16-aligned
)

#: Kinds whose chain must be refused by validation (completed with length 0) or the
#: ring declared broken; the device itself must never see them.
REFUSED_KINDS = frozenset(HOSTILE_KINDS[:11])
#: Kinds that break the ring: DEVICE_NEEDS_RESET, nothing handed to the device.
RING_KINDS = frozenset({"avail_idx_jump", "head_out_of_range"})
#: Most timer rounds spent settling a probe.
_SETTLE_ROUNDS = 64
_BLOCK = 8192  # per case: readable data, writable space, indirect tables
_W_OFF, _T_OFF = 2048, 4096
_NEXT_F, _WRITE_F, _INDIRECT_F = 1, 2, 4


@dataclass(frozen=True)
class HostileCase:
    """One attack: ``kind`` (one of :data:`HOSTILE_KINDS`) on ``queue``, shaped by the
    free parameters ``a`` and ``b`` (any ints: lengths, offsets, counts are derived from
    them) and ``payload`` (the bytes of the readable buffer, when the kind has one).
    Build them by hand, with :func:`random_case`, or with a hypothesis strategy."""

    kind: str
    queue: int = 0
    a: int = 0
    b: int = 0
    payload: bytes = b"\x00" * 16


def random_case(rng: random.Random, queues: Sequence[int], kinds: Sequence[str]) -> HostileCase:
    """A :class:`HostileCase` drawn from ``rng`` (plain seeded ``random``: no
    hypothesis needed)."""
    return HostileCase(
        rng.choice(list(kinds)),
        rng.choice(list(queues)),
        rng.getrandbits(32),
        rng.getrandbits(32),
        rng.randbytes(rng.randint(1, 64)),
    )


@dataclass
class HostileReport:
    """What :func:`hostile_driver` saw. ``cases[kind]``: cases run; ``outcomes[kind]``:
    outcome -> count, outcomes being ``refused`` (completed with length 0 by
    validation), ``needs_reset`` (the ring declared broken: DEVICE_NEEDS_RESET),
    ``answered`` (the device handled it and completed it), ``kept`` (the device still
    holds it: released by the reset that follows), ``ignored`` (nothing served: kick
    before DRIVER_OK) and ``raised`` (an exception escaped the session: a failure);
    ``handler_errors[kind]``: exceptions out of ``handle()`` or bad lengths it returned
    (device bugs the session contained); ``failures``: one line per broken
    expectation."""

    device: str
    seed: int
    cases: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)
    handler_errors: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Cases run."""
        return sum(self.cases.values())

    @property
    def ok(self) -> bool:
        """No expectation was broken."""
        return not self.failures

    def assert_ok(self) -> None:
        """One AssertionError listing the first failures (and the seed to replay)."""
        if self.failures:
            head = "\n  ".join(self.failures[:10])
            raise AssertionError(
                f"{self.device} under the hostile driver (seed {self.seed}): "
                f"{len(self.failures)} failure(s):\n  {head}"
            )


class HostileDriver:
    """Aim :class:`HostileCase` s at a device in-process, through a
    :class:`DeviceHarness` (see :func:`hostile_driver`); :meth:`run` one case at a
    time (for hypothesis), :attr:`report` accumulates."""

    def __init__(
        self,
        device: Device,
        *,
        seed: int = 0,
        queue_size: int | None = None,
        probe: Callable[[int], tuple[Sequence[bytes], Sequence[int]]] | None = None,
        handler_errors_fail: bool = False,
    ) -> None:
        size = queue_size if queue_size is not None else min(device.max_queue_size, 64)
        self.harness = h = DeviceHarness(device, queue_size=size, memory_size=1 << 20)
        self.size = size
        #: The longest chain the device accepts (its maximum queue size, §2.7.5.3.1).
        self.chain_cap = max(size, device.max_queue_size)
        self.probe = probe or (lambda q: ([bytes(16)], [64]))
        self.handler_errors_fail = handler_errors_fail
        self.report = HostileReport(type(device).__name__, seed)
        self._block = h.alloc(_BLOCK)
        self._end = h.memory.base + h.memory.size

    def close(self) -> None:
        """Close the harness (and the device)."""
        self.harness.close()

    def __enter__(self) -> HostileDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ one case
    def run(self, case: HostileCase) -> str:
        """Mount ``case``, check the device's answer, reset, check a valid request
        still works. Returns the outcome (also counted in :attr:`report`)."""
        if case.kind not in HOSTILE_KINDS:
            raise ValueError(f"unknown hostile case kind {case.kind!r}")
        h, rep = self.harness, self.report
        nq = h.device.num_queues
        q = case.queue % nq
        rep.cases[case.kind] = rep.cases.get(case.kind, 0) + 1
        faults0 = len(h.device_faults)
        where = f"{case.kind} (queue {q}, a={case.a}, b={case.b})"
        try:
            outcome = self._mount(case, q, where)
        except Exception as e:  # escaped the session: the device (or session) died
            outcome = "raised"
            rep.failures.append(f"{where}: {type(e).__name__} escaped the session: {e}")
        bugs = [f for f in h.device_faults[faults0:] if f.kind in ("raised", "bad_length")]
        if bugs:
            rep.handler_errors[case.kind] = rep.handler_errors.get(case.kind, 0) + len(bugs)
            if self.handler_errors_fail:
                rep.failures.append(f"{where}: device bug: {bugs[0].detail[:120]}")
        by_kind = rep.outcomes.setdefault(case.kind, {})
        by_kind[outcome] = by_kind.get(outcome, 0) + 1
        self._probe(q, where)
        return outcome

    def _mount(self, case: HostileCase, q: int, where: str) -> str:
        h, rep, kind = self.harness, self.report, case.kind
        h.reset()
        if kind == "kick_before_driver_ok":
            self._valid_chain(q, case)
            res = h.publish_raw(q, [0])
            if res.chains or res.bad_chains or res.used:
                rep.failures.append(f"{where}: served before DRIVER_OK: {res}")
                return "answered"
            return "ignored"
        offered = h.offered
        if kind == "indirect_not_negotiated":
            offered &= ~bit(F.INDIRECT_DESC)
        h.negotiate(offered)
        heads, advance = self._build(case, q)
        res = h.publish_raw(q, heads, avail_idx=advance)  # the ring was reset: idx 0
        if res.broken:
            if res.chains and kind in RING_KINDS:
                rep.failures.append(f"{where}: the device was handed a chain of a bad ring")
            return "needs_reset"
        if kind in RING_KINDS:
            rep.failures.append(f"{where}: the ring was not declared broken: {res}")
            return "answered" if res.used else "kept"
        if kind in REFUSED_KINDS:
            if res.chains or not res.bad_chains:
                rep.failures.append(f"{where}: malformed chain not refused: {res}")
                return "answered" if res.used else "kept"
            if res.used != [(heads[0], 0)]:
                rep.failures.append(f"{where}: refused chain completed as {res.used}")
            return "refused"
        if res.bad_chains:
            return "refused"
        return "answered" if res.used else "kept"

    def _probe(self, q: int, where: str) -> None:
        h, rep = self.harness, self.report
        try:
            h.reset()
            h.negotiate()
            out, ins = self.probe(q)
            if len(out) + len(ins) > self.size:
                out, ins = [], [sum(len(b) for b in out) + sum(ins)]
            req = h.submit(q, out, ins)
            for _ in range(_SETTLE_ROUNDS):
                if req.done or not h.fire_timers():
                    break
            if req.released:
                rep.failures.append(f"after {where}: a valid request was dropped")
        except Exception as e:
            rep.failures.append(
                f"after {where}: a valid request failed: {type(e).__name__}: {e}"[:300]
            )

    # ------------------------------------------------------------------ building
    def _valid_chain(self, q: int, case: HostileCase) -> None:
        self._build(HostileCase("garbage_payload", q, case.a, case.b, case.payload), q)

    def _write_bytes(self, addr: int, data: bytes) -> None:
        view = self.harness.memory.view(addr, len(data))
        view[:] = data
        view.release()

    def _build(self, case: HostileCase, q: int) -> tuple[list[int], int | None]:
        h = self.harness
        return write_case(
            case,
            ring_size=self.size,
            desc_table=h.layout(q).desc,
            block=self._block,
            memory_end=self._end,
            write_descs=h.write_descriptors,
            write_bytes=self._write_bytes,
            chain_cap=self.chain_cap,
        )


#: Bytes of guest memory :func:`write_case` uses from ``block`` on.
CASE_BLOCK_BYTES = _BLOCK


def write_case(
    case: HostileCase,
    *,
    ring_size: int,
    desc_table: int,
    block: int,
    memory_end: int,
    write_descs: Callable[[int, Sequence[tuple[int, int, int, int]]], None],
    write_bytes: Callable[[int, bytes], None],
    chain_cap: int | None = None,
) -> tuple[list[int], int | None]:
    """Lay out ``case``'s descriptors (and indirect tables, payload) for a ring of
    ``ring_size`` whose descriptor table is at guest address ``desc_table``, using the
    :data:`CASE_BLOCK_BYTES` of guest memory at ``block``; ``memory_end`` is the first
    address past driver memory. ``write_descs(table_addr, descs)`` and
    ``write_bytes(addr, data)`` do the writing (into a harness, or into the shared
    memory of a real device process). Returns the heads to make available and how far
    to move ``avail.idx`` (None: by the number of heads; more than the queue size for
    ``avail_idx_jump``). Chains start at descriptor 0. ``kick_before_driver_ok`` lays
    out a valid chain (the caller kicks before negotiating). ``chain_cap`` is the
    longest chain the device accepts (its maximum queue size, default ``ring_size``):
    ``indirect_too_big`` goes past it."""
    n, b, kind = ring_size, block, case.kind
    a, bb = case.a & 0xFFFF_FFFF, case.b & 0xFFFF_FFFF
    table = b + _T_OFF
    w = b + _W_OFF
    payload = case.payload[:_W_OFF] or b"\x00"
    ring: list[tuple[int, int, int, int]]
    if kind in ("garbage_payload", "avail_idx_jump", "head_out_of_range", "kick_before_driver_ok"):
        write_bytes(b, payload)
        wlen = 1 + bb % 1024
        if n >= 2:
            ring = [(b, len(payload), _NEXT_F, 1), (w, wlen, _WRITE_F, 0)]
        else:
            ring = [(w, wlen, _WRITE_F, 0)]
        write_descs(desc_table, ring)
        if kind == "avail_idx_jump":
            return [0], n + 1 + a % (0xFFFF - n)
        if kind == "head_out_of_range":
            return [n + a % (0x10000 - n)], None
        return [0], None
    if kind == "loop":
        k = 1 + a % n
        ring = [(b + 64 * (i % 16), 16, _NEXT_F, (i + 1) % k) for i in range(k)]
    elif kind == "next_out_of_range":
        k = 1 + a % n
        ring = [(b + 64 * (i % 16), 16, _NEXT_F, i + 1) for i in range(k)]
        ring[-1] = (b, 16, _NEXT_F, n + bb % (0x10000 - n))
    elif kind == "nested_indirect":
        entries = 2 + a % 4
        tab = [(b, 16, _NEXT_F, i + 1) for i in range(entries)]
        tab[-1] = (table + 512, 32, _INDIRECT_F, 0)
        if bb % 2:  # the nested entry first instead
            tab = [(table + 512, 32, _INDIRECT_F | _NEXT_F, 1), *tab[1:]]
        write_descs(table, tab)
        ring = [(table, 16 * len(tab), _INDIRECT_F, 0)]
    elif kind == "indirect_too_big":
        entries = max(n, chain_cap or n) + 1 + (a % 4096 if bb % 2 else a % 0x0FFF_FFFF)
        ring = [(table, 16 * entries, _INDIRECT_F, 0)]
    elif kind == "indirect_bad_length":
        length = 0 if a % 4 == 0 else 16 * (1 + a % n) + 1 + bb % 15
        ring = [(table, length, _INDIRECT_F, 0)]
    elif kind == "indirect_with_next":
        write_descs(table, [(b, 16, 0, 0)])
        ring = [(table, 16, _INDIRECT_F | _NEXT_F, 1 % n), (w, 16, _WRITE_F, 0)]
    elif kind == "indirect_not_negotiated":
        write_descs(table, [(b, 16, _NEXT_F, 1), (w, 64, _WRITE_F, 0)])
        ring = [(table, 32, _INDIRECT_F, 0)]
    elif kind == "huge_length":
        ring = [(b, 0x8000_0000 + a % 0x8000_0000, _WRITE_F if bb % 2 else 0, 0)]
    elif kind == "address_outside":
        ring = [(memory_end + a * 4096, 1 + bb % 4096, _WRITE_F if a % 2 else 0, 0)]
    elif kind == "address_wraps":
        ring = [((1 << 64) - 1 - a % 4096, 16 + bb % 4096, _WRITE_F if bb % 2 else 0, 0)]
    elif kind == "readable_after_writable":
        k = 2 + a % max(1, n - 1)
        if k > n:
            ring = [(w, 16, _WRITE_F | _NEXT_F, 0)]  # n == 1: loops, refused too
        else:
            ring = [(w + 16 * i, 16, _WRITE_F | _NEXT_F, i + 1) for i in range(k)]
            ring[-1] = (b, 16, 0, 0)  # readable after the writable ones
    elif kind == "zero_length":
        write_bytes(b, payload)
        shapes = [
            [(b, len(payload), _NEXT_F, 1), (w, 0, _WRITE_F, 0)],
            [(b, 0, _NEXT_F, 1), (w, 1 + bb % 512, _WRITE_F, 0)],
            [(b, len(payload), _NEXT_F, 1), (w, 0, _WRITE_F | _NEXT_F, 2), (w, 64, 2, 0)],
            [(w, 0, _WRITE_F, 0)],
        ]
        ring = shapes[a % len(shapes)]
        if len(ring) > n:
            ring = shapes[-1]
    elif kind == "indirect_unaligned":
        write_bytes(b, payload)
        off = 8 if a % 2 else 4
        tab = [(b, len(payload), _NEXT_F, 1), (w, 1 + bb % 1024, _WRITE_F, 0)]
        write_descs(table + off, tab)
        ring = [(table + off, 32, _INDIRECT_F, 0)]
    else:
        raise ValueError(f"unknown hostile case kind {kind!r}")
    write_descs(desc_table, ring[:n])
    return [0], None


def hostile_driver(
    device_or_factory: Device | Callable[[], Device],
    *,
    seed: int = 0,
    cases: int = 200,
    kinds: Sequence[str] | None = None,
    queues: Sequence[int] | None = None,
    queue_size: int | None = None,
    probe: Callable[[int], tuple[Sequence[bytes], Sequence[int]]] | None = None,
    handler_errors_fail: bool = False,
) -> HostileReport:
    """Aim ``cases`` malformed chains (seeded by ``seed``: the same seed, the same
    cases) at a device in-process and return a :class:`HostileReport`.

    Every case is mounted on a freshly reset and negotiated device (queue size
    ``queue_size``, default the device's maximum up to 64): the chains of
    :data:`HOSTILE_KINDS` are written straight into the ring (the real
    :class:`~vdev.virtio.queue.DriverQueue` refuses to build them) and kicked; then the
    driver checks that nothing escaped the session, that malformed chains were
    completed with length 0 (or the ring declared broken: DEVICE_NEEDS_RESET) without
    ever reaching ``handle()``, that a broken ring handed the device nothing, that
    nothing was served before DRIVER_OK; and after a reset, that a valid request (the
    ``probe`` shape, default 16 readable and 64 writable bytes) is still served.
    Kinds are taken in turn (every kind runs when ``cases >= len(kinds)``), the queue
    and parameters are drawn. Exceptions out of ``handle()`` are contained by the
    session and counted in ``handler_errors``; with ``handler_errors_fail`` they are
    failures too. The device is closed at the end.
    """
    device = device_or_factory if isinstance(device_or_factory, Device) else device_or_factory()
    rng = random.Random(seed)
    chosen = list(kinds) if kinds is not None else list(HOSTILE_KINDS)
    unknown = [k for k in chosen if k not in HOSTILE_KINDS]
    if unknown or not chosen:
        device.close()
        raise ValueError(f"unknown hostile case kinds {unknown} (see HOSTILE_KINDS)")
    qs = list(queues) if queues is not None else list(range(device.num_queues))
    with HostileDriver(
        device,
        seed=seed,
        queue_size=queue_size,
        probe=probe,
        handler_errors_fail=handler_errors_fail,
    ) as driver:
        for i in range(max(0, cases)):
            case = random_case(rng, qs, [chosen[i % len(chosen)]])
            driver.run(case)
        return driver.report


class RecordingBackend(NetBackend):
    """A virtio-net backend for tests: it records every frame the device sends
    (:attr:`sent`, header and bytes; :attr:`frames`, the bytes alone), answers
    ``send`` with :attr:`accept`, takes the ``offloads`` it is given, and plays frames
    to the device as if they came from outside (:meth:`play`)::

        wire = RecordingBackend()
        with DeviceHarness(NetDevice(wire, mac=MAC)) as h:
            ...                                 # transmit on queue 1
            assert wire.frames == [frame]
    """

    name = "recording"

    def __init__(self, offloads: frozenset[str] = frozenset(), accept: bool = True) -> None:
        super().__init__()
        self._offloads = offloads
        #: What :meth:`send` returns (False: the backend "drops" every frame).
        self.accept = accept
        #: Every frame the device sent: ``(header, frame bytes)``, oldest first.
        self.sent: list[tuple[NetHdr, bytes]] = []
        #: True once the device closed the backend.
        self.closed = False

    @property
    def frames(self) -> list[bytes]:
        """The frames sent, without their headers."""
        return [f for _, f in self.sent]

    def offloads(self) -> frozenset[str]:
        """The offloads given to the constructor."""
        return self._offloads

    def send(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """Record the frame; return :attr:`accept`."""
        self.sent.append((hdr, bytes(frame)))
        return self.accept

    def play(self, frame: bytes, hdr: NetHdr | None = None) -> bool:
        """Deliver ``frame`` to the device (``NetDevice.receive``); its answer."""
        assert self.sink is not None, "the backend is not attached to a device"
        return self.sink.receive(hdr if hdr is not None else NetHdr(), frame)

    def close(self) -> None:
        """Remember that the device closed it."""
        self.closed = True
