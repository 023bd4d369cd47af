"""hostops -- the host-operations layer of virtio-lab.

Theory of operation
-------------------
Like LKL's ``lkl_host_operations``, this package is the only place that touches the host:
clock and timers (:mod:`hostops.clock`), a memory barrier (:mod:`hostops.barrier`),
threads and locks (:mod:`hostops.sync`), shared memory and the DMA page allocator
(:mod:`hostops.shm`), the private runtime directory for sockets (:mod:`hostops.rundir`),
ZeroMQ doorbells (:mod:`hostops.doorbell`) and the control channel
(:mod:`hostops.control`), waiting on many things at once (:mod:`hostops.poll`), device
processes (:mod:`hostops.process`) and signals (:mod:`hostops.signals`). ``kernel`` and
``vdev`` are written against these names only, so
a deterministic simulated host can later replace this package.

Every channel fails the same way: a :class:`TransportError` (:mod:`hostops.errors`).
"""

from __future__ import annotations

from hostops.barrier import full_barrier
from hostops.clock import Timer, monotonic, monotonic_ns
from hostops.control import POLL_SLICE_S, ControlClient, ControlServer
from hostops.doorbell import HIGH_WATER_MARK, Doorbell, DoorbellListener
from hostops.errors import ChannelClosed, ChannelTimeout, PeerGone, TransportError
from hostops.poll import Pollable, Poller, Waker
from hostops.process import (
    PARENT_FD_ENV,
    DeviceProcess,
    ForeignProcess,
    ParentWatch,
    SupervisedProcess,
    describe_returncode,
    python_argv,
)
from hostops.rundir import SUN_PATH_MAX, RuntimeDir, sweep_stale_rundirs
from hostops.shm import PAGE_SIZE, PageAllocator, SharedRegion, sweep_stale_segments
from hostops.signals import (
    SIGTERM_EXIT_CODE,
    ignore_sigint,
    on_terminate,
    register_atexit,
    wake_on_signals,
)
from hostops.sync import (
    BoundedSemaphore,
    Condition,
    Event,
    Lock,
    RLock,
    Semaphore,
    Thread,
    current_thread_name,
    is_main_thread,
    start_thread,
)

__all__ = [
    # errors
    "TransportError",
    "PeerGone",
    "ChannelTimeout",
    "ChannelClosed",
    # barrier
    "full_barrier",
    # clock
    "monotonic",
    "monotonic_ns",
    "Timer",
    # sync
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
    # shm
    "PAGE_SIZE",
    "SharedRegion",
    "sweep_stale_segments",
    "PageAllocator",
    # rundir
    "SUN_PATH_MAX",
    "RuntimeDir",
    "sweep_stale_rundirs",
    # poll
    "Pollable",
    "Waker",
    "Poller",
    # doorbell
    "HIGH_WATER_MARK",
    "DoorbellListener",
    "Doorbell",
    # control
    "POLL_SLICE_S",
    "ControlServer",
    "ControlClient",
    # process
    "PARENT_FD_ENV",
    "DeviceProcess",
    "ForeignProcess",
    "SupervisedProcess",
    "ParentWatch",
    "python_argv",
    "describe_returncode",
    # signals
    "SIGTERM_EXIT_CODE",
    "on_terminate",
    "wake_on_signals",
    "ignore_sigint",
    "register_atexit",
]
