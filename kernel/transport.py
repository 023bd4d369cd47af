"""The client side of one virtio device: shared memory, queues, interrupts, failure.

Theory of operation
-------------------
:class:`VirtioTransport` is what a PCI function is to a Linux driver: everything the
kernel knows about one device, and the only object that talks to it. This module holds
the part that does not depend on *how* the kernel talks to the device -- the region
layout and DMA allocator, the queues, the interrupt thread's reaping loop, failure
handling, shutdown order and the counters. The transports fill in the rest:

* :class:`~kernel.transport_zmq.ZmqTransport` -- our own device process (``python -m
  vdev ...``): msgpack control channel, ZeroMQ doorbells, a sealed memfd region, a pidfd
  for the process;
* :class:`~kernel.transport_vhost_user.VhostUserTransport` -- any vhost-user back-end
  (qemu-storage-daemon, ``python -m vdev ... --vhost-user``): a Unix socket, a memfd
  passed with ``SCM_RIGHTS``, an eventfd per ring and direction;
* :class:`~kernel.transport_attach.AttachTransport` -- a ZmqTransport for a device
  process somebody else started (``python -m vdev ... --shm-by-name``,
  ``kernel.Attach(EP)``): a named shm region, and reconnection when it restarts.

A transport subclass answers only "how do I say this to the device": the bring-up steps
(:meth:`~VirtioTransport.launch`, :meth:`~VirtioTransport.get_device_info`,
:meth:`~VirtioTransport.negotiate`, :meth:`~VirtioTransport.read_config`), creating
and handing over the region (``_create_region`` / ``_hand_over_region``), telling the
device about one ring and returning its kick function (``_setup_vring``), what the
interrupt thread waits on and what a wake-up means (``_irq_sources`` /
``_collect_interrupts`` / ``_drain_interrupts``), and how to stop and close
(``_stop_device`` / ``_close_channels``).

Bring-up follows virtio §3.1.1 (:meth:`kernel.bus.VirtioBus.probe` drives it):

1. :meth:`~VirtioTransport.launch`: reach the device (start it, or connect to it);
2. :meth:`~VirtioTransport.get_device_info`: what it is, how many queues;
3. :meth:`~VirtioTransport.negotiate`: the driver's choice of features (VERSION_1 is
   required);
4. :meth:`~VirtioTransport.setup_memory`: create the region and hand it over;
5. the driver reads config space (:meth:`~VirtioTransport.read_config`) and sets up its
   queues (:meth:`~VirtioTransport.setup_queue`);
6. :meth:`~VirtioTransport.driver_ok` starts the interrupt thread, then tells the
   device (DRIVER_OK where the transport has a status byte).

Region layout (guest-physical address == offset in the region)::

    0                     ring_slot            num_queues*ring_slot          size
    | ring 0 (desc|avail|used) | ring 1 | ...  | DMA pool (PageAllocator) ... |

The interrupt thread
--------------------
One thread per device waits through a ``hostops`` Poller on the transport's sources
(its interrupt channel and whatever tells that the device is gone: a pidfd, a socket
hang-up) and on a Waker (shutdown). For an interrupt on queue *i* it runs the
disable → reap → re-enable → re-check loop (:meth:`DriverQueue.get_used` /
:meth:`DriverQueue.enable_interrupts`) under the queue lock, then -- with the lock
released -- calls each request's completion and the queue's ``refill`` hook (the
driver's software queue dispatches into the room just freed). Index 0xFFFF
(``CONFIG_CHANGE``) runs the config-change hooks (a transport may check the device
status first).

Hybrid polling (:mod:`vdev.virtio.poll`, ``spec.poll_us``; 0 turns it off): after an
interrupt the thread reaps the queue but leaves its interrupts off
(``service_queue(arm=False)``) and, on its next rounds, watches the used ring for the
adaptive window (:meth:`VirtioTransport._busy_poll`; the poller is looked at without
sleeping between rounds, so a dying device or a config change is still noticed); a
caller woken by the last completion typically submits again within the window and
its completion needs no interrupt. When the window ends empty the queue is armed --
reaped again with interrupts re-enabled and re-checked -- and only then does the
thread sleep; the first interrupt after that, or a long idle sleep, teaches the window.
:attr:`KernelQueue.pollable` leaves a queue out; :meth:`VirtioTransport.wait_armed`
waits until every queue is armed (the state a driver at rest must leave its rings in).

Tracing
-------
With a :class:`~vdev.virtio.trace.Tracer` set on the transport before its queues are
set up (``kernel.boot(trace=...)``), each :class:`KernelQueue` swaps in traced copies
of :meth:`KernelQueue.add` and :meth:`KernelQueue.publish` (instance attributes
shadowing the methods: an untraced queue pays nothing), and :meth:`service_queue`
takes its traced copy after one test per batch. Events: ``add`` (head, every
descriptor, the decoded request), ``publish`` (old/new avail.idx), ``kick`` (sent or
suppressed, with the avail_event / NO_NOTIFY that decided it), ``irq_recv``, ``reap``
(length, latency since the add, the decoded answer), ``config`` and ``fail``. A
chain's ``seq`` is its avail-ring slot counted from the queue's creation (the device
counts the same from its side).

Failure and recovery
--------------------
What can go wrong with a device, and what the interrupt thread does about it:

* **it dies** (pidfd readable, socket hang-up): what it completed before dying is
  reaped first (that data was really transferred), then it is *restarted*;
* **it breaks the ring protocol** (:class:`DeviceSpecError` from
  :meth:`DriverQueue.get_used`: used id out of range or not in flight, the same id
  twice, used len beyond the writable part, used.idx jumping) **or sets
  DEVICE_NEEDS_RESET**: the queue is broken; the device is *reset* and the chains it
  had are failed with EIO, culprit ``"device-broke-ring"`` (a device that wrote
  garbage into the ring may have written garbage into their buffers too);
* **it does not complete a request in time** (``spec.request_timeout``, per queue
  :attr:`KernelQueue.timeout_s`): the caller gets ETIMEDOUT (culprit ``"timeout"``)
  at once through the token's ``expire``, but the request's buffers stay lent to the
  device until it has been reset (it may still write them); the device is *reset* --
  or restarted when it does not even answer the reset -- and the other chains it had
  are resubmitted;
* **it loses an interrupt**: while chains are in flight on a *watched* queue
  (:attr:`KernelQueue.watch`: request queues, not receive queues) the interrupt thread
  wakes every :data:`TICK_S` and looks at the used ring; entries still unreaped one
  tick later had no interrupt: they are reaped and counted
  (``lost_interrupts_recovered``, per queue and in :attr:`VirtioTransport.recovery`).
  A receive queue always has buffers out, so it is watched differently
  (:attr:`KernelQueue.watch_used`): at each wake-up of the interrupt thread (at least
  one per :data:`IDLE_POLL_S`) a used ring holding unreaped entries starts the ticks.
  With EVENT_IDX one lost interrupt would otherwise stall a receive queue for good (the
  device's next notification waits for a used_event the driver never moves on).
  An idle device costs what it did before (one wake-up per :data:`IDLE_POLL_S`).

A reset or restart (:meth:`VirtioTransport._recover`, interrupt thread) pauses every
queue (:attr:`KernelQueue.paused`: submitters keep their requests in the driver's
software queue), takes every chain off the rings (:meth:`DriverQueue.abandon`), has
the transport reset the device -- or start a new process -- and bring it up again
(§3.1.1: status 0, the features negotiated before, the same memory, fresh zeroed rings
at the same addresses: :meth:`_rebuild_queues`), then hands the chains back to their
driver (:attr:`KernelQueue.on_reset`: resubmit, or fail with the given error) and lets
the queues go. DMA buffers never move, so a resubmitted chain is the same request.

It happens only with ``spec.on_device_death == "restart"`` (the default), on a
transport that can do it (:class:`~kernel.transport_zmq.ZmqTransport`; a vhost-user
back-end is not ours to restart), when every queue's driver has ``on_reset`` (blk and
net do) and within ``spec.restart_budget`` (``(n, window_s)``: resets and restarts
together). Otherwise -- or when the recovery itself fails --
:meth:`VirtioTransport.fail` records the error once, abandons every queue and fails
each in-flight request with its own copy of it (EIO, or ETIMEDOUT for a timeout;
culprit as above, ``"device-gone"`` for a death or a failed recovery); submitters
check :attr:`VirtioTransport.failed` under the queue lock, so a request is either
abandoned or refused -- never lost in between. Every ``OSError`` carries ``culprit``
(:mod:`kernel.errors`); the trace has ``recover`` / ``recovered`` / ``fail`` (with the
culprit) / ``lost_irq`` events.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hostops.barrier import full_barrier
from hostops.clock import monotonic
from hostops.errors import TransportError
from hostops.poll import Pollable, Poller, Waker
from hostops.rundir import RuntimeDir
from hostops.shm import PageAllocator
from hostops.sync import Condition, Event, Lock, current_thread_name, relax, start_thread
from vdev.virtio import (
    DeviceSpecError,
    DriverQueue,
    DriverQueueStats,
    F,
    FlatMemory,
    NetF,
    RingLayout,
    bit,
    feature_names,
)
from vdev.virtio.control import CONFIG_CHANGE
from vdev.virtio.poll import PollWindow
from vdev.virtio.trace import (
    FRAME_CAP,
    Tracer,
    decode_blk_request,
    decode_blk_status,
    decode_net_hdr,
    summarize_frame,
)

from .errors import DeviceProbeError, copy_error, culprit_of, io_error
from .specs import DeviceSpec

__all__ = [
    "Completion",
    "WaitedRequest",
    "DeviceInfo",
    "KernelQueue",
    "SharedMemory",
    "VirtioTransport",
    "DEFAULT_DMA_BYTES",
    "MIN_DMA_BYTES",
    "PAGE",
    "CONTROL_TIMEOUT_S",
    "RESET_TIMEOUT_S",
    "TICK_S",
    "MAX_QUEUES",
    "MAX_QUEUE_SIZE",
    "RECOVERY_COUNTERS",
]

#: The transport's recovery counters (:attr:`VirtioTransport.recovery`).
RECOVERY_COUNTERS = (
    "recoveries",  # resets + restarts that brought the device back
    "resets",  # device reset and re-initialised (same process)
    "restarts",  # device process restarted
    "recovery_failures",  # attempts that did not bring it back
    "timeouts",  # requests that timed out
    "ring_breaks",  # ring-protocol violations / DEVICE_NEEDS_RESET seen
    "lost_interrupts_recovered",  # completions found by the periodic check
    "requests_resubmitted",  # in-flight requests handed back to their driver to resubmit
    "requests_failed_on_reset",  # in-flight requests failed by a reset
)

log = logging.getLogger(__name__)

PAGE = 4096
#: DMA pool size of a device region when ``region_size`` is not given.
DEFAULT_DMA_BYTES = 8 << 20
#: Smallest DMA pool accepted when ``region_size`` is given.
MIN_DMA_BYTES = 256 << 10
#: How long one control request may take.
CONTROL_TIMEOUT_S = 5.0
#: How long a best-effort request at shutdown (reset, stop a ring) may take.
RESET_TIMEOUT_S = 1.0
#: In a batch of completions, the driver's ``refill`` also runs after every this many
#: (so the device gets the resubmitted requests while the rest of the batch completes).
REFILL_EVERY = 8
#: How long shutdown waits for the interrupt thread.
IRQ_JOIN_TIMEOUT_S = 5.0
#: While chains are in flight on a watched queue, the interrupt thread wakes at least
#: this often to look for lost interrupts and timed-out requests.
TICK_S = 0.1
#: The interrupt thread's wait when nothing is in flight.
IDLE_POLL_S = 1.0
#: Largest number of queues a device may report (kernel-side cap, checked at probe).
MAX_QUEUES = 64
#: Largest queue size a device may report (§2.7: a split queue has at most 32768).
MAX_QUEUE_SIZE = 32768


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class Completion(Protocol):
    """What a driver puts into a queue as a request's token."""

    def complete(self, used_len: int) -> None:
        """The device returned the chain having written ``used_len`` bytes into it."""
        ...

    def fail(self, error: OSError) -> None:
        """The request will never complete (device gone, queue broken, shutdown)."""
        ...


