"""A vhost-user back-end for any :class:`~vdev.device.Device` (QEMU's
``docs/interop/vhost-user.rst``), so that QEMU — and the guest's own virtio driver —
drive our Python devices.

Theory of operation
-------------------
:class:`VhostUserBackend` listens on a Unix socket (``hostops.unix``, 0600) and serves
**one front-end connection at a time**. It is single-threaded: the session's loop
waits on the listening socket (only while nobody is connected), the connection, every
ring's kick eventfd, the device's own event sources and timers, and a ``Waker`` that
:meth:`~VhostUserBackend.stop` rings.

Messages are read whole (12-byte header, then exactly ``size`` payload bytes within
``message_timeout`` seconds, fds via ``SCM_RIGHTS``) and parsed by
:mod:`vdev.virtio.vhost_user`. What happens to a bad message depends on whether the
session can still be trusted:

=========================================  ============================================
problem                                    what happens
=========================================  ============================================
garbage header, bad size, payload of the   one log line, the connection is closed, the
wrong shape, unknown / unsupported         device is reset and the back-end waits for
request, wrong number of fds, an fd that   the next front-end. The process never dies
is not an eventfd or smaller than its      of bad input.
region, an address outside guest memory,
peer gone mid-message, read timeout
a well-formed request we refuse (bad ring  with REPLY_ACK negotiated and NEED_REPLY
index or size, unoffered feature, ring     set: a non-zero ack, the session goes on;
busy, device refuses a config write)       otherwise as above (the front-end could not
                                           tell)
=========================================  ============================================

Connection state (all of it dropped on disconnect — the chains the device keeps are
released — then ``device.reset()``): negotiated protocol features, acked virtio features, the memory
table (regions mmap'd from the passed fds, ``hostops.fdmem``; guest-physical lookups by
:class:`~vdev.virtio.memory.RegionMemory`; ring addresses, which arrive as front-end
*user* addresses, translated by :class:`~vdev.virtio.vhost_user.UserAddressMap`) and
per ring: size, user addresses, base, kick/call/err eventfds, started, enabled.

Memory the front-end could shrink is refused: a region's fd must be sealed against
shrinking (``F_SEAL_SHRINK``), or still sealable, and then we add the seal ourselves
(:func:`hostops.fdmem.require_shrink_seal`); otherwise (a tmpfs or hugetlbfs file, a
memfd created without ``MFD_ALLOW_SEALING``) SET_MEM_TABLE fails with a logged one-line
reason and the connection is closed: a front-end's ``ftruncate`` must not be able to
kill this process with SIGBUS. QEMU's ``memory-backend-memfd`` (what ``vlab vm`` uses)
seals by default (``seal=on``: SHRINK, GROW and SEAL), so it is accepted as is.

Ring states ("Ring states" in the spec): a ring is *started* by SET_VRING_KICK (an
eventfd, or bit 8 "no fd": polling mode, the ring is checked every
:attr:`~VhostUserBackend.poll_interval` seconds by a session timer) and *stopped* by
GET_VRING_BASE, which replies with the next available index and closes the kick fd. It
is *enabled* by SET_VRING_ENABLE 1; rings start disabled, and a SET_FEATURES without
``VHOST_USER_F_PROTOCOL_FEATURES`` (bit 30) enables them all. A ring runs when it is
started and enabled and has a size, addresses and memory: the message that makes it so
builds its :class:`~vdev.virtio.queue.DeviceQueue` (EVENT_IDX / INDIRECT_DESC as acked,
``last_avail`` = the base), the first time after a negotiation calling
``device.activate(features)`` first; the ring is stopped (keeping its position, releasing
the chains the device keeps) when it is stopped, disabled or reconfigured.

Data path, loop, timers and the device's own event sources: the
:class:`vdev.session.DeviceSession` this back-end drives (shared with the ZeroMQ
runtime): the disable–drain–re-enable–recheck loop, ``budget`` chains per ring per round,
``device.handle()`` per valid chain, a bad chain completed with length 0 and counted,
chains the device keeps and completes later. What is this transport's: "interrupt"
means writing the ring's call eventfd; a broken ring is no longer served and its err
eventfd is written. A configuration-change interrupt needs the back-end request channel
(BACKEND_REQ), which is not offered: ``device.notify_config_change()`` is logged once and
counted as ``config_interrupts_unsupported``.

Offered: features ``device.device_features() | RING_FEATURES | bit 30``; protocol
features MQ (GET_QUEUE_NUM answers ``device.num_queues``), REPLY_ACK, CONFIG
(GET_CONFIG/SET_CONFIG from ``device.config()`` / ``device.write_config()``; bytes past
the device's config space read as zero), RESET_DEVICE and, for a device with
``set_mtu`` (:class:`MtuDevice`: virtio-net), NET_MTU: QEMU sends ``NET_SET_MTU`` when
the driver negotiated VIRTIO_NET_F_MTU, and the device's MTU follows (an MTU the device
refuses is nacked with REPLY_ACK). Not offered: INFLIGHT_SHMFD, BACKEND_REQ, LOG_SHMFD,
STATUS, RARP and the rest.

Fault injection (``injector=``, ``--faults PLAN``): every message fires
``control.<REQUEST>`` before it is served; ``refuse_features_ok`` refuses the next
SET_FEATURES (there is no FEATURES_OK without the STATUS protocol feature): a nack with
REPLY_ACK, else the connection ends; ``needs_reset`` writes the ring's err eventfd; the
parent watch stays heard during a ``hang``.

Tracing: with ``VLAB_TRACE`` set the session traces the data path
(:meth:`vdev.session.DeviceSession.trace_from_env`), and every message becomes a ``ctl``
event (request name, payload fields, number of fds, reply or error) — see
``docs/trace-format.md``.

The back-end runs until :meth:`~VhostUserBackend.stop` (SIGTERM through :func:`serve`)
or, when it was launched by :class:`hostops.DeviceProcess`, until that process dies
(the parent-watch pipe; see :mod:`hostops.process`).

Counters (:attr:`VhostUserBackend.counters`, logged when a connection ends):
:data:`BACKEND_COUNTERS` (``connections messages protocol_errors nacks config_reads``,
the session's counters, ``config_interrupts_unsupported``); the device's own counters
(``device.metrics``, and under a fault plan the injector's cumulative ``faults_fired``
and ``fault:<action>``) are logged on the next line, ``connection N device counters:
name value, ...``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

from hostops.barrier import full_barrier
from hostops.errors import TransportError
from hostops.eventfd import EventFd, NotAnEventFd
from hostops.fdmem import MappedFd, MappingError, require_shrink_seal
from hostops.process import ParentWatch
from hostops.unix import UnixConnection, UnixServer
from vdev.device import RING_FEATURES, Device
from vdev.injector import FaultInjector
from vdev.session import SESSION_COUNTERS, DeviceSession, Ring
from vdev.virtio.constants import bit
from vdev.virtio.errors import AddressError, ProtocolError, UsageError
from vdev.virtio.memory import RegionMemory
from vdev.virtio.poll import DEFAULT_POLL_US
from vdev.virtio.ring import RingLayout
from vdev.virtio.vhost_user import (
    F_PROTOCOL_FEATURES,
    HEADER_SIZE,
    MAX_REGIONS,
    REPLY_KIND,
    ConfigPayload,
    ErrorCode,
    Header,
    MemoryTable,
    Payload,
    ProtocolFeature,
    Req,
    UserAddressMap,
    VringAddr,
    VringState,
    decode_header,
    decode_payload,
    encode,
    expected_fds,
    vring_file,
)

__all__ = [
    "VhostUserBackend",
    "OFFERED_PROTOCOL_FEATURES",
    "BACKEND_COUNTERS",
    "MtuDevice",
    "offered_protocol_features",
    "serve",
]

#: Protocol features the back-end offers for every device.
OFFERED_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.RESET_DEVICE)
)


@runtime_checkable
class MtuDevice(Protocol):
    """A device that takes the MTU from the front-end (``NET_SET_MTU``), e.g.
    :class:`vdev.net.NetDevice`: for it the back-end also offers NET_MTU."""

    def set_mtu(self, mtu: int) -> None:
        """Apply ``mtu``; raise :class:`~vdev.virtio.errors.ProtocolError` to refuse."""
        ...


def offered_protocol_features(device: Device) -> int:
    """The protocol features offered for ``device``: :data:`OFFERED_PROTOCOL_FEATURES`,
    plus NET_MTU when the device has ``set_mtu`` (:class:`MtuDevice`)."""
    extra = bit(ProtocolFeature.MTU) if isinstance(device, MtuDevice) else 0
    return OFFERED_PROTOCOL_FEATURES | extra


#: Counters of :attr:`VhostUserBackend.counters`.
BACKEND_COUNTERS = (
    "connections",
    "messages",
    "protocol_errors",
    "nacks",
    "config_reads",
    *SESSION_COUNTERS,
    "config_interrupts_unsupported",  # device config changes we cannot tell the driver
)

_BAD_STATE = "BAD_STATE"

#: The counters logged (cumulative) when a connection ends.
_SUMMARY = (
    "messages",
    "kicks_received",
    "chains",
    "bad_chains",
    "handler_errors",
    "ring_errors",
    "interrupts",
    "chains_kept",
    "completions",
    "stale_completions",
    "chains_released",
    "timers_fired",
    "config_interrupts_unsupported",
)


class _Close(Exception):
    """End the connection: the session cannot go on (message says why)."""


@dataclass(slots=True, eq=False)
class _Vring:
    """What the front-end told us about one ring that only vhost-user knows (size,
    base, enable and the running queue are the session's :class:`~vdev.session.Ring`)."""

    ring: Ring
    addr: VringAddr | None = None
    kick: EventFd | None = None
    call: EventFd | None = None
    err: EventFd | None = None
    polling: bool = False  # started with "no fd": check the ring periodically
    started: bool = False


class VhostUserBackend:
    """Serve ``device`` over vhost-user at ``socket_path``.

    :meth:`serve_forever` blocks until :meth:`stop` (thread- and signal-safe) and
    returns 0; the socket file is removed on the way out. ``budget`` bounds the chains
    served per ring per round; ``message_timeout`` bounds how long the rest of a
    message may take once its first byte arrived; ``watch_parent`` ends the loop when
    the process that launched this one with :class:`hostops.DeviceProcess` dies (no
    effect otherwise); ``poll_us`` bounds the hybrid-polling window after a drain (0:
    off; ``poll_fixed``: no adaptation; :mod:`vdev.virtio.poll`). The rings, the loop
    and the device's event sources are :attr:`session`'s.
    """

    #: Seconds the poller sleeps at most when idle.
    idle_timeout = DeviceSession.idle_timeout
    #: Seconds between checks of a ring started without a kick fd (polling mode).
    poll_interval = 0.01

    def __init__(
        self,
        device: Device,
        socket_path: str,
        *,
        budget: int = 64,
        message_timeout: float = 5.0,
        log: Any = None,
        watch_parent: bool = True,
        injector: FaultInjector | None = None,
        poll_us: float = DEFAULT_POLL_US,
        poll_fixed: bool = False,
    ) -> None:
        if device.num_queues < 1 or device.num_queues > 256:
            raise UsageError(f"{device!r}: vhost-user rings are numbered 0..255")
        self.device = device
        self.socket_path = socket_path
        self.message_timeout = message_timeout
        self.session = DeviceSession(
            device,
            self,
            budget=budget,
            counters=BACKEND_COUNTERS,
            log_prefix=f"vhost-user {device.name}: ",
            log_file=log,
            poll_us=poll_us,
            poll_fixed=poll_fixed,
        )
        self.session.idle_timeout = self.idle_timeout
        self.session.trace_from_env(sys.argv)
        self.tracer = self.session.tracer
        if injector is not None:
            self.session.attach_injector(injector)
        self.counters = self.session.counters
        self.rings = self.session.rings
        self.offered = (
            (device.device_features() & ~RING_FEATURES) | RING_FEATURES | bit(F_PROTOCOL_FEATURES)
        )
        self.offered_protocol = offered_protocol_features(device)
        self.watch_parent = watch_parent
        self._parent: ParentWatch | None = None
        self._server: UnixServer | None = None
        self._conn: UnixConnection | None = None
        self._conn_no = 0
        self._closed = False
        self._config_warned = False
        self._poll_timer: Any = None  # the polling-mode timer, while armed
        self.exit_reason = ""
        self._handlers: dict[Req, Callable[[Header, Any, list[int]], Payload]] = {
            Req.GET_FEATURES: self._get_features,
            Req.SET_FEATURES: self._set_features,
            Req.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Req.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Req.SET_OWNER: self._set_owner,
            Req.RESET_OWNER: self._reset_device,
            Req.SET_MEM_TABLE: self._set_mem_table,
            Req.SET_VRING_NUM: self._set_vring_num,
            Req.SET_VRING_ADDR: self._set_vring_addr,
            Req.SET_VRING_BASE: self._set_vring_base,
            Req.GET_VRING_BASE: self._get_vring_base,
            Req.SET_VRING_KICK: self._set_vring_kick,
            Req.SET_VRING_CALL: self._set_vring_call,
            Req.SET_VRING_ERR: self._set_vring_err,
            Req.SET_VRING_ENABLE: self._set_vring_enable,
            Req.GET_CONFIG: self._get_config,
            Req.SET_CONFIG: self._set_config,
            Req.RESET_DEVICE: self._reset_device,
            Req.GET_QUEUE_NUM: self._get_queue_num,
            Req.NET_SET_MTU: self._net_set_mtu,
        }
        self._new_session_state()

    @property
    def budget(self) -> int:
        """Chains served per ring per round."""
        return self.session.budget

    def _new_session_state(self) -> None:
        self.protocol_features = 0
        self.acked_features = 0
        self.owner = False
        self._vrings = [_Vring(ring) for ring in self.rings]
        self._maps: list[MappedFd] = []
        self._memory: RegionMemory | None = None
        self._umap: UserAddressMap | None = None
        self._activated = False

    # ================================================================== logging
    def _log(self, message: str, kind: str | None = None) -> None:
        self.session.log(message, kind)

    # ================================================================== the loop
    def serve_forever(self) -> int:
        """Listen and serve front-ends one after another until :meth:`stop`."""
        try:
            self._open()
            self.session.run(on_error=self._internal_error)
        finally:
            self.close()
        return 0

    def _internal_error(self, e: Exception) -> None:
        """A bug of ours: lose the connection, not the process."""
        self._log(f"internal error: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        if self._conn is not None:
            self._end_session(f"internal error: {type(e).__name__}: {e}")

    def stop(self, reason: str = "stopped") -> None:
        """Make :meth:`serve_forever` return (signal-handler and thread safe)."""
        if not self.session.stopping:
            self.exit_reason = reason
        self.session.stop()

    def _open(self) -> None:
        self.session.open()
        self._server = UnixServer(self.socket_path)
        self.session.add_source(self._server, self._accept)
        if self.watch_parent:
            self._parent = self.session.watch_parent(self._parent_gone)
        self._log(
            f"listening on {self.socket_path} ({self.device.num_queues} queue(s), "
            f"features {self.offered:#x})"
        )
        self._log(f"protocol features offered: {self.offered_protocol:#x}")

    def _parent_gone(self) -> None:
        self._log("parent process is gone: exiting")
        self.stop("parent gone")

    def _on_kick(self, vring: _Vring, efd: EventFd) -> None:
        if vring.kick is not efd or efd.closed:  # replaced earlier in this round
            return
        efd.read()
        self.session.kick(vring.ring.index)

    def _accept(self) -> None:
        server, session = self._server, self.session
        assert server is not None
        if self._conn is not None:
            session.remove_source(server)
            return
        conn = server.accept(0)
        if conn is None:
            return
        self._conn = conn
        self._conn_no += 1
        self.counters["connections"] += 1
        session.remove_source(server)  # one front-end at a time; others wait in the backlog
        session.add_source(conn, self._serve_message)
        self._log(f"connection {self._conn_no}: front-end connected")

    def close(self) -> None:
        """Close the connection, the socket (removing its file) and the device.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        session = self.session
        session.stopping = True
        if self._conn is not None:
            self._end_session(f"back-end stopping ({self.exit_reason or 'closed'})")
        server, self._server = self._server, None
        if server is not None:
            session.remove_source(server)
            try:
                server.close()
            except Exception as e:
                self._log(f"closing {type(server).__name__}: {e}")
        parent, self._parent = self._parent, None
        if parent is not None:
            session.remove_source(parent)
            parent.close()
        session.close()  # the waker, the device's watches, device.close()
        session.trace_exit(self.exit_reason or "closed")

    # ================================================================== messages
    def _serve_message(self) -> None:
        conn = self._conn
        assert conn is not None
        fds: list[int] = []
        try:
            head, fds = conn.recv_message(HEADER_SIZE, MAX_REGIONS, self.message_timeout)
            hdr = decode_header(head)
            body, _ = conn.recv_message(hdr.size, 0, self.message_timeout)
            payload = decode_payload(hdr, body)
            req = Req(hdr.request)
            handler = self._handlers.get(req)
            if handler is None:
                raise _Close(f"{req.name} is not supported (its protocol feature is not offered)")
            want = expected_fds(req, payload)
            if len(fds) != want:
                raise _Close(f"{req.name} came with {len(fds)} fd(s), expected {want}")
            self.counters["messages"] += 1
            self._dispatch(hdr, req, handler, payload, fds)
        except TransportError as e:
            self._end_session(f"{type(e).__name__}: {e}")
        except ProtocolError as e:
            self.counters["protocol_errors"] += 1
            self._end_session(f"protocol error: {e.message}")
        except _Close as e:
            self.counters["protocol_errors"] += 1
            self._end_session(str(e))
        finally:
            for fd in fds:  # whatever a handler did not take
                _close_fd(fd)

    def _dispatch(
        self,
        hdr: Header,
        req: Req,
        handler: Callable[[Header, Any, list[int]], Payload],
        payload: Payload,
        fds: list[int],
    ) -> None:
        has_reply = req in REPLY_KIND
        acks = hdr.need_reply and bool(self.protocol_features & bit(ProtocolFeature.REPLY_ACK))
        tracer = self.tracer
        if self.session.injector is not None:
            # control.<REQUEST>: a crash or hang fault leaves the message unanswered
            index = getattr(payload, "index", None)
            self.session.fire_faults(
                f"control.{req.name}", queue=index if isinstance(index, int) else None
            )
        try:
            result = handler(hdr, payload, fds)
        except ProtocolError as e:
            if tracer is not None:
                tracer.emit(
                    "ctl",
                    type=req.name,
                    fields=_trace_payload(payload),
                    fds=len(fds),
                    error=f"{e.code}: {e.message}",
                )
            if e.code == ErrorCode.BAD_ADDRESS or not acks or has_reply:
                raise _Close(f"{req.name}: {e.message}") from None
            self.counters["nacks"] += 1
            self._log(f"{req.name} refused: {e.message}", kind="nack")
            self._send(encode(req, 1, reply=True))
            return
        if tracer is not None:
            tracer.emit(
                "ctl",
                type=req.name,
                fields=_trace_payload(payload),
                fds=len(fds),
                reply=_trace_payload(result) if has_reply else None,
            )
        if has_reply:
            self._send(encode(req, result, reply=True))
        elif acks:
            self._send(encode(req, 0, reply=True))

    def _send(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None
        conn.send(data, timeout=self.message_timeout)

    def _end_session(self, reason: str) -> None:
        """Close the connection, drop every mapping and eventfd, reset the device and
        listen again."""
        conn, self._conn = self._conn, None
        session = self.session
        for vring in self._vrings:
            self._clear_vring(vring)  # kept chains released before the memory goes
        self._unmap()
        if conn is not None:
            session.remove_source(conn)
            conn.close()
        self._new_session_state()
        session.reset()  # clears the rings, then device.reset()
        summary = ", ".join(f"{k} {self.counters[k]}" for k in _SUMMARY)
        self._log(f"connection {self._conn_no} closed: {reason} (totals: {summary})")
        counts = self.device.metrics.snapshot()
        if session.injector is not None:  # the faults fired so far (cumulative)
            counts.update(session.injector.counters)
        device = ", ".join(f"{k} {v}" for k, v in counts.items())
        self._log(f"connection {self._conn_no} device counters: {device or '-'}")
        if self._server is not None and not session.stopping:
            session.add_source(self._server, self._accept)

    # ------------------------------------------------------------------ helpers
    def _vring(self, index: int, what: str) -> _Vring:
        if not 0 <= index < len(self._vrings):
            raise ProtocolError(
                ErrorCode.BAD_VALUE,
                f"{what}: ring {index} does not exist (the device has {len(self._vrings)})",
            )
        return self._vrings[index]

    def _watch_kick(self, vring: _Vring, kick: EventFd | None) -> None:
        old, vring.kick = vring.kick, kick
        if old is not None:
            self.session.remove_source(old)
            old.close()
        if kick is not None:
            self.session.add_source(kick, partial(self._on_kick, vring, kick))

    def _clear_vring(self, vring: _Vring) -> None:
        self.session.stop_ring(vring.ring)
        self._watch_kick(vring, None)
        for name in ("call", "err"):
            efd = getattr(vring, name)
            if efd is not None:
                efd.close()
                setattr(vring, name, None)

    def _unmap(self) -> None:
        for ring in self.rings:
            self.session.stop_ring(ring)  # kept chains released: their views go first
        self._memory = None
        self._umap = None
        maps, self._maps = self._maps, []
        for m in maps:
            m.close()

    @staticmethod
    def _adopt_eventfd(fds: list[int], what: str) -> EventFd:
        fd = fds.pop()
        try:
            return EventFd.adopt(fd)
        except NotAnEventFd:
            raise _Close(f"{what}: the fd passed is not an eventfd") from None

    # ------------------------------------------------------------------ handlers
    def _get_features(self, hdr: Header, payload: None, fds: list[int]) -> int:
        return self.offered

    def _set_features(self, hdr: Header, value: int, fds: list[int]) -> None:
        extra = value & ~self.offered
        if extra:
            raise ProtocolError(
                ErrorCode.BAD_VALUE, f"features {extra:#x} were never offered (§2.2)"
            )
        if self.session.take_features_refusal():
            # vhost-user has no FEATURES_OK without the STATUS protocol feature (not
            # offered): the refusal is this message's nack (or the connection's end)
            raise ProtocolError(
                ErrorCode.BAD_VALUE, "features refused by fault injection (refuse_features_ok)"
            )
        if value != self.acked_features and any(r.running for r in self.rings):
            raise ProtocolError(_BAD_STATE, "features changed while a ring is running")
        if value != self.acked_features:
            self._activated = False
        self.acked_features = value
        if not value & bit(F_PROTOCOL_FEATURES):
            for ring in self.rings:  # "Ring states": no SET_VRING_ENABLE will come
                ring.enabled = True
            for vring in self._vrings:
                self._maybe_start(vring)
        return None

    def _get_protocol_features(self, hdr: Header, payload: None, fds: list[int]) -> int:
        return self.offered_protocol

    def _set_protocol_features(self, hdr: Header, value: int, fds: list[int]) -> None:
        extra = value & ~self.offered_protocol
        if extra:
            raise ProtocolError(
                ErrorCode.BAD_VALUE, f"protocol features {extra:#x} were never offered"
            )
        self.protocol_features = value
        return None

    def _set_owner(self, hdr: Header, payload: None, fds: list[int]) -> None:
        self.owner = True
        return None

    def _reset_device(self, hdr: Header, payload: None, fds: list[int]) -> None:
        for vring in self._vrings:
            self._clear_vring(vring)  # kept chains released
        self._vrings = [_Vring(ring) for ring in self.rings]
        self.acked_features = 0
        self._activated = False
        self._log(f"connection {self._conn_no}: {Req(hdr.request).name}", kind="reset")
        self.session.reset()  # clears the rings, then device.reset()
        return None

    def _get_queue_num(self, hdr: Header, payload: None, fds: list[int]) -> int:
        return self.device.num_queues

    def _net_set_mtu(self, hdr: Header, mtu: int, fds: list[int]) -> None:
        # "VHOST_USER_NET_SET_MTU": only with the NET_MTU protocol feature negotiated,
        # which is offered only for a device that takes an MTU
        device = self.device
        if not self.protocol_features & bit(ProtocolFeature.MTU) or not isinstance(
            device, MtuDevice
        ):
            raise _Close("NET_SET_MTU without the NET_MTU protocol feature negotiated")
        device.set_mtu(mtu)  # ProtocolError BAD_VALUE: a nack with REPLY_ACK
        self._log(f"connection {self._conn_no}: NET_SET_MTU {mtu}", kind="mtu")
        return None

    def _set_mem_table(self, hdr: Header, table: MemoryTable, fds: list[int]) -> None:
        umap = UserAddressMap(table.regions)  # BAD_VALUE: overlaps, overflow
        maps: list[MappedFd] = []
        try:
            for i, (region, fd) in enumerate(zip(table.regions, fds, strict=True)):
                try:
                    # a region the front-end could still shrink would make our next
                    # access die of SIGBUS: sealed (F_SEAL_SHRINK), or sealed by us
                    # now, or refused (QEMU's memory-backend-memfd seals by default)
                    if not require_shrink_seal(fd):
                        self._log(f"SET_MEM_TABLE: region {i}: sealed it against shrinking")
                    maps.append(MappedFd.map(fd, region.memory_size, region.mmap_offset))
                except MappingError as e:
                    raise _Close(f"SET_MEM_TABLE: region {i}: {e}") from None
            memory = RegionMemory(
                [(r.guest_phys_addr, m.buf) for r, m in zip(table.regions, maps, strict=True)],
                barrier=full_barrier,
            )
        except BaseException:
            for m in maps:
                m.close()
            raise
        for fd in fds:
            _close_fd(fd)
        fds.clear()
        self._unmap()  # running rings are rebuilt on the new memory
        self._maps, self._memory, self._umap = maps, memory, umap
        sizes = ", ".join(f"{r.guest_phys_addr:#x}+{r.memory_size:#x}" for r in table.regions)
        self._log(f"connection {self._conn_no}: memory table [{sizes}]", kind="mem")
        for vring in self._vrings:
            self._maybe_start(vring)
        return None

    def _stopped_vring(self, index: int, what: str) -> _Vring:
        vring = self._vring(index, what)
        if vring.started:
            raise ProtocolError(
                _BAD_STATE, f"{what}: ring {index} is started (GET_VRING_BASE stops it)"
            )
        return vring

    def _set_vring_num(self, hdr: Header, st: VringState, fds: list[int]) -> None:
        vring = self._stopped_vring(st.index, "SET_VRING_NUM")
        self.session.check_num(vring.ring, st.num, "SET_VRING_NUM")
        return None

    def _set_vring_addr(self, hdr: Header, addr: VringAddr, fds: list[int]) -> None:
        vring = self._vring(addr.index, "SET_VRING_ADDR")
        if addr.flags:
            raise ProtocolError(
                ErrorCode.BAD_VALUE,
                f"SET_VRING_ADDR: flags {addr.flags:#x} (dirty logging was not offered)",
            )
        num = vring.ring.num
        if not num:
            raise ProtocolError(
                _BAD_STATE, f"SET_VRING_ADDR before SET_VRING_NUM, ring {addr.index}"
            )
        if self._umap is not None:
            self._layout(num, addr)  # BAD_ADDRESS now rather than at the first kick
        self.session.stop_ring(vring.ring)
        vring.addr = addr
        self._maybe_start(vring)
        return None

    def _layout(self, num: int, addr: VringAddr) -> RingLayout:
        """The ring's guest-physical layout, each part checked to lie in one region."""
        umap, memory = self._umap, self._memory
        if umap is None or memory is None:
            raise ProtocolError(_BAD_STATE, "no memory table")
        try:
            layout = RingLayout(
                num,
                umap.to_guest(addr.desc, RingLayout.desc_bytes(num)),
                umap.to_guest(addr.avail, RingLayout.avail_bytes(num)),
                umap.to_guest(addr.used, RingLayout.used_bytes(num)),
            )
            layout.validate()
            memory.view(layout.desc, RingLayout.desc_bytes(num))
            memory.view(layout.avail, RingLayout.avail_bytes(num))
            memory.view(layout.used, RingLayout.used_bytes(num))
        except (AddressError, UsageError) as e:
            raise ProtocolError(
                ErrorCode.BAD_ADDRESS, f"ring {addr.index} addresses: {e}"
            ) from None
        return layout

    def _set_vring_base(self, hdr: Header, st: VringState, fds: list[int]) -> None:
        vring = self._stopped_vring(st.index, "SET_VRING_BASE")
        if st.num > 0xFFFF:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"SET_VRING_BASE: {st.num} is not a u16")
        vring.ring.base = st.num
        return None

    def _get_vring_base(self, hdr: Header, st: VringState, fds: list[int]) -> VringState:
        vring = self._vring(st.index, "GET_VRING_BASE")
        ring = vring.ring
        self.session.stop_ring(ring)  # kept chains released; the position is kept
        vring.started = False
        vring.polling = False
        ring.broken = False
        self._watch_kick(vring, None)
        return VringState(ring.index, ring.base)

    def _set_vring_kick(self, hdr: Header, value: int, fds: list[int]) -> None:
        index, has_fd = vring_file(value, "SET_VRING_KICK")
        vring = self._vring(index, "SET_VRING_KICK")
        kick = self._adopt_eventfd(fds, "SET_VRING_KICK") if has_fd else None
        self._watch_kick(vring, kick)
        vring.polling = not has_fd
        vring.started = True  # "Ring states": started by SET_VRING_KICK
        self._maybe_start(vring)  # and do not wait for a kick that may never come
        return None

    def _set_vring_call(self, hdr: Header, value: int, fds: list[int]) -> None:
        return self._set_vring_fd(value, fds, "call", "SET_VRING_CALL")

    def _set_vring_err(self, hdr: Header, value: int, fds: list[int]) -> None:
        return self._set_vring_fd(value, fds, "err", "SET_VRING_ERR")

    def _set_vring_fd(self, value: int, fds: list[int], name: str, what: str) -> None:
        index, has_fd = vring_file(value, what)
        vring = self._vring(index, what)
        new = self._adopt_eventfd(fds, what) if has_fd else None
        old = getattr(vring, name)
        setattr(vring, name, new)
        if old is not None:
            old.close()
        return None

    def _set_vring_enable(self, hdr: Header, st: VringState, fds: list[int]) -> None:
        vring = self._vring(st.index, "SET_VRING_ENABLE")
        if st.num not in (0, 1):
            raise ProtocolError(
                ErrorCode.BAD_VALUE, f"SET_VRING_ENABLE: {st.num} is neither 0 nor 1"
            )
        vring.ring.enabled = bool(st.num)
        if st.num:
            self._maybe_start(vring)
        else:
            self.session.stop_ring(vring.ring)  # kept chains released
        return None

    def _get_config(self, hdr: Header, cfg: ConfigPayload, fds: list[int]) -> ConfigPayload:
        self.counters["config_reads"] += 1
        space = self.device.config()
        data = bytes(space[cfg.offset : cfg.offset + cfg.size]).ljust(cfg.size, b"\0")
        self._log(
            f"connection {self._conn_no}: GET_CONFIG offset {cfg.offset} size {cfg.size}",
            kind="config",
        )
        return ConfigPayload(cfg.offset, cfg.size, cfg.flags, data)

    def _set_config(self, hdr: Header, cfg: ConfigPayload, fds: list[int]) -> None:
        try:
            self.device.write_config(cfg.offset, cfg.data)
        except ProtocolError as e:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"SET_CONFIG: {e.message}") from None
        return None

    # ================================================================== data path
    def _runnable(self, vring: _Vring) -> bool:
        ring = vring.ring
        return (
            vring.started
            and ring.enabled
            and not ring.broken
            and ring.num > 0
            and vring.addr is not None
            and self._memory is not None
            and (vring.kick is not None or vring.polling)
        )

    def _maybe_start(self, vring: _Vring) -> None:
        """If the ring may run now, make sure it does: build its DeviceQueue
        (activating the device first if needed) and look at it in this round."""
        if not self._runnable(vring):
            return
        ring = vring.ring
        if ring.dq is None:
            assert vring.addr is not None and self._memory is not None
            try:
                layout = self._layout(ring.num, vring.addr)
            except ProtocolError as e:
                self.session.ring_broken(ring, e.message)
                return
            if not self._activated:
                features = self.acked_features & ~bit(F_PROTOCOL_FEATURES)
                try:
                    self.device.activate(features)
                except Exception as e:
                    raise _Close(
                        f"device.activate({features:#x}): {type(e).__name__}: {e}"
                    ) from None
                self._activated = True
                self._log(f"connection {self._conn_no}: device active, features {features:#x}")
            self.session.start_ring(ring, self._memory, layout, self.acked_features)
        self.session.schedule_ring(ring)
        if vring.polling:
            self._arm_polling()

    def _arm_polling(self) -> None:
        timer = self._poll_timer
        if timer is None or not timer.pending:
            self._poll_timer = self.session.call_later(self.poll_interval, self._poll_rings)

    def _poll_rings(self) -> None:
        """Polling mode: look at every ring started without a kick fd."""
        self._poll_timer = None
        polling = False
        for vring in self._vrings:
            if vring.polling and vring.ring.running:
                self.session.schedule_ring(vring.ring)
                polling = True
        if polling:
            self._arm_polling()

    # ================================================================== session hooks
    def interrupt(self, ring: Ring) -> None:
        """Write ``ring``'s call eventfd (a used-buffer notification)."""
        _signal(self._vrings[ring.index].call)

    def ring_broken(self, ring: Ring, why: str) -> None:
        """The ring is no longer served until GET_VRING_BASE: write its err eventfd."""
        self._log(f"ring {ring.index} broken, stopped until GET_VRING_BASE: {why}", kind="ring")
        _signal(self._vrings[ring.index].err)

    def config_interrupt(self) -> None:
        """A config change cannot be announced without BACKEND_REQ (not offered)."""
        self.counters["config_interrupts_unsupported"] += 1
        if not self._config_warned:
            self._config_warned = True
            self._log(
                "config change not announced: vhost-user needs the back-end request "
                "channel (BACKEND_REQ), which is not offered"
            )


