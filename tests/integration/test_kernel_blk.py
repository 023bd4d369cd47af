"""The kernel core against a real virtio-blk device, over both transports.

The transport-independent tests run three times (the ``transport`` fixture):

* ``zmq``: our own device process (``python -m vdev blk --control ...``), started by
  the kernel -- POSIX shared memory, ZeroMQ doorbells;
* ``qsd``: ``qemu-storage-daemon``'s vhost-user-blk export, the kernel as vhost-user
  front-end (``kernel.VhostUserBlk``) -- memfd, eventfds, a Unix socket;
* ``vdev-vu``: our own back-end as a vhost-user server (``python -m vdev blk --image
  IMG --vhost-user SOCK``), the same front-end.

Tests that only make sense with our ZeroMQ device process (its metrics, SIGKILL through
``.pid`` of a process the kernel owns, DEVICE_NEEDS_RESET injection, the user's process
ending) stay zmq-only; killing a vhost-user back-end mid-I/O has its own test.

Real processes, real shared memory, real notifications: no mocks, no sleeps (waits are
poll loops with deadlines). Every test checks data byte for byte from the host side
(plain ``open()`` on the image) and asserts on the counters the kernel keeps (and, for
zmq, the device's own).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import kernel
from tests.interop_require import skip_or_fail
from vdev.virtio import BlkF, DeviceId, F

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

IMAGE_SIZE = 4 << 20
SECTOR = 512
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
NEXT, WRITE, INDIRECT = 1, 2, 4


def _pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _host_read(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QSD = "/usr/bin/qemu-storage-daemon"
BACKEND_START_S = 15.0


class VhostUserBackend:
    """A vhost-user-blk back-end process serving ``image`` on ``sock``: ``"qsd"``
    (qemu-storage-daemon) or ``"vdev-vu"`` (``python -m vdev blk --vhost-user``). Its
    output goes to ``log``. :meth:`start` returns once the socket listens."""

    def __init__(self, kind: str, image: str, sock: str, log: str, readonly: bool) -> None:
        self.kind, self.image, self.sock, self.log = kind, image, sock, log
        self.pidfile = sock + ".pid"
        if kind == "qsd":
            self.argv = [
                QSD,
                "--blockdev",
                f"driver=file,node-name=disk,filename={image},cache.direct=off,discard=unmap",
                "--export",
                "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,"
                f"addr.path={sock},writable={'off' if readonly else 'on'}",
                "--pidfile",
                self.pidfile,
            ]
        else:
            self.argv = [sys.executable, "-m", "vdev", "blk", "--image", image]
            self.argv += ["--readonly"] if readonly else []
            self.argv += ["--vhost-user", sock]
        self.proc: subprocess.Popen[bytes] | None = None

    def log_text(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _ready(self) -> bool:
        if not os.path.exists(self.sock):
            return False
        if self.kind == "qsd":  # the pid file is written once the export listens
            return os.path.exists(self.pidfile) and os.path.getsize(self.pidfile) > 0
        return "listening on" in self.log_text()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        tick = threading.Event()
        deadline = time.monotonic() + BACKEND_START_S
        while not self._ready():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.kind} exited {self.proc.returncode}: {self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.kind} not listening in time: {self.log_text()}")
            tick.wait(0.01)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)


class Transport:
    """How the kernel reaches the disk in this test (see the module docstring)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.dir = tempfile.mkdtemp(prefix="vu-kb-", dir="/tmp")  # short socket paths
        self.backends: list[VhostUserBackend] = []

    @property
    def zmq(self) -> bool:
        return self.kind == "zmq"

    def spec(self, image: str, *, readonly: bool = False) -> kernel.DeviceSpec:
        """The device spec for ``image`` (starting a back-end for vhost-user)."""
        if self.zmq:
            return kernel.Blk(image, readonly=readonly)
        n = len(self.backends)
        be = VhostUserBackend(
            self.kind,
            image,
            os.path.join(self.dir, f"b{n}.sock"),
            os.path.join(self.dir, f"b{n}.log"),
            readonly,
        )
        self.backends.append(be)
        be.start()
        return kernel.VhostUserBlk(be.sock)

    def close(self) -> None:
        for be in self.backends:
            be.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _skip_without_qsd(kind: str) -> None:
    if kind == "qsd" and not os.path.exists(QSD):
        skip_or_fail(f"{QSD} is not installed (Debian: qemu-system-common)")


@pytest.fixture(params=["zmq", "qsd", "vdev-vu"])
def transport(request):
    """Each transport in turn (qsd skipped without qemu-storage-daemon)."""
    _skip_without_qsd(request.param)
    t = Transport(request.param)
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def image(tmp_path) -> str:
    """A 4 MiB image filled with known random bytes."""
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.write(_pattern(IMAGE_SIZE, 1))
    return path


@pytest.fixture
def k(image, transport):
    """A kernel with one read-write disk on ``image`` over ``transport``; always shut
    down."""
    kern = kernel.boot(devices=[transport.spec(image)])
    try:
        yield kern
    finally:
        kern.shutdown()


@pytest.fixture
def kz(image):
    """A kernel with one read-write disk on ``image`` served by our ZeroMQ device
    process (for the tests that need that process)."""
    kern = kernel.boot(devices=[kernel.Blk(image)])
    try:
        yield kern
    finally:
        kern.shutdown()


