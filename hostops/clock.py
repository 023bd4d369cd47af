"""Clock and one-shot timers.

Theory of operation
-------------------
All time in virtio-lab is monotonic time read through this module, so that a simulated
host with a virtual clock can later replace it without touching ``kernel`` or ``vdev``.
:func:`monotonic` and :func:`monotonic_ns` are the host's monotonic clock (never jumps
with wall-clock changes). :class:`Timer` runs a callback once, on a daemon thread, after a
delay; it can be cancelled, and :meth:`Timer.cancel` tells the caller reliably whether the
callback was prevented (``True``) or has already started / run (``False``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["monotonic", "monotonic_ns", "Timer"]


def monotonic() -> float:
    """Return the host's monotonic clock in seconds."""
    return time.monotonic()


def monotonic_ns() -> int:
    """Return the host's monotonic clock in nanoseconds."""
    return time.monotonic_ns()


class Timer:
    """Run ``fn`` once on a daemon thread ``delay_s`` seconds after :meth:`start`.

    The callback runs on the timer's own thread; exceptions it raises are reported by
    :func:`threading.excepthook` and otherwise ignored.
    """

    _PENDING = 0
    _FIRED = 1
    _CANCELLED = 2

    def __init__(self, delay_s: float, fn: Callable[[], None]) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s!r}")
        self._fn = fn
        self._lock = threading.Lock()
        self._state = Timer._PENDING
        self._started = False
        self._timer = threading.Timer(delay_s, self._fire)
        self._timer.daemon = True
        self._timer.name = "hostops-timer"

    def _fire(self) -> None:
        with self._lock:
            if self._state != Timer._PENDING:
                return
            self._state = Timer._FIRED
        self._fn()

    def start(self) -> None:
        """Arm the timer. A timer can be started only once."""
        with self._lock:
            if self._started:
                raise RuntimeError("Timer already started")
            self._started = True
        self._timer.start()

    def cancel(self) -> bool:
        """Prevent the callback; return True if it will not run, False if it already ran.

        ``False`` means the callback has started (it may still be running). Cancelling a
        timer twice returns ``True`` the first time only.
        """
        with self._lock:
            if self._state != Timer._PENDING:
                return False
            self._state = Timer._CANCELLED
        self._timer.cancel()
        return True

    @property
    def fired(self) -> bool:
        """True once the callback has been started."""
        return self._state == Timer._FIRED
