"""One device session for every transport: a device's rings, its pending work, the
chains it keeps, its event sources and timers, its counters and its log.

Theory of operation
-------------------
A device process serves one :class:`~vdev.device.Device` over one transport: the ZeroMQ
runtime (:mod:`vdev.runtime`, our kernel) or the vhost-user back-end
(:mod:`vdev.vhost_user`, QEMU). Everything that does not depend on how the driver talks
is here, once, in :class:`DeviceSession`; a transport keeps only what is its own
(parsing control messages and replying, doorbells or eventfds, mapping memory) and
tells the session what happened through a handful of calls:

=============================  ============================================================
the transport calls            when
=============================  ============================================================
``check_num(ring, num, what)`` SET_VRING_NUM (a power of two up to the device's maximum)
``start_ring(ring, ...)``      a ring may run: builds its :class:`DeviceQueue` (EVENT_IDX /
                               INDIRECT_DESC as negotiated, ``last_avail`` = the base)
``kick(index)``                the driver kicked a ring (marks it pending when it runs)
``stop_ring(ring)``            the ring stops (GET_VRING_BASE, disabled, new memory):
                               releases the chains the device keeps, keeps the position
``reset()``                    device reset / disconnect: every ring cleared, then
                               ``device.reset()``
``add_source(obj, cb)``        the transport's own pollables (control socket, doorbells)
``run()`` / ``stop()``         the one loop of the process
=============================  ============================================================

and the session calls the transport back (:class:`SessionTransport`): ``interrupt(ring)``
(ring's call doorbell / eventfd), ``ring_broken(ring, why)`` (DEVICE_NEEDS_RESET / the
error eventfd) and ``config_interrupt()``. Everything the data path does goes through
this one object, so a tracer or a fault injector hooks in at one place.

The loop (single-threaded; the only thread that touches the device)::

    while not stopping:
        ready = poller.poll(0 if pending or unarmed else min(idle_timeout, next timer))
        for each ready source: its callback      (transport's, or the device's watch)
        fire the timers that are due              (heap; at most those due now)
        serve the pending rings                   (at most ``budget`` chains each)
        flush the interrupts owed by completions made outside a drain
        nothing pending: poll the unarmed rings   (hybrid polling, below), then arm them

Serving a ring is the disable–drain–re-enable–recheck loop of
:mod:`vdev.virtio.queue`, hand-inlined on purpose (it is the hot path: ``vlab bench
blk`` measures it):

=========================  ==================================================================
event                      what happens
=========================  ==================================================================
valid chain                ``n = device.handle(q, chain)``; ``push(head, n)``; count ``chains``
handle returns PENDING     the chain is *kept* (per ring, by identity); nothing is pushed;
                           count ``chains_kept``
``ChainError``             ``push(head, 0)``; count ``bad_chains``; log; go on
``device.handle`` raises   a device bug: log it; ``push(head, 0)``; count ``handler_errors``
or returns a bad length
``RingError``              the ring is marked broken, no longer served; the transport tells
                           the driver
=========================  ==================================================================

During a drain ``should_interrupt()`` (EVENT_IDX aware) is asked after every
:data:`INTERRUPT_EVERY` chains and at the end of each round.

Kept chains. ``device.complete(q, chain, n)`` pushes the used entry of a kept chain and
releases its views; ``device.complete_many(q, [(chain, n), ...])`` pushes several
and publishes ``used.idx`` once, after the last (a multi-buffer frame appears whole).
Inside the drain of ``q`` the drain's interrupt logic covers it;
anywhere else (a watch callback, a timer, the drain of another ring, a control message)
the ring is marked *owed* and ``should_interrupt()`` is asked once per owed ring right
after that callback (or drain) returns — a callback that completes 30 chains costs at
most one interrupt. A chain kept when its ring stops is *released*
(:meth:`~vdev.virtio.queue.Chain.release`: its views are dropped so the memory can be
unmapped), never pushed; ``device.released(q)`` is told, and a later ``complete`` of it
raises :class:`~vdev.virtio.errors.UsageError` (``stale_completions``). A correct driver
cannot have more than a queue size of chains in flight; one more to keep means a head
was made available again while kept, and the ring is broken (``AVAIL_IDX_JUMP``), so
the kept set is bounded whatever the driver does.

Event sources and timers. ``device.watch(source, cb)`` registers ``source`` (an fd, an
object with ``fileno()``, or a hostops pollable; plain fds are wrapped in
:class:`hostops.poll.FdSource`) with the loop's poller; watches outlive resets.
``device.call_later(delay, cb)`` pushes a :class:`~vdev.device.TimerHandle` on a heap
ordered by deadline (cancelled timers are dropped lazily, and the heap is rebuilt when
they outnumber the live ones). Exceptions escaping device callbacks are device bugs:
logged (rate limited), counted as ``handler_errors``, and the loop goes on.

Hybrid polling (:mod:`vdev.virtio.poll`; ``poll_us``, ``python -m vdev KIND --poll-us``;
0 turns it off). A drain that finds its ring empty normally ends by re-enabling
notifications and re-checking; with polling on and the window open it ends with
notifications still off and the ring *unarmed*. At the end of the round (no ring
pending) :meth:`DeviceSession._busy_poll` watches the unarmed rings' avail index for the
window: a chain that shows up marks its ring pending (the next round drains it, the
sources looked at without sleeping in between); when the window ends empty every
unarmed ring is armed and re-checked before the loop may sleep. The first kick after
that, or an idle wake-up, teaches the window (``PollWindow.slept``); a poll that had to
wait for the CPU ends at once and halves it (``PollWindow.contended``: another process
needs the core). The counters ``poll_hits``, ``poll_misses``, ``poll_us``,
``poll_grown``, ``poll_shrunk``, ``poll_contended`` and the gauge ``poll_window_us``
join :meth:`DeviceSession.metrics`.

Counters (:attr:`DeviceSession.counters`, shared with the transport, plain ints):
:data:`SESSION_COUNTERS` plus the transport's own; per ring (:meth:`ring_metrics`): the
:class:`~vdev.virtio.queue.DeviceQueueStats` (cumulative over restarts),
``kicks_received``, ``ring_errors``, ``handler_errors``, ``chains_released``, ``kept``
(a gauge) and ``rule:<RULE>`` per spec rule the driver broke.

Hosted sessions. A process may serve several devices from one thread (the switch's
ring ports, :mod:`vdev.switch`): each session then *joins* a host loop
(:class:`LoopHost`, ``open(host)``) instead of running its own. Its sources are the
host's watches (dispatched exactly as :meth:`DeviceSession.run_once` does), the host's
waker is its waker, and every round the host asks :meth:`DeviceSession.round_timeout`
before it sleeps and calls :meth:`DeviceSession.after_round` (timers, pending rings,
owed interrupts) after its callbacks. A hosted session does not busy-poll: a window
spent on one device's rings would stall every other.

The log is one line per event on the transport's log file, at most
:data:`MAX_LOG_PER_KIND` lines of each kind, so a hostile driver cannot fill the disk.

Tracing. With :attr:`DeviceSession.tracer` set (a :class:`~vdev.virtio.trace.Tracer`,
from ``VLAB_TRACE``), a round serves each ring with :meth:`DeviceSession._drain_traced`,
a copy of the drain that records ``pop`` (seq, head, every descriptor), ``bad_chain``,
``push`` (seq, head, length) and ``irq`` (sent or suppressed, with the used_event /
NO_INTERRUPT that decided it); the choice costs one test per round, so an untraced
device pays nothing per chain. ``complete``/``complete_many`` record the ``push`` of
kept chains; ``kick_recv`` records each kick. A chain's ``seq`` is its avail-ring
position, ``last_avail`` extended past 16 bits by the ring's own wrap counter
(:class:`~vdev.virtio.trace.SeqCounter`), the same number the driver gave it. The
session calls :attr:`DeviceSession.trace_flush` whenever the loop is about to sleep.

Fault injection. With :attr:`DeviceSession.injector` set (:meth:`attach_injector`, a
:class:`~vdev.injector.FaultInjector` running a fault plan, ``docs/faults.md``) the
rings are served by the same instrumented drain (tracer or not), which fires
``ring.pop`` / ``device.request`` after each pop and ``ring.push`` before each used
entry (kept chains completed later included), :meth:`kick` fires ``notify.kick`` and
each interrupt decision that would notify fires ``notify.interrupt``; the transports
fire ``control.<MESSAGE>``. :meth:`fire_faults` carries out the lifecycle actions
(:meth:`crash`, :meth:`hang`, :meth:`needs_reset`, the FEATURES_OK refusal the
transport takes with :meth:`take_features_refusal`); :meth:`_push_faulty` writes the
malicious used entries; the injector's counters join :meth:`metrics`. Without an
injector and a tracer none of this costs anything: the bare :meth:`_drain` serves.
"""

