"""virtio-blk (§5.2): :class:`BlkDevice` and the storage backends it serves from.

Written only against the public :class:`vdev.Device` API, as a model for other devices.

A request (§5.2.6) is one chain::

    readable:  le32 type | le32 reserved | le64 sector | data (OUT) or segments
    writable:  data (IN, GET_ID) ...                   | u8 status   <- always the LAST byte

The device validates the request (the runtime already validated the chain), performs
it on a :class:`BlkBackend`, writes the status byte and returns the used length: the
bytes written into the writable part (data + status for a successful IN or GET_ID, 1
for everything else — on an error status only the status byte is meaningful).

=====================  ===============================================================
request                outcome
=====================  ===============================================================
no writable byte       cannot be answered: used length 0, ``bad_requests``
header < 16 bytes      IOERR, ``bad_requests``
IN / OUT               data length a multiple of 512 and ``sector + len/512 <=
                       capacity``, else IOERR (``bad_requests``); OUT on a read-only
                       device: IOERR
FLUSH                  ``fsync`` of the image
GET_ID                 up to 20 bytes of serial, zero padded
DISCARD, WRITE_ZEROES  a list of 16-byte segments, each in range and within the limits
                       in the config space, else IOERR; unknown flags (or UNMAP on a
                       DISCARD) → UNSUPP (§5.2.6.2); the range reads back as zeros
anything else          UNSUPP, ``unsupported``
host ``OSError``       IOERR, ``io_errors``
=====================  ===============================================================

Backends move data between the image and the chain's memoryviews directly
(``os.preadv`` / ``os.pwritev`` into shared memory): no intermediate copy.

A request whose *last writable descriptor has length 0* is bad as well (the status byte
cannot go where the driver put it): IOERR is written into the last byte of the writable
part, wherever it lies, the used length is 1 and ``bad_requests`` counts it — never an
IndexError counted as a device bug.

Fault injection
---------------
With a fault plan (``python -m vdev blk ... --faults PLAN``, ``docs/faults.md``) the
device asks :meth:`~vdev.Device.faults` once per request, after reading its header:

=============  ============  ====================================================
request        event         opcode, sector, nbytes
=============  ============  ====================================================
IN             blk.read      ``IN``, the sector, the data length
GET_ID         blk.read      ``GET_ID``, none, the id bytes (at most 20)
OUT            blk.write     ``OUT``, the sector, the data length
WRITE_ZEROES   blk.write     ``WRITE_ZEROES``, the segments' span (it changes data
                             as a write does, so drop/torn/power-cut rules for
                             writes cover it)
DISCARD        blk.discard   ``DISCARD``, the segments' span
FLUSH          blk.flush     ``FLUSH``, none, 0
=============  ============  ====================================================

and carries out what fired (the first rule of each action counts): ``power_cut`` first
(the request is not served), then one of ``ioerr``/``unsupp`` (that status, nothing
done), ``drop_write``/``torn_write`` (status OK, none / only the first ``sectors``
sectors written; requests that break §5.2.6 still get IOERR), ``drop_flush`` (status
OK, no fsync), else the request is served and ``corrupt_read`` flips the byte at
``offset`` of the data read with ``xor`` (nothing when the data is shorter:
``faults_out_of_range``); ``latency`` then holds the completion back ``delay_s`` seconds
(:data:`~vdev.PENDING` + ``call_later``; a reset cancels it). Without a plan none of
this costs more than one attribute test per request.

**Power cut.** With a plan the device keeps an :class:`UndoJournal`: before the first
overwrite of a range since the last real flush (OUT, WRITE_ZEROES, DISCARD, the landed
part of a torn write) its old bytes are read and kept; a real flush fsyncs and clears
it; a ``drop_flush`` clears nothing, so what a lying flush "made durable" is lost at a
cut. ``power_cut`` writes the old bytes back (newest first), fsyncs and crashes
(:meth:`~vdev.Device.crash`): the image holds exactly what it held at the last real
flush. The journal holds at most :data:`JOURNAL_CAP` bytes: a write that would exceed it
first makes the device fsync for real and start a new journal
(``journal_forced_flushes``), which narrows what a cut can lose but never loses flushed
data; a single request larger than the cap is written unprotected
(``journal_unprotected_writes``). A memory-backed image (``--memory``) loses everything
when the process dies anyway: the rollback only matters for image files.

Fault counters: ``fault_ioerr fault_unsupp corrupted_reads dropped_writes
dropped_flushes torn_writes delayed_completions power_cuts rolled_back_bytes
journal_forced_flushes journal_unprotected_writes faults_out_of_range`` (besides the
session's ``faults_fired`` and ``fault:<action>``).
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Sequence
from typing import Any, ClassVar, NoReturn, Protocol

from vdev.device import PENDING, Device, Pending, TimerHandle
from vdev.virtio.blk import DISCARD_F_UNMAP, DISCARD_SEGMENT, REQ_HEADER, BlkConfig
from vdev.virtio.constants import BLK_ID_BYTES, SECTOR_SIZE, BlkF, BlkStatus, BlkType, DeviceId, bit
from vdev.virtio.faults import Fired
from vdev.virtio.queue import Chain, slices

__all__ = [
    "BlkBackend",
    "RawFileBackend",
    "MemoryBackend",
    "BlkDevice",
    "SIZE_MAX",
    "MAX_DISCARD_SECTORS",
    "MAX_DISCARD_SEG",
    "JOURNAL_CAP",
    "BLK_FAULT_EVENTS",
    "BLK_FAULT_COUNTERS",
    "UndoJournal",
]

#: Largest single data segment the driver should send (config ``size_max``).
SIZE_MAX = 1 << 20
#: Per-request limits for DISCARD and WRITE_ZEROES (config space).
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 64

#: Most bytes the undo journal of a device with a fault plan holds (old contents of
#: ranges overwritten since the last real flush). Beyond it the device flushes for real
#: and starts a new journal: a power cut then loses less than a real one could.
JOURNAL_CAP = 64 << 20

_ZERO_CHUNK = 1 << 20
_IOERR_BYTE = bytes([BlkStatus.IOERR])
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _iov_max() -> int:
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        n = -1
    return n if n > 0 else 1024


_IOV_MAX = _iov_max()


# --------------------------------------------------------------------------- backends


class BlkBackend(Protocol):
    """What :class:`BlkDevice` needs from storage. Offsets and lengths are in bytes and
    already range-checked by the device; every method may raise ``OSError``."""

    size: int
    readonly: bool

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` completely from ``offset`` (``OSError`` if it cannot)."""
        ...

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Write all of ``bufs`` at ``offset``."""
        ...

    def flush(self) -> None:
        """Make every completed write durable."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Deallocate the range; it reads back as zeros afterwards."""
        ...

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make the range read back as zeros; ``unmap`` allows deallocating it."""
        ...

    def serial(self) -> bytes:
        """An identifier for GET_ID (at most 20 bytes are used)."""
        ...

    def close(self) -> None:
        """Release the storage."""
        ...


def _libc_fallocate() -> Any:
    """``fallocate(2)`` from libc via ctypes, or None (``os`` has no mode flags)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


