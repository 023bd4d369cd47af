"""The ZeroMQ transport: our own device process, its control channel and doorbells.

Theory of operation
-------------------
:class:`ZmqTransport` is the :class:`~kernel.transport.VirtioTransport` for a device
the kernel starts itself (``python -m vdev <kind> ... --control ipc://...``): it owns
the process, and talks to it over the project's control session (msgpack messages named
after their vhost-user counterparts), a sealed memfd it inherits and ZeroMQ doorbells.

1. :meth:`~ZmqTransport.launch` binds the *call* doorbell listener
   (``<rundir>/<name>.call``), creates the (still empty) memfd of the region, starts
   the device process under supervision (its log in ``<rundir>/<name>.log``; the memfd
   inherited under the number ``VLAB_MEM_FD`` names; ``VLAB_DEVICE_NAME`` is the
   kernel's name for it, which a fault plan's ``device`` filter matches; with a fault
   plan, ``--faults <rundir>/<name>.faults.json --faults-state
   <rundir>/<name>.faults-state``) and connects the control client;
2. :meth:`~ZmqTransport.get_device_info` waits (up to 15 s: process start-up) for
   GET_DEVICE_INFO;
3. :meth:`~ZmqTransport.negotiate`: RESET, ACKNOWLEDGE, DRIVER, GET_FEATURES, the
   driver's choice (must contain VERSION_1), SET_FEATURES, FEATURES_OK, re-read status;
4. the region is that memfd, sized and sealed (``F_SEAL_SHRINK | F_SEAL_GROW |
   F_SEAL_SEAL``: the device can never truncate it under the kernel's mapping) and
   handed over with SET_MEM_TABLE ``{"fd": N}``; it has no name, so nothing can leak;
5. each ring: SET_VRING_NUM, ADDR (guest-physical offsets), BASE, KICK and CALL
   (doorbell endpoints), ENABLE; a kick is one doorbell message carrying the index;
6. SET_STATUS ...|DRIVER_OK.

The interrupt thread waits on the call listener (a u16 queue index per interrupt, 0xFFFF
= CONFIG_CHANGE, which makes a config worker thread GET_STATUS -- DEVICE_NEEDS_RESET asks
for a reset -- and run the drivers' config hooks: the interrupt thread never waits on a
control round trip, and a storm of them coalesces; every reply is schema-checked,
:func:`vdev.virtio.control.check_reply`) and the process's pidfd (its death is noticed
the moment it happens). At shutdown the device is reset, the channels closed and the
process stopped.

Recovery (:meth:`~kernel.transport.VirtioTransport._recover` decides, this class does):
a reset is RESET_DEVICE and the bring-up again (features as negotiated before, the same
memfd, fresh rings at the same addresses); a device that does not answer the reset, or
that died, is killed and started again with the same command line (a NIC whose MAC the
device chose gets it pinned with ``--mac``), then brought up the same way. The new
process inherits the same memfd, so every DMA buffer keeps its address and contents.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from hostops.control import ControlClient
from hostops.doorbell import Doorbell, DoorbellListener
from hostops.errors import ChannelTimeout, TransportError
from hostops.fdmem import MEM_FD_ENV, new_memfd, size_and_seal
from hostops.poll import Pollable
from hostops.process import DeviceProcess
from hostops.rundir import RuntimeDir
from hostops.sync import Lock, start_thread
from hostops.trace import child_environment
from vdev.virtio import F, ProtocolError, RingLayout, Status, bit, feature_names
from vdev.virtio.control import RemoteError, check_reply, decode_reply, encode_request
from vdev.virtio.status import describe_status

from .errors import DeviceControlError, DeviceGoneError, DeviceProbeError
from .specs import DeviceSpec
from .transport import (
    CONTROL_TIMEOUT_S,
    RESET_TIMEOUT_S,
    DeviceInfo,
    SharedMemory,
    VirtioTransport,
)

__all__ = ["ZmqTransport", "STARTUP_TIMEOUT_S"]

log = logging.getLogger(__name__)

#: First GET_DEVICE_INFO: the device process is still starting up.
STARTUP_TIMEOUT_S = 15.0


class ZmqTransport(VirtioTransport):
    """The kernel's side of one device process of ours (see the module docstring)."""

    kind = "zmq"

    def __init__(
        self,
        name: str,
        spec: DeviceSpec,
        rundir: RuntimeDir,
        *,
        region_size: int | None = None,
    ) -> None:
        super().__init__(name, spec, rundir, region_size=region_size)
        self.proc: DeviceProcess | None = None
        self.log_path = os.path.join(rundir.path, f"{name}.log")
        self._ctl_ep = rundir.endpoint(f"{name}.ctl")
        self._call_ep = rundir.endpoint(f"{name}.call")
        self._kick_ep = rundir.endpoint(f"{name}.kick")
        self._client: ControlClient | None = None
        self._call: DoorbellListener | None = None
        self._kick: Doorbell | None = None
        self._memfd: int | None = None
        # config-change checks run off the interrupt thread (see _config_changed)
        self._cfg_lock = Lock()
        self._cfg_pending = False
        self._cfg_running = False
        #: The spec the device process is (re)started from: a driver may pin what the
        #: device chose at the first start (a NIC's MAC) so a restart keeps it.
        self.restart_spec: DeviceSpec = spec
        self._faults_file: str | None = None
        self._faults_state: str | None = None
        self._child_env: dict[str, str] | None = None

    @property
    def pid(self) -> int | None:
        """The device process id (None before launch)."""
        return self.proc.pid if self.proc is not None else None

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
            # every reply is schema-checked (vdev.virtio.control.REPLY_TYPES): a missing
            # or mistyped field is a DeviceControlError naming it, never a KeyError later
            return check_reply(type_, decode_reply(raw))
        except RemoteError as e:
            raise DeviceControlError(self.name, type_, e.code, e.message) from None
        except ProtocolError as e:
            raise DeviceControlError(self.name, type_, e.code, f"bad reply: {e.message}") from None

    def _gone_cause(self, e: BaseException) -> str:
        return self._death_description() or f"{type(e).__name__}: {e}"

    def _death_description(self) -> str | None:
        proc = self.proc
        if proc is not None and not proc.alive():
            return f"device process {proc.exit_description()}"
        return None

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

    def metrics(self) -> dict[str, Any]:
        """GET_METRICS: ``{"device": {...}, "queues": [{...}, ...]}``."""
        return self.call("GET_METRICS")

    # ------------------------------------------------------------------ bring-up
    def launch(self) -> None:
        """Step 1: bind the call listener, create the memfd, write the fault plan (if
        any), start the device process, connect control."""
        plan = self.spec.fault_plan_json()
        if plan is not None:
            self._faults_file = os.path.join(self.rundir.path, f"{self.name}.faults.json")
            self._faults_state = os.path.join(self.rundir.path, f"{self.name}.faults-state")
            fd = os.open(self._faults_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(plan)
        self._call = DoorbellListener(self._call_ep)
        self._memfd = new_memfd(f"vlab-{self.name}")
        self.proc = self._start_process()
        self._client = ControlClient(self._ctl_ep, peer_alive=self.proc.alive)

    def _start_process(self) -> DeviceProcess:
        assert self._memfd is not None
        argv = self.restart_spec.argv(
            self._ctl_ep, faults_file=self._faults_file, faults_state=self._faults_state
        )
        if self._child_env is None:
            # what the boot set up (trace destination): a restart after boot() returned
            # must get the same
            self._child_env = child_environment(self.name)
        return DeviceProcess.launch(
            argv,
            name=self.name,
            log_path=self.log_path,
            # VLAB_DEVICE_NAME: the name a fault plan's "device" filter matches ("vda")
            env={**self._child_env, MEM_FD_ENV: str(self._memfd), "VLAB_DEVICE_NAME": self.name},
            pass_fds=(self._memfd,),
        )

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
        """Step 3: status and feature negotiation (§3.1.1)."""
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

    def _create_region(self, size: int) -> SharedMemory:
        assert self._memfd is not None
        return size_and_seal(self._memfd, size)

    def _hand_over_region(self, region: SharedMemory) -> None:
        self.call(
            "SET_MEM_TABLE",
            regions=[{"guest_addr": 0, "size": region.size, "fd": self._memfd}],
        )

    def read_config(self, size: int, offset: int = 0) -> bytes:
        """GET_CONFIG; exactly ``size`` bytes or :class:`DeviceControlError`."""
        data = bytes(self.call("GET_CONFIG", offset=offset, size=size)["data"])
        if len(data) != size:
            raise DeviceControlError(
                self.name, "GET_CONFIG", "BAD_REPLY", f"asked {size} bytes, got {len(data)}"
            )
        return data

    def _setup_vring(self, index: int, layout: RingLayout) -> Callable[[], None]:
        self.call("SET_VRING_NUM", index=index, num=layout.size)
        self.call(
            "SET_VRING_ADDR", index=index, desc=layout.desc, avail=layout.avail, used=layout.used
        )
        self.call("SET_VRING_BASE", index=index, base=0)
        self.call("SET_VRING_KICK", index=index, endpoint=self._kick_ep)
        self.call("SET_VRING_CALL", index=index, endpoint=self._call_ep)
        self.call("SET_VRING_ENABLE", index=index, enable=True)
        if self._kick is None:
            self._kick = Doorbell(self._kick_ep)
        ring = self._kick.ring
        return lambda: ring(index)

    def _start_device(self) -> None:
        status = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
        self.call("SET_STATUS", status=int(status))

    # ------------------------------------------------------------------ interrupts
    def _irq_sources(self) -> list[Pollable]:
        assert self._call is not None and self.proc is not None
        return [self._call, self.proc]

    def _collect_interrupts(self, ready: list[object]) -> tuple[list[int], str | None]:
        assert self._call is not None and self.proc is not None
        proc = self.proc
        indices = self._call.recv_all()
        gone = None
        if (proc in ready or not ready) and not proc.alive():
            gone = f"device process {proc.exit_description()}"
        return indices, gone

    def _drain_interrupts(self) -> None:
        if self._call is not None:
            self._call.recv_all()

    def _config_changed(self) -> None:
        """A CONFIG_CHANGE interrupt. The status check (GET_STATUS) and the drivers'
        hooks (which read the config space) are control round trips: they run on a
        config worker thread, never on the interrupt thread, and a storm of config
        interrupts coalesces into at most one check running and one pending (bounded
        work per interrupt, whatever the device sends)."""
        with self._cfg_lock:
            self._cfg_pending = True
            if self._cfg_running:
                return
            self._cfg_running = True
        start_thread(self._config_worker, name=f"cfg-{self.name}-{id(self):x}", daemon=True)

    def _config_worker(self) -> None:
        while True:
            with self._cfg_lock:
                if not self._cfg_pending or self._client is None:
                    self._cfg_running = False
                    return
                self._cfg_pending = False
            try:
                self._check_config_change()
            except Exception:  # the worker must not die with the flag set
                log.exception("%s: config-change check failed", self.name)

    def _check_config_change(self) -> None:
        try:
            status = int(self.call("GET_STATUS", timeout_s=2.0)["status"])
        except (DeviceControlError, DeviceGoneError) as e:
            log.debug("%s: GET_STATUS after config change failed: %s", self.name, e)
            return
        if status & Status.DEVICE_NEEDS_RESET:
            self.request_recovery("device-broke-ring", "device needs reset")
            return
        super()._config_changed()

    # ------------------------------------------------------------------ shutdown
    def _stop_device(self) -> None:
        proc = self.proc
        if proc is not None and proc.alive() and self._client is not None:
            try:
                self.call("RESET_DEVICE", timeout_s=RESET_TIMEOUT_S)
            except (DeviceControlError, DeviceGoneError, ProtocolError):
                pass

    def _close_channels(self) -> None:
        memfd, self._memfd = self._memfd, None
        if memfd is not None:
            os.close(memfd)  # our mapping stays valid without it
        for obj in (self._kick, self._client, self._call):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    log.debug("%s: close of %r failed", self.name, obj, exc_info=True)
        self._kick = self._client = self._call = None
        proc = self.proc
        if proc is not None:
            try:
                proc.stop()
            except Exception:
                log.debug("%s: stopping the device process failed", self.name, exc_info=True)
            try:
                proc.close()
            except Exception:
                pass

    def _free_region(self, region: SharedMemory) -> None:
        region.close()

    # ------------------------------------------------------------------ recovery
    def _can_recover(self) -> bool:
        return self._memfd is not None and self.region is not None and self.info is not None

    def _relaunch(self) -> None:
        """Kill the device process (if it still runs) and start the same command again
        (it inherits the same memfd); connect a new control client."""
        old = self.proc
        if old is not None:
            try:
                old.kill()
                old.close()
            except Exception:
                log.debug("%s: stopping the old device process failed", self.name, exc_info=True)
        self._drop_channels()
        with self._state_lock:
            if self._closed:
                raise DeviceGoneError(self.name, "restart", "kernel shutting down")
            self.proc = self._start_process()
            self._client = ControlClient(self._ctl_ep, peer_alive=self.proc.alive)

    def _drop_channels(self) -> None:
        """Close the control client and the kick doorbell of a device that is gone (they
        may hold requests it never answered); new ones are made for the next one."""
        for obj in (self._client, self._kick):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        self._client = self._kick = None

    def _wait_device_info(self) -> DeviceInfo:
        """GET_DEVICE_INFO of a process just started, in short slices so that a
        shutdown does not wait for the whole start-up timeout."""
        time_left = STARTUP_TIMEOUT_S
        while True:
            if self._stopping:
                raise DeviceGoneError(self.name, "GET_DEVICE_INFO", "kernel shutting down")
            try:
                self.call("GET_DEVICE_INFO", timeout_s=min(0.5, time_left))
                break
            except DeviceGoneError as e:
                time_left -= 0.5
                if not isinstance(e.__cause__, ChannelTimeout) or time_left <= 0:
                    raise
        return self.get_device_info()

    def _reinit_device(self, restart: bool) -> bool:
        """Reset (or restart, when ``restart`` or the device does not answer) and bring
        the device up again exactly as before. Returns True if the process was
        restarted."""
        old = self.info
        assert old is not None and self.region is not None
        if not restart:
            try:
                self.call("RESET_DEVICE", timeout_s=RESET_TIMEOUT_S)
            except (DeviceControlError, DeviceGoneError) as e:
                log.info("%s: reset failed (%s): restarting the device process", self.name, e)
                restart = True
        if restart:
            if not getattr(self.spec, "restartable", True):
                raise DeviceGoneError(self.name, "restart", "its state died with its process")
            self._relaunch()
            info = self._wait_device_info()
            if (
                info.device_id != old.device_id
                or info.num_queues != old.num_queues
                or info.max_queue_size < self._queue_cap
            ):
                self.info = old
                raise DeviceProbeError(
                    self.name, f"the restarted device is not the same: {info} (was {old})"
                )
        features = self.features
        got = self.negotiate(lambda offered: features)
        if got != features:
            self.features = features
            raise DeviceProbeError(
                self.name,
                "the device no longer accepts the features negotiated before "
                f"({', '.join(feature_names(features ^ got, self.device_id))} differ)",
            )
        self._hand_over_region(self.region)
        self._rebuild_queues()
        self._start_device()
        return restart