def _trace_payload(payload: object) -> Any:
    """A vhost-user payload as a trace records it: a dataclass as its fields, bytes as
    their length, numbers as they are."""
    if payload is None or isinstance(payload, int | str):
        return payload
    if isinstance(payload, bytes | bytearray | memoryview):
        return f"<{len(payload)} bytes>"
    if dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        return {
            f.name: _trace_payload(getattr(payload, f.name)) for f in dataclasses.fields(payload)
        }
    if isinstance(payload, list | tuple):
        return [_trace_payload(x) for x in payload[:16]]
    return str(payload)[:200]


def _signal(efd: EventFd | None) -> None:
    if efd is not None:
        try:
            efd.write(1)
        except OSError:
            pass


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def serve(device: Device, socket_path: str, **kwargs: Any) -> int:
    """Run ``device`` as a vhost-user back-end at ``socket_path`` in this process.

    SIGTERM stops it cleanly (connection closed, memory unmapped, socket file removed,
    ``device.close()``; exit status 0); so does SIGINT (^C in a terminal; status 130).
    """
    from hostops.signals import on_terminate

    backend = VhostUserBackend(device, socket_path, **kwargs)
    # no SystemExit from the handler: stop() wakes the loop, which closes everything
    uninstall = on_terminate(lambda: backend.stop("SIGTERM"), exit=False)
    try:
        return backend.serve_forever()
    except KeyboardInterrupt:
        backend.close()
        return 130
    finally:
        uninstall()
