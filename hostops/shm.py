"""Shared-memory regions and a page allocator for DMA buffers.

Theory of operation
-------------------
A POSIX shared-memory segment, created with :meth:`SharedRegion.create` and mapped by
the peer process with :meth:`SharedRegion.attach`, is one way to share a device's
memory by name (test harnesses and tools use it; the kernel itself now hands its device
processes a sealed memfd instead, :mod:`hostops.fdmem`, which a restarted process can
map again and nobody can truncate). The rings and every buffer the driver hands to the device
live inside it; a descriptor address is an *offset* into the region (the device's
"guest-physical address").

Names are ``/vlab-<creator pid>-<tag>-<random hex>``, created with ``O_CREAT|O_EXCL`` and
mode ``0600``; the size is rounded up to a whole number of 4096-byte pages.

Leak-proof rule: **the creator unlinks the name as soon as the peer confirms it has
mapped the region** (or right after handing the peer a file descriptor). From then on
the memory lives exactly as long as some process maps it, so a SIGKILL of anyone leaves
nothing in ``/dev/shm``. The window between create and that confirmation is covered by
:func:`sweep_stale_segments`, which removes segments whose creator pid is dead (run it
at start-up). One exception: a kernel attached to a device process it did not start
(``kernel.Attach``) keeps the name linked while it is attached, because a restarted
device must map the same memory again by name; it unlinks it at shutdown, and a
SIGKILLed kernel's segment is swept the same way. Using a region as a context manager
unlinks it on exit when this side created it.

Closing: :meth:`SharedRegion.close` releases the mapping. Callers must release the
sub-views they sliced out of :attr:`SharedRegion.buf` (``with region.buf[a:b] as v`` or
``v.release()``) before closing; if some are still alive ``close`` does not raise -- it
drops its own references and the mapping is unmapped when the last view is garbage
collected.

:class:`PageAllocator` hands out page-aligned ranges of a region for DMA buffers. It is a
binary buddy allocator over power-of-two page counts: allocation and free are O(log n),
every block is naturally aligned to its own size, and freeing coalesces buddies so that
freeing everything returns the pool to its initial state. A request is rounded up to a
power-of-two number of pages (``used_bytes`` counts the rounded size).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import threading
from types import TracebackType

import posix_ipc

from hostops._util import pid_alive

__all__ = ["PAGE_SIZE", "SharedRegion", "sweep_stale_segments", "PageAllocator"]

PAGE_SIZE = 4096
"""Granularity of region sizes and the default allocator page."""

_SHM_DIR = "/dev/shm"
_TAG_RE = re.compile(r"[A-Za-z0-9_.]{1,32}")
_STALE_RE = re.compile(r"vlab-([0-9]+)-")


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class SharedRegion:
    """A POSIX shared-memory segment mapped read-write with :mod:`mmap`.

    Build one with :meth:`create` (the kernel side) or :meth:`attach` (the device side);
    the constructor is internal.
    """

    def __init__(self, name: str, size: int, fd: int, mapping: mmap.mmap, created: bool) -> None:
        self._name = name
        self._size = size
        self._fd: int | None = fd
        self._mmap: mmap.mmap | None = mapping
        self._view: memoryview | None = memoryview(mapping)
        self._created = created
        self._unlinked = False
        self._lock = threading.Lock()

    # -- construction -------------------------------------------------------------

    @classmethod
    def create(cls, size: int, tag: str = "dev") -> SharedRegion:
        """Create a new segment of at least ``size`` bytes (rounded up to 4096) and map it.

        The name is ``/vlab-<pid>-<tag>-<random hex>``; ``tag`` must match
        ``[A-Za-z0-9_.]{1,32}``. The new memory is zero-filled.
        """
        if size <= 0:
            raise ValueError(f"region size must be > 0, got {size}")
        if not _TAG_RE.fullmatch(tag):
            raise ValueError(f"region tag must match [A-Za-z0-9_.]{{1,32}}, got {tag!r}")
        size = _round_up(size, PAGE_SIZE)
        while True:
            name = f"/vlab-{os.getpid()}-{tag}-{secrets.token_hex(8)}"
            try:
                shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
            except posix_ipc.ExistentialError:  # pragma: no cover - 64 random bits collided
                continue
            break
        fd = shm.fd
        try:
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            posix_ipc.unlink_shared_memory(name)
            raise
        return cls(name, size, fd, mapping, created=True)

    @classmethod
    def attach(cls, name: str, size: int) -> SharedRegion:
        """Open the existing segment ``name`` and map its first ``size`` bytes.

        Raises :class:`FileNotFoundError` if there is no such segment and
        :class:`ValueError` if it is smaller than ``size``.
        """
        if size <= 0:
            raise ValueError(f"region size must be > 0, got {size}")
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as exc:
            raise FileNotFoundError(f"no shared-memory segment named {name!r}") from exc
        fd = shm.fd
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise ValueError(
                    f"shared-memory segment {name!r} has {actual} bytes, {size} requested"
                )
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, size, fd, mapping, created=False)

    # -- properties -----------------------------------------------------------------

    @property
    def name(self) -> str:
        """The segment's POSIX name (``/vlab-...``); still reported after unlink."""
        return self._name

    @property
    def size(self) -> int:
        """Mapped size in bytes."""
        return self._size

    @property
    def buf(self) -> memoryview:
        """Writable memoryview of the whole mapping. Raises ValueError once closed."""
        view = self._view
        if view is None:
            raise ValueError(f"shared region {self._name} is closed")
        return view

    @property
    def fd(self) -> int | None:
        """The segment's file descriptor, or None once closed."""
        return self._fd

    @property
    def created(self) -> bool:
        """True if this side created the segment (and so is the one to unlink it)."""
        return self._created

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._view is None and self._mmap is None

    # -- teardown -----------------------------------------------------------------

    def unlink(self) -> None:
        """Remove the segment's name. Idempotent; both sides keep their mappings."""
        with self._lock:
            if self._unlinked:
                return
            self._unlinked = True
        try:
            posix_ipc.unlink_shared_memory(self._name)
        except posix_ipc.ExistentialError:
            pass

    def close(self) -> None:
        """Unmap and close the fd. Idempotent and never raises.

        Sub-views of :attr:`buf` should be released first; if some are still exported the
        mapping is left for the garbage collector to unmap when the last one goes away.
        """
        with self._lock:
            view, self._view = self._view, None
            mapping, self._mmap = self._mmap, None
            fd, self._fd = self._fd, None
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # exported views remain; the mapping dies with the last of them
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Unlink (if this side created the region) and close."""
        if self._created:
            self.unlink()
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<SharedRegion {self._name} size={self._size} {state}>"


def sweep_stale_segments() -> list[str]:
    """Remove ``/dev/shm/vlab-<pid>-*`` segments whose creator ``pid`` is dead.

    Returns the POSIX names (``/vlab-...``) that were removed. Segments of live processes
    (including this one) are left alone.
    """
    removed: list[str] = []
    try:
        entries = os.listdir(_SHM_DIR)
    except FileNotFoundError:
        return removed
    for entry in sorted(entries):
        match = _STALE_RE.match(entry)
        if match is None:
            continue
        if pid_alive(int(match.group(1))):
            continue
        try:
            posix_ipc.unlink_shared_memory("/" + entry)
        except posix_ipc.Error:  # gone meanwhile, or not ours to remove
            continue
        removed.append("/" + entry)
    return removed


class PageAllocator:
    """Buddy allocator of page-aligned address ranges ``[base, base + size)``.

    Addresses are plain integers (typically offsets into a :class:`SharedRegion`). A
    request of ``nbytes`` is rounded up to ``2**k`` pages; the returned address is aligned
    to that block size relative to ``base``. Thread-safe; O(log(size / page)).
    A ``size`` that is not a multiple of ``page`` is truncated to whole pages.
    """

    def __init__(self, base: int, size: int, page: int = PAGE_SIZE) -> None:
        if page <= 0:
            raise ValueError(f"page must be > 0, got {page}")
        if base < 0:
            raise ValueError(f"base must be >= 0, got {base}")
        npages = size // page
        if npages <= 0:
            raise ValueError(f"pool of {size} bytes holds no {page}-byte page")
        self._base = base
        self._page = page
        self._npages = npages
        self._max_order = npages.bit_length() - 1
        # _free[k]: page indices of free blocks of 2**k pages.
        self._free: list[set[int]] = [set() for _ in range(self._max_order + 1)]
        self._allocated: dict[int, int] = {}  # page index -> order
        self._used_pages = 0
        self._lock = threading.Lock()
        start = 0
        for order in range(self._max_order, -1, -1):  # binary decomposition of npages
            if npages & (1 << order):
                self._free[order].add(start)
                start += 1 << order

    @property
    def base(self) -> int:
        """First address of the pool."""
        return self._base

    @property
    def page(self) -> int:
        """Page size in bytes."""
        return self._page

    @property
    def capacity(self) -> int:
        """Usable size of the pool in bytes (whole pages)."""
        return self._npages * self._page

    @property
    def used_bytes(self) -> int:
        """Bytes handed out, counting each allocation at its rounded block size."""
        return self._used_pages * self._page

    @property
    def free_bytes(self) -> int:
        """Bytes not handed out (possibly fragmented)."""
        return (self._npages - self._used_pages) * self._page

    def _order_for(self, nbytes: int) -> int:
        pages = -(-nbytes // self._page)
        return (pages - 1).bit_length()

    def alloc(self, nbytes: int) -> int | None:
        """Allocate at least ``nbytes``; return the address, or None if no block fits.

        Raises ValueError if ``nbytes <= 0`` or ``nbytes`` exceeds the whole pool.
        """
        if nbytes <= 0:
            raise ValueError(f"allocation size must be > 0, got {nbytes}")
        if nbytes > self.capacity:
            raise ValueError(f"allocation of {nbytes} bytes exceeds pool of {self.capacity}")
        order = self._order_for(nbytes)
        if order > self._max_order:
            return None
        with self._lock:
            k = order
            while k <= self._max_order and not self._free[k]:
                k += 1
            if k > self._max_order:
                return None
            index = self._free[k].pop()
            while k > order:  # split, keeping the lower half
                k -= 1
                self._free[k].add(index + (1 << k))
            self._allocated[index] = order
            self._used_pages += 1 << order
        return self._base + index * self._page

    def free(self, addr: int) -> None:
        """Return the block starting at ``addr``. ValueError on unknown or double free."""
        offset = addr - self._base
        index, rem = divmod(offset, self._page)
        with self._lock:
            order = self._allocated.pop(index, None) if rem == 0 and offset >= 0 else None
            if order is None:
                raise ValueError(f"free of address {addr:#x} that is not allocated")
            self._used_pages -= 1 << order
            while order < self._max_order:
                buddy = index ^ (1 << order)
                free_list = self._free[order]
                if buddy not in free_list:
                    break
                free_list.remove(buddy)
                index = min(index, buddy)
                order += 1
            self._free[order].add(index)

    def block_size(self, addr: int) -> int:
        """Size in bytes of the allocated block at ``addr`` (ValueError if not allocated)."""
        offset = addr - self._base
        index, rem = divmod(offset, self._page)
        with self._lock:
            order = self._allocated.get(index) if rem == 0 and offset >= 0 else None
        if order is None:
            raise ValueError(f"address {addr:#x} is not allocated")
        return (1 << order) * self._page
