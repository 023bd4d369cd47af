"""The vhost-user back-end (``python -m vdev blk --vhost-user SOCK``) against a small
front-end written here on raw sockets.

Real parts only: a real back-end process, a real Unix socket, memfds passed with
``SCM_RIGHTS``, real eventfds for kick and call, real blk I/O checked against the image
file. The front-end does what QEMU does (features, protocol features, owner, config,
memory table, ring setup, enable) and drives the ring with ``DriverQueue``. Nothing
sleeps: every wait is on a socket, an eventfd, the back-end's log or a process, with a
deadline. A last test points a real QEMU at the back-end (skipped without QEMU).
"""

from __future__ import annotations

import array
import mmap
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop_require import require
from vdev.virtio import (
    SECTOR_SIZE,
    BlkStatus,
    BlkType,
    DriverQueue,
    F,
    RegionMemory,
    RingLayout,
    bit,
)
from vdev.virtio.blk import REQ_HEADER, BlkConfig
from vdev.virtio.vhost_user import (
    F_PROTOCOL_FEATURES,
    HEADER_SIZE,
    VRING_NOFD,
    ConfigPayload,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    Req,
    VringAddr,
    VringState,
    decode_header,
    decode_reply,
    encode,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 1 << 20
QSIZE = 64
TIMEOUT = 10.0
REGION = 1 << 20
# Two regions, contiguous in guest-physical space, far apart in "user" space; the second
# one sits at offset 0x1000 in its memfd.
GPA_A, USER_A, OFF_A = 0x0, 0x7F00_0000_0000, 0
GPA_B, USER_B, OFF_B = REGION, 0x7F10_0000_0000, 0x1000
WANT_PROTOCOL = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.RESET_DEVICE)
)


# --------------------------------------------------------------------------- back-end


