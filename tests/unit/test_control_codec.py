"""The control channel's one codec: every message round-trips, every malformed input is
rejected with the right :class:`ErrorCode`, and error replies surface as RemoteError."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from vdev.virtio import ProtocolError
from vdev.virtio.control import (
    CONFIG_CHANGE,
    PROTOCOL_VERSION,
    REQUESTS,
    ErrorCode,
    RemoteError,
    Request,
    decode_reply,
    decode_request,
    encode_error,
    encode_reply,
    encode_request,
)

pytestmark = pytest.mark.timeout(60)

SAMPLE: dict[type, Any] = {
    int: 2**64 - 1,
    bool: True,
    str: "ipc:///tmp/vlab-0/x.kick",
    bytes: b"\x00\x01\xfe\xff",
    list: [{"guest_addr": 0, "size": 1 << 20, "shm": "/vlab-dev-1"}],
}
WRONG: dict[type, list[Any]] = {
    int: [True, False, "1", b"\x01", 1.0, None, [1]],
    bool: [1, 0, "true", None],
    str: [1, b"abc", None, ["a"]],
    bytes: ["abc", 1, None],
    list: [{"a": 1}, "x", 1, None],
}


def raw(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def req(type_: str, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": type_, **fields}


def fields_for(type_: str) -> dict[str, Any]:
    return {name: SAMPLE[t] for name, t in REQUESTS[type_][0].items()}


def expect(code: str, data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as ei:
        decode_request(data)
    assert ei.value.code == code, ei.value
    assert ei.value.message
    assert not isinstance(ei.value, RemoteError)
    return ei.value


def test_schema_is_the_vhost_user_vocabulary_we_use() -> None:
    assert set(REQUESTS) == {
        "GET_DEVICE_INFO",
        "GET_FEATURES",
        "SET_FEATURES",
        "GET_CONFIG",
        "SET_CONFIG",
        "SET_MEM_TABLE",
        "SET_VRING_NUM",
        "SET_VRING_ADDR",
        "SET_VRING_BASE",
        "GET_VRING_BASE",
        "SET_VRING_KICK",
        "SET_VRING_CALL",
        "SET_VRING_ENABLE",
        "SET_STATUS",
        "GET_STATUS",
        "RESET_DEVICE",
        "GET_METRICS",
    }
    assert CONFIG_CHANGE == 0xFFFF


@pytest.mark.parametrize("type_", sorted(REQUESTS))
def test_request_round_trip(type_: str) -> None:
    f = fields_for(type_)
    data = encode_request(type_, **f)
    obj = msgpack.unpackb(data, raw=False)
    assert obj == {"v": PROTOCOL_VERSION, "type": type_, **f}
    r = decode_request(data)
    assert isinstance(r, Request)
    assert r.type == type_ and r.fields == f
    for name, value in f.items():
        assert r[name] == value
        assert type(r[name]) is type(value)


@pytest.mark.parametrize("type_", sorted(REQUESTS))
def test_reply_round_trip(type_: str) -> None:
    reply_fields = {name: (i, f"v{i}", b"\x07" * i) for i, name in enumerate(REQUESTS[type_][1])}
    flat = {k: list(v) for k, v in reply_fields.items()}
    got = decode_reply(encode_reply(**flat))
    assert got == flat


def test_metrics_reply_shape_round_trips() -> None:
    body = {"device": {"requests": 3}, "queues": [{"chains": 1, "bad_chains": 0}]}
    assert decode_reply(encode_reply(**body)) == body


def test_not_msgpack() -> None:
    expect(ErrorCode.MALFORMED, b"\xc1")  # never used by msgpack
    expect(ErrorCode.MALFORMED, b"")
    expect(ErrorCode.MALFORMED, raw(req("GET_STATUS"))[:-3])  # truncated
    expect(ErrorCode.MALFORMED, raw(req("GET_STATUS")) + b"\x00")  # trailing bytes


@pytest.mark.parametrize("obj", [[1, 2], 7, "GET_STATUS", None, b"x", [req("GET_STATUS")]])
def test_not_a_map(obj: Any) -> None:
    expect(ErrorCode.MALFORMED, raw(obj))


def test_map_with_non_string_keys() -> None:
    expect(ErrorCode.MALFORMED, raw({1: 2, "v": 1, "type": "GET_STATUS"}))


@pytest.mark.parametrize("v", ["missing", 0, 2, -1, "1", 1.0, True, None, [1]])
def test_version(v: Any) -> None:
    obj = req("GET_STATUS")
    if v == "missing":
        del obj["v"]
    else:
        obj["v"] = v
    expect(ErrorCode.BAD_VERSION, raw(obj))
    with pytest.raises(ProtocolError) as ei:
        decode_reply(raw({**{k: x for k, x in obj.items() if k != "type"}, "ok": True}))
    assert ei.value.code == ErrorCode.BAD_VERSION


@pytest.mark.parametrize("t", ["SET_OWNER", "get_status", "", None, 3, b"GET_STATUS", "missing"])
def test_unknown_type(t: Any) -> None:
    obj = req("x")
    if t == "missing":
        del obj["type"]
    else:
        obj["type"] = t
    expect(ErrorCode.UNKNOWN_MESSAGE, raw(obj))
    with pytest.raises(ProtocolError) as ei:
        encode_request(t if isinstance(t, str) else "NOPE")
    assert ei.value.code == ErrorCode.UNKNOWN_MESSAGE


@pytest.mark.parametrize(
    ("type_", "name"), [(t, n) for t, (s, _) in sorted(REQUESTS.items()) for n in s]
)
def test_missing_field(type_: str, name: str) -> None:
    f = fields_for(type_)
    del f[name]
    err = expect(ErrorCode.BAD_FIELD, raw(req(type_, **f)))
    assert name in err.message
    with pytest.raises(ProtocolError) as ei:
        encode_request(type_, **f)
    assert ei.value.code == ErrorCode.BAD_FIELD


@pytest.mark.parametrize(
    ("type_", "name", "bad"),
    [
        (t, n, bad)
        for t, (s, _) in sorted(REQUESTS.items())
        for n, want in s.items()
        for bad in WRONG[want]
    ],
)
def test_wrong_field_type(type_: str, name: str, bad: Any) -> None:
    f = fields_for(type_)
    f[name] = bad
    err = expect(ErrorCode.BAD_FIELD, raw(req(type_, **f)))
    assert name in err.message
    with pytest.raises(ProtocolError) as ei:
        encode_request(type_, **f)
    assert ei.value.code == ErrorCode.BAD_FIELD


@pytest.mark.parametrize("type_", sorted(REQUESTS))
def test_unexpected_field(type_: str) -> None:
    f = fields_for(type_)
    f["extra"] = 1
    err = expect(ErrorCode.BAD_FIELD, raw(req(type_, **f)))
    assert "extra" in err.message
    with pytest.raises(ProtocolError) as ei:
        encode_request(type_, **f)
    assert ei.value.code == ErrorCode.BAD_FIELD


def test_unexpected_fields_with_mixed_key_types() -> None:
    # bytes and str keys together must still be a clean BAD_FIELD, not a TypeError
    err = expect(ErrorCode.BAD_FIELD, raw({**req("GET_STATUS"), b"x": 1, "y": 2}))
    assert "b'x'" in err.message and "'y'" in err.message
    expect(ErrorCode.BAD_FIELD, raw({**req("SET_FEATURES"), b"features": 1}))  # missing


@pytest.mark.parametrize("value", [-1, -(2**63)])
def test_negative_int(value: int) -> None:
    expect(ErrorCode.BAD_VALUE, raw(req("SET_VRING_NUM", index=0, num=value)))
    with pytest.raises(ProtocolError) as ei:
        encode_request("SET_VRING_NUM", index=value, num=8)
    assert ei.value.code == ErrorCode.BAD_VALUE


@pytest.mark.parametrize("value", [2**64, 2**70, -(2**63) - 1])
def test_int_outside_msgpack_range(value: int) -> None:
    # msgpack itself cannot carry these; the encoder must still say BAD_VALUE.
    with pytest.raises(ProtocolError) as ei:
        encode_request("SET_FEATURES", features=value)
    assert ei.value.code == ErrorCode.BAD_VALUE


def test_int_boundaries_accepted() -> None:
    for value in (0, 1, 2**32, 2**63, 2**64 - 1):
        r = decode_request(raw(req("SET_FEATURES", features=value)))
        assert r["features"] == value


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (ErrorCode.BAD_STATE, "§3.1.1: DRIVER_OK before FEATURES_OK"),
        (ErrorCode.BAD_ADDRESS, "ring outside region"),
        (ErrorCode.DEVICE_ERROR, ""),
        ("SOMETHING_NEW", "unicode ✓"),
    ],
)
def test_error_reply(code: str, message: str) -> None:
    data = encode_error(code, message)
    assert msgpack.unpackb(data, raw=False) == {
        "v": PROTOCOL_VERSION,
        "ok": False,
        "error": code,
        "message": message,
    }
    with pytest.raises(RemoteError) as ei:
        decode_reply(data)
    assert ei.value.code == code and ei.value.message == message
    assert isinstance(ei.value, ProtocolError)


@pytest.mark.parametrize("ok", ["missing", 1, 0, "true", None])
def test_reply_without_boolean_ok(ok: Any) -> None:
    obj: dict[str, Any] = {"v": PROTOCOL_VERSION, "base": 3}
    if ok != "missing":
        obj["ok"] = ok
    with pytest.raises(ProtocolError) as ei:
        decode_reply(raw(obj))
    assert ei.value.code == ErrorCode.MALFORMED
    assert not isinstance(ei.value, RemoteError)


def test_reply_not_msgpack_or_not_map() -> None:
    for data in (b"\xc1", raw([1]), raw("ok")):
        with pytest.raises(ProtocolError) as ei:
            decode_reply(data)
        assert ei.value.code == ErrorCode.MALFORMED
