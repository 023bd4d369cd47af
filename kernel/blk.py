"""The virtio-blk driver (§5.2) and the block layer on top of it.

Theory of operation
-------------------
:class:`BlkDriver` binds to DeviceId.BLOCK on the bus. It accepts SIZE_MAX, SEG_MAX,
BLK_SIZE, FLUSH, RO, DISCARD, WRITE_ZEROES plus the ring features EVENT_IDX,
INDIRECT_DESC and VERSION_1, reads :class:`~vdev.virtio.blk.BlkConfig`, sets up queue 0
and builds a :class:`BlockDevice`.

The block layer is asynchronous at its core and never blocks (blk-mq style)::

    submit(op, offset, length_or_data, callback)
        │ validate, split into requests of at most ``max_request_bytes``
        ▼
    software queue (FIFO) ──dispatch──▶ virtqueue (chain: header | data | status)
        ▲                     (when a request slot, enough descriptors and a DMA
        │                      buffer are free; stops at the first that does not fit)
    refill after every batch of completions on the interrupt thread

Every request is one chain::

    header  16 B  readable   le32 type | le32 reserved | le64 sector
    data    n B   readable for OUT, writable for IN (one descriptor per ``size_max``)
    status   1 B  writable   pre-set to 0xFF so a status the device never wrote is EIO

With INDIRECT_DESC negotiated, a request with more than one data segment goes into an
indirect table (one ring descriptor). Header, status, the DISCARD/WRITE_ZEROES segment
and the indirect table live in a per-request *slot* (one per ring entry, allocated once
at probe time from the DMA pool). Each slot also owns one page of *inline* data (when
those pages take at most an eighth of the pool), so a request of up to
:data:`INLINE_BYTES` needs no allocation at all; bigger data buffers come from the DMA
pool (:class:`hostops.shm.PageAllocator`). Data is copied in (OUT) or out (IN) of shared
memory exactly once. A large I/O is split into several requests (by
``size_max``·``seg_max``, the driver's cap :data:`MAX_REQUEST_BYTES` and a quarter of
the DMA pool, so that a request always fits once the pool drains: no deadlock); all
parts complete before the callback.

Completion (interrupt thread): status OK → result (the bytes read, or the byte count);
IOERR → EIO; UNSUPP → EOPNOTSUPP; an IN whose used length is shorter than data+status →
EIO. The callback receives either the result or an ``OSError`` -- it runs on the
interrupt thread and must be quick (it may submit more I/O, but never wait for I/O of
the same device: the sync wrappers refuse that with EDEADLK). Argument errors (EINVAL,
ENXIO, EROFS, EOPNOTSUPP for a feature the device lacks) and a device that already
failed (EIO) are raised by :meth:`BlockDevice.submit` itself.

While the interrupt thread runs a batch of completions, submissions only add chains;
the batch's ``refill`` publishes them with one ``kick_prepare`` (a callback that
resubmits costs no kick decision of its own).

Batching: ``submit(..., kick=False)`` adds chains without publishing them;
:meth:`BlockDevice.kick` publishes them all with one ``kick_prepare`` (and at most one
doorbell, usually none with EVENT_IDX while the device is busy).
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from hostops.sync import Lock
from vdev.virtio import SECTOR_SIZE, BlkF, BlkStatus, BlkType, DeviceId, F, VirtioError, bit
from vdev.virtio.blk import CONFIG_BYTES, DISCARD_SEGMENT, REQ_HEADER, BlkConfig

from .bus import VirtioDriver, register_driver
from .errors import DeviceControlError, blk_status_errno, io_error
from .transport import KernelQueue, VirtioTransport

__all__ = [
    "BlkDriver",
    "BlockDevice",
    "Callback",
    "OPS",
    "MAX_REQUEST_BYTES",
    "MAX_SEGMENTS",
    "INLINE_BYTES",
    "BLK_DRIVER_FEATURES",
]

log = logging.getLogger(__name__)

#: The driver's own cap on one request (Linux: max_sectors_kb; 512 KiB was its default
#: for years). Fewer, bigger requests mean less per-request work on both sides.
MAX_REQUEST_BYTES = 512 << 10
#: Data of at most this many bytes goes into the request slot's own page (no allocation).
INLINE_BYTES = 4096
#: The driver's own cap on data segments per request.
MAX_SEGMENTS = 32
#: Features the driver understands.
BLK_DRIVER_FEATURES = (
    bit(BlkF.SIZE_MAX)
    | bit(BlkF.SEG_MAX)
    | bit(BlkF.BLK_SIZE)
    | bit(BlkF.FLUSH)
    | bit(BlkF.RO)
    | bit(BlkF.DISCARD)
    | bit(BlkF.WRITE_ZEROES)
    | bit(F.EVENT_IDX)
    | bit(F.INDIRECT_DESC)
    | bit(F.VERSION_1)
)

#: Operations :meth:`BlockDevice.submit` accepts (also as the matching ``BlkType``).
OPS = ("read", "write", "flush", "discard", "write_zeroes")
_OP_BY_TYPE = {
    BlkType.IN: "read",
    BlkType.OUT: "write",
    BlkType.FLUSH: "flush",
    BlkType.DISCARD: "discard",
    BlkType.WRITE_ZEROES: "write_zeroes",
}

#: ``callback(result)``: bytes for a read, the byte count for a write, 0 otherwise, or
#: the ``OSError`` the request failed with.
Callback = Callable[[Any], None]

_STATUS_UNSET = 0xFF
_OK = int(BlkStatus.OK)
_IN = int(BlkType.IN)
_OUT = int(BlkType.OUT)
# slot layout: header 16 | status 1 (+15 pad) | discard segment 16 | indirect table
_S_STATUS = 16
_S_SEG = 32
_S_TABLE = 48
_MAX_DISCARD_SECTORS_DEFAULT = 0xFFFFFFFF


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class _Parent:
    """Gathers the parts of one split submit() and calls back once. A read keeps each
    part's bytes (``parts[i]``) and joins them at the end."""

    __slots__ = ("callback", "remaining", "error", "parts", "result", "lock")

    def __init__(self, callback: Callback, parts: int, read: bool, result: Any):
        self.callback = callback
        self.remaining = parts
        self.error: OSError | None = None
        self.parts: list[bytes] | None = [b""] * parts if read else None
        self.result = result
        self.lock = Lock()

    def part_done(self, err: OSError | None) -> None:
        with self.lock:
            if err is not None and self.error is None:
                self.error = err
            self.remaining -= 1
            done = self.remaining == 0
        if done:
            if self.error is not None:
                self.parts = None
                _deliver(self.callback, self.error)
            elif self.parts is not None:
                parts, self.parts = self.parts, None
                _deliver(self.callback, b"".join(parts))
            else:
                _deliver(self.callback, self.result)


