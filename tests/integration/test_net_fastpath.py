"""The network fast path: ``recv_into`` / ``recvfrom_into`` between two kernels on the
switch, receive buffers refilled in batches and recycled as they are, and frames
batched between the switch's ports.

Real parts throughout: two kernels (in this process) whose NICs are device processes
on a ``python -m vdev switch`` process, or :class:`vdev.net_switch.SwitchBackend` ports
driven by an in-process event loop against the real switch process. Every assertion is
on data (byte for byte, or a SHA-256 over thousands of payloads in order) or on
counters; nothing depends on timing.
"""

from __future__ import annotations

import errno
import hashlib
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq
from netpeer import Switch
from test_switch import Sink

import kernel
from hostops.clock import monotonic
from hostops.rundir import RuntimeDir
from kernel.files import MSG_DONTWAIT, SO_RCVBUF, SOCK_STREAM, SOL_SOCKET
from vdev.net_switch import SwitchBackend
from vdev.switch import BATCH_RECORD, EventLoop, encode_hello
from vdev.virtio.net import NetHdr

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WAIT_S = 10.0
UDP_PORT = 9400
TCP_PORT = 9401
ENOBUFS = errno.ENOBUFS


# --------------------------------------------------------------------------- two kernels


class Pair:
    """Kernel A (10.0.0.1) and kernel B (10.0.0.2) on one switch."""

    def __init__(self, a: kernel.Kernel, b: kernel.Kernel, switch: Switch) -> None:
        self.a = a
        self.b = b
        self.switch = switch


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    rundir = RuntimeDir.create()
    sw = Switch(rundir)
    sw.start()
    try:
        spec_a = kernel.Net(backend="switch", switch=sw.endpoint, ip="10.0.0.1/24")
        spec_b = kernel.Net(backend="switch", switch=sw.endpoint, ip="10.0.0.2/24")
        with kernel.boot(devices=[spec_a]) as ka, kernel.boot(devices=[spec_b]) as kb:
            for k in (ka, kb):
                link = k.devices[0].link
                assert link is not None and link.wait_link_up(WAIT_S)
            yield Pair(ka, kb, sw)
    finally:
        sw.stop()
        rundir.cleanup()


def _sendto(k: kernel.Kernel, fd: int, data: bytes, addr: tuple[str, int]) -> None:
    """``sendto``, waiting for transmit room on ENOBUFS (bounded)."""
    link = k.devices[0].link
    assert link is not None
    for _ in range(10000):
        try:
            k.sys.sendto(fd, data, addr)
            return
        except OSError as e:
            if e.errno != ENOBUFS:
                raise
            link.wait_tx_room(1.0)
    raise AssertionError("the transmit ring never drained")


@pytest.fixture
def udp(pair: Pair) -> Iterator[tuple[int, int]]:
    """A sending socket on A and a bound receiving socket on B."""
    a, b = pair.a, pair.b
    tx = a.sys.socket()
    rx = b.sys.socket()
    b.sys.setsockopt(rx, SOL_SOCKET, SO_RCVBUF, 16 << 20)
    b.sys.bind(rx, ("0.0.0.0", UDP_PORT))
    b.sys.settimeout(rx, WAIT_S)
    try:
        # the first datagram also resolves B's MAC: make sure the path is up
        _sendto(a, tx, b"hello", ("10.0.0.2", UDP_PORT))
        assert b.sys.recv(rx, 100) == b"hello"
        yield tx, rx
    finally:
        a.sys.close(tx)
        b.sys.close(rx)


def test_recv_into_and_recvfrom_into_deliver_every_byte(pair: Pair, udp: tuple[int, int]) -> None:
    a, b = pair.a, pair.b
    tx, rx = udp
    rng = random.Random(12)
    a_addr = ("10.0.0.1", a.sys.getsockname(tx)[1])
    for n in (1, 7, 64, 1000, 1472, 1473, 4000, 30000, 65507):
        data = rng.randbytes(n)
        _sendto(a, tx, data, ("10.0.0.2", UDP_PORT))
        buf = bytearray(65536)
        got = b.sys.recv_into(rx, buf)
        assert got == n and buf[:n] == data
        _sendto(a, tx, data, ("10.0.0.2", UDP_PORT))
        arr = memoryview(bytearray(n + 10))
        got2, addr = b.sys.recvfrom_into(rx, arr)
        assert (got2, addr) == (n, a_addr)
        assert arr[:n] == data and arr[n:] == bytes(10)  # nothing written past the datagram


