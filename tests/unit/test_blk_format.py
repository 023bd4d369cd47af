"""virtio-blk wire formats (§5.2.4, §5.2.6), checked against our own offsets."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdev.virtio.blk import CONFIG_BYTES, DISCARD_SEGMENT, REQ_HEADER, BlkConfig

pytestmark = pytest.mark.timeout(60)

# field -> (offset, struct format) per §5.2.4
OFFSETS = {
    "capacity": (0, "<Q"),
    "size_max": (8, "<I"),
    "seg_max": (12, "<I"),
    "cylinders": (16, "<H"),
    "heads": (18, "<B"),
    "sectors": (19, "<B"),
    "blk_size": (20, "<I"),
    "physical_block_exp": (24, "<B"),
    "alignment_offset": (25, "<B"),
    "min_io_size": (26, "<H"),
    "opt_io_size": (28, "<I"),
    "writeback": (32, "<B"),
    "unused0": (33, "<B"),
    "num_queues": (34, "<H"),
    "max_discard_sectors": (36, "<I"),
    "max_discard_seg": (40, "<I"),
    "discard_sector_alignment": (44, "<I"),
    "max_write_zeroes_sectors": (48, "<I"),
    "max_write_zeroes_seg": (52, "<I"),
    "write_zeroes_may_unmap": (56, "<B"),
}


def test_size_is_60() -> None:
    assert CONFIG_BYTES == 60
    assert len(BlkConfig().pack()) == 60
    assert {f.name for f in dataclasses.fields(BlkConfig)} == set(OFFSETS)


def test_offsets_fields_distinct() -> None:
    # each field at its own offset: a distinct value per field, read back by hand
    values = {}
    for i, (name, (_, fmt)) in enumerate(OFFSETS.items()):
        width = struct.calcsize(fmt)
        values[name] = (0x0102030405060708 * (i + 1)) & ((1 << (8 * width)) - 1) or i + 1
    data = BlkConfig(**values).pack()
    for name, (off, fmt) in OFFSETS.items():
        assert struct.unpack_from(fmt, data, off)[0] == values[name], name
    assert data[57:60] == b"\0\0\0"  # unused1[3]
    # and the other way round: bytes written by hand parse into the right fields
    buf = bytearray(60)
    for name, (off, fmt) in OFFSETS.items():
        struct.pack_into(fmt, buf, off, values[name])
    assert BlkConfig.unpack(bytes(buf)) == BlkConfig(**values)


def test_named_offsets_from_the_brief() -> None:
    cfg = BlkConfig(
        capacity=2**40 + 5,
        size_max=1 << 20,
        seg_max=126,
        blk_size=4096,
        writeback=1,
        num_queues=4,
        max_discard_sectors=0xFFFFFFFF,
        max_discard_seg=1,
        max_write_zeroes_sectors=12345,
        max_write_zeroes_seg=2,
        write_zeroes_may_unmap=1,
    )
    b = cfg.pack()
    assert struct.unpack_from("<Q", b, 0)[0] == 2**40 + 5
    assert struct.unpack_from("<I", b, 8)[0] == 1 << 20
    assert struct.unpack_from("<I", b, 12)[0] == 126
    assert struct.unpack_from("<I", b, 20)[0] == 4096
    assert b[32] == 1
    assert struct.unpack_from("<H", b, 34)[0] == 4
    assert struct.unpack_from("<I", b, 36)[0] == 0xFFFFFFFF
    assert struct.unpack_from("<I", b, 40)[0] == 1
    assert struct.unpack_from("<I", b, 48)[0] == 12345
    assert struct.unpack_from("<I", b, 52)[0] == 2
    assert b[56] == 1


def test_defaults() -> None:
    b = BlkConfig().pack()
    assert struct.unpack_from("<I", b, 20)[0] == 512
    assert struct.unpack_from("<H", b, 34)[0] == 1
    assert b.count(0) == 60 - 2  # only blk_size (0x0200) and num_queues (1) non-zero


def test_short_input_zero_padded() -> None:
    full = BlkConfig(capacity=99, size_max=7, num_queues=3).pack()
    cfg = BlkConfig.unpack(full[:12])
    assert (cfg.capacity, cfg.size_max, cfg.seg_max, cfg.num_queues, cfg.blk_size) == (
        99,
        7,
        0,
        0,
        0,
    )
    assert BlkConfig.unpack(full + b"extra") == BlkConfig.unpack(full)
    assert BlkConfig.unpack(memoryview(full)) == BlkConfig(capacity=99, size_max=7, num_queues=3)


_field_values = {
    name: st.integers(0, (1 << (8 * struct.calcsize(fmt))) - 1)
    for name, (_, fmt) in OFFSETS.items()
}


@given(st.fixed_dictionaries(_field_values))
def test_round_trip(values: dict[str, int]) -> None:
    cfg = BlkConfig(**values)
    data = cfg.pack()
    assert len(data) == 60
    assert BlkConfig.unpack(data) == cfg
    for name, (off, fmt) in OFFSETS.items():
        assert struct.unpack_from(fmt, data, off)[0] == values[name]


def test_request_header_and_discard_segment() -> None:
    assert REQ_HEADER.size == 16 and DISCARD_SEGMENT.size == 16
    h = REQ_HEADER.pack(1, 0, 0x1122334455667788)
    assert struct.unpack("<IIQ", h) == (1, 0, 0x1122334455667788)
    assert h[8:] == bytes.fromhex("8877665544332211")
    s = DISCARD_SEGMENT.pack(5, 8, 1)
    assert s == struct.pack("<Q", 5) + struct.pack("<I", 8) + struct.pack("<I", 1)
