"""virtio-net multi-queue on the device side (VIRTIO_NET_F_CTRL_VQ + VIRTIO_NET_F_MQ):
the control queue's answers and counters, and receive steering, through
:class:`vdev.testing.DeviceHarness` (the real DeviceSession, rings in a FlatMemory).

The "backend" is a wire that records what the device sends; frames from the outside
world are handed to the device with :meth:`NetDevice.receive`, as a backend does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

import vdev.net
from vdev.net import NET_FEATURES, NET_MQ_COUNTERS, NetDevice
from vdev.testing import HOSTILE_KINDS, DeviceHarness, hostile_driver
from vdev.testing import RecordingBackend as Wire
from vdev.virtio import F, NetF, ProtocolError, bit
from vdev.virtio.net import (
    CTRL_CLASS_MQ,
    CTRL_DATA_MAX,
    CTRL_ERR,
    CTRL_MQ_VQ_PAIRS_SET,
    CTRL_OK,
    MAX_QUEUE_PAIRS,
    NetConfig,
    NetHdr,
    ctrl_queue_index,
    flow_key,
    mq_pairs_set,
    rx_queue_index,
    tx_queue_index,
)

pytestmark = pytest.mark.timeout(60)

MAC = bytes.fromhex("02aabbccddee")
LOCAL = bytes([10, 0, 0, 1])
REMOTE = bytes([10, 0, 0, 2])
RING = bit(F.VERSION_1) | bit(F.EVENT_IDX)
MQ = bit(NetF.MQ) | bit(NetF.CTRL_VQ)
HDR = NetHdr().pack()


def udp(src: bytes, sport: int, dst: bytes, dport: int, payload: bytes = b"x" * 20) -> bytes:
    """Ethernet | IPv4 | UDP (checksums left 0: the device does not check them)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 1, 0x4000, 64, 17, 0, src, dst)
    return bytes(6) + MAC + b"\x08\x00" + ip + struct.pack("!HHHH", sport, dport, 8, 0) + payload


def out(sport: int, dport: int = 2000) -> bytes:
    """A frame we transmit (LOCAL:sport -> REMOTE:dport)."""
    return udp(LOCAL, sport, REMOTE, dport)


def back(sport: int, dport: int = 2000) -> bytes:
    """The answer to :func:`out` (REMOTE:dport -> LOCAL:sport)."""
    return udp(REMOTE, dport, LOCAL, sport)


@pytest.fixture
def harnesses() -> Iterator[list[DeviceHarness]]:
    made: list[DeviceHarness] = []
    yield made
    for h in made:
        h.close()


def make(
    made: list[DeviceHarness], pairs: int, accept: int | None = None, qsize: int = 16
) -> DeviceHarness:
    dev = NetDevice(Wire(), mac=MAC, queue_pairs=pairs, queue_size=qsize)
    h = DeviceHarness(dev, queue_size=qsize)
    made.append(h)
    h.negotiate(accept)
    return h


def dev_of(h: DeviceHarness) -> NetDevice:
    assert isinstance(h.device, NetDevice)
    return h.device


def command(h: DeviceHarness, readable: bytes, writable: int = 1) -> int | None:
    """Send one control command; the ack byte (None: not answered, used length 0)."""
    ctrl = ctrl_queue_index(dev_of(h).queue_pairs, True)
    c = h.request(ctrl, [readable] if readable else [], [writable] if writable else [])
    if c.len == 0:
        return None
    assert c.len == 1
    return c.written[0]


def post_rx(h: DeviceHarness, pair: int, count: int = 4) -> None:
    for _ in range(count):
        req = h.submit(rx_queue_index(pair), in_sizes=[2048])
        assert req.completion is None, "receive buffers are kept"


def transmit(h: DeviceHarness, pair: int, frame: bytes) -> None:
    assert h.request(tx_queue_index(pair), [HDR + frame]).len == 0


def received_on(h: DeviceHarness, pairs: int) -> dict[int, list[bytes]]:
    """Frames completed on each receive queue since the last call (header cut off)."""
    h.run_pending()
    return {
        p: [c.written[12:] for c in h.take_completions(rx_queue_index(p))] for p in range(pairs)
    }


# --------------------------------------------------------------------------- identity


def test_one_pair_is_todays_device(harnesses: list[DeviceHarness]) -> None:
    dev = NetDevice(Wire(), mac=MAC)
    assert dev.queue_pairs == 1 and dev.num_queues == 2
    assert dev.device_features() == NET_FEATURES
    assert not dev.device_features() & (bit(NetF.MQ) | bit(NetF.CTRL_VQ))
    assert NetConfig.unpack(dev.config()).max_virtqueue_pairs == 1
    assert not set(NET_MQ_COUNTERS) & set(dev.metrics.snapshot())


