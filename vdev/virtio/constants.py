"""Numbers from the virtio specification (OASIS VIRTIO 1.3), little-endian throughout.

Every constant here is named as in the spec so it can be searched there; the section
that defines each group is cited above it. Feature bits are given as bit *numbers*;
use :func:`bit` to turn one into a mask and :func:`feature_names` to print a mask.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "Status",
    "F",
    "BlkF",
    "NetF",
    "DeviceId",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_DESC_F_INDIRECT",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_USED_F_NO_NOTIFY",
    "MAX_QUEUE_SIZE",
    "BlkType",
    "BlkStatus",
    "SECTOR_SIZE",
    "BLK_ID_BYTES",
    "bit",
    "feature_names",
]


class Status(IntFlag):
    """Device status bits (§2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class F(IntEnum):
    """Reserved (transport and ring) feature bit numbers (§6)."""

    INDIRECT_DESC = 28
    EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    RING_RESET = 40


class BlkF(IntEnum):
    """Block device feature bit numbers (§5.2.3)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17


class NetF(IntEnum):
    """Network device feature bit numbers (§5.1.3)."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23
    HOST_USO = 56
    HASH_REPORT = 57
    RSS = 60
    SPEED_DUPLEX = 63


class DeviceId(IntEnum):
    """Device IDs (§5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    BALLOON = 5
    SCSI = 8
    P9 = 9
    GPU = 16
    INPUT = 18
    VSOCK = 19
    CRYPTO = 20
    SOUND = 25
    FS = 26


# Descriptor flags (§2.7.5).
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
# Available ring flags (§2.7.6) and used ring flags (§2.7.8).
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
# Queue Size is a power of 2 no larger than 32768 (§2.7).
MAX_QUEUE_SIZE = 32768


class BlkType(IntEnum):
    """virtio-blk request types (§5.2.6)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(IntEnum):
    """virtio-blk request status byte (§5.2.6)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


SECTOR_SIZE = 512  # capacity and request sectors are always 512 bytes (§5.2.4)
BLK_ID_BYTES = 20  # GET_ID returns a 20-byte string (§5.2.6)


def bit(n: int) -> int:
    """Return the mask of feature bit number ``n``."""
    return 1 << int(n)


def feature_names(mask: int, device_id: int | None = None) -> list[str]:
    """Name every bit set in ``mask``: reserved bits by :class:`F`, the rest by the
    device type's enum (``BlkF`` for block, ``NetF`` for net), unknown ones as ``bitN``."""
    per_device: dict[int, type[IntEnum]] = {DeviceId.BLOCK: BlkF, DeviceId.NET: NetF}
    names: list[str] = []
    for n in range(64):
        if not mask >> n & 1:
            continue
        if n in F._value2member_map_:
            names.append(F(n).name)
            continue
        enum = per_device.get(device_id) if device_id is not None else None
        if enum is not None and n in enum._value2member_map_:
            names.append(enum(n).name)
        else:
            names.append(f"bit{n}")
    return names
