"""The vhost-user wire format (sans-IO): round trips, every malformed case, address
translation bounds."""

from __future__ import annotations

import struct

import pytest

from vdev.virtio.errors import AddressError, ProtocolError
from vdev.virtio.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_PAYLOAD,
    VERSION,
    VRING_NOFD,
    ConfigPayload,
    ErrorCode,
    MemoryRegion,
    MemoryTable,
    Req,
    UserAddressMap,
    VringAddr,
    VringState,
    decode_header,
    decode_payload,
    decode_reply,
    encode,
    expected_fds,
    vring_file,
)

pytestmark = pytest.mark.timeout(30)

R0 = MemoryRegion(0x0, 0x10000, 0x7F00_0000_0000, 0)
R1 = MemoryRegion(0x10000, 0x10000, 0x7F10_0000_0000, 0x1000)


def _split(msg: bytes) -> tuple[object, bytes]:
    return decode_header(msg[:HEADER_SIZE]), msg[HEADER_SIZE:]


def _request(msg: bytes) -> object:
    hdr, body = _split(msg)
    return decode_payload(hdr, body)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("req", "payload"),
    [
        (Req.GET_FEATURES, None),
        (Req.SET_FEATURES, (1 << 32) | (1 << 30)),
        (Req.SET_OWNER, None),
        (Req.SET_VRING_NUM, VringState(1, 256)),
        (Req.SET_VRING_BASE, VringState(0, 65535)),
        (Req.GET_VRING_BASE, VringState(0, 0)),
        (Req.SET_VRING_ADDR, VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)),
        (Req.SET_VRING_KICK, 1 | VRING_NOFD),
        (Req.SET_VRING_ENABLE, VringState(0, 1)),
        (Req.SET_MEM_TABLE, MemoryTable((R0, R1))),
        (Req.GET_CONFIG, ConfigPayload(0, 60, 0, bytes(60))),
        (Req.SET_CONFIG, ConfigPayload(4, 2, 0, b"\x01\x02")),
        (Req.RESET_DEVICE, None),
    ],
)
def test_request_round_trip(req: Req, payload: object) -> None:
    msg = encode(req, payload, need_reply=True)  # type: ignore[arg-type]
    hdr, body = _split(msg)
    assert hdr.request == req and hdr.need_reply and not hdr.is_reply  # type: ignore[attr-defined]
    assert hdr.size == len(body)  # type: ignore[attr-defined]
    assert decode_payload(hdr, body) == payload  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("req", "payload"),
    [
        (Req.GET_FEATURES, 0x1234),
        (Req.GET_VRING_BASE, VringState(0, 7)),
        (Req.GET_CONFIG, ConfigPayload(0, 3, 0, b"abc")),
        (Req.SET_MEM_TABLE, 0),  # REPLY_ACK
    ],
)
def test_reply_round_trip(req: Req, payload: object) -> None:
    msg = encode(req, payload, reply=True)  # type: ignore[arg-type]
    hdr = decode_header(msg[:HEADER_SIZE], reply=True)
    assert hdr.flags == VERSION | FLAG_REPLY
    assert decode_reply(req, hdr, msg[HEADER_SIZE:]) == payload


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b"\x01" * 11, "header is 11 bytes"),
        (struct.pack("<III", 1, 0, 0), "version 0"),
        (struct.pack("<III", 1, 2, 0), "version 2"),
        (struct.pack("<III", 1, VERSION | 0x10, 0), "unknown flag bits"),
        (struct.pack("<III", 1, VERSION | FLAG_REPLY, 0), "REPLY flag set on a request"),
        (struct.pack("<III", 5, VERSION, MAX_PAYLOAD + 1), "exceeds"),
        (b"\xff" * 12, "version 3"),
    ],
)
def test_bad_headers(header: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError) as ei:
        decode_header(header)
    assert ei.value.code == ErrorCode.MALFORMED and fragment in ei.value.message


def test_reply_header_must_say_reply() -> None:
    with pytest.raises(ProtocolError, match="missing on a reply"):
        decode_header(encode(Req.GET_FEATURES), reply=True)


def _raw(req: int, body: bytes, flags: int = VERSION) -> bytes:
    return struct.pack("<III", req, flags, len(body)) + body