class WaitedRequest:
    """A :class:`Completion` a caller blocks on: ``done`` is set when the device
    returned the chain (``used_len``) or it never will (``error``)."""

    __slots__ = ("done", "used_len", "error")

    def __init__(self) -> None:
        self.done = Event()
        self.used_len = 0
        self.error: OSError | None = None

    def complete(self, used_len: int) -> None:
        """The device returned the chain with ``used_len`` bytes written."""
        self.used_len = used_len
        self.done.set()

    def fail(self, error: OSError) -> None:
        """The request will never complete."""
        self.error = error
        self.done.set()


class SharedMemory(Protocol):
    """The region a transport shares with its device (a ``hostops.shm.SharedRegion``
    or a ``hostops.fdmem.MappedFd``): ``size`` bytes, writable ``buf``, ``close()``."""

    @property
    def size(self) -> int:
        """Bytes in the region."""
        ...

    @property
    def buf(self) -> memoryview:
        """The whole region, writable."""
        ...

    def close(self) -> None:
        """Unmap the region."""
        ...


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What the device is: its virtio device id, number of queues, largest queue size
    and a name for messages."""

    device_id: int
    num_queues: int
    max_queue_size: int
    name: str


class KernelQueue:
    """One virtqueue as the kernel uses it: a :class:`DriverQueue` plus the lock that
    serialises every touch of it, the transport's kick function and the driver's hooks.

    Drivers call :meth:`add` and :meth:`publish` with :attr:`lock` held, then
    :meth:`notify` with it released (a kick is a syscall: never hold a lock over one).
    ``refill`` (set by the driver) runs on the interrupt thread after each batch of
    completions and must publish what was added meanwhile; ``on_failed`` runs once when
    the device fails.
    """

    def __init__(
        self,
        transport: VirtioTransport,
        index: int,
        dq: DriverQueue,
        kick: Callable[[], None],
    ) -> None:
        self.transport = transport
        self.index = index
        self.dq = dq
        self.layout: RingLayout = dq.layout
        self.size: int = dq.size
        self.lock = Lock()
        self._stats = dq.stats
        self._kick = kick
        self.refill: Callable[[], None] | None = None
        #: True while the interrupt thread runs a batch of completions; submitters then
        #: leave publishing to ``refill`` (which runs right after the batch).
        self.completing = False
        self.on_failed: Callable[[OSError], None] | None = None
        #: ``on_reset(tokens, error)``: after the device was reset or restarted (the new
        #: ring is live), the tokens that were in flight: resubmit them (``error`` None)
        #: or fail them with ``error``; a token already told it timed out
        #: (``expire``) only gives its buffers back. A queue without it cannot be
        #: recovered: its device fails for good instead.
        self.on_reset: Callable[[list[Any], OSError | None], None] | None = None
        #: True while the device is being reset / restarted: submitters leave their
        #: requests queued (the driver's software queue) instead of adding chains.
        self.paused = False
        #: Seconds a chain may stay with the device (None: forever, e.g. receive
        #: buffers); set by the driver from the spec's ``request_timeout``.
        self.timeout_s: float | None = None
        #: Check the used ring for completions whose interrupt was lost while chains
        #: are in flight (request queues; not receive queues, whose buffers wait for
        #: traffic).
        self.watch = False
        #: A receive queue's watch (with :attr:`watch`): ticks run while its used ring
        #: holds unreaped entries, not while chains are in flight (they always are).
        self.watch_used = False
        #: Completions found by the periodic check, their interrupt never came.
        self.lost_interrupts_recovered = 0
        self._delayed = False  # see delayed_interrupts
        #: Hybrid polling: after an interrupt, the interrupt thread may watch this
        #: queue's used ring (interrupts left off) for the poll window; a driver sets
        #: False where waiting for completions is not worth a core.
        self.pollable = True
        self._seen: list[tuple[Any, float] | None] = [None] * self.size
        self._lost_mark = -1  # used.idx at the last tick that saw unreaped entries
        #: The queue's tracer (None: not traced); see :meth:`enable_trace`.
        self.tracer: Tracer | None = None
        self._tseq = 0  # chains added so far (the next chain's seq)
        self._tpub = 0  # seq at the last publish
        self._tkind = ""  # payload decoder: "blk", "net-rx", "net-tx" or ""
        self._tmerge_left = 0  # net-rx: further buffers of the packet being reaped
        self._tflight: dict[int, tuple[int, int, int, int, int]] = {}

    # ------------------------------------------------------------------ tracing
    def enable_trace(self, tracer: Tracer, payload: str = "") -> None:
        """Trace this queue from now on (call before the first :meth:`add`):
        :meth:`add` and :meth:`publish` become their traced copies. ``payload`` names
        the decoder of the chains' contents (``"blk"``, ``"net-rx"``, ``"net-tx"``)."""
        self.tracer = tracer
        self._tkind = payload
        self.add = self._add_traced  # type: ignore[method-assign]
        self.publish = self._publish_traced  # type: ignore[method-assign]

    def _read(self, addr: int, n: int) -> bytes:
        mem = self.transport.memory
        if mem is None or n <= 0:
            return b""
        try:
            return bytes(mem.view(addr, n))
        except Exception:  # an address the driver itself wrote: only for the trace
            return b""

    def _add_traced(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        token: Completion,
        *,
        indirect_table: int | None = None,
    ) -> int:
        head = self.dq.add(readable, writable, token, indirect_table=indirect_table)
        tracer = self.tracer
        assert tracer is not None
        seq = self._tseq
        self._tseq = seq + 1
        count = len(readable) + len(writable)
        descs: list[list[int]] = []
        for i, (a, ln) in enumerate(readable, 1):
            descs.append([a, ln, 1 if i < count else 0])  # VRING_DESC_F_NEXT
        for i, (a, ln) in enumerate(writable, len(readable) + 1):
            descs.append([a, ln, (1 if i < count else 0) | 2])  # | VRING_DESC_F_WRITE
        payload: dict[str, Any] | None = None
        extra: dict[str, Any] = {}
        status_addr = rx_addr = 0
        kind = self._tkind
        if kind == "blk" and readable:
            a, ln = readable[0]
            wlen = sum(n for _, n in writable)
            rlen = sum(n for _, n in readable)
            hdr = self._read(a, min(ln, 16))
            out = len(readable) > 1 and hdr[:1] == b"\x01"
            data_len = (rlen - ln) if out else max(0, wlen - 1)
            seg = self._read(readable[1][0], 16) if len(readable) > 1 and not out else b""
            payload = {"blk": decode_blk_request(hdr, data_len, seg)}
            if writable:
                status_addr = writable[-1][0] + writable[-1][1] - 1
        elif kind == "net-tx" and readable:
            # the frame may be spread over several readable buffers: gather up to the cap
            parts: list[bytes] = []
            want = 12 + FRAME_CAP
            for a, ln in readable[: self.size]:
                if want <= 0:
                    break
                part = self._read(a, min(ln, want))
                parts.append(part)
                want -= len(part)
            data = b"".join(parts)
            frame = data[12:]
            payload = {"net": decode_net_hdr(data[:12]), "frame": summarize_frame(frame)}
            extra["frame_hex"] = frame.hex()
            extra["frame_len"] = max(0, sum(n for _, n in readable) - 12)
        elif kind == "net-rx" and writable:
            rx_addr = writable[0][0]
        now = tracer.clock()
        self._tflight[id(token)] = (seq, head, now, status_addr, rx_addr)
        rec = self.dq._inflight[head]  # the chain just written: its descriptor ids
        tracer.emit(
            "add",
            self.index,
            seq,
            head,
            descs=descs,
            indirect=indirect_table,
            ids=list(rec.descs) if rec is not None else None,
            payload=payload,
            **extra,
        )
        return head

    def _publish_traced(self) -> bool:
        tracer = self.tracer
        assert tracer is not None
        dq = self.dq
        old_seq, new_seq = self._tpub, self._tseq
        need = dq.kick_prepare()
        if new_seq == old_seq:
            return need
        self._tpub = new_seq
        tracer.emit(
            "publish",
            self.index,
            old=old_seq & 0xFFFF,
            new=new_seq & 0xFFFF,
            count=new_seq - old_seq,
            first_seq=old_seq,
        )
        words = self._read(self.layout.used, 4) + self._read(
            self.layout.used + 4 + 8 * self.size, 2
        )
        if dq.event_idx:
            # §2.7.10: notify iff new - event - 1 < new - old (mod 2**16)
            event = int.from_bytes(words[4:6], "little") if len(words) >= 6 else None
            tracer.emit(
                "kick",
                self.index,
                sent=need,
                old=old_seq & 0xFFFF,
                new=new_seq & 0xFFFF,
                event=event,
            )
        else:
            flags = int.from_bytes(words[0:2], "little") if len(words) >= 2 else 0
            tracer.emit(
                "kick",
                self.index,
                sent=need,
                old=old_seq & 0xFFFF,
                new=new_seq & 0xFFFF,
                no_notify=bool(flags & 1),
            )
        return need

    @property
    def delayed_interrupts(self) -> bool:
        """Ask for completion interrupts late (:attr:`DriverQueue.delayed_interrupts`:
        with EVENT_IDX, once three quarters of the chains in flight are used) -- for
        queues whose completions only give buffers back, such as a transmit queue. Kept
        for the rings a reset or restart builds anew."""
        return self._delayed

    @delayed_interrupts.setter
    def delayed_interrupts(self, on: bool) -> None:
        with self.lock:
            self._delayed = bool(on)
            if self.dq is not None:
                self.dq.delayed_interrupts = self._delayed

    @property
    def stats(self) -> DriverQueueStats:
        """The queue's counters (requests, kicks_sent, kicks_suppressed, interrupts,
        interrupts_suppressed, completions); still readable after shutdown."""
        return self._stats

    @property
    def failed(self) -> OSError | None:
        """The device's failure, if it failed (then every request must be refused)."""
        return self.transport.failed

    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        token: Completion,
        *,
        indirect_table: int | None = None,
    ) -> int:
        """Add one chain (see :meth:`DriverQueue.add`). Caller holds :attr:`lock`."""
        return self.dq.add(readable, writable, token, indirect_table=indirect_table)

    def publish(self) -> bool:
        """Publish added chains; True if the device must be notified (then call
        :meth:`notify` after releasing the lock). Caller holds :attr:`lock`."""
        return self.dq.kick_prepare()

    def notify(self) -> None:
        """Kick the device for this queue (thread-safe; no lock needed). A kick that
        cannot be delivered (device gone, channel closed) is dropped: the interrupt
        thread notices the device's death on its own."""
        try:
            self._kick()
        except (TransportError, OSError, ValueError) as e:
            log.debug("%s: kick on queue %d failed: %s", self.transport.name, self.index, e)

    def kick(self) -> None:
        """Publish and notify if needed (takes the lock itself; nothing once the
        device has failed or while it is being reset)."""
        with self.lock:
            if self.failed is not None or self.paused:
                return
            need = self.publish()
        if need:
            self.notify()


