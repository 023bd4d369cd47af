"""NetDevice in-process: a driver's two queues on a FlatMemory, the device behind the
real :class:`vdev.session.DeviceSession` (no processes, no sockets on the data path).

The "driver" here is :class:`Rig`: it posts receive buffers and transmits frames through
real :class:`~vdev.virtio.queue.DriverQueue` rings, kicks the session and reaps the used
rings, joining merged receive buffers by ``num_buffers`` as a driver does. Backends are
real :class:`~vdev.netbackend.NetBackend` subclasses (the loopback, and a capturing wire
that records what the device hands it). Checksums are verified with a reference sum
written here.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vdev.device import PENDING
from vdev.net import (
    BACKENDS,
    NET_COUNTERS,
    NET_FEATURES,
    LoopbackBackend,
    NetDevice,
)
from vdev.net_pcap import PcapBackend
from vdev.netbackend import NetBackend
from vdev.session import DeviceSession, Ring
from vdev.testing import RecordingBackend as Wire
from vdev.virtio import (
    DeviceId,
    DriverQueue,
    F,
    FlatMemory,
    NetF,
    ProtocolError,
    RingLayout,
    bit,
)
from vdev.virtio.net import (
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    NET_HDR_SIZE,
    RX_QUEUE,
    S_LINK_UP,
    TX_QUEUE,
    NetConfig,
    NetHdr,
)
from vdev.virtio.pcap import MAX_SNAPLEN, file_header, read_all, record

pytestmark = pytest.mark.timeout(60)

MAC = bytes.fromhex("02aabbccddee")
RING = bit(F.VERSION_1) | bit(F.EVENT_IDX)
ALL = RING | NET_FEATURES
PLAIN = RING | bit(NetF.MAC) | bit(NetF.STATUS) | bit(NetF.MTU)
SRC_IP = bytes([10, 0, 0, 1])
DST_IP = bytes([10, 0, 0, 2])
ETH = bytes.fromhex("020000000002020000000001")


# --------------------------------------------------------------------------- packets


def ref_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo(proto: int, length: int) -> bytes:
    return SRC_IP + DST_IP + bytes([0, proto]) + struct.pack("!H", length)


def tcp_frame(payload: bytes, *, partial: bool = True, flags: int = 0x18, seq: int = 5) -> bytes:
    """Ethernet | IPv4 | TCP | payload; ``partial``: pseudo-header sum in the checksum
    field (NEEDS_CSUM style), else the full checksum."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", 1234, 80, seq, 1, 0x50, flags, 65535, 0, 0))
    l4 = 20 + len(payload)
    if partial:
        struct.pack_into("!H", tcp, 16, ref_sum(pseudo(6, l4)))
    else:
        struct.pack_into("!H", tcp, 16, ~ref_sum(pseudo(6, l4) + bytes(tcp) + payload) & 0xFFFF)
    ip = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + l4, 7, 0x4000, 64, 6, 0, SRC_IP, DST_IP)
    )
    struct.pack_into("!H", ip, 10, ~ref_sum(bytes(ip)) & 0xFFFF)
    return ETH + b"\x08\x00" + bytes(ip) + bytes(tcp) + payload


def udp_frame(payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 1, 2, 8 + len(payload), 0)
    ip = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 7, 0, 64, 17, 0, SRC_IP, DST_IP)
    )
    struct.pack_into("!H", ip, 10, ~ref_sum(bytes(ip)) & 0xFFFF)
    return ETH + b"\x08\x00" + bytes(ip) + udp + payload


def raw_frame(n: int, seed: int = 0) -> bytes:
    """An Ethernet frame of ``n`` bytes (a made-up ethertype, patterned payload)."""
    body = bytes((i * 13 + seed) & 0xFF for i in range(n - 14))
    return ETH + b"\x88\xb5" + body


def tcp_ok(frame: bytes) -> bool:
    """The IPv4 header and TCP checksums of ``frame`` verify."""
    ip = frame[14:34]
    total = struct.unpack_from("!H", ip, 2)[0]
    seg = frame[34 : 14 + total]
    return ref_sum(ip) == 0xFFFF and ref_sum(pseudo(6, len(seg)) + seg) == 0xFFFF


def tso_hdr(mss: int = 1000) -> NetHdr:
    return NetHdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, mss, 34, 16)


CSUM_HDR = NetHdr(HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16)


# --------------------------------------------------------------------------- the rig


