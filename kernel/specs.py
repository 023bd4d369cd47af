"""Device specifications: what ``kernel.boot(devices=[...])`` is asked to bring up.

Theory of operation
-------------------
A spec is a small frozen dataclass that knows two things: how to start its device
process (:meth:`DeviceSpec.argv` builds ``python -m vdev <kind> ... --control
ENDPOINT``) and how the kernel names the device (``name_prefix``: ``vd`` gives ``vda``,
``vdb``, ...). Everything else -- which driver binds, which features are taken -- is
decided on the virtio bus from what the device itself reports (GET_DEVICE_INFO,
GET_FEATURES), exactly as with hardware: the spec only says which backend to plug in.

New kinds (``Net``, ``Custom("pkg.module:Class", **opts)``) subclass
:class:`DeviceSpec`, set ``kind``/``name_prefix`` and implement :meth:`device_args`.

``transport`` says how the kernel reaches the device: ``"zmq"`` (the default: a device
process the kernel starts, :mod:`kernel.transport_zmq`) or ``"vhost-user"`` (a back-end
somebody else started, listening on a Unix socket: :class:`VhostUserBlk`,
:class:`VhostUserNet`, :mod:`kernel.transport_vhost_user`) or ``"attach"`` (a device
process of ours somebody else started with ``--shm-by-name``: :class:`Attach`,
:mod:`kernel.transport_attach`; the device itself says what it is). vhost-user has no device id
on the wire, so such a spec also says what the device is (``device_id``). Like QEMU, a
vhost-user front-end may own part of the device itself: ``frontend_features`` are
feature bits the front-end implements (offered to the driver whatever the back-end
offers, passed on to it only if it offers them too) and
:meth:`DeviceSpec.frontend_config` is the config space the driver reads instead of
asking the back-end (GET_CONFIG). For virtio-net the MAC, the link status and the MTU
are the front-end's (QEMU's vhost-user net never asks its back-end for config space
either).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hostops.process import python_argv
from vdev.virtio import DeviceId, NetF, bit
from vdev.virtio.faults import FaultPlan, FaultPlanError
from vdev.virtio.net import (
    MAX_MTU,
    MAX_QUEUE_PAIRS,
    MIN_MTU,
    S_LINK_UP,
    NetConfig,
    format_mac,
    parse_mac,
)
from vdev.virtio.poll import DEFAULT_POLL_US, MAX_POLL_US

__all__ = [
    "DeviceSpec",
    "Blk",
    "VhostUserBlk",
    "Net",
    "VhostUserNet",
    "Custom",
    "Attach",
    "DEFAULT_RECONNECT_TIMEOUT_S",
    "NET_BACKENDS",
    "DEATH_POLICIES",
    "DEFAULT_REQUEST_TIMEOUT_S",
    "DEFAULT_RESTART_BUDGET",
    "resolve_fault_plan",
    "MAX_BLK_QUEUES",
]

#: Most request queues of a :class:`Blk` (``queues``).
MAX_BLK_QUEUES = 16

#: ``on_device_death`` values: restart the device process (and reset a device that broke
#: the ring or timed out), or fail the device for good (the foundation's behaviour).
DEATH_POLICIES = ("restart", "fail")
#: Default per-request timeout (seconds) of request queues.
DEFAULT_REQUEST_TIMEOUT_S = 30.0
#: Default restart budget: at most this many recoveries (restarts or resets) per window.
DEFAULT_RESTART_BUDGET = (3, 60.0)


def _check_recovery_options(who: str, spec: DeviceSpec) -> None:
    """ValueError naming the field when ``on_device_death``, ``request_timeout``,
    ``restart_budget``, ``poll_us``, ``device_poll_us`` or ``faults`` is malformed."""
    if spec.on_device_death not in DEATH_POLICIES:
        raise ValueError(
            f"{who}: on_device_death {spec.on_device_death!r} is not one of {DEATH_POLICIES}"
        )
    t = spec.request_timeout
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not t > 0):
        raise ValueError(f"{who}: request_timeout {t!r} is not a positive number or None")
    b = spec.restart_budget
    if (
        not isinstance(b, tuple | list)
        or len(b) != 2
        or isinstance(b[0], bool)
        or not isinstance(b[0], int)
        or b[0] < 0
        or isinstance(b[1], bool)
        or not isinstance(b[1], int | float)
        or not b[1] > 0
    ):
        raise ValueError(
            f"{who}: restart_budget {b!r} is not (max restarts >= 0, window seconds > 0)"
        )
    for name in ("poll_us", "device_poll_us"):
        p = getattr(spec, name)
        if p is None and name == "device_poll_us":
            continue
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= MAX_POLL_US:
            raise ValueError(
                f"{who}: {name} {p!r} is not a number of microseconds in 0..{MAX_POLL_US}"
            )
    if not isinstance(spec.poll_fixed, bool):
        raise ValueError(f"{who}: poll_fixed {spec.poll_fixed!r} is not True or False")
    f = spec.faults
    if f is not None and not isinstance(f, FaultPlan | dict | str | os.PathLike):
        raise ValueError(f"{who}: faults {f!r} is not a FaultPlan, a dict or a plan file path")
    if isinstance(f, dict):
        try:
            FaultPlan.from_dict(f)
        except FaultPlanError as e:
            raise ValueError(f"{who}: faults: {e}") from None


def _check_queue_size(who: str, q: object) -> int:
    """``q`` as a ring size (a power of two in 1..32768, §2.7); ValueError naming
    ``who`` otherwise."""
    if isinstance(q, bool) or not isinstance(q, int) or q < 1 or q > 32768 or q & (q - 1):
        raise ValueError(f"{who}: queue_size {q!r} is not a power of two in 1..32768")
    return q


def _init_recovery(
    spec: DeviceSpec,
    who: str,
    on_device_death: str,
    request_timeout: float | None,
    restart_budget: tuple[int, float],
    faults: Any,
    poll_us: float = DEFAULT_POLL_US,
    device_poll_us: float | None = None,
) -> None:
    """Set and check the recovery (and polling) options of a spec with a hand-written
    ``__init__`` (a frozen dataclass with positional-only arguments)."""
    object.__setattr__(spec, "poll_us", poll_us)
    object.__setattr__(spec, "device_poll_us", device_poll_us)
    object.__setattr__(spec, "on_device_death", on_device_death)
    object.__setattr__(spec, "request_timeout", request_timeout)
    object.__setattr__(spec, "restart_budget", restart_budget)
    object.__setattr__(spec, "faults", faults)
    _check_recovery_options(who, spec)


def resolve_fault_plan(
    faults: FaultPlan | dict[str, Any] | str | os.PathLike[str],
) -> dict[str, Any]:
    """The plan as data with its seed (``FaultPlan.to_dict()``): a FaultPlan as it is,
    a dict validated, a ``.json``/``.toml``/``.yaml`` file read and validated. Raises
    ValueError (FaultPlanError) naming what is wrong."""
    if isinstance(faults, FaultPlan):
        return faults.to_dict()
    if isinstance(faults, dict):
        return FaultPlan.from_dict(faults).to_dict()
    path = os.fspath(faults)
    suffix = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(1 << 20)
    except OSError as e:
        raise FaultPlanError(f"plan: cannot read {path}: {e.strerror}") from None
    if suffix in (".yaml", ".yml"):
        import importlib

        try:
            yaml = importlib.import_module("yaml")
        except ImportError:
            raise FaultPlanError(f"plan: {path}: YAML plans need PyYAML") from None
        try:
            data = yaml.safe_load(text)
        except Exception as e:  # yaml.YAMLError
            raise FaultPlanError(f"plan: {path}: YAML syntax: {' '.join(str(e).split())}") from None
        return FaultPlan.from_dict(data).to_dict()
    fmt = {".json": "json", ".toml": "toml"}.get(suffix)
    if fmt is None:
        raise FaultPlanError(f"plan: {path}: unknown format (use .json, .toml or .yaml)")
    return FaultPlan.from_text(text, fmt).to_dict()


@dataclass(frozen=True)
class DeviceSpec:
    """Base of every device spec.

    Subclasses set ``kind`` (the ``vdev`` subcommand), ``name_prefix`` (the kernel's
    naming scheme) and implement :meth:`device_args`; ``queue_size`` is the ring size
    the driver asks for (capped by what the device allows).
    """

    #: What the kernel does when the device process dies, breaks the ring protocol,
    #: sets DEVICE_NEEDS_RESET or times out: ``"restart"`` (restart / reset it and
    #: resubmit, within ``restart_budget``) or ``"fail"`` (EIO for good).
    on_device_death: str = field(default="restart", kw_only=True)
    #: Seconds a request may stay with the device before it fails with ETIMEDOUT and
    #: the device is reset (None: wait forever).
    request_timeout: float | None = field(default=DEFAULT_REQUEST_TIMEOUT_S, kw_only=True)
    #: ``(n, window_s)``: at most ``n`` recoveries per ``window_s`` seconds, then the
    #: device fails for good.
    restart_budget: tuple[int, float] = field(default=DEFAULT_RESTART_BUDGET, kw_only=True)
    #: A fault plan for the device process (a FaultPlan, a dict, or a plan file).
    faults: Any = field(default=None, kw_only=True, compare=False)
    #: Hybrid polling on the kernel side: after an interrupt, the interrupt thread
    #: watches the used ring up to this many microseconds (an adaptive window,
    #: :mod:`vdev.virtio.poll`) while requests are in flight; 0 turns it off.
    poll_us: float = field(default=DEFAULT_POLL_US, kw_only=True)
    #: Hybrid polling on the device side: ``--poll-us`` of the device process the
    #: kernel starts (None: the device's default; 0 turns it off).
    device_poll_us: float | None = field(default=None, kw_only=True)
    #: Hybrid polling without adaptation on both sides (every window lasts its bound;
    #: the device gets ``--poll-fixed``): for measurements and tests.
    poll_fixed: bool = field(default=False, kw_only=True)

    kind: ClassVar[str] = ""
    name_prefix: ClassVar[str] = "vd"
    #: How devices of this kind are numbered: "letters" (vda, vdb) or "numbers" (eth0).
    naming: ClassVar[str] = "letters"
    transport: ClassVar[str] = "zmq"
    #: vhost-user: feature bits the front-end implements itself (offered to the driver
    #: whatever the back-end offers; passed on to the back-end only if it offers them).
    frontend_features: ClassVar[int] = 0
    #: Set on specs of devices somebody else starts ("a vhost-user device"): asking
    #: for their command line is a TypeError saying so.
    not_started: ClassVar[str] = ""

    def frontend_config(self) -> bytes | None:
        """vhost-user: the config space the front-end owns (the driver reads it instead
        of asking the back-end), or None (ask the back-end: GET_CONFIG). Called once per
        device bring-up."""
        return None

    def device_args(self) -> list[str]:
        """Command-line arguments of the device, after the subcommand and without
        ``--control``."""
        if self.not_started:
            raise TypeError(f"{self.not_started} is not started by the kernel")
        raise NotImplementedError

    def dma_bytes(self, queue_size: int) -> int | None:
        """DMA pool bytes this device needs with rings of ``queue_size`` entries
        (None: the transport's default). ``boot(region_size=...)`` overrides it."""
        return None

    @property
    def requested_queue_size(self) -> int:
        """The ring size the driver asks for (default 128)."""
        return int(getattr(self, "queue_size", 128))

    def argv(
        self,
        control_endpoint: str,
        *,
        faults_file: str | None = None,
        faults_state: str | None = None,
    ) -> list[str]:
        """The full command that starts this device's process, listening for control
        requests at ``control_endpoint`` (with ``--faults FILE --faults-state FILE2``
        when given)."""
        if self.not_started:
            raise TypeError(f"{self.not_started} is not started by the kernel")
        if not self.kind:
            raise TypeError(f"{type(self).__name__} does not name a device kind")
        extra: list[str] = []
        if self.device_poll_us is not None:
            extra += ["--poll-us", f"{self.device_poll_us:g}"]
        if self.poll_fixed:
            extra.append("--poll-fixed")
        if faults_file is not None:
            extra += ["--faults", faults_file]
            if faults_state is not None:
                extra += ["--faults-state", faults_state]
        return python_argv(
            "vdev", self.kind, *self.device_args(), *extra, "--control", control_endpoint
        )

    @property
    def restartable(self) -> bool:
        """Whether a new device process can take over from a dead one without losing
        state the driver relies on (default True; a RAM disk says no)."""
        return True

    def fault_plan_json(self) -> str | None:
        """The spec's fault plan as JSON with its seed (None without ``faults``)."""
        if self.faults is None:
            return None
        return json.dumps(resolve_fault_plan(self.faults), sort_keys=True)


@dataclass(frozen=True)
class Blk(DeviceSpec):
    """A virtio-blk device backed by the raw image file ``path`` (or, with
    :meth:`Blk.memory`, by a RAM disk inside the device process).

    ``readonly`` starts the device with ``--readonly`` (it then offers
    VIRTIO_BLK_F_RO and the kernel refuses writes with EROFS); ``queue_size`` is the
    ring size requested (a power of two, capped by the device's maximum).

    ``integrity`` (default False) turns on the block layer's integrity mode
    (:mod:`kernel.blk`, "Integrity"): CRC32 of every sector this kernel wrote, reads
    verified (re-read, repaired from the write journal, or EIO -- never wrong data),
    and every fsync reads its journaled writes back and rewrites what differs before
    the FLUSH goes out. It costs a CRC per 512 bytes read or written, about 150 bytes
    of memory per written sector (at most ``kernel.blk.INTEGRITY_MAX_SECTORS``), and
    an fsync reads back everything written since the previous one.

    ``queues`` (default 1, at most :data:`MAX_BLK_QUEUES`): request queues. With more
    than one the device is started with ``--num-queues N`` and offers
    VIRTIO_BLK_F_MQ; the driver takes it and spreads requests over the queues by
    submitting thread (:meth:`kernel.blk.BlockDevice.current_queue`).
    """

    path: str | None = None
    readonly: bool = False
    queue_size: int = 128
    memory_size: int | None = None
    integrity: bool = field(default=False, kw_only=True)
    queues: int = field(default=1, kw_only=True)

    kind: ClassVar[str] = "blk"
    name_prefix: ClassVar[str] = "vd"

    def __post_init__(self) -> None:
        _check_recovery_options("Blk", self)
        if (self.path is None) == (self.memory_size is None):
            raise ValueError("Blk: give exactly one of an image path or memory_size")
        if self.path is not None and (
            not isinstance(self.path, str | os.PathLike) or not os.fspath(self.path)
        ):
            raise ValueError(f"Blk: image path must be a non-empty path, got {self.path!r}")
        m = self.memory_size
        if m is not None and (not isinstance(m, int) or m <= 0 or m % 512):
            raise ValueError(f"Blk: memory size {m!r} is not a positive multiple of 512")
        _check_queue_size("Blk", self.queue_size)
        if not isinstance(self.integrity, bool):
            raise ValueError(f"Blk: integrity {self.integrity!r} is not True or False")
        n = self.queues
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"Blk: queues must be an int, got {type(n).__name__} {n!r}")
        if not 1 <= n <= MAX_BLK_QUEUES:
            raise ValueError(f"Blk: queues {n} is not in 1..{MAX_BLK_QUEUES}")

    @classmethod
    def memory(
        cls, size_bytes: int, *, readonly: bool = False, queue_size: int = 128, **kw: Any
    ) -> Blk:
        """A RAM disk of ``size_bytes`` (a multiple of 512) served by the device process
        (``--memory``): no image file, gone when the device stops (so it is never
        restarted: its process dying fails it). ``kw``: the common options
        (``request_timeout``, ``faults``, ...)."""
        return cls(None, readonly=readonly, queue_size=queue_size, memory_size=size_bytes, **kw)

    @property
    def restartable(self) -> bool:
        """A RAM disk's contents die with its process: only an image can be restarted."""
        return self.path is not None

    def device_args(self) -> list[str]:
        """``--image PATH`` or ``--memory SIZE``, then ``[--readonly] --queue-size N``
        and, with several queues, ``--num-queues N``."""
        if self.path is not None:
            args = ["--image", os.fspath(self.path)]
        else:
            args = ["--memory", str(self.memory_size)]
        if self.readonly:
            args.append("--readonly")
        args += ["--queue-size", str(self.queue_size)]
        if self.queues > 1:
            args += ["--num-queues", str(self.queues)]
        return args

    def dma_bytes(self, queue_size: int) -> int | None:
        """The default pool, plus for each further queue eight times its inline pages
        (the driver gives a queue inline pages while they take at most an eighth of the
        pool) and its request slots; None with one queue (the transport's default)."""
        if self.queues == 1:
            return None
        from .transport import DEFAULT_DMA_BYTES

        return DEFAULT_DMA_BYTES + (self.queues - 1) * queue_size * (8 * 4096 + 1024)


