"""The hostile driver (``vdev.testing.hostile_driver``) and the chain cap.

Thousands of generated malformed chains (hypothesis) against BlkDevice, NetDevice and a
device written only against the public ``vdev.Device`` API: every one is refused with
length 0 or breaks the ring (DEVICE_NEEDS_RESET), never reaches ``handle()``, nothing
escapes the session, and a valid request is served afterwards. Plus the chain cap
(§2.7.5.3.1: a giant indirect table is a ChainError before anything is mapped), the
harness's reset zeroing its rings and its public fault record.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdev import PENDING, Chain, Device, Pending
from vdev.blk import BlkDevice, MemoryBackend
from vdev.conformance import check_device_conformance
from vdev.net import LoopbackBackend, NetDevice
from vdev.testing import (
    HOSTILE_KINDS,
    DeviceHarness,
    HostileCase,
    HostileDriver,
    hostile_driver,
)
from vdev.virtio import ChainError, DeviceQueue, DriverQueue, FlatMemory, RingLayout, Rule
from vdev.virtio.errors import UsageError

pytestmark = pytest.mark.timeout(120)

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
INDIRECT = 4


# --------------------------------------------------------------------------- devices


class EchoKeeper(Device):
    """A test device written only against the public Device API: queue 0 echoes the
    readable bytes into the writable part at once; queue 1 keeps every chain and
    completes it from a timer (the deferred path)."""

    device_id = 0xFFF0
    num_queues = 2
    max_queue_size = 32

    def __init__(self) -> None:
        super().__init__()
        self.kept_chains: list[Chain] = []

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Echo (queue 0) or keep for a timer (queue 1)."""
        if queue == 1:
            self.kept_chains.append(chain)
            if len(self.kept_chains) == 1:
                self.call_later(0.001, self._flush)
            return PENDING
        n = min(chain.readable_len, chain.writable_len)
        chain.write(0, chain.read(0, n))
        return n

    def _flush(self) -> None:
        chains, self.kept_chains = self.kept_chains, []
        for c in chains:
            self.complete(1, c, 0)

    def released(self, queue: int) -> None:
        """A reset dropped the kept chains."""
        self.kept_chains = []


