"""Shared memory passed as file descriptors (vhost-user's SET_MEM_TABLE).

Theory of operation
-------------------
A vhost-user front-end shares guest RAM by passing one fd per memory region (a memfd,
a file on hugetlbfs or /dev/shm) with the region's size and its offset in the fd.
:meth:`MappedFd.map` maps ``size`` bytes at ``offset`` shared and read-write, after
checking with ``fstat`` that the fd is a regular file at least ``offset + size`` bytes
long: a region claiming more than the file holds is a clean :class:`MappingError` now,
not a ``SIGBUS`` the first time a descriptor points past the end. (A front-end that
*shrinks* the file afterwards can still cause a SIGBUS; sealed memfds,
``F_SEAL_SHRINK``, rule that out: :attr:`MappedFd.sealed` says whether it is.)

The offset need not be page-aligned: the mapping starts at the page below it and
:attr:`MappedFd.buf` is the ``size``-byte window that was asked for. The mapping
outlives the fd (the caller closes its fd whenever it likes).

:func:`create_memfd` makes an anonymous memory file of a given size and maps it: what a
front-end (a test, a VMM written in Python) shares with a back-end. With ``seal=True``
(or :func:`seal_memfd`) its size is sealed first (``F_SEAL_SHRINK | F_SEAL_GROW |
F_SEAL_SEAL``), so the peer can never truncate it under the creator's mapping. The
kernel's ZeroMQ transport creates its memfd empty (:func:`new_memfd`) before it starts
the device process, which inherits it (its number in ``VLAB_MEM_FD``), and sizes, seals
and maps it later (:func:`size_and_seal`): a restarted device process inherits the
same memory again.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat

__all__ = [
    "MappedFd",
    "MappingError",
    "create_memfd",
    "new_memfd",
    "size_and_seal",
    "seal_memfd",
    "require_shrink_seal",
    "SIZE_SEALS",
    "PAGE_SIZE",
    "MEM_FD_ENV",
]

PAGE_SIZE = mmap.PAGESIZE
#: Environment variable naming the memfd a device process inherited from the kernel
#: (the only fd number its SET_MEM_TABLE may name).
MEM_FD_ENV = "VLAB_MEM_FD"
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


class MappingError(ValueError):
    """The fd cannot back the region asked for (not a regular file, too small, bad
    size or offset, or mmap failed). Nothing was mapped."""


class MappedFd:
    """A shared read-write mapping of part of a file descriptor."""

    __slots__ = ("_mmap", "_view", "size", "offset", "sealed")

    def __init__(self, mapping: mmap.mmap, view: memoryview, size: int, offset: int, sealed: bool):
        self._mmap: mmap.mmap | None = mapping
        self._view: memoryview | None = view
        self.size = size
        self.offset = offset
        self.sealed = sealed

    @classmethod
    def map(cls, fd: int, size: int, offset: int = 0) -> MappedFd:
        """Map ``size`` bytes of ``fd`` from ``offset`` (checked against ``fstat``)."""
        if size <= 0 or offset < 0:
            raise MappingError(f"bad region: size {size}, offset {offset}")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise MappingError(f"fstat fd {fd}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise MappingError(f"fd {fd} is not a regular file or memfd")
        if offset + size > st.st_size:
            raise MappingError(
                f"fd {fd} holds {st.st_size} bytes; region needs {offset + size} "
                f"(offset {offset:#x} + size {size:#x})"
            )
        start = offset - offset % PAGE_SIZE
        delta = offset - start
        try:
            mapping = mmap.mmap(
                fd,
                size + delta,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start,
            )
        except (OSError, ValueError, OverflowError) as e:
            raise MappingError(f"mmap fd {fd} ({size:#x} bytes at {offset:#x}): {e}") from None
        try:
            seals = fcntl.fcntl(fd, _F_GET_SEALS)
        except OSError:
            seals = 0
        view = memoryview(mapping)[delta : delta + size]
        return cls(mapping, view, size, offset, bool(seals & _F_SEAL_SHRINK))

    @property
    def buf(self) -> memoryview:
        """The ``size`` mapped bytes (writable)."""
        if self._view is None:
            raise ValueError("mapping is closed")
        return self._view

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._view is None

    def close(self) -> None:
        """Unmap. Idempotent and never raises: if sub-views of :attr:`buf` are still
        alive the mapping is left for the garbage collector to unmap with the last one."""
        view, self._view = self._view, None
        mapping, self._mmap = self._mmap, None
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass

    def __enter__(self) -> MappedFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<MappedFd {self.size:#x} bytes at {self.offset:#x}{' closed' if self.closed else ''}>"
        )


#: The seals :func:`seal_memfd` applies: the size can never change again, nor the seals.
SIZE_SEALS = (
    getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
    | getattr(fcntl, "F_SEAL_GROW", 0x0004)
    | getattr(fcntl, "F_SEAL_SEAL", 0x0001)
)
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)


def seal_memfd(fd: int) -> None:
    """Seal ``fd`` (a memfd created with MFD_ALLOW_SEALING) against shrinking, growing
    and further sealing (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``): a peer holding
    it can no longer truncate it under our mapping (no SIGBUS). OSError if it cannot."""
    fcntl.fcntl(fd, _F_ADD_SEALS, SIZE_SEALS)


def require_shrink_seal(fd: int) -> bool:
    """Make sure nobody can shrink ``fd`` under a mapping of it (a back-end's defence
    against a front-end that would ``ftruncate`` guest RAM and make our next access die
    of SIGBUS): True if ``F_SEAL_SHRINK`` was already set, False if we could add it now
    (a memfd created with ``MFD_ALLOW_SEALING`` and not yet ``F_SEAL_SEAL``-ed).
    :class:`MappingError` if the fd cannot be sealed (not a memfd: a file on tmpfs or
    hugetlbfs; or a memfd whose seals are locked without ``F_SEAL_SHRINK``): such a
    region must be refused."""
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError as e:
        raise MappingError(
            f"fd {fd} cannot be sealed ({e.strerror}: not a memfd), so its size could "
            "change under our mapping; share guest RAM as a sealed memfd"
        ) from None
    if seals & _F_SEAL_SHRINK:
        return True
    try:
        fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK)
    except OSError as e:
        raise MappingError(
            f"fd {fd} is not sealed against shrinking (F_SEAL_SHRINK) and cannot be "
            f"sealed now ({e.strerror}; created without MFD_ALLOW_SEALING?)"
        ) from None
    return False


def new_memfd(name: str = "vlab") -> int:
    """A new, empty memfd (close-on-exec, sealing allowed): hand it to a child process
    at launch (``pass_fds``), give it its size later with :func:`size_and_seal`."""
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def size_and_seal(fd: int, size: int) -> MappedFd:
    """Give the memfd ``fd`` its ``size``, seal it (:func:`seal_memfd`) and map it.
    A peer that already holds the fd and changed its size before the seal is caught
    here (:class:`MappingError`): after the seal nobody can change it any more."""
    if size <= 0:
        raise MappingError(f"bad memfd size {size}")
    try:
        os.ftruncate(fd, size)
        seal_memfd(fd)
    except OSError as e:
        raise MappingError(f"memfd {fd}: cannot size/seal it: {e.strerror}") from None
    st = os.fstat(fd)
    if st.st_size != size:
        raise MappingError(f"memfd {fd} is {st.st_size} bytes after sealing, not {size}")
    return MappedFd.map(fd, size, 0)


def create_memfd(size: int, name: str = "vlab", *, seal: bool = False) -> tuple[int, MappedFd]:
    """A new memfd of ``size`` bytes (close-on-exec) and its mapping. The caller owns
    the fd (pass it to a back-end, then close it) and the mapping. With ``seal`` its
    size is sealed (:func:`seal_memfd`) before it is mapped."""
    if size <= 0:
        raise MappingError(f"bad memfd size {size}")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if seal:
            seal_memfd(fd)
        return fd, MappedFd.map(fd, size, 0)
    except BaseException:
        os.close(fd)
        raise
