"""The vhost-user wire format, sans-IO (QEMU ``docs/interop/vhost-user.rst``).

Theory of operation
-------------------
A vhost-user session is a Unix stream socket between a *front-end* (QEMU, or a test)
and a *back-end* (our device). Every message is a 12-byte header followed by ``size``
payload bytes, all little-endian on x86 hosts ("Message Specification")::

    u32 request; u32 flags; u32 size; u8 payload[size]

``flags`` carries the protocol version in its two low bits (always 1), ``REPLY`` (0x4)
on replies and ``NEED_REPLY`` (0x8) when the front-end wants an acknowledgement of a
request that has no reply of its own (REPLY_ACK). File descriptors travel beside the
bytes as ``SCM_RIGHTS`` ancillary data; this module never sees them, it only says how
many a request must carry (:func:`expected_fds`).

This module turns bytes into small frozen dataclasses and back. Every length is checked
against the request's payload layout before a byte is read: a short, oversized or
inconsistent payload raises :class:`~vdev.virtio.errors.ProtocolError` naming the
request and the problem, and nothing else happens (the caller closes the connection).
The payload is bounded by :data:`MAX_PAYLOAD` so a reader never allocates more than
that on a peer's say-so.

================  ===================================================================
payload kind      layout
================  ===================================================================
``u64``           ``u64``
vring state       ``u32 index; u32 num``
vring address     ``u32 index; u32 flags; u64 desc; u64 used; u64 avail; u64 log``
memory table      ``u32 nregions; u32 padding;`` then ``nregions`` (≤ 8) × ``u64
                  guest_phys_addr; u64 memory_size; u64 userspace_addr; u64 mmap_offset``
config            ``u32 offset; u32 size; u32 flags; u8 payload[size]`` (size ≤ 256)
================  ===================================================================

Addresses. The memory table gives, per region, its guest-physical address, its size,
the front-end's *user* (virtual) address of it and the offset of the region in the
passed fd. Descriptors carry guest-physical addresses; ``SET_VRING_ADDR`` carries
front-end *user* addresses ("Memory regions" / "Vring address description").
:class:`UserAddressMap` translates the latter to the former, with bounds checks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from .errors import AddressError, ProtocolError

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "MAX_REGIONS",
    "MAX_CONFIG_SIZE",
    "VERSION",
    "VERSION_MASK",
    "FLAG_REPLY",
    "FLAG_NEED_REPLY",
    "VRING_INDEX_MASK",
    "VRING_NOFD",
    "VRING_F_LOG",
    "F_PROTOCOL_FEATURES",
    "ErrorCode",
    "Req",
    "ProtocolFeature",
    "Header",
    "VringState",
    "VringAddr",
    "MemoryRegion",
    "MemoryTable",
    "ConfigPayload",
    "Payload",
    "PAYLOAD_KIND",
    "REPLY_KIND",
    "encode",
    "encode_header",
    "decode_header",
    "decode_payload",
    "decode_reply",
    "expected_fds",
    "vring_file",
    "UserAddressMap",
]

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size  # 12
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_MEM_HDR = struct.Struct("<II")
_REGION = struct.Struct("<QQQQ")
_CONFIG_HDR = struct.Struct("<III")

MAX_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS ("Memory region description")
MAX_CONFIG_SIZE = 256  # VHOST_USER_MAX_CONFIG_SIZE ("Device configuration space")
#: The largest payload any request we know can carry (a full memory table / config).
MAX_PAYLOAD = max(_MEM_HDR.size + MAX_REGIONS * _REGION.size, _CONFIG_HDR.size + MAX_CONFIG_SIZE)

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
_KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

VRING_INDEX_MASK = 0xFF  # low byte of a SET_VRING_KICK/CALL/ERR u64: the ring index
VRING_NOFD = 0x100  # bit 8: no fd passed (polling mode / no notification)
VRING_F_LOG = 0x1  # SET_VRING_ADDR flags: log_guest_addr is valid (dirty logging)

#: Feature bit 30 of GET_FEATURES: the back-end speaks GET/SET_PROTOCOL_FEATURES.
F_PROTOCOL_FEATURES = 30


class ErrorCode:
    """Codes carried by the ProtocolErrors this module raises."""

    MALFORMED = "MALFORMED"  # header or payload does not have the required shape
    UNKNOWN_MESSAGE = "UNKNOWN_MESSAGE"  # request code we do not implement
    BAD_VALUE = "BAD_VALUE"  # well-formed but out of range
    BAD_ADDRESS = "BAD_ADDRESS"  # an address outside every memory region


class Req(IntEnum):
    """Front-end request codes ("Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(IntEnum):
    """Protocol feature bits of GET/SET_PROTOCOL_FEATURES ("Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte message header."""

    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        """The front-end asked for an acknowledgement (REPLY_ACK)."""
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        """This is a reply (back-end → front-end)."""
        return bool(self.flags & FLAG_REPLY)

    @property
    def name(self) -> str:
        """The request's name, or its number when unknown."""
        try:
            return Req(self.request).name
        except ValueError:
            return f"request {self.request}"


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state``: a ring index and a number (size, base, enable)."""

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr``: the ring's parts as front-end *user* addresses."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One region of SET_MEM_TABLE; its fd travels as ancillary data."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """SET_MEM_TABLE's payload: 1..8 regions, one fd each, in this order."""

    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True, slots=True)