@dataclass(frozen=True)
class VhostUserBlk(DeviceSpec):
    """A virtio-blk device served by a vhost-user back-end listening on the Unix socket
    ``path`` (``qemu-storage-daemon --export type=vhost-user-blk,...``, ``python -m vdev
    blk --image IMG --vhost-user SOCK``, ...). The kernel connects to it as QEMU does;
    the back-end process is not the kernel's: it is neither started nor stopped by it.

    ``queue_size`` is the ring size the driver uses (a power of two; vhost-user cannot
    ask the back-end for its maximum, a back-end that allows less refuses
    SET_VRING_NUM and the probe fails saying so). Whether the disk is read-only is the
    back-end's decision (VIRTIO_BLK_F_RO).
    """

    path: str = ""
    queue_size: int = 128

    kind: ClassVar[str] = "blk"
    name_prefix: ClassVar[str] = "vd"
    transport: ClassVar[str] = "vhost-user"
    not_started: ClassVar[str] = "a vhost-user device"
    device_id: ClassVar[int] = int(DeviceId.BLOCK)

    def __post_init__(self) -> None:
        _check_recovery_options("VhostUserBlk", self)
        if not isinstance(self.path, str | os.PathLike) or not os.fspath(self.path):
            raise ValueError(f"VhostUserBlk: socket path must be non-empty, got {self.path!r}")
        _check_queue_size("VhostUserBlk", self.queue_size)


