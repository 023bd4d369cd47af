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

Queues (§5.1.2): receiveq1 = 0, transmitq1 = 1. With VIRTIO_NET_F_MQ, ``N =
max_virtqueue_pairs``: receiveqK = 2(K-1), transmitqK = 2(K-1)+1 for K in 1..N and the
control queue is 2N; with VIRTIO_NET_F_CTRL_VQ but not MQ it is queue 2
(:func:`ctrl_queue_index`).

Control queue (§5.1.6.5): a chain whose readable part is ``u8 class; u8 command;
command-specific-data[]`` and whose writable part starts with the ``u8 ack`` the device
writes (:data:`CTRL_OK` / :data:`CTRL_ERR`). The one command used here is
VIRTIO_NET_CTRL_MQ (class 4) VQ_PAIRS_SET (command 0) with ``le16 virtqueue_pairs`` in
1..max_virtqueue_pairs (§5.1.6.5.6): :func:`mq_pairs_set`.

Receive steering (§5.1.6.5.6 "Automatic receive steering"): a flow is identified by
:func:`flow_key` (the IPv4 5-tuple; the 3-tuple for fragments and protocols without
ports), from the local end's side whichever way the frame goes.
"""

from __future__ import annotations

import struct
import zlib
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
    "MAX_QUEUE_PAIRS",
    "CTRL_HDR_SIZE",
    "CTRL_OK",
    "CTRL_ERR",
    "CTRL_CLASS_MQ",
    "CTRL_MQ_VQ_PAIRS_SET",
    "CTRL_MQ_PAIRS_MIN",
    "CTRL_MQ_PAIRS_MAX",
    "CTRL_DATA_MAX",
    "rx_queue_index",
    "tx_queue_index",
    "ctrl_queue_index",
    "mq_pairs_set",
    "flow_key",
    "flow_hash",
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

#: Most queue pairs our device and driver support (the spec allows up to 0x8000).
MAX_QUEUE_PAIRS = 16

#: ``u8 class; u8 command`` at the start of every control command (§5.1.6.5).
CTRL_HDR_SIZE = 2
#: The ack byte the device writes (§5.1.6.5): VIRTIO_NET_OK / VIRTIO_NET_ERR.
CTRL_OK = 0
CTRL_ERR = 1
#: VIRTIO_NET_CTRL_MQ and its VQ_PAIRS_SET command (§5.1.6.5.6).
CTRL_CLASS_MQ = 4
CTRL_MQ_VQ_PAIRS_SET = 0
#: The range of ``virtqueue_pairs`` the spec allows (§5.1.6.5.6).
CTRL_MQ_PAIRS_MIN = 1
CTRL_MQ_PAIRS_MAX = 0x8000
#: Most command-specific bytes a device reads (the largest command we know is 2 bytes;
#: the spec's biggest, RSS_CONFIG, stays well below this).
CTRL_DATA_MAX = 4096

_LE16 = struct.Struct("<H")
_NO_PORTS = bytes(4)

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

    def pack_into(
        self, buf: memoryview | bytearray, offset: int = 0, num_buffers: int | None = None
    ) -> None:
        """Write the header into ``buf`` at ``offset`` (with ``num_buffers`` instead of
        this header's own, when given: a receive header written as it is delivered)."""
        NET_HDR.pack_into(
            buf,
            offset,
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers if num_buffers is None else num_buffers,
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


def rx_queue_index(pair: int) -> int:
    """The virtqueue of receiveq(pair+1) (§5.1.2; ``pair`` counts from 0)."""
    return 2 * pair


def tx_queue_index(pair: int) -> int:
    """The virtqueue of transmitq(pair+1) (§5.1.2; ``pair`` counts from 0)."""
    return 2 * pair + 1


def ctrl_queue_index(max_pairs: int, mq: bool) -> int:
    """The control queue's index (§5.1.2): 2N with VIRTIO_NET_F_MQ negotiated (N =
    ``max_virtqueue_pairs``), else 2."""
    return 2 * max_pairs if mq else 2


def mq_pairs_set(pairs: int) -> bytes:
    """The readable part of a VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET command (§5.1.6.5.6);
    ValueError outside 1..0x8000."""
    if not CTRL_MQ_PAIRS_MIN <= pairs <= CTRL_MQ_PAIRS_MAX:
        raise ValueError(f"virtqueue_pairs {pairs} not in 1..{CTRL_MQ_PAIRS_MAX}")
    return bytes((CTRL_CLASS_MQ, CTRL_MQ_VQ_PAIRS_SET)) + _LE16.pack(pairs)


def flow_key(frame: bytes | memoryview, received: bool = False) -> bytes | None:
    """The flow an Ethernet frame belongs to, for receive steering: 13 bytes
    ``protocol, local address, remote address, local port, remote port`` of an IPv4
    packet (``received``: the frame came in, so its destination is the local end), or
    None for anything else (not IPv4, truncated). Fragments (and protocols other than
    TCP and UDP) have zero ports: every fragment of a datagram is of one flow."""
    n = len(frame)
    # RFC 791: an IPv4 header is at least 20 bytes (IHL >= 5) after the Ethernet header
    if n < 34 or frame[12] != 0x08 or frame[13] != 0x00:
        return None
    vihl = frame[14]
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20 or n < 14 + ihl:
        return None
    proto = frame[23]
    l4 = 14 + ihl
    fragment = ((frame[20] << 8) | frame[21]) & 0x3FFF  # MF flag or a fragment offset
    if proto in (6, 17) and not fragment and n >= l4 + 4:
        sport = bytes(frame[l4 : l4 + 2])
        dport = bytes(frame[l4 + 2 : l4 + 4])
    else:
        sport = dport = _NO_PORTS[:2]
    src = bytes(frame[26:30])
    dst = bytes(frame[30:34])
    if received:
        return bytes((proto,)) + dst + src + dport + sport
    return bytes((proto,)) + src + dst + sport + dport


def flow_hash(key: bytes) -> int:
    """A 16-bit hash of a :func:`flow_key`, for spreading unknown flows over queues:
    CRC-32 (linear: flows that differ in one port bit would differ in few hash bits)
    mixed by Fibonacci hashing, whose high bits depend on every bit of the CRC."""
    return ((zlib.crc32(key) * 0x9E3779B1) & 0xFFFFFFFF) >> 16
