"""The virtio-blk driver (§5.2) and the block layer on top of it.

Theory of operation
-------------------
:class:`BlkDriver` binds to DeviceId.BLOCK on the bus. It accepts SIZE_MAX, SEG_MAX,
BLK_SIZE, FLUSH, RO, DISCARD, WRITE_ZEROES plus the ring features EVENT_IDX,
INDIRECT_DESC and VERSION_1 (and MQ when the spec asks for several queues), reads
:class:`~vdev.virtio.blk.BlkConfig`, sets up its request queues (queue 0, or
``min(queues, num_queues)`` of them with MQ) and builds a :class:`BlockDevice`.

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

Recovery (see :mod:`kernel.transport`): the queue is watched for lost interrupts and
each request has the spec's ``request_timeout``. A request that times out calls back
at once with ETIMEDOUT (culprit "timeout"; ``_Req.expire``) but keeps its slot and
data buffer until the device has been reset. After a reset or restart
(``_on_reset``) the requests that were in flight go back to the front of the software
queue with their slot and buffer -- a write's data is still in it -- and are sent
again, so their callers see success (a death, a timeout of another request); after a
ring violation they fail with EIO (culprit "device-broke-ring"). Status errors from
the device carry culprit "device-error".

An acknowledged fsync is a promise, also across restarts. With a volatile write cache
(VIRTIO_BLK_F_FLUSH) a write acknowledged by a device that then dies (a power cut) may
be gone, so the driver keeps a *journal* of acknowledged writes (their data) until a
completed FLUSH covers them (at most :data:`JOURNAL_MAX_BYTES`; a copy per write, the
price of the promise). After a reset or restart the journal is sent again first --
nothing else is dispatched until it has completed, so later writes still win -- then
the resubmitted requests. If the journal overflowed (or a replay failed), the next
FLUSH fails with EIO (culprit "device-gone", as Linux's errseq reports a lost
writeback once) instead of promising what the image may not hold.

Integrity mode (opt-in: ``kernel.Blk(..., integrity=True)``; :attr:`BlockDevice.integrity`).
virtio-blk has no integrity protection: a device that acknowledges a write it dropped or
tore, or returns altered read data with status OK, goes unnoticed. In this mode the
driver keeps, in kernel memory, the CRC32 (``zlib.crc32``) of every 512-byte sector it
last wrote and had acknowledged, and builds on the journal above:

* a read whose sectors have CRCs is verified on completion. A mismatch is read once
  more (a one-off corruption heals); still wrong and the journal holds those sectors,
  the caller gets the journal's data and the sectors are rewritten from it
  (``integrity_repaired``); otherwise the read fails with EIO, culprit "device-error"
  (``integrity_errors``) -- wrong data is never returned as success;
* before a FLUSH goes out, every journaled sector is read back and compared with the
  journal; what differs is rewritten and read back again, at most
  :data:`INTEGRITY_RETRIES` rounds; if it still differs the FLUSH is not sent and the
  fsync fails with EIO (culprit "device-error"). A read-back the device fails (IOERR,
  UNSUPP, a timeout) counts as different: it is rewritten and read again. So a dropped
  or torn write is repaired by the next fsync, and an acknowledged fsync means the data
  was read back (sectors a newer write is already on its way to are left to that
  write's own fsync).

All of it runs on the interrupt thread through the asynchronous machinery (the async
:meth:`BlockDevice.submit` API is protected as the sync one): the read-back and the
rewrites are *urgent* requests, dispatched ahead of the software queue behind a
*barrier* -- while one is up, nothing else is dispatched, so a rewrite never races a
newer write. Reads racing writes are no false alarms: a write being submitted voids
its sectors' CRCs until it is acknowledged, and a read only compares CRCs at most as
new as the write generation at its submission; sectors two writes were in flight to at
once are left unverified. Counters (:data:`INTEGRITY_COUNTERS`): ``integrity_checked``
(sectors compared), ``integrity_mismatches`` (sectors found different, each time),
``integrity_repaired`` (sectors made right from the journal), ``integrity_errors``
(reads and fsyncs failed), ``integrity_evicted``.

Limits and cost: only data written by this kernel since boot is protected (nothing else
has a CRC); the CRC map holds at most :data:`INTEGRITY_MAX_SECTORS` sectors -- beyond
it the oldest entries are dropped (``integrity_evicted``) and those sectors are no
longer verified; DISCARDed sectors and zeroed ranges larger than 2 MiB are not
verified. Repair needs the journal, hence VIRTIO_BLK_F_FLUSH: without it, a mismatch
that a second read does not heal is EIO. The price: a CRC per sector read and written,
about 150 bytes of memory per sector in the map (20 MiB at the bound), and an fsync
reads back everything written since the previous one (twice the I/O of a
write-then-fsync workload). Measured on 64 KiB I/O: writes and reads some 40 % slower
(the CRCs and the map), an fsync after 16 MiB of writes some 7 times longer.

Reads into the caller's memory: ``submit("read", ..., into=[(offset, view), ...])``
copies each part's data from shared memory straight into the given views on
completion (no ``bytes`` object, no join of the parts; with integrity mode the data is
verified first). Write watchers (:meth:`BlockDevice.add_write_watcher`) hear of every
write, DISCARD and WRITE_ZEROES when it is submitted and when it finished; the block
file layer's readahead stays coherent through them.

Batching: ``submit(..., kick=False)`` adds chains without publishing them;
:meth:`BlockDevice.kick` publishes them all with one ``kick_prepare`` per queue (and at
most one doorbell each, usually none with EVENT_IDX while the device is busy).

Multi-queue (VIRTIO_BLK_F_MQ, ``kernel.Blk(..., queues=N)``). Each request queue is a
*hardware context* as in blk-mq: its virtqueue, its own software queue and its own
request slots (one per ring entry), all under that virtqueue's lock; the DMA pool is
shared. A request goes to the queue of the submitting thread
(:meth:`BlockDevice.current_queue`: each thread gets one, round robin, and keeps it --
Linux maps CPUs to hardware contexts the same way); the parts of a split request go to
that queue and the following ones, so a large I/O is worked on through every ring at
once. A request stays on its queue for good (its slot is that queue's): a reset
resubmits it there. Whatever orders requests across the whole disk runs through queue
0 only -- the journal replay after a reset and the integrity mode's read-backs and
rewrites (an integrity FLUSH is queued on queue 0) -- and while it is up
(``_replaying``, the barrier) the other queues dispatch nothing, exactly as the single
queue dispatched nothing else. The journal itself is one per disk (``_jlock``). After
a batch of completions on any queue every queue with requests waiting is dispatched
(they wait on the shared DMA pool or on queue 0's work, which that batch may have
ended). The transport resets and restarts every queue together and hands each its own
chains back (``_on_reset``, queue 0 first: it rebuilds the replay). Counters stay per
queue (``dev.queues[i].stats``); the trace names each event's queue (``q``).
"""

from __future__ import annotations

import errno
import logging
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from hostops.sync import Lock
from vdev.virtio import SECTOR_SIZE, BlkF, BlkStatus, BlkType, DeviceId, F, VirtioError, bit
from vdev.virtio.blk import CONFIG_BYTES, DISCARD_SEGMENT, REQ_HEADER, BlkConfig

from .bus import VirtioDriver, register_driver
from .errors import DeviceControlError, blk_status_errno, copy_error, io_error
from .queue_map import ThreadQueueMap
from .transport import MAX_QUEUES, KernelQueue, VirtioTransport

__all__ = [
    "BlkDriver",
    "BlockDevice",
    "Callback",
    "OPS",
    "MAX_REQUEST_BYTES",
    "MAX_SEGMENTS",
    "INLINE_BYTES",
    "BLK_DRIVER_FEATURES",
    "JOURNAL_MAX_BYTES",
    "MAX_BLOCK_SIZE",
    "INTEGRITY_MAX_SECTORS",
    "INTEGRITY_RETRIES",
    "INTEGRITY_COUNTERS",
    "READAHEAD_COUNTERS",
    "MAX_INTO",
    "EARLY_PUBLISH_BYTES",
    "WriteWatcher",
]

