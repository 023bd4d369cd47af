"""vdev.conformance: clean on the built-in devices, and each seeded bug fails exactly
the rule it breaks."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.unit.conformance_bugs import BUGS, GoodDevice
from vdev.blk import BlkDevice, MemoryBackend
from vdev.conformance import RULES, check_device_conformance, conformance_cases
from vdev.device import Device
from vdev.examples.console import ConsoleDevice
from vdev.examples.rng import RngDevice
from vdev.net import LoopbackBackend, NetDevice

BUILT_IN: dict[str, Callable[[], Device]] = {
    "rng": lambda: RngDevice(seed=1, queue_size=64),
    "blk": lambda: BlkDevice(MemoryBackend(1 << 20), queue_size=64),
    "net": lambda: NetDevice(LoopbackBackend(), mac=b"\x02\x00\x00\x00\x00\x01", queue_size=64),
    "console": lambda: ConsoleDevice("echo"),
}


@pytest.mark.parametrize("kind", sorted(BUILT_IN))
def test_built_in_devices_conform(kind: str) -> None:
    report = check_device_conformance(BUILT_IN[kind])
    assert set(report.results) == set(RULES)
    report.assert_ok()


def test_good_device_conforms() -> None:
    check_device_conformance(GoodDevice).assert_ok()


@pytest.mark.parametrize("rule", sorted(BUGS))
def test_seeded_bug_fails_exactly_its_rule(rule: str) -> None:
    report = check_device_conformance(BUGS[rule])
    assert list(report.failed) == [rule], report.failed
    with pytest.raises(AssertionError, match=rule):
        report.assert_ok()


@pytest.mark.parametrize(("rule", "check"), list(conformance_cases(GoodDevice)))
def test_conformance_cases_pass_on_good_device(rule: str, check: Callable[[], None]) -> None:
    check()


def test_conformance_cases_name_the_failed_rule() -> None:
    cases = dict(conformance_cases(BUGS["used_len"]))
    assert list(cases) == list(RULES)
    with pytest.raises(AssertionError, match="used_len"):
        cases["used_len"]()
    cases["status"]()  # the other rules pass