class Transport:
    """The session's transport, counting what it is asked to do."""

    def __init__(self) -> None:
        self.interrupts = [0, 0]
        self.config_interrupts = 0
        self.broken: list[str] = []

    def interrupt(self, ring: Ring) -> None:
        self.interrupts[ring.index] += 1

    def ring_broken(self, ring: Ring, why: str) -> None:
        self.broken.append(why)

    def config_interrupt(self) -> None:
        self.config_interrupts += 1


class Rig:
    """A driver for ``dev``: both rings on one FlatMemory, a real DeviceSession."""

    TX_AREA = 1 << 17

    def __init__(self, dev: NetDevice, features: int, qsize: int = 256) -> None:
        self.dev = dev
        self.features = features
        self.mem = FlatMemory(bytearray(8 << 20))
        self.rx_layout = RingLayout.packed(qsize, 0)
        self.tx_layout = RingLayout.packed(qsize, (self.rx_layout.end + 4095) & ~4095)
        self.rxq = DriverQueue(self.mem, self.rx_layout, event_idx=True)
        self.txq = DriverQueue(self.mem, self.tx_layout, event_idx=True)
        self.tx_buf = (self.tx_layout.end + 4095) & ~4095
        self.top = self.tx_buf + self.TX_AREA
        self.transport = Transport()
        self.used_buffers: list[tuple[int, int]] = []  # what received() reaped last
        self.session = DeviceSession(dev, self.transport, log_file=io.StringIO())
        self.start(features)

    def start(self, features: int) -> None:
        s = self.session
        for ring, layout in zip(s.rings, (self.rx_layout, self.tx_layout), strict=True):
            s.check_num(ring, layout.size, "test")
            s.start_ring(ring, self.mem, layout, features)
        self.dev.activate(features)

    def alloc(self, n: int) -> int:
        addr = self.top
        self.top += (n + 63) & ~63
        assert self.top <= self.mem.size, "test rig out of memory"
        return addr

    def post_rx(self, count: int, size: int) -> list[tuple[int, int]]:
        bufs = [(self.alloc(size), size) for _ in range(count)]
        self.repost(bufs)
        return bufs

    def repost(self, bufs: list[tuple[int, int]]) -> None:
        for addr, size in bufs:
            self.mem.view(addr, size)[:] = b"\xee" * size
            self.rxq.add([], [(addr, size)], (addr, size))
        self.rxq.kick_prepare()
        self.session.kick(RX_QUEUE)
        self.session.serve_pending()

    def transmit_raw(self, readable: list[bytes], writable: list[int] | None = None) -> int:
        """One TX chain of these readable buffers (and writable sizes); returns the used
        length the device gave it."""
        addr = self.tx_buf
        parts = []
        for data in readable:
            self.mem.view(addr, len(data))[:] = data
            parts.append((addr, len(data)))
            addr += len(data)
        wr = []
        for n in writable or []:
            wr.append((addr, n))
            addr += n
        assert addr <= self.tx_buf + self.TX_AREA
        self.txq.add(parts, wr, "tx")
        self.txq.kick_prepare()
        self.session.kick(TX_QUEUE)
        self.session.serve_pending()
        done = self.txq.get_used()
        assert [t for t, _ in done] == ["tx"], "the device completes TX chains at once"
        return done[0][1]

    def transmit(self, hdr: NetHdr, frame: bytes) -> None:
        assert self.transmit_raw([hdr.pack() + frame]) == 0, "nothing written into TX"

    def received(self) -> list[tuple[NetHdr, bytes, list[int]]]:
        """Reap the receive ring: ``(header, frame, used lengths)`` per packet."""
        out: list[tuple[NetHdr, bytes, list[int]]] = []
        used = self.rxq.get_used()
        self.used_buffers = [tok for tok, _ in used]
        i = 0
        mrg = bool(self.features & bit(NetF.MRG_RXBUF))
        while i < len(used):
            (addr, size), n = used[i]
            data = bytes(self.mem.view(addr, n))
            hdr = NetHdr.unpack(data)
            count = hdr.num_buffers if mrg else 1
            assert count >= 1 and (mrg or hdr.num_buffers == 1)
            lens = [n]
            parts = [data[NET_HDR_SIZE:]]
            for (a2, _), n2 in used[i + 1 : i + count]:
                parts.append(bytes(self.mem.view(a2, n2)))
                lens.append(n2)
            assert len(lens) == count, "all buffers of a merged packet are used together"
            out.append((hdr, b"".join(parts), lens))
            i += count
        return out


def make(
    features: int = ALL,
    backend: NetBackend | None = None,
    mtu: int = 1500,
    qsize: int = 256,
) -> tuple[NetDevice, Rig]:
    dev = NetDevice(backend if backend is not None else Wire(), mac=MAC, mtu=mtu, queue_size=qsize)
    return dev, Rig(dev, features, qsize)


