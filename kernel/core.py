"""``kernel.boot()``: bring devices up, hand out the kernel, tear everything down.

Theory of operation
-------------------
:func:`boot` is the whole life cycle in one call: it sweeps what crashed runs left
behind (``/dev/shm/vlab-*`` segments, runtime directories of dead processes), creates
a private 0700 :class:`~hostops.rundir.RuntimeDir` for the endpoints and logs, starts
every device process at once (their start-up overlaps), then probes them one by one on
the virtio bus (:mod:`kernel.bus`): device ``i`` of a kind gets the name ``<prefix>a``,
``<prefix>b``, ... (``vda``, ``vdb`` for disks). A device the kernel attaches to
(``kernel.Attach(ENDPOINT)``, :mod:`kernel.transport_attach`) is named in the same
sequence once it has said what it is (its device id: ``vda``, ``eth0``, ``rng0``). If
any device fails to come up, everything already started is torn down and
:class:`~kernel.errors.DeviceProbeError` says which device failed and why (with its log).

The returned :class:`Kernel` owns all of it. :meth:`Kernel.shutdown` -- idempotent,
safe from any thread -- closes every fd, resets each device (best effort), stops its
interrupt thread and process, unmaps and unlinks its region and removes the runtime
directory. It runs on every way out: leaving the ``with`` block (also by
KeyboardInterrupt), SIGTERM (``hostops.signals.on_terminate``) and interpreter exit
(``register_atexit``). A SIGKILL of the user's process leaves nothing either: a
device's memory is an anonymous memfd (vhost-user: the same; no shm name to leak), the
device processes notice their parent's death, and the next :func:`boot` sweeps the
runtime directory -- and the shm segments of attached devices (named after the dead
kernel's pid; an attached device keeps running and is reset by the next kernel).

A device that dies, hangs (a request older than the spec's ``request_timeout``), breaks
the ring protocol or sets DEVICE_NEEDS_RESET is reset or restarted by its transport
(``on_device_death="restart"``, the default, within ``restart_budget``); see
:mod:`kernel.transport` ("Failure and recovery").

Tracing: ``boot(trace=PATH)`` (or a :class:`hostops.trace.TraceSink`, or the
environment variable ``VLAB_TRACE=PATH`` when ``trace`` is not given) gives every
transport a :class:`~vdev.virtio.trace.Tracer` before its queues exist, and the device
processes started by this boot write to the same file (their environment says where).
The kernel's buffered events are flushed at shutdown (and at interpreter exit).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hostops.rundir import RuntimeDir, sweep_stale_rundirs
from hostops.shm import sweep_stale_segments
from hostops.signals import on_terminate, register_atexit
from hostops.sync import Event, Lock, is_main_thread, start_thread
from hostops.timers import TimerHeap
from hostops.trace import TraceSink, clock_ns, open_sink, set_child_destination, sink_from_env
from vdev.virtio import RingLayout
from vdev.virtio.net import format_mac
from vdev.virtio.trace import Tracer

from .blk import BlockDevice
from .bus import VirtioBus, VirtioDriver, default_bus
from .net.stack import Stack
from .specs import DeviceSpec
from .syscalls import Syscalls
from .transport import KernelQueue, VirtioTransport
from .transport_attach import AttachTransport
from .transport_vhost_user import VhostUserTransport
from .transport_zmq import ZmqTransport
from .virtio_net import NetLink

__all__ = [
    "boot",
    "Kernel",
    "VirtioDevice",
    "RingView",
    "device_name",
    "TRANSPORTS",
    "register_transport",
]

#: Transport classes by ``DeviceSpec.transport`` (add with :func:`register_transport`).
TRANSPORTS: dict[str, type[VirtioTransport]] = {
    ZmqTransport.kind: ZmqTransport,
    VhostUserTransport.kind: VhostUserTransport,
    AttachTransport.kind: AttachTransport,
}
_transports_lock = Lock()


def register_transport(kind: str, cls: type[VirtioTransport], *, replace: bool = False) -> None:
    """Let specs with ``transport = kind`` be reached through ``cls`` (a
    :class:`~kernel.transport.VirtioTransport` subclass). ValueError if ``kind`` is
    taken by another class (unless ``replace``) or empty; TypeError for a class that is
    not a transport."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"transport kind must be a non-empty string, got {kind!r}")
    if not (isinstance(cls, type) and issubclass(cls, VirtioTransport)):
        raise TypeError(f"{cls!r} is not a VirtioTransport subclass")
    with _transports_lock:
        old = TRANSPORTS.get(kind)
        if old is not None and old is not cls and not replace:
            raise ValueError(f"transport {kind!r} is {old.__name__} already (pass replace=True)")
        TRANSPORTS[kind] = cls


