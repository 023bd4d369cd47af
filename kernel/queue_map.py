"""Which of a device's queues the calling thread uses: :class:`ThreadQueueMap`.

Theory of operation
-------------------
A multi-queue device (virtio-blk with VIRTIO_BLK_F_MQ, virtio-net with
VIRTIO_NET_F_MQ) gives each submitter a queue of its own, as Linux maps each CPU to one
hardware context (blk-mq) or transmit queue (``XPS``): the submitters then do not
contend for one queue's lock and each queue's completions come back together. Here a
"CPU" is a thread. Each thread gets a queue the first time it asks, round robin, and
keeps it. Threads are told apart by *name*, not by id: a thread id may be reused as
soon as its thread exits, so short-lived threads would pile onto one queue; names are
unique unless a program gives one twice (threads sharing a name share a queue). The
map is bounded: beyond :data:`MAX_THREAD_MAP` names a new thread's queue is the CRC32
of its name modulo the count (still stable for that thread, not remembered).
"""

from __future__ import annotations

import zlib

from hostops.sync import Lock, current_thread_name

__all__ = ["ThreadQueueMap", "MAX_THREAD_MAP"]

#: Most thread names a :class:`ThreadQueueMap` remembers.
MAX_THREAD_MAP = 4096


class ThreadQueueMap:
    """Stable thread -> queue index in ``0..count-1`` (see the module docstring)."""

    def __init__(self, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"a queue map needs at least one queue, got {count!r}")
        #: How many queues the threads are spread over.
        self.count = count
        self._map: dict[str, int] = {}
        self._next = 0
        self._lock = Lock()

    def current(self) -> int:
        """The queue of the calling thread (0 with a single queue)."""
        if self.count == 1:
            return 0
        name = current_thread_name()
        i = self._map.get(name)
        if i is None:
            with self._lock:
                i = self._map.get(name)
                if i is None:
                    if len(self._map) >= MAX_THREAD_MAP:
                        return zlib.crc32(name.encode()) % self.count
                    i = self._next
                    self._next = (i + 1) % self.count
                    self._map[name] = i
        return i

    def __len__(self) -> int:
        """Threads remembered."""
        return len(self._map)