def test_several_pairs_offer_mq_and_a_control_queue() -> None:
    dev = NetDevice(Wire(), mac=MAC, queue_pairs=4)
    assert dev.num_queues == 9
    f = dev.device_features()
    assert f & bit(NetF.MQ) and f & bit(NetF.CTRL_VQ)
    assert f & ~(bit(NetF.MQ) | bit(NetF.CTRL_VQ)) == NET_FEATURES
    assert NetConfig.unpack(dev.config()).max_virtqueue_pairs == 4
    snap = dev.metrics.snapshot()
    assert set(NET_MQ_COUNTERS) <= set(snap)
    assert {f"rxq{k}_dropped_no_buffer" for k in (1, 2, 3, 4)} <= set(snap)
    assert NetDevice(Wire(), mac=MAC, queue_pairs=MAX_QUEUE_PAIRS).num_queues == 33


@pytest.mark.parametrize(
    ("pairs", "error"),
    [(0, ValueError), (17, ValueError), (-1, ValueError), ("2", TypeError), (True, TypeError)],
)
def test_bad_queue_pairs(pairs: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="queue_pairs"):
        NetDevice(Wire(), mac=MAC, queue_pairs=pairs)  # type: ignore[arg-type]


def test_mq_without_ctrl_vq_is_refused(harnesses: list[DeviceHarness]) -> None:
    dev = NetDevice(Wire(), mac=MAC, queue_pairs=2)
    h = DeviceHarness(dev, queue_size=16)
    harnesses.append(h)
    with pytest.raises(ProtocolError, match="CTRL_VQ"):  # §5.1.3.1
        h.negotiate(RING | NET_FEATURES | bit(NetF.MQ))


# --------------------------------------------------------------------------- control queue


def test_vq_pairs_set_ok(harnesses: list[DeviceHarness]) -> None:
    h = make(harnesses, 4)
    dev = dev_of(h)
    assert dev.active_pairs == 1, "§5.1.6.5.6.1: one pair until VQ_PAIRS_SET"
    assert command(h, mq_pairs_set(3)) == CTRL_OK
    assert dev.active_pairs == 3
    assert command(h, mq_pairs_set(4)) == CTRL_OK
    assert command(h, mq_pairs_set(1)) == CTRL_OK
    assert dev.active_pairs == 1
    m = dev.metrics
    assert (m["ctrl_commands"], m["ctrl_ok"], m["mq_pairs_set"], m["ctrl_bad"]) == (3, 3, 3, 0)


MQ_HDR = bytes((CTRL_CLASS_MQ, CTRL_MQ_VQ_PAIRS_SET))


@pytest.mark.parametrize(
    ("readable", "counter"),
    [
        (MQ_HDR + struct.pack("<H", 0), "ctrl_bad"),  # 0 pairs
        (MQ_HDR + struct.pack("<H", 5), "ctrl_bad"),  # more than max_virtqueue_pairs
        (MQ_HDR + struct.pack("<H", 0x8000), "ctrl_bad"),
        (MQ_HDR + b"\x02", "ctrl_bad"),  # short data
        (MQ_HDR, "ctrl_bad"),  # no data
        (MQ_HDR + b"\x02\x00\x00", "ctrl_bad"),  # a byte too many
        (bytes((CTRL_CLASS_MQ,)), "ctrl_bad"),  # no command byte
        (MQ_HDR + bytes(CTRL_DATA_MAX + 1), "ctrl_bad"),  # beyond any command
        (bytes((0, 0, 1)), "ctrl_unsupported"),  # VIRTIO_NET_CTRL_RX PROMISC
        (bytes((1, 1)) + bytes(8), "ctrl_unsupported"),  # MAC class
        (bytes((CTRL_CLASS_MQ, 1)) + bytes(16), "ctrl_unsupported"),  # RSS_CONFIG
        (bytes((CTRL_CLASS_MQ, 2)) + bytes(16), "ctrl_unsupported"),  # HASH_CONFIG
        (bytes((0xFF, 0xFF, 2, 0)), "ctrl_unsupported"),
    ],
)
def test_bad_commands_get_err(
    harnesses: list[DeviceHarness], readable: bytes, counter: str
) -> None:
    h = make(harnesses, 4)
    dev = dev_of(h)
    assert command(h, mq_pairs_set(2)) == CTRL_OK
    assert command(h, readable) == CTRL_ERR
    assert dev.active_pairs == 2, "a refused command changes nothing"
    m = dev.metrics
    assert m[counter] == 1 and m["ctrl_commands"] == 2 and m["ctrl_ok"] == 1
    # the device goes on answering
    assert command(h, mq_pairs_set(3)) == CTRL_OK and dev.active_pairs == 3