class VirtioTransport:
    """The kernel's side of one device (see the module docstring); subclasses
    implement how the kernel talks to it."""

    #: A short name of the transport kind ("zmq", "vhost-user").
    kind = ""

    def __init__(
        self,
        name: str,
        spec: DeviceSpec,
        rundir: RuntimeDir,
        *,
        region_size: int | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.rundir = rundir
        self.region_size = region_size
        self.info: DeviceInfo | None = None
        self.features = 0
        self.region: SharedMemory | None = None
        self.memory: FlatMemory | None = None
        self.dma: PageAllocator | None = None
        self.dma_base = 0
        self.dma_size = 0
        self.queues: list[KernelQueue] = []
        self.failed: OSError | None = None
        self.spurious_interrupts = 0
        self._failed_event = Event()
        self._waker: Waker | None = None
        self._thread: Any = None
        self._state_lock = Lock()
        self._stopping = False
        self._closed = False
        self._ring_slot = 0
        self._queue_cap = 0
        self._config_hooks: list[Callable[[], None]] = []
        self._release_hooks: list[Callable[[], None]] = []
        #: Set before :meth:`setup_queue` to trace this device (``kernel.boot(trace=)``).
        self.tracer: Tracer | None = None
        #: Recovery counters (:data:`RECOVERY_COUNTERS`), plain ints.
        self.recovery: dict[str, int] = dict.fromkeys(RECOVERY_COUNTERS, 0)
        self._recovery_req: tuple[str, str] | None = None  # (culprit, why) asked for
        self._recovering = False
        self._recovered = Condition(Lock())
        self._budget_log: list[float] = []  # monotonic times of recent recoveries
        self._next_tick: float | None = None
        #: Hybrid polling on the interrupt thread (:mod:`vdev.virtio.poll`): the
        #: adaptive window after an interrupt (``spec.poll_us`` its bound; 0: off).
        self.poll = PollWindow(spec.poll_us, adaptive=not spec.poll_fixed)
        self._polling = self.poll.enabled
        # queues reaped with interrupts left off, to be polled then armed
        self._unarmed: dict[int, KernelQueue] = {}
        self._armed_at = 0.0  # when the interrupt thread last armed (0: not measuring)
        self._armed = Condition(Lock())  # wait_armed() waits on it
        self._armed_waiters = 0

    # ------------------------------------------------------------------ properties
    @property
    def pid(self) -> int | None:
        """The pid of the process serving the device, if known (else None)."""
        return None

    @property
    def device_id(self) -> int:
        """The virtio device id (after :meth:`get_device_info`)."""
        return self.info.device_id if self.info is not None else 0

    @property
    def feature_names(self) -> list[str]:
        """Negotiated features by name."""
        return feature_names(self.features, self.device_id)

    def has_feature(self, n: int) -> bool:
        """True if feature bit number ``n`` was negotiated."""
        return bool(self.features & bit(n))

    @property
    def queue_cap(self) -> int:
        """Largest queue size :meth:`setup_queue` accepts (after :meth:`setup_memory`)."""
        return self._queue_cap

    def log_tail(self, max_lines: int = 20) -> str:
        """The last lines of the device's log ('' when the kernel has none)."""
        return ""

    def _death_description(self) -> str | None:
        """How the device ended, if the transport can tell it is gone (else None)."""
        return None

    def probe_error(self, reason: str) -> DeviceProbeError:
        """A :class:`DeviceProbeError` for this device, with its log tail and, if it is
        known to be gone, how it ended."""
        how = self._death_description()
        if how and how not in reason:
            reason = f"{reason} [{how}]"
        return DeviceProbeError(self.name, reason, self.log_tail())

    # ------------------------------------------------------------------ per transport
    def launch(self) -> None:
        """Step 1: reach the device (start its process / connect to it)."""
        raise NotImplementedError

    def get_device_info(self) -> DeviceInfo:
        """Step 2: what the device is (sets :attr:`info`)."""
        raise NotImplementedError

    def negotiate(self, choose: Callable[[int], int]) -> int:
        """Step 3: feature negotiation; ``choose(offered)`` returns the driver's wish
        (intersected with the offer). Returns the negotiated mask (:attr:`features`)."""
        raise NotImplementedError

    def read_config(self, size: int, offset: int = 0) -> bytes:
        """``size`` bytes of config space at ``offset``, or :class:`DeviceControlError`."""
        raise NotImplementedError

    def metrics(self) -> dict[str, Any]:
        """The device's own counters (empty when the transport cannot ask for them)."""
        return {}

    def _create_region(self, size: int) -> SharedMemory:
        """Create the memory to share (``size`` bytes, page-aligned)."""
        raise NotImplementedError

    def _hand_over_region(self, region: SharedMemory) -> None:
        """Give ``region`` to the device (guest-physical address 0)."""
        raise NotImplementedError

    def _setup_vring(self, index: int, layout: RingLayout) -> Callable[[], None]:
        """Tell the device about ring ``index`` and return the function that kicks it."""
        raise NotImplementedError

    def _start_device(self) -> None:
        """Step 6, after the interrupt thread runs: let the device go (DRIVER_OK)."""

    def _irq_sources(self) -> list[Pollable]:
        """What the interrupt thread waits on (besides the shutdown Waker)."""
        raise NotImplementedError

    def _collect_interrupts(self, ready: list[object]) -> tuple[list[int], str | None]:
        """After a wake-up (``ready``: the sources that are ready, [] on a timeout):
        the queue indices interrupted (or CONFIG_CHANGE), and a description of the
        device's end if it is gone (else None)."""
        raise NotImplementedError

    def _drain_interrupts(self) -> None:
        """Consume pending interrupts (the device is gone; every queue is reaped)."""

    def _stop_device(self) -> None:
        """Shutdown, best effort, before the interrupt thread stops: make the device
        stop touching the rings (reset, stop the rings)."""

    def _close_channels(self) -> None:
        """Shutdown, after every request failed: close every channel and fd, stop what
        the transport started."""

    def _free_region(self, region: SharedMemory) -> None:
        """Shutdown: release the region (every view of it is gone)."""
        region.close()

    # ------------------------------------------------------------------ bring-up
    def setup_memory(self) -> None:
        """Step 4: create the region (rings first, then the DMA pool) and hand it to
        the device."""
        assert self.info is not None
        cap = min(self.spec.requested_queue_size, self.info.max_queue_size)
        cap = 1 << (cap.bit_length() - 1)  # largest power of two <= cap
        self._queue_cap = cap
        self._ring_slot = _align(RingLayout.total_bytes(cap), PAGE)
        ring_area = self._ring_slot * self.info.num_queues
        if self.region_size is None:
            size = ring_area + _align(self.spec.dma_bytes(cap) or DEFAULT_DMA_BYTES, PAGE)
        else:
            size = _align(int(self.region_size), PAGE)
            if size < ring_area + MIN_DMA_BYTES:
                raise self.probe_error(
                    f"region_size {self.region_size} is too small: the rings need "
                    f"{ring_area} bytes plus at least {MIN_DMA_BYTES} bytes of DMA pool"
                )
        region = self._create_region(size)
        self.region = region
        self._hand_over_region(region)
        self.memory = FlatMemory(region.buf, barrier=full_barrier)
        self.dma_base = ring_area
        self.dma_size = region.size - ring_area
        self.dma = PageAllocator(ring_area, self.dma_size, page=PAGE)

    def setup_queue(self, index: int, size: int) -> KernelQueue:
        """Step 5: build queue ``index`` with ``size`` entries and tell the device.
        Returns the :class:`KernelQueue`."""
        assert self.info is not None and self.memory is not None
        if not 0 <= index < self.info.num_queues:
            raise ValueError(f"{self.name}: queue {index} does not exist")
        if size > self._queue_cap or size < 1 or size & (size - 1):
            raise ValueError(
                f"{self.name}: queue size {size} not a power of 2 <= {self._queue_cap}"
            )
        layout = RingLayout.packed(size, index * self._ring_slot)
        dq = DriverQueue(
            self.memory,
            layout,
            event_idx=self.has_feature(F.EVENT_IDX),
            indirect=self.has_feature(F.INDIRECT_DESC),
        )
        kick = self._setup_vring(index, layout)
        q = KernelQueue(self, index, dq, kick)
        if self.tracer is not None:
            q.enable_trace(self.tracer, self._payload_kind(index))
        while len(self.queues) <= index:
            self.queues.append(None)  # type: ignore[arg-type]
        self.queues[index] = q
        return q

    def _payload_kind(self, index: int) -> str:
        did = self.device_id
        if did == 2:  # virtio-blk (§5.2)
            return "blk"
        if did == 1:  # virtio-net (§5.1): receiveq1 = 0, transmitq1 = 1
            return "net-rx" if index == 0 else "net-tx" if index == 1 else ""
        return ""

    def driver_ok(self) -> None:
        """Step 6: start the interrupt thread, then let the device go."""
        self._waker = Waker()
        self._thread = start_thread(
            self._irq_loop, name=f"irq-{self.name}-{id(self):x}", daemon=True
        )
        self._start_device()

    def on_config_change(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on the interrupt thread after each CONFIG_CHANGE interrupt."""
        self._config_hooks.append(hook)

    def on_release(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` at shutdown just before the region is unmapped (drop every
        view into shared memory there)."""
        self._release_hooks.append(hook)

    # ------------------------------------------------------------------ interrupts
    def _irq_loop(self) -> None:
        assert self._waker is not None
        waker = self._waker
        poller = Poller()
        poller.register(waker)
        sources: list[Pollable] = []
        try:
            while not self._stopping:
                if not sources:
                    sources = self._irq_sources()
                    for src in sources:
                        poller.register(src)
                timeout = 0.0 if self._unarmed else self._poll_timeout()
                ready = poller.poll(timeout)
                if self._stopping:
                    break
                if waker in ready:
                    waker.drain()
                if self._armed_at and not ready and timeout:
                    # woke armed with nothing to do: a long sleep says the device is idle
                    now = monotonic()
                    if self.poll.slept(now - self._armed_at, work=False):
                        self._armed_at = now
                indices, gone = self._collect_interrupts(ready)
                if indices:
                    self._interrupt(indices)
                if gone is None and self._next_tick is not None:
                    now = monotonic()
                    if now >= self._next_tick:
                        self._next_tick = now + TICK_S
                        self._tick(now)
                if gone is None and self._recovery_req is None:
                    if self._unarmed:
                        self._busy_poll()
                    continue
                # the queues are rebuilt (armed) by a recovery, or gone
                self._unarmed.clear()
                self._tell_armed()
                # a recovery may replace the sources (a new process): let go of them
                for src in sources:
                    try:
                        poller.unregister(src)
                    except Exception:
                        pass
                sources = []
                if gone is not None:
                    if not self._device_died(gone):
                        break
                elif not self._recover():
                    if self._death_description() is not None:
                        break
        except Exception:  # the IRQ thread must never die silently
            log.exception("%s: interrupt thread crashed", self.name)
            crash = f"{self.name}: interrupt handler crashed"
            self.fail(io_error(errno.EIO, crash, culprit="device-gone"))
        finally:
            self._unarmed.clear()  # the thread is gone: nobody polls
            self._tell_armed()
            for src in (*sources, waker):
                try:
                    poller.unregister(src)
                except Exception:
                    pass

    def _busy_poll(self) -> None:
        """Hybrid polling (interrupt thread): watch the used rings of the queues reaped
        with interrupts left off, for up to the poll window (a caller woken by the last
        completion typically submits again within it); what arrives is reaped (still
        unarmed) and the loop goes round once more (its sources looked at without
        sleeping). When the window ends empty -- or a queue is being reset or broken --
        the queue is armed: reaped once more with interrupts re-enabled and re-checked
        (§2.7.10), so nothing completed in between is stranded; only then does the
        thread sleep."""
        unarmed = self._unarmed
        for i, q in list(unarmed.items()):
            if q.paused or q.dq.broken is not None:
                del unarmed[i]
                self.service_queue(q)  # arm (and reap what came meanwhile)
        pw = self.poll
        window = pw.window
        if unarmed and window and self.failed is None:
            queues = list(unarmed.values())
            start = now = monotonic()
            deadline = start + window
            while now < deadline and self._recovery_req is None and not self._stopping:
                hit = [q for q in queues if q.dq.has_used()]
                if hit:
                    pw.hit(monotonic() - start)
                    for q in hit:
                        self.service_queue(q, arm=False)
                    return
                relax()
                now = monotonic()
            else:
                pw.miss(now - start)
        for q in unarmed.values():
            self.service_queue(q)
        unarmed.clear()
        self._armed_at = monotonic()
        self._tell_armed()

    def _tell_armed(self) -> None:
        """Wake :meth:`wait_armed` callers (the queues polled have changed)."""
        if self._armed_waiters:
            with self._armed:
                self._armed.notify_all()

    def wait_armed(self, timeout_s: float | None = None) -> bool:
        """Wait until the interrupt thread polls no queue any more -- every queue has
        interrupts armed (§2.7.10), as a driver at rest must -- for at most
        ``timeout_s`` seconds (None: no limit); True if so. Hybrid polling leaves a
        queue unarmed for up to one poll window after its last completion: what
        inspects the rings at rest (tests, ring views) waits for this first."""
        with self._armed:
            self._armed_waiters += 1
            try:
                return self._armed.wait_for(lambda: not self._unarmed, timeout_s)
            finally:
                self._armed_waiters -= 1

    def _poll_timeout(self) -> float:
        """:data:`TICK_S` (at most) while a watched queue has chains in flight, else
        :data:`IDLE_POLL_S`: an idle device costs nothing more than before (one that
        has lost interrupts already is woken every :data:`TICK_S`)."""
        busy = False
        for q in self.queues:
            if q is not None and (q.watch or q.timeout_s is not None):
                dq = q.dq
                if dq is None:
                    continue
                if dq.has_used() if q.watch_used else dq.in_flight:
                    busy = True
                    break
        if not busy:
            self._next_tick = None
            # a device known to lose interrupts is looked at sooner after a submission
            return TICK_S if self.recovery["lost_interrupts_recovered"] else IDLE_POLL_S
        now = monotonic()
        if self._next_tick is None:
            self._next_tick = now + TICK_S
        return max(0.0, self._next_tick - now)

    def _tick(self, now: float) -> None:
        """The periodic check while chains are in flight (interrupt thread): reap
        completions whose interrupt was lost, expire requests older than their queue's
        timeout (then ask for a reset)."""
        for q in self.queues:
            if q is None or q.paused or self.failed is not None:
                continue
            dq = q.dq
            if dq is None or not dq.in_flight or dq.broken is not None:
                continue
            if q.watch:
                if dq.has_used():
                    mark = int.from_bytes(self._ring_word(q.layout.used + 2), "little")
                    if mark == q._lost_mark:
                        # unreaped for a whole tick and no interrupt came: it was lost
                        n = self.service_queue(q)
                        q.lost_interrupts_recovered += n
                        self.recovery["lost_interrupts_recovered"] += n
                        q._lost_mark = -1
                        if n and self.tracer is not None:
                            self.tracer.emit("lost_irq", q.index, reaped=n)
                    else:
                        q._lost_mark = mark
                else:
                    q._lost_mark = -1
            if q.timeout_s is not None:
                self._expire(q, now)

    def _ring_word(self, addr: int) -> bytes:
        mem = self.memory
        if mem is None:
            return b"\xff\xff"
        return bytes(mem.view(addr, 2))

    def _expire(self, q: KernelQueue, now: float) -> None:
        """Tell the callers of chains older than ``q.timeout_s`` that they timed out
        (ETIMEDOUT, culprit "timeout") and ask for a reset: their buffers stay the
        device's until the reset is done (``on_reset`` gives them back)."""
        limit = q.timeout_s
        assert limit is not None
        expired: list[Any] = []
        with q.lock:
            dq = q.dq
            if dq is None or q.paused:
                return
            seen = q._seen
            for head, rec in enumerate(dq._inflight):
                if rec is None:
                    seen[head] = None
                    continue
                s = seen[head]
                if s is None or s[0] is not rec:
                    seen[head] = (rec, now)  # first seen in flight now
                elif now - s[1] >= limit:
                    expired.append(rec.token)
        if not expired:
            return
        err = io_error(
            errno.ETIMEDOUT,
            f"{self.name}: the device did not complete the request within {limit:g} s",
            culprit="timeout",
        )
        self.recovery["timeouts"] += len(expired)
        for token in expired:
            expire = getattr(token, "expire", None)
            if expire is not None:
                try:
                    expire(copy_error(err))
                except Exception:
                    log.exception("%s: expire callback failed", self.name)
        self.request_recovery(
            "timeout", f"{len(expired)} request(s) on queue {q.index} timed out after {limit:g} s"
        )

    def _interrupt(self, indices: list[int]) -> None:
        nq = len(self.queues)
        for i in sorted(set(indices)):
            if i == CONFIG_CHANGE:
                if self.tracer is not None:
                    self.tracer.emit("config")
                self._config_changed()
            elif 0 <= i < nq and self.queues[i] is not None:
                q = self.queues[i]
                if self._polling and q.pollable:
                    if self._armed_at:  # the first interrupt since arming: learn
                        self.poll.slept(monotonic() - self._armed_at, work=True)
                        self._armed_at = 0.0
                    if self.poll.window:
                        self.service_queue(q, interrupt=True, arm=False)
                        self._unarmed[i] = q  # _busy_poll watches it or arms it
                        continue
                    self.service_queue(q, interrupt=True)
                    self._armed_at = monotonic()
                else:
                    self.service_queue(q, interrupt=True)
            else:
                self.spurious_interrupts += 1

    def service_queue(self, q: KernelQueue, *, interrupt: bool = False, arm: bool = True) -> int:
        """Reap queue ``q`` (disable → reap → re-enable → re-check), then run the
        completions and the queue's ``refill`` hook outside the lock. Returns how many
        requests completed. Runs on the interrupt thread (or by a poller).

        ``arm=False`` (hybrid polling, interrupt thread only): reap what is there and
        leave interrupts off; the caller must arm the queue -- call again with ``arm``
        -- before it sleeps."""
        if q.paused:  # being reset: its chains are off the ring
            return 0
        if q.tracer is not None:  # the one test per batch that tracing costs
            return self._service_queue_traced(q, interrupt, arm)
        dq = q.dq
        batch: list[tuple[Any, int]] = []
        with q.lock:
            if self.failed is not None or q.paused:
                return 0
            try:
                dq.disable_interrupts()
                # Nobody can add while we hold the lock, so each round reaps at least
                # one of the <= N chains in flight: N + 1 rounds always reach the end
                # (leaving early would strand used entries behind a stale used_event).
                for _ in range(dq.size + 1):
                    batch += dq.get_used()
                    if dq.broken is not None or not arm or not dq.enable_interrupts():
                        break
            except DeviceSpecError:
                pass
            if interrupt:
                dq.note_interrupt(len(batch))
            elif batch:
                dq.note_polled(len(batch))
            broken = dq.broken
        return self._finish_batch(q, batch, broken)

    def _finish_batch(self, q: KernelQueue, batch: list[tuple[Any, int]], broken: object) -> int:
        # While completions run, submissions (typically the callbacks resubmitting) only
        # add chains; refill() publishes them all at once afterwards: one kick decision
        # per batch instead of one per request.
        q.completing = True
        refill = q.refill if broken is None else None
        try:
            for n, (token, used_len) in enumerate(batch, 1):
                try:
                    token.complete(used_len)
                except Exception:
                    log.exception("%s: completion callback failed", self.name)
                if refill is not None and not n % REFILL_EVERY and n < len(batch):
                    # hand the device what was resubmitted so far: it works on those
                    # while the rest of the batch completes (no ping-pong)
                    try:
                        refill()
                    except Exception:
                        log.exception("%s: queue refill failed", self.name)
        finally:
            q.completing = False
        if broken is not None:
            self.request_recovery("device-broke-ring", f"queue {q.index} is broken: {broken}")
        elif q.refill is not None:
            try:
                q.refill()
            except Exception:
                log.exception("%s: queue refill failed", self.name)
        return len(batch)

    def _service_queue_traced(self, q: KernelQueue, interrupt: bool, arm: bool = True) -> int:
        """:meth:`service_queue` with ``irq_recv``, one ``reap`` event per entry and
        ``irq_mode`` (what it writes to used_event / avail.flags) -- the same reaping,
        the same order; the payload is read before the completion callback frees its
        buffer."""
        tracer = q.tracer
        assert tracer is not None
        dq = q.dq
        batch: list[tuple[Any, int]] = []
        with q.lock:
            if self.failed is not None or q.paused:
                return 0
            # what the driver writes (§2.7.10): avail.flags NO_INTERRUPT, or nothing when
            # disabling; used_event = its last-seen used index, or flags 0, when enabling
            used_event_at = q.layout.avail + 4 + 2 * q.size
            try:
                dq.disable_interrupts()
                if dq.event_idx:
                    tracer.emit("irq_mode", q.index, on=False)
                else:
                    tracer.emit("irq_mode", q.index, on=False, flags=1)
                for _ in range(dq.size + 1):  # bounded as in service_queue
                    batch += dq.get_used()
                    if dq.broken is not None or not arm:
                        break
                    more = dq.enable_interrupts()
                    if dq.event_idx:
                        word = q._read(used_event_at, 2)
                        used_event = int.from_bytes(word, "little") if len(word) == 2 else None
                        tracer.emit("irq_mode", q.index, on=True, used_event=used_event)
                    else:
                        tracer.emit("irq_mode", q.index, on=True, flags=0)
                    if not more:
                        break
            except DeviceSpecError:
                pass
            if interrupt:
                dq.note_interrupt(len(batch))
            elif batch:
                dq.note_polled(len(batch))
            broken = dq.broken
            if interrupt:
                tracer.emit("irq_recv", q.index, reaped=len(batch))
            flight = q._tflight
            kind = q._tkind
            now = tracer.clock()
            for token, used_len in batch:
                rec = flight.pop(id(token), None)
                if rec is None:
                    tracer.emit("reap", q.index, len=used_len)
                    continue
                seq, head, t_add, status_addr, rx_addr = rec
                payload: dict[str, Any] | None = None
                extra: dict[str, Any] = {}
                if kind == "blk" and status_addr:
                    payload = {"status": decode_blk_status(q._read(status_addr, 1))}
                elif kind == "net-rx" and q._tmerge_left:
                    # a further buffer of a merged packet (MRG_RXBUF): no header of its own
                    q._tmerge_left -= 1
                    payload = {"cont": True}
                    if rx_addr and used_len:
                        extra["frame_hex"] = q._read(rx_addr, min(used_len, FRAME_CAP)).hex()
                        extra["frame_len"] = used_len
                elif kind == "net-rx" and rx_addr and used_len:
                    data = q._read(rx_addr, min(used_len, 12 + FRAME_CAP))
                    hdr = decode_net_hdr(data[:12])
                    payload = {"net": hdr, "frame": summarize_frame(data[12:])}
                    extra["frame_hex"] = data[12:].hex()
                    extra["frame_len"] = max(0, used_len - 12)
                    nbufs = hdr.get("num_buffers", 1)
                    if self.has_feature(NetF.MRG_RXBUF) and isinstance(nbufs, int) and nbufs > 1:
                        q._tmerge_left = min(nbufs, q.size) - 1
                tracer.emit(
                    "reap",
                    q.index,
                    seq,
                    head,
                    len=used_len,
                    lat_ns=now - t_add,
                    payload=payload,
                    **extra,
                )
            if broken is not None:
                tracer.emit("ring_broken", q.index, why=str(broken))
        return self._finish_batch(q, batch, broken)

    def _config_changed(self) -> None:
        """A CONFIG_CHANGE interrupt: run the drivers' hooks (transports that have a
        status byte check DEVICE_NEEDS_RESET first)."""
        for hook in self._config_hooks:
            try:
                hook()
            except Exception:
                log.exception("%s: config-change hook failed", self.name)

    def _device_died(self, how: str) -> bool:
        """The device is gone (interrupt thread): reap what it completed, then restart
        it (policy "restart", budget left) or fail it. True if it is back."""
        # Whatever the device completed before it died is real: reap it first.
        try:
            self._drain_interrupts()
        except (TransportError, OSError, ValueError):
            pass
        for q in self.queues:
            if q is not None:
                self.service_queue(q)
        with self._state_lock:
            self._recovery_req = ("device-gone", how)
        return self._recover()

    # ------------------------------------------------------------------ recovery
    def request_recovery(self, culprit: str, why: str) -> None:
        """Ask the interrupt thread to reset (or restart) the device: it broke the ring
        protocol or set DEVICE_NEEDS_RESET (``culprit`` "device-broke-ring"), a request
        timed out ("timeout"), it died ("device-gone"). Thread-safe; the first request
        wins until the recovery has run."""
        with self._state_lock:
            if self.failed is not None or self._recovery_req is not None:
                return
            self._recovery_req = (culprit, why)
        if culprit == "device-broke-ring":
            self.recovery["ring_breaks"] += 1
        if not self.in_interrupt() and self._waker is not None:
            try:
                self._waker.wake()
            except Exception:
                pass

    @property
    def recovering(self) -> bool:
        """True while the device is being reset or restarted."""
        return self._recovering

    def wait_recovered(self, count: int, timeout_s: float | None = None) -> bool:
        """Block until :attr:`recovery` ``["recoveries"]`` reaches ``count`` (True), the
        device fails or ``timeout_s`` passes (False)."""
        with self._recovered:
            return self._recovered.wait_for(
                lambda: self.recovery["recoveries"] >= count or self.failed is not None,
                timeout_s,
            ) and (self.recovery["recoveries"] >= count)

    def _can_recover(self) -> bool:
        """Whether this transport can reset / restart its device (subclasses)."""
        return False

    def _reinit_device(self, restart: bool) -> bool:
        """Reset the device (``restart``: start a new process first) and bring it up
        again with the same features, memory and rings (:meth:`_rebuild_queues`);
        raises on failure; True if the process was restarted. Subclasses that can
        recover implement it."""
        raise NotImplementedError

    def _budget_left(self) -> bool:
        n, window = getattr(self.spec, "restart_budget", (0, 60.0))
        now = monotonic()
        self._budget_log = [t for t in self._budget_log if now - t < window]
        return len(self._budget_log) < n

    def _recover(self) -> bool:
        """Run the recovery asked for (interrupt thread): take every in-flight chain
        off the rings, reset / restart the device (§3.1.1 again) and hand the chains
        back to their drivers (``on_reset``). Without the "restart" policy, a driver
        that cannot take its chains back, a transport that cannot recover, or budget,
        the device fails for good. True if the device is live again."""
        req = self._recovery_req
        if req is None:
            return True
        culprit, why = req
        policy = getattr(self.spec, "on_device_death", "fail")
        queues = [q for q in self.queues if q is not None]
        reason = ""
        if policy != "restart":
            reason = "on_device_death='fail'"
        elif not self._can_recover():
            reason = f"the {self.kind or 'this'} transport cannot restart its device"
        elif any(q.on_reset is None for q in queues):
            reason = "its driver cannot resubmit"
        elif culprit == "device-gone" and not getattr(self.spec, "restartable", True):
            reason = "its state died with its process"
        elif not self._budget_left():
            n, window = getattr(self.spec, "restart_budget", (0, 60.0))
            reason = f"restart budget of {n} per {window:g} s exhausted"
        if reason:
            self._give_up(culprit, why, reason)
            return False
        if self._stopping:
            self._give_up("shutdown", why, "kernel shutting down")
            return False
        self._recovering = True
        if self.tracer is not None:
            self.tracer.emit("recover", culprit=culprit, why=why)
        log.warning("%s: %s: resetting the device", self.name, why)
        held: list[list[Any]] = []
        for q in queues:
            with q.lock:
                q.paused = True
                held.append(q.dq.abandon() if q.dq is not None else [])
        restart = culprit == "device-gone"
        last_error = ""
        try:
            while True:
                self._budget_log.append(monotonic())
                try:
                    restart = self._reinit_device(restart)
                    break
                except Exception as e:  # noqa: BLE001 - any failure: try again or give up
                    self.recovery["recovery_failures"] += 1
                    last_error = f"{type(e).__name__}: {e}"
                    log.warning("%s: recovery failed: %s", self.name, last_error)
                    restart = True
                    if self._stopping or not self._budget_left():
                        raise
        except Exception:
            self._recovering = False
            for q in queues:
                with q.lock:
                    q.paused = False
            if self._stopping:
                self._give_up("shutdown", why, "kernel shutting down", held)
            else:
                self._give_up(
                    "device-gone",
                    f"{why}; recovery failed ({last_error})",
                    "restart budget exhausted",
                    held,
                )
            return False
        if self._stopping or self.failed is not None:
            self._recovering = False
            self._give_up("shutdown", why, "kernel shutting down", held)
            return False
        with self._state_lock:
            self._recovery_req = None
        self.recovery["restarts" if restart else "resets"] += 1
        resubmit = culprit in ("device-gone", "timeout")
        error = None
        if not resubmit:
            error = io_error(errno.EIO, f"{self.name}: {why}", culprit=culprit)
        for q, tokens in zip(queues, held, strict=True):
            with q.lock:
                q.paused = False
                q._seen = [None] * q.size
                q._lost_mark = -1
            if resubmit:
                self.recovery["requests_resubmitted"] += len(tokens)
            else:
                self.recovery["requests_failed_on_reset"] += len(tokens)
            assert q.on_reset is not None
            try:
                q.on_reset(tokens, error)  # also with none: a driver may replay state
            except Exception:
                log.exception("%s: on_reset hook failed", self.name)
        for q in queues:
            if q.refill is not None:
                try:
                    q.refill()
                except Exception:
                    log.exception("%s: queue refill failed", self.name)
        self._recovering = False
        with self._recovered:
            self.recovery["recoveries"] += 1
            self._recovered.notify_all()
        if self.tracer is not None:
            self.tracer.emit("recovered", restart=restart, pid=self.pid)
        return True

    def _give_up(
        self, culprit: str, why: str, reason: str, held: list[list[Any]] | None = None
    ) -> None:
        code = errno.ETIMEDOUT if culprit == "timeout" else errno.EIO
        err = io_error(code, f"{self.name}: {why} ({reason})", culprit=culprit)
        self.fail(err)
        for tokens in held or ():
            for t in tokens:
                try:
                    t.fail(copy_error(err))
                except Exception:
                    log.exception("%s: failure callback failed", self.name)
        with self._state_lock:
            self._recovery_req = None
        with self._recovered:
            self._recovered.notify_all()

    def _rebuild_queues(self) -> None:
        """For :meth:`_reinit_device`: a fresh ring for every queue at the same place
        (zeroed; the DMA buffers stay where they are), told to the device again. The
        queues stay paused; their counters go on."""
        assert self.memory is not None
        for q in self.queues:
            if q is None:
                continue
            dq = DriverQueue(
                self.memory,
                q.layout,
                event_idx=self.has_feature(F.EVENT_IDX),
                indirect=self.has_feature(F.INDIRECT_DESC),
            )
            dq.stats = q._stats  # cumulative across resets
            dq.delayed_interrupts = q._delayed
            kick = self._setup_vring(q.index, q.layout)
            with q.lock:
                q.dq = dq
                q._kick = kick
                q._tseq = q._tpub = 0
                q._tflight.clear()
                q._tmerge_left = 0

    def check_info(self, info: DeviceInfo) -> None:
        """Kernel-side caps on what the device reports (probe): at most
        :data:`MAX_QUEUES` queues of at most :data:`MAX_QUEUE_SIZE` entries."""
        if not 1 <= info.num_queues <= MAX_QUEUES:
            raise self.probe_error(
                f"device reports num_queues {info.num_queues} (the kernel takes 1..{MAX_QUEUES})"
            )
        if not 1 <= info.max_queue_size <= MAX_QUEUE_SIZE:
            raise self.probe_error(
                f"device reports max_queue_size {info.max_queue_size} (§2.7: 1..{MAX_QUEUE_SIZE})"
            )

    def wait_failed(self, timeout_s: float | None = None) -> OSError | None:
        """Block until the device has failed (died, needs reset, broke the ring rules,
        shut down) or ``timeout_s`` passed; returns :attr:`failed`."""
        self._failed_event.wait(timeout_s)
        return self.failed

    def in_interrupt(self) -> bool:
        """True when called on this device's interrupt thread (completion callbacks
        run there and must not block on I/O of the same device)."""
        t = self._thread
        return t is not None and t.name == current_thread_name()

    def fail(self, error: OSError) -> None:
        """Mark the device failed (once) and fail every in-flight request with a copy
        of ``error``; later requests are refused by the drivers with it."""
        with self._state_lock:
            if self.failed is not None:
                return
            self.failed = error
        if culprit_of(error) is None:
            error.culprit = "device-gone"  # type: ignore[attr-defined]
        self._failed_event.set()
        with self._recovered:
            self._recovered.notify_all()
        if self.tracer is not None:
            self.tracer.emit("fail", error=str(error), culprit=culprit_of(error))
        for q in self.queues:
            if q is None:
                continue
            with q.lock:
                tokens = q.dq.abandon() if q.dq is not None else []
            for t in tokens:
                try:
                    t.fail(copy_error(error))
                except Exception:
                    log.exception("%s: failure callback failed", self.name)
            if q.on_failed is not None:
                try:
                    q.on_failed(error)
                except Exception:
                    log.exception("%s: on_failed hook failed", self.name)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop the device (best effort), stop the interrupt thread, fail whatever is
        still in flight, close every channel and release the region. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._stop_device()
        except Exception:
            log.debug("%s: stopping the device failed", self.name, exc_info=True)
        self._stopping = True
        if self._waker is not None:
            try:
                self._waker.wake()
            except Exception:
                pass
        if self._thread is not None and not self.in_interrupt():
            self._thread.join(IRQ_JOIN_TIMEOUT_S)
        self.fail(io_error(errno.EIO, f"{self.name}: kernel shut down", culprit="shutdown"))
        if self._waker is not None:
            try:
                self._waker.close()
            except Exception:
                pass
            self._waker = None
        try:
            self._close_channels()
        except Exception:
            log.debug("%s: closing the channels failed", self.name, exc_info=True)
        self._release_region()

    def _release_region(self) -> None:
        region = self.region
        if region is None:
            return
        # Drop every view into the mapping we hold so it can be unmapped.
        for hook in self._release_hooks:
            try:
                hook()
            except Exception:
                log.debug("%s: release hook failed", self.name, exc_info=True)
        for q in self.queues:
            if q is not None:
                q.dq = None  # type: ignore[assignment]
        self.memory = None
        self.dma = None
        try:
            self._free_region(region)
        except Exception:
            log.debug("%s: region close failed (views still exported?)", self.name, exc_info=True)
