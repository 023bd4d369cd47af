"""Kernels in separate processes on one L2 switch: UDP both ways at every size class
(fragmented at MTU 1500), ping, MAC learning seen from a third kernel, link loss.

The kernels' NICs are parametrized over the transport (``nics`` fixture, see
``netpeer.Nics``): ``zmq`` -- ``kernel.Net(backend="switch")``, a device process the
kernel starts -- and ``vhost-user`` -- a ``python -m vdev net --backend switch
--vhost-user SOCK`` back-end the test starts, driven by ``kernel.VhostUserNet(SOCK)``
(the kernel as a QEMU-like front-end), for the in-process kernels and the peer alike.
Link loss stays ``zmq``: over vhost-user the link status is the front-end's (the
back-end cannot announce a carrier change without the back-end request channel).
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator

import pytest
from netpeer import Nics, Peer, Switch, running_switch

import kernel
from kernel.files import SO_BROADCAST, SOL_SOCKET

pytestmark = pytest.mark.integration


@pytest.fixture
def switch() -> Iterator[Switch]:
    with running_switch() as sw:
        yield sw


@pytest.fixture(params=["zmq", "vhost-user"])
def nics(request: pytest.FixtureRequest, switch: Switch) -> Iterator[Nics]:
    """NIC specs on the switch over each transport in turn."""
    n = Nics(request.param, switch)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def peer(nics: Nics) -> Iterator[Peer]:
    p = Peer(**nics.fields(ip="10.0.0.2/24", mtu=1500))
    try:
        yield p
    finally:
        p.close()


def _echo(k: kernel.Kernel, fd: int, data: bytes) -> bytes:
    k.sys.sendto(fd, data, ("10.0.0.2", 7))
    got, addr = k.sys.recvfrom(fd, 65536)
    assert addr == ("10.0.0.2", 7)
    return got


def test_udp_both_ways_at_every_size_and_ping(nics: Nics, peer: Peer) -> None:
    spec = nics.spec(ip="10.0.0.1/24", mtu=1500)
    with kernel.boot(devices=[spec]) as k:
        fd = k.sys.socket()
        k.sys.settimeout(fd, 10)
        rng = random.Random(6)
        sizes = [1, 2, 17, 100, 1471, 1472, 1473, 1480, 2952, 2953, 8000, 30000, 65506, 65507]
        sizes += rng.sample(range(1, 65508), 24)
        for n in sizes:
            data = rng.randbytes(n)
            assert _echo(k, fd, data) == data, n
        st = k.net.stats
        assert st["ip_frag_reassembled"] > 0 and st["ip_frags_sent"] > 0
        assert st["udp_bad_checksum"] == 0 and st["ip_bad_checksum"] == 0
        # ping both ways
        rtts = k.sys.ping("10.0.0.2", count=3, timeout=5.0)
        assert len(rtts) == 3 and all(r > 0 for r in rtts)
        back = peer.call(op="ping", addr="10.0.0.1", count=3, timeout=5.0)
        assert len(back["rtts"]) == 3, back
        pstats = peer.call(op="stats")
        assert pstats["echoed"] == len(sizes) and pstats["echo_errors"] == 0
        assert pstats["stack"]["icmp_echo_replied"] >= 3
        assert k.net.stats["icmp_echo_replied"] >= 3
        dev = k.devices[0]
        assert dev.tx_frames > len(sizes) and dev.rx_frames > len(sizes)
        assert dev.transport.kind == nics.transport
        if nics.transport == "vhost-user":
            assert dev.pid == nics.backends[-1].pid and dev.metrics() == {}


def test_third_kernel_sees_broadcasts_but_not_learned_unicast(nics: Nics, peer: Peer) -> None:
    a = nics.spec(ip="10.0.0.1/24")
    c = nics.spec(ip="10.0.0.3/24")
    with kernel.boot(devices=[a]) as ka, kernel.boot(devices=[c]) as kc:
        fd = ka.sys.socket()
        ka.sys.settimeout(fd, 10)
        # warm up: A and B learn each other (ARP) and the switch learns both MACs
        assert _echo(ka, fd, b"hello") == b"hello"
        cdev = kc.devices[0]
        before = cdev.rx_frames
        for i in range(50):
            data = os.urandom(1000 + i)
            assert _echo(ka, fd, data) == data
        assert cdev.rx_frames == before, "C saw unicast between A and B"
        # a broadcast from A reaches C
        cfd = kc.sys.socket()
        kc.sys.bind(cfd, ("0.0.0.0", 9999))
        kc.sys.settimeout(cfd, 10)
        with pytest.raises(PermissionError):
            ka.sys.sendto(fd, b"to all", ("10.0.0.255", 9999))
        ka.sys.setsockopt(fd, SOL_SOCKET, SO_BROADCAST, 1)
        ka.sys.sendto(fd, b"to all", ("10.0.0.255", 9999))
        data, addr = kc.sys.recvfrom(cfd, 100)
        assert data == b"to all" and addr[0] == "10.0.0.1"
        assert cdev.rx_frames == before + 1


def test_link_down_gives_enetdown_and_comes_back(switch: Switch) -> None:
    spec = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.1/24")
    with kernel.boot(devices=[spec]) as k:
        link = k.devices[0].link
        assert link is not None and link.link_up
        fd = k.sys.socket()
        k.sys.sendto(fd, b"x", ("10.0.0.9", 9))  # fine while the link is up (ARP queued)
        switch.kill()  # the device loses its switch: STATUS bit down, config interrupt
        assert link.wait_link(False, 15), "the link never went down"
        assert k.devices[0].link_up is False
        with pytest.raises(OSError) as ei:
            k.sys.sendto(fd, b"x", ("10.0.0.9", 9))
        assert ei.value.errno == errno.ENETDOWN
        switch.start()  # a new switch on the same endpoint: the port re-attaches
        assert link.wait_link(True, 15), "the link never came back"
        k.sys.sendto(fd, b"x", ("10.0.0.9", 9))
        m = k.devices[0].metrics()["device"]
        assert m["link_changes"] >= 2
        assert m["config_interrupts"] >= 2