#: The net backends and the option each one requires (``None``: no option needed).
NET_BACKENDS: dict[str, tuple[str, ...]] = {
    "loopback": (),
    "switch": ("switch",),
    "tap": ("ifname",),
    "pcap": (),
}
_BACKEND_OPTIONS = ("switch", "ifname", "record", "replay")


def _net_dma_bytes(mtu: int, offload: bool, queue_size: int, pairs: int = 1) -> int:
    """DMA bytes of a NIC: receive buffers for a full ring per queue pair plus a
    transmit pool (shared by the pairs' transmit queues)."""
    from .virtio_net import rx_buffer_bytes, tx_pool_bytes

    # the driver takes GUEST_TSO4 only with MRG_RXBUF (see NetDriver.features_for)
    rx = rx_buffer_bytes(mtu, True, offload) * queue_size
    rx_plain = rx_buffer_bytes(mtu, False, False) * queue_size
    area = max(rx, rx_plain)
    if pairs > 1:
        # each pair's buffers are one allocation of the buddy allocator: a power of two
        area = 1 << (area - 1).bit_length()
    return pairs * area + tx_pool_bytes(mtu, queue_size) + (256 << 10)


def _check_net_common(
    who: str, mac: object, ip: object, gateway: object, mtu: object, q: object, offload: object
) -> None:
    """The checks :class:`Net` and :class:`VhostUserNet` share (ValueError naming the
    field)."""
    if mac is not None:
        if not isinstance(mac, str):
            raise ValueError(f"{who}: mac must be a string, got {mac!r}")
        m = parse_mac(mac)  # ValueError names the problem
        if m[0] & 1:
            raise ValueError(f"{who}: mac {mac} is a multicast address")
        if m == bytes(6):
            raise ValueError(f"{who}: mac {mac} is the all-zero address")
    if not isinstance(ip, str):
        raise ValueError(f"{who}: ip must be a string like '10.0.0.2/24', got {ip!r}")
    _parse_ipv4_cidr(ip, "ip", who)
    if gateway is not None:
        if not isinstance(gateway, str):
            raise ValueError(f"{who}: gateway must be a string, got {gateway!r}")
        _parse_ipv4_cidr(gateway + "/32", "gateway", who)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"{who}: mtu {mtu!r} is not an int in {MIN_MTU}..{MAX_MTU}")
    if isinstance(q, bool) or not isinstance(q, int) or q < 2 or q > 32768 or q & (q - 1):
        raise ValueError(f"{who}: queue_size {q!r} is not a power of two in 2..32768")
    if not isinstance(offload, bool):
        raise ValueError(f"{who}: offload must be True or False, got {offload!r}")


