"""The holes found by reading the code (issue 10), each attack mounted for real and
shown failing with the documented error:

* a malformed control reply (a fake device process speaking the protocol badly: a real
  process, a real ZeroMQ socket) is a DeviceControlError naming the message and the
  field, never a KeyError out of ``boot()``;
* doorbell endpoints outside the device's private run directory are refused (BAD_VALUE,
  logged, counted) and the file they aim at survives;
* floods (doorbells, junk control frames) are drained a bounded batch per call, with
  no lost wake-up, and the device keeps serving;
* start-up resource failures are one line on stderr and a non-zero exit;
* the device loop's last-resort handler logs and keeps serving, then exits with a
  distinct status when errors repeat;
* memfd sealing: a front-end that shrinks our back-end's memory cannot (the fd is
  sealed or refused), and a back-end that shrinks the kernel's memfd gets EPERM.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import zmq

import kernel
from hostops import DeviceProcess, RuntimeDir
from hostops.control import MAX_MESSAGE, MAX_SKIP, ControlClient, ControlServer
from hostops.doorbell import RECV_BATCH, Doorbell, DoorbellListener
from hostops.fdmem import MappingError, create_memfd, require_shrink_seal
from hostops.poll import Poller
from hostops.process import python_argv
from hostops.sync import start_thread
from kernel.errors import DeviceControlError
from kernel.specs import DeviceSpec
from kernel.transport_zmq import ZmqTransport
from tests.integration.test_vhost_user_backend import (
    GPA_A,
    IMAGE_SIZE,
    REGION,
    USER_A,
    Backend,
    FrontEnd,
    _connect,
    _prove_io,
)
from vdev.examples.rng import RngDevice
from vdev.runtime import EXIT_INTERNAL_ERROR, MAX_INTERNAL_ERRORS, DeviceRuntime, endpoint_problem
from vdev.virtio.control import (
    ErrorCode,
    RemoteError,
    check_reply,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from vdev.virtio.errors import ProtocolError
from vdev.virtio.vhost_user import MemoryRegion, MemoryTable, Req, encode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0
STARTUP = 15.0


# =========================================================================== replies


def test_check_reply_names_message_and_field() -> None:
    good = {"device_id": 2, "num_queues": 1, "max_queue_size": 64, "name": "blk"}
    assert check_reply("GET_DEVICE_INFO", dict(good, extra="ignored"))["num_queues"] == 1
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        ("GET_DEVICE_INFO", {k: v for k, v in good.items() if k != "name"}, "BAD_FIELD", "name"),
        ("GET_DEVICE_INFO", dict(good, num_queues="1"), "BAD_FIELD", "num_queues"),
        ("GET_DEVICE_INFO", dict(good, max_queue_size=True), "BAD_FIELD", "max_queue_size"),
        ("GET_FEATURES", {"features": -5}, "BAD_VALUE", "features"),
        ("GET_FEATURES", {"features": 1 << 64}, "BAD_VALUE", "features"),
        ("GET_CONFIG", {"data": "str"}, "BAD_FIELD", "data"),
        ("GET_STATUS", {}, "BAD_FIELD", "status"),
        ("GET_VRING_BASE", {"base": None}, "BAD_FIELD", "base"),
        ("GET_METRICS", {"device": [], "queues": []}, "BAD_FIELD", "device"),
    ]
    for type_, fields, code, name in cases:
        with pytest.raises(ProtocolError) as ei:
            check_reply(type_, fields)
        assert ei.value.code == code, (type_, fields)
        assert type_ in ei.value.message and repr(name) in ei.value.message
    assert check_reply("SET_STATUS", {}) == {}
    with pytest.raises(ProtocolError, match="UNKNOWN_MESSAGE"):
        check_reply("NO_SUCH", {})


@dataclass(frozen=True)
class BadPeer(DeviceSpec):
    """A device spec that launches ``tests/integration/bad_control_peer.py``."""

    mode: str = ""
    kind: ClassVar[str] = "blk"

    def device_args(self) -> list[str]:
        return []

    def argv(self, control_endpoint: str, **_: Any) -> list[str]:
        return python_argv(
            "tests.integration.bad_control_peer", self.mode, "--control", control_endpoint
        )


@pytest.mark.parametrize(
    ("mode", "message", "code", "field"),
    [
        ("info_missing_num_queues", "GET_DEVICE_INFO", "BAD_FIELD", "num_queues"),
        ("info_name_is_int", "GET_DEVICE_INFO", "BAD_FIELD", "name"),
        ("info_queues_is_bool", "GET_DEVICE_INFO", "BAD_FIELD", "num_queues"),
        ("features_is_str", "GET_FEATURES", "BAD_FIELD", "features"),
        ("features_negative", "GET_FEATURES", "BAD_VALUE", "features"),
        ("status_missing", "GET_STATUS", "BAD_FIELD", "status"),
        ("info_not_msgpack", "GET_DEVICE_INFO", "MALFORMED", ""),
    ],
)
def test_malformed_reply_is_a_device_control_error(
    mode: str, message: str, code: str, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake device process answers one message badly: boot() fails with the probe
    error, caused by a DeviceControlError naming the message and the field."""
    monkeypatch.chdir(ROOT)  # the fake device is a module of this repository
    with pytest.raises(kernel.DeviceProbeError) as ei:
        kernel.boot(devices=[BadPeer(mode=mode, on_device_death="fail")])
    cause = ei.value.__cause__
    assert isinstance(cause, DeviceControlError), repr(cause)
    assert cause.request == message and cause.code == code
    assert f"'{field}'" in cause.message if field else "msgpack" in cause.message
    assert message in str(ei.value)


