"""Skips that CI must not take: ``require(condition, reason)`` and ``skip_or_fail(reason)``.

Tests that need something from the host (QEMU, a Linux guest kernel, tshark, root and
``/dev/net/tun``, a network namespace) skip with the reason when it is missing, so a
developer's ``make test`` works anywhere. Under CI that would let a broken set-up pass
in silence, so ``.ci/run`` exports ``VLAB_REQUIRE_INTEROP=1``: then the same call fails
the test with ``required under CI: <reason>``.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["REQUIRE_ENV", "required", "require", "skip_or_fail"]

#: The environment variable that turns these skips into failures.
REQUIRE_ENV = "VLAB_REQUIRE_INTEROP"


def required() -> bool:
    """True when missing prerequisites must fail the test (``VLAB_REQUIRE_INTEROP=1``)."""
    return os.environ.get(REQUIRE_ENV, "") == "1"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test because of ``reason`` -- or, under ``VLAB_REQUIRE_INTEROP=1``,
    fail it with ``required under CI: <reason>``."""
    if required():
        pytest.fail(f"required under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require(condition: bool, reason: str) -> None:
    """Go on if ``condition`` holds; otherwise :func:`skip_or_fail` with ``reason``."""
    if not condition:
        skip_or_fail(reason)
