"""Hybrid polling: how long one side busy-polls its rings before it sleeps.

Theory of operation
-------------------
A doorbell between two Python processes costs tens of microseconds (a ZeroMQ message
crosses four threads; an eventfd wakes a sleeping process), far more than looking at a
ring index (a fraction of a microsecond). So after a side has served a ring -- the
device drained the avail ring, the driver reaped the used ring with requests still in
flight -- it may leave notifications *off* and watch the ring's index for a short
window instead of sleeping at once, as Linux's blk-mq hybrid polling, vhost's
``busyloop_timeout`` and NAPI do. If the peer's next chain (or completion) shows up
within the window, it is served and nobody rang a doorbell: with EVENT_IDX the index
we leave behind is one the peer has already passed, so it does not notify
(§2.7.10); without it the NO_NOTIFY / NO_INTERRUPT flag stays set.

When the window ends empty, the side *arms* notifications (avail_event / used_event to
the position it has reached, or the flag cleared), re-checks the ring and only then
sleeps -- the same disable–re-enable–re-check step every drain ends with, so a chain
published while the window was ending is either seen by the re-check or finds the
event armed and rings the doorbell: the poll adds no lost-wake-up window of its own.

:class:`PollWindow` decides how long to poll; it holds no clock (callers pass the
seconds they measured) and no I/O. The window adapts as KVM's halt polling does:

* a poll that finds work leaves the window as it is (:meth:`PollWindow.hit`);
* a poll that ends empty (:meth:`PollWindow.miss`) is judged by the sleep after it
  (:meth:`PollWindow.slept`): woken by the peer's work after less than
  :attr:`PollWindow.long_s` -- the window was too short: it doubles (from 0 it starts
  at ``min_s``); asleep for ``long_s`` or more -- polling was wasted: it halves, and
  below ``min_s`` it is 0. ``long_s`` is twice ``max_s``: the sleep we measure also
  holds the doorbell's own delivery (a ZeroMQ message to a sleeping process takes
  about as long as a window), so a peer that answered within ``max_s`` of our arming
  wakes us in less than ``2 * max_s``;
* a side only polls right after it served work, and only while the window is not 0;
* a device's poll that had to wait for the CPU -- a pause between two looks at the
  ring of :data:`CONTENDED_US` or more: another process was waiting for the core --
  ends at once and halves the window (:meth:`PollWindow.contended`): with more
  runnable processes than cores (a packet crosses five on its way between two
  kernels), spinning takes the CPU from the very process that would produce the work
  (measured: UDP_STREAM at 64 KiB 1.2 → 2.3 Gbit/s). The kernel's interrupt thread
  does not apply it: its pauses are mostly the interpreter lock going to the
  application's thread, which is how a caller woken by a completion gets to submit
  its next request while the thread polls (and stopping there cost blk and TCP up to
  a quarter of their throughput).

An idle side therefore spends no CPU on polling: it polls at most once after its last
piece of work, and its next wake-up after a long sleep shrinks the window towards 0; a
busy side with a quick peer polls just long enough to catch it. ``max_s`` 0 turns
polling off (:attr:`PollWindow.enabled`): every drain then arms at once, as before.
``adaptive=False`` pins the window at ``max_s`` (as vhost's ``busyloop_timeout``): it
never grows, shrinks or turns off -- for measurements and tests that want every poll
to last the bound whatever the machine's load (an idle side still spends nothing: it
polls only after work).

Counters (plain numbers, reported by both sides' metrics): :attr:`PollWindow.hits`,
:attr:`PollWindow.misses`, :attr:`PollWindow.spent` (seconds spent polling),
:attr:`PollWindow.grown`, :attr:`PollWindow.shrunk`; :meth:`PollWindow.metrics` gives
them as integers (microseconds for times) together with the current window.
"""

from __future__ import annotations

from vdev.virtio.errors import UsageError

__all__ = ["PollWindow", "DEFAULT_POLL_US", "MAX_POLL_US", "CONTENDED_US"]

#: Default upper bound of the poll window, in microseconds, on both sides (KVM's
#: default halt-polling bound is the same 200 µs).
DEFAULT_POLL_US = 200
#: Largest upper bound accepted (10 ms): a longer spin would hold a core and delay the
#: side's other event sources (control channel, parent watch, timers) noticeably.
MAX_POLL_US = 10_000
#: A pause this long between two looks at the ring means the poller waited for the CPU
#: (a scheduler time slice or a GIL hand-over is far longer; one look takes ~1 µs).
CONTENDED_US = 50


