"""virtio-net (§5.1): :class:`NetDevice`, the loopback backend and the backend registry.

Written against the public :class:`vdev.Device` API, as :mod:`vdev.blk` is; the outside
world is a :class:`~vdev.netbackend.NetBackend` (see :mod:`vdev.netbackend` for the
contract between the two).

Theory of operation
-------------------
Two queues: receiveq1 (0) and transmitq1 (1) -- or, with ``queue_pairs`` > 1, a pair
per queue pair and a control queue (**Multi-queue** below). Every frame on a receive or
transmit queue is preceded by the 12-byte ``virtio_net_hdr`` (VERSION_1,
:class:`~vdev.virtio.net.NetHdr`).

Offered features: MAC, STATUS, MTU, CSUM, GUEST_CSUM, HOST_TSO4, GUEST_TSO4 and
MRG_RXBUF. Each is implemented here, whatever the backend can do: what the backend does
not take (:meth:`~vdev.netbackend.NetBackend.offloads`) is done in software with the
helpers of :mod:`vdev.virtio.packet`, as a NIC's firmware would.

**Transmit** (queue 1). :meth:`NetDevice.handle` reads the header and the frame from the
chain's readable part, checks them, and completes the chain at once with used length 0
(§5.1.6.2: the device writes nothing into a transmit buffer). The checks, each a rule of
§5.1.6.2.1 the driver must follow; a frame that breaks one is dropped and counted in
``tx_bad_frames`` and the device goes on:

=====================================  =============================================
the frame is dropped when              because
=====================================  =============================================
the chain has a writable part or       transmit buffers are device-readable and start
fewer than 12 readable bytes           with the header (§5.1.6.2)
the frame is shorter than 14 bytes     not even an Ethernet header
``gso_type`` is not NONE / TCPV4, or   the driver may only ask for what was negotiated:
has the ECN bit                        we offer HOST_TSO4 only (no TSO6/UFO/USO/ECN)
GSO without HOST_TSO4 negotiated,      §5.1.6.2.1: GSO needs the feature, NEEDS_CSUM
without NEEDS_CSUM, with gso_size 0,   and an MSS; the frame must be an IPv4/TCP
or a frame that is not IPv4/TCP        packet we can segment
no GSO and frame > MTU + 14 (+4 with   §5.1.4.2: no frame beyond the MTU without
an 802.1Q tag)                         GSO (the device's limit even if MTU is not
                                       negotiated: its wire takes no more)
NEEDS_CSUM without CSUM negotiated,    §5.1.6.2.1: flags must be 0 without CSUM; the
or csum_start + csum_offset + 2 >      checksum field must lie in the frame
frame length
=====================================  =============================================

DATA_VALID and RSC_INFO on transmit are ignored (§5.1.6.2.2: the device ignores flag bits
it does not act on), as is ``hdr_len`` (a hint the device must not rely on) and
``num_buffers``. With the link down a valid frame is dropped (``tx_dropped_link_down``).
Otherwise it goes to the backend: as it is when the backend takes the offload (``"csum"``
for NEEDS_CSUM, ``"tso4"`` for GSO_TCPV4 — a backend that takes TSO takes the partial
checksum that comes with it), else with the checksum completed / cut into segments.
A frame the backend refuses is counted in ``tx_dropped_backend``.

**Receive** (queue 0). The chains the driver posts on the receive queue are its empty
receive buffers: :meth:`NetDevice.handle` keeps them (returns :data:`PENDING`) in a deque,
in order. A buffer must be writable only and hold at least the header (§5.1.6.3.1);
one that does not is completed at once with length 0 and counted (``rx_bad_buffers``).
The backend delivers a frame with :meth:`NetDevice.receive` (the
:class:`~vdev.netbackend.FrameSink` call). The frame is shaped for what the driver
negotiated (§5.1.6.4.1):

* GSO_TCPV4 with GUEST_TSO4 negotiated: delivered whole, NEEDS_CSUM, ``gso_size`` kept.
  Without GUEST_TSO4 (or with the ECN bit, as GUEST_ECN is not offered): cut into
  segments first, each with complete checksums.
* NEEDS_CSUM with GUEST_CSUM: delivered *partial*, with NEEDS_CSUM and the offsets, as
  Linux's tun/virtio-net does for local traffic — the data never left this host, its
  checksum was simply never computed, and the driver's stack may skip it. Without
  GUEST_CSUM: completed in software and delivered with flags 0 (the spec requires flags
  0 then).
* DATA_VALID from the backend is passed on with GUEST_CSUM, and frames this device
  segmented are marked DATA_VALID (their checksums were just computed); flags are 0
  without GUEST_CSUM. NEEDS_CSUM and DATA_VALID are never both set.
* With MTU negotiated, a non-GSO frame longer than MTU + 14 (+4 with an 802.1Q tag) is
  not passed to the driver (§5.1.4.1): ``rx_dropped_over_mtu``.

Then header + frame are written into the oldest kept buffer and that chain is completed
with the bytes written. With MRG_RXBUF a frame may take several buffers, each filled
completely but the last, ``num_buffers`` in the first header (§5.1.6.4); they are
completed with one :meth:`~vdev.Device.complete_many`, so ``used.idx`` moves once and
the driver (Linux reads ``num_buffers`` from the first buffer and takes the others
from the used ring at once) never sees part of a frame; without it a frame that does
not fit the next buffer is dropped (``rx_dropped_too_big``) and the buffer stays for
the next frame, ``num_buffers`` is 1. No buffer (or not enough for a merged frame)
even after taking what the driver posted since the receive queue was last drained
(:meth:`~vdev.Device.pull_available`: no kick is needed for them) → the frame is
dropped (``rx_dropped_no_buffer``) and ``receive`` returns False. Nothing
ever waits and nothing grows: the only queue is the driver's own buffers (at most the
queue size). A backend that ran out of buffers and stopped reading (back-pressure) is
told when the driver posts one again (its ``resume_rx()``). With the
link down a received frame is dropped (``rx_dropped_link_down``).

**Link** (STATUS). :meth:`NetDevice.set_link` flips LINK_UP in the config space and
raises a configuration change notification (the driver re-reads ``status``, §5.1.4).

**Over vhost-user** (QEMU's ``-netdev vhost-user``) QEMU's own virtio-net model keeps
the config space (the MAC of ``-device virtio-net-pci,mac=``, link status, MTU of
``host_mtu=``); this device owns the rings, the data path and the features it offers
(QEMU offers the guest its own features intersected with ours). When the driver
negotiates MTU, QEMU sends ``NET_SET_MTU`` (protocol feature NET_MTU, offered by
:mod:`vdev.vhost_user` because the device has :meth:`NetDevice.set_mtu`): the device's
MTU follows. :meth:`set_link` cannot reach the driver there (no BACKEND_REQ): the
guest sees QEMU's link state, while the device still drops frames without carrier.

**Multi-queue** (``python -m vdev net --queue-pairs N``, N in 1..16; §5.1.6.5.6). With
N = 1 the device is the one above: two queues, neither CTRL_VQ nor MQ offered. With
N > 1 it offers VIRTIO_NET_F_CTRL_VQ and VIRTIO_NET_F_MQ, ``max_virtqueue_pairs`` is N
and it has 2N + 1 queues (:attr:`NetDevice.num_queues`): receiveqK = 2(K-1),
transmitqK = 2(K-1)+1, the control queue 2N (queue 2 when the driver takes CTRL_VQ
without MQ, §5.1.2). Each receive queue keeps its own deque of buffers.

*Control queue* (§5.1.6.5): each chain is one command, ``class, command, data`` in the
readable part and a writable ``ack`` byte. A chain without a writable byte cannot be
answered: it is completed with length 0 (``ctrl_bad``). Otherwise the ack is
VIRTIO_NET_OK, or VIRTIO_NET_ERR for a header shorter than 2 bytes or more than
:data:`~vdev.virtio.net.CTRL_DATA_MAX` data bytes (``ctrl_bad``), an unknown class or
command -- everything but VIRTIO_NET_CTRL_MQ VQ_PAIRS_SET, and that too without MQ
negotiated (``ctrl_unsupported``) -- or VQ_PAIRS_SET whose data is not exactly a le16
in 1..max_virtqueue_pairs (``ctrl_bad``). VQ_PAIRS_SET sets the active pairs
(``mq_pairs_set``). Until then, and again after a reset, only pair 1 is active
(§5.1.6.5.6.1).

*Transmit* is accepted on every transmit queue (a frame on a queue beyond the active
pairs still goes out, counted ``tx_inactive_pair``: dropping it would lose data in the
window where the driver changes the count). *Receive steering*
(§5.1.6.5.6: "the device ... SHOULD place the packets of a flow on the receiveq of the
transmitq the flow last transmitted on"): each frame sent on an active pair records its
flow (:func:`~vdev.virtio.net.flow_key`, the IPv4 5-tuple) -> pair in a table of at
most :data:`FLOW_TABLE_MAX` flows (the oldest flow is forgotten first,
``flow_evictions``). A received frame of a known flow goes to that pair's receive queue
(``rx_steered_flow``); one of an unknown flow to ``flow_hash(flow) mod active pairs``
(``rx_steered_hash``), anything that is not IPv4 to receiveq1. Nothing is ever placed
on a receive queue beyond the active pairs. A frame whose receive queue has no buffer
is dropped (``rx_dropped_no_buffer``, and ``rxqK_dropped_no_buffer`` for the pair); a
backend is told buffers are available (``rx_buffers_available``) when any active
receive queue has one.

**Reset** forgets the kept receive buffers (the session releases the chains), the
negotiated features and an MTU set by the front-end; the link state and the counters
survive.

Counters (:attr:`~vdev.Device.metrics`): ``tx_frames tx_bytes`` (valid frames from the
driver and their bytes, header excluded), ``tx_gso_frames tx_csum_offloaded`` (of those,
with GSO / NEEDS_CSUM), ``tx_segments`` (segments cut in software), ``tx_csum_completed``
(checksums completed in software), ``tx_bad_frames tx_dropped_link_down
tx_dropped_backend``; ``rx_frames rx_bytes`` (frames delivered to the driver, header
excluded), ``rx_merged`` (frames that took more than one buffer), ``rx_gso_frames``,
``rx_segments``, ``rx_csum_completed``, ``rx_dropped_no_buffer rx_dropped_too_big
rx_dropped_over_mtu rx_dropped_link_down rx_bad_frames rx_bad_buffers``,
``link_changes``.

Fault injection
---------------
With a fault plan (``python -m vdev net ... --faults PLAN``, ``docs/faults.md``) every
frame meets the plan once: ``net.tx`` (queue 1) for each valid frame the driver sent,
after the link check and before the backend gets it (a GSO super-frame is one event);
``net.rx`` (queue 0) for each frame the backend hands over, after the link check and
before the device looks for a receive buffer. ``nbytes`` is the Ethernet frame's length
(no virtio header). What fired is carried out in this order (the first rule of each
action counts, every ``corrupt_byte`` rule flips its byte):

1. ``loss`` / ``gilbert_elliott``: the frame is dropped (``<dir>_fault_lost``).
2. ``link_flap``: LINK_UP is cleared with a config-change interrupt and set again
   ``down_s`` later with another; the frame is dropped as link down, and so is every
   frame while the link is down (``tx_dropped_link_down`` / ``rx_dropped_link_down``;
   ``link_flaps``). A flap while one runs restarts its timer.
3. ``corrupt_byte``: the byte at ``offset`` of the Ethernet frame is xored with
   ``xor`` (nothing when the frame is shorter: ``faults_out_of_range``).
4. ``duplicate``: ``count`` extra copies follow the frame (``<dir>_fault_duplicates``),
   each taking the steps below on its own.
5. ``rate_limit``: a token bucket per rule and direction (``bits_per_s``, depth
   ``burst_bytes``; with depth 0 a frame waits until the ones before it drained at the
   rate). A frame over the rate waits, in order, in the rule's queue of at most
   :data:`RATE_QUEUE_MAX` frames (``<dir>_fault_rate_queued``); one that finds it full
   is dropped (``<dir>_fault_rate_dropped``).
6. ``delay``: the frame is held ``delay_s`` (``call_later``; ``<dir>_fault_delayed``).
   Delayed frames leave in deadline order, so with a fixed ``s`` they keep their order;
   with ``jitter_s`` they may reorder, and frames the rule does not match pass the
   delayed ones (as netem with a filter).
7. ``reorder``: the frame is held until ``depth`` later frames of its direction went
   out, then follows them (``<dir>_fault_reordered``) — or after
   :data:`REORDER_MAX_HOLD_S` (0.1 s) if fewer came, so the last frame of a burst is
   never held for good (``<dir>_fault_reorder_timeouts``).

A held frame is a copy; at release a transmitted one still needs the link up, and a
received one a receive buffer. A direction holds at most :data:`FAULT_HELD_MAX` frames
in all (``<dir>_fault_hold_full`` beyond). A reset drops every held frame
(``<dir>_fault_dropped_reset``) and cancels their timers; a link flap's timer survives
it. Without a plan the data path costs one attribute test and one method call per
frame more.

Backends
--------
``python -m vdev net --backend NAME`` finds backends in :data:`BACKENDS`: a
:class:`BackendSpec` per name (a factory from the parsed command line and a function that
adds the backend's own options). ``loopback`` is registered here; the modules named in
:data:`BACKEND_MODULES` register the others when :func:`load_backends` imports them, by
calling :func:`register_backend` at import time. A module in that list that does not
exist (yet) is skipped. A backend module looks like this (keep its import cheap: it is
imported for every ``python -m vdev net`` command line)::

    from vdev.net import BackendOptionError, BackendSpec, register_backend

    def _options(group):                  # only options of this backend, default None
        group.add_argument("--ifname", metavar="NAME", help="tap: the interface to use")

    def _create(args):                    # BackendOptionError -> one line, exit 2
        if args.ifname is None:
            raise BackendOptionError("the tap backend needs --ifname NAME")
        return TapBackend(args.ifname)

    register_backend(BackendSpec("tap", _create, _options, "a Linux TAP interface"))
"""