@pytest.fixture
def closing() -> Iterator[list[Rig]]:
    rigs: list[Rig] = []
    yield rigs
    for r in rigs:
        r.session.close()


# --------------------------------------------------------------------------- identity


def test_identity_features_and_config() -> None:
    dev = NetDevice(Wire(), mac=MAC, mtu=9000, queue_size=64)
    assert dev.device_id == DeviceId.NET and dev.num_queues == 2 and dev.max_queue_size == 64
    f = dev.device_features()
    for b in (
        NetF.MAC,
        NetF.STATUS,
        NetF.MTU,
        NetF.CSUM,
        NetF.GUEST_CSUM,
        NetF.HOST_TSO4,
        NetF.GUEST_TSO4,
        NetF.MRG_RXBUF,
    ):
        assert f & bit(b), b
    assert f == NET_FEATURES and f >> 28 == 0, "ring features are the runtime's"
    cfg = NetConfig.unpack(dev.config())
    assert cfg == NetConfig(MAC, S_LINK_UP, 1, 9000)
    assert set(NET_COUNTERS) <= set(dev.metrics.snapshot())
    with pytest.raises(ProtocolError):
        dev.write_config(0, b"\x00")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mac": b"\x02" * 5},
        {"mtu": 67},
        {"mtu": 65536},
        {"queue_size": 100},
        {"queue_size": 65536},
    ],
)
def test_bad_construction(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"mac": MAC, **kwargs}
    with pytest.raises(ValueError):
        NetDevice(Wire(), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "feature,needs", [(NetF.HOST_TSO4, NetF.CSUM), (NetF.GUEST_TSO4, NetF.GUEST_CSUM)]
)
def test_activation_refuses_broken_dependencies(feature: NetF, needs: NetF) -> None:
    dev = NetDevice(Wire(), mac=MAC)
    with pytest.raises(ProtocolError, match="5.1.3.1"):
        dev.activate(ALL & ~bit(needs))
    dev.activate(ALL & ~bit(needs) & ~bit(feature))  # fine without both


def test_registry_has_loopback_and_pcap() -> None:
    from vdev.net import load_backends

    backends = load_backends()
    assert {"loopback", "pcap"} <= set(backends)
    assert BACKENDS is backends
    assert isinstance(backends["loopback"].create(None), LoopbackBackend)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- transmit


def test_transmit_plain_frame(closing: list[Rig]) -> None:
    wire = Wire()
    dev, rig = make(backend=wire)
    closing.append(rig)
    frame = raw_frame(1514)
    rig.transmit(NetHdr(), frame)
    assert wire.sent == [(NetHdr(), frame)]
    m = dev.metrics
    assert (m["tx_frames"], m["tx_bytes"], m["tx_bad_frames"]) == (1, 1514, 0)


def test_transmit_header_split_over_descriptors(closing: list[Rig]) -> None:
    wire = Wire()
    dev, rig = make(backend=wire)
    closing.append(rig)
    frame = raw_frame(300)
    data = NetHdr().pack() + frame
    assert rig.transmit_raw([data[:5], data[5:20], data[20:]]) == 0
    assert wire.sent == [(NetHdr(), frame)]


# (name, features, readable parts, writable sizes)
_H = NetHdr().pack()
_T = tcp_frame(bytes(3000))
_U = udp_frame(bytes(3000))
_S = tcp_frame(b"x" * 100)
_NO_CSUM = ALL & ~bit(NetF.CSUM) & ~bit(NetF.HOST_TSO4)


def _h(*args: int, **kwargs: int) -> bytes:
    return NetHdr(*args, **kwargs).pack()


BAD_TX = [
    ("no header", ALL, [_H[:8]], None),
    ("header, no frame", ALL, [_H], None),
    ("frame of 13 bytes", ALL, [_H + raw_frame(14)[:13]], None),
    ("writable part", ALL, [_H + raw_frame(60)], [64]),
    ("over the MTU", ALL, [_H + raw_frame(1515)], None),
    ("unknown gso_type 2", ALL, [_h(1, 2, 54, 1000, 34, 16) + _T], None),
    ("GSO_UDP not offered", ALL, [_h(1, GSO_UDP, 42, 1000, 34, 6) + _U], None),
    ("GSO_TCPV6 not offered", ALL, [_h(1, GSO_TCPV6, 74, 1000, 54, 16) + _T], None),
    ("GSO ECN not offered", ALL, [_h(1, GSO_TCPV4 | GSO_ECN, 54, 1000, 34, 16) + _T], None),
    ("GSO without HOST_TSO4", ALL & ~bit(NetF.HOST_TSO4), [tso_hdr().pack() + _T], None),
    ("GSO with gso_size 0", ALL, [tso_hdr(0).pack() + _T], None),
    ("GSO without NEEDS_CSUM", ALL, [_h(0, GSO_TCPV4, 54, 1000) + _T], None),
    ("GSO of a UDP packet", ALL, [_h(1, GSO_TCPV4, 42, 1000, 34, 6) + _U], None),
    ("GSO of a cut packet", ALL, [tso_hdr().pack() + _T[:2000]], None),
    ("NEEDS_CSUM without CSUM", _NO_CSUM, [CSUM_HDR.pack() + _S], None),
    ("checksum field past the end", ALL, [_h(1, csum_start=34, csum_offset=127) + _S], None),
    ("checksum start past the end", ALL, [_h(1, csum_start=200, csum_offset=0) + _S], None),
]


