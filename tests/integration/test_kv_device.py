"""The key-value store device (vendor id 0xF0) end to end: ``kernel.Custom("kv")``
starts ``python -m vdev kv``, the bus binds :class:`kernel.drivers.kv.KvDriver` by the
id the device reports, and data and counters agree on both sides.

Real parts only: real device processes, real shared memory, real ZeroMQ. No sleeps:
threads are joined, calls block until the device answers.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest

import kernel
from hostops.sync import start_thread
from kernel.drivers.kv import KV_DEVICE_ID, MAX_KEY, MAX_VALUE, KvDriver

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_round_trips_and_errors() -> None:
    with kernel.boot(devices=[kernel.Custom("kv")]) as k:
        dev = k.device("kv0")
        assert dev.device_id == KV_DEVICE_ID
        d = dev.driver
        assert isinstance(d, KvDriver)
        big = os.urandom(MAX_VALUE)
        d.put("big", big)
        d.put(b"small", b"")
        d.put("k" * MAX_KEY, b"v")
        assert d.get(b"big") == big and d.get("small") == b"" and d.get("k" * MAX_KEY) == b"v"
        d.put("big", b"replaced")
        assert d.get("big") == b"replaced"
        d.delete("big")
        for call in (lambda: d.get("big"), lambda: d.delete("big")):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.ENOENT
        # refused before sending: nothing reaches the device
        with pytest.raises(OSError) as e:
            d.put("x" * (MAX_KEY + 1), b"v")
        assert e.value.errno == errno.E2BIG
        with pytest.raises(OSError) as e:
            d.put("x", bytes(MAX_VALUE + 1))
        assert e.value.errno == errno.E2BIG
        with pytest.raises(OSError) as e:
            d.get("")
        assert e.value.errno == errno.EINVAL
        m = dev.metrics()["device"]
        assert (m["puts"], m["gets"], m["deletes"], m["not_found"]) == (4, 5, 2, 2)
        assert m["bytes_out"] == MAX_VALUE + 1 + len(b"replaced")
        assert m["requests"] == d.counters["requests"] == 11 and m["bad_requests"] == 0


def test_bad_requests_are_counted_and_the_device_goes_on() -> None:
    with kernel.boot(devices=[kernel.Custom("kv")]) as k:
        dev = k.device("kv0")
        d = dev.driver
        assert isinstance(d, KvDriver)
        hdr = struct.Struct("<III")
        assert d.request(b"short")[0] == 2  # BAD_REQUEST
        assert d.request(hdr.pack(9, 1, 0) + b"k")[0] == 2  # unknown op
        assert d.request(hdr.pack(1, 1, 5) + b"k")[0] == 2  # value missing
        assert d.request(hdr.pack(1, 1, 0xFFFFFFFF) + b"k")[0] == 3  # TOO_BIG
        d.put("k", b"0123456789")
        assert d.request(hdr.pack(0, 1, 0) + b"k", writable=4)[0] == 3  # answer too big
        m = dev.metrics()
        assert m["device"]["bad_requests"] == 3 and m["device"]["too_big"] == 2
        assert m["device"]["bad_chains"] == 0
        assert d.get("k") == b"0123456789"
        assert dev.metrics()["device"]["requests"] == 7


def test_many_threads_at_once() -> None:
    threads, rounds = 8, 20
    with kernel.boot(devices=[kernel.Custom("kv", max_entries=threads * rounds)]) as k:
        d = k.device("kv0").driver
        assert isinstance(d, KvDriver)
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            try:
                for i in range(rounds):
                    value = bytes([t]) * (i * 997 % 5000 + 1)
                    d.put(f"t{t}-{i}", value)
                    if d.get(f"t{t}-{i}") != value:
                        raise AssertionError(f"thread {t} round {i}: wrong value")
                for i in range(0, rounds, 2):
                    d.delete(f"t{t}-{i}")
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        ts = [start_thread(worker, t, name=f"kv-{t}") for t in range(threads)]
        for th in ts:
            th.join(30)
            assert not th.is_alive()
        assert errors == []
        for t in range(threads):
            assert d.get(f"t{t}-1") == bytes([t]) * (997 % 5000 + 1)
            with pytest.raises(OSError) as e:
                d.get(f"t{t}-0")
            assert e.value.errno == errno.ENOENT
        m = k.device("kv0").metrics()["device"]
        total = threads * rounds
        assert m["puts"] == total and m["deletes"] == total // 2
        assert m["gets"] == total + 2 * threads and m["not_found"] == threads
        assert m["full"] == 0


def test_store_full_is_enospc() -> None:
    with kernel.boot(devices=[kernel.Custom("kv", max_entries=2)]) as k:
        d = k.device("kv0").driver
        assert isinstance(d, KvDriver)
        d.put("a", b"1")
        d.put("b", b"2")
        with pytest.raises(OSError) as e:
            d.put("c", b"3")
        assert e.value.errno == errno.ENOSPC
        d.put("a", b"again")  # replacing needs no room
        assert k.device("kv0").metrics()["device"]["full"] == 1


def test_line_protocol_on_dev_kv0() -> None:
    with kernel.boot(devices=[kernel.Custom("kv")]) as k:
        assert stat.S_ISCHR(k.sys.stat("/dev/kv0").st_mode)
        fd = k.sys.open("/dev/kv0", os.O_RDWR)
        try:
            assert k.sys.read(fd, 100) == b""  # nothing asked yet
            lines = b"PUT greeting hello world\nGET greeting\nGET nope\nDEL greeting\n"
            assert k.sys.write(fd, lines[:10]) == 10  # a line may come in pieces
            k.sys.write(fd, lines[10:] + b"FROB x\nGET\n")
            want = b"OK\nOK hello world\nERR ENOENT\nOK\nERR EINVAL\nERR EINVAL\n"
            assert k.sys.read(fd, 1000) == want
            k.sys.write(fd, b"PUT " + b"k" * (MAX_KEY + 1) + b" v\n")
            k.sys.write(fd, b"PUT x " + bytes(MAX_VALUE + 2 * MAX_KEY) + b"\nGET x\n")
            assert k.sys.read(fd, 1000) == b"ERR E2BIG\nERR E2BIG\nERR ENOENT\n"
        finally:
            k.sys.close(fd)
        with pytest.raises(OSError) as e:
            k.device("kv0").driver.get("greeting")  # the node and the driver share the store
        assert e.value.errno == errno.ENOENT
