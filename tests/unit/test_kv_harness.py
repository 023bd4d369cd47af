"""vdev.examples.kv driven in-process by the DeviceHarness (the real DriverQueue and
DeviceSession): well-formed requests, and malformed ones answered BAD_REQUEST /
TOO_BIG / FULL and counted, the device working on afterwards."""

from __future__ import annotations

import struct

import pytest

from vdev.examples.kv import (
    BAD_REQUEST,
    DELETE,
    FULL,
    GET,
    MAX_KEY,
    MAX_VALUE,
    NOT_FOUND,
    OK,
    PUT,
    TOO_BIG,
    KvDevice,
)
from vdev.testing import DeviceHarness

pytestmark = pytest.mark.timeout(60)

ANSWER = 1 + MAX_VALUE


def req(op: int, key: bytes, value: bytes = b"", *, value_len: int | None = None) -> bytes:
    n = len(value) if value_len is None else value_len
    return struct.pack("<III", op, len(key), n) + key + value


def test_put_get_delete_round_trip() -> None:
    with DeviceHarness(KvDevice(), memory_size=2 << 20) as h:
        h.negotiate()
        big = bytes(range(256)) * 256  # 64 KiB exactly
        assert h.request(0, [req(PUT, b"k", big)], [1]).written == bytes([OK])
        got = h.request(0, [req(GET, b"k")], [ANSWER])
        assert got.len == 1 + MAX_VALUE and got.written == bytes([OK]) + big
        # a request split over several readable buffers is the same request
        h.request(0, [struct.pack("<III", PUT, 2, 3), b"k2", b"abc"], [1])
        assert h.request(0, [req(GET, b"k2")], [2, 10]).written[:4] == b"\x00abc"
        assert h.request(0, [req(DELETE, b"k")], [1]).written == bytes([OK])
        assert h.request(0, [req(GET, b"k")], [ANSWER]).written[:1] == bytes([NOT_FOUND])
        assert h.request(0, [req(DELETE, b"k")], [1]).written == bytes([NOT_FOUND])
        m = h.counters
        assert (m["puts"], m["gets"], m["deletes"], m["not_found"]) == (2, 3, 2, 2)
        assert m["bad_requests"] == m["too_big"] == 0 and m["bytes_out"] == MAX_VALUE + 3


def test_malformed_requests_are_counted_and_the_device_goes_on() -> None:
    with DeviceHarness(KvDevice(), memory_size=2 << 20) as h:
        h.negotiate()
        bad = [
            [b"\x00" * 11],  # short header
            [req(7, b"k")],  # unknown op
            [req(PUT, b"", b"v")],  # empty key
            [req(GET, b"k", b"v")],  # GET with a value
            [req(DELETE, b"k", b"v")],  # DELETE with a value
            [req(PUT, b"key", b"v")[:-1]],  # shorter than the header says
            [req(PUT, b"key", b"v") + b"extra"],  # longer than the header says
            [req(PUT, b"key", value_len=0xFFFFFFFF)[:12] + b"key"],  # value length lies
        ]
        for out in bad:
            c = h.request(0, out, [4])
            assert c.len == 1 and c.written[:1] in (bytes([BAD_REQUEST]), bytes([TOO_BIG]))
        # no writable byte: nowhere for a status, used length 0
        assert h.request(0, [req(GET, b"k")]).len == 0
        # too big: key, value, and an answer that does not fit the buffer
        assert h.request(0, [req(PUT, b"k" * (MAX_KEY + 1), b"v")], [1]).written == b"\x03"
        assert h.request(0, [req(PUT, b"k", value_len=MAX_VALUE + 1)], [1]).written == b"\x03"
        h.request(0, [req(PUT, b"k", b"0123456789")], [1])
        assert h.request(0, [req(GET, b"k")], [5]).written[:1] == bytes([TOO_BIG])
        m = h.counters
        assert m["bad_requests"] == 8 and m["too_big"] == 4 and m["requests"] == 13
        assert m["bad_chains"] == 0 and h.broken == []
        # still working
        assert h.request(0, [req(GET, b"k")], [20]).written[:11] == b"\x000123456789"


def test_entries_are_bounded() -> None:
    with DeviceHarness(KvDevice(max_entries=2)) as h:
        h.negotiate()
        for key in (b"a", b"b"):
            assert h.request(0, [req(PUT, key, b"1")], [1]).written == bytes([OK])
        assert h.request(0, [req(PUT, b"c", b"1")], [1]).written == bytes([FULL])
        assert h.request(0, [req(PUT, b"a", b"2")], [1]).written == bytes([OK])  # replace
        h.request(0, [req(DELETE, b"b")], [1])
        assert h.request(0, [req(PUT, b"c", b"1")], [1]).written == bytes([OK])
        assert h.counters["full"] == 1 and len(h.device.store) == 2  # type: ignore[attr-defined]