@pytest.mark.parametrize("name,features,readable,writable", BAD_TX, ids=[b[0] for b in BAD_TX])
def test_bad_transmit_is_dropped_and_counted(
    closing: list[Rig], name: str, features: int, readable: list[bytes], writable: list[int] | None
) -> None:
    wire = Wire()
    dev, rig = make(features, backend=wire)
    closing.append(rig)
    assert rig.transmit_raw(readable, writable) == 0
    assert wire.sent == [], name
    assert dev.metrics["tx_bad_frames"] == 1
    assert dev.metrics["tx_frames"] == 0
    # and the device keeps working
    rig.transmit(NetHdr(), raw_frame(100))
    assert len(wire.sent) == 1 and dev.metrics["tx_frames"] == 1
    assert rig.session.counters["handler_errors"] == 0


def test_transmit_size_limits(closing: list[Rig]) -> None:
    wire = Wire()
    dev, rig = make(backend=wire, mtu=1000)
    closing.append(rig)
    rig.transmit(NetHdr(), raw_frame(14))  # an Ethernet header alone is a frame
    rig.transmit(NetHdr(), raw_frame(1014))  # MTU + 14
    tagged = ETH + b"\x81\x00\x00\x07" + raw_frame(1014)[12:]  # 802.1Q: MTU + 18
    assert len(tagged) == 1018
    rig.transmit(NetHdr(), tagged)
    rig.transmit(NetHdr(), raw_frame(1015))
    assert dev.metrics["tx_frames"] == 3 and dev.metrics["tx_bad_frames"] == 1
    assert [len(f) for _, f in wire.sent] == [14, 1014, 1018]


def test_checksum_completed_for_a_backend_without_offload(closing: list[Rig]) -> None:
    wire = Wire()
    dev, rig = make(backend=wire)
    closing.append(rig)
    payload = bytes(range(256)) * 4 + b"odd"
    rig.transmit(CSUM_HDR, tcp_frame(payload))
    [(hdr, frame)] = wire.sent
    assert hdr == NetHdr(), "a plain header: nothing left to do"
    assert frame == tcp_frame(payload, partial=False)
    assert tcp_ok(frame)
    m = dev.metrics
    assert (m["tx_csum_offloaded"], m["tx_csum_completed"], m["tx_frames"]) == (1, 1, 1)


def test_tso_segmented_for_a_backend_without_offload(closing: list[Rig]) -> None:
    wire = Wire()
    dev, rig = make(backend=wire)
    closing.append(rig)
    payload = bytes((i * 7) & 0xFF for i in range(20000))
    rig.transmit(tso_hdr(1448), tcp_frame(payload, flags=0x19, seq=0xFFFFF000))  # FIN|PSH|ACK
    segs = [f for _, f in wire.sent]
    assert len(segs) == 14 and all(h == NetHdr() for h, _ in wire.sent)
    got = b""
    for i, seg in enumerate(segs):
        assert tcp_ok(seg), f"segment {i} checksums"
        assert len(seg) <= 1448 + 54
        assert struct.unpack_from("!I", seg, 38)[0] == (0xFFFFF000 + len(got)) & 0xFFFFFFFF
        last = i == len(segs) - 1
        assert seg[47] == (0x19 if last else 0x10), "FIN/PSH only on the last"
        got += seg[54:]
    assert got == payload
    m = dev.metrics
    assert (m["tx_gso_frames"], m["tx_segments"], m["tx_frames"]) == (1, 14, 1)
    assert m["tx_bytes"] == len(tcp_frame(payload))


