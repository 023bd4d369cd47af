"""virtio-net multi-queue end to end (VIRTIO_NET_F_CTRL_VQ + VIRTIO_NET_F_MQ): real
device processes on a real switch process, real shared memory and ZeroMQ.

Two kernels with ``queue_pairs=2`` exchange UDP from several threads and TCP streams,
byte for byte; each sending thread transmits on its own pair and the device steers the
answers of a flow to the receive queue of the pair it was sent on, so every queue of
both pairs carries traffic. A NIC whose device process is SIGKILLed comes back with
both pairs on; a device that refuses VQ_PAIRS_SET, or never answers it, leaves the NIC
on one pair without hanging. Bad ``queue_pairs`` values are refused with clear errors,
by the spec and by ``python -m vdev net``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from netpeer import Switch, running_switch

import kernel
import kernel.virtio_net
from hostops.sync import start_thread
from kernel.files import SHUT_WR, SOCK_STREAM
from vdev.virtio.net import rx_queue_index, tx_queue_index

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WAIT_S = 15.0
ECHO_PORT = 9500
TCP_PORT = 9501
MQ = {"MQ", "CTRL_VQ"}


class Pair:
    """Kernel A (10.0.0.1) and kernel B (10.0.0.2), two queue pairs each, on a switch."""

    def __init__(self, a: kernel.Kernel, b: kernel.Kernel) -> None:
        self.a = a
        self.b = b


@pytest.fixture(scope="module")
def switch() -> Iterator[Switch]:
    with running_switch() as sw:
        yield sw


@pytest.fixture(scope="module")
def pair(switch: Switch) -> Iterator[Pair]:
    spec_a = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.1/24", queue_pairs=2)
    spec_b = kernel.Net(backend="switch", switch=switch.endpoint, ip="10.0.0.2/24", queue_pairs=2)
    with kernel.boot(devices=[spec_a]) as ka, kernel.boot(devices=[spec_b]) as kb:
        for k in (ka, kb):
            link = k.devices[0].link
            assert link is not None and link.wait_link_up(WAIT_S)
        yield Pair(ka, kb)


def _link(k: kernel.Kernel) -> kernel.NetLink:
    link = k.devices[0].link
    assert isinstance(link, kernel.NetLink)
    return link


def _completions(k: kernel.Kernel, index: int) -> int:
    for q in k.devices[0].queues:
        if q.index == index:
            return q.stats.completions
    raise AssertionError(f"no queue {index}")


def _run_threads(fn: Any, count: int, prefix: str) -> list[Any]:
    """Run ``fn(i)`` on ``count`` named threads; their results (or exceptions)."""
    results: list[Any] = [None] * count

    def body(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            results[i] = e

    threads = [start_thread(body, i, name=f"{prefix}-{i}") for i in range(count)]
    for t in threads:
        t.join(WAIT_S * 4)
        assert not t.is_alive(), "a worker thread hung"
    return results


# --------------------------------------------------------------------------- negotiation


def test_two_pairs_are_negotiated_and_acked(pair: Pair) -> None:
    for k in (pair.a, pair.b):
        dev = k.devices[0]
        link = _link(k)
        assert MQ <= set(dev.features)
        assert link.queue_pairs == 2 and link.wait_pairs(WAIT_S) == 2
        # receiveq1, transmitq1, receiveq2, transmitq2, controlq (2 * max pairs)
        assert [q.index for q in dev.queues] == [0, 1, 2, 3, 4]
        assert link.ctrlq is not None and link.ctrlq.stats.requests >= 1
        assert link.counters["mq_pairs_acked"] >= 1 and link.counters["mq_fallbacks"] == 0
        m = dev.metrics()["device"]
        assert m["mq_pairs_set"] >= 1 and m["ctrl_ok"] >= 1 and m["ctrl_bad"] == 0


def test_one_pair_takes_no_mq() -> None:
    with kernel.boot(devices=[kernel.Net(backend="loopback", ip="10.0.0.1/24")]) as k:
        dev = k.devices[0]
        assert not MQ & set(dev.features)
        assert len(dev.queues) == 2 and _link(k).queue_pairs == 1 and _link(k).ctrlq is None


# --------------------------------------------------------------------------- traffic


def test_udp_from_several_threads_uses_every_queue(pair: Pair) -> None:
    """Four threads on A each talk to B's echo service; every datagram comes back
    intact, both of A's transmit queues carried them and B's answers came back on the
    receive queue of the pair each flow was sent on -- both of A's receive queues."""
    a, b = pair.a, pair.b
    srv = b.sys.socket()
    b.sys.bind(srv, ("0.0.0.0", ECHO_PORT))
    b.sys.settimeout(srv, WAIT_S)
    per_thread, threads = 60, 4
    total = per_thread * threads

    def echo() -> None:
        for _ in range(total):  # bounded: one answer per datagram expected
            try:
                data, addr = b.sys.recvfrom(srv, 2048)
            except OSError:
                return
            b.sys.sendto(srv, data, addr)

    echoer = start_thread(echo, name="mq-echo")
    before = {i: _completions(a, i) for i in range(4)}
    steered_before = a.devices[0].metrics()["device"]["rx_steered_flow"]

    def client(i: int) -> int:
        fd = a.sys.socket()
        a.sys.settimeout(fd, WAIT_S)
        rng = random.Random(i)
        try:
            for j in range(per_thread):
                msg = b"%d:%d:" % (i, j) + rng.randbytes(rng.randrange(1, 1400))
                a.sys.sendto(fd, msg, ("10.0.0.2", ECHO_PORT))
                assert a.sys.recv(fd, 2048) == msg
            return per_thread
        finally:
            a.sys.close(fd)

    try:
        results = _run_threads(client, threads, "mq-udp")
    finally:
        echoer.join(WAIT_S * 4)
        b.sys.close(srv)
    assert results == [per_thread] * threads
    after = {i: _completions(a, i) for i in range(4)}
    for p in (0, 1):
        assert after[tx_queue_index(p)] > before[tx_queue_index(p)], f"transmitq{p + 1}"
        assert after[rx_queue_index(p)] > before[rx_queue_index(p)], f"receiveq{p + 1}"
    assert a.devices[0].metrics()["device"]["rx_steered_flow"] - steered_before >= total
    for k in (a, b):
        assert k.devices[0].metrics()["device"]["ctrl_bad"] == 0


