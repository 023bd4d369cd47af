"""A full memory barrier for code that shares memory with another process.

CPython gives no fence primitive. Acquiring and releasing an uncontended lock performs
an atomic read-modify-write (``lock cmpxchg`` on x86, acquire/release on ARM), which
orders every earlier store before every later load — what §2.7.13 needs between
publishing a ring index and reading the peer's event index.
"""

from __future__ import annotations

import threading

__all__ = ["full_barrier"]

_fence = threading.Lock()


def full_barrier() -> None:
    """Order all earlier memory stores before all later loads (store→load fence)."""
    with _fence:
        pass
