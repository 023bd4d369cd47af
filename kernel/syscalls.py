"""``k.sys``: the system-call layer, mirroring Python's :mod:`os` on device nodes.

Theory of operation
-------------------
Every block device the kernel brought up has a node ``/dev/<name>`` (``/dev/vda``,
``/dev/vdb``, ...). :class:`Syscalls` keeps a file-descriptor table (lowest free number
from 3, like a process with stdin/stdout/stderr open) of open files: the device, the
access mode and the file position. The calls behave like their :mod:`os` namesakes on
a Linux block device, and fail the same way, with ``OSError(errno, strerror)``:

=========  ====================================================================
errno      when
=========  ====================================================================
ENOENT     ``open`` of a path that names no device
EROFS      ``open`` for writing of a read-only device
EBADF      unknown or closed fd; ``read`` on a write-only fd, ``write`` on a read-only one
EINVAL     negative offset or count, bad ``whence``, ``lseek`` to a negative position,
           an access mode of 3, ``O_APPEND`` (appending to a disk makes no sense)
EEXIST     ``O_CREAT | O_EXCL`` (the node exists)
ENOTDIR    ``O_DIRECTORY``
ENXIO      ``write``/``pwrite`` starting at or past the end of the device
EIO        the device answered IOERR, broke the ring rules, needs a reset, or died
=========  ====================================================================

Other open flags (``O_CREAT`` without ``O_EXCL``, ``O_TRUNC``, ``O_SYNC``, ``O_DIRECT``,
``O_NONBLOCK``, ``O_CLOEXEC``, ...) are accepted and ignored, as Linux does for a block
device. Reads past the end are short (empty at or after the end), like ``os.read`` of a
file; a write that starts inside the device and runs past its end is cut short and
returns the count written.

Any offset and length work: the block layer takes 512-byte sectors, so an unaligned
read reads the covering sectors and slices; an unaligned write reads the partial first
and last sectors, merges and writes the whole span back (read-modify-write). Every
write holds a per-device *range lock* on its sector span for its duration, so
concurrent writes to different bytes of the same sector never undo each other, and an
RMW never resurrects stale bytes. Concurrent reads are not serialised. All calls are
thread-safe; ``read``/``write``/``lseek`` on one fd serialise on the file position,
``pread``/``pwrite`` do not.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hostops.sync import Condition, Lock
from vdev.virtio import SECTOR_SIZE

from .blk import BlockDevice
from .errors import io_error

__all__ = ["Syscalls", "OpenFile", "FIRST_FD", "DEV_PREFIX"]

FIRST_FD = 3
DEV_PREFIX = "/dev/"
_S = SECTOR_SIZE


class _RangeLock:
    """Byte ranges locked for writing on one device; overlapping holders wait."""

    def __init__(self) -> None:
        self._cond = Condition(Lock())
        self._held: list[tuple[int, int]] = []

    def acquire(self, start: int, end: int) -> tuple[int, int]:
        with self._cond:
            while any(s < end and start < e for s, e in self._held):
                self._cond.wait()
            item = (start, end)
            self._held.append(item)
            return item

    def release(self, item: tuple[int, int]) -> None:
        with self._cond:
            self._held.remove(item)
            self._cond.notify_all()


@dataclass(eq=False)
class OpenFile:
    """One entry of the fd table."""

    path: str
    device: BlockDevice
    flags: int
    readable: bool
    writable: bool
    pos: int = 0
    lock: Any = field(default_factory=Lock)


class Syscalls:
    """The ``os``-like system-call interface of one kernel (``k.sys``)."""

    def __init__(self, devices: Callable[[], dict[str, BlockDevice]]) -> None:
        self._devices = devices
        self._table: dict[int, OpenFile] = {}
        self._lock = Lock()
        self._range_locks: dict[str, _RangeLock] = {}
        self._down = False

    # ------------------------------------------------------------------ fd table
    def _file(self, fd: int) -> OpenFile:
        if not isinstance(fd, int) or isinstance(fd, bool):
            raise TypeError(f"fd must be an int, not {type(fd).__name__}")
        with self._lock:
            f = self._table.get(fd)
        if f is None:
            raise io_error(errno.EBADF)
        return f

    def _range_lock(self, dev: BlockDevice) -> _RangeLock:
        with self._lock:
            rl = self._range_locks.get(dev.name)
            if rl is None:
                rl = self._range_locks[dev.name] = _RangeLock()
            return rl

    def shutdown(self) -> None:
        """Close every fd; later calls fail (EBADF, ``open``: ENODEV)."""
        with self._lock:
            self._down = True
            self._table.clear()

    # ------------------------------------------------------------------ open/close
    def open(
        self, path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o777
    ) -> int:
        """Open the device node ``path`` (``/dev/vda``); returns a new fd. ``mode`` is
        accepted for ``os.open`` compatibility and ignored."""
        p = os.fspath(path)
        if not isinstance(p, str):
            p = os.fsdecode(p)
        acc = flags & os.O_ACCMODE
        if acc not in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            raise io_error(errno.EINVAL, f"access mode {acc}", p)
        dev = self._lookup(p)
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise io_error(errno.EEXIST, None, p)
        if flags & getattr(os, "O_DIRECTORY", 0):
            raise io_error(errno.ENOTDIR, None, p)
        if flags & os.O_APPEND:
            raise io_error(errno.EINVAL, "O_APPEND on a block device", p)
        writable = acc in (os.O_WRONLY, os.O_RDWR)
        if writable and dev.readonly:
            raise io_error(errno.EROFS, None, p)
        f = OpenFile(p, dev, flags, acc in (os.O_RDONLY, os.O_RDWR), writable)
        with self._lock:
            if self._down:
                raise io_error(errno.ENODEV, "kernel shut down", p)
            fd = FIRST_FD
            while fd in self._table:
                fd += 1
            self._table[fd] = f
        return fd

    def close(self, fd: int) -> None:
        """Close ``fd`` (EBADF if it is not open)."""
        self._file(fd)
        with self._lock:
            if self._table.pop(fd, None) is None:
                raise io_error(errno.EBADF)

    # ------------------------------------------------------------------ data
    def read(self, fd: int, n: int) -> bytes:
        """Read up to ``n`` bytes at the file position and advance it."""
        f = self._file(fd)
        if not f.readable:
            raise io_error(errno.EBADF, "fd not open for reading")
        _check_count(n)
        with f.lock:
            data = self._pread(f.device, n, f.pos)
            f.pos += len(data)
        return data

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        """Read up to ``n`` bytes at ``offset`` (position unchanged)."""
        f = self._file(fd)
        if not f.readable:
            raise io_error(errno.EBADF, "fd not open for reading")
        _check_count(n)
        _check_offset(offset)
        return self._pread(f.device, n, offset)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at the file position and advance it; returns the count."""
        f = self._file(fd)
        if not f.writable:
            raise io_error(errno.EBADF, "fd not open for writing")
        with f.lock:
            n = self._pwrite(f.device, data, f.pos)
            f.pos += n
        return n

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset`` (position unchanged); returns the count."""
        f = self._file(fd)
        if not f.writable:
            raise io_error(errno.EBADF, "fd not open for writing")
        _check_offset(offset)
        return self._pwrite(f.device, data, offset)

    def lseek(self, fd: int, pos: int, how: int) -> int:
        """Move the file position (SEEK_SET / SEEK_CUR / SEEK_END); returns it."""
        f = self._file(fd)
        if not isinstance(pos, int) or not isinstance(how, int):
            raise TypeError("lseek: pos and how must be integers")
        with f.lock:
            if how == os.SEEK_SET:
                new = pos
            elif how == os.SEEK_CUR:
                new = f.pos + pos
            elif how == os.SEEK_END:
                new = f.device.size + pos
            else:
                raise io_error(errno.EINVAL, f"whence {how}")
            if new < 0:
                raise io_error(errno.EINVAL, f"resulting position {new} is negative")
            f.pos = new
        return new

    def fsync(self, fd: int) -> None:
        """Flush the device's write cache (VIRTIO_BLK_T_FLUSH)."""
        self._file(fd).device.flush()

    def fdatasync(self, fd: int) -> None:
        """Same as :meth:`fsync` for a block device."""
        self.fsync(fd)

    def fstat(self, fd: int) -> os.stat_result:
        """``os.stat_result`` of the node: S_IFBLK, ``st_size`` = device size."""
        return self._stat(self._file(fd).device)

    def stat(self, path: str | os.PathLike[str]) -> os.stat_result:
        """Like :meth:`fstat` by path (ENOENT if no such device)."""
        p = os.fspath(path)
        return self._stat(self._lookup(p if isinstance(p, str) else os.fsdecode(p)))

    # ------------------------------------------------------------------ helpers
    def _lookup(self, path: str) -> BlockDevice:
        norm = os.path.normpath(path) if path else path
        name = norm[len(DEV_PREFIX) :] if norm.startswith(DEV_PREFIX) else ""
        dev = self._devices().get(name) if name and "/" not in name else None
        if dev is None:
            raise io_error(errno.ENOENT, None, path)
        return dev

    def _stat(self, dev: BlockDevice) -> os.stat_result:
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

    @staticmethod
    def _pread(dev: BlockDevice, n: int, offset: int) -> bytes:
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

    def _pwrite(self, dev: BlockDevice, data: bytes | bytearray | memoryview, offset: int) -> int:
        if isinstance(data, str):
            raise TypeError("a bytes-like object is required, not 'str'")
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        if len(mv) == 0:
            return 0
        if dev.readonly:
            raise io_error(errno.EROFS, f"{dev.name} is read-only")
        size = dev.size
        if offset >= size:
            raise io_error(errno.ENXIO, f"offset {offset} is at or past the end ({size})")
        n = min(len(mv), size - offset)
        mv = mv[:n]
        end = offset + n
        start = offset - offset % _S
        stop = -(-end // _S) * _S
        rl = self._range_lock(dev)
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


def _check_count(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"count must be an int, not {type(n).__name__}")
    if n < 0:
        raise io_error(errno.EINVAL, f"negative count {n}")


def _check_offset(offset: int) -> None:
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise TypeError(f"offset must be an int, not {type(offset).__name__}")
    if offset < 0:
        raise io_error(errno.EINVAL, f"negative offset {offset}")
