"""virtio-blk wire formats (§5.2), shared by the device and the driver.

Config space (§5.2.4) is :class:`BlkConfig`; a request (§5.2.6) is a 16-byte header
``le32 type; le32 reserved; le64 sector`` in the readable part, then data, then a
1-byte status written last by the device. DISCARD and WRITE_ZEROES carry a list of
16-byte segments ``le64 sector; le32 num_sectors; le32 flags`` (flag bit 0: unmap).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

__all__ = [
    "BlkConfig",
    "REQ_HEADER",
    "DISCARD_SEGMENT",
    "DISCARD_F_UNMAP",
    "CONFIG_BYTES",
]

REQ_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
DISCARD_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
DISCARD_F_UNMAP = 1

# capacity, size_max, seg_max, geometry{cylinders, heads, sectors}, blk_size,
# topology{physical_block_exp, alignment_offset, min_io_size, opt_io_size},
# writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap, unused1[3]
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
CONFIG_BYTES = _CONFIG.size  # 60


@dataclass(frozen=True, slots=True)
class BlkConfig:
    """The virtio-blk configuration space; fields as named in §5.2.4. ``capacity`` is in
    512-byte sectors whatever ``blk_size`` says."""

    capacity: int = 0
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = 512
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    unused0: int = 0
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0

    def pack(self) -> bytes:
        """The 60 config-space bytes."""
        return _CONFIG.pack(*(getattr(self, f.name) for f in fields(self)))

    @classmethod
    def unpack(cls, data: bytes) -> BlkConfig:
        """Parse config-space bytes (shorter input is zero-padded: fields a device does
        not offer read as 0)."""
        raw = bytes(data[:CONFIG_BYTES]).ljust(CONFIG_BYTES, b"\0")
        return cls(*_CONFIG.unpack(raw))
