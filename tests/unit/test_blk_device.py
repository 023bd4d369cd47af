"""BlkDevice.handle on hand-made chains (sans-IO: no processes, no sockets).

Chains are built over a ``FlatMemory(bytearray)`` the way the runtime hands them over:
memoryviews into guest memory, readable part first, status byte last. Every request
type and every error status is covered, over both backends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdev import Device, Metrics
from vdev.blk import MAX_DISCARD_SEG, SIZE_MAX, BlkDevice, MemoryBackend, RawFileBackend
from vdev.virtio import (
    BLK_ID_BYTES,
    SECTOR_SIZE,
    BlkF,
    BlkStatus,
    BlkType,
    Chain,
    DeviceId,
    DeviceQueue,
    DriverQueue,
    FlatMemory,
    ProtocolError,
    RingLayout,
    Segment,
    bit,
)
from vdev.virtio.blk import DISCARD_F_UNMAP, DISCARD_SEGMENT, REQ_HEADER, BlkConfig
from vdev.virtio.control import ErrorCode

pytestmark = pytest.mark.timeout(60)

CAPACITY = 64  # sectors
SIZE = CAPACITY * SECTOR_SIZE


class Guest:
    """A bump allocator over one FlatMemory: builds chains like a driver would."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.memory = FlatMemory(bytearray(size))
        self.top = 0

    def alloc(self, n: int) -> int:
        addr = self.top
        self.top += (n + 15) & ~15
        return addr

    def chain(self, readable: list[bytes], writable: list[int]) -> Chain:
        """A chain of readable buffers holding ``readable`` and writable buffers of the
        given sizes (pre-filled with 0xEE so untouched bytes show)."""
        r_views, w_views, segs = [], [], []
        for data in readable:
            a = self.alloc(len(data))
            v = self.memory.view(a, len(data))
            v[:] = data
            r_views.append(v)
            segs.append(Segment(a, len(data), False, False))
        for n in writable:
            a = self.alloc(n)
            v = self.memory.view(a, n)
            v[:] = b"\xee" * n
            w_views.append(v)
            segs.append(Segment(a, n, True, False))
        return Chain(
            0,
            r_views,
            w_views,
            sum(map(len, r_views)),
            sum(map(len, w_views)),
            segs,
        )


def hdr(rtype: int, sector: int = 0) -> bytes:
    return REQ_HEADER.pack(rtype, 0, sector)


def segs(*items: tuple[int, int, int]) -> bytes:
    return b"".join(DISCARD_SEGMENT.pack(*s) for s in items)


def status_of(chain: Chain) -> int:
    return chain.writable[-1][-1]


def pattern(nbytes: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(nbytes))


@pytest.fixture(params=["memory", "rawfile"])
def dev(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlkDevice]:
    if request.param == "memory":
        backend: MemoryBackend | RawFileBackend = MemoryBackend(SIZE)
    else:
        img = tmp_path / "disk.img"
        img.write_bytes(bytes(SIZE))
        backend = RawFileBackend(img)
    d = BlkDevice(backend, queue_size=128)
    yield d
    d.close()


def image_bytes(d: BlkDevice) -> bytes:
    b = d.backend
    if isinstance(b, MemoryBackend):
        return bytes(b.data)
    assert isinstance(b, RawFileBackend)
    return Path(b.path).read_bytes()


def do_write(g: Guest, d: BlkDevice, sector: int, data: bytes) -> Chain:
    c = g.chain([hdr(BlkType.OUT, sector), data], [1])
    assert d.handle(0, c) == 1
    return c


# --------------------------------------------------------------------------- config


def test_identity_features_and_config(dev: BlkDevice) -> None:
    assert dev.device_id == DeviceId.BLOCK and dev.name == "blk"
    assert dev.num_queues == 1 and dev.max_queue_size == 128
    f = dev.device_features()
    for b in (BlkF.SIZE_MAX, BlkF.SEG_MAX, BlkF.BLK_SIZE, BlkF.FLUSH, BlkF.DISCARD):
        assert f & bit(b), b
    assert f & bit(BlkF.WRITE_ZEROES)
    assert not f & bit(BlkF.RO)
    assert not f & bit(BlkF.MQ)
    assert f >> 28 == 0, "ring features are the runtime's business"
    cfg = BlkConfig.unpack(dev.config())
    assert cfg.capacity == CAPACITY
    assert cfg.size_max == SIZE_MAX
    assert cfg.seg_max == 126
    assert cfg.blk_size == 512
    assert cfg.max_discard_seg == MAX_DISCARD_SEG and cfg.max_discard_sectors > 0
    assert cfg.max_write_zeroes_seg > 0 and cfg.max_write_zeroes_sectors > 0
    assert len(dev.config()) == 60


