"""Deliberately broken devices: each breaks one rule of :mod:`vdev.conformance`.

:class:`GoodDevice` is the correct base (it fills writable buffers with ``ok``); each
subclass seeds one bug, and ``BUGS`` maps the rule each should fail to its factory.
"""

from __future__ import annotations

from vdev import PENDING, Chain, Device, Pending
from vdev.device import TimerHandle
from vdev.virtio import F, bit

__all__ = [
    "BUGS",
    "GoodDevice",
    "OffersUnimplemented",
    "IgnoresReset",
    "ForgetsRecheck",
    "WritesPast",
    "CompletesTwice",
    "CrashesOnMalformed",
    "UnstableConfig",
]


class GoodDevice(Device):
    """A correct one-queue device: writes ``ok`` (as much as fits) and completes."""

    device_id = 0x7F
    name = "good"
    num_queues = 1

    def __init__(self) -> None:
        super().__init__()
        self.max_queue_size = 64

    def config(self) -> bytes:
        """Eight stable bytes."""
        return b"\x01\x02\x03\x04\x05\x06\x07\x08"

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Write ``ok`` into the writable part."""
        n = min(2, chain.writable_len)
        chain.write(0, b"ok"[:n])
        return n


class OffersUnimplemented(GoodDevice):
    """Offers RING_PACKED, a transport feature nothing here implements."""

    def device_features(self) -> int:
        """RING_PACKED (bug)."""
        return bit(F.RING_PACKED)


class IgnoresReset(GoodDevice):
    """Keeps each chain until the next one arrives and ignores reset/release: after a
    reset it completes chains that were released (stale)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Chain] = []

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Complete the chains held so far, keep this one."""
        for old in self.held:
            try:
                self.complete(queue, old, 0)
            except Exception:  # noqa: BLE001 - the bug: swallowing the refusal
                pass
        self.held = [chain]
        return PENDING


class ForgetsRecheck(GoodDevice):
    """Defers completions to a timer armed when the backlog was empty; the flush
    completes the backlog but forgets the last chain when several arrived (it does not
    look again after draining, the Device-API form of a lost EVENT_IDX re-check)."""

    def __init__(self) -> None:
        super().__init__()
        self.backlog: list[Chain] = []
        self.timer: TimerHandle | None = None

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Queue the chain; arm the flush timer if none is armed."""
        self.backlog.append(chain)
        if self.timer is None:
            self.timer = self.call_later(0.001, self._flush)
        return PENDING

    def _flush(self) -> None:
        self.timer = None
        items, self.backlog = self.backlog, []
        if len(items) > 1:
            items = items[:-1]  # the bug
        self.complete_many(0, [(c, 0) for c in items])

    def released(self, queue: int) -> None:
        """Forget the backlog."""
        self.backlog = []
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class WritesPast(GoodDevice):
    """Claims one byte more than the writable part holds."""

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Used length writable_len + 1 (bug)."""
        return chain.writable_len + 1


class CompletesTwice(GoodDevice):
    """Completes each kept chain twice from a timer (swallowing the refusal)."""

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Keep; complete twice a moment later."""
        self.call_later(0.001, lambda: self._twice(queue, chain))
        return PENDING

    def _twice(self, queue: int, chain: Chain) -> None:
        self.complete(queue, chain, 0)
        try:
            self.complete(queue, chain, 0)  # the bug
        except Exception:  # noqa: BLE001
            pass


class CrashesOnMalformed(GoodDevice):
    """Raises on a chain without a 16-byte readable header or 4 writable bytes."""

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Parse a header it does not check for (bug)."""
        header = chain.read(0, 16)
        if len(header) < 16 or chain.writable_len < 4:
            raise IndexError("short chain")
        return super().handle(queue, chain)


class UnstableConfig(GoodDevice):
    """Its config space changes on every read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def config(self) -> bytes:
        """A read counter (bug)."""
        self.reads += 1
        return self.reads.to_bytes(8, "little")


BUGS: dict[str, type[GoodDevice]] = {
    "features": OffersUnimplemented,
    "reset_mid_io": IgnoresReset,
    "no_lost_completion": ForgetsRecheck,
    "used_len": WritesPast,
    "double_complete": CompletesTwice,
    "malformed_chains": CrashesOnMalformed,
    "config": UnstableConfig,
}