log = logging.getLogger(__name__)

#: The driver's own cap on one request (Linux: max_sectors_kb; 512 KiB was its default
#: for years). Fewer, bigger requests mean less per-request work on both sides.
MAX_REQUEST_BYTES = 512 << 10
#: Largest ``blk_size`` taken from a device (a bigger or odd one is ignored: 512).
MAX_BLOCK_SIZE = 64 << 10
#: Data of at most this many bytes goes into the request slot's own page (no allocation).
INLINE_BYTES = 4096
#: The driver's own cap on data segments per request.
MAX_SEGMENTS = 32
#: Requests of at least this many data bytes are published as soon as they are added
#: (the parts of a large write: the device works on one while the next is copied in).
EARLY_PUBLISH_BYTES = 64 << 10
#: Most ``(offset, view)`` entries of a read's ``into`` scatter list (Linux's IOV_MAX).
MAX_INTO = 1024
#: Operations write watchers hear of.
_WRITE_OPS = frozenset(("write", "discard", "write_zeroes"))
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
_FLUSH = int(BlkType.FLUSH)
#: Acknowledged writes not yet covered by a completed FLUSH that the driver keeps (per
#: disk) to replay after a device restart; beyond it the next FLUSH fails with EIO.
JOURNAL_MAX_BYTES = 64 << 20
#: Integrity mode: sectors whose CRC32 the driver keeps (the most recently written; when
#: a write would exceed it, the oldest entries are dropped and those sectors are no
#: longer verified). 2^17 sectors = 64 MiB of data (as the journal), about 150 bytes
#: of memory each.
INTEGRITY_MAX_SECTORS = 1 << 17
#: Integrity mode: rewrite + read-back rounds an fsync tries before it fails with EIO.
INTEGRITY_RETRIES = 3
#: Integrity mode counters (in :attr:`BlockDevice.counters`).
INTEGRITY_COUNTERS = (
    "integrity_checked",  # sectors compared with what this kernel wrote
    "integrity_mismatches",  # sectors found different (each time)
    "integrity_repaired",  # sectors made right again from the journal
    "integrity_errors",  # reads / fsyncs failed with EIO because of a mismatch
    "integrity_evicted",  # CRCs dropped at INTEGRITY_MAX_SECTORS (no longer verified)
)
#: Counters of the block file layer's readahead (:mod:`kernel.blockfile`), kept in
#: :attr:`BlockDevice.counters` beside the driver's own.
READAHEAD_COUNTERS = (
    "readahead_hits",  # reads served (wholly or in part) from readahead data
    "readahead_bytes",  # bytes read ahead (never past the end of the device)
    "readahead_dropped",  # windows dropped unused: random access, an overlapping write
)
_CRC_MASK = 0xFFFFFFFF
_ZERO_SECTOR = bytes(SECTOR_SIZE)
_ZERO_CRC = zlib.crc32(_ZERO_SECTOR)
_WRITE_ZEROES = int(BlkType.WRITE_ZEROES)
#: A DISCARD / WRITE_ZEROES of more sectors than this is tracked as one range (not per
#: sector) and leaves its sectors unverified.
_BIG_RANGE = 4096
_DISCARD = int(BlkType.DISCARD)
#: What an expired request's ``fail`` gets at the reset (never delivered: its caller
#: was told ETIMEDOUT already).
_RELEASE = OSError(errno.ETIMEDOUT, "timed out")


def _arg_error(code: int, detail: str | None = None) -> OSError:
    """An error of the caller's own arguments (culprit "caller")."""
    return io_error(code, detail, culprit="caller")


def _check_into(into: Any, length: int) -> None:
    """A read's scatter list: at most :data:`MAX_INTO` ``(offset, view)`` pairs, each a
    writable 1-D byte view lying inside the read (EINVAL otherwise)."""
    if not isinstance(into, list) or len(into) > MAX_INTO:
        raise _arg_error(errno.EINVAL, f"into: a list of at most {MAX_INTO} (offset, view)")
    for item in into:
        if not isinstance(item, tuple) or len(item) != 2:
            raise _arg_error(errno.EINVAL, "into: entries are (offset, memoryview) pairs")
        rel, mv = item
        if (
            not isinstance(mv, memoryview)
            or mv.readonly
            or mv.ndim != 1
            or mv.itemsize != 1
            or not isinstance(rel, int)
            or rel < 0
            or rel + mv.nbytes > length
        ):
            raise _arg_error(errno.EINVAL, f"into: bad entry at offset {rel!r} of {length}")


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class WriteWatcher(Protocol):
    """Hears of every write-type request (write, DISCARD, WRITE_ZEROES) of a
    :class:`BlockDevice`, whoever submits it (``k.sys`` or the async API)."""

    def write_started(self, offset: int, length: int) -> None:
        """``[offset, offset + length)`` is about to be queued (submitting thread)."""
        ...

    def write_ended(self, offset: int, length: int, ok: bool) -> None:
        """That write finished (``ok``: acknowledged) or was refused; any thread."""
        ...


class _Parent:
    """Gathers the parts of one split submit() and calls back once. A read keeps each
    part's data (``parts[i]``) and joins them at the end: a part whose data lies in a
    DMA buffer of its own stays there as a view into shared memory (its buffer *held*
    until the join), so the bytes handed back are copied out of shared memory once."""

    __slots__ = ("callback", "remaining", "error", "parts", "result", "lock", "held", "free")

    def __init__(
        self,
        callback: Callback,
        parts: int,
        read: bool,
        result: Any,
        free: Callable[[int], None] | None = None,
    ):
        self.callback = callback
        self.remaining = parts
        self.error: OSError | None = None
        self.parts: list[bytes | memoryview] | None = [b""] * parts if read else None
        self.result = result
        self.lock = Lock()
        #: DMA buffers of finished parts whose data ``parts`` still views
        self.held: list[int] = []
        self.free = free  # gives a held buffer back to the DMA pool

    def hold(self, i: int, view: memoryview, dma: int) -> None:
        """Part ``i``'s data stays in its DMA buffer ``dma`` (``view``) until the join."""
        assert self.parts is not None
        self.parts[i] = view
        self.held.append(dma)

    def part_done(self, err: OSError | None) -> None:
        with self.lock:
            if err is not None and self.error is None:
                self.error = err
            self.remaining -= 1
            done = self.remaining == 0
        if done:
            parts, self.parts = self.parts, None
            data = b"".join(parts) if parts is not None and self.error is None else None
            del parts  # the views into shared memory, before their buffers go back
            held, self.held = self.held, []
            if self.free is not None:
                for dma in held:
                    self.free(dma)
            if self.error is not None:
                _deliver(self.callback, self.error)
            elif data is not None:
                _deliver(self.callback, data)
            else:
                _deliver(self.callback, self.result)