def _oserror(code: int, fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == code, ei.value
    return ei.value


# --------------------------------------------------------------------------- bring-up


def test_boot_negotiates_blk_features(k, image):
    dev = k.devices[0]
    assert dev.name == "vda"
    assert dev.device_id == DeviceId.BLOCK
    assert dev.pid and os.path.exists(f"/proc/{dev.pid}")
    for name in ("VERSION_1", "EVENT_IDX", "INDIRECT_DESC", "FLUSH", "SIZE_MAX", "SEG_MAX"):
        assert name in dev.features
    assert "RO" not in dev.features
    assert dev.block.size == IMAGE_SIZE
    assert not dev.block.readonly
    st = k.sys.fstat(k.sys.open("/dev/vda"))
    assert st.st_size == IMAGE_SIZE
    import stat

    assert stat.S_ISBLK(st.st_mode)


# --------------------------------------------------------------------------- data path


def test_pwrite_reaches_the_image_byte_for_byte(k, image):
    fd = k.sys.open("/dev/vda", os.O_RDWR)
    data = _pattern(8192, 2)
    assert k.sys.pwrite(fd, data, 65536) == len(data)
    small = b"hello, virtio"
    assert k.sys.pwrite(fd, small, 3 * SECTOR + 7) == len(small)
    assert _host_read(image, 65536, len(data)) == data
    assert _host_read(image, 3 * SECTOR + 7, len(small)) == small
    # the bytes around the unaligned write are untouched
    orig = _pattern(IMAGE_SIZE, 1)
    assert _host_read(image, 3 * SECTOR, 7) == orig[3 * SECTOR : 3 * SECTOR + 7]
    end = 3 * SECTOR + 7 + len(small)
    assert _host_read(image, end, 4 * SECTOR - end) == orig[end : 4 * SECTOR]
    k.sys.close(fd)


def test_reads_return_what_the_host_put_there(k, image):
    orig = _pattern(IMAGE_SIZE, 1)
    fd = k.sys.open("/dev/vda")
    for off, n in [(0, 512), (4096, 4096), (IMAGE_SIZE - 8192, 8192), (12345, 54321)]:
        assert k.sys.pread(fd, n, off) == orig[off : off + n]
    # read() advances the position, lseek moves it
    assert k.sys.lseek(fd, 100, os.SEEK_SET) == 100
    assert k.sys.read(fd, 50) == orig[100:150]
    assert k.sys.read(fd, 50) == orig[150:200]
    assert k.sys.lseek(fd, -10, os.SEEK_CUR) == 190
    assert k.sys.lseek(fd, -512, os.SEEK_END) == IMAGE_SIZE - 512
    assert k.sys.read(fd, 4096) == orig[-512:]


def test_unaligned_reads_and_writes(k, image):
    model = bytearray(_pattern(IMAGE_SIZE, 1))
    fd = k.sys.open("/dev/vda", os.O_RDWR)
    rnd = random.Random(7)
    cases = [(1, 1), (511, 2), (510, 3), (1000, 3000), (4095, 1), (8191, 4098), (700, 100)]
    cases += [(rnd.randrange(0, 1 << 20), rnd.randrange(1, 20000)) for _ in range(20)]
    for off, n in cases:
        data = rnd.randbytes(n)
        assert k.sys.pwrite(fd, data, off) == n
        model[off : off + n] = data
        lo, hi = max(0, off - 600), off + n + 600
        assert k.sys.pread(fd, hi - lo, lo) == bytes(model[lo:hi])
    with open(image, "rb") as f:
        assert f.read() == bytes(model)


def test_eight_threads_on_disjoint_regions(k, image):
    fd = k.sys.open("/dev/vda", os.O_RDWR)
    region = 256 << 10
    dev = k.devices[0]
    before = dev.queues[0].stats.requests

    def worker(t: int) -> bytes:
        rnd = random.Random(100 + t)
        base = t * region
        model = bytearray(_pattern(IMAGE_SIZE, 1)[base : base + region])
        for _ in range(40):
            off = rnd.randrange(0, region - 5000)
            data = rnd.randbytes(rnd.choice([512, 4096, 777, 4999]))
            assert k.sys.pwrite(fd, data, base + off) == len(data)
            model[off : off + len(data)] = data
            got = k.sys.pread(fd, 4096, base + (off // 4096) * 4096)
            want = bytes(model[(off // 4096) * 4096 : (off // 4096) * 4096 + 4096])
            assert got == want
        assert k.sys.pread(fd, region, base) == bytes(model)
        return bytes(model)

    with ThreadPoolExecutor(8) as pool:
        models = list(pool.map(worker, range(8)))
    for t, model in enumerate(models):
        assert _host_read(image, t * region, region) == model
    s = dev.queues[0].stats
    assert s.requests - before >= 8 * 80
    assert s.completions == s.requests
    assert s.kicks_sent > 0 and s.interrupts > 0
    assert s.kicks_suppressed > 0  # published while the device was busy: no doorbell
    assert s.kicks_sent < s.requests  # EVENT_IDX saved doorbells


def test_concurrent_submission_suppresses_kicks(k):
    """Requests submitted one by one while the device is busy draining are published
    without a doorbell (EVENT_IDX): kicks_suppressed grows."""
    blk = k.devices[0].block
    s = k.devices[0].queues[0].stats
    k0 = s.kicks_suppressed
    results: list[object] = []
    done = threading.Event()
    total = 400

    def cb(r: object) -> None:
        results.append(r)
        if len(results) == total:
            done.set()

    for i in range(total):
        blk.submit("read", (i % 64) * 4096, 4096, cb)  # kick decision after every one
    assert done.wait(30)
    bad = [r for r in results if not (isinstance(r, bytes) and len(r) == 4096)]
    assert not bad, bad[:3]
    assert s.kicks_suppressed > k0
    assert s.interrupts_suppressed > 0


def test_batched_submission_takes_one_kick(k, image):
    blk = k.devices[0].block
    s = k.devices[0].queues[0].stats
    orig = _pattern(IMAGE_SIZE, 1)
    got: dict[int, object] = {}
    done = threading.Event()

    def make_cb(off: int):
        def cb(r: object) -> None:
            got[off] = r
            if len(got) == 32:
                done.set()

        return cb

    kicks0, req0 = s.kicks_sent + s.kicks_suppressed, s.requests
    for i in range(32):
        blk.submit("read", i * 8192, 4096, make_cb(i * 8192), kick=False)
    blk.kick()
    assert done.wait(30)
    assert s.requests - req0 == 32
    assert s.kicks_sent + s.kicks_suppressed - kicks0 <= 1  # one kick decision for 32
    for off, r in got.items():
        assert r == orig[off : off + 4096]


def test_one_mib_write_is_split_into_requests(k, image, transport):
    blk = k.devices[0].block
    s = k.devices[0].queues[0].stats
    step = blk.max_request_bytes
    expected = -(-(1 << 20) // step)
    assert expected > 1, "the driver should split 1 MiB"
    fd = k.sys.open("/dev/vda", os.O_RDWR)
    data = _pattern(1 << 20, 3)
    r0 = s.requests
    assert k.sys.pwrite(fd, data, 1 << 20) == len(data)
    assert s.requests - r0 == expected
    assert _host_read(image, 1 << 20, 1 << 20) == data
    r1 = s.requests
    assert k.sys.pread(fd, 1 << 20, 1 << 20) == data
    assert s.requests - r1 == expected
    if transport.zmq:
        m = k.devices[0].metrics()["device"]
        assert m["bytes_written"] >= 1 << 20
    else:
        assert k.devices[0].metrics() == {}  # vhost-user cannot ask a back-end


def test_discard_and_write_zeroes(k, image, transport):
    blk = k.devices[0].block
    assert blk.has_discard and blk.has_write_zeroes
    s = k.devices[0].queues[0].stats
    r0 = s.requests
    blk.write_zeroes(8192, 8192)
    assert _host_read(image, 8192, 8192) == bytes(8192)
    blk.discard(65536, 65536)
    assert _host_read(image, 65536, 65536) == bytes(65536)
    assert _host_read(image, 0, 8192) == _pattern(IMAGE_SIZE, 1)[:8192]
    assert s.requests - r0 == 2  # one WRITE_ZEROES, one DISCARD: not emulated
    if transport.zmq:
        m = k.devices[0].metrics()["device"]
        assert m["discards"] >= 1 and m["write_zeroes"] >= 1


# --------------------------------------------------------------------------- the ring


def test_ring_layout_shows_the_chain_of_a_write(k):
    dev = k.devices[0]
    fd = k.sys.open("/dev/vda", os.O_RDWR)
    data = _pattern(4096, 9)
    offset = 16 * SECTOR
    assert k.sys.pwrite(fd, data, offset) == 4096
    lay = dev.ring_layout(0)
    mem, n = lay.memory, lay.size
    assert mem.readonly
    with pytest.raises(TypeError):
        mem[0] = 1  # read-only view
    avail_idx = U16.unpack_from(mem, lay.avail + 2)[0]
    head = U16.unpack_from(mem, lay.avail + 4 + 2 * ((avail_idx - 1) % n))[0]
    assert head < n
    addr, ln, flags, nxt = DESC.unpack_from(mem, lay.desc + 16 * head)
    assert (ln, flags) == (16, NEXT)  # header: readable, 16 bytes
    rtype, _reserved, sector = struct.unpack_from("<IIQ", mem, addr)
    assert (rtype, sector) == (1, offset // SECTOR)  # VIRTIO_BLK_T_OUT
    addr, ln, flags, nxt = DESC.unpack_from(mem, lay.desc + 16 * nxt)
    assert (ln, flags) == (4096, NEXT)  # data: readable for OUT
    assert bytes(mem[addr : addr + 4096]) == data
    addr, ln, flags, nxt = DESC.unpack_from(mem, lay.desc + 16 * nxt)
    assert (ln, flags) == (1, WRITE)  # status: 1 byte, device-writable, last
    assert mem[addr] == 0  # VIRTIO_BLK_S_OK
    used_idx = U16.unpack_from(mem, lay.used + 2)[0]
    assert used_idx == avail_idx  # everything made available has been used
    uid, ulen = USED_ELEM.unpack_from(mem, lay.used + 4 + 8 * ((used_idx - 1) % n))
    assert (uid, ulen) == (head, 1)  # the device wrote only the status byte
    # a read: used len is data + status
    k.sys.pread(fd, 4096, offset)
    used_idx = U16.unpack_from(mem, lay.used + 2)[0]
    uid, ulen = USED_ELEM.unpack_from(mem, lay.used + 4 + 8 * ((used_idx - 1) % n))
    assert ulen == 4096 + 1
    _, ln, flags, nxt = DESC.unpack_from(mem, lay.desc + 16 * uid)
    assert (ln, flags & INDIRECT) == (16, 0)
    _, ln, flags, _ = DESC.unpack_from(mem, lay.desc + 16 * nxt)
    assert (ln, flags) == (4096, NEXT | WRITE)  # data: device-writable for IN
    del mem, lay


# --------------------------------------------------------------------------- errors


def test_readonly_image_refuses_writes(image, transport):
    with kernel.boot(devices=[transport.spec(image, readonly=True)]) as k:
        dev = k.devices[0]
        assert "RO" in dev.features and dev.block.readonly
        assert dev.feature_bits & (1 << BlkF.RO)
        _oserror(errno.EROFS, k.sys.open, "/dev/vda", os.O_RDWR)
        _oserror(errno.EROFS, k.sys.open, "/dev/vda", os.O_WRONLY)
        fd = k.sys.open("/dev/vda", os.O_RDONLY)
        _oserror(errno.EBADF, k.sys.pwrite, fd, b"x" * 512, 0)  # fd not open for writing
        _oserror(errno.EROFS, dev.block.write, 0, b"x" * 512)
        _oserror(errno.EROFS, dev.block.discard, 0, 512)
        assert k.sys.pread(fd, 512, 0) == _pattern(IMAGE_SIZE, 1)[:512]
        k.sys.fsync(fd)  # fsync of a read-only device is fine
    assert _host_read(image, 0, 512) == _pattern(IMAGE_SIZE, 1)[:512]


def test_io_beyond_the_end(k, image):
    fd = k.sys.open("/dev/vda", os.O_RDWR)
    orig = _pattern(IMAGE_SIZE, 1)
    assert k.sys.pread(fd, 1000, IMAGE_SIZE - 100) == orig[-100:]  # short read
    assert k.sys.pread(fd, 10, IMAGE_SIZE) == b""
    assert k.sys.pread(fd, 10, IMAGE_SIZE + 5000) == b""
    _oserror(errno.ENXIO, k.sys.pwrite, fd, b"x", IMAGE_SIZE)
    _oserror(errno.ENXIO, k.sys.pwrite, fd, b"x" * 4096, IMAGE_SIZE + 4096)
    assert k.sys.pwrite(fd, b"y" * 100, IMAGE_SIZE - 10) == 10  # cut at the end
    assert _host_read(image, IMAGE_SIZE - 10, 100) == b"y" * 10
    assert os.path.getsize(image) == IMAGE_SIZE
    k.sys.lseek(fd, 0, os.SEEK_END)
    assert k.sys.read(fd, 10) == b""
    _oserror(errno.ENXIO, k.sys.write, fd, b"z")


def test_fsync_reaches_the_device(k, image, transport):
    dev = k.devices[0]
    assert dev.block.has_flush
    fd = k.sys.open("/dev/vda", os.O_RDWR)
    f0 = dev.metrics()["device"]["flushes"] if transport.zmq else 0
    k.sys.pwrite(fd, b"durable", 0)
    r0 = dev.queues[0].stats.requests
    k.sys.fsync(fd)
    assert dev.queues[0].stats.requests == r0 + 1  # one FLUSH went to the device
    assert _host_read(image, 0, 7) == b"durable"
    if transport.zmq:
        assert dev.metrics()["device"]["flushes"] >= f0 + 1


def test_errno_cases(k):
    sys_ = k.sys
    _oserror(errno.ENOENT, sys_.open, "/dev/vdz")
    _oserror(errno.ENOENT, sys_.open, "/dev/sda")
    _oserror(errno.ENOENT, sys_.open, "vda")
    _oserror(errno.ENOENT, sys_.open, "/tmp/vda")
    _oserror(errno.EBADF, sys_.read, 999, 1)
    _oserror(errno.EBADF, sys_.pwrite, 12345, b"x", 0)
    _oserror(errno.EBADF, sys_.fstat, 77)
    ro = sys_.open("/dev/vda", os.O_RDONLY)
    wo = sys_.open("/dev/vda", os.O_WRONLY)
    assert ro != wo and min(ro, wo) >= 3
    _oserror(errno.EBADF, sys_.write, ro, b"x")
    _oserror(errno.EBADF, sys_.pread, wo, 1, 0)
    _oserror(errno.EINVAL, sys_.pread, ro, 10, -1)
    _oserror(errno.EINVAL, sys_.pread, ro, -1, 0)
    _oserror(errno.EINVAL, sys_.read, ro, -5)
    _oserror(errno.EINVAL, sys_.pwrite, wo, b"x", -512)
    _oserror(errno.EINVAL, sys_.lseek, ro, 0, 42)
    _oserror(errno.EINVAL, sys_.lseek, ro, -1, os.SEEK_SET)
    _oserror(errno.EINVAL, sys_.lseek, ro, -IMAGE_SIZE - 1, os.SEEK_END)
    _oserror(errno.EINVAL, sys_.open, "/dev/vda", 3)  # access mode 3
    _oserror(errno.EEXIST, sys_.open, "/dev/vda", os.O_CREAT | os.O_EXCL | os.O_RDWR)
    blk = k.devices[0].block
    _oserror(errno.EINVAL, blk.read, 1, 512)  # the block layer takes whole sectors
    _oserror(errno.ENXIO, blk.read, IMAGE_SIZE, 512)
    sys_.close(ro)
    _oserror(errno.EBADF, sys_.close, ro)
    _oserror(errno.EBADF, sys_.read, ro, 1)
    assert sys_.open("/dev/vda") == ro  # lowest free fd is reused
    sys_.close(wo)


def test_counters_are_kept(k, image, transport):
    fd = k.sys.open("/dev/vda", os.O_RDWR)
    for i in range(10):
        k.sys.pwrite(fd, b"a" * 4096, i * 4096)
        assert k.sys.pread(fd, 4096, i * 4096) == b"a" * 4096
    assert _host_read(image, 0, 10 * 4096) == b"a" * 10 * 4096
    s = k.devices[0].queues[0].stats
    assert s.requests >= 20 and s.completions == s.requests
    assert s.kicks_sent >= 1 and s.interrupts >= 1
    if transport.zmq:
        m = k.devices[0].metrics()
        assert m["device"]["writes"] >= 10 and m["device"]["reads"] >= 10


def test_probe_error_names_the_device_and_says_why(tmp_path):
    missing = str(tmp_path / "nope.img")
    with pytest.raises(kernel.DeviceProbeError) as ei:
        kernel.boot(devices=[kernel.Blk(missing)])
    msg = str(ei.value)
    assert "vda" in msg and "image not found" in msg


def test_ram_disk(tmp_path):
    with kernel.boot(devices=[kernel.Blk.memory(1 << 20)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        assert k.sys.fstat(fd).st_size == 1 << 20
        assert k.sys.pwrite(fd, b"ram", 1000) == 3
        assert k.sys.pread(fd, 5, 999) == b"\0ram\0"


def test_two_disks(tmp_path, image):
    other = str(tmp_path / "b.img")
    with open(other, "wb") as f:
        f.truncate(1 << 20)
    with kernel.boot(devices=[kernel.Blk(image), kernel.Blk(other)]) as k:
        assert [d.name for d in k.devices] == ["vda", "vdb"]
        fd = k.sys.open("/dev/vdb", os.O_RDWR)
        k.sys.pwrite(fd, b"second", 0)
        assert _host_read(other, 0, 6) == b"second"
        assert _host_read(image, 0, 6) == _pattern(IMAGE_SIZE, 1)[:6]


# --------------------------------------------------------------------------- death


def _shm_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"vlab-{pid}-")]


def _kill_under_load(k, fd: int, kill, *, check_data: bool = False) -> None:
    """Eight threads loop on pwrite/pread (disjoint ranges) until each has completed I/O;
    then ``kill()`` the device: every caller must get EIO within 5 s, none may hang."""
    started = threading.Barrier(9)
    errors: list[tuple[BaseException, float]] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        rnd = random.Random(t)
        base = t * (256 << 10)
        first = True
        try:
            while True:
                off = base + rnd.randrange(0, 200 << 10)
                data = rnd.randbytes(8192)
                k.sys.pwrite(fd, data, off)
                got = k.sys.pread(fd, 8192, off)
                if check_data:
                    assert got == data
                if first:
                    first = False
                    started.wait(10)
        except BaseException as e:  # noqa: BLE001 - recorded and asserted below
            with lock:
                errors.append((e, time.monotonic()))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    started.wait(10)  # every thread has completed I/O and is looping
    killed_at = time.monotonic()
    kill()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads), "a caller is still waiting"
    assert len(errors) == 8
    for e, at in errors:
        assert isinstance(e, OSError) and e.errno == errno.EIO, repr(e)
        assert at - killed_at < 5


def test_sigkill_of_the_device_fails_every_caller_with_eio(image):
    """With ``on_device_death="fail"`` the foundation's behaviour stays: EIO for every
    caller within 5 s, and for good (the default restarts: test_kernel_recovery.py)."""
    k = kernel.boot(devices=[kernel.Blk(image, on_device_death="fail")])
    try:
        dev = k.devices[0]
        pid = dev.pid
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        _kill_under_load(k, fd, lambda: os.kill(pid, signal.SIGKILL))
        assert dev.failed is not None and dev.failed.errno == errno.EIO
        assert dev.failed.culprit == "device-gone"
        err = _oserror(errno.EIO, k.sys.pread, fd, 512, 0)  # new requests fail at once
        assert err.culprit == "device-gone"
    finally:
        k.shutdown()
    assert not os.path.exists(f"/proc/{pid}")
    assert _shm_of(os.getpid()) == []
    assert not os.path.exists(k.rundir.path)
    k.shutdown()  # idempotent


def test_shutdown_cleans_up(image):
    k = kernel.boot(devices=[kernel.Blk(image)])
    pid = k.devices[0].pid
    rundir = k.rundir.path
    assert os.path.isdir(rundir)
    k.shutdown()
    assert not os.path.exists(f"/proc/{pid}")
    assert not os.path.exists(rundir)
    assert _shm_of(os.getpid()) == []
    _oserror(errno.EBADF, k.sys.read, 3, 1)
    assert k.devices[0].block.failed is not None
    _oserror(errno.EIO, k.devices[0].block.read, 0, 512)


def test_ring_features_are_negotiated(k):
    dev = k.devices[0]
    assert dev.feature_bits & (1 << F.EVENT_IDX)
    assert dev.queues[0].dq is not None and dev.queues[0].dq.event_idx


def test_device_needs_reset_fails_in_flight_requests(kz):
    """A ring the device cannot trust (avail.idx jumps by more than N): the device sets
    DEVICE_NEEDS_RESET and rings CONFIG_CHANGE; the kernel fails what is in flight
    (EIO, culprit "device-broke-ring"), resets the device and goes on with it."""
    k = kz
    dev = k.devices[0]
    blk, q = dev.block, dev.queues[0]
    results: list[object] = []
    done = threading.Event()

    def cb(r: object) -> None:
        results.append(r)
        if len(results) == 4:
            done.set()

    for i in range(4):
        blk.submit("read", i * 4096, 4096, cb, kick=False)  # added, not yet published
    lay = dev.ring_layout(0)
    buf = dev.transport.region.buf  # the kernel's writable mapping: play a buggy driver
    with q.lock:
        idx = U16.unpack_from(buf, lay.avail + 2)[0]
        U16.pack_into(buf, lay.avail + 2, (idx + 3 * lay.size) & 0xFFFF)
    q.notify()
    pid = dev.pid
    assert dev.wait_recovered(1, 10)
    assert done.wait(10)
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
    assert all(r.culprit == "device-broke-ring" and "reset" in r.strerror for r in results)
    assert dev.failed is None and dev.pid == pid  # reset, not restarted
    assert dev.recovery["resets"] == 1 and dev.recovery["requests_failed_on_reset"] == 4
    assert blk.read(0, 512) == _pattern(IMAGE_SIZE, 1)[:512]
    assert dev.metrics()["device"] is not None  # the process itself is alive
    del lay, buf


def test_a_users_own_driver_registers_on_a_bus(image, transport):
    seen: list[int] = []

    class MyBlk(kernel.BlkDriver):
        @classmethod
        def features(cls, offered: int) -> int:
            seen.append(offered)
            return super().features(offered) & ~(1 << F.INDIRECT_DESC)

    bus = kernel.VirtioBus()
    with pytest.raises(kernel.DeviceProbeError, match="no driver registered for device id 2"):
        kernel.boot(devices=[transport.spec(image)], bus=bus)
    bus.register_driver(DeviceId.BLOCK, MyBlk)
    with kernel.boot(devices=[transport.spec(image)], bus=bus) as k:
        assert isinstance(k.devices[0].driver, MyBlk)
        assert seen and seen[0] & (1 << F.INDIRECT_DESC)
        assert "INDIRECT_DESC" not in k.devices[0].features
        fd = k.sys.open("/dev/vda")
        assert k.sys.pread(fd, 100, 0) == _pattern(IMAGE_SIZE, 1)[:100]


def test_blocking_io_in_a_completion_callback_is_refused(k):
    blk = k.devices[0].block
    got: list[object] = []
    done = threading.Event()

    def cb(r: object) -> None:
        try:
            blk.read(0, 512)
        except OSError as e:
            got.append(e)
        done.set()

    blk.submit("read", 0, 512, cb)
    assert done.wait(10)
    assert isinstance(got[0], OSError) and got[0].errno == errno.EDEADLK


# --------------------------------------------------------------------------- the user's process

_SCRIPT = r"""
import os, sys, kernel
k = kernel.boot(devices=[kernel.Blk(sys.argv[1])])
fd = k.sys.open("/dev/vda", os.O_RDWR)
k.sys.pwrite(fd, b"alive", 0)
print(k.devices[0].pid, k.rundir.path, flush=True)
with k:
    while True:
        k.sys.pwrite(fd, b"x" * 4096, 4096)
        k.sys.pread(fd, 4096, 4096)
"""


def _wait_gone(pid: int, timeout_s: float) -> bool:
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout_s)[0])
    finally:
        os.close(pidfd)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_the_users_process_ending_leaves_nothing(image, sig):
    import subprocess
    import sys

    p = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, image],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        line = p.stdout.readline().decode()
        assert line, p.stderr.read().decode()
        dev_pid, rundir = int(line.split()[0]), line.split()[1]
        p.send_signal(sig)
        code = p.wait(20)
        if sig == signal.SIGTERM:
            assert code == 143
        elif sig == signal.SIGINT:
            assert code != 0 and b"KeyboardInterrupt" in p.stderr.read()
        assert _wait_gone(dev_pid, 10), "device process outlived the kernel"
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"vlab-{p.pid}-")]
        if sig == signal.SIGKILL:
            assert os.path.isdir(rundir)  # nobody could clean up ...
            kernel.boot(devices=[]).shutdown()  # ... until the next boot sweeps it
        assert not os.path.exists(rundir)
        assert _host_read(image, 0, 5) == b"alive"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _walk(mem, table: int, first: int) -> list[tuple[int, int, int]]:
    out, i = [], first
    for _ in range(64):
        addr, ln, flags, nxt = DESC.unpack_from(mem, table + 16 * i)
        out.append((addr, ln, flags))
        if not flags & NEXT:
            return out
        i = nxt
    raise AssertionError("descriptor loop")


def test_multi_segment_requests_use_an_indirect_table(k, image):
    dev = k.devices[0]
    blk = dev.block
    blk.set_max_segment_size(4096)
    assert blk.max_request_bytes <= blk.max_segments * 4096
    fd = k.sys.open("/dev/vda", os.O_RDWR)
    data = _pattern(16 * 4096, 11)
    r0 = dev.queues[0].stats.requests
    assert k.sys.pwrite(fd, data, 1 << 20) == len(data)
    assert dev.queues[0].stats.requests - r0 == 1  # one request, 16 segments
    assert _host_read(image, 1 << 20, len(data)) == data
    lay = dev.ring_layout(0)
    mem = lay.memory
    idx = U16.unpack_from(mem, lay.avail + 2)[0]
    head = U16.unpack_from(mem, lay.avail + 4 + 2 * ((idx - 1) % lay.size))[0]
    addr, ln, flags, _ = DESC.unpack_from(mem, lay.desc + 16 * head)
    assert flags == INDIRECT and ln == 16 * 18  # header + 16 data + status
    chain = _walk(mem, addr, 0)
    assert [ln for _, ln, _ in chain] == [16] + [4096] * 16 + [1]
    assert [fl & WRITE for _, _, fl in chain] == [0] * 17 + [WRITE]
    assert b"".join(bytes(mem[a : a + n]) for a, n, _ in chain[1:-1]) == data
    assert k.sys.pread(fd, len(data), 1 << 20) == data
    del mem, lay


def test_without_indirect_descriptors_segments_are_chained_in_the_ring(image, transport):
    class NoIndirect(kernel.BlkDriver):
        supported_features = kernel.BlkDriver.supported_features & ~(1 << F.INDIRECT_DESC)

    bus = kernel.VirtioBus()
    bus.register_driver(DeviceId.BLOCK, NoIndirect)
    with kernel.boot(devices=[transport.spec(image)], bus=bus) as k:
        dev = k.devices[0]
        assert "INDIRECT_DESC" not in dev.features
        dev.block.set_max_segment_size(4096)
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        data = _pattern(8 * 4096, 12)
        assert k.sys.pwrite(fd, data, 4096) == len(data)
        assert _host_read(image, 4096, len(data)) == data
        lay = dev.ring_layout(0)
        mem = lay.memory
        idx = U16.unpack_from(mem, lay.avail + 2)[0]
        head = U16.unpack_from(mem, lay.avail + 4 + 2 * ((idx - 1) % lay.size))[0]
        chain = _walk(mem, lay.desc, head)
        assert [ln for _, ln, _ in chain] == [16] + [4096] * 8 + [1]
        assert not any(fl & INDIRECT for _, _, fl in chain)
        assert k.sys.pread(fd, len(data), 4096) == data
        del mem, lay


def test_normal_exit_without_shutdown_cleans_up_at_exit(image):
    import subprocess
    import sys

    script = (
        "import sys, kernel\n"
        "k = kernel.boot(devices=[kernel.Blk(sys.argv[1])])\n"
        "print(k.devices[0].pid, k.rundir.path, flush=True)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", script, image], capture_output=True, timeout=30, cwd=root
    )
    assert out.returncode == 0, out.stderr.decode()
    dev_pid, rundir = out.stdout.decode().split()
    assert _wait_gone(int(dev_pid), 10)
    assert not os.path.exists(rundir)


def test_device_ioerr_status_becomes_eio(k, transport):
    """The device answers IOERR for a sector past its capacity: the request fails with
    EIO naming the status, and the device stays usable."""
    blk = k.devices[0].block
    real = blk.size
    blk.size = real + 4096  # pretend the disk is bigger than the device says
    try:
        err = _oserror(errno.EIO, blk.read, real, 4096)
        assert "IOERR" in err.strerror
    finally:
        blk.size = real
    if transport.zmq:
        assert k.devices[0].metrics()["device"]["bad_requests"] >= 1
    assert blk.read(0, 512) == _pattern(IMAGE_SIZE, 1)[:512]
    assert k.devices[0].failed is None


# --------------------------------------------------------------------------- vhost-user


VHOST_KINDS = ["qsd", "vdev-vu"]


@pytest.mark.parametrize("kind", VHOST_KINDS)
def test_killing_the_vhost_user_backend_fails_every_caller_with_eio(image, kind):
    """SIGKILL of the back-end while 8 threads are mid-I/O: the socket hangs up, every
    caller gets EIO within 5 s, and shutdown still cleans up."""
    _skip_without_qsd(kind)
    tr = Transport(kind)
    try:
        k = kernel.boot(devices=[tr.spec(image)])
        be = tr.backends[0]
        try:
            dev = k.devices[0]
            assert dev.pid == be.pid  # SO_PEERCRED
            fd = k.sys.open("/dev/vda", os.O_RDWR)
            _kill_under_load(k, fd, be.kill, check_data=True)
            err = dev.failed
            assert err is not None and err.errno == errno.EIO and "hung up" in err.strerror
            _oserror(errno.EIO, k.sys.pread, fd, 512, 0)  # new requests fail at once
            s = dev.queues[0].stats
            assert s.requests >= 16 and s.completions >= 16
        finally:
            k.shutdown()
        assert dev.transport.memory is None and dev.transport.failed is not None
        assert _shm_of(os.getpid()) == []
        assert not os.path.exists(k.rundir.path)
        k.shutdown()  # idempotent
    finally:
        tr.close()


@pytest.mark.parametrize("kind", VHOST_KINDS)
def test_vhost_user_shutdown_ends_the_session_and_the_backend_serves_the_next(image, kind):
    """The kernel does not own the back-end: shutdown stops the rings (GET_VRING_BASE),
    closes the session and unmaps the memory; the back-end keeps running and a second
    kernel gets the data the first one wrote."""
    _skip_without_qsd(kind)
    tr = Transport(kind)
    try:
        spec = tr.spec(image)
        be = tr.backends[0]
        with kernel.boot(devices=[spec]) as k1:
            dev = k1.devices[0]
            assert isinstance(dev.transport, kernel.VhostUserTransport)
            assert dev.metrics() == {}
            fd = k1.sys.open("/dev/vda", os.O_RDWR)
            k1.sys.pwrite(fd, b"first kernel", 4096)
        assert dev.transport.memory is None
        _oserror(errno.EIO, dev.block.read, 0, 512)
        assert be.proc is not None and be.proc.poll() is None  # still serving
        assert _host_read(image, 4096, 12) == b"first kernel"
        with kernel.boot(devices=[spec]) as k2:
            fd = k2.sys.open("/dev/vda")
            assert k2.sys.pread(fd, 12, 4096) == b"first kernel"
        if kind == "vdev-vu":  # our back-end logs every session it ends
            tick, deadline = threading.Event(), time.monotonic() + 10
            while be.log_text().count("closed: PeerGone") < 2 and time.monotonic() < deadline:
                tick.wait(0.01)
            assert be.log_text().count("front-end connected") == 2
            assert be.log_text().count("closed: PeerGone") == 2
    finally:
        tr.close()


def test_vhost_user_socket_missing_names_the_path(tmp_path):
    missing = str(tmp_path / "nobody.sock")
    with pytest.raises(kernel.DeviceProbeError) as ei:
        kernel.boot(devices=[kernel.VhostUserBlk(missing)])
    msg = str(ei.value)
    assert "vda" in msg and missing in msg and "No such file" in msg


class _FakeBackend:
    """A scripted vhost-user back-end in a thread: ``script(conn)`` talks to the one
    front-end that connects (hostops.unix on the wire, vdev.virtio.vhost_user codec)."""

    def __init__(self, path: str, script) -> None:
        from hostops.unix import UnixServer

        self.server = UnixServer(path)
        self.script = script
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn = self.server.accept(10)
            assert conn is not None
            with conn:
                self.script(conn)
        except BaseException as e:  # noqa: BLE001 - reported by close()
            self.error = e

    def close(self) -> None:
        self.thread.join(10)
        self.server.close()
        assert not self.thread.is_alive()


def _recv_request(conn):
    from vdev.virtio.vhost_user import HEADER_SIZE, decode_header, decode_payload

    head, fds = conn.recv_message(HEADER_SIZE, 8, 10)
    for fd in fds:
        os.close(fd)
    hdr = decode_header(head)
    body, _ = conn.recv_message(hdr.size, 0, 10)
    return hdr, decode_payload(hdr, body)


def _hang_up_after_get_features(conn) -> None:
    hdr, _ = _recv_request(conn)
    assert hdr.name == "GET_FEATURES"


def _refuse_set_owner(conn) -> None:
    from vdev.virtio.vhost_user import F_PROTOCOL_FEATURES, ProtocolFeature, Req, encode

    offered = (1 << F.VERSION_1) | (1 << F_PROTOCOL_FEATURES)
    for _ in range(4):
        hdr, payload = _recv_request(conn)
        if hdr.request == Req.GET_FEATURES:
            conn.send(encode(Req.GET_FEATURES, offered, reply=True))
        elif hdr.request == Req.GET_PROTOCOL_FEATURES:
            conn.send(encode(hdr.request, 1 << ProtocolFeature.REPLY_ACK, reply=True))
        elif hdr.request == Req.SET_PROTOCOL_FEATURES:
            assert payload == 1 << ProtocolFeature.REPLY_ACK
        elif hdr.request == Req.SET_OWNER:
            assert hdr.need_reply  # REPLY_ACK was negotiated
            conn.send(encode(Req.SET_OWNER, 1, reply=True))  # non-zero: refused
            return


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (_hang_up_after_get_features, "GET_FEATURES: device is gone (the back-end closed"),
        (_refuse_set_owner, "SET_OWNER refused by the device: NACK"),
    ],
    ids=["hangs-up", "refuses"],
)
def test_vhost_user_backend_failing_the_handshake_is_a_probe_error(script, reason):
    d = tempfile.mkdtemp(prefix="vu-kb-", dir="/tmp")
    try:
        path = os.path.join(d, "fake.sock")
        fake = _FakeBackend(path, script)
        try:
            with pytest.raises(kernel.DeviceProbeError) as ei:
                kernel.boot(devices=[kernel.VhostUserBlk(path)])
        finally:
            fake.close()
        assert fake.error is None, fake.error
        assert ei.value.device == "vda" and reason in str(ei.value), str(ei.value)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_vhost_user_spec_is_checked():
    with pytest.raises(ValueError, match="socket path"):
        kernel.VhostUserBlk("")
    with pytest.raises(ValueError, match="queue_size"):
        kernel.VhostUserBlk("/tmp/x.sock", queue_size=100)
    assert kernel.VhostUserBlk("/tmp/x.sock").requested_queue_size == 128


