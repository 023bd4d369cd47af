"""The virtio-net driver (§5.1): one NIC, handed to the stack as a :class:`~kernel.net.link.Link`.

Theory of operation
-------------------
:class:`NetDriver` binds DeviceId.NET on the bus. It accepts MAC, STATUS, MTU, CSUM,
GUEST_CSUM, HOST_TSO4, GUEST_TSO4 and MRG_RXBUF (the offload bits only when the spec
asks for offloads, the default) plus EVENT_IDX and VERSION_1, reads
:class:`~vdev.virtio.net.NetConfig`, sets up receiveq1 (0) and transmitq1 (1) and builds
a :class:`NetLink`.

Memory. The transport sizes the shared region from the spec (:meth:`kernel.specs.Net
.dma_bytes`): receive buffers are carved once at probe time — one per receive-ring
entry, each big enough for a whole frame (header + MTU + Ethernet header) or, with
MRG_RXBUF, at most 64 KiB (a bigger frame spans several buffers, §5.1.6.3.1); transmit
buffers come from the rest of the pool (``hostops.shm.PageAllocator``) per frame and go
back when the device returns the chain.

Receive. Every receive-ring entry holds one buffer (a single writable descriptor).
Completions arrive on the interrupt thread in used-ring order; a buffer's first 12 bytes
are the ``virtio_net_hdr``. With MRG_RXBUF, ``num_buffers`` says how many consecutive
completions make the packet (checked: 1..queue size); the parts are joined. The frame
goes to the stack's receiver (as a memoryview into shared memory when it fits one
buffer: no copy; the receiver copies what it keeps), then the buffers go back into the
ring in batches (the queue's ``refill`` hook: one publish and at most one kick per
batch): a refill waits until at least an eighth of the ring's buffers are free
(:attr:`NetLink.rx_refill_batch`), so the device always holds seven eighths of them
and a stream of completions costs one kick per batch rather than one per interrupt.
*Recycling*: every receive buffer is one descriptor, written once
(``DriverQueue.add(keep=True)``); when it comes back it is made available again as
it is (``DriverQueue.republish``: only its head goes into the available ring). The
device never writes the descriptor table of a split ring (§2.7.5), and nothing is
read back from it: the buffer's address and size are this side's own, and a used
length is checked against them (``rx_recycled`` counts the recycled postings; with
virtqueue tracing on, buffers are posted afresh so that every posting is traced).
A completion shorter than the header, or a merged packet whose
count is absurd, is dropped and counted (``rx_bad_frames``).

Transmit. :meth:`NetLink.transmit` never blocks: it copies header + frame into one DMA
buffer (one descriptor), publishes, and kicks unless EVENT_IDX says the device is still
busy. Transmit completions are wanted late: with EVENT_IDX the transmit queue asks for
an interrupt only once three quarters of the frames in flight are sent
(``DriverQueue.delayed_interrupts``, as Linux's ``virtqueue_enable_cb_delayed``), so a
stream of frames costs the device one interrupt per many frames; a sender short of
buffers reaps what is done itself first. No free buffer or descriptor →
``OSError(ENOBUFS)`` (counted ``tx_dropped_nobufs``) after one attempt to reap
finished transmissions; link down → ``ENETDOWN``; a failed device → ``EIO``.
:meth:`NetLink.wait_tx_room` lets a blocking sender wait for room.

Recovery (see :mod:`kernel.transport`). After the device was reset or restarted every
receive buffer is posted again (a merged packet being assembled is dropped) and the
frames that were in flight to the device are dropped and counted (``tx_dropped_reset``:
TCP retransmits them, UDP may lose them, as on a real link); ``transmit`` during the
reset is ENOBUFS (also ``tx_dropped_reset``). Both queues are watched for lost
interrupts (the receive queue by its used ring, :attr:`KernelQueue.watch_used`); the
transmit queue has the spec's ``request_timeout``. A device process that picked its
own MAC is restarted with that MAC (``--mac``), so the stack's neighbours stay right.

Link state. With STATUS negotiated the config-change interrupt re-reads the status
field and tells the stack's listener when LINK_UP changed.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from hostops.sync import Condition, Lock
from vdev.virtio import DeviceId, F, NetF, UsageError, VirtioError, bit
from vdev.virtio.net import (
    ETH_HLEN,
    GSO_NONE,
    GSO_TCPV4,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    NET_CONFIG_BYTES,
    NET_HDR,
    NET_HDR_SIZE,
    RX_QUEUE,
    S_LINK_UP,
    TX_QUEUE,
    NetConfig,
    format_mac,
)

from .bus import VirtioDriver, register_driver
from .errors import DeviceControlError, copy_error, io_error
from .net.link import Receiver, RxInfo, TxOffload
from .transport import KernelQueue, VirtioTransport

__all__ = [
    "NetDriver",
    "NetLink",
    "NET_DRIVER_FEATURES",
    "OFFLOAD_FEATURES",
    "rx_buffer_bytes",
    "tx_pool_bytes",
]

log = logging.getLogger(__name__)

#: Offload feature bits (taken only when the spec asks for offloads).
OFFLOAD_FEATURES = (
    bit(NetF.CSUM) | bit(NetF.GUEST_CSUM) | bit(NetF.HOST_TSO4) | bit(NetF.GUEST_TSO4)
)
#: Every feature the driver understands.
NET_DRIVER_FEATURES = (
    bit(NetF.MAC)
    | bit(NetF.STATUS)
    | bit(NetF.MTU)
    | bit(NetF.MRG_RXBUF)
    | OFFLOAD_FEATURES
    | bit(F.EVENT_IDX)
    | bit(F.VERSION_1)
)

#: Largest merged receive buffer: a whole frame at the largest MTU (header + Ethernet
#: header + 65535), so that no frame is ever split — joining the parts of a 64 KiB frame
#: cost a third of the receiving kernel's time. A GSO frame may still span several.
MRG_BUFFER_MAX = NET_HDR_SIZE + ETH_HLEN + 65535
#: Largest frame a GSO super-frame may be (64 KiB of IP packet + Ethernet header).
GSO_FRAME_MAX = 65535 + ETH_HLEN
_ALIGN = 64


def _align(x: int, a: int = _ALIGN) -> int:
    return (x + a - 1) // a * a


def rx_buffer_bytes(mtu: int, mergeable: bool, guest_tso: bool) -> int:
    """Bytes per receive buffer: a whole frame with its header, or (MRG_RXBUF) at
    most :data:`MRG_BUFFER_MAX`. Without MRG_RXBUF but with GUEST_TSO4 a buffer must
    hold a 64 KiB super-frame (§5.1.6.3.1)."""
    whole = NET_HDR_SIZE + ETH_HLEN + mtu
    if mergeable:
        # with large receives, a page at least: a 64 KiB frame then needs <= 17 buffers
        return _align(min(max(whole, 4096 if guest_tso else 0), MRG_BUFFER_MAX))
    if guest_tso:
        whole = max(whole, NET_HDR_SIZE + GSO_FRAME_MAX)
    return _align(whole)


def tx_pool_bytes(mtu: int, queue_size: int) -> int:
    """DMA bytes set aside for frames in flight to the device: room for a ring's
    worth of full frames, between 1 and 16 MiB."""
    frame = _align(NET_HDR_SIZE + max(GSO_FRAME_MAX if mtu > 9000 else 0, ETH_HLEN + mtu), 4096)
    return max(1 << 20, min(16 << 20, frame * queue_size))


class _RxBuf:
    """Token of one receive buffer in the ring (``dq``/``head``: the queue and chain it
    is kept in, for recycling)."""

    __slots__ = ("link", "addr", "dq", "head")

    def __init__(self, link: NetLink, addr: int) -> None:
        self.link = link
        self.addr = addr
        self.dq: Any = None
        self.head = -1

    def complete(self, used_len: int) -> None:
        self.link._rx_done(self, used_len)

    def fail(self, error: OSError) -> None:
        pass  # the device is gone; nothing waits on a receive buffer


class _TxBuf:
    """Token of one transmitted frame."""

    __slots__ = ("link", "addr")

    def __init__(self, link: NetLink, addr: int) -> None:
        self.link = link
        self.addr = addr

    def complete(self, used_len: int) -> None:
        self.link._tx_done(self)

    def fail(self, error: OSError) -> None:
        self.link._tx_done(self)


class NetLink:
    """One virtio-net NIC, as the stack sees it (implements :class:`kernel.net.link.Link`).

    Attributes: ``name`` (``eth0``), ``mac``, ``mtu``, ``tx_csum``, ``tso4``,
    ``rx_csum`` (GUEST_CSUM), ``rx_tso4`` (GUEST_TSO4), ``mergeable`` (MRG_RXBUF),
    ``link_up``, ``counters`` (``rx_frames rx_bytes rx_bad_frames rx_merged tx_frames
    tx_bytes tx_gso_frames tx_csum_offloaded tx_dropped_nobufs tx_dropped_link_down
    tx_dropped_reset rx_refills rx_recycled``).
    """

    def __init__(
        self,
        transport: VirtioTransport,
        rxq: KernelQueue,
        txq: KernelQueue,
        config: NetConfig,
    ) -> None:
        t = transport
        self.transport = t
        self.name = t.name
        self.rxq = rxq
        self.txq = txq
        self.mac = config.mac
        self.mtu = config.mtu
        self.tx_csum = t.has_feature(NetF.CSUM)
        self.tso4 = self.tx_csum and t.has_feature(NetF.HOST_TSO4)
        self.rx_csum = t.has_feature(NetF.GUEST_CSUM)
        self.rx_tso4 = self.rx_csum and t.has_feature(NetF.GUEST_TSO4)
        self.mergeable = t.has_feature(NetF.MRG_RXBUF)
        self.has_status = t.has_feature(NetF.STATUS)
        #: The device hands every frame back (loopback backend): the stack then sends
        #: traffic for its own address through the device instead of short-cutting it.
        self.hairpin = getattr(t.spec, "backend", "") == "loopback"
        self.link_up = bool(config.status & S_LINK_UP) if self.has_status else True
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "rx_frames",
                "rx_bytes",
                "rx_bad_frames",
                "rx_merged",
                "tx_frames",
                "tx_bytes",
                "tx_gso_frames",
                "tx_csum_offloaded",
                "tx_dropped_nobufs",
                "tx_dropped_link_down",
                "tx_dropped_reset",
                "rx_refills",
                "rx_recycled",
            ),
            0,
        )
        self._receiver: Receiver | None = None
        self._link_listener: Callable[[bool], None] | None = None
        assert t.memory is not None and t.dma is not None
        self._buf: memoryview | None = t.memory.buf
        self._dma = t.dma
        self._dma_lock = Lock()
        self._tx_room = Condition(Lock())
        # -- receive buffers: one per ring entry, carved once
        self.rx_buf_bytes = rx_buffer_bytes(self.mtu, self.mergeable, self.rx_tso4)
        want = getattr(t.spec, "rx_buffer_size", None)
        if self.mergeable and want:
            self.rx_buf_bytes = _align(max(NET_HDR_SIZE + 1, int(want)), 64)
        n = rxq.size
        area = t.dma.alloc(self.rx_buf_bytes * n)
        if area is None:
            raise ValueError(
                f"{self.name}: DMA pool ({t.dma_size} bytes) too small for {n} receive "
                f"buffers of {self.rx_buf_bytes} bytes"
            )
        self._rx_free: list[_RxBuf] = [_RxBuf(self, area + i * self.rx_buf_bytes) for i in range(n)]
        #: Free receive buffers a refill waits for (an eighth of the ring, at least 1).
        self.rx_refill_batch = max(1, n // 8)
        #: Receive buffers are republished as they are (see the module docstring).
        self.recycle_rx = True
        # merged packet being assembled: (parts, buffers still expected)
        self._merge: list[bytes] = []
        self._merge_left = 0
        self._merge_info: RxInfo | None = None
        rxq.refill = self._rx_refill
        txq.refill = self._tx_wake
        txq.on_failed = lambda err: self._tx_wake()
        rxq.on_reset = self._rx_reset
        txq.on_reset = self._tx_reset
        txq.delayed_interrupts = True  # completions wanted late (module docstring)
        txq.watch = True  # lost transmit interrupts are looked for while frames are out
        rxq.watch = rxq.watch_used = True  # and lost receive interrupts, once seen used
        txq.timeout_s = getattr(t.spec, "request_timeout", None)
        t.on_release(self._release)

    # ------------------------------------------------------------------ Link API
    def set_receiver(self, receiver: Receiver) -> None:
        """Deliver received frames to ``receiver`` from now on (interrupt thread)."""
        self._receiver = receiver

    def set_link_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(up)`` when the carrier changes."""
        self._link_listener = listener

    @property
    def failed(self) -> OSError | None:
        """The device's failure, or None."""
        return self.transport.failed

    def start(self) -> None:
        """Fill the receive ring (after DRIVER_OK)."""
        self._rx_refill()

    def transmit(self, frame: bytes | bytearray | memoryview, offload: TxOffload) -> None:
        """Send one Ethernet frame (see the module doc for errors)."""
        n = len(frame)
        failed = self.transport.failed
        if failed is not None:
            raise copy_error(failed)
        if not self.link_up:
            self.counters["tx_dropped_link_down"] += 1
            raise io_error(errno.ENETDOWN, f"{self.name}: link is down")
        flags = 0
        gso = GSO_NONE
        if offload.csum_start >= 0:
            if not self.tx_csum:
                raise io_error(errno.EINVAL, f"{self.name}: checksum offload not negotiated")
            flags = HDR_F_NEEDS_CSUM
        if offload.gso_size:
            if not self.tso4:
                raise io_error(errno.EINVAL, f"{self.name}: TSO not negotiated")
            gso = GSO_TCPV4
            if n > GSO_FRAME_MAX:
                raise io_error(errno.EMSGSIZE, f"{self.name}: GSO frame of {n} bytes")
        elif n > ETH_HLEN + self.mtu:
            raise io_error(errno.EMSGSIZE, f"{self.name}: frame of {n} bytes > MTU {self.mtu}")
        total = NET_HDR_SIZE + n
        addr = self._alloc(total)
        if addr is None:
            self.transport.service_queue(self.txq)  # reap what the device has finished
            addr = self._alloc(total)
            if addr is None:
                self.counters["tx_dropped_nobufs"] += 1
                raise io_error(errno.ENOBUFS, f"{self.name}: no transmit buffer free")
        buf = self._buf
        if buf is None:
            raise io_error(errno.EIO, f"{self.name}: device shut down")
        NET_HDR.pack_into(
            buf,
            addr,
            flags,
            gso,
            offload.hdr_len,
            offload.gso_size,
            max(0, offload.csum_start),
            offload.csum_offset,
            0,
        )
        buf[addr + NET_HDR_SIZE : addr + total] = frame
        q = self.txq
        token = _TxBuf(self, addr)
        need = False
        for attempt in (0, 1):
            with q.lock:
                if q.failed is not None:
                    self._free(addr)
                    raise copy_error(q.failed)
                if q.paused:  # the device is being reset: drop it, TCP sends it again
                    self._free(addr)
                    self.counters["tx_dropped_reset"] += 1
                    raise io_error(
                        errno.ENOBUFS, f"{self.name}: device is being reset", culprit="device-gone"
                    )
                try:
                    q.add([(addr, total)], [], token)
                except VirtioError:
                    if attempt == 0:
                        full = True
                    else:
                        self._free(addr)
                        self.counters["tx_dropped_nobufs"] += 1
                        raise io_error(errno.ENOBUFS, f"{self.name}: transmit ring full") from None
                else:
                    full = False
                    need = q.publish() if not q.completing else False
            if not full:
                break
            self.transport.service_queue(q)  # reap finished transmissions, then retry
        c = self.counters
        c["tx_frames"] += 1
        c["tx_bytes"] += n
        if gso:
            c["tx_gso_frames"] += 1
        if flags:
            c["tx_csum_offloaded"] += 1
        if need:
            q.notify()

    def wait_tx_room(self, timeout_s: float | None) -> bool:
        """Wait until a transmitted frame comes back (room for another) or
        ``timeout_s`` passes; True if woken. For senders that block instead of
        failing with ENOBUFS."""
        with self._tx_room:
            return self._tx_room.wait(timeout_s)

    # ------------------------------------------------------------------ internals
    def _alloc(self, nbytes: int) -> int | None:
        with self._dma_lock:
            return self._dma.alloc(nbytes)

    def _free(self, addr: int) -> None:
        with self._dma_lock:
            if self._dma is not None:
                self._dma.free(addr)

    def _tx_done(self, token: _TxBuf) -> None:
        self._free(token.addr)

    def _tx_wake(self) -> None:
        with self._tx_room:
            self._tx_room.notify_all()
        # publish what was added while the batch completed
        q = self.txq
        with q.lock:
            need = q.publish() if q.failed is None and not q.paused else False
        if need:
            q.notify()

    def _tx_reset(self, tokens: list[Any], error: OSError | None) -> None:
        """The device was reset: frames it had not sent are dropped and counted
        (``tx_dropped_reset``; TCP retransmits, UDP is allowed to lose them)."""
        for t in tokens:
            self._free(t.addr)
        self.counters["tx_dropped_reset"] += len(tokens)
        self._tx_wake()

    def _rx_reset(self, tokens: list[Any], error: OSError | None) -> None:
        """The device was reset: every receive buffer is free again (``refill`` posts
        them on the new ring); a merged packet being assembled is dropped."""
        self._rx_free.extend(tokens)
        self._merge = []
        self._merge_left = 0
        self._merge_info = None

    def _rx_refill(self) -> None:
        q = self.rxq
        free = self._rx_free
        if len(free) < self.rx_refill_batch:  # the device still holds 7/8 of them
            return
        size = self.rx_buf_bytes
        with q.lock:
            if q.failed is not None or q.paused:
                return
            dq = q.dq
            recycle = self.recycle_rx and getattr(q, "tracer", None) is None
            added = recycled = 0
            while free:  # bounded: one pass over the free buffers
                b = free.pop()
                try:
                    if b.dq is dq and recycle:
                        try:
                            dq.republish(b.head, b)
                            recycled += 1
                            added += 1
                            continue
                        except UsageError:
                            pass  # not kept in this queue (any more): post it afresh
                    if b.dq is dq:
                        dq.forget(b.head)  # its descriptors go back to the free list
                    b.dq = None
                    if not dq.num_free:
                        free.append(b)
                        break
                    if recycle:
                        b.head = dq.add([], [(b.addr, size)], b, keep=True)
                        b.dq = dq
                    else:
                        q.add([], [(b.addr, size)], b)
                except VirtioError:
                    free.append(b)
                    break
                added += 1
            need = q.publish() if added else False
        c = self.counters
        c["rx_refills"] += 1 if added else 0
        c["rx_recycled"] += recycled
        if need:
            q.notify()

    def _rx_done(self, b: _RxBuf, used_len: int) -> None:
        buf = self._buf
        self._rx_free.append(b)
        if buf is None:
            return
        c = self.counters
        if self._merge_left:
            # a further buffer of a merged packet (§5.1.6.4.2)
            self._merge.append(bytes(buf[b.addr : b.addr + used_len]))
            self._merge_left -= 1
            if not self._merge_left:
                frame = b"".join(self._merge)
                info = self._merge_info or RxInfo()
                self._merge = []
                self._merge_info = None
                c["rx_merged"] += 1
                self._deliver(frame, info)
            return
        if used_len < NET_HDR_SIZE:
            c["rx_bad_frames"] += 1
            return
        flags, gso, _hl, gso_size, cstart, coff, nbuf = NET_HDR.unpack_from(buf, b.addr)
        if self.rx_csum and flags & HDR_F_NEEDS_CSUM:
            info = RxInfo(csum_valid=True, csum_start=cstart, csum_offset=coff, gso_size=gso_size)
        elif self.rx_csum and flags & HDR_F_DATA_VALID:
            info = RxInfo(csum_valid=True, gso_size=gso_size if gso else 0)
        else:
            info = RxInfo(gso_size=gso_size if gso else 0)
        if gso and not self.rx_tso4:
            c["rx_bad_frames"] += 1  # §5.1.6.4.1: no GSO frames unless negotiated
            return
        start = b.addr + NET_HDR_SIZE
        end = b.addr + used_len
        if self.mergeable and nbuf != 1:
            # §5.1.6.4.2: num_buffers is 1..(buffers we posted)
            if nbuf < 1 or nbuf > self.rxq.size:
                c["rx_bad_frames"] += 1
                return
            self._merge = [bytes(buf[start:end])]
            self._merge_left = nbuf - 1
            self._merge_info = info
            return
        self._deliver(buf[start:end], info)

    def _deliver(self, frame: bytes | memoryview, info: RxInfo) -> None:
        c = self.counters
        if len(frame) < ETH_HLEN:
            c["rx_bad_frames"] += 1
            return
        c["rx_frames"] += 1
        c["rx_bytes"] += len(frame)
        receiver = self._receiver
        if receiver is None:
            return
        try:
            receiver(frame, info)
        except Exception:
            log.exception("%s: the stack's receiver failed", self.name)

    def wait_link_up(self, timeout_s: float | None) -> bool:
        """Wait until the carrier is up (or ``timeout_s`` passes); returns it."""
        return self.wait_link(True, timeout_s)

    def wait_link(self, up: bool, timeout_s: float | None) -> bool:
        """Wait until the carrier is ``up`` (or ``timeout_s`` passes); True if it is."""
        with self._tx_room:
            return self._tx_room.wait_for(lambda: self.link_up == up, timeout_s)

    def _set_link(self, up: bool) -> None:
        if up == self.link_up:
            return
        self.link_up = up
        listener = self._link_listener
        if listener is not None:
            try:
                listener(up)
            except Exception:
                log.exception("%s: link listener failed", self.name)
        with self._tx_room:
            self._tx_room.notify_all()

    def _release(self) -> None:
        self._buf = None
        self._merge = []

    def __repr__(self) -> str:
        state = "up" if self.link_up else "down"
        return f"<NetLink {self.name} {format_mac(self.mac)} mtu={self.mtu} {state}>"


