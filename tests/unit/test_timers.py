"""hostops.timers.TimerHeap: one thread, deadline order, cancel, close joins. No sleeps:
every wait is on an Event set by a timer that is ordered after the one under test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_stack_helpers import live_threads

from hostops.sync import Event, current_thread_name
from hostops.timers import TimerHeap

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _no_thread_left_behind() -> Iterator[None]:
    before = live_threads()
    yield
    assert live_threads() <= before, "a timer, hub or test thread outlived its test"


def test_callbacks_run_in_deadline_order_on_one_thread() -> None:
    order: list[str] = []
    threads: set[str] = set()
    done = Event()

    def rec(tag: str):
        def f() -> None:
            order.append(tag)
            threads.add(current_thread_name())

        return f

    with TimerHeap("t-order") as th:
        now = th.now()
        th.call_at(now + 0.03, rec("c"))
        th.call_at(now + 0.01, rec("a"))
        th.call_at(now + 0.02, rec("b"))
        th.call_at(now + 0.02, rec("b2"))  # same deadline: armed later, runs later
        th.call_at(now + 0.04, done.set)
        assert done.wait(10)
        assert order == ["a", "b", "b2", "c"]
        assert threads == {"t-order"}
        assert th.fired == 5
        assert len(th) == 0


def test_call_later_zero_runs_and_earlier_deadline_preempts_a_long_wait() -> None:
    got = Event()
    with TimerHeap() as th:
        far = th.call_later(3600, lambda: None)  # the thread now waits an hour ...
        th.call_later(0, got.set)  # ... and must wake up for this one
        assert got.wait(10)
        assert not far.fired
        assert len(th) == 1


def test_cancel_prevents_the_callback() -> None:
    ran: list[str] = []
    done = Event()
    with TimerHeap() as th:
        h = th.call_later(0.01, lambda: ran.append("cancelled one"))
        assert h.cancel() is True
        assert h.cancel() is False  # only the first cancel prevents it
        assert h.cancelled
        th.call_later(0.02, done.set)
        assert done.wait(10)
        assert ran == []
        assert th.fired == 1


def test_cancel_after_fire_returns_false() -> None:
    done = Event()
    with TimerHeap() as th:
        h = th.call_later(0, done.set)
        assert done.wait(10)
        assert h.fired
        assert h.cancel() is False


def test_many_cancelled_timers_do_not_grow_the_heap() -> None:
    with TimerHeap() as th:
        keep = th.call_later(3600, lambda: None)
        for _ in range(10_000):
            th.call_later(3600, lambda: None).cancel()
        assert len(th) == 1
        assert len(th._heap) < 200  # compacted, not 10 001 entries
        assert not keep.cancelled


def test_a_failing_callback_is_counted_and_the_thread_goes_on() -> None:
    done = Event()

    def boom() -> None:
        raise RuntimeError("expected by the test")

    with TimerHeap() as th:
        th.call_later(0, boom)
        th.call_later(0.01, done.set)
        assert done.wait(10)
        assert th.failed == 1
        assert th.fired == 1


def test_close_joins_the_thread_and_drops_pending_timers() -> None:
    started = Event()
    th = TimerHeap("t-close")
    th.call_later(0, started.set)
    late = th.call_later(3600, lambda: None)
    assert started.wait(10)
    assert th.thread_alive
    th.close()
    assert not th.thread_alive
    assert th.closed
    assert late.cancelled
    assert len(th) == 0
    # arming after close never fires and never raises (a shutdown race must not fail)
    h = th.call_later(0, lambda: None)
    assert h.cancelled and h.cancel() is False
    th.close()  # idempotent


def test_no_thread_until_the_first_timer() -> None:
    th = TimerHeap()
    assert not th.thread_alive
    th.close()
    assert not th.thread_alive


def test_close_from_a_callback_does_not_deadlock() -> None:
    closed = Event()
    th = TimerHeap()

    def close_me() -> None:
        th.close()
        closed.set()

    th.call_later(0, close_me)
    assert closed.wait(10)
    th.close()  # joins the (finished) thread from here
    assert not th.thread_alive


def test_callbacks_may_arm_timers() -> None:
    done = Event()
    with TimerHeap() as th:
        th.call_later(0, lambda: th.call_later(0, done.set))
        assert done.wait(10)


def test_negative_delay_is_refused() -> None:
    with TimerHeap() as th, pytest.raises(ValueError):
        th.call_later(-1, lambda: None)