def test_offloads_pass_through_to_a_backend_that_takes_them(closing: list[Rig]) -> None:
    wire = Wire(frozenset({"csum", "tso4"}))
    dev, rig = make(backend=wire)
    closing.append(rig)
    big = tcp_frame(bytes(30000))
    small = tcp_frame(b"abc")
    rig.transmit(tso_hdr(1448), big)
    rig.transmit(CSUM_HDR, small)
    assert wire.sent == [
        (NetHdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16), big),
        (NetHdr(HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16), small),
    ]
    assert dev.metrics["tx_segments"] == dev.metrics["tx_csum_completed"] == 0


def test_backend_refusal_is_counted(closing: list[Rig]) -> None:
    wire = Wire(accept=False)
    dev, rig = make(backend=wire)
    closing.append(rig)
    rig.transmit(NetHdr(), raw_frame(100))
    rig.transmit(tso_hdr(1000), tcp_frame(bytes(2500)))
    assert dev.metrics["tx_dropped_backend"] == 1 + 3
    assert dev.metrics["tx_frames"] == 2


# --------------------------------------------------------------------------- link


def test_link_down_drops_both_ways(closing: list[Rig]) -> None:
    wire = Wire()
    dev, rig = make(backend=wire)
    closing.append(rig)
    rig.post_rx(4, 2048)
    dev.set_link(False)
    assert NetConfig.unpack(dev.config()).status & S_LINK_UP == 0
    assert rig.transport.config_interrupts == 1
    dev.set_link(False)  # no change: no interrupt
    assert rig.transport.config_interrupts == 1
    rig.transmit(NetHdr(), raw_frame(100))
    assert dev.receive(NetHdr(), raw_frame(100)) is False
    assert dev.rx_buffers_available(), "buffers are kept for later"
    assert wire.sent == [] and rig.received() == []
    m = dev.metrics
    assert (m["tx_dropped_link_down"], m["rx_dropped_link_down"]) == (1, 1)
    dev.set_link(True)
    assert NetConfig.unpack(dev.config()).status & S_LINK_UP
    assert rig.transport.config_interrupts == 2 and m["link_changes"] == 2
    rig.transmit(NetHdr(), raw_frame(100))
    assert dev.receive(NetHdr(), raw_frame(100)) is True
    assert len(wire.sent) == 1 and len(rig.received()) == 1


# --------------------------------------------------------------------------- receive