def test_tcp_streams_byte_for_byte(pair: Pair) -> None:
    """Two TCP connections from two threads (one per pair), 1 MiB each way to B's
    sink, which answers with what it got; TSO and checksum offload on both pairs."""
    a, b = pair.a, pair.b
    srv = b.sys.socket(type=SOCK_STREAM)
    b.sys.bind(srv, ("0.0.0.0", TCP_PORT))
    b.sys.listen(srv, 4)
    b.sys.settimeout(srv, WAIT_S)
    size = 1 << 20

    def serve(i: int) -> bytes:
        s, _ = b.sys.accept(srv)
        b.sys.settimeout(s, WAIT_S)
        got = bytearray()
        try:
            while True:  # bounded: ends at EOF or the socket timeout
                d = b.sys.recv(s, 65536)
                if not d:
                    break
                got += d
            b.sys.sendall(s, bytes(got))
        finally:
            b.sys.close(s)
        return bytes(got)

    server_results: list[Any] = []
    server = start_thread(
        lambda: server_results.extend(_run_threads(serve, 2, "mq-tcp-srv")), name="mq-accept"
    )
    gso_before = _link(a).counters["tx_gso_frames"]

    def client(i: int) -> bool:
        data = random.Random(100 + i).randbytes(size)
        fd = a.sys.socket(type=SOCK_STREAM)
        a.sys.settimeout(fd, WAIT_S)
        try:
            a.sys.connect(fd, ("10.0.0.2", TCP_PORT))
            a.sys.sendall(fd, data)
            a.sys.shutdown(fd, SHUT_WR)
            back = bytearray()
            while True:  # bounded: ends at EOF or the socket timeout
                d = a.sys.recv(fd, 65536)
                if not d:
                    break
                back += d
        finally:
            a.sys.close(fd)
        return bytes(back) == data

    try:
        results = _run_threads(client, 2, "mq-tcp")
    finally:
        server.join(WAIT_S * 4)
        b.sys.close(srv)
    assert results == [True, True]
    assert sorted(len(r) for r in server_results) == [size, size]
    assert _link(a).counters["tx_gso_frames"] > gso_before
    assert a.net.stats["tcp_bad_checksum"] == 0 and b.net.stats["tcp_bad_checksum"] == 0


# --------------------------------------------------------------------------- recovery


def test_sigkill_restart_keeps_both_pairs() -> None:
    spec = kernel.Net(backend="loopback", ip="10.0.0.1/24", queue_pairs=2)
    with kernel.boot(devices=[spec]) as k:
        dev = k.devices[0]
        link = _link(k)
        assert link.wait_pairs(WAIT_S) == 2
        pid = dev.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert dev.wait_recovered(1, WAIT_S * 2)
        assert dev.pid != pid and dev.failed is None
        # the new process starts with one pair: VQ_PAIRS_SET went again and was acked
        assert link.wait_pairs(WAIT_S) == 2
        assert link.counters["mq_resends"] >= 1 and link.counters["mq_pairs_acked"] >= 2
        assert dev.metrics()["device"]["mq_pairs_set"] >= 1
        srv = k.sys.socket()
        k.sys.bind(srv, ("10.0.0.1", 9600))
        k.sys.settimeout(srv, WAIT_S)

        def send(i: int) -> int:
            fd = k.sys.socket()
            try:
                for j in range(10):
                    k.sys.sendto(fd, b"%d-%d" % (i, j), ("10.0.0.1", 9600))
            finally:
                k.sys.close(fd)
            return 10

        assert _run_threads(send, 2, "mq-restart") == [10, 10]
        got = sorted(k.sys.recv(srv, 100) for _ in range(20))
        assert got == sorted(b"%d-%d" % (i, j) for i in range(2) for j in range(10))
        k.sys.close(srv)