log = logging.getLogger(__name__)

#: How long boot() waits for each NIC's carrier before returning anyway.
LINK_WAIT_S = 5.0
#: How long the SIGTERM handler waits for the shutdown before letting the process exit.
SIGTERM_GRACE_S = 5.0
#: How long a second shutdown() call waits for one already in progress elsewhere.
SHUTDOWN_WAIT_S = 30.0


def device_name(prefix: str, index: int, naming: str = "letters") -> str:
    """Linux-style names: disks ``vda`` … ``vdz``, ``vdaa`` …; with ``naming="numbers"``
    interfaces ``eth0``, ``eth1`` …"""
    if naming == "numbers":
        return f"{prefix}{index}"
    letters = ""
    i = index
    while True:
        letters = chr(ord("a") + i % 26) + letters
        i = i // 26 - 1
        if i < 0:
            return prefix + letters


@dataclass(frozen=True)
class RingView:
    """Where queue rings live, for inspection: ``memory`` is a read-only view of the
    whole shared region as the kernel maps it; ``desc``, ``avail``, ``used`` are byte
    offsets of the three parts in it; ``size`` is the queue size N."""

    memory: memoryview
    desc: int
    avail: int
    used: int
    size: int


class VirtioDevice:
    """One device of a booted kernel, as the user sees it.

    ``name`` (``"vda"``), ``device_id``, ``pid`` (of the device process; for a
    vhost-user back-end the peer's pid from ``SO_PEERCRED``, None if unknown),
    ``features`` (negotiated feature names), ``feature_bits``, ``queues`` (each with
    ``.stats``), ``block`` (the :class:`BlockDevice` for a disk, else None),
    ``driver``, ``transport``.
    """

    def __init__(self, transport: VirtioTransport, driver: VirtioDriver) -> None:
        self.transport = transport
        self.driver = driver
        self.name = transport.name
        self.device_id = transport.device_id
        self.feature_bits = transport.features
        self.features: list[str] = transport.feature_names
        self.queues: list[KernelQueue] = [q for q in transport.queues if q is not None]
        self.block: BlockDevice | None = driver.block
        #: The network link of a NIC (a :class:`~kernel.virtio_net.NetLink`), else None.
        self.link: NetLink | None = getattr(driver, "link", None)

    @property
    def pid(self) -> int | None:
        """The pid of the process serving the device now (a restart changes it)."""
        return self.transport.pid

    @property
    def recovery(self) -> dict[str, int]:
        """The kernel's recovery counters for this device (restarts, resets, timeouts,
        lost_interrupts_recovered, ...: :data:`kernel.transport.RECOVERY_COUNTERS`)."""
        return self.transport.recovery

    def wait_recovered(self, count: int = 1, timeout_s: float | None = None) -> bool:
        """Block until the device has been brought back ``count`` times in all (True),
        it failed for good, or ``timeout_s`` passed (False)."""
        return self.transport.wait_recovered(count, timeout_s)

    # -- NICs
    @property
    def mac(self) -> str | None:
        """The NIC's MAC address as ``aa:bb:cc:dd:ee:ff`` (None for other devices)."""
        return format_mac(self.link.mac) if self.link is not None else None

    @property
    def mtu(self) -> int | None:
        """The NIC's MTU (None for other devices)."""
        return self.link.mtu if self.link is not None else None

    @property
    def link_up(self) -> bool | None:
        """The NIC's carrier (None for other devices)."""
        return self.link.link_up if self.link is not None else None

    def _link_counter(self, name: str) -> int:
        if self.link is None:
            raise AttributeError(f"{self.name} is not a network device")
        return self.link.counters[name]

    @property
    def rx_frames(self) -> int:
        """Frames the driver received and handed to the stack."""
        return self._link_counter("rx_frames")

    @property
    def tx_frames(self) -> int:
        """Frames the driver handed to the device."""
        return self._link_counter("tx_frames")

    @property
    def rx_bad_frames(self) -> int:
        """Receive completions the driver dropped as malformed."""
        return self._link_counter("rx_bad_frames")

    @property
    def rx_dropped_no_buffer(self) -> int:
        """Frames the *device* dropped because no receive buffer was free (asks the
        device: GET_METRICS)."""
        if self.link is None:
            raise AttributeError(f"{self.name} is not a network device")
        return int(self.metrics().get("device", {}).get("rx_dropped_no_buffer", 0))

    @property
    def failed(self) -> OSError | None:
        """Why the device stopped working (died, needs reset, broke the rules), or None."""
        return self.transport.failed

    def wait_failed(self, timeout_s: float | None = None) -> OSError | None:
        """Block until the device fails (or ``timeout_s`` passes); returns
        :attr:`failed`."""
        return self.transport.wait_failed(timeout_s)

    def metrics(self) -> dict[str, Any]:
        """The device's own counters (GET_METRICS): ``{"device": {...}, "queues":
        [{...}, ...]}``. Raises :class:`~kernel.errors.DeviceGoneError` if it died.
        ``{}`` for a vhost-user device (the protocol has no way to ask)."""
        return self.transport.metrics()

    def ring_layout(self, index: int = 0) -> RingView:
        """Where queue ``index``'s rings are in the shared region (read-only view)."""
        t = self.transport
        q = self.queues[index]
        if t.region is None or t.memory is None:
            raise RuntimeError(f"{self.name}: the device's memory is no longer mapped")
        lay: RingLayout = q.layout
        return RingView(t.region.buf.toreadonly(), lay.desc, lay.avail, lay.used, lay.size)

    def __repr__(self) -> str:
        return f"<VirtioDevice {self.name} id={self.device_id} pid={self.pid}>"