def _ignore(result: Any) -> None:
    """The callback of a journal replay (its caller was answered long ago)."""


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
        "expired",
        "replay",
        "jseq",
        "wave",
        "igen",
        "tracked",
        "reread",
        "fix",
        "urgent",
        "hold",
        "checked",
        "verify",
        "dest",
        "hctx",
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
        self.expired = False  # the caller was told it timed out; buffers still lent
        self.replay = False  # a journaled write sent again after a device restart
        self.jseq = 0  # FLUSH: the journal sequence number it covers
        self.wave = 0  # replay: its wave (replays that overlap go in later waves)
        # -- integrity mode (see BlockDevice's "integrity" section)
        self.igen = 0  # IN: the write generation when submitted (CRCs newer are skipped)
        self.tracked = False  # a write counted in the in-flight map (CRCs of its sectors)
        self.reread = False  # IN: already read again after a mismatch
        self.fix = False  # a rewrite of the journal's data (not journaled again)
        self.urgent = False  # an integrity request: dispatched ahead, past the barrier
        self.hold = False  # holds the integrity barrier until it finishes
        self.checked = False  # FLUSH: the journal's read-back is done (or not needed)
        self.verify = False  # IN: an fsync's read-back (its callback compares the data)
        #: IN with ``into=``: ``(offset in this request, caller's view)`` pairs the data
        #: is copied to straight from shared memory (the callback gets the byte count)
        self.dest: list[tuple[int, memoryview]] | None = None
        self.hctx = 0  # the request queue it goes to (its slot belongs to that queue)

    def complete(self, used_len: int) -> None:
        """The device returned this chain (interrupt thread)."""
        self.dev._complete(self, used_len)

    def fail(self, error: OSError) -> None:
        """The request will never complete."""
        self.dev._finish(self, error, None)

    def expire(self, error: OSError) -> None:
        """The request timed out: the caller gets ``error`` now; the slot and data
        buffer stay lent to the device until the reset hands the chain back."""
        if self.expired:
            return
        self.expired = True
        if self.parent is not None:
            self.parent.part_done(error)
        elif self.callback is not None:
            _deliver(self.callback, error)


class _Check:
    """One fsync's read-back of the journal (integrity mode): ``expect`` maps each
    journaled sector to the bytes the device must hold (None: zeros); rounds of
    read-back, then rewrite of what differs, until all match or the rounds run out."""

    __slots__ = ("flush", "expect", "left", "bad", "round", "repaired", "todo")

    def __init__(self, flush: _Req, expect: dict[int, memoryview | None]) -> None:
        self.flush = flush
        self.expect = expect
        self.left = 0  # requests of the current step not yet finished
        self.bad: list[int] = []  # sectors found different in this step
        self.round = 0  # rewrite rounds so far
        self.repaired: set[int] = set()  # sectors rewritten
        self.todo: list[int] = []  # sectors the next read-back covers


class _Hctx:
    """One request queue of a :class:`BlockDevice` (blk-mq's hardware context): its
    virtqueue, its software queue (FIFO) and the request slots of its ring (one per
    entry, with their inline pages). Everything here is guarded by ``queue.lock``."""

    __slots__ = ("index", "queue", "pending", "slots", "inline")

    def __init__(self, index: int, queue: KernelQueue) -> None:
        self.index = index
        self.queue = queue
        self.pending: deque[_Req] = deque()
        self.slots: deque[int] = deque()
        self.inline: dict[int, int] = {}