def test_recv_into_truncates_like_linux_and_honours_nbytes(
    pair: Pair, udp: tuple[int, int]
) -> None:
    a, b = pair.a, pair.b
    tx, rx = udp
    dest = ("10.0.0.2", UDP_PORT)
    first, second, third = b"A" * 100 + b"tail", b"second datagram", b"0123456789abcdef"
    for d in (first, second, third):
        _sendto(a, tx, d, dest)
    small = bytearray(100)
    assert b.sys.recv_into(rx, small) == 100  # truncated: the rest is discarded
    assert small == first[:100]
    buf = bytearray(b"\xee" * 64)
    assert b.sys.recv_into(rx, buf, 6) == 6  # nbytes bounds what is written
    assert buf[:6] == second[:6] and buf[6:] == b"\xee" * 58
    arr = memoryview(bytearray(64)).cast("B")
    n, addr = b.sys.recvfrom_into(rx, arr, 0)
    assert n == len(third) and arr[:n] == third and addr[0] == "10.0.0.1"
    # a non-byte buffer is filled by bytes, as the socket module does
    import array

    _sendto(a, tx, bytes(range(16)), dest)
    words = array.array("I", [0] * 8)
    assert b.sys.recv_into(rx, words) == 16
    assert words.tobytes()[:16] == bytes(range(16))


def test_recv_into_bad_arguments_are_linux_errors(pair: Pair, udp: tuple[int, int]) -> None:
    b = pair.b
    _tx, rx = udp
    cases: list[tuple[Callable[[], Any], int, type[BaseException]]] = [
        (lambda: b.sys.recv_into(rx, b"read-only"), errno.EINVAL, TypeError),
        (lambda: b.sys.recv_into(rx, "text"), errno.EINVAL, TypeError),
        (lambda: b.sys.recv_into(rx, bytearray(4), 5), errno.EINVAL, ValueError),
        (lambda: b.sys.recv_into(rx, bytearray(4), -1), errno.EINVAL, ValueError),
        (lambda: b.sys.recvfrom_into(rx, memoryview(b"ro")), errno.EINVAL, TypeError),
        (lambda: b.sys.recvfrom_into(rx, bytearray(2), 3), errno.EINVAL, ValueError),
        (lambda: b.sys.recv_into(9999, bytearray(4)), errno.EBADF, OSError),
        (lambda: b.sys.recvfrom_into(9999, bytearray(4)), errno.EBADF, OSError),
    ]
    for call, code, also in cases:
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == code
        assert isinstance(ei.value, also)
    with pytest.raises(BlockingIOError) as eb:
        b.sys.recv_into(rx, bytearray(10), 0, MSG_DONTWAIT)
    assert eb.value.errno == errno.EAGAIN
    b.sys.setblocking(rx, False)
    try:
        with pytest.raises(BlockingIOError):
            b.sys.recvfrom_into(rx, bytearray(10))
    finally:
        b.sys.settimeout(rx, WAIT_S)
    closed = b.sys.socket()
    b.sys.close(closed)
    with pytest.raises(OSError) as ec:
        b.sys.recv_into(closed, bytearray(4))
    assert ec.value.errno == errno.EBADF


def test_tcp_recv_into_and_recvfrom_into(pair: Pair) -> None:
    a, b = pair.a, pair.b
    srv = b.sys.socket(type=SOCK_STREAM)
    b.sys.bind(srv, ("0.0.0.0", TCP_PORT))
    b.sys.listen(srv, 4)
    b.sys.settimeout(srv, WAIT_S)
    c = a.sys.socket(type=SOCK_STREAM)
    a.sys.settimeout(c, WAIT_S)
    try:
        a.sys.connect(c, ("10.0.0.2", TCP_PORT))
        s, _ = b.sys.accept(srv)
        b.sys.settimeout(s, WAIT_S)
        data = random.Random(3).randbytes(200_000)
        a.sys.sendall(c, data)
        out = bytearray(len(data))
        mv = memoryview(out)
        got = 0
        first = True
        while got < len(data):  # bounded: every call returns >= 1 byte or raises
            if first:
                n, addr = b.sys.recvfrom_into(s, mv[got:])
                assert addr == ("10.0.0.1", a.sys.getsockname(c)[1])
                first = False
            else:
                n = b.sys.recv_into(s, mv[got:], min(7000, len(data) - got))
            assert n > 0
            got += n
        assert out == data
        b.sys.close(s)
    finally:
        a.sys.close(c)
        b.sys.close(srv)


