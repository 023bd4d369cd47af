"""One timer heap on one thread for a whole kernel.

Theory of operation
-------------------
Protocols need many timers (an ARP entry's expiry, a retry, a reassembly timeout, later
TCP's retransmission timers), and a thread per timer or per connection does not scale.
:class:`TimerHeap` keeps every pending timer in one binary heap ordered by deadline and
runs the due callbacks on *one* service thread, started lazily by the first
:meth:`TimerHeap.call_later` and joined by :meth:`TimerHeap.close`.

Ordering: callbacks run one at a time, in deadline order; timers with the same deadline
run in the order they were armed. So a timer armed *after* another with a delay at
least as long runs after it — tests use this to wait "until the stack's timer has
fired" on an event, without sleeping.

Cancelling: :meth:`TimerHandle.cancel` marks the entry dead and returns whether it
prevented the call (False once the callback has started, or after a previous cancel).
Dead entries are skipped when they reach the top of the heap; when more than half of
the heap is dead it is compacted, so a protocol that re-arms a timer on every packet
cannot grow the heap without bound.

Callbacks run on the timer thread with no lock of the heap held: they may arm and
cancel timers (and call :meth:`close`, which then does not join its own thread). An
exception from a callback is logged and the thread goes on with the next timer. After
:meth:`close`, pending timers never run and :meth:`call_later` returns a handle that is
already cancelled (a receive path racing with shutdown must not fail).

All deadlines are read from the clock given to the heap (``hostops.clock.monotonic`` by
default), so a simulated clock can later replace it in one place.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Callable

from hostops.clock import monotonic

__all__ = ["TimerHeap", "TimerHandle"]

log = logging.getLogger(__name__)

_PENDING = 0
_RUNNING = 1  # started (or finished)
_CANCELLED = 2


class TimerHandle:
    """One armed timer of a :class:`TimerHeap` (returned by ``call_later``)."""

    __slots__ = ("when", "_seq", "_fn", "_heap", "_state")

    def __init__(
        self, when: float, seq: int, fn: Callable[[], None], heap: TimerHeap | None
    ) -> None:
        #: The deadline, in the heap's clock.
        self.when = when
        self._seq = seq
        self._fn = fn
        self._heap = heap
        self._state = _PENDING if heap is not None else _CANCELLED

    def __lt__(self, other: TimerHandle) -> bool:
        return (self.when, self._seq) < (other.when, other._seq)

    def cancel(self) -> bool:
        """Prevent the callback. True if it will not run because of this call; False if
        it has already started or was cancelled before."""
        heap = self._heap
        if heap is None:
            return False
        return heap._cancel(self)

    @property
    def cancelled(self) -> bool:
        """True once cancelled (or armed on a closed heap)."""
        return self._state == _CANCELLED

    @property
    def fired(self) -> bool:
        """True once the callback has started."""
        return self._state == _RUNNING

    def __repr__(self) -> str:
        state = {_PENDING: "pending", _RUNNING: "fired", _CANCELLED: "cancelled"}[self._state]
        return f"<TimerHandle at {self.when:.6f} {state}>"


class TimerHeap:
    """Every timer of a kernel, on one thread (see the module docstring).

    ``clock`` returns seconds (monotonic); ``name`` names the service thread.
    """

    def __init__(self, name: str = "timers", clock: Callable[[], float] = monotonic) -> None:
        self._name = name
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[TimerHandle] = []
        self._dead = 0  # cancelled entries still in the heap
        self._seq = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        #: Callbacks run so far and callbacks that raised (counters tests assert on).
        self.fired = 0
        self.failed = 0

    # -- arming
    def now(self) -> float:
        """The heap's clock."""
        return self._clock()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn()`` on the timer thread ``delay_s`` seconds from now (>= 0)."""
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s!r}")
        return self.call_at(self._clock() + delay_s, fn)

    def call_at(self, when: float, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn()`` on the timer thread at ``when`` (the heap's clock)."""
        with self._cond:
            if self._closed:
                return TimerHandle(when, 0, fn, None)
            self._seq += 1
            h = TimerHandle(when, self._seq, fn, self)
            heapq.heappush(self._heap, h)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0] is h:
                self._cond.notify()  # a new earliest deadline
            return h

    def _cancel(self, h: TimerHandle) -> bool:
        with self._cond:
            if h._state != _PENDING:
                return False
            h._state = _CANCELLED
            h._fn = _nothing  # drop references the callback holds
            self._dead += 1
            if self._dead > 64 and self._dead * 2 > len(self._heap):
                self._heap = [x for x in self._heap if x._state == _PENDING]
                heapq.heapify(self._heap)
                self._dead = 0
            return True

    # -- inspection
    def __len__(self) -> int:
        """Pending (not cancelled, not started) timers."""
        with self._cond:
            return len(self._heap) - self._dead

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def thread_alive(self) -> bool:
        """Whether the service thread is running (it starts with the first timer)."""
        t = self._thread
        return t is not None and t.is_alive()

    # -- the service thread
    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                fn: Callable[[], None] | None = None
                while fn is None:
                    if self._closed:
                        return
                    if not self._heap:
                        cond.wait()
                        continue
                    top = self._heap[0]
                    if top._state != _PENDING:
                        heapq.heappop(self._heap)
                        self._dead -= 1
                        continue
                    delay = top.when - self._clock()
                    if delay > 0:
                        cond.wait(delay)
                        continue
                    heapq.heappop(self._heap)
                    top._state = _RUNNING
                    fn = top._fn
                    top._fn = _nothing
            try:
                fn()
                self.fired += 1
            except Exception:
                self.failed += 1
                log.exception("timer callback %r failed", fn)

    # -- shutdown
    def close(self) -> None:
        """Drop every pending timer, stop the thread and join it (unless called from a
        callback on that very thread). Idempotent."""
        with self._cond:
            self._closed = True
            for h in self._heap:
                if h._state == _PENDING:
                    h._state = _CANCELLED
                    h._fn = _nothing
            self._heap.clear()
            self._dead = 0
            self._cond.notify_all()
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()

    def __enter__(self) -> TimerHeap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nothing() -> None:
    return None