def test_merged_receive_buffers(closing: list[Rig]) -> None:
    dev, rig = make(mtu=9000)
    closing.append(rig)
    rig.post_rx(16, 1024)
    assert dev.rx_buffers == 16 and dev.kept(RX_QUEUE) == 16
    frame = raw_frame(9014, seed=3)
    assert dev.receive(NetHdr(), frame) is True
    [(hdr, got, lens)] = rig.received()
    want_bufs = -(-(9014 + NET_HDR_SIZE) // 1024)
    assert got == frame
    assert hdr.num_buffers == want_bufs == len(lens) == 9
    assert lens[:-1] == [1024] * (want_bufs - 1), "every buffer but the last used fully"
    assert sum(lens) == 9014 + NET_HDR_SIZE
    assert dev.rx_buffers == 16 - want_bufs
    m = dev.metrics
    assert (m["rx_frames"], m["rx_bytes"], m["rx_merged"]) == (1, 9014, 1)


def test_merged_frame_needs_enough_buffers(closing: list[Rig]) -> None:
    dev, rig = make(mtu=9000)
    closing.append(rig)
    rig.post_rx(3, 1024)
    assert dev.receive(NetHdr(), raw_frame(5000)) is False
    assert dev.metrics["rx_dropped_no_buffer"] == 1 and dev.rx_buffers == 3
    assert dev.receive(NetHdr(), raw_frame(3000, seed=1)) is True
    [(hdr, got, lens)] = rig.received()
    assert got == raw_frame(3000, seed=1) and hdr.num_buffers == 3


def test_too_big_without_mrg_rxbuf(closing: list[Rig]) -> None:
    dev, rig = make(ALL & ~bit(NetF.MRG_RXBUF), mtu=9000)
    closing.append(rig)
    rig.post_rx(2, 1526)
    assert dev.receive(NetHdr(), raw_frame(1515)) is False
    assert dev.metrics["rx_dropped_too_big"] == 1
    assert dev.rx_buffers == 2, "the buffer stays for the next frame"
    assert dev.receive(NetHdr(), raw_frame(1514, seed=9)) is True
    [(hdr, got, lens)] = rig.received()
    assert got == raw_frame(1514, seed=9) and hdr.num_buffers == 1 and lens == [1526]


def test_no_buffer_flood_is_counted_and_bounded(closing: list[Rig]) -> None:
    dev, rig = make()
    closing.append(rig)
    frame = raw_frame(1000)
    assert not any(dev.receive(NetHdr(), frame) for _ in range(10000))
    assert dev.metrics["rx_dropped_no_buffer"] == 10000
    rig.post_rx(4, 2048)
    results = [dev.receive(NetHdr(), frame) for _ in range(10000)]
    assert results.count(True) == 4 and results[:4] == [True] * 4
    m = dev.metrics
    assert m["rx_dropped_no_buffer"] == 10000 + 9996
    assert m["rx_frames"] == 4 and m["rx_bytes"] == 4000
    assert dev.rx_buffers == 0 and dev.kept(RX_QUEUE) == 0, "nothing queued inside"
    assert [f for _, f, _ in rig.received()] == [frame] * 4


def test_bad_receive_buffers(closing: list[Rig]) -> None:
    dev, rig = make()
    closing.append(rig)
    a = rig.alloc(64)
    rig.rxq.add([], [(a, NET_HDR_SIZE - 1)], "short")
    rig.rxq.add([(a, 4)], [(a + 8, 2048)], "readable")
    rig.rxq.add([], [(a, NET_HDR_SIZE)], "just a header")
    rig.rxq.kick_prepare()
    rig.session.kick(RX_QUEUE)
    rig.session.serve_pending()
    assert dict(rig.rxq.get_used()) == {"short": 0, "readable": 0}
    assert dev.metrics["rx_bad_buffers"] == 2 and dev.rx_buffers == 1


@pytest.mark.parametrize(
    "features,what",
    [
        (ALL & ~bit(NetF.GUEST_CSUM) & ~bit(NetF.GUEST_TSO4), "completed"),
        (ALL, "partial"),
    ],
    ids=["no-guest-csum", "guest-csum"],
)
def test_receive_partial_checksum(closing: list[Rig], features: int, what: str) -> None:
    dev, rig = make(features)
    closing.append(rig)
    rig.post_rx(2, 2048)
    frame = tcp_frame(b"hello" * 50)
    assert dev.receive(CSUM_HDR, frame)
    [(hdr, got, _)] = rig.received()
    if what == "completed":  # §5.1.6.4.1: flags 0 without GUEST_CSUM, a full checksum
        assert hdr.flags == 0 and got == tcp_frame(b"hello" * 50, partial=False)
        assert dev.metrics["rx_csum_completed"] == 1
    else:  # with GUEST_CSUM: delivered partial, as Linux does
        assert (hdr.flags, hdr.csum_start, hdr.csum_offset) == (HDR_F_NEEDS_CSUM, 34, 16)
        assert got == frame


def test_data_valid_only_with_guest_csum(closing: list[Rig]) -> None:
    for features, flags in ((ALL, HDR_F_DATA_VALID), (PLAIN, 0)):
        dev, rig = make(features)
        closing.append(rig)
        rig.post_rx(1, 2048)
        assert dev.receive(NetHdr(HDR_F_DATA_VALID | 4), raw_frame(100))
        [(hdr, _, _)] = rig.received()
        assert hdr.flags == flags


def test_receive_gso_whole_with_guest_tso4(closing: list[Rig]) -> None:
    dev, rig = make()
    closing.append(rig)
    rig.post_rx(64, 4096)
    frame = tcp_frame(bytes(range(256)) * 250)
    assert dev.receive(tso_hdr(1448), frame)
    [(hdr, got, lens)] = rig.received()
    assert got == frame
    assert (hdr.flags, hdr.gso_type, hdr.gso_size) == (HDR_F_NEEDS_CSUM, GSO_TCPV4, 1448)
    assert hdr.num_buffers == len(lens) == -(-(len(frame) + 12) // 4096)
    assert dev.metrics["rx_gso_frames"] == 1


@pytest.mark.parametrize("features", [ALL & ~bit(NetF.GUEST_TSO4), PLAIN], ids=["csum", "plain"])
def test_receive_gso_segmented_without_guest_tso4(closing: list[Rig], features: int) -> None:
    dev, rig = make(features)
    closing.append(rig)
    rig.post_rx(32, 2048)
    payload = bytes((i * 3) & 0xFF for i in range(10000))
    assert dev.receive(tso_hdr(1400), tcp_frame(payload))
    got = rig.received()
    assert len(got) == 8 == dev.metrics["rx_segments"] == dev.metrics["rx_frames"]
    want_flags = HDR_F_DATA_VALID if features & bit(NetF.GUEST_CSUM) else 0
    data = b""
    for hdr, seg, _ in got:
        assert hdr.gso_type == GSO_NONE and hdr.flags == want_flags
        assert tcp_ok(seg)
        data += seg[54:]
    assert data == payload


def test_receive_over_mtu_not_passed(closing: list[Rig]) -> None:
    dev, rig = make(mtu=1000)
    closing.append(rig)
    rig.post_rx(4, 4096)
    assert dev.receive(NetHdr(), raw_frame(1015)) is False
    assert dev.metrics["rx_dropped_over_mtu"] == 1
    assert dev.receive(NetHdr(), raw_frame(1014)) is True
    # without the MTU feature the driver did not agree to a limit
    dev2, rig2 = make(ALL & ~bit(NetF.MTU), mtu=1000)
    closing.append(rig2)
    rig2.post_rx(1, 4096)
    assert dev2.receive(NetHdr(), raw_frame(1015)) is True


@pytest.mark.parametrize(
    "hdr,frame",
    [
        (NetHdr(), raw_frame(20)[:13]),
        (NetHdr(HDR_F_NEEDS_CSUM, csum_start=90, csum_offset=9), raw_frame(100)),
        (NetHdr(HDR_F_NEEDS_CSUM, GSO_UDP, 42, 1000, 34, 6), udp_frame(bytes(3000))),
        (NetHdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 42, 0, 34, 16), tcp_frame(bytes(3000))),
        (tso_hdr(), udp_frame(bytes(3000))),  # segmented (no GUEST_TSO4): does not parse
    ],
)
def test_bad_frames_from_the_backend(closing: list[Rig], hdr: NetHdr, frame: bytes) -> None:
    dev, rig = make(ALL & ~bit(NetF.GUEST_TSO4))
    closing.append(rig)
    rig.post_rx(2, 2048)
    assert dev.receive(hdr, frame) is False
    assert dev.metrics["rx_bad_frames"] == 1 and dev.rx_buffers == 2
    assert dev.receive(NetHdr(), raw_frame(60))


# --------------------------------------------------------------------------- loopback


@pytest.mark.parametrize("features", [ALL, PLAIN], ids=["offloads", "plain"])
def test_loopback_every_size(closing: list[Rig], features: int) -> None:
    dev, rig = make(features, backend=LoopbackBackend())
    closing.append(rig)
    rig.post_rx(64, 1526)
    for n in range(60, 1514 + 1):
        frame = raw_frame(n, seed=n)
        rig.transmit(NetHdr(), frame)
        got = rig.received()
        assert len(got) == 1 and got[0][1] == frame, n
        assert got[0][0] == NetHdr(), "a plain frame comes back with a plain header"
        rig.repost(rig.used_buffers)  # the driver gives the buffer back
    m = dev.metrics
    count = 1514 - 60 + 1
    assert m["tx_frames"] == m["rx_frames"] == count
    assert m["tx_bytes"] == m["rx_bytes"] == sum(range(60, 1515))
    assert m["rx_dropped_no_buffer"] == m["tx_bad_frames"] == 0


def test_loopback_offloads_end_to_end(closing: list[Rig]) -> None:
    """With every offload: TSO comes back whole; without GUEST_TSO4 in segments."""
    payload = bytes((i * 11) & 0xFF for i in range(60000))
    for features, whole in ((ALL, True), (ALL & ~bit(NetF.GUEST_TSO4), False)):
        dev, rig = make(features, backend=LoopbackBackend())
        closing.append(rig)
        rig.post_rx(128, 2048)
        rig.transmit(tso_hdr(1448), tcp_frame(payload))
        got = rig.received()
        if whole:
            [(hdr, frame, _)] = got
            assert hdr.gso_type == GSO_TCPV4 and frame == tcp_frame(payload)
        else:
            assert len(got) == -(-60000 // 1448)
            assert all(tcp_ok(f) for _, f, _ in got)
            assert b"".join(f[54:] for _, f, _ in got) == payload


# --------------------------------------------------------------------------- reset


def test_reset_releases_kept_buffers(closing: list[Rig]) -> None:
    dev, rig = make()
    closing.append(rig)
    rig.post_rx(8, 2048)
    assert dev.rx_buffers == 8
    rig.session.reset()
    assert dev.rx_buffers == 0 and dev.features == 0
    assert rig.session.counters["chains_released"] == 8
    assert dev.receive(NetHdr(), raw_frame(60)) is False
    assert dev.metrics["rx_dropped_no_buffer"] == 1
    assert rig.session.counters["stale_completions"] == 0
    # a new negotiation on fresh rings works again
    rig.rxq = DriverQueue(rig.mem, rig.rx_layout, event_idx=True)
    rig.txq = DriverQueue(rig.mem, rig.tx_layout, event_idx=True)
    rig.start(ALL)
    rig.post_rx(1, 2048)
    assert dev.receive(NetHdr(), raw_frame(61))
    assert [f for _, f, _ in rig.received()] == [raw_frame(61)]


def test_ring_stop_releases_receive_buffers(closing: list[Rig]) -> None:
    dev, rig = make()
    closing.append(rig)
    rig.post_rx(3, 2048)
    rig.session.stop_ring(rig.session.rings[RX_QUEUE])
    assert dev.rx_buffers == 0
    assert dev.receive(NetHdr(), raw_frame(60)) is False


def test_handle_keeps_receive_chains() -> None:
    """handle() on the RX queue answers PENDING (the session keeps the chain)."""
    from vdev.virtio import Chain

    dev = NetDevice(Wire(), mac=MAC)
    buf = memoryview(bytearray(2048))
    chain = Chain(0, [], [buf], 0, 2048, [])
    assert dev.handle(RX_QUEUE, chain) is PENDING
    assert dev.rx_buffers == 1
    dev.reset()
    assert dev.rx_buffers == 0


def test_close_closes_the_backend() -> None:
    wire = Wire()
    dev = NetDevice(wire, mac=MAC)
    dev.close()
    assert wire.closed


# --------------------------------------------------------------------------- pcap replay


def run_until(rig: Rig, done: Callable[[], bool], step: Callable[[], None] | None = None) -> None:
    """Run the session's real loop (poller, timers) until ``done()``, checked (after
    ``step()``) on a transport timer every millisecond; pytest-timeout bounds it."""
    s = rig.session

    def check() -> None:
        if step is not None:
            step()
        if done():
            s.stop()
        else:
            s.call_later(0.001, check)

    s.call_later(0.0, check)
    s.run()


def write_pcap(path: Path, frames: list[bytes], gap_us: int = 1000) -> None:
    t0 = 1_700_000_000_000_000
    path.write_bytes(
        file_header() + b"".join(record(f, t0 + k * gap_us) for k, f in enumerate(frames))
    )


def test_pcap_replay_waits_for_buffers_and_records(tmp_path: Path, closing: list[Rig]) -> None:
    fs = [raw_frame(60 + 70 * k, seed=k) for k in range(20)]
    src = tmp_path / "in.pcap"
    write_pcap(src, fs[:10])
    with src.open("ab") as f:  # a record cut by its capture's snaplen is skipped
        f.write(record(raw_frame(300), 1_700_000_001_000_000, snaplen=100))
        f.write(b"".join(record(x, 1_700_000_002_000_000) for x in fs[10:]))
    out = tmp_path / "out.pcap"
    dev, rig = make(backend=PcapBackend(str(out), str(src)))
    closing.append(rig)
    posted: list[object] = []

    def post_when_the_replay_waited() -> None:
        if not posted and dev.metrics["pcap_replay_waits"] >= 1:
            posted.append(rig.post_rx(32, 2048))

    run_until(rig, lambda: dev.metrics["pcap_replay_done"] == 1, post_when_the_replay_waited)
    assert [f for _, f, _ in rig.received()] == fs, "nothing lost to the late buffers"
    m = dev.metrics
    assert m["pcap_replayed"] == m["rx_frames"] == 20
    assert m["pcap_replay_truncated"] == 1 and m["pcap_replay_dropped"] == 0
    assert m["rx_dropped_no_buffer"] == 0
    _, recs = read_all(out.read_bytes())
    assert [r.data for r in recs] == fs, "received frames are recorded"


def test_pcap_replay_paced_and_too_big(tmp_path: Path, closing: list[Rig]) -> None:
    fs = [raw_frame(100, seed=1), raw_frame(1514, seed=2), raw_frame(100_000), raw_frame(200)]
    src = tmp_path / "paced.pcap"
    t0 = 1_700_000_000_000_000
    src.write_bytes(
        file_header(snaplen=MAX_SNAPLEN)  # the 100 kB record spans several read chunks
        + b"".join(record(f, t0 + 2000 * k, snaplen=MAX_SNAPLEN) for k, f in enumerate(fs))
    )
    dev, rig = make(ALL & ~bit(NetF.MRG_RXBUF), backend=PcapBackend(None, str(src), paced=True))
    closing.append(rig)
    rig.post_rx(4, 1024)  # the 1514-byte frame does not fit one buffer
    run_until(rig, lambda: dev.metrics["pcap_replay_done"] == 1)
    assert [f for _, f, _ in rig.received()] == [fs[0], fs[3]]
    m = dev.metrics
    assert (m["pcap_replayed"], m["pcap_replay_dropped"]) == (2, 2)
    assert (m["rx_dropped_too_big"], m["rx_dropped_over_mtu"]) == (1, 1)