def test_command_without_ack_byte_is_not_answered(harnesses: list[DeviceHarness]) -> None:
    h = make(harnesses, 2)
    dev = dev_of(h)
    assert command(h, mq_pairs_set(2), writable=0) is None
    assert dev.metrics["ctrl_bad"] == 1 and dev.active_pairs == 1
    assert command(h, mq_pairs_set(2), writable=4) == CTRL_OK  # a bigger ack buffer is fine


def test_ctrl_vq_without_mq_has_queue_2_and_no_mq_commands(
    harnesses: list[DeviceHarness],
) -> None:
    h = make(harnesses, 4, RING | NET_FEATURES | bit(NetF.CTRL_VQ))
    dev = dev_of(h)
    c = h.request(2, [mq_pairs_set(2)], [1])  # §5.1.2: controlq is 2 without MQ
    assert c.len == 1 and c.written[0] == CTRL_ERR
    assert dev.metrics["ctrl_unsupported"] == 1 and dev.active_pairs == 1
    # the queues of further pairs are not used without MQ
    assert h.request(5, [HDR + out(1)]).len == 0
    assert dev.metrics["queue_unused"] == 1 and dev.metrics["tx_frames"] == 0


def test_reset_goes_back_to_one_pair(harnesses: list[DeviceHarness]) -> None:
    h = make(harnesses, 2)
    dev = dev_of(h)
    assert command(h, mq_pairs_set(2)) == CTRL_OK
    transmit(h, 1, out(7))
    h.negotiate()  # resets first
    assert dev.active_pairs == 1 and dev.rx_buffers == 0
    assert command(h, mq_pairs_set(2)) == CTRL_OK


# --------------------------------------------------------------------------- steering


def test_received_frames_follow_the_last_transmit_pair(harnesses: list[DeviceHarness]) -> None:
    h = make(harnesses, 2)
    dev = dev_of(h)
    wire = dev.backend
    assert isinstance(wire, Wire)
    assert command(h, mq_pairs_set(2)) == CTRL_OK
    post_rx(h, 0)
    post_rx(h, 1)
    transmit(h, 1, out(1000))
    transmit(h, 0, out(1001))
    assert wire.frames == [out(1000), out(1001)]
    assert dev.receive(NetHdr(), back(1000)) and dev.receive(NetHdr(), back(1001))
    assert received_on(h, 2) == {0: [back(1001)], 1: [back(1000)]}
    # the flow moves to the other pair: its answers follow
    transmit(h, 0, out(1000))
    transmit(h, 1, out(1001))
    assert dev.receive(NetHdr(), back(1000)) and dev.receive(NetHdr(), back(1001))
    assert received_on(h, 2) == {0: [back(1000)], 1: [back(1001)]}
    assert dev.metrics["rx_steered_flow"] == 4 and dev.metrics["rx_steered_hash"] == 0


def test_before_vq_pairs_set_only_pair_1_receives(harnesses: list[DeviceHarness]) -> None:
    h = make(harnesses, 2)
    dev = dev_of(h)
    post_rx(h, 0)
    post_rx(h, 1)
    transmit(h, 1, out(1000))  # a transmit queue beyond the active pair: still sent
    assert dev.metrics["tx_inactive_pair"] == 1 and dev.metrics["tx_frames"] == 1
    for port in range(1000, 1004):
        assert dev.receive(NetHdr(), back(port))
    got = received_on(h, 2)
    assert len(got[0]) == 4 and got[1] == []


def test_unknown_flows_spread_over_the_active_pairs_only(harnesses: list[DeviceHarness]) -> None:
    h = make(harnesses, 4, qsize=64)
    dev = dev_of(h)
    assert command(h, mq_pairs_set(2)) == CTRL_OK
    for p in range(4):
        post_rx(h, p, 40)
    transmit(h, 2, out(5000))  # pair 3 is not active: its flow is not learned
    frames = [back(port) for port in range(3000, 3032)] + [back(5000)]
    for f in frames:
        assert dev.receive(NetHdr(), f)
    got = received_on(h, 4)
    assert got[2] == [] and got[3] == [], "nothing on a queue beyond the active pairs"
    assert got[0] and got[1], "a hash over the flow spreads them"
    assert sorted(got[0] + got[1]) == sorted(frames)
    m = dev.metrics
    assert m["rx_steered_hash"] == len(frames) and m["tx_inactive_pair"] == 1
    # the same flow always hashes to the same pair
    again = [back(port) for port in range(3000, 3032)]
    for f in again:
        assert dev.receive(NetHdr(), f)
    got2 = received_on(h, 4)
    assert set(got2[0]) == {f for f in got[0] if f != back(5000)}
    # non-IPv4 (an ARP frame) goes to receiveq1
    arp = bytes(6) + MAC + b"\x08\x06" + bytes(28)
    assert dev.receive(NetHdr(), arp)
    assert received_on(h, 4)[0] == [arp]