from __future__ import annotations

import argparse
import importlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

from hostops.clock import monotonic
from vdev.device import PENDING, Device, Pending, TimerHandle
from vdev.netbackend import NetBackend
from vdev.virtio.constants import DeviceId, NetF, bit
from vdev.virtio.control import ErrorCode
from vdev.virtio.errors import ProtocolError
from vdev.virtio.faults import Fired
from vdev.virtio.net import (
    CTRL_CLASS_MQ,
    CTRL_DATA_MAX,
    CTRL_ERR,
    CTRL_HDR_SIZE,
    CTRL_MQ_VQ_PAIRS_SET,
    CTRL_OK,
    ETH_HLEN,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    MAX_MTU,
    MAX_QUEUE_PAIRS,
    MIN_MTU,
    NET_HDR_SIZE,
    RX_QUEUE,
    S_LINK_UP,
    TX_QUEUE,
    NetConfig,
    NetHdr,
    ctrl_queue_index,
    flow_hash,
    flow_key,
)
from vdev.virtio.packet import (
    ETHERTYPE_VLAN,
    MAX_IPV4_TOTAL_LENGTH,
    PacketError,
    complete_checksum,
    gso_segment_tcpv4,
    parse_tcpv4,
)
from vdev.virtio.queue import Chain

__all__ = [
    "NetDevice",
    "LoopbackBackend",
    "BackendSpec",
    "BackendOptionError",
    "OptionAdder",
    "BACKENDS",
    "BACKEND_MODULES",
    "register_backend",
    "load_backends",
    "NET_FEATURES",
    "NET_COUNTERS",
    "VLAN_HLEN",
    "MAX_GSO_FRAME",
    "NET_FAULT_EVENTS",
    "NET_FAULT_COUNTERS",
    "FAULT_HELD_MAX",
    "RATE_QUEUE_MAX",
    "REORDER_MAX_HOLD_S",
    "NET_MQ_COUNTERS",
    "FLOW_TABLE_MAX",
]

