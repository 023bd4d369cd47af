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

Multi-queue (``kernel.Net(..., queue_pairs=N)``, §5.1.6.5.6). With N > 1 the driver
takes VIRTIO_NET_F_CTRL_VQ and VIRTIO_NET_F_MQ when the device offers both, reads
``max_virtqueue_pairs`` (checked: 1..0x8000 and its 2M + 1 queues within the queues the
device reported) and uses P = min(N, max_virtqueue_pairs) pairs: receiveqK and
transmitqK for K in 1..P and the control queue 2M (§5.1.2). Every receive queue is
stocked and refilled exactly as receiveq1 is above (its own free buffers, its own
merged packet being assembled, recycling); all of them are reaped by the one interrupt
thread and deliver to the same stack, so the stack still sees one frame at a time.
After DRIVER_OK the driver sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET(P) on the control
queue and waits for the ack (at most :data:`CTRL_ACK_TIMEOUT_S`). Until the device
acks VIRTIO_NET_OK only transmitq1 is used (§5.1.6.5.6.1: a device uses one pair until
then); VIRTIO_NET_ERR, no answer in time or a control queue that fails leaves the
link on one pair (``mq_fallbacks`` / ``mq_ack_timeouts``, logged) -- it never hangs,
and an ack that comes later still turns the pairs on. A sending thread transmits on
its own pair (:class:`kernel.queue_map.ThreadQueueMap`: stable per thread, round
robin, as the block driver spreads its submitters), so threads do not share a transmit
queue's lock; every transmit queue has the delayed interrupts, lost-interrupt watch
and timeout of transmitq1. After a device reset or restart the device is back to one
pair: transmission falls back to transmitq1 and VQ_PAIRS_SET is sent again from the
control queue's reset hook (``mq_resends``); its ack turns the pairs on again.
``dev.queues`` lists every queue (receive and transmit of each pair, then the control
queue), each with its ``stats``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from hostops.sync import Condition, Event, Lock
from vdev.virtio import DeviceId, F, NetF, UsageError, VirtioError, bit
from vdev.virtio.net import (
    CTRL_MQ_PAIRS_MAX,
    CTRL_OK,
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
    ctrl_queue_index,
    format_mac,
    mq_pairs_set,
    rx_queue_index,
    tx_queue_index,
)

from .bus import VirtioDriver, register_driver
from .errors import DeviceControlError, copy_error, io_error
from .net.link import Receiver, RxInfo, TxOffload
from .queue_map import ThreadQueueMap
from .transport import KernelQueue, VirtioTransport