@pytest.mark.parametrize("kind", VHOST_KINDS)
def test_both_transports_in_one_kernel(tmp_path, image, kind):
    """vda from our device process, vdb from a vhost-user back-end: same bus, same
    driver, same ``k.sys``."""
    _skip_without_qsd(kind)
    other = str(tmp_path / "b.img")
    with open(other, "wb") as f:
        f.truncate(1 << 20)
    tr = Transport(kind)
    try:
        with kernel.boot(devices=[kernel.Blk(image), tr.spec(other)]) as k:
            a, b = k.devices
            assert (a.name, b.name) == ("vda", "vdb")
            assert isinstance(a.transport, kernel.ZmqTransport)
            assert isinstance(b.transport, kernel.VhostUserTransport)
            assert type(a.driver) is type(b.driver) is kernel.BlkDriver
            fd = k.sys.open("/dev/vdb", os.O_RDWR)
            assert k.sys.pwrite(fd, b"second", 0) == 6
            assert k.sys.fstat(fd).st_size == 1 << 20
        assert _host_read(other, 0, 6) == b"second"
        assert _host_read(image, 0, 6) == _pattern(IMAGE_SIZE, 1)[:6]
    finally:
        tr.close()


def test_split_reads_copy_once_and_give_their_buffers_back(image):
    """The parts of a split read stay in their DMA buffers until the last one is in
    (then one copy out of shared memory joins them): the data is right, and every
    buffer goes back to the pool -- also when one part fails."""
    plan = {
        "seed": 1,
        # the second part of the read at 1 MiB (sectors 3072..) fails, once
        "rules": [
            {
                "when": {"event": "blk.read", "sector": [3072, 3072], "nth": 1},
                "what": {"action": "ioerr"},
            }
        ],
    }
    with kernel.boot(devices=[kernel.Blk(image, faults=plan)]) as k:
        dev = k.devices[0]
        blk = dev.block
        step = blk.max_request_bytes
        assert step < 1 << 20, "the driver should split 1 MiB"
        dma = dev.transport.dma
        base = dma.used_bytes
        r0 = dev.queues[0].stats.requests
        with pytest.raises(OSError) as ei:
            blk.read(1 << 20, 1 << 20)
        assert ei.value.errno == errno.EIO and ei.value.culprit == "device-error"
        assert dev.queues[0].stats.requests - r0 == -(-(1 << 20) // step)
        assert dma.used_bytes == base  # the held part's buffer too
        want = _host_read(image, 0, 3 << 20)
        for off, n in ((0, 3 << 20), (1 << 20, (1 << 20) + 4096), (512, 2 * step + 512)):
            assert blk.read(off, n) == want[off : off + n]
            assert dma.used_bytes == base
