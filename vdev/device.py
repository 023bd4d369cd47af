"""The device plugin API: subclass :class:`Device` to add a virtio device to virtio-lab.

Theory of operation
-------------------
A device runs in a process of its own (``python -m vdev <kind> ...``). That process is a
transport — :class:`vdev.runtime.DeviceRuntime` (ZeroMQ, for our kernel) or
:class:`vdev.vhost_user.VhostUserBackend` (vhost-user, for QEMU) — driving one
:class:`vdev.session.DeviceSession` wrapped around one :class:`Device` object. The split
of work is the one Firecracker's ``devices/virtio`` uses: the *runtime* owns everything
generic, the *device* owns only what makes it a block device, a network card, ...

=================================  ==================================================
the runtime (session + transport)  the device (your subclass)
=================================  ==================================================
the control channel (GET_FEATURES, says who it is (:attr:`Device.device_id`,
SET_MEM_TABLE, SET_VRING_*, ...),  :attr:`~Device.name`, :attr:`~Device.num_queues`,
the status byte and its order      :attr:`~Device.max_queue_size`), which
checks, feature negotiation,       device-specific feature bits it offers
shared memory, the doorbells,      (:meth:`~Device.device_features`), its config
the split rings (validation of     space (:meth:`~Device.config`), and how to serve
every descriptor, event            one request (:meth:`~Device.handle`).
suppression, interrupts), the one
event loop, timers, metrics per
queue, errors and resets
=================================  ==================================================

The life of a device, as the runtime drives it::

    dev = MyDevice(...)              # constructed once per process
    dev.device_features()            # asked at GET_FEATURES (ring bits are ORed in)
    dev.config()                     # asked at GET_CONFIG
    dev.activate(features)           # DRIVER_OK: ``features`` is what was negotiated
    dev.handle(queue, chain) -> n    # once per request, on the runtime's one thread
    ...                              #   (or -> PENDING, and dev.complete() later)
    dev.released(queue)              # the ring stopped: chains still kept are gone
    dev.reset()                      # RESET_DEVICE / SET_STATUS 0 / vhost-user
                                     # disconnect; may be followed by another
                                     # negotiation and activate()

:meth:`~Device.handle` receives a :class:`~vdev.virtio.queue.Chain` that the runtime has
already validated against the spec (§2.7.5: in-range addresses, no loops, readable
before writable, ...): ``chain.readable`` / ``chain.writable`` are memoryviews straight
into the driver's shared memory, so a backend can ``os.preadv``/``os.pwritev`` into
them with no intermediate copy. What the runtime cannot validate is the *request*
inside the chain (a header too short, a sector out of range): that is the device's job,
and a bad request is answered with the device's own error status, counted in
:attr:`~Device.metrics`, and the device goes on. ``handle`` returns the number of bytes
it wrote into the writable part (the used length, §2.7.8). An exception escaping
``handle`` is treated as a bug in the device: the runtime logs it, completes the chain
with length 0, counts ``handler_errors`` and keeps serving.

Everything a device does happens on the runtime's single thread: no locking is needed,
and a slow ``handle`` delays every queue and the control channel (the runtime bounds
the work per round so that one busy queue cannot starve the others). None of the
methods below may be called from another thread.

Devices that are not request/response
-------------------------------------
A network card's receive queue holds buffers for frames that have not arrived yet; a
console waits for a key press; an entropy source may wait for its pool. Such a device
*keeps* chains and completes them later, from an event source of its own:

* ``handle()`` returns :data:`PENDING` instead of a length: the session keeps the chain
  (:meth:`Device.kept` counts them per queue) and pushes nothing.
* :meth:`Device.complete` ``(queue, chain, used_len)`` pushes the used entry of a kept
  chain (``used_len`` an int in ``0..chain.writable_len``). Completing a chain that is
  not kept — already completed, never kept, or released by a reset — raises
  :class:`~vdev.virtio.errors.UsageError`, changes nothing and counts
  ``stale_completions``. After ``complete()`` the chain's views are released (the
  buffers belong to the driver again): touching them raises ``ValueError``.
* :meth:`Device.complete_many` ``(queue, [(chain, used_len), ...])`` completes several
  kept chains that belong together and publishes ``used.idx`` once, after all of them:
  the driver never sees part of the batch (a frame spread over several receive buffers
  with virtio-net's MRG_RXBUF must appear whole, §5.1.6.4). Checked as ``complete()``
  checks one chain, all before anything is pushed.
* :meth:`Device.pull_available` ``(queue)`` serves ``queue`` at once: the chains the
  driver has made available since the last drain go through ``handle()`` now, kick or
  no kick. A device that needs a buffer *now* -- a network card with a frame to
  deliver and no receive buffer kept -- asks for them instead of waiting: a driver
  does not kick for buffers a polling device is expected to see (hybrid polling,
  :mod:`vdev.virtio.poll`), and even with kicks the frame may be ahead of the kick.
* :meth:`Device.watch` ``(source, callback)`` calls ``callback()`` on the runtime's loop
  whenever ``source`` is readable: an int fd, an object with ``fileno()``, or a hostops
  pollable (anything with ``_pollable()``, e.g. a ZeroMQ socket wrapper). It is
  level-triggered: the callback reads until it would block (a bounded number of times)
  and unwatches a source at end of file, or it is called again at once. Watches may be
  set up before the runtime starts (in ``__init__``) and stay until
  :meth:`Device.unwatch` or process exit — a reset does **not** remove them. Unwatch a
  source before closing it.
* :meth:`Device.call_later` ``(delay_s, callback)`` runs ``callback()`` on the loop once,
  ``delay_s`` seconds from now (timers come from one heap; the loop's poll timeout is
  the earliest of them); the returned :class:`TimerHandle` has ``cancel()``. Timers,
  too, survive resets: cancel yours in :meth:`Device.reset`.
* :meth:`Device.notify_config_change` raises a configuration-change interrupt (e.g. the
  link went down). Over ZeroMQ it rings the call doorbell with CONFIG_CHANGE (0xFFFF);
  vhost-user has no way to say it without BACKEND_REQ, which is not offered: the
  back-end logs that once and counts ``config_interrupts_unsupported``.

Interrupts follow EVENT_IDX suppression (§2.7.10) as for ``handle()``: completions
made inside ``handle()`` during a drain go through the drain's interrupt logic;
completions made from a watch callback or a timer are batched, and after the callback
returns the runtime asks ``should_interrupt()`` once per queue it touched. An exception
escaping a callback or a timer is a device bug: logged (rate limited), counted in
``handler_errors``, and the loop goes on.

Resets. When a ring stops (RESET_DEVICE, SET_STATUS 0, a vhost-user disconnect,
GET_VRING_BASE or disabling that ring) every chain kept on it is *released*: its views
are dropped so the driver's memory can be unmapped, it is never pushed and can never be
completed (``complete()`` raises). The session counts ``chains_released`` and then calls
:meth:`Device.released` for the queue; on a device reset it calls :meth:`Device.reset`
after that. Forget released chains there. A kept chain is thus never leaked and never
completed twice.

A minimal device (an entropy source, virtio §5.4)::

    class Rng(Device):
        device_id = DeviceId.ENTROPY
        name = "rng"
        num_queues = 1

        def handle(self, queue: int, chain: Chain) -> int:
            data = os.urandom(chain.writable_len)
            chain.write(0, data)
            self.metrics.inc("bytes", len(data))
            return len(data)

A device that keeps chains: every request is a buffer for the next bytes read from a
pipe (think of a console's receive queue). It listens to the pipe only while it has a
buffer to put bytes in, so a full pipe pushes back on the writer::

    class PipeReader(Device):
        device_id = 0x7F
        name = "pipe"

        def __init__(self, fd: int) -> None:       # the pipe's non-blocking read end
            super().__init__()
            self.fd = fd
            self.waiting: collections.deque[Chain] = collections.deque()

        def handle(self, queue: int, chain: Chain) -> int | Pending:
            self.waiting.append(chain)
            self.watch(self.fd, self._readable)     # a buffer is there: listen
            return PENDING                          # answered when bytes arrive

        def _readable(self) -> None:
            while self.waiting:                     # bounded: one read per buffer
                chain = self.waiting[0]
                try:
                    data = os.read(self.fd, chain.writable_len)
                except BlockingIOError:
                    return                          # drained: wait for more
                if not data:
                    break                           # end of file
                chain.write(0, data)
                self.complete(0, self.waiting.popleft(), len(data))
            self.unwatch(self.fd)                   # no buffer left (or end of file)

        def released(self, queue: int) -> None:
            self.waiting.clear()                    # the session dropped them
            self.unwatch(self.fd)

A timer-driven device does the same with ``self.call_later(delay, callback)``, keeps
each :class:`TimerHandle` and cancels them in :meth:`~Device.released`.

Fault injection
---------------
``python -m vdev KIND ... --faults PLAN`` runs the device under a fault plan
(``docs/faults.md``). The runtime carries out the ring, notification and lifecycle
faults itself; a device that has request faults of its own names the event kinds it
fires in :attr:`Device.fault_events` and asks :meth:`Device.faults` once per request
(``[]`` without a plan, at the cost of one attribute test), carrying out what comes
back; :meth:`Device.crash` ends the process as a power failure would. A device with no
``fault_events`` gets ``device.request`` events fired for it, one per chain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, Final, NoReturn, Protocol

from vdev.virtio.constants import F, bit
from vdev.virtio.control import ErrorCode
from vdev.virtio.errors import ProtocolError, UsageError
from vdev.virtio.faults import Fired
from vdev.virtio.queue import Chain

__all__ = [
    "Device",
    "Metrics",
    "RING_FEATURES",
    "PENDING",
    "Pending",
    "TimerHandle",
    "DeviceHost",
    "Chain",
]

#: Feature bits the runtime offers on behalf of every device: the split-ring transport
#: it implements (VERSION_1, EVENT_IDX, INDIRECT_DESC). A device never offers these.
RING_FEATURES = bit(F.VERSION_1) | bit(F.EVENT_IDX) | bit(F.INDIRECT_DESC)


class Pending:
    """The type of :data:`PENDING` (one instance only): "I keep this chain, and will
    :meth:`Device.complete` it later"."""

    __slots__ = ()
    _instance: ClassVar[Pending | None] = None

    def __new__(cls) -> Pending:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "vdev.PENDING"

    def __reduce__(self) -> str:
        return "PENDING"  # pickles as the module global: still the one instance