def test_thousands_of_frames_arrive_intact_through_recycled_buffers(
    pair: Pair, udp: tuple[int, int]
) -> None:
    """Every receive buffer is republished as it is, many times over: the payloads,
    in order, hash the same on both sides; and the receive ring was refilled in
    batches (more than one frame per kick, from the counters)."""
    a, b = pair.a, pair.b
    tx, rx = udp
    link = b.devices[0].link
    assert link is not None
    rxq = b.devices[0].queues[0]
    frames0, kicks0 = link.counters["rx_frames"], rxq.stats.kicks_sent
    recycled0 = link.counters["rx_recycled"]
    rng = random.Random(99)
    count, window = 4000, 64
    sent = hashlib.sha256()
    got = hashlib.sha256()
    buf = bytearray(2048)
    dest = ("10.0.0.2", UDP_PORT)
    for start in range(0, count, window):
        for i in range(start, min(count, start + window)):
            body = struct.pack(">I", i) + rng.randbytes(rng.randrange(0, 1400))
            sent.update(body)
            _sendto(a, tx, body, dest)
        for i in range(start, min(count, start + window)):
            n = b.sys.recv_into(rx, buf)
            assert struct.unpack_from(">I", buf)[0] == i  # none lost, none reordered
            got.update(memoryview(buf)[:n])
    assert got.hexdigest() == sent.hexdigest()
    frames = link.counters["rx_frames"] - frames0
    kicks = rxq.stats.kicks_sent - kicks0
    assert frames >= count
    # every buffer came back and was posted again as it is (but the last, partial
    # batch, still waiting for its refill), many times over
    assert link.counters["rx_recycled"] - recycled0 >= count - link.rx_refill_batch
    # refills wait for a batch of free buffers: frames per receive kick > 1
    assert link.rx_refill_batch > 1
    assert kicks * link.rx_refill_batch <= frames + link.rx_refill_batch
    assert kicks < frames


# --------------------------------------------------------------------------- switch ports


def _mac(n: int) -> bytes:
    return bytes([2, 0, 0, 0, 0xCD, n])


def _eth(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x88\xb5" + payload


def _frames(sink: Sink) -> list[bytes]:
    """The frames ``sink`` received, without their headers."""
    return [f for _, f in sink.frames]


def _run_until(loop: EventLoop, done: Callable[[], bool], what: str) -> None:
    deadline = monotonic() + WAIT_S
    while not done():  # bounded by the deadline
        left = deadline - monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {what}")
        loop.run_once(min(left, 0.2))


@pytest.fixture
def ports() -> Iterator[tuple[Switch, EventLoop]]:
    rundir = RuntimeDir.create()
    sw = Switch(rundir)
    sw.start()
    loop = EventLoop()
    try:
        sw.wait(lambda st: True)
        yield sw, loop
    finally:
        loop.close()
        sw.stop()
        rundir.cleanup()


def _port(loop: EventLoop, endpoint: str, n: int) -> tuple[SwitchBackend, Sink]:
    sink = Sink(loop, f"p{n}")
    be = SwitchBackend(endpoint, mac=_mac(n), port_name=f"p{n}")
    be.attach(sink)
    _run_until(loop, lambda: sink.link is True, f"p{n} link up")
    return be, sink


def test_a_burst_crosses_the_switch_as_one_batch_and_waits_for_buffers(
    ports: tuple[Switch, EventLoop],
) -> None:
    sw, loop = ports
    p1, s1 = _port(loop, sw.endpoint, 1)
    p2, s2 = _port(loop, sw.endpoint, 2)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)  # a port that never said it takes batches
    raw.setsockopt(zmq.LINGER, 0)
    try:
        raw.connect(sw.endpoint)
        raw.send(b"".join(encode_hello(name="raw", mac=_mac(3), accepts=frozenset(), pid=0)))
        assert raw.poll(int(WAIT_S * 1000)) and raw.recv()[:1] == b"W"
        s2.buffers = False  # p2's driver has no receive buffers yet
        n = 50
        frames = [_eth(b"\xff" * 6, _mac(1), struct.pack(">I", i) * 20) for i in range(n)]
        for f in frames:  # one round of the loop: the first goes alone, the rest batched
            assert p1.send(NetHdr(), f)
        _run_until(loop, lambda: s2.counts.get("switch_rx_paused", 0) > 0, "p2 paused")
        assert s1.counts["switch_tx_frames"] == n
        assert s1.counts["switch_tx_batches"] == 1  # 49 frames, one message
        s2.buffers = True
        p2.resume_rx()
        _run_until(loop, lambda: len(s2.frames) == n, "all frames at p2")
        assert _frames(s2) == frames
        assert s2.counts["switch_rx_frames"] == n and "switch_rx_dropped" not in s2.counts
        # the port without batches got every frame as a frame message of its own
        got: list[bytes] = []
        for _ in range(n):
            assert raw.poll(int(WAIT_S * 1000))
            msg = raw.recv()
            assert msg[:1] == b"F"
            got.append(msg[1 + 12 :])
        assert got == frames
        st = sw.stats()
        by_name = {p["name"]: p for p in st["ports"]}
        assert by_name["p2"]["tx_frames"] == n and by_name["raw"]["tx_frames"] == n
        assert by_name["p1"]["rx_frames"] == n and st["switch"]["malformed"] == 0
    finally:
        raw.close(0)
        p1.close()
        p2.close()


