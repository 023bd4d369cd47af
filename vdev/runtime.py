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

Data path, loop, timers and the device's own event sources: the
:class:`vdev.session.DeviceSession` this runtime drives (shared with the vhost-user
transport). A kick for queue *q* (``session.kick``) marks it pending; a pending queue is
served with the disable–drain–re-enable–recheck loop, at most
:attr:`DeviceRuntime.budget` chains per round so that one busy queue cannot starve the
control channel or the other queues. What is this transport's: an interrupt rings the
queue's call doorbell with its index; a ``RingError`` (the ring cannot be trusted) sets
DEVICE_NEEDS_RESET and rings the call doorbell with ``CONFIG_CHANGE`` (0xFFFF), and so
does ``device.notify_config_change()`` (counted ``config_interrupts``; with no call
doorbell yet, ``config_interrupts_dropped``).

Memory: ``SET_MEM_TABLE`` maps the kernel's sealed memfd, which this process inherited
(``{"fd": N}``, N named by ``VLAB_MEM_FD``; the fd stays open so that a reset can map it
again), or attaches a POSIX shm region by name (``{"shm": NAME}``, unlinked by its
creator right after the reply, so nothing leaks). Guest-physical address = offset in
the region + ``guest_addr``.

A device started by hand to be attached to (``python -m vdev KIND --control EP
--shm-by-name``, ``kernel.Attach(EP)``: ``shm_by_name=True``) inherited no fd: it opens
the attaching kernel's sealed memfd through ``/proc`` (``{"path":
"/proc/<pid>/fd/<n>"}``, :data:`PROC_FD_RE`; the memfd must be sealed against
shrinking) or maps a POSIX shm name -- ``{"fd": N}`` is refused, and a name must be one
our kernels create (``/vlab-...``, :data:`SHM_NAME_RE`), so a control peer cannot make it
map and write into some other program's segment. A restarted device opens the same
path again. The device watches the kernel whose memfd it maps (a pidfd on the pid of
the path): when that kernel exits -- SIGKILL included -- the device resets at once
(its memory unmapped, counted ``kernels_gone``) and waits for the next kernel.
GET_DEVICE_INFO then also carries the device's ``pid`` (the kernel did not start it and
cannot know it).