class PollWindow:
    """The adaptive busy-poll window of one side (see the module docstring).

    ``max_us`` bounds the window (0: polling off); ``min_us`` (default ``max_us / 16``)
    is the smallest window kept -- a shrink below it turns polling off until a short
    sleep turns it on again. Raises :class:`UsageError` for values out of range.
    """

    __slots__ = (
        "max_s",
        "min_s",
        "long_s",
        "window",
        "hits",
        "misses",
        "spent",
        "grown",
        "shrunk",
        "contended_polls",
        "adaptive",
    )

    def __init__(
        self,
        max_us: float = DEFAULT_POLL_US,
        min_us: float | None = None,
        *,
        adaptive: bool = True,
    ) -> None:
        if (
            isinstance(max_us, bool)
            or not isinstance(max_us, int | float)
            or not 0 <= max_us <= MAX_POLL_US
        ):
            raise UsageError(f"poll window {max_us!r} µs is not a number in 0..{MAX_POLL_US}")
        if min_us is None:
            min_us = max_us / 16
        if isinstance(min_us, bool) or not isinstance(min_us, int | float) or min_us < 0:
            raise UsageError(f"minimum poll window {min_us!r} µs is not a number >= 0")
        #: Upper bound of the window, seconds (0: polling off).
        self.max_s = max_us / 1e6
        #: Smallest window kept, seconds.
        self.min_s = min(self.max_s, min_us / 1e6)
        #: A sleep this long or longer says the peer is idle (2 × ``max_s``).
        self.long_s = 2 * self.max_s
        #: Whether the window adapts (else it stays at ``max_s``).
        self.adaptive = bool(adaptive)
        #: The current window, seconds (0: arm and sleep at once). It starts at the
        #: minimum: the first polls teach it the peer's pace (fixed: the bound).
        self.window = self.min_s if self.adaptive else self.max_s
        #: Polls that found work.
        self.hits = 0
        #: Polls whose window ended empty.
        self.misses = 0
        #: Seconds spent polling, hits and misses.
        self.spent = 0.0
        #: Times the window grew (a short sleep followed a miss or no poll).
        self.grown = 0
        #: Times the window shrank (a long sleep: the poll was wasted).
        self.shrunk = 0
        #: Polls ended because the poller had waited for the CPU (see :meth:`contended`).
        self.contended_polls = 0

    @property
    def enabled(self) -> bool:
        """Polling is configured at all (``max_us`` > 0)."""
        return self.max_s > 0

    def hit(self, spent_s: float) -> None:
        """A poll found work after ``spent_s`` seconds."""
        self.hits += 1
        self.spent += spent_s

    def miss(self, spent_s: float) -> None:
        """A poll's window of ``spent_s`` seconds ended with nothing found."""
        self.misses += 1
        self.spent += spent_s

    def contended(self, spent_s: float) -> None:
        """A poll ended after ``spent_s`` seconds because the poller had to wait for
        the CPU (a pause of :data:`CONTENDED_US` or more between two looks): counted as
        a miss, and the window halves (0 below ``min_s``)."""
        self.misses += 1
        self.spent += spent_s
        self.contended_polls += 1
        if self.window and self.adaptive:
            w = self.window / 2
            self.window = w if w >= self.min_s else 0.0
            self.shrunk += 1

    def slept(self, slept_s: float, *, work: bool) -> bool:
        """The side slept ``slept_s`` seconds with notifications armed and woke up --
        for the peer's work (``work``: a kick / an interrupt for a ring it serves) or
        for something else. A short sleep ending in work grows the window; any sleep of
        :attr:`long_s` or more shrinks it; a short sleep for something else says
        nothing. Returns True for a long sleep (a side that keeps sleeping measures
        the next one from now)."""
        if not self.max_s:
            return False
        if not self.adaptive:
            return slept_s >= self.long_s
        if slept_s >= self.long_s:
            if self.window:
                w = self.window / 2
                self.window = w if w >= self.min_s else 0.0
                self.shrunk += 1
            return True
        if work and self.window < self.max_s:
            self.window = min(self.max_s, max(self.min_s, self.window * 2))
            self.grown += 1
        return False

    def metrics(self, prefix: str = "poll_") -> dict[str, int]:
        """The counters as integers: ``poll_hits``, ``poll_misses``, ``poll_us``
        (time spent polling), ``poll_grown``, ``poll_shrunk``, ``poll_contended``
        and the gauge ``poll_window_us``."""
        return {
            f"{prefix}hits": self.hits,
            f"{prefix}misses": self.misses,
            f"{prefix}us": int(self.spent * 1e6),
            f"{prefix}grown": self.grown,
            f"{prefix}shrunk": self.shrunk,
            f"{prefix}contended": self.contended_polls,
            f"{prefix}window_us": int(self.window * 1e6),
        }

    def __repr__(self) -> str:
        return (
            f"<PollWindow {self.window * 1e6:.1f}/{self.max_s * 1e6:.0f} µs "
            f"hits={self.hits} misses={self.misses}>"
        )