def _deliver(callback: Callback, result: Any) -> None:
    try:
        callback(result)
    except Exception:
        log.exception("block request callback failed")


class _Req:
    """One virtio-blk request = one chain. It is the queue token (``complete``/``fail``)."""

    __slots__ = (
        "dev",
        "rtype",
        "sector",
        "nbytes",
        "src",
        "zero",
        "nsect",
        "callback",
        "parent",
        "part_off",
        "slot",
        "dma",
        "owned",
    )

    def __init__(
        self,
        dev: BlockDevice,
        rtype: int,
        sector: int,
        nbytes: int,
        callback: Callback | None,
        parent: _Parent | None,
        part_off: int = 0,
        src: memoryview | None = None,
        zero: bool = False,
        nsect: int = 0,
    ) -> None:
        self.dev = dev
        self.rtype = rtype
        self.sector = sector
        self.nbytes = nbytes  # data bytes in shared memory (IN/OUT)
        self.src = src  # OUT: the caller's data
        self.zero = zero  # OUT of zeros (WRITE_ZEROES emulation)
        self.nsect = nsect  # DISCARD / WRITE_ZEROES: sectors
        self.callback = callback
        self.parent = parent
        self.part_off = part_off  # index of this part in the parent
        self.slot = -1
        self.dma = -1  # address of the data in shared memory (-1: none)
        self.owned = False  # dma came from the pool (else: the slot's inline page)

    def complete(self, used_len: int) -> None:
        """The device returned this chain (interrupt thread)."""
        self.dev._complete(self, used_len)

    def fail(self, error: OSError) -> None:
        """The request will never complete."""
        self.dev._finish(self, error, None)