class BlockDevice:
    """A virtio-blk disk as the kernel's block layer sees it.

    Attributes: ``name`` (``"vda"``), ``size`` (bytes), ``readonly``, ``features``
    (negotiated feature names), ``config`` (:class:`BlkConfig`), ``block_size`` (the
    device's preferred block size; requests are addressed in 512-byte sectors),
    ``max_request_bytes`` (largest single request; bigger I/O is split), ``queues``
    (its request queues, :class:`~kernel.transport.KernelQueue`, each with ``.stats``;
    more than one with VIRTIO_BLK_F_MQ) and ``queue`` (the first).

    Offsets and lengths given to the block layer must be multiples of 512 (the
    syscall layer does read-modify-write for anything else) and lie inside the disk.
    """

    def __init__(
        self,
        transport: VirtioTransport,
        queue: KernelQueue | Sequence[KernelQueue],
        config: BlkConfig,
    ):
        self.transport = transport
        self.name = transport.name
        queues = [queue] if isinstance(queue, KernelQueue) else list(queue)
        if not 1 <= len(queues) <= MAX_QUEUES:
            raise ValueError(f"{transport.name}: {len(queues)} request queues (1..{MAX_QUEUES})")
        #: The request queues (one per virtqueue; a thread submits to one of them).
        self.queues: list[KernelQueue] = queues
        self.queue = queues[0]
        self._hctx = [_Hctx(i, q) for i, q in enumerate(queues)]
        self._queue_map = ThreadQueueMap(len(queues))  # thread -> its request queue
        self.config = config
        self.feature_bits = transport.features
        self.features = transport.feature_names
        self.size = config.capacity * SECTOR_SIZE
        self.readonly = transport.has_feature(BlkF.RO) or bool(
            getattr(transport.spec, "readonly", False)
        )
        bs = config.blk_size
        # §5.2.4 blk_size is only a hint: take it when it is a power of two in
        # 512..64 KiB (as Linux, which falls back to 512 otherwise); a device claiming a
        # huge block must not make every read-modify-write huge
        self.block_size = (
            bs
            if transport.has_feature(BlkF.BLK_SIZE)
            and SECTOR_SIZE <= bs <= MAX_BLOCK_SIZE
            and not bs & (bs - 1)
            else SECTOR_SIZE
        )
        self.has_flush = transport.has_feature(BlkF.FLUSH)
        self.has_discard = transport.has_feature(BlkF.DISCARD)
        self.has_write_zeroes = transport.has_feature(BlkF.WRITE_ZEROES)
        self._indirect = transport.has_feature(F.INDIRECT_DESC)
        n = min(q.size for q in queues)
        # -- request geometry
        seg_max = config.seg_max if transport.has_feature(BlkF.SEG_MAX) and config.seg_max else 0
        # §2.7.5.3.1: no chain longer than the queue size, an indirect table included
        # (header + data + status)
        max_segs = min(seg_max or MAX_SEGMENTS, MAX_SEGMENTS, n - 2)
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
        # -- slots: one per ring entry of every queue, carved from the DMA pool once
        assert transport.memory is not None and transport.dma is not None
        self._buf = transport.memory.buf
        self._dma = transport.dma
        self._slot_bytes = _align(_S_TABLE + 16 * (max_segs + 2), 64)
        entries = sum(q.size for q in queues)
        # inline data: one page per slot when the pool can spare it (an eighth at most)
        inline = INLINE_BYTES * entries <= transport.dma_size // 8
        for h in self._hctx:
            qn = h.queue.size
            area = transport.dma.alloc(self._slot_bytes * qn)
            if area is None:
                raise ValueError(f"{self.name}: DMA pool too small for {entries} request slots")
            h.slots.extend(area + i * self._slot_bytes for i in range(qn))
            pages = transport.dma.alloc(INLINE_BYTES * qn) if inline else None
            if pages is not None:
                h.inline = {
                    area + i * self._slot_bytes: pages + i * INLINE_BYTES for i in range(qn)
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
        self._rejected: deque[tuple[_Req, OSError]] = deque()
        # -- the write journal (volatile write cache only; interrupt thread): acknowledged
        # writes a completed FLUSH does not cover yet, replayed after a device restart
        self._journal: deque[tuple[int, int, int, int, bytes | memoryview | None, bool, int]] = (
            deque()
        )
        self._jseq = 0  # acknowledged writes so far
        self._jbytes = 0
        self._jlost_upto = -1  # the journal overflowed: writes up to this seq are not in it
        self._flush_error = False  # acknowledged writes may be lost: fail the next FLUSH
        self._replaying = 0  # journal replays in flight: nothing else is dispatched
        self._wave = 0  # the replay wave being dispatched
        self._wave_left: list[int] = []  # replays not yet completed, per wave
        #: Journal counters: ``journal_replayed`` writes sent again after a restart,
        #: ``journal_overflows``, ``flush_errors_reported``.
        #: Integrity counters (:data:`INTEGRITY_COUNTERS`, zero without integrity).
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "journal_replayed",
                "journal_overflows",
                "flush_errors_reported",
                *INTEGRITY_COUNTERS,
                *READAHEAD_COUNTERS,
            ),
            0,
        )
        self._watchers: list[WriteWatcher] = []  # copied on change: read without a lock
        self._jlock = Lock()  # guards the journal and the replay waves (completions)
        # -- integrity mode (opt-in: the spec's ``integrity``)
        #: Whether reads are verified against CRCs of what was written and fsync reads
        #: the journal back before its FLUSH (``kernel.Blk(..., integrity=True)``).
        self.integrity = bool(getattr(transport.spec, "integrity", False))
        self._crc: OrderedDict[int, int] = OrderedDict()  # sector -> gen << 32 | crc32
        self._wbusy: dict[int, int] = {}  # sector -> writes in flight to it
        self._wbig: list[tuple[int, int]] = []  # [first, end) of big ranges in flight
        self._contested: set[int] = set()  # sectors two writes were in flight to at once
        self._igen = 0  # write generation: grows with every finished write
        self._ilock = Lock()  # guards the four above and _barriers
        self._barriers = 0  # integrity work in progress: only urgent requests dispatch
        # integrity requests, ahead of the rest; always on the first queue (its lock)
        self._urgent: deque[_Req] = deque()
        timeout = getattr(transport.spec, "request_timeout", None)
        for h in self._hctx:
            q = h.queue
            q.refill = self._refill_hook(h)
            q.on_failed = self._failed_hook(h)
            q.on_reset = self._reset_hook(h)
            q.watch = True  # look for lost interrupts while requests are in flight
            q.timeout_s = timeout
        transport.on_release(self._release)

    # ------------------------------------------------------------------ info
    @property
    def failed(self) -> OSError | None:
        """The device's failure (every request then fails with EIO), or None."""
        return self.queue.failed

    @property
    def pending(self) -> int:
        """Requests waiting in the software queues for room in their ring."""
        return sum(len(h.pending) for h in self._hctx)

    def current_queue(self) -> int:
        """The index of the request queue the calling thread submits to: each thread
        gets one the first time it submits, round robin, and keeps it (as Linux maps
        each CPU to one hardware context; :class:`kernel.queue_map.ThreadQueueMap`)."""
        return self._queue_map.current()

    def _refill_hook(self, h: _Hctx) -> Callable[[], None]:
        return lambda: self._refill(h)

    def _failed_hook(self, h: _Hctx) -> Callable[[OSError], None]:
        return lambda error: self._on_failed(h, error)

    def _reset_hook(self, h: _Hctx) -> Callable[[list[Any], OSError | None], None]:
        return lambda tokens, error: self._on_reset(h, tokens, error)

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
        with self._all_queues():
            self.segment_bytes = nbytes
            self.max_request_bytes = min(self.max_request_bytes, self.max_segments * nbytes)

    @contextmanager
    def _all_queues(self) -> Iterator[None]:
        """Hold every queue's lock (taken in queue order; nothing else holds two)."""
        locks = [h.queue.lock for h in self._hctx]
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    # ------------------------------------------------------------------ submission
    def submit(
        self,
        op: str | int,
        offset: int,
        length_or_data: int | bytes | bytearray | memoryview | None,
        callback: Callback,
        *,
        kick: bool = True,
        into: list[tuple[int, memoryview]] | None = None,
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

        ``into`` (reads only): a scatter list of ``(offset in the read, writable byte
        view)`` pairs; the data is copied straight from shared memory into the views
        (no intermediate bytes; bytes of the read no view covers are dropped) and the
        callback gets the byte count instead of bytes. Keep the views alive and
        untouched until the callback.

        Write watchers (:meth:`add_write_watcher`) hear of every write, DISCARD and
        WRITE_ZEROES as it is queued and again once it finished.
        """
        op = _OP_BY_TYPE.get(op, op) if isinstance(op, int) else op  # type: ignore[call-overload]
        reqs = self._build(op, offset, length_or_data, callback, into)
        if reqs is None:
            return
        hctx = self._hctx
        nq = len(hctx)
        if nq == 1:  # the one queue: the short way (no grouping)
            h = hctx[0]
            q = h.queue
            if self.integrity:
                self._track_submit(reqs)
            need = False
            with q.lock:
                e = q.failed
                if e is None:
                    if self._watchers and op in _WRITE_OPS:
                        self._watch_locked(reqs)
                    h.pending.extend(reqs)
                    need = self._dispatch_locked(h, kick and not q.completing, kick)
            if e is not None:
                for r in reqs:
                    if r.tracked:
                        self._untrack(r, False)
                raise copy_error(e)  # refused outright (see below)
            if self._rejected:
                self._fail_rejected()
            if need:
                q.notify()
            return
        # the submitting thread's queue; the parts of a split request spread over the
        # following ones; an integrity FLUSH starts its read-back from queue 0
        first = 0 if self.integrity and op == "flush" else self.current_queue()
        if len(reqs) == 1:
            reqs[0].hctx = first
            groups = [(hctx[first], reqs)]
        else:
            by: dict[int, list[_Req]] = {}
            for i, r in enumerate(reqs):
                r.hctx = (first + i) % nq
                by.setdefault(r.hctx, []).append(r)
            groups = [(hctx[i], rs) for i, rs in by.items()]
        if self.integrity:
            self._track_submit(reqs)
        writes = op in _WRITE_OPS
        notify: list[KernelQueue] = []
        late: list[_Req] = []
        late_err: OSError | None = None
        err: OSError | None = None
        for n, (h, rs) in enumerate(groups):
            q = h.queue
            with q.lock:
                e = q.failed
                if e is None:
                    # announced under the first queue's lock (a watcher being added
                    # holds every queue's lock): announced, or queued before it came
                    if not n and writes and self._watchers:
                        self._watch_locked(reqs)
                    h.pending.extend(rs)
                    if self._dispatch_locked(h, kick and not q.completing, kick):
                        notify.append(q)
            if e is not None:
                if not n:
                    err = e
                    break
                late += rs  # parts of a request already under way: it fails
                late_err = e
        if err is not None:
            for r in reqs:
                if r.tracked:
                    self._untrack(r, False)
            # Refused outright (never via the callback: a callback that resubmits on
            # error would otherwise recurse without end once the device is gone).
            raise copy_error(err)
        for r in late:
            r.fail(copy_error(late_err))  # type: ignore[arg-type]
        if self._rejected:
            self._fail_rejected()
        for q in notify:
            q.notify()

    def kick(self) -> None:
        """Publish every chain queued with ``kick=False`` (one doorbell per queue at
        most)."""
        for h in self._hctx:
            h.queue.kick()

    def _check_range(self, offset: int, length: int) -> None:
        if not isinstance(offset, int) or not isinstance(length, int):
            raise _arg_error(errno.EINVAL, "offset and length must be integers")
        if offset < 0 or length < 0:
            raise _arg_error(errno.EINVAL, f"negative offset {offset} or length {length}")
        if offset % SECTOR_SIZE or length % SECTOR_SIZE:
            raise _arg_error(
                errno.EINVAL, f"offset {offset} / length {length} not 512-byte aligned"
            )
        if offset + length > self.size:
            raise _arg_error(
                errno.ENXIO, f"[{offset}, +{length}) runs past the end of {self.name} ({self.size})"
            )

    def add_write_watcher(self, watcher: WriteWatcher) -> None:
        """Tell ``watcher`` of every write-type request queued from now on (see
        :class:`WriteWatcher`; the block file layer's readahead keeps coherent so).
        Writes queued before are not announced: wait until :meth:`idle` to be sure
        none is left."""
        with self._all_queues():
            if watcher not in self._watchers:
                self._watchers = [*self._watchers, watcher]

    def remove_write_watcher(self, watcher: WriteWatcher) -> None:
        """Stop telling ``watcher`` (unknown watchers are ignored)."""
        with self._all_queues():
            self._watchers = [w for w in self._watchers if w is not watcher]

    def _watch_locked(self, reqs: list[_Req]) -> None:
        """Announce a write-type op about to be queued to the watchers (its first
        queue's lock held: a watcher added later sees it in flight) and make its
        completion tell them too."""
        watchers = self._watchers
        off = reqs[0].sector * SECTOR_SIZE
        n = sum(r.nbytes or r.nsect * SECTOR_SIZE for r in reqs)
        for w in watchers:
            w.write_started(off, n)
        holder: _Req | _Parent = reqs[0].parent or reqs[0]
        callback = holder.callback
        assert callback is not None

        def ended(result: Any) -> None:
            ok = not isinstance(result, BaseException)
            for w in watchers:
                w.write_ended(off, n, ok)
            callback(result)

        holder.callback = ended

    def idle(self) -> bool:
        """Whether no request is queued or in flight right now (the device owes
        nothing, timed-out requests included)."""
        for h in self._hctx:
            q = h.queue
            with q.lock:
                if h.pending or (not h.index and self._urgent) or q.dq.in_flight:
                    return False
        return True

    def _build(
        self,
        op: str,
        offset: int,
        arg: Any,
        callback: Callback,
        into: list[tuple[int, memoryview]] | None = None,
    ) -> list[_Req] | None:
        if op == "flush":
            if not self.has_flush:
                _deliver(callback, 0)  # no volatile cache to flush
                return None
            req = _Req(self, BlkType.FLUSH, 0, 0, callback, None)
            req.jseq = self._jseq  # it covers every write acknowledged so far
            return [req]
        if op == "read":
            length = arg
            self._check_range(offset, length)
            if into is not None:
                _check_into(into, length)
            if length == 0:
                _deliver(callback, b"" if into is None else 0)
                return None
            return self._split(BlkType.IN, offset, length, callback, None, False, into)
        if op in ("write", "discard", "write_zeroes") and self.readonly:
            raise _arg_error(errno.EROFS, f"{self.name} is read-only")
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
                    raise _arg_error(errno.EOPNOTSUPP, f"{self.name} does not support discard")
                return self._split_sectors(BlkType.DISCARD, offset, length, callback)
            if not self.has_write_zeroes:
                # emulate with plain writes of zeros, as Linux does
                return self._split(BlkType.OUT, offset, length, callback, None, True)
            return self._split_sectors(BlkType.WRITE_ZEROES, offset, length, callback)
        raise _arg_error(errno.EINVAL, f"unknown block operation {op!r} (one of {OPS})")

    def _split(
        self,
        rtype: int,
        offset: int,
        length: int,
        callback: Callback,
        src: memoryview | None,
        zero: bool,
        into: list[tuple[int, memoryview]] | None = None,
    ) -> list[_Req]:
        step = self.max_request_bytes
        sector = offset // SECTOR_SIZE
        if length <= step:
            r = _Req(self, rtype, sector, length, callback, None, 0, src, zero)
            r.dest = list(into) if into is not None else None
            return [r]
        # All parts go into the software queue at once (dispatched together as far as
        # ring and DMA pool allow), so the device works on one while the interrupt
        # thread copies another out.
        nparts = -(-length // step)
        read = rtype == _IN and into is None
        parent = _Parent(callback, nparts, read, length, self._dma.free if read else None)
        out = []
        for i, pos in enumerate(range(0, length, step)):
            n = min(step, length - pos)
            part_src = src[pos : pos + n] if src is not None else None
            r = _Req(self, rtype, sector + pos // SECTOR_SIZE, n, None, parent, i, part_src, zero)
            if into is not None:  # the views (pieces of them) this part's bytes go to
                dest: list[tuple[int, memoryview]] = []
                for rel, mv in into:  # bounded: MAX_INTO entries
                    a, b = max(rel, pos), min(rel + len(mv), pos + n)
                    if a < b:
                        dest.append((a - pos, mv[a - rel : b - rel]))
                r.dest = dest
            out.append(r)
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
    def _dispatch_locked(self, h: _Hctx, publish: bool, eager: bool = False) -> bool:
        """Move requests from queue ``h``'s software queue into its ring while they fit
        (FIFO). Caller holds ``h.queue.lock``. Returns True if the doorbell must be
        rung. Requests that cannot be added at all are parked in ``_rejected`` and
        failed by :meth:`_fail_rejected` once the lock is released. Journal replays
        and integrity requests go through queue 0 only; while they are up, the other
        queues dispatch nothing. ``publish``: publish what was added (else the
        queue's ``refill`` will); ``eager``: publish each request of at least
        :data:`EARLY_PUBLISH_BYTES` as soon as it is added, even inside a batch of
        completions -- the device (polling) starts on it while the next one's data is
        copied in."""
        pending = h.pending
        q = h.queue
        dq = q.dq
        if dq.broken is not None or q.paused:
            return False  # the interrupt thread is about to reset / fail the device
        slots = h.slots
        buf = self._buf
        seg_bytes = self.segment_bytes
        indirect = self._indirect
        inline = h.inline
        # the ring's own add unless the queue is traced (then its traced copy)
        add = q.add if q.tracer is not None else dq.add
        first = not h.index
        urgent = self._urgent
        early = False  # a large request was published at once (see below)
        while True:
            # journal replays first, then integrity requests; while integrity work is in
            # progress (a barrier) nothing else goes
            if self._replaying:
                if not first:
                    break
                src = pending
            elif urgent and first:
                src = urgent
            elif self._barriers or urgent:
                break
            else:
                src = pending
            if not src:
                break
            r = src[0]
            if self._replaying and (not r.replay or r.wave > self._wave):
                break  # journaled writes first, wave by wave: later writes still win
            if (
                r.rtype == _FLUSH
                and self.integrity
                and not r.checked
                and not self._replaying
                and first
            ):
                if self._check_start(r):
                    continue  # the journal's read-back goes first, behind a barrier
            resubmit = r.slot >= 0  # back from a reset: slot and data are in place
            if not resubmit and not slots:
                break
            n = r.nbytes
            if n:
                nseg = 1 if n <= seg_bytes else -(-n // seg_bytes)
            else:
                nseg = 1 if r.nsect else 0
            use_table = indirect and nseg > 1
            if dq.num_free < (1 if use_table else nseg + 2):
                break
            slot = r.slot if resubmit else slots[0]
            if n and not resubmit:
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
            if not resubmit:
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
            src.popleft()
            try:
                add(readable, writable, r, indirect_table=slot + _S_TABLE if use_table else None)
            except VirtioError as e:  # broken queue or a driver bug: fail this one request
                err = io_error(errno.EIO, f"{self.name}: {e}", culprit="device-broke-ring")
                self._rejected.append((r, err))
                if dq.broken is not None:
                    break
                continue
            if (publish or eager) and n >= EARLY_PUBLISH_BYTES:
                # a large request is published as soon as it is in the ring: a device
                # that polls starts on it while the next one's data is copied in
                early = q.publish() or early
        if dq.broken is not None:
            return False
        return (q.publish() if publish else False) or early

    def _fail_rejected(self) -> None:
        """Fail the requests :meth:`_dispatch_locked` could not add (no lock held)."""
        while self._rejected:
            r, err = self._rejected.popleft()
            r.fail(err)

    def _refill(self, h: _Hctx | None = None) -> None:
        """Dispatch into queue ``h`` (after a batch of its completions), then into every
        other queue with requests waiting: the DMA pool is shared, and replays and
        integrity work on queue 0 hold the others back (their end lets them go)."""
        hctx = self._hctx
        first = h if h is not None else hctx[0]
        for g in (first, *[g for g in hctx if g is not first]):
            if g is not first and not g.pending and (g.index or not self._urgent):
                continue
            q = g.queue
            with q.lock:
                if q.failed is not None:
                    return
                need = self._dispatch_locked(g, True)
            if self._rejected:
                self._fail_rejected()
            if need:
                q.notify()

    def _on_failed(self, h: _Hctx, error: OSError) -> None:
        q = h.queue
        with q.lock:
            reqs = list(h.pending)
            h.pending.clear()
            if not h.index:
                reqs = list(self._urgent) + reqs
                self._urgent.clear()
        for r in reqs:
            r.fail(copy_error(error))

    def _on_reset(self, h: _Hctx, tokens: list[Any], error: OSError | None) -> None:
        """The device was reset or restarted (interrupt thread; the new ring of queue
        ``h`` is live, ``refill`` runs next; the transport calls this for every queue,
        queue 0 first). Requests that were in flight go back to the front of their
        software queue with their slot and data buffer (a restart after a death or a
        timeout: their callers see success), or fail with ``error`` (the device broke
        the ring); one whose caller was told it timed out only gives its buffers back.
        The journal is replayed through queue 0 (built at its call), ahead of
        everything on every queue."""
        again: list[_Req] = []
        urgent: list[_Req] = []
        for r in tokens:
            if r.replay:  # a replay of an earlier reset: the whole journal goes again
                r.replay = False
                r.fail(_RELEASE)
            elif r.expired or error is not None:
                r.fail(copy_error(error) if error is not None else _RELEASE)
            elif r.urgent:
                urgent.append(r)
            else:
                if r.rtype == _FLUSH:
                    r.checked = False  # read the journal back again after the replays
                again.append(r)
        q = h.queue
        with q.lock:
            pending = h.pending
            if h.index:  # the journal and integrity work are queue 0's
                pending.extendleft(reversed(again))
                return
            self._urgent.extendleft(reversed(urgent))
            if self.integrity:
                for r in pending:
                    if r.rtype == _FLUSH:
                        r.checked = False  # the replays below: read the journal back again
            if self._replaying:  # replays not yet dispatched: replaced below
                keep = [r for r in pending if not r.replay]
                pending.clear()
                pending.extend(keep)
            replays = self._replays()
            pending.extendleft(reversed(replays + again))

    def _replays(self) -> list[_Req]:
        """The journal as requests (acknowledgement order): a restarted device, whose
        volatile cache died with the old one, gets them again before anything else. A
        device may complete the chains of one batch in any order, so replays that
        touch the same 4 KiB (and every DISCARD / WRITE_ZEROES) go in later *waves*;
        a wave is dispatched once the one before it completed. A journal that
        overflowed cannot be replayed whole: the next FLUSH reports it."""
        with self._jlock:
            return self._replays_locked()

    def _replays_locked(self) -> list[_Req]:
        if self._jlost_upto >= 0:
            self._flush_error = True
        out: list[_Req] = []
        waves: list[int] = []
        chunks: set[int] = set()
        count = 0
        prev_big = False
        for _seq, rtype, sector, nbytes, data, zero, nsect in self._journal:
            big = rtype != _OUT  # a sector range of any size: a wave of its own
            span = range(0) if big else range(sector // 8, (sector + nbytes // 512 - 1) // 8 + 1)
            if count and (big or prev_big or any(c in chunks for c in span)):
                waves.append(count)
                count = 0
                chunks = set()
            chunks.update(span)
            prev_big = big
            src = memoryview(data) if data is not None else None
            r = _Req(self, rtype, sector, nbytes, _ignore, None, 0, src, zero, nsect)
            r.replay = True
            r.wave = len(waves)
            out.append(r)
            count += 1
        if count:
            waves.append(count)
        self._replaying = len(out)
        self._wave = 0
        self._wave_left = waves
        self.counters["journal_replayed"] += len(out)
        return out

    def _journal_add(self, r: _Req) -> None:
        """An acknowledged write (interrupt thread): remember it until a FLUSH covers it."""
        with self._jlock:
            self._journal_add_locked(r)

    def _journal_add_locked(self, r: _Req) -> None:
        self._jseq += 1
        src = r.src
        data: bytes | memoryview | None = None
        if src is not None and not r.zero:
            # immutable caller data is kept as it is (no copy); anything else is copied
            data = src if type(src.obj) is bytes else bytes(src)
        n = len(data) if data is not None else 0
        if self._jbytes + n > JOURNAL_MAX_BYTES:
            self._journal.clear()
            self._jbytes = 0
            self._jlost_upto = self._jseq
            self.counters["journal_overflows"] += 1
            return
        self._journal.append((self._jseq, r.rtype, r.sector, r.nbytes, data, r.zero, r.nsect))
        self._jbytes += n

    def _journal_trim(self, upto: int) -> None:
        """A FLUSH covering writes acknowledged up to ``upto`` completed."""
        with self._jlock:
            self._journal_trim_locked(upto)

    def _journal_trim_locked(self, upto: int) -> None:
        j = self._journal
        while j and j[0][0] <= upto:
            _s, _t, _sec, _n, data, _z, _ns = j.popleft()
            self._jbytes -= len(data) if data is not None else 0
        if 0 <= self._jlost_upto <= upto:
            self._jlost_upto = -1

    def _release(self) -> None:
        self._buf = None  # type: ignore[assignment]
        self._journal.clear()
        self._jbytes = 0

    # ------------------------------------------------------------------ integrity
    # Everything of the integrity mode is here; see the module docstring. The CRC map
    # holds, per sector, ``gen << 32 | crc32`` of the data of the last acknowledged
    # write; a write being submitted removes its sectors' entries (their content is in
    # flux) and counts itself in ``_wbusy``; its acknowledgement stores the new CRCs with
    # a new generation. A read compares only entries at most as new as the generation at
    # its submission (a write acknowledged while the read was on its way may or may not
    # be in what it returns).

    def _track_submit(self, reqs: list[_Req]) -> None:
        """Requests being submitted: a read notes the write generation, a write marks
        its sectors as being written."""
        with self._ilock:
            gen = self._igen
            for r in reqs:
                if r.rtype == _IN:
                    r.igen = gen
                elif r.rtype != _FLUSH:
                    self._track_locked(r)

    def _track_locked(self, r: _Req) -> None:
        """A write (OUT, WRITE_ZEROES, DISCARD) goes out: its sectors' CRCs are void,
        and a second write in flight to a sector makes the outcome unknown (no CRC)."""
        r.tracked = True
        first = r.sector
        n = r.nbytes // SECTOR_SIZE if r.nbytes else r.nsect
        crc = self._crc
        if n > _BIG_RANGE:
            end = first + n
            for s in [s for s in crc if first <= s < end]:  # bounded: INTEGRITY_MAX_SECTORS
                del crc[s]
            self._wbig.append((first, end))
            return
        busy = self._wbusy
        for s in range(first, first + n):
            crc.pop(s, None)
            b = busy.get(s, 0)
            if b:
                self._contested.add(s)
            busy[s] = b + 1

    def _busy(self, s: int) -> bool:
        """Whether a write to sector ``s`` is in flight (``_ilock`` held)."""
        return s in self._wbusy or any(a <= s < b for a, b in self._wbig)

    def _untrack(self, r: _Req, ok: bool) -> None:
        """A tracked write finished; acknowledged (``ok``), its sectors' CRCs become
        those of its data -- unless another write to them was in flight meanwhile."""
        first = r.sector
        n = r.nbytes // SECTOR_SIZE if r.nbytes else r.nsect
        src = r.src if ok and r.rtype == _OUT and not r.zero else None
        zero = ok and (r.zero or r.rtype == _WRITE_ZEROES)
        evicted = 0
        with self._ilock:
            if not r.tracked:
                return
            r.tracked = False
            self._igen += 1
            if n > _BIG_RANGE:
                self._wbig.remove((first, first + n))
                return  # a big range stays unverified
            stamp = self._igen << 32
            crc = self._crc
            busy = self._wbusy
            contested = self._contested
            for i in range(n):
                s = first + i
                b = busy.get(s, 1) - 1
                if b:
                    busy[s] = b
                    continue
                busy.pop(s, None)
                if s in contested:
                    contested.discard(s)
                elif src is not None:
                    crc[s] = stamp | zlib.crc32(src[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE])
                elif zero:
                    crc[s] = stamp | _ZERO_CRC
            limit = INTEGRITY_MAX_SECTORS
            while len(crc) > limit:
                crc.popitem(last=False)  # the oldest: no longer verified
                evicted += 1
        if evicted:
            self.counters["integrity_evicted"] += evicted

    def _bad_sectors(self, r: _Req, data: bytes) -> list[tuple[int, int]]:
        """The sectors of read ``r`` whose data differs from its CRC: ``(index in the
        request, the CRC expected)``."""
        mv = memoryview(data)
        limit = (r.igen + 1) << 32  # entries of generation <= r.igen
        bad: list[tuple[int, int]] = []
        checked = 0
        with self._ilock:
            crc = self._crc
            for i in range(r.nbytes // SECTOR_SIZE):
                e = crc.get(r.sector + i)
                if e is None or e >= limit:
                    continue
                checked += 1
                want = e & _CRC_MASK
                if zlib.crc32(mv[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]) != want:
                    bad.append((i, want))
        self.counters["integrity_checked"] += checked
        self.counters["integrity_mismatches"] += len(bad)
        return bad

    def _read_again(self, r: _Req) -> None:
        """Send read ``r`` again (its slot and buffer are in place; ``refill`` runs
        after the batch of completions)."""
        h = self._hctx[r.hctx]
        with h.queue.lock:
            err = h.queue.failed
            if err is None:
                h.pending.appendleft(r)
                return
        self._finish(r, copy_error(err), None)

    def _journal_sectors(self, sectors: list[int]) -> dict[int, bytes] | None:
        """The journal's newest bytes of each of ``sectors``, or None when it does not
        hold them all (flushed since, or discarded)."""
        want = set(sectors)
        found: dict[int, bytes] = {}
        for _seq, rtype, sector, nbytes, data, _zero, nsect in reversed(list(self._journal)):
            end = sector + (nbytes // SECTOR_SIZE if rtype == _OUT else nsect)
            for s in [s for s in want if sector <= s < end]:
                if rtype == _DISCARD:
                    return None  # its content is the device's choice
                if data is None:
                    found[s] = _ZERO_SECTOR
                else:
                    o = (s - sector) * SECTOR_SIZE
                    found[s] = bytes(data[o : o + SECTOR_SIZE])
                want.discard(s)
            if not want:
                return found
        return None

    def _read_repair(self, r: _Req, data: bytes, bad: list[tuple[int, int]]) -> bytes | None:
        """A read still wrong after a second read: its data with the bad sectors taken
        from the journal (and those rewritten on the device, ahead of anything else),
        or None when the journal does not hold what was acknowledged."""
        found = self._journal_sectors([r.sector + i for i, _ in bad])
        if found is None:
            return None
        patched = bytearray(data)
        fix: list[int] = []
        with self._ilock:
            for i, want in bad:
                s = r.sector + i
                good = found[s]
                if zlib.crc32(good) != want:
                    return None
                patched[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE] = good
                e = self._crc.get(s)
                if e is not None and e & _CRC_MASK == want:  # no newer write on its way
                    fix.append(s)
            reqs = self._fix_writes_locked(fix, found.__getitem__, _ignore, hold=True)
        self.counters["integrity_repaired"] += len(bad)
        self._inject(reqs)
        return bytes(patched)

    def _runs(self, sectors: list[int]) -> list[tuple[int, int]]:
        """Sorted ``sectors`` as ``(first, count)`` runs of at most one request."""
        most = self.max_request_bytes // SECTOR_SIZE
        runs: list[tuple[int, int]] = []
        for s in sectors:
            if runs and runs[-1][0] + runs[-1][1] == s and runs[-1][1] < most:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((s, 1))
        return runs

    def _fix_writes_locked(
        self,
        sectors: list[int],
        data_of: Callable[[int], bytes | memoryview | None],
        callback: Callback,
        hold: bool,
    ) -> list[_Req]:
        """Writes of the journal's data to ``sectors`` (urgent; ``hold``: each keeps
        the barrier up until it finished). ``_ilock`` held."""
        out: list[_Req] = []
        for first, n in self._runs(sorted(sectors)):
            parts = [data_of(s) for s in range(first, first + n)]
            blob = b"".join(_ZERO_SECTOR if p is None else p for p in parts)
            r = _Req(self, _OUT, first, len(blob), callback, None, 0, memoryview(blob))
            r.fix = r.urgent = True
            r.hold = hold
            if hold:
                self._barriers += 1
            self._track_locked(r)
            out.append(r)
        return out

    def _inject(self, reqs: list[_Req]) -> None:
        """Queue integrity requests ahead of everything else and dispatch."""
        if not reqs:
            return
        h = self._hctx[0]
        q = h.queue
        with q.lock:
            err = q.failed
            need = False
            if err is None:
                self._urgent.extend(reqs)
                need = self._dispatch_locked(h, not q.completing)
        if err is not None:
            for r in reqs:
                r.fail(copy_error(err))
            return
        if self._rejected:
            self._fail_rejected()
        if need:
            q.notify()

    def _journal_image(self) -> dict[int, memoryview | None]:
        """What the journal says the device holds: sector -> its bytes (None: zeros);
        discarded sectors and big zeroed ranges are left out."""
        expect: dict[int, memoryview | None] = {}
        for _seq, rtype, sector, nbytes, data, _zero, nsect in list(self._journal):
            if rtype == _OUT:
                mv = memoryview(data) if data is not None else None
                for i in range(nbytes // SECTOR_SIZE):
                    o = i * SECTOR_SIZE
                    expect[sector + i] = mv[o : o + SECTOR_SIZE] if mv is not None else None
            elif nsect > _BIG_RANGE or rtype == _DISCARD:
                end = sector + nsect
                if nsect > len(expect):
                    for s in [s for s in expect if sector <= s < end]:
                        del expect[s]
                else:
                    for s in range(sector, end):
                        expect.pop(s, None)
            else:
                for s in range(sector, sector + nsect):
                    expect[s] = None
        return expect

    def _check_start(self, f: _Req) -> bool:
        """FLUSH ``f`` reached the head of the queue (queue lock held): read back every
        journaled sector first, behind a barrier. False when there is nothing to check."""
        f.checked = True
        expect = self._journal_image()
        with self._ilock:
            for s in [s for s in expect if self._busy(s)]:
                del expect[s]  # a newer write is on its way: its own fsync checks it
            if not expect:
                return False
            self._barriers += 1
        chk = _Check(f, expect)
        self._urgent.extend(self._check_reads(chk, sorted(expect)))
        return True

    def _check_reads(self, chk: _Check, sectors: list[int]) -> list[_Req]:
        out: list[_Req] = []
        for first, n in self._runs(sectors):

            def cb(result: Any, first: int = first, n: int = n) -> None:
                self._check_read_done(chk, first, n, result)

            r = _Req(self, _IN, first, n * SECTOR_SIZE, cb, None)
            r.urgent = r.verify = True
            out.append(r)
        chk.left = len(out)
        return out

    def _check_read_done(self, chk: _Check, first: int, n: int, result: Any) -> None:
        bad: list[int] = []
        if not isinstance(result, bytes | bytearray) or len(result) != n * SECTOR_SIZE:
            bad = list(range(first, first + n))  # not read: rewrite it and look again
        else:
            mv = memoryview(result)
            for i in range(n):
                want = chk.expect[first + i]
                got = mv[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]
                if got != (_ZERO_SECTOR if want is None else want):
                    bad.append(first + i)
            self.counters["integrity_checked"] += n
        with self._ilock:
            chk.bad += bad
            chk.left -= 1
            if chk.left:
                return
            bad = sorted(chk.bad)
            chk.bad = []
        if not bad:
            self._check_end(chk, None)
            return
        self.counters["integrity_mismatches"] += len(bad)
        err = self.queue.failed
        if err is None and chk.round >= INTEGRITY_RETRIES:
            self.counters["integrity_errors"] += 1
            err = io_error(
                errno.EIO,
                f"{self.name}: {len(bad)} written sector(s) (first {bad[0]}) still differ "
                f"after {chk.round} rewrites (integrity)",
                culprit="device-error",
            )
        if err is not None:
            self._check_end(chk, err)
            return
        chk.round += 1
        chk.repaired.update(bad)
        chk.todo = bad

        def written(result: Any) -> None:
            with self._ilock:
                chk.left -= 1
                if chk.left:
                    return
            self._inject(self._check_reads(chk, chk.todo))

        with self._ilock:
            reqs = self._fix_writes_locked(bad, chk.expect.__getitem__, written, hold=False)
            chk.left = len(reqs)
        self._inject(reqs)

    def _check_end(self, chk: _Check, err: OSError | None) -> None:
        """The read-back is over: the FLUSH goes (or fails with ``err``)."""
        f = chk.flush
        h = self._hctx[f.hctx]
        found = False
        if err is not None:
            with h.queue.lock:
                try:
                    h.pending.remove(f)
                    found = True
                except ValueError:  # failed with the device already
                    pass
        else:
            self.counters["integrity_repaired"] += len(chk.repaired)
        with self._ilock:
            self._barriers -= 1
        if found:
            self._finish(f, copy_error(err) if err is not None else None, None)
        self._refill()

    # ------------------------------------------------------------------ completion
    def _complete(self, r: _Req, used_len: int) -> None:
        buf = self._buf
        status = buf[r.slot + _S_STATUS]
        err: OSError | None = None
        data: bytes | None = None
        if status != _OK:
            code = blk_status_errno(status)
            what = BlkStatus(status).name if status in (1, 2) else f"status {status:#x}"
            err = io_error(code, f"{self.name}: device answered {what}", culprit="device-error")
        elif r.rtype == _IN:
            n = r.nbytes
            if used_len <= n:
                err = io_error(
                    errno.EIO,
                    f"{self.name}: short read ({used_len} of {n + 1} bytes)",
                    culprit="device-error",
                )
            elif r.dest is not None and not self.integrity:
                if not r.expired:  # its caller may own the views again after ETIMEDOUT
                    src = buf[r.dma : r.dma + n]
                    for rel, mv in r.dest:  # the one copy out of shared memory
                        mv[:] = src[rel : rel + len(mv)]
            elif (
                r.parent is not None
                and r.owned
                and not self.integrity
                and r.parent.parts is not None
                and not r.expired
            ):
                # a part of a split read: its data stays put until the parent joins
                # the parts (the one copy out of shared memory); the parent frees it
                r.parent.hold(r.part_off, buf[r.dma : r.dma + n], r.dma)
                r.owned = False
                r.dma = -1
            else:
                dma = r.dma
                data = buf[dma : dma + n].tobytes()  # the one copy out of shared memory
                if self.integrity and not r.verify and not r.expired:
                    bad = self._bad_sectors(r, data)
                    if bad:
                        if not r.reread:  # once: a one-off corruption heals
                            r.reread = True
                            self._read_again(r)
                            return
                        fixed = self._read_repair(r, data, bad)
                        if fixed is None:
                            self.counters["integrity_errors"] += 1
                            err = io_error(
                                errno.EIO,
                                f"{self.name}: read of sector {r.sector + bad[0][0]} does not "
                                "match what was written (integrity)",
                                culprit="device-error",
                            )
                        data = fixed
                if r.dest is not None:
                    if data is not None and not r.expired:
                        got = memoryview(data)
                        for rel, mv in r.dest:
                            mv[:] = got[rel : rel + len(mv)]
                    data = None
                parent = r.parent
                if parent is not None and parent.parts is not None and data is not None:
                    parent.parts[r.part_off] = data
                    data = None
        elif used_len < 1:
            err = io_error(
                errno.EIO, f"{self.name}: request returned without a status", culprit="device-error"
            )
        elif r.rtype == _FLUSH:
            if self._flush_error and not r.replay:
                # errseq: acknowledged writes may have died with a device process
                self._flush_error = False
                self.counters["flush_errors_reported"] += 1
                err = io_error(
                    errno.EIO,
                    f"{self.name}: acknowledged writes may have been lost in a device restart",
                    culprit="device-gone",
                )
            else:
                self._journal_trim(r.jseq)
        elif self.has_flush and not r.replay and not r.fix:
            self._journal_add(r)  # acknowledged, not yet durable
        self._finish(r, err, data)

    def _finish(self, r: _Req, err: OSError | None, data: bytes | None) -> None:
        if r.replay:
            with self._jlock:
                self._replaying -= 1
                left = self._wave_left
                left[r.wave] -= 1
                while self._wave < len(left) and not left[self._wave]:
                    self._wave += 1  # the next wave may go
                if err is not None:
                    self._flush_error = True  # a journaled write did not land again
        if r.dma >= 0:
            if r.owned:
                self._dma.free(r.dma)
                r.owned = False
            r.dma = -1
        if r.slot >= 0:
            self._hctx[r.hctx].slots.append(r.slot)  # deque.append is thread-safe
            r.slot = -1
        if r.tracked:
            self._untrack(r, err is None)
        if r.hold:
            r.hold = False
            with self._ilock:
                self._barriers -= 1
        r.src = None
        if r.expired:
            return  # its caller was told already (ETIMEDOUT)
        if r.parent is not None:
            r.parent.part_done(err)
            return
        assert r.callback is not None
        if err is not None:
            _deliver(r.callback, err)
        elif r.rtype == _IN:
            _deliver(r.callback, data if r.dest is None else r.nbytes)
        elif r.rtype == _OUT:
            _deliver(r.callback, r.nbytes)
        else:
            _deliver(r.callback, 0)

    # ------------------------------------------------------------------ sync API
    def _wait(self, op: str, offset: int, arg: Any, **kw: Any) -> Any:
        if self.transport.in_interrupt():
            raise _arg_error(
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

        self.submit(op, offset, arg, cb, **kw)
        done.acquire()
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (both multiples of 512); blocks."""
        return self._wait("read", offset, length)  # type: ignore[no-any-return]

    def read_into(self, offset: int, length: int, into: list[tuple[int, memoryview]]) -> int:
        """Read ``length`` bytes at ``offset`` (multiples of 512) straight into the
        ``into`` views (see :meth:`submit`); blocks; returns ``length``."""
        return self._wait("read", offset, length, into=into)  # type: ignore[no-any-return]

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


def _wanted_queues(transport: VirtioTransport) -> int:
    """The request queues the spec asks for (``queues``; 1 when it does not say)."""
    n = getattr(transport.spec, "queues", 1)
    return n if isinstance(n, int) and 1 <= n <= MAX_QUEUES else 1


class BlkDriver(VirtioDriver):
    """The virtio-blk driver: binds DeviceId.BLOCK, builds a :class:`BlockDevice`."""

    device_id = DeviceId.BLOCK
    supported_features = BLK_DRIVER_FEATURES

    def __init__(self, transport: VirtioTransport) -> None:
        super().__init__(transport)
        self._block: BlockDevice | None = None

    @classmethod
    def features_for(cls, transport: VirtioTransport, offered: int) -> int:
        """:meth:`features`, plus VIRTIO_BLK_F_MQ when the spec asks for more than one
        request queue (``kernel.Blk(..., queues=N)``)."""
        chosen = cls.features(offered)
        if _wanted_queues(transport) > 1:
            chosen |= offered & bit(BlkF.MQ)
        return chosen

    def probe(self) -> None:
        """Read the config space, set up the request queues (``num_queues`` of them
        with VIRTIO_BLK_F_MQ, at most as many as asked for; else queue 0), build the
        block device."""
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
        nq = 1
        if t.has_feature(BlkF.MQ):
            # §5.2.3 / §5.2.4: with VIRTIO_BLK_F_MQ, num_queues in config space is the
            # number of request queues; it must be at least 1 and no more than the rings
            # the device reported (GET_DEVICE_INFO). The driver uses as many as it asked
            # for, at most that number.
            have = config.num_queues if len(data) >= 36 else 0
            rings = t.info.num_queues if t.info is not None else 1
            if not 1 <= have <= rings:
                raise t.probe_error(
                    f"VIRTIO_BLK_F_MQ with num_queues {have} (the device has {rings} rings)"
                )
            nq = min(have, _wanted_queues(t))
        queues = [t.setup_queue(i, t.queue_cap) for i in range(nq)]
        self._block = BlockDevice(t, queues, config)
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