# =========================================================================== endpoints


@pytest.fixture
def rundir() -> Iterator[RuntimeDir]:
    rd = RuntimeDir.create()
    try:
        yield rd
    finally:
        rd.cleanup()


@dataclass
class Dev:
    proc: DeviceProcess
    ctl: ControlClient
    log_path: str

    def req(self, type_: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        return decode_reply(self.ctl.call(encode_request(type_, **fields), timeout_s=timeout))

    def refused(self, type_: str, **fields: Any) -> str:
        with pytest.raises(RemoteError) as ei:
            self.req(type_, **fields)
        assert ei.value.code == ErrorCode.BAD_VALUE
        return ei.value.message

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def close(self) -> None:
        self.ctl.close()
        self.proc.stop()
        self.proc.close()


@pytest.fixture
def dev(rundir: RuntimeDir) -> Iterator[Dev]:
    ctl_ep = rundir.endpoint("vda.ctl")
    log_path = os.path.join(rundir.path, "vda.log")
    proc = DeviceProcess.launch(
        python_argv("vdev", "blk", "--memory", "1M", "--control", ctl_ep),
        name="vda",
        log_path=log_path,
    )
    d = Dev(proc, ControlClient(ctl_ep, peer_alive=proc.alive), log_path)
    try:
        d.req("GET_DEVICE_INFO", timeout=STARTUP)
        yield d
    finally:
        d.close()


def test_endpoints_outside_the_run_directory_are_refused(
    dev: Dev, rundir: RuntimeDir, tmp_path: Path
) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    inside_file = Path(rundir.path) / "notes.txt"
    inside_file.write_text("keep me too")
    link = Path(rundir.path) / "link.kick"
    link.symlink_to(tmp_path / "elsewhere.kick")
    bad = {
        "tcp://127.0.0.1:5555": "only ipc://",
        f"ipc://{victim}": "outside",
        f"ipc://{rundir.path}/../{os.path.basename(rundir.path)}/x.kick": "normalised",
        f"ipc://{rundir.path}//x.kick": "normalised",
        f"ipc://{link}": "symbolic link",
        f"ipc://{inside_file}": "not a socket",
        rundir.endpoint("vda.ctl"): "control socket",
        "ipc://relative.kick": "absolute",
    }
    for endpoint, why in bad.items():
        for type_ in ("SET_VRING_KICK", "SET_VRING_CALL"):
            msg = dev.refused(type_, index=0, endpoint=endpoint)
            assert "refused" in msg and why in msg, (endpoint, msg)
    assert victim.read_text() == "keep me" and inside_file.read_text() == "keep me too"
    assert not (tmp_path / "elsewhere.kick").exists()
    m = dev.req("GET_METRICS")["device"]
    assert m["endpoints_refused"] == 2 * len(bad)
    # the device still takes endpoints inside its run directory (a stale socket too)
    assert dev.req("SET_VRING_KICK", index=0, endpoint=rundir.endpoint("vda.kick")) == {}
    assert dev.req("SET_VRING_CALL", index=0, endpoint=rundir.endpoint("vda.call")) == {}
    assert "endpoint 'tcp://127.0.0.1:5555' refused" in dev.log()


def test_endpoint_problem_rules(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert endpoint_problem(f"ipc://{run}/a.kick", str(run)) == ""
    assert "outside" in endpoint_problem(f"ipc://{tmp_path}/a.kick", str(run))
    assert "run directory" in endpoint_problem(f"ipc://{run}/a.kick", "")
    assert "control" in endpoint_problem(f"ipc://{run}/c", str(run), control_path=str(run / "c"))


# =========================================================================== floods


def test_doorbell_recv_all_takes_a_bounded_batch_without_losing_the_wakeup(
    rundir: RuntimeDir,
) -> None:
    ep = rundir.endpoint("flood.kick")
    total = 3 * RECV_BATCH + 5
    with DoorbellListener(ep) as listener, Doorbell(ep, high_water_mark=2 * total) as bell:
        for i in range(total):
            bell.ring(i % 3)
        poller = Poller()
        poller.register(listener)
        got: set[int] = set()
        calls = 0
        while listener.received < total:
            assert poller.poll(TIMEOUT) == [listener]  # woken again while any remain
            before = listener.received
            got |= set(listener.recv_all())
            calls += 1
            assert listener.received - before <= RECV_BATCH
        assert calls >= 4 and got == {0, 1, 2} and not listener.pending
        assert poller.poll(0) == []


def test_control_server_skips_a_bounded_number_of_junk_frames(rundir: RuntimeDir) -> None:
    ep = rundir.endpoint("junk.ctl")
    with ControlServer(ep) as server:
        junk = zmq.Context.instance().socket(zmq.DEALER)
        junk.setsockopt(zmq.LINGER, 0)
        junk.setsockopt(zmq.SNDHWM, 0)
        junk.connect(ep)
        try:
            n = 3 * MAX_SKIP
            for _ in range(n):
                junk.send_multipart([b"no seq"])  # not [seq(8), payload]: malformed
            junk.send_multipart([b"\x01" * 8, b"real"])
            polls = 0
            got = None
            while got is None:
                assert junk.poll(0, zmq.POLLOUT) or True
                before = server.malformed
                got = server.recv(TIMEOUT)
                assert server.malformed - before <= MAX_SKIP
                polls += 1
            assert got[1] == b"real" and server.malformed == n and polls >= 3
        finally:
            junk.close(linger=0)


def test_oversized_messages_are_cut_off_before_they_are_queued(rundir: RuntimeDir) -> None:
    """A peer sending a frame larger than MAX_MESSAGE (control) or 64 bytes (doorbell)
    is disconnected by ZeroMQ: nothing is received, nothing is allocated for it, and
    other peers are served."""
    ctl_ep, kick_ep = rundir.endpoint("big.ctl"), rundir.endpoint("big.kick")
    with ControlServer(ctl_ep) as server, DoorbellListener(kick_ep) as listener:
        big = zmq.Context.instance().socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        big.connect(ctl_ep)
        fat = zmq.Context.instance().socket(zmq.PUSH)
        fat.setsockopt(zmq.LINGER, 0)
        fat.connect(kick_ep)
        try:
            big.send_multipart([b"\x01" * 8, bytes(MAX_MESSAGE + 1)])
            fat.send(bytes(4096))
            with ControlClient(ctl_ep) as good, Doorbell(kick_ep) as bell:
                bell.ring(3)
                assert listener.wait(TIMEOUT) == [3]
                reply: list[bytes] = []

                def serve_one() -> None:
                    got = server.recv(TIMEOUT)
                    assert got is not None
                    server.reply(got[0], b"pong:" + got[1])

                t = start_thread(serve_one, name="serve-one")
                reply.append(good.call(b"ping", TIMEOUT))
                t.join(TIMEOUT)
                assert reply == [b"pong:ping"]
            assert listener.received == 1 and listener.malformed == 0
            assert server.malformed == 0
        finally:
            big.close(linger=0)
            fat.close(linger=0)


def test_device_process_survives_doorbell_and_control_floods(dev: Dev, rundir: RuntimeDir) -> None:
    """100k doorbells (for a queue that does not exist, and malformed ones) and 20k junk
    control frames: the device drains them a bounded batch at a time and answers
    throughout."""
    kick_ep = rundir.endpoint("vda.kick")
    assert dev.req("SET_VRING_KICK", index=0, endpoint=kick_ep) == {}
    flood = 100_000
    junk = zmq.Context.instance().socket(zmq.PUSH)
    junk.setsockopt(zmq.LINGER, 0)
    junk.setsockopt(zmq.SNDHWM, 0)
    junk.connect(kick_ep)
    ctl_junk = zmq.Context.instance().socket(zmq.DEALER)
    ctl_junk.setsockopt(zmq.LINGER, 0)
    ctl_junk.setsockopt(zmq.SNDHWM, 0)
    ctl_junk.connect(rundir.endpoint("vda.ctl"))
    try:
        for i in range(flood):
            junk.send(b"\x07\x00" if i % 10 else b"\x01\x02\x03")  # queue 7 / 3 bytes
        junk.send(b"\x00\x00")  # a kick for queue 0 behind the flood, on the same socket
        for _ in range(20_000):
            ctl_junk.send_multipart([b"junk"])
        # served while the flood is drained (control and kicks share the loop)
        assert dev.req("GET_STATUS")["status"] == 0
        m: dict[str, Any] = {}
        for _ in range(100_000):  # each GET_METRICS is one round trip: no sleeping
            m = dev.req("GET_METRICS")
            if m["queues"][0]["kicks_received"]:
                break
        # the last kick arrived, so the flood before it was consumed, in batches: a
        # batch reports queue 7 once (doorbells are level-triggered), and no batch
        # takes more than RECV_BATCH messages
        assert m["queues"][0]["kicks_received"] == 1
        assert m["device"]["bad_kicks"] >= (flood - flood // 10) // RECV_BATCH
        assert dev.proc.alive()
        assert dev.req("GET_DEVICE_INFO")["name"] == "blk"
    finally:
        junk.close(linger=0)
        ctl_junk.close(linger=0)


def test_config_change_storm_costs_the_interrupt_thread_no_round_trip(
    rundir: RuntimeDir,
) -> None:
    """1000 CONFIG_CHANGE interrupts while the device does not answer: each returns at
    once (the check runs on a config worker thread), and they coalesce into one check
    in flight plus one pending — 2 GET_STATUS in all, not 1000 blocking round trips on
    the interrupt thread."""
    ep = rundir.endpoint("cfg.ctl")
    t = ZmqTransport("vdz", kernel.Blk.memory(1 << 20), rundir)
    with ControlServer(ep) as server:
        t._client = ControlClient(ep)
        try:
            t._config_changed()  # what the interrupt thread calls
            first = server.recv(TIMEOUT)  # the check is in flight, unanswered
            assert first is not None and decode_request(first[1]).type == "GET_STATUS"
            for _ in range(999):
                t._config_changed()  # returns at once every time
            server.reply(first[0], encode_reply(status=0))
            second = server.recv(TIMEOUT)  # the 999 coalesced into one more check
            assert second is not None and decode_request(second[1]).type == "GET_STATUS"
            server.reply(second[0], encode_reply(status=0))
            assert server.recv(0.2) is None  # and nothing more
        finally:
            client, t._client = t._client, None
            client.close()


# =========================================================================== start-up


def _run_vdev(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vdev", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "VLAB_DEBUG": "0"},
    )


def test_start_up_failures_are_one_line(tmp_path: Path) -> None:
    ctl = f"ipc://{tmp_path}/x.ctl"
    unreadable = tmp_path / "noperm.img"
    unreadable.write_bytes(bytes(4096))
    cases = [
        (["blk", "--memory", "1T", "--control", ctl], "more than this machine", 2),
        (["blk", "--image", str(tmp_path / "none.img"), "--control", ctl], "not found", 2),
        (["blk", "--image", str(tmp_path), "--control", ctl], "directory", 2),
        (["blk", "--memory", "1M", "--control", "ipc:///nonexistent/d/x.ctl"], "does not", 2),
        (["rng", "--control", "ipc:///nonexistent/d/x.ctl"], "does not exist", 2),
        (["blk", "--memory", "1M", "--vhost-user", "/nonexistent/d/x.sock"], "does not", 2),
        (["net", "--backend", "loopback", "--control", "ipc:///nonexistent/x"], "does not", 2),
    ]
    # a control endpoint whose directory exists but cannot be bound in: a resource
    # failure at run time (one line, exit 1); as root every directory is writable,
    # so bind on a path that is too long for a Unix socket instead
    long_dir = tmp_path / ("d" * 90)
    long_dir.mkdir()
    cases.append((["blk", "--memory", "1M", "--control", f"ipc://{long_dir}/x.ctl"], "", 1))
    for argv, text, status in cases:
        r = _run_vdev(*argv)
        assert r.returncode == status, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert "Traceback" not in r.stderr and len(lines) == 1, (argv, r.stderr)
        assert text in lines[0], (argv, lines)


# =========================================================================== last resort


class _Boom:
    """A pollable that is always readable (a pipe with a byte in it)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.write(self.w, b"x")

    def _pollable(self) -> int:
        return self.r

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def test_last_resort_handler_keeps_serving_then_gives_up(rundir: RuntimeDir) -> None:
    ep = rundir.endpoint("lr.ctl")
    log = io.StringIO()
    rt = DeviceRuntime(RngDevice(seed=1), ep, watch_parent=False, log=log)
    boom = _Boom()
    state = {"fail": 1}

    def callback() -> None:
        if state["fail"] > 0:
            state["fail"] -= 1
            raise RuntimeError("a bug in a callback")
        os.read(boom.r, 1)  # handled: no longer readable

    rt.session.add_source(boom, callback)
    result: list[int] = []
    thread = start_thread(lambda: result.append(rt.run()), name="lr-runtime")
    try:
        with ControlClient(ep) as c:
            # one failure so far: logged, counted, and the device still answers
            m = decode_reply(c.call(encode_request("GET_METRICS"), timeout_s=TIMEOUT))
            assert m["device"]["internal_errors"] == 1
            state["fail"] = 10**9  # now every round fails: the process must give up
            os.write(boom.w, b"x")
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    finally:
        rt.stop()
        thread.join(TIMEOUT)
        boom.close()
    assert result == [EXIT_INTERNAL_ERROR]
    assert rt.counters["internal_errors"] == MAX_INTERNAL_ERRORS
    text = log.getvalue()
    assert "internal error 1/" in text and "RuntimeError: a bug in a callback" in text
    assert "Traceback" in text  # the traceback goes to the log file


# =========================================================================== memfd seals


def test_memfd_seal_helpers() -> None:
    fd, m = create_memfd(1 << 16, seal=True)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)
        assert require_shrink_seal(fd) is True
    finally:
        m.close()
        os.close(fd)
    loose = os.memfd_create("loose", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    locked = os.memfd_create("locked", os.MFD_CLOEXEC)  # F_SEAL_SEAL from birth
    try:
        os.ftruncate(loose, 1 << 16)
        assert require_shrink_seal(loose) is False  # sealed now, by us
        with pytest.raises(PermissionError):
            os.ftruncate(loose, 0)
        with pytest.raises(MappingError, match="cannot be sealed now"):
            require_shrink_seal(locked)
    finally:
        os.close(loose)
        os.close(locked)
    with open(__file__, "rb") as f:
        with pytest.raises(MappingError, match="not a memfd"):
            require_shrink_seal(f.fileno())


@pytest.fixture
def vu_image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (IMAGE_SIZE // 256))
    return path


@pytest.fixture
def vu_backend(vu_image: Path) -> Iterator[Backend]:
    d = tempfile.mkdtemp(prefix="vu-", dir="/tmp")
    be = Backend(vu_image, os.path.join(d, "blk.sock"))
    try:
        yield be
    finally:
        rc = be.stop()
        shutil.rmtree(d, ignore_errors=True)
        assert rc == 0, be.lines


@pytest.fixture
def vu_frontends() -> Iterator[list[FrontEnd]]:
    made: list[FrontEnd] = []
    yield made
    for fe in made:
        fe.close()


def test_front_end_cannot_shrink_our_back_end_memory(
    vu_backend: Backend, vu_frontends: list[FrontEnd], vu_image: Path
) -> None:
    """A front-end hands over a memfd it cannot seal (created without
    MFD_ALLOW_SEALING): SET_MEM_TABLE fails with a logged reason, the connection is
    closed, the process lives. A sealable one is sealed by the back-end: the
    front-end's ftruncate then fails with EPERM, and I/O goes on."""
    fe = _connect(vu_backend, vu_frontends)
    fe.handshake()
    locked = os.memfd_create("locked", os.MFD_CLOEXEC)
    os.ftruncate(locked, REGION)
    fe.fds.append(locked)
    table = MemoryTable((MemoryRegion(GPA_A, REGION, USER_A, 0),))
    fe.send_raw(encode(Req.SET_MEM_TABLE, table, need_reply=True), (locked,))
    fe.expect_closed()
    assert "cannot be sealed now" in vu_backend.wait_for("closed")
    _prove_io(vu_backend, vu_frontends, vu_image, 8)
    # the QEMU-like session's memfds (MFD_ALLOW_SEALING) got sealed by the back-end
    fe2 = vu_frontends[-1]
    assert fe2.fds, "the front-end keeps its memory fds"
    sealed = 0
    for fd in fe2.fds:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:  # an eventfd
            continue
        assert seals & fcntl.F_SEAL_SHRINK
        with pytest.raises(OSError) as ei:
            os.ftruncate(fd, 4096)  # the attack
        assert ei.value.errno == errno.EPERM
        sealed += 1
    assert sealed == 2  # both memory regions
    fe2.close()
    vu_backend.wait_for("closed")
    _prove_io(vu_backend, vu_frontends, vu_image, 16)
    assert any("sealed it against shrinking" in line for line in vu_backend.lines)


def test_back_end_cannot_shrink_the_kernel_memfd(tmp_path: Path) -> None:
    """A malicious back-end ftruncates the memfd at SET_MEM_TABLE: the kernel sealed it,
    so the attack fails with EPERM and I/O through k.sys works (no SIGBUS)."""
    sock = str(tmp_path / "evil.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.truncating_backend", sock],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    err = proc.stderr.fileno()
    lines: list[str] = []
    buf = [b""]

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not any(text in line for line in lines):
            left = deadline - time.monotonic()
            assert left > 0, lines
            if select.select([err], [], [], left)[0]:
                chunk = os.read(err, 65536)
                assert chunk, f"back-end exited: {lines}"
                *done, buf[0] = (buf[0] + chunk).split(b"\n")
                lines.extend(d.decode(errors="replace") for d in done)

    try:
        wait_for("listening on")
        k = kernel.boot(devices=[kernel.VhostUserBlk(sock)])
        try:
            fd = k.sys.open("/dev/vda", os.O_RDWR)
            data = os.urandom(64 << 10)
            assert k.sys.pwrite(fd, data, 4096) == len(data)
            assert k.sys.pread(fd, len(data), 4096) == data
            k.sys.close(fd)
            wait_for("ATTACK")
        finally:
            k.shutdown()
        assert any("ATTACK ftruncate refused: EPERM" in line for line in lines), lines
        assert not any("ATTACK ftruncate succeeded" in line for line in lines)
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
        proc.stderr.close()