def test_config_is_read_only() -> None:
    d = BlkDevice(MemoryBackend(SIZE))
    with pytest.raises(ProtocolError) as ei:
        d.write_config(0, b"\0")
    assert ei.value.code == ErrorCode.BAD_VALUE
    assert "read-only" in ei.value.message


def test_bad_construction() -> None:
    with pytest.raises(ValueError):
        BlkDevice(MemoryBackend(SIZE), queue_size=100)
    with pytest.raises(ValueError):
        BlkDevice(MemoryBackend(SIZE), queue_size=65536)


def test_mq_offered_with_several_queues() -> None:
    d = BlkDevice(MemoryBackend(SIZE), num_queues=4)
    assert d.device_features() & bit(BlkF.MQ)
    assert BlkConfig.unpack(d.config()).num_queues == 4


# --------------------------------------------------------------------------- IN / OUT


def test_out_then_in_round_trip(dev: BlkDevice) -> None:
    g = Guest()
    data = pattern(3 * SECTOR_SIZE)
    do_write(g, dev, 5, data)
    assert image_bytes(dev)[5 * 512 : 8 * 512] == data
    assert image_bytes(dev)[: 5 * 512] == bytes(5 * 512)
    c = g.chain([hdr(BlkType.IN, 5)], [3 * SECTOR_SIZE, 1])
    assert dev.handle(0, c) == 3 * SECTOR_SIZE + 1
    assert status_of(c) == BlkStatus.OK
    assert bytes(c.writable[0]) == data
    m = dev.metrics.snapshot()
    assert m["reads"] == 1 and m["writes"] == 1
    assert m["bytes_read"] == m["bytes_written"] == 3 * SECTOR_SIZE
    assert m["io_errors"] == m["bad_requests"] == m["unsupported"] == 0


def test_scattered_buffers_and_status_in_last_data_buffer(dev: BlkDevice) -> None:
    """Data spread over odd-sized descriptors; the status byte shares the last one."""
    g = Guest()
    data = pattern(2 * SECTOR_SIZE, seed=9)
    c = g.chain([hdr(BlkType.OUT, 10)[:7], hdr(BlkType.OUT, 10)[7:], data[:100], data[100:]], [1])
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.OK
    c = g.chain([hdr(BlkType.IN, 10)], [13, 500, 512])  # 1024 data + status = 1025
    assert dev.handle(0, c) == 2 * SECTOR_SIZE + 1
    got = b"".join(bytes(v) for v in c.writable)
    assert got[: 2 * SECTOR_SIZE] == data
    assert got[-1] == BlkStatus.OK


def test_zero_length_io_is_ok(dev: BlkDevice) -> None:
    g = Guest()
    c = g.chain([hdr(BlkType.IN, CAPACITY)], [1])
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.OK
    c = g.chain([hdr(BlkType.OUT, CAPACITY)], [1])
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.OK


@pytest.mark.parametrize(
    "sector,nsect",
    [(CAPACITY, 1), (CAPACITY - 1, 2), (2**64 - 1, 1), (2**63, 8)],
)
def test_out_of_range_sector_is_ioerr(dev: BlkDevice, sector: int, nsect: int) -> None:
    g = Guest()
    c = g.chain([hdr(BlkType.IN, sector)], [nsect * SECTOR_SIZE, 1])
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.IOERR
    assert bytes(c.writable[0]) == b"\xee" * (nsect * SECTOR_SIZE), "no data was touched"
    c = g.chain([hdr(BlkType.OUT, sector), bytes(nsect * SECTOR_SIZE)], [1])
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.IOERR
    assert dev.metrics["bad_requests"] == 2
    assert image_bytes(dev) == bytes(SIZE)


def test_last_sector_is_in_range(dev: BlkDevice) -> None:
    g = Guest()
    do_write(g, dev, CAPACITY - 1, b"\x5a" * 512)
    assert image_bytes(dev)[-512:] == b"\x5a" * 512


