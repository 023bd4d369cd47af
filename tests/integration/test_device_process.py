"""The blk device process against a minimal hand-written driver.

Real parts only: ``python -m vdev blk`` launched with ``DeviceProcess.launch``, a real
POSIX shm region, real ZeroMQ doorbells and control channel. The driver here is written
directly on ``vdev.virtio`` (``DriverQueue``, the control codec) so that the device is
tested without the kernel. Nothing sleeps: every wait is on a doorbell, a reply or a
process, with a deadline.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

from hostops.barrier import full_barrier
from hostops.clock import monotonic
from hostops.control import ControlClient
from hostops.doorbell import Doorbell, DoorbellListener
from hostops.process import DeviceProcess, python_argv
from hostops.rundir import RuntimeDir
from hostops.shm import SharedRegion
from hostops.sync import Thread, start_thread
from vdev import RING_FEATURES as OFFERED_BY_RUNTIME
from vdev import Device
from vdev.runtime import DeviceRuntime
from vdev.virtio import (
    BLK_ID_BYTES,
    SECTOR_SIZE,
    BlkF,
    BlkStatus,
    BlkType,
    Chain,
    DeviceId,
    DriverQueue,
    F,
    FlatMemory,
    RingLayout,
    Status,
    bit,
)
from vdev.virtio.blk import DISCARD_SEGMENT, REQ_HEADER, BlkConfig
from vdev.virtio.control import (
    CONFIG_CHANGE,
    PROTOCOL_VERSION,
    ErrorCode,
    RemoteError,
    decode_reply,
    encode_request,
)
from vdev.virtio.ring import U16

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

IMAGE_SIZE = 1 << 20  # 2048 sectors
REGION_SIZE = 1 << 20
QSIZE = 64
RING_FEATURES = bit(F.VERSION_1) | bit(F.EVENT_IDX) | bit(F.INDIRECT_DESC)
STARTUP_TIMEOUT = 15.0
TIMEOUT = 10.0


# --------------------------------------------------------------------------- the driver


@dataclass
class Dut:
    """The device under test: one device process and the driver's end of its channels."""

    name: str
    proc: DeviceProcess
    ctl: ControlClient
    call: DoorbellListener
    kick_ep: str
    call_ep: str
    log_path: str
    kick: Doorbell | None = None
    region: SharedRegion | None = None
    memory: FlatMemory | None = None
    q: DriverQueue | None = None
    layout: RingLayout | None = None
    features: int = 0
    done: dict[Any, int] = field(default_factory=dict)
    calls_seen: list[int] = field(default_factory=list)
    _next_buf: int = 0
    _token: int = 0

    # -- control
    def raw(self, payload: bytes, timeout: float = TIMEOUT) -> dict[str, Any]:
        return decode_reply(self.ctl.call(payload, timeout_s=timeout))

    def req(self, type_: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        return self.raw(encode_request(type_, **fields), timeout)

    def error(self, type_: str | None = None, payload: bytes | None = None, **fields: Any) -> str:
        """Send a request that must fail; return the error code."""
        if payload is None:
            assert type_ is not None
            payload = encode_request(type_, **fields)
        with pytest.raises(RemoteError) as ei:
            self.raw(payload)
        assert ei.value.message, "an error reply names the problem"
        return ei.value.code

    def status(self) -> int:
        return int(self.req("GET_STATUS")["status"])

    def metrics(self) -> dict[str, Any]:
        return self.req("GET_METRICS")

    # -- bring-up (the order of /tmp/common.md, virtio §3.1.1)
    def negotiate(self, accept: int | None = None) -> int:
        self.req("RESET_DEVICE")
        self.req("SET_STATUS", status=Status.ACKNOWLEDGE)
        self.req("SET_STATUS", status=Status.ACKNOWLEDGE | Status.DRIVER)
        offered = int(self.req("GET_FEATURES")["features"])
        chosen = offered if accept is None else offered & accept
        self.req("SET_FEATURES", features=chosen)
        self.req("SET_STATUS", status=Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        assert self.status() & Status.FEATURES_OK, "device refused our features"
        self.features = chosen
        return offered

    def map_memory(self) -> None:
        if self.region is not None:
            self.memory = self.q = None
            self.region.close()
        self.region = SharedRegion.create(REGION_SIZE, tag="test")
        self.req(
            "SET_MEM_TABLE",
            regions=[{"guest_addr": 0, "size": self.region.size, "shm": self.region.name}],
        )
        self.region.unlink()  # leak-proof as soon as the device has it mapped
        self.memory = FlatMemory(self.region.buf, base=0, barrier=full_barrier)

    def setup_queue(self, index: int = 0, size: int = QSIZE) -> None:
        assert self.memory is not None
        self.layout = RingLayout.packed(size, 0)
        self.q = DriverQueue(
            self.memory,
            self.layout,
            event_idx=bool(self.features & bit(F.EVENT_IDX)),
            indirect=bool(self.features & bit(F.INDIRECT_DESC)),
        )
        self.done.clear()
        self._next_buf = (self.layout.end + 4095) & ~4095
        lay = self.layout
        self.req("SET_VRING_NUM", index=index, num=size)
        self.req("SET_VRING_ADDR", index=index, desc=lay.desc, avail=lay.avail, used=lay.used)
        self.req("SET_VRING_BASE", index=index, base=0)
        self.req("SET_VRING_KICK", index=index, endpoint=self.kick_ep)
        self.req("SET_VRING_CALL", index=index, endpoint=self.call_ep)
        self.req("SET_VRING_ENABLE", index=index, enable=True)
        if self.kick is None:
            self.kick = Doorbell(self.kick_ep)

    def bring_up(self, accept: int | None = None, device_id: int = DeviceId.BLOCK) -> int:
        info = self.req("GET_DEVICE_INFO", timeout=STARTUP_TIMEOUT)
        assert info["device_id"] == device_id and info["num_queues"] == 1
        offered = self.negotiate(accept)
        self.map_memory()
        self.setup_queue()
        self.req("SET_STATUS", status=15)  # ACK|DRIVER|FEATURES_OK|DRIVER_OK
        assert self.status() == 15
        return offered

    # -- data path
    def alloc(self, n: int) -> int:
        assert self.region is not None
        addr = self._next_buf
        if addr + n > self.region.size:  # requests are sequential: wrap around
            assert self.layout is not None
            addr = (self.layout.end + 4095) & ~4095
        self._next_buf = (addr + n + 63) & ~63
        return addr

    def put(self, data: bytes) -> int:
        assert self.memory is not None
        addr = self.alloc(len(data))
        self.memory.view(addr, len(data))[:] = data
        return addr

    def submit(
        self, readable: list[bytes], writable: list[int], patch: Callable[[int], None] | None = None
    ) -> tuple[Any, list[tuple[int, int]]]:
        assert self.q is not None and self.kick is not None
        r = [(self.put(d), len(d)) for d in readable]
        w = [(self.alloc(n), n) for n in writable]
        self._token += 1
        token = self._token
        head = self.q.add(r, w, token)
        if patch is not None:
            patch(head)
        if self.q.kick_prepare():
            self.kick.ring(0)
        return token, w

    def wait_call(self, timeout: float = TIMEOUT) -> list[int]:
        got = self.call.wait(timeout)
        self.calls_seen.extend(got)
        return got

    def complete(self, token: Any, timeout: float = TIMEOUT) -> int:
        assert self.q is not None
        deadline = monotonic() + timeout
        while True:
            for t, n in self.q.get_used():
                self.done[t] = n
            if token in self.done:
                return self.done.pop(token)
            if self.q.enable_interrupts():
                continue
            left = deadline - monotonic()
            if left <= 0:
                raise AssertionError(f"request {token} did not complete in {timeout}s")
            self.wait_call(left)

    def blk(
        self, rtype: int, sector: int = 0, data: bytes = b"", read: int = 0, payload: bytes = b""
    ) -> tuple[int, bytes, int]:
        """One virtio-blk request: returns (status, data read, used length)."""
        assert self.memory is not None
        readable = [REQ_HEADER.pack(rtype, 0, sector)]
        if data or payload:
            readable.append(data or payload)
        writable = ([read] if read else []) + [1]
        token, w = self.submit(readable, writable)
        used = self.complete(token)
        status = self.memory.view(w[-1][0], 1)[0]
        got = bytes(self.memory.view(w[0][0], read)) if read else b""
        return status, got, used

    def close(self) -> None:
        for closer in (
            lambda: self.req("RESET_DEVICE", timeout=1.0) if self.proc.alive() else None,
            self.ctl.close,
            self.kick.close if self.kick else (lambda: None),
            self.call.close,
            lambda: self.proc.stop(),
            self.proc.close,
        ):
            try:
                closer()
            except Exception:
                pass
        self.memory = self.q = None
        if self.region is not None:
            self.region.unlink()
            self.region.close()

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()
        except OSError:
            return ""


@pytest.fixture
def rundir() -> Iterator[RuntimeDir]:
    rd = RuntimeDir.create()
    try:
        yield rd
    finally:
        rd.cleanup()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return img


@pytest.fixture
def launch(rundir: RuntimeDir, image: Path) -> Iterator[Callable[..., Dut]]:
    devices: list[Dut] = []

    def _launch(*extra: str, img: Path | None = image, name: str = "vda") -> Dut:
        ctl_ep = rundir.endpoint(f"{name}.ctl")
        call_ep = rundir.endpoint(f"{name}.call")
        kick_ep = rundir.endpoint(f"{name}.kick")
        log_path = os.path.join(rundir.path, f"{name}.log")
        call = DoorbellListener(call_ep)
        src = ["--image", str(img)] if img is not None else []
        try:
            proc = DeviceProcess.launch(
                python_argv("vdev", "blk", *src, *extra, "--control", ctl_ep),
                name=name,
                log_path=log_path,
            )
        except BaseException:
            call.close()
            raise
        ctl = ControlClient(ctl_ep, peer_alive=proc.alive)
        dev = Dut(name, proc, ctl, call, kick_ep, call_ep, log_path)
        devices.append(dev)
        return dev

    try:
        yield _launch
    finally:
        for d in devices:
            d.close()


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


# --------------------------------------------------------------------------- sessions


def test_full_session_and_block_io(launch: Callable[..., Dut], image: Path) -> None:
    d = launch("--queue-size", "128")
    info = d.req("GET_DEVICE_INFO", timeout=STARTUP_TIMEOUT)
    assert info == {"device_id": 2, "num_queues": 1, "max_queue_size": 128, "name": "blk"}
    offered = d.bring_up()
    for b in (BlkF.SIZE_MAX, BlkF.SEG_MAX, BlkF.BLK_SIZE, BlkF.FLUSH, BlkF.DISCARD):
        assert offered & bit(b), b
    assert offered & bit(BlkF.WRITE_ZEROES) and offered & RING_FEATURES == RING_FEATURES
    assert not offered & bit(BlkF.RO)

    cfg = BlkConfig.unpack(d.req("GET_CONFIG", offset=0, size=60)["data"])
    assert cfg.capacity == IMAGE_SIZE // SECTOR_SIZE
    assert cfg.blk_size == 512 and cfg.seg_max == 126 and cfg.size_max > 0
    assert d.req("GET_CONFIG", offset=0, size=8)["data"] == struct.pack("<Q", cfg.capacity)
    assert d.error("GET_CONFIG", offset=0, size=61) == ErrorCode.BAD_VALUE

    # OUT, then check the image from the host, then IN
    data = pattern(8 * SECTOR_SIZE)
    status, _, used = d.blk(BlkType.OUT, sector=100, data=data)
    assert (status, used) == (BlkStatus.OK, 1)
    raw = image.read_bytes()
    assert raw[100 * 512 : 108 * 512] == data
    assert raw[: 100 * 512] == bytes(100 * 512)
    status, got, used = d.blk(BlkType.IN, sector=100, read=len(data))
    assert (status, got, used) == (BlkStatus.OK, data, len(data) + 1)

    # data written by the host is what the device reads
    with open(image, "r+b") as f:
        f.seek(7 * 512)
        f.write(b"\x42" * 512)
    assert d.blk(BlkType.IN, sector=7, read=512)[1] == b"\x42" * 512

    # FLUSH, GET_ID
    assert d.blk(BlkType.FLUSH)[0] == BlkStatus.OK
    status, ident, used = d.blk(BlkType.GET_ID, read=BLK_ID_BYTES)
    assert status == BlkStatus.OK and used == BLK_ID_BYTES + 1
    assert ident.startswith(b"vlab") and len(ident) == BLK_ID_BYTES

    # DISCARD and WRITE_ZEROES zero their ranges
    d.blk(BlkType.OUT, sector=200, data=b"\xff" * (16 * 512))
    seg = DISCARD_SEGMENT.pack(202, 2, 0) + DISCARD_SEGMENT.pack(210, 1, 0)
    assert d.blk(BlkType.DISCARD, payload=seg)[0] == BlkStatus.OK
    seg = DISCARD_SEGMENT.pack(205, 3, 0)
    assert d.blk(BlkType.WRITE_ZEROES, payload=seg)[0] == BlkStatus.OK
    raw = image.read_bytes()
    zero = {202, 203, 205, 206, 207, 210}
    for s in range(200, 216):
        assert raw[s * 512 : (s + 1) * 512] == (bytes(512) if s in zero else b"\xff" * 512), s
    assert len(raw) == IMAGE_SIZE

    # UNSUPP and IOERR
    assert d.blk(99, read=16)[0] == BlkStatus.UNSUPP
    status, _, used = d.blk(BlkType.IN, sector=IMAGE_SIZE // 512, read=512)
    assert (status, used) == (BlkStatus.IOERR, 1)
    assert d.blk(BlkType.OUT, sector=2**64 - 1, data=b"x" * 512)[0] == BlkStatus.IOERR

    m = d.metrics()
    dev, q0 = m["device"], m["queues"][0]
    assert dev["reads"] == 3 and dev["writes"] == 3 and dev["flushes"] == 1
    assert dev["get_id"] == 1 and dev["discards"] == 1 and dev["write_zeroes"] == 1
    assert dev["unsupported"] == 1 and dev["bad_requests"] == 2 and dev["io_errors"] == 0
    assert dev["bytes_written"] == 8 * 512 + 16 * 512
    assert dev["bad_chains"] == 0 and dev["handler_errors"] == 0
    assert q0["chains"] == 11 and q0["bad_chains"] == 0
    # kicks are a hint (with EVENT_IDX every one may be unnecessary): check the bookkeeping
    assert dev["kicks_received"] == q0["kicks_received"] >= 0
    assert q0["interrupts_sent"] + q0["interrupts_suppressed"] >= 1

    # GET_VRING_BASE stops the ring and reports where it stands
    assert d.req("GET_VRING_BASE", index=0)["base"] == 11

    # clean shutdown: RESET, then SIGTERM -> exit status 0
    d.req("RESET_DEVICE")
    assert d.status() == 0
    d.proc.stop()
    assert d.proc.returncode == 0, d.proc.exit_description()
    assert "Traceback" not in d.log()


def test_read_only_device(launch: Callable[..., Dut], image: Path) -> None:
    image.write_bytes(pattern(IMAGE_SIZE, seed=5))
    d = launch("--readonly")
    offered = d.bring_up()
    assert offered & bit(BlkF.RO)
    status, _, used = d.blk(BlkType.OUT, sector=0, data=b"\0" * 512)
    assert (status, used) == (BlkStatus.IOERR, 1)
    seg = DISCARD_SEGMENT.pack(0, 1, 0)
    assert d.blk(BlkType.DISCARD, payload=seg)[0] == BlkStatus.IOERR
    assert d.blk(BlkType.WRITE_ZEROES, payload=seg)[0] == BlkStatus.IOERR
    assert d.blk(BlkType.IN, sector=1, read=512)[1] == pattern(IMAGE_SIZE, seed=5)[512:1024]
    assert image.read_bytes() == pattern(IMAGE_SIZE, seed=5)


def test_memory_backend(launch: Callable[..., Dut]) -> None:
    d = launch("--memory", "256K", img=None)
    d.bring_up()
    cfg = BlkConfig.unpack(d.req("GET_CONFIG", offset=0, size=8)["data"])
    assert cfg.capacity == 512
    d.blk(BlkType.OUT, sector=3, data=pattern(1024))
    assert d.blk(BlkType.IN, sector=3, read=1024)[1] == pattern(1024)


# --------------------------------------------------------------------------- bad control


def _raw(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def test_bad_control_messages_get_errors_and_the_device_goes_on(
    launch: Callable[..., Dut],
) -> None:
    d = launch()
    d.req("GET_DEVICE_INFO", timeout=STARTUP_TIMEOUT)
    v = PROTOCOL_VERSION
    cases: list[tuple[bytes, str]] = [
        (_raw({"v": v, "type": "FROBNICATE"}), ErrorCode.UNKNOWN_MESSAGE),
        (_raw({"v": v + 1, "type": "GET_STATUS"}), ErrorCode.BAD_VERSION),
        (_raw({"type": "GET_STATUS"}), ErrorCode.BAD_VERSION),
        (_raw({"v": v, "type": "SET_VRING_NUM", "index": "0", "num": 64}), ErrorCode.BAD_FIELD),
        (_raw({"v": v, "type": "SET_STATUS", "status": True}), ErrorCode.BAD_FIELD),
        (_raw({"v": v, "type": "SET_VRING_NUM", "index": 0}), ErrorCode.BAD_FIELD),
        (_raw({"v": v, "type": "GET_STATUS", "extra": 1}), ErrorCode.BAD_FIELD),
        (_raw({"v": v, "type": "SET_FEATURES", "features": -1}), ErrorCode.BAD_VALUE),
        (b"\xc1 this is not msgpack", ErrorCode.MALFORMED),
        (b"", ErrorCode.MALFORMED),
        (_raw([1, 2, 3]), ErrorCode.MALFORMED),
    ]
    for payload, code in cases:
        assert d.error(payload=payload) == code, payload

    # out-of-order and out-of-range requests
    d.req("RESET_DEVICE")
    assert d.error("SET_STATUS", status=Status.DRIVER) == ErrorCode.BAD_STATE
    d.req("SET_STATUS", status=Status.ACKNOWLEDGE)
    d.req("SET_STATUS", status=Status.ACKNOWLEDGE | Status.DRIVER)
    # DRIVER_OK before FEATURES_OK
    assert d.error("SET_STATUS", status=7) == ErrorCode.BAD_STATE
    assert d.status() == 3, "an illegal transition changes nothing"
    # SET_VRING_ADDR before SET_MEM_TABLE
    d.req("SET_VRING_NUM", index=0, num=QSIZE)
    assert d.error("SET_VRING_ADDR", index=0, desc=0, avail=1024, used=2048) == ErrorCode.BAD_STATE
    # bad queue index / size
    assert d.error("SET_VRING_NUM", index=1, num=QSIZE) == ErrorCode.BAD_VALUE
    assert d.error("SET_VRING_NUM", index=0, num=100) == ErrorCode.BAD_VALUE
    assert d.error("SET_VRING_NUM", index=0, num=512) == ErrorCode.BAD_VALUE  # > 256
    assert d.error("SET_VRING_BASE", index=0, base=1 << 16) == ErrorCode.BAD_VALUE
    # a shm segment that does not exist
    code = d.error(
        "SET_MEM_TABLE", regions=[{"guest_addr": 0, "size": 4096, "shm": "/vlab-no-such"}]
    )
    assert code == ErrorCode.BAD_ADDRESS
    assert d.error("SET_MEM_TABLE", regions=[{"guest_addr": 0}]) == ErrorCode.BAD_FIELD
    assert d.error("SET_MEM_TABLE", regions=[]) == ErrorCode.BAD_VALUE
    # features: never offered, or without VERSION_1 -> FEATURES_OK refused (reply OK)
    offered = int(d.req("GET_FEATURES")["features"])
    d.req("SET_FEATURES", features=offered | 1 << 60)
    d.req("SET_STATUS", status=11)
    assert not d.status() & Status.FEATURES_OK
    d.req("SET_FEATURES", features=offered & ~bit(F.VERSION_1))
    d.req("SET_STATUS", status=11)
    assert not d.status() & Status.FEATURES_OK
    d.req("SET_FEATURES", features=offered)
    d.req("SET_STATUS", status=11)
    assert d.status() == 11
    assert d.error("SET_FEATURES", features=offered) == ErrorCode.BAD_STATE
    # rings outside the region
    d.features = offered
    d.map_memory()
    assert d.region is not None
    end = d.region.size
    assert (
        d.error("SET_VRING_ADDR", index=0, desc=end - 16, avail=0, used=4096)
        == ErrorCode.BAD_ADDRESS
    )
    assert (
        d.error("SET_VRING_ADDR", index=0, desc=0, avail=2048, used=end - 8)
        == ErrorCode.BAD_ADDRESS
    )
    assert d.error("SET_VRING_ADDR", index=0, desc=8, avail=2048, used=4096) == ErrorCode.BAD_VALUE
    assert d.error("SET_VRING_ENABLE", index=0, enable=True) == ErrorCode.BAD_STATE
    assert d.error("SET_VRING_KICK", index=0, endpoint="tcp://0.0.0.0:1") == ErrorCode.BAD_VALUE
    assert d.error("SET_CONFIG", offset=0, data=b"\0") == ErrorCode.BAD_VALUE

    m = d.metrics()["device"]
    assert m["control_errors"] >= len(cases) + 15
    assert d.proc.alive()

    # ...and the SAME process still completes a valid session and I/O
    d.bring_up()
    d.blk(BlkType.OUT, sector=1, data=pattern(512))
    assert d.blk(BlkType.IN, sector=1, read=512) == (BlkStatus.OK, pattern(512), 513)
    assert "Traceback" not in d.log()


# --------------------------------------------------------------------------- bad rings


def test_malformed_chain_is_completed_with_length_zero(launch: Callable[..., Dut]) -> None:
    d = launch()
    d.bring_up()
    assert d.q is not None and d.memory is not None and d.layout is not None
    desc = d.memory.view(d.layout.desc, 16 * QSIZE)

    def break_next(head: int) -> None:
        # the head descriptor has NEXT set; point it past the table (§2.7.5)
        struct.pack_into("<H", desc, 16 * head + 14, 0xFFFF)

    hdr = REQ_HEADER.pack(BlkType.OUT, 0, 0)
    token, _ = d.submit([hdr, b"\x99" * 512], [1], patch=break_next)
    assert d.complete(token) == 0
    m = d.metrics()
    assert m["queues"][0]["bad_chains"] == 1
    assert m["device"]["bad_chains"] == 1
    assert m["queues"][0]["rule:NEXT_OUT_OF_RANGE"] == 1
    assert m["device"]["writes"] == 0
    assert d.status() == 15, "a bad chain does not break the device"
    # the next valid request works
    d.blk(BlkType.OUT, sector=4, data=pattern(512, 3))
    assert d.blk(BlkType.IN, sector=4, read=512)[1] == pattern(512, 3)


def test_avail_idx_jump_sets_needs_reset(launch: Callable[..., Dut]) -> None:
    d = launch()
    d.bring_up()
    d.blk(BlkType.FLUSH)
    assert d.memory is not None and d.layout is not None and d.kick is not None
    avail = d.memory.view(d.layout.avail, RingLayout.avail_bytes(QSIZE))
    U16.pack_into(avail, 2, 1 + QSIZE + 5)  # runs more than the queue size ahead
    d.kick.ring(0)
    deadline = monotonic() + TIMEOUT
    while CONFIG_CHANGE not in d.calls_seen:
        left = deadline - monotonic()
        assert left > 0, f"no CONFIG_CHANGE call; saw {d.calls_seen}"
        d.wait_call(left)
    st = d.status()
    assert st & Status.DEVICE_NEEDS_RESET and st & Status.DRIVER_OK
    m = d.metrics()
    assert m["device"]["ring_errors"] == 1
    assert m["queues"][0]["rule:AVAIL_IDX_JUMP"] == 1
    # a reset recovers the same process
    d.bring_up()
    assert d.status() == 15
    assert d.blk(BlkType.FLUSH)[0] == BlkStatus.OK


# --------------------------------------------------------------------------- life cycle


def test_bad_arguments_exit_2_without_traceback(rundir: RuntimeDir, tmp_path: Path) -> None:
    ep = rundir.endpoint("x.ctl")
    for i, args in enumerate(
        [
            ["blk", "--image", str(tmp_path / "missing.img"), "--control", ep],
            ["blk", "--image", str(tmp_path), "--control", ep],
            ["blk", "--memory", "1M", "--queue-size", "100", "--control", ep],
            ["blk", "--memory", "1M", "--queue-size", "65536", "--control", ep],
            ["blk", "--memory", "1M"],
            ["blk", "--memory", "1M", "--control", "tcp://0.0.0.0:5555"],
            ["blk", "--memory", "1000", "--control", ep],
            ["frob"],
        ]
    ):
        log = tmp_path / f"bad{i}.log"
        p = DeviceProcess.launch(python_argv("vdev", *args), name=f"bad{i}", log_path=str(log))
        try:
            assert p.wait(STARTUP_TIMEOUT) is not None, args
            assert p.returncode == 2, (args, p.exit_description(), log.read_text())
        finally:
            p.kill()
            p.close()
        text = log.read_text()
        assert "Traceback" not in text, text
        assert len(text.strip().splitlines()) == 1, text


def test_main_module_is_cheap_to_import(tmp_path: Path) -> None:
    """``import vdev.__main__`` pulls in neither the transport nor the device code."""
    code = (
        "import sys, vdev.__main__\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('zmq', 'msgpack', 'hostops', 'posix_ipc') or m in ('vdev.runtime', 'vdev.blk'))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    log = tmp_path / "import.log"
    p = DeviceProcess.launch([sys.executable, "-c", code], name="import", log_path=str(log))
    try:
        assert p.wait(STARTUP_TIMEOUT) is not None
        assert p.returncode == 0, log.read_text()
    finally:
        p.kill()
        p.close()


@pytest.mark.parametrize("state", ["started", "serving", "after_control_burst"])
def test_sigterm_stops_the_device_without_sigkill(launch: Callable[..., Dut], state: str) -> None:
    """SIGTERM wakes the device's poll at once (its Waker is the signal wake-up fd), so
    stop() never has to escalate -- not even when the signal lands just before the poll
    blocks, which used to leave the device asleep for its whole idle timeout."""
    d = launch()
    d.req("GET_DEVICE_INFO", timeout=STARTUP_TIMEOUT)
    if state in ("serving", "after_control_burst"):
        d.bring_up()
        assert d.blk(BlkType.IN, sector=0, read=512)[0] == BlkStatus.OK
    if state == "after_control_burst":
        for _ in range(50):
            d.status()
    kills: list[int] = []
    real_kill = d.proc.kill

    def spy_kill() -> None:
        kills.append(1)
        real_kill()

    d.proc.kill = spy_kill  # type: ignore[method-assign]
    # A device that slept through SIGTERM until its idle poll timed out would miss this
    # grace period and be SIGKILLed.
    code = d.proc.stop(timeout_s=DeviceRuntime.idle_timeout)
    assert kills == [], "stop() had to SIGKILL the device"
    assert code == 0, d.proc.exit_description()
    log = d.log()
    assert "exiting: SIGTERM" in log and "Traceback" not in log, log


def test_device_exits_when_its_parent_dies(rundir: RuntimeDir) -> None:
    ep = rundir.endpoint("orphan.ctl")
    script = (
        "import sys\n"
        "from hostops.process import DeviceProcess, python_argv\n"
        "from hostops.sync import Event\n"
        "p = DeviceProcess.launch(python_argv('vdev', 'blk', '--memory', '64K',"
        " '--control', sys.argv[1]), name='orphan', log_path=sys.argv[2])\n"
        "Event().wait()\n"
    )
    parent = DeviceProcess.launch(
        [sys.executable, "-c", script, ep, os.path.join(rundir.path, "orphan.log")],
        name="parent",
        log_path=os.path.join(rundir.path, "parent.log"),
    )
    ctl = ControlClient(ep, peer_alive=parent.alive)
    pidfd = -1
    child = 0
    try:
        info = decode_reply(ctl.call(encode_request("GET_DEVICE_INFO"), timeout_s=STARTUP_TIMEOUT))
        assert info["name"] == "blk"
        children = _children_of(parent.pid)
        assert len(children) == 1, children
        child = children[0]
        pidfd = os.pidfd_open(child)
        parent.kill()
        assert parent.wait(TIMEOUT) is not None
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        assert poller.poll(int(TIMEOUT * 1000)), "the device outlived its parent"
    finally:
        ctl.close()
        if pidfd >= 0:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(pidfd)
        parent.kill()
        parent.close()


def _children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d.name))
    return out


# --------------------------------------------------------------------------- plugin API


class Echo(Device):
    """A custom device written against the plugin API: copies what it reads into what it
    writes. A request starting with ``!`` makes it raise; ``?`` makes it return a used
    length larger than the buffer — both are device bugs the runtime must survive."""

    device_id = 0x7E
    name = "echo"
    num_queues = 1
    max_queue_size = 64

    def __init__(self) -> None:
        super().__init__()
        self.metrics.declare("echoed")

    def config(self) -> bytes:
        return b"hello"

    def handle(self, queue: int, chain: Chain) -> int:
        data = chain.read(0, min(chain.readable_len, chain.writable_len))
        if data[:1] == b"!":
            raise RuntimeError("echo device bug")
        if data[:1] == b"?":
            return chain.writable_len + 1
        chain.write(0, data)
        self.metrics.inc("echoed", len(data))
        return len(data)


class _InThread:
    """A DeviceRuntime in a thread of this process, shaped like a DeviceProcess."""

    def __init__(self, runtime: DeviceRuntime) -> None:
        self.runtime = runtime
        self.returncode: int | None = None
        self.thread: Thread = start_thread(self._run, name="device")

    def _run(self) -> None:
        self.returncode = self.runtime.run()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> int | None:
        self.runtime.stop()
        self.thread.join(TIMEOUT)
        return self.returncode

    def close(self) -> None:
        self.stop()

    def exit_description(self) -> str:
        return f"returned {self.returncode}"


def test_custom_device_survives_its_own_bugs(rundir: RuntimeDir) -> None:
    import io

    log = io.StringIO()
    ep = rundir.endpoint("echo.ctl")
    runtime = DeviceRuntime(Echo(), ep, watch_parent=False, log=log)
    proc = _InThread(runtime)
    call = DoorbellListener(rundir.endpoint("echo.call"))
    d = Dut(
        "echo",
        proc,  # type: ignore[arg-type]
        ControlClient(ep, peer_alive=proc.alive),
        call,
        rundir.endpoint("echo.kick"),
        rundir.endpoint("echo.call"),
        "",
    )
    try:
        offered = d.bring_up(device_id=0x7E)
        assert offered == OFFERED_BY_RUNTIME
        assert d.req("GET_CONFIG", offset=0, size=5)["data"] == b"hello"
        assert d.error("GET_CONFIG", offset=3, size=3) == ErrorCode.BAD_VALUE
        assert d.memory is not None

        def echo(data: bytes) -> tuple[int, bytes]:
            token, w = d.submit([data], [len(data)])
            n = d.complete(token)
            assert d.memory is not None
            return n, bytes(d.memory.view(w[0][0], n))

        assert echo(b"ping") == (4, b"ping")
        assert echo(b"!boom") == (0, b"")  # handle() raised
        assert echo(b"?huh") == (0, b"")  # handle() returned an impossible length
        assert echo(b"pong") == (4, b"pong")
        m = d.metrics()
        assert m["device"]["handler_errors"] == 2 and m["queues"][0]["handler_errors"] == 2
        assert m["device"]["echoed"] == 8 and m["queues"][0]["chains"] == 4
        assert d.status() == 15
    finally:
        d.close()
    assert proc.returncode == 0 and not proc.alive()
    text = log.getvalue()
    assert "RuntimeError: echo device bug" in text and "Traceback" in text
    assert "handle() returned 5" in text