def _parse_ipv4_cidr(text: str, what: str, who: str = "Net") -> tuple[str, int]:
    addr, sep, plen = text.partition("/")
    parts = addr.split(".")
    ok = len(parts) == 4 and all(p.isdigit() and 0 <= int(p) <= 255 for p in parts)
    if not ok or not sep or not plen.isdigit() or not 0 <= int(plen) <= 32:
        raise ValueError(f"{who}: {what} {text!r} is not an IPv4 address/prefix (e.g. 10.0.0.2/24)")
    return addr, int(plen)


@dataclass(frozen=True)
class Net(DeviceSpec):
    """A virtio-net device (interface ``eth0``, ``eth1``, ...) on a backend.

    ``backend``: ``"loopback"`` (every frame sent comes back), ``"switch"`` (a port of
    the L2 switch at ``switch=ENDPOINT``, ``python -m vdev switch --listen ENDPOINT``),
    ``"tap"`` (a Linux TAP interface ``ifname=NAME``, root), ``"pcap"`` (``record=PATH``
    and/or ``replay=PATH``). ``ip`` is the interface's address with its prefix length,
    ``gateway`` an optional default router on that subnet, ``mac`` a fixed MAC (default:
    the device picks a locally administered one), ``mtu`` 68..65535, ``queue_size`` the
    ring size, ``offload`` whether checksum/TSO offloads are negotiated,
    ``rx_buffer_size`` the size of each receive buffer when MRG_RXBUF is negotiated
    (default: from the MTU; smaller buffers make big frames span several), ``paced``
    replays a pcap at its timestamps (default: as fast as receive buffers allow).

    ``queue_pairs`` (default 1, at most 16): receive/transmit queue pairs. With more
    than one the device is started with ``--queue-pairs N`` and offers
    VIRTIO_NET_F_CTRL_VQ and VIRTIO_NET_F_MQ; the driver takes them, turns the pairs on
    with VQ_PAIRS_SET and transmits on the sending thread's pair
    (:mod:`kernel.virtio_net`).
    """

    backend: str = "loopback"
    mac: str | None = None
    ip: str = "10.0.0.2/24"
    gateway: str | None = None
    mtu: int = 1500
    queue_size: int = 256
    offload: bool = True
    rx_buffer_size: int | None = None
    switch: str | None = None
    ifname: str | None = None
    record: str | None = None
    replay: str | None = None
    paced: bool = False
    queue_pairs: int = field(default=1, kw_only=True)

    kind: ClassVar[str] = "net"
    name_prefix: ClassVar[str] = "eth"
    naming: ClassVar[str] = "numbers"

    def __post_init__(self) -> None:
        _check_recovery_options("Net", self)
        n = self.queue_pairs
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"Net: queue_pairs must be an int, got {type(n).__name__} {n!r}")
        if not 1 <= n <= MAX_QUEUE_PAIRS:
            raise ValueError(f"Net: queue_pairs {n} is not in 1..{MAX_QUEUE_PAIRS}")
        if self.backend not in NET_BACKENDS:
            raise ValueError(
                f"Net: unknown backend {self.backend!r} (one of {', '.join(NET_BACKENDS)})"
            )
        for opt in NET_BACKENDS[self.backend]:
            if not getattr(self, opt):
                raise ValueError(f"Net: backend {self.backend!r} needs {opt}=...")
        if self.backend == "pcap" and not (self.record or self.replay):
            raise ValueError("Net: backend 'pcap' needs record=PATH and/or replay=PATH")
        for opt in _BACKEND_OPTIONS:
            v = getattr(self, opt)
            if v is not None and opt not in NET_BACKENDS[self.backend] + (
                ("record", "replay") if self.backend == "pcap" else ()
            ):
                raise ValueError(f"Net: option {opt}= does not apply to backend {self.backend!r}")
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"Net: {opt} must be a non-empty string, got {v!r}")
        _check_net_common(
            "Net", self.mac, self.ip, self.gateway, self.mtu, self.queue_size, self.offload
        )
        if not isinstance(self.paced, bool) or (self.paced and not self.replay):
            raise ValueError("Net: paced=True needs replay=PATH (it paces the replay)")
        r = self.rx_buffer_size
        if r is not None and (
            isinstance(r, bool) or not isinstance(r, int) or not 64 <= r <= 65536
        ):
            raise ValueError(f"Net: rx_buffer_size {r!r} is not an int in 64..65536")

    @property
    def mac_bytes(self) -> bytes | None:
        """The fixed MAC as six bytes (None when the device picks it)."""
        return parse_mac(self.mac) if self.mac else None

    def dma_bytes(self, queue_size: int) -> int:
        """Receive buffers for a full ring per queue pair plus a transmit pool, sized
        from the MTU."""
        return _net_dma_bytes(self.mtu, self.offload, queue_size, self.queue_pairs)

    def device_args(self) -> list[str]:
        """``--backend NAME [backend options] [--mac M] --mtu N --queue-size N`` and,
        with several pairs, ``--queue-pairs N``."""
        args = ["--backend", self.backend]
        for opt in _BACKEND_OPTIONS:
            v = getattr(self, opt)
            if v is not None:
                args += [f"--{opt}", v]
        if self.paced:
            args.append("--paced")
        if self.mac is not None:
            args += ["--mac", format_mac(parse_mac(self.mac))]
        args += ["--mtu", str(self.mtu), "--queue-size", str(self.queue_size)]
        if self.queue_pairs > 1:
            args += ["--queue-pairs", str(self.queue_pairs)]
        return args


