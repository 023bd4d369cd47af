"""TCP between two kernels in two processes on the real switch (real device processes,
shared memory, ZeroMQ): 50 MiB over one connection (sha256 equal both ends, with TSO),
50 connections at once each way, half-close, and RST from a closed port."""

from __future__ import annotations

import errno
import hashlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netpeer import Switch
from tcppeer import pattern

import kernel
from hostops.rundir import RuntimeDir
from hostops.sync import start_thread
from kernel.files import SHUT_WR, SOCK_STREAM

pytestmark = pytest.mark.integration

TCPPEER = Path(__file__).resolve().parent / "tcppeer.py"
PEER_IP = "10.0.0.2"


class TcpPeer:
    """``tcppeer.py`` as a child process."""

    def __init__(self, **spec: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(TCPPEER), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._line().get("ready")

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"tcppeer exited with {self.proc.poll()}"
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


@pytest.fixture(scope="module")
def switch() -> Iterator[Switch]:
    rundir = RuntimeDir.create()
    sw = Switch(rundir)
    sw.start()
    try:
        yield sw
    finally:
        sw.stop()
        rundir.cleanup()


@pytest.fixture(scope="module")
def peer(switch: Switch) -> Iterator[TcpPeer]:
    p = TcpPeer(backend="switch", switch=switch.endpoint, ip=f"{PEER_IP}/24")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def k(switch: Switch, peer: TcpPeer) -> Iterator[kernel.Kernel]:
    with kernel.boot(
        devices=[kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.1/24")]
    ) as kern:
        yield kern


def _recv_to_eof(k: kernel.Kernel, fd: int) -> bytes:
    out = bytearray()
    while True:  # ends at EOF (or the socket timeout)
        d = k.sys.recv(fd, 65536)
        if not d:
            return bytes(out)
        out += d


def test_50_mib_one_connection_with_tso(k: kernel.Kernel, peer: TcpPeer) -> None:
    link = k.devices[0].link
    assert link.tso4, "HOST_TSO4 should be negotiated with offloads on"
    gso_before = link.counters["tx_gso_frames"]
    data = random.Random(50).randbytes(50 * 1024 * 1024)
    fd = k.sys.socket(type=SOCK_STREAM)
    k.sys.settimeout(fd, 60)
    k.sys.connect(fd, (PEER_IP, 5001))
    t0 = time.monotonic()
    k.sys.sendall(fd, data)
    k.sys.shutdown(fd, SHUT_WR)  # half-close: the reply still comes
    reply = _recv_to_eof(k, fd).decode()
    elapsed = time.monotonic() - t0
    k.sys.close(fd)
    digest, count = reply.split()
    assert int(count) == len(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert link.counters["tx_gso_frames"] > gso_before
    st = k.net.stats
    assert st["tcp_gso_segments"] > 0 and st["tcp_bad_checksum"] == 0
    print(
        f"\n50 MiB in {elapsed:.2f} s: {len(data) / elapsed / 1e6:.1f} MB/s "
        f"(segments out {st['tcp_segments_out']}, GSO {st['tcp_gso_segments']}, "
        f"retransmits {st['tcp_retransmits']}, tx errors {st['tcp_tx_errors']})"
    )


def test_50_connections_each_way(k: kernel.Kernel, peer: TcpPeer) -> None:
    n, size = 50, 20_000
    # ours -> the peer's echo service, all at once
    results: list[Any] = []

    def client(i: int) -> None:
        fd = k.sys.socket(type=SOCK_STREAM)
        try:
            k.sys.settimeout(fd, 60)
            k.sys.connect(fd, (PEER_IP, 5002))
            data = pattern(size, i)
            k.sys.sendall(fd, data)
            k.sys.shutdown(fd, SHUT_WR)
            results.append(_recv_to_eof(k, fd) == data)
        except OSError as e:
            results.append(e)
        finally:
            k.sys.close(fd)

    threads = [start_thread(client, i, name=f"tcp-client-{i}") for i in range(n)]
    # the peer's clients -> our echo listener, at the same time
    lfd = k.sys.socket(type=SOCK_STREAM)
    k.sys.bind(lfd, ("0.0.0.0", 6000))
    k.sys.listen(lfd, 128)
    k.sys.settimeout(lfd, 60)

    def serve_one(c: int) -> None:
        try:
            k.sys.settimeout(c, 60)
            while True:
                d = k.sys.recv(c, 65536)
                if not d:
                    break
                k.sys.sendall(c, d)
        finally:
            k.sys.close(c)

    def acceptor() -> None:
        for _ in range(n):
            c, _addr = k.sys.accept(lfd)
            start_thread(serve_one, c, name="tcp-echo")

    acc = start_thread(acceptor, name="tcp-acceptor")
    back = peer.call(op="connect_many", addr="10.0.0.1", port=6000, n=n, size=size)
    acc.join(60)
    for t in threads:
        t.join(60)
    k.sys.close(lfd)
    assert back["ok"] == n, back["errors"][:3]
    assert results.count(True) == n, [r for r in results if r is not True][:3]


def test_closed_port_refuses(k: kernel.Kernel, peer: TcpPeer) -> None:
    fd = k.sys.socket(type=SOCK_STREAM)
    k.sys.settimeout(fd, 10)
    with pytest.raises(ConnectionRefusedError):
        k.sys.connect(fd, (PEER_IP, 5999))
    k.sys.close(fd)
    fd = k.sys.socket(type=SOCK_STREAM)
    k.sys.setblocking(fd, False)
    assert k.sys.connect_ex(fd, (PEER_IP, 5999)) == errno.EINPROGRESS
    k.sys.close(fd)
    stats = peer.call(op="stats")
    assert stats["stack"]["tcp_rst_sent"] >= 1


def test_without_offloads_the_stack_segments(switch: Switch, peer: TcpPeer) -> None:
    spec = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.3/24", offload=False)
    with kernel.boot(devices=[spec]) as k3:
        link = k3.devices[0].link
        assert not link.tso4 and not link.tx_csum
        data = random.Random(3).randbytes(4 * 1024 * 1024)
        fd = k3.sys.socket(type=SOCK_STREAM)
        k3.sys.settimeout(fd, 60)
        k3.sys.connect(fd, (PEER_IP, 5001))
        k3.sys.sendall(fd, data)
        k3.sys.shutdown(fd, SHUT_WR)
        digest, count = _recv_to_eof(k3, fd).decode().split()
        k3.sys.close(fd)
        assert (digest, int(count)) == (hashlib.sha256(data).hexdigest(), len(data))
        assert link.counters["tx_gso_frames"] == 0
        assert k3.net.stats["tcp_gso_segments"] == 0
