"""virtio-net (§5.1): :class:`NetDevice`, the loopback backend and the backend registry.

Written against the public :class:`vdev.Device` API, as :mod:`vdev.blk` is; the outside
world is a :class:`~vdev.netbackend.NetBackend` (see :mod:`vdev.netbackend` for the
contract between the two).

Theory of operation
-------------------
Two queues: receiveq1 (0) and transmitq1 (1). Every frame on either is preceded by the
12-byte ``virtio_net_hdr`` (VERSION_1, :class:`~vdev.virtio.net.NetHdr`).

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
the next frame, ``num_buffers`` is 1. No buffer (or not enough for a merged frame) →
the frame is dropped (``rx_dropped_no_buffer``) and ``receive`` returns False. Nothing
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
from dataclasses import dataclass
from typing import Any, Protocol

from vdev.device import PENDING, Device, Pending
from vdev.netbackend import NetBackend
from vdev.virtio.constants import DeviceId, NetF, bit
from vdev.virtio.control import ErrorCode
from vdev.virtio.errors import ProtocolError
from vdev.virtio.net import (
    ETH_HLEN,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    MAX_MTU,
    MIN_MTU,
    NET_HDR_SIZE,
    RX_QUEUE,
    S_LINK_UP,
    TX_QUEUE,
    NetConfig,
    NetHdr,
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
_REQUIRES = ((NetF.HOST_TSO4, NetF.CSUM), (NetF.GUEST_TSO4, NetF.GUEST_CSUM))

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

#: An IEEE 802.1Q tag adds 4 bytes to the Ethernet header.
VLAN_HLEN = 4
#: The largest GSO super-frame: a whole IPv4 packet behind an Ethernet + 802.1Q header.
MAX_GSO_FRAME = ETH_HLEN + VLAN_HLEN + MAX_IPV4_TOTAL_LENGTH

_PLAIN = NetHdr()
_VLAN_TAG = ETHERTYPE_VLAN.to_bytes(2, "big")


def _l2_len(frame: bytes | memoryview) -> int:
    """Bytes of Ethernet header the MTU does not count: 14, or 18 with an 802.1Q tag."""
    return ETH_HLEN + VLAN_HLEN if frame[12:14] == _VLAN_TAG else ETH_HLEN


class NetDevice(Device):
    """virtio-net over a :class:`~vdev.netbackend.NetBackend` (see the module docstring).

    ``mac`` is the six-byte address in the config space; ``mtu`` (68..65535) the largest
    L3 packet without GSO; ``queue_size`` the largest queue the driver may set up (a
    power of two). The device is the backend's :class:`~vdev.netbackend.FrameSink`:
    the backend is attached here (its watches and timers start with the runtime).
    """

    device_id = DeviceId.NET
    name = "net"
    num_queues = 2

    def __init__(
        self,
        backend: NetBackend,
        *,
        mac: bytes,
        mtu: int = 1500,
        queue_size: int = 256,
    ) -> None:
        super().__init__()
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
        self._rx: deque[Chain] = deque()  # the driver's receive buffers, oldest first
        self._active = False
        self._mrg = False
        self._guest_csum = False
        self._guest_tso4 = False
        self._host_csum = False
        self._host_tso4 = False
        self._mtu_negotiated = False
        self._resume_rx: Callable[[], None] = backend.resume_rx
        offloads = backend.offloads()
        self._backend_csum = "csum" in offloads
        self._backend_tso4 = "tso4" in offloads
        backend.attach(self)  # its watches and timers start when the runtime does

    # ------------------------------------------------------------------ Device API
    def device_features(self) -> int:
        """MAC, STATUS, MTU, CSUM, GUEST_CSUM, HOST_TSO4, GUEST_TSO4, MRG_RXBUF."""
        return NET_FEATURES

    def config(self) -> bytes:
        """The config space (§5.1.4): MAC, status (LINK_UP), one queue pair, MTU."""
        return self.net_config.pack()

    @property
    def net_config(self) -> NetConfig:
        """The config space as a dataclass."""
        return NetConfig(self.mac, S_LINK_UP if self.link_up else 0, 1, self.mtu)

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
        if queue == RX_QUEUE:
            self._rx.clear()

    def reset(self) -> None:
        """Forget the kept receive buffers and what was negotiated."""
        self._rx.clear()
        self._active = False
        self._mrg = self._guest_csum = self._guest_tso4 = False
        self._host_csum = self._host_tso4 = self._mtu_negotiated = False
        self.mtu = self.configured_mtu
        super().reset()

    def close(self) -> None:
        """Close the backend."""
        self._rx.clear()
        self.backend.close()

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Transmit one frame (queue 1) or keep one receive buffer (queue 0)."""
        if queue == TX_QUEUE:
            self._transmit(chain)
            return 0
        if queue == RX_QUEUE:
            return self._post_rx_buffer(chain)
        return 0  # num_queues is 2: the runtime never asks for another

    # ------------------------------------------------------------------ FrameSink
    def rx_buffers_available(self) -> bool:
        """True if the driver has posted receive buffers not used yet."""
        return bool(self._rx)

    @property
    def rx_buffers(self) -> int:
        """How many receive buffers are kept, waiting for frames."""
        return len(self._rx)

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
        m = self.metrics
        if not self.link_up:
            m.inc("rx_dropped_link_down")
            return False
        if not self._rx:  # the common drop: check before doing any work on the frame
            m.inc("rx_dropped_no_buffer")
            return False
        frames = self._shape_rx(hdr, frame)
        if frames is None:
            m.inc("rx_bad_frames")
            return False
        ok = True
        for h, f in frames:
            if not self._deliver(h, f):
                ok = False
        return ok

    # ------------------------------------------------------------------ transmit
    def _transmit(self, chain: Chain) -> None:
        m = self.metrics
        n = chain.readable_len - NET_HDR_SIZE
        if chain.writable_len or n < ETH_HLEN:
            m.inc("tx_bad_frames")  # §5.1.6.2: header + at least an Ethernet header
            return
        first = chain.readable[0]
        if len(first) >= NET_HDR_SIZE:
            hdr = NetHdr.unpack(first)
        else:
            hdr = NetHdr.unpack(chain.read(0, NET_HDR_SIZE))
        if len(first) == chain.readable_len:  # the usual layout: one buffer
            frame: bytes | memoryview = bytes(first[NET_HDR_SIZE:])
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
        needs_csum = bool(hdr.flags & HDR_F_NEEDS_CSUM)
        if hdr.gso_type != GSO_NONE:
            m.inc("tx_gso_frames")
        if needs_csum:
            m.inc("tx_csum_offloaded")
        send = self.backend.send
        if hdr.gso_type != GSO_NONE:
            if self._backend_tso4:
                out = NetHdr(
                    HDR_F_NEEDS_CSUM,
                    hdr.gso_type,
                    hdr.hdr_len,
                    hdr.gso_size,
                    hdr.csum_start,
                    hdr.csum_offset,
                )
                if not send(out, frame):
                    m.inc("tx_dropped_backend")
                return
            segments = gso_segment_tcpv4(frame, hdr.gso_size)  # checked in _tx_valid
            m.inc("tx_segments", len(segments))
            for seg in segments:
                if not send(_PLAIN, seg):
                    m.inc("tx_dropped_backend")
            return
        if needs_csum:
            if self._backend_csum:
                out = NetHdr(
                    HDR_F_NEEDS_CSUM, csum_start=hdr.csum_start, csum_offset=hdr.csum_offset
                )
                if not send(out, frame):
                    m.inc("tx_dropped_backend")
                return
            frame = complete_checksum(frame, hdr.csum_start, hdr.csum_offset)
            m.inc("tx_csum_completed")
        if not send(_PLAIN, frame):
            m.inc("tx_dropped_backend")

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
    def _post_rx_buffer(self, chain: Chain) -> int | Pending:
        # §5.1.6.3.1: receive buffers are device-writable and at least hold the header
        if chain.readable_len or chain.writable_len < NET_HDR_SIZE:
            self.metrics.inc("rx_bad_buffers")
            return 0
        rx = self._rx
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

    def _deliver(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """Write one shaped frame into the kept buffers and complete them."""
        m = self.metrics
        n = len(frame)
        if self._mtu_negotiated and hdr.gso_type == GSO_NONE and n > self.mtu + _l2_len(frame):
            m.inc("rx_dropped_over_mtu")  # §5.1.4.1
            return False
        rx = self._rx
        if not rx:
            m.inc("rx_dropped_no_buffer")
            return False
        total = NET_HDR_SIZE + n
        if not self._mrg:
            chain = rx[0]
            if chain.writable_len < total:
                m.inc("rx_dropped_too_big")  # one buffer per frame without MRG_RXBUF
                return False
            rx.popleft()
            self._fill(chain, hdr, frame, 0, n)
            self.complete(RX_QUEUE, chain, total)
        else:
            need = total
            count = 0
            for chain in rx:  # bounded: at most the queue size is kept
                count += 1
                need -= chain.writable_len
                if need <= 0:
                    break
            if need > 0:
                m.inc("rx_dropped_no_buffer")
                return False
            chains = [rx.popleft() for _ in range(count)]
            # §5.1.6.4: num_buffers in the first header; every buffer but the last is
            # used up to its full length
            head = NetHdr(
                hdr.flags,
                hdr.gso_type,
                hdr.hdr_len,
                hdr.gso_size,
                hdr.csum_start,
                hdr.csum_offset,
                count,
            )
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
            self.complete_many(RX_QUEUE, list(zip(chains, lens, strict=True)))
            if count > 1:
                m.inc("rx_merged")
        m.inc("rx_frames")
        m.inc("rx_bytes", n)
        return True

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


# --------------------------------------------------------------------------- loopback


class LoopbackBackend(NetBackend):
    """A wire from the device's transmit to its own receive: every frame sent comes
    back as received, offloads and all (``offloads()`` is ``{"csum", "tso4"}``, so the
    device's receive rules decide what the driver sees). ``send`` returns what
    ``receive`` returned: False when the driver had no buffer for it."""

    name = "loopback"

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
