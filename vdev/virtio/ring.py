"""Split-virtqueue layout (§2.7) and the event-suppression rule both sides share.

A split virtqueue of size N (a power of two, at most 32768) has three parts, each at a
guest-physical address of its own:

=================  ===========  =====  ==================================================
part               bytes        align  contents (little-endian)
=================  ===========  =====  ==================================================
descriptor table   16·N         16     ``le64 addr; le32 len; le16 flags; le16 next``
available ring     6 + 2·N      2      ``le16 flags; le16 idx; le16 ring[N]; le16 used_event``
used ring          6 + 8·N      4      ``le16 flags; le16 idx; {le32 id; le32 len} ring[N];
                                       le16 avail_event``
=================  ===========  =====  ==================================================

Indices are free-running u16 counters; the slot of index ``i`` is ``i % N``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import MAX_QUEUE_SIZE
from .errors import UsageError

__all__ = [
    "DESC",
    "U16",
    "USED_ELEM",
    "RingLayout",
    "vring_need_event",
    "check_queue_size",
]

DESC = struct.Struct("<QIHH")  # one descriptor, 16 bytes (§2.7.5)
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # one used ring element, 8 bytes (§2.7.8)
FLAGS_IDX = struct.Struct("<HH")


def check_queue_size(size: int) -> None:
    """Raise ``UsageError`` unless ``size`` is a power of two in 1..32768 (§2.7)."""
    if not isinstance(size, int) or size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
        raise UsageError(f"queue size {size!r} is not a power of two in 1..{MAX_QUEUE_SIZE}")


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Where the three parts of one split virtqueue live (guest-physical addresses)."""

    size: int
    desc: int
    avail: int
    used: int

    @staticmethod
    def desc_bytes(size: int) -> int:
        """Size of the descriptor table."""
        return 16 * size

    @staticmethod
    def avail_bytes(size: int) -> int:
        """Size of the available ring, including ``used_event``."""
        return 6 + 2 * size

    @staticmethod
    def used_bytes(size: int) -> int:
        """Size of the used ring, including ``avail_event``."""
        return 6 + 8 * size

    @classmethod
    def packed(cls, size: int, base: int) -> RingLayout:
        """Lay the three parts out one after another from ``base`` with the spec's
        alignments (16, 2, 4)."""
        check_queue_size(size)
        desc = _align(base, 16)
        avail = desc + cls.desc_bytes(size)
        used = _align(avail + cls.avail_bytes(size), 4)
        return cls(size, desc, avail, used)

    @classmethod
    def total_bytes(cls, size: int) -> int:
        """Bytes :meth:`packed` needs from a 16-aligned base."""
        lay = cls.packed(size, 0)
        return lay.end

    @property
    def end(self) -> int:
        """First address after the used ring (for ``packed`` layouts: after all three)."""
        return max(
            self.desc + self.desc_bytes(self.size),
            self.avail + self.avail_bytes(self.size),
            self.used + self.used_bytes(self.size),
        )

    def validate(self) -> None:
        """Raise ``UsageError`` for a bad size or a misaligned part (§2.7, table in
        "Virtqueue Part Alignment")."""
        check_queue_size(self.size)
        for name, addr, align in (
            ("desc", self.desc, 16),
            ("avail", self.avail, 2),
            ("used", self.used, 4),
        ):
            if addr < 0 or addr % align:
                raise UsageError(f"{name} address {addr:#x} is not {align}-byte aligned")


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The EVENT_IDX rule (§2.7.7.2 / §2.7.10): notify iff ``event_idx`` lies in the
    window ``[old_idx, new_idx)`` of indices published since the last notification,
    computed in u16 arithmetic."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
