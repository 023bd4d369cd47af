"""Readahead, split submissions and the copy-avoiding calls of ``k.sys`` block files.

A real kernel and real virtio-blk device processes (an image file or a RAM disk):
sequential reads through ``k.sys`` are read ahead by the block file layer
(:mod:`kernel.blockfile`), big reads and writes are split into parts submitted together
by the block layer, and ``preadv``/``pwritev``/``preadinto`` move data between shared
memory and the caller's buffers. Every check is on data (byte for byte against a model
of what each block must hold, or the image file) and on the readahead counters
(``readahead_hits``, ``readahead_bytes``, ``readahead_dropped``). No sleeps: the
writer threads run a fixed number of writes and are joined with a timeout.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kernel
from kernel.blk import BlockDevice
from kernel.blockfile import IOV_MAX, RA_DIRECT_BYTES, RA_MAX_BYTES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BLOCK = 4096
WAIT_S = 60.0


def _blk(k: Any) -> BlockDevice:
    dev = k.devices[0].block
    assert isinstance(dev, BlockDevice)
    return dev


def _ra(k: Any) -> dict[str, int]:
    c = _blk(k).counters
    return {n: c[n] for n in ("readahead_hits", "readahead_bytes", "readahead_dropped")}


@pytest.fixture
def image(tmp_path: Path) -> Iterator[tuple[Path, bytearray]]:
    """A 16 MiB image of random bytes and its model."""
    data = bytearray(random.Random(12).randbytes(16 << 20))
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    yield path, data


def test_sequential_reads_exact_under_concurrent_writers(
    image: tuple[Path, bytearray],
) -> None:
    path, model = image
    size = len(model)
    nblocks = size // BLOCK
    lock = threading.Lock()
    busy = [0] * nblocks  # writes in flight per block
    gen = [0] * nblocks  # writes started per block
    errors: list[BaseException] = []
    writers = 3
    writes_each = 250

    with kernel.boot(devices=[kernel.Blk(str(path))]) as k:
        wfds = [k.sys.open("/dev/vda", os.O_RDWR) for _ in range(writers)]
        rfd = k.sys.open("/dev/vda", os.O_RDONLY)

        def writer(i: int) -> None:
            rnd = random.Random(100 + i)
            try:
                for _ in range(writes_each):
                    b = rnd.randrange(i, nblocks, writers)  # blocks of writer i only
                    # a whole block, or an odd piece of it (read-modify-write)
                    lo = rnd.choice((0, 0, rnd.randrange(BLOCK - 1)))
                    hi = rnd.choice((BLOCK, rnd.randrange(lo + 1, BLOCK + 1)))
                    data = rnd.randbytes(hi - lo)
                    with lock:
                        busy[b] += 1
                        gen[b] += 1
                    assert k.sys.pwrite(wfds[i], data, b * BLOCK + lo) == len(data)
                    with lock:
                        model[b * BLOCK + lo : b * BLOCK + hi] = data
                        busy[b] -= 1
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        verified = skipped = 0
        rnd = random.Random(7)
        buf = bytearray(RA_MAX_BYTES)
        # sequential passes with odd read sizes while the writers run
        while any(t.is_alive() for t in threads):
            off = rnd.randrange(0, size // 2)
            while off < size and any(t.is_alive() for t in threads):
                n = rnd.choice((BLOCK, 5000, 65536, 123457, 1 << 20))
                first, last = off // BLOCK, min(off + n, size) - 1
                with lock:
                    before = gen[first : last // BLOCK + 1]
                    quiet = not any(busy[first : last // BLOCK + 1])
                    want = bytes(model[off : off + n])
                if rnd.random() < 0.5:
                    got = k.sys.pread(rfd, n, off)
                else:
                    view = memoryview(buf)[:n]
                    got = bytes(view[: k.sys.preadinto(rfd, view, off)])
                assert len(got) == min(n, size - off)
                with lock:
                    unchanged = quiet and gen[first : last // BLOCK + 1] == before
                    unchanged = unchanged and not any(busy[first : last // BLOCK + 1])
                if unchanged:  # no write touched the range while it was read
                    assert got == want, f"read [{off}, +{n}) differs from the model"
                    verified += 1
                else:
                    skipped += 1
                off += len(got)
        for t in threads:
            t.join(WAIT_S)
            assert not t.is_alive()
        assert not errors, errors
        assert verified > 0
        # quiet now: a whole sequential pass must be exactly the model, with readahead
        before_hits = _ra(k)["readahead_hits"]
        whole = bytearray()
        off = 0
        while off < size:
            chunk = k.sys.pread(rfd, 65536 + 3, off)
            whole += chunk
            off += len(chunk)
        assert whole == model
        assert _ra(k)["readahead_hits"] > before_hits
        k.sys.fsync(wfds[0])
        for fd in (*wfds, rfd):
            k.sys.close(fd)
    assert path.read_bytes() == model  # the image holds it too


def test_readahead_never_reads_past_the_end() -> None:
    size = (1 << 20) + 3 * 512  # not a multiple of any window size
    with kernel.boot(devices=[kernel.Blk.memory(size)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        pattern = random.Random(3).randbytes(size)
        assert k.sys.pwrite(fd, pattern, 0) == size
        start = size - 300 * 1024 - 100  # unaligned
        before = _ra(k)
        got = bytearray()
        off = start
        while True:  # bounded: each read advances or returns b"" at the end
            chunk = k.sys.pread(fd, 4000, off)
            if not chunk:
                break
            got += chunk
            off += len(chunk)
        assert bytes(got) == pattern[start:]
        assert k.sys.pread(fd, 4000, size) == b""
        after = _ra(k)
        read_ahead = after["readahead_bytes"] - before["readahead_bytes"]
        assert 0 < read_ahead <= size - start  # never a byte past the end
        assert after["readahead_hits"] > before["readahead_hits"]
        k.sys.close(fd)
        assert _blk(k).failed is None


def test_random_access_drops_readahead(image: tuple[Path, bytearray]) -> None:
    path, model = image
    with kernel.boot(devices=[kernel.Blk(str(path))]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDONLY)
        for off in range(0, 32 * BLOCK, BLOCK):
            assert k.sys.pread(fd, BLOCK, off) == model[off : off + BLOCK]
        mid = _ra(k)
        assert mid["readahead_bytes"] > 0 and mid["readahead_hits"] > 0
        rnd = random.Random(5)
        prev_end = 32 * BLOCK
        for i in range(50):  # random reads: never where the last one ended
            off = rnd.randrange(0, len(model) - BLOCK)
            if off == prev_end:
                continue
            assert k.sys.pread(fd, 1000, off) == model[off : off + 1000]
            prev_end = off + 1000
            if i == 0:
                assert _ra(k)["readahead_dropped"] > mid["readahead_dropped"]
        after = _ra(k)
        assert after["readahead_bytes"] == mid["readahead_bytes"]  # nothing read ahead
        assert after["readahead_hits"] == mid["readahead_hits"]
        k.sys.close(fd)


def test_writes_from_anywhere_keep_readahead_coherent(image: tuple[Path, bytearray]) -> None:
    path, model = image
    with kernel.boot(devices=[kernel.Blk(str(path))]) as k:
        dev = _blk(k)
        rfd = k.sys.open("/dev/vda", os.O_RDONLY)
        wfd = k.sys.open("/dev/vda", os.O_WRONLY)
        # a stream: windows are in flight / filled beyond 96 KiB
        for off in range(0, 96 * 1024, BLOCK):
            assert k.sys.pread(rfd, BLOCK, off) == model[off : off + BLOCK]
        dropped = _ra(k)["readahead_dropped"]
        # another fd writes into the window
        assert _ra(k)["readahead_bytes"] > 0
        k.sys.pwrite(wfd, b"A" * 100, 96 * 1024 + 10)
        model[96 * 1024 + 10 : 96 * 1024 + 110] = b"A" * 100
        assert _ra(k)["readahead_dropped"] > dropped
        # the async API writes a bit further on
        done = threading.Event()
        box: list[Any] = []

        def cb(result: Any) -> None:
            box.append(result)
            done.set()

        dev.submit("write", 104 * 1024, b"B" * 512, cb)
        assert done.wait(WAIT_S) and box == [512]
        model[104 * 1024 : 104 * 1024 + 512] = b"B" * 512
        zero_at = 112 * 1024
        dev.write_zeroes(zero_at, 1024)
        model[zero_at : zero_at + 1024] = bytes(1024)
        for off in range(96 * 1024, 160 * 1024, BLOCK):  # the stream goes on
            assert k.sys.pread(rfd, BLOCK, off) == model[off : off + BLOCK], off
        k.sys.close(rfd)
        k.sys.close(wfd)


def test_failed_write_turns_readahead_off(image: tuple[Path, bytearray]) -> None:
    """A write the device failed may or may not have landed: no window is trusted."""
    path, model = image
    plan = {
        "seed": 1,
        "rules": [{"when": {"event": "blk.write", "nth": 1}, "what": {"action": "ioerr"}}],
    }
    with kernel.boot(devices=[kernel.Blk(str(path), faults=plan)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        with pytest.raises(OSError) as ei:
            k.sys.pwrite(fd, b"x" * BLOCK, 0)
        assert ei.value.errno == errno.EIO
        for off in range(0, 64 * BLOCK, BLOCK):
            assert k.sys.pread(fd, BLOCK, off) == model[off : off + BLOCK]
        assert _ra(k)["readahead_bytes"] == 0
        k.sys.close(fd)


def test_writes_queued_before_the_first_open_stay_coherent(
    image: tuple[Path, bytearray],
) -> None:
    """Async writes queued before any block file exists (so before the readahead
    watches the device) are not in windows read while they may be in flight."""
    path, model = image
    with kernel.boot(devices=[kernel.Blk(str(path))]) as k:
        dev = _blk(k)
        lock = threading.Lock()
        left = [32]
        done = threading.Event()

        def cb(result: Any) -> None:
            assert result == BLOCK
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()

        for i in range(32):  # queued, not yet published
            data = bytes([i + 1]) * BLOCK
            dev.submit("write", (40 + i) * BLOCK, data, cb, kick=False)
            model[(40 + i) * BLOCK : (41 + i) * BLOCK] = data
        fd = k.sys.open("/dev/vda", os.O_RDONLY)
        dev.kick()
        assert done.wait(WAIT_S)
        for off in range(0, 128 * BLOCK, BLOCK):
            assert k.sys.pread(fd, BLOCK, off) == model[off : off + BLOCK], off
        assert _ra(k)["readahead_hits"] > 0
        k.sys.close(fd)


def test_o_direct_reads_nothing_ahead(image: tuple[Path, bytearray]) -> None:
    path, model = image
    with kernel.boot(devices=[kernel.Blk(str(path))]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        for off in range(0, 64 * BLOCK, BLOCK):
            assert k.sys.pread(fd, BLOCK, off) == model[off : off + BLOCK]
        assert _ra(k) == dict.fromkeys(_ra(k), 0)
        k.sys.close(fd)


def test_large_sequential_reads_go_straight_to_the_device(
    image: tuple[Path, bytearray],
) -> None:
    """Reads of RA_DIRECT_BYTES or more are split and sent together without windows;
    a stream of smaller reads right after them is read ahead again."""
    path, model = image
    big = RA_DIRECT_BYTES
    with kernel.boot(devices=[kernel.Blk(str(path))]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDONLY)
        for off in range(0, 6 * big, big):
            assert k.sys.pread(fd, big, off) == model[off : off + big]
        assert _ra(k)["readahead_bytes"] == 0
        for off in range(6 * big, 6 * big + 64 * 16384, 16384):
            assert k.sys.pread(fd, 16384, off) == model[off : off + 16384]
        assert _ra(k)["readahead_hits"] > 0 and _ra(k)["readahead_bytes"] > 0
        k.sys.close(fd)


def test_readahead_with_integrity_mode(tmp_path: Path) -> None:
    data = random.Random(9).randbytes(4 << 20)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    with kernel.boot(devices=[kernel.Blk(str(path), integrity=True)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        k.sys.pwrite(fd, b"Z" * 70000, 12345)
        want = data[:12345] + b"Z" * 70000 + data[12345 + 70000 :]
        got = bytearray()
        while len(got) < len(want):
            got += k.sys.pread(fd, 30000, len(got))
        assert got == want
        c = _blk(k).counters
        assert c["integrity_checked"] > 0 and c["integrity_errors"] == 0
        assert c["readahead_hits"] > 0
        k.sys.close(fd)


def test_split_submissions_preadinto_and_pwritev_big(image: tuple[Path, bytearray]) -> None:
    path, model = image
    with kernel.boot(devices=[kernel.Blk(str(path))]) as k:
        dev = _blk(k)
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        n = 3 * dev.max_request_bytes + 777  # several parts in flight at once
        off = 1000
        back = bytearray(n + 10)
        view = memoryview(back)[5 : 5 + n]
        assert k.sys.preadinto(fd, view, off) == n
        assert view == model[off : off + n]
        assert back[:5] == bytes(5) and back[-5:] == bytes(5)  # nothing outside the view
        rnd = random.Random(1)
        bufs = [rnd.randbytes(m) for m in (1, 511, dev.max_request_bytes + 3, 0, 70001)]
        total = sum(len(b) for b in bufs)
        assert k.sys.pwritev(fd, bufs, 333) == total
        model[333 : 333 + total] = b"".join(bufs)
        out = [bytearray(m) for m in (7, 0, 600000, 1, total)]
        got = k.sys.preadv(fd, out, 300)
        assert got == sum(len(b) for b in out)
        assert b"".join(out) == model[300 : 300 + got]
        k.sys.fsync(fd)
        k.sys.close(fd)
    assert path.read_bytes() == model


def test_preadv_pwritev_preadinto_match_os(tmp_path: Path) -> None:
    """The same calls on the block device and on a plain file (with ``os``) give the
    same counts and bytes, short reads at the end included."""
    size = 256 * 1024
    data = random.Random(4).randbytes(size)
    img = tmp_path / "disk.img"
    img.write_bytes(data)
    plain = tmp_path / "plain"
    plain.write_bytes(data)
    pfd = os.open(plain, os.O_RDWR)
    try:
        with kernel.boot(devices=[kernel.Blk(str(img))]) as k:
            fd = k.sys.open("/dev/vda", os.O_RDWR)
            rnd = random.Random(8)
            for _ in range(40):
                off = rnd.randrange(0, size)
                sizes = [rnd.choice((0, 1, 3, 511, 512, 513, 4096, 9999)) for _ in range(4)]
                wbufs = [rnd.randbytes(m) for m in sizes]
                room = size - off
                if sum(sizes) <= room:  # a plain file would grow; a disk cannot
                    assert k.sys.pwritev(fd, wbufs, off) == os.pwritev(pfd, wbufs, off)
                a = [bytearray(m) for m in sizes]
                b = [bytearray(m) for m in sizes]
                assert k.sys.preadv(fd, a, off) == os.preadv(pfd, b, off)
                assert a == b
                one_a, one_b = bytearray(sizes[0] + 100), bytearray(sizes[0] + 100)
                assert k.sys.preadinto(fd, one_a, off) == os.preadv(pfd, [one_b], off)
                assert one_a == one_b
            # at and past the end: nothing read
            assert k.sys.preadv(fd, [bytearray(10)], size) == 0
            assert k.sys.preadinto(fd, bytearray(10), size + 5) == 0
            assert k.sys.preadv(fd, [], 0) == 0 and k.sys.pwritev(fd, [], 0) == 0
            k.sys.close(fd)
    finally:
        os.close(pfd)


def test_vector_calls_bad_arguments() -> None:
    with kernel.boot(devices=[kernel.Blk.memory(64 * 1024)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        ro = k.sys.open("/dev/vda", os.O_RDONLY)
        wo = k.sys.open("/dev/vda", os.O_WRONLY)
        cases: list[tuple[Any, type[BaseException], int | None]] = [
            (lambda: k.sys.preadv(fd, [b"abc"], 0), BufferError, None),
            (lambda: k.sys.preadinto(fd, b"abc", 0), BufferError, None),
            (lambda: k.sys.preadv(fd, b"abc", 0), TypeError, None),
            (lambda: k.sys.preadv(fd, [1], 0), TypeError, None),
            (lambda: k.sys.pwritev(fd, ["x"], 0), TypeError, None),
            (lambda: k.sys.preadinto(fd, 5, 0), TypeError, None),
            (lambda: k.sys.preadv(fd, [bytearray(1)], "0"), TypeError, None),  # type: ignore[arg-type]
            (lambda: k.sys.preadv(fd, [bytearray(1)] * (IOV_MAX + 1), 0), OSError, errno.EINVAL),
            (lambda: k.sys.pwritev(fd, [b"x"] * (IOV_MAX + 1), 0), OSError, errno.EINVAL),
            (lambda: k.sys.preadv(fd, [bytearray(1)], -1), OSError, errno.EINVAL),
            (lambda: k.sys.pwritev(fd, [b"x"], -1), OSError, errno.EINVAL),
            (lambda: k.sys.preadinto(fd, bytearray(1), -1), OSError, errno.EINVAL),
            (lambda: k.sys.pwritev(fd, [b"x"], 64 * 1024), OSError, errno.ENXIO),
            (lambda: k.sys.preadv(wo, [bytearray(1)], 0), OSError, errno.EBADF),
            (lambda: k.sys.preadinto(wo, bytearray(1), 0), OSError, errno.EBADF),
            (lambda: k.sys.pwritev(ro, [b"x"], 0), OSError, errno.EBADF),
            (lambda: k.sys.preadv(999, [bytearray(1)], 0), OSError, errno.EBADF),
        ]
        for call, exc, code in cases:
            with pytest.raises(exc) as ei:
                call()
            if code is not None:
                assert isinstance(ei.value, OSError) and ei.value.errno == code
        # a view that is not flat bytes is taken as its bytes (as os does)
        words = memoryview(bytearray(16)).cast("I")
        assert k.sys.preadv(fd, [words], 0) == 16
        k.sys.close(fd)
        with pytest.raises(OSError) as ei:
            k.sys.preadv(fd, [bytearray(1)], 0)
        assert ei.value.errno == errno.EBADF
        k.sys.close(ro)
        k.sys.close(wo)