class ConfigPayload:
    """GET_CONFIG / SET_CONFIG: ``size`` bytes of config space at ``offset``. In a
    GET_CONFIG request ``data`` is zeros of the requested size (QEMU sends them)."""

    offset: int
    size: int
    flags: int
    data: bytes


Payload = None | int | VringState | VringAddr | MemoryTable | ConfigPayload

# Payload kinds: "none", "u64", "state", "addr", "mem", "config".
#: The payload each request carries (front-end → back-end).
PAYLOAD_KIND: dict[Req, str] = {
    Req.GET_FEATURES: "none",
    Req.SET_FEATURES: "u64",
    Req.SET_OWNER: "none",
    Req.RESET_OWNER: "none",
    Req.SET_MEM_TABLE: "mem",
    Req.SET_VRING_NUM: "state",
    Req.SET_VRING_ADDR: "addr",
    Req.SET_VRING_BASE: "state",
    Req.GET_VRING_BASE: "state",
    Req.SET_VRING_KICK: "u64",
    Req.SET_VRING_CALL: "u64",
    Req.SET_VRING_ERR: "u64",
    Req.GET_PROTOCOL_FEATURES: "none",
    Req.SET_PROTOCOL_FEATURES: "u64",
    Req.GET_QUEUE_NUM: "none",
    Req.SET_VRING_ENABLE: "state",
    Req.NET_SET_MTU: "u64",
    Req.GET_CONFIG: "config",
    Req.SET_CONFIG: "config",
    Req.RESET_DEVICE: "none",
    Req.SET_STATUS: "u64",
    Req.GET_STATUS: "none",
}

#: The reply payload of requests that have a reply of their own (the others are
#: answered only with a REPLY_ACK u64, and only when NEED_REPLY asks for one).
REPLY_KIND: dict[Req, str] = {
    Req.GET_FEATURES: "u64",
    Req.GET_PROTOCOL_FEATURES: "u64",
    Req.GET_VRING_BASE: "state",
    Req.GET_QUEUE_NUM: "u64",
    Req.GET_CONFIG: "config",
    Req.GET_STATUS: "u64",
}

_FIXED_SIZE = {"none": 0, "u64": _U64.size, "state": _STATE.size, "addr": _ADDR.size}


def _err(code: str, what: str) -> ProtocolError:
    return ProtocolError(code, what)


def encode_header(request: int, flags: int, size: int) -> bytes:
    """The 12 header bytes."""
    return HEADER.pack(request, flags, size)


def decode_header(data: bytes | memoryview, *, reply: bool = False) -> Header:
    """Parse and check a header ("Message Specification"): 12 bytes, version 1, no
    unknown flag bits, ``REPLY`` set exactly when ``reply``, ``size`` ≤ MAX_PAYLOAD."""
    if len(data) != HEADER_SIZE:
        raise _err(ErrorCode.MALFORMED, f"header is {len(data)} bytes, not {HEADER_SIZE}")
    request, flags, size = HEADER.unpack(data)
    hdr = Header(request, flags, size)
    if flags & VERSION_MASK != VERSION:
        raise _err(
            ErrorCode.MALFORMED, f"{hdr.name}: version {flags & VERSION_MASK}, only 1 exists"
        )
    if flags & ~_KNOWN_FLAGS:
        raise _err(ErrorCode.MALFORMED, f"{hdr.name}: unknown flag bits {flags & ~_KNOWN_FLAGS:#x}")
    if bool(flags & FLAG_REPLY) != reply:
        raise _err(
            ErrorCode.MALFORMED,
            f"{hdr.name}: REPLY flag {'missing on a reply' if reply else 'set on a request'}",
        )
    if size > MAX_PAYLOAD:
        raise _err(
            ErrorCode.MALFORMED, f"{hdr.name}: payload of {size} bytes exceeds {MAX_PAYLOAD}"
        )
    return hdr


