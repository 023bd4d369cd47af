"""The attach transport: a device process somebody else started, reconnected when it
restarts.

Theory of operation
-------------------
:class:`AttachTransport` is the :class:`~kernel.transport_zmq.ZmqTransport` for a device
the kernel did not start (``kernel.Attach(ENDPOINT)``; the device runs ``python -m vdev
KIND ... --control ENDPOINT --shm-by-name``), the way QEMU connects to a vhost-user
back-end daemon. The control session, the negotiation, the rings and the recovery are
ZmqTransport's; what differs is what a kernel cannot have for a process that is not its
child:

* **memory by path**: a child inherits the kernel's sealed memfd; a stranger cannot.
  The region is still a sealed memfd (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL: the
  device cannot truncate the kernel's mapping), handed over with SET_MEM_TABLE
  ``{"path": "/proc/<kernel pid>/fd/<n>"}``: the device opens the kernel's memfd through
  ``/proc`` (a process of the same user may), checks its seals and maps it. The path
  stays valid while the kernel lives -- a device that restarts maps the same memory
  again, and every DMA buffer keeps its address and contents -- and the memory has no
  name, so nothing is left in ``/dev/shm`` whatever happens to either process.
* **doorbells beside the control socket**: the device accepts doorbell endpoints only in
  its own run directory, the control socket's (:func:`vdev.runtime.endpoint_problem`).
  The kernel therefore binds its call listener at ``<ENDPOINT>.call`` and tells the
  device to bind its kick listener at ``<ENDPOINT>.kick``; both names are fixed, so a
  device serving one kernel after another keeps one of each. One kernel at a time
  attaches to a device (as one front-end at a time drives a vhost-user back-end): a
  second one would take the doorbells over and reset the device under the first (a
  second attach from the same process is refused).
* **no pidfd**: the kernel did not start the process, so its death cannot be a pidfd
  event (and a pid read off the wire may be another namespace's). The control channel
  tells instead. While requests are in flight and the device has been silent (no
  interrupt, no reply) for :data:`PING_INTERVAL_S`, the interrupt thread pings it
  (GET_STATUS, :data:`PING_TIMEOUT_S`): no answer means it is gone; an answer without
  DRIVER_OK means it lost its state (it restarted on the same endpoint). Receive
  buffers waiting for input count as in flight, so an idle NIC or console is pinged
  about once per :data:`~kernel.transport.IDLE_POLL_S`; a device holding nothing of
  ours is noticed by the first request after it went away (resubmitted like any
  other). A control call of anybody else that finds the channel dead (metrics, a
  config check) and a kick that cannot be sent ask for the same recovery. A driver
  that cannot resubmit (no ``on_reset``: rng, kv, console) has its device failed with
  EIO instead -- noticed by the same ping, so no caller waits forever.
* **reconnect instead of restart**: the recovery (:meth:`VirtioTransport._recover`, the
  budget, the resubmission) is the same; where ZmqTransport would start a new process,
  this transport drops its control client and kick doorbell and waits for the endpoint
  to answer GET_DEVICE_INFO again, at most ``spec.reconnect_timeout`` seconds (in short
  slices: a shutdown does not wait). The device that answers must be the same kind (device id,
  queues); then it is brought up again exactly as before (§3.1.1: reset, the same
  features, the same memory, fresh rings) and the chains it had are resubmitted. A
  device that does not come back in time fails for good: EIO, culprit ``"device-gone"``.

The kernel learns the device's pid from GET_DEVICE_INFO (``pid``, sent by a
``--shm-by-name`` device; None otherwise) and its kind from the device id, so
:func:`kernel.boot` names an attached device after :meth:`AttachTransport.launch` has
asked (:meth:`AttachTransport.naming`). At shutdown the device is reset (it unmaps the
region and waits for the next kernel), never stopped.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable
from typing import Any

from hostops.clock import monotonic
from hostops.control import ControlClient
from hostops.doorbell import DoorbellListener
from hostops.errors import ChannelTimeout, TransportError
from hostops.fdmem import new_memfd, size_and_seal
from hostops.framechan import unix_socket_in_use
from hostops.poll import Pollable
from hostops.rundir import RuntimeDir
from hostops.sync import Lock
from vdev.virtio import DeviceId, ProtocolError, RingLayout, Status

from .errors import DeviceControlError, DeviceGoneError, DeviceProbeError
from .specs import DEFAULT_RECONNECT_TIMEOUT_S, DeviceSpec
from .transport import CONTROL_TIMEOUT_S, RESET_TIMEOUT_S, DeviceInfo, SharedMemory
from .transport_zmq import ZmqTransport

__all__ = ["AttachTransport", "PING_INTERVAL_S", "PING_TIMEOUT_S", "ATTACH_COUNTERS"]

log = logging.getLogger(__name__)

#: While requests are in flight, a device silent for this long is pinged.
PING_INTERVAL_S = 0.5
#: How long a ping may wait for its answer before the device counts as gone.
PING_TIMEOUT_S = 2.0
#: One slice of the wait for a device to come back (a shutdown interrupts it).
RECONNECT_SLICE_S = 0.5

#: The transport's own counters (:attr:`AttachTransport.attach`), plain ints.
ATTACH_COUNTERS = (
    "pings",  # liveness pings sent
    "pings_failed",  # pings that found the device gone or without its state
    "reconnects",  # times the device answered again after going away
    "reconnect_timeouts",  # waits for it that ran out (the device then failed)
)

_NAME_CHARS = re.compile(r"[^a-z0-9]")

# Endpoints attached to by a kernel of this process (one kernel per device at a time).
_attached: set[str] = set()
_attached_lock = Lock()


class AttachTransport(ZmqTransport):
    """The kernel's side of a device it attached to (see the module docstring)."""

    kind = "attach"

    def __init__(
        self,
        name: str,
        spec: DeviceSpec,
        rundir: RuntimeDir,
        *,
        region_size: int | None = None,
    ) -> None:
        super().__init__(name, spec, rundir, region_size=region_size)
        endpoint = str(getattr(spec, "endpoint", ""))
        self.endpoint = endpoint
        self._ctl_ep = endpoint
        # the device confines doorbells to its own directory: put them beside its socket
        self._call_ep = endpoint + ".call"
        self._kick_ep = endpoint + ".kick"
        self.log_path = ""
        self.reconnect_timeout = float(
            getattr(spec, "reconnect_timeout", DEFAULT_RECONNECT_TIMEOUT_S)
        )
        #: Ping / reconnect counters (:data:`ATTACH_COUNTERS`).
        self.attach: dict[str, int] = dict.fromkeys(ATTACH_COUNTERS, 0)
        self._device_pid: int | None = None
        self._holds_endpoint = False
        self._last_heard = monotonic()
        self._reconnect_expired = False

    # ------------------------------------------------------------------ identity
    @property
    def pid(self) -> int | None:
        """The device process's pid as it reported it (GET_DEVICE_INFO ``pid``; None
        when the device does not say)."""
        return self._device_pid

    @property
    def region_path(self) -> str | None:
        """Where the device opens the region: ``/proc/<kernel pid>/fd/<memfd>`` (None
        before the region exists)."""
        fd = self._memfd
        return None if fd is None or self.region is None else f"/proc/{os.getpid()}/fd/{fd}"

    def naming(self) -> tuple[str, str]:
        """``(prefix, naming)`` for :func:`kernel.core.device_name`, after
        :meth:`launch`: the spec's prefix if it gives one, else from the device id
        (disks ``vd`` + letters, NICs ``eth`` + numbers, others the device's own name +
        numbers)."""
        assert self.info is not None
        did = self.info.device_id
        prefix = str(getattr(self.spec, "name_prefix", "") or "")
        if did == DeviceId.BLOCK:
            return prefix or "vd", "letters"
        if did == DeviceId.NET:
            return prefix or "eth", "numbers"
        if not prefix:
            prefix = _NAME_CHARS.sub("", self.info.name.lower())[:16] or "dev"
            if not prefix[0].isalpha():
                prefix = "dev" + prefix[:13]
        return prefix, "numbers"

    def rename(self, name: str) -> None:
        """Give the device its kernel name (boot, after :meth:`naming`; before probe)."""
        self.name = name

    def log_tail(self, max_lines: int = 20) -> str:
        """'' -- the device's log is its owner's, not the kernel's."""
        return ""

    def _death_description(self) -> str | None:
        return None

    # ------------------------------------------------------------------ control
    def call(
        self, type_: str, *, timeout_s: float = CONTROL_TIMEOUT_S, **fields: Any
    ) -> dict[str, Any]:
        """One control request (see :meth:`ZmqTransport.call`). A reply is a sign of
        life; a channel found dead by anybody but the recovery itself asks for a
        reconnect (the interrupt thread then runs it)."""
        try:
            reply = super().call(type_, timeout_s=timeout_s, **fields)
        except DeviceGoneError as e:
            if (
                self._thread is not None
                and not self._recovering
                and not self._closed
                and not self.in_interrupt()
            ):
                self.request_recovery("device-gone", f"control channel: {e.cause}")
            raise
        self._last_heard = monotonic()
        return reply

    # ------------------------------------------------------------------ bring-up
    def launch(self) -> None:
        """Step 1: bind the call listener beside the device's socket, connect the
        control client and ask GET_DEVICE_INFO (at most ``reconnect_timeout``, or
        :data:`CONTROL_TIMEOUT_S` if that is shorter). Nothing there, or nobody
        answering, is a one-line :class:`DeviceProbeError`."""
        path = self.endpoint[len("ipc://") :]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DeviceProbeError(
                self.name, f"nothing is listening at {self.endpoint} (no such socket)"
            ) from None
        except OSError as e:
            raise DeviceProbeError(
                self.name, f"cannot reach {self.endpoint}: {e.strerror}"
            ) from None
        if not stat.S_ISSOCK(st.st_mode):
            raise DeviceProbeError(self.name, f"{self.endpoint} is not a socket")
        with _attached_lock:
            if self.endpoint in _attached:
                raise DeviceProbeError(
                    self.name, f"a kernel of this process is attached to {self.endpoint} already"
                )
            _attached.add(self.endpoint)
            self._holds_endpoint = True
        # a kernel of another process attached: binding its call doorbell's path would
        # take the doorbell from under it (libzmq replaces the socket file), so refuse
        if unix_socket_in_use(self._call_ep[len("ipc://") :]):
            raise DeviceProbeError(
                self.name,
                f"{self.endpoint} is in use: another kernel is attached "
                f"(its call doorbell {self._call_ep} answers); one kernel at a time",
            )
        try:
            self._call = DoorbellListener(self._call_ep)
        except Exception as e:
            raise DeviceProbeError(
                self.name, f"cannot bind the call doorbell {self._call_ep}: {e}"
            ) from None
        self._client = ControlClient(self._ctl_ep)
        wait = min(self.reconnect_timeout, CONTROL_TIMEOUT_S)
        try:
            self._get_info(wait)
        except DeviceGoneError:
            raise DeviceProbeError(
                self.name,
                f"no device answered at {self.endpoint} within {wait:g} s "
                "(is it running with --control ENDPOINT --shm-by-name?)",
            ) from None
        except DeviceControlError as e:
            raise DeviceProbeError(self.name, f"GET_DEVICE_INFO refused: {e.message}") from None

    def _get_info(self, timeout_s: float) -> DeviceInfo:
        r = self.call("GET_DEVICE_INFO", timeout_s=timeout_s)
        try:
            info = DeviceInfo(
                int(r["device_id"]), int(r["num_queues"]), int(r["max_queue_size"]), str(r["name"])
            )
        except (KeyError, TypeError, ValueError) as e:
            raise self.probe_error(f"malformed GET_DEVICE_INFO reply {r!r}: {e}") from None
        if info.num_queues < 1 or info.max_queue_size < 1:
            raise self.probe_error(f"device reports no usable queue: {info}")
        pid = r.get("pid")  # typed by check_reply (control.OPTIONAL_REPLY_TYPES)
        self._device_pid = pid if isinstance(pid, int) and pid > 0 else None
        kpid = r.get("attached_pid")  # the kernel whose memory the device maps now
        if isinstance(kpid, int) and kpid > 0 and kpid != os.getpid():
            raise DeviceProbeError(
                self.name,
                f"{self.endpoint} is in use by the kernel in process {kpid}; one kernel at a time",
            )
        self.info = info
        return info

    def get_device_info(self) -> DeviceInfo:
        """Step 2: GET_DEVICE_INFO (the device is up: :meth:`launch` asked already)."""
        return self._get_info(CONTROL_TIMEOUT_S)

    def _create_region(self, size: int) -> SharedMemory:
        self._memfd = new_memfd(f"vlab-{self.name}")
        return size_and_seal(self._memfd, size)

    def _hand_over_region(self, region: SharedMemory) -> None:
        self.call(
            "SET_MEM_TABLE",
            regions=[{"guest_addr": 0, "size": region.size, "path": self.region_path}],
        )

    def _setup_vring(self, index: int, layout: RingLayout) -> Callable[[], None]:
        ring = super()._setup_vring(index, layout)

        def kick() -> None:
            try:
                ring()
            except (TransportError, OSError, ValueError) as e:
                self.request_recovery("device-gone", f"kick on queue {index} failed: {e}")
                raise

        return kick

    # ------------------------------------------------------------------ interrupts
    def _irq_sources(self) -> list[Pollable]:
        assert self._call is not None
        return [self._call]

    def _collect_interrupts(self, ready: list[object]) -> tuple[list[int], str | None]:
        assert self._call is not None
        indices = self._call.recv_all()
        now = monotonic()
        if indices:
            self._last_heard = now
            return indices, None
        if (
            self._closed  # shutting down: the device is being reset on purpose
            or now - self._last_heard < PING_INTERVAL_S
            or not self._chains_out()
        ):
            return indices, None
        return indices, self._ping()

    def _chains_out(self) -> bool:
        """Whether the device holds chains of ours: requests, and buffers waiting for
        input (a NIC's or a console's receive buffers -- so an idle NIC that went away
        is noticed too, at the cost of a ping per idle wake-up of the interrupt
        thread)."""
        for q in self.queues:
            if q is None or q.paused:
                continue
            dq = q.dq
            if dq is not None and dq.in_flight:
                return True
        return False

    def _ping(self) -> str | None:
        """GET_STATUS (interrupt thread): None if the device is alive and running,
        else why it is not."""
        self.attach["pings"] += 1
        self._last_heard = monotonic()
        try:
            status = int(self.call("GET_STATUS", timeout_s=PING_TIMEOUT_S)["status"])
        except DeviceGoneError as e:
            self.attach["pings_failed"] += 1
            return f"the device stopped answering ({e.cause})"
        except DeviceControlError:
            return None  # it answered: alive
        if not status & Status.DRIVER_OK:
            self.attach["pings_failed"] += 1
            return "the device lost its state (restarted at the same endpoint?)"
        return None

    # ------------------------------------------------------------------ shutdown
    def _stop_device(self) -> None:
        if self._client is None or self.info is None or self.failed is not None:
            return
        if self._recovering:
            return
        try:
            self.call("RESET_DEVICE", timeout_s=RESET_TIMEOUT_S)
        except (DeviceControlError, DeviceGoneError, ProtocolError):
            pass

    def _close_channels(self) -> None:
        super()._close_channels()  # the memfd, the control client, the doorbells
        if self._holds_endpoint:
            with _attached_lock:
                _attached.discard(self.endpoint)
            self._holds_endpoint = False

    # ------------------------------------------------------------------ recovery
    def _can_recover(self) -> bool:
        return self.region is not None and self.info is not None

    def _relaunch(self) -> None:
        """Not a new process: a new control client (the old one may hold requests the
        dead device never answered) and a new kick doorbell for the device that comes
        back."""
        self._drop_channels()
        with self._state_lock:
            if self._closed:
                raise DeviceGoneError(self.name, "reconnect", "kernel shutting down")
            self._client = ControlClient(self._ctl_ep)

    def _wait_device_info(self) -> DeviceInfo:
        """Wait for the endpoint to answer GET_DEVICE_INFO again, at most
        ``reconnect_timeout`` seconds, in slices (a shutdown does not wait)."""
        deadline = monotonic() + self.reconnect_timeout
        while True:
            if self._stopping:
                raise DeviceGoneError(self.name, "reconnect", "kernel shutting down")
            left = deadline - monotonic()
            try:
                info = self._get_info(max(0.01, min(RECONNECT_SLICE_S, left)))
                break
            except DeviceGoneError as e:
                if not isinstance(e.__cause__, ChannelTimeout):
                    raise
                if deadline - monotonic() <= 0:
                    self._reconnect_expired = True
                    self.attach["reconnect_timeouts"] += 1
                    raise DeviceGoneError(
                        self.name,
                        "reconnect",
                        f"nothing answered at {self.endpoint} within {self.reconnect_timeout:g} s",
                    ) from None
        self.attach["reconnects"] += 1
        log.info("%s: the device at %s answers again (pid %s)", self.name, self.endpoint, self.pid)
        return info

    def _reinit_device(self, restart: bool) -> bool:
        self._reconnect_expired = False
        done = super()._reinit_device(restart)
        self._last_heard = monotonic()
        return done

    def _budget_left(self) -> bool:
        # a device that did not come back within reconnect_timeout is not waited for again
        return not self._reconnect_expired and super()._budget_left()

    def _give_up(
        self, culprit: str, why: str, reason: str, held: list[list[Any]] | None = None
    ) -> None:
        if self._reconnect_expired and culprit == "device-gone":
            reason = f"it did not come back within {self.reconnect_timeout:g} s"
        super()._give_up(culprit, why, reason, held)
