"""The vhost-user transport: the kernel as a front-end, like QEMU, of any back-end.

Theory of operation
-------------------
:class:`VhostUserTransport` is the :class:`~kernel.transport.VirtioTransport` for a
device served by a vhost-user back-end the kernel does not own (``qemu-storage-daemon
--export type=vhost-user-blk``, ``python -m vdev blk --vhost-user SOCK``, ...). It
speaks QEMU's ``docs/interop/vhost-user.rst`` over the back-end's Unix socket, with the
wire format of :mod:`vdev.virtio.vhost_user` (one codec for both sides):

1. :meth:`~VhostUserTransport.launch` connects to the socket (missing / refused: a
   :class:`DeviceProbeError` naming the path) and notes the peer's pid
   (``SO_PEERCRED``);
2. :meth:`~VhostUserTransport.get_device_info`: GET_FEATURES; if the back-end offers
   ``VHOST_USER_F_PROTOCOL_FEATURES`` (bit 30), GET_PROTOCOL_FEATURES and
   SET_PROTOCOL_FEATURES with what we use of the offer (REPLY_ACK, CONFIG, MQ, NET_MTU);
   with MQ, GET_QUEUE_NUM (else one queue); SET_OWNER. vhost-user has no device id: the spec
   says what the back-end is (``kernel.VhostUserBlk`` → block, ``kernel.VhostUserNet``
   → net);
3. :meth:`~VhostUserTransport.negotiate`: the driver chooses from the offer (bit 30
   hidden from it, the spec's ``frontend_features`` added to it), SET_FEATURES with
   what the driver took of the back-end's own offer (§2.2: never a bit it did not
   offer) and bit 30 added back when offered (the rings then start disabled until
   SET_VRING_ENABLE); for a NIC whose driver took VIRTIO_NET_F_MTU, NET_SET_MTU with
   the spec's MTU when the back-end offers NET_MTU (as QEMU does). There is no status
   byte to re-read;
4. the region is a memfd (:func:`hostops.fdmem.create_memfd`; no name, so nothing can
   leak), sealed against shrinking and growing (a back-end calling ``ftruncate`` on
   it gets EPERM instead of making our next access die of SIGBUS), handed over with
   SET_MEM_TABLE as one region: guest-physical address 0, user address
   :data:`USER_BASE`, offset 0; our fd is closed right after;
5. config space: the spec's :meth:`~kernel.specs.DeviceSpec.frontend_config` when it
   has one (see below), else GET_CONFIG (needs the CONFIG protocol feature, which
   qemu-storage-daemon requires);
6. each ring: SET_VRING_NUM, SET_VRING_BASE 0, SET_VRING_ADDR (*user* addresses:
   USER_BASE + offset), SET_VRING_CALL and SET_VRING_KICK (an eventfd each, created
   here, passed by ``SCM_RIGHTS``), SET_VRING_ENABLE 1 (with bit 30). A kick is an
   eventfd write; there is no DRIVER_OK message.

The front-end's part of the device
------------------------------------
QEMU does not pass everything to a vhost-user back-end: for virtio-net its own device
model implements the MAC, the link status and the MTU (QEMU's vhost-user net never asks
the back-end for config space; the back-end learns the MAC from the frames it carries).
A spec says the same with ``frontend_features`` (here MAC, STATUS, MTU: offered to the
driver whatever the back-end offers; passed on in SET_FEATURES only when the back-end
offered them too) and ``frontend_config()`` (the config space bytes, taken once per
bring-up -- a random MAC stays the same for the device's life):
:meth:`~VhostUserTransport.read_config` answers from those bytes (zeros past their
end, as the device would) without a message. There is no configuration-change
interrupt then: the front-end's config never changes. The MTU in it reaches the
back-end with NET_SET_MTU (step 3) when the back-end has the NET_MTU protocol feature.

With REPLY_ACK negotiated every request without a reply of its own carries NEED_REPLY
and the back-end's acknowledgement is checked (non-zero: :class:`DeviceControlError`).
One lock serialises request/reply pairs; a reply that does not arrive in time, a broken
header or an EOF leave the stream unusable, so the connection is marked broken and
every later request fails with :class:`DeviceGoneError`.

Interrupts and death
--------------------
The interrupt thread polls every ring's call eventfd and the socket. A readable call fd
means "reap that queue". A readable socket while no request is in flight (checked under
the request lock) is either EOF -- the back-end closed the session or its process died
-- or a message nobody asked for (the back-end may only answer on this socket); both
end the device: what was completed is reaped, every request still in flight fails with
EIO (:meth:`VirtioTransport.fail`), like a dead device process.

At shutdown GET_VRING_BASE stops every ring (best effort, short deadline), then the
socket and eventfds are closed and the memfd mapping released. The back-end process is
not ours: it keeps running and may serve the next front-end.

``metrics()`` is ``{}``: vhost-user has no message to ask a back-end for counters.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from hostops.errors import ChannelTimeout, PeerGone, TransportError
from hostops.eventfd import EventFd
from hostops.fdmem import create_memfd
from hostops.poll import Pollable
from hostops.rundir import RuntimeDir
from hostops.sync import Lock
from hostops.unix import UnixConnection
from vdev.virtio import DeviceId, F, NetF, ProtocolError, RingLayout, bit, feature_names
from vdev.virtio.vhost_user import (
    F_PROTOCOL_FEATURES,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    REPLY_KIND,
    VRING_INDEX_MASK,
    ConfigPayload,
    MemoryRegion,
    MemoryTable,
    Payload,
    ProtocolFeature,
    Req,
    VringAddr,
    VringState,
    decode_header,
    decode_reply,
    encode,
)

from .errors import DeviceControlError, DeviceGoneError
from .specs import DeviceSpec
from .transport import (
    CONTROL_TIMEOUT_S,
    RESET_TIMEOUT_S,
    DeviceInfo,
    SharedMemory,
    VirtioTransport,
)

__all__ = ["VhostUserTransport", "USER_BASE", "USED_PROTOCOL_FEATURES"]

#: The "front-end user address" of our region's first byte (any consistent value works:
#: back-ends only use it to translate SET_VRING_ADDR).
USER_BASE = 0x7F00_0000_0000
#: The protocol features we use when the back-end offers them.
USED_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.MTU)
)
#: How long the interrupt thread waits for the request lock before looking again.
_PEER_CHECK_LOCK_S = 0.1


class VhostUserTransport(VirtioTransport):
    """The kernel as a vhost-user front-end of the back-end at ``spec.path`` (see the
    module docstring)."""

    kind = "vhost-user"

    def __init__(
        self,
        name: str,
        spec: DeviceSpec,
        rundir: RuntimeDir,
        *,
        region_size: int | None = None,
    ) -> None:
        super().__init__(name, spec, rundir, region_size=region_size)
        self.socket_path = os.fspath(getattr(spec, "path", ""))
        self.offered_features = 0
        self.protocol_features = 0
        self._conn: UnixConnection | None = None
        self._peer_pid: int | None = None
        self._ctl = Lock()
        self._reply_ack = False
        self._broken: str | None = None  # why the connection can no longer be used
        self._memfd = -1
        self._kicks: dict[int, EventFd] = {}
        self._calls: dict[int, EventFd] = {}
        #: Feature bits the front-end implements itself (the spec's).
        self.frontend_features = int(getattr(spec, "frontend_features", 0))
        #: The config space the front-end owns (None: the back-end's, GET_CONFIG).
        self.frontend_config: bytes | None = None

    @property
    def pid(self) -> int | None:
        """The back-end's pid as the socket reports it (``SO_PEERCRED``), or None."""
        return self._peer_pid

    def _death_description(self) -> str | None:
        return self._broken

    # ------------------------------------------------------------------ the wire
    def _request(
        self,
        req: Req,
        payload: Payload = None,
        *,
        fds: tuple[int, ...] = (),
        timeout_s: float = CONTROL_TIMEOUT_S,
    ) -> Payload:
        """Send ``req`` and return its reply (None for requests without one; with
        REPLY_ACK the ack is checked). Raises :class:`DeviceControlError` (refused, bad
        reply) and :class:`DeviceGoneError` (connection broken or closed)."""
        what = req.name
        has_reply = req in REPLY_KIND
        ack = self._reply_ack and not has_reply
        message = encode(req, payload, need_reply=ack)
        with self._ctl:
            conn = self._conn
            if conn is None or conn.closed:
                raise DeviceGoneError(self.name, what, "not connected")
            if self._broken is not None:
                raise DeviceGoneError(self.name, what, self._broken)
            try:
                conn.send(message, fds, timeout=timeout_s)
                if not has_reply and not ack:
                    return None
                head, _ = conn.recv_message(HEADER_SIZE, 0, timeout_s)
                hdr = decode_header(head, reply=True)
                body, _ = conn.recv_message(hdr.size, 0, timeout_s)
            except ChannelTimeout as e:
                self._broken = f"no reply to {what} from the back-end in {timeout_s:g} s"
                raise DeviceGoneError(self.name, what, self._broken) from e
            except PeerGone as e:
                self._broken = f"the back-end closed the connection ({e})"
                raise DeviceGoneError(self.name, what, self._broken) from e
            except TransportError as e:
                self._broken = f"vhost-user connection broken: {type(e).__name__}: {e}"
                raise DeviceGoneError(self.name, what, self._broken) from e
            except ProtocolError as e:
                self._broken = f"malformed reply header: {e.message}"
                raise DeviceGoneError(self.name, what, self._broken) from e
        try:
            value = decode_reply(req, hdr, body)
        except ProtocolError as e:
            raise DeviceControlError(self.name, what, e.code, f"bad reply: {e.message}") from None
        if ack and value != 0:
            raise DeviceControlError(
                self.name, what, "NACK", f"the back-end refused it (reply-ack {value})"
            )
        return value

    def _u64(self, req: Req) -> int:
        value = self._request(req)
        if not isinstance(value, int):
            raise DeviceControlError(self.name, req.name, "BAD_REPLY", f"{value!r}")
        return value

    # ------------------------------------------------------------------ bring-up
    def launch(self) -> None:
        """Step 1: connect to the back-end's socket."""
        path = self.socket_path
        if not path:
            raise self.probe_error("no vhost-user socket path given")
        try:
            self._conn = UnixConnection.connect(path, timeout=CONTROL_TIMEOUT_S)
        except PeerGone as e:
            raise self.probe_error(
                f"cannot connect to the vhost-user back-end at {path}: {e}"
            ) from None
        self._peer_pid = self._conn.peer_pid()

    def get_device_info(self) -> DeviceInfo:
        """Step 2: features, protocol features, queue count, SET_OWNER."""
        self.offered_features = self._u64(Req.GET_FEATURES)
        if self.offered_features & bit(F_PROTOCOL_FEATURES):
            theirs = self._u64(Req.GET_PROTOCOL_FEATURES)
            ours = theirs & USED_PROTOCOL_FEATURES
            self._request(Req.SET_PROTOCOL_FEATURES, ours)
            self.protocol_features = ours
            self._reply_ack = bool(ours & bit(ProtocolFeature.REPLY_ACK))
        num_queues = 1
        if self.protocol_features & bit(ProtocolFeature.MQ):
            num_queues = self._u64(Req.GET_QUEUE_NUM)
            if not 1 <= num_queues <= VRING_INDEX_MASK + 1:
                raise self.probe_error(
                    f"GET_QUEUE_NUM: {num_queues} queues (vhost-user numbers rings 0..255)"
                )
        self._request(Req.SET_OWNER)
        device_id = int(getattr(self.spec, "device_id", 0))
        info = DeviceInfo(
            device_id, num_queues, self.spec.requested_queue_size, f"vhost-user {self.socket_path}"
        )
        self.info = info
        return info

    def negotiate(self, choose: Callable[[int], int]) -> int:
        """Step 3: SET_FEATURES with the driver's choice of the back-end's offer (plus
        bit 30 when offered); the spec's ``frontend_features`` are offered to the driver
        too. Then NET_SET_MTU for a NIC (see :meth:`_set_mtu`)."""
        protocol = self.offered_features & bit(F_PROTOCOL_FEATURES)
        theirs = self.offered_features & ~protocol
        offered = theirs | (self.frontend_features & ~protocol)
        wanted = int(choose(offered)) & offered
        if not wanted & bit(F.VERSION_1):
            raise self.probe_error(
                "the back-end does not offer VIRTIO_F_VERSION_1 (legacy devices are not "
                f"supported); offered: {', '.join(feature_names(offered, self.device_id))}"
            )
        # §2.2: the device gets no bit it did not offer (the front-end's own stay here)
        self._request(Req.SET_FEATURES, (wanted & theirs) | protocol)
        self.features = wanted
        self._set_mtu()
        return wanted

    def _set_mtu(self) -> None:
        """NET_SET_MTU with the spec's MTU for a NIC whose driver took
        VIRTIO_NET_F_MTU, when the back-end offers NET_MTU (QEMU does the same, so
        the back-end applies the MTU the driver reads from our config space)."""
        mtu = getattr(self.spec, "mtu", None)
        if (
            self.device_id != DeviceId.NET
            or not self.has_feature(NetF.MTU)
            or not self.protocol_features & bit(ProtocolFeature.MTU)
            or not isinstance(mtu, int)
        ):
            return
        try:
            self._request(Req.NET_SET_MTU, mtu)
        except DeviceControlError as e:
            raise self.probe_error(f"the back-end refused MTU {mtu}: {e}") from None

    def _create_region(self, size: int) -> SharedMemory:
        # sealed (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) before it is handed over:
        # the back-end cannot truncate it under our mapping (no SIGBUS in the kernel)
        fd, mapping = create_memfd(size, name=f"vlab-{self.name}", seal=True)
        self._memfd = fd
        return mapping

    def _hand_over_region(self, region: SharedMemory) -> None:
        table = MemoryTable((MemoryRegion(0, region.size, USER_BASE, 0),))
        try:
            self._request(Req.SET_MEM_TABLE, table, fds=(self._memfd,))
        finally:
            self._close_memfd()

    def _close_memfd(self) -> None:
        fd, self._memfd = self._memfd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def read_config(self, size: int, offset: int = 0) -> bytes:
        """Exactly ``size`` bytes of config space at ``offset``: the front-end's own
        (the spec's ``frontend_config()``), else GET_CONFIG (needs the CONFIG protocol
        feature); :class:`DeviceControlError` when neither is possible."""
        if size < 0 or offset < 0 or offset + size > MAX_CONFIG_SIZE:
            raise ValueError(f"config range [{offset}, +{size}) beyond {MAX_CONFIG_SIZE} bytes")
        local = self._own_config()
        if local is not None:
            return local[offset : offset + size].ljust(size, b"\0")
        if not self.protocol_features & bit(ProtocolFeature.CONFIG):
            raise DeviceControlError(
                self.name,
                "GET_CONFIG",
                "UNSUPPORTED",
                "the back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG",
            )
        reply = self._request(Req.GET_CONFIG, ConfigPayload(offset, size, 0, bytes(size)))
        if not isinstance(reply, ConfigPayload) or reply.size != size or reply.offset != offset:
            raise DeviceControlError(
                self.name,
                "GET_CONFIG",
                "BAD_REPLY",
                f"asked {size} bytes at {offset}, got {reply!r}",
            )
        return reply.data

    def _own_config(self) -> bytes | None:
        """The front-end's config space, asked of the spec once (then kept)."""
        if self.frontend_config is None:
            make = getattr(self.spec, "frontend_config", None)
            data = make() if callable(make) else None
            if data is not None:
                self.frontend_config = bytes(data)[:MAX_CONFIG_SIZE]
        return self.frontend_config

    def _setup_vring(self, index: int, layout: RingLayout) -> Callable[[], None]:
        if index > VRING_INDEX_MASK:
            raise ValueError(f"{self.name}: vhost-user numbers rings 0..255, not {index}")
        kick, call = EventFd.create(), EventFd.create()
        self._kicks[index], self._calls[index] = kick, call
        self._request(Req.SET_VRING_NUM, VringState(index, layout.size))
        self._request(Req.SET_VRING_BASE, VringState(index, 0))
        addr = VringAddr(
            index, 0, USER_BASE + layout.desc, USER_BASE + layout.used, USER_BASE + layout.avail
        )
        self._request(Req.SET_VRING_ADDR, addr)
        self._request(Req.SET_VRING_CALL, index, fds=(call.fileno(),))
        self._request(Req.SET_VRING_KICK, index, fds=(kick.fileno(),))
        if self.offered_features & bit(F_PROTOCOL_FEATURES):
            self._request(Req.SET_VRING_ENABLE, VringState(index, 1))
        return kick.write

    # ------------------------------------------------------------------ interrupts
    def _irq_sources(self) -> list[Pollable]:
        assert self._conn is not None
        return [self._conn, *self._calls.values()]

    def _collect_interrupts(self, ready: list[object]) -> tuple[list[int], str | None]:
        indices = [i for i, call in self._calls.items() if call in ready and call.read()]
        gone = self._check_peer() if self._conn in ready else None
        return indices, gone

    def _check_peer(self) -> str | None:
        """The socket is readable: unless a request is in flight (its reply), that is
        EOF or a message nobody asked for. Returns why the device is gone, or None."""
        if not self._ctl.acquire(timeout=_PEER_CHECK_LOCK_S):
            return None  # a request is in flight: the readable bytes are its reply
        try:
            conn = self._conn
            if self._broken is not None:
                return self._broken
            if conn is None or conn.closed or not conn.recv_ready():
                return None
            try:
                head, _ = conn.recv_message(HEADER_SIZE, 0, RESET_TIMEOUT_S)
            except TransportError as e:
                self._broken = f"the vhost-user back-end hung up ({e})"
                return self._broken
            self._broken = (
                f"the back-end sent a message nobody asked for ({head[:4].hex()}...): "
                "protocol violation"
            )
            return self._broken
        finally:
            self._ctl.release()

    def _drain_interrupts(self) -> None:
        for call in self._calls.values():
            call.read()

    # ------------------------------------------------------------------ shutdown
    def _stop_device(self) -> None:
        if self._conn is None or self._broken is not None:
            return
        for index in self._kicks:
            try:
                self._request(Req.GET_VRING_BASE, VringState(index, 0), timeout_s=RESET_TIMEOUT_S)
            except (DeviceControlError, DeviceGoneError, ProtocolError):
                return

    def _close_channels(self) -> None:
        with self._ctl:
            conn, self._conn = self._conn, None
            if self._broken is None:
                self._broken = "closed by the kernel"
        if conn is not None:
            conn.close()
        for efd in (*self._kicks.values(), *self._calls.values()):
            efd.close()
        self._close_memfd()