class RawFileBackend:
    """A raw disk image file (or a block device node), read and written in place.

    ``readv``/``writev`` are ``os.preadv``/``os.pwritev`` between the file and the
    caller's memoryviews. DISCARD punches a hole (``fallocate(PUNCH_HOLE|KEEP_SIZE)``)
    when the file system supports it and writes zeros otherwise.
    """

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(self.path, flags)
        try:
            st = os.fstat(self.fd)
            self.size = st.st_size
            if self.size == 0 and not os.path.isfile(self.path):
                # a block device node: its size is where SEEK_END lands
                self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            os.close(self.fd)
            raise
        self._id = f"vlab{st.st_dev:x}:{st.st_ino:x}".encode()[:BLK_ID_BYTES]
        self._fallocate: Any = None  # resolved on first use; False if unavailable
        self.punch_holes = 0  # how many ranges were deallocated (tests look at this)

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """``os.preadv`` into ``bufs`` until they are full; ``OSError(EIO)`` at EOF."""
        self._io(os.preadv, offset, bufs)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """``os.pwritev`` all of ``bufs`` at ``offset``."""
        self._io(os.pwritev, offset, bufs)

    def _io(self, op: Any, offset: int, bufs: Sequence[memoryview]) -> None:
        if len(bufs) <= _IOV_MAX:  # fast path: one system call does it all
            done = op(self.fd, bufs, offset)
            total = sum(map(len, bufs))
            if done == total:
                return
            if done < 0 or done > total:
                raise OSError(errno.EIO, f"{self.path}: transfer of {done} of {total} bytes")
            bufs = slices(bufs, done, total - done)
            offset += done
        pending = [b for b in bufs if len(b)]
        while pending:
            batch = pending[:_IOV_MAX]
            done = op(self.fd, batch, offset)
            if done <= 0:
                raise OSError(errno.EIO, f"{self.path}: unexpected end of file at {offset}")
            offset += done
            # drop what was transferred; keep the rest of a partly done buffer
            i = 0
            while i < len(pending) and done >= len(pending[i]):
                done -= len(pending[i])
                i += 1
            rest = pending[i:]
            if done:
                rest[0] = rest[0][done:]
            pending = rest

    def flush(self) -> None:
        """``fsync`` the image."""
        os.fsync(self.fd)

    def _punch(self, offset: int, length: int) -> bool:
        if self._fallocate is None:
            self._fallocate = _libc_fallocate() or False
        if self._fallocate is False:
            return False
        import ctypes

        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if self._fallocate(self.fd, mode, offset, length) == 0:
            self.punch_holes += 1
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            return False  # this file system cannot: fall back to writing zeros
        raise OSError(err, f"fallocate(PUNCH_HOLE) on {self.path}: {os.strerror(err)}")

    def _write_zero_range(self, offset: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        while length:
            n = min(length, len(zeros))
            self._io(os.pwritev, offset, [zeros[:n]])
            offset += n
            length -= n

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole; write zeros where holes are not supported."""
        if length and not self._punch(offset, length):
            self._write_zero_range(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Write zeros (punch a hole instead when ``unmap`` allows it)."""
        if not length:
            return
        if unmap and self._punch(offset, length):
            return
        self._write_zero_range(offset, length)

    def serial(self) -> bytes:
        """``vlab<dev>:<inode>`` of the image, hex, at most 20 bytes."""
        return self._id

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MemoryBackend:
    """A RAM disk of ``size`` bytes (a ``bytearray``); for tests and benchmarks."""

    def __init__(self, size: int, readonly: bool = False, serial: bytes = b"vlab-memory") -> None:
        if size < 0:
            raise ValueError(f"size {size} is negative")
        self.size = size
        self.readonly = readonly
        self.data = bytearray(size)
        self._mv = memoryview(self.data)
        self._serial = serial[:BLK_ID_BYTES]

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Copy from the RAM disk into ``bufs``."""
        for b in bufs:
            n = len(b)
            if offset + n > self.size:
                raise OSError(errno.EIO, f"read past the end at {offset}")
            b[:] = self._mv[offset : offset + n]
            offset += n

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Copy ``bufs`` into the RAM disk."""
        for b in bufs:
            n = len(b)
            if offset + n > self.size:
                raise OSError(errno.ENOSPC, f"write past the end at {offset}")
            self._mv[offset : offset + n] = b
            offset += n

    def flush(self) -> None:
        """Nothing to do."""

    def discard(self, offset: int, length: int) -> None:
        """Zero the range."""
        self._mv[offset : offset + length] = bytes(length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero the range."""
        self._mv[offset : offset + length] = bytes(length)

    def serial(self) -> bytes:
        """The ``serial`` given at construction."""
        return self._serial

    def close(self) -> None:
        """Nothing to release."""


# --------------------------------------------------------------------------- journal


class UndoJournal:
    """The old contents of every range overwritten since the last real flush, so that a
    ``power_cut`` fault can put the image back as it was at that flush.

    :meth:`save` is called before a range is written: the parts of it not saved since
    the last :meth:`clear` are read from the backend and appended (each byte is saved at
    most once, so the entries never overlap and hold exactly the flushed contents).
    :meth:`rollback` writes them back, newest first. ``cap`` bounds the saved bytes:
    :meth:`save` returns False, saving nothing, when the range would exceed it.
    """

    def __init__(self, cap: int = JOURNAL_CAP) -> None:
        self.cap = cap
        self.entries: list[tuple[int, bytes]] = []
        #: Bytes saved (the sum of the entries' lengths).
        self.bytes = 0
        self._starts: list[int] = []  # saved ranges: sorted, disjoint, merged
        self._ends: list[int] = []

    def _gaps(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The parts of ``[offset, offset + length)`` not saved yet."""
        end = offset + length
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0:
            i = 0
        gaps: list[tuple[int, int]] = []
        pos = offset
        while i < len(starts) and starts[i] < end:  # bounded: the saved ranges
            s, e = starts[i], ends[i]
            if e > pos:
                if s > pos:
                    gaps.append((pos, s))
                pos = e
                if pos >= end:
                    break
            i += 1
        if pos < end:
            gaps.append((pos, end))
        return gaps

    def _cover(self, offset: int, end: int) -> None:
        starts, ends = self._starts, self._ends
        lo = bisect.bisect_left(ends, offset)  # first range that ends at/after offset
        hi = bisect.bisect_right(starts, end)  # ranges starting at/before end
        if lo < hi:
            offset = min(offset, starts[lo])
            end = max(end, ends[hi - 1])
        starts[lo:hi] = [offset]
        ends[lo:hi] = [end]

    def save(self, backend: BlkBackend, offset: int, length: int) -> bool:
        """Save what ``[offset, offset + length)`` holds now, except what is saved
        already. False (nothing saved) when that would exceed :attr:`cap`."""
        gaps = self._gaps(offset, length)
        need = sum(e - s for s, e in gaps)
        if self.bytes + need > self.cap:
            return False
        for s, e in gaps:
            buf = bytearray(e - s)
            backend.readv(s, [memoryview(buf)])
            self.entries.append((s, bytes(buf)))
            self.bytes += e - s
            self._cover(s, e)
        return True

    def clear(self) -> None:
        """Forget everything: the image as it is now is what a power cut keeps."""
        self.entries.clear()
        self._starts.clear()
        self._ends.clear()
        self.bytes = 0

    def rollback(self, backend: BlkBackend) -> int:
        """Write every saved range back, newest first; returns the bytes restored. The
        journal is empty afterwards."""
        restored = 0
        for offset, data in reversed(self.entries):
            backend.writev(offset, [memoryview(data)])
            restored += len(data)
        self.clear()
        return restored


# --------------------------------------------------------------------------- device

_COUNTERS = (
    "reads",
    "writes",
    "flushes",
    "discards",
    "write_zeroes",
    "get_id",
    "bytes_read",
    "bytes_written",
    "io_errors",
    "unsupported",
    "bad_requests",
)

#: The fault events :class:`BlkDevice` fires itself (``Device.fault_events``).
BLK_FAULT_EVENTS = frozenset({"blk.read", "blk.write", "blk.flush", "blk.discard"})

#: What the device counts when it carries out a fault of its plan (see docs/faults.md).
BLK_FAULT_COUNTERS = (
    "fault_ioerr",
    "fault_unsupp",
    "corrupted_reads",
    "dropped_writes",
    "dropped_flushes",
    "torn_writes",
    "delayed_completions",
    "power_cuts",
    "rolled_back_bytes",
    "journal_forced_flushes",
    "journal_unprotected_writes",
    "faults_out_of_range",
)

_OPCODES = {
    BlkType.IN: ("blk.read", "IN"),
    BlkType.GET_ID: ("blk.read", "GET_ID"),
    BlkType.OUT: ("blk.write", "OUT"),
    BlkType.WRITE_ZEROES: ("blk.write", "WRITE_ZEROES"),
    BlkType.FLUSH: ("blk.flush", "FLUSH"),
    BlkType.DISCARD: ("blk.discard", "DISCARD"),
}


class BlkDevice(Device):
    """virtio-blk over a :class:`BlkBackend`.

    ``queue_size`` is the largest queue the driver may set up (a power of two); the
    config space derives ``seg_max`` from it. ``num_queues > 1`` offers VIRTIO_BLK_F_MQ.

    Counters in :attr:`metrics`: ``reads writes flushes discards write_zeroes get_id``
    (requests of each type, whatever their outcome), ``bytes_read bytes_written``
    (successful data transfer), ``io_errors`` (the host failed), ``unsupported``
    (UNSUPP replies), ``bad_requests`` (requests that broke §5.2.6: no status byte,
    short header, bad length, sector out of range, bad segment list).
    """

    device_id = DeviceId.BLOCK
    name = "blk"
    fault_events: ClassVar[frozenset[str]] = BLK_FAULT_EVENTS

    def __init__(
        self,
        backend: BlkBackend,
        *,
        queue_size: int = 256,
        num_queues: int = 1,
        serial: bytes | None = None,
    ) -> None:
        super().__init__()
        if queue_size < 1 or queue_size & (queue_size - 1) or queue_size > 32768:
            raise ValueError(f"queue size {queue_size} is not a power of two in 1..32768")
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues {num_queues} out of range")
        self.backend = backend
        self.max_queue_size = queue_size
        self.num_queues = num_queues
        self.capacity = backend.size // SECTOR_SIZE
        self.readonly = backend.readonly
        sid = backend.serial() if serial is None else serial
        self.serial = bytes(sid[:BLK_ID_BYTES]).ljust(BLK_ID_BYTES, b"\0")
        self.metrics.declare(*_COUNTERS)
        #: True while a fault plan is attached (decided at :meth:`activate`).
        self._faulty = False
        #: The undo journal for ``power_cut`` (only with a fault plan; else None).
        self._journal: UndoJournal | None = None
        #: Completions delayed by ``latency`` faults: per queue, chain id -> timer.
        self._late: dict[int, dict[int, TimerHandle]] = {}
        self._config = BlkConfig(
            capacity=self.capacity,
            size_max=SIZE_MAX,
            seg_max=max(1, queue_size - 2),
            blk_size=SECTOR_SIZE,
            num_queues=num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEG,
            discard_sector_alignment=1,
            max_write_zeroes_sectors=MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=MAX_DISCARD_SEG,
            write_zeroes_may_unmap=1,
        )

    # ------------------------------------------------------------------ Device API
    def device_features(self) -> int:
        """SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES; RO when read-only;
        MQ with more than one queue."""
        f = 0
        for b in (
            BlkF.SIZE_MAX,
            BlkF.SEG_MAX,
            BlkF.BLK_SIZE,
            BlkF.FLUSH,
            BlkF.DISCARD,
            BlkF.WRITE_ZEROES,
        ):
            f |= bit(b)
        if self.readonly:
            f |= bit(BlkF.RO)
        if self.num_queues > 1:
            f |= bit(BlkF.MQ)
        return f

    def config(self) -> bytes:
        """The 60-byte :class:`~vdev.virtio.blk.BlkConfig`."""
        return self._config.pack()

    @property
    def blk_config(self) -> BlkConfig:
        """The config space as a dataclass."""
        return self._config

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()

    def activate(self, features: int) -> None:
        """Take the features; with a fault plan attached, start the undo journal (kept
        across resets: data not flushed stays unflushed when the driver resets)."""
        super().activate(features)
        self._faulty = _has_fault_plan(self)
        if self._faulty:
            self.metrics.declare(*BLK_FAULT_COUNTERS)
            if self._journal is None and not self.readonly:
                self._journal = UndoJournal()

    def released(self, queue: int) -> None:
        """Chains kept for delayed completions on ``queue`` are gone: cancel their
        timers."""
        for timer in self._late.pop(queue, {}).values():
            timer.cancel()

    def reset(self) -> None:
        """Cancel every delayed completion; forget the features."""
        for timers in self._late.values():
            for timer in timers.values():
                timer.cancel()
        self._late.clear()
        super().reset()

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Serve one virtio-blk request (see the module docstring for the rules)."""
        wlen = chain.writable_len
        if wlen < 1:
            self.metrics.inc("bad_requests")  # no status byte: nothing can be answered
            return 0
        status_at = wlen - 1
        if not len(chain.writable[-1]):
            # §5.2.6 / §2.6.4: the status is the last byte of the writable part, and a
            # driver may not split it off into an empty descriptor; the request is bad.
            # The status goes to the last writable byte, wherever it lies.
            self.metrics.inc("bad_requests")
            chain.write(status_at, _IOERR_BYTE)
            return 1
        if chain.readable_len < REQ_HEADER.size:
            self.metrics.inc("bad_requests")
            return self._status(chain, BlkStatus.IOERR)
        first = chain.readable[0]
        if len(first) >= REQ_HEADER.size:  # the usual layout: the header in one buffer
            rtype, _reserved, sector = REQ_HEADER.unpack_from(first)
        else:
            rtype, _reserved, sector = REQ_HEADER.unpack(chain.read(0, REQ_HEADER.size))
        if self._faulty:
            return self._handle_faults(queue, chain, rtype, sector, status_at)
        return self._serve(chain, rtype, sector, status_at)

    def _serve(self, chain: Chain, rtype: int, sector: int, status_at: int) -> int:
        """Perform a request whose header was read; returns the used length."""
        try:
            if rtype == BlkType.IN:
                return self._read(chain, sector, status_at)
            if rtype == BlkType.OUT:
                return self._write(chain, sector, status_at)
            if rtype == BlkType.FLUSH:
                self.metrics.inc("flushes")
                self.backend.flush()
                if self._journal is not None:
                    self._journal.clear()  # a real flush: what it made durable stays
                return self._status(chain, BlkStatus.OK)
            if rtype == BlkType.GET_ID:
                return self._get_id(chain, status_at)
            if rtype in (BlkType.DISCARD, BlkType.WRITE_ZEROES):
                return self._discard(chain, rtype, status_at)
        except OSError:
            self.metrics.inc("io_errors")
            return self._status(chain, BlkStatus.IOERR)
        self.metrics.inc("unsupported")
        return self._status(chain, BlkStatus.UNSUPP)

    # ------------------------------------------------------------------ requests
    @staticmethod
    def _status(chain: Chain, status: int) -> int:
        chain.writable[-1][-1] = status  # the last byte of the writable part
        return 1

    def _bad(self, chain: Chain, status_at: int) -> int:
        self.metrics.inc("bad_requests")
        return self._status(chain, BlkStatus.IOERR)

    def _in_range(self, sector: int, nbytes: int) -> bool:
        # Python ints do not overflow; a u64 sector near 2**64 is simply out of range.
        return nbytes % SECTOR_SIZE == 0 and sector + nbytes // SECTOR_SIZE <= self.capacity

    def _read(self, chain: Chain, sector: int, status_at: int) -> int:
        self.metrics.inc("reads")
        n = status_at  # data is everything writable before the status byte
        if not self._in_range(sector, n):
            return self._bad(chain, status_at)
        if n:
            w = chain.writable
            # the usual layout: data buffers, then a 1-byte status buffer
            bufs = w[:-1] if len(w[-1]) == 1 else chain.writable_slices(0, n)
            self.backend.readv(sector * SECTOR_SIZE, bufs)
        self.metrics.inc("bytes_read", n)
        chain.writable[-1][-1] = BlkStatus.OK
        return n + 1

    def _write(self, chain: Chain, sector: int, status_at: int, limit: int | None = None) -> int:
        """OUT. ``limit`` (a fault: torn or dropped write) writes only that many sectors
        of the data, the status still OK."""
        self.metrics.inc("writes")
        if self.readonly:
            return self._status(chain, BlkStatus.IOERR)
        n = chain.readable_len - REQ_HEADER.size
        if not self._in_range(sector, n):
            return self._bad(chain, status_at)
        if limit is not None:
            n = min(n, limit * SECTOR_SIZE)
        if n:
            off = sector * SECTOR_SIZE
            if self._journal is not None:
                self._journal_save(off, n)
            self.backend.writev(off, chain.readable_slices(REQ_HEADER.size, n))
        self.metrics.inc("bytes_written", n)
        return self._status(chain, BlkStatus.OK)

    def _get_id(self, chain: Chain, status_at: int) -> int:
        self.metrics.inc("get_id")
        n = min(status_at, BLK_ID_BYTES)
        if n:
            chain.write(0, self.serial[:n])
        chain.writable[-1][-1] = BlkStatus.OK
        # used length counts bytes written from the start of the writable part: the id,
        # plus the status byte when it directly follows (the usual 20 + 1 layout)
        return n + 1 if n == status_at else n

    def _discard(self, chain: Chain, rtype: int, status_at: int, limit: int | None = None) -> int:
        """DISCARD / WRITE_ZEROES. ``limit`` (a fault on WRITE_ZEROES: torn or dropped)
        zeroes only that many sectors, segment by segment, the status still OK."""
        is_discard = rtype == BlkType.DISCARD
        self.metrics.inc("discards" if is_discard else "write_zeroes")
        if self.readonly:
            return self._status(chain, BlkStatus.IOERR)
        payload = chain.readable_len - REQ_HEADER.size
        seg = DISCARD_SEGMENT.size
        count = payload // seg
        if payload <= 0 or payload % seg or count > MAX_DISCARD_SEG:
            return self._bad(chain, status_at)
        raw = chain.read(REQ_HEADER.size, payload)
        segments = [DISCARD_SEGMENT.unpack_from(raw, i * seg) for i in range(count)]
        # validate every segment before touching anything (§5.2.6.2)
        for sector, nsect, flags in segments:
            if flags & ~DISCARD_F_UNMAP or (is_discard and flags & DISCARD_F_UNMAP):
                self.metrics.inc("unsupported")
                return self._status(chain, BlkStatus.UNSUPP)
            if nsect > MAX_DISCARD_SECTORS or not self._in_range(sector, nsect * SECTOR_SIZE):
                return self._bad(chain, status_at)
        budget = None if limit is None else limit * SECTOR_SIZE
        for sector, nsect, flags in segments:  # bounded: MAX_DISCARD_SEG
            off, length = sector * SECTOR_SIZE, nsect * SECTOR_SIZE
            if budget is not None:
                length = min(length, budget)
                budget -= length
                if not length:
                    continue
            if self._journal is not None:
                self._journal_save(off, length)
            if is_discard:
                self.backend.discard(off, length)
            else:
                self.backend.write_zeroes(off, length, bool(flags & DISCARD_F_UNMAP))
        return self._status(chain, BlkStatus.OK)

    # ------------------------------------------------------------------ faults
    def _fault_event(
        self, chain: Chain, rtype: int, sector: int, status_at: int
    ) -> tuple[str, str, int | None, int | None] | None:
        """(event kind, opcode name, sector, nbytes) the plan sees for a request, or
        None for a type it does not see. FLUSH and GET_ID carry no sector (a sector
        filter never matches them); DISCARD and WRITE_ZEROES give the span of their
        segments (first sector to the end of the last), or no sector and size when the
        segment list is malformed."""
        kind_op = _OPCODES.get(rtype)  # type: ignore[call-overload]
        if kind_op is None:
            return None
        kind, op = kind_op
        if rtype == BlkType.IN:
            return kind, op, sector, status_at
        if rtype == BlkType.OUT:
            return kind, op, sector, chain.readable_len - REQ_HEADER.size
        if rtype == BlkType.GET_ID:
            return kind, op, None, min(status_at, BLK_ID_BYTES)
        if rtype == BlkType.FLUSH:
            return kind, op, None, 0
        payload = chain.readable_len - REQ_HEADER.size
        seg = DISCARD_SEGMENT.size
        count = payload // seg
        # §5.2.6.2: a whole number of 16-byte segments, at most max_discard_seg
        if payload <= 0 or payload % seg or count > MAX_DISCARD_SEG:
            return kind, op, None, None
        raw = chain.read(REQ_HEADER.size, payload)
        first = min(DISCARD_SEGMENT.unpack_from(raw, i * seg)[0] for i in range(count))
        end = max(sum(DISCARD_SEGMENT.unpack_from(raw, i * seg)[:2]) for i in range(count))
        return kind, op, first, (end - first) * SECTOR_SIZE

    def _handle_faults(
        self, queue: int, chain: Chain, rtype: int, sector: int, status_at: int
    ) -> int | Pending:
        """:meth:`handle` with a fault plan: ask the plan, then carry out what fired."""
        ev = self._fault_event(chain, rtype, sector, status_at)
        if ev is None:
            return self._serve(chain, rtype, sector, status_at)
        kind, op, esector, nbytes = ev
        fired = self.faults(kind, queue=queue, opcode=op, sector=esector, nbytes=nbytes)
        if not fired:
            return self._serve(chain, rtype, sector, status_at)
        acts: dict[str, Fired] = {}
        for f in fired:  # bounded: the plan's rules; the first rule of an action wins
            acts.setdefault(f.action, f)
        m = self.metrics
        if "power_cut" in acts:
            self._power_cut(acts["power_cut"])
        n: int
        if "ioerr" in acts:
            m.inc("fault_ioerr")
            n = self._status(chain, BlkStatus.IOERR)
        elif "unsupp" in acts:
            m.inc("fault_unsupp")
            n = self._status(chain, BlkStatus.UNSUPP)
        elif "drop_write" in acts or "torn_write" in acts:
            # only blk.write events carry them: OUT or WRITE_ZEROES
            if "drop_write" in acts:
                m.inc("dropped_writes")
                limit = 0
            else:
                m.inc("torn_writes")
                limit = int(acts["torn_write"].params["sectors"])
            try:
                if rtype == BlkType.OUT:
                    n = self._write(chain, sector, status_at, limit)
                else:
                    n = self._discard(chain, rtype, status_at, limit)
            except OSError:
                m.inc("io_errors")
                n = self._status(chain, BlkStatus.IOERR)
        elif "drop_flush" in acts:
            # OK without fsync, and the journal stays: a power cut loses what this
            # flush claimed to make durable
            m.inc("flushes")
            m.inc("dropped_flushes")
            n = self._status(chain, BlkStatus.OK)
        else:
            n = self._serve(chain, rtype, sector, status_at)
            corrupt = acts.get("corrupt_read")
            if corrupt is not None and chain.writable[-1][-1] == BlkStatus.OK:
                self._corrupt(chain, nbytes or 0, corrupt.params)
        latency = acts.get("latency")
        if latency is not None:
            return self._later(queue, chain, n, float(latency.params["delay_s"]))
        return n

    def _corrupt(self, chain: Chain, nbytes: int, params: dict[str, Any]) -> None:
        """Flip bits of the byte at ``offset`` of the data read (nothing when the read
        is shorter)."""
        offset = int(params["offset"])
        if offset >= nbytes:
            self.metrics.inc("faults_out_of_range")
            return
        view = chain.writable_slices(offset, 1)[0]
        view[0] ^= int(params["xor"])
        self.metrics.inc("corrupted_reads")

    def _later(self, queue: int, chain: Chain, used: int, delay_s: float) -> Pending:
        """Complete ``chain`` (already served) ``delay_s`` seconds from now."""
        timers = self._late.setdefault(queue, {})
        key = id(chain)

        def done() -> None:
            timers.pop(key, None)
            self.complete(queue, chain, used)

        timers[key] = self.call_later(max(0.0, delay_s), done)
        self.metrics.inc("delayed_completions")
        return PENDING

    def _journal_save(self, offset: int, length: int) -> None:
        """Before overwriting ``[offset, offset + length)``: save its flushed contents
        in the undo journal. When the journal is full: flush for real, start a new one
        (a power cut then keeps what was written before); a range larger than the whole
        journal is written unprotected (it may survive a power cut)."""
        journal = self._journal
        assert journal is not None
        if journal.save(self.backend, offset, length):
            return
        self.backend.flush()
        journal.clear()
        self.metrics.inc("journal_forced_flushes")
        if not journal.save(self.backend, offset, length):
            self.metrics.inc("journal_unprotected_writes")

    def _power_cut(self, fired: Fired) -> NoReturn:
        """Put the image back as it was at the last real flush, make that durable, and
        die (``Device.crash``)."""
        self.metrics.inc("power_cuts")
        journal = self._journal
        try:
            if journal is not None:
                self.metrics.inc("rolled_back_bytes", journal.rollback(self.backend))
            self.backend.flush()
        except OSError as e:  # the host failed us: die all the same, and say so
            self.crash(f"power cut (rule {fired.rule!r}): rollback failed: {e}")
        self.crash(f"power cut (rule {fired.rule!r}, fault #{fired.seq})")


def _has_fault_plan(device: Device) -> bool:
    """True when the session serving ``device`` carries out a fault plan."""
    return getattr(device._session, "injector", None) is not None
