"""Kernels in separate processes on one L2 switch: UDP both ways at every size class
(fragmented at MTU 1500), ping, MAC learning seen from a third kernel, link loss."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kernel
from hostops.process import DeviceProcess, python_argv
from hostops.rundir import RuntimeDir
from kernel.files import SO_BROADCAST, SOL_SOCKET

pytestmark = pytest.mark.integration

PEER = Path(__file__).with_name("netpeer.py")


class Switch:
    """A ``python -m vdev switch`` process on a private endpoint."""

    def __init__(self, rundir: RuntimeDir) -> None:
        self.endpoint = rundir.endpoint("sw")
        self.log = os.path.join(rundir.path, "switch.log")
        self.proc: DeviceProcess | None = None

    def start(self) -> None:
        self.proc = DeviceProcess.launch(
            python_argv("vdev", "switch", "--listen", self.endpoint),
            name="switch",
            log_path=self.log,
        )

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc.close()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc.close()
            self.proc = None


class Peer:
    """A kernel in another process (tests/integration/netpeer.py) with a UDP echo on
    port 7."""

    def __init__(self, **spec: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = self._line()
        assert hello.get("ready"), hello
        self.mac: str = hello["mac"]

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"peer exited with {self.proc.poll()}"
        out: dict[str, Any] = json.loads(line)
        return out

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def switch() -> Iterator[Switch]:
    rundir = RuntimeDir.create()
    sw = Switch(rundir)
    sw.start()
    try:
        yield sw
    finally:
        sw.stop()
        rundir.cleanup()


@pytest.fixture
def peer(switch: Switch) -> Iterator[Peer]:
    p = Peer(backend="switch", switch=switch.endpoint, ip="10.0.0.2/24", mtu=1500)
    try:
        yield p
    finally:
        p.close()


def _echo(k: kernel.Kernel, fd: int, data: bytes) -> bytes:
    k.sys.sendto(fd, data, ("10.0.0.2", 7))
    got, addr = k.sys.recvfrom(fd, 65536)
    assert addr == ("10.0.0.2", 7)
    return got


def test_udp_both_ways_at_every_size_and_ping(switch: Switch, peer: Peer) -> None:
    spec = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.1/24", mtu=1500)
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
        rtts = k.sys.ping("10.0.0.2", count=3, timeout=2.0)
        assert len(rtts) == 3 and all(0 < r < 2.0 for r in rtts)
        back = peer.call(op="ping", addr="10.0.0.1", count=3)
        assert len(back["rtts"]) == 3, back
        pstats = peer.call(op="stats")
        assert pstats["echoed"] == len(sizes)
        assert pstats["stack"]["icmp_echo_replied"] >= 3
        assert k.net.stats["icmp_echo_replied"] >= 3
        dev = k.devices[0]
        assert dev.tx_frames > len(sizes) and dev.rx_frames > len(sizes)


def test_third_kernel_sees_broadcasts_but_not_learned_unicast(switch: Switch, peer: Peer) -> None:
    a = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.1/24")
    c = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.3/24")
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
