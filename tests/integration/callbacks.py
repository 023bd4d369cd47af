"""Test helper: collect asynchronous results (block-layer callbacks) and wait for them
on a condition, never with a sleep."""

from __future__ import annotations

from typing import Any

from hostops.sync import Condition, Lock

__all__ = ["Done"]


class Done:
    """Counts block callbacks; wait for a number of them (no sleeps)."""

    def __init__(self) -> None:
        self.results: list[Any] = []
        self._cond = Condition(Lock())

    def __call__(self, result: Any) -> None:
        with self._cond:
            self.results.append(result)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        """Assert that ``n`` results arrive within ``timeout`` seconds."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.results) >= n, timeout)
