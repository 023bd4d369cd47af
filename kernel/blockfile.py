"""Block device nodes of ``k.sys``: ``/dev/vda`` ... and their open files.

Theory of operation
-------------------
Every block device the kernel brought up has a node ``/dev/<name>`` (``/dev/vda``,
``/dev/vdb``, ...). :class:`BlockNodes` is the node table ``k.sys`` asks when a path
is opened or stat'ed; ``open`` makes a :class:`BlockFile`, the open file: the device,
the access mode and the file position. The calls behave like their :mod:`os`
namesakes on a Linux block device, and fail the same way, with
``OSError(errno, strerror)``:

=========  ====================================================================
errno      when
=========  ====================================================================
ENOENT     ``open`` of a path that names no device
EROFS      ``open`` for writing of a read-only device
EBADF      ``read`` on a write-only fd, ``write`` on a read-only one, a closed file
EINVAL     negative offset or count, bad ``whence``, ``lseek`` to a negative position,
           ``O_APPEND`` (appending to a disk makes no sense)
EEXIST     ``O_CREAT | O_EXCL`` (the node exists)
ENOTDIR    ``O_DIRECTORY``
ENXIO      ``write``/``pwrite`` starting at or past the end of the device
EIO        the device answered IOERR, broke the ring rules, needs a reset, or died;
           with ``kernel.Blk(..., integrity=True)`` also a read whose data does not
           match what this kernel wrote (and the journal cannot supply), or an
           ``fsync`` whose read-back could not be made right (culprit
           "device-error"; see :mod:`kernel.blk`, "Integrity mode")
=========  ====================================================================

Other open flags (``O_CREAT`` without ``O_EXCL``, ``O_TRUNC``, ``O_SYNC``, ``O_DIRECT``,
``O_NONBLOCK``, ``O_CLOEXEC``, ...) are accepted and ignored, as Linux does for a block
device. Reads past the end are short (empty at or after the end), like ``os.read`` of a
file; a write that starts inside the device and runs past its end is cut short and
returns the count written.

Any offset and length work: the block layer takes 512-byte sectors, so an unaligned
read reads the covering sectors and slices; an unaligned write reads the partial first
and last sectors, merges and writes the whole span back (read-modify-write). Every
write holds a per-device *range lock* (kept by :class:`BlockNodes`, so it spans every
open file of the device) on its sector span for its duration, so concurrent writes to
different bytes of the same sector never undo each other, and an RMW never resurrects
stale bytes. Concurrent reads are not serialised. ``read``/``write``/``lseek`` on one
file serialise on the file position, ``pread``/``pwrite`` do not.

Vector and in-place calls: ``preadv(buffers, offset)`` and ``pwritev(buffers,
offset)`` behave as :func:`os.preadv`/:func:`os.pwritev` (at most :data:`IOV_MAX`
buffers, EINVAL beyond; a read-only buffer for reading is ``BufferError``, a
non-buffer ``TypeError``, as ``os`` raises them); ``preadinto(buffer, offset)`` is
``preadv`` with one buffer (``os`` has no such call; the name joins ``pread`` and
``io``'s ``readinto``). Reads copy from shared memory straight into the caller's
buffers (the block layer's ``into`` scatter list; an unaligned head or tail of the
covering sectors is simply not copied), so no intermediate ``bytes`` is made.
``pwritev`` of one buffer copies it into shared memory directly; several are joined
first (one copy).

Readahead (:class:`Readahead`, one per device; per open file a stream state). A read
that starts where the file's previous read ended is sequential; once sequential reads in
a row have read :data:`RA_TRIGGER_BYTES` (the first read of the run not counted: a few
small adjacent reads read no more than they ask), the file keeps two *windows* read
ahead beyond it, in flight asynchronously while the caller works (the first
:data:`RA_MIN_BYTES` or the read size, doubling to :data:`RA_MAX_BYTES`; clipped to the
device's end, so no byte past the end is ever read). A read the windows cover is served
from them (``readahead_hits``); what they do not cover is read directly, and so is a
read of :data:`RA_DIRECT_BYTES` or more (its parts go to the device together anyway;
a window would add a copy and a wait). A
non-sequential read drops the windows (``readahead_dropped``). Coherence:
:class:`Readahead` is the device's write watcher
(:meth:`kernel.blk.BlockDevice.add_write_watcher`), so every write, DISCARD and
WRITE_ZEROES -- through any fd or the asynchronous ``submit`` API -- makes the windows
it overlaps stale as it is queued, and a window is only started when no write
overlapping it is in flight; a write that fails (e.g. ETIMEDOUT: the device may still
carry it out later) turns readahead off for that device. A read that starts after a
write completed therefore never sees data older than that write. No readahead on a
write-only or ``O_DIRECT`` file, or once the device failed. Window reads go through the
block layer like any read (integrity mode verifies them; the journal is untouched).

Readiness (``poll``): a disk is always readable and writable, as Linux reports it; a
device that has failed adds ``POLLERR``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from hostops.sync import Condition, Event, Lock
from vdev.virtio import SECTOR_SIZE

from .blk import MAX_INTO, BlockDevice
from .errors import io_error
from .files import POLLERR, POLLIN, POLLOUT, File

__all__ = [
    "BlockNodes",
    "BlockFile",
    "RangeLock",
    "Readahead",
    "DEV_PREFIX",
    "RA_MIN_BYTES",
    "RA_MAX_BYTES",
    "RA_DIRECT_BYTES",
    "RA_TRIGGER_BYTES",
    "IOV_MAX",
    "check_count",
    "check_offset",
]

DEV_PREFIX = "/dev/"
_S = SECTOR_SIZE
#: First readahead window of a sequential stream (or the read's size, if larger).
RA_MIN_BYTES = 128 << 10
#: Bytes of sequential reads in a row (each starting where the last ended; the first
#: read of the run not counted) before readahead starts: a few adjacent small reads are
#: no stream yet, and read no more from the device than they ask for.
RA_TRIGGER_BYTES = 64 << 10
#: Largest readahead window; a stream keeps at most two windows (2 MiB per open file).
RA_MAX_BYTES = 1 << 20
#: Reads at least this large go straight to the device even in a sequential stream:
#: their parts are already in flight together, and a window would only add a copy and
#: a wait (measured: 1 MiB sequential reads at half the speed through windows).
RA_DIRECT_BYTES = RA_MAX_BYTES
#: Most buffers ``preadv``/``pwritev`` take (Linux's UIO_MAXIOV; more is EINVAL).
IOV_MAX = MAX_INTO


def _arg_error(code: int, detail: str | None = None, filename: str | None = None) -> OSError:
    """An error of the caller's own arguments (culprit "caller")."""
    return io_error(code, detail, filename, culprit="caller")


