"""A real Linux guest (QEMU, TCG) drives a vhost-user-blk backend with its own
``virtio_blk`` driver: capacity, reads of host data, direct and buffered writes found
by the host, ext2/ext4 checked by the host's ``e2fsck``, and backend restarts (between
boots, and under a running guest with ``reconnect=1``).

Every scenario runs against ``qemu-storage-daemon`` (the known-good reference) and our
``python -m vdev blk --vhost-user``. Each test is one or two boots (about 5 s each with
qemu-storage-daemon on this class of machine). Tests skip, naming what is missing, when
QEMU, busybox-static, the kernel cache (``vlab vm --setup``) or the backend is missing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hostops.rundir import RuntimeDir
from tests.interop_require import skip_or_fail
from tools.initramfs import CpioWriter
from tools.vm import (
    Backend,
    Guest,
    GuestTimeout,
    MissingPrerequisite,
    check_prerequisites,
    find_busybox,
    run_in_guest,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SECTOR = 512


@functools.cache
def _missing(backend: str) -> str | None:
    try:
        check_prerequisites(backend)
    except MissingPrerequisite as e:
        return str(e)
    return None


@pytest.fixture(params=["qsd", "vlab"])
def backend(request: pytest.FixtureRequest) -> str:
    """The backend kind; skips with the reason when it or the guest cannot run."""
    why = _missing(request.param)
    if why is not None:
        skip_or_fail(why)
    return str(request.param)


def _e2fsck() -> str:
    path = shutil.which("e2fsck", path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin")
    if path is None:
        skip_or_fail("e2fsck not found: install the Debian package e2fsprogs")
    return path


def _image(tmp_path: Path, size: int, data: dict[int, bytes] | None = None) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(size)
        for off, chunk in (data or {}).items():
            f.seek(off)
            f.write(chunk)
    return img


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _md5s(output: str) -> list[str]:
    return re.findall(r"^([0-9a-f]{32})\b", output, re.M)


def test_our_cpio_is_read_by_busybox_cpio(tmp_path: Path) -> None:
    """The newc writer against an independent reader (busybox cpio), no QEMU needed."""
    try:
        bb = str(find_busybox())
    except MissingPrerequisite as e:
        skip_or_fail(str(e))
    archive = tmp_path / "a.cpio"
    payload = random.Random(1).randbytes(1001)  # not a multiple of 4: data padding
    with open(archive, "wb") as f:
        w = CpioWriter(f)
        w.add_dir("d")
        w.add_file("d/x.bin", payload, 0o640)
        w.add_file("d/empty", b"")
        w.add_symlink("d/link", "x.bin")
        w.add_dir("d/abcde")  # name lengths 1..7 exercise the header padding
        size = w.finish()
    assert size == archive.stat().st_size and size % 512 == 0
    listing = subprocess.run(
        [bb, "cpio", "-t"], input=archive.read_bytes(), capture_output=True, check=True
    ).stdout.split()
    assert listing == [b"d", b"d/x.bin", b"d/empty", b"d/link", b"d/abcde"]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([bb, "cpio", "-id"], input=archive.read_bytes(), cwd=out, check=True)
    assert (out / "d/x.bin").read_bytes() == payload
    assert (out / "d/x.bin").stat().st_mode & 0o777 == 0o640
    assert (out / "d/empty").read_bytes() == b""
    assert os.readlink(out / "d/link") == "x.bin"
    assert (out / "d/abcde").is_dir()


def test_guest_sees_capacity_and_reads_host_data(backend: str, tmp_path: Path) -> None:
    size = 8 << 20
    rng = random.Random(3)
    sectors = [0, 1, 7, 4095, size // SECTOR - 1]
    data = {s * SECTOR: rng.randbytes(SECTOR) for s in sectors}
    data[1 << 20] = rng.randbytes(256 << 10)  # a larger extent: several requests
    img = _image(tmp_path, size, data)
    cmd = "cat /sys/block/vda/size\n"
    cmd += "".join(
        f"dd if=/dev/vda bs=512 skip={s} count=1 2>/dev/null | md5sum\n" for s in sectors
    )
    cmd += "dd if=/dev/vda bs=4096 skip=256 count=64 iflag=direct 2>/dev/null | md5sum\n"
    status, out = run_in_guest(str(img), cmd, backend=backend)
    assert status == 0, out
    assert out.splitlines()[0] == str(size // SECTOR)
    want = [_md5(data[s * SECTOR]) for s in sectors] + [_md5(data[1 << 20])]
    assert _md5s(out) == want


def test_guest_writes_are_found_by_the_host(backend: str, tmp_path: Path) -> None:
    size = 16 << 20
    img = _image(tmp_path, size)
    direct_at, buffered_at, n = 1 << 20, 8 << 20, 1 << 20
    cmd = f"""
        set -e
        head -c {n} /dev/urandom > /tmp/a
        head -c {n} /dev/urandom > /tmp/b
        md5sum /tmp/a /tmp/b
        dd if=/tmp/a of=/dev/vda bs=4096 seek={direct_at // 4096} oflag=direct conv=notrunc \
            2>/dev/null
        dd if=/tmp/b of=/dev/vda bs=65536 seek={buffered_at // 65536} conv=notrunc 2>/dev/null
        sync
        echo 3 > /proc/sys/vm/drop_caches
        dd if=/dev/vda bs=4096 skip={direct_at // 4096} count={n // 4096} iflag=direct \
            2>/dev/null | md5sum
        dd if=/dev/vda bs=65536 skip={buffered_at // 65536} count={n // 65536} 2>/dev/null \
            | md5sum
    """
    status, out = run_in_guest(str(img), cmd, backend=backend)
    assert status == 0, out
    a, b, a_back, b_back = _md5s(out)
    assert (a_back, b_back) == (a, b)
    host = img.read_bytes()
    assert _md5(host[direct_at : direct_at + n]) == a
    assert _md5(host[buffered_at : buffered_at + n]) == b
    assert host[:direct_at].count(0) == direct_at  # nothing written out of place
    assert host[direct_at + n : buffered_at].count(0) == buffered_at - direct_at - n
    assert host[buffered_at + n :].count(0) == size - buffered_at - n


def test_ext2_made_in_the_guest_is_clean(backend: str, tmp_path: Path) -> None:
    e2fsck = _e2fsck()
    img = _image(tmp_path, 32 << 20)
    cmd = """
        set -e
        mke2fs -q /dev/vda
        mount -t ext2 /dev/vda /mnt
        mkdir /mnt/dir
        echo hello-from-the-guest > /mnt/dir/hello.txt
        cp /bin/busybox /mnt/busybox.copy
        umount /mnt
        mount -t ext2 -o ro /dev/vda /mnt
        cat /mnt/dir/hello.txt
        md5sum /bin/busybox /mnt/busybox.copy
        umount /mnt
    """
    status, out = run_in_guest(str(img), cmd, backend=backend)
    assert status == 0, out
    assert "hello-from-the-guest" in out
    orig, copy = _md5s(out)
    assert orig == copy
    fsck = subprocess.run([e2fsck, "-fn", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    debugfs = shutil.which("debugfs", path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin")
    if debugfs is not None:
        got = subprocess.run(
            [debugfs, "-R", "cat /dir/hello.txt", str(img)], capture_output=True, text=True
        )
        assert got.stdout == "hello-from-the-guest\n"


def test_ext4_made_on_the_host_is_used_and_clean(backend: str, tmp_path: Path) -> None:
    e2fsck = _e2fsck()
    mkfs = shutil.which("mkfs.ext4", path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin")
    if mkfs is None:
        skip_or_fail("mkfs.ext4 not found: install the Debian package e2fsprogs")
    img = _image(tmp_path, 32 << 20)
    subprocess.run([mkfs, "-q", "-F", str(img)], check=True)
    cmd = """
        set -e
        mount -t ext4 /dev/vda /mnt
        for i in 1 2 3 4 5 6 7 8; do head -c 200000 /dev/urandom > /mnt/f$i; done
        md5sum /mnt/f* > /tmp/sums
        sync
        umount /mnt
        echo 3 > /proc/sys/vm/drop_caches
        mount -t ext4 /dev/vda /mnt
        md5sum -c /tmp/sums >/dev/null && echo sums-ok
        rm /mnt/f3
        umount /mnt
    """
    status, out = run_in_guest(str(img), cmd, backend=backend)
    assert status == 0, out
    assert "sums-ok" in out
    fsck = subprocess.run([e2fsck, "-fn", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_backend_restarted_between_boots(backend: str, tmp_path: Path) -> None:
    img = _image(tmp_path, 4 << 20)
    rd = RuntimeDir.create()
    be = Backend(backend, str(img), os.path.join(rd.path, "vhost.sock"), str(tmp_path / "be.log"))
    try:
        be.start()
        with Guest(str(img), backend=be) as g:
            r = g.run("echo first-boot | dd of=/dev/vda bs=512 conv=sync oflag=direct 2>/dev/null")
            assert r.status == 0, r.output
        first_pid = be.pid
        be.restart()
        assert be.pid != first_pid and be.starts == 2
        with Guest(str(img), backend=be) as g:
            r = g.run("dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n 1")
            assert r.status == 0 and r.output == "first-boot\n", r.output
    finally:
        be.stop()
        rd.cleanup()


def test_reconnect_survives_backend_restart_under_idle_guest(backend: str, tmp_path: Path) -> None:
    data = random.Random(5).randbytes(64 << 10)
    img = _image(tmp_path, 4 << 20, {0: data})
    read = "dd if=/dev/vda bs=4096 count=16 iflag=direct 2>/dev/null | md5sum"
    with Guest(str(img), backend=backend, reconnect=True) as g:
        r = g.run(read)
        assert r.status == 0 and _md5s(r.output) == [_md5(data)], r.output
        assert g.backend is not None
        old = g.backend.pid
        g.restart_backend()
        assert g.backend.pid != old
        r = g.run(
            read + "; echo after-restart | dd of=/dev/vda bs=512 seek=100 conv=sync "
            "oflag=direct 2>/dev/null",
            timeout=60,
        )
        assert r.status == 0 and _md5s(r.output) == [_md5(data)], r.output
        assert g.boot_seconds > 0
    assert img.read_bytes()[100 * SECTOR : 100 * SECTOR + 13] == b"after-restart"


def test_vlab_counters_show_the_guests_features_and_requests(tmp_path: Path) -> None:
    why = _missing("vlab")
    if why is not None:
        skip_or_fail(why)
    img = _image(tmp_path, 8 << 20)
    rd = RuntimeDir.create()
    be = Backend("vlab", str(img), os.path.join(rd.path, "vhost.sock"), str(tmp_path / "be.log"))
    reads, writes = 256, 128
    try:
        be.start()
        offered = int(be.wait_log(r"listening on .*features (0x[0-9a-f]+)").group(1), 16)
        with Guest(str(img), backend=be) as g:
            r = g.run(
                f"dd if=/dev/vda of=/dev/null bs=4096 count={reads} iflag=direct 2>/dev/null\n"
                f"dd if=/dev/zero of=/dev/vda bs=4096 count={writes} oflag=direct 2>/dev/null\n"
            )
            assert r.status == 0, r.output
        closed = be.wait_log(r"connection 1 closed: .*\(totals: (.*)\)")
    finally:
        be.stop()
        rd.cleanup()
    acked = int(be.wait_log(r"connection 1: device active, features (0x[0-9a-f]+)").group(1), 16)
    totals = {k: int(v) for k, v in (kv.split() for kv in closed.group(1).split(", "))}
    assert acked & ~offered == 0, f"guest acked {acked:#x}, never offered (offered {offered:#x})"
    assert acked & (1 << 32), "Linux virtio_blk must accept VIRTIO_F_VERSION_1"
    if offered & (1 << 29):
        assert acked & (1 << 29), "Linux accepts VIRTIO_RING_F_EVENT_IDX when offered"
    assert totals["chains"] >= reads + writes, totals
    assert totals["bad_chains"] == totals["handler_errors"] == totals["ring_errors"] == 0, totals


def _any_backend() -> str:
    for kind in ("qsd", "vlab"):
        if _missing(kind) is None:
            return kind
    skip_or_fail(_missing("qsd") or "no backend")


def test_hanging_guest_is_killed_after_the_timeout(tmp_path: Path) -> None:
    img = _image(tmp_path, 1 << 20)
    with Guest(str(img), backend=_any_backend()) as g:
        with pytest.raises(GuestTimeout, match="did not finish within 2.0 s; QEMU killed"):
            g.run("echo started; sleep 600", timeout=2.0)
        assert "started" in g.console_lines
    # Guest.__exit__ cleaned up; the session fixture checks processes and run dirs


def test_cli_prints_output_and_returns_the_guest_status(tmp_path: Path) -> None:
    kind = _any_backend()
    img = _image(tmp_path, 2 << 20, {512: b"sector-one"})
    res = subprocess.run(
        [sys.executable, "-m", "tools.cli", "vm", "--backend", kind, "--image", str(img),
         "--timeout", "120", "--run", "dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null "
         "| head -c 10; echo; echo 'quotes \"$HOME\" ok'; exit 7"],
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert res.returncode == 7, res.stderr
    assert res.stdout == 'sector-one\nquotes "$HOME" ok\n', res.stdout  # no expansion
    assert re.search(r"guest booted in [0-9.]+ s", res.stderr)
