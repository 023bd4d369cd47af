"""The control channel's messages and their one codec (msgpack).

The vocabulary mirrors vhost-user (QEMU ``docs/interop/vhost-user.rst``); the framing is
ours. Every message is one msgpack map:

* request: ``{"v": PROTOCOL_VERSION, "type": "SET_VRING_NUM", "index": 0, "num": 128}``
* reply:   ``{"v": PROTOCOL_VERSION, "ok": True, ...reply fields}``
* error:   ``{"v": PROTOCOL_VERSION, "ok": False, "error": CODE, "message": "..."}``

:data:`REQUESTS` is the schema: for each message type, its request fields and their
types, and the fields its reply carries. :func:`decode_request` checks a request against
it and raises :class:`ProtocolError` naming the problem (the receiver turns that into an
error reply and keeps serving); :func:`decode_reply` raises :class:`RemoteError` when
the peer answered with an error, and :func:`check_reply` checks a success reply's fields
against :data:`REPLY_TYPES` the same way (the kernel never trusts a reply's shape).

Session order (checked by the device, see :mod:`vdev.device`): GET_DEVICE_INFO and
GET_FEATURES at any time; SET_FEATURES before FEATURES_OK; SET_MEM_TABLE, then per queue
SET_VRING_NUM → SET_VRING_ADDR → SET_VRING_BASE → SET_VRING_KICK / SET_VRING_CALL →
SET_VRING_ENABLE; DRIVER_OK after FEATURES_OK. RESET_DEVICE (or SET_STATUS 0) returns to
the start. GET_VRING_BASE stops the ring and returns the next available index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "CONFIG_CHANGE",
    "REQUESTS",
    "ErrorCode",
    "Request",
    "RemoteError",
    "REPLY_TYPES",
    "OPTIONAL_REPLY_TYPES",
    "check_reply",
    "encode_request",
    "decode_request",
    "encode_reply",
    "encode_error",
    "decode_reply",
]

PROTOCOL_VERSION = 1

#: A call doorbell with this "queue index" means: device status or config changed
#: (e.g. DEVICE_NEEDS_RESET was set); the driver should GET_STATUS.
CONFIG_CHANGE = 0xFFFF


class ErrorCode:
    """Error codes carried in error replies."""

    MALFORMED = "MALFORMED"  # not a msgpack map
    BAD_VERSION = "BAD_VERSION"  # "v" missing or not ours
    UNKNOWN_MESSAGE = "UNKNOWN_MESSAGE"  # "type" not in the schema
    BAD_FIELD = "BAD_FIELD"  # a field missing, unexpected, or of the wrong type
    BAD_VALUE = "BAD_VALUE"  # well-typed but out of range (queue index, size, ...)
    BAD_ADDRESS = "BAD_ADDRESS"  # a ring or region outside shared memory
    BAD_STATE = "BAD_STATE"  # not allowed now (out of order)
    DEVICE_ERROR = "DEVICE_ERROR"  # the device failed to do something valid


# Field types: int (never bool), bool, str, bytes, list (of maps, checked by the handler).
_MemRegion = list

#: message type -> (request fields {name: type}, reply fields)
REQUESTS: dict[str, tuple[dict[str, type], tuple[str, ...]]] = {
    "GET_DEVICE_INFO": ({}, ("device_id", "num_queues", "max_queue_size", "name")),
    "GET_FEATURES": ({}, ("features",)),
    "SET_FEATURES": ({"features": int}, ()),
    "GET_CONFIG": ({"offset": int, "size": int}, ("data",)),
    "SET_CONFIG": ({"offset": int, "data": bytes}, ()),
    # regions: [{"guest_addr": int, "size": int, "shm": str}]
    "SET_MEM_TABLE": ({"regions": _MemRegion}, ()),
    "SET_VRING_NUM": ({"index": int, "num": int}, ()),
    "SET_VRING_ADDR": ({"index": int, "desc": int, "avail": int, "used": int}, ()),
    "SET_VRING_BASE": ({"index": int, "base": int}, ()),
    "GET_VRING_BASE": ({"index": int}, ("base",)),
    "SET_VRING_KICK": ({"index": int, "endpoint": str}, ()),
    "SET_VRING_CALL": ({"index": int, "endpoint": str}, ()),
    "SET_VRING_ENABLE": ({"index": int, "enable": bool}, ()),
    "SET_STATUS": ({"status": int}, ()),
    "GET_STATUS": ({}, ("status",)),
    "RESET_DEVICE": ({}, ()),
    # Ours, not vhost-user's: the device's counters (device and per queue).
    "GET_METRICS": ({}, ("device", "queues")),
}

#: The types of the reply fields named in :data:`REQUESTS` (the kernel checks every
#: reply against them with :func:`check_reply`, as the device checks requests). A reply
#: field named in :data:`REQUESTS` but not typed here is only checked to be present.
REPLY_TYPES: dict[str, dict[str, type]] = {
    "GET_DEVICE_INFO": {"device_id": int, "num_queues": int, "max_queue_size": int, "name": str},
    "GET_FEATURES": {"features": int},
    "GET_CONFIG": {"data": bytes},
    "GET_VRING_BASE": {"base": int},
    "GET_STATUS": {"status": int},
    "GET_METRICS": {"device": dict, "queues": list},
}

#: Reply fields a device *may* send (newer or optional parts of the protocol), typed: a
#: reply without them is fine, one with a mistyped value is not. GET_DEVICE_INFO's
#: ``pid`` is the device process's own pid (an attachable device sends it: a kernel
#: that did not start the process cannot learn it otherwise).
OPTIONAL_REPLY_TYPES: dict[str, dict[str, type]] = {
    "GET_DEVICE_INFO": {"pid": int, "attached_pid": int},
}

_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded, schema-checked request."""

    type: str
    fields: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