#: The device-specific features :class:`NetDevice` offers (§5.1.3).
NET_FEATURES = (
    bit(NetF.MAC)
    | bit(NetF.STATUS)
    | bit(NetF.MTU)
    | bit(NetF.CSUM)
    | bit(NetF.GUEST_CSUM)
    | bit(NetF.HOST_TSO4)
    | bit(NetF.GUEST_TSO4)
    | bit(NetF.MRG_RXBUF)
)

#: Feature dependencies of §5.1.3.1 among the bits we offer: (feature, requires).
_REQUIRES = (
    (NetF.HOST_TSO4, NetF.CSUM),
    (NetF.GUEST_TSO4, NetF.GUEST_CSUM),
    (NetF.MQ, NetF.CTRL_VQ),
)

#: Every counter of :class:`NetDevice` (see the module docstring).
NET_COUNTERS = (
    "tx_frames",
    "tx_bytes",
    "tx_gso_frames",
    "tx_csum_offloaded",
    "tx_segments",
    "tx_csum_completed",
    "tx_bad_frames",
    "tx_dropped_link_down",
    "tx_dropped_backend",
    "rx_frames",
    "rx_bytes",
    "rx_merged",
    "rx_gso_frames",
    "rx_segments",
    "rx_csum_completed",
    "rx_dropped_no_buffer",
    "rx_dropped_too_big",
    "rx_dropped_over_mtu",
    "rx_dropped_link_down",
    "rx_bad_frames",
    "rx_bad_buffers",
    "link_changes",
)

#: Counters a multi-queue device (``queue_pairs > 1``) adds (see the module docstring);
#: it also has ``rxqK_dropped_no_buffer`` for each pair K (1..N).
NET_MQ_COUNTERS = (
    "ctrl_commands",
    "ctrl_ok",
    "ctrl_bad",
    "ctrl_unsupported",
    "mq_pairs_set",
    "rx_steered_flow",
    "rx_steered_hash",
    "flow_evictions",
    "tx_inactive_pair",
    "queue_unused",
)
#: Most flows the receive steering table remembers.
FLOW_TABLE_MAX = 4096

#: An IEEE 802.1Q tag adds 4 bytes to the Ethernet header.
VLAN_HLEN = 4
#: The largest GSO super-frame: a whole IPv4 packet behind an Ethernet + 802.1Q header.
MAX_GSO_FRAME = ETH_HLEN + VLAN_HLEN + MAX_IPV4_TOTAL_LENGTH

#: Most frames the fault path holds per direction (delayed, reordered, queued behind a
#: rate limit); a frame that would exceed it is dropped (``<dir>_fault_hold_full``).
FAULT_HELD_MAX = 1024
#: Most frames waiting behind one ``rate_limit`` rule's token bucket, per direction;
#: more are dropped (``<dir>_fault_rate_dropped``).
RATE_QUEUE_MAX = 256
#: Longest a ``reorder`` fault holds a frame when fewer than ``depth`` frames follow.
REORDER_MAX_HOLD_S = 0.1

#: The fault events :class:`NetDevice` fires itself (``Device.fault_events``).
NET_FAULT_EVENTS = frozenset({"net.tx", "net.rx"})

#: Counters of the faults the device carried out (``<dir>`` is ``tx`` or ``rx``).
NET_FAULT_COUNTERS = (
    *(
        f"{p}_{c}"
        for p in ("tx", "rx")
        for c in (
            "fault_lost",
            "fault_duplicates",
            "fault_reordered",
            "fault_reorder_timeouts",
            "fault_corrupted",
            "fault_delayed",
            "fault_rate_queued",
            "fault_rate_dropped",
            "fault_hold_full",
            "fault_dropped_reset",
        )
    ),
    "link_flaps",
    "faults_out_of_range",
)


_PLAIN = NetHdr()
#: Distinct transmit headers a device remembers (then it forgets them all).
_HDR_CACHE = 64
_VLAN_TAG = ETHERTYPE_VLAN.to_bytes(2, "big")


def _l2_len(frame: bytes | memoryview) -> int:
    """Bytes of Ethernet header the MTU does not count: 14, or 18 with an 802.1Q tag."""
    return ETH_HLEN + VLAN_HLEN if frame[12:14] == _VLAN_TAG else ETH_HLEN


