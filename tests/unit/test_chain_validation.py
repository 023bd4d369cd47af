"""Device-side validation (§2.7.5, §2.7.6): every bad chain is built by hand — raw
descriptor bytes and avail index written with ``struct`` — and ``DeviceQueue.pop()``
must name the exact rule, then keep serving (ChainError) or stay broken (RingError)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from vdev.virtio import (
    AddressError,
    ChainError,
    DeviceQueue,
    FlatMemory,
    RingError,
    RingLayout,
    Rule,
)

pytestmark = pytest.mark.timeout(60)

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
ELEM = struct.Struct("<II")
NEXT, WRITE, INDIRECT = 1, 2, 4

N = 8
MEM = 1 << 16
DATA = 0x4000  # buffers
TABLE = 0x8000  # indirect tables
GOOD = N - 1  # descriptor the "next valid chain" uses; bad chains use 0..N-2


class Raw:
    """A hand-driven driver: writes ring bytes itself, no DriverQueue involved."""

    def __init__(
        self,
        *,
        n: int = N,
        indirect: bool = True,
        memory: object | None = None,
        buf: bytearray | None = None,
        last_avail: int = 0,
    ) -> None:
        self.n = n
        self.buf = buf if buf is not None else bytearray(MEM)
        self.mem = memory if memory is not None else FlatMemory(self.buf)
        self.lay = RingLayout.packed(n, 0)
        self.avail_idx = last_avail
        U16.pack_into(self.buf, self.lay.avail + 2, last_avail & 0xFFFF)
        U16.pack_into(self.buf, self.lay.used + 2, last_avail & 0xFFFF)
        self.dev = DeviceQueue(self.mem, self.lay, indirect=indirect, last_avail=last_avail)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        DESC.pack_into(self.buf, self.lay.desc + 16 * i, addr, length, flags, nxt)

    def tdesc(self, table: int, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0):
        DESC.pack_into(self.buf, table + 16 * i, addr, length, flags, nxt)

    def ring_entry(self, head: int) -> None:
        U16.pack_into(self.buf, self.lay.avail + 4 + 2 * (self.avail_idx % self.n), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def set_avail_idx(self, idx: int) -> None:
        U16.pack_into(self.buf, self.lay.avail + 2, idx & 0xFFFF)

    def publish(self, head: int) -> None:
        self.ring_entry(head)
        self.set_avail_idx(self.avail_idx)

    def used_idx(self) -> int:
        return U16.unpack_from(self.buf, self.lay.used + 2)[0]

    def used_elem(self, k: int) -> tuple[int, int]:
        return ELEM.unpack_from(self.buf, self.lay.used + 4 + 8 * (k % self.n))


def _good_chain_follows(r: Raw, bad_head: int, rule: Rule) -> None:
    """After a ChainError: complete it with 0, then a valid chain pops fine."""
    with pytest.raises(ChainError) as ei:
        r.dev.pop()
    err = ei.value
    assert err.rule is rule, err
    assert err.head == bad_head
    assert r.dev.broken is None
    assert r.dev.stats.bad_chains == 1 and r.dev.stats.chains == 0
    assert r.dev.stats.rule_violations == {rule.name: 1}
    assert r.dev.has_avail() is False  # the bad chain was consumed
    used_before = r.used_idx()
    r.dev.push(err.head, 0)
    assert r.used_idx() == (used_before + 1) & 0xFFFF
    assert r.used_elem(used_before) == (bad_head, 0)
    # the next valid chain: readable "hello", writable 4 bytes
    r.buf[DATA + 0x800 : DATA + 0x805] = b"hello"
    second = GOOD - 1  # bad chains only use descriptors 0..N-3
    r.desc(GOOD, DATA + 0x800, 5, NEXT, second)
    r.desc(second, DATA + 0x900, 4, WRITE)
    r.publish(GOOD)
    ch = r.dev.pop()
    assert ch is not None
    assert ch.head == GOOD
    assert ch.read(0, 5) == b"hello"
    assert (ch.readable_len, ch.writable_len) == (5, 4)
    ch.write(0, b"abcd")
    assert bytes(r.buf[DATA + 0x900 : DATA + 0x904]) == b"abcd"
    r.dev.push(ch.head, 4)
    assert r.used_elem(used_before + 1) == (GOOD, 4)
    assert r.dev.stats.chains == 1 and r.dev.stats.bad_chains == 1
    assert r.dev.pop() is None


# Each builder writes one bad chain (descriptors 0..N-3 only) and returns its head.
Builder = Callable[[Raw], int]


def next_out_of_range(r: Raw) -> int:
    r.desc(0, DATA, 4, NEXT, N)  # next == queue size
    return 0


def next_out_of_range_ffff(r: Raw) -> int:
    r.desc(2, DATA, 4, NEXT, 3)
    r.desc(3, DATA + 16, 4, NEXT, 0xFFFF)
    return 2


def next_out_of_range_in_indirect(r: Raw) -> int:
    # table of 2 entries; entry 0 says next=2: < N but >= table length
    r.tdesc(TABLE, 0, DATA, 4, NEXT, 2)
    r.tdesc(TABLE, 1, DATA + 16, 4)
    r.desc(1, TABLE, 32, INDIRECT)
    return 1


def loop_self(r: Raw) -> int:
    r.desc(0, DATA, 4, NEXT, 0)
    return 0


def loop_two(r: Raw) -> int:
    r.desc(0, DATA, 4, NEXT, 1)
    r.desc(1, DATA + 16, 4, NEXT, 0)
    return 0


def loop_two_writable(r: Raw) -> int:
    r.desc(3, DATA, 4, WRITE | NEXT, 4)
    r.desc(4, DATA + 16, 4, WRITE | NEXT, 3)
    return 3


def loop_in_indirect(r: Raw) -> int:
    r.tdesc(TABLE, 0, DATA, 4, NEXT, 1)
    r.tdesc(TABLE, 1, DATA + 16, 4, NEXT, 2)
    r.tdesc(TABLE, 2, DATA + 32, 4, NEXT, 1)
    r.desc(0, TABLE, 48, INDIRECT)
    return 0


def readable_after_writable(r: Raw) -> int:
    r.desc(0, DATA, 4, WRITE | NEXT, 1)
    r.desc(1, DATA + 16, 4, 0)
    return 0


def readable_after_writable_in_indirect(r: Raw) -> int:
    r.tdesc(TABLE, 0, DATA, 4, NEXT, 1)
    r.tdesc(TABLE, 1, DATA + 16, 4, WRITE | NEXT, 2)
    r.tdesc(TABLE, 2, DATA + 32, 4, 0)
    r.desc(2, TABLE, 48, INDIRECT)
    return 2


def nested_indirect(r: Raw) -> int:
    r.tdesc(TABLE + 0x100, 0, DATA, 4)
    r.tdesc(TABLE, 0, DATA, 4, NEXT, 1)
    r.tdesc(TABLE, 1, TABLE + 0x100, 16, INDIRECT)
    r.desc(0, TABLE, 32, INDIRECT)
    return 0


def indirect_with_next(r: Raw) -> int:
    r.tdesc(TABLE, 0, DATA, 4)
    r.desc(0, TABLE, 16, INDIRECT | NEXT, 1)
    r.desc(1, DATA, 4)
    return 0


def indirect_length_zero(r: Raw) -> int:
    r.desc(0, TABLE, 0, INDIRECT)
    return 0


def indirect_length_24(r: Raw) -> int:
    r.desc(0, TABLE, 24, INDIRECT)
    return 0


def indirect_length_8(r: Raw) -> int:
    r.desc(0, TABLE, 8, INDIRECT)
    return 0


def buffer_past_end(r: Raw) -> int:
    r.desc(0, MEM - 4, 8)
    return 0


def buffer_past_end_second(r: Raw) -> int:
    r.desc(0, DATA, 4, NEXT, 1)
    r.desc(1, MEM - 1, 0xFFFFFFFF, WRITE)
    return 0


def indirect_table_past_end(r: Raw) -> int:
    r.desc(0, MEM - 16, 32, INDIRECT)
    return 0


def indirect_entry_past_end(r: Raw) -> int:
    r.tdesc(TABLE, 0, MEM, 1)
    r.desc(0, TABLE, 16, INDIRECT)
    return 0


def addr_near_2_64(r: Raw) -> int:
    r.desc(0, 2**64 - 16, 16)
    return 0


def addr_2_64_minus_1(r: Raw) -> int:
    r.desc(0, 2**64 - 1, 2)
    return 0


def indirect_table_near_2_64(r: Raw) -> int:
    r.desc(0, 2**64 - 16, 16, INDIRECT)
    return 0


CASES: list[tuple[Builder, Rule]] = [
    (next_out_of_range, Rule.NEXT_OUT_OF_RANGE),
    (next_out_of_range_ffff, Rule.NEXT_OUT_OF_RANGE),
    (next_out_of_range_in_indirect, Rule.NEXT_OUT_OF_RANGE),
    (loop_self, Rule.CHAIN_LOOP),
    (loop_two, Rule.CHAIN_LOOP),
    (loop_two_writable, Rule.CHAIN_LOOP),
    (loop_in_indirect, Rule.CHAIN_LOOP),
    (readable_after_writable, Rule.READABLE_AFTER_WRITABLE),
    (readable_after_writable_in_indirect, Rule.READABLE_AFTER_WRITABLE),
    (nested_indirect, Rule.NESTED_INDIRECT),
    (indirect_with_next, Rule.INDIRECT_WITH_NEXT),
    (indirect_length_zero, Rule.INDIRECT_LENGTH),
    (indirect_length_24, Rule.INDIRECT_LENGTH),
    (indirect_length_8, Rule.INDIRECT_LENGTH),
    (buffer_past_end, Rule.ADDRESS_OUT_OF_RANGE),
    (buffer_past_end_second, Rule.ADDRESS_OUT_OF_RANGE),
    (indirect_table_past_end, Rule.ADDRESS_OUT_OF_RANGE),
    (indirect_entry_past_end, Rule.ADDRESS_OUT_OF_RANGE),
    (addr_near_2_64, Rule.ADDRESS_OUT_OF_RANGE),
    (addr_2_64_minus_1, Rule.ADDRESS_OUT_OF_RANGE),
    (indirect_table_near_2_64, Rule.ADDRESS_OUT_OF_RANGE),
]


@pytest.mark.parametrize(("build", "rule"), CASES, ids=[c[0].__name__ for c in CASES])
@pytest.mark.parametrize("start", [0, 65535])
def test_chain_error(build: Builder, rule: Rule, start: int) -> None:
    r = Raw(last_avail=start)
    head = build(r)
    r.publish(head)
    _good_chain_follows(r, head, rule)


def test_indirect_not_negotiated() -> None:
    r = Raw(indirect=False)
    r.tdesc(TABLE, 0, DATA, 4)
    r.desc(0, TABLE, 16, INDIRECT)
    r.publish(0)
    _good_chain_follows(r, 0, Rule.INDIRECT_NOT_NEGOTIATED)


def test_indirect_not_negotiated_checked_before_shape() -> None:
    # Even a malformed indirect descriptor is first of all not negotiated.
    r = Raw(indirect=False)
    r.desc(0, TABLE, 0, INDIRECT | NEXT, 1)
    r.publish(0)
    _good_chain_follows(r, 0, Rule.INDIRECT_NOT_NEGOTIATED)


# ------------------------------------------------------------------ valid edge cases


def test_chain_of_exactly_queue_size_is_not_a_loop() -> None:
    r = Raw()
    for i in range(N):
        last = i == N - 1
        r.desc(i, DATA + 16 * i, 16, 0 if last else NEXT, 0 if last else i + 1)
        r.buf[DATA + 16 * i : DATA + 16 * i + 16] = bytes([i]) * 16
    r.publish(0)
    ch = r.dev.pop()
    assert ch is not None and ch.head == 0
    assert ch.readable_len == 16 * N and len(ch.segments) == N
    assert ch.read(0, 16 * N) == b"".join(bytes([i]) * 16 for i in range(N))
    assert r.dev.stats.bad_chains == 0


def test_indirect_table_longer_than_queue() -> None:
    # §2.7.5.3.1: a chain, indirect table included, holds at most queue-size
    # descriptors (QEMU caps at 1024); a table of exactly N entries is fine.
    r = Raw()
    k = 3 * N
    for i in range(k):
        last = i == k - 1
        r.tdesc(TABLE, i, DATA + i, 1, WRITE | (0 if last else NEXT), 0 if last else i + 1)
    r.desc(5, TABLE, 16 * k, INDIRECT)
    r.publish(5)
    with pytest.raises(ChainError) as ei:
        r.dev.pop()
    assert ei.value.rule is Rule.CHAIN_TOO_LONG and ei.value.head == 5
    r.tdesc(TABLE, N - 1, DATA + N - 1, 1, WRITE, 0)
    r.desc(5, TABLE, 16 * N, INDIRECT)
    r.publish(5)
    ch = r.dev.pop()
    assert ch is not None and ch.head == 5 and ch.writable_len == N
    ch.write(0, bytes(range(N)))
    assert bytes(r.buf[DATA : DATA + N]) == bytes(range(N))


def test_buffer_ending_exactly_at_end_of_memory() -> None:
    r = Raw()
    r.buf[MEM - 4 :] = b"tail"
    r.desc(0, MEM - 4, 4)
    r.publish(0)
    ch = r.dev.pop()
    assert ch is not None and ch.read(0, 4) == b"tail"


# ------------------------------------------------------------------ LENGTH_OVERFLOW


class PretendMemory:
    """Real bytes for the rings; any address at or above ``HUGE`` "exists" with any
    length (a small dummy view) so the length-overflow rule can be reached."""

    HUGE = 1 << 40

    def __init__(self, buf: bytearray) -> None:
        self.buf = memoryview(buf)
        self.dummy = memoryview(bytearray(16))
        self.views = 0

    def view(self, addr: int, length: int) -> memoryview:
        if addr >= self.HUGE:
            self.views += 1
            return self.dummy
        if 0 <= addr and addr + length <= len(self.buf) and length >= 0:
            return self.buf[addr : addr + length]
        raise AddressError(f"{addr:#x}+{length:#x}")

    def barrier(self) -> None:
        return None


def _pretend() -> Raw:
    buf = bytearray(MEM)
    return Raw(memory=PretendMemory(buf), buf=buf)


def test_length_overflow_readable() -> None:
    r = _pretend()
    h = PretendMemory.HUGE
    r.desc(0, h, 0x80000000, NEXT, 1)
    r.desc(1, h, 0x80000000, NEXT, 2)  # total now 2**32: overflow here
    r.desc(2, h, 1)
    r.publish(0)
    _good_chain_follows(r, 0, Rule.LENGTH_OVERFLOW)


def test_length_overflow_many_ffffffff_mixed() -> None:
    r = _pretend()
    h = PretendMemory.HUGE
    r.desc(0, h, 0xFFFFFFFF, NEXT, 1)
    r.desc(1, h, 0xFFFFFFFF, WRITE | NEXT, 2)
    r.desc(2, h, 0xFFFFFFFF, WRITE | NEXT, 3)
    r.desc(3, h, 0xFFFFFFFF, WRITE)
    r.publish(0)
    _good_chain_follows(r, 0, Rule.LENGTH_OVERFLOW)


def test_length_overflow_inside_indirect() -> None:
    r = _pretend()
    h = PretendMemory.HUGE
    r.tdesc(TABLE, 0, h, 0xFFFFFFFF, WRITE | NEXT, 1)
    r.tdesc(TABLE, 1, h, 1, WRITE)
    r.desc(0, TABLE, 32, INDIRECT)
    r.publish(0)
    _good_chain_follows(r, 0, Rule.LENGTH_OVERFLOW)


def test_length_exactly_u32_max_is_fine() -> None:
    r = _pretend()
    h = PretendMemory.HUGE
    r.desc(0, h, 0x7FFFFFFF, NEXT, 1)
    r.desc(1, h, 0x80000000, WRITE)
    r.publish(0)
    ch = r.dev.pop()
    assert ch is not None
    assert (ch.readable_len, ch.writable_len) == (0x7FFFFFFF, 0x80000000)
    assert r.mem.views == 2  # type: ignore[attr-defined]
    assert r.dev.stats.bad_chains == 0


# ------------------------------------------------------------------ ring errors


def _ring_broken(r: Raw, rule: Rule) -> None:
    with pytest.raises(RingError) as ei:
        r.dev.pop()
    assert ei.value.rule is rule
    assert r.dev.broken is ei.value
    assert r.dev.stats.rule_violations == {rule.name: 1}
    assert r.dev.stats.bad_chains == 0 and r.dev.stats.chains == 0
    # The queue stays broken even if the driver "fixes" the ring afterwards.
    r.desc(GOOD, DATA, 4)
    U16.pack_into(r.buf, r.lay.avail + 4 + 2 * (r.dev.last_avail % r.n), GOOD)
    r.set_avail_idx(r.dev.last_avail + 1)
    with pytest.raises(RingError) as again:
        r.dev.pop()
    assert again.value.rule is rule
    assert r.used_idx() == r.dev.used_idx  # nothing was pushed


@pytest.mark.parametrize("start", [0, 5, 65530, 65535])
def test_head_out_of_range(start: int) -> None:
    r = Raw(last_avail=start)
    r.publish(N)  # head == queue size
    _ring_broken(r, Rule.HEAD_OUT_OF_RANGE)
    assert r.dev.last_avail == start  # not consumed


def test_head_0xffff() -> None:
    r = Raw()
    r.publish(0xFFFF)
    _ring_broken(r, Rule.HEAD_OUT_OF_RANGE)


@pytest.mark.parametrize("start", [0, 7, 65530, 65535])
@pytest.mark.parametrize("ahead", [N + 1, N + 2, 0x8000, 0xFFFF])
def test_avail_idx_jump(start: int, ahead: int) -> None:
    r = Raw(last_avail=start)
    r.set_avail_idx(start + ahead)  # 0xFFFF ahead == one step backwards
    _ring_broken(r, Rule.AVAIL_IDX_JUMP)


@pytest.mark.parametrize("start", [0, 65530])
def test_avail_idx_exactly_queue_size_ahead_is_fine(start: int) -> None:
    r = Raw(last_avail=start)
    for i in range(N):
        r.desc(i, DATA + i, 1)
        r.ring_entry(i)
    r.set_avail_idx(start + N)
    heads = []
    while (ch := r.dev.pop()) is not None:
        heads.append(ch.head)
        r.dev.push(ch.head, 0)
    assert heads == list(range(N))
    assert r.dev.last_avail == (start + N) & 0xFFFF
    assert r.used_idx() == (start + N) & 0xFFFF
    assert r.dev.stats.chains == N


def test_write_flag_on_indirect_descriptor_is_ignored() -> None:
    # §2.7.5.3.2: the device ignores WRITE on the descriptor that points at a table.
    r = Raw()
    r.buf[DATA : DATA + 3] = b"xyz"
    r.tdesc(TABLE, 0, DATA, 3, NEXT, 1)
    r.tdesc(TABLE, 1, DATA + 16, 2, WRITE)
    r.desc(4, TABLE, 32, INDIRECT | WRITE)
    r.publish(4)
    ch = r.dev.pop()
    assert ch is not None and ch.head == 4
    assert (ch.readable_len, ch.writable_len) == (3, 2)
    assert ch.read(0, 3) == b"xyz"
    assert r.dev.stats.bad_chains == 0 and r.dev.stats.chains == 1