class BlockDevice:
    """A virtio-blk disk as the kernel's block layer sees it.

    Attributes: ``name`` (``"vda"``), ``size`` (bytes), ``readonly``, ``features``
    (negotiated feature names), ``config`` (:class:`BlkConfig`), ``block_size`` (the
    device's preferred block size; requests are addressed in 512-byte sectors),
    ``max_request_bytes`` (largest single request; bigger I/O is split), ``queue``.

    Offsets and lengths given to the block layer must be multiples of 512 (the
    syscall layer does read-modify-write for anything else) and lie inside the disk.
    """

    def __init__(self, transport: VirtioTransport, queue: KernelQueue, config: BlkConfig):
        self.transport = transport
        self.name = transport.name
        self.queue = queue
        self.config = config
        self.feature_bits = transport.features
        self.features = transport.feature_names
        self.size = config.capacity * SECTOR_SIZE
        self.readonly = transport.has_feature(BlkF.RO) or bool(
            getattr(transport.spec, "readonly", False)
        )
        self.block_size = (
            config.blk_size
            if transport.has_feature(BlkF.BLK_SIZE) and config.blk_size >= SECTOR_SIZE
            else SECTOR_SIZE
        )
        self.has_flush = transport.has_feature(BlkF.FLUSH)
        self.has_discard = transport.has_feature(BlkF.DISCARD)
        self.has_write_zeroes = transport.has_feature(BlkF.WRITE_ZEROES)
        self._indirect = transport.has_feature(F.INDIRECT_DESC)
        n = queue.size
        # -- request geometry
        seg_max = config.seg_max if transport.has_feature(BlkF.SEG_MAX) and config.seg_max else 0
        max_segs = min(seg_max or MAX_SEGMENTS, MAX_SEGMENTS)
        if not self._indirect:
            max_segs = min(max_segs, n - 2)
        if max_segs < 1:
            raise ValueError(f"{self.name}: queue of {n} entries cannot hold a request")
        if transport.has_feature(BlkF.SIZE_MAX) and config.size_max:
            self.segment_bytes = config.size_max
        else:
            self.segment_bytes = MAX_REQUEST_BYTES
        self.max_segments = max_segs
        limit = min(MAX_REQUEST_BYTES, max_segs * self.segment_bytes, transport.dma_size // 4)
        if limit >= SECTOR_SIZE:  # a power of two: the buddy allocator wastes nothing
            limit = 1 << (limit.bit_length() - 1)
        self.max_request_bytes = limit // SECTOR_SIZE * SECTOR_SIZE
        if self.max_request_bytes < SECTOR_SIZE:
            raise ValueError(
                f"{self.name}: size_max {config.size_max} x seg_max {config.seg_max} "
                f"(DMA pool {transport.dma_size}) cannot carry one sector"
            )
        self.max_discard_sectors = (
            config.max_discard_sectors or _MAX_DISCARD_SECTORS_DEFAULT
        ) & 0xFFFFFFFF
        self.max_write_zeroes_sectors = (
            config.max_write_zeroes_sectors or _MAX_DISCARD_SECTORS_DEFAULT
        ) & 0xFFFFFFFF
        # -- slots: one per ring entry, carved from the DMA pool once
        assert transport.memory is not None and transport.dma is not None
        self._buf = transport.memory.buf
        self._dma = transport.dma
        self._slot_bytes = _align(_S_TABLE + 16 * (max_segs + 2), 64)
        area = transport.dma.alloc(self._slot_bytes * n)
        if area is None:
            raise ValueError(f"{self.name}: DMA pool too small for {n} request slots")
        self._slots: deque[int] = deque(area + i * self._slot_bytes for i in range(n))
        # inline data: one page per slot when the pool can spare it (an eighth at most)
        self._inline: dict[int, int] = {}
        if INLINE_BYTES * n <= transport.dma_size // 8:
            pages = transport.dma.alloc(INLINE_BYTES * n)
            if pages is not None:
                self._inline = {
                    area + i * self._slot_bytes: pages + i * INLINE_BYTES for i in range(n)
                }
        # A request must fit the pool once it has drained (else it would wait forever):
        # shrink the request size until the allocator can actually hand out one.
        while True:
            probe = transport.dma.alloc(self.max_request_bytes)
            if probe is not None:
                transport.dma.free(probe)
                break
            if self.max_request_bytes <= SECTOR_SIZE:
                raise ValueError(f"{self.name}: DMA pool too small for one sector")
            self.max_request_bytes = max(SECTOR_SIZE, self.max_request_bytes // 2)
            self.max_request_bytes -= self.max_request_bytes % SECTOR_SIZE
        self._pending: deque[_Req] = deque()
        self._rejected: deque[tuple[_Req, OSError]] = deque()
        queue.refill = self._refill
        queue.on_failed = self._on_failed
        transport.on_release(self._release)

    # ------------------------------------------------------------------ info
    @property
    def failed(self) -> OSError | None:
        """The device's failure (every request then fails with EIO), or None."""
        return self.queue.failed

    @property
    def pending(self) -> int:
        """Requests waiting in the software queue for room in the ring."""
        return len(self._pending)

    def __repr__(self) -> str:
        ro = " ro" if self.readonly else ""
        return f"<BlockDevice {self.name} {self.size} bytes{ro}>"

    def set_max_segment_size(self, nbytes: int) -> None:
        """Cap each data descriptor at ``nbytes`` (a multiple of 512, at most the
        device's ``size_max``), like Linux's ``max_segment_size``; requests then carry
        several data segments (in an indirect table when INDIRECT_DESC was negotiated)
        and ``max_request_bytes`` shrinks so that ``max_segments`` of them still fit."""
        if not isinstance(nbytes, int) or nbytes < SECTOR_SIZE or nbytes % SECTOR_SIZE:
            raise ValueError(f"segment size {nbytes!r} is not a positive multiple of 512")
        size_max = self.config.size_max if self.transport.has_feature(BlkF.SIZE_MAX) else 0
        if size_max and nbytes > size_max:
            raise ValueError(f"segment size {nbytes} exceeds the device's size_max {size_max}")
        with self.queue.lock:
            self.segment_bytes = nbytes
            self.max_request_bytes = min(self.max_request_bytes, self.max_segments * nbytes)

    # ------------------------------------------------------------------ submission
    def submit(
        self,
        op: str | int,
        offset: int,
        length_or_data: int | bytes | bytearray | memoryview | None,
        callback: Callback,
        *,
        kick: bool = True,
    ) -> None:
        """Start one block operation; never blocks.

        ``op`` is ``"read"`` (``length_or_data`` = length), ``"write"`` (the data; keep
        it unchanged until the callback), ``"flush"`` (offset/length ignored),
        ``"discard"`` or ``"write_zeroes"`` (a length). ``callback(result)`` gets the
        bytes read, the byte count written, or 0 -- or the ``OSError``. With
        ``kick=False`` the chains are queued but not published until :meth:`kick`.
        Argument errors raise ``OSError`` here (EINVAL misaligned/negative, ENXIO past
        the end, EROFS on a read-only disk, EOPNOTSUPP without DISCARD), and so does a
        device that has already failed (EIO); the callback is then never called. A
        request that needs no I/O (length 0, FLUSH without VIRTIO_BLK_F_FLUSH) calls
        back at once on the calling thread.
        """
        op = _OP_BY_TYPE.get(op, op) if isinstance(op, int) else op  # type: ignore[call-overload]
        reqs = self._build(op, offset, length_or_data, callback)
        if reqs is None:
            return
        q = self.queue
        with q.lock:
            err = q.failed
            need = False
            if err is None:
                self._pending.extend(reqs)
                need = self._dispatch_locked(kick and not q.completing)
        if err is not None:
            # Refused outright (never via the callback: a callback that resubmits on
            # error would otherwise recurse without end once the device is gone).
            raise OSError(err.errno, err.strerror)
        if self._rejected:
            self._fail_rejected()
        if need:
            q.notify()

    def kick(self) -> None:
        """Publish every chain queued with ``kick=False`` (one doorbell at most)."""
        q = self.queue
        with q.lock:
            if q.failed is not None:
                return
            need = q.publish()
        if need:
            q.notify()

    def _check_range(self, offset: int, length: int) -> None:
        if not isinstance(offset, int) or not isinstance(length, int):
            raise io_error(errno.EINVAL, "offset and length must be integers")
        if offset < 0 or length < 0:
            raise io_error(errno.EINVAL, f"negative offset {offset} or length {length}")
        if offset % SECTOR_SIZE or length % SECTOR_SIZE:
            raise io_error(errno.EINVAL, f"offset {offset} / length {length} not 512-byte aligned")
        if offset + length > self.size:
            raise io_error(
                errno.ENXIO, f"[{offset}, +{length}) runs past the end of {self.name} ({self.size})"
            )

    def _build(self, op: str, offset: int, arg: Any, callback: Callback) -> list[_Req] | None:
        if op == "flush":
            if not self.has_flush:
                _deliver(callback, 0)  # no volatile cache to flush
                return None
            return [_Req(self, BlkType.FLUSH, 0, 0, callback, None)]
        if op == "read":
            length = arg
            self._check_range(offset, length)
            if length == 0:
                _deliver(callback, b"")
                return None
            return self._split(BlkType.IN, offset, length, callback, None, False)
        if op in ("write", "discard", "write_zeroes") and self.readonly:
            raise io_error(errno.EROFS, f"{self.name} is read-only")
        if op == "write":
            data = memoryview(arg).cast("B") if not isinstance(arg, memoryview) else arg
            if data.ndim != 1 or data.itemsize != 1:
                data = data.cast("B")
            self._check_range(offset, len(data))
            if len(data) == 0:
                _deliver(callback, 0)
                return None
            return self._split(BlkType.OUT, offset, len(data), callback, data, False)
        if op in ("discard", "write_zeroes"):
            length = arg
            self._check_range(offset, length)
            if length == 0:
                _deliver(callback, 0)
                return None
            if op == "discard":
                if not self.has_discard:
                    raise io_error(errno.EOPNOTSUPP, f"{self.name} does not support discard")
                return self._split_sectors(BlkType.DISCARD, offset, length, callback)
            if not self.has_write_zeroes:
                # emulate with plain writes of zeros, as Linux does
                return self._split(BlkType.OUT, offset, length, callback, None, True)
            return self._split_sectors(BlkType.WRITE_ZEROES, offset, length, callback)
        raise io_error(errno.EINVAL, f"unknown block operation {op!r} (one of {OPS})")

    def _split(
        self,
        rtype: int,
        offset: int,
        length: int,
        callback: Callback,
        src: memoryview | None,
        zero: bool,
    ) -> list[_Req]:
        step = self.max_request_bytes
        sector = offset // SECTOR_SIZE
        if length <= step:
            return [_Req(self, rtype, sector, length, callback, None, 0, src, zero)]
        nparts = -(-length // step)
        parent = _Parent(callback, nparts, rtype == _IN, length)
        out = []
        for i, pos in enumerate(range(0, length, step)):
            n = min(step, length - pos)
            part_src = src[pos : pos + n] if src is not None else None
            out.append(
                _Req(self, rtype, sector + pos // SECTOR_SIZE, n, None, parent, i, part_src, zero)
            )
        return out

    def _split_sectors(
        self, rtype: int, offset: int, length: int, callback: Callback
    ) -> list[_Req]:
        limit = (
            self.max_discard_sectors if rtype == BlkType.DISCARD else self.max_write_zeroes_sectors
        )
        sector = offset // SECTOR_SIZE
        total = length // SECTOR_SIZE
        if total <= limit:
            return [_Req(self, rtype, sector, 0, callback, None, nsect=total)]
        nparts = -(-total // limit)
        parent = _Parent(callback, nparts, False, 0)
        return [
            _Req(self, rtype, sector + s, 0, None, parent, nsect=min(limit, total - s))
            for s in range(0, total, limit)
        ]

    # ------------------------------------------------------------------ dispatch
    def _dispatch_locked(self, publish: bool) -> bool:
        """Move requests from the software queue into the ring while they fit (FIFO).
        Caller holds the queue lock. Returns True if the doorbell must be rung.
        Requests that cannot be added at all are parked in ``_rejected`` and failed by
        :meth:`_fail_rejected` once the lock is released."""
        pending = self._pending
        q = self.queue
        dq = q.dq
        if dq.broken is not None:
            return False  # the interrupt thread is about to fail everything
        slots = self._slots
        buf = self._buf
        seg_bytes = self.segment_bytes
        indirect = self._indirect
        inline = self._inline
        add = q.add
        while pending and slots:
            r = pending[0]
            n = r.nbytes
            if n:
                nseg = 1 if n <= seg_bytes else -(-n // seg_bytes)
            else:
                nseg = 1 if r.nsect else 0
            use_table = indirect and nseg > 1
            if dq.num_free < (1 if use_table else nseg + 2):
                break
            slot = slots[0]
            if n:
                if n <= INLINE_BYTES and inline:
                    dma = inline[slot]
                else:
                    got = self._dma.alloc(n)
                    if got is None:
                        break
                    dma = got
                    r.owned = True
                r.dma = dma
                if r.rtype == _OUT:
                    if r.zero:
                        buf[dma : dma + n] = bytes(n)
                    else:
                        buf[dma : dma + n] = r.src  # type: ignore[assignment]
            slots.popleft()
            r.slot = slot
            REQ_HEADER.pack_into(buf, slot, r.rtype, 0, r.sector)
            buf[slot + _S_STATUS] = _STATUS_UNSET
            header = (slot, REQ_HEADER.size)
            status = (slot + _S_STATUS, 1)
            readable: list[tuple[int, int]]
            writable: list[tuple[int, int]]
            if n:
                d = r.dma
                if nseg == 1:
                    segs = [(d, n)]
                else:
                    segs = [(d + p, min(seg_bytes, n - p)) for p in range(0, n, seg_bytes)]
                if r.rtype == _IN:
                    readable = [header]
                    segs.append(status)
                    writable = segs
                else:
                    segs.insert(0, header)
                    readable = segs
                    writable = [status]
            elif r.nsect:
                DISCARD_SEGMENT.pack_into(buf, slot + _S_SEG, r.sector, r.nsect, 0)
                readable = [header, (slot + _S_SEG, DISCARD_SEGMENT.size)]
                writable = [status]
            else:
                readable = [header]
                writable = [status]
            pending.popleft()
            try:
                add(readable, writable, r, indirect_table=slot + _S_TABLE if use_table else None)
            except VirtioError as e:  # broken queue or a driver bug: fail this one request
                self._rejected.append((r, io_error(errno.EIO, f"{self.name}: {e}")))
                if dq.broken is not None:
                    break
        return q.publish() if publish and dq.broken is None else False

    def _fail_rejected(self) -> None:
        """Fail the requests :meth:`_dispatch_locked` could not add (no lock held)."""
        while self._rejected:
            r, err = self._rejected.popleft()
            r.fail(err)

    def _refill(self) -> None:
        q = self.queue
        with q.lock:
            if q.failed is not None:
                return
            need = self._dispatch_locked(True)
        if self._rejected:
            self._fail_rejected()
        if need:
            q.notify()

    def _on_failed(self, error: OSError) -> None:
        q = self.queue
        with q.lock:
            reqs = list(self._pending)
            self._pending.clear()
        for r in reqs:
            r.fail(OSError(error.errno, error.strerror))

    def _release(self) -> None:
        self._buf = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ completion
    def _complete(self, r: _Req, used_len: int) -> None:
        buf = self._buf
        status = buf[r.slot + _S_STATUS]
        err: OSError | None = None
        data: bytes | None = None
        if status != _OK:
            code = blk_status_errno(status)
            what = BlkStatus(status).name if status in (1, 2) else f"status {status:#x}"
            err = io_error(code, f"{self.name}: device answered {what}")
        elif r.rtype == _IN:
            n = r.nbytes
            if used_len <= n:
                err = io_error(errno.EIO, f"{self.name}: short read ({used_len} of {n + 1} bytes)")
            else:
                dma = r.dma
                data = buf[dma : dma + n].tobytes()  # the one copy out of shared memory
                parent = r.parent
                if parent is not None and parent.parts is not None:
                    parent.parts[r.part_off] = data
                    data = None
        elif used_len < 1:
            err = io_error(errno.EIO, f"{self.name}: request returned without a status")
        self._finish(r, err, data)

    def _finish(self, r: _Req, err: OSError | None, data: bytes | None) -> None:
        if r.dma >= 0:
            if r.owned:
                self._dma.free(r.dma)
                r.owned = False
            r.dma = -1
        if r.slot >= 0:
            self._slots.append(r.slot)  # deque.append is thread-safe
            r.slot = -1
        r.src = None
        if r.parent is not None:
            r.parent.part_done(err)
            return
        assert r.callback is not None
        if err is not None:
            _deliver(r.callback, err)
        elif r.rtype == _IN:
            _deliver(r.callback, data)
        elif r.rtype == _OUT:
            _deliver(r.callback, r.nbytes)
        else:
            _deliver(r.callback, 0)

    # ------------------------------------------------------------------ sync API
    def _wait(self, op: str, offset: int, arg: Any) -> Any:
        if self.transport.in_interrupt():
            raise io_error(
                errno.EDEADLK,
                f"{self.name}: blocking I/O from a completion callback would wait forever "
                "(use submit())",
            )
        # A bare lock is the cheapest one-shot wake-up (an Event is a Condition: more
        # work on the interrupt thread, which the woken caller waits out for the GIL).
        done = Lock()
        done.acquire()
        box: list[Any] = []

        def cb(result: Any) -> None:
            box.append(result)
            done.release()

        self.submit(op, offset, arg, cb)
        done.acquire()
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (both multiples of 512); blocks."""
        return self._wait("read", offset, length)  # type: ignore[no-any-return]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset`` (512-byte aligned); blocks; returns len(data)."""
        return self._wait("write", offset, data)  # type: ignore[no-any-return]

    def flush(self) -> None:
        """Make completed writes durable (FLUSH; a no-op without VIRTIO_BLK_F_FLUSH)."""
        self._wait("flush", 0, None)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a sector range (DISCARD); blocks."""
        self._wait("discard", offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a sector range (WRITE_ZEROES, or zero-filled writes without it)."""
        self._wait("write_zeroes", offset, length)


class BlkDriver(VirtioDriver):
    """The virtio-blk driver: binds DeviceId.BLOCK, builds a :class:`BlockDevice`."""

    device_id = DeviceId.BLOCK
    supported_features = BLK_DRIVER_FEATURES

    def __init__(self, transport: VirtioTransport) -> None:
        super().__init__(transport)
        self._block: BlockDevice | None = None

    def probe(self) -> None:
        """Read the config space, set up queue 0, build the block device."""
        t = self.transport
        data = b""
        for size in (CONFIG_BYTES, 24, 8):
            try:
                data = t.read_config(size)
                break
            except DeviceControlError:
                continue
        if len(data) < 8:
            raise t.probe_error("cannot read the virtio-blk config space (capacity)")
        config = BlkConfig.unpack(data)
        q = t.setup_queue(0, t.queue_cap)
        self._block = BlockDevice(t, q, config)
        t.on_config_change(self._config_changed)

    def _config_changed(self) -> None:
        blk = self._block
        if blk is None:
            return
        try:
            cap = int.from_bytes(self.transport.read_config(8), "little")
        except Exception:
            return
        blk.size = cap * SECTOR_SIZE

    @property
    def block(self) -> BlockDevice | None:
        """The :class:`BlockDevice` (after probe)."""
        return self._block


register_driver(DeviceId.BLOCK, BlkDriver)
