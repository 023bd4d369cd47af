"""TCP between two kernels in two processes on the real switch (real device processes,
shared memory, ZeroMQ): 50 MiB over one connection (sha256 equal both ends, with TSO),
50 connections at once each way, half-close, RST from a closed port, and a peer that
vanishes (SIGKILL) mid-transfer."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import random
import select
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netpeer import Switch, running_switch
from tcppeer import TcpPeer, pattern

import kernel
from hostops.sync import start_thread
from kernel.files import SHUT_WR, SOCK_STREAM

pytestmark = pytest.mark.integration

PEER_IP = "10.0.0.2"


@pytest.fixture(scope="module")
def switch() -> Iterator[Switch]:
    with running_switch() as sw:
        yield sw


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


def _wait_gone(pid: int, timeout_s: float) -> None:
    """Wait (on a pidfd, no polling) until process ``pid`` has exited."""
    try:
        pfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([pfd], [], [], timeout_s)
        assert ready, f"process {pid} still there after {timeout_s} s"
    finally:
        os.close(pfd)


def _remove_leftovers_of(*pids: int) -> None:
    """A SIGKILLed kernel leaves its shm segments and runtime directory behind (nobody
    ran its clean-up): remove exactly those of ``pids``, as a later run's sweep would."""
    for name in os.listdir("/dev/shm"):
        if any(name.startswith(f"vlab-{p}-") for p in pids):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", name))
    base = Path(f"/tmp/vlab-{os.getuid()}")
    for p in pids:
        for d in base.glob(f"{p}-*") if base.is_dir() else ():
            shutil.rmtree(d, ignore_errors=True)


def test_vanishing_peer_times_out(switch: Switch) -> None:
    """SIGKILL the receiving kernel's process and its device mid-transfer: the sender's
    retransmissions go unanswered and, after the configured limit, sendall fails with
    ETIMEDOUT (RFC 9293 §3.8.3 / RFC 1122 §4.2.3.5: R2 reached, the connection closes)."""
    victim = TcpPeer(backend="switch", switch=switch.endpoint, ip="10.0.0.4/24")
    pids: tuple[int, int] = (0, 0)
    try:
        info = victim.call(op="stats")
        pids = (info["pid"], info["device_pid"])
        spec = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.5/24")
        with kernel.boot(devices=[spec]) as k5:
            k5.net.tcp.config = dataclasses.replace(
                k5.net.tcp.config, rto_initial_s=0.2, rto_min_s=0.05, rto_max_s=0.2, max_retries=4
            )
            fd = k5.sys.socket(type=SOCK_STREAM)
            k5.sys.settimeout(fd, 30)
            k5.sys.connect(fd, ("10.0.0.4", 5001))
            # 4 MiB through a 1 MiB send buffer: when sendall returns, >= 3 MiB were
            # acknowledged, so the transfer is under way
            k5.sys.sendall(fd, pattern(4 << 20, 1))
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            victim.proc.wait(10)
            _wait_gone(pids[1], 10)
            before = k5.net.stats
            with pytest.raises(TimeoutError) as ei:  # ETIMEDOUT is TimeoutError's errno
                k5.sys.sendall(fd, pattern(8 << 20, 2))
            assert ei.value.errno == errno.ETIMEDOUT
            after = k5.net.stats
            assert after["tcp_timeouts"] - before["tcp_timeouts"] >= 4
            # retransmissions, or zero-window probes if the peer died with its window
            # closed (it had stopped reading): either way unanswered, then given up
            tries = ("tcp_retransmits", "tcp_zero_window_probes")
            assert sum(after[n] for n in tries) > sum(before[n] for n in tries)
            assert not [c for c in k5.net.tcp.connections() if c[2] == ("10.0.0.4", 5001)]
            k5.sys.close(fd)
    finally:
        victim.close()
        if pids[0]:
            _remove_leftovers_of(*pids)


def test_bench_tcp_rows_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``run_net(tcp=True)`` (``vlab bench net --tcp``): TCP_STREAM rows with the UDP
    rows' JSON shape, with and without TSO, and the plot is a PNG."""
    from tools.bench_net import run_net

    png = tmp_path / "tcp.png"
    only = ["tcp-65536", "tcp-65536-notso"]
    assert run_net(seconds=0.2, as_json=True, only=only, plot=str(png), tcp=True) == 0
    rows = json.loads(capsys.readouterr().out.splitlines()[-1])["rows"]
    assert [r["name"] for r in rows] == only
    for r in rows:
        assert set(r) == {
            "name",
            "unit",
            "virtio",
            "native",
            "ratio",
            "kicks_per_packet",
            "interrupts_per_packet",
        }
        assert r["unit"] == "Mbit/s" and r["virtio"] > 0 and r["native"] > 0, r
        assert 0 <= r["kicks_per_packet"] <= 1 and r["interrupts_per_packet"] >= 0, r
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
