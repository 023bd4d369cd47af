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

Readiness (``poll``): a disk is always readable and writable, as Linux reports it; a
device that has failed adds ``POLLERR``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from hostops.sync import Condition, Lock
from vdev.virtio import SECTOR_SIZE

from .blk import BlockDevice
from .errors import io_error
from .files import POLLERR, POLLIN, POLLOUT, File

__all__ = ["BlockNodes", "BlockFile", "RangeLock", "DEV_PREFIX", "check_count", "check_offset"]

DEV_PREFIX = "/dev/"
_S = SECTOR_SIZE


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


class BlockNodes:
    """The ``/dev/<name>`` nodes of the kernel's block devices (a node table of
    ``k.sys``). ``devices()`` returns the current devices by name."""

    def __init__(self, devices: Callable[[], dict[str, BlockDevice]]) -> None:
        self._devices = devices
        self._lock = Lock()
        self._range_locks: dict[str, RangeLock] = {}

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
    def _pread(self, n: int, offset: int) -> bytes:
        dev = self.device
        size = dev.size
        if n == 0 or offset >= size:
            return b""
        n = min(n, size - offset)
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