class RangeLock:
    """Byte ranges locked for writing on one device; overlapping holders wait."""

    def __init__(self) -> None:
        self._cond = Condition(Lock())
        self._held: list[tuple[int, int]] = []

    def acquire(self, start: int, end: int) -> tuple[int, int]:
        """Wait until ``[start, end)`` overlaps no held range, then hold it; returns
        the token for :meth:`release`."""
        with self._cond:
            while any(s < end and start < e for s, e in self._held):
                self._cond.wait()
            item = (start, end)
            self._held.append(item)
            return item

    def release(self, item: tuple[int, int]) -> None:
        """Release a range returned by :meth:`acquire`."""
        with self._cond:
            self._held.remove(item)
            self._cond.notify_all()


class _Window:
    """One readahead window: ``[start, end)`` of the device, filled asynchronously.
    ``data`` is set (or ``failed``) once the read completed; ``stale`` once a write
    overlapped it or it was dropped (its data is never used then)."""

    __slots__ = ("start", "end", "data", "failed", "stale", "done")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.data: bytearray | None = None
        self.failed = False
        self.stale = False
        self.done = Event()


class Readahead:
    """The readahead windows of one device, kept coherent with every write to it.

    Registered with the device as its :class:`kernel.blk.WriteWatcher`, so it hears
    of every write, DISCARD and WRITE_ZEROES -- from any fd or the asynchronous API --
    before it is queued: windows it overlaps are made stale at once (their data is
    never served again), and a window is only started when no write overlapping it is
    in flight (and, once, after the device was seen idle since the watcher was
    registered: writes queued before it are not announced). A write that fails (a
    timeout: the device may still carry it out) turns readahead off for the device for
    good (``disabled``). Counters go to the device's ``counters``
    (:data:`kernel.blk.READAHEAD_COUNTERS`).
    """

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.counters = dev.counters
        self.lock = Lock()
        self.disabled = False
        #: Writes queued before this watcher was registered cannot be in flight any
        #: more (the device was seen idle since): windows may start.
        self.settled = False
        self._writes: dict[tuple[int, int], int] = {}  # write ranges in flight -> count
        self._windows: set[_Window] = set()  # every live window of every file

    # -- WriteWatcher
    def write_started(self, offset: int, length: int) -> None:
        """A write to ``[offset, offset+length)`` is about to be queued: stale the
        windows it overlaps."""
        key = (offset, offset + length)
        with self.lock:
            self._writes[key] = self._writes.get(key, 0) + 1
            self._stale_locked(lambda w: w.start < key[1] and key[0] < w.end)

    def write_ended(self, offset: int, length: int, ok: bool) -> None:
        """That write finished (or was refused)."""
        key = (offset, offset + length)
        with self.lock:
            left = self._writes.get(key, 1) - 1
            if left:
                self._writes[key] = left
            else:
                self._writes.pop(key, None)
            if not ok:  # perhaps still on its way to the image: trust no window again
                self.disabled = True
                self._stale_locked(lambda w: True)

    def _stale_locked(self, hit: Callable[[_Window], bool]) -> None:
        for w in [w for w in self._windows if hit(w)]:  # bounded: 2 per open file
            self._windows.discard(w)
            w.stale = True
            self.counters["readahead_dropped"] += 1

    # -- windows
    def start(self, start: int, end: int) -> _Window | None:
        """Read ``[start, end)`` (sector-aligned, inside the device) ahead; None when
        a write to it is in flight, readahead is off, or the device refuses."""
        if not self.settled:
            if not self.dev.idle():
                return None  # an unannounced write may still be on its way
            self.settled = True
        w = _Window(start, end)
        with self.lock:
            if self.disabled or any(a < end and start < b for a, b in self._writes):
                return None
            self._windows.add(w)

        buf = bytearray(end - start)

        def filled(result: object) -> None:
            if result == end - start:
                w.data = buf  # never changed again
            else:
                w.failed = True
            w.done.set()

        try:  # the device's data goes straight into the window (one copy)
            self.dev.submit("read", start, end - start, filled, into=[(0, memoryview(buf))])
        except OSError:
            self.drop(w, count=False)
            return None
        self.counters["readahead_bytes"] += end - start
        return w

    def drop(self, w: _Window, count: bool = True) -> None:
        """Forget ``w`` (``count``: it goes unused, a ``readahead_dropped``)."""
        with self.lock:
            if w in self._windows:
                self._windows.discard(w)
                if count:
                    self.counters["readahead_dropped"] += 1
            w.stale = True

    def data(self, w: _Window) -> bytearray | None:
        """The data of ``w`` once filled, or None (stale, failed); waits for the fill."""
        w.done.wait()
        with self.lock:
            return None if w.stale or w.failed else w.data