from __future__ import annotations

import heapq
import itertools
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import IO, Any, NoReturn, Protocol, cast

from hostops.clock import monotonic
from hostops.poll import FdSource, Pollable, Poller, Waker
from hostops.process import ParentWatch
from hostops.signals import kill_self
from hostops.sync import relax
from hostops.trace import DEVICE_ENV, KERNEL_ENV, TraceSink, clock_ns, sink_from_env
from vdev.device import PENDING, Device, TimerHandle, _source_key
from vdev.injector import LIFECYCLE_ACTIONS, FaultInjector
from vdev.virtio.constants import VRING_DESC_F_NEXT, F, bit
from vdev.virtio.control import ErrorCode
from vdev.virtio.errors import (
    AddressError,
    ChainError,
    ProtocolError,
    RingError,
    Rule,
    UsageError,
)
from vdev.virtio.faults import Fired
from vdev.virtio.memory import GuestMemory
from vdev.virtio.poll import CONTENDED_US, PollWindow
from vdev.virtio.queue import Chain, DeviceQueue, DeviceQueueStats
from vdev.virtio.ring import DESC, USED_ELEM, RingLayout
from vdev.virtio.trace import SeqCounter, Tracer

__all__ = [
    "DeviceSession",
    "LoopHost",
    "Ring",
    "SessionTransport",
    "SESSION_COUNTERS",
    "INTERRUPT_EVERY",
    "MAX_LOG_PER_KIND",
]

#: During a drain, the interrupt decision is also taken after every this many chains.
INTERRUPT_EVERY = 8

#: Log lines of one kind before that kind is muted.
MAX_LOG_PER_KIND = 100

#: The session's counters (device level), in :attr:`DeviceSession.counters`.
SESSION_COUNTERS = (
    "kicks_received",  # kicks received (for any ring number)
    "chains",  # valid chains handed to the device
    "bad_chains",  # chains rejected by validation, completed with length 0
    "handler_errors",  # exceptions escaping the device (handle, callbacks, timers, hooks)
    "interrupts",  # used-buffer notifications sent for a ring
    "ring_errors",  # rings found broken
    "resets",  # device resets (device.reset() called)
    "chains_kept",  # handle() returned PENDING
    "completions",  # device.complete() accepted
    "stale_completions",  # device.complete() of a chain that is not kept
    "chains_released",  # kept chains dropped because their ring stopped
    "timers_fired",  # device timers that ran
)

_QUEUE_STAT_FIELDS = tuple(f.name for f in fields(DeviceQueueStats) if f.name != "rule_violations")


def _no_emit(*args: Any, **kwargs: Any) -> None:
    """The instrumented drain's ``emit`` when only a fault plan (no tracer) runs."""


def _push_batch(dq: DeviceQueue, entries: Sequence[tuple[int, int]]) -> None:
    """Write the used elements of ``entries`` (head, written) into ``dq``'s used ring,
    then ``used.idx`` once (§2.7.8: the element before the index; here all of them
    before the one index store, so the driver cannot see part of the batch).

    ``len(entries)`` must not exceed the queue size (the chains are kept ones, at most
    a queue size of them). Uses only ``dq``'s public state: its memory, layout and
    ``used_idx``; the index moves in one 16-bit store (native little-endian u16, as
    :class:`~vdev.virtio.queue.DeviceQueue` does)."""
    size = dq.size
    if len(entries) > size:
        raise UsageError(f"{len(entries)} completions at once on a queue of {size}")
    used = dq.memory.view(dq.layout.used, RingLayout.used_bytes(size))
    try:
        idx = dq.used_idx
        for head, written in entries:
            USED_ELEM.pack_into(used, 4 + 8 * (idx % size), head, written)
            idx = (idx + 1) & 0xFFFF
        dq.memory.barrier()  # the elements are stored before the index that shows them
        words = used.cast("H")
        try:
            words[1] = idx
        finally:
            words.release()
        dq.used_idx = idx
    finally:
        used.release()