class NetDevice(Device):
    """virtio-net over a :class:`~vdev.netbackend.NetBackend` (see the module docstring).

    ``mac`` is the six-byte address in the config space; ``mtu`` (68..65535) the largest
    L3 packet without GSO; ``queue_size`` the largest queue the driver may set up (a
    power of two); ``queue_pairs`` (1..16) the receive/transmit queue pairs (more than
    one: CTRL_VQ and MQ are offered). The device is the backend's
    :class:`~vdev.netbackend.FrameSink`:
    the backend is attached here (its watches and timers start with the runtime).
    """

    device_id = DeviceId.NET
    name = "net"
    num_queues = 2
    fault_events: ClassVar[frozenset[str]] = NET_FAULT_EVENTS

    def __init__(
        self,
        backend: NetBackend,
        *,
        mac: bytes,
        mtu: int = 1500,
        queue_size: int = 256,
        queue_pairs: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(queue_pairs, bool) or not isinstance(queue_pairs, int):
            raise TypeError(f"queue_pairs must be an int, got {queue_pairs!r}")
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue_pairs {queue_pairs} not in 1..{MAX_QUEUE_PAIRS}")
        if len(mac) != 6:
            raise ValueError(f"a MAC address is 6 bytes, not {len(mac)}")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu} not in {MIN_MTU}..{MAX_MTU}")
        if queue_size < 1 or queue_size & (queue_size - 1) or queue_size > 32768:
            raise ValueError(f"queue size {queue_size} is not a power of two in 1..32768")
        self.backend = backend
        self.mac = bytes(mac)
        self.mtu = mtu
        self.configured_mtu = mtu
        """The MTU given at construction (``mtu`` may follow the front-end's NET_SET_MTU
        until the next reset)."""
        self.max_queue_size = queue_size
        self.link_up = True
        self.metrics.declare(*NET_COUNTERS)
        #: Receive/transmit queue pairs (``max_virtqueue_pairs``).
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs + 1 if queue_pairs > 1 else 2
        if queue_pairs > 1:
            self.metrics.declare(*NET_MQ_COUNTERS)
            self.metrics.declare(*(f"rxq{k + 1}_dropped_no_buffer" for k in range(queue_pairs)))
        # the driver's receive buffers per pair, oldest first; _rx is receiveq1's
        self._rxs: list[deque[Chain]] = [deque() for _ in range(queue_pairs)]
        self._rx: deque[Chain] = self._rxs[0]
        #: Pairs in use (VQ_PAIRS_SET; 1 until then and after a reset).
        self.active_pairs = 1
        self._pairs_usable = 1  # pairs the negotiated features give queues to
        self._ctrl_q = -1  # the control queue (CTRL_VQ negotiated), else -1
        self._mq = False
        self._flows: dict[bytes, int] = {}  # flow -> pair it last transmitted on
        self._active = False
        self._mrg = False
        self._guest_csum = False
        self._guest_tso4 = False
        self._host_csum = False
        self._host_tso4 = False
        self._mtu_negotiated = False
        self._resume_rx: Callable[[], None] = backend.resume_rx
        # fault plan (decided at activate()): per-direction state of held frames
        self._faulty = False
        self._fault_clock: Callable[[], float] = monotonic
        self._fault_tx = _FaultDir("tx", self._tx_release)
        self._fault_rx = _FaultDir("rx", self._receive_now)
        self._flap: TimerHandle | None = None
        offloads = backend.offloads()
        self._backend_csum = "csum" in offloads
        self._backend_tso4 = "tso4" in offloads
        self._tx_views = backend.takes_views
        # transmit headers seen, raw bytes -> parsed, and parsed -> what the backend
        # gets (both at most _HDR_CACHE entries; NetHdr is immutable)
        self._tx_hdrs: dict[bytes, NetHdr] = {}
        self._tx_out: dict[NetHdr, NetHdr] = {}
        backend.attach(self)  # its watches and timers start when the runtime does

    # ------------------------------------------------------------------ Device API
    def device_features(self) -> int:
        """MAC, STATUS, MTU, CSUM, GUEST_CSUM, HOST_TSO4, GUEST_TSO4, MRG_RXBUF; CTRL_VQ
        and MQ with more than one queue pair."""
        if self.queue_pairs > 1:
            return NET_FEATURES | bit(NetF.CTRL_VQ) | bit(NetF.MQ)
        return NET_FEATURES

    def config(self) -> bytes:
        """The config space (§5.1.4): MAC, status (LINK_UP), max_virtqueue_pairs, MTU."""
        return self.net_config.pack()

    @property
    def net_config(self) -> NetConfig:
        """The config space as a dataclass."""
        return NetConfig(self.mac, S_LINK_UP if self.link_up else 0, self.queue_pairs, self.mtu)

    def activate(self, features: int) -> None:
        """Take the negotiated features.

        Refuses (``ProtocolError``) a feature set that breaks a dependency of §5.1.3.1
        (HOST_TSO4 needs CSUM, GUEST_TSO4 needs GUEST_CSUM)."""
        for feature, needs in _REQUIRES:
            if features & bit(feature) and not features & bit(needs):
                raise ProtocolError(
                    ErrorCode.BAD_VALUE,
                    f"{feature.name} negotiated without {needs.name} (§5.1.3.1)",
                )
        super().activate(features)
        self._mrg = bool(features & bit(NetF.MRG_RXBUF))
        self._guest_csum = bool(features & bit(NetF.GUEST_CSUM))
        self._guest_tso4 = bool(features & bit(NetF.GUEST_TSO4))
        self._host_csum = bool(features & bit(NetF.CSUM))
        self._host_tso4 = bool(features & bit(NetF.HOST_TSO4))
        self._mtu_negotiated = bool(features & bit(NetF.MTU))
        # §5.1.2: the control queue is 2N with MQ, 2 with CTRL_VQ alone; only pair 1
        # is active until VQ_PAIRS_SET (§5.1.6.5.6.1)
        self._mq = bool(features & bit(NetF.MQ))
        ctrl = self.queue_pairs > 1 and bool(features & bit(NetF.CTRL_VQ))
        self._ctrl_q = ctrl_queue_index(self.queue_pairs, self._mq) if ctrl else -1
        self._pairs_usable = self.queue_pairs if self._mq else 1
        self.active_pairs = 1
        self._flows.clear()
        injector = getattr(self._session, "injector", None)
        self._faulty = injector is not None
        self._tx_views = self.backend.takes_views and not self._faulty  # held: copies
        if injector is not None:
            self._fault_clock = injector.clock
            self.metrics.declare(*NET_FAULT_COUNTERS)
        self._active = True

    def set_mtu(self, mtu: int) -> None:
        """The front-end says the driver uses ``mtu`` (vhost-user ``NET_SET_MTU``, sent
        by QEMU when the driver negotiated VIRTIO_NET_F_MTU; QEMU's config space holds
        that MTU): from now on the device applies it (§5.1.4.1 / §5.1.4.2). A reset
        brings back the MTU the device was made with. ProtocolError BAD_VALUE outside
        68..65535 (§5.1.4.1: the only MTUs a device may put in its config space)."""
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"MTU {mtu!r} not in {MIN_MTU}..{MAX_MTU}")
        self.mtu = mtu

    def released(self, queue: int) -> None:
        """The session dropped the chains kept on ``queue``: forget the receive buffers."""
        if queue % 2 == 0 and queue // 2 < self.queue_pairs and queue != self._ctrl_q:
            self._rxs[queue // 2].clear()

    def reset(self) -> None:
        """Forget the kept receive buffers and what was negotiated (the active pairs
        go back to 1); frames held by faults (delay, reorder, rate limit) are dropped
        and counted."""
        for rx in self._rxs:
            rx.clear()
        self.active_pairs = self._pairs_usable = 1
        self._ctrl_q = -1
        self._mq = False
        self._flows.clear()
        for d in (self._fault_tx, self._fault_rx):
            dropped = d.drop_all()
            if dropped:
                self.metrics.inc(f"{d.name}_fault_dropped_reset", dropped)
        self._active = False
        self._mrg = self._guest_csum = self._guest_tso4 = False
        self._host_csum = self._host_tso4 = self._mtu_negotiated = False
        self.backend.reset()
        self.mtu = self.configured_mtu
        super().reset()

    def close(self) -> None:
        """Close the backend."""
        for rx in self._rxs:
            rx.clear()
        self.backend.close()

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Transmit one frame (an odd queue), keep one receive buffer (an even queue)
        or answer a control command (the control queue)."""
        if queue == TX_QUEUE:
            self._transmit(chain)
            return 0
        if queue == RX_QUEUE:
            return self._post_rx_buffer(chain)
        if queue == self._ctrl_q:
            return self._control(chain)
        pair = queue // 2
        if pair >= self._pairs_usable:
            # §5.1.2: without MQ only receiveq1/transmitq1 (and the control queue) exist
            self.metrics.inc("queue_unused")
            return 0
        if queue & 1:
            self._transmit(chain, queue)
            return 0
        return self._post_rx_buffer(chain, pair)

    # ------------------------------------------------------------------ control queue
    def _control(self, chain: Chain) -> int:
        """Answer one control command (§5.1.6.5); returns the used length (the ack)."""
        m = self.metrics
        m.inc("ctrl_commands")
        if chain.writable_len < 1:
            m.inc("ctrl_bad")  # §5.1.6.5: the ack byte is device-writable: none to write
            return 0
        n = chain.readable_len
        ack = CTRL_ERR
        if n < CTRL_HDR_SIZE or n > CTRL_HDR_SIZE + CTRL_DATA_MAX:
            m.inc("ctrl_bad")  # §5.1.6.5: class and command, then the command's data
        else:
            cmd = chain.read(0, n)
            cls, code, data = cmd[0], cmd[1], cmd[CTRL_HDR_SIZE:]
            if cls != CTRL_CLASS_MQ or code != CTRL_MQ_VQ_PAIRS_SET or not self._mq:
                m.inc("ctrl_unsupported")  # only MQ VQ_PAIRS_SET, and only with MQ
            elif len(data) != 2:
                m.inc("ctrl_bad")  # §5.1.6.5.6: struct virtio_net_ctrl_mq is one le16
            else:
                pairs = int.from_bytes(data, "little")
                # §5.1.6.5.6: virtqueue_pairs in 1..max_virtqueue_pairs
                if not 1 <= pairs <= self.queue_pairs:
                    m.inc("ctrl_bad")
                else:
                    self.active_pairs = pairs
                    m.inc("mq_pairs_set")
                    ack = CTRL_OK
        if ack == CTRL_OK:
            m.inc("ctrl_ok")
        chain.write(0, bytes((ack,)))
        return 1

    # ------------------------------------------------------------------ FrameSink
    @property
    def active(self) -> bool:
        """A driver has the device running (DRIVER_OK, not reset since)."""
        return self._active

    def rx_buffers_available(self) -> bool:
        """True if the driver has posted receive buffers not used yet (on any active
        receive queue)."""
        if self.active_pairs == 1:
            return bool(self._rx) or self._pull_rx()
        for p in range(self.active_pairs):  # bounded: at most MAX_QUEUE_PAIRS
            if self._rxs[p] or self._pull_rx(p):
                return True
        return False

    def _pull_rx(self, pair: int = 0) -> bool:
        """Take the receive buffers the driver posted since the receive queue was last
        drained -- a driver need not kick for them (a polling device is expected to
        look, :meth:`~vdev.Device.pull_available`); True if any are kept now."""
        self.pull_available(2 * pair)
        return bool(self._rxs[pair])

    @property
    def rx_buffers(self) -> int:
        """How many receive buffers are kept, waiting for frames (every queue)."""
        return sum(len(rx) for rx in self._rxs)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` (backends count their own events here)."""
        self.metrics.inc(name, n)

    def set_link(self, up: bool) -> None:
        """Carrier up or down: flip LINK_UP in the config space and tell the driver."""
        up = bool(up)
        if up == self.link_up:
            return
        self.link_up = up
        self.metrics.inc("link_changes")
        if self._active:
            self.notify_config_change()

    def receive(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """Deliver one frame from the backend to the driver (see the module docstring).
        Returns False when it was dropped (and counted); never blocks."""
        if self._faulty:
            if not self.link_up:
                self.metrics.inc("rx_dropped_link_down")
                return False
            return self._fault_frame(self._fault_rx, RX_QUEUE, hdr, frame)
        return self._receive_now(hdr, frame)

    def _receive_now(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """:meth:`receive` without the fault plan."""
        m = self.metrics
        if not self.link_up:
            m.inc("rx_dropped_link_down")
            return False
        pair = self._steer(frame) if self.active_pairs > 1 else 0
        if not self._rxs[pair] and not self._pull_rx(pair):  # the common drop: check first
            m.inc("rx_dropped_no_buffer")
            if self.queue_pairs > 1:
                m.inc(f"rxq{pair + 1}_dropped_no_buffer")
            return False
        frames = self._shape_rx(hdr, frame)
        if frames is None:
            m.inc("rx_bad_frames")
            return False
        ok = True
        for h, f in frames:
            if not self._deliver(h, f, pair):
                ok = False
        return ok

    # ------------------------------------------------------------------ steering
    def _steer(self, frame: bytes | memoryview) -> int:
        """The pair whose receive queue gets ``frame`` (several pairs active): the pair
        its flow last transmitted on, else a hash of the flow; receiveq1 for anything
        but IPv4 (§5.1.6.5.6)."""
        key = flow_key(frame, received=True)
        if key is None:
            return 0
        active = self.active_pairs
        pair = self._flows.get(key)
        if pair is not None and pair < active:
            self.metrics.inc("rx_steered_flow")
            return pair
        self.metrics.inc("rx_steered_hash")
        return flow_hash(key) % active

    def _learn(self, frame: bytes | memoryview, pair: int) -> None:
        """Remember that ``frame``'s flow transmits on ``pair`` (the table is bounded:
        the oldest flow goes first)."""
        key = flow_key(frame)
        if key is None:
            return
        flows = self._flows
        if flows.get(key) == pair:
            return
        if key not in flows and len(flows) >= FLOW_TABLE_MAX:
            del flows[next(iter(flows))]
            self.metrics.inc("flow_evictions")
        flows[key] = pair

    # ------------------------------------------------------------------ transmit
    def _transmit(self, chain: Chain, queue: int = TX_QUEUE) -> None:
        m = self.metrics
        n = chain.readable_len - NET_HDR_SIZE
        if chain.writable_len or n < ETH_HLEN:
            m.inc("tx_bad_frames")  # §5.1.6.2: header + at least an Ethernet header
            return
        first = chain.readable[0]
        raw = bytes(first[:NET_HDR_SIZE]) if len(first) >= NET_HDR_SIZE else None
        if raw is None:
            raw = chain.read(0, NET_HDR_SIZE)
        hdr = self._tx_hdrs.get(raw)  # a stream's frames mostly share one header
        if hdr is None:
            hdr = NetHdr.unpack(raw)
            if len(self._tx_hdrs) >= _HDR_CACHE:  # bounded: the driver picks the bytes
                self._tx_hdrs.clear()
                self._tx_out.clear()
            self._tx_hdrs[raw] = hdr
        if len(first) == chain.readable_len:  # the usual layout: one buffer
            # a view for a backend that copies it on (the driver may rewrite its
            # buffer under us: the lengths checked stay what they were, a view's
            # length cannot change, so the worst is a garbled frame of its own)
            frame: bytes | memoryview = (
                first[NET_HDR_SIZE:] if self._tx_views else bytes(first[NET_HDR_SIZE:])
            )
        else:
            frame = chain.read(NET_HDR_SIZE, n)
        if not self._tx_valid(hdr, frame):
            m.inc("tx_bad_frames")
            return
        if not self.link_up:
            m.inc("tx_dropped_link_down")
            return
        m.inc("tx_frames")
        m.inc("tx_bytes", n)
        if hdr.gso_type != GSO_NONE:
            m.inc("tx_gso_frames")
        if hdr.flags & HDR_F_NEEDS_CSUM:
            m.inc("tx_csum_offloaded")
        if self.active_pairs > 1:
            pair = queue // 2
            if pair < self.active_pairs:
                self._learn(frame, pair)
            else:
                m.inc("tx_inactive_pair")
        elif queue != TX_QUEUE:
            m.inc("tx_inactive_pair")
        if self._faulty:
            self._fault_frame(self._fault_tx, queue, hdr, frame)
            return
        self._tx_send(hdr, frame)

    def _tx_send(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """Hand a valid frame to the backend: offloads it takes pass as they are, the
        others are done here first. False if (part of) it was dropped."""
        m = self.metrics
        needs_csum = bool(hdr.flags & HDR_F_NEEDS_CSUM)
        send = self.backend.send
        if hdr.gso_type != GSO_NONE:
            if self._backend_tso4:
                out = self._tx_out.get(hdr)
                if out is None:
                    out = self._tx_out[hdr] = NetHdr(
                        HDR_F_NEEDS_CSUM,
                        hdr.gso_type,
                        hdr.hdr_len,
                        hdr.gso_size,
                        hdr.csum_start,
                        hdr.csum_offset,
                    )
                if not send(out, frame):
                    m.inc("tx_dropped_backend")
                    return False
                return True
            segments = gso_segment_tcpv4(frame, hdr.gso_size)  # checked in _tx_valid
            m.inc("tx_segments", len(segments))
            ok = True
            for seg in segments:
                if not send(_PLAIN, seg):
                    m.inc("tx_dropped_backend")
                    ok = False
            return ok
        if needs_csum:
            if self._backend_csum:
                out = self._tx_out.get(hdr)
                if out is None:
                    out = self._tx_out[hdr] = NetHdr(
                        HDR_F_NEEDS_CSUM, csum_start=hdr.csum_start, csum_offset=hdr.csum_offset
                    )
                if not send(out, frame):
                    m.inc("tx_dropped_backend")
                    return False
                return True
            frame = complete_checksum(frame, hdr.csum_start, hdr.csum_offset)
            m.inc("tx_csum_completed")
        if not send(_PLAIN, frame):
            m.inc("tx_dropped_backend")
            return False
        return True

    def _tx_valid(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """The §5.1.6.2.1 rules of the module docstring's table."""
        n = len(frame)
        gso = hdr.gso_type
        needs_csum = hdr.flags & HDR_F_NEEDS_CSUM
        if needs_csum:
            # §5.1.6.2.1: NEEDS_CSUM only with CSUM; the field must lie in the frame
            if not self._host_csum or hdr.csum_start + hdr.csum_offset + 2 > n:
                return False
        if gso == GSO_NONE:
            # §5.1.4.2: nothing beyond the MTU without GSO
            return n <= self.mtu + _l2_len(frame)
        # §5.1.6.2.1: only negotiated GSO types (HOST_TSO4; no ECN: HOST_ECN not offered),
        # with NEEDS_CSUM and an MSS
        if gso != GSO_TCPV4 or not self._host_tso4 or not needs_csum or hdr.gso_size == 0:
            return False
        if n > MAX_GSO_FRAME:
            return False
        try:  # must parse as IPv4/TCP: the segmentation (ours or the backend's) needs it
            parse_tcpv4(frame)
        except PacketError:
            return False
        return True

    # ------------------------------------------------------------------ receive
    def _post_rx_buffer(self, chain: Chain, pair: int = 0) -> int | Pending:
        # §5.1.6.3.1: receive buffers are device-writable and at least hold the header
        if chain.readable_len or chain.writable_len < NET_HDR_SIZE:
            self.metrics.inc("rx_bad_buffers")
            return 0
        rx = self._rxs[pair]
        rx.append(chain)
        if len(rx) == 1:
            self._resume_rx()  # the first buffer after none: the backend reads again now
        return PENDING

    def _shape_rx(
        self, hdr: NetHdr, frame: bytes | memoryview
    ) -> list[tuple[NetHdr, bytes | memoryview]] | None:
        """What to deliver for one frame from the backend, given what the driver
        negotiated (§5.1.6.4.1); None if the frame is malformed."""
        n = len(frame)
        if n < ETH_HLEN:
            return None
        flags = hdr.flags
        needs_csum = flags & HDR_F_NEEDS_CSUM
        if needs_csum and hdr.csum_start + hdr.csum_offset + 2 > n:
            return None
        gso = hdr.gso_type
        if gso != GSO_NONE:
            if gso & ~GSO_ECN != GSO_TCPV4 or hdr.gso_size == 0 or n > MAX_GSO_FRAME:
                return None
            if self._guest_tso4 and not gso & GSO_ECN and needs_csum:
                # §5.1.6.4.1: GSO to the driver only with GUEST_TSO4, with NEEDS_CSUM
                self.metrics.inc("rx_gso_frames")
                out = NetHdr(
                    HDR_F_NEEDS_CSUM,
                    GSO_TCPV4,
                    hdr.hdr_len,
                    hdr.gso_size,
                    hdr.csum_start,
                    hdr.csum_offset,
                )
                return [(out, frame)]
            try:
                segments = gso_segment_tcpv4(frame, hdr.gso_size)
            except PacketError:
                return None
            self.metrics.inc("rx_segments", len(segments))
            seg_hdr = NetHdr(HDR_F_DATA_VALID) if self._guest_csum else _PLAIN
            return [(seg_hdr, s) for s in segments]
        if needs_csum:
            if self._guest_csum:  # delivered partial, as Linux does for local traffic
                return [
                    (
                        NetHdr(
                            HDR_F_NEEDS_CSUM,
                            csum_start=hdr.csum_start,
                            csum_offset=hdr.csum_offset,
                        ),
                        frame,
                    )
                ]
            self.metrics.inc("rx_csum_completed")
            return [(_PLAIN, complete_checksum(frame, hdr.csum_start, hdr.csum_offset))]
        if flags & HDR_F_DATA_VALID and self._guest_csum:
            return [(NetHdr(HDR_F_DATA_VALID), frame)]
        return [(_PLAIN, frame)]

    def _deliver(self, hdr: NetHdr, frame: bytes | memoryview, pair: int = 0) -> bool:
        """Write one shaped frame into the kept buffers of ``pair``'s receive queue and
        complete them."""
        m = self.metrics
        n = len(frame)
        if self._mtu_negotiated and hdr.gso_type == GSO_NONE and n > self.mtu + _l2_len(frame):
            m.inc("rx_dropped_over_mtu")  # §5.1.4.1
            return False
        rx = self._rxs[pair]
        rxq = 2 * pair
        if not rx and not self._pull_rx(pair):
            m.inc("rx_dropped_no_buffer")
            if self.queue_pairs > 1:
                m.inc(f"rxq{pair + 1}_dropped_no_buffer")
            return False
        total = NET_HDR_SIZE + n
        first_chain = rx[0]
        if self._mrg and first_chain.writable_len >= total:
            # the usual case with MRG_RXBUF: one buffer holds the frame (num_buffers 1)
            rx.popleft()
            buf = first_chain.writable[0]
            if len(buf) >= total:
                hdr.pack_into(buf, 0, num_buffers=1)
                buf[NET_HDR_SIZE:total] = frame
            else:
                self._fill(first_chain, replace(hdr, num_buffers=1), frame, 0, n)
            self.complete(rxq, first_chain, total)
        elif not self._mrg:
            chain = rx[0]
            if chain.writable_len < total:
                m.inc("rx_dropped_too_big")  # one buffer per frame without MRG_RXBUF
                return False
            rx.popleft()
            self._fill(chain, hdr, frame, 0, n)
            self.complete(rxq, chain, total)
        else:
            for attempt in (0, 1):  # the second time with the buffers posted meanwhile
                need = total
                count = 0
                for chain in rx:  # bounded: at most the queue size is kept
                    count += 1
                    need -= chain.writable_len
                    if need <= 0:
                        break
                if need <= 0 or attempt or not self.pull_available(rxq):
                    break
            if need > 0:
                m.inc("rx_dropped_no_buffer")
                if self.queue_pairs > 1:
                    m.inc(f"rxq{pair + 1}_dropped_no_buffer")
                return False
            chains = [rx.popleft() for _ in range(count)]
            # §5.1.6.4: num_buffers in the first header; every buffer but the last is
            # used up to its full length
            head = replace(hdr, num_buffers=count)
            done = 0
            lens: list[int] = []
            for i, chain in enumerate(chains):
                if i == 0:
                    take = min(chain.writable_len - NET_HDR_SIZE, n)
                    self._fill(chain, head, frame, 0, take)
                    lens.append(NET_HDR_SIZE + take)
                else:
                    take = min(chain.writable_len, n - done)
                    chain.write(0, frame[done : done + take])
                    lens.append(take)
                done += take
            # all buffers of the frame appear in the used ring together: the driver
            # reads num_buffers from the first and expects the rest to be there
            self.complete_many(rxq, list(zip(chains, lens, strict=True)))
            if count > 1:
                m.inc("rx_merged")
        m.inc("rx_frames")
        m.inc("rx_bytes", n)
        return True

    # ------------------------------------------------------------------ faults
    def _tx_release(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """A transmitted frame leaves the fault path: to the backend if the link is
        still up."""
        if not self.link_up:
            self.metrics.inc("tx_dropped_link_down")
            return False
        return self._tx_send(hdr, frame)

    def _fault_frame(
        self, d: _FaultDir, queue: int, hdr: NetHdr, frame: bytes | memoryview
    ) -> bool:
        """One frame of direction ``d`` meets the fault plan (``net.tx`` / ``net.rx``)."""
        fired = self.faults(f"net.{d.name}", queue=queue, nbytes=len(frame))
        if not fired:
            return d.emit(hdr, frame)
        m = self.metrics
        p = d.name
        acts: dict[str, Fired] = {}
        for f in fired:  # bounded: the plan's rules; the first rule of an action wins
            acts.setdefault(f.action, f)
        if "loss" in acts or "gilbert_elliott" in acts:
            m.inc(f"{p}_fault_lost")
            return False
        flap = acts.get("link_flap")
        if flap is not None:
            self._link_flap(float(flap.params["down_s"]))
            m.inc(f"{p}_dropped_link_down")  # the link went down under this frame
            return False
        corrupt = [f for f in fired if f.action == "corrupt_byte"]
        if corrupt:
            # corruption happens on the wire: after the checksums were filled in, and the
            # frames carry no offload flags, so the receiver's checksum check sees it
            wire = self._on_the_wire(hdr, frame)
            if wire is None:
                m.inc(f"{p}_fault_lost")  # malformed offload request: nothing to corrupt
                return False
            for f in corrupt:  # every corrupt_byte rule flips its byte
                offset = int(f.params["offset"])
                for w in wire:  # bounded: the segments of one frame
                    if offset < len(w):
                        w[offset] ^= int(f.params["xor"])
                        m.inc(f"{p}_fault_corrupted")
                        break
                    offset -= len(w)
                else:
                    m.inc("faults_out_of_range")
            hdr = _PLAIN
            frames = [bytes(w) for w in wire]
        else:
            frames = [bytes(frame)]  # it may be held: own it (a backend's buffer is reused)
        steps = tuple(acts[a] for a in ("rate_limit", "delay", "reorder") if a in acts)
        copies = 1
        dup = acts.get("duplicate")
        if dup is not None:
            extra = int(dup.params["count"])
            m.inc(f"{p}_fault_duplicates", extra)
            copies += extra
        ok = True
        for _ in range(copies):  # bounded: count <= 64
            for one in frames:  # bounded: the segments of one frame
                if not self._fault_step(d, hdr, one, steps, 0):
                    ok = False
        return ok

    @staticmethod
    def _on_the_wire(hdr: NetHdr, frame: bytes | memoryview) -> list[bytearray] | None:
        """``frame`` as it would cross a wire: a GSO super-frame cut into segments,
        a partial checksum completed (None: the offload request is malformed)."""
        try:
            if hdr.gso_type != GSO_NONE:
                return [bytearray(s) for s in gso_segment_tcpv4(frame, hdr.gso_size)]
            if hdr.flags & HDR_F_NEEDS_CSUM:
                return [bytearray(complete_checksum(frame, hdr.csum_start, hdr.csum_offset))]
        except (PacketError, ValueError, IndexError):
            return None
        return [bytearray(frame)]

    def _fault_step(
        self, d: _FaultDir, hdr: NetHdr, frame: bytes, steps: tuple[Fired, ...], i: int
    ) -> bool:
        """Run step ``i`` of a frame's holding faults (rate limit, delay, reorder, in
        that order), then let it out. False if it was dropped."""
        if i == len(steps):
            return d.emit(hdr, frame)
        f = steps[i]
        m = self.metrics
        p = d.name
        if f.action == "rate_limit":
            bucket = d.buckets.get(f.rule)
            if bucket is None:
                bucket = d.buckets[f.rule] = _Bucket(
                    float(f.params["bits_per_s"]), int(f.params["burst_bytes"])
                )
            now = self._fault_clock()
            if not bucket.queue and bucket.conforms(now, len(frame)):
                return self._fault_step(d, hdr, frame, steps, i + 1)
            if len(bucket.queue) >= RATE_QUEUE_MAX:
                m.inc(f"{p}_fault_rate_dropped")
                return False
            if d.held >= FAULT_HELD_MAX:
                m.inc(f"{p}_fault_hold_full")  # everything a direction holds is bounded
                return False
            bucket.queue.append((hdr, frame, steps, i + 1))
            d.held += 1
            m.inc(f"{p}_fault_rate_queued")
            self._arm_bucket(d, bucket)
            return True
        if d.held >= FAULT_HELD_MAX:
            m.inc(f"{p}_fault_hold_full")  # everything a direction holds is bounded
            return False
        if f.action == "delay":
            d.held += 1
            m.inc(f"{p}_fault_delayed")
            box: list[TimerHandle] = []

            def due() -> None:
                d.held -= 1
                d.timers.discard(box[0])
                self._fault_step(d, hdr, frame, steps, i + 1)

            t = self.call_later(float(f.params["delay_s"]), due)
            box.append(t)
            d.timers.add(t)
            return True
        # reorder: held until `depth` later frames of this direction went out, or
        # REORDER_MAX_HOLD_S passed (the last frame of a burst is not held forever)
        d.held += 1
        m.inc(f"{p}_fault_reordered")
        entry = _Held(hdr, frame, int(f.params["depth"]))

        def timeout() -> None:
            if entry in d.reorder:
                d.reorder.remove(entry)
                d.held -= 1
                m.inc(f"{p}_fault_reorder_timeouts")
                if entry.timer is not None:
                    d.timers.discard(entry.timer)
                d.out(entry.hdr, entry.frame)

        entry.timer = self.call_later(REORDER_MAX_HOLD_S, timeout)
        d.timers.add(entry.timer)
        d.reorder.append(entry)
        return True

    def _arm_bucket(self, d: _FaultDir, bucket: _Bucket) -> None:
        """Wake up when the first frame queued behind ``bucket`` may go."""
        if bucket.timer is not None and bucket.timer.pending or not bucket.queue:
            return
        wait = bucket.wait(self._fault_clock(), len(bucket.queue[0][1]))

        def due() -> None:
            d.timers.discard(t)
            bucket.timer = None
            now = self._fault_clock()
            q = bucket.queue
            while q and bucket.conforms(now, len(q[0][1])):  # bounded: RATE_QUEUE_MAX
                hdr, frame, steps, i = q.popleft()
                d.held -= 1
                self._fault_step(d, hdr, frame, steps, i)
            self._arm_bucket(d, bucket)

        t = self.call_later(wait, due)
        bucket.timer = t
        d.timers.add(t)

    def _link_flap(self, down_s: float) -> None:
        """LINK_UP off now (config interrupt), on again ``down_s`` seconds later."""
        self.metrics.inc("link_flaps")
        self.set_link(False)
        if self._flap is not None:
            self._flap.cancel()

        def up() -> None:
            self._flap = None
            self.set_link(True)

        self._flap = self.call_later(down_s, up)

    @staticmethod
    def _fill(chain: Chain, hdr: NetHdr, frame: bytes | memoryview, start: int, n: int) -> None:
        """Write ``hdr`` then ``frame[start:start+n]`` at the start of ``chain``."""
        first = chain.writable[0]
        if len(first) >= NET_HDR_SIZE + n:  # the usual layout: one buffer
            hdr.pack_into(first, 0)
            first[NET_HDR_SIZE : NET_HDR_SIZE + n] = frame[start : start + n]
            return
        chain.write(0, hdr.pack())
        if n:
            chain.write(NET_HDR_SIZE, frame[start : start + n])


# --------------------------------------------------------------------------- faults


class _Held:
    """A frame held back by a ``reorder`` fault."""

    __slots__ = ("hdr", "frame", "left", "timer")

    def __init__(self, hdr: NetHdr, frame: bytes, depth: int) -> None:
        self.hdr = hdr
        self.frame = frame
        self.left = depth  # frames still to pass it
        self.timer: TimerHandle | None = None


class _Bucket:
    """A token bucket (``rate_limit``), as the generic cell rate algorithm: ``tat`` is
    when the bucket would be full again; a frame of n bytes may go when
    ``tat - burst/rate <= now``, and moves ``tat`` on by n/rate. With ``burst_bytes`` 0
    a frame goes only when the frames before it have drained at the rate."""

    __slots__ = ("rate", "tau", "tat", "queue", "timer")

    def __init__(self, bits_per_s: float, burst_bytes: int) -> None:
        self.rate = bits_per_s / 8.0  # bytes per second
        self.tau = burst_bytes / self.rate
        self.tat: float | None = None
        self.queue: deque[tuple[NetHdr, bytes, tuple[Fired, ...], int]] = deque()
        self.timer: TimerHandle | None = None

    def wait(self, now: float, n: int) -> float:
        """Seconds until a frame (of ``n`` bytes) conforms."""
        tat = now if self.tat is None else max(self.tat, now)
        return max(0.0, tat - self.tau - now)

    def conforms(self, now: float, n: int) -> bool:
        """Take ``n`` bytes if the bucket allows it now."""
        tat = now if self.tat is None else max(self.tat, now)
        if tat - self.tau > now + 1e-9:
            return False
        self.tat = tat + n / self.rate
        return True


class _FaultDir:
    """The fault path of one direction: frames held, timers, buckets; ``out`` is the
    rest of the data path (:meth:`NetDevice._tx_release` / ``_receive_now``)."""

    def __init__(self, name: str, out: Callable[[NetHdr, bytes | memoryview], bool]) -> None:
        self.name = name
        self.out = out
        self.held = 0
        self.timers: set[TimerHandle] = set()
        self.reorder: list[_Held] = []
        self.buckets: dict[str, _Bucket] = {}

    def emit(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """Let a frame out; frames held for ``reorder`` whose ``depth`` it completes
        follow it."""
        ok = self.out(hdr, frame)
        if self.reorder:
            due: list[_Held] = []
            for h in self.reorder:  # bounded: FAULT_HELD_MAX
                h.left -= 1
                if h.left <= 0:
                    due.append(h)
            for h in due:
                self.reorder.remove(h)
                self.held -= 1
                if h.timer is not None:
                    h.timer.cancel()
                    self.timers.discard(h.timer)
                self.out(h.hdr, h.frame)
        return ok

    def drop_all(self) -> int:
        """Drop every held frame and cancel the timers; returns how many were held."""
        dropped = self.held
        for t in self.timers:
            t.cancel()
        self.timers.clear()
        self.reorder.clear()
        for b in self.buckets.values():
            b.queue.clear()
            b.timer = None
        self.held = 0
        return dropped


# --------------------------------------------------------------------------- loopback


class LoopbackBackend(NetBackend):
    """A wire from the device's transmit to its own receive: every frame sent comes
    back as received, offloads and all (``offloads()`` is ``{"csum", "tso4"}``, so the
    device's receive rules decide what the driver sees). ``send`` returns what
    ``receive`` returned: False when the driver had no buffer for it."""

    name = "loopback"
    takes_views = True  # receive() copies the frame into the receive buffers

    def offloads(self) -> frozenset[str]:
        """Checksum and TSO frames are looped back as they are."""
        return frozenset({"csum", "tso4"})

    def send(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """Hand the frame straight back to the device's receive path."""
        sink = self.sink
        if sink is None:
            return False
        return sink.receive(hdr, frame)


# --------------------------------------------------------------------------- registry


class OptionAdder(Protocol):
    """Where a backend adds its command-line options (an argparse argument group)."""

    def add_argument(self, *names: str, **kwargs: Any) -> Any:
        """As :meth:`argparse.ArgumentParser.add_argument`."""
        ...


class BackendOptionError(ValueError):
    """A backend's options are wrong or what they name is unusable (the user's fault):
    ``python -m vdev net`` prints the message on one line and exits with status 2."""


@dataclass(frozen=True)
class BackendSpec:
    """How ``python -m vdev net --backend NAME`` makes a backend.

    ``create(args)`` builds the backend from the parsed command line (raise
    :class:`BackendOptionError` for a missing or bad option); ``add_options(group)``
    adds the backend's own options (``--record PATH``, ...) to its argument group;
    ``help`` is one line for ``--help``. An option of one backend given with another
    backend is refused by the CLI, so options need unique ``dest`` names and default
    None/False."""

    name: str
    create: Callable[[argparse.Namespace], NetBackend]
    add_options: Callable[[OptionAdder], None] | None = None
    help: str = ""


#: Backends by ``--backend`` name.
BACKENDS: dict[str, BackendSpec] = {}

#: Modules :func:`load_backends` imports; each registers its backend(s) at import.
BACKEND_MODULES: tuple[str, ...] = ("vdev.net_pcap", "vdev.net_switch", "vdev.net_tap")


def register_backend(spec: BackendSpec) -> None:
    """Add (or replace) the backend ``spec.name`` in :data:`BACKENDS`."""
    if not spec.name or not spec.name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"bad backend name {spec.name!r}")
    BACKENDS[spec.name] = spec


def load_backends() -> dict[str, BackendSpec]:
    """Import every module of :data:`BACKEND_MODULES` that exists (each registers its
    backends) and return :data:`BACKENDS`."""
    for name in BACKEND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but imports something missing
                raise
    return BACKENDS


register_backend(
    BackendSpec(
        "loopback",
        lambda args: LoopbackBackend(),
        None,
        "every transmitted frame comes back as received",
    )
)
