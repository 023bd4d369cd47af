"""The client side of one virtio device: control session, shared memory, queues, IRQs.

Theory of operation
-------------------
:class:`VirtioTransport` is what a PCI function is to a Linux driver: everything the
kernel knows about one device process, and the only object that talks to it.

Bring-up follows virtio §3.1.1 and the project's control session exactly:

1. :meth:`~VirtioTransport.launch` binds the *call* doorbell listener
   (``<rundir>/<name>.call``), starts ``python -m vdev <kind> ... --control
   ipc://<rundir>/<name>.ctl`` under supervision (its log in ``<rundir>/<name>.log``)
   and connects the control client;
2. :meth:`~VirtioTransport.get_device_info` waits (up to 15 s: process start-up) for
   GET_DEVICE_INFO;
3. :meth:`~VirtioTransport.negotiate`: RESET, ACKNOWLEDGE, DRIVER, GET_FEATURES, the
   driver's choice (must contain VERSION_1), SET_FEATURES, FEATURES_OK, re-read status;
4. :meth:`~VirtioTransport.setup_memory` creates the shared region, hands it over with
   SET_MEM_TABLE and unlinks its name at once (leak-proof from then on);
5. the driver reads config space (:meth:`~VirtioTransport.read_config`) and sets up its
   queues (:meth:`~VirtioTransport.setup_queue`: NUM, ADDR, BASE, KICK, CALL, ENABLE);
6. :meth:`~VirtioTransport.driver_ok` starts the interrupt thread and sets DRIVER_OK.

Region layout (guest-physical address == offset in the region)::

    0                     ring_slot            num_queues*ring_slot          size
    | ring 0 (desc|avail|used) | ring 1 | ...  | DMA pool (PageAllocator) ... |

The interrupt thread
--------------------
One thread per device waits on three things at once through a ``hostops`` Poller: the
call doorbell listener (the device's interrupts: a u16 queue index each), the device
process itself (a pidfd: death is noticed the moment it happens, not guessed from a
timeout), and a Waker (shutdown). For an interrupt on queue *i* it runs the
disable → reap → re-enable → re-check loop (:meth:`DriverQueue.get_used` /
:meth:`DriverQueue.enable_interrupts`) under the queue lock, then -- with the lock
released -- calls each request's completion and the queue's ``refill`` hook (the
driver's software queue dispatches into the room just freed). Call index 0xFFFF
(``CONFIG_CHANGE``) makes it GET_STATUS; DEVICE_NEEDS_RESET marks the device broken.

Failure
-------
When the device dies, sets DEVICE_NEEDS_RESET, or breaks the ring rules
(:class:`DeviceSpecError`), :meth:`VirtioTransport.fail` records the error once,
abandons every queue (:meth:`DriverQueue.abandon`) and fails each in-flight request
with its own ``OSError(EIO)``; submitters check :attr:`VirtioTransport.failed` under the
queue lock, so a request is either abandoned or refused -- never lost in between.
Completions the device published before dying are still reaped first: that data was
really transferred.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hostops.barrier import full_barrier
from hostops.control import ControlClient
from hostops.doorbell import Doorbell, DoorbellListener
from hostops.errors import ChannelTimeout, TransportError
from hostops.poll import Poller, Waker
from hostops.process import DeviceProcess
from hostops.rundir import RuntimeDir
from hostops.shm import PageAllocator, SharedRegion
from hostops.sync import Event, Lock, current_thread_name, start_thread
from vdev.virtio import (
    DeviceSpecError,
    DriverQueue,
    DriverQueueStats,
    F,
    FlatMemory,
    ProtocolError,
    RingLayout,
    Status,
    bit,
    feature_names,
)
from vdev.virtio.control import CONFIG_CHANGE, RemoteError, decode_reply, encode_request
from vdev.virtio.status import describe_status

from .errors import DeviceControlError, DeviceGoneError, DeviceProbeError, io_error
from .specs import DeviceSpec

__all__ = [
    "Completion",
    "DeviceInfo",
    "KernelQueue",
    "VirtioTransport",
    "DEFAULT_DMA_BYTES",
    "PAGE",
]

log = logging.getLogger(__name__)

PAGE = 4096
#: DMA pool size of a device region when ``region_size`` is not given.
DEFAULT_DMA_BYTES = 8 << 20
#: Smallest DMA pool accepted when ``region_size`` is given.
MIN_DMA_BYTES = 256 << 10
#: First GET_DEVICE_INFO: the device process is still starting up.
STARTUP_TIMEOUT_S = 15.0
CONTROL_TIMEOUT_S = 5.0
RESET_TIMEOUT_S = 1.0


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


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """GET_DEVICE_INFO: what the device says it is."""

    device_id: int
    num_queues: int
    max_queue_size: int
    name: str


class KernelQueue:
    """One virtqueue as the kernel uses it: a :class:`DriverQueue` plus the lock that
    serialises every touch of it, the kick doorbell and the driver's hooks.

    Drivers call :meth:`add` and :meth:`publish` with :attr:`lock` held, then
    :meth:`notify` with it released (a doorbell is a syscall: never hold a lock over
    one). ``refill`` (set by the driver) runs on the interrupt thread after each batch
    of completions and must publish what was added meanwhile; ``on_failed`` runs once
    when the device fails.
    """

    def __init__(
        self,
        transport: VirtioTransport,
        index: int,
        dq: DriverQueue,
        doorbell: Doorbell,
    ) -> None:
        self.transport = transport
        self.index = index
        self.dq = dq
        self.layout: RingLayout = dq.layout
        self.size: int = dq.size
        self.lock = Lock()
        self._stats = dq.stats
        self._doorbell = doorbell
        self.refill: Callable[[], None] | None = None
        #: True while the interrupt thread runs a batch of completions; submitters then
        #: leave publishing to ``refill`` (which runs right after the batch).
        self.completing = False
        self.on_failed: Callable[[OSError], None] | None = None

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
        """Ring the kick doorbell of this queue (thread-safe; no lock needed)."""
        try:
            self._doorbell.ring(self.index)
        except TransportError as e:
            log.debug("%s: kick on queue %d failed: %s", self.transport.name, self.index, e)

    def kick(self) -> None:
        """Publish and notify if needed (takes the lock itself; nothing once the
        device has failed)."""
        with self.lock:
            if self.failed is not None:
                return
            need = self.publish()
        if need:
            self.notify()


class VirtioTransport:
    """The kernel's side of one device process (see the module docstring)."""

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
        self.proc: DeviceProcess | None = None
        self.region: SharedRegion | None = None
        self.memory: FlatMemory | None = None
        self.dma: PageAllocator | None = None
        self.dma_base = 0
        self.dma_size = 0
        self.queues: list[KernelQueue] = []
        self.failed: OSError | None = None
        self._failed_event = Event()
        self.log_path = os.path.join(rundir.path, f"{name}.log")
        self._ctl_ep = rundir.endpoint(f"{name}.ctl")
        self._call_ep = rundir.endpoint(f"{name}.call")
        self._kick_ep = rundir.endpoint(f"{name}.kick")
        self._client: ControlClient | None = None
        self._call: DoorbellListener | None = None
        self._kick: Doorbell | None = None
        self._waker: Waker | None = None
        self._thread: Any = None
        self._state_lock = Lock()
        self._stopping = False
        self._closed = False
        self._unlinked = False
        self._ring_slot = 0
        self._queue_cap = 0
        self._config_hooks: list[Callable[[], None]] = []
        self._release_hooks: list[Callable[[], None]] = []
        self.spurious_interrupts = 0

    # ------------------------------------------------------------------ properties
    @property
    def pid(self) -> int | None:
        """The device process id (None before launch)."""
        return self.proc.pid if self.proc is not None else None

    @property
    def device_id(self) -> int:
        """The virtio device id reported by GET_DEVICE_INFO."""
        return self.info.device_id if self.info is not None else 0

    @property
    def feature_names(self) -> list[str]:
        """Negotiated features by name."""
        return feature_names(self.features, self.device_id)

    def has_feature(self, n: int) -> bool:
        """True if feature bit number ``n`` was negotiated."""
        return bool(self.features & bit(n))

    # ------------------------------------------------------------------ control
    def call(
        self, type_: str, *, timeout_s: float = CONTROL_TIMEOUT_S, **fields: Any
    ) -> dict[str, Any]:
        """One control request; returns the reply's fields. Raises
        :class:`DeviceControlError` when the device refuses (its message included) and
        :class:`DeviceGoneError` when the channel breaks (process died, timeout)."""
        if self._client is None:
            raise DeviceGoneError(self.name, type_, "not connected")
        payload = encode_request(type_, **fields)
        try:
            raw = self._client.call(payload, timeout_s=timeout_s)
        except ChannelTimeout as e:
            raise DeviceGoneError(self.name, type_, f"no reply in {timeout_s:g} s: {e}") from e
        except TransportError as e:
            raise DeviceGoneError(self.name, type_, self._gone_cause(e)) from e
        try:
            return decode_reply(raw)
        except RemoteError as e:
            raise DeviceControlError(self.name, type_, e.code, e.message) from None
        except ProtocolError as e:
            raise DeviceControlError(self.name, type_, e.code, f"bad reply: {e.message}") from None

    def _gone_cause(self, e: BaseException) -> str:
        proc = self.proc
        if proc is not None and not proc.alive():
            return f"device process {proc.exit_description()}"
        return f"{type(e).__name__}: {e}"

    def log_tail(self, max_lines: int = 20) -> str:
        """The last lines of the device process's log ('' if there is none)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                n = f.tell()
                f.seek(max(0, n - 8192))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-max_lines:])

    def probe_error(self, reason: str) -> DeviceProbeError:
        """A :class:`DeviceProbeError` for this device, with its log tail and, if the
        process is dead, how it ended."""
        proc = self.proc
        if proc is not None and not proc.alive():
            how = f"device process {proc.exit_description()}"
            if how not in reason:
                reason = f"{reason} [{how}]"
        return DeviceProbeError(self.name, reason, self.log_tail())

    # ------------------------------------------------------------------ bring-up
    def launch(self) -> None:
        """Step 1: bind the call listener, start the device process, connect control."""
        self._call = DoorbellListener(self._call_ep)
        argv = self.spec.argv(self._ctl_ep)
        self.proc = DeviceProcess.launch(argv, name=self.name, log_path=self.log_path)
        self._client = ControlClient(self._ctl_ep, peer_alive=self.proc.alive)

    def get_device_info(self) -> DeviceInfo:
        """Step 2: GET_DEVICE_INFO (waits for the process to start up)."""
        r = self.call("GET_DEVICE_INFO", timeout_s=STARTUP_TIMEOUT_S)
        try:
            info = DeviceInfo(
                int(r["device_id"]),
                int(r["num_queues"]),
                int(r["max_queue_size"]),
                str(r["name"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise self.probe_error(f"malformed GET_DEVICE_INFO reply {r!r}: {e}") from None
        if info.num_queues < 1 or info.max_queue_size < 1:
            raise self.probe_error(f"device reports no usable queue: {info}")
        self.info = info
        return info

    def negotiate(self, choose: Callable[[int], int]) -> int:
        """Step 3: status and feature negotiation; ``choose(offered)`` returns the
        driver's wish (intersected with the offer here). Returns the negotiated mask."""
        self.call("RESET_DEVICE")
        status = Status.ACKNOWLEDGE
        self.call("SET_STATUS", status=int(status))
        status |= Status.DRIVER
        self.call("SET_STATUS", status=int(status))
        offered = int(self.call("GET_FEATURES")["features"])
        wanted = int(choose(offered)) & offered
        if not wanted & bit(F.VERSION_1):
            self._set_failed_status()
            raise self.probe_error(
                "the device does not offer VIRTIO_F_VERSION_1 (legacy devices are not "
                f"supported); offered: {', '.join(feature_names(offered, self.device_id))}"
            )
        self.call("SET_FEATURES", features=wanted)
        status |= Status.FEATURES_OK
        self.call("SET_STATUS", status=int(status))
        got = int(self.call("GET_STATUS")["status"])
        if not got & Status.FEATURES_OK:
            self._set_failed_status()
            raise self.probe_error(
                "the device did not accept the features "
                f"{', '.join(feature_names(wanted, self.device_id))} "
                f"(status {describe_status(got)})"
            )
        self.features = wanted
        return wanted

    def _set_failed_status(self) -> None:
        try:
            self.call("SET_STATUS", status=int(Status.FAILED), timeout_s=RESET_TIMEOUT_S)
        except (DeviceControlError, DeviceGoneError):
            pass

    def setup_memory(self) -> None:
        """Step 4: create the region (rings first, then the DMA pool), hand it to the
        device with SET_MEM_TABLE and unlink its name as soon as the device has it."""
        assert self.info is not None
        cap = min(self.spec.requested_queue_size, self.info.max_queue_size)
        cap = 1 << (cap.bit_length() - 1)  # largest power of two <= cap
        self._queue_cap = cap
        self._ring_slot = _align(RingLayout.total_bytes(cap), PAGE)
        ring_area = self._ring_slot * self.info.num_queues
        if self.region_size is None:
            size = ring_area + DEFAULT_DMA_BYTES
        else:
            size = _align(int(self.region_size), PAGE)
            if size < ring_area + MIN_DMA_BYTES:
                raise self.probe_error(
                    f"region_size {self.region_size} is too small: the rings need "
                    f"{ring_area} bytes plus at least {MIN_DMA_BYTES} bytes of DMA pool"
                )
        region = SharedRegion.create(size, tag=self.name)
        self.region = region
        self.call(
            "SET_MEM_TABLE",
            regions=[{"guest_addr": 0, "size": region.size, "shm": region.name}],
        )
        region.unlink()
        self._unlinked = True
        self.memory = FlatMemory(region.buf, barrier=full_barrier)
        self.dma_base = ring_area
        self.dma_size = region.size - ring_area
        self.dma = PageAllocator(ring_area, self.dma_size, page=PAGE)

    @property
    def queue_cap(self) -> int:
        """Largest queue size :meth:`setup_queue` accepts (after :meth:`setup_memory`)."""
        return self._queue_cap

    def read_config(self, size: int, offset: int = 0) -> bytes:
        """Step 5: GET_CONFIG; exactly ``size`` bytes or :class:`DeviceControlError`."""
        data = bytes(self.call("GET_CONFIG", offset=offset, size=size)["data"])
        if len(data) != size:
            raise DeviceControlError(
                self.name, "GET_CONFIG", "BAD_REPLY", f"asked {size} bytes, got {len(data)}"
            )
        return data

    def setup_queue(self, index: int, size: int) -> KernelQueue:
        """Step 6: build queue ``index`` with ``size`` entries and tell the device
        (SET_VRING_NUM/ADDR/BASE/KICK/CALL/ENABLE). Returns the :class:`KernelQueue`."""
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
        self.call("SET_VRING_NUM", index=index, num=size)
        self.call(
            "SET_VRING_ADDR", index=index, desc=layout.desc, avail=layout.avail, used=layout.used
        )
        self.call("SET_VRING_BASE", index=index, base=0)
        self.call("SET_VRING_KICK", index=index, endpoint=self._kick_ep)
        self.call("SET_VRING_CALL", index=index, endpoint=self._call_ep)
        self.call("SET_VRING_ENABLE", index=index, enable=True)
        if self._kick is None:
            self._kick = Doorbell(self._kick_ep)
        q = KernelQueue(self, index, dq, self._kick)
        while len(self.queues) <= index:
            self.queues.append(None)  # type: ignore[arg-type]
        self.queues[index] = q
        return q

    def driver_ok(self) -> None:
        """Step 7: start the interrupt thread, then SET_STATUS ...|DRIVER_OK."""
        self._waker = Waker()
        self._thread = start_thread(
            self._irq_loop, name=f"irq-{self.name}-{id(self):x}", daemon=True
        )
        status = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
        self.call("SET_STATUS", status=int(status))

    def on_config_change(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on the interrupt thread after each CONFIG_CHANGE interrupt."""
        self._config_hooks.append(hook)

    def on_release(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` at shutdown just before the region is unmapped (drop every
        view into shared memory there)."""
        self._release_hooks.append(hook)

    def metrics(self) -> dict[str, Any]:
        """GET_METRICS: ``{"device": {...}, "queues": [{...}, ...]}``."""
        return self.call("GET_METRICS")

    # ------------------------------------------------------------------ interrupts
    def _irq_loop(self) -> None:
        assert self._call is not None and self._waker is not None and self.proc is not None
        call, waker, proc = self._call, self._waker, self.proc
        poller = Poller()
        poller.register(call)
        poller.register(proc)
        poller.register(waker)
        try:
            while not self._stopping:
                ready = poller.poll(1.0)
                if self._stopping:
                    break
                if waker in ready:
                    waker.drain()
                indices = call.recv_all()
                if indices:
                    self._interrupt(indices)
                if (proc in ready or not ready) and not proc.alive():
                    self._device_died()
                    break
        except Exception:  # the IRQ thread must never die silently
            log.exception("%s: interrupt thread crashed", self.name)
            self.fail(io_error(errno.EIO, f"{self.name}: interrupt handler crashed"))
        finally:
            try:
                poller.unregister(call)
                poller.unregister(proc)
                poller.unregister(waker)
            except Exception:
                pass
            close = getattr(poller, "close", None)
            if close is not None:
                close()

    def _interrupt(self, indices: list[int]) -> None:
        nq = len(self.queues)
        for i in sorted(set(indices)):
            if i == CONFIG_CHANGE:
                self._config_changed()
            elif i < nq and self.queues[i] is not None:
                self.service_queue(self.queues[i], interrupt=True)
            else:
                self.spurious_interrupts += 1

    def service_queue(self, q: KernelQueue, *, interrupt: bool = False) -> int:
        """Reap queue ``q`` (disable → reap → re-enable → re-check), then run the
        completions and the queue's ``refill`` hook outside the lock. Returns how many
        requests completed. Runs on the interrupt thread (or by a poller)."""
        dq = q.dq
        batch: list[tuple[Any, int]] = []
        with q.lock:
            if self.failed is not None:
                return 0
            try:
                dq.disable_interrupts()
                # Nobody can add while we hold the lock, so each round reaps at least
                # one of the <= N chains in flight: N + 1 rounds always reach the end
                # (leaving early would strand used entries behind a stale used_event).
                for _ in range(dq.size + 1):
                    batch += dq.get_used()
                    if dq.broken is not None or not dq.enable_interrupts():
                        break
            except DeviceSpecError:
                pass
            if interrupt:
                dq.note_interrupt(len(batch))
            elif batch:
                dq.note_polled(len(batch))
            broken = dq.broken
        # While completions run, submissions (typically the callbacks resubmitting) only
        # add chains; refill() publishes them all at once afterwards: one kick decision
        # per batch instead of one per request.
        q.completing = True
        try:
            for token, used_len in batch:
                try:
                    token.complete(used_len)
                except Exception:
                    log.exception("%s: completion callback failed", self.name)
        finally:
            q.completing = False
        if broken is not None:
            self.fail(io_error(errno.EIO, f"{self.name} queue {q.index} is broken: {broken}"))
        elif q.refill is not None:
            try:
                q.refill()
            except Exception:
                log.exception("%s: queue refill failed", self.name)
        return len(batch)

    def _config_changed(self) -> None:
        try:
            status = int(self.call("GET_STATUS", timeout_s=2.0)["status"])
        except (DeviceControlError, DeviceGoneError) as e:
            log.debug("%s: GET_STATUS after config change failed: %s", self.name, e)
            return
        if status & Status.DEVICE_NEEDS_RESET:
            self.fail(io_error(errno.EIO, f"{self.name}: device needs reset"))
            return
        for hook in self._config_hooks:
            try:
                hook()
            except Exception:
                log.exception("%s: config-change hook failed", self.name)

    def _device_died(self) -> None:
        # Whatever the device completed before it died is real: reap it first.
        assert self._call is not None and self.proc is not None
        try:
            self._call.recv_all()
        except TransportError:
            pass
        for q in self.queues:
            if q is not None:
                self.service_queue(q)
        self.fail(
            io_error(errno.EIO, f"{self.name}: device process {self.proc.exit_description()}")
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
        self._failed_event.set()
        for q in self.queues:
            if q is None:
                continue
            with q.lock:
                tokens = q.dq.abandon()
            for t in tokens:
                try:
                    t.fail(OSError(error.errno, error.strerror))
                except Exception:
                    log.exception("%s: failure callback failed", self.name)
            if q.on_failed is not None:
                try:
                    q.on_failed(error)
                except Exception:
                    log.exception("%s: on_failed hook failed", self.name)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Reset the device (best effort), stop the interrupt thread, fail whatever is
        still in flight, stop the process and release the region. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        proc = self.proc
        if proc is not None and proc.alive() and self._client is not None:
            try:
                self.call("RESET_DEVICE", timeout_s=RESET_TIMEOUT_S)
            except (DeviceControlError, DeviceGoneError, ProtocolError):
                pass
        self._stopping = True
        if self._waker is not None:
            try:
                self._waker.wake()
            except Exception:
                pass
        if self._thread is not None and not self.in_interrupt():
            self._thread.join(5.0)
        self.fail(io_error(errno.EIO, f"{self.name}: kernel shut down"))
        for obj in (self._kick, self._client, self._call, self._waker):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    log.debug("%s: close of %r failed", self.name, obj, exc_info=True)
        self._kick = self._client = self._call = self._waker = None
        if proc is not None:
            try:
                proc.stop()
            except Exception:
                log.debug("%s: stopping the device process failed", self.name, exc_info=True)
            try:
                proc.close()
            except Exception:
                pass
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
        if not self._unlinked:
            try:
                region.unlink()
            except Exception:
                pass
            self._unlinked = True
        try:
            region.close()
        except Exception:
            log.debug("%s: region close failed (views still exported?)", self.name, exc_info=True)