Hosted (``host=LOOP``, :meth:`DeviceRuntime.start`): the runtime's session joins a loop
that serves several devices in one thread (the switch's ring ports, :mod:`vdev.switch`)
instead of running its own; it has no signals, parent watch or polling of its own, and
:meth:`DeviceRuntime.stop` closes it at once.

Reset (``RESET_DEVICE`` / ``SET_STATUS 0``) stops every
queue (the chains the device keeps are released first), unmaps the region and calls
``device.reset()``; GET_VRING_BASE and SET_VRING_ENABLE 0 stop one queue the same way.
Kick listeners, call doorbells and the device's watches are transport and stay open
until the process exits. The control peer chooses the doorbell endpoints, so they are
confined (:func:`endpoint_problem`) to the device's private run directory (the control
socket's): ``ipc://`` only, no ``..``, no symlink out, never the control socket, never
a file that is not a socket; a refusal is a BAD_VALUE reply, logged and counted
(``endpoints_refused``).

Hostile peers are bounded per loop round: at most 64 control requests
(:meth:`DeviceRuntime._serve_control`), at most
:data:`hostops.doorbell.RECV_BATCH` doorbell messages per listener, ``budget`` chains
per ring; what is left waits for the next round (the poller reports the sockets ready
again), so a flood delays the others by one round, never starves them. Last resort: an
exception escaping a callback is logged with its traceback and the loop goes on; after
:data:`MAX_INTERNAL_ERRORS` the process exits with :data:`EXIT_INTERNAL_ERROR`.

Tracing: with ``VLAB_TRACE`` set the session traces the data path
(:meth:`vdev.session.DeviceSession.trace_from_env`) and :meth:`DeviceRuntime.handle_control`
takes its traced copy: a ``ctl`` event per request (type, fields, reply or error) and a
``status`` event when the status byte changes (``docs/trace-format.md``).

Fault injection (``injector=``, ``python -m vdev ... --faults PLAN``): every control
request fires ``control.<TYPE>`` before it is served (a ``crash`` or ``hang`` leaves it
unanswered); a ``refuse_features_ok`` fault makes the next FEATURES_OK write leave the
bit clear (§3.1.1); ``needs_reset`` takes the broken-ring path (DEVICE_NEEDS_RESET and
CONFIG_CHANGE); the parent watch stays heard during a ``hang``. The data-path faults
are the session's (``docs/faults.md``).

Metrics (``GET_METRICS``): ``device`` holds the runtime's counters (below) merged with
``device.metrics`` (and the fault injector's ``faults_fired``, ``fault:<action>``);
``queues[i]`` holds :meth:`vdev.session.DeviceSession.ring_metrics`
(:class:`~vdev.virtio.queue.DeviceQueueStats` cumulative across resets,
``kicks_received``, ``handler_errors``, ``ring_errors``, ``kept``, ``chains_released``
and ``rule:<RULE>`` per spec rule the driver broke).
"""

from __future__ import annotations

import os
import re
import stat
import sys
import traceback
from dataclasses import dataclass
from functools import partial
from typing import Any

from hostops.barrier import full_barrier
from hostops.control import ControlServer
from hostops.doorbell import Doorbell, DoorbellListener
from hostops.errors import TransportError
from hostops.fdmem import MEM_FD_ENV, MappedFd, MappingError, require_shrink_seal
from hostops.framechan import PeerProcess
from hostops.process import ParentWatch
from hostops.shm import SharedRegion
from hostops.signals import wake_on_signals
from vdev.device import RING_FEATURES, Device
from vdev.injector import FaultInjector
from vdev.session import SESSION_COUNTERS, DeviceSession, LoopHost, Ring
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
from vdev.virtio.errors import AddressError, ProtocolError, UsageError
from vdev.virtio.memory import FlatMemory
from vdev.virtio.poll import DEFAULT_POLL_US
from vdev.virtio.ring import RingLayout
from vdev.virtio.status import describe_status, next_status

__all__ = [
    "trace_fields",
    "DeviceRuntime",
    "serve",
    "RUNTIME_COUNTERS",
    "EXIT_INTERNAL_ERROR",
    "MAX_INTERNAL_ERRORS",
    "endpoint_problem",
    "SHM_NAME_RE",
    "PROC_FD_RE",
]

#: The region paths a ``shm_by_name`` device opens: an attached kernel's memfd.
PROC_FD_RE = re.compile(r"/proc/[0-9]{1,10}/fd/[0-9]{1,10}\Z")
#: The POSIX shm names a ``shm_by_name`` device maps: those of
#: :meth:`hostops.shm.SharedRegion.create` (``/vlab-<pid>-<tag>-<hex>``).
SHM_NAME_RE = re.compile(r"/vlab-[0-9]+-[A-Za-z0-9_.]{1,32}-[0-9a-f]{1,64}\Z")

#: The runtime's device-level counters, reported under ``GET_METRICS["device"]``: the
#: session's (:data:`vdev.session.SESSION_COUNTERS`: kicks, chains, interrupts, kept and
#: released chains, ...) and these.
RUNTIME_COUNTERS = (
    *SESSION_COUNTERS,
    "control_requests",  # requests received (well-formed or not)
    "control_errors",  # error replies sent
    "bad_kicks",  # kicks naming a queue that does not exist
    "config_interrupts",  # call doorbells rung with CONFIG_CHANGE
    "config_interrupts_dropped",  # config changes with no call doorbell to ring yet
    "activations",  # DRIVER_OK accepted
    "internal_errors",  # exceptions that reached the loop's last-resort handler
    "endpoints_refused",  # SET_VRING_KICK/CALL endpoints outside the run directory
    "kernels_gone",  # shm_by_name: the attached kernel exited, the device was reset
)

#: Exit status of a device process whose loop hit :data:`MAX_INTERNAL_ERRORS` unexpected
#: exceptions (EX_SOFTWARE): distinct from 0 (stopped), 1 (start-up failure) and 2 (usage).
EXIT_INTERNAL_ERROR = 70

#: Unexpected exceptions the loop survives (each logged with its traceback) before the
#: process gives up with :data:`EXIT_INTERNAL_ERROR`: a fault that repeats every round
#: (a socket that stays readable and keeps failing) must not spin forever.
MAX_INTERNAL_ERRORS = 100

_DRIVER_OK = int(Status.DRIVER_OK)


@dataclass(slots=True)
class _Wiring:
    """What the control session told us about one queue that only this transport
    knows (the rest is the session's :class:`~vdev.session.Ring`)."""

    layout: RingLayout | None = None  # SET_VRING_ADDR, checked against memory
    kick: str = ""  # kick endpoint
    call: str = ""  # call endpoint

    def clear(self) -> None:
        self.layout = None
        self.kick = ""
        self.call = ""


class DeviceRuntime:
    """Serve ``device`` on the control endpoint ``control_endpoint`` until stopped.

    Construct, then :meth:`run` (blocks; returns the exit status). :meth:`stop` may be
    called from a signal handler or another thread. :meth:`handle_control` is the whole
    control state machine as a function of one request's bytes, usable without sockets.

    ``budget`` bounds the chains served per queue per round; ``watch_parent`` makes the
    loop exit when the launching process dies (``ParentWatch.from_env()``; ignored when
    the process was not launched by ``hostops.DeviceProcess``). ``signal_wakeup`` makes
    the session's Waker the process's signal wake-up fd while it runs (see
    :func:`hostops.signals.wake_on_signals`; main thread only, used by :func:`serve`).
    ``shm_by_name``: the device was started on its own to be attached to
    (``--shm-by-name``): it maps memory by POSIX shm name only and reports its pid (see
    the module docstring). ``poll_us`` bounds the hybrid-polling window after a drain
    (0: off; ``poll_fixed``: no adaptation; :mod:`vdev.virtio.poll`). The rings, the
    loop and the device's event sources are :attr:`session`'s.
    """

    #: Seconds the poller sleeps at most when idle (stop() and the parent watch wake it
    #: earlier; this only bounds how long a missed wake-up could last).
    idle_timeout = DeviceSession.idle_timeout

    def __init__(
        self,
        device: Device,
        control_endpoint: str,
        *,
        budget: int = 64,
        watch_parent: bool = True,
        log: Any = None,
        signal_wakeup: bool = False,
        injector: FaultInjector | None = None,
        endpoint_dir: str | None = None,
        shm_by_name: bool = False,
        poll_us: float = DEFAULT_POLL_US,
        poll_fixed: bool = False,
        host: LoopHost | None = None,
    ) -> None:
        if device.num_queues < 1:
            raise UsageError(f"{device!r} has no queues")
        if host is not None and (signal_wakeup or watch_parent or poll_us):
            raise UsageError(
                "a hosted runtime has no signals, parent watch or polling of its own "
                "(signal_wakeup=False, watch_parent=False, poll_us=0)"
            )
        self._host = host
        self.device = device
        self.control_endpoint = control_endpoint
        control_path = control_endpoint[6:] if control_endpoint.startswith("ipc://") else ""
        #: The only directory doorbell endpoints may name (default: the control
        #: socket's, the session's private run directory); see :func:`endpoint_problem`.
        self.endpoint_dir = endpoint_dir or (
            os.path.dirname(os.path.abspath(control_path)) if control_path else ""
        )
        self._control_path = os.path.abspath(control_path) if control_path else ""
        #: The exit status :meth:`run` returns (0, or :data:`EXIT_INTERNAL_ERROR`).
        self.exit_status = 0
        self.watch_parent = watch_parent
        #: Memory by POSIX shm name only, pid in GET_DEVICE_INFO (``--shm-by-name``).
        self.shm_by_name = shm_by_name
        self.signal_wakeup = signal_wakeup
        self._unwake: Any = None
        self.session = DeviceSession(
            device,
            self,
            budget=budget,
            counters=RUNTIME_COUNTERS,
            log_prefix=f"vdev[{device.name} {os.getpid()}]: ",
            log_file=log,
            poll_us=poll_us,
            poll_fixed=poll_fixed,
        )
        self.session.idle_timeout = self.idle_timeout
        if host is None:  # several hosted devices would write one trace file at once
            self.session.trace_from_env(sys.argv)
        self.tracer = self.session.tracer
        if injector is not None:
            self.session.attach_injector(injector)
        self.counters = self.session.counters
        self.rings = self.session.rings
        self.offered = (device.device_features() & ~RING_FEATURES) | RING_FEATURES
        self.status = 0
        self.driver_features = 0  # last SET_FEATURES (0 if none since reset)
        self.features = 0  # negotiated (valid once FEATURES_OK is set)
        self._wiring = [_Wiring() for _ in range(device.num_queues)]
        self._region: SharedRegion | MappedFd | None = None
        self._memory: FlatMemory | None = None
        self._kick_listeners: dict[str, DoorbellListener] = {}
        self._call_bells: dict[str, Doorbell] = {}
        self._server: ControlServer | None = None
        self._parent: ParentWatch | None = None
        self._kernel: PeerProcess | None = None  # shm_by_name: the attached kernel
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

    @property
    def budget(self) -> int:
        """Chains served per queue per round."""
        return self.session.budget

    # ================================================================== the loop
    def run(self) -> int:
        """Bind the control endpoint and serve until :meth:`stop`, SIGTERM (when
        installed by :func:`serve`) or the parent's death. Returns the exit status (0).
        Everything is closed on the way out, whatever happens.

        Last resort: an exception escaping the loop's callbacks (a bug: bad input
        never gets there) is logged with its traceback and counted
        (``internal_errors``), and the loop keeps serving — each control request and
        each kick batch is handled whole or not at all, so the state stays consistent.
        After :data:`MAX_INTERNAL_ERRORS` of them the process stops and :meth:`run`
        returns :data:`EXIT_INTERNAL_ERROR`."""
        try:
            self._open()
            self.session.run(on_error=self._internal_error)
        finally:
            self.close()
        return self.exit_status

    def start(self) -> None:
        """Hosted runtime (``host=``): bind the control endpoint and join the host's
        loop; the host's rounds serve it from now on, until :meth:`close`."""
        if self._host is None:
            raise UsageError("start() is for a hosted runtime; call run()")
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _internal_error(self, e: Exception) -> None:
        """The loop's last-resort handler (see :meth:`run`)."""
        n = self.counters["internal_errors"] = self.counters.get("internal_errors", 0) + 1
        self._log(
            f"internal error {n}/{MAX_INTERNAL_ERRORS}: {type(e).__name__}: {e}\n"
            f"{traceback.format_exc()}",
            kind="internal",
        )
        if n >= MAX_INTERNAL_ERRORS:
            self.exit_status = EXIT_INTERNAL_ERROR
            self.stop(f"{n} internal errors, the last: {type(e).__name__}: {e}")

    def stop(self, reason: str = "stopped") -> None:
        """Ask :meth:`run` to return (signal-handler and thread safe)."""
        if not self.session.stopping:
            self.exit_reason = reason
        self.session.stop()
        if self._host is not None:  # nobody returns from run(): close now
            self.close()

    def _open(self) -> None:
        session = self.session
        session.open(self._host, on_error=self._internal_error if self._host else None)
        if self.signal_wakeup:
            assert session.waker is not None
            self._unwake = wake_on_signals(session.waker)
        self._server = ControlServer(self.control_endpoint)
        session.add_source(self._server, self._serve_control)
        if self.watch_parent:
            self._parent = session.watch_parent(self._parent_gone)
        self._log(
            f"serving {self.device.name} (id {self.device.device_id}, "
            f"{self.device.num_queues} queue(s)) on {self.control_endpoint}"
        )

    def _parent_gone(self) -> None:
        self._log("parent process is gone: exiting")
        self.stop("parent gone")

    def _on_kicks(self, listener: DoorbellListener) -> None:
        kick = self.session.kick
        for index in listener.recv_all():
            if not kick(index):
                self.counters["bad_kicks"] += 1
                self._log(f"kick for queue {index}: no such queue", kind="kick")

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
        session = self.session
        session.stopping = True
        self._unmap()  # stops every ring first: kept chains are released
        unwake, self._unwake = self._unwake, None
        if unwake is not None:
            unwake()  # before the Waker's pipe is closed (its fd number may be reused)
        closables: list[Any] = [
            *self._kick_listeners.values(),
            *self._call_bells.values(),
            self._server,
            self._parent,
            self._kernel,
        ]
        for obj in closables:
            if obj is None:
                continue
            try:
                session.remove_source(obj)
            except Exception:
                pass
            try:
                obj.close()
            except Exception as e:
                self._log(f"closing {type(obj).__name__}: {e}")
        self._kick_listeners.clear()
        self._call_bells.clear()
        self._server = self._parent = self._kernel = None
        session.close()  # the waker, the device's watches, device.close()
        if self.exit_reason:
            self._log(f"exiting: {self.exit_reason}")
        session.trace_exit(self.exit_reason or "closed")

    # ================================================================== logging
    def _log(self, message: str, kind: str | None = None) -> None:
        """One line on the log; with ``kind``, rate limited (see DeviceSession.log)."""
        self.session.log(message, kind)

    # ================================================================== control
    def handle_control(self, payload: bytes) -> bytes:
        """Serve one control request (its bytes) and return the reply's bytes. Never
        raises for bad input: every problem becomes an error reply."""
        self.counters["control_requests"] += 1
        if self.tracer is not None:
            return self._handle_control_traced(payload)
        type_ = "request"
        try:
            req = decode_request(payload)
            type_ = req.type
            if self.session.injector is not None:
                self._control_faults(req)
            result = self._handlers[req.type](req)
            return encode_reply(**result)
        except ProtocolError as e:
            return self._error(type_, e.code, e.message)
        except Exception as e:  # a bug in the device or the runtime: report, go on
            self._log(f"{type_}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return self._error(type_, ErrorCode.DEVICE_ERROR, f"{type(e).__name__}: {e}")

    def _handle_control_traced(self, payload: bytes) -> bytes:
        """:meth:`handle_control` recording a ``ctl`` event (type, fields, reply or
        error) and ``status`` events when the status byte changes."""
        tracer = self.tracer
        assert tracer is not None
        type_ = "request"
        fields: dict[str, Any] = {}
        old_status = int(self.status)
        try:
            req = decode_request(payload)
            type_ = req.type
            fields = trace_fields(req.fields)
            if self.session.injector is not None:
                self._control_faults(req)
            result = self._handlers[req.type](req)
            reply = encode_reply(**result)
            tracer.emit(
                "ctl", fields.get("index"), type=type_, fields=fields, reply=trace_fields(result)
            )
        except ProtocolError as e:
            reply = self._error(type_, e.code, e.message)
            tracer.emit(
                "ctl",
                fields.get("index"),
                type=type_,
                fields=fields,
                error=f"{e.code}: {e.message}",
            )
        except Exception as e:  # a bug in the device or the runtime: report, go on
            self._log(f"{type_}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            reply = self._error(type_, ErrorCode.DEVICE_ERROR, f"{type(e).__name__}: {e}")
            tracer.emit(
                "ctl", fields.get("index"), type=type_, fields=fields, error=f"DEVICE_ERROR: {e}"
            )
        new_status = int(self.status)
        if new_status != old_status:
            tracer.emit("status", old=old_status, new=new_status, names=describe_status(new_status))
        return reply

    def _control_faults(self, req: Request) -> None:
        """Fire ``control.<TYPE>`` at the fault plan before serving ``req`` (its
        lifecycle faults are carried out by the session: a crash or hang leaves the
        request unanswered)."""
        index = req.fields.get("index")
        queue = index if isinstance(index, int) and not isinstance(index, bool) else None
        self.session.fire_faults(f"control.{req.type}", queue=queue)

    def _error(self, type_: str, code: str, message: str) -> bytes:
        self.counters["control_errors"] += 1
        self._log(f"{type_} -> {code}: {message}", kind="control")
        return encode_error(code, message)

    def _ring(self, req: Request) -> Ring:
        index: int = req["index"]
        if index >= len(self.rings):
            raise ProtocolError(
                ErrorCode.BAD_VALUE,
                f"{req.type}: queue index {index} out of range (device has "
                f"{len(self.rings)} queue(s))",
            )
        return self.rings[index]

    @staticmethod
    def _not_running(req: Request, ring: Ring) -> None:
        if ring.dq is not None:
            raise ProtocolError(
                ErrorCode.BAD_STATE,
                f"{req.type}: queue {ring.index} is running; GET_VRING_BASE or "
                f"SET_VRING_ENABLE false first",
            )

    @property
    def driver_ok(self) -> bool:
        """DRIVER_OK is set: queues may run."""
        return bool(int(self.status) & _DRIVER_OK)  # int: IntFlag's & is slow

    # -- info and features
    def _get_device_info(self, req: Request) -> dict[str, Any]:
        d = self.device
        info: dict[str, Any] = {
            "device_id": int(d.device_id),
            "num_queues": len(self.rings),
            "max_queue_size": int(d.max_queue_size),
            "name": str(d.name),
        }
        if self.shm_by_name:  # the optional fields (control.OPTIONAL_REPLY_TYPES)
            info["pid"] = os.getpid()
            if self._kernel is not None:  # a kernel is attached (and alive)
                info["attached_pid"] = self._kernel.pid
        return info

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
        # The region is a POSIX shm name ("shm"), the memfd this process inherited from
        # the kernel ("fd", named by VLAB_MEM_FD: no other fd of ours may be mapped on
        # the peer's word), or -- for a device started on its own -- the attached
        # kernel's sealed memfd, opened through /proc ("path").
        want: dict[str, type] = {"guest_addr": int, "size": int}
        if self.shm_by_name and "fd" in r:
            raise ProtocolError(
                ErrorCode.BAD_FIELD,
                "SET_MEM_TABLE: this device was started with --shm-by-name (it inherited no "
                "fd): give the kernel's memfd ('path') or a POSIX shm name ('shm')",
            )
        key = "fd" if "fd" in r else "path" if "path" in r else "shm"
        want[key] = int if key == "fd" else str
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
        guest_addr, size = r["guest_addr"], r["size"]
        if size <= 0 or guest_addr < 0 or guest_addr + size > 1 << 64:
            raise ProtocolError(
                ErrorCode.BAD_VALUE, f"SET_MEM_TABLE: bad region [{guest_addr:#x}, +{size:#x})"
            )
        region: SharedRegion | MappedFd
        if "fd" in r:
            fd = r["fd"]
            name = f"fd {fd}"
            if str(fd) != os.environ.get(MEM_FD_ENV):
                raise ProtocolError(
                    ErrorCode.BAD_ADDRESS,
                    f"SET_MEM_TABLE: fd {fd} is not the memory fd this device inherited",
                )
            try:
                region = MappedFd.map(fd, size)
            except MappingError as e:
                raise ProtocolError(ErrorCode.BAD_ADDRESS, f"SET_MEM_TABLE: {e}") from None
            # the fd stays open: a reset maps it again
        elif key == "path":
            region = self._open_kernel_memfd(r["path"], size)
            name = r["path"]
        else:
            name = r["shm"]
            if self.shm_by_name and not SHM_NAME_RE.match(name):
                raise ProtocolError(
                    ErrorCode.BAD_ADDRESS,
                    f"SET_MEM_TABLE: shared memory name {name[:80]!r} is not a virtio-lab "
                    "region's (/vlab-<pid>-<tag>-<hex>)",
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
        for w in self._wiring:
            w.layout = None
        self._region = region
        buf = region.buf if region.size == size else region.buf[:size]
        self._memory = FlatMemory(buf, base=guest_addr, barrier=full_barrier)
        return {}

    def _open_kernel_memfd(self, path: str, size: int) -> MappedFd:
        """Map the attached kernel's memfd through ``/proc/<pid>/fd/<n>`` (only for a
        ``--shm-by-name`` device); it must be sealed against shrinking, so the kernel's
        mapping and ours cannot be cut short by anyone."""
        if not self.shm_by_name or not PROC_FD_RE.match(path):
            raise ProtocolError(
                ErrorCode.BAD_ADDRESS,
                f"SET_MEM_TABLE: region path {path[:80]!r} is not an attached kernel's "
                "memfd (/proc/<pid>/fd/<n>, --shm-by-name devices only)",
            )
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise ProtocolError(
                ErrorCode.BAD_ADDRESS, f"SET_MEM_TABLE: cannot open {path}: {e.strerror}"
            ) from None
        try:
            require_shrink_seal(fd)
            region = MappedFd.map(fd, size)
        except MappingError as e:
            raise ProtocolError(ErrorCode.BAD_ADDRESS, f"SET_MEM_TABLE: {path}: {e}") from None
        finally:
            os.close(fd)  # the mapping holds the memory
        self._watch_kernel(int(path.split("/")[2]))
        return region

    def _watch_kernel(self, pid: int) -> None:
        """Reset the device when the attached kernel (``pid``, whose memfd we map)
        exits -- SIGKILL included: its memory is unmapped at once and the device
        waits for the next kernel, as after a RESET_DEVICE."""
        old = self._kernel
        if old is not None and old.pid == pid:
            return
        if old is not None:
            self.session.remove_source(old)
            old.close()
        self._kernel = watch = PeerProcess.open(pid)
        if watch is not None:
            self.session.add_lifeline(watch, partial(self._kernel_gone, watch))

    def _kernel_gone(self, watch: PeerProcess) -> None:
        self.session.remove_source(watch)
        watch.close()
        if self._kernel is not watch:
            return
        self._kernel = None
        self.counters["kernels_gone"] += 1
        self._log(f"the attached kernel (pid {watch.pid}) exited: resetting")
        try:
            self._reset()
        except ProtocolError as e:
            self._log(f"reset after the kernel exited: {e}")

    def _unmap(self) -> None:
        for ring in self.rings:
            self.session.stop_ring(ring)  # kept chains released: their views go first
        self._memory = None
        region, self._region = self._region, None
        if region is not None:
            try:
                region.close()
            except Exception as e:  # e.g. a view still exported: the OS unmaps at exit
                self._log(f"closing shared memory: {type(e).__name__}: {e}")

    # -- vrings
    def _set_vring_num(self, req: Request) -> dict[str, Any]:
        ring = self._ring(req)
        self._not_running(req, ring)
        old = ring.num
        self.session.check_num(ring, req["num"], "SET_VRING_NUM")
        if ring.num != old:
            self._wiring[ring.index].layout = None  # the addresses were checked for the old size
        return {}

    def _set_vring_addr(self, req: Request) -> dict[str, Any]:
        ring = self._ring(req)
        self._not_running(req, ring)
        memory = self._memory
        if memory is None:
            raise ProtocolError(ErrorCode.BAD_STATE, "SET_VRING_ADDR before SET_MEM_TABLE")
        num = ring.num
        if not num:
            raise ProtocolError(
                ErrorCode.BAD_STATE, f"SET_VRING_ADDR before SET_VRING_NUM for queue {ring.index}"
            )
        layout = RingLayout(num, req["desc"], req["avail"], req["used"])
        try:
            layout.validate()
        except UsageError as e:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"SET_VRING_ADDR: {e}") from None
        for part, addr, nbytes in (
            ("descriptor table", layout.desc, RingLayout.desc_bytes(num)),
            ("available ring", layout.avail, RingLayout.avail_bytes(num)),
            ("used ring", layout.used, RingLayout.used_bytes(num)),
        ):
            try:
                memory.view(addr, nbytes)
            except AddressError as e:
                raise ProtocolError(
                    ErrorCode.BAD_ADDRESS, f"SET_VRING_ADDR: queue {ring.index} {part}: {e}"
                ) from None
        self._wiring[ring.index].layout = layout
        return {}

    def _set_vring_base(self, req: Request) -> dict[str, Any]:
        ring = self._ring(req)
        self._not_running(req, ring)
        base = req["base"]
        if base > 0xFFFF:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"SET_VRING_BASE: {base} is not a u16")
        ring.base = base
        return {}

    def _get_vring_base(self, req: Request) -> dict[str, Any]:
        ring = self._ring(req)
        self.session.stop_ring(ring)  # stops the ring (vhost-user): restart with ENABLE
        ring.enabled = False
        return {"base": ring.base}

    def _set_vring_kick(self, req: Request) -> dict[str, Any]:
        ring = self._ring(req)
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
            self.session.add_source(listener, partial(self._on_kicks, listener))
        self._wiring[ring.index].kick = endpoint
        self.session.schedule_ring(ring)  # kicks may have gone to the old endpoint
        return {}

    def _set_vring_call(self, req: Request) -> dict[str, Any]:
        ring = self._ring(req)
        endpoint = self._check_endpoint(req)
        if endpoint and endpoint not in self._call_bells:
            try:
                self._call_bells[endpoint] = Doorbell(endpoint)
            except Exception as e:
                raise ProtocolError(
                    ErrorCode.BAD_VALUE,
                    f"SET_VRING_CALL: cannot connect {endpoint}: {type(e).__name__}: {e}",
                ) from None
        self._wiring[ring.index].call = endpoint
        return {}

    def _check_endpoint(self, req: Request) -> str:
        """The endpoint of SET_VRING_KICK/CALL, confined to :attr:`endpoint_dir` (the
        control peer must not make us bind or connect elsewhere: an ``ipc://`` bind
        replaces the file at its path). A refusal is a BAD_VALUE error reply (logged)."""
        endpoint: str = req["endpoint"]
        if not endpoint:
            return endpoint
        problem = endpoint_problem(endpoint, self.endpoint_dir, control_path=self._control_path)
        if problem:
            self.counters["endpoints_refused"] = self.counters.get("endpoints_refused", 0) + 1
            raise ProtocolError(
                ErrorCode.BAD_VALUE, f"{req.type}: endpoint {endpoint!r} refused: {problem}"
            )
        return endpoint

    def _set_vring_enable(self, req: Request) -> dict[str, Any]:
        ring = self._ring(req)
        if not req["enable"]:
            self.session.stop_ring(ring)
            ring.enabled = False
            return {}
        if self._wiring[ring.index].layout is None:
            raise ProtocolError(
                ErrorCode.BAD_STATE,
                f"SET_VRING_ENABLE: queue {ring.index} has no ring addresses "
                f"(SET_VRING_NUM and SET_VRING_ADDR first)",
            )
        if self.driver_ok and ring.dq is None:
            if self.status & Status.DEVICE_NEEDS_RESET:
                raise ProtocolError(
                    ErrorCode.BAD_STATE, "SET_VRING_ENABLE: the device needs a reset"
                )
            self._start(ring)
            self.session.schedule_ring(ring)
        ring.enabled = True
        return {}

    def _start(self, ring: Ring) -> None:
        layout = self._wiring[ring.index].layout
        assert layout is not None and self._memory is not None
        self.session.start_ring(ring, self._memory, layout, self.features)

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
            if not problem and self.session.take_features_refusal():
                problem = "refused by fault injection (refuse_features_ok, §3.1.1)"
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
            for ring in self.rings:
                self.session.schedule_ring(ring)  # pick up what was queued before
        return {}

    def _activate(self) -> None:
        started: list[Ring] = []
        try:
            for ring, w in zip(self.rings, self._wiring, strict=True):
                if ring.enabled and w.layout is not None and self._memory is not None:
                    self._start(ring)
                    started.append(ring)
            self.device.activate(self.features)
        except ProtocolError:
            for ring in started:
                self.session.stop_ring(ring)
            raise
        except Exception as e:
            for ring in started:
                self.session.stop_ring(ring)
            self._log(f"device.activate(): {type(e).__name__}: {e}\n{traceback.format_exc()}")
            raise ProtocolError(
                ErrorCode.DEVICE_ERROR, f"activation failed: {type(e).__name__}: {e}"
            ) from None
        self.counters["activations"] += 1
        self._log(f"DRIVER_OK: features {self.features:#x}, queues {[r.index for r in started]}")

    def _reset_device(self, req: Request) -> dict[str, Any]:
        self._reset()
        return {}

    def _reset(self) -> None:
        self._unmap()  # stops every ring: kept chains are released before the unmap
        for w in self._wiring:
            w.clear()
        old = self.status
        self.status = 0
        self.driver_features = 0
        self.features = 0
        if old:
            self._log(f"reset (status was {describe_status(old)})", kind="reset")
        failed = self.session.reset()  # clears the rings, then device.reset()
        if failed:
            raise ProtocolError(ErrorCode.DEVICE_ERROR, f"device reset failed: {failed}")

    # -- metrics
    def _get_metrics(self, req: Request) -> dict[str, Any]:
        queues = [self.session.ring_metrics(ring) for ring in self.rings]
        return {"device": self.metrics(), "queues": queues}

    def metrics(self) -> dict[str, int]:
        """The runtime's counters merged with the device's (``GET_METRICS["device"]``)."""
        return self.session.metrics()

    # ================================================================== session hooks
    def interrupt(self, ring: Ring) -> None:
        """Ring ``ring``'s call doorbell with its index (a used-buffer notification)."""
        call = self._wiring[ring.index].call
        bell = self._call_bells.get(call) if call else None
        if bell is None:
            return
        try:
            bell.ring(ring.index)
        except TransportError as e:
            self._log(f"call doorbell {call}: {e}", kind="call")

    def ring_broken(self, ring: Ring, why: str) -> None:
        """Set DEVICE_NEEDS_RESET and send a config-change interrupt (§2.1.2)."""
        self.status |= Status.DEVICE_NEEDS_RESET
        self._log(f"queue {ring.index}: ring broken, DEVICE_NEEDS_RESET: {why}", kind="ring")
        self._config_interrupt(self._wiring[ring.index].call)

    def config_interrupt(self) -> None:
        """The device's config space changed: ring CONFIG_CHANGE (0xFFFF)."""
        self._config_interrupt("")

    def _config_interrupt(self, prefer: str) -> None:
        bell = self._call_bells.get(prefer) if prefer else None
        if bell is None and self._call_bells:
            bell = next(iter(self._call_bells.values()))  # any way to reach the driver
        if bell is None:
            self.counters["config_interrupts_dropped"] += 1
            self._log("config change: no call doorbell to ring yet", kind="config")
            if self.tracer is not None:
                self.tracer.emit("config", sent=False)
            return
        self.counters["config_interrupts"] += 1
        if self.tracer is not None:
            self.tracer.emit("config", sent=True)
        try:
            bell.ring(CONFIG_CHANGE)
        except TransportError as e:
            self._log(f"call doorbell (config change): {e}", kind="call")


def endpoint_problem(endpoint: str, run_dir: str, *, control_path: str = "") -> str:
    """Why the control peer may not name ``endpoint`` for a doorbell ("" if it may).

    Allowed: ``ipc://PATH`` with PATH absolute, already normalised (no ``.``/``..``
    components, no ``//``), its directory resolving (symlinks followed) to ``run_dir``'s,
    not the control socket itself, and PATH either absent or a socket file (a stale
    one from a previous device process is fine; a symlink or any other file is not:
    binding would replace it). Everything else (``tcp://``, ``inproc://``, paths
    elsewhere) is refused.
    """
    if not endpoint.startswith("ipc://"):
        return "only ipc:// endpoints are accepted"
    path = endpoint[6:]
    if not path or "\0" in path or not os.path.isabs(path):
        return "the ipc path must be absolute"
    if os.path.normpath(path) != path or "/./" in path or path.endswith("/."):
        return "the ipc path must be normalised (no '.', '..' or '//')"
    if not run_dir:
        return "this device has no run directory to confine endpoints to"
    try:
        where = os.path.realpath(os.path.dirname(path))
        home = os.path.realpath(run_dir)
    except (OSError, ValueError) as e:
        return f"cannot resolve it: {e}"
    if where != home:
        return f"it is outside the device's run directory {run_dir}"
    if control_path and os.path.abspath(path) == control_path:
        return "it is the control socket"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ""
    except OSError as e:
        return f"cannot inspect it: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISSOCK(st.st_mode):
        return "a file that is not a socket exists at that path"
    return ""


def trace_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of a control message as a trace records them: bytes become their
    length (config space, memory tables stay small), nested values are kept."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, bytes | bytearray | memoryview):
            out[k] = f"<{len(v)} bytes>"
        else:
            out[k] = v
    return out


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
