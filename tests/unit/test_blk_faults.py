"""BlkDevice carrying out the blk actions of a fault plan, in-process (DeviceHarness: the
real DriverQueue and DeviceSession, a real image file), observed from outside: the
status the driver reaps, the bytes read back from the host file, the device counters.

Also the zero-length status descriptor hole, and the undo journal of ``power_cut``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from vdev.blk import BlkDevice, RawFileBackend, UndoJournal
from vdev.injector import FaultInjector
from vdev.testing import Completion, DeviceHarness
from vdev.virtio import SECTOR_SIZE, BlkStatus, BlkType, RingLayout
from vdev.virtio.blk import DISCARD_SEGMENT, REQ_HEADER
from vdev.virtio.faults import FaultPlan

pytestmark = pytest.mark.timeout(60)

SECTORS = 64
SIZE = SECTORS * SECTOR_SIZE


class PowerCut(BaseException):
    """Raised instead of SIGKILL when the device crashes in-process (escapes the drain
    as the real SIGKILL would end it)."""


def _crash(reason: str) -> NoReturn:
    raise PowerCut(reason)


def pattern(tag: int, n: int = SECTOR_SIZE) -> bytes:
    """``n`` bytes that say which write they came from."""
    return bytes((tag * 37 + i) & 0xFF for i in range(n))


class Disk:
    """A BlkDevice on a host image file, driven through a DeviceHarness, with a plan."""

    def __init__(self, path: Path, rules: list[dict[str, Any]] | None, seed: int = 1) -> None:
        self.path = path
        self.device = BlkDevice(RawFileBackend(path))
        self.h = DeviceHarness(self.device)
        self.injector: FaultInjector | None = None
        if rules is not None:
            plan = FaultPlan.from_dict({"seed": seed, "rules": rules})
            self.injector = FaultInjector(plan, device="vda", clock=self.h.clock)
            self.h.session.attach_injector(self.injector)
            self.h.session.on_crash = _crash
        self.h.negotiate()

    def image(self) -> bytes:
        """The image as the host sees it."""
        return self.path.read_bytes()

    def write(self, sector: int, data: bytes) -> int:
        c = self.h.request(0, [REQ_HEADER.pack(BlkType.OUT, 0, sector), data], [1])
        return c.written[-1]

    def read(self, sector: int, n: int) -> tuple[int, bytes]:
        c = self.h.request(0, [REQ_HEADER.pack(BlkType.IN, 0, sector)], [n, 1])
        return c.writable[-1], c.writable[:n]

    def flush(self) -> int:
        return self.h.request(0, [REQ_HEADER.pack(BlkType.FLUSH, 0, 0)], [1]).written[-1]

    def zeroes(self, btype: int, sector: int, nsect: int) -> int:
        seg = DISCARD_SEGMENT.pack(sector, nsect, 0)
        c = self.h.request(0, [REQ_HEADER.pack(btype, 0, sector), seg], [1])
        return c.written[-1]

    @property
    def m(self) -> dict[str, int]:
        return self.h.counters

    def close(self) -> None:
        self.h.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(b"\x11" * SIZE)
    return p


@pytest.fixture
def disks() -> Iterator[list[Disk]]:
    made: list[Disk] = []
    yield made
    for d in made:
        d.close()


def disk(disks: list[Disk], image: Path, *rules: dict[str, Any], seed: int = 1) -> Disk:
    d = Disk(image, list(rules), seed)
    disks.append(d)
    return d


def rule(event: str, action: str, **when: Any) -> dict[str, Any]:
    params = when.pop("params", {})
    return {"when": {"event": event, **when}, "what": {"action": action, **params}}


# --------------------------------------------------------------------------- status faults


def test_ioerr_on_the_nth_read_only(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.read", "ioerr", nth=2))
    got = [d.read(0, SECTOR_SIZE)[0] for _ in range(4)]
    assert got == [BlkStatus.OK, BlkStatus.IOERR, BlkStatus.OK, BlkStatus.OK]
    assert d.m["fault_ioerr"] == 1 and d.m["fault:ioerr"] == 1 and d.m["faults_fired"] == 1
    assert d.m["reads"] == 3  # the failed read was not performed
    assert d.write(0, pattern(1)) == BlkStatus.OK  # writes are not blk.read events


def test_ioerr_on_a_sector_range(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.read", "ioerr", sector=[10, 10]))
    assert d.read(9, SECTOR_SIZE)[0] == BlkStatus.OK
    assert d.read(9, 2 * SECTOR_SIZE)[0] == BlkStatus.IOERR  # sectors 9..10 overlap
    assert d.read(10, SECTOR_SIZE)[0] == BlkStatus.IOERR
    assert d.read(11, 4 * SECTOR_SIZE)[0] == BlkStatus.OK
    assert d.m["fault_ioerr"] == 2


def test_unsupp_on_flush_does_not_flush(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.flush", "unsupp", times=1))
    assert d.flush() == BlkStatus.UNSUPP
    assert d.m["flushes"] == 0 and d.m["fault_unsupp"] == 1
    assert d.flush() == BlkStatus.OK and d.m["flushes"] == 1


def test_ioerr_on_write_writes_nothing(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.write", "ioerr", opcode="OUT"))
    assert d.write(3, pattern(3)) == BlkStatus.IOERR
    assert d.image() == b"\x11" * SIZE


def test_discard_event(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.discard", "ioerr", sector=[8, 8]))
    assert d.zeroes(BlkType.DISCARD, 0, 4) == BlkStatus.OK  # sectors 0..3: no overlap
    assert d.zeroes(BlkType.DISCARD, 6, 4) == BlkStatus.IOERR  # 6..9 overlaps 8
    img = d.image()
    assert img[: 4 * SECTOR_SIZE] == bytes(4 * SECTOR_SIZE)
    assert img[6 * SECTOR_SIZE : 10 * SECTOR_SIZE] == b"\x11" * (4 * SECTOR_SIZE)


# --------------------------------------------------------------------------- data faults


def test_corrupt_read_flips_one_byte_of_the_data(disks: list[Disk], image: Path) -> None:
    d = disk(
        disks, image, rule("blk.read", "corrupt_read", nth=2, params={"offset": 700, "xor": 0x0F})
    )
    assert d.write(0, pattern(5, 2 * SECTOR_SIZE)) == BlkStatus.OK
    want = pattern(5, 2 * SECTOR_SIZE)
    assert d.read(0, 2 * SECTOR_SIZE) == (BlkStatus.OK, want)
    status, data = d.read(0, 2 * SECTOR_SIZE)
    assert status == BlkStatus.OK
    diff = [i for i in range(len(want)) if data[i] != want[i]]
    assert diff == [700] and data[700] == want[700] ^ 0x0F
    assert d.read(0, 2 * SECTOR_SIZE) == (BlkStatus.OK, want)  # the image is intact
    assert d.image()[: 2 * SECTOR_SIZE] == want
    assert d.m["corrupted_reads"] == 1


def test_corrupt_read_beyond_the_data_changes_nothing(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.read", "corrupt_read", params={"offset": 4096}))
    assert d.read(0, SECTOR_SIZE) == (BlkStatus.OK, b"\x11" * SECTOR_SIZE)
    assert d.m["corrupted_reads"] == 0 and d.m["faults_out_of_range"] == 1


def test_corrupt_read_random_replays_with_the_seed(tmp_path: Path) -> None:
    seen = []
    for run in range(3):
        p = tmp_path / f"d{run}.img"
        p.write_bytes(bytes(SIZE))
        d = Disk(p, [rule("blk.read", "corrupt_read", params={"random": True})], seed=run // 2)
        try:
            data = d.read(0, 4 * SECTOR_SIZE)[1]
        finally:
            d.close()
        seen.append([(i, b) for i, b in enumerate(data) if b])
    assert len(seen[0]) == 1 and seen[0] == seen[1]  # seed 0 twice: the same byte
    assert len(seen[2]) == 1


def test_drop_write_acknowledges_and_writes_nothing(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.write", "drop_write", nth=2))
    assert [d.write(i, pattern(i)) for i in range(3)] == [BlkStatus.OK] * 3
    img = d.image()
    assert img[:SECTOR_SIZE] == pattern(0)
    assert img[SECTOR_SIZE : 2 * SECTOR_SIZE] == b"\x11" * SECTOR_SIZE  # the 2nd: dropped
    assert img[2 * SECTOR_SIZE : 3 * SECTOR_SIZE] == pattern(2)
    assert d.m["dropped_writes"] == 1 and d.m["writes"] == 3


def test_write_zeroes_is_a_blk_write(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.write", "drop_write", opcode="WRITE_ZEROES"))
    assert d.zeroes(BlkType.WRITE_ZEROES, 0, 2) == BlkStatus.OK
    assert d.image() == b"\x11" * SIZE  # dropped
    assert d.write(0, pattern(1)) == BlkStatus.OK  # OUT is not filtered in
    assert d.image()[:SECTOR_SIZE] == pattern(1)


def test_torn_write_lands_only_the_first_sectors(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.write", "torn_write", nth=1, params={"sectors": 1}))
    data = pattern(7, 4 * SECTOR_SIZE)
    assert d.write(4, data) == BlkStatus.OK
    img = d.image()
    assert img[4 * SECTOR_SIZE : 5 * SECTOR_SIZE] == data[:SECTOR_SIZE]
    assert img[5 * SECTOR_SIZE : 8 * SECTOR_SIZE] == b"\x11" * (3 * SECTOR_SIZE)
    assert d.write(4, data) == BlkStatus.OK  # nth=1: the second one lands whole
    assert d.image()[4 * SECTOR_SIZE : 8 * SECTOR_SIZE] == data
    assert d.m["torn_writes"] == 1


def test_torn_write_zeroes(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.write", "torn_write", params={"sectors": 3}))
    assert d.zeroes(BlkType.WRITE_ZEROES, 0, 8) == BlkStatus.OK
    img = d.image()
    assert img[: 3 * SECTOR_SIZE] == bytes(3 * SECTOR_SIZE)
    assert img[3 * SECTOR_SIZE :] == b"\x11" * (SIZE - 3 * SECTOR_SIZE)


# --------------------------------------------------------------------------- latency


def test_latency_completes_later(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.write", "latency", nth=1, params={"dist": "fixed", "s": 0.5}))
    req = d.h.submit(0, [REQ_HEADER.pack(BlkType.OUT, 0, 0), pattern(1)], [1])
    assert not req.done and d.m["delayed_completions"] == 1
    assert d.write(1, pattern(2)) == BlkStatus.OK  # not delayed: overtakes it
    d.h.advance(0.4)
    assert not req.done
    d.h.advance(0.2)
    assert req.done and isinstance(req.completion, Completion)
    assert req.completion.written[-1] == BlkStatus.OK
    assert d.image()[:SECTOR_SIZE] == pattern(1)


def test_latency_uniform_replays(tmp_path: Path) -> None:
    delays = []
    for run in range(2):
        p = tmp_path / f"d{run}.img"
        p.write_bytes(bytes(SIZE))
        r = rule("blk.read", "latency", params={"dist": "uniform", "low_s": 0.1, "high_s": 0.9})
        d = Disk(p, [r], seed=42)
        try:
            for _ in range(3):
                d.h.submit(0, [REQ_HEADER.pack(BlkType.IN, 0, 0)], [SECTOR_SIZE, 1])
            assert d.injector is not None
            delays.append([f.params["delay_s"] for f in d.injector.fired_log])
            assert d.h.in_flight(0) == 3
            d.h.advance(1.0)
            assert d.h.in_flight(0) == 0
        finally:
            d.close()
    assert delays[0] == delays[1] and all(0.1 <= s <= 0.9 for s in delays[0])


def test_reset_cancels_delayed_completions(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.read", "latency", params={"dist": "fixed", "s": 1.0}))
    req = d.h.submit(0, [REQ_HEADER.pack(BlkType.IN, 0, 0)], [SECTOR_SIZE, 1])
    d.h.reset()
    assert req.released
    d.h.negotiate()
    d.h.advance(2.0)  # the cancelled timer completes nothing (the harness would notice)
    assert d.m["handler_errors"] == 0 and d.m["stale_completions"] == 0


# --------------------------------------------------------------------------- power cut


def test_power_cut_rolls_back_to_the_last_flush(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.write", "power_cut", nth=5))
    assert d.write(0, pattern(1)) == BlkStatus.OK
    assert d.write(1, pattern(2)) == BlkStatus.OK
    assert d.flush() == BlkStatus.OK
    assert d.write(1, pattern(3)) == BlkStatus.OK  # overwrites flushed data
    assert d.zeroes(BlkType.WRITE_ZEROES, 5, 2) == BlkStatus.OK  # the 4th blk.write
    with pytest.raises(PowerCut, match="power cut"):
        d.write(2, pattern(4))
    img = d.image()
    assert img[:SECTOR_SIZE] == pattern(1)
    assert img[SECTOR_SIZE : 2 * SECTOR_SIZE] == pattern(2)  # the unflushed overwrite: gone
    assert img[2 * SECTOR_SIZE :] == b"\x11" * (SIZE - 2 * SECTOR_SIZE)  # zeroes: gone
    assert d.device.metrics["power_cuts"] == 1
    assert d.device.metrics["rolled_back_bytes"] == 3 * SECTOR_SIZE


def test_drop_flush_data_is_lost_at_a_power_cut(disks: list[Disk], image: Path) -> None:
    d = disk(
        disks,
        image,
        rule("blk.flush", "drop_flush", nth=2),
        rule("blk.write", "power_cut", nth=3),
    )
    assert d.write(0, pattern(1)) == BlkStatus.OK
    assert d.flush() == BlkStatus.OK  # real
    assert d.write(1, pattern(2)) == BlkStatus.OK
    assert d.flush() == BlkStatus.OK  # a lie
    assert d.m["dropped_flushes"] == 1
    with pytest.raises(PowerCut):
        d.write(2, pattern(3))
    img = d.image()
    assert img[:SECTOR_SIZE] == pattern(1)
    assert img[SECTOR_SIZE:] == b"\x11" * (SIZE - SECTOR_SIZE)


def test_discard_is_rolled_back(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.flush", "power_cut"))
    assert d.zeroes(BlkType.DISCARD, 0, SECTORS) == BlkStatus.OK
    with pytest.raises(PowerCut):
        d.flush()
    assert d.image() == b"\x11" * SIZE


def test_journal_cap_forces_a_real_flush(disks: list[Disk], image: Path) -> None:
    d = disk(disks, image, rule("blk.write", "power_cut", nth=4))
    journal = d.device._journal
    assert journal is not None
    journal.cap = 2 * SECTOR_SIZE
    assert d.write(0, pattern(1)) == BlkStatus.OK
    assert d.write(1, pattern(2)) == BlkStatus.OK  # journal full now
    assert d.write(2, pattern(3)) == BlkStatus.OK  # forces a flush: 0 and 1 are durable
    assert d.m["journal_forced_flushes"] == 1
    with pytest.raises(PowerCut):
        d.write(3, pattern(4))
    img = d.image()
    assert img[:SECTOR_SIZE] == pattern(1) and img[SECTOR_SIZE : 2 * SECTOR_SIZE] == pattern(2)
    assert img[2 * SECTOR_SIZE :] == b"\x11" * (SIZE - 2 * SECTOR_SIZE)


def test_no_plan_no_journal(image: Path) -> None:
    d = Disk(image, None)
    try:
        assert d.write(0, pattern(1)) == BlkStatus.OK
        assert d.device._journal is None and not d.device._faulty
        assert "power_cuts" not in d.device.metrics
    finally:
        d.close()


def test_undo_journal_saves_each_byte_once() -> None:
    from vdev.blk import MemoryBackend

    b = MemoryBackend(8192)
    b.data[:] = bytes(range(256)) * 32
    before = bytes(b.data)
    j = UndoJournal(cap=1 << 20)
    for off, n in [(100, 50), (120, 100), (0, 10), (90, 300), (5000, 10), (4990, 30)]:
        assert j.save(b, off, n)
        b.data[off : off + n] = b"\xff" * n
    assert j.bytes == 10 + 300 + 30  # [0,10) [90,390) [4990,5020)
    assert sum(len(d) for _, d in j.entries) == j.bytes
    assert j.rollback(b) == 340
    assert bytes(b.data) == before and j.bytes == 0
    assert not UndoJournal(cap=10).save(b, 0, 11)


# --------------------------------------------------------------------------- holes


def test_zero_length_status_descriptor_is_a_bad_request(tmp_path: Path) -> None:
    """The last writable descriptor has length 0: the request is bad (IOERR in the last
    writable byte, bad_requests), not an IndexError counted as a device bug."""
    p = tmp_path / "d.img"
    p.write_bytes(bytes(SIZE))
    with DeviceHarness(BlkDevice(RawFileBackend(p)), queue_size=16) as h:
        h.negotiate()
        s = h.session
        kick = s.kick
        s.kick = lambda index: True  # type: ignore[method-assign]  # hold the kick back
        try:
            req = h.submit(0, [REQ_HEADER.pack(BlkType.IN, 0, 0)], [SECTOR_SIZE, 1])
        finally:
            del s.kick
        assert not req.done
        # the driver's status descriptor: its length becomes 0 before the device looks
        table = h.memory.view(RingLayout.packed(16, 0).desc, 16 * 16)
        status_addr = req.writable[-1][0]
        for i in range(16):
            addr, length = struct.unpack_from("<QI", table, 16 * i)
            if addr == status_addr and length == 1:
                struct.pack_into("<I", table, 16 * i + 8, 0)
                break
        else:
            raise AssertionError("status descriptor not found")
        table.release()
        assert kick(0)
        h.run_pending()
        c = req.completion
        assert c is not None and c.len == 1
        assert c.writable[SECTOR_SIZE - 1] == BlkStatus.IOERR  # the last writable byte
        m = h.counters
        assert m["bad_requests"] == 1 and m["handler_errors"] == 0 and m["reads"] == 0
        # the device goes on
        c2 = h.request(0, [REQ_HEADER.pack(BlkType.IN, 0, 0)], [SECTOR_SIZE, 1])
        assert c2.written[-1] == BlkStatus.OK


def test_malformed_data_with_a_valid_status_is_ioerr(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    p.write_bytes(bytes(SIZE))
    with DeviceHarness(BlkDevice(RawFileBackend(p))) as h:
        h.negotiate()
        c = h.request(0, [REQ_HEADER.pack(BlkType.IN, 0, 0)], [100, 1])  # not whole sectors
        assert c.len == 1 and c.writable[-1] == BlkStatus.IOERR
        c = h.request(0, [REQ_HEADER.pack(BlkType.OUT, 0, SECTORS), pattern(1)], [1])
        assert c.writable[-1] == BlkStatus.IOERR  # beyond the capacity
        c = h.request(0, [REQ_HEADER.pack(BlkType.DISCARD, 0, 0), b"x" * 15], [1])
        assert c.writable[-1] == BlkStatus.IOERR  # not a whole segment
        m = h.counters
        assert m["bad_requests"] == 3 and m["handler_errors"] == 0
        assert os.path.getsize(p) == SIZE and p.read_bytes() == bytes(SIZE)