class LoopHost(Protocol):
    """A loop that hosts sessions (:meth:`DeviceSession.open` with ``host``):
    :class:`vdev.switch.EventLoop` is one."""

    @property
    def waker(self) -> Waker:
        """The loop's self-pipe (:meth:`DeviceSession.stop` wakes it)."""
        ...

    def watch(self, source: Any, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``source`` is ready (replaces an earlier one)."""
        ...

    def unwatch(self, source: Any) -> None:
        """Stop watching ``source``."""
        ...

    def host(self, session: DeviceSession) -> None:
        """Ask ``session.round_timeout()`` before and call ``session.after_round()``
        after every round."""
        ...

    def unhost(self, session: DeviceSession) -> None:
        """Forget ``session``."""
        ...


class SessionTransport(Protocol):
    """What the session asks of the transport that drives it."""

    def interrupt(self, ring: Ring) -> None:
        """Send ``ring``'s used-buffer notification (its call doorbell / eventfd)."""
        ...

    def ring_broken(self, ring: Ring, why: str) -> None:
        """``ring`` cannot be trusted and is no longer served: tell the driver."""
        ...

    def config_interrupt(self) -> None:
        """Send a configuration-change notification (or say why it cannot)."""
        ...


@dataclass(slots=True, eq=False)
class Ring:
    """One virtqueue as the session sees it, whatever the transport.

    ``num``, ``base`` and ``enabled`` are what the driver set; ``dq`` exists only while
    the ring may be served (the transport starts it with :meth:`DeviceSession.start_ring`);
    ``kept`` holds the chains the device keeps, by identity. Counters survive restarts
    and resets.
    """

    index: int
    num: int = 0  # SET_VRING_NUM (0: not set)
    base: int = 0  # next avail index to process when (re)started
    enabled: bool = False
    dq: DeviceQueue | None = None
    broken: bool = False  # found broken: not served until stopped
    kept: dict[Chain, None] = field(default_factory=dict)
    kicks: int = 0
    ring_errors: int = 0
    handler_errors: int = 0
    chains_released: int = 0
    retired: dict[str, int] = field(default_factory=dict)  # stats of dropped DeviceQueues
    tseq: SeqCounter = field(default_factory=SeqCounter)  # traced: avail position, extended
    tsig: int = 0  # traced: used.idx at the last interrupt decision
    tkept: dict[Chain, int] = field(default_factory=dict)  # traced: seq of each kept chain
    # fault injection (only with an injector): ring faults fired at pop for kept chains,
    # heads withheld forever, entries held back by out_of_order ([countdown, entries,
    # jump]), and whether EVENT_IDX is ignored (until the ring stops)
    kfaults: dict[Chain, list[Fired]] = field(default_factory=dict)
    withheld: set[int] = field(default_factory=set)
    held: list[list[Any]] = field(default_factory=list)
    ignore_event_idx: bool = False

    @property
    def running(self) -> bool:
        """Has a DeviceQueue and is not broken: kicks make it pending."""
        return self.dq is not None and not self.broken


class DeviceSession:
    """The rings, pending work, kept chains, event sources, timers, counters and log of
    ``device``, driven by ``transport`` (see the module docstring).

    ``budget`` bounds the chains served per ring per round; ``counters`` names the
    transport's own counters (all start at 0); ``log_prefix`` starts every log line,
    written to ``log_file`` (default stderr); ``clock`` is the monotonic clock of the
    timers. The session attaches itself to the device (``device._session``).
    """

    #: Seconds the poller sleeps at most when idle (stop(), sources and timers wake it
    #: earlier; this only bounds how long a missed wake-up could last).
    idle_timeout = 1.0

    def __init__(
        self,
        device: Device,
        transport: SessionTransport,
        *,
        budget: int = 64,
        counters: Sequence[str] = (),
        log_prefix: str = "",
        log_file: IO[str] | None = None,
        clock: Callable[[], float] = monotonic,
        poll_us: float = 0,
        poll_fixed: bool = False,
    ) -> None:
        if device.num_queues < 1:
            raise UsageError(f"{device!r} has no queues")
        self.device = device
        self.transport = transport
        self.budget = max(1, budget)
        self.counters: dict[str, int] = dict.fromkeys((*SESSION_COUNTERS, *counters), 0)
        self.rings = [Ring(i) for i in range(device.num_queues)]
        self.log_prefix = log_prefix
        self._log_file: IO[str] = log_file if log_file is not None else sys.stderr
        self._log_counts: dict[str, int] = {}
        self._clock = clock
        self._notify = transport.interrupt
        self._pending: dict[int, None] = {}  # ring indices with work, in kick order
        self._owed: dict[Ring, None] = {}  # rings completed outside their own drain
        self._draining: Ring | None = None
        # id(pollable) -> (pollable, callback, is the device's)
        self._sources: dict[int, tuple[Pollable, Callable[[], None], bool]] = {}
        self._watches: dict[tuple[str, int], tuple[Any, Pollable]] = {}  # device watches
        self._timers: list[tuple[float, int, TimerHandle, bool]] = []
        self._timer_seq = itertools.count()
        self._cancelled = 0  # cancelled timers still in the heap
        self._poller: Poller | None = None
        self.waker: Waker | None = None
        self._host: LoopHost | None = None  # hosted: the loop this session joined
        self._on_error: Callable[[Exception], None] | None = None
        self.stopping = False
        self._closed = False
        #: The tracer (None: not traced; set before the rings start).
        self.tracer: Tracer | None = None
        #: Called when the loop is about to sleep (flushes the trace sink).
        self.trace_flush: Callable[[], None] | None = None
        #: The fault plan's run in this process (None: no faults; see
        #: :meth:`attach_injector`).
        self.injector: FaultInjector | None = None
        #: In-process harnesses only: called (and must raise) instead of SIGKILL when a
        #: ``crash`` fault fires.
        self.on_crash: Callable[[str], NoReturn] | None = None
        self._refuse_features_ok = False  # a refuse_features_ok fault awaits FEATURES_OK
        self._lifelines: dict[int, tuple[Pollable, Callable[[], None]]] = {}
        #: Hybrid polling (:mod:`vdev.virtio.poll`): the adaptive window after a drain
        #: (``poll_us`` its bound; 0: off, every drain arms at once; ``poll_fixed``:
        #: always the bound).
        self.poll = PollWindow(poll_us, adaptive=not poll_fixed)
        self._polling = self.poll.enabled
        # rings drained with notifications left off, to be polled then armed
        self._unarmed: dict[int, tuple[Ring, DeviceQueue]] = {}
        self._armed_at = 0.0  # when the loop last armed its rings (0: not measuring)
        device._attach(self)

    # ================================================================== tracing
    def trace_from_env(self, argv: Sequence[str] = ()) -> TraceSink | None:
        """Trace this device if ``VLAB_TRACE`` names a file: set :attr:`tracer` (named
        by ``VLAB_TRACE_DEVICE``, else the device's name; the kernel's pid from
        ``VLAB_TRACE_KERNEL``) and :attr:`trace_flush`, and record the process start
        (``argv``). Returns the sink, or None. A file that cannot be opened is logged
        and the device runs untraced."""
        try:
            sink = sink_from_env()
        except OSError as e:
            self.log(f"trace file: {e}: running untraced")
            return None
        if sink is None:
            return None
        kpid_text = os.environ.get(KERNEL_ENV, "")
        self.tracer = Tracer(
            sink.write,
            clock_ns,
            pid=os.getpid(),
            kpid=int(kpid_text) if kpid_text.isdigit() else None,
            dev=os.environ.get(DEVICE_ENV) or self.device.name,
            side="device",
        )
        self.trace_flush = sink.flush
        self.tracer.emit("proc", event="start", argv=list(argv), queues=len(self.rings))
        return sink

    def trace_exit(self, reason: str) -> None:
        """Record the process's exit (``reason``) and flush the trace."""
        if self.tracer is not None:
            self.tracer.emit("proc", event="exit", reason=reason, counters=dict(self.counters))
        if self.trace_flush is not None:
            self.trace_flush()

    # ================================================================== fault injection
    def attach_injector(self, injector: FaultInjector) -> None:
        """Run under ``injector``'s fault plan (before the rings start): rings are then
        served by the instrumented drain, the device's :meth:`~vdev.device.Device.faults`
        reaches the plan, the injector traces through :attr:`tracer` and logs here, and
        its counters join :meth:`metrics`. The start is logged and traced (the seed)."""
        self.injector = injector
        injector.tracer = self.tracer
        injector.log = self.log
        self.device._fault_fire = self.fire_faults
        self.log(injector.describe())
        if self.tracer is not None:
            self.tracer.emit(
                "proc",
                event="faults",
                seed=injector.plan.seed,
                rules=len(injector.plan.rules),
                resumed=injector.resumed,
            )

    def fire_faults(
        self,
        kind: str,
        *,
        queue: int | None = None,
        opcode: str | int | None = None,
        sector: int | None = None,
        nbytes: int | None = None,
    ) -> list[Fired]:
        """Fire one event at the plan (no plan: ``[]``). Lifecycle actions are carried
        out here (``crash`` does not return, ``hang`` returns when the hang is over or
        the process is stopping, ``needs_reset`` marks the device broken,
        ``refuse_features_ok`` arms the refusal of the next FEATURES_OK); the other
        faults are returned for the caller to carry out."""
        injector = self.injector
        if injector is None:
            return []
        fired = injector.fire(kind, queue=queue, opcode=opcode, sector=sector, nbytes=nbytes)
        if not fired:
            return fired
        out: list[Fired] = []
        for f in fired:
            action = f.action
            if action not in LIFECYCLE_ACTIONS:
                out.append(f)
            elif action == "crash":
                self.crash(f"fault #{f.seq} crash (rule {f.rule!r}) on {kind}")
            elif action == "hang":
                self.hang(f.params.get("s"))
            elif action == "needs_reset":
                self.needs_reset(queue, f"fault #{f.seq} needs_reset (rule {f.rule!r}) on {kind}")
            else:  # refuse_features_ok
                self._refuse_features_ok = True
        return out

    def take_features_refusal(self) -> bool:
        """For the transport, when the driver sets FEATURES_OK (vhost-user: at
        SET_FEATURES): True once after a ``refuse_features_ok`` fault fired — the device
        then leaves FEATURES_OK clear (§3.1.1)."""
        refuse, self._refuse_features_ok = self._refuse_features_ok, False
        return refuse

    def crash(self, reason: str) -> NoReturn:
        """Die as a power failure would (:meth:`vdev.device.Device.crash`): log, save the
        fault run, record and flush the trace, then SIGKILL this process."""
        self.log(f"crash: {reason}: SIGKILL")
        if self.injector is not None:
            self.injector.save_state()
        if self.tracer is not None:
            self.tracer.emit(
                "proc", event="exit", reason=f"crash: {reason}", counters=dict(self.counters)
            )
        if self.trace_flush is not None:
            self.trace_flush()
        if self.on_crash is not None:
            self.on_crash(reason)
        kill_self()

    def hang(self, seconds: float | None) -> None:
        """Stop serving — rings, control, timers, the device's sources — for ``seconds``
        (None: until the process is stopped). Only the lifelines (:meth:`add_lifeline`:
        the parent watch) and the waker (:meth:`stop`, SIGTERM) are still heard, so the
        process stays alive yet still exits when told to or when its parent dies."""
        what = "until stopped" if seconds is None else f"for {seconds:g} s"
        self.log(f"hang: not serving {what}", "hang")
        if self.trace_flush is not None:
            self.trace_flush()  # the fault that hung us is in the trace, whatever follows
        deadline = None if seconds is None else monotonic() + seconds
        poller = Poller()
        waker = self.waker
        if waker is not None:
            poller.register(waker)
        for obj, _ in self._lifelines.values():
            poller.register(obj)
        while not self.stopping:  # bounded by the deadline or stop()
            timeout = self.idle_timeout
            if deadline is not None:
                left = deadline - monotonic()
                if left <= 0:
                    break
                timeout = min(timeout, left)
            for ready in poller.poll(timeout):
                if waker is not None and ready is waker:
                    waker.drain()
                    continue
                entry = self._lifelines.get(id(ready))
                if entry is not None:
                    entry[1]()
                else:  # removed by a lifeline's own callback
                    poller.unregister(cast(Pollable, ready))
        if not self.stopping:
            self.log("hang: over, serving again", "hang")

    def needs_reset(self, queue: int | None, why: str) -> None:
        """Enter the error state that needs a reset (§2.1.2): no ring is served any more
        and the transport tells the driver as it does for a broken ring (ZeroMQ:
        DEVICE_NEEDS_RESET and a config-change interrupt; vhost-user: the err eventfd)."""
        for ring in self.rings:
            ring.broken = True
        self._pending.clear()
        self._unarmed.clear()
        index = queue if queue is not None and 0 <= queue < len(self.rings) else 0
        ring = self.rings[index]
        if self.tracer is not None:
            self.tracer.emit("ring_broken", index, why=why)
        self.transport.ring_broken(ring, why)

    def watch_parent(self, on_gone: Callable[[], None]) -> ParentWatch | None:
        """Call ``on_gone`` when the process that launched us dies (the
        :class:`~hostops.process.ParentWatch` of our environment, a lifeline: heard even
        during a ``hang`` fault). Returns the watch, or None when not launched with
        one."""
        parent = ParentWatch.from_env()
        if parent is None:
            return None

        def check() -> None:
            if parent.parent_gone():
                on_gone()
            else:  # readable yet alive: never spin on it
                self.remove_source(parent)

        self.add_lifeline(parent, check)
        return parent

    def add_lifeline(self, obj: Pollable, callback: Callable[[], None]) -> None:
        """:meth:`add_source`, and keep listening to ``obj`` during a ``hang`` fault
        (the parent watch: a hung device still exits when its parent dies)."""
        self._lifelines[id(obj)] = (obj, callback)
        self.add_source(obj, callback)

    # ================================================================== logging
    def log(self, message: str, kind: str | None = None) -> None:
        """One line on the log; with ``kind``, at most :data:`MAX_LOG_PER_KIND` lines
        of that kind (a hostile driver must not be able to fill the disk with our log)."""
        if kind is not None:
            n = self._log_counts[kind] = self._log_counts.get(kind, 0) + 1
            if n > MAX_LOG_PER_KIND:
                return
            if n == MAX_LOG_PER_KIND:
                message += f" (further {kind} messages suppressed)"
        try:
            print(f"{self.log_prefix}{message}", file=self._log_file, flush=True)
        except (OSError, ValueError):
            pass

    # ================================================================== the loop
    def open(
        self, host: LoopHost | None = None, on_error: Callable[[Exception], None] | None = None
    ) -> None:
        """Create the poller and the waker; register every source added so far.

        With ``host`` the session joins the host's loop instead (see "Hosted sessions"
        in the module docstring): its sources are watched by the host, the host's waker
        is its waker, and the host calls :meth:`round_timeout` / :meth:`after_round`
        every round. ``on_error`` then takes exceptions escaping the transport's
        callbacks (as :meth:`run`'s does). A hosted session does not poll its rings
        (``poll_us`` must be 0: a spin for one session would stall the others)."""
        if self._poller is not None or self._host is not None:
            return
        if host is not None:
            if self.poll.enabled:
                raise UsageError("a hosted session cannot busy-poll: give it poll_us=0")
            self._host = host
            self._on_error = on_error
            self.waker = host.waker
            for obj, _, _ in self._sources.values():
                host.watch(obj, self._hosted_callback(id(obj)))
            host.host(self)
            return
        self._poller = poller = Poller()
        self.waker = waker = Waker()
        self._sources[id(waker)] = (waker, self._drain_waker, False)
        for obj, _, _ in self._sources.values():
            poller.register(obj)

    def _drain_waker(self) -> None:
        if self.waker is not None:
            self.waker.drain()

    def add_source(self, obj: Pollable, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (the transport's; exceptions propagate to :meth:`run`)
        whenever ``obj`` is ready. Adding it again replaces the callback."""
        self._sources[id(obj)] = (obj, callback, False)
        self._register(obj)

    def remove_source(self, obj: Pollable) -> None:
        """Stop watching ``obj`` (unknown objects are ignored). Do it before closing it."""
        self._lifelines.pop(id(obj), None)
        if self._sources.pop(id(obj), None) is not None:
            if self._poller is not None:
                self._poller.unregister(obj)
            elif self._host is not None:
                self._host.unwatch(obj)

    def _register(self, obj: Pollable) -> None:
        if self._poller is not None:
            self._poller.register(obj)
        elif self._host is not None:
            self._host.watch(obj, self._hosted_callback(id(obj)))

    def _hosted_callback(self, key: int) -> Callable[[], None]:
        """What the host calls when the source ``key`` is ready (the dispatch of
        :meth:`run_once`, one source at a time)."""

        def ready() -> None:
            entry = self._sources.get(key)
            if entry is None or self.stopping:
                return
            if entry[2]:
                self._device_callback(entry[1])
                return
            try:
                entry[1]()
            except Exception as e:
                if self._on_error is None:
                    raise
                self._on_error(e)

        return ready

    def run(self, on_error: Callable[[Exception], None] | None = None) -> None:
        """Serve until :meth:`stop` (see the module docstring). An exception escaping
        the transport's callbacks goes to ``on_error`` (the loop then goes on) or, if
        there is none, out of :meth:`run`."""
        self.open()
        while not self.stopping:
            try:
                self.run_once()
            except Exception as e:
                if on_error is None:
                    raise
                on_error(e)

    def run_once(self, timeout: float | None = None) -> None:
        """One round of the loop: wait for sources (at most ``timeout`` seconds; by
        default 0 when a ring has work left, else until the earliest timer, at most
        :attr:`idle_timeout`), run their callbacks and the timers that are due, serve
        the pending rings, flush owed interrupts."""
        poller = self._poller
        if poller is None:
            if self._host is not None:
                raise UsageError("a hosted session's loop is its host's: it has no run_once")
            self.open()
            poller = self._poller
            assert poller is not None
        if timeout is None:
            if self._pending or self._unarmed:
                timeout = 0.0
            elif self._timers:
                timeout = self._timer_timeout()
            else:
                timeout = self.idle_timeout
        if timeout and self.trace_flush is not None:
            self.trace_flush()  # about to sleep: nothing traced waits behind us
        sources = self._sources
        ready = poller.poll(timeout)
        if self._armed_at and not ready and timeout:
            # woke armed with nothing to do: a long sleep says the driver is idle
            now = monotonic()
            if self.poll.slept(now - self._armed_at, work=False):
                self._armed_at = now
        for obj in ready:
            if self.stopping:
                return
            entry = sources.get(id(obj))
            if entry is None:  # removed earlier in this round
                continue
            if entry[2]:
                self._device_callback(entry[1])
            else:
                entry[1]()
        self._after_round()

    def after_round(self) -> None:
        """The rest of a round once the sources' callbacks have run: the timers that
        are due, the pending rings, the owed interrupts, then (nothing pending) the
        poll of the unarmed rings. A hosted session's host calls it every round; an
        exception escaping it then goes to ``on_error`` (given to :meth:`open`)."""
        if self._on_error is None:
            self._after_round()
            return
        try:
            self._after_round()
        except Exception as e:
            self._on_error(e)

    def _after_round(self) -> None:
        if self.stopping:
            return
        if self._timers:
            self._run_timers()
        if self._pending:
            self.serve_pending()
        if self._owed:
            self._flush()
        if self._unarmed and not self._pending and not self.stopping:
            self._busy_poll()
        if self._host is not None and self.trace_flush is not None:
            self.trace_flush()

    def round_timeout(self) -> float | None:
        """How long the loop may sleep as far as this session is concerned: 0 with work
        left (or interrupts owed: a hosted session's ring may be completed by another
        session's round, after its own), else until its earliest timer, else None (no
        limit of its own; a hosted session's host asks it every round)."""
        if self._pending or self._unarmed or self._owed:
            return 0.0
        if self._timers:
            return self._timer_timeout()
        return None

    # ================================================================== hybrid polling
    def _leave_unarmed(self, ring: Ring, dq: DeviceQueue) -> bool:
        """End of a drain with polling on: True if ``ring`` stays unarmed, to be polled
        (the window is open); False: arm it now (the window is 0; the sleep that follows
        is measured, see :mod:`vdev.virtio.poll`)."""
        if self.poll.window:
            self._unarmed[ring.index] = (ring, dq)
            return True
        self._armed_at = monotonic()
        return False

    def _busy_poll(self) -> None:
        """Watch the avail index of the rings drained with notifications left off for
        up to the poll window; work found marks its ring pending (still unarmed: the
        next round drains it). When the window ends empty, arm every such ring and
        re-check it (§2.7.10: a chain published meanwhile is seen here, or the driver
        sees the armed avail_event / flag and kicks) -- only then may the loop sleep."""
        unarmed = self._unarmed
        pw = self.poll
        window = pw.window
        if window and not self.stopping:
            entries = list(unarmed.values())
            contended = CONTENDED_US / 1e6
            start = now = monotonic()
            deadline = start + window
            while now < deadline:
                found = False
                for ring, dq in entries:
                    if dq.has_avail() and ring.dq is dq and not ring.broken:
                        self._pending[ring.index] = None
                        found = True
                if found:
                    pw.hit(monotonic() - start)
                    return
                before = now
                relax()
                now = monotonic()
                if now - before >= contended:  # we waited for the CPU: stop spinning
                    pw.contended(now - start)
                    break
            else:
                pw.miss(now - start)
        tracer = self.tracer
        for ring, dq in unarmed.values():
            if ring.dq is not dq or ring.broken:
                continue
            if dq.enable_notifications():
                self._pending[ring.index] = None
            if tracer is not None:
                if dq.event_idx:
                    tracer.emit("kick_mode", ring.index, on=True, avail_event=dq.last_avail)
                else:
                    tracer.emit("kick_mode", ring.index, on=True, flags=0)
        unarmed.clear()
        self._armed_at = monotonic()

    def stop(self) -> None:
        """Make :meth:`run` return (signal-handler and thread safe)."""
        self.stopping = True
        waker = self.waker
        if waker is not None:
            try:
                waker.wake()
            except Exception:  # closing concurrently: the flag is enough
                pass

    def close(self) -> None:
        """Stop every ring (releasing kept chains), unregister every source, close the
        waker, detach from the device and call ``device.close()``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stopping = True
        for ring in self.rings:
            self.stop_ring(ring)
        self._pending.clear()
        self._owed.clear()
        for _, _, timer, _ in self._timers:
            timer._owner = None
        self._timers.clear()
        poller, self._poller = self._poller, None
        host, self._host = self._host, None
        for obj, _, _ in list(self._sources.values()):
            try:
                if poller is not None:
                    poller.unregister(obj)
                elif host is not None:
                    host.unwatch(obj)
            except Exception:
                pass
        self._sources.clear()
        self._lifelines.clear()
        self._watches.clear()
        waker, self.waker = self.waker, None
        if host is not None:
            host.unhost(self)  # the waker is the host's
        elif waker is not None:
            waker.close()
        if self.device._session is self:
            self.device._attach(None)
        try:
            self.device.close()
        except Exception as e:
            self.log(f"device.close(): {type(e).__name__}: {e}")

    # ================================================================== rings
    def check_num(self, ring: Ring, num: int, what: str) -> None:
        """SET_VRING_NUM's rule (§2.7: a power of two, at most the device's
        ``max_queue_size``); ProtocolError BAD_VALUE otherwise. Sets ``ring.num``."""
        limit = self.device.max_queue_size
        if num < 1 or num & (num - 1) or num > limit:
            raise ProtocolError(
                ErrorCode.BAD_VALUE,
                f"{what}: queue {ring.index} size {num} must be a power of two in "
                f"1..{limit} (§2.7)",
            )
        ring.num = num

    def start_ring(
        self, ring: Ring, memory: GuestMemory, layout: RingLayout, features: int
    ) -> DeviceQueue:
        """Build ``ring``'s DeviceQueue on ``memory`` at ``layout`` (EVENT_IDX and
        INDIRECT_DESC as in ``features``), starting at ``ring.base``. ProtocolError
        BAD_ADDRESS if the rings do not lie in memory."""
        try:
            ring.dq = DeviceQueue(
                memory,
                layout,
                event_idx=bool(features & bit(F.EVENT_IDX)),
                indirect=bool(features & bit(F.INDIRECT_DESC)),
                last_avail=ring.base,
                max_chain=self.device.max_queue_size,  # §2.7.5.3.1 (see DeviceQueue)
            )
        except (AddressError, UsageError) as e:
            raise ProtocolError(ErrorCode.BAD_ADDRESS, f"queue {ring.index}: {e}") from None
        ring.broken = False
        ring.tsig = ring.dq.used_idx
        if ring.base != ring.tseq.low:
            # the driver restarted the ring elsewhere (a vhost-user front-end after a
            # reconnect, SET_VRING_BASE): count on from there, not from a wrap
            ring.tseq = SeqCounter(ring.base)
        return ring.dq

    def stop_ring(self, ring: Ring) -> None:
        """Stop serving ``ring``: release the chains kept on it (then
        ``device.released()``), keep its position as the base and its counters."""
        self._pending.pop(ring.index, None)
        self._unarmed.pop(ring.index, None)
        self._owed.pop(ring, None)
        if ring.kept:
            self._release(ring)
        if ring.withheld or ring.held or ring.ignore_event_idx:
            # fault injection: what was withheld or held back is dropped with the ring
            ring.withheld.clear()
            ring.held.clear()
            ring.ignore_event_idx = False
        dq = ring.dq
        if dq is None:
            return
        ring.base = dq.last_avail
        retired = ring.retired
        st = dq.stats
        for name in _QUEUE_STAT_FIELDS:
            retired[name] = retired.get(name, 0) + getattr(st, name)
        for rule, n in st.rule_violations.items():
            key = f"rule:{rule}"
            retired[key] = retired.get(key, 0) + n
        ring.dq = None

    def clear_ring(self, ring: Ring) -> None:
        """:meth:`stop_ring`, then forget what the driver set (counters survive)."""
        self.stop_ring(ring)
        ring.num = 0
        ring.base = 0
        ring.enabled = False
        ring.broken = False
        ring.tseq = SeqCounter()

    def _release(self, ring: Ring) -> None:
        chains = list(ring.kept)
        ring.kept.clear()
        ring.tkept.clear()
        ring.kfaults.clear()
        for chain in chains:
            chain.release()
        n = len(chains)
        ring.chains_released += n
        self.counters["chains_released"] += n
        self.log(f"queue {ring.index}: {n} kept chain(s) released", kind="release")
        try:
            self.device.released(ring.index)
        except Exception as e:
            self._device_bug(f"device.released({ring.index})", e)

    def reset(self) -> str:
        """Clear every ring (kept chains released), then ``device.reset()``. Returns ""
        or, if the device raised, what it raised (logged, counted ``handler_errors``)."""
        for ring in self.rings:
            self.clear_ring(ring)
        self._pending.clear()
        self._owed.clear()
        self.counters["resets"] += 1
        try:
            self.device.reset()
        except Exception as e:
            self._device_bug("device.reset()", e)
            return f"{type(e).__name__}: {e}"
        return ""

    def kick(self, index: int) -> bool:
        """The driver kicked ring ``index``: count it and mark the ring pending if it
        runs. False if there is no such ring."""
        self.counters["kicks_received"] += 1
        if not 0 <= index < len(self.rings):
            return False
        ring = self.rings[index]
        ring.kicks += 1
        if self._armed_at:
            # the first kick after arming: how long the driver let us sleep
            self.poll.slept(monotonic() - self._armed_at, work=True)
            self._armed_at = 0.0
        if self.tracer is not None:
            self.tracer.emit("kick_recv", index)
        if self.injector is not None and not self._kick_faults(ring):
            return True  # drop_interrupt on notify.kick: the kick is ignored
        if ring.dq is not None and not ring.broken:
            self._pending[index] = None
        return True

    def _kick_faults(self, ring: Ring) -> bool:
        """Fire ``notify.kick`` and carry out its faults; False: ignore the kick."""
        take = True
        for f in self.fire_faults("notify.kick", queue=ring.index):
            action = f.action
            if action == "drop_interrupt":
                take = False
            elif action == "spurious_interrupt":
                self._send_interrupts(ring, 1)
            elif action == "interrupt_storm":
                self._send_interrupts(ring, f.params["n"])
            elif action == "ignore_event_idx":
                ring.ignore_event_idx = True
        return take

    def _send_interrupts(self, ring: Ring, n: int) -> None:
        """Send ``n`` used-buffer notifications for ``ring`` (faults: whatever was used)."""
        notify = self._notify
        for _ in range(n):  # bounded: n <= 2**20 (the plan's schema)
            self.counters["interrupts"] += 1
            notify(ring)

    def schedule_ring(self, ring: Ring) -> None:
        """Look at ``ring`` in this round even without a kick (it may hold work queued
        before it started, or its kicks may have been lost), if it runs."""
        if ring.dq is not None and not ring.broken:
            self._pending[ring.index] = None

    def ring_broken(self, ring: Ring, why: str) -> None:
        """``ring`` cannot be trusted: stop serving it (its DeviceQueue, if any, and the
        chains kept stay until the ring is stopped), count it, tell the transport."""
        ring.broken = True
        ring.ring_errors += 1
        self.counters["ring_errors"] += 1
        if self.tracer is not None:
            self.tracer.emit("ring_broken", ring.index, why=why)
        self._pending.pop(ring.index, None)
        self._unarmed.pop(ring.index, None)
        self.transport.ring_broken(ring, why)

    @property
    def has_pending(self) -> bool:
        """Some ring has work left."""
        return bool(self._pending)

    # ================================================================== data path
    def serve_pending(self) -> None:
        """One round over the pending rings: at most ``budget`` chains each."""
        pending = self._pending
        rings = self.rings
        # tracing and fault injection take the instrumented copy; the hot path stays bare
        if self.tracer is None and self.injector is None:
            drain = self._drain
        else:
            drain = self._drain_traced
        for index in list(pending):
            if self.stopping:
                return
            ring = rings[index]
            dq = ring.dq
            if dq is None or ring.broken:
                pending.pop(index, None)
                continue
            try:
                more = drain(ring, dq)
            except RingError as e:
                self.ring_broken(ring, str(e))
                more = False
            if not more:
                pending.pop(index, None)
            if self._owed:
                self._flush()

    def _drain(self, ring: Ring, dq: DeviceQueue) -> bool:
        """Serve ``ring`` for one round; True if it has work left (budget spent).
        :class:`RingError` propagates. Hand-inlined: this is the hot path."""
        counters = self.counters
        index = ring.index
        kept = ring.kept
        pop = dq.pop
        push = dq.push
        handle = self.device.handle
        budget = self.budget
        handled = chains = 0
        outer, self._draining = self._draining, ring  # pull_available() may nest
        try:
            while True:
                dq.disable_notifications()
                while True:
                    if handled >= budget:
                        self._interrupt(ring, dq)
                        return True
                    try:
                        chain = pop()
                    except ChainError as e:
                        handled += 1
                        counters["bad_chains"] += 1
                        self.log(f"queue {index}: bad chain: {e}", "chain")
                        push(e.head, 0)
                        continue
                    if chain is None:
                        break
                    handled += 1
                    chains += 1
                    try:
                        written = handle(index, chain)
                    except Exception as e:
                        self._handler_error(
                            ring, f"{type(e).__name__}: {e}", traceback.format_exc()
                        )
                        written = 0
                    # the usual answer (a plain int in range) costs one test
                    if type(written) is not int or not 0 <= written <= chain.writable_len:
                        if written is PENDING:
                            if len(kept) >= dq.size:
                                self._overkept(ring, chain)
                            kept[chain] = None
                            counters["chains_kept"] += 1
                            continue
                        written = self._check_written(ring, chain, written)
                    push(chain.head, written)
                    del chain  # drop the views into guest memory now
                    if not chains % INTERRUPT_EVERY:
                        # let the driver complete what is done while we go on (no
                        # ping-pong); EVENT_IDX keeps this to one interrupt per reap
                        self._interrupt(ring, dq)
                self._interrupt(ring, dq)
                if self._polling and self._leave_unarmed(ring, dq):
                    return False
                if not dq.enable_notifications():
                    return False
        finally:
            self._draining = outer
            counters["chains"] += chains

    def _drain_traced(self, ring: Ring, dq: DeviceQueue) -> bool:
        """:meth:`_drain` recording ``pop``/``bad_chain``/``push``/``irq`` events and
        ``kick_mode`` (what it writes to avail_event / used.flags), the same decisions in
        the same order: tracing must not change behaviour. It is also
        the drain of a device under a fault plan (:attr:`injector`), traced or not: the
        ``ring.pop``, ``device.request`` and ``ring.push`` events fire here."""
        tracer = self.tracer
        emit = tracer.emit if tracer is not None else _no_emit
        injector = self.injector
        device_events = not self.device.fault_events  # fire device.request per chain
        rfaults: list[Fired] = []
        counters = self.counters
        index = ring.index
        kept = ring.kept
        tseq = ring.tseq
        pop = dq.pop
        push = dq.push
        handle = self.device.handle
        budget = self.budget
        handled = chains = 0
        outer, self._draining = self._draining, ring  # pull_available() may nest
        try:
            while True:
                dq.disable_notifications()
                # what the device wrote (§2.7.10): used.flags NO_NOTIFY, or nothing
                if dq.event_idx:
                    emit("kick_mode", index, on=False)
                else:
                    emit("kick_mode", index, on=False, flags=1)
                while True:
                    if handled >= budget:
                        self._interrupt_traced(ring, dq)
                        return True
                    seq = tseq.extend(dq.last_avail)
                    try:
                        chain = pop()
                    except ChainError as e:
                        handled += 1
                        counters["bad_chains"] += 1
                        self.log(f"queue {index}: bad chain: {e}", "chain")
                        emit("bad_chain", index, seq, e.head, error=str(e))
                        if injector is None:
                            push(e.head, 0)
                        else:
                            self._push_faulty(ring, dq, e.head, 0, 0, [])
                            if ring.broken:
                                return False
                        emit("push", index, seq, e.head, len=0)
                        continue
                    if chain is None:
                        break
                    handled += 1
                    chains += 1
                    emit(
                        "pop",
                        index,
                        seq,
                        chain.head,
                        descs=[
                            [sg.addr, sg.length, 2 if sg.writable else 0, sg.indirect]
                            for sg in chain.segments
                        ],
                        rlen=chain.readable_len,
                        wlen=chain.writable_len,
                    )
                    if injector is not None:
                        rfaults = self._pop_faults(ring, chain, device_events)
                        if ring.broken:  # needs_reset: the chain stays unanswered
                            chain.release()
                            return False
                    try:
                        written = handle(index, chain)
                    except Exception as e:
                        self._handler_error(
                            ring, f"{type(e).__name__}: {e}", traceback.format_exc()
                        )
                        written = 0
                    if type(written) is not int or not 0 <= written <= chain.writable_len:
                        if written is PENDING:
                            if len(kept) >= dq.size:
                                self._overkept(ring, chain)
                            kept[chain] = None
                            ring.tkept[chain] = seq
                            if rfaults:
                                ring.kfaults[chain] = rfaults
                            counters["chains_kept"] += 1
                            emit("keep", index, seq, chain.head)
                            continue
                        written = self._check_written(ring, chain, written)
                    if injector is None:
                        push(chain.head, written)
                    else:
                        self._push_faulty(
                            ring, dq, chain.head, written, chain.writable_len, rfaults
                        )
                        if ring.broken:
                            return False
                    emit("push", index, seq, chain.head, len=written)
                    del chain
                    if not chains % INTERRUPT_EVERY:
                        self._interrupt_traced(ring, dq)
                self._interrupt_traced(ring, dq)
                if self._polling and self._leave_unarmed(ring, dq):
                    return False
                more = dq.enable_notifications()
                # what the device wrote (§2.7.10): avail_event = last_avail, or used.flags 0
                if dq.event_idx:
                    emit("kick_mode", index, on=True, avail_event=dq.last_avail)
                else:
                    emit("kick_mode", index, on=True, flags=0)
                if not more:
                    return False
        finally:
            self._draining = outer
            counters["chains"] += chains

    def _interrupt_traced(self, ring: Ring, dq: DeviceQueue) -> None:
        """:meth:`_interrupt` recording the decision and what decided it (when traced)
        and firing ``notify.interrupt`` (under a fault plan)."""
        tracer = self.tracer
        old = ring.tsig
        new = dq.used_idx
        sent = dq.should_interrupt()
        if new == old:
            return  # no decision was taken (nothing pushed since the last one)
        ring.tsig = new
        if tracer is not None:
            self._trace_irq(tracer, ring, dq, sent, old, new)
        if self.injector is not None:
            self._interrupt_faults(ring, sent)
        elif sent:
            self.counters["interrupts"] += 1
            self._notify(ring)

    def _trace_irq(
        self, tracer: Tracer, ring: Ring, dq: DeviceQueue, sent: bool, old: int, new: int
    ) -> None:
        """Record an interrupt decision (``irq``) and what decided it."""
        # the avail ring's flags (word 0) and used_event (word 2 + size), §2.7.6 / §2.7.10
        try:
            words = dq.memory.view(dq.layout.avail, RingLayout.avail_bytes(dq.size))
            flags = int.from_bytes(words[0:2], "little")
            off = 4 + 2 * dq.size
            event = int.from_bytes(words[off : off + 2], "little")
            words.release()
        except (AddressError, ValueError):
            flags = event = 0
        if dq.event_idx:
            tracer.emit("irq", ring.index, sent=sent, old=old, new=new, event=event)
        else:
            tracer.emit(
                "irq", ring.index, sent=sent, old=old, new=new, no_interrupt=bool(flags & 1)
            )

    # ================================================================== ring faults
    def _interrupt_faults(self, ring: Ring, sent: bool) -> None:
        """An interrupt decision under a fault plan: ``notify.interrupt`` fires when a
        notification would be sent (or, once ``ignore_event_idx`` fired on the ring, when
        anything new was used, whatever EVENT_IDX / NO_INTERRUPT say, §2.7.10), and its
        faults decide how many notifications go: none (``drop_interrupt``), ``n``
        (``interrupt_storm``), one more (``spurious_interrupt``)."""
        if not sent and not ring.ignore_event_idx:
            return
        count = 1
        extra = 0
        for f in self.fire_faults("notify.interrupt", queue=ring.index):
            action = f.action
            if action == "drop_interrupt":
                count = 0
            elif action == "interrupt_storm":
                count = f.params["n"] if count else 0
            elif action == "spurious_interrupt":
                extra += 1
            elif action == "ignore_event_idx":
                ring.ignore_event_idx = True
        self._send_interrupts(ring, count + extra)

    def _pop_faults(self, ring: Ring, chain: Chain, device_events: bool) -> list[Fired]:
        """Fire ``ring.pop`` (and ``device.request`` for a device that fires no events of
        its own) for a chain just popped; the ring faults returned apply to its used
        entry."""
        nbytes = chain.readable_len + chain.writable_len
        out = self.fire_faults("ring.pop", queue=ring.index, nbytes=nbytes)
        if device_events and not ring.broken:
            self.fire_faults("device.request", queue=ring.index, nbytes=nbytes)
        return out

    def _push_faulty(
        self,
        ring: Ring,
        dq: DeviceQueue,
        head: int,
        written: int,
        writable_len: int,
        pre: list[Fired],
        fire: bool = True,
    ) -> None:
        """Write the used entry of ``head`` as a malicious device would when ring faults
        fire (``pre``: those fired when it was popped; ``ring.push`` fires now unless
        ``fire`` is False):

        ``withhold`` (never pushed), ``bad_used_id`` (the ``id`` parameter, default the
        queue size: out of range, §2.7.8), ``used_id_not_head`` (:meth:`_not_a_head`),
        ``used_len_too_big`` (writable length + ``extra``, §2.7.8.1), ``double_complete``
        (the entry twice), ``used_idx_jump`` (used.idx moved by the queue size + ``by``,
        at most 65535, past anything in flight), ``out_of_order`` (held back until
        ``depth`` later entries of the ring were pushed)."""
        faults = pre
        if fire:
            faults = pre + self.fire_faults("ring.push", queue=ring.index, nbytes=written)
        if ring.broken:  # needs_reset fired: nothing more is written
            return
        if not faults:
            dq.push(head, written)
            if ring.held:
                self._release_held(ring, dq)
            return
        params = {f.action: f.params for f in faults}
        if "withhold" in params:
            ring.withheld.add(head)
            return
        uid, ulen = head, written
        if "bad_used_id" in params:
            uid = params["bad_used_id"].get("id", dq.size)
        elif "used_id_not_head" in params:
            uid = self._not_a_head(ring, dq, head)
        if "used_len_too_big" in params:
            ulen = min(0xFFFFFFFF, writable_len + params["used_len_too_big"]["extra"])
        entries = [(uid, ulen)]
        if "double_complete" in params:
            entries.append((uid, ulen))
        jump = 0
        if "used_idx_jump" in params:
            jump = min(dq.size + params["used_idx_jump"]["by"], 0xFFFF)
        if "out_of_order" in params:
            if len(ring.held) >= dq.size:
                # a correct driver has at most a queue size in flight (§2.7.6): a hostile
                # one re-offering heads must not grow this without bound
                oldest = ring.held.pop(0)
                self._write_used(dq, oldest[1], oldest[2])
            ring.held.append([params["out_of_order"]["depth"], entries, jump, head])
            return
        self._write_used(dq, entries, jump)
        if ring.held:
            self._release_held(ring, dq)

    def _push_many_faulty(
        self, ring: Ring, dq: DeviceQueue, entries: Sequence[tuple[Chain, int]]
    ) -> None:
        """:meth:`complete_many` under a fault plan: ``ring.push`` fires for each entry;
        when no fault fired the batch is published at once as usual, otherwise entry by
        entry through :meth:`_push_faulty`."""
        fired = []
        for chain, n in entries:
            pre = ring.kfaults.pop(chain, [])
            fired.append(pre + self.fire_faults("ring.push", queue=ring.index, nbytes=int(n)))
        if ring.broken:
            return
        if not any(fired):
            _push_batch(dq, [(chain.head, int(n)) for chain, n in entries])
            for _ in entries:
                if ring.held:
                    self._release_held(ring, dq)
            return
        for (chain, n), faults in zip(entries, fired, strict=True):
            self._push_faulty(ring, dq, chain.head, int(n), chain.writable_len, faults, False)

    def _release_held(self, ring: Ring, dq: DeviceQueue) -> None:
        """One more entry of ``ring`` was pushed: push the held-back entries whose
        countdown (``out_of_order`` ``depth``) reached zero."""
        due = []
        for h in ring.held:  # bounded: at most a queue size of chains in flight
            h[0] -= 1
            if h[0] <= 0:
                due.append(h)
        for h in due:
            ring.held.remove(h)
            self._write_used(dq, h[1], h[2])

    @staticmethod
    def _write_used(dq: DeviceQueue, entries: list[tuple[int, int]], jump: int) -> None:
        """Write ``entries`` (id, len: unchecked, as a malicious device would) one by one
        into the used ring, then, with ``jump``, move used.idx so that it ran ``jump``
        entries past where it stood before them."""
        start = dq.used_idx
        for entry in entries:
            _push_batch(dq, [entry])
        if jump:
            idx = (start + jump) & 0xFFFF
            used = dq.memory.view(dq.layout.used, RingLayout.used_bytes(dq.size))
            try:
                words = used.cast("H")
                try:
                    words[1] = idx
                finally:
                    words.release()
            finally:
                used.release()
            dq.used_idx = idx

    def _not_a_head(self, ring: Ring, dq: DeviceQueue, head: int) -> int:
        """A descriptor index that is not the head of any chain in flight: ``head``'s
        second descriptor when it has one, else the first index that no chain the device
        holds (kept, withheld, held back) or that the avail ring still offers starts
        with; the queue size (out of range) when every index is a head."""
        size = dq.size
        try:
            table = dq.memory.view(dq.layout.desc, RingLayout.desc_bytes(size))
            _, _, flags, nxt = DESC.unpack_from(table, 16 * head)
            table.release()
        except (AddressError, ValueError):
            flags = nxt = 0
        if flags & VRING_DESC_F_NEXT and nxt < size and nxt != head:
            return int(nxt)
        busy = {head, *ring.withheld, *(c.head for c in ring.kept), *(h[3] for h in ring.held)}
        try:
            avail = dq.memory.view(dq.layout.avail, RingLayout.avail_bytes(size))
            words = avail.cast("H")
            pending = (words[1] - dq.last_avail) & 0xFFFF
            for i in range(min(pending, size)):  # bounded by the queue size (§2.7.6)
                busy.add(words[2 + (dq.last_avail + i) % size])
            words.release()
            avail.release()
        except (AddressError, ValueError):
            pass
        for i in range(size):
            if i not in busy:
                return i
        return size

    def _overkept(self, ring: Ring, chain: Chain) -> NoReturn:
        """A correct driver has at most a queue size of chains in flight (§2.7.6): more
        kept chains means it made a head available again while the device held it."""
        chain.release()
        raise RingError(
            Rule.AVAIL_IDX_JUMP,
            f"queue {ring.index}: {len(ring.kept)} chains kept and another one made "
            f"available: more than the queue size in flight (a head reused)",
        )

    def _interrupt(self, ring: Ring, dq: DeviceQueue) -> None:
        if dq.should_interrupt():
            self.counters["interrupts"] += 1
            self._notify(ring)

    def _flush(self) -> None:
        """One interrupt decision per ring completed outside its own drain."""
        owed, self._owed = self._owed, {}
        if self.tracer is None and self.injector is None:
            decide = self._interrupt
        else:
            decide = self._interrupt_traced
        for ring in owed:
            dq = ring.dq
            if dq is not None:
                decide(ring, dq)

    def _check_written(self, ring: Ring, chain: Chain, written: object) -> int:
        if isinstance(written, int) and not isinstance(written, bool):
            if 0 <= written <= chain.writable_len:
                return int(written)
        self._handler_error(
            ring, f"handle() returned {written!r}; want an int in 0..{chain.writable_len}"
        )
        return 0

    def _handler_error(self, ring: Ring, what: str, tb: str = "") -> None:
        ring.handler_errors += 1
        self.counters["handler_errors"] += 1
        detail = f"{what}\n{tb}" if tb else what
        self.log(
            f"queue {ring.index}: device bug, request completed with length 0: {detail}",
            "handler",
        )

    def _device_bug(self, where: str, e: BaseException) -> None:
        self.counters["handler_errors"] += 1
        self.log(
            f"{where}: device bug: {type(e).__name__}: {e}\n{traceback.format_exc()}",
            "callback",
        )

    # ================================================================== device API
    def _ring_arg(self, queue: object, what: str) -> Ring:
        if not isinstance(queue, int) or isinstance(queue, bool):
            raise UsageError(f"{what}: queue {queue!r} is not an int")
        if not 0 <= queue < len(self.rings):
            raise UsageError(
                f"{what}: queue {queue} does not exist (the device has {len(self.rings)})"
            )
        return self.rings[queue]

    def complete(self, queue: int, chain: Chain, used_len: int) -> None:
        """:meth:`vdev.device.Device.complete`: push the used entry of a kept chain."""
        ring = self._ring_arg(queue, "complete")
        kept = ring.kept
        if not isinstance(chain, Chain) or chain not in kept:
            self.counters["stale_completions"] += 1
            head = getattr(chain, "head", "?")
            raise UsageError(
                f"complete: chain {head} is not kept on queue {queue} (already completed, "
                f"never kept, or released when the ring stopped)"
            )
        if (
            not isinstance(used_len, int)
            or isinstance(used_len, bool)
            or not 0 <= used_len <= chain.writable_len
        ):
            raise UsageError(
                f"complete: used length {used_len!r} is not an int in "
                f"0..{chain.writable_len} (§2.7.8.2)"
            )
        dq = ring.dq
        assert dq is not None, "a ring without a DeviceQueue keeps no chain"
        del kept[chain]
        if self.injector is None:
            dq.push(chain.head, int(used_len))
        else:
            pre = ring.kfaults.pop(chain, [])
            self._push_faulty(ring, dq, chain.head, int(used_len), chain.writable_len, pre)
        if self.tracer is not None:
            seq = ring.tkept.pop(chain, None)
            self.tracer.emit("push", queue, seq, chain.head, len=int(used_len))
        chain.release()
        self.counters["completions"] += 1
        if self._draining is not ring:
            self._owed[ring] = None

    def complete_many(self, queue: int, completions: Sequence[tuple[Chain, int]]) -> None:
        """:meth:`vdev.device.Device.complete_many`: push the used entries of several
        kept chains and publish ``used.idx`` once, after the last of them (§2.7.8), so
        the driver sees them all or none. Everything is checked before anything is
        written: one bad entry raises :class:`UsageError` and changes nothing."""
        ring = self._ring_arg(queue, "complete_many")
        kept = ring.kept
        try:
            entries = list(completions)
        except TypeError:
            raise UsageError(
                f"complete_many: {completions!r} is not a sequence of (chain, used_len)"
            ) from None
        seen: set[int] = set()
        for entry in entries:
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise UsageError(f"complete_many: {entry!r} is not a (chain, used_len) pair")
            chain, used_len = entry
            if not isinstance(chain, Chain) or chain not in kept or id(chain) in seen:
                self.counters["stale_completions"] += 1
                head = getattr(chain, "head", "?")
                raise UsageError(
                    f"complete_many: chain {head} is not kept on queue {queue} (already "
                    f"completed, never kept, listed twice, or released when the ring stopped)"
                )
            seen.add(id(chain))
            if (
                not isinstance(used_len, int)
                or isinstance(used_len, bool)
                or not 0 <= used_len <= chain.writable_len
            ):
                raise UsageError(
                    f"complete_many: used length {used_len!r} of chain {chain.head} is not "
                    f"an int in 0..{chain.writable_len} (§2.7.8.2)"
                )
        if not entries:
            return
        dq = ring.dq
        assert dq is not None, "a ring without a DeviceQueue keeps no chain"
        if self.injector is None:
            _push_batch(dq, [(chain.head, int(n)) for chain, n in entries])
        else:
            self._push_many_faulty(ring, dq, entries)
        if self.tracer is not None:
            for chain, n in entries:
                seq = ring.tkept.pop(chain, None)
                self.tracer.emit("push", queue, seq, chain.head, len=int(n), batch=len(entries))
        for chain, _ in entries:
            del kept[chain]
            chain.release()
        self.counters["completions"] += len(entries)
        if self._draining is not ring:
            self._owed[ring] = None

    def pull_available(self, queue: int) -> int:
        """Serve ring ``queue`` now (see :meth:`vdev.device.Device.pull_available`):
        one drain round, nested in whatever callback or drain asked for it."""
        ring = self._ring_arg(queue, "pull_available")
        dq = ring.dq
        if dq is None or ring.broken or self._draining is ring or not dq.has_avail():
            return 0
        before = self.counters["chains"] + self.counters["bad_chains"]
        drain = self._drain if self.tracer is None and self.injector is None else self._drain_traced
        try:
            if drain(ring, dq):
                self._pending[ring.index] = None  # budget spent: the rest next round
        except RingError as e:
            self.ring_broken(ring, str(e))
        return self.counters["chains"] + self.counters["bad_chains"] - before

    def kept(self, queue: int) -> int:
        """:meth:`vdev.device.Device.kept`."""
        return len(self._ring_arg(queue, "kept").kept)

    def watch(self, source: Any, callback: Callable[[], None]) -> None:
        """:meth:`vdev.device.Device.watch`."""
        key = _source_key(source)
        if not callable(callback):
            raise UsageError(f"watch: callback {callback!r} is not callable")
        old = self._watches.get(key)
        pollable: Pollable
        if old is not None:
            pollable = old[1]
            self._sources[id(pollable)] = (pollable, callback, True)
            return
        if key[0] == "fd":
            pollable = FdSource(source)
        elif callable(getattr(source, "_pollable", None)):
            pollable = source
        else:
            try:
                fd = source.fileno()
            except (OSError, ValueError) as e:
                raise UsageError(f"watch: {source!r}.fileno(): {e}") from None
            if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
                raise UsageError(f"watch: {source!r}.fileno() returned {fd!r}")
            pollable = FdSource(fd)
        self._watches[key] = (source, pollable)
        self._sources[id(pollable)] = (pollable, callback, True)
        self._register(pollable)

    def unwatch(self, source: Any) -> None:
        """:meth:`vdev.device.Device.unwatch`."""
        entry = self._watches.pop(_source_key(source), None)
        if entry is None:
            return
        self.remove_source(entry[1])

    def schedule(self, timer: TimerHandle) -> None:
        """Arm a device timer (:meth:`vdev.device.Device.call_later`)."""
        self._arm(timer, True)

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> TimerHandle:
        """A transport timer: ``callback()`` once on the loop after ``delay_s``;
        exceptions propagate to :meth:`run` like the transport's source callbacks."""
        timer = TimerHandle(max(0.0, float(delay_s)), callback)
        self._arm(timer, False)
        return timer

    def notify_config_change(self) -> None:
        """:meth:`vdev.device.Device.notify_config_change`."""
        self.transport.config_interrupt()

    # ================================================================== timers
    def _arm(self, timer: TimerHandle, device: bool) -> None:
        if not timer.pending:
            return
        timer.deadline = deadline = self._clock() + timer.delay
        timer._owner = self
        # armed on the loop thread: the next poll's timeout accounts for it
        heapq.heappush(self._timers, (deadline, next(self._timer_seq), timer, device))

    def _timer_cancelled(self) -> None:
        """A timer in the heap was cancelled (called by TimerHandle.cancel)."""
        self._cancelled += 1
        heap = self._timers
        if self._cancelled > 32 and self._cancelled * 2 > len(heap):
            self._timers = [e for e in heap if e[2].pending]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def _timer_timeout(self) -> float:
        wait = self._timers[0][0] - self._clock()
        return min(self.idle_timeout, max(0.0, wait))

    def _run_timers(self) -> None:
        heap = self._timers
        now = self._clock()
        # bounded: timers armed by these callbacks (even with delay 0) wait a round
        for _ in range(len(heap)):
            heap = self._timers  # a cancel() in a callback may have rebuilt it
            if not heap or heap[0][0] > now:
                return
            _, _, timer, device = heapq.heappop(heap)
            timer._owner = None
            callback = timer._fire()
            if callback is None:
                self._cancelled = max(0, self._cancelled - 1)
                continue
            if device:
                self.counters["timers_fired"] += 1
                self._device_callback(callback)
            else:
                callback()

    def _device_callback(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception as e:
            self._device_bug(f"callback {getattr(callback, '__qualname__', callback)!r}", e)
        if self._owed:
            self._flush()

    # ================================================================== metrics
    def ring_metrics(self, ring: Ring) -> dict[str, int]:
        """``ring``'s counters: DeviceQueueStats (cumulative), kicks, errors, kept."""
        out = dict.fromkeys(_QUEUE_STAT_FIELDS, 0)
        out.update(ring.retired)
        dq = ring.dq
        if dq is not None:
            st = dq.stats
            for name in _QUEUE_STAT_FIELDS:
                out[name] = out.get(name, 0) + getattr(st, name)
            for rule, n in st.rule_violations.items():
                out[f"rule:{rule}"] = out.get(f"rule:{rule}", 0) + n
        out["kicks_received"] = ring.kicks
        out["ring_errors"] = ring.ring_errors
        out["handler_errors"] = ring.handler_errors
        out["chains_released"] = ring.chains_released
        out["kept"] = len(ring.kept)
        return out

    def metrics(self) -> dict[str, int]:
        """The session's (and transport's) counters merged with ``device.metrics``."""
        out = dict(self.counters)
        for name, n in self.device.metrics.snapshot().items():
            out[name] = out.get(name, 0) + int(n)
        if self.injector is not None:
            for name, n in self.injector.counters.items():
                out[name] = out.get(name, 0) + n
        out.update(self.poll.metrics())
        return out