def _encode_payload(kind: str, payload: Payload, what: str) -> bytes:
    if kind == "none":
        if payload is not None:
            raise _err(ErrorCode.BAD_VALUE, f"{what} carries no payload")
        return b""
    if kind == "u64":
        if not isinstance(payload, int) or not 0 <= payload < 1 << 64:
            raise _err(ErrorCode.BAD_VALUE, f"{what}: {payload!r} is not a u64")
        return _U64.pack(payload)
    if kind == "state" and isinstance(payload, VringState):
        return _STATE.pack(payload.index, payload.num)
    if kind == "addr" and isinstance(payload, VringAddr):
        a = payload
        return _ADDR.pack(a.index, a.flags, a.desc, a.used, a.avail, a.log)
    if kind == "mem" and isinstance(payload, MemoryTable):
        regions = payload.regions
        if not 1 <= len(regions) <= MAX_REGIONS:
            raise _err(ErrorCode.BAD_VALUE, f"{what}: {len(regions)} regions, want 1..8")
        out = bytearray(_MEM_HDR.pack(len(regions), 0))
        for r in regions:
            out += _REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        return bytes(out)
    if kind == "config" and isinstance(payload, ConfigPayload):
        c = payload
        if len(c.data) != c.size or c.size > MAX_CONFIG_SIZE:
            raise _err(ErrorCode.BAD_VALUE, f"{what}: config data/size mismatch")
        return _CONFIG_HDR.pack(c.offset, c.size, c.flags) + bytes(c.data)
    raise _err(ErrorCode.BAD_VALUE, f"{what}: payload {payload!r} is not a {kind}")


def encode(
    request: int,
    payload: Payload = None,
    *,
    reply: bool = False,
    need_reply: bool = False,
    kind: str | None = None,
) -> bytes:
    """One whole message (header + payload) for ``request``.

    The payload kind is the request's (:data:`PAYLOAD_KIND`) or, with ``reply``, its
    reply's (:data:`REPLY_KIND`, or ``u64`` for a REPLY_ACK); ``kind`` overrides that
    (e.g. to build a deliberately malformed message in a test).
    """
    req = Req(request) if request in Req._value2member_map_ else None
    what = req.name if req is not None else f"request {request}"
    if kind is None:
        if req is None:
            raise _err(ErrorCode.UNKNOWN_MESSAGE, f"{what}: unknown, give kind=")
        kind = REPLY_KIND.get(req, "u64") if reply else PAYLOAD_KIND.get(req)
        if kind is None:
            raise _err(ErrorCode.UNKNOWN_MESSAGE, f"{what}: not implemented here")
    body = _encode_payload(kind, payload, what)
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(body)) + body


def _decode_kind(kind: str, data: bytes | memoryview, what: str) -> Payload:
    n = len(data)
    fixed = _FIXED_SIZE.get(kind)
    if fixed is not None and n != fixed:
        raise _err(ErrorCode.MALFORMED, f"{what}: payload is {n} bytes, a {kind} is {fixed}")
    if kind == "none":
        return None
    if kind == "u64":
        return int(_U64.unpack(data)[0])
    if kind == "state":
        return VringState(*_STATE.unpack(data))
    if kind == "addr":
        return VringAddr(*_ADDR.unpack(data))
    if kind == "mem":
        if n < _MEM_HDR.size:
            raise _err(ErrorCode.MALFORMED, f"{what}: payload of {n} bytes has no region count")
        count, _padding = _MEM_HDR.unpack_from(data)
        if not 1 <= count <= MAX_REGIONS:
            raise _err(ErrorCode.MALFORMED, f"{what}: {count} regions, want 1..{MAX_REGIONS}")
        want = _MEM_HDR.size + count * _REGION.size
        if n != want:
            raise _err(ErrorCode.MALFORMED, f"{what}: {count} regions need {want} bytes, got {n}")
        regions = tuple(
            MemoryRegion(*_REGION.unpack_from(data, _MEM_HDR.size + i * _REGION.size))
            for i in range(count)
        )
        return MemoryTable(regions)
    if kind == "config":
        if n < _CONFIG_HDR.size:
            raise _err(ErrorCode.MALFORMED, f"{what}: payload of {n} bytes has no config header")
        offset, size, flags = _CONFIG_HDR.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise _err(ErrorCode.MALFORMED, f"{what}: config size {size} exceeds {MAX_CONFIG_SIZE}")
        if n != _CONFIG_HDR.size + size:
            raise _err(
                ErrorCode.MALFORMED,
                f"{what}: config size {size} but {n - _CONFIG_HDR.size} payload bytes",
            )
        if offset + size > MAX_CONFIG_SIZE:
            raise _err(
                ErrorCode.BAD_VALUE,
                f"{what}: config range [{offset}, +{size}) beyond {MAX_CONFIG_SIZE} bytes",
            )
        return ConfigPayload(offset, size, flags, bytes(data[_CONFIG_HDR.size :]))
    raise _err(ErrorCode.MALFORMED, f"{what}: unknown payload kind {kind!r}")