class RemoteError(ProtocolError):
    """The peer answered a request with an error reply (``code``, ``message``)."""


def _pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(ErrorCode.MALFORMED, f"not a msgpack message: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.MALFORMED, f"message is a {type(obj).__name__}, not a map")
    return obj


def _check_version(obj: dict[str, Any]) -> None:
    v = obj.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:  # not 1.0, not True
        raise ProtocolError(
            ErrorCode.BAD_VERSION, f"protocol version {v!r}, this side speaks {PROTOCOL_VERSION}"
        )


def _check_type(name: str, value: Any, want: type) -> None:
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if not ok:
        raise ProtocolError(
            ErrorCode.BAD_FIELD, f"field {name!r} is {type(value).__name__}, want {want.__name__}"
        )
    if want is int and not 0 <= value <= _U64:
        raise ProtocolError(ErrorCode.BAD_VALUE, f"field {name!r} = {value} is not a u64")


def encode_request(type_: str, **fields: Any) -> bytes:
    """Encode a request; checks it against the schema first (``ProtocolError``)."""
    obj = {"v": PROTOCOL_VERSION, "type": type_, **fields}
    try:
        data = _pack(obj)
    except OverflowError:  # msgpack cannot carry ints outside [-2**63, 2**64)
        raise ProtocolError(ErrorCode.BAD_VALUE, f"{type_}: an integer is not a u64") from None
    decode_request(data)  # one checker for both directions
    return data


def decode_request(data: bytes) -> Request:
    """Decode and schema-check a request; ``ProtocolError`` names what is wrong."""
    obj = _unpack(data)
    _check_version(obj)
    type_ = obj.get("type")
    if not isinstance(type_, str) or type_ not in REQUESTS:
        raise ProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"unknown message type {type_!r}")
    schema, _ = REQUESTS[type_]
    fields = {k: v for k, v in obj.items() if k not in ("v", "type")}
    for name, want in schema.items():
        if name not in fields:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{type_}: field {name!r} is missing")
        _check_type(name, fields[name], want)
    extra = sorted(set(fields) - set(schema), key=repr)  # keys may be str and bytes
    if extra:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{type_}: unexpected field(s) {extra}")
    return Request(type_, fields)


def check_reply(type_: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Check the fields of a success reply to a ``type_`` request against the schema
    (:data:`REQUESTS` names them, :data:`REPLY_TYPES` types them: ints are u64 and never
    bool; an optional field of :data:`OPTIONAL_REPLY_TYPES`, when present, is typed the
    same way). Returns ``fields``; raises :class:`ProtocolError` (``BAD_FIELD`` /
    ``BAD_VALUE``) naming the message and the field. Fields the schema does not name
    are ignored (a newer device may say more); an unknown ``type_`` is
    ``ProtocolError(UNKNOWN_MESSAGE)``."""
    entry = REQUESTS.get(type_)
    if entry is None:
        raise ProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"no reply schema for {type_!r}")
    types = REPLY_TYPES.get(type_, {})
    for name in entry[1]:
        if name not in fields:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{type_} reply: field {name!r} is missing")
        want = types.get(name)
        if want is not None:
            try:
                _check_type(name, fields[name], want)
            except ProtocolError as e:
                raise ProtocolError(e.code, f"{type_} reply: {e.message}") from None
    for name, want in OPTIONAL_REPLY_TYPES.get(type_, {}).items():
        if name in fields:
            try:
                _check_type(name, fields[name], want)
            except ProtocolError as e:
                raise ProtocolError(e.code, f"{type_} reply: {e.message}") from None
    return fields


def encode_reply(**fields: Any) -> bytes:
    """Encode a success reply."""
    return _pack({"v": PROTOCOL_VERSION, "ok": True, **fields})


def encode_error(code: str, message: str) -> bytes:
    """Encode an error reply."""
    return _pack({"v": PROTOCOL_VERSION, "ok": False, "error": code, "message": message})


def decode_reply(data: bytes) -> dict[str, Any]:
    """Decode a reply: its fields on success; :class:`RemoteError` for an error reply;
    ``ProtocolError`` if the reply itself is malformed."""
    obj = _unpack(data)
    _check_version(obj)
    ok = obj.get("ok")
    if ok is True:
        return {k: v for k, v in obj.items() if k not in ("v", "ok")}
    if ok is False:
        raise RemoteError(str(obj.get("error", "?")), str(obj.get("message", "")))
    raise ProtocolError(ErrorCode.MALFORMED, "reply has no boolean 'ok'")