class _Stream:
    """The sequential-read state of one open file (guarded by ``lock``)."""

    __slots__ = ("lock", "next", "run", "size", "windows")

    def __init__(self) -> None:
        self.lock = Lock()
        self.next = -1  # where a sequential read would start
        self.run = 0  # bytes of sequential reads in a row (the run's first not counted)
        self.size = RA_MIN_BYTES  # the next window's size
        self.windows: list[_Window] = []  # contiguous, in order; at most 2


class BlockNodes:
    """The ``/dev/<name>`` nodes of the kernel's block devices (a node table of
    ``k.sys``). ``devices()`` returns the current devices by name."""

    def __init__(self, devices: Callable[[], dict[str, BlockDevice]]) -> None:
        self._devices = devices
        self._lock = Lock()
        self._range_locks: dict[str, RangeLock] = {}
        self._readahead: dict[int, Readahead] = {}

    def lookup(self, path: str) -> BlockDevice | None:
        """The device ``path`` names (``/dev/vda``, also ``/dev//vda`` or
        ``/dev/x/../vda``), or None."""
        norm = os.path.normpath(path) if path else path
        name = norm[len(DEV_PREFIX) :] if norm.startswith(DEV_PREFIX) else ""
        return self._devices().get(name) if name and "/" not in name else None

    def open(self, path: str, flags: int) -> BlockFile | None:
        """Open ``path`` with ``flags`` (access mode already checked by ``k.sys``);
        None when ``path`` is no block device node."""
        dev = self.lookup(path)
        if dev is None:
            return None
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise _arg_error(errno.EEXIST, None, path)
        if flags & getattr(os, "O_DIRECTORY", 0):
            raise _arg_error(errno.ENOTDIR, None, path)
        if flags & os.O_APPEND:
            raise _arg_error(errno.EINVAL, "O_APPEND on a block device", path)
        acc = flags & os.O_ACCMODE
        writable = acc in (os.O_WRONLY, os.O_RDWR)
        if writable and dev.readonly:
            raise _arg_error(errno.EROFS, None, path)
        return BlockFile(path, self, dev, flags, acc in (os.O_RDONLY, os.O_RDWR), writable)

    def stat(self, path: str) -> os.stat_result | None:
        """``os.stat_result`` of the node ``path``, or None when it is no block node."""
        dev = self.lookup(path)
        return None if dev is None else self.stat_device(dev)

    def stat_device(self, dev: BlockDevice) -> os.stat_result:
        """The node's stat: S_IFBLK, ``st_size`` = device size, ``st_rdev`` 253:16*i
        (virtblk's major and minors, ``i`` the device's index by name)."""
        names = sorted(self._devices())
        idx = names.index(dev.name) if dev.name in names else 0
        perm = 0o440 if dev.readonly else 0o660
        return os.stat_result(
            (stat.S_IFBLK | perm, idx + 1, 0, 1, os.getuid(), os.getgid(), dev.size, 0, 0, 0),
            {
                "st_blksize": dev.block_size,
                "st_blocks": dev.size // _S,
                "st_rdev": os.makedev(253, 16 * idx),
            },
        )

    def readahead(self, dev: BlockDevice) -> Readahead:
        """The readahead of ``dev`` (one per device, shared by its files; registered
        as the device's write watcher)."""
        with self._lock:
            ra = self._readahead.get(id(dev))
            if ra is None or ra.dev is not dev:
                ra = self._readahead[id(dev)] = Readahead(dev)
                dev.add_write_watcher(ra)
                ra.settled = dev.idle()
            return ra

    def range_lock(self, dev: BlockDevice) -> RangeLock:
        """The write range lock of ``dev`` (one per device, shared by its files)."""
        with self._lock:
            rl = self._range_locks.get(dev.name)
            if rl is None:
                rl = self._range_locks[dev.name] = RangeLock()
            return rl