__all__ = [
    "NetDriver",
    "NetLink",
    "NET_DRIVER_FEATURES",
    "OFFLOAD_FEATURES",
    "rx_buffer_bytes",
    "tx_pool_bytes",
    "MQ_FEATURES",
    "CTRL_ACK_TIMEOUT_S",
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

#: The multi-queue features, taken together when the spec asks for several pairs.
MQ_FEATURES = bit(NetF.CTRL_VQ) | bit(NetF.MQ)
#: Longest the driver waits at start-up for the device to ack VQ_PAIRS_SET.
CTRL_ACK_TIMEOUT_S = 5.0
#: Where, in the control buffer, the ack byte is (after the command).
_CTRL_ACK_AT = 32

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


class _RxRing:
    """One receive queue as the driver keeps it: its free buffers and the merged packet
    being assembled from its completions."""

    __slots__ = ("q", "free", "merge", "merge_left", "merge_info")

    def __init__(self, q: KernelQueue) -> None:
        self.q = q
        self.free: list[_RxBuf] = []
        self.merge: list[bytes] = []  # parts of a merged packet so far
        self.merge_left = 0  # buffers of it still expected
        self.merge_info: RxInfo | None = None


class _RxBuf:
    """Token of one receive buffer in the ring (``dq``/``head``: the queue and chain it
    is kept in, for recycling; ``ring``: the receive queue it belongs to)."""

    __slots__ = ("link", "addr", "dq", "head", "ring")

    def __init__(self, link: NetLink, addr: int, ring: _RxRing) -> None:
        self.link = link
        self.addr = addr
        self.dq: Any = None
        self.head = -1
        self.ring = ring

    def complete(self, used_len: int) -> None:
        self.link._rx_done(self, used_len)

    def fail(self, error: OSError) -> None:
        pass  # the device is gone; nothing waits on a receive buffer


class _CtrlCmd:
    """Token of one control command (VQ_PAIRS_SET); ``gen`` tells a stale one."""

    __slots__ = ("link", "gen", "pairs")

    def __init__(self, link: NetLink, gen: int, pairs: int) -> None:
        self.link = link
        self.gen = gen
        self.pairs = pairs

    def complete(self, used_len: int) -> None:
        self.link._ctrl_done(self, used_len)

    def fail(self, error: OSError) -> None:
        self.link._ctrl_done(self, -1)

    def expire(self, error: OSError) -> None:
        self.link._ctrl_done(self, -1)


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
    tx_dropped_reset rx_refills rx_recycled``, and for multi-queue ``mq_pairs_acked
    mq_fallbacks mq_ack_timeouts mq_resends``).

    ``rxq``/``txq`` are receiveq1/transmitq1; ``more_pairs`` the further (receive,
    transmit) queue pairs and ``ctrlq`` the control queue (multi-queue only):
    ``rxqs``, ``txqs`` list them all, ``queue_pairs`` counts them, ``active_pairs`` is
    how many the device acked (the pairs transmission uses).
    """

    def __init__(
        self,
        transport: VirtioTransport,
        rxq: KernelQueue,
        txq: KernelQueue,
        config: NetConfig,
        more_pairs: list[tuple[KernelQueue, KernelQueue]] | None = None,
        ctrlq: KernelQueue | None = None,
    ) -> None:
        t = transport
        self.transport = t
        self.name = t.name
        self.rxq = rxq
        self.txq = txq
        pairs = [(rxq, txq), *(more_pairs or [])]
        if len(pairs) > 1 and ctrlq is None:
            raise ValueError(f"{self.name}: several queue pairs need the control queue")
        #: Every receive queue / transmit queue, pair 1 first.
        self.rxqs: list[KernelQueue] = [r for r, _ in pairs]
        self.txqs: list[KernelQueue] = [x for _, x in pairs]
        #: The control queue (None with one pair).
        self.ctrlq = ctrlq
        #: Queue pairs set up; transmission uses the first ``active_pairs`` of them.
        self.queue_pairs = len(pairs)
        self.active_pairs = 1
        self._tx_map = ThreadQueueMap(len(pairs))
        self._ctrl_gen = 0  # the VQ_PAIRS_SET in flight (a reset makes it stale)
        self._ctrl_done_ev = Event()
        self._ctrl_addr = -1
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
                "mq_pairs_acked",
                "mq_fallbacks",
                "mq_ack_timeouts",
                "mq_resends",
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
        self._rings: list[_RxRing] = []
        for q in self.rxqs:
            ring = _RxRing(q)
            area = t.dma.alloc(self.rx_buf_bytes * q.size)
            if area is None:
                raise ValueError(
                    f"{self.name}: DMA pool ({t.dma_size} bytes) too small for "
                    f"{len(self.rxqs)} x {q.size} receive buffers of {self.rx_buf_bytes} bytes"
                )
            ring.free = [_RxBuf(self, area + i * self.rx_buf_bytes, ring) for i in range(q.size)]
            self._rings.append(ring)
            q.refill = self._rx_refill_hook(ring)
            q.on_reset = self._rx_reset_hook(ring)
            q.watch = q.watch_used = True  # lost receive interrupts, once seen used
        #: Free receive buffers a refill waits for (an eighth of the ring, at least 1).
        self.rx_refill_batch = max(1, n // 8)
        #: Receive buffers are republished as they are (see the module docstring).
        self.recycle_rx = True
        timeout = getattr(t.spec, "request_timeout", None)
        for q in self.txqs:
            q.refill = self._tx_wake_hook(q)
            q.on_failed = self._tx_failed_hook(q)
            q.on_reset = self._tx_reset_hook(q)
            q.delayed_interrupts = True  # completions wanted late (module docstring)
            q.watch = True  # lost transmit interrupts are looked for while frames are out
            q.timeout_s = timeout
        if ctrlq is not None:
            addr = t.dma.alloc(2 * _CTRL_ACK_AT)
            if addr is None:
                raise ValueError(f"{self.name}: DMA pool too small for the control buffer")
            self._ctrl_addr = addr
            ctrlq.on_reset = self._ctrl_reset
            ctrlq.on_failed = lambda err: self._ctrl_done_ev.set()
            ctrlq.watch = True
            ctrlq.pollable = False  # one command per start: not worth a poll window
            ctrlq.timeout_s = timeout
        t.on_release(self._release)

    # hooks bound to one queue (a closure each: the transport calls them without
    # arguments, or with the tokens of that queue)
    def _rx_refill_hook(self, ring: _RxRing) -> Callable[[], None]:
        return lambda: self._rx_refill(ring)

    def _rx_reset_hook(self, ring: _RxRing) -> Callable[[list[Any], OSError | None], None]:
        return lambda tokens, error: self._rx_reset(tokens, error, ring)

    def _tx_wake_hook(self, q: KernelQueue) -> Callable[[], None]:
        return lambda: self._tx_wake(q)

    def _tx_failed_hook(self, q: KernelQueue) -> Callable[[OSError], None]:
        return lambda error: self._tx_wake(q)

    def _tx_reset_hook(self, q: KernelQueue) -> Callable[[list[Any], OSError | None], None]:
        return lambda tokens, error: self._tx_reset(tokens, error, q)

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
        """Fill every receive ring (after DRIVER_OK)."""
        for ring in self._rings:
            self._rx_refill(ring)

    # ------------------------------------------------------------------ multi-queue
    def enable_pairs(self, timeout_s: float = CTRL_ACK_TIMEOUT_S) -> bool:
        """Ask the device to use every queue pair (VQ_PAIRS_SET, §5.1.6.5.6) and wait
        for its ack at most ``timeout_s``. True if it acked VIRTIO_NET_OK (transmission
        then spreads over the pairs); False otherwise -- the link stays on one pair
        (counted, logged), and a late ack still turns the pairs on."""
        if self.ctrlq is None:
            return True
        self._send_pairs_set()
        if not self._ctrl_done_ev.wait(timeout_s):
            self.counters["mq_ack_timeouts"] += 1
            log.warning(
                "%s: no answer to VQ_PAIRS_SET(%d) in %g s: using one queue pair",
                self.name,
                self.queue_pairs,
                timeout_s,
            )
            return False
        return self.active_pairs == self.queue_pairs

    def wait_pairs(self, timeout_s: float | None) -> int:
        """Wait until the device answered the last VQ_PAIRS_SET (sent at start-up and
        again after each reset or restart) or ``timeout_s`` passed; returns
        :attr:`active_pairs`."""
        if self.ctrlq is not None:
            self._ctrl_done_ev.wait(timeout_s)
        return self.active_pairs

    def _send_pairs_set(self) -> None:
        """Put VQ_PAIRS_SET(queue_pairs) on the control queue (never blocks)."""
        q = self.ctrlq
        buf = self._buf
        if q is None or buf is None:
            return
        cmd = mq_pairs_set(self.queue_pairs)
        addr = self._ctrl_addr
        with q.lock:
            if q.failed is not None or q.paused:
                return
            self._ctrl_gen += 1
            self._ctrl_done_ev.clear()
            buf[addr : addr + len(cmd)] = cmd
            buf[addr + _CTRL_ACK_AT] = 0xFF  # neither OK nor ERR until the device writes
            token = _CtrlCmd(self, self._ctrl_gen, self.queue_pairs)
            try:
                q.add([(addr, len(cmd))], [(addr + _CTRL_ACK_AT, 1)], token)
            except VirtioError:
                need = False  # the ring is full of stale commands: the ack never comes
            else:
                need = q.publish()
        if need:
            q.notify()

    def _ctrl_done(self, token: _CtrlCmd | None, used_len: int) -> None:
        """A control command came back (interrupt thread), failed or timed out
        (``used_len`` -1)."""
        if token is not None and token.gen != self._ctrl_gen:
            return  # from before a reset: a new command is on its way
        buf = self._buf
        ok = (
            used_len >= 1
            and buf is not None
            and buf[self._ctrl_addr + _CTRL_ACK_AT] == CTRL_OK  # §5.1.6.5: the ack byte
        )
        if ok and token is not None:
            self.active_pairs = token.pairs
            self.counters["mq_pairs_acked"] += 1
        else:
            self.active_pairs = 1
            self.counters["mq_fallbacks"] += 1
            why = (
                "failed"
                if used_len < 0
                else "was answered without an ack byte"
                if used_len == 0
                else "was answered VIRTIO_NET_ERR"
            )
            log.warning("%s: VQ_PAIRS_SET %s: using one queue pair", self.name, why)
        self._ctrl_done_ev.set()

    def _ctrl_reset(self, tokens: list[Any], error: OSError | None) -> None:
        """The device was reset or restarted: it uses one pair again (§5.1.6.5.6.1);
        so does transmission until VQ_PAIRS_SET, sent again now, is acked."""
        self.active_pairs = 1
        if self.transport.failed is None:
            self.counters["mq_resends"] += 1
            self._send_pairs_set()

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
        active = self.active_pairs
        q = self.txq if active == 1 else self.txqs[self._tx_map.current() % active]
        addr = self._alloc(total)
        if addr is None:
            for tq in self.txqs[:active]:  # reap what the device has finished
                self.transport.service_queue(tq)
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

    def _tx_wake(self, q: KernelQueue | None = None) -> None:
        with self._tx_room:
            self._tx_room.notify_all()
        # publish what was added while the batch completed
        (q if q is not None else self.txq).kick()

    def _tx_reset(
        self, tokens: list[Any], error: OSError | None, q: KernelQueue | None = None
    ) -> None:
        """The device was reset: frames it had not sent are dropped and counted
        (``tx_dropped_reset``; TCP retransmits, UDP is allowed to lose them)."""
        for t in tokens:
            self._free(t.addr)
        self.counters["tx_dropped_reset"] += len(tokens)
        self._tx_wake(q)

    def _rx_reset(
        self, tokens: list[Any], error: OSError | None, ring: _RxRing | None = None
    ) -> None:
        """The device was reset: every receive buffer is free again (``refill`` posts
        them on the new ring); a merged packet being assembled is dropped."""
        if ring is None:
            ring = self._rings[0]
        ring.free.extend(tokens)
        ring.merge = []
        ring.merge_left = 0
        ring.merge_info = None

    def _rx_refill(self, ring: _RxRing | None = None) -> None:
        if ring is None:
            ring = self._rings[0]
        q = ring.q
        free = ring.free
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
        ring = b.ring
        ring.free.append(b)
        if buf is None:
            return
        c = self.counters
        if ring.merge_left:
            # a further buffer of a merged packet (§5.1.6.4.2)
            ring.merge.append(bytes(buf[b.addr : b.addr + used_len]))
            ring.merge_left -= 1
            if not ring.merge_left:
                frame = b"".join(ring.merge)
                info = ring.merge_info or RxInfo()
                ring.merge = []
                ring.merge_info = None
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
            if nbuf < 1 or nbuf > ring.q.size:
                c["rx_bad_frames"] += 1
                return
            ring.merge = [bytes(buf[start:end])]
            ring.merge_left = nbuf - 1
            ring.merge_info = info
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
        for ring in self._rings:
            ring.merge = []
        self._ctrl_done_ev.set()  # nobody waits for an ack any more

    def __repr__(self) -> str:
        state = "up" if self.link_up else "down"
        pairs = f" pairs={self.active_pairs}/{self.queue_pairs}" if self.queue_pairs > 1 else ""
        return f"<NetLink {self.name} {format_mac(self.mac)} mtu={self.mtu} {state}{pairs}>"


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
        # several queue pairs: CTRL_VQ and MQ, both or neither (§5.1.3.1: MQ needs CTRL_VQ)
        if _wanted_pairs(transport) > 1 and offered & MQ_FEATURES == MQ_FEATURES:
            want |= MQ_FEATURES
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
        pairs = 1
        ctrlq: KernelQueue | None = None
        more: list[tuple[KernelQueue, KernelQueue]] = []
        if t.has_feature(NetF.MQ):
            # §5.1.4: max_virtqueue_pairs is 1..0x8000 with MQ; its 2M queues and the
            # control queue (2M, §5.1.2) must be among the rings the device reported
            have = cfg.max_virtqueue_pairs if len(data) >= NET_CONFIG_BYTES else 0
            rings = t.info.num_queues if t.info is not None else 2
            if not 1 <= have <= CTRL_MQ_PAIRS_MAX or 2 * have + 1 > rings:
                raise t.probe_error(
                    f"VIRTIO_NET_F_MQ with max_virtqueue_pairs {have} (the device has "
                    f"{rings} rings)"
                )
            pairs = min(have, _wanted_pairs(t))
            if pairs > 1:
                ctrlq = t.setup_queue(ctrl_queue_index(have, True), t.queue_cap)
        cfg = NetConfig(mac, status, pairs, mtu)
        rxq = t.setup_queue(RX_QUEUE, t.queue_cap)
        txq = t.setup_queue(TX_QUEUE, t.queue_cap)
        for p in range(1, pairs):
            prx = t.setup_queue(rx_queue_index(p), t.queue_cap)
            ptx = t.setup_queue(tx_queue_index(p), t.queue_cap)
            if t.tracer is not None:  # name the payloads of the further pairs' queues
                prx.enable_trace(t.tracer, "net-rx")
                ptx.enable_trace(t.tracer, "net-tx")
            more.append((prx, ptx))
        self._link = NetLink(t, rxq, txq, cfg, more, ctrlq)
        spec = t.spec
        if hasattr(t, "restart_spec") and getattr(spec, "mac", "") is None:
            # a restarted device process must come back with the MAC the stack knows
            t.restart_spec = dataclasses.replace(spec, mac=format_mac(mac))  # type: ignore[call-arg]
        t.on_config_change(self._config_changed)

    def started(self) -> None:
        """After DRIVER_OK: stock the receive rings; with several pairs, turn them on
        (VQ_PAIRS_SET; one pair if the device does not ack it)."""
        if self._link is not None:
            self._link.start()
            if self._link.queue_pairs > 1:
                self._link.enable_pairs(CTRL_ACK_TIMEOUT_S)

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


def _wanted_pairs(transport: VirtioTransport) -> int:
    """The queue pairs the spec asks for (``queue_pairs``; 1 when it does not say)."""
    n = getattr(transport.spec, "queue_pairs", 1)
    return n if isinstance(n, int) and 1 <= n <= CTRL_MQ_PAIRS_MAX else 1


def _random_mac() -> bytes:
    """A locally administered unicast MAC (02:xx:...)."""
    return b"\x02" + os.urandom(5)


register_driver(DeviceId.NET, NetDriver)