class Backend:
    """The back-end process and a reader of its log (stderr), line by line."""

    def __init__(self, image: Path, sock: str) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vdev", "blk", "--image", str(image), "--vhost-user", sock],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        self._buf = b""
        self.lines: list[str] = []
        self._seen = 0
        self.wait_for("listening on")

    def _pump(self, timeout: float) -> None:
        fd = self.proc.stderr.fileno()  # type: ignore[union-attr]
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            if self.proc.poll() is not None:
                raise AssertionError(f"back-end exited {self.proc.returncode}: {self.lines}")
            return
        self._buf += chunk
        *done, self._buf = self._buf.split(b"\n")
        self.lines += [d.decode(errors="replace") for d in done]

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        """The next log line (after the last one matched) containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._seen, len(self.lines)):
                if text in self.lines[i]:
                    self._seen = i + 1
                    return self.lines[i]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no log line with {text!r} in {self.lines}")
            self._pump(left)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(TIMEOUT)
        try:
            while True:
                chunk = os.read(self.proc.stderr.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    break
                self._buf += chunk
        except (BlockingIOError, OSError):
            pass
        self.lines += [d.decode(errors="replace") for d in self._buf.split(b"\n") if d]
        self._buf = b""
        self.proc.stderr.close()  # type: ignore[union-attr]
        return rc


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (IMAGE_SIZE // 256))
    return path


@pytest.fixture
def backend(image: Path) -> Iterator[Backend]:
    d = tempfile.mkdtemp(prefix="vu-", dir="/tmp")
    be = Backend(image, os.path.join(d, "blk.sock"))
    try:
        yield be
    finally:
        rc = be.stop()
        sock_left = os.path.exists(be.sock)
        shutil.rmtree(d, ignore_errors=True)
        assert rc == 0, be.lines
        assert not sock_left, "the back-end must remove its socket file"


# --------------------------------------------------------------------------- front-end


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _wait_fd(fd: int, timeout: float = TIMEOUT) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


class FrontEnd:
    """A minimal QEMU-like vhost-user front-end."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.fds: list[int] = []  # ours, closed at the end
        self.maps: list[mmap.mmap] = []
        self.memory: RegionMemory | None = None
        self.q: DriverQueue | None = None
        self.kick = self.call = -1
        self.features = 0
        self._token = 0

    def close(self) -> None:
        self.q = None
        self.memory = None
        self.sock.close()
        for m in self.maps:
            try:
                m.close()
            except BufferError:
                pass
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    # -- wire
    def send_raw(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.sock.sendmsg([data], anc if fds else [])

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("back-end closed the connection")
            out += chunk
        return out

    def request(
        self, req: Req, payload: object = None, fds: tuple[int, ...] = (), ack: bool = True
    ) -> object:
        """Send ``req``; return its reply (or the REPLY_ACK value when ``ack``)."""
        from vdev.virtio.vhost_user import REPLY_KIND

        has_reply = req in REPLY_KIND
        self.send_raw(encode(req, payload, need_reply=ack and not has_reply), fds)  # type: ignore[arg-type]
        if not has_reply and not ack:
            return None
        hdr = decode_header(self.recv_exact(HEADER_SIZE), reply=True)
        return decode_reply(req, hdr, self.recv_exact(hdr.size))

    def expect_closed(self) -> None:
        """The back-end closes the connection (EOF within the deadline)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(4096):
                    return
            except (ConnectionResetError, BrokenPipeError):
                return
        raise AssertionError("back-end did not close the connection")

    # -- memory
    def memfd(self, size: int) -> tuple[int, mmap.mmap]:
        fd = os.memfd_create("vu-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        self.fds.append(fd)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.maps.append(m)
        return fd, m

    def map_memory(self) -> None:
        fd_a, m_a = self.memfd(OFF_A + REGION)
        fd_b, m_b = self.memfd(OFF_B + REGION)
        table = MemoryTable(
            (
                MemoryRegion(GPA_A, REGION, USER_A, OFF_A),
                MemoryRegion(GPA_B, REGION, USER_B, OFF_B),
            )
        )
        assert self.request(Req.SET_MEM_TABLE, table, (fd_a, fd_b)) == 0
        self.memory = RegionMemory(
            [(GPA_A, memoryview(m_a)[OFF_A:]), (GPA_B, memoryview(m_b)[OFF_B:])]
        )

    # -- the QEMU-like sequence
    def handshake(self) -> int:
        offered = self.request(Req.GET_FEATURES)
        assert isinstance(offered, int) and offered & bit(F_PROTOCOL_FEATURES)
        proto = self.request(Req.GET_PROTOCOL_FEATURES)
        assert isinstance(proto, int) and proto & WANT_PROTOCOL == WANT_PROTOCOL
        assert not proto & bit(ProtocolFeature.INFLIGHT_SHMFD)
        assert not proto & bit(ProtocolFeature.BACKEND_REQ)
        self.request(Req.SET_PROTOCOL_FEATURES, WANT_PROTOCOL, ack=False)
        assert self.request(Req.GET_QUEUE_NUM) == 1
        assert self.request(Req.SET_OWNER) == 0
        return offered

    def start(self, accept: int | None = None) -> None:
        offered = self.handshake()
        cfg = self.request(Req.GET_CONFIG, ConfigPayload(0, 60, 0, bytes(60)))
        assert isinstance(cfg, ConfigPayload)
        assert BlkConfig.unpack(cfg.data).capacity == IMAGE_SIZE // SECTOR_SIZE
        self.features = offered if accept is None else offered & accept
        assert self.request(Req.SET_FEATURES, self.features) == 0
        self.map_memory()
        assert self.memory is not None
        layout = RingLayout.packed(QSIZE, GPA_A)
        self.q = DriverQueue(
            self.memory,
            layout,
            event_idx=bool(self.features & bit(F.EVENT_IDX)),
            indirect=bool(self.features & bit(F.INDIRECT_DESC)),
        )
        self.kick, self.call = _eventfd(), _eventfd()
        self.fds += [self.kick, self.call]
        user = USER_A - GPA_A
        assert self.request(Req.SET_VRING_NUM, VringState(0, QSIZE)) == 0
        assert self.request(Req.SET_VRING_BASE, VringState(0, 0)) == 0
        addr = VringAddr(0, 0, layout.desc + user, layout.used + user, layout.avail + user, 0)
        assert self.request(Req.SET_VRING_ADDR, addr) == 0
        assert self.request(Req.SET_VRING_KICK, 0, (self.kick,)) == 0
        assert self.request(Req.SET_VRING_CALL, 0, (self.call,)) == 0
        assert self.request(Req.SET_VRING_ENABLE, VringState(0, 1)) == 0

    # -- blk I/O: header in region A, data where asked, status in region A
    def blk(
        self, rtype: int, sector: int, data_addr: int, n: int, data: bytes = b""
    ) -> tuple[int, int]:
        """One request; returns (used length, status byte)."""
        assert self.q is not None and self.memory is not None
        hdr_addr, status_addr = 0x80000, 0x80100
        self.memory.view(hdr_addr, 16)[:] = REQ_HEADER.pack(rtype, 0, sector)
        self.memory.view(status_addr, 1)[:] = b"\xee"
        if rtype == BlkType.OUT:
            self.memory.view(data_addr, n)[:] = data
            readable, writable = [(hdr_addr, 16), (data_addr, n)], [(status_addr, 1)]
        else:
            readable, writable = [(hdr_addr, 16)], [(data_addr, n), (status_addr, 1)]
        self._token += 1
        self.q.add(readable, writable, self._token)
        if self.q.kick_prepare():
            os.eventfd_write(self.kick, 1)
        deadline = time.monotonic() + TIMEOUT
        while True:
            got = self.q.get_used()
            if got:
                assert got[0][0] == self._token
                return got[0][1], self.memory.view(status_addr, 1)[0]
            if self.q.enable_interrupts():  # re-arm used_event, then re-check
                continue
            left = deadline - time.monotonic()
            assert left > 0, "no completion"
            if _wait_fd(self.call, left):
                os.eventfd_read(self.call)

    def read(self, sector: int, n: int, data_addr: int = GPA_B + 0x1000) -> bytes:
        used, status = self.blk(BlkType.IN, sector, data_addr, n)
        assert (used, status) == (n + 1, BlkStatus.OK)
        assert self.memory is not None
        return bytes(self.memory.view(data_addr, n))

    def write(self, sector: int, data: bytes, data_addr: int = GPA_B + 0x2000) -> None:
        used, status = self.blk(BlkType.OUT, sector, data_addr, len(data), data)
        assert (used, status) == (1, BlkStatus.OK)


@pytest.fixture
def frontends() -> Iterator[list[FrontEnd]]:
    made: list[FrontEnd] = []
    yield made
    for fe in made:
        fe.close()


def _connect(backend: Backend, made: list[FrontEnd]) -> FrontEnd:
    fe = FrontEnd(backend.sock)
    made.append(fe)
    backend.wait_for("front-end connected")
    return fe


def _prove_io(backend: Backend, made: list[FrontEnd], image: Path, sector: int) -> None:
    """A new connection negotiates from scratch and does real I/O."""
    fe = _connect(backend, made)
    fe.start()
    payload = os.urandom(4096)
    fe.write(sector, payload)
    assert fe.read(sector, 4096, GPA_A + 0x90000) == payload
    with open(image, "rb") as f:
        f.seek(sector * SECTOR_SIZE)
        assert f.read(4096) == payload


# --------------------------------------------------------------------------- tests


def test_qemu_like_session_does_real_io(backend: Backend, frontends: list[FrontEnd], image: Path):
    fe = _connect(backend, frontends)
    fe.start()
    original = image.read_bytes()
    # read through region B (the memfd at offset 0x1000), compare with the file
    assert fe.read(8, 4096) == original[8 * 512 : 8 * 512 + 4096]
    data = os.urandom(8192)
    fe.write(100, data)
    after = image.read_bytes()
    assert after[100 * 512 : 100 * 512 + 8192] == data
    assert after[: 100 * 512] == original[: 100 * 512]
    # read into region A as well
    assert fe.read(100, 8192, GPA_A + 0x90000) == data
    assert fe.request(Req.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 3)


def test_descriptor_straddling_two_regions_fails_cleanly(
    backend: Backend, frontends: list[FrontEnd], image: Path
):
    fe = _connect(backend, frontends)
    fe.start()
    # [GPA_B - 512, GPA_B + 512): half in region A, half in region B
    used, status = fe.blk(BlkType.IN, 0, GPA_B - 512, 1024)
    assert used == 0 and status == 0xEE, "a bad chain completes with length 0, untouched"
    assert "ADDRESS_OUT_OF_RANGE" in backend.wait_for("bad chain")
    assert fe.read(0, 1024) == image.read_bytes()[:1024]


def test_disconnect_and_reconnect_serves_with_fresh_state(
    backend: Backend, frontends: list[FrontEnd], image: Path
):
    fe = _connect(backend, frontends)
    fe.start()
    fe.write(10, b"A" * 512)
    fe.close()
    backend.wait_for("closed")
    backend.wait_for("listening") if False else None
    fe2 = _connect(backend, frontends)
    fe2.start()  # ring from index 0 again: fresh state
    assert fe2.read(10, 512) == b"A" * 512
    fe2.write(11, b"B" * 512)
    assert image.read_bytes()[10 * 512 : 12 * 512] == b"A" * 512 + b"B" * 512


def test_garbage_closes_the_connection_then_next_one_works(
    backend: Backend, frontends: list[FrontEnd], image: Path
):
    fe = _connect(backend, frontends)
    fe.send_raw(b"\xff" * 32)
    fe.expect_closed()
    assert "version" in backend.wait_for("closed")
    _prove_io(backend, frontends, image, 20)


def test_connection_closed_mid_message(backend: Backend, frontends: list[FrontEnd], image: Path):
    fe = _connect(backend, frontends)
    fe.handshake()
    msg = encode(Req.SET_FEATURES, 1)
    fe.send_raw(msg[: HEADER_SIZE + 3])
    fe.sock.shutdown(socket.SHUT_WR)
    fe.expect_closed()
    assert "PeerGone" in backend.wait_for("closed")
    _prove_io(backend, frontends, image, 30)


def test_fd_smaller_than_its_region(backend: Backend, frontends: list[FrontEnd], image: Path):
    fe = _connect(backend, frontends)
    fe.handshake()
    fd, _ = fe.memfd(64 << 10)
    table = MemoryTable((MemoryRegion(0, REGION, USER_A, 0),))
    fe.send_raw(encode(Req.SET_MEM_TABLE, table, need_reply=True), (fd,))
    fe.expect_closed()
    assert "holds 65536 bytes" in backend.wait_for("closed")
    _prove_io(backend, frontends, image, 40)


@pytest.mark.parametrize(
    "case",
    [
        "fd-on-set-features",
        "missing-kick-fd",
        "ring-outside-memory",
        "pipe-as-eventfd",
        "oversized",
    ],
)
def test_other_malformed_messages_close_the_connection(
    case: str, backend: Backend, frontends: list[FrontEnd], image: Path
):
    fe = _connect(backend, frontends)
    fe.handshake()
    if case == "fd-on-set-features":
        efd = _eventfd()
        fe.fds.append(efd)
        fe.send_raw(encode(Req.SET_FEATURES, 0, need_reply=True), (efd,))
    elif case == "missing-kick-fd":
        fe.send_raw(encode(Req.SET_VRING_KICK, 0, need_reply=True))
    elif case == "ring-outside-memory":
        fe.map_memory()
        assert fe.request(Req.SET_VRING_NUM, VringState(0, QSIZE)) == 0
        addr = VringAddr(0, 0, USER_A + REGION - 16, USER_A, USER_A + 0x1000, 0)
        fe.send_raw(encode(Req.SET_VRING_ADDR, addr, need_reply=True))
    elif case == "pipe-as-eventfd":
        r, w = os.pipe()
        fe.fds += [r, w]
        fe.send_raw(encode(Req.SET_VRING_CALL, 0, need_reply=True), (w,))
    elif case == "oversized":
        fe.send_raw(struct.pack("<III", Req.SET_FEATURES, 1, 1 << 20))
    fe.expect_closed()
    backend.wait_for("closed")
    _prove_io(backend, frontends, image, 50)


def test_refused_request_is_nacked_and_session_goes_on(
    backend: Backend, frontends: list[FrontEnd], image: Path
):
    fe = _connect(backend, frontends)
    fe.handshake()
    assert fe.request(Req.SET_VRING_NUM, VringState(0, 3)) != 0  # not a power of two
    assert fe.request(Req.SET_VRING_NUM, VringState(7, 64)) != 0  # no such ring
    assert fe.request(Req.SET_FEATURES, bit(63)) != 0  # never offered
    backend.wait_for("refused")
    fe.close()
    backend.wait_for("closed")
    _prove_io(backend, frontends, image, 60)


def test_polling_mode_ring_without_kick_fd(
    backend: Backend, frontends: list[FrontEnd], image: Path
):
    fe = _connect(backend, frontends)
    fe.start()
    assert fe.request(Req.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 0)
    assert fe.request(Req.SET_VRING_KICK, VRING_NOFD | 0) == 0  # polling mode
    data = fe.read(2, 512)  # the kick eventfd is gone; completes by polling
    assert data == image.read_bytes()[1024:1536]


def test_reset_device_then_renegotiate(backend: Backend, frontends: list[FrontEnd], image: Path):
    fe = _connect(backend, frontends)
    fe.start()
    fe.write(70, b"R" * 512)
    assert fe.request(Req.RESET_DEVICE) == 0
    backend.wait_for("RESET_DEVICE")
    fe.close()
    _prove_io(backend, frontends, image, 71)


# --------------------------------------------------------------------------- QEMU

QEMU = shutil.which("qemu-system-x86_64")


def test_qemu_completes_the_vhost_user_handshake(backend: Backend):
    require(QEMU is not None, "qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")
    qemu = subprocess.Popen(
        [
            QEMU,  # type: ignore[list-item]
            "-accel", "tcg", "-machine", "q35", "-nodefaults", "-nographic", "-S",
            "-m", "64M",
            "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
            "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=c0,path={backend.sock}",
            "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        backend.wait_for("front-end connected", timeout=30)
        line = backend.wait_for("GET_CONFIG", timeout=30)
        assert "size" in line
        assert qemu.poll() is None, "QEMU gave up on the device"
    finally:
        qemu.kill()
        _, err = qemu.communicate(timeout=TIMEOUT)
    backend.wait_for("closed", timeout=TIMEOUT)
    assert b"vhost" not in err.lower() or b"error" not in err.lower(), err