class Raises(EchoKeeper):
    """A buggy device: raises on any chain shorter than 8 readable bytes."""

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Parses a header it never checked for."""
        if chain.readable_len < 8:
            raise IndexError("no header")
        return super().handle(queue, chain)


DEVICES: dict[str, Callable[[], Device]] = {
    "blk": lambda: BlkDevice(MemoryBackend(1 << 20), queue_size=64),
    "net": lambda: NetDevice(LoopbackBackend(), mac=b"\x02\x00\x00\x00\x00\x07", queue_size=64),
    "echo": EchoKeeper,
}

#: Every hostile case hypothesis may build.
CASES = st.builds(
    HostileCase,
    kind=st.sampled_from(HOSTILE_KINDS),
    queue=st.integers(0, 3),
    a=st.integers(0, 2**32 - 1),
    b=st.integers(0, 2**32 - 1),
    payload=st.binary(min_size=0, max_size=96),
)


# --------------------------------------------------------------------------- chain cap


def _ring(n: int, *, indirect: bool = True) -> tuple[bytearray, DeviceQueue, RingLayout]:
    buf = bytearray(1 << 16)
    lay = RingLayout.packed(n, 0)
    return buf, DeviceQueue(FlatMemory(buf), lay, indirect=indirect), lay


def _publish(buf: bytearray, lay: RingLayout, descs: list[tuple[int, int, int, int]]) -> None:
    for i, d in enumerate(descs):
        DESC.pack_into(buf, lay.desc + 16 * i, *d)
    U16.pack_into(buf, lay.avail + 4, 0)
    U16.pack_into(buf, lay.avail + 2, 1)


@pytest.mark.parametrize("entries", [9, 64, 0x0FFF_FFFF])
def test_indirect_table_longer_than_the_queue_is_refused_before_mapping(entries: int) -> None:
    """§2.7.5.3.1: a chain, indirect table included, holds at most queue-size
    descriptors. A giant table (256 MiB, far beyond the 64 KiB of memory) is refused
    with CHAIN_TOO_LONG, not ADDRESS_OUT_OF_RANGE: the length is checked first."""
    buf, dq, lay = _ring(8)
    _publish(buf, lay, [(0x8000, 16 * entries, INDIRECT, 0)])
    with pytest.raises(ChainError) as exc:
        dq.pop()
    assert exc.value.rule is Rule.CHAIN_TOO_LONG and exc.value.head == 0
    assert dq.stats.rule_violations == {"CHAIN_TOO_LONG": 1} and dq.broken is None


def test_indirect_table_of_exactly_the_queue_size_is_served() -> None:
    buf, dq, lay = _ring(8)
    for i in range(8):
        DESC.pack_into(buf, 0x8000 + 16 * i, 0x9000 + 16 * i, 16, 1 if i < 7 else 0, i + 1)
    _publish(buf, lay, [(0x8000, 16 * 8, INDIRECT, 0)])
    chain = dq.pop()
    assert chain is not None and chain.readable_len == 128 and len(chain.segments) == 8


def test_chain_cap_is_the_device_queue_size_when_given() -> None:
    """A device passes its maximum queue size: a driver on a smaller ring may size its
    chains by it (Linux takes virtio-blk's seg_max from the config space), not beyond."""
    buf = bytearray(1 << 16)
    lay = RingLayout.packed(8, 0)
    dq = DeviceQueue(FlatMemory(buf), lay, indirect=True, max_chain=16)
    for i in range(16):
        DESC.pack_into(buf, 0x8000 + 16 * i, 0x9000 + 16 * i, 16, 1 if i < 15 else 0, i + 1)
    _publish(buf, lay, [(0x8000, 16 * 16, INDIRECT, 0)])
    chain = dq.pop()
    assert chain is not None and len(chain.segments) == 16
    DESC.pack_into(buf, lay.desc, 0x8000, 16 * 17, INDIRECT, 0)
    U16.pack_into(buf, lay.avail + 6, 0)
    U16.pack_into(buf, lay.avail + 2, 2)
    with pytest.raises(ChainError) as exc:
        dq.pop()
    assert exc.value.rule is Rule.CHAIN_TOO_LONG
    assert DeviceQueue(FlatMemory(buf), lay, max_chain=2).max_chain == 8  # never below N


def test_driver_queue_refuses_an_indirect_table_longer_than_the_queue() -> None:
    buf = bytearray(1 << 16)
    dq = DriverQueue(FlatMemory(buf), RingLayout.packed(4, 0), indirect=True)
    with pytest.raises(UsageError, match="longer than the queue"):
        dq.add([(0x8000 + 16 * i, 16) for i in range(5)], [], "t", indirect_table=0x9000)
    assert dq.num_free == 4 and dq.in_flight == 0
    dq.add([(0x8000 + 16 * i, 16) for i in range(4)], [], "t", indirect_table=0x9000)


# --------------------------------------------------------------------------- generated


@pytest.mark.parametrize("kind", sorted(DEVICES))
def test_thousands_of_generated_malformed_chains(kind: str) -> None:
    """Hypothesis builds the cases (1500 per device); after each one the device has
    answered within the rules and serves a valid request."""
    with HostileDriver(DEVICES[kind](), seed=0) as driver:

        @settings(
            max_examples=1500,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(case=CASES)
        def run(case: HostileCase) -> None:
            driver.run(case)
            assert not driver.report.failures, driver.report.failures

        run()
        report = driver.report
    assert report.total >= 1500
    assert set(report.cases) == set(HOSTILE_KINDS)  # every kind was mounted
    for k in ("loop", "nested_indirect", "indirect_too_big", "address_outside"):
        assert set(report.outcomes[k]) <= {"refused", "needs_reset"}, report.outcomes[k]
    assert set(report.outcomes["avail_idx_jump"]) == {"needs_reset"}
    assert set(report.outcomes["kick_before_driver_ok"]) == {"ignored"}
    assert not report.handler_errors, report.handler_errors


@pytest.mark.parametrize("kind", sorted(DEVICES))
def test_seeded_run_covers_every_kind_and_replays(kind: str) -> None:
    """Plain seeded generation (no hypothesis inside the product): the same seed gives
    the same cases and outcomes; every kind runs."""
    a = hostile_driver(DEVICES[kind], seed=42, cases=3 * len(HOSTILE_KINDS))
    b = hostile_driver(DEVICES[kind], seed=42, cases=3 * len(HOSTILE_KINDS))
    a.assert_ok()
    assert a.total == 3 * len(HOSTILE_KINDS)
    assert all(a.cases[k] == 3 for k in HOSTILE_KINDS)
    assert a.outcomes == b.outcomes
    for k in ("loop", "next_out_of_range", "readable_after_writable", "huge_length"):
        assert a.outcomes[k] == {"refused": 3}


def test_malformed_chains_never_reach_handle() -> None:
    """The session refuses them: the device's own counters see only the valid ones."""
    dev = EchoKeeper()
    seen: list[int] = []
    real = dev.handle

    def spy(queue: int, chain: Chain) -> int | Pending:
        seen.append(chain.head)
        return real(queue, chain)

    dev.handle = spy  # type: ignore[method-assign]
    kinds = ["loop", "nested_indirect", "indirect_too_big", "address_wraps"]
    report = hostile_driver(dev, seed=1, cases=40, kinds=kinds, queues=[0])
    report.assert_ok()
    # only the probes after each case reached handle()
    assert len(seen) == 40 and report.outcomes == {k: {"refused": 10} for k in kinds}


def test_device_bugs_are_counted_and_optionally_fail() -> None:
    """Exceptions out of handle() are contained by the session (length 0): counted in
    handler_errors, a failure only when asked."""
    lenient = hostile_driver(Raises, seed=3, cases=30, kinds=["zero_length", "garbage_payload"])
    lenient.assert_ok()
    assert sum(lenient.handler_errors.values()) > 0
    strict = hostile_driver(
        Raises, seed=3, cases=30, kinds=["zero_length", "garbage_payload"], handler_errors_fail=True
    )
    assert not strict.ok and "IndexError" in strict.failures[0]
    with pytest.raises(AssertionError, match="seed 3"):
        strict.assert_ok()


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown hostile case kinds"):
        hostile_driver(EchoKeeper, kinds=["nope"])


# --------------------------------------------------------------------------- harness


def test_reset_zeroes_the_rings() -> None:
    """A stale used.idx after a reset would be reaped again by the next driver."""
    with DeviceHarness(EchoKeeper(), queue_size=8) as h:
        h.negotiate()
        for _ in range(5):
            h.request(0, out=[b"abcd"], in_sizes=[4])
        lay = h.layout(0)
        assert U16.unpack_from(h.memory.buf, lay.used + 2)[0] == 5
        h.reset()
        assert bytes(h.memory.buf[lay.desc : lay.end]) == bytes(lay.end - lay.desc)
        h.negotiate()
        c = h.request(0, out=[b"wxyz"], in_sizes=[4])
        assert c.written == b"wxyz" and h.take_completions(0) == []


def test_device_faults_are_recorded_by_kind() -> None:
    class Past(EchoKeeper):
        def handle(self, queue: int, chain: Chain) -> int | Pending:
            return chain.writable_len + 1

    with DeviceHarness(Past(), queue_size=8) as h:
        h.negotiate()
        c = h.request(0, out=[b"abcd"], in_sizes=[4])
        assert c.len == 0
        assert [f.kind for f in h.device_faults] == ["bad_length"]
    with DeviceHarness(Raises(), queue_size=8) as h:
        h.negotiate()
        h.request(0, out=[b"ab"], in_sizes=[4])
        assert [(f.kind, f.queue) for f in h.device_faults] == [("raised", 0)]
        assert "IndexError: no header" in h.device_faults[0].detail


def test_conformance_runs_the_hostile_driver() -> None:
    report = check_device_conformance(EchoKeeper)
    report.assert_ok()
    assert report.results["malformed_ring"] is None
