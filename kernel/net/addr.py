"""IPv4 and MAC addresses as the stack keeps them: addresses are ``int`` inside the stack
and dotted quads / ``aa:bb:..`` strings at its edges.

Parsing is strict (RFC 791 §3.2 addresses are 32 bits, written as four decimal octets):
no shorthand forms, no leading ``+``, no names.
"""

from __future__ import annotations

__all__ = [
    "ip_aton",
    "ip_ntoa",
    "ip_bytes",
    "parse_ip",
    "prefix_mask",
    "is_multicast",
    "is_zeronet",
    "is_loopback",
    "mac_str",
    "ANY",
    "LIMITED_BROADCAST",
    "BROADCAST_MAC",
    "ZERO_MAC",
]

#: 0.0.0.0 and 255.255.255.255 as ints.
ANY = 0
LIMITED_BROADCAST = 0xFFFFFFFF
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6


def parse_ip(text: str) -> int | None:
    """The address ``text`` names as an int, or None if it is not a dotted quad."""
    parts = text.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for p in parts:
        if not (p.isascii() and p.isdigit() and 1 <= len(p) <= 3):
            return None
        o = int(p)
        if o > 255:
            return None
        value = (value << 8) | o
    return value


def ip_aton(text: str) -> int:
    """A dotted quad as an int (ValueError naming it otherwise)."""
    v = parse_ip(text)
    if v is None:
        raise ValueError(f"{text!r} is not a dotted-quad IPv4 address")
    return v


def ip_ntoa(value: int) -> str:
    """An int address as a dotted quad."""
    return f"{value >> 24 & 255}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"


def ip_bytes(value: int) -> bytes:
    """An int address as 4 bytes, network order."""
    return value.to_bytes(4, "big")


def prefix_mask(prefix_len: int) -> int:
    """The netmask of a prefix length 0..32 as an int."""
    return (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF


def is_multicast(value: int) -> bool:
    """224.0.0.0/4 (RFC 1112 class D)."""
    return value >> 28 == 0xE


def is_zeronet(value: int) -> bool:
    """0.0.0.0/8: "this network", never a destination or a unicast source."""
    return value >> 24 == 0


def is_loopback(value: int) -> bool:
    """127.0.0.0/8."""
    return value >> 24 == 127


def mac_str(mac: bytes) -> str:
    """``aa:bb:cc:dd:ee:ff``."""
    return ":".join(f"{b:02x}" for b in mac)