@pytest.mark.parametrize("rtype", [BlkType.IN, BlkType.OUT])
def test_length_not_a_multiple_of_512_is_ioerr(dev: BlkDevice, rtype: int) -> None:
    g = Guest()
    if rtype == BlkType.IN:
        c = g.chain([hdr(rtype, 0)], [700, 1])
    else:
        c = g.chain([hdr(rtype, 0), b"x" * 700], [1])
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.IOERR
    assert dev.metrics["bad_requests"] == 1
    assert image_bytes(dev) == bytes(SIZE)


# --------------------------------------------------------------------------- malformed


def test_short_header_is_ioerr(dev: BlkDevice) -> None:
    g = Guest()
    c = g.chain([hdr(BlkType.IN, 0)[:15]], [512, 1])
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.IOERR
    c = g.chain([], [512, 1])  # no readable part at all
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.IOERR
    assert dev.metrics["bad_requests"] == 2


def test_no_writable_byte_cannot_be_answered(dev: BlkDevice) -> None:
    g = Guest()
    c = g.chain([hdr(BlkType.OUT, 0), b"y" * 512], [])
    assert dev.handle(0, c) == 0
    assert dev.metrics["bad_requests"] == 1
    assert dev.metrics["writes"] == 0
    assert image_bytes(dev) == bytes(SIZE), "an unanswerable request does nothing"


@pytest.mark.parametrize(
    "rtype", [99, BlkType.GET_LIFETIME, BlkType.SECURE_ERASE, 0xFFFFFFFF, 2, 3]
)
def test_unknown_types_are_unsupp(dev: BlkDevice, rtype: int) -> None:
    g = Guest()
    c = g.chain([hdr(rtype, 0)], [64, 1])
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.UNSUPP
    assert dev.metrics["unsupported"] == 1


# --------------------------------------------------------------------------- FLUSH / GET_ID


def test_flush(dev: BlkDevice) -> None:
    g = Guest()
    c = g.chain([hdr(BlkType.FLUSH)], [1])
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.OK
    assert dev.metrics["flushes"] == 1


def test_get_id(dev: BlkDevice) -> None:
    g = Guest()
    c = g.chain([hdr(BlkType.GET_ID)], [BLK_ID_BYTES, 1])
    assert dev.handle(0, c) == BLK_ID_BYTES + 1
    assert status_of(c) == BlkStatus.OK
    ident = bytes(c.writable[0])
    assert ident == dev.serial and len(ident) == BLK_ID_BYTES
    assert ident.rstrip(b"\0"), "the id is not empty"
    assert dev.metrics["get_id"] == 1


def test_get_id_of_image_derives_from_inode(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(SIZE))
    b.write_bytes(bytes(SIZE))
    da, db = BlkDevice(RawFileBackend(a)), BlkDevice(RawFileBackend(b))
    try:
        assert da.serial != db.serial
        assert da.serial.startswith(b"vlab")
        assert da.serial == BlkDevice(RawFileBackend(a, readonly=True)).serial
    finally:
        da.close()
        db.close()


def test_get_id_into_a_short_buffer(dev: BlkDevice) -> None:
    g = Guest()
    c = g.chain([hdr(BlkType.GET_ID)], [8, 1])
    assert dev.handle(0, c) == 9 and status_of(c) == BlkStatus.OK
    assert bytes(c.writable[0]) == dev.serial[:8]


# --------------------------------------------------------------------------- DISCARD / WZ


@pytest.mark.parametrize("rtype", [BlkType.DISCARD, BlkType.WRITE_ZEROES])
def test_discard_and_write_zeroes_zero_ranges(dev: BlkDevice, rtype: int) -> None:
    g = Guest()
    do_write(g, dev, 0, b"\xff" * SIZE)
    c = g.chain([hdr(rtype), segs((2, 3, 0), (10, 1, 0))], [1])
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.OK
    img = image_bytes(dev)
    zero = {2, 3, 4, 10}
    for s in range(CAPACITY):
        want = bytes(512) if s in zero else b"\xff" * 512
        assert img[s * 512 : (s + 1) * 512] == want, s
    assert len(img) == SIZE, "the image keeps its size"
    name = "discards" if rtype == BlkType.DISCARD else "write_zeroes"
    assert dev.metrics[name] == 1