@dataclasses.dataclass(frozen=True)
class BadCtrlNet(kernel.Net):
    """A Net whose device process answers control commands badly (see
    ``mq_bad_ctrl_device.py``)."""

    mode: str = dataclasses.field(default="err", kw_only=True)

    def argv(self, control_endpoint: str, **kw: Any) -> list[str]:
        argv = super().argv(control_endpoint, **kw)
        i = argv.index("vdev")
        return [*argv[:i], "tests.integration.mq_bad_ctrl_device", self.mode, *argv[i + 1 :]]


@pytest.mark.parametrize("mode", ["err", "silent"])
def test_a_device_that_refuses_the_pairs_leaves_one_pair(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel.virtio_net, "CTRL_ACK_TIMEOUT_S", 0.5)
    spec = BadCtrlNet(backend="loopback", ip="10.0.0.1/24", queue_pairs=2, mode=mode)
    with kernel.boot(devices=[spec]) as k:
        dev = k.devices[0]
        link = _link(k)
        assert MQ <= set(dev.features) and link.queue_pairs == 2
        assert link.active_pairs == 1
        c = link.counters
        if mode == "err":
            assert c["mq_fallbacks"] == 1 and c["mq_ack_timeouts"] == 0
        else:
            assert c["mq_ack_timeouts"] == 1
        assert dev.metrics()["device"]["ctrl_commands"] == 1
        # the NIC works on pair 1
        before = _completions(k, tx_queue_index(1))
        srv = k.sys.socket()
        k.sys.bind(srv, ("10.0.0.1", 9700))
        k.sys.settimeout(srv, WAIT_S)

        def send(i: int) -> None:
            fd = k.sys.socket()
            k.sys.sendto(fd, b"one pair %d" % i, ("10.0.0.1", 9700))
            k.sys.close(fd)

        _run_threads(send, 3, f"mq-{mode}")
        got = sorted(k.sys.recv(srv, 100) for _ in range(3))
        assert got == [b"one pair %d" % i for i in range(3)]
        assert _completions(k, tx_queue_index(1)) == before, "transmitq2 is not used"
        k.sys.close(srv)


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (17, ValueError), (-2, ValueError), ("2", TypeError), (True, TypeError)],
)
def test_bad_queue_pairs_values(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="queue_pairs"):
        kernel.Net(backend="loopback", queue_pairs=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["0", "17", "two", "-1"])
def test_cli_bad_queue_pairs_is_one_line_and_exit_2(value: str, tmp_path: Any) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vdev",
            "net",
            "--backend",
            "loopback",
            "--queue-pairs",
            value,
            "--control",
            f"ipc://{tmp_path}/ctl",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--queue-pairs" in lines[0], r.stderr


def test_cli_queue_pairs_is_not_for_vhost_user(tmp_path: Any) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vdev",
            "net",
            "--backend",
            "loopback",
            "--queue-pairs",
            "2",
            "--vhost-user",
            str(tmp_path / "sock"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--queue-pairs" in lines[0] and "vhost-user" in lines[0]


VLAB = [sys.executable, "-c", "import sys; from tools.cli import main; sys.exit(main())"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["bench", "net", "--queue-pairs", "0"], "--queue-pairs"),
        (["bench", "net", "--queue-pairs", "17"], "--queue-pairs"),
        (["bench", "net", "--queue-pairs", "2", "--ring"], "--ring"),
        (["bench", "blk", "--queue-pairs", "2"], "--queue-pairs"),
    ],
)
def test_bench_bad_queue_pairs_is_one_line_and_exit_2(args: list[str], says: str) -> None:
    r = subprocess.run([*VLAB, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], r.stderr


def test_bench_net_with_two_pairs_reports_them(tmp_path: Any) -> None:
    r = subprocess.run(
        [*VLAB, "bench", "net", "--queue-pairs", "2", "--seconds", "0.2", "--json"]
        + ["--only", "udp-1024"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.splitlines()[-1])
    assert doc["queue_pairs"] == 2
    assert [row["name"] for row in doc["rows"]] == ["udp-1024"]
    assert doc["rows"][0]["virtio"] > 0 and doc["rows"][0]["native"] > 0
