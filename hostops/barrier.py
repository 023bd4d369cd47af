"""A full memory barrier for rings shared between processes.

Theory of operation
-------------------
The split virtqueue needs store->load ordering at a few points (virtio 1.3 §2.7.13,
e.g. "store ``avail.idx`` before loading ``used.flags`` / ``avail_event``"); without it
both sides can decide the other needs no notification and the queue hangs (the classic
lost wake-up). Plain stores through a memoryview are ordinary ``memcpy`` stores, and
x86-64's TSO model may still let a later load pass them while they sit in the store
buffer.

:func:`full_barrier` acquires and releases an uncontended lock. CPython's lock is a POSIX
semaphore whose acquire and release are atomic read-modify-write instructions (``LOCK
CMPXCHG`` / ``LOCK XADD`` on x86-64), and every locked instruction is a full fence on x86
-- so the call orders all earlier loads and stores before all later ones. It costs about
0.1 µs. On weakly ordered CPUs (aarch64) glibc implements the semaphore with
acquire/release atomics, which is weaker than a full fence; virtio-lab's measured budget
and tests assume x86-64.
"""

from __future__ import annotations

import threading

__all__ = ["full_barrier"]

_fence = threading.Lock()


def full_barrier() -> None:
    """Order every memory access before the call before every access after it."""
    _fence.acquire()
    _fence.release()
