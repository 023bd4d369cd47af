"""Threads and synchronisation primitives.

Theory of operation
-------------------
``kernel`` and ``vdev`` never import :mod:`threading` themselves; they use the names
here, so that a deterministic simulated host can later substitute its own. Today the
primitives *are* :mod:`threading`'s (aliases, zero overhead). :func:`start_thread`
creates and starts a named thread (daemon by default, so a forgotten thread never keeps
the interpreter alive) and returns it; the returned :class:`Thread` offers ``join``,
``is_alive``, ``name`` and ``ident``. :func:`relax` is a busy-poll loop's pause: it
lets the other threads of this process (the GIL) and the other processes on this core
run for a moment (``sched_yield``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "Lock",
    "RLock",
    "Event",
    "Condition",
    "Semaphore",
    "BoundedSemaphore",
    "Thread",
    "start_thread",
    "current_thread_name",
    "is_main_thread",
    "relax",
]

Lock = threading.Lock
RLock = threading.RLock
Event = threading.Event
Condition = threading.Condition
Semaphore = threading.Semaphore
BoundedSemaphore = threading.BoundedSemaphore
Thread = threading.Thread


def relax() -> None:
    """One pause of a busy-poll loop: give up the CPU and the GIL for a moment
    (``sched_yield(2)``; CPython releases the GIL around it), so that a thread of this
    process waiting for the GIL and a process waiting for this core get to run while
    we spin. Returns at once when nobody is waiting."""
    os.sched_yield()


def start_thread(target: Callable[..., None], *args: Any, name: str, daemon: bool = True) -> Thread:
    """Create, start and return a thread running ``target(*args)``.

    ``name`` is mandatory: every thread in virtio-lab is named so traces and hang dumps
    say what it is.
    """
    thread = threading.Thread(target=target, args=args, name=name, daemon=daemon)
    thread.start()
    return thread


def current_thread_name() -> str:
    """Return the name of the calling thread."""
    return threading.current_thread().name


def is_main_thread() -> bool:
    """Return True when called from the interpreter's main thread."""
    return threading.current_thread() is threading.main_thread()
