"""Guest memory as the queues see it: guest-physical addresses translated to views.

A virtqueue never owns memory. Both :class:`~vdev.virtio.queue.DriverQueue` and
:class:`~vdev.virtio.queue.DeviceQueue` are handed an object with this shape:

* ``view(addr, length) -> memoryview`` — a writable view of ``length`` bytes at the
  guest-physical address ``addr``; raises :class:`AddressError` unless the whole range
  lies inside one region (a buffer may not straddle regions unnoticed);
* ``barrier()`` — a full memory barrier, called where the spec needs one (§2.7.13:
  between publishing an index and reading the other side's event index).

:class:`FlatMemory` is one contiguous region (our ZeroMQ transport: the device's shared
region, guest-physical address = offset + ``base``). :class:`RegionMemory` is several
regions, as vhost-user's SET_MEM_TABLE hands them over. Where the views come from (mmap
of POSIX shm, memfd, a bytearray in a test) is the caller's business: this module does
no I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Protocol

from .errors import AddressError, UsageError

__all__ = ["GuestMemory", "FlatMemory", "RegionMemory"]


def _no_barrier() -> None:
    return None


class GuestMemory(Protocol):
    """What a queue needs from memory."""

    def view(self, addr: int, length: int) -> memoryview:
        """Writable view of ``length`` bytes at guest-physical ``addr``."""
        ...

    def barrier(self) -> None:
        """Full memory barrier (store→load ordering)."""
        ...


class FlatMemory:
    """One contiguous region mapped at guest-physical ``base``.

    ``barrier`` is the host's full-barrier function (``hostops.full_barrier``); the
    default does nothing, which is only right when both sides run in one thread.
    """

    __slots__ = ("buf", "base", "size", "_barrier")

    def __init__(
        self,
        buf: memoryview | bytearray,
        base: int = 0,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        mv = memoryview(buf)
        if mv.readonly:
            raise UsageError("guest memory must be writable")
        self.buf = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        self.base = base
        self.size = len(self.buf)
        self._barrier = barrier or _no_barrier

    def view(self, addr: int, length: int) -> memoryview:
        """Bounds-checked view; ``AddressError`` if any byte is outside the region."""
        off = addr - self.base
        if off < 0 or length < 0 or off + length > self.size:
            raise AddressError(
                f"[{addr:#x}, +{length:#x}) is outside [{self.base:#x}, +{self.size:#x})"
            )
        return self.buf[off : off + length]

    def barrier(self) -> None:
        """Full memory barrier."""
        self._barrier()


class RegionMemory:
    """Several non-overlapping regions ``(guest_addr, buffer)``; a range must lie inside
    exactly one of them."""

    __slots__ = ("_starts", "_regions", "_barrier")

    def __init__(
        self,
        regions: Sequence[tuple[int, memoryview | bytearray]],
        barrier: Callable[[], None] | None = None,
    ) -> None:
        items = sorted(((ga, memoryview(b).cast("B")) for ga, b in regions), key=lambda r: r[0])
        for (a0, b0), (a1, _) in zip(items, items[1:], strict=False):
            if a0 + len(b0) > a1:
                raise UsageError(f"memory regions overlap at {a1:#x}")
        for ga, b in items:
            if ga < 0 or b.readonly:
                raise UsageError(f"region at {ga:#x} must be writable and non-negative")
        self._starts = [ga for ga, _ in items]
        self._regions = items
        self._barrier = barrier or _no_barrier

    def view(self, addr: int, length: int) -> memoryview:
        """Bounds-checked view inside one region; ``AddressError`` otherwise."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and length >= 0:
            ga, buf = self._regions[i]
            off = addr - ga
            if off + length <= len(buf):
                return buf[off : off + length]
        raise AddressError(f"[{addr:#x}, +{length:#x}) is not inside one memory region")

    def barrier(self) -> None:
        """Full memory barrier."""
        self._barrier()