class Kernel:
    """A booted kernel: ``devices``, ``sys`` (the syscall layer) and :meth:`shutdown`.
    Use it as a context manager."""

    def __init__(self, rundir: RuntimeDir) -> None:
        self.rundir = rundir
        self.devices: list[VirtioDevice] = []
        self._transports: list[VirtioTransport] = []
        self._lock = Lock()
        self._down = False
        self._done = Event()
        self._uninstall: list[Callable[[], Any]] = []
        #: The kernel's one timer thread (ARP, reassembly, later TCP).
        self.timers = TimerHeap(name="kernel-timers")
        #: The network stack (interfaces eth0, eth1, ... of the booted NICs).
        self.net = Stack(timers=self.timers)
        self.sys = Syscalls(self._block_devices, net=self.net)
        #: The trace sink (None when the kernel is not traced).
        self.trace_sink: TraceSink | None = None

    def _block_devices(self) -> dict[str, BlockDevice]:
        return {d.name: d.block for d in self.devices if d.block is not None}

    def device(self, name: str) -> VirtioDevice:
        """The device called ``name`` (KeyError if there is none)."""
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def is_shut_down(self) -> bool:
        """True once :meth:`shutdown` has run."""
        return self._down

    def _install_handlers(self) -> None:
        self._uninstall.append(register_atexit(self.shutdown))
        if is_main_thread():
            try:
                self._uninstall.append(on_terminate(self._on_sigterm))
            except ValueError:  # not possible from this thread / interpreter state
                pass

    def _on_sigterm(self) -> None:
        # We are inside a signal handler on the main thread, which may hold a lock the
        # shutdown needs (a queue lock, the control channel). Shut down on a helper
        # thread; if it cannot finish now, it finishes once hostops' SystemExit has
        # unwound the main thread, and every later shutdown() call waits for it.
        t = start_thread(self.shutdown, name="kernel-sigterm-shutdown")
        t.join(SIGTERM_GRACE_S)

    def shutdown(self) -> None:
        """Close every fd, reset and stop every device, release every region and the
        runtime directory. Idempotent; safe from any thread and from signal handlers."""
        with self._lock:
            first = not self._down
            self._down = True
        if not first:
            self._done.wait(SHUTDOWN_WAIT_S)
            return
        try:
            self._shutdown()
        finally:
            self._done.set()

    def _shutdown(self) -> None:
        self.sys.shutdown()
        try:
            self.net.close()
        except Exception:
            log.exception("closing the network stack failed")
        for t in reversed(self._transports):
            try:
                t.shutdown()
            except Exception:
                log.exception("%s: shutdown failed", t.name)
        for d in self.devices:
            try:
                d.driver.remove()
            except Exception:
                log.exception("%s: driver remove failed", d.name)
        try:
            self.rundir.cleanup()
        except Exception:
            log.exception("removing the runtime directory failed")
        try:
            self.timers.close()
        except Exception:
            log.exception("stopping the timers failed")
        if self.trace_sink is not None:
            self.trace_sink.flush()
        for undo in self._uninstall:
            try:
                undo()
            except Exception:
                pass
        self._uninstall.clear()

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "down" if self._down else "up"
        return f"<Kernel {state} devices={[d.name for d in self.devices]}>"