#: What :meth:`Device.handle` returns instead of a used length when it keeps the chain
#: to complete it later with :meth:`Device.complete`.
PENDING: Final = Pending()


class TimerHandle:
    """One :meth:`Device.call_later` timer: :meth:`cancel` it, or let it fire once.

    Created by the runtime; ``deadline`` is on the runtime's monotonic clock (None until
    the device is attached to a runtime, when a timer set in ``__init__`` starts).
    """

    __slots__ = ("deadline", "delay", "_callback", "_state", "_owner")

    _PENDING = 0
    _FIRED = 1
    _CANCELLED = 2

    def __init__(self, delay: float, callback: Callable[[], None]) -> None:
        self.delay = delay
        self.deadline: float | None = None
        self._callback: Callable[[], None] | None = callback
        self._state = TimerHandle._PENDING
        self._owner: Any = None  # the session's heap, told of cancellations

    @property
    def pending(self) -> bool:
        """True until the timer fires or is cancelled."""
        return self._state == TimerHandle._PENDING

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` prevented the callback."""
        return self._state == TimerHandle._CANCELLED

    def cancel(self) -> bool:
        """Prevent the callback: True if it will not run now, False if it had already
        run (or been cancelled). Safe from inside any callback, including its own."""
        if self._state != TimerHandle._PENDING:
            return False
        self._state = TimerHandle._CANCELLED
        self._callback = None  # drop what the callback holds (chains, ...)
        owner = self._owner
        if owner is not None:
            owner._timer_cancelled()
        return True

    def _fire(self) -> Callable[[], None] | None:
        """Mark fired and hand out the callback (None if cancelled)."""
        if self._state != TimerHandle._PENDING:
            return None
        self._state = TimerHandle._FIRED
        cb, self._callback = self._callback, None
        return cb

    def __repr__(self) -> str:
        state = ("pending", "fired", "cancelled")[self._state]
        return f"<TimerHandle {self.delay}s {state}>"


class DeviceHost(Protocol):
    """What a :class:`Device` asks of the runtime it is attached to (implemented by
    :class:`vdev.session.DeviceSession`; the device author never sees it)."""

    def complete(self, queue: int, chain: Chain, used_len: int) -> None:
        """Push the used entry of a kept chain."""
        ...

    def complete_many(self, queue: int, completions: Sequence[tuple[Chain, int]]) -> None:
        """Push the used entries of several kept chains, publishing ``used.idx`` once."""
        ...

    def kept(self, queue: int) -> int:
        """How many chains of ``queue`` are kept."""
        ...

    def pull_available(self, queue: int) -> int:
        """Serve ``queue``'s available chains now; how many went to ``handle()``."""
        ...

    def watch(self, source: Any, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``source`` is readable."""
        ...

    def unwatch(self, source: Any) -> None:
        """Stop watching ``source``."""
        ...

    def schedule(self, timer: TimerHandle) -> None:
        """Arm ``timer`` (its delay counts from now)."""
        ...

    def notify_config_change(self) -> None:
        """Raise a configuration-change interrupt."""
        ...


class Metrics:
    """Plain named counters (Firecracker style): tests and ``GET_METRICS`` read them.

    Counters named at construction start at 0 and are always reported; :meth:`inc`
    creates any other counter on first use::

        m = Metrics("reads", "writes")
        m.inc("reads")
        m.inc("bytes_read", 4096)
        m.snapshot()   # {"reads": 1, "writes": 0, "bytes_read": 4096}
    """

    __slots__ = ("_counters",)

    def __init__(self, *names: str) -> None:
        self._counters: dict[str, int] = dict.fromkeys(names, 0)

    def declare(self, *names: str) -> None:
        """Make sure the counters ``names`` exist (at 0 if new)."""
        for name in names:
            self._counters.setdefault(name, 0)

    def inc(self, name: str, n: int = 1) -> None:
        """Add ``n`` (default 1) to counter ``name``."""
        self._counters[name] = self._counters.get(name, 0) + n

    def __getitem__(self, name: str) -> int:
        """The value of counter ``name`` (0 if it was never counted)."""
        return self._counters.get(name, 0)

    def __contains__(self, name: object) -> bool:
        return name in self._counters

    def __iter__(self) -> Iterator[str]:
        return iter(self._counters)

    def __len__(self) -> int:
        return len(self._counters)

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter, safe to keep or send."""
        return dict(self._counters)

    def merge(self, other: Metrics | dict[str, int] | Iterable[tuple[str, int]]) -> None:
        """Add every counter of ``other`` into this one."""
        items = other.snapshot().items() if isinstance(other, Metrics) else dict(other).items()
        for name, n in items:
            self.inc(name, n)

    def __repr__(self) -> str:
        return f"Metrics({self._counters!r})"


class Device:
    """Base class of every virtio device backend (the plugin API).

    Set the class attributes, override what your device needs, and hand an instance to
    :class:`vdev.runtime.DeviceRuntime` or :class:`vdev.vhost_user.VhostUserBackend`
    (or to the ``python -m vdev`` entry point).
    Instances may override the class attributes in ``__init__`` (e.g. a queue size taken
    from the command line).

    Attributes:
        device_id: the virtio device ID (§5), e.g. ``DeviceId.BLOCK``.
        name: a short name for logs and ``GET_DEVICE_INFO``.
        num_queues: how many virtqueues the device has (indices ``0..num_queues-1``).
        max_queue_size: the largest queue size the device accepts (a power of two, at
            most 32768); the driver may choose any power of two up to it.
        metrics: the device's counters, reported by ``GET_METRICS`` under ``"device"``
            next to the runtime's own.
        features: the feature bits negotiated at the last :meth:`activate` (0 before).
    """

    device_id: ClassVar[int] = 0
    name: ClassVar[str] = "device"
    num_queues: int = 1
    max_queue_size: int = 256
    #: Fault-plan event kinds this device fires itself through :meth:`faults` (virtio-blk:
    #: ``blk.read``/``blk.write``/``blk.flush``/``blk.discard``; virtio-net: ``net.tx``/
    #: ``net.rx``). When empty, the session fires ``device.request`` for every chain.
    fault_events: ClassVar[frozenset[str]] = frozenset()
    #: The runtime serving this device (set by :class:`vdev.session.DeviceSession`).
    _session: DeviceHost | None = None
    #: The session's fault hook while the device runs under a fault plan (else None).
    _fault_fire: Callable[..., list[Fired]] | None = None

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.features = 0

    # ------------------------------------------------------------------ negotiation
    def device_features(self) -> int:
        """The device-specific feature bits offered to the driver (§2.2).

        Return only your device type's bits (e.g. ``bit(BlkF.FLUSH)``); the runtime ORs
        in :data:`RING_FEATURES`. Asked at every ``GET_FEATURES``; keep it constant for
        the life of the process. The default offers nothing.
        """
        return 0

    def config(self) -> bytes:
        """The device configuration space (§4.x / per device type, e.g. ``BlkConfig``).

        ``GET_CONFIG offset size`` replies with ``config()[offset:offset+size]`` or
        BAD_VALUE if that runs past the end. The default is empty.
        """
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver writes ``data`` at ``offset`` of the config space (``SET_CONFIG``).

        Raise :class:`~vdev.virtio.errors.ProtocolError` to refuse; the driver then gets
        an error reply with that code and message. The default refuses every write
        (BAD_VALUE "config space is read-only"), which is right for most devices.
        """
        raise ProtocolError(ErrorCode.BAD_VALUE, "config space is read-only")

    # ------------------------------------------------------------------ life cycle
    def activate(self, features: int) -> None:
        """The driver set DRIVER_OK; ``features`` is the negotiated feature set (a
        subset of what was offered, always including VERSION_1).

        Called once per negotiation, before the first :meth:`handle`. Raise to refuse
        activation: the driver gets DEVICE_ERROR and the status does not change.
        The default records ``features`` in :attr:`features`.
        """
        self.features = features

    def reset(self) -> None:
        """The driver reset the device (``RESET_DEVICE``, ``SET_STATUS 0``, or the
        vhost-user front-end went away).

        Forget everything negotiated; keep backend state that outlives a reset (an
        image file's contents) and keep :attr:`metrics` (counters are cumulative for the
        life of the process). Every chain the device kept has been released already
        (:meth:`released` was called for its queue); watches and timers are *not*
        removed: cancel the timers that belong to requests here. The default clears
        :attr:`features`.
        """
        self.features = 0

    def released(self, queue: int) -> None:
        """Queue ``queue`` stopped (a reset, GET_VRING_BASE, the ring disabled or its
        memory replaced) while the device kept chains of it: they are released (their
        views dropped), will never be completed, and :meth:`complete` now refuses them.
        Forget them here, cancel their timers. Called only when chains were released,
        before :meth:`reset` when it is a reset. The default does nothing.
        """

    def close(self) -> None:
        """The device process is exiting: release backend resources (files, sockets).
        Called once by the runtime. The default does nothing."""

    # ------------------------------------------------------------------ data path
    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Serve one request: the chain that the driver made available on ``queue``.

        ``chain`` has been validated by the runtime (every buffer lies inside shared
        memory, readable buffers come first). Read the request from ``chain.readable``
        (``chain.read(offset, n)`` copies; ``chain.readable_slices(offset, n)`` gives
        zero-copy views), write the response into ``chain.writable`` (``chain.write``,
        ``chain.writable_slices``), and return how many bytes you wrote into the
        writable part, counted from its start (the used length, §2.7.8.2): it must not
        exceed ``chain.writable_len``.

        Or return :data:`PENDING` to keep the chain and :meth:`complete` it later (from
        a :meth:`watch` callback, a :meth:`call_later` timer, or another ``handle()``).

        A malformed *request* is not an exception: answer it with the device type's
        error status, count it in :attr:`metrics` and return. Errors of the host
        backend (``OSError``) likewise become an error status. An exception that does
        escape is a bug: the runtime logs it, completes the chain with length 0 and
        counts ``handler_errors``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement handle()")

    def complete(self, queue: int, chain: Chain, used_len: int) -> None:
        """Complete ``chain``, which :meth:`handle` kept (returned :data:`PENDING` for),
        with ``used_len`` bytes written into its writable part (§2.7.8.2).

        The used entry is pushed at once; the interrupt decision (EVENT_IDX aware) is
        the drain's when called inside ``handle()``, otherwise it is taken once per
        queue after the current callback returns. The chain's views are released.

        Raises :class:`~vdev.virtio.errors.UsageError` and changes nothing when
        ``chain`` is not kept on ``queue`` (already completed, never kept, or released
        by a reset; counted as ``stale_completions``), when ``used_len`` is not an int
        in ``0..chain.writable_len``, or when the device is not attached to a runtime.
        """
        host = self._session
        if host is None:
            raise UsageError(f"{self!r} is not attached to a runtime: nothing to complete")
        host.complete(queue, chain, used_len)

    def complete_many(self, queue: int, completions: Sequence[tuple[Chain, int]]) -> None:
        """Complete several kept chains of ``queue`` at once: ``completions`` is a
        sequence of ``(chain, used_len)``, pushed in that order, and the driver sees
        them *together* -- ``used.idx`` is published once, after the last used element
        (§2.7.8). Use it when the chains belong together: a virtio-net frame spread
        over several receive buffers with MRG_RXBUF (§5.1.6.4), whose first header
        says how many buffers follow (Linux's ``virtio_net`` reads ``num_buffers`` and
        expects every one of them to be in the used ring already).

        Every entry is checked first, as :meth:`complete` checks one (kept on
        ``queue``, not listed twice, ``used_len`` in ``0..chain.writable_len``): one
        bad entry raises :class:`~vdev.virtio.errors.UsageError` and nothing is pushed.
        The interrupt decision is taken as for :meth:`complete`; the chains' views are
        released. An empty sequence does nothing.
        """
        host = self._session
        if host is None:
            raise UsageError(f"{self!r} is not attached to a runtime: nothing to complete")
        host.complete_many(queue, completions)

    def pull_available(self, queue: int) -> int:
        """Serve ``queue`` now: the chains the driver has made available since the last
        drain go through :meth:`handle` at once (a chain kept there counts), as a kick
        would have them -- for a device that needs a buffer *now* (see "Devices that
        are not request/response"). Returns how many chains were served; 0 when
        ``queue`` is not running, broken, being drained at this moment (the drain in
        progress takes them) or has nothing available. At most the device's budget of
        chains; a ring with more left is served in the loop's next round.

        Raises :class:`~vdev.virtio.errors.UsageError` for a queue that does not exist.
        """
        host = self._session
        if host is None:
            self._check_queue(queue)
            return 0
        return host.pull_available(queue)

    def kept(self, queue: int) -> int:
        """How many chains of ``queue`` the device keeps now (returned :data:`PENDING`
        for and not yet completed or released)."""
        host = self._session
        if host is None:
            self._check_queue(queue)
            return 0
        return host.kept(queue)

    def _check_queue(self, queue: object) -> None:
        """UsageError unless ``queue`` is one of this device's queue indices (asked
        with no session attached)."""
        if not isinstance(queue, int) or not 0 <= queue < self.num_queues:
            raise UsageError(f"queue {queue!r} does not exist ({self.num_queues} queues)")

    # ------------------------------------------------------------------ fault injection
    def faults(
        self,
        kind: str,
        *,
        queue: int | None = None,
        opcode: str | int | None = None,
        sector: int | None = None,
        nbytes: int | None = None,
    ) -> list[Fired]:
        """The faults a fault plan (``python -m vdev KIND ... --faults PLAN``) injects
        into the request the device is about to serve: an event of ``kind`` (one of
        :attr:`fault_events`) with the request's queue, opcode, first sector and size.

        Without a plan this is ``[]`` at the cost of one attribute test. The lifecycle
        actions (``crash``, ``hang``, ``needs_reset``, ``refuse_features_ok``) are carried
        out by the runtime before this returns (``crash`` does not return); what is
        returned are the others, each a :class:`~vdev.virtio.faults.Fired` (``action``,
        ``params`` with every random choice drawn already), for the device to carry out::

            for f in self.faults("blk.read", queue=q, opcode="IN", sector=s, nbytes=n):
                if f.action == "ioerr":
                    return self._status(chain, IOERR)
                if f.action == "corrupt_read":
                    corrupt = (f.params["offset"], f.params["xor"])

        Every fault is already counted (``faults_fired``, ``fault:<action>``), logged
        and traced.
        """
        fire = self._fault_fire
        if fire is None:
            return []
        return fire(kind, queue=queue, opcode=opcode, sector=sector, nbytes=nbytes)

    def crash(self, reason: str) -> NoReturn:
        """Die now, as if the power went: the fault run is saved (so the restarted
        device continues it), the trace flushed, then the process SIGKILLs itself (no
        ``close()``, no cleanup: what a device did not make durable is gone). For the
        ``crash`` and ``power_cut`` faults::

            if f.action == "power_cut":
                self._roll_back_unflushed()
                self.crash("power_cut")

        Outside a device process (not attached to a runtime) it raises
        :class:`~vdev.virtio.errors.UsageError` instead."""
        host = self._session
        crash = getattr(host, "crash", None)
        if crash is None:
            raise UsageError(f"{self!r} is not attached to a runtime: cannot crash ({reason})")
        crash(reason)
        raise AssertionError("unreachable: the session's crash() returned")

    # ------------------------------------------------------------------ event sources
    def watch(self, source: Any, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the runtime's loop whenever ``source`` is readable.

        ``source`` is an int fd, an object with ``fileno()`` (read once, now) or a
        hostops pollable (with ``_pollable()``, e.g. a ZeroMQ socket wrapper). Readiness
        is level-triggered: read until it would block, and unwatch at end of file.
        Watching a source again replaces its callback. Allowed before the runtime starts
        (e.g. in ``__init__``); the watch stays until :meth:`unwatch` or process exit
        (a reset does not remove it). An exception escaping ``callback`` is logged and
        counted as ``handler_errors``.
        """
        key = _source_key(source)
        if not callable(callback):
            raise UsageError(f"watch: callback {callback!r} is not callable")
        host = self._session
        if host is None:
            early: dict[tuple[str, int], tuple[Any, Callable[[], None]]]
            early = self.__dict__.setdefault("_early_watches", {})
            early[key] = (source, callback)
            return
        host.watch(source, callback)

    def unwatch(self, source: Any) -> None:
        """Stop watching ``source`` (a source that is not watched is ignored)."""
        key = _source_key(source)
        host = self._session
        if host is None:
            self.__dict__.get("_early_watches", {}).pop(key, None)
            return
        host.unwatch(source)

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback()`` once on the runtime's loop, ``delay_s`` seconds (≥ 0) from
        now; returns a :class:`TimerHandle` (``handle.cancel()``). Before the device is
        attached to a runtime (in ``__init__``), the delay counts from the attachment.
        An exception escaping ``callback`` is logged and counted as ``handler_errors``.
        """
        if (
            not isinstance(delay_s, (int, float))
            or isinstance(delay_s, bool)
            or not math.isfinite(delay_s)
            or delay_s < 0
        ):
            raise UsageError(f"call_later: delay {delay_s!r} is not a finite number >= 0")
        if not callable(callback):
            raise UsageError(f"call_later: callback {callback!r} is not callable")
        timer = TimerHandle(float(delay_s), callback)
        host = self._session
        if host is None:
            self.__dict__.setdefault("_early_timers", []).append(timer)
        else:
            host.schedule(timer)
        return timer

    def notify_config_change(self) -> None:
        """Tell the driver that the configuration space changed (a config-change
        interrupt, §2.4.2). Over ZeroMQ: the call doorbell rings with CONFIG_CHANGE;
        over vhost-user it cannot be said (no BACKEND_REQ): logged once, counted as
        ``config_interrupts_unsupported``. UsageError when not attached to a runtime."""
        host = self._session
        if host is None:
            raise UsageError(f"{self!r} is not attached to a runtime: no driver to tell")
        host.notify_config_change()

    def _attach(self, host: DeviceHost | None) -> None:
        """Called by the session: serve this device (``None``: detach). Watches and
        timers set up before are handed over."""
        self._session = host
        if host is None:
            return
        watches = self.__dict__.pop("_early_watches", {})
        timers = self.__dict__.pop("_early_timers", [])
        for source, callback in watches.values():
            host.watch(source, callback)
        for timer in timers:
            if timer.pending:
                host.schedule(timer)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} id={self.device_id} "
            f"queues={self.num_queues} max_queue_size={self.max_queue_size}>"
        )


def _source_key(source: Any) -> tuple[str, int]:
    """How a watched source is recognised: ``("fd", n)`` or ``("obj", id(source))``."""
    if isinstance(source, int) and not isinstance(source, bool):
        if source < 0:
            raise UsageError(f"watch: {source} is not a file descriptor")
        return ("fd", source)
    if callable(getattr(source, "_pollable", None)) or callable(getattr(source, "fileno", None)):
        return ("obj", id(source))
    raise UsageError(
        f"watch: {source!r} is neither an fd, nor has fileno(), nor is a hostops pollable"
    )
