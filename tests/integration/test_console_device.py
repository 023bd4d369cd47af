"""virtio-console (``vdev.examples.console`` + ``kernel.drivers.console``).

In-process through ``vdev.testing.DeviceHarness`` (echo, the bounded input buffer, bad
chains, a real pty pair), and end to end: ``kernel.boot`` starts the device process
(``kernel.Custom("console", echo=True)``), ``k.sys`` reads and writes ``/dev/hvc0``
through real shared memory and ZeroMQ. No sleeps: waits are on select, k.sys.poll or
a thread's join, all with timeouts.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import threading
import time

import pytest

import kernel
from kernel.drivers import ConsoleDriver
from kernel.files import POLLIN, POLLOUT
from vdev.examples.console import RECEIVEQ, TRANSMITQ, ConsoleDevice
from vdev.testing import DeviceHarness
from vdev.virtio import DeviceId

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TIMEOUT = 10.0


# --------------------------------------------------------------------------- harness


def test_echo_sends_transmitted_chain_back_on_receiveq() -> None:
    with DeviceHarness(ConsoleDevice(mode="echo")) as h:
        h.negotiate()
        rx = [h.submit(RECEIVEQ, in_sizes=[8]) for _ in range(2)]
        assert not any(r.done for r in rx) and h.counters["chains_kept"] == 2
        tx = h.request(TRANSMITQ, out=[b"hello ", b"console"])
        assert tx.len == 0  # §5.3.6.2: nothing written into transmit buffers
        got = [r.completion for r in rx]
        assert got[0] is not None and got[0].written == b"hello co"
        assert got[1] is not None and got[1].written == b"nsole"
        c = h.counters
        assert c["tx_bytes"] == 13 and c["tx_chains"] == 1
        assert c["rx_bytes"] == 13 and c["rx_chains"] == 2 and c["rx_dropped"] == 0


def test_input_without_buffers_waits_bounded_then_drops() -> None:
    with DeviceHarness(ConsoleDevice(mode="echo", buffer=16)) as h:
        h.negotiate()
        h.request(TRANSMITQ, out=[bytes(range(40))])
        assert h.counters["rx_dropped"] == 24 and h.counters["rx_bytes"] == 0
        c = h.request(RECEIVEQ, in_sizes=[100])  # waiting input: answered at once
        assert c.written == bytes(range(16))
        assert h.counters["rx_bytes"] == 16


def test_bad_chains_are_counted_not_raised() -> None:
    with DeviceHarness(ConsoleDevice(mode="echo")) as h:
        h.negotiate()
        assert h.request(RECEIVEQ, out=[b"x"], in_sizes=[8]).len == 0
        assert h.request(TRANSMITQ, out=[b"x"], in_sizes=[8]).len == 0
        assert h.counters["bad_requests"] == 2 and h.counters["handler_errors"] == 0


def test_reset_drops_kept_buffers_and_waiting_input() -> None:
    with DeviceHarness(ConsoleDevice(mode="echo")) as h:
        h.negotiate()
        h.submit(RECEIVEQ, in_sizes=[8])
        h.reset()
        assert h.counters["chains_released"] == 1
        h.negotiate()
        h.request(TRANSMITQ, out=[b"after"])
        assert h.request(RECEIVEQ, in_sizes=[8]).written == b"after"


def _subsequence(part: bytes, whole: bytes) -> bool:
    """``part`` is ``whole`` with some bytes left out (order kept)."""
    it = iter(whole)
    return all(b in it for b in part)  # bounded: one pass over ``whole``


def _readable(fd: int) -> None:
    r, _, _ = select.select([fd], [], [], TIMEOUT)
    assert r, "nothing arrived"


def test_pty_bridges_both_ways() -> None:
    dev = ConsoleDevice(mode="pty")
    assert dev.pty_path.startswith("/dev/")
    peer = os.open(dev.pty_path, os.O_RDWR | os.O_NOCTTY)
    try:
        with DeviceHarness(dev) as h:
            h.negotiate()
            rx = h.submit(RECEIVEQ, in_sizes=[64])
            os.write(peer, b"typed")
            _readable(dev.in_fd)
            h.run_pending()
            assert rx.completion is not None and rx.completion.written == b"typed"
            h.request(TRANSMITQ, out=[b"shown"])
            _readable(peer)
            assert os.read(peer, 64) == b"shown"
            assert h.counters["rx_bytes"] == 5 and h.counters["tx_bytes"] == 5
    finally:
        os.close(peer)


# --------------------------------------------------------------------------- kernel


def test_hvc0_echo_100k_through_kernel() -> None:
    data = os.urandom(100_000)
    with kernel.boot(devices=[kernel.Custom("console", echo=True)]) as k:
        [dev] = k.devices
        assert dev.device_id == DeviceId.CONSOLE and isinstance(dev.driver, ConsoleDriver)
        assert stat.S_ISCHR(k.sys.stat("/dev/hvc0").st_mode)
        fd = k.sys.open("/dev/hvc0", os.O_RDWR)
        sizes = [1, 100, 4095, 4096, 4097, 9000, 1000]
        pos = i = 0
        while pos < len(data):
            n = sizes[i % len(sizes)]
            assert k.sys.write(fd, data[pos : pos + n]) == len(data[pos : pos + n])
            pos += n
            i += 1
        got = bytearray()
        while len(got) < len(data):  # bounded: each read returns >= 1 byte or raises
            got += k.sys.read(fd, 8192)
        assert bytes(got) == data
        m = dev.metrics()["device"]
        assert m["tx_bytes"] == m["rx_bytes"] == len(data)
        assert m["rx_dropped"] == m["tx_dropped"] == m["bad_requests"] == 0
        d = dev.driver.counters
        assert d["tx_bytes"] == d["rx_bytes"] == len(data)
        assert d["tx_chains"] == m["tx_chains"] and d["rx_buffers"] == m["rx_chains"]
        k.sys.close(fd)


def test_poll_wakes_on_data_and_nonblocking_read() -> None:
    with kernel.boot(devices=[kernel.Custom("console", echo=True)]) as k:
        fd = k.sys.open("/dev/hvc0", os.O_RDWR | os.O_NONBLOCK)
        with pytest.raises(BlockingIOError) as e:
            k.sys.read(fd, 10)
        assert e.value.errno == errno.EAGAIN
        assert k.sys.poll([(fd, POLLIN | POLLOUT)], 0) == [(fd, POLLOUT)]
        result: list[list[tuple[int, int]]] = []
        t = threading.Thread(target=lambda: result.append(k.sys.poll([fd], TIMEOUT)))
        t.start()
        f = k.sys._file(fd)
        deadline = time.monotonic() + TIMEOUT
        while f.waiter_count == 0:  # the poller is registered (no sleep: a bounded check)
            assert time.monotonic() < deadline
        k.sys.write(fd, b"ping")
        t.join(TIMEOUT)
        assert not t.is_alive() and result == [[(fd, POLLIN)]]
        assert k.sys.read(fd, 100) == b"ping"
        assert k.sys.poll([fd], 0) == []
        assert f.waiter_count == 0
        k.sys.close(fd)


def test_blocking_read_waits_for_data() -> None:
    with kernel.boot(devices=[kernel.Custom("console", echo=True)]) as k:
        rfd = k.sys.open("/dev/hvc0", os.O_RDONLY)
        wfd = k.sys.open("/dev/console0", os.O_WRONLY)
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(k.sys.read(rfd, 100)))
        t.start()
        k.sys.write(wfd, b"late")
        t.join(TIMEOUT)
        assert got == [b"late"]
        k.sys.close(rfd)
        k.sys.close(wfd)


def test_stdio_output_reaches_the_device_process_stdout() -> None:
    with kernel.boot(devices=[kernel.Custom("console", stdio=True)]) as k:
        fd = k.sys.open("/dev/hvc0", os.O_WRONLY)
        k.sys.write(fd, b"console says hello\n")
        [dev] = k.devices
        # the chain came back after the device wrote to its stdout (the device's log)
        assert "console says hello" in dev.transport.log_tail()
        assert dev.metrics()["device"]["tx_bytes"] == 19
        k.sys.close(fd)


def test_pty_through_kernel() -> None:
    with kernel.boot(devices=[kernel.Custom("console", pty=True)]) as k:
        [dev] = k.devices
        [path] = [ln for ln in dev.transport.log_tail().splitlines() if ln.startswith("/dev/")]
        peer = os.open(path, os.O_RDWR | os.O_NOCTTY)
        try:
            fd = k.sys.open("/dev/hvc0", os.O_RDWR)
            os.write(peer, b"typed")
            got = b""
            while len(got) < 5:  # bounded: each read returns >= 1 byte or raises
                got += k.sys.read(fd, 100)
            assert got == b"typed"
            k.sys.write(fd, b"shown")
            got = b""
            while len(got) < 5:  # bounded: each round waits (select, timeout) for >= 1 byte
                _readable(peer)
                got += os.read(peer, 100)
            assert got == b"shown"
            k.sys.close(fd)
        finally:
            os.close(peer)


def test_unread_input_parks_buffers_then_device_drops() -> None:
    # Nobody reads: the driver holds RX_LIMIT bytes and parks its buffers, the device
    # buffers --buffer bytes and drops the rest (counted); writes never block.
    data = os.urandom(400_000)
    with kernel.boot(devices=[kernel.Custom("console", echo=True, buffer=32768)]) as k:
        [dev] = k.devices
        fd = k.sys.open("/dev/hvc0", os.O_RDWR)
        for pos in range(0, len(data), 50_000):
            k.sys.write(fd, data[pos : pos + 50_000])
        dropped = dev.metrics()["device"]["rx_dropped"]
        assert dropped > 0 and dev.driver.counters["parked"] > 0
        got = bytearray()
        while len(got) < len(data) - dropped:  # bounded: each read returns >= 1 byte
            got += k.sys.read(fd, 65536)
        assert _subsequence(bytes(got), data)  # in order, with the dropped runs missing
        m = dev.metrics()["device"]
        assert m["rx_bytes"] == len(got) and m["rx_dropped"] + len(got) == len(data)
        k.sys.close(fd)
