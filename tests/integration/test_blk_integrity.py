"""The block layer's integrity mode (``kernel.Blk(..., integrity=True)``, issue 10):
silent device faults -- a write acknowledged but dropped or torn, read data corrupted
with status OK -- are repaired or reported, never returned as success. Real device
processes with fault plans, real shared memory, real ZeroMQ; what the disk holds is
checked from the host, what the driver did from its counters and the device's."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import kernel
import kernel.blk
from kernel.errors import culprit_of

pytestmark = pytest.mark.integration

IMAGE_SIZE = 4 << 20
CHUNK = 4096
WAIT_S = 30.0


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(IMAGE_SIZE))
    return str(path)


def _pattern(i: int, n: int = CHUNK) -> bytes:
    seed = hashlib.sha256(f"integrity-{i}".encode()).digest()
    return (seed * (n // len(seed) + 1))[:n]


def _plan(*rules: dict[str, Any], seed: int = 11) -> dict[str, Any]:
    return {"seed": seed, "rules": list(rules)}


def _host(image: str, offset: int, n: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _counters(k: kernel.Kernel) -> dict[str, int]:
    blk = k.devices[0].block
    assert blk is not None
    return blk.counters


def _device(k: kernel.Kernel) -> dict[str, int]:
    return k.devices[0].metrics()["device"]  # type: ignore[no-any-return]


def _write_chunks(k: kernel.Kernel, fd: int, count: int) -> None:
    for i in range(count):
        assert k.sys.pwrite(fd, _pattern(i), i * CHUNK) == CHUNK


# --------------------------------------------------------------------------- writes


def test_dropped_write_is_repaired_by_the_next_fsync(image: str) -> None:
    """The device acknowledges the 2nd write but writes nothing: before the fsync the
    image lacks it (the fault really fired); the fsync reads the journal back, finds
    those 8 sectors different, rewrites them, then flushes -- the image holds every
    write and reads return them."""
    plan = _plan({"when": {"event": "blk.write", "nth": 2}, "what": {"action": "drop_write"}})
    with kernel.boot(devices=[kernel.Blk(image, faults=plan, integrity=True)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        _write_chunks(k, fd, 4)
        assert _host(image, CHUNK, CHUNK) == bytes(CHUNK)  # dropped
        assert _device(k)["dropped_writes"] == 1
        k.sys.fsync(fd)
        for i in range(4):
            assert _host(image, i * CHUNK, CHUNK) == _pattern(i), i
            assert k.sys.pread(fd, CHUNK, i * CHUNK) == _pattern(i), i
        c = _counters(k)
        assert c["integrity_mismatches"] == 8 and c["integrity_repaired"] == 8
        assert c["integrity_errors"] == 0
        assert c["integrity_checked"] >= 4 * 8 + 8  # the read-back, then the re-read
        k.sys.close(fd)


def test_torn_write_is_repaired_by_the_next_fsync(image: str) -> None:
    """Only the first sector of the 3rd write (8 KiB) lands: the fsync rewrites the 15
    missing sectors before its FLUSH, so the image holds the whole write after it."""
    plan = _plan(
        {"when": {"event": "blk.write", "nth": 3}, "what": {"action": "torn_write", "sectors": 1}}
    )
    data = [_pattern(i, 2 * CHUNK) for i in range(4)]
    with kernel.boot(devices=[kernel.Blk(image, faults=plan, integrity=True)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        for i, d in enumerate(data):
            assert k.sys.pwrite(fd, d, i * 2 * CHUNK) == 2 * CHUNK
        torn = _host(image, 4 * CHUNK, 2 * CHUNK)
        assert torn[:512] == data[2][:512] and torn[512:] == bytes(2 * CHUNK - 512)
        k.sys.fsync(fd)
        assert _host(image, 0, 8 * CHUNK) == b"".join(data)
        c = _counters(k)
        assert _device(k)["torn_writes"] == 1
        assert c["integrity_mismatches"] == 15 and c["integrity_repaired"] == 15
        k.sys.close(fd)


def test_a_write_that_never_lands_fails_the_fsync(image: str) -> None:
    """Every write to sectors 8..15 is dropped, the rewrites too: after
    INTEGRITY_RETRIES rounds the fsync fails with EIO, culprit "device-error" -- it
    does not promise what the image does not hold. Other data is untouched."""
    plan = _plan(
        {"when": {"event": "blk.write", "sector": [8, 15]}, "what": {"action": "drop_write"}}
    )
    with kernel.boot(devices=[kernel.Blk(image, faults=plan, integrity=True)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        _write_chunks(k, fd, 3)
        with pytest.raises(OSError) as ei:
            k.sys.fsync(fd)
        assert ei.value.errno == errno.EIO and culprit_of(ei.value) == "device-error"
        c = _counters(k)
        assert c["integrity_errors"] == 1
        assert _device(k)["dropped_writes"] == 1 + kernel.blk.INTEGRITY_RETRIES
        assert _host(image, 0, CHUNK) == _pattern(0)
        assert _host(image, 2 * CHUNK, CHUNK) == _pattern(2)
        k.sys.close(fd)


# --------------------------------------------------------------------------- reads


def _read_plan(every: bool) -> dict[str, Any]:
    """corrupt_read on 4 KiB reads only (an fsync's read-back of an 8 KiB write is not
    one): the first, or every one."""
    when: dict[str, Any] = {"event": "blk.read", "size": [CHUNK, CHUNK]}
    when.update({"every": 1} if every else {"nth": 1})
    return _plan({"when": when, "what": {"action": "corrupt_read", "offset": 700}})


def test_a_read_corrupted_once_heals_on_the_second_read(image: str) -> None:
    """The device corrupts one read (status OK): the CRC check catches it, the read is
    sent again and the caller gets the right data; nothing needed repairing."""
    with kernel.boot(devices=[kernel.Blk(image, faults=_read_plan(False), integrity=True)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        data = _pattern(1, 2 * CHUNK)
        k.sys.pwrite(fd, data, 0)
        k.sys.fsync(fd)
        assert k.sys.pread(fd, CHUNK, 0) == data[:CHUNK]
        assert _device(k)["corrupted_reads"] == 1
        c = _counters(k)
        assert c["integrity_mismatches"] == 1  # one sector (byte 700) of the first read
        assert c["integrity_repaired"] == 0 and c["integrity_errors"] == 0
        k.sys.close(fd)


def test_reads_always_corrupted_after_fsync_fail_with_eio(image: str) -> None:
    """Every 4 KiB read comes back corrupted and the data was flushed (no longer in the
    journal): the read fails with EIO, culprit "device-error" -- never wrong data. A
    sector that was not written by this kernel is not checked."""
    with kernel.boot(devices=[kernel.Blk(image, faults=_read_plan(True), integrity=True)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        k.sys.pwrite(fd, _pattern(2, 2 * CHUNK), 0)
        k.sys.fsync(fd)
        with pytest.raises(OSError) as ei:
            k.sys.pread(fd, CHUNK, 0)
        assert ei.value.errno == errno.EIO and culprit_of(ei.value) == "device-error"
        assert _device(k)["corrupted_reads"] == 2  # the read and its one re-read
        c = _counters(k)
        assert c["integrity_errors"] == 1 and c["integrity_mismatches"] == 2
        got = k.sys.pread(fd, CHUNK, 8 * CHUNK)  # never written here: no CRC, not checked
        assert got != bytes(CHUNK) and _counters(k)["integrity_errors"] == 1
        k.sys.close(fd)


def test_reads_always_corrupted_before_fsync_are_answered_from_the_journal(image: str) -> None:
    """Every 4 KiB read is corrupted, but the write is still in the journal (no FLUSH
    covered it yet): the caller gets the journal's data and the sector is rewritten."""
    with kernel.boot(devices=[kernel.Blk(image, faults=_read_plan(True), integrity=True)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        data = _pattern(3, 2 * CHUNK)
        k.sys.pwrite(fd, data, 0)
        assert k.sys.pread(fd, CHUNK, 0) == data[:CHUNK]
        assert k.sys.pread(fd, CHUNK, CHUNK) == data[CHUNK:]
        c = _counters(k)
        assert c["integrity_repaired"] == 2 and c["integrity_errors"] == 0
        k.sys.fsync(fd)  # the rewrites do not disturb the journal's read-back
        assert _host(image, 0, 2 * CHUNK) == data
        k.sys.close(fd)


def test_random_silent_faults_never_return_wrong_data(image: str) -> None:
    """200 random writes, reads and fsyncs while the device corrupts 10 % of reads,
    drops 10 % of writes and tears 5 % (seeded): no read of data this kernel wrote
    returns wrong bytes (a read may fail: EIO, culprit "device-error"; so may an fsync
    whose rewrites kept being dropped), and after a successful last fsync the image
    holds exactly what was written."""
    import random

    plan = _plan(
        {
            "when": {"event": "blk.read", "probability": 0.1},
            "what": {"action": "corrupt_read", "random": True},
        },
        {"when": {"event": "blk.write", "probability": 0.1}, "what": {"action": "drop_write"}},
        {
            "when": {"event": "blk.write", "probability": 0.05},
            "what": {"action": "torn_write", "sectors": 1},
        },
        seed=5,
    )
    size = 256 << 10
    model = bytearray(size)
    written = bytearray(size // 512)
    rnd = random.Random(5)
    with kernel.boot(devices=[kernel.Blk(image, faults=plan, integrity=True)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        for _ in range(200):
            off = rnd.randrange(0, size // 512) * 512
            n = min(rnd.choice([512, 4096, 8192, 32768]), size - off)
            x = rnd.random()
            if x < 0.5:
                data = bytes([rnd.randrange(256)]) * n
                assert k.sys.pwrite(fd, data, off) == n
                model[off : off + n] = data
                written[off // 512 : (off + n) // 512] = b"\x01" * (n // 512)
            elif x < 0.9:
                try:
                    got = k.sys.pread(fd, n, off)
                except OSError as e:
                    assert e.errno == errno.EIO and culprit_of(e) == "device-error"
                    continue
                for i in range(n // 512):  # never-written sectors have no CRC: unchecked
                    a = off + i * 512
                    assert (
                        not written[a // 512] or got[i * 512 : (i + 1) * 512] == model[a : a + 512]
                    )
            else:
                try:
                    k.sys.fsync(fd)
                except OSError as e:
                    assert e.errno == errno.EIO and culprit_of(e) == "device-error"
        for attempt in range(3):  # the journal stays until a FLUSH went out: try again
            try:
                k.sys.fsync(fd)
                break
            except OSError as e:
                assert culprit_of(e) == "device-error" and attempt < 2
        c = _counters(k)
        assert c["integrity_mismatches"] > 0 and c["integrity_repaired"] > 0
        m = _device(k)
        assert m["dropped_writes"] > 0 and m["torn_writes"] > 0 and m["corrupted_reads"] > 0
        k.sys.close(fd)
    assert _host(image, 0, size) == bytes(model)


# --------------------------------------------------------------------------- the plain driver


@pytest.mark.parametrize("fault", ["drop_write", "corrupt_read"])
def test_without_integrity_the_same_faults_lose_data(image: str, fault: str) -> None:
    """The control: the plain driver cannot notice either fault -- a dropped write is
    missing from the image after an acknowledged fsync, a corrupted read is returned
    as success."""
    if fault == "drop_write":
        plan = _plan({"when": {"event": "blk.write", "nth": 2}, "what": {"action": "drop_write"}})
    else:
        plan = _read_plan(False)
    with kernel.boot(devices=[kernel.Blk(image, faults=plan)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        _write_chunks(k, fd, 3)
        k.sys.fsync(fd)
        if fault == "drop_write":
            assert _host(image, CHUNK, CHUNK) != _pattern(1)
        else:
            assert k.sys.pread(fd, CHUNK, 0) != _pattern(0)
        assert set(_counters(k).values()) == {0}
        k.sys.close(fd)


# --------------------------------------------------------------------------- crashes


def test_power_cut_with_integrity_keeps_the_fsync_promise(image: str) -> None:
    """A dropped write (repaired by the first fsync), then a power cut on a later write:
    the device restarts, the journal is replayed, the next fsync reads it back -- and
    the image holds every write acknowledged before it."""
    plan = _plan(
        {
            "name": "drop",
            "when": {"event": "blk.write", "nth": 2},
            "what": {"action": "drop_write"},
        },
        {"name": "cut", "when": {"event": "blk.write", "nth": 9}, "what": {"action": "power_cut"}},
    )
    with kernel.boot(devices=[kernel.Blk(image, faults=plan, integrity=True)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        _write_chunks(k, fd, 3)
        k.sys.fsync(fd)  # writes 1..4 (with the rewrite of the dropped one)
        for i in range(3, 9):
            assert k.sys.pwrite(fd, _pattern(i), i * CHUNK) == CHUNK
        k.sys.fsync(fd)
        assert _host(image, 0, 9 * CHUNK) == b"".join(_pattern(i) for i in range(9))
        assert k.devices[0].recovery["restarts"] == 1
        assert _counters(k)["integrity_repaired"] == 8
        k.sys.close(fd)


# --------------------------------------------------------------------------- async API


def test_the_async_submit_api_is_protected_too(image: str) -> None:
    """``BlockDevice.submit``: a write, then a FLUSH from the write's callback (on the
    interrupt thread); the read-back and the rewrite of the dropped write run there
    too, and the FLUSH's callback sees success once the image holds the data."""
    plan = _plan({"when": {"event": "blk.write", "nth": 1}, "what": {"action": "drop_write"}})
    with kernel.boot(devices=[kernel.Blk(image, faults=plan, integrity=True)]) as k:
        blk = k.devices[0].block
        assert blk is not None
        done = threading.Event()
        results: list[Any] = []
        data = _pattern(4)

        def flushed(result: Any) -> None:
            results.append(result)
            done.set()

        def written(result: Any) -> None:
            results.append(result)
            blk.submit("flush", 0, None, flushed)

        blk.submit("write", 0, data, written)
        assert done.wait(WAIT_S)
        assert results == [CHUNK, 0]
        assert _host(image, 0, CHUNK) == data
        assert blk.counters["integrity_repaired"] == 8


def test_concurrent_readers_and_writers_see_no_false_alarm(image: str) -> None:
    """No faults, three writers overwriting their regions (big writes, split into
    several requests, and fsyncs) while two readers read everything: a read racing a
    write to the same sectors is never taken for a corruption -- no mismatch, no error,
    and every sector read holds one of the versions written."""
    versions = 6
    region = 3 * kernel.blk.MAX_REQUEST_BYTES // 2  # two requests at least
    assert 3 * region <= IMAGE_SIZE
    sect = 512
    # what each sector of each region may hold: any version's bytes (a read racing a
    # write split into several requests may see some of them old, some new)
    want = [
        [
            {_pattern(100 * w + v, region)[o : o + sect] for v in range(versions)} | {bytes(sect)}
            for o in range(0, region, sect)
        ]
        for w in range(3)
    ]
    errors: list[BaseException] = []
    stop = threading.Event()
    with kernel.boot(devices=[kernel.Blk(image, integrity=True)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)

        def writer(w: int) -> None:
            try:
                for v in range(versions):
                    k.sys.pwrite(fd, _pattern(100 * w + v, region), w * region)
                    if v % 2:
                        k.sys.fsync(fd)
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        def reader() -> None:
            try:
                while not stop.is_set():
                    for w in range(3):
                        got = k.sys.pread(fd, region, w * region)
                        for n, ok in enumerate(want[w]):
                            if got[n * sect : (n + 1) * sect] not in ok:
                                errors.append(AssertionError(f"region {w} sector {n}: foreign"))
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        writers = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
        readers = [threading.Thread(target=reader) for _ in range(2)]
        for t in writers + readers:
            t.start()
        for t in writers:
            t.join(WAIT_S)
        stop.set()
        for t in readers:
            t.join(WAIT_S)
        assert not errors, errors[:3]
        c = _counters(k)
        assert c["integrity_mismatches"] == 0 and c["integrity_errors"] == 0
        assert c["integrity_checked"] > 0
        k.sys.close(fd)


def test_crc_map_is_bounded(image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """At INTEGRITY_MAX_SECTORS the oldest CRCs are dropped (counted): those sectors
    are no longer verified, the newest still are."""
    monkeypatch.setattr(kernel.blk, "INTEGRITY_MAX_SECTORS", 16)
    with kernel.boot(devices=[kernel.Blk(image, integrity=True)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        _write_chunks(k, fd, 3)  # 24 sectors
        c = _counters(k)
        assert c["integrity_evicted"] == 8
        k.sys.pread(fd, 3 * CHUNK, 0)
        assert c["integrity_checked"] == 16
        k.sys.close(fd)


def test_integrity_option_is_checked() -> None:
    with pytest.raises(ValueError, match="integrity"):
        kernel.Blk("/tmp/x.img", integrity="yes")  # type: ignore[arg-type]
    assert kernel.Blk("/tmp/x.img").integrity is False


# --------------------------------------------------------------------------- the matrix


def _matrix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", "faults", "matrix", "--workload", "blk", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_matrix_integrity_option() -> None:
    """``vlab faults matrix --integrity on|off``: with it (the default) the silent
    faults are survived; ``off`` shows the plain driver losing data (exit 1); a bad
    value is a one-line error (exit 2)."""
    on = _matrix("--only", "drop_write,corrupt_read", "--json")
    assert on.returncode == 0, on.stdout + on.stderr
    assert {r["fault"]: r["outcome"] for r in json.loads(on.stdout)["rows"]} == {
        "drop_write": "survived",
        "corrupt_read": "survived",
    }
    off = _matrix("--only", "drop_write", "--integrity", "off", "--json")
    assert off.returncode == 1, off.stdout + off.stderr
    (row,) = json.loads(off.stdout)["rows"]
    assert row["outcome"] == "data-lost" and row["fired"] == 1
    bad = _matrix("--integrity", "maybe")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