def boot(
    devices: Sequence[DeviceSpec] = (),
    *,
    region_size: int | None = None,
    bus: VirtioBus | None = None,
    trace: str | os.PathLike[str] | TraceSink | None = None,
) -> Kernel:
    """Start a kernel with the given devices (``kernel.Blk(...)``, ...).

    ``region_size`` sets the size of each device's shared region (rings + DMA pool;
    default: the rings plus 8 MiB). ``bus`` is the driver table (default: the one the
    built-in drivers and :func:`kernel.register_driver` use). Raises
    :class:`~kernel.errors.DeviceProbeError` if a device cannot be brought up (nothing
    is left running then). ``trace`` (a path, or a :class:`hostops.trace.TraceSink`;
    default: the file ``VLAB_TRACE`` names, if set) traces every queue of every device,
    in this process and in the device processes (``docs/trace-format.md``).
    """
    specs = list(devices)
    for s in specs:
        if not isinstance(s, DeviceSpec):
            raise TypeError(f"not a device spec: {s!r} (use kernel.Blk(...))")
    if region_size is not None and (not isinstance(region_size, int) or region_size <= 0):
        raise ValueError(f"region_size must be a positive int, got {region_size!r}")
    bus = bus or default_bus
    sink: TraceSink | None
    if trace is None:
        sink = sink_from_env()
    elif isinstance(trace, TraceSink):
        sink = trace
    else:
        sink = open_sink(os.fspath(trace))
    tracer = None
    if sink is not None:
        tracer = Tracer(
            sink.write, clock_ns, pid=os.getpid(), kpid=os.getpid(), dev=None, side="driver"
        )
    sweep_stale_segments()
    sweep_stale_rundirs()
    k = Kernel(RuntimeDir.create())
    k.trace_sink = sink
    old_dest = set_child_destination(sink.path if sink is not None else None)
    try:
        k._install_handlers()
        counters: dict[str, int] = {}

        def next_name(prefix: str, naming: str) -> str:
            i = counters.get(prefix, 0)
            counters[prefix] = i + 1
            return device_name(prefix, i, naming)

        for spec in specs:
            cls = TRANSPORTS.get(spec.transport)
            if cls is None:
                raise ValueError(f"{spec!r}: unknown transport {spec.transport!r}")
            # an attached device is named once it said what it is (launch asks it)
            named_by_device = issubclass(cls, AttachTransport)
            if named_by_device:
                name = f"attach{len(k._transports)}"  # until it said what it is
            else:
                name = next_name(spec.name_prefix, spec.naming)
            t = cls(name, spec, k.rundir, region_size=region_size)
            if tracer is not None and not named_by_device:
                t.tracer = tracer.bind(t.name)
            k._transports.append(t)
            t.launch()
            if isinstance(t, AttachTransport):
                t.rename(next_name(*t.naming()))
                if tracer is not None:
                    t.tracer = tracer.bind(t.name)
        for t in k._transports:
            driver = bus.probe(t)
            dev = VirtioDevice(t, driver)
            k.devices.append(dev)
            nodes = getattr(driver, "nodes", None)
            if callable(nodes):  # a driver with k.sys nodes (/dev/hwrng, ...)
                table = nodes()
                if table is not None:
                    k.sys.add_nodes(table)
            if dev.link is not None:
                try:
                    k.net.add_interface(
                        dev.link,
                        ip=getattr(t.spec, "ip", "10.0.0.2/24"),
                        gateway=getattr(t.spec, "gateway", None),
                    )
                except ValueError as e:
                    raise t.probe_error(str(e)) from e
        # A NIC whose backend is still connecting (a switch port waits for the switch's
        # welcome) reports no carrier; give it a moment so the first send does not fail
        # with ENETDOWN. A link that stays down is not an error: it is reported.
        for dev in k.devices:
            if dev.link is not None and not dev.link.wait_link_up(LINK_WAIT_S):
                log.warning("%s: no carrier after %.0f s", dev.name, LINK_WAIT_S)
    except BaseException:
        k.shutdown()
        raise
    finally:
        set_child_destination(old_dest)
    return k
