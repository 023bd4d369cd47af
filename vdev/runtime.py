"""The device process's loop: one :class:`~vdev.device.Device` behind a control channel,
its virtqueues in shared memory and its doorbells.

Theory of operation
-------------------
:class:`DeviceRuntime` is single-threaded. One ``hostops.Poller`` waits on

* the ``ControlServer`` (the kernel's requests, one reply each),
* the kick ``DoorbellListener`` (one per distinct kick endpoint; a kick is a u16 queue
  index),
* the ``ParentWatch`` (the process that launched us is gone: exit), and
* a ``Waker`` (``stop()`` from a signal handler or another thread; under :func:`serve`
  it is also the process's signal wake-up fd, so a SIGTERM that lands just before the
  poll blocks still wakes it at once).

The control session is the one in ``vdev.virtio.control`` (vhost-user's vocabulary):
the runtime keeps the device's *status byte* (order checked by
:func:`vdev.virtio.status.next_status`), the negotiated features, the memory table and
per queue its size, ring addresses, base, kick/call endpoints and enable flag. Every
request is checked against the current state; a bad one gets an error reply naming the
problem (``ProtocolError`` → ``encode_error(code, message)``) and changes nothing, and
the loop goes on. The device process never dies of bad input.

Feature negotiation (§2.2, §3.1.1): the offer is ``device.device_features() |
RING_FEATURES``. Setting FEATURES_OK is *refused* — the write succeeds but FEATURES_OK
stays clear, the driver sees that on re-reading the status — when the accepted set has a
bit that was never offered or lacks VERSION_1. At DRIVER_OK the runtime builds a
:class:`~vdev.virtio.queue.DeviceQueue` for every enabled queue (EVENT_IDX /
INDIRECT_DESC as negotiated) and calls ``device.activate(features)``.

Data path. A kick for queue *q* marks it pending; a pending queue is served with the
disable–drain–re-enable–recheck loop of :mod:`vdev.virtio.queue`, at most
:attr:`DeviceRuntime.budget` chains per round so that one busy queue cannot starve the
control channel or the other queues (a queue with work left stays pending and the
poller is asked with timeout 0). The loop and the per-chain rules are
:class:`vdev.queue_service.QueueServer`'s, shared with the vhost-user transport; a
``RingError`` (the ring cannot be trusted) stops the queue, sets DEVICE_NEEDS_RESET and
rings the call doorbell with ``CONFIG_CHANGE`` (0xFFFF).

After each drain, ``should_interrupt()`` (EVENT_IDX aware) decides whether to ring the
queue's call doorbell with its index.

Memory: ``SET_MEM_TABLE`` attaches the kernel's POSIX shm region by name (the kernel
unlinks it right after the reply, so nothing leaks). Guest-physical address = offset in
the region + ``guest_addr``. Reset (``RESET_DEVICE`` / ``SET_STATUS 0``) drops every
queue, unmaps the region and calls ``device.reset()``; kick listeners and call doorbells
are transport and stay open until the process exits.

Metrics (``GET_METRICS``): ``device`` holds the runtime's counters (below) merged with
``device.metrics``; ``queues[i]`` holds :class:`~vdev.virtio.queue.DeviceQueueStats`
(cumulative across resets), ``kicks_received``, ``handler_errors``, ``ring_errors`` and
``rule:<RULE>`` per spec rule the driver broke.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field, fields
from typing import Any

from hostops.barrier import full_barrier
from hostops.control import ControlServer
from hostops.doorbell import Doorbell, DoorbellListener
from hostops.errors import TransportError
from hostops.poll import Poller, Waker
from hostops.process import ParentWatch
from hostops.shm import SharedRegion
from hostops.signals import wake_on_signals
from vdev.device import RING_FEATURES, Device
from vdev.queue_service import QueueServer
from vdev.virtio.constants import F, Status, bit
from vdev.virtio.control import (
    CONFIG_CHANGE,
    REQUESTS,
    ErrorCode,
    Request,
    decode_request,
    encode_error,
    encode_reply,
)
from vdev.virtio.errors import (
    AddressError,
    ProtocolError,
    RingError,
    UsageError,
)
from vdev.virtio.memory import FlatMemory
from vdev.virtio.queue import DeviceQueue, DeviceQueueStats
from vdev.virtio.ring import RingLayout
from vdev.virtio.status import describe_status, next_status

__all__ = ["DeviceRuntime", "serve", "RUNTIME_COUNTERS"]

#: The runtime's device-level counters, reported under ``GET_METRICS["device"]``.
RUNTIME_COUNTERS = (
    "control_requests",  # requests received (well-formed or not)
    "control_errors",  # error replies sent
    "kicks_received",  # kick doorbells for any queue
    "bad_kicks",  # kicks naming a queue that does not exist
    "chains",  # valid chains handed to the device
    "bad_chains",  # chains rejected by validation, completed with length 0
    "handler_errors",  # exceptions escaping device.handle()
    "ring_errors",  # rings found broken (DEVICE_NEEDS_RESET)
    "interrupts",  # call doorbells rung for a queue
    "config_interrupts",  # call doorbells rung with CONFIG_CHANGE
    "resets",  # RESET_DEVICE / SET_STATUS 0
    "activations",  # DRIVER_OK accepted
)

_DRIVER_OK = int(Status.DRIVER_OK)
_QUEUE_STAT_FIELDS = tuple(f.name for f in fields(DeviceQueueStats) if f.name != "rule_violations")
_MAX_LOG_PER_KIND = 100


@dataclass(slots=True)
class _Queue:
    """What the control session has told us about one virtqueue."""

    index: int
    num: int = 0  # SET_VRING_NUM (0: not set)
    layout: RingLayout | None = None  # SET_VRING_ADDR, checked against memory
    base: int = 0  # SET_VRING_BASE: next avail index to process when started
    kick: str = ""  # kick endpoint
    call: str = ""  # call endpoint
    enabled: bool = False
    dq: DeviceQueue | None = None  # running (or broken) queue, only after DRIVER_OK
    kicks: int = 0
    ring_errors: int = 0
    retired: dict[str, int] = field(default_factory=dict)  # stats of dropped DeviceQueues

    def drop(self) -> None:
        """Forget the running DeviceQueue, keeping its counters and its position."""
        dq = self.dq
        if dq is None:
            return
        self.base = dq.last_avail
        for name in _QUEUE_STAT_FIELDS:
            self.retired[name] = self.retired.get(name, 0) + getattr(dq.stats, name)
        for rule, n in dq.stats.rule_violations.items():
            key = f"rule:{rule}"
            self.retired[key] = self.retired.get(key, 0) + n
        self.dq = None

    def clear(self) -> None:
        """Back to the state after a reset (counters survive)."""
        self.drop()
        self.num = 0
        self.layout = None
        self.base = 0
        self.kick = ""
        self.call = ""
        self.enabled = False

    def metrics(self) -> dict[str, int]:
        out = dict.fromkeys(_QUEUE_STAT_FIELDS, 0)
        out.update(self.retired)
        if self.dq is not None:
            st = self.dq.stats
            for name in _QUEUE_STAT_FIELDS:
                out[name] = out.get(name, 0) + getattr(st, name)
            for rule, n in st.rule_violations.items():
                out[f"rule:{rule}"] = out.get(f"rule:{rule}", 0) + n
        out["kicks_received"] = self.kicks
        out["ring_errors"] = self.ring_errors
        return out


class DeviceRuntime:
    """Serve ``device`` on the control endpoint ``control_endpoint`` until stopped.

    Construct, then :meth:`run` (blocks; returns the exit status). :meth:`stop` may be
    called from a signal handler or another thread. :meth:`handle_control` is the whole
    control state machine as a function of one request's bytes, usable without sockets.

    ``budget`` bounds the chains served per queue per round; ``watch_parent`` makes the
    loop exit when the launching process dies (``ParentWatch.from_env()``; ignored when
    the process was not launched by ``hostops.DeviceProcess``). ``signal_wakeup`` makes
    the runtime's Waker the process's signal wake-up fd while it runs (see
    :func:`hostops.signals.wake_on_signals`; main thread only, used by :func:`serve`).
    """

    #: Seconds the poller sleeps at most when idle (stop() and the parent watch wake it
    #: earlier; this only bounds how long a missed wake-up could last).
    idle_timeout = 1.0

    def __init__(
        self,
        device: Device,
        control_endpoint: str,
        *,
        budget: int = 64,
        watch_parent: bool = True,
        log: Any = None,
        signal_wakeup: bool = False,
    ) -> None:
        if device.num_queues < 1:
            raise UsageError(f"{device!r} has no queues")
        self.device = device
        self.control_endpoint = control_endpoint
        self.budget = max(1, budget)
        self.watch_parent = watch_parent
        self.signal_wakeup = signal_wakeup
        self._unwake: Any = None
        self._log_file = log if log is not None else sys.stderr
        self._log_counts: dict[str, int] = {}
        self.counters: dict[str, int] = dict.fromkeys(RUNTIME_COUNTERS, 0)
        self._service = QueueServer(device, self.counters, lambda msg, kind: self._log(msg, kind))
        self.offered = (device.device_features() & ~RING_FEATURES) | RING_FEATURES
        self.status = 0
        self.driver_features = 0  # last SET_FEATURES (0 if none since reset)
        self.features = 0  # negotiated (valid once FEATURES_OK is set)
        self.queues = [_Queue(i) for i in range(device.num_queues)]
        self._region: SharedRegion | None = None
        self._memory: FlatMemory | None = None
        self._kick_listeners: dict[str, DoorbellListener] = {}
        self._call_bells: dict[str, Doorbell] = {}
        self._pending: dict[int, None] = {}  # queues with work to do, in kick order
        self._server: ControlServer | None = None
        self._poller: Poller | None = None
        self._waker: Waker | None = None
        self._parent: ParentWatch | None = None
        self._stopping = False
        self._closed = False
        self.exit_reason = ""
        self._handlers = {
            "GET_DEVICE_INFO": self._get_device_info,
            "GET_FEATURES": self._get_features,
            "SET_FEATURES": self._set_features,
            "GET_CONFIG": self._get_config,
            "SET_CONFIG": self._set_config,
            "SET_MEM_TABLE": self._set_mem_table,
            "SET_VRING_NUM": self._set_vring_num,
            "SET_VRING_ADDR": self._set_vring_addr,
            "SET_VRING_BASE": self._set_vring_base,
            "GET_VRING_BASE": self._get_vring_base,
            "SET_VRING_KICK": self._set_vring_kick,
            "SET_VRING_CALL": self._set_vring_call,
            "SET_VRING_ENABLE": self._set_vring_enable,
            "SET_STATUS": self._set_status,
            "GET_STATUS": self._get_status,
            "RESET_DEVICE": self._reset_device,
            "GET_METRICS": self._get_metrics,
        }
        missing = set(REQUESTS) - set(self._handlers)
        assert not missing, f"no handler for {missing}"

    # ================================================================== the loop
    def run(self) -> int:
        """Bind the control endpoint and serve until :meth:`stop`, SIGTERM (when
        installed by :func:`serve`) or the parent's death. Returns the exit status (0).
        Everything is closed on the way out, whatever happens."""
        try:
            self._open()
            poller = self._poller
            assert poller is not None
            while not self._stopping:
                timeout = 0.0 if self._pending else self.idle_timeout
                for obj in poller.poll(timeout):
                    if self._stopping:
                        break
                    self._on_ready(obj)
                if self._pending and not self._stopping:
                    self._serve_pending()
        finally:
            self.close()
        return 0

    def stop(self, reason: str = "stopped") -> None:
        """Ask :meth:`run` to return (signal-handler and thread safe)."""
        if not self._stopping:
            self.exit_reason = reason
        self._stopping = True
        waker = self._waker
        if waker is not None:
            try:
                waker.wake()
            except Exception:  # closing concurrently: the flag is enough
                pass

    def _open(self) -> None:
        self._poller = Poller()
        self._waker = Waker()
        self._poller.register(self._waker)
        if self.signal_wakeup:
            self._unwake = wake_on_signals(self._waker)
        self._server = ControlServer(self.control_endpoint)
        self._poller.register(self._server)
        if self.watch_parent:
            self._parent = ParentWatch.from_env()
            if self._parent is not None:
                self._poller.register(self._parent)
        self._log(
            f"serving {self.device.name} (id {self.device.device_id}, "
            f"{self.device.num_queues} queue(s)) on {self.control_endpoint}"
        )

    def _on_ready(self, obj: object) -> None:
        if obj is self._server:
            self._serve_control()
        elif obj is self._waker:
            assert self._waker is not None
            self._waker.drain()
        elif obj is self._parent:
            assert self._parent is not None
            if self._parent.parent_gone():
                self._log("parent process is gone: exiting")
                self.stop("parent gone")
            elif self._poller is not None:  # readable yet alive: never spin on it
                self._poller.unregister(self._parent)
        elif isinstance(obj, DoorbellListener):
            for index in obj.recv_all():
                self._on_kick(index)

    def _serve_control(self, limit: int = 64) -> None:
        server = self._server
        assert server is not None
        for _ in range(limit):
            got = server.recv(0)
            if got is None:
                return
            peer, payload = got
            reply = self.handle_control(payload)
            try:
                server.reply(peer, reply)
            except TransportError as e:
                self._log(f"control reply lost: {e}", kind="reply")

    def close(self) -> None:
        """Close sockets, unmap memory, close the device (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        for q in self.queues:
            q.drop()
        self._pending.clear()
        self._unmap()
        unwake, self._unwake = self._unwake, None
        if unwake is not None:
            unwake()  # before the Waker's pipe is closed (its fd number may be reused)
        poller = self._poller
        closables: list[Any] = [
            *self._kick_listeners.values(),
            *self._call_bells.values(),
            self._server,
            self._parent,
            self._waker,
        ]
        for obj in closables:
            if obj is None:
                continue
            if poller is not None:
                try:
                    poller.unregister(obj)
                except Exception:
                    pass
            close = getattr(obj, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as e:
                    self._log(f"closing {type(obj).__name__}: {e}")
        self._kick_listeners.clear()
        self._call_bells.clear()
        self._server = self._waker = self._parent = None
        try:
            self.device.close()
        except Exception as e:
            self._log(f"device.close(): {type(e).__name__}: {e}")
        if self.exit_reason:
            self._log(f"exiting: {self.exit_reason}")

    # ================================================================== logging
    def _log(self, message: str, kind: str | None = None) -> None:
        """One line on stderr; with ``kind``, at most a few lines of that kind (a hostile
        driver must not be able to fill the disk with our log)."""
        if kind is not None:
            n = self._log_counts[kind] = self._log_counts.get(kind, 0) + 1
            if n > _MAX_LOG_PER_KIND:
                return
            if n == _MAX_LOG_PER_KIND:
                message += f" (further {kind} messages suppressed)"
        try:
            print(
                f"vdev[{self.device.name} {os.getpid()}]: {message}",
                file=self._log_file,
                flush=True,
            )
        except (OSError, ValueError):
            pass

    # ================================================================== control
    def handle_control(self, payload: bytes) -> bytes:
        """Serve one control request (its bytes) and return the reply's bytes. Never
        raises for bad input: every problem becomes an error reply."""
        self.counters["control_requests"] += 1
        type_ = "request"
        try:
            req = decode_request(payload)
            type_ = req.type
            result = self._handlers[req.type](req)
            return encode_reply(**result)
        except ProtocolError as e:
            return self._error(type_, e.code, e.message)
        except Exception as e:  # a bug in the device or the runtime: report, go on
            self._log(f"{type_}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return self._error(type_, ErrorCode.DEVICE_ERROR, f"{type(e).__name__}: {e}")

    def _error(self, type_: str, code: str, message: str) -> bytes:
        self.counters["control_errors"] += 1
        self._log(f"{type_} -> {code}: {message}", kind="control")
        return encode_error(code, message)

    def _queue(self, req: Request) -> _Queue:
        index: int = req["index"]
        if index >= len(self.queues):
            raise ProtocolError(
                ErrorCode.BAD_VALUE,
                f"{req.type}: queue index {index} out of range (device has "
                f"{len(self.queues)} queue(s))",
            )
        return self.queues[index]

    @staticmethod
    def _not_running(req: Request, q: _Queue) -> None:
        if q.dq is not None:
            raise ProtocolError(
                ErrorCode.BAD_STATE,
                f"{req.type}: queue {q.index} is running; GET_VRING_BASE or "
                f"SET_VRING_ENABLE false first",
            )

    @property
    def driver_ok(self) -> bool:
        """DRIVER_OK is set: queues may run."""
        return bool(int(self.status) & _DRIVER_OK)  # int: IntFlag's & is slow

    # -- info and features
    def _get_device_info(self, req: Request) -> dict[str, Any]:
        d = self.device
        return {
            "device_id": int(d.device_id),
            "num_queues": len(self.queues),
            "max_queue_size": int(d.max_queue_size),
            "name": str(d.name),
        }

    def _get_features(self, req: Request) -> dict[str, Any]:
        return {"features": self.offered}

    def _set_features(self, req: Request) -> dict[str, Any]:
        if self.status & Status.FEATURES_OK:
            raise ProtocolError(
                ErrorCode.BAD_STATE,
                "SET_FEATURES after FEATURES_OK: features are fixed until reset (§3.1.1)",
            )
        self.driver_features = req["features"]
        return {}

    def _features_problem(self) -> str:
        feats = self.driver_features
        extra = feats & ~self.offered
        if extra:
            return f"features {extra:#x} were never offered (offer {self.offered:#x})"
        if not feats & bit(F.VERSION_1):
            return "VERSION_1 was not accepted (legacy interface is not supported)"
        return ""

    # -- config space
    def _get_config(self, req: Request) -> dict[str, Any]:
        cfg = bytes(self.device.config())
        off, size = req["offset"], req["size"]
        if off + size > len(cfg):
            raise ProtocolError(
                ErrorCode.BAD_VALUE,
                f"GET_CONFIG [{off}, +{size}) runs past the {len(cfg)}-byte config space",
            )
        return {"data": cfg[off : off + size]}

    def _set_config(self, req: Request) -> dict[str, Any]:
        self.device.write_config(req["offset"], req["data"])
        return {}

    # -- memory
    def _set_mem_table(self, req: Request) -> dict[str, Any]:
        if self.driver_ok:
            raise ProtocolError(
                ErrorCode.BAD_STATE, "SET_MEM_TABLE while DRIVER_OK: reset the device first"
            )
        regions = req["regions"]
        if len(regions) != 1:
            raise ProtocolError(
                ErrorCode.BAD_VALUE,
                f"SET_MEM_TABLE: {len(regions)} regions; this device maps exactly one",
            )
        r = regions[0]
        if not isinstance(r, dict):
            raise ProtocolError(ErrorCode.BAD_FIELD, "SET_MEM_TABLE: a region must be a map")
        want = {"guest_addr": int, "size": int, "shm": str}
        for name, typ in want.items():
            v = r.get(name)
            if not isinstance(v, typ) or isinstance(v, bool):
                raise ProtocolError(
                    ErrorCode.BAD_FIELD,
                    f"SET_MEM_TABLE: region field {name!r} is {type(v).__name__}, "
                    f"want {typ.__name__}",
                )
        extra = sorted(set(r) - set(want))
        if extra:
            raise ProtocolError(
                ErrorCode.BAD_FIELD, f"SET_MEM_TABLE: unexpected region field(s) {extra}"
            )
        guest_addr, size, name = r["guest_addr"], r["size"], r["shm"]
        if size <= 0 or guest_addr < 0 or guest_addr + size > 1 << 64:
            raise ProtocolError(
                ErrorCode.BAD_VALUE, f"SET_MEM_TABLE: bad region [{guest_addr:#x}, +{size:#x})"
            )
        try:
            region = SharedRegion.attach(name, size)
        except Exception as e:
            raise ProtocolError(
                ErrorCode.BAD_ADDRESS,
                f"SET_MEM_TABLE: cannot attach shared memory {name!r} ({size} bytes): "
                f"{type(e).__name__}: {e}",
            ) from None
        if region.size < size:
            got = region.size
            region.close()
            raise ProtocolError(
                ErrorCode.BAD_ADDRESS,
                f"SET_MEM_TABLE: shared memory {name!r} has {got} bytes, not {size}",
            )
        # A new table replaces the old one; ring addresses were checked against the old
        # memory, so they must be sent again.
        self._unmap()
        for q in self.queues:
            q.layout = None
        self._region = region
        buf = region.buf if region.size == size else region.buf[:size]
        self._memory = FlatMemory(buf, base=guest_addr, barrier=full_barrier)
        return {}

    def _unmap(self) -> None:
        for q in self.queues:
            q.drop()
        self._memory = None
        region, self._region = self._region, None
        if region is not None:
            try:
                region.close()
            except Exception as e:  # e.g. a view still exported: the OS unmaps at exit
                self._log(f"closing shared memory: {type(e).__name__}: {e}")

    # -- vrings
    def _set_vring_num(self, req: Request) -> dict[str, Any]:
        q = self._queue(req)
        self._not_running(req, q)
        num = req["num"]
        limit = self.device.max_queue_size
        if num < 1 or num & (num - 1) or num > limit:
            raise ProtocolError(
                ErrorCode.BAD_VALUE,
                f"SET_VRING_NUM: queue {q.index} size {num} must be a power of two in "
                f"1..{limit} (§2.7)",
            )
        if num != q.num:
            q.layout = None  # the addresses were checked for the old size
        q.num = num
        return {}

    def _set_vring_addr(self, req: Request) -> dict[str, Any]:
        q = self._queue(req)
        self._not_running(req, q)
        memory = self._memory
        if memory is None:
            raise ProtocolError(ErrorCode.BAD_STATE, "SET_VRING_ADDR before SET_MEM_TABLE")
        if not q.num:
            raise ProtocolError(
                ErrorCode.BAD_STATE, f"SET_VRING_ADDR before SET_VRING_NUM for queue {q.index}"
            )
        layout = RingLayout(q.num, req["desc"], req["avail"], req["used"])
        try:
            layout.validate()
        except UsageError as e:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"SET_VRING_ADDR: {e}") from None
        for part, addr, nbytes in (
            ("descriptor table", layout.desc, RingLayout.desc_bytes(q.num)),
            ("available ring", layout.avail, RingLayout.avail_bytes(q.num)),
            ("used ring", layout.used, RingLayout.used_bytes(q.num)),
        ):
            try:
                memory.view(addr, nbytes)
            except AddressError as e:
                raise ProtocolError(
                    ErrorCode.BAD_ADDRESS, f"SET_VRING_ADDR: queue {q.index} {part}: {e}"
                ) from None
        q.layout = layout
        return {}

    def _set_vring_base(self, req: Request) -> dict[str, Any]:
        q = self._queue(req)
        self._not_running(req, q)
        base = req["base"]
        if base > 0xFFFF:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"SET_VRING_BASE: {base} is not a u16")
        q.base = base
        return {}

    def _get_vring_base(self, req: Request) -> dict[str, Any]:
        q = self._queue(req)
        q.drop()  # stops the ring (vhost-user): restart with SET_VRING_ENABLE
        q.enabled = False
        self._pending.pop(q.index, None)
        return {"base": q.base}

    def _set_vring_kick(self, req: Request) -> dict[str, Any]:
        q = self._queue(req)
        endpoint = self._check_endpoint(req)
        if endpoint and endpoint not in self._kick_listeners:
            try:
                listener = DoorbellListener(endpoint)
            except Exception as e:
                raise ProtocolError(
                    ErrorCode.BAD_VALUE,
                    f"SET_VRING_KICK: cannot bind {endpoint}: {type(e).__name__}: {e}",
                ) from None
            self._kick_listeners[endpoint] = listener
            if self._poller is not None:
                self._poller.register(listener)
        q.kick = endpoint
        if q.dq is not None:
            self._pending[q.index] = None  # kicks may have gone to the old endpoint
        return {}

    def _set_vring_call(self, req: Request) -> dict[str, Any]:
        q = self._queue(req)
        endpoint = self._check_endpoint(req)
        if endpoint and endpoint not in self._call_bells:
            try:
                self._call_bells[endpoint] = Doorbell(endpoint)
            except Exception as e:
                raise ProtocolError(
                    ErrorCode.BAD_VALUE,
                    f"SET_VRING_CALL: cannot connect {endpoint}: {type(e).__name__}: {e}",
                ) from None
        q.call = endpoint
        return {}

    @staticmethod
    def _check_endpoint(req: Request) -> str:
        endpoint: str = req["endpoint"]
        if endpoint and not (endpoint.startswith("ipc://") and len(endpoint) > 6):
            raise ProtocolError(
                ErrorCode.BAD_VALUE,
                f"{req.type}: endpoint {endpoint!r} is not an ipc:// endpoint",
            )
        return endpoint

    def _set_vring_enable(self, req: Request) -> dict[str, Any]:
        q = self._queue(req)
        if not req["enable"]:
            q.drop()
            q.enabled = False
            self._pending.pop(q.index, None)
            return {}
        if q.layout is None:
            raise ProtocolError(
                ErrorCode.BAD_STATE,
                f"SET_VRING_ENABLE: queue {q.index} has no ring addresses "
                f"(SET_VRING_NUM and SET_VRING_ADDR first)",
            )
        if self.driver_ok and q.dq is None:
            if self.status & Status.DEVICE_NEEDS_RESET:
                raise ProtocolError(
                    ErrorCode.BAD_STATE, "SET_VRING_ENABLE: the device needs a reset"
                )
            self._start(q)
            self._pending[q.index] = None
        q.enabled = True
        return {}

    def _start(self, q: _Queue) -> None:
        assert q.layout is not None and self._memory is not None
        try:
            q.dq = DeviceQueue(
                self._memory,
                q.layout,
                event_idx=bool(self.features & bit(F.EVENT_IDX)),
                indirect=bool(self.features & bit(F.INDIRECT_DESC)),
                last_avail=q.base,
            )
        except (AddressError, UsageError) as e:
            raise ProtocolError(ErrorCode.BAD_ADDRESS, f"queue {q.index}: {e}") from None

    # -- status
    def _get_status(self, req: Request) -> dict[str, Any]:
        return {"status": self.status}

    def _set_status(self, req: Request) -> dict[str, Any]:
        value = req["status"]
        new = next_status(self.status, value)
        if new == 0:
            self._reset()
            return {}
        added = new & ~self.status
        if added & Status.FEATURES_OK:
            problem = self._features_problem()
            if problem:
                if new & Status.DRIVER_OK:
                    raise ProtocolError(
                        ErrorCode.BAD_STATE, f"DRIVER_OK refused with FEATURES_OK: {problem}"
                    )
                self._log(f"FEATURES_OK refused: {problem}", kind="features")
                new &= ~Status.FEATURES_OK
            else:
                self.features = self.driver_features
        if added & Status.DRIVER_OK:
            self._activate()
        self.status = new
        if added & Status.DRIVER_OK:
            for q in self.queues:
                if q.dq is not None:
                    self._pending[q.index] = None  # pick up what was queued before
        return {}

    def _activate(self) -> None:
        started: list[_Queue] = []
        try:
            for q in self.queues:
                if q.enabled and q.layout is not None and self._memory is not None:
                    self._start(q)
                    started.append(q)
            self.device.activate(self.features)
        except ProtocolError:
            for q in started:
                q.drop()
            raise
        except Exception as e:
            for q in started:
                q.drop()
            self._log(f"device.activate(): {type(e).__name__}: {e}\n{traceback.format_exc()}")
            raise ProtocolError(
                ErrorCode.DEVICE_ERROR, f"activation failed: {type(e).__name__}: {e}"
            ) from None
        self.counters["activations"] += 1
        self._log(f"DRIVER_OK: features {self.features:#x}, queues {[q.index for q in started]}")

    def _reset_device(self, req: Request) -> dict[str, Any]:
        self._reset()
        return {}

    def _reset(self) -> None:
        for q in self.queues:
            q.clear()
        self._pending.clear()
        self._unmap()
        old = self.status
        self.status = 0
        self.driver_features = 0
        self.features = 0
        self.counters["resets"] += 1
        if old:
            self._log(f"reset (status was {describe_status(old)})", kind="reset")
        try:
            self.device.reset()
        except Exception as e:
            self._log(f"device.reset(): {type(e).__name__}: {e}\n{traceback.format_exc()}")
            raise ProtocolError(
                ErrorCode.DEVICE_ERROR, f"device reset failed: {type(e).__name__}: {e}"
            ) from None

    # -- metrics
    def _get_metrics(self, req: Request) -> dict[str, Any]:
        queues = []
        for q in self.queues:
            m = q.metrics()
            m["handler_errors"] = self._service.handler_errors.get(q.index, 0)
            queues.append(m)
        return {"device": self.metrics(), "queues": queues}

    def metrics(self) -> dict[str, int]:
        """The runtime's counters merged with the device's (``GET_METRICS["device"]``)."""
        out = dict(self.counters)
        for name, n in self.device.metrics.snapshot().items():
            out[name] = out.get(name, 0) + int(n)
        return out

    # ================================================================== data path
    def _on_kick(self, index: int) -> None:
        self.counters["kicks_received"] += 1
        if not 0 <= index < len(self.queues):
            self.counters["bad_kicks"] += 1
            self._log(f"kick for queue {index}: no such queue", kind="kick")
            return
        q = self.queues[index]
        q.kicks += 1
        if self._runnable(q):
            self._pending[index] = None

    def _runnable(self, q: _Queue) -> bool:
        dq = q.dq
        return dq is not None and q.enabled and self.driver_ok and dq.broken is None

    def _serve_pending(self) -> None:
        for index in list(self._pending):
            if self._stopping:
                return
            q = self.queues[index]
            if not self._runnable(q) or not self._drain(q):
                self._pending.pop(index, None)

    def _drain(self, q: _Queue) -> bool:
        """Serve queue ``q`` for one round; True if it has work left (budget spent)."""
        dq = q.dq
        assert dq is not None
        try:
            return self._service.drain(
                q.index, dq, self.budget, lambda: self._ring_call(q, q.index)
            )
        except RingError as e:
            self._ring_broken(q, e)
            return False

    def _ring_call(self, q: _Queue, value: int) -> None:
        bell = self._call_bells.get(q.call) if q.call else None
        if bell is None and value == CONFIG_CHANGE and self._call_bells:
            bell = next(iter(self._call_bells.values()))  # any way to reach the driver
        if bell is None:
            return
        try:
            bell.ring(value)
        except TransportError as e:
            self._log(f"call doorbell {q.call}: {e}", kind="call")

    def _ring_broken(self, q: _Queue, err: RingError) -> None:
        q.ring_errors += 1
        self.counters["ring_errors"] += 1
        self.status |= Status.DEVICE_NEEDS_RESET
        self._pending.pop(q.index, None)
        self._log(f"queue {q.index}: ring broken, DEVICE_NEEDS_RESET: {err}", kind="ring")
        self.counters["config_interrupts"] += 1
        self._ring_call(q, CONFIG_CHANGE)


def serve(device: Device, control_endpoint: str, **kwargs: Any) -> int:
    """Run ``device`` as this process's device and return the exit status.

    SIGTERM stops it cleanly (sockets closed, memory unmapped, ``device.close()``; exit
    status 0); SIGINT is ignored (the terminal's ^C belongs to the kernel process, which
    shuts its devices down in order); the death of the parent also ends it (status 0).
    """
    from hostops.signals import ignore_sigint, on_terminate

    kwargs.setdefault("signal_wakeup", True)
    runtime = DeviceRuntime(device, control_endpoint, **kwargs)
    ignore_sigint()
    # no SystemExit from the handler: stop() wakes the loop, which closes everything
    uninstall = on_terminate(lambda: runtime.stop("SIGTERM"), exit=False)
    try:
        return runtime.run()
    finally:
        uninstall()
