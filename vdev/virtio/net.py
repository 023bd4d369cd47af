"""virtio-net wire formats (§5.1), shared by the device and the driver.

Every frame on receiveq/transmitq is preceded by ``struct virtio_net_hdr`` (§5.1.6),
12 bytes with VERSION_1 (``num_buffers`` is always present then)::

    u8 flags        NEEDS_CSUM 1, DATA_VALID 2, RSC_INFO 4
    u8 gso_type     NONE 0, TCPV4 1, UDP 3, TCPV6 4, UDP_L4 5, | ECN 0x80
    le16 hdr_len    bytes of L2+L3+L4 headers (a hint, for GSO)
    le16 gso_size   payload bytes per segment (GSO only)
    le16 csum_start offset (from the start of the Ethernet frame) where checksumming
                    starts (NEEDS_CSUM)
    le16 csum_offset where, counted from csum_start, the 16-bit checksum goes
    le16 num_buffers receive buffers this packet spans (MRG_RXBUF; 1 otherwise)

Config space (§5.1.4), the part we use: ``u8 mac[6]; le16 status; le16
max_virtqueue_pairs; le16 mtu``. ``status`` bit 0 is LINK_UP (with VIRTIO_NET_F_STATUS).

Queues: receiveq1 = 0, transmitq1 = 1 (no MQ, no control queue).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "NET_HDR",
    "NET_HDR_SIZE",
    "NetHdr",
    "NetConfig",
    "NET_CONFIG_BYTES",
    "HDR_F_NEEDS_CSUM",
    "HDR_F_DATA_VALID",
    "HDR_F_RSC_INFO",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_UDP",
    "GSO_TCPV6",
    "GSO_UDP_L4",
    "GSO_ECN",
    "S_LINK_UP",
    "S_ANNOUNCE",
    "RX_QUEUE",
    "TX_QUEUE",
    "ETH_HLEN",
    "MIN_MTU",
    "MAX_MTU",
    "format_mac",
    "parse_mac",
]

NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size  # 12

HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
HDR_F_RSC_INFO = 4

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

S_LINK_UP = 1
S_ANNOUNCE = 2

RX_QUEUE = 0
TX_QUEUE = 1

#: Ethernet II header: destination MAC, source MAC, ethertype.
ETH_HLEN = 14
#: The MTU range the device accepts (§5.1.4.1: at least 68; at most 65535).
MIN_MTU = 68
MAX_MTU = 65535

_CONFIG = struct.Struct("<6sHHH")
NET_CONFIG_BYTES = _CONFIG.size  # 12


@dataclass(frozen=True, slots=True)
class NetHdr:
    """One ``virtio_net_hdr`` (12 bytes, VERSION_1)."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 1

    def pack(self) -> bytes:
        """The 12 bytes of this header."""
        return NET_HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        )

    def pack_into(self, buf: memoryview | bytearray, offset: int = 0) -> None:
        """Write the header into ``buf`` at ``offset``."""
        NET_HDR.pack_into(
            buf,
            offset,
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> NetHdr:
        """Parse 12 bytes at ``offset`` (``struct.error`` if there are fewer)."""
        return cls(*NET_HDR.unpack_from(data, offset))


@dataclass(frozen=True, slots=True)
class NetConfig:
    """The virtio-net configuration space fields we implement (§5.1.4)."""

    mac: bytes = b"\x00" * 6
    status: int = S_LINK_UP
    max_virtqueue_pairs: int = 1
    mtu: int = 1500

    def pack(self) -> bytes:
        """The config space bytes."""
        return _CONFIG.pack(self.mac, self.status, self.max_virtqueue_pairs, self.mtu)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> NetConfig:
        """Parse config space bytes (``struct.error`` if short)."""
        mac, status, pairs, mtu = _CONFIG.unpack_from(data, 0)
        return cls(bytes(mac), status, pairs, mtu)


def format_mac(mac: bytes) -> str:
    """``52:54:00:12:34:56`` for six bytes."""
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """Six bytes from ``aa:bb:cc:dd:ee:ff`` (or ``-`` separated); ValueError naming the
    problem otherwise."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r} (want aa:bb:cc:dd:ee:ff)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r} (want aa:bb:cc:dd:ee:ff)") from None