#: The virtio-net features a vhost-user front-end owns: the config space fields (MAC,
#: link status, MTU) are the front-end's, as in QEMU (offered to the driver whatever the
#: back-end offers; passed on to the back-end when it offers them too).
NET_FRONTEND_FEATURES = bit(NetF.MAC) | bit(NetF.STATUS) | bit(NetF.MTU)


@dataclass(frozen=True)
class VhostUserNet(DeviceSpec):
    """A virtio-net NIC (``eth0``, ...) served by a vhost-user net back-end listening on
    the Unix socket ``path`` (``python -m vdev net --backend switch --switch EP
    --vhost-user SOCK``, OVS-DPDK's ``dpdkvhostuser`` port, VPP, ...). The kernel is the
    front-end, as QEMU is: it connects, it is not the back-end's owner (neither starts
    nor stops it).

    As with QEMU's ``virtio-net-pci`` on a vhost-user netdev, the front-end owns the
    config space: ``mac`` (default: a random locally administered unicast address, new
    at each boot), the link status (always up: a back-end has no way to report carrier
    without the back-end request channel; a back-end that goes away fails the device
    with EIO instead) and ``mtu`` (68..65535; the back-end is told with NET_SET_MTU
    when it offers the NET_MTU protocol feature, as QEMU does -- a back-end without it
    must be started with an MTU at least this big, or it drops the bigger frames).
    The back-end is never asked for config space and learns the MAC from the frames
    it carries, as a switch does. The data path features are negotiated with the
    back-end: EVENT_IDX, MRG_RXBUF and, with ``offload`` (the default), CSUM,
    GUEST_CSUM, HOST_TSO4, GUEST_TSO4 when it offers them. ``ip`` (address/prefix) and
    ``gateway`` configure the interface as for :class:`Net`; ``queue_size`` is the ring
    size of both queues (a power of two the back-end accepts: it refuses a bigger one
    and the probe fails saying so).
    """

    path: str = ""
    ip: str = "10.0.0.2/24"
    gateway: str | None = None
    mac: str | None = None
    mtu: int = 1500
    queue_size: int = 256
    offload: bool = True

    kind: ClassVar[str] = "net"
    name_prefix: ClassVar[str] = "eth"
    naming: ClassVar[str] = "numbers"
    transport: ClassVar[str] = "vhost-user"
    not_started: ClassVar[str] = "a vhost-user device"
    device_id: ClassVar[int] = int(DeviceId.NET)
    frontend_features: ClassVar[int] = NET_FRONTEND_FEATURES

    def __post_init__(self) -> None:
        _check_recovery_options("VhostUserNet", self)
        if not isinstance(self.path, str | os.PathLike) or not os.fspath(self.path):
            raise ValueError(f"VhostUserNet: socket path must be non-empty, got {self.path!r}")
        _check_net_common(
            "VhostUserNet",
            self.mac,
            self.ip,
            self.gateway,
            self.mtu,
            self.queue_size,
            self.offload,
        )

    @property
    def mac_bytes(self) -> bytes | None:
        """The fixed MAC as six bytes (None: a random one at each bring-up)."""
        return parse_mac(self.mac) if self.mac else None

    def frontend_config(self) -> bytes:
        """The virtio-net config space (§5.1.4) the front-end owns: the MAC (``mac``
        or a fresh random locally administered unicast one), LINK_UP, one queue pair,
        the MTU."""
        mac = self.mac_bytes or _random_mac()
        return NetConfig(mac, S_LINK_UP, 1, self.mtu).pack()

    def dma_bytes(self, queue_size: int) -> int:
        """Receive buffers for a full ring plus a transmit pool, sized from the MTU."""
        return _net_dma_bytes(self.mtu, self.offload, queue_size)