class NetDriver(VirtioDriver):
    """The virtio-net driver: binds DeviceId.NET, builds a :class:`NetLink`."""

    device_id = DeviceId.NET
    supported_features = NET_DRIVER_FEATURES

    def __init__(self, transport: VirtioTransport) -> None:
        super().__init__(transport)
        self._link: NetLink | None = None

    @classmethod
    def features_for(cls, transport: VirtioTransport, offered: int) -> int:
        """The offer minus the offloads when the spec turned them off."""
        want = cls.features(offered)
        if not getattr(transport.spec, "offload", True):
            want &= ~OFFLOAD_FEATURES
        # Without MRG_RXBUF, GUEST_TSO4 would need 64 KiB per receive buffer: not taken.
        if not want & bit(NetF.MRG_RXBUF):
            want &= ~bit(NetF.GUEST_TSO4)
        # HOST_TSO4 needs CSUM, GUEST_TSO4 needs GUEST_CSUM (§5.1.3.1)
        if not want & bit(NetF.CSUM):
            want &= ~bit(NetF.HOST_TSO4)
        if not want & bit(NetF.GUEST_CSUM):
            want &= ~bit(NetF.GUEST_TSO4)
        return want

    def probe(self) -> None:
        """Read the config space, set up both queues, build the link."""
        t = self.transport
        data = b""
        try:
            data = t.read_config(NET_CONFIG_BYTES)
        except DeviceControlError:
            data = b""
        spec_mac = getattr(t.spec, "mac_bytes", None)
        if len(data) >= NET_CONFIG_BYTES:
            cfg = NetConfig.unpack(data)
        else:
            cfg = NetConfig()
        mac = cfg.mac if t.has_feature(NetF.MAC) else (spec_mac or _random_mac())
        mtu = cfg.mtu if t.has_feature(NetF.MTU) else 1500
        if not 68 <= mtu <= 65535:
            raise t.probe_error(f"device reports MTU {mtu} (§5.1.4.1: at least 68)")
        status = cfg.status if t.has_feature(NetF.STATUS) else S_LINK_UP
        cfg = NetConfig(mac, status, 1, mtu)
        rxq = t.setup_queue(RX_QUEUE, t.queue_cap)
        txq = t.setup_queue(TX_QUEUE, t.queue_cap)
        self._link = NetLink(t, rxq, txq, cfg)
        spec = t.spec
        if hasattr(t, "restart_spec") and getattr(spec, "mac", "") is None:
            # a restarted device process must come back with the MAC the stack knows
            t.restart_spec = dataclasses.replace(spec, mac=format_mac(mac))  # type: ignore[call-arg]
        t.on_config_change(self._config_changed)

    def started(self) -> None:
        """After DRIVER_OK: stock the receive ring."""
        if self._link is not None:
            self._link.start()

    def _config_changed(self) -> None:
        link = self._link
        if link is None or not link.has_status:
            return
        try:
            data = self.transport.read_config(NET_CONFIG_BYTES)
        except Exception:
            return
        if len(data) >= NET_CONFIG_BYTES:
            link._set_link(bool(NetConfig.unpack(data).status & S_LINK_UP))

    @property
    def link(self) -> NetLink | None:
        """The :class:`NetLink` (after probe)."""
        return self._link

    def remove(self) -> None:
        """Kernel shutdown."""
        if self._link is not None:
            self._link._set_link(False)


def _random_mac() -> bytes:
    """A locally administered unicast MAC (02:xx:...)."""
    return b"\x02" + os.urandom(5)


register_driver(DeviceId.NET, NetDriver)