def test_write_zeroes_with_unmap(dev: BlkDevice) -> None:
    g = Guest()
    do_write(g, dev, 0, b"\xab" * SIZE)
    c = g.chain([hdr(BlkType.WRITE_ZEROES), segs((8, 8, DISCARD_F_UNMAP))], [1])
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.OK
    img = image_bytes(dev)
    assert img[8 * 512 : 16 * 512] == bytes(8 * 512)
    assert img[: 8 * 512] == b"\xab" * (8 * 512) and img[16 * 512 :] == b"\xab" * (SIZE - 8192)


def test_discard_punches_a_hole_in_an_image(tmp_path: Path) -> None:
    img = tmp_path / "holes.img"
    size = 1 << 20
    img.write_bytes(b"\x11" * size)
    d = BlkDevice(RawFileBackend(img))
    try:
        g = Guest()
        c = g.chain([hdr(BlkType.DISCARD), segs((256, 512, 0))], [1])  # 256 KiB at 128 KiB
        assert d.handle(0, c) == 1 and status_of(c) == BlkStatus.OK
        data = img.read_bytes()
        assert len(data) == size
        assert data[128 << 10 : 384 << 10] == bytes(256 << 10)
        assert data[: 128 << 10] == b"\x11" * (128 << 10)
        assert data[384 << 10 :] == b"\x11" * (size - (384 << 10))
        assert isinstance(d.backend, RawFileBackend)
        # either the file system punched a hole or zeros were written; both read as 0
        assert d.backend.punch_holes in (0, 1)
    finally:
        d.close()


@pytest.mark.parametrize(
    "payload,status",
    [
        (segs((0, 1, DISCARD_F_UNMAP)), BlkStatus.UNSUPP),  # §5.2.6.2: no unmap on discard
        (segs((0, 1, 2)), BlkStatus.UNSUPP),  # unknown flag
        (segs((CAPACITY, 1, 0)), BlkStatus.IOERR),  # out of range
        (segs((0, 1, 0), (CAPACITY - 1, 2, 0)), BlkStatus.IOERR),  # second one out of range
        (segs((2**64 - 1, 2**32 - 1, 0)), BlkStatus.IOERR),  # would overflow a u64
        (segs((0, 1, 0))[:15], BlkStatus.IOERR),  # not a whole segment
        (b"", BlkStatus.IOERR),  # no segment
        (segs(*[(0, 1, 0)] * (MAX_DISCARD_SEG + 1)), BlkStatus.IOERR),  # too many
    ],
)
def test_bad_discard_requests(dev: BlkDevice, payload: bytes, status: int) -> None:
    g = Guest()
    do_write(g, dev, 0, b"\x77" * SIZE)
    c = g.chain([hdr(BlkType.DISCARD), payload] if payload else [hdr(BlkType.DISCARD)], [1])
    assert dev.handle(0, c) == 1 and status_of(c) == status
    assert image_bytes(dev) == b"\x77" * SIZE, "nothing is discarded if any segment is bad"
    if status == BlkStatus.UNSUPP:
        assert dev.metrics["unsupported"] == 1
    else:
        assert dev.metrics["bad_requests"] == 1


def test_write_zeroes_unknown_flag_is_unsupp(dev: BlkDevice) -> None:
    g = Guest()
    c = g.chain([hdr(BlkType.WRITE_ZEROES), segs((0, 1, 4))], [1])
    assert dev.handle(0, c) == 1 and status_of(c) == BlkStatus.UNSUPP


# --------------------------------------------------------------------------- read-only


@pytest.mark.parametrize("kind", ["memory", "rawfile"])
def test_read_only_device(tmp_path: Path, kind: str) -> None:
    if kind == "memory":
        backend: MemoryBackend | RawFileBackend = MemoryBackend(SIZE, readonly=True)
    else:
        img = tmp_path / "ro.img"
        img.write_bytes(pattern(SIZE))
        os.chmod(img, 0o444)
        backend = RawFileBackend(img, readonly=True)
    d = BlkDevice(backend)
    try:
        assert d.device_features() & bit(BlkF.RO)
        before = image_bytes(d)
        g = Guest()
        for req in (
            [hdr(BlkType.OUT, 0), b"z" * 512],
            [hdr(BlkType.DISCARD), segs((0, 1, 0))],
            [hdr(BlkType.WRITE_ZEROES), segs((0, 1, 0))],
        ):
            c = g.chain(req, [1])
            assert d.handle(0, c) == 1 and status_of(c) == BlkStatus.IOERR
        assert image_bytes(d) == before
        c = g.chain([hdr(BlkType.IN, 1)], [512, 1])
        assert d.handle(0, c) == 513 and status_of(c) == BlkStatus.OK
        assert bytes(c.writable[0]) == before[512:1024]
        c = g.chain([hdr(BlkType.FLUSH)], [1])
        assert d.handle(0, c) == 1 and status_of(c) == BlkStatus.OK
    finally:
        d.close()


