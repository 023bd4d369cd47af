"""The adaptive hybrid-polling window (vdev.virtio.poll.PollWindow), clock-free."""

from __future__ import annotations

import pytest

from vdev.virtio import DEFAULT_POLL_US, PollWindow, UsageError
from vdev.virtio.poll import MAX_POLL_US


def test_starts_small_and_grows_on_short_sleeps_up_to_the_bound() -> None:
    pw = PollWindow(160, 10)
    assert pw.enabled and pw.window == pytest.approx(10e-6)
    seen = []
    for _ in range(10):
        pw.miss(pw.window)
        pw.slept(50e-6, work=True)  # the peer came soon after we armed
        seen.append(round(pw.window * 1e6))
    assert seen == [20, 40, 80, 160, 160, 160, 160, 160, 160, 160]
    assert pw.grown == 4 and pw.shrunk == 0 and pw.misses == 10


def test_long_sleeps_shrink_it_to_zero_and_a_short_one_revives_it() -> None:
    pw = PollWindow(160, 10)
    pw.window = pw.max_s
    seen = []
    for _ in range(6):
        pw.slept(pw.long_s, work=True)  # the peer took as long as an idle peer
        seen.append(round(pw.window * 1e6))
    assert seen == [80, 40, 20, 10, 0, 0]
    assert pw.shrunk == 5
    pw.slept(1e-6, work=False)  # a short wake-up for something else says nothing
    assert pw.window == 0
    assert pw.slept(1e-6, work=True) is False  # short: not a long sleep
    assert pw.window == pytest.approx(10e-6) and pw.grown == 1
    assert pw.slept(pw.long_s, work=False) is True  # long, whatever woke it


def test_hits_leave_the_window_and_count_time() -> None:
    pw = PollWindow(100)
    w = pw.window
    for _ in range(5):
        pw.hit(2e-6)
    pw.miss(w)
    assert pw.window == w and pw.hits == 5 and pw.misses == 1
    assert pw.spent == pytest.approx(10e-6 + w)
    m = pw.metrics()
    assert m == {
        "poll_hits": 5,
        "poll_misses": 1,
        "poll_us": int(pw.spent * 1e6),
        "poll_grown": 0,
        "poll_shrunk": 0,
        "poll_contended": 0,
        "poll_window_us": int(w * 1e6),
    }


def test_a_poll_that_waited_for_the_cpu_shrinks_the_window() -> None:
    pw = PollWindow(160, 10)
    pw.window = pw.max_s
    for _ in range(4):
        pw.contended(60e-6)
    assert round(pw.window * 1e6) == 10 and pw.contended_polls == 4 and pw.misses == 4
    pw.contended(1e-6)
    assert pw.window == 0 and pw.shrunk == 5
    assert pw.metrics()["poll_contended"] == 5


def test_zero_turns_polling_off_for_good() -> None:
    pw = PollWindow(0)
    assert not pw.enabled and pw.window == 0 and pw.long_s == 0
    pw.slept(1e-9, work=True)
    pw.slept(10.0, work=False)
    assert pw.window == 0 and pw.grown == pw.shrunk == 0


def test_defaults_and_bad_values() -> None:
    pw = PollWindow()
    assert pw.max_s == pytest.approx(DEFAULT_POLL_US / 1e6)
    assert pw.min_s == pytest.approx(pw.max_s / 16)
    assert PollWindow(MAX_POLL_US).max_s == pytest.approx(MAX_POLL_US / 1e6)
    for bad in (-1, MAX_POLL_US + 1, True, "100", None, float("nan")):
        with pytest.raises(UsageError, match="poll window"):
            PollWindow(bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="minimum"):
        PollWindow(100, -1)
    assert PollWindow(100, 500).min_s == pytest.approx(100e-6)  # capped by the bound


def test_a_fixed_window_never_moves() -> None:
    pw = PollWindow(100, adaptive=False)
    assert pw.window == pytest.approx(100e-6)
    pw.contended(1e-4)
    assert pw.slept(1.0, work=False) is True and pw.slept(1e-6, work=True) is False
    pw.miss(1e-4)
    assert pw.window == pytest.approx(100e-6) and pw.grown == pw.shrunk == 0
    assert pw.contended_polls == 1 and pw.misses == 2
