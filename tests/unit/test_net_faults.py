"""NetDevice carrying out the net actions of a fault plan, in-process (DeviceHarness: the
real DriverQueue and DeviceSession; the harness clock moves only when the test says so),
observed from outside: the frames a backend receives from the device (net.tx), the
frames the driver reaps from the receive queue (net.rx), the device counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import vdev.net
from vdev.injector import FaultInjector
from vdev.net import REORDER_MAX_HOLD_S, NetDevice
from vdev.testing import DeviceHarness
from vdev.testing import RecordingBackend as Wire
from vdev.virtio.faults import FaultPlan
from vdev.virtio.net import NET_HDR_SIZE, RX_QUEUE, S_LINK_UP, TX_QUEUE, NetHdr

pytestmark = pytest.mark.timeout(60)

MAC = b"\x02\x00\x00\x00\x00\x01"
HDR = NetHdr().pack()


def frame(i: int, n: int = 64) -> bytes:
    """Frame number ``i``: an Ethernet header, then ``i`` in the payload."""
    head = b"\xff" * 6 + MAC + b"\x88\xb5"
    return head + i.to_bytes(2, "big") + bytes((i + k) & 0xFF for k in range(n - 16))


def number(f: bytes) -> int:
    return int.from_bytes(f[14:16], "big")


class Nic:
    """A NetDevice on a Wire, driven through a DeviceHarness, with a plan."""

    def __init__(self, rules: list[dict[str, Any]] | None, seed: int = 1) -> None:
        self.wire = Wire()
        self.device = NetDevice(self.wire, mac=MAC, queue_size=256)
        self.h = DeviceHarness(self.device)
        self.injector: FaultInjector | None = None
        if rules is not None:
            plan = FaultPlan.from_dict({"seed": seed, "rules": rules})
            self.injector = FaultInjector(plan, device="eth0", clock=self.h.clock)
            self.h.session.attach_injector(self.injector)
        self.h.negotiate()

    def tx(self, *numbers: int) -> None:
        for i in numbers:
            assert self.h.request(TX_QUEUE, out=[HDR + frame(i)]).len == 0

    def sent(self) -> list[int]:
        return [number(f) for f in self.wire.frames]

    def post(self, n: int) -> None:
        for _ in range(n):
            self.h.submit(RX_QUEUE, in_sizes=[2048])

    def rx(self, *numbers: int) -> None:
        for i in numbers:
            self.wire.play(frame(i))
        self.h.run_pending()

    def received(self) -> list[bytes]:
        return [c.written[NET_HDR_SIZE:] for c in self.h.take_completions(RX_QUEUE)]

    @property
    def m(self) -> dict[str, int]:
        return self.h.counters

    def close(self) -> None:
        self.h.close()


@pytest.fixture
def nics() -> Iterator[list[Nic]]:
    made: list[Nic] = []
    yield made
    for n in made:
        n.close()


def nic(nics: list[Nic], *rules: dict[str, Any], seed: int = 1) -> Nic:
    n = Nic(list(rules), seed)
    nics.append(n)
    return n


def rule(event: str, action: str, **when: Any) -> dict[str, Any]:
    params = when.pop("params", {})
    return {"when": {"event": event, **when}, "what": {"action": action, **params}}


# --------------------------------------------------------------------------- loss


def test_loss_every_third_tx_frame(nics: list[Nic]) -> None:
    n = nic(nics, rule("net.tx", "loss", every=3))
    n.tx(*range(1, 10))
    assert n.sent() == [1, 2, 4, 5, 7, 8]
    assert n.m["tx_fault_lost"] == 3 and n.m["tx_frames"] == 9 and n.m["fault:loss"] == 3
    assert n.m["rx_fault_lost"] == 0


def test_loss_on_rx_only(nics: list[Nic]) -> None:
    n = nic(nics, rule("net.rx", "loss", nth=2))
    n.post(8)
    n.tx(1)  # tx is not net.rx
    n.rx(1, 2, 3)
    assert [number(f) for f in n.received()] == [1, 3]
    assert n.sent() == [1] and n.m["rx_fault_lost"] == 1 and n.m["rx_frames"] == 2


def _lost(seed: int, action: str, params: dict[str, Any], **when: Any) -> list[int]:
    n = Nic([rule("net.tx", action, params=params, **when)], seed=seed)
    try:
        n.tx(*range(200))
        return sorted(set(range(200)) - set(n.sent()))
    finally:
        n.close()


def test_random_loss_replays_with_the_seed() -> None:
    a = _lost(5, "loss", {}, probability=0.3)
    b = _lost(5, "loss", {}, probability=0.3)
    c = _lost(6, "loss", {}, probability=0.3)
    assert a == b and 20 < len(a) < 100
    assert a != c


def test_gilbert_elliott_is_bursty_and_replays() -> None:
    params = {"p": 0.05, "r": 0.3, "h": 0.0, "k": 1.0}
    a = _lost(11, "gilbert_elliott", params)
    assert a == _lost(11, "gilbert_elliott", params)
    assert a  # with k=1 and h=0 frames are lost only in the bad state: in bursts
    runs = sum(1 for i in a if i - 1 not in a)
    assert runs < len(a)


# --------------------------------------------------------------------------- duplicate, corrupt


def test_duplicate_rx(nics: list[Nic]) -> None:
    n = nic(nics, rule("net.rx", "duplicate", nth=2, params={"count": 2}))
    n.post(8)
    n.rx(1, 2, 3)
    got = n.received()
    assert [number(f) for f in got] == [1, 2, 2, 2, 3]
    assert got[1] == got[2] == got[3] == frame(2)
    assert n.m["rx_fault_duplicates"] == 2 and n.m["rx_frames"] == 5


def test_corrupt_byte_after_the_virtio_header(nics: list[Nic]) -> None:
    n = nic(nics, rule("net.rx", "corrupt_byte", nth=1, params={"offset": 14, "xor": 0x80}))
    n.post(4)
    n.rx(1, 1)
    bad, good = n.received()
    assert good == frame(1)
    assert [i for i in range(len(bad)) if bad[i] != good[i]] == [14]
    assert bad[14] == good[14] ^ 0x80 and n.m["rx_fault_corrupted"] == 1


def test_corrupt_byte_on_tx_beyond_the_frame(nics: list[Nic]) -> None:
    n = nic(nics, rule("net.tx", "corrupt_byte", params={"offset": 5000}))
    n.tx(1)
    assert n.wire.frames == [frame(1)] and n.m["faults_out_of_range"] == 1


# --------------------------------------------------------------------------- reorder, delay


def test_reorder_holds_behind_depth_frames(nics: list[Nic]) -> None:
    n = nic(nics, rule("net.tx", "reorder", nth=1, params={"depth": 2}))
    n.tx(1, 2, 3, 4)
    assert n.sent() == [2, 3, 1, 4]
    assert n.m["tx_fault_reordered"] == 1 and n.m["tx_fault_reorder_timeouts"] == 0
    n.h.advance(1.0)  # the cancelled bound does nothing
    assert n.sent() == [2, 3, 1, 4]


def test_reorder_releases_the_last_frame_after_the_bound(nics: list[Nic]) -> None:
    n = nic(nics, rule("net.tx", "reorder", nth=2, params={"depth": 5}))
    n.tx(1, 2)
    assert n.sent() == [1]
    n.h.advance(REORDER_MAX_HOLD_S / 2)
    assert n.sent() == [1]
    n.h.advance(REORDER_MAX_HOLD_S)
    assert n.sent() == [1, 2] and n.m["tx_fault_reorder_timeouts"] == 1


def test_delay_keeps_order(nics: list[Nic]) -> None:
    n = nic(nics, rule("net.tx", "delay", params={"s": 0.5}))
    n.tx(1, 2)
    n.h.advance(0.1)
    n.tx(3)
    assert n.sent() == [] and n.m["tx_fault_delayed"] == 3
    n.h.advance(0.4)
    assert n.sent() == [1, 2]
    n.h.advance(0.1)
    assert n.sent() == [1, 2, 3]


def test_delay_on_rx_with_jitter_replays() -> None:
    orders = []
    for _ in range(2):
        n = Nic([rule("net.rx", "delay", params={"s": 0.05, "jitter_s": 0.04})], seed=3)
        try:
            n.post(32)
            n.rx(*range(20))
            assert n.received() == []
            n.h.advance(0.1)
            orders.append([number(f) for f in n.received()])
        finally:
            n.close()
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(20))
    assert orders[0] != list(range(20))  # jitter reorders


def test_delay_on_the_nth_only(nics: list[Nic]) -> None:
    """Frames not delayed overtake a delayed one (as netem with a filter)."""
    n = nic(nics, rule("net.tx", "delay", nth=1, params={"s": 1.0}))
    n.tx(1, 2, 3)
    assert n.sent() == [2, 3]
    n.h.advance(1.0)
    assert n.sent() == [2, 3, 1]


# --------------------------------------------------------------------------- rate limit


def test_rate_limit_paces_frames(nics: list[Nic]) -> None:
    # 8000 bit/s = 1000 bytes/s; 64-byte frames: a burst of 200 bytes lets 4 go at once
    n = nic(nics, rule("net.tx", "rate_limit", params={"bits_per_s": 8000, "burst_bytes": 200}))
    n.tx(*(range(1, 6)))
    assert n.sent() == [1, 2, 3, 4] and n.m["tx_fault_rate_queued"] == 1
    n.h.advance(0.03)
    assert n.sent() == [1, 2, 3, 4]  # the 5th conforms 0.056 s later
    n.h.advance(0.03)
    assert n.sent() == [1, 2, 3, 4, 5]
    n.tx(6)
    assert n.sent() == [1, 2, 3, 4, 5] and n.m["tx_fault_rate_queued"] == 2
    n.h.advance(1.0)
    assert n.sent() == [1, 2, 3, 4, 5, 6]


def test_rate_limit_queue_is_bounded(nics: list[Nic]) -> None:
    n = nic(nics, rule("net.tx", "rate_limit", params={"bits_per_s": 8}))
    total = vdev.net.RATE_QUEUE_MAX + 10
    n.tx(*range(total))
    assert len(n.sent()) == 1  # the first conforms, the rest wait
    assert n.m["tx_fault_rate_queued"] == vdev.net.RATE_QUEUE_MAX
    assert n.m["tx_fault_rate_dropped"] == total - 1 - vdev.net.RATE_QUEUE_MAX


def test_held_frames_are_bounded(nics: list[Nic], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vdev.net, "FAULT_HELD_MAX", 4)
    n = nic(nics, rule("net.tx", "delay", params={"s": 1.0}))
    n.tx(*range(6))
    assert n.m["tx_fault_delayed"] == 4 and n.m["tx_fault_hold_full"] == 2
    n.h.advance(1.0)
    assert n.sent() == [0, 1, 2, 3]


# --------------------------------------------------------------------------- link flap


def test_link_flap(nics: list[Nic]) -> None:
    n = nic(nics, rule("net.tx", "link_flap", nth=2, params={"down_s": 1.0}))
    n.post(4)
    n.tx(1, 2, 3)
    assert n.sent() == [1]
    assert n.device.config()[6] & S_LINK_UP == 0 and n.h.config_interrupts == 1
    assert n.m["link_flaps"] == 1 and n.m["tx_dropped_link_down"] == 2
    n.rx(7)
    assert n.received() == [] and n.m["rx_dropped_link_down"] == 1
    n.h.advance(1.0)
    assert n.device.config()[6] & S_LINK_UP and n.h.config_interrupts == 2
    n.tx(4)
    n.rx(8)
    assert n.sent() == [1, 4] and [number(f) for f in n.received()] == [8]


# --------------------------------------------------------------------------- reset, no plan


def test_reset_drops_held_frames(nics: list[Nic]) -> None:
    n = nic(
        nics,
        rule("net.tx", "delay", params={"s": 1.0}),
        rule("net.rx", "reorder", params={"depth": 3}),
    )
    n.post(4)
    n.tx(1, 2)
    n.rx(5)
    n.h.reset()
    assert n.m["tx_fault_dropped_reset"] == 2 and n.m["rx_fault_dropped_reset"] == 1
    n.h.negotiate()
    n.h.advance(2.0)
    assert n.sent() == [] and n.m["handler_errors"] == 0


def test_no_plan_is_the_plain_path() -> None:
    n = Nic(None)
    try:
        assert not n.device._faulty
        n.tx(1)
        assert n.sent() == [1] and "tx_fault_lost" not in n.m
    finally:
        n.close()