def test_a_pair_without_buffers_drops_its_frames(harnesses: list[DeviceHarness]) -> None:
    h = make(harnesses, 2)
    dev = dev_of(h)
    assert command(h, mq_pairs_set(2)) == CTRL_OK
    post_rx(h, 0, 2)
    transmit(h, 1, out(1000))
    transmit(h, 0, out(1001))
    assert dev.rx_buffers_available(), "one active receive queue has buffers"
    assert not dev.receive(NetHdr(), back(1000))
    assert dev.receive(NetHdr(), back(1001))
    m = dev.metrics
    assert m["rx_dropped_no_buffer"] == 1
    assert m["rxq2_dropped_no_buffer"] == 1 and m["rxq1_dropped_no_buffer"] == 0
    assert received_on(h, 2) == {0: [back(1001)], 1: []}
    post_rx(h, 1, 1)
    assert dev.receive(NetHdr(), back(1000))
    assert received_on(h, 2) == {0: [], 1: [back(1000)]}


def test_flow_table_is_bounded(
    harnesses: list[DeviceHarness], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vdev.net, "FLOW_TABLE_MAX", 8)
    h = make(harnesses, 2, qsize=64)
    dev = dev_of(h)
    assert command(h, mq_pairs_set(2)) == CTRL_OK
    for port in range(20):
        transmit(h, 1, out(port))
    assert dev.metrics["flow_evictions"] == 12
    post_rx(h, 0, 8)
    post_rx(h, 1, 8)
    assert dev.receive(NetHdr(), back(19))  # a flow still known
    assert received_on(h, 2)[1] == [back(19)]
    assert dev.metrics["rx_steered_flow"] == 1


# --------------------------------------------------------------------------- flow keys


def test_flow_key() -> None:
    f = out(1234, 80)
    assert flow_key(f) == flow_key(back(1234, 80), received=True)
    assert flow_key(f) != flow_key(out(1235, 80))
    k = flow_key(f)
    assert k is not None and k[0] == 17 and len(k) == 13
    assert k == bytes([17, *LOCAL, *REMOTE]) + struct.pack("!HH", 1234, 80)
    # a fragment: no ports, so every fragment of a datagram is one flow
    frag = bytearray(f)
    frag[20] = 0x20  # MF
    key = flow_key(bytes(frag))
    assert key is not None and key[9:] == bytes(4)
    assert flow_key(f[:33]) is None  # truncated IPv4 header
    assert flow_key(bytes(6) + MAC + b"\x86\xdd" + bytes(40)) is None  # IPv6
    bad_ihl = bytearray(f)
    bad_ihl[14] = 0x44
    assert flow_key(bytes(bad_ihl)) is None
    assert flow_key(memoryview(f)) == flow_key(f)
    with pytest.raises(ValueError):
        mq_pairs_set(0)


# --------------------------------------------------------------------------- hostile


def test_hostile_driver_on_every_queue_of_two_pairs() -> None:
    """Malformed chains on all five queues (the control queue included) are refused or
    break the ring, never reach a handler that raises; a valid probe still works."""
    report = hostile_driver(
        lambda: NetDevice(Wire(), mac=MAC, queue_pairs=2, queue_size=64),
        seed=5,
        cases=3 * len(HOSTILE_KINDS),
        queues=[0, 1, 2, 3, 4],
        handler_errors_fail=True,
    )
    report.assert_ok()
    assert not report.handler_errors


# --------------------------------------------------------------------------- thread map


def test_thread_queue_map_is_round_robin_stable_and_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kernel.queue_map as qm
    from hostops.sync import start_thread

    m = qm.ThreadQueueMap(2)
    seen: dict[str, list[int]] = {}

    def body(name: str) -> None:
        seen[name] = [m.current() for _ in range(3)]

    for i in range(4):  # one after the other: the order of first use is known
        start_thread(body, f"t{i}", name=f"t{i}").join()
    assert seen == {"t0": [0] * 3, "t1": [1] * 3, "t2": [0] * 3, "t3": [1] * 3}
    assert len(m) == 4
    monkeypatch.setattr(qm, "MAX_THREAD_MAP", 4)
    got: list[int] = []
    start_thread(lambda: got.extend([m.current(), m.current()]), name="late").join()
    assert got[0] == got[1] and len(m) == 4, "beyond the bound: hashed, not remembered"
    assert qm.ThreadQueueMap(1).current() == 0
    with pytest.raises(ValueError):
        qm.ThreadQueueMap(0)
