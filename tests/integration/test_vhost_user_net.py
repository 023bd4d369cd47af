"""``kernel.VhostUserNet``: our kernel as the vhost-user net front-end of a back-end it
does not own (``python -m vdev net --backend switch --switch EP --vhost-user SOCK``).

Real parts only: a switch process, back-end processes on it, kernels in this process
(and a ``kernel.Net`` on the ZeroMQ transport as the other end). What the back-end was
told is read from its own log (the features it activated with); what crossed the switch
from the switch's statistics. Nothing sleeps: waits are on the switch's port changes, a
socket with a timeout, or the device's failure event.

The front-end owns the config space, as QEMU does: the MAC (given, or a random locally
administered one), LINK_UP and the MTU are ours -- offered to the driver whatever the
back-end offers and never passed on to it -- while the data path features (EVENT_IDX,
MRG_RXBUF, the offloads) are negotiated with the back-end.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netpeer import NetBackendProcess, Switch, running_switch

import kernel
from hostops.errors import PeerGone
from hostops.unix import UnixConnection, UnixServer
from kernel.specs import NET_FRONTEND_FEATURES
from vdev.virtio import DeviceId, F, NetF, bit
from vdev.virtio.net import NET_CONFIG_BYTES, S_LINK_UP, NetConfig, parse_mac
from vdev.virtio.vhost_user import (
    F_PROTOCOL_FEATURES,
    HEADER_SIZE,
    REPLY_KIND,
    Payload,
    ProtocolFeature,
    Req,
    VringState,
    decode_header,
    decode_payload,
    encode,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MAC = "52:54:00:12:34:56"
DATA_PATH = (
    bit(F.EVENT_IDX)
    | bit(NetF.MRG_RXBUF)
    | bit(NetF.CSUM)
    | bit(NetF.GUEST_CSUM)
    | bit(NetF.HOST_TSO4)
    | bit(NetF.GUEST_TSO4)
    | bit(F.VERSION_1)
)
OFFLOADS = bit(NetF.CSUM) | bit(NetF.GUEST_CSUM) | bit(NetF.HOST_TSO4) | bit(NetF.GUEST_TSO4)


@pytest.fixture
def switch() -> Iterator[Switch]:
    with running_switch() as sw:
        yield sw


@pytest.fixture
def backends(switch: Switch) -> Iterator[list[NetBackendProcess]]:
    """Back-ends a test starts (``start_backend``), stopped at the end."""
    made: list[NetBackendProcess] = []
    try:
        yield made
    finally:
        for be in made:
            be.stop()


def start_backend(switch: Switch, made: list[NetBackendProcess], *args: str) -> NetBackendProcess:
    be = NetBackendProcess(switch, f"vu{len(made)}", *args)
    made.append(be)
    return be.start()


def activated_features(be: NetBackendProcess, nth: int = 1) -> int:
    """The features the back-end activated with on connection ``nth`` (its log)."""
    m = be.wait_log(rf"connection {nth}: device active, features (0x[0-9a-f]+)")
    return int(m[1], 16)


def totals(be: NetBackendProcess, nth: int) -> dict[str, int]:
    """The back-end's counters (cumulative) logged when connection ``nth`` closed (call
    it once the back-end has exited: then that line is surely written)."""
    assert be.proc is None, "stop the back-end first"
    line = re.search(rf"connection {nth} closed: .*\(totals: (.*)\)$", be.log_text(), re.M)
    assert line, be.log_text()
    return {k: int(v) for k, v in (kv.rsplit(" ", 1) for kv in line[1].split(", "))}


def echo_with(k: kernel.Kernel, other: kernel.Kernel, ip: str, data: bytes) -> bytes:
    """``k`` sends ``data`` to ``other`` (at ``ip``) port 7, ``other`` sends it back."""
    srv = other.sys.socket()
    other.sys.bind(srv, ("0.0.0.0", 7))
    other.sys.settimeout(srv, 10)
    cli = k.sys.socket()
    k.sys.settimeout(cli, 10)
    try:
        k.sys.sendto(cli, data, (ip, 7))
        got, addr = other.sys.recvfrom(srv, 70000)
        other.sys.sendto(srv, got, addr)
        back, frm = k.sys.recvfrom(cli, 70000)
        assert frm == (ip, 7)
        return back
    finally:
        k.sys.close(cli)
        other.sys.close(srv)


def learned_port(switch: Switch, mac: str) -> int | None:
    """The switch port the switch learned ``mac`` on (None if it did not)."""
    for m, port, _age in switch.stats()["macs"]:
        if m == mac:
            return int(port)
    return None


def port_number(switch: Switch, pid: int) -> int:
    return int(switch.port_of(pid)["port"])


# --------------------------------------------------------------------------- the spec


def test_spec_checks_and_front_end_config() -> None:
    assert "VhostUserNet" in kernel.__all__
    s = kernel.VhostUserNet("/tmp/x.sock", mac=MAC, mtu=9000, ip="10.1.2.3/16")
    assert s.transport == "vhost-user" and s.device_id == DeviceId.NET
    assert s.frontend_features == NET_FRONTEND_FEATURES
    assert s.requested_queue_size == 256 and s.dma_bytes(256) > 256 * 9000
    cfg = NetConfig.unpack(s.frontend_config())
    assert cfg == NetConfig(parse_mac(MAC), S_LINK_UP, 1, 9000)
    assert len(s.frontend_config()) == NET_CONFIG_BYTES
    # without mac=: a fresh random locally administered unicast MAC each time
    r = kernel.VhostUserNet("/tmp/x.sock")
    macs = {NetConfig.unpack(r.frontend_config()).mac for _ in range(8)}
    assert len(macs) == 8
    assert all(m[0] & 0x02 and not m[0] & 0x01 for m in macs)
    with pytest.raises(TypeError):
        r.argv("ipc:///x")
    bad: list[tuple[dict[str, Any], str]] = [
        ({"path": ""}, "socket path"),
        ({"mac": "01:00:5e:00:00:01"}, "multicast"),
        ({"mac": "00:00:00:00:00:00"}, "all-zero"),
        ({"mac": "52:54:00"}, "not a MAC"),
        ({"ip": "10.0.0.1"}, "IPv4 address/prefix"),
        ({"gateway": "10.0.0.256"}, "gateway"),
        ({"mtu": 67}, "mtu"),
        ({"mtu": True}, "mtu"),
        ({"queue_size": 100}, "queue_size"),
        ({"offload": "yes"}, "offload"),
    ]
    for kw, text in bad:
        args = {"path": "/tmp/x.sock", **kw}
        with pytest.raises(ValueError, match=text):
            kernel.VhostUserNet(**args)


def test_missing_socket_is_a_probe_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.sock")
    with pytest.raises(kernel.DeviceProbeError, match="cannot connect"):
        kernel.boot(devices=[kernel.VhostUserNet(missing)])


# --------------------------------------------------------------------------- a back-end


def test_front_end_owns_the_config_and_negotiates_the_data_path(
    switch: Switch, backends: list[NetBackendProcess]
) -> None:
    be = start_backend(switch, backends)
    spec = kernel.VhostUserNet(be.sock, mac=MAC, ip="10.0.0.1/24")
    other = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.2/24")
    with kernel.boot(devices=[spec]) as k, kernel.boot(devices=[other]) as k2:
        dev = k.devices[0]
        assert dev.name == "eth0" and dev.device_id == DeviceId.NET
        assert dev.transport.kind == "vhost-user" and dev.pid == be.pid
        assert dev.mac == MAC and dev.mtu == 1500 and dev.link_up is True
        assert dev.feature_bits == DATA_PATH | NET_FRONTEND_FEATURES
        assert dev.metrics() == {}  # vhost-user has no message for a back-end's counters
        assert "eth0" in k.net.interfaces
        # the back-end got what the driver took (it offers MAC, STATUS and MTU too)
        assert activated_features(be) == dev.feature_bits
        # traffic both ways, big datagrams too (fragments through MRG_RXBUF buffers)
        for n in (1, 1472, 1473, 9000, 65507):
            data = os.urandom(n)
            assert echo_with(k, k2, "10.0.0.2", data) == data
            assert echo_with(k2, k, "10.0.0.1", data) == data
        assert k.sys.ping("10.0.0.2", count=2, timeout=5.0)
        # the switch learned our MAC on the back-end's port, from our frames
        assert learned_port(switch, MAC) == port_number(switch, be.pid)
        st = k.net.stats
        assert st["ip_bad_checksum"] == 0 and st["udp_bad_checksum"] == 0
        assert dev.rx_frames > 0 and dev.tx_frames > 0 and dev.rx_bad_frames == 0
    assert be.stop() == 0
    t = totals(be, 1)
    assert t["bad_chains"] == 0 and t["ring_errors"] == 0 and t["handler_errors"] == 0
    # the config space was ours: the back-end was never asked for it
    assert "GET_CONFIG" not in be.log_text()


def test_offload_off_random_mac_and_the_next_front_end(
    switch: Switch, backends: list[NetBackendProcess]
) -> None:
    be = start_backend(switch, backends)
    other = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.2/24")
    spec = kernel.VhostUserNet(be.sock, ip="10.0.0.1/24", offload=False)
    with kernel.boot(devices=[other]) as k2:
        with kernel.boot(devices=[spec]) as k:
            dev = k.devices[0]
            assert dev.feature_bits & OFFLOADS == 0
            assert activated_features(be, 1) == dev.feature_bits
            first = dev.mac
            assert first is not None
            m = parse_mac(first)
            assert m[0] & 0x02 and not m[0] & 0x01  # locally administered, unicast
            data = os.urandom(3000)
            assert echo_with(k, k2, "10.0.0.2", data) == data
            assert learned_port(switch, first) == port_number(switch, be.pid)
        # the back-end serves the next front-end; a new boot, a new random MAC
        with kernel.boot(devices=[kernel.VhostUserNet(be.sock, ip="10.0.0.1/24")]) as k:
            dev = k.devices[0]
            assert dev.mac != first
            assert activated_features(be, 2) == dev.feature_bits
            assert dev.feature_bits & OFFLOADS == OFFLOADS
            data = os.urandom(2000)
            assert echo_with(k, k2, "10.0.0.2", data) == data
            assert learned_port(switch, str(dev.mac)) == port_number(switch, be.pid)
    assert be.stop() == 0  # exited: everything it had to log is logged
    assert totals(be, 2)["handler_errors"] == 0  # and connection 2 was logged closed


def test_jumbo_mtu_is_the_front_ends(switch: Switch, backends: list[NetBackendProcess]) -> None:
    be = start_backend(switch, backends)  # its own MTU is 1500: we tell it ours
    spec = kernel.VhostUserNet(be.sock, ip="10.0.0.1/24", mtu=9000)
    other = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.2/24", mtu=9000)
    with kernel.boot(devices=[spec]) as k, kernel.boot(devices=[other]) as k2:
        assert k.devices[0].mtu == 9000
        data = os.urandom(8972)  # 9000 - IPv4 - UDP headers: one unfragmented packet
        assert echo_with(k, k2, "10.0.0.2", data) == data
        assert k.net.stats["ip_frags_sent"] == 0 and k2.net.stats["ip_frags_sent"] == 0
        assert k2.net.stats["ip_frag_reassembled"] == 0
        be.wait_log(r"connection 1: NET_SET_MTU 9000$")


def test_queue_size_the_back_end_refuses_fails_the_probe(
    switch: Switch, backends: list[NetBackendProcess]
) -> None:
    be = start_backend(switch, backends, "--queue-size", "64")
    with pytest.raises(kernel.DeviceProbeError) as ei:
        kernel.boot(devices=[kernel.VhostUserNet(be.sock, queue_size=256)])
    assert "eth0" in str(ei.value) and "SET_VRING_NUM" in str(ei.value)
    # the back-end goes on serving: a ring it accepts works
    with kernel.boot(devices=[kernel.VhostUserNet(be.sock, queue_size=64)]) as k:
        assert k.devices[0].queues[0].size == 64


def test_back_end_death_fails_the_nic_with_eio(
    switch: Switch, backends: list[NetBackendProcess]
) -> None:
    be = start_backend(switch, backends)
    spec = kernel.VhostUserNet(be.sock, ip="10.0.0.1/24")
    other = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.2/24")
    with kernel.boot(devices=[spec]) as k, kernel.boot(devices=[other]) as k2:
        assert echo_with(k, k2, "10.0.0.2", b"before") == b"before"
        assert be.proc is not None
        be.proc.kill()
        err = k.devices[0].wait_failed(10)
        assert err is not None and err.errno == errno.EIO, err
        fd = k.sys.socket()
        with pytest.raises(OSError) as ei:
            k.sys.sendto(fd, b"after", ("10.0.0.2", 7))
        assert ei.value.errno == errno.EIO
        # the back-end's port goes away; the other kernel's does not
        st = switch.wait(lambda s: all(p["pid"] != be.pid for p in s["ports"]))
        assert [p["pid"] for p in st["ports"]] == [k2.devices[0].pid]


# --------------------------------------------------------------------------- a bare back-end


class DataPathOnlyBackend:
    """A scripted vhost-user net back-end in a thread that, like OVS-DPDK's, offers the
    data path features only (no MAC, STATUS or MTU) and protocol features REPLY_ACK,
    MQ and CONFIG: it answers and acks every request and records them all."""

    OFFER = DATA_PATH | bit(F_PROTOCOL_FEATURES)
    PROTOCOL = (
        bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.MQ) | bit(ProtocolFeature.CONFIG)
    )

    def __init__(self, path: str) -> None:
        self.server = UnixServer(path)
        self.requests: list[tuple[Req, object]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fake-backend", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn = self.server.accept(10)
            assert conn is not None
            with conn:
                self._serve(conn)
        except BaseException as e:  # reported by close()
            self.error = e

    def _serve(self, conn: UnixConnection) -> None:
        for _ in range(1000):  # a bring-up and a shutdown are a few dozen messages
            try:
                head, fds = conn.recv_message(HEADER_SIZE, 8, 10)
            except PeerGone:
                return  # the kernel shut down
            for fd in fds:
                os.close(fd)
            hdr = decode_header(head)
            body, _ = conn.recv_message(hdr.size, 0, 10)
            req = Req(hdr.request)
            payload = decode_payload(hdr, body)
            self.requests.append((req, payload))
            answer: Payload = 0
            if req == Req.GET_FEATURES:
                answer = self.OFFER
            elif req == Req.GET_PROTOCOL_FEATURES:
                answer = self.PROTOCOL
            elif req == Req.GET_QUEUE_NUM:
                answer = 2
            elif req == Req.GET_VRING_BASE:
                assert isinstance(payload, VringState)
                answer = VringState(payload.index, 0)
            elif req not in REPLY_KIND and not hdr.need_reply:
                continue
            conn.send(encode(req, answer, reply=True))
        raise AssertionError("the front-end never stopped talking")

    def sent(self, req: Req) -> list[object]:
        """The payloads of every ``req`` received."""
        return [p for r, p in self.requests if r == req]

    def close(self) -> None:
        self.thread.join(10)
        self.server.close()
        assert not self.thread.is_alive()


def test_back_end_without_config_features_gets_only_what_it_offered(tmp_path: Path) -> None:
    """A back-end that knows nothing of MAC, STATUS or MTU: the driver still gets them
    (they are the front-end's), the back-end is never told of them (§2.2: no feature it
    did not offer), never asked for config space, never sent NET_SET_MTU."""
    be = DataPathOnlyBackend(str(tmp_path / "dp.sock"))
    try:
        spec = kernel.VhostUserNet(be.server.path, mac=MAC, mtu=4000, queue_size=64)
        with kernel.boot(devices=[spec]) as k:
            dev = k.devices[0]
            assert dev.feature_bits == DATA_PATH | NET_FRONTEND_FEATURES
            assert dev.mac == MAC and dev.mtu == 4000 and dev.link_up is True
            assert "eth0" in k.net.interfaces
    finally:
        be.close()
    assert be.error is None, be.error
    assert be.sent(Req.SET_FEATURES) == [DATA_PATH | bit(F_PROTOCOL_FEATURES)]
    assert be.sent(Req.SET_PROTOCOL_FEATURES) == [be.PROTOCOL]
    assert be.sent(Req.GET_CONFIG) == [] and be.sent(Req.NET_SET_MTU) == []
    assert [p.num for p in be.sent(Req.SET_VRING_NUM)] == [64, 64]  # type: ignore[attr-defined]
    assert len(be.sent(Req.GET_VRING_BASE)) == 2  # both rings stopped at shutdown