def test_a_malformed_batch_is_cut_at_the_bad_record_and_counted(
    ports: tuple[Switch, EventLoop],
) -> None:
    sw, loop = ports
    p2, s2 = _port(loop, sw.endpoint, 2)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    try:
        raw.connect(sw.endpoint)
        raw.send(b"".join(encode_hello(name="raw", mac=_mac(3), accepts=frozenset(), pid=0)))
        assert raw.poll(int(WAIT_S * 1000)) and raw.recv()[:1] == b"W"
        good = [_eth(_mac(2), _mac(3), b"good-%d" % i + bytes(40)) for i in range(3)]

        def rec(frame: bytes, length: int | None = None) -> bytes:
            n = len(frame) if length is None else length
            return n.to_bytes(4, "little") + NetHdr().pack() + frame

        # two good records, then one whose length runs past the message
        raw.send(b"M" + rec(good[0]) + rec(good[1]) + rec(good[2], 10_000))
        # a record too short for its own header
        raw.send(b"M" + rec(good[2]) + b"\x01\x02")
        _run_until(loop, lambda: len(s2.frames) == 3, "the good records")
        assert _frames(s2) == [good[0], good[1], good[2]]
        st = sw.stats()  # the good record after the first bad one came from the second
        assert st["switch"]["malformed"] == 2
        assert BATCH_RECORD == 16
        # a stats request still works: the switch is alive and switching
        assert msgpack.packb(st) and {p["name"] for p in st["ports"]} >= {"p2", "raw"}
    finally:
        raw.close(0)
        p2.close()


# --------------------------------------------------------------------------- hijack


def test_hijacked_python_sockets_recv_into_the_callers_buffer() -> None:
    """An unmodified program's ``socket.recv_into`` / ``recvfrom_into`` on a hijacked
    socket go straight to the kernel's calls: same results as Python's sockets."""
    import socket

    from kernel import hijack

    with kernel.boot(devices=[kernel.Net(backend="loopback", ip="10.0.0.2/24")]) as k:
        with hijack.hijacked(k):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                rx.bind(("10.0.0.2", 5101))
                tx.bind(("10.0.0.2", 5100))
                rx.settimeout(WAIT_S)
                data = random.Random(5).randbytes(3000)
                tx.sendto(data, ("10.0.0.2", 5101))
                buf = bytearray(4096)
                n, addr = rx.recvfrom_into(buf)
                assert (n, addr) == (3000, ("10.0.0.2", 5100)) and buf[:n] == data
                tx.sendto(data, ("10.0.0.2", 5101))
                small = bytearray(1000)
                assert rx.recv_into(small) == 1000 and small == data[:1000]
                with pytest.raises(ValueError):
                    rx.recvfrom_into(bytearray(4), 5)
                with pytest.raises(TypeError):
                    rx.recv_into(b"read-only")
            finally:
                rx.close()
                tx.close()
