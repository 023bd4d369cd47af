"""Split-ring layout (§2.7): sizes, alignments, and the exact bytes both queue ends
read and write — checked with this file's own ``struct`` offsets, never the ring code's."""

from __future__ import annotations

import struct

import pytest

from vdev.virtio import (
    DeviceQueue,
    DriverQueue,
    FlatMemory,
    RingLayout,
    UsageError,
)

pytestmark = pytest.mark.timeout(60)

POWERS = [1 << k for k in range(16)]  # 1 .. 32768

# Our own view of the wire format (§2.7.5, §2.7.6, §2.7.8).
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
ELEM = struct.Struct("<II")


def align(x: int, a: int) -> int:
    return -(-x // a) * a


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("n", POWERS)
@pytest.mark.parametrize("base", [0, 1, 15, 16, 0x1234, 0x10000])
def test_packed_sizes_and_alignment(n: int, base: int) -> None:
    lay = RingLayout.packed(n, base)
    assert lay.size == n
    assert lay.desc == align(base, 16)
    assert lay.desc % 16 == 0 and lay.avail % 2 == 0 and lay.used % 4 == 0
    assert lay.avail == lay.desc + 16 * n  # avail right after the table
    assert lay.used == align(lay.avail + 6 + 2 * n, 4)
    assert lay.used - lay.avail < 6 + 2 * n + 4  # at most alignment padding in between
    assert lay.end == lay.used + 6 + 8 * n
    assert RingLayout.desc_bytes(n) == 16 * n
    assert RingLayout.avail_bytes(n) == 6 + 2 * n
    assert RingLayout.used_bytes(n) == 6 + 8 * n
    lay.validate()  # well-formed: must not raise
    # parts do not overlap
    assert lay.desc + 16 * n <= lay.avail
    assert lay.avail + 6 + 2 * n <= lay.used


@pytest.mark.parametrize("n", POWERS)
def test_total_bytes(n: int) -> None:
    expected = align(16 * n + 6 + 2 * n, 4) + 6 + 8 * n
    assert RingLayout.total_bytes(n) == expected
    assert RingLayout.packed(n, 0).end == expected


def test_known_layout_256() -> None:
    # The classic numbers for a 256-entry ring laid out from 0.
    lay = RingLayout.packed(256, 0)
    assert (lay.desc, lay.avail, lay.used) == (0, 4096, 4096 + 520)  # 518 padded to 4
    assert lay.end == 4096 + 520 + 6 + 8 * 256


@pytest.mark.parametrize(
    "n", [0, 3, 5, 6, 7, 12, 100, 255, 257, 1000, 32767, 32769, 49152, 65536, -1, -2, 2**20]
)
def test_bad_sizes_rejected(n: int) -> None:
    with pytest.raises(UsageError):
        RingLayout.packed(n, 0)
    with pytest.raises(UsageError):
        RingLayout(n, 0, 16 * 64, 16 * 64 + 4096).validate()
    with pytest.raises(UsageError):
        RingLayout.total_bytes(n)


def test_non_int_size_rejected() -> None:
    with pytest.raises(UsageError):
        RingLayout.packed(8.0, 0)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        RingLayout.packed("8", 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [
        (8, 256, 512),  # desc not 16-aligned
        (4, 256, 512),
        (1, 256, 512),
        (0, 257, 512),  # avail odd
        (0, 129, 512),
        (0, 256, 514),  # used only 2-aligned
        (0, 256, 513),
        (-16, 256, 512),  # negative
        (0, -2, 512),
        (0, 256, -4),
    ],
)
def test_misaligned_layout_rejected(desc: int, avail: int, used: int) -> None:
    lay = RingLayout(8, desc, avail, used)
    with pytest.raises(UsageError):
        lay.validate()
    mem = FlatMemory(bytearray(4096))
    with pytest.raises(UsageError):
        DriverQueue(mem, lay)
    with pytest.raises(UsageError):
        DeviceQueue(mem, lay)


def test_minimal_alignments_accepted() -> None:
    # Exactly the spec minimums (16, 2, 4), parts apart and in any order, work end to end.
    lay = RingLayout(8, 0x400, 0x202, 0x104)
    lay.validate()
    buf = bytearray(0x1000)
    mem = FlatMemory(buf)
    drv, dev = DriverQueue(mem, lay), DeviceQueue(mem, lay)
    buf[0x800:0x803] = b"abc"
    head = drv.add([(0x800, 3)], [], token="t")
    assert drv.kick_prepare() is True
    assert U16.unpack_from(buf, 0x202 + 2)[0] == 1
    assert U16.unpack_from(buf, 0x202 + 4)[0] == head
    assert DESC.unpack_from(buf, 0x400 + 16 * head) == (0x800, 3, 0, 0)
    ch = dev.pop()
    assert ch is not None and ch.read(0, 3) == b"abc"
    dev.push(ch.head, 0)
    assert ELEM.unpack_from(buf, 0x104 + 4) == (head, 0)
    assert drv.get_used() == [("t", 0)]


# ----------------------------------------------------------------------------- bytes


def _setup(n: int, base: int, *, event_idx: bool, indirect: bool = False):
    size = 1 << 17
    buf = bytearray(size)
    mem = FlatMemory(buf, base=base)
    lay = RingLayout.packed(n, base + 0x40)  # deliberately not 16-aligned + 0
    drv = DriverQueue(mem, lay, event_idx=event_idx, indirect=indirect)
    dev = DeviceQueue(mem, lay, event_idx=event_idx, indirect=indirect)
    return buf, mem, lay, drv, dev


def _off(lay_addr: int, base: int) -> int:
    return lay_addr - base


@pytest.mark.parametrize("n", [1, 2, 4, 8, 256])
@pytest.mark.parametrize("base", [0, 0x1000_0000])
def test_descriptor_and_avail_bytes(n: int, base: int) -> None:
    buf, mem, lay, drv, dev = _setup(n, base, event_idx=False)
    d = _off(lay.desc, base)
    a = _off(lay.avail, base)
    data0 = base + 0x8000
    heads = []
    expect_desc: dict[int, tuple[int, int, int, int]] = {}
    # one chain per free pair of descriptors: readable (i) + writable (i)
    chains = max(1, n // 2)
    for c in range(chains):
        r = (data0 + 0x100 * c, 10 + c)
        w = (data0 + 0x100 * c + 0x80, 20 + c)
        if n == 1:
            head = drv.add([r], [], token=c)
            heads.append(head)
            expect_desc[head] = (r[0], r[1], 0, 0)
            continue
        head = drv.add([r], [w], token=c)
        heads.append(head)
        flags, nxt = DESC.unpack_from(buf, d + 16 * head)[2:]
        assert flags == 1  # NEXT, readable
        expect_desc[head] = (r[0], r[1], 1, nxt)
        expect_desc[nxt] = (w[0], w[1], 2, 0)  # WRITE, end of chain
    # Before kick_prepare the idx is not published.
    assert U16.unpack_from(buf, a + 2)[0] == 0
    assert drv.kick_prepare() is True
    assert U16.unpack_from(buf, a + 0)[0] == 0  # avail flags
    assert U16.unpack_from(buf, a + 2)[0] == chains  # avail idx
    for i, h in enumerate(heads):
        assert U16.unpack_from(buf, a + 4 + 2 * i)[0] == h
    for i, want in expect_desc.items():
        assert DESC.unpack_from(buf, d + 16 * i) == want
    # disable_interrupts without EVENT_IDX sets NO_INTERRUPT in avail.flags
    drv.disable_interrupts()
    assert U16.unpack_from(buf, a + 0)[0] == 1
    assert drv.enable_interrupts() is False
    assert U16.unpack_from(buf, a + 0)[0] == 0
    # The device reads exactly what we expect from those bytes.
    for c, h in enumerate(heads):
        ch = dev.pop()
        assert ch is not None and ch.head == h
        assert ch.readable_len == 10 + c
        assert ch.segments[0].addr == data0 + 0x100 * c


@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("base", [0, 0x2000_0000])
def test_used_ring_bytes_and_event_fields(n: int, base: int) -> None:
    buf, mem, lay, drv, dev = _setup(n, base, event_idx=True)
    a = _off(lay.avail, base)
    u = _off(lay.used, base)
    data0 = base + 0x8000
    heads = [drv.add([], [(data0 + 0x40 * i, 32)], token=i) for i in range(n)]
    assert drv.kick_prepare() is True
    chains = [dev.pop() for _ in range(n)]
    assert [c.head for c in chains if c is not None] == heads
    # push in reverse order with distinct lengths
    for k, c in enumerate(reversed(chains)):
        assert c is not None
        dev.push(c.head, k + 1)
        assert U16.unpack_from(buf, u + 2)[0] == k + 1  # used idx after each push
        assert ELEM.unpack_from(buf, u + 4 + 8 * k) == (c.head, k + 1)
    assert U16.unpack_from(buf, u + 0)[0] == 0  # used flags
    # avail_event (after the used ring) written by the device
    assert dev.enable_notifications() is False
    assert U16.unpack_from(buf, u + 4 + 8 * n)[0] == n
    # with EVENT_IDX disable_notifications leaves the flags alone
    dev.disable_notifications()
    assert U16.unpack_from(buf, u + 0)[0] == 0
    # used_event (after the avail ring) written by the driver
    got = drv.get_used()
    assert got == [(n - 1 - k, k + 1) for k in range(n)]
    assert drv.enable_interrupts() is False
    assert U16.unpack_from(buf, a + 4 + 2 * n)[0] == n


def test_flags_without_event_idx() -> None:
    buf, mem, lay, drv, dev = _setup(8, 0, event_idx=False)
    u = lay.used
    dev.disable_notifications()
    assert U16.unpack_from(buf, u)[0] == 1  # NO_NOTIFY
    drv.add([(0x8000, 1)], [], token="x")
    assert drv.kick_prepare() is False  # suppressed by the flag we can see
    assert drv.stats.kicks_suppressed == 1
    assert dev.enable_notifications() is True  # re-check finds the chain
    assert U16.unpack_from(buf, u)[0] == 0


def test_driver_reads_avail_event_at_our_offset() -> None:
    n = 8
    buf, mem, lay, drv, dev = _setup(n, 0, event_idx=True)
    ev = lay.used + 4 + 8 * n
    # The device asks to be kicked only once index 3 has been published.
    U16.pack_into(buf, ev, 3)
    kicks = []
    for i in range(6):
        drv.add([(0x8000 + i, 1)], [], token=i)
        kicks.append(drv.kick_prepare())
    # publishing idx 1, 2, 3 → no; idx 4 (covers index 3) → yes; 5, 6 → no
    assert kicks == [False, False, False, True, False, False]
    assert drv.stats.kicks_sent == 1 and drv.stats.kicks_suppressed == 5


def test_device_reads_used_event_at_our_offset() -> None:
    n = 8
    buf, mem, lay, drv, dev = _setup(n, 0, event_idx=True)
    ev = lay.avail + 4 + 2 * n
    for i in range(6):
        drv.add([], [(0x8000 + 16 * i, 16)], token=i)
    drv.kick_prepare()
    U16.pack_into(buf, ev, 2)  # driver wants an interrupt once used idx passes 2
    decisions = []
    for _ in range(6):
        c = dev.pop()
        assert c is not None
        dev.push(c.head, 0)
        decisions.append(dev.should_interrupt())
    assert decisions == [False, False, True, False, False, False]
    assert dev.stats.interrupts_sent == 1 and dev.stats.interrupts_suppressed == 5


def test_indirect_table_bytes() -> None:
    buf, mem, lay, drv, dev = _setup(4, 0, event_idx=False, indirect=True)
    table = 0x9000
    head = drv.add([(0xA000, 3), (0xA010, 5)], [(0xA020, 7)], token="t", indirect_table=table)
    assert drv.num_free == 3
    assert DESC.unpack_from(buf, lay.desc + 16 * head) == (table, 48, 4, 0)  # INDIRECT
    assert DESC.unpack_from(buf, table + 0) == (0xA000, 3, 1, 1)
    assert DESC.unpack_from(buf, table + 16) == (0xA010, 5, 1, 2)
    assert DESC.unpack_from(buf, table + 32) == (0xA020, 7, 2, 0)
    drv.kick_prepare()
    ch = dev.pop()
    assert ch is not None
    assert (ch.head, ch.readable_len, ch.writable_len) == (head, 8, 7)
    assert all(s.indirect for s in ch.segments)
