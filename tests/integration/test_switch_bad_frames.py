"""Malformed frames from a guest-facing peer: a vhost-user front-end that breaks the
transmit rules of virtio-net (§5.1.6.2.1) against ``python -m vdev net --backend
switch --vhost-user SOCK``, a port of a real switch with two kernels on other ports.

The hostile front-end is our kernel's own vhost-user transport (``kernel.VhostUserNet``)
booted on a private bus whose NET driver, :class:`RawNetDriver`, writes transmit chains
by hand: whatever ``virtio_net_hdr`` and frame the test asks for, straight into the
ring (the real driver would refuse to build most of them). Every chain must come back
(used length 0: the device writes nothing into a transmit buffer) and the frame must go
nowhere: the device drops it and counts it in ``tx_bad_frames``. The counters asserted:

* the switch's (``vdev.switch.SwitchClient``): the back-end's port received exactly the
  good frames, and none of the switch's own drop reasons (``runts``, ``oversize``,
  ``bad_hdr``) moved -- the device stopped the bad frames before the wire. Two frames
  that are valid virtio-net but break IEEE 802.1D (a group source address, a reserved
  link-local destination) do reach the switch, which drops and counts them
  (``bad_source``, ``link_local`` and the port's ``dropped``);
* the back-end's own (its device counters, logged when the connection ends; read after
  the back-end exited, so the line is surely there): ``tx_bad_frames`` is the number of
  malformed frames, ``tx_frames`` the number of good ones; its session counters say
  every chain was a valid one (``bad_chains`` 0: the frames broke virtio-net's rules,
  not the ring's) and nothing failed handling them (``handler_errors`` 0).

Afterwards the back-end's port still carries a good frame (the largest one the MTU
allows, received by a kernel's UDP socket) and the kernels on the other ports still
exchange UDP and pings. Nothing sleeps: every wait is on a completion event, a socket
with a timeout or the switch's answer.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from netpeer import NetBackendProcess, Peer, Switch, running_switch

import kernel
from hostops.sync import Condition, Event, Lock
from kernel.bus import VirtioBus, VirtioDriver
from kernel.files import SO_BROADCAST, SOL_SOCKET
from kernel.transport import KernelQueue
from vdev.virtio import DeviceId, F, NetF, VirtioError, bit
from vdev.virtio.net import (
    ETH_HLEN,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_UDP,
    HDR_F_NEEDS_CSUM,
    NET_HDR_SIZE,
    RX_QUEUE,
    TX_QUEUE,
    NetHdr,
    format_mac,
    parse_mac,
)
from vdev.virtio.packet import inet_checksum, ipv4_header_checksum, ipv4_pseudo_sum

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

GSO_TCPV6 = 4  # virtio_net_hdr gso_type (§5.1.6): not offered by the device
F_MAC = parse_mac("02:00:00:00:0b:ad")
F_IP = bytes([10, 0, 0, 9])
A_IP = bytes([10, 0, 0, 1])
A_PORT = 5000
MTU = 1500
QSIZE = 64
RX_BUF = 2048  # a whole frame with its header, VLAN tag included (no MRG_RXBUF)
WAIT_S = 10.0


# =========================================================================== frames


def eth(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x0800) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, l4: bytes, src: bytes = F_IP, dst: bytes = A_IP) -> bytes:
    hdr = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0, src, dst)
    )
    struct.pack_into("!H", hdr, 10, ipv4_header_checksum(hdr))
    return bytes(hdr) + l4


def udp(data: bytes, sport: int = 4000, dport: int = A_PORT) -> bytes:
    """An IPv4/UDP packet from F_IP to A_IP with a correct checksum (RFC 768)."""
    n = 8 + len(data)
    seg = bytearray(struct.pack("!HHHH", sport, dport, n, 0) + data)
    c = inet_checksum(seg, ipv4_pseudo_sum(F_IP, A_IP, 17, n)) or 0xFFFF
    struct.pack_into("!H", seg, 6, c)
    return ipv4(17, bytes(seg))


def tcp(data: bytes) -> bytes:
    """An IPv4/TCP packet (ACK|PSH) whose checksum field holds the pseudo-header sum,
    as a sender asking for checksum offload leaves it (§5.1.6.2)."""
    n = 20 + len(data)
    seg = bytearray(struct.pack("!HHIIBBHHH", 4000, 80, 1, 1, 5 << 4, 0x18, 65535, 0, 0) + data)
    struct.pack_into("!H", seg, 16, ~inet_checksum(b"", ipv4_pseudo_sum(F_IP, A_IP, 6, n)) & 0xFFFF)
    return ipv4(6, bytes(seg))


@dataclass(frozen=True)
class Bad:
    """One malformed transmit chain: its readable part (header + frame bytes, which
    may be shorter than a header) and an optional device-writable part."""

    name: str
    readable: bytes
    writable: int = 0


def bad_cases(a_mac: bytes) -> list[Bad]:
    """Each breaks one rule of §5.1.6.2 / §5.1.6.2.1 / §5.1.4.2 (the device's table)."""
    plain = NetHdr().pack()
    u = eth(a_mac, F_MAC, udp(b"u" * 100))
    t = eth(a_mac, F_MAC, tcp(b"t" * 3000))
    csum_tcp = ETH_HLEN + 20  # TCP checksum field: csum_start + 16
    big = eth(a_mac, F_MAC, udp(b"m" * (MTU - 28 + 1)))  # one byte over the MTU
    vlan = a_mac + F_MAC + b"\x81\x00\x00\x05" + big[12:]  # over even with a VLAN tag
    assert len(big) == ETH_HLEN + MTU + 1 and len(vlan) == ETH_HLEN + 4 + MTU + 1

    def hdr(
        flags: int, gso: int, gso_size: int = 1448, start: int = csum_tcp, off: int = 16
    ) -> bytes:
        return NetHdr(flags, gso, 54, gso_size, start, off).pack()

    nc = HDR_F_NEEDS_CSUM
    return [
        Bad("shorter than a virtio_net_hdr", plain[:6]),
        Bad("header only, no frame", plain),
        Bad("runt: 13 bytes of frame", plain + u[:13]),
        Bad("a device-writable buffer in a transmit chain", plain + u, writable=64),
        Bad("gso_type UDP (never offered)", hdr(nc, GSO_UDP, 1000, 34, 6) + u),
        Bad("gso_type TCPV6 (never offered)", hdr(nc, GSO_TCPV6) + t),
        Bad("gso_type TCPV4 | ECN (HOST_ECN not offered)", hdr(nc, GSO_TCPV4 | GSO_ECN) + t),
        Bad("gso_type 0x7f", hdr(nc, 0x7F) + t),
        Bad("GSO with gso_size 0", hdr(nc, GSO_TCPV4, 0) + t),
        Bad("GSO without NEEDS_CSUM", hdr(0, GSO_TCPV4) + t),
        Bad("GSO_TCPV4 on a UDP frame", hdr(nc, GSO_TCPV4, 1000, 34, 6) + u),
        Bad("csum_start past the frame", hdr(nc, GSO_NONE, 0, len(u) + 10, 6) + u),
        Bad("checksum field straddles the end", hdr(nc, GSO_NONE, 0, len(u) - 1, 0) + u),
        Bad("csum_offset past the frame", hdr(nc, GSO_NONE, 0, 34, 0xFFFF) + u),
        Bad("frame longer than the MTU", plain + big),
        Bad("tagged frame longer than the MTU", plain + vlan),
    ]


# =========================================================================== the driver


class _Tx:
    """A transmit chain in flight: its DMA blocks, then its used length."""

    def __init__(self, driver: RawNetDriver, blocks: list[int]) -> None:
        self.driver = driver
        self.blocks = blocks
        self.used_len: int | None = None
        self.error: OSError | None = None
        self.done = Event()

    def complete(self, used_len: int) -> None:
        self.used_len = used_len
        self._finish()

    def fail(self, error: OSError) -> None:
        self.error = error
        self._finish()

    def _finish(self) -> None:
        dma = self.driver.transport.dma
        if dma is not None:
            for b in self.blocks:
                dma.free(b)
        self.done.set()

    def wait(self) -> int:
        assert self.done.wait(WAIT_S), "the device never returned the transmit chain"
        assert self.error is None, self.error
        assert self.used_len is not None
        return self.used_len


class _Rx:
    """One receive buffer."""

    def __init__(self, driver: RawNetDriver, addr: int) -> None:
        self.driver = driver
        self.addr = addr

    def complete(self, used_len: int) -> None:
        self.driver._received(self, used_len)

    def fail(self, error: OSError) -> None:
        pass


class RawNetDriver(VirtioDriver):
    """A virtio-net driver that sends whatever it is given (see the module docstring):
    VERSION_1, CSUM and HOST_TSO4 (so that GSO headers are the device's to judge),
    EVENT_IDX; receive buffers of :data:`RX_BUF` bytes, reposted as they come back."""

    device_id = DeviceId.NET
    supported_features = (
        (bit(F.VERSION_1) | bit(F.EVENT_IDX) | bit(NetF.CSUM) | bit(NetF.HOST_TSO4))
        | bit(NetF.MAC)
        | bit(NetF.MTU)
        | bit(NetF.STATUS)
    )

    def __init__(self, transport: Any) -> None:
        super().__init__(transport)
        self.rxq: KernelQueue | None = None
        self.txq: KernelQueue | None = None
        self.received = 0
        self._repost: list[_Rx] = []
        self._lock = Lock()
        self._rx_cond = Condition(self._lock)

    def probe(self) -> None:
        t = self.transport
        self.rxq = t.setup_queue(RX_QUEUE, QSIZE)
        self.txq = t.setup_queue(TX_QUEUE, QSIZE)
        assert t.dma is not None
        area = t.dma.alloc(RX_BUF * QSIZE)
        assert area is not None
        self._repost = [_Rx(self, area + i * RX_BUF) for i in range(QSIZE)]
        self.rxq.refill = self._refill

    def started(self) -> None:
        self._refill()

    def _received(self, b: _Rx, used_len: int) -> None:
        with self._lock:
            self.received += 1
            self._repost.append(b)
            self._rx_cond.notify_all()

    def wait_received(self, n: int) -> None:
        """Wait until ``n`` frames were received in all."""
        with self._rx_cond:
            ok = self._rx_cond.wait_for(lambda: self.received >= n, WAIT_S)
        assert ok, f"received {self.received} frames, not {n}"

    def _refill(self) -> None:
        q = self.rxq
        assert q is not None
        with self._lock:
            bufs, self._repost = self._repost, []
        with q.lock:
            if q.failed is not None:
                return
            for b in bufs:
                q.add([], [(b.addr, RX_BUF)], b)
            need = q.publish()
        if need:
            q.notify()

    def send(self, readable: bytes, writable: int = 0) -> _Tx:
        """Put one chain on the transmit queue: ``readable`` in one descriptor (none
        if empty), then a ``writable``-byte one if asked; kick."""
        t, q = self.transport, self.txq
        assert t.dma is not None and t.region is not None and q is not None
        blocks: list[int] = []
        r: list[tuple[int, int]] = []
        w: list[tuple[int, int]] = []
        if readable:
            a = t.dma.alloc(len(readable))
            assert a is not None
            t.region.buf[a : a + len(readable)] = readable
            blocks.append(a)
            r.append((a, len(readable)))
        if writable:
            a = t.dma.alloc(writable)
            assert a is not None
            blocks.append(a)
            w.append((a, writable))
        token = _Tx(self, blocks)
        with q.lock:
            try:
                q.add(r, w, token)
            except VirtioError:
                for b in blocks:
                    t.dma.free(b)
                raise
            need = q.publish()
        if need:
            q.notify()
        return token


# =========================================================================== fixtures


@pytest.fixture
def switch() -> Iterator[Switch]:
    with running_switch() as sw:
        yield sw


@pytest.fixture
def backend(switch: Switch) -> Iterator[NetBackendProcess]:
    be = NetBackendProcess(switch, "guest0").start()
    try:
        yield be
    finally:
        be.stop()


@pytest.fixture
def peer(switch: Switch) -> Iterator[Peer]:
    p = Peer(backend="switch", switch=switch.endpoint, ip="10.0.0.2/24")
    try:
        yield p
    finally:
        p.close()


def device_counters(be: NetBackendProcess, nth: int) -> dict[str, int]:
    """The back-end device's counters (cumulative) logged when connection ``nth``
    ended; the back-end must have exited (then the line is surely written)."""
    assert be.proc is None, "stop the back-end first"
    m = re.search(rf"connection {nth} device counters: (.*)$", be.log_text(), re.M)
    assert m, f"no device counters of connection {nth} in the log: {be.log_text()}"
    return {k: int(v) for k, v in (kv.rsplit(" ", 1) for kv in m[1].split(", "))}


def session_totals(be: NetBackendProcess, nth: int) -> dict[str, int]:
    """The back-end's session counters logged when connection ``nth`` ended."""
    assert be.proc is None, "stop the back-end first"
    m = re.search(rf"connection {nth} closed: .*\(totals: (.*)\)$", be.log_text(), re.M)
    assert m, f"no totals of connection {nth} in the log: {be.log_text()}"
    return {k: int(v) for k, v in (kv.rsplit(" ", 1) for kv in m[1].split(", "))}


def echo(k: kernel.Kernel, fd: int, data: bytes) -> None:
    k.sys.sendto(fd, data, ("10.0.0.2", 7))
    got, addr = k.sys.recvfrom(fd, 65536)
    assert (got, addr) == (data, ("10.0.0.2", 7))


SWITCH_DROPS = ("runts", "oversize", "bad_hdr", "bad_source", "link_local", "dropped")


# =========================================================================== the test


def test_malformed_frames_are_dropped_and_counted_and_the_switch_goes_on(
    switch: Switch, backend: NetBackendProcess, peer: Peer
) -> None:
    bus = VirtioBus()
    bus.register_driver(DeviceId.NET, RawNetDriver)
    spec_a = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.1/24")
    spec_f = kernel.VhostUserNet(backend.sock, mac=format_mac(F_MAC), queue_size=QSIZE)
    with kernel.boot(devices=[spec_a]) as ka:
        a_mac = parse_mac(str(ka.devices[0].mac))
        fd = ka.sys.socket()
        ka.sys.settimeout(fd, WAIT_S)
        echo(ka, fd, b"A and B before")  # the kernels on the other ports talk
        srv = ka.sys.socket()
        ka.sys.bind(srv, ("0.0.0.0", A_PORT))
        ka.sys.settimeout(srv, WAIT_S)

        with kernel.boot(devices=[spec_f], bus=bus) as kf:
            drv = kf.devices[0].driver
            assert isinstance(drv, RawNetDriver) and kf.devices[0].link is None
            assert drv.transport.has_feature(NetF.HOST_TSO4)
            # The back-end reads the switch's welcome (its carrier) only once it has
            # receive buffers; a broadcast queued behind that welcome reaching F shows
            # the back-end's link is up (over vhost-user it cannot tell us otherwise).
            ka.sys.setsockopt(fd, SOL_SOCKET, SO_BROADCAST, 1)
            ka.sys.sendto(fd, b"anyone?", ("10.0.0.255", 9))
            drv.wait_received(1)
            # a good frame first: the path works and the switch learns F's MAC
            good = NetHdr().pack() + eth(a_mac, F_MAC, udp(b"before"))
            assert drv.send(good).wait() == 0
            assert ka.sys.recvfrom(srv, 2048) == (b"before", ("10.0.0.9", 4000))
            port = switch.port_of(backend.pid)
            sw = switch.stats()["switch"]

            cases = bad_cases(a_mac)
            for case in cases:
                assert drv.send(case.readable, case.writable).wait() == 0, case.name
            # valid virtio-net, but IEEE 802.1D says no: the switch drops these two
            plain = NetHdr().pack()
            group_src = plain + eth(a_mac, bytes.fromhex("030000000001"), udp(b"g"))
            link_local = plain + eth(bytes.fromhex("0180c200000e"), F_MAC, udp(b"l"))
            for frame in (group_src, link_local):
                assert drv.send(frame).wait() == 0
            # the largest good frame the MTU allows still crosses; the switch handled
            # everything F sent before it (one port, one ordered stream)
            payload = bytes(range(256)) * 5 + b"x" * (MTU - 28 - 1280)
            last = plain + eth(a_mac, F_MAC, udp(payload))
            assert len(last) - NET_HDR_SIZE == ETH_HLEN + MTU
            assert drv.send(last).wait() == 0
            assert ka.sys.recvfrom(srv, 2048) == (payload, ("10.0.0.9", 4000))

            port2 = switch.port_of(backend.pid)
            sw2 = switch.stats()["switch"]
            assert port2["rx_frames"] - port["rx_frames"] == 3  # 2 refused by 802.1D + 1
            assert port2["dropped"] - port["dropped"] == 2
            delta = {k: sw2[k] - sw[k] for k in SWITCH_DROPS}
            assert delta == {
                "runts": 0,
                "oversize": 0,
                "bad_hdr": 0,
                "bad_source": 1,
                "link_local": 1,
                "dropped": 2,
            }
            assert drv.transport.failed is None  # the device never gave up on us

        # the other ports keep working
        for n in (1, 1472, 1473, 8000):
            echo(ka, fd, bytes([n & 0xFF]) * n)
        assert len(ka.sys.ping("10.0.0.2", count=2, timeout=5.0)) == 2
        back = peer.call(op="ping", addr="10.0.0.1", count=2, timeout=5.0)
        assert len(back["rtts"]) == 2, back

    # the back-end's own counters (logged when F's connection ended)
    assert backend.stop() == 0
    dev = device_counters(backend, 1)
    assert dev["tx_bad_frames"] == len(cases)
    assert dev["tx_frames"] == 4  # before, the two 802.1D ones, the last
    assert dev["tx_dropped_link_down"] == 0 and dev["tx_dropped_backend"] == 0
    # every chain was a valid chain (§2.7): the device's own rules dropped the frames,
    # and nothing in it failed on them
    ses = session_totals(backend, 1)
    assert ses["bad_chains"] == 0 and ses["ring_errors"] == 0 and ses["handler_errors"] == 0