def _random_mac() -> bytes:
    """Six random bytes made a locally administered (bit 1) unicast (bit 0 clear)
    address (IEEE 802: the U/L and I/G bits of the first octet)."""
    raw = os.urandom(6)
    return bytes([(raw[0] & 0xFC) | 0x02]) + raw[1:]


_KIND_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
_CLASS_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")
_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,15}\Z")


@dataclass(frozen=True, init=False)
class Custom(DeviceSpec):
    """Any device ``python -m vdev`` can run: a registered kind (``"rng"``, a
    ``vlab.devices`` entry point) or a class path (``"pkg.module:Class"``), with its
    options: ``Custom("rng", seed=7)`` starts ``python -m vdev rng --seed 7 --control
    EP``. Option ``key=value`` becomes ``--key value`` (underscores become dashes),
    ``True`` a bare ``--key``, ``False``/``None`` nothing; values are str, int or float.

    Which driver binds is decided by the device id the device reports (the bus), not by
    the spec. ``name_prefix`` names the kernel's devices ``<prefix>0``, ``<prefix>1``
    ... (default: the kind, or the class path's last module name: ``rng0``);
    ``queue_size`` is the ring size the driver asks for.
    """

    device: str
    options: tuple[tuple[str, Any], ...]
    queue_size: int
    prefix: str

    naming: ClassVar[str] = "numbers"

    def __init__(
        self,
        device: str,
        /,
        *,
        name_prefix: str | None = None,
        queue_size: int = 128,
        on_device_death: str = "restart",
        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S,
        restart_budget: tuple[int, float] = DEFAULT_RESTART_BUDGET,
        faults: Any = None,
        poll_us: float = DEFAULT_POLL_US,
        device_poll_us: float | None = None,
        **options: Any,
    ) -> None:
        _init_recovery(
            self,
            "Custom",
            on_device_death,
            request_timeout,
            restart_budget,
            faults,
            poll_us,
            device_poll_us,
        )
        if not isinstance(device, str) or not (
            _KIND_NAME.match(device) or _CLASS_PATH.match(device)
        ):
            raise ValueError(
                f"Custom: {device!r} is neither a device kind name nor 'pkg.module:Class'"
            )
        for key, value in options.items():
            if not _OPTION.match(key):
                raise ValueError(f"Custom: bad option name {key!r}")
            if value is not None and not isinstance(value, str | int | float):
                raise ValueError(
                    f"Custom: option {key}={value!r} is not a str, int, float, bool or None"
                )
        q = _check_queue_size("Custom", queue_size)
        if name_prefix is None:
            base = device.partition(":")[0].rsplit(".", 1)[-1] if ":" in device else device
            name_prefix = re.sub(r"[^a-z0-9]", "", base.lower()) or "dev"
            if not name_prefix[0].isalpha():
                name_prefix = "dev" + name_prefix
            name_prefix = name_prefix[:16]
        if not isinstance(name_prefix, str) or not _PREFIX.match(name_prefix):
            raise ValueError(f"Custom: name_prefix {name_prefix!r} is not [a-z][a-z0-9]*")
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "options", tuple(options.items()))
        object.__setattr__(self, "queue_size", q)
        object.__setattr__(self, "prefix", name_prefix)

    @property
    def kind(self) -> str:  # type: ignore[override]
        """The ``python -m vdev`` subcommand: the kind name or the class path."""
        return self.device

    @property
    def name_prefix(self) -> str:  # type: ignore[override]
        """How the kernel names these devices (``rng`` gives ``rng0``, ``rng1``)."""
        return self.prefix

    def device_args(self) -> list[str]:
        """Every option as ``--key value`` (``True``: ``--key``; False/None: left out)."""
        args: list[str] = []
        for key, value in self.options:
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is False or value is None:
                continue
            else:
                args += [flag, str(value)]
        return args