def decode_payload(header: Header, data: bytes | memoryview) -> Payload:
    """The payload of a *request*, checked against ``header`` and the request's layout.
    Unknown or unimplemented requests raise UNKNOWN_MESSAGE."""
    if len(data) != header.size:
        raise _err(
            ErrorCode.MALFORMED,
            f"{header.name}: header says {header.size} payload bytes, got {len(data)}",
        )
    try:
        req = Req(header.request)
    except ValueError:
        raise _err(ErrorCode.UNKNOWN_MESSAGE, f"unknown request {header.request}") from None
    kind = PAYLOAD_KIND.get(req)
    if kind is None:
        raise _err(ErrorCode.UNKNOWN_MESSAGE, f"{req.name} is not implemented")
    return _decode_kind(kind, data, req.name)


def decode_reply(request: int, header: Header, data: bytes | memoryview) -> Payload:
    """The payload of a reply to ``request`` (for front-ends and tests): its own reply
    kind, or a REPLY_ACK u64 for requests that have none."""
    if header.request != request:
        raise _err(ErrorCode.MALFORMED, f"reply is for {header.name}, expected {Req(request).name}")
    if len(data) != header.size:
        raise _err(
            ErrorCode.MALFORMED,
            f"{header.name} reply: header says {header.size} bytes, got {len(data)}",
        )
    kind = REPLY_KIND.get(Req(request), "u64")
    return _decode_kind(kind, data, f"{header.name} reply")


def vring_file(value: int, what: str = "SET_VRING_FILE") -> tuple[int, bool]:
    """Split the u64 of SET_VRING_KICK/CALL/ERR into ``(index, has_fd)``: bits 0-7 are
    the ring index, bit 8 says "no fd"; every other bit must be clear."""
    if value & ~(VRING_INDEX_MASK | VRING_NOFD):
        raise _err(ErrorCode.MALFORMED, f"{what}: reserved bits set in {value:#x}")
    return value & VRING_INDEX_MASK, not value & VRING_NOFD


def expected_fds(request: int, payload: Payload) -> int:
    """How many fds must arrive with ``request`` ("Message types": SET_MEM_TABLE one per
    region; SET_VRING_KICK/CALL/ERR one unless bit 8 is set; every other one none)."""
    if request == Req.SET_MEM_TABLE and isinstance(payload, MemoryTable):
        return len(payload.regions)
    if request in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
        assert isinstance(payload, int)
        return 0 if payload & VRING_NOFD else 1
    return 0


class UserAddressMap:
    """Translate front-end user addresses to guest-physical ones via the memory table.

    Every region's ranges are checked on construction: non-empty, no 64-bit overflow,
    no two regions overlapping in guest-physical or in user address space.
    :meth:`to_guest` raises :class:`AddressError` unless ``[uaddr, uaddr+length)`` lies
    inside one region.
    """

    __slots__ = ("regions",)

    def __init__(self, regions: tuple[MemoryRegion, ...] | list[MemoryRegion]) -> None:
        regs = tuple(regions)
        if not 1 <= len(regs) <= MAX_REGIONS:
            raise _err(ErrorCode.BAD_VALUE, f"{len(regs)} memory regions, want 1..{MAX_REGIONS}")
        limit = 1 << 64
        for i, r in enumerate(regs):
            if r.memory_size == 0:
                raise _err(ErrorCode.BAD_VALUE, f"memory region {i} is empty")
            for name, start in (
                ("guest_phys_addr", r.guest_phys_addr),
                ("userspace_addr", r.userspace_addr),
                ("mmap_offset", r.mmap_offset),
            ):
                if start + r.memory_size > limit:
                    raise _err(
                        ErrorCode.BAD_VALUE,
                        f"memory region {i}: {name} {start:#x} + size {r.memory_size:#x} "
                        "overflows 64 bits",
                    )
        for attr in ("guest_phys_addr", "userspace_addr"):
            spans = sorted((getattr(r, attr), r.memory_size) for r in regs)
            for (a0, n0), (a1, _) in zip(spans, spans[1:], strict=False):
                if a0 + n0 > a1:
                    raise _err(ErrorCode.BAD_VALUE, f"memory regions overlap in {attr} at {a1:#x}")
        self.regions = regs

    def to_guest(self, uaddr: int, length: int) -> int:
        """The guest-physical address of user address ``uaddr``, whose ``length`` bytes
        must all lie in one region."""
        if length < 0 or uaddr < 0:
            raise AddressError(f"bad range ({uaddr:#x}, {length})")
        for r in self.regions:
            off = uaddr - r.userspace_addr
            if 0 <= off and off + length <= r.memory_size:
                return r.guest_phys_addr + off
        raise AddressError(f"user range [{uaddr:#x}, +{length:#x}) is not inside one memory region")
