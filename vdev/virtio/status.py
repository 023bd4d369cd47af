"""The device status byte as a state machine (§2.1, §3.1.1), as one table.

The driver may only *add* bits, one step at a time, in this order::

    0 → ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK

Writing 0 resets; FAILED may be added at any time. DEVICE_NEEDS_RESET is set by the
device only. :func:`next_status` checks one write against the table: an illegal write
raises :class:`ProtocolError` (code BAD_STATE) naming the rule,
and the caller keeps the old status (h11 style: an illegal transition changes nothing).
Whether FEATURES_OK is *accepted* (features a subset of the offer, VERSION_1 present) is
the device's decision, made by its caller; this table only knows the order.
"""

from __future__ import annotations

from .constants import Status
from .control import ErrorCode
from .errors import ProtocolError

__all__ = ["REQUIRES", "next_status", "describe_status"]

#: bit the driver may set -> bits that must already be set
REQUIRES: dict[Status, Status] = {
    Status.ACKNOWLEDGE: Status(0),
    Status.DRIVER: Status.ACKNOWLEDGE,
    Status.FEATURES_OK: Status.ACKNOWLEDGE | Status.DRIVER,
    Status.DRIVER_OK: Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK,
    Status.FAILED: Status(0),
}


def describe_status(status: int) -> str:
    """``"ACKNOWLEDGE|DRIVER"`` style name of a status byte (``"0"`` for reset)."""
    if status == 0:
        return "0"
    names = [s.name or "?" for s in Status if status & s]
    rest = status & ~sum(Status)
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names)


def next_status(old: int, new: int) -> int:
    """Validate the driver writing ``new`` over ``old``; return ``new`` or raise
    ``ProtocolError(BAD_STATE)``. ``DEVICE_NEEDS_RESET`` in ``old`` is kept."""
    if not 0 <= new <= 0xFF:
        raise ProtocolError(ErrorCode.BAD_VALUE, f"status {new} is not a byte")
    if new == 0:
        return 0
    if new & Status.DEVICE_NEEDS_RESET and not old & Status.DEVICE_NEEDS_RESET:
        raise ProtocolError(ErrorCode.BAD_STATE, "§2.1: only the device sets DEVICE_NEEDS_RESET")
    sticky = old & Status.DEVICE_NEEDS_RESET
    old_bits = old & ~Status.DEVICE_NEEDS_RESET
    new_bits = new & ~Status.DEVICE_NEEDS_RESET
    if old_bits & ~new_bits:
        raise ProtocolError(
            ErrorCode.BAD_STATE,
            f"§2.1: status bits may only be cleared by a reset "
            f"({describe_status(old)} -> {describe_status(new)})",
        )
    for bit in Status:
        if bit == Status.DEVICE_NEEDS_RESET or not new_bits & bit or old_bits & bit:
            continue
        if bit not in REQUIRES:
            raise ProtocolError(ErrorCode.BAD_VALUE, f"unknown status bit {bit!r}")
        need = REQUIRES[bit]
        if need & ~new_bits:
            missing = describe_status(need & ~new_bits)
            raise ProtocolError(
                ErrorCode.BAD_STATE, f"§3.1.1: {bit.name} before {missing} is out of order"
            )
    unknown = new_bits & ~sum(REQUIRES)
    if unknown:
        raise ProtocolError(ErrorCode.BAD_VALUE, f"unknown status bits {unknown:#x}")
    return new_bits | sticky