@pytest.mark.parametrize(
    ("msg", "code", "fragment"),
    [
        (_raw(Req.SET_FEATURES, b"\0" * 4), ErrorCode.MALFORMED, "4 bytes, a u64 is 8"),
        (_raw(Req.SET_FEATURES, b"\0" * 12), ErrorCode.MALFORMED, "12 bytes, a u64 is 8"),
        (_raw(Req.GET_FEATURES, b"\0" * 8), ErrorCode.MALFORMED, "8 bytes, a none is 0"),
        (_raw(Req.SET_VRING_NUM, b"\0" * 4), ErrorCode.MALFORMED, "a state is 8"),
        (_raw(Req.SET_VRING_ADDR, b"\0" * 36), ErrorCode.MALFORMED, "a addr is 40"),
        (_raw(Req.SET_MEM_TABLE, b"\0" * 4), ErrorCode.MALFORMED, "no region count"),
        (_raw(Req.SET_MEM_TABLE, struct.pack("<II", 0, 0)), ErrorCode.MALFORMED, "0 regions"),
        (_raw(Req.SET_MEM_TABLE, struct.pack("<II", 9, 0)), ErrorCode.MALFORMED, "9 regions"),
        (
            _raw(Req.SET_MEM_TABLE, struct.pack("<II", 2, 0) + b"\0" * 32),
            ErrorCode.MALFORMED,
            "2 regions need 72 bytes, got 40",
        ),
        (
            _raw(Req.SET_MEM_TABLE, struct.pack("<II", 1, 0) + b"\0" * 64),
            ErrorCode.MALFORMED,
            "1 regions need 40 bytes, got 72",
        ),
        (_raw(Req.GET_CONFIG, b"\0" * 8), ErrorCode.MALFORMED, "no config header"),
        (
            _raw(Req.GET_CONFIG, struct.pack("<III", 0, 10, 0) + b"\0" * 4),
            ErrorCode.MALFORMED,
            "config size 10 but 4 payload bytes",
        ),
        (
            _raw(Req.GET_CONFIG, struct.pack("<III", 0, MAX_CONFIG_SIZE + 1, 0)),
            ErrorCode.MALFORMED,
            "exceeds 256",
        ),
        (
            _raw(Req.GET_CONFIG, struct.pack("<III", 250, 10, 0) + b"\0" * 10),
            ErrorCode.BAD_VALUE,
            "beyond 256",
        ),
        (_raw(200, b""), ErrorCode.UNKNOWN_MESSAGE, "unknown request 200"),
        (_raw(Req.SET_LOG_BASE, b"\0" * 8), ErrorCode.UNKNOWN_MESSAGE, "not implemented"),
    ],
)
def test_bad_payloads(msg: bytes, code: str, fragment: str) -> None:
    with pytest.raises(ProtocolError) as ei:
        _request(msg)
    assert ei.value.code == code and fragment in ei.value.message, ei.value.message


def test_payload_length_must_match_header() -> None:
    hdr = decode_header(struct.pack("<III", Req.SET_FEATURES, VERSION, 8))
    with pytest.raises(ProtocolError, match="header says 8 payload bytes, got 7"):
        decode_payload(hdr, b"\0" * 7)


def test_reply_for_another_request_is_rejected() -> None:
    msg = encode(Req.GET_FEATURES, 1, reply=True)
    hdr = decode_header(msg[:HEADER_SIZE], reply=True)
    with pytest.raises(ProtocolError, match="expected GET_PROTOCOL_FEATURES"):
        decode_reply(Req.GET_PROTOCOL_FEATURES, hdr, msg[HEADER_SIZE:])


def test_need_reply_flag() -> None:
    hdr = decode_header(encode(Req.SET_OWNER, need_reply=True)[:HEADER_SIZE])
    assert hdr.flags == VERSION | FLAG_NEED_REPLY and hdr.need_reply


def test_encode_refuses_bad_payloads() -> None:
    with pytest.raises(ProtocolError):
        encode(Req.SET_FEATURES, 1 << 64)
    with pytest.raises(ProtocolError):
        encode(Req.SET_VRING_NUM, 5)
    with pytest.raises(ProtocolError):
        encode(Req.SET_MEM_TABLE, MemoryTable(()))
    with pytest.raises(ProtocolError):
        encode(Req.GET_CONFIG, ConfigPayload(0, 5, 0, b"abc"))


def test_vring_file_and_fd_counts() -> None:
    assert vring_file(3) == (3, True)
    assert vring_file(3 | VRING_NOFD) == (3, False)
    with pytest.raises(ProtocolError, match="reserved bits"):
        vring_file(1 << 9)
    assert expected_fds(Req.SET_VRING_CALL, 0) == 1
    assert expected_fds(Req.SET_VRING_KICK, VRING_NOFD) == 0
    assert expected_fds(Req.SET_MEM_TABLE, MemoryTable((R0, R1))) == 2
    assert expected_fds(Req.SET_FEATURES, 0) == 0


def test_user_address_translation() -> None:
    m = UserAddressMap((R0, R1))
    assert m.to_guest(R0.userspace_addr, 16) == 0
    assert m.to_guest(R1.userspace_addr + 0x100, 0x100) == 0x10100
    assert m.to_guest(R1.userspace_addr + 0xFFF0, 0x10) == 0x1FFF0  # last bytes
    for uaddr, n in (
        (R1.userspace_addr + 0xFFF0, 0x11),  # one byte past the end
        (R0.userspace_addr - 1, 2),  # starts before
        (0x1000, 1),  # nowhere
        (R0.userspace_addr, -1),
    ):
        with pytest.raises(AddressError):
            m.to_guest(uaddr, n)


@pytest.mark.parametrize(
    ("regions", "fragment"),
    [
        ((), "0 memory regions"),
        ((R0,) * 9, "9 memory regions"),
        ((MemoryRegion(0, 0, 0x1000, 0),), "empty"),
        ((MemoryRegion((1 << 64) - 0x10, 0x20, 0, 0),), "overflows 64 bits"),
        ((MemoryRegion(0, 0x20, (1 << 64) - 0x10, 0),), "overflows 64 bits"),
        ((R0, MemoryRegion(0x8000, 0x1000, 0x1000, 0)), "overlap in guest_phys_addr"),
        ((R0, MemoryRegion(0x20000, 0x1000, R0.userspace_addr + 8, 0)), "overlap in userspace"),
    ],
)
def test_bad_memory_tables(regions: tuple[MemoryRegion, ...], fragment: str) -> None:
    with pytest.raises(ProtocolError) as ei:
        UserAddressMap(regions)
    assert fragment in ei.value.message