#: Default seconds the kernel waits for an attached device that went away to come back.
DEFAULT_RECONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, init=False)
class Attach(DeviceSpec):
    """A device process somebody else started and keeps running, like a vhost-user
    back-end daemon: ``python -m vdev KIND ... --control ENDPOINT --shm-by-name``. The
    kernel connects to ``endpoint`` (an ``ipc://`` path), learns what the device is from
    GET_DEVICE_INFO (the driver binds by device id, as always) and shares its memory by
    POSIX shm name; it neither starts nor stops the process
    (:mod:`kernel.transport_attach`).

    When the device goes away (its control channel stops answering while requests are
    in flight, or it comes back without its state: restarted on the same endpoint) the
    kernel waits up to ``reconnect_timeout`` seconds for the endpoint to answer again,
    brings the device up again and resubmits what was in flight (``on_device_death=
    "restart"``, within ``restart_budget``); a device that does not come back in time
    fails with EIO, culprit ``"device-gone"``.

    Names: ``name_prefix`` (default: from the device id -- ``vda``, ``vdb`` for disks,
    ``eth0`` for NICs, ``<device name>0`` otherwise: ``rng0``). ``queue_size`` is the
    ring size the driver asks for (capped by the device); ``ip`` / ``gateway`` configure
    the interface when the device is a NIC, ``offload=False`` keeps its checksum/TSO
    offloads off (as ``kernel.Net``'s). The device's own options (image, fault
    plan, ...) are its command line's, not the kernel's.
    """

    endpoint: str
    prefix: str
    queue_size: int
    reconnect_timeout: float
    ip: str
    gateway: str | None
    offload: bool

    transport: ClassVar[str] = "attach"
    not_started: ClassVar[str] = "an attached device"

    def __init__(
        self,
        endpoint: str,
        /,
        *,
        name_prefix: str | None = None,
        queue_size: int = 128,
        on_device_death: str = "restart",
        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S,
        restart_budget: tuple[int, float] = DEFAULT_RESTART_BUDGET,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT_S,
        ip: str = "10.0.0.2/24",
        gateway: str | None = None,
        poll_us: float = DEFAULT_POLL_US,
        offload: bool = True,
    ) -> None:
        _init_recovery(
            self, "Attach", on_device_death, request_timeout, restart_budget, None, poll_us
        )
        if not isinstance(endpoint, str) or not endpoint.startswith("ipc://"):
            raise ValueError(f"Attach: endpoint {endpoint!r} is not an ipc:// endpoint")
        path = endpoint[len("ipc://") :]
        if not os.path.isabs(path) or os.path.normpath(path) != path or "\0" in path:
            raise ValueError(
                f"Attach: endpoint {endpoint!r} must name an absolute, normalised socket path"
            )
        # the kernel's doorbells go next to it (<path>.kick, <path>.call): sun_path < 108
        if len(os.fsencode(path)) + len(".kick") >= 107:
            raise ValueError(
                f"Attach: socket path {path!r} is too long (the doorbells beside it need "
                "5 more bytes; Unix socket paths hold 107)"
            )
        if name_prefix is not None and (
            not isinstance(name_prefix, str) or not _PREFIX.match(name_prefix)
        ):
            raise ValueError(f"Attach: name_prefix {name_prefix!r} is not [a-z][a-z0-9]*")
        q = _check_queue_size("Attach", queue_size)
        t = reconnect_timeout
        if isinstance(t, bool) or not isinstance(t, int | float) or not t > 0:
            raise ValueError(f"Attach: reconnect_timeout {t!r} is not a positive number")
        if not isinstance(ip, str):
            raise ValueError(f"Attach: ip must be a string like '10.0.0.2/24', got {ip!r}")
        _parse_ipv4_cidr(ip, "ip", "Attach")
        if gateway is not None:
            if not isinstance(gateway, str):
                raise ValueError(f"Attach: gateway must be a string, got {gateway!r}")
            _parse_ipv4_cidr(gateway + "/32", "gateway", "Attach")
        object.__setattr__(self, "endpoint", endpoint)
        object.__setattr__(self, "prefix", name_prefix or "")
        object.__setattr__(self, "queue_size", q)
        object.__setattr__(self, "reconnect_timeout", float(t))
        object.__setattr__(self, "ip", ip)
        object.__setattr__(self, "gateway", gateway)
        if not isinstance(offload, bool):
            raise ValueError(f"Attach: offload must be True or False, got {offload!r}")
        object.__setattr__(self, "offload", offload)

    def dma_bytes(self, queue_size: int) -> int:
        """Enough for any device, a NIC of the largest MTU included: the kernel learns
        what the device is (and a NIC's MTU) only once attached. The region is a memfd
        whose pages cost nothing until used."""
        from .transport import DEFAULT_DMA_BYTES

        return max(DEFAULT_DMA_BYTES, _net_dma_bytes(MAX_MTU, self.offload, queue_size))

    @property
    def name_prefix(self) -> str:  # type: ignore[override]
        """The prefix given, or "" (the kernel names the device from its device id once
        it has asked it: ``vd``, ``eth``, or the device's own name)."""
        return self.prefix
