"""The trace sink: buffered, whole-line writes of trace events to one file shared by
every process of a run.

Theory of operation
-------------------
Every process of a traced run (the kernel and each device process) opens the same
file with ``O_APPEND`` and writes whole lines only: events are buffered in memory and
written in batches with one ``write()`` each (a regular file opened ``O_APPEND``
moves its offset atomically per ``write()``, so batches from different processes never
interleave inside a line; for a pipe each batch is cut at line boundaries to at most
``PIPE_BUF`` bytes, which POSIX makes atomic). A batch goes out when it reaches
:data:`BATCH_EVENTS` events, when :data:`FLUSH_INTERVAL_NS` passed since the last
write (checked on the next event, never by a timer), on :meth:`TraceSink.flush` (the
device loop calls it when it goes idle, the kernel at shutdown) and at interpreter
exit (``atexit``). A process killed with SIGKILL loses at most its unwritten batch: the
file still holds whole lines only, a valid (truncated) trace.

No doorbell, control message or other round trip is made per event. The clock is
``time.monotonic_ns`` (CLOCK_MONOTONIC), the same for every process on one host.

How processes find the destination: :data:`TRACE_ENV` (``VLAB_TRACE=PATH``) in the
environment. A kernel booted with ``trace=PATH`` sets :func:`child_environment` for the
device processes it starts (``hostops.process`` adds it to their environment), together
with :data:`DEVICE_ENV` (the device's name) and :data:`KERNEL_ENV` (the kernel's pid).
"""

from __future__ import annotations

import atexit
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable

__all__ = [
    "TraceSink",
    "TRACE_ENV",
    "DEVICE_ENV",
    "KERNEL_ENV",
    "BATCH_EVENTS",
    "FLUSH_INTERVAL_NS",
    "clock_ns",
    "open_sink",
    "sink_from_env",
    "child_environment",
    "set_child_destination",
]

TRACE_ENV = "VLAB_TRACE"
"""Environment variable naming the trace file (JSON Lines)."""
DEVICE_ENV = "VLAB_TRACE_DEVICE"
"""Environment variable giving a device process its name in the trace."""
KERNEL_ENV = "VLAB_TRACE_KERNEL"
"""Environment variable giving a device process its kernel's pid."""

#: Events buffered before a write.
BATCH_EVENTS = 256
#: A buffered event waits at most this long for the next one to flush it.
FLUSH_INTERVAL_NS = 100_000_000

_PIPE_BUF = 4096

#: The one clock of every trace: CLOCK_MONOTONIC in nanoseconds.
clock_ns: Callable[[], int] = time.monotonic_ns


class TraceSink:
    """Buffered whole-line writer to ``fd`` (owned: closed by :meth:`close` when
    ``own``). Thread-safe; :meth:`write` takes one encoded line (ending in a newline)."""

    def __init__(self, fd: int, *, own: bool = True, path: str | None = None) -> None:
        self.fd = fd
        self.path = path
        self._own = own
        self._pipe = not stat.S_ISREG(os.fstat(fd).st_mode)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._last = clock_ns()
        self._closed = False
        #: Events written and write errors (plain counters).
        self.events = 0
        self.write_errors = 0
        _live.add(self)

    def write(self, line: str) -> None:
        """Buffer one encoded event line; write the batch when it is full or old."""
        with self._lock:
            if self._closed:
                return
            lines = self._lines
            lines.append(line)
            self.events += 1
            if len(lines) >= BATCH_EVENTS or clock_ns() - self._last > FLUSH_INTERVAL_NS:
                self._flush_locked()

    def flush(self) -> None:
        """Write every buffered line now."""
        with self._lock:
            if not self._closed:
                self._flush_locked()

    def _flush_locked(self) -> None:
        self._last = clock_ns()
        lines, self._lines = self._lines, []
        if not lines:
            return
        if self._pipe:
            chunks: list[bytes] = []
            cur: list[bytes] = []
            size = 0
            for line in lines:
                b = line.encode()
                if cur and size + len(b) > _PIPE_BUF:
                    chunks.append(b"".join(cur))
                    cur, size = [], 0
                cur.append(b)
                size += len(b)
            if cur:
                chunks.append(b"".join(cur))
        else:
            chunks = ["".join(lines).encode()]
        for data in chunks:
            view = memoryview(data)
            try:
                while view:  # bounded: each write moves at least one byte or raises
                    n = os.write(self.fd, view)
                    if n <= 0:
                        break
                    view = view[n:]
            except OSError:
                self.write_errors += 1
                return

    def close(self) -> None:
        """Flush and close (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._flush_locked()
            self._closed = True
        _live.discard(self)
        if self._own:
            try:
                os.close(self.fd)
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed


_live: weakref.WeakSet[TraceSink] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    for sink in list(_live):
        try:
            sink.flush()
        except Exception:
            pass


_shared: dict[str, TraceSink] = {}
_shared_lock = threading.Lock()


def open_sink(path: str) -> TraceSink:
    """The process's sink for ``path`` (one per path per process, opened with
    ``O_APPEND | O_CREAT``, mode 0644). Raises ``OSError`` if it cannot be opened."""
    key = os.path.abspath(path)
    with _shared_lock:
        sink = _shared.get(key)
        if sink is not None and not sink.closed:
            return sink
        fd = os.open(key, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        sink = _shared[key] = TraceSink(fd, path=key)
        return sink


def sink_from_env() -> TraceSink | None:
    """The sink named by ``VLAB_TRACE`` (None if unset or empty). Raises ``OSError``
    if the file cannot be opened."""
    path = os.environ.get(TRACE_ENV, "")
    return open_sink(path) if path else None


_child_dest: str | None = None


def set_child_destination(path: str | None) -> str | None:
    """Set the trace file device processes started from now on write to (None: only
    what ``VLAB_TRACE`` says); returns the previous value."""
    global _child_dest
    old, _child_dest = _child_dest, path
    return old


def child_environment(name: str) -> dict[str, str]:
    """Environment entries for a device process called ``name``: the trace file, its
    name and the kernel's pid ({} when nothing is traced)."""
    dest = _child_dest or os.environ.get(TRACE_ENV, "")
    if not dest:
        return {}
    return {TRACE_ENV: os.path.abspath(dest), DEVICE_ENV: name, KERNEL_ENV: str(os.getpid())}
