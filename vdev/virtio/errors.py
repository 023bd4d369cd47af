"""Errors, typed by who is at fault, each saying what happens next.

=====================  ==========================  ===========================================
class                  who broke the rules          what happens next
=====================  ==========================  ===========================================
``DriverSpecError``    the driver (seen by device)  a bad chain is completed with length 0 and
                                                    counted; a bad ring sets DEVICE_NEEDS_RESET
``DeviceSpecError``    the device (seen by driver)  the queue is marked broken; every request
                                                    on it fails with EIO until reset
``UsageError``         the caller of this API       nothing changed; fix the call
``ProtocolError``      a control-channel peer       the message gets an error reply naming the
                                                    problem; the session goes on
=====================  ==========================  ===========================================

A broken *transport* (the peer process died, a channel timed out) is not a spec
violation and is raised by the host layer as ``hostops.TransportError``.

Validation failures name the rule they enforce (:class:`Rule`), and each rule cites
the spec section it comes from, so a test can assert on the exact rule.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "VirtioError",
    "Rule",
    "DriverSpecError",
    "ChainError",
    "RingError",
    "DeviceSpecError",
    "UsageError",
    "QueueFull",
    "ProtocolError",
    "AddressError",
]


class Rule(Enum):
    """A rule of the spec that a peer can break. Values cite the section."""

    # Rules the driver must follow, checked by the device (§2.7).
    HEAD_OUT_OF_RANGE = "§2.7.6: avail ring entry must name a descriptor < queue size"
    AVAIL_IDX_JUMP = "§2.7.6: avail idx may not run more than queue size ahead of the device"
    NEXT_OUT_OF_RANGE = "§2.7.5: desc.next must be < queue size (or table length)"
    CHAIN_LOOP = "§2.7.5.3.1: a chain longer than the queue size (TTL) is a loop"
    READABLE_AFTER_WRITABLE = "§2.7.4.2: readable descriptors must precede writable ones"
    NESTED_INDIRECT = "§2.7.5.3.1: an indirect table may not contain INDIRECT descriptors"
    INDIRECT_WITH_NEXT = "§2.7.5.3.1: INDIRECT and NEXT may not both be set"
    INDIRECT_NOT_NEGOTIATED = "§2.7.5.3.1: INDIRECT used without VIRTIO_F_INDIRECT_DESC"
    INDIRECT_LENGTH = "§2.7.5.3.1: indirect table length must be a non-zero multiple of 16"
    CHAIN_TOO_LONG = "§2.7.5.3.1: a chain (indirect table included) exceeds the queue size"
    ADDRESS_OUT_OF_RANGE = "§2.7.5: buffer (addr, len) must lie inside driver memory"
    LENGTH_OVERFLOW = "§2.7.5: total chain length must fit in 32 bits"
    # Rules the device must follow, checked by the driver (§2.7.8, §2.7.13).
    USED_ID_OUT_OF_RANGE = "§2.7.8: used id must be < queue size"
    USED_ID_NOT_IN_FLIGHT = "§2.7.8: used id must be the head of a chain the driver made available"
    USED_LEN_TOO_BIG = "§2.7.8.1: used len may not exceed the writable part of the chain"
    USED_IDX_JUMP = "§2.7.8: used idx may not run ahead of what the driver made available"


class VirtioError(Exception):
    """Base of every error this package raises."""


class DriverSpecError(VirtioError):
    """The driver broke the spec (detected by the device side)."""

    def __init__(self, rule: Rule, detail: str = "") -> None:
        self.rule = rule
        self.detail = detail
        super().__init__(f"{rule.name}: {detail} ({rule.value})" if detail else rule.value)


class ChainError(DriverSpecError):
    """One descriptor chain is malformed. The device completes it with used length 0,
    counts it, and goes on serving the queue. ``head`` is the chain's head index."""

    def __init__(self, rule: Rule, head: int, detail: str = "") -> None:
        self.head = head
        super().__init__(rule, f"chain at head {head}: {detail}" if detail else f"head {head}")


class RingError(DriverSpecError):
    """The ring itself is inconsistent (no chain can be trusted). The device stops the
    queue and sets DEVICE_NEEDS_RESET; only a reset recovers."""


class DeviceSpecError(VirtioError):
    """The device broke the spec (detected by the driver). The queue is marked broken;
    every pending and future request on it fails (EIO) until the device is reset."""

    def __init__(self, rule: Rule, detail: str = "") -> None:
        self.rule = rule
        self.detail = detail
        super().__init__(f"{rule.name}: {detail} ({rule.value})" if detail else rule.value)


class UsageError(VirtioError):
    """The caller misused the API (bad argument, wrong state). Nothing was changed."""


class QueueFull(UsageError):
    """Not enough free descriptors for this chain right now. Nothing was changed; wait
    for completions and try again."""


class AddressError(VirtioError):
    """An (address, length) pair does not lie inside guest memory. Raised by memory
    objects; queues turn it into the right ChainError/DeviceSpecError."""


class ProtocolError(VirtioError):
    """A control message was unknown, malformed or out of order. The receiver replies
    with an error naming ``code`` and keeps serving."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")