# --------------------------------------------------------------------------- host errors


def test_host_error_is_ioerr(tmp_path: Path) -> None:
    img = tmp_path / "shrinks.img"
    img.write_bytes(bytes(SIZE))
    d = BlkDevice(RawFileBackend(img))
    try:
        os.truncate(img, SIZE // 2)  # the image shrank under the device
        g = Guest()
        c = g.chain([hdr(BlkType.IN, CAPACITY - 1)], [512, 1])
        assert d.handle(0, c) == 1 and status_of(c) == BlkStatus.IOERR
        assert d.metrics["io_errors"] == 1
        # a write to a descriptor that cannot write
        assert isinstance(d.backend, RawFileBackend)
        os.close(d.backend.fd)
        d.backend.fd = os.open(img, os.O_RDONLY)
        c = g.chain([hdr(BlkType.OUT, 0), b"q" * 512], [1])
        assert d.handle(0, c) == 1 and status_of(c) == BlkStatus.IOERR
        c = g.chain([hdr(BlkType.WRITE_ZEROES), segs((0, 1, 0))], [1])
        assert d.handle(0, c) == 1 and status_of(c) == BlkStatus.IOERR
        assert d.metrics["io_errors"] == 3
    finally:
        d.close()


# --------------------------------------------------------------------------- via real rings


def test_zero_copy_through_a_real_ring_with_indirect_descriptors() -> None:
    """The chain as DeviceQueue.pop() hands it over: preadv/pwritev land in guest
    memory directly."""
    mem = FlatMemory(bytearray(1 << 20))
    layout = RingLayout.packed(16, 0)
    drv = DriverQueue(mem, layout, event_idx=True, indirect=True)
    devq = DeviceQueue(mem, layout, event_idx=True, indirect=True)
    d = BlkDevice(MemoryBackend(SIZE), queue_size=16)
    buf = 0x10000
    data = pattern(4096, seed=3)
    mem.view(buf, 16)[:] = hdr(BlkType.OUT, 8)
    mem.view(buf + 16, 4096)[:] = data
    drv.add([(buf, 16), (buf + 16, 4096)], [(buf + 8192, 1)], "w", indirect_table=0x20000)
    mem.view(buf + 0x3000, 16)[:] = hdr(BlkType.IN, 8)
    drv.add(
        [(buf + 0x3000, 16)], [(buf + 0x4000, 2048), (buf + 0x5000, 2048), (buf + 0x6000, 1)], "r"
    )
    drv.kick_prepare()
    while (chain := devq.pop()) is not None:
        devq.push(chain.head, d.handle(0, chain))
    done = dict(drv.get_used())
    assert done == {"w": 1, "r": 4097}
    assert bytes(mem.view(buf + 0x4000, 2048)) + bytes(mem.view(buf + 0x5000, 2048)) == data
    assert mem.view(buf + 0x6000, 1)[0] == BlkStatus.OK


# --------------------------------------------------------------------------- plugin API


def test_metrics_counters() -> None:
    m = Metrics("a", "b")
    m.inc("a")
    m.inc("c", 5)
    assert m.snapshot() == {"a": 1, "b": 0, "c": 5}
    assert m["zzz"] == 0 and "c" in m and len(m) == 3
    snap = m.snapshot()
    snap["a"] = 100
    assert m["a"] == 1, "snapshot is a copy"
    m.merge({"a": 2})
    assert m["a"] == 3


def test_base_device_defaults() -> None:
    class Null(Device):
        device_id = 99
        name = "null"

    d = Null()
    assert d.device_features() == 0 and d.config() == b""
    d.activate(1 << 32)
    assert d.features == 1 << 32
    d.reset()
    assert d.features == 0
    with pytest.raises(ProtocolError):
        d.write_config(0, b"x")
    with pytest.raises(NotImplementedError):
        d.handle(0, Guest().chain([b"x"], [1]))