class BlockFile(File):
    """An open block device node (see the module docstring for the semantics)."""

    kind = "block"

    def __init__(
        self,
        path: str,
        nodes: BlockNodes,
        device: BlockDevice,
        flags: int,
        readable: bool,
        writable: bool,
    ) -> None:
        super().__init__(path)
        self.nodes = nodes
        self.device = device
        self.flags = flags
        self.readable = readable
        self.writable = writable
        self.pos = 0
        self._pos_lock = Lock()
        # readahead: reading files only, and not O_DIRECT (which bypasses caches)
        direct = flags & getattr(os, "O_DIRECT", 0)
        self._stream: _Stream | None = _Stream() if readable and not direct else None
        if self._stream is not None:
            nodes.readahead(device)  # watch writes from now on

    def _check(self, reading: bool) -> None:
        if self.closed:
            raise _arg_error(errno.EBADF)
        if reading and not self.readable:
            raise _arg_error(errno.EBADF, "fd not open for reading")
        if not reading and not self.writable:
            raise _arg_error(errno.EBADF, "fd not open for writing")

    def poll(self) -> int:
        """Always readable and writable; POLLERR once the device has failed."""
        return POLLIN | POLLOUT | (POLLERR if self.device.failed is not None else 0)

    def read(self, n: int) -> bytes:
        """Read up to ``n`` bytes at the file position and advance it."""
        self._check(reading=True)
        check_count(n)
        with self._pos_lock:
            data = self._pread(n, self.pos)
            self.pos += len(data)
        return data

    def pread(self, n: int, offset: int) -> bytes:
        """Read up to ``n`` bytes at ``offset`` (position unchanged)."""
        self._check(reading=True)
        check_count(n)
        check_offset(offset)
        return self._pread(n, offset)

    def preadinto(self, buffer: Any, offset: int) -> int:
        """Read up to ``len(buffer)`` bytes at ``offset`` straight into ``buffer`` (a
        writable bytes-like object); returns the count (position unchanged)."""
        return self.preadv([buffer], offset)

    def preadv(self, buffers: Any, offset: int) -> int:
        """Read at ``offset`` into ``buffers`` in turn (as ``os.preadv``): the data is
        copied from shared memory (or readahead data) straight into them; returns the
        count (short at the end of the device)."""
        self._check(reading=True)
        views = _iov(buffers, writable=True)
        check_offset(offset)
        return self._preadv(views, offset)

    def pwritev(self, buffers: Any, offset: int) -> int:
        """Write ``buffers`` one after the other at ``offset`` (as ``os.pwritev``);
        returns the count. One buffer goes to shared memory without a copy of its own;
        several are gathered first."""
        self._check(reading=False)
        views = _iov(buffers, writable=False)
        check_offset(offset)
        if not views:
            return 0
        data = views[0] if len(views) == 1 else b"".join(views)
        return self._pwrite(data, offset)

    def close(self) -> None:
        """Release the file: its readahead windows are dropped."""
        st = self._stream
        if st is not None:
            with st.lock:
                wins, st.windows = st.windows, []
            if wins:
                ra = self.nodes.readahead(self.device)
                for w in wins:
                    ra.drop(w)
        super().close()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at the file position and advance it; returns the count."""
        self._check(reading=False)
        with self._pos_lock:
            n = self._pwrite(data, self.pos)
            self.pos += n
        return n

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset`` (position unchanged); returns the count."""
        self._check(reading=False)
        check_offset(offset)
        return self._pwrite(data, offset)

    def lseek(self, pos: int, how: int) -> int:
        """Move the file position (SEEK_SET / SEEK_CUR / SEEK_END); returns it."""
        if self.closed:
            raise _arg_error(errno.EBADF)
        if not isinstance(pos, int) or not isinstance(how, int):
            raise TypeError("lseek: pos and how must be integers")
        with self._pos_lock:
            if how == os.SEEK_SET:
                new = pos
            elif how == os.SEEK_CUR:
                new = self.pos + pos
            elif how == os.SEEK_END:
                new = self.device.size + pos
            else:
                raise _arg_error(errno.EINVAL, f"whence {how}")
            if new < 0:
                raise _arg_error(errno.EINVAL, f"resulting position {new} is negative")
            self.pos = new
        return new

    def fsync(self) -> None:
        """Flush the device's write cache (VIRTIO_BLK_T_FLUSH)."""
        if self.closed:
            raise _arg_error(errno.EBADF)
        self.device.flush()

    def fstat(self) -> os.stat_result:
        """``os.stat_result`` of the node: S_IFBLK, ``st_size`` = device size."""
        return self.nodes.stat_device(self.device)

    # ------------------------------------------------------------------ helpers
    def _ahead(self, offset: int, end: int) -> tuple[list[memoryview], int]:
        """Readahead for a read of ``[offset, end)``: the pieces of it readahead data
        holds (from ``offset`` on, contiguous) and where they stop. A read that starts
        where the file's last read ended is sequential; once sequential reads in a row
        have read :data:`RA_TRIGGER_BYTES`, two windows are kept in flight beyond it (each
        up to :data:`RA_MAX_BYTES`, doubling from :data:`RA_MIN_BYTES`, never past the
        end of the device); any other read drops the stream's windows."""
        st = self._stream
        if st is None:
            return [], offset
        dev = self.device
        ra = self.nodes.readahead(dev)
        size = dev.size
        with st.lock:
            wins = st.windows
            st.run = st.run + end - offset if offset == st.next else 0
            st.next = end
            if (
                st.run < RA_TRIGGER_BYTES
                or end - offset >= RA_DIRECT_BYTES
                or dev.failed is not None
                or ra.disabled
            ):
                for w in wins:
                    ra.drop(w)
                wins.clear()
                st.size = max(RA_MIN_BYTES, min(RA_MAX_BYTES, _up(end - offset)))
                return [], offset
            while wins and (wins[0].end <= offset or wins[0].stale):
                w = wins.pop(0)
                ra.drop(w, count=not w.stale and w.end > offset)
            if wins and wins[0].start > offset:  # not where the stream is: start over
                for w in wins:
                    ra.drop(w)
                wins.clear()
            # keep two windows in flight ahead (bounded: 2 iterations)
            base = wins[-1].end if wins else end - end % _S
            while len(wins) < 2 and base < size:
                stop = min(base + st.size, size)  # never past the end of the device
                new = ra.start(base, stop)
                if new is None:
                    break
                wins.append(new)
                base = stop
                st.size = min(st.size * 2, RA_MAX_BYTES)
            pieces: list[memoryview] = []
            pos = offset
            for w in list(wins):
                if pos >= end or not w.start <= pos < w.end:
                    break
                data = ra.data(w)
                if data is None:  # stale (a write) or failed: read the rest directly
                    break
                take = min(end, w.end) - pos
                pieces.append(memoryview(data)[pos - w.start : pos - w.start + take])
                pos += take
            while wins and wins[0].end <= pos:
                ra.drop(wins.pop(0), count=False)  # used up
        if pieces:
            self.device.counters["readahead_hits"] += 1
        return pieces, pos

    def _preadv(self, views: list[memoryview], offset: int) -> int:
        dev = self.device
        size = dev.size
        total = sum(len(v) for v in views)
        if total == 0 or offset >= size:
            return 0
        n = min(total, size - offset)
        end = offset + n
        pieces, pos = self._ahead(offset, end)
        out = _Scatter(views)
        for p in pieces:
            out.put(p)
        if pos < end:
            start = pos - pos % _S
            stop = -(-end // _S) * _S
            skip = pos - start
            into = [(skip + lo, mv) for lo, mv in out.views(end - pos)]
            dev.read_into(start, stop - start, into)
        return n

    def _pread(self, n: int, offset: int) -> bytes:
        dev = self.device
        size = dev.size
        if n == 0 or offset >= size:
            return b""
        n = min(n, size - offset)
        pieces, pos = self._ahead(offset, offset + n)
        if pieces:
            if pos < offset + n:
                pieces.append(memoryview(self._pread_direct(offset + n - pos, pos)))
            return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)
        return self._pread_direct(n, offset)

    def _pread_direct(self, n: int, offset: int) -> bytes:
        dev = self.device
        start = offset - offset % _S
        end = -(-(offset + n) // _S) * _S
        data = dev.read(start, end - start)
        if start == offset and end == offset + n:
            return data
        return data[offset - start : offset - start + n]

    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        dev = self.device
        if isinstance(data, str):
            raise TypeError("a bytes-like object is required, not 'str'")
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        if len(mv) == 0:
            return 0
        if dev.readonly:
            raise _arg_error(errno.EROFS, f"{dev.name} is read-only")
        size = dev.size
        if offset >= size:
            raise _arg_error(errno.ENXIO, f"offset {offset} is at or past the end ({size})")
        n = min(len(mv), size - offset)
        mv = mv[:n]
        end = offset + n
        start = offset - offset % _S
        stop = -(-end // _S) * _S
        rl = self.nodes.range_lock(dev)
        held = rl.acquire(start, stop)
        try:
            if start == offset and stop == end:
                dev.write(offset, mv)
                return n
            buf = bytearray(stop - start)
            if offset != start:
                buf[0:_S] = dev.read(start, _S)
            if end != stop and (stop - _S != start or offset == start):
                buf[-_S:] = dev.read(stop - _S, _S)
            buf[offset - start : end - start] = mv
            dev.write(start, buf)
            return n
        finally:
            rl.release(held)


def _up(n: int) -> int:
    """``n`` rounded up to whole sectors."""
    return -(-n // _S) * _S


class _Scatter:
    """Consecutive bytes poured into a list of views, one after the other."""

    def __init__(self, views: list[memoryview]) -> None:
        self._views = views
        self._i = 0  # the view being filled
        self._off = 0  # bytes of it filled

    def put(self, data: memoryview) -> None:
        """Copy ``data`` into the views (the caller never gives more than they hold)."""
        pos = 0
        while pos < len(data):  # bounded: each turn fills a view or ends the data
            v = self._views[self._i]
            take = min(len(v) - self._off, len(data) - pos)
            v[self._off : self._off + take] = data[pos : pos + take]
            pos += take
            self._off += take
            if self._off == len(v):
                self._i += 1
                self._off = 0

    def views(self, n: int) -> list[tuple[int, memoryview]]:
        """The next ``n`` bytes of room: ``(offset from here, view piece)`` pairs."""
        out: list[tuple[int, memoryview]] = []
        i, off, got = self._i, self._off, 0
        while got < n:  # bounded: one turn per view
            v = self._views[i]
            take = min(len(v) - off, n - got)
            if take:
                out.append((got, v[off : off + take]))
            got += take
            i += 1
            off = 0
        return out


def _iov(buffers: Any, writable: bool) -> list[memoryview]:
    """``preadv``/``pwritev``'s buffers as ``os`` takes them: a sequence (TypeError
    otherwise) of at most :data:`IOV_MAX` bytes-like objects (EINVAL beyond, as
    readv(2)), writable for reading (``BufferError`` as ``os.preadv``)."""
    if isinstance(buffers, str | bytes | bytearray | memoryview) or not hasattr(buffers, "__len__"):
        raise TypeError("buffers must be a sequence of bytes-like objects")
    if len(buffers) > IOV_MAX:
        raise _arg_error(errno.EINVAL, f"more than {IOV_MAX} buffers")
    views: list[memoryview] = []
    for b in buffers:  # bounded: IOV_MAX
        if isinstance(b, str):
            raise TypeError("a bytes-like object is required, not 'str'")
        try:
            mv = memoryview(b)
        except TypeError:
            raise TypeError(f"a bytes-like object is required, not {type(b).__name__!r}") from None
        if writable and mv.readonly:
            raise BufferError("Object is not writable.")
        if not mv.c_contiguous:
            raise BufferError("a contiguous buffer is required")
        views.append(mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv)
    return views


def check_count(n: int) -> None:
    """A byte count: an int (TypeError) and not negative (EINVAL, as ``os.read``)."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"count must be an int, not {type(n).__name__}")
    if n < 0:
        raise _arg_error(errno.EINVAL, f"negative count {n}")


def check_offset(offset: int) -> None:
    """A file offset: an int (TypeError) and not negative (EINVAL, as ``os.pread``)."""
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise TypeError(f"offset must be an int, not {type(offset).__name__}")
    if offset < 0:
        raise _arg_error(errno.EINVAL, f"negative offset {offset}")
