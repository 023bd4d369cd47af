"""The device status byte as one transition table (§2.1, §3.1.1)."""

from __future__ import annotations

import itertools

import pytest

from vdev.virtio import ProtocolError, Status
from vdev.virtio.control import ErrorCode
from vdev.virtio.status import describe_status, next_status

pytestmark = pytest.mark.timeout(60)

ACK, DRV, FOK, DOK = Status.ACKNOWLEDGE, Status.DRIVER, Status.FEATURES_OK, Status.DRIVER_OK
NEEDS_RESET, FAILED = Status.DEVICE_NEEDS_RESET, Status.FAILED
LEGAL = [0, ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | DOK]


def bad_state(old: int, new: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as ei:
        next_status(old, new)
    assert ei.value.code == ErrorCode.BAD_STATE, ei.value
    return ei.value


def test_status_values() -> None:
    assert [int(s) for s in (ACK, DRV, DOK, FOK, NEEDS_RESET, FAILED)] == [1, 2, 4, 8, 64, 128]


def test_legal_sequence() -> None:
    status = 0
    for want in LEGAL[1:]:
        status = next_status(status, want)
        assert status == want
    assert status == 15
    # writing the same value again is harmless
    assert next_status(status, status) == status


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (0, DRV),  # DRIVER before ACKNOWLEDGE
        (0, FOK),
        (0, DOK),
        (ACK, ACK | FOK),  # FEATURES_OK before DRIVER
        (ACK, ACK | FOK | DOK),
        (ACK, ACK | DOK),
        (ACK | DRV, ACK | DRV | DOK),  # DRIVER_OK before FEATURES_OK
        (0, ACK | DRV | DOK),
        (ACK, ACK | DRV | DOK),
    ],
)
def test_out_of_order(old: int, new: int) -> None:
    err = bad_state(old, new)
    assert "out of order" in err.message


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (ACK | DRV, ACK),
        (ACK | DRV, DRV),
        (ACK | DRV | FOK, ACK | DRV),
        (ACK | DRV | FOK | DOK, ACK | DRV | FOK),
        (ACK | DRV | FOK | DOK, ACK | DRV | DOK),
        (ACK | FAILED, ACK),
    ],
)
def test_clearing_bits(old: int, new: int) -> None:
    err = bad_state(old, new)
    assert "cleared" in err.message


@pytest.mark.parametrize("old", [0, ACK, ACK | DRV, 15])
def test_driver_may_not_set_needs_reset(old: int) -> None:
    err = bad_state(old, old | NEEDS_RESET)
    assert "DEVICE_NEEDS_RESET" in err.message


def test_needs_reset_is_sticky_and_zero_resets() -> None:
    old = 15 | NEEDS_RESET  # the device set it
    assert next_status(old, 15) == 15 | NEEDS_RESET
    assert next_status(old, 15 | NEEDS_RESET) == 15 | NEEDS_RESET
    assert next_status(old, 15 | FAILED) == 15 | FAILED | NEEDS_RESET
    assert next_status(old, 0) == 0


@pytest.mark.parametrize("old", LEGAL + [ACK | DRV | FOK | DOK | FAILED])
def test_zero_resets_from_anywhere(old: int) -> None:
    assert next_status(old, 0) == 0


@pytest.mark.parametrize("old", LEGAL)
def test_failed_allowed_any_time(old: int) -> None:
    assert next_status(old, old | FAILED) == old | FAILED


def test_bad_values() -> None:
    for new in (256, -1, 0x10, 0x20, ACK | 0x10):
        with pytest.raises(ProtocolError) as ei:
            next_status(0, new)
        assert ei.value.code == ErrorCode.BAD_VALUE


def test_exhaustive_table() -> None:
    """Every (old, new) pair over the defined bits: legal iff no bit cleared, NEEDS_RESET
    not newly set by the driver, and every newly set bit has its prerequisites in new."""
    req = {ACK: 0, DRV: ACK, FOK: ACK | DRV, DOK: ACK | DRV | FOK, FAILED: 0}
    bits = [ACK, DRV, FOK, DOK, FAILED, NEEDS_RESET]
    values = [sum(c) for r in range(len(bits) + 1) for c in itertools.combinations(bits, r)]
    legal_count = 0
    for old, new in itertools.product(values, values):
        if new == 0:
            assert next_status(old, new) == 0
            continue
        o, n = old & ~NEEDS_RESET, new & ~NEEDS_RESET
        ok = (
            not (new & NEEDS_RESET and not old & NEEDS_RESET)
            and not (o & ~n)
            and all((n & ~o & b == 0) or (req[b] & ~n == 0) for b in req)
        )
        if ok:
            assert next_status(old, new) == n | (old & NEEDS_RESET), (old, new)
            legal_count += 1
        else:
            bad_state(old, new)
    assert legal_count > 50


def test_describe_status() -> None:
    assert describe_status(0) == "0"
    assert describe_status(ACK | DRV) == "ACKNOWLEDGE|DRIVER"
    assert describe_status(FAILED | 0x10) == "FAILED|0x10"
