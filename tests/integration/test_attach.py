"""``kernel.Attach``: a device process started by hand (``python -m vdev KIND ...
--control EP --shm-by-name``), attached to like a vhost-user back-end daemon; killed
and started again on the same endpoint, the kernel reconnects and resubmits what was in
flight.

Real parts only: real device processes (started by the test, stopped by the test), real
POSIX shm, real ZeroMQ. No sleeps: the test waits on the device's control channel
(GET_DEVICE_INFO with a timeout), on processes, on events and conditions.
"""

from __future__ import annotations

import errno
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import kernel
from hostops.control import ControlClient
from hostops.process import DeviceProcess, python_argv
from hostops.rundir import RuntimeDir
from kernel.errors import culprit_of
from vdev.virtio import DeviceId
from vdev.virtio.control import decode_reply, encode_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 2 << 20
TIMEOUT = 30.0


class Devices:
    """Device processes the test starts by hand in a run directory of its own (the
    kernel never owns them); every one is stopped at the end."""

    def __init__(self, rundir: RuntimeDir) -> None:
        self.rundir = rundir
        self.procs: list[DeviceProcess] = []
        self.log = os.path.join(rundir.path, "devices.log")

    def endpoint(self, name: str = "dev.ctl") -> str:
        return self.rundir.endpoint(name)

    def start(self, kind: str, *args: str, ep: str, ready: bool = True) -> DeviceProcess:
        """``python -m vdev KIND ARGS --control EP --shm-by-name``; with ``ready``, wait
        until it answers GET_DEVICE_INFO."""
        argv = python_argv("vdev", kind, *args, "--control", ep, "--shm-by-name")
        p = DeviceProcess.launch(argv, name=kind, log_path=self.log)
        self.procs.append(p)
        if ready:
            with ControlClient(ep, peer_alive=p.alive) as c:
                info = decode_reply(c.call(encode_request("GET_DEVICE_INFO"), timeout_s=TIMEOUT))
            assert info["pid"] == p.pid  # an attachable device reports its pid
        return p

    def log_text(self) -> str:
        try:
            return Path(self.log).read_text()
        except OSError:
            return ""

    def close(self) -> None:
        for p in self.procs:
            p.close()


@pytest.fixture
def devices() -> Iterator[Devices]:
    rd = RuntimeDir.create()
    d = Devices(rd)
    try:
        yield d
    finally:
        d.close()
        rd.cleanup()


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(IMAGE_SIZE))
    return str(path)


def _our_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"vlab-{os.getpid()}-")}


def _kill(p: DeviceProcess) -> None:
    p.kill()
    assert p.wait(TIMEOUT) == -signal.SIGKILL


# --------------------------------------------------------------------------- basics


def test_attach_disk_read_write_and_device_outlives_kernel(devices: Devices, image: str) -> None:
    """The kernel attaches to a disk it did not start, names it from its device id,
    reads and writes through k.sys over the kernel's sealed memfd (opened by the device
    through /proc; nothing in /dev/shm); at shutdown the device is reset, not stopped,
    and the kernel's doorbell socket removed -- and the next kernel attaches to the
    same process and sees the data."""
    ep = devices.endpoint("blk.ctl")
    p = devices.start("blk", "--image", image, ep=ep)
    data = random.Random(1).randbytes(64 << 10)
    with kernel.boot(devices=[kernel.Attach(ep)]) as k:
        [dev] = k.devices
        assert dev.name == "vda" and dev.device_id == DeviceId.BLOCK
        assert dev.pid == p.pid
        assert isinstance(dev.transport, kernel.AttachTransport)
        path = dev.transport.region_path
        assert path == f"/proc/{os.getpid()}/fd/{dev.transport._memfd}"
        assert not _our_segments()  # a memfd: no name to leak
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        assert k.sys.pwrite(fd, data, 4096) == len(data)
        k.sys.fsync(fd)
        assert k.sys.pread(fd, len(data), 4096) == data
        assert os.path.exists(ep[6:] + ".call")
    assert not _our_segments()
    assert not os.path.exists(ep[6:] + ".call")
    assert p.alive()  # the device is its owner's: reset, still serving
    with open(image, "rb") as f:
        f.seek(4096)
        assert f.read(len(data)) == data
    with kernel.boot(devices=[kernel.Attach(ep, name_prefix="xd")]) as k:
        [dev] = k.devices
        assert dev.name == "xda" and dev.pid == p.pid
        fd = k.sys.open("/dev/xda", os.O_RDONLY)
        assert k.sys.pread(fd, len(data), 4096) == data
        assert dev.recovery["restarts"] == 0
    assert p.alive()


def test_attached_and_started_disks_share_the_naming(devices: Devices, image: str) -> None:
    """Attached devices take their place in boot order: Blk is vda, the attached disk
    vdb."""
    ep = devices.endpoint()
    devices.start("blk", "--image", image, ep=ep)
    with kernel.boot(devices=[kernel.Blk.memory(1 << 20), kernel.Attach(ep)]) as k:
        assert [d.name for d in k.devices] == ["vda", "vdb"]
        fd = k.sys.open("/dev/vdb", os.O_RDWR)
        assert k.sys.pwrite(fd, b"x" * 512, 0) == 512


def test_second_attach_from_the_same_process_is_refused(devices: Devices, image: str) -> None:
    ep = devices.endpoint()
    devices.start("blk", "--image", image, ep=ep)
    with pytest.raises(kernel.DeviceProbeError, match="attached to .* already"):
        kernel.boot(devices=[kernel.Attach(ep), kernel.Attach(ep)])
    with kernel.boot(devices=[kernel.Attach(ep)]) as k:  # the failed boot let go of it
        with pytest.raises(kernel.DeviceProbeError, match="already"):
            kernel.boot(devices=[kernel.Attach(ep)])
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        assert k.sys.pwrite(fd, b"z" * 512, 0) == 512


# --------------------------------------------------------------------------- restart


def test_sigkill_and_restart_under_load_no_request_lost(devices: Devices, image: str) -> None:
    """A thread does verified writes and reads while the device process is SIGKILLed
    and started again on the same endpoint: the kernel notices, waits for it,
    brings it up again and resubmits; every call succeeds, every read returns what was
    written, and the image (read from the host) holds it all."""
    ep = devices.endpoint()
    first = devices.start("blk", "--image", image, ep=ep)
    k = kernel.boot(devices=[kernel.Attach(ep)])
    done = 0
    progress = threading.Condition()
    stop = threading.Event()
    errors: list[BaseException] = []
    written: dict[int, bytes] = {}
    try:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)

        def worker() -> None:
            nonlocal done
            rnd = random.Random(7)
            try:
                while not stop.is_set():
                    off = rnd.randrange(0, (IMAGE_SIZE - 8192) // 512) * 512
                    data = rnd.randbytes(8192)
                    assert k.sys.pwrite(fd, data, off) == len(data)
                    assert k.sys.pread(fd, len(data), off) == data
                    for j in range(0, len(data), 512):
                        written[off + j] = data[j : j + 512]
                    with progress:
                        done += 1
                        progress.notify_all()
            except BaseException as e:  # reported by the main thread
                errors.append(e)
                with progress:
                    progress.notify_all()

        t = threading.Thread(target=worker)
        t.start()
        try:
            with progress:
                assert progress.wait_for(lambda: done >= 20 or errors, TIMEOUT)
            _kill(first)
            second = devices.start("blk", "--image", image, ep=ep, ready=False)
            assert dev.wait_recovered(1, TIMEOUT), dev.failed
            with progress:
                mark = done
                assert progress.wait_for(lambda: done >= mark + 20 or errors, TIMEOUT)
        finally:
            stop.set()
            t.join(TIMEOUT)
        assert not errors, errors
        assert dev.failed is None
        assert dev.recovery["restarts"] == 1 and dev.recovery["recovery_failures"] == 0
        assert dev.transport.attach["reconnects"] == 1  # type: ignore[attr-defined]
        assert dev.pid == second.pid != first.pid
        k.sys.fsync(fd)
    finally:
        k.shutdown()
    with open(image, "rb") as f:
        disk = f.read()
    for off, sector in written.items():
        assert disk[off : off + 512] == sector, f"sector at {off} lost"


def test_requests_in_flight_at_the_kill_are_resubmitted(devices: Devices, image: str) -> None:
    """Writes handed to a stopped device (SIGSTOP: they are surely in flight) that is
    then SIGKILLed complete successfully on the device started in its place."""
    ep = devices.endpoint()
    first = devices.start("blk", "--image", image, ep=ep)
    n = 8
    results: list[object] = []
    all_done = threading.Event()
    lock = threading.Lock()

    def callback(result: object) -> None:
        with lock:
            results.append(result)
            if len(results) == n:
                all_done.set()

    with kernel.boot(devices=[kernel.Attach(ep)]) as k:
        dev = k.devices[0]
        blk = dev.block
        assert blk is not None
        os.kill(first.pid, signal.SIGSTOP)
        chunks = [bytes([i + 1]) * 4096 for i in range(n)]
        for i, chunk in enumerate(chunks):
            blk.submit("write", i * 4096, chunk, callback)
        _kill(first)
        second = devices.start("blk", "--image", image, ep=ep, ready=False)
        assert all_done.wait(TIMEOUT), results
        assert results == [4096] * n
        assert dev.recovery["requests_resubmitted"] >= n
        assert dev.pid == second.pid
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        k.sys.fsync(fd)
    with open(image, "rb") as f:
        assert f.read(n * 4096) == b"".join(chunks)


def test_device_that_never_comes_back_fails_eio_device_gone(devices: Devices, image: str) -> None:
    """Killed and not started again: after ``reconnect_timeout`` the device fails for
    good -- the waiting caller and every later one get EIO, culprit "device-gone"."""
    ep = devices.endpoint()
    p = devices.start("blk", "--image", image, ep=ep)
    with kernel.boot(devices=[kernel.Attach(ep, reconnect_timeout=1.0)]) as k:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        assert k.sys.pwrite(fd, b"a" * 512, 0) == 512
        _kill(p)
        with pytest.raises(OSError) as ei:
            k.sys.pread(fd, 512, 0)
        assert ei.value.errno == errno.EIO and culprit_of(ei.value) == "device-gone"
        assert "did not come back within 1 s" in str(ei.value)
        assert dev.wait_failed(TIMEOUT) is not None
        assert dev.transport.attach["reconnect_timeouts"] == 1  # type: ignore[attr-defined]
        with pytest.raises(OSError) as ei:
            k.sys.pwrite(fd, b"b" * 512, 0)
        assert ei.value.errno == errno.EIO and culprit_of(ei.value) == "device-gone"


def test_device_whose_driver_cannot_resubmit_fails_instead_of_hanging(
    devices: Devices,
) -> None:
    """virtio-rng's driver has no way to resubmit: an attached rng that dies under a
    read fails it with EIO, culprit "device-gone" (noticed by the ping: no process to
    watch), rather than leaving the caller waiting."""
    ep = devices.endpoint()
    p = devices.start("rng", ep=ep)
    with kernel.boot(devices=[kernel.Attach(ep)]) as k:
        fd = k.sys.open("/dev/hwrng")
        assert len(k.sys.read(fd, 64)) == 64
        _kill(p)
        with pytest.raises(OSError) as ei:
            k.sys.read(fd, 64)
        # (the rng driver re-raises without the culprit; the device's failure has it)
        assert ei.value.errno == errno.EIO and "cannot resubmit" in str(ei.value)
        failed = k.devices[0].failed
        assert failed is not None and culprit_of(failed) == "device-gone"
        assert k.devices[0].transport.attach["pings_failed"] == 1  # type: ignore[attr-defined]


def test_nothing_listening_is_a_one_line_probe_error(devices: Devices) -> None:
    """No socket at the endpoint, or a stale socket file nobody serves: boot fails with
    a DeviceProbeError of one line, and leaves nothing behind."""
    ep = devices.endpoint("nobody.ctl")
    with pytest.raises(kernel.DeviceProbeError) as ei:
        kernel.boot(devices=[kernel.Attach(ep)])
    msg = str(ei.value)
    assert "\n" not in msg and "nothing is listening" in msg and ep in msg
    stale = ep[6:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)  # a socket file with no listener: what a SIGKILLed device leaves
    s.close()
    with pytest.raises(kernel.DeviceProbeError) as ei:
        kernel.boot(devices=[kernel.Attach(ep, reconnect_timeout=0.5)])
    msg = str(ei.value)
    assert "\n" not in msg and "no device answered" in msg
    assert not os.path.exists(stale + ".call")
    assert not _our_segments()


KERNEL_CHILD = """
import os, sys
import kernel
k = kernel.boot(devices=[kernel.Attach(sys.argv[1])])
fd = k.sys.open("/dev/vda", os.O_RDWR)
k.sys.pwrite(fd, b"k" * 512, 0)
print(k.devices[0].transport.region_path, flush=True)
sys.stdin.read()
"""


def _attach_a_kernel_child_and_kill_it(ep: str) -> int:
    """A kernel in a child process attaches to ``ep`` (its memory: its memfd through
    /proc, nothing in /dev/shm), then is SIGKILLed; returns its pid."""
    child = subprocess.Popen(
        [sys.executable, "-c", KERNEL_CHILD, ep],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=str(ROOT),
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], TIMEOUT)
        assert ready, "the kernel child did not attach"
        path = child.stdout.readline().decode().strip()
        assert path.startswith(f"/proc/{child.pid}/fd/")
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"vlab-{child.pid}-")]
        child.kill()
        assert child.wait(TIMEOUT) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(TIMEOUT)
        for f in (child.stdin, child.stdout):
            if f is not None:
                f.close()
    return child.pid


def test_sigkilled_kernel_leaves_nothing_and_the_next_one_resets_the_device(
    devices: Devices, image: str
) -> None:
    """A kernel SIGKILLed while attached leaves nothing in /dev/shm (its region is a
    memfd, gone with the last mapping), and the next kernel that attaches brings the
    device up again (the device reset itself when the kernel died: see the
    ``kernels_gone`` test below)."""
    ep = devices.endpoint()
    p = devices.start("blk", "--image", image, ep=ep)
    _attach_a_kernel_child_and_kill_it(ep)
    with kernel.boot(devices=[kernel.Attach(ep)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        assert k.sys.pread(fd, 512, 0) == b"k" * 512
        assert k.devices[0].pid == p.pid
    assert p.alive()


def test_sigkilled_kernel_resets_the_device_at_once(devices: Devices, image: str) -> None:
    """A ``--shm-by-name`` device watches the kernel whose memory it maps: when that
    kernel (a child process) is SIGKILLed the device resets by itself -- status 0 and
    ``kernels_gone`` 1 before any other kernel comes, its log names the dead kernel --
    and the next kernel attaches, sees the count and the data, and works."""
    ep = devices.endpoint()
    p = devices.start("blk", "--image", image, ep=ep)
    kpid = _attach_a_kernel_child_and_kill_it(ep)
    # Nobody else talks to the device: it reset on its own. (The pidfd and this
    # request may be ready in the same round: a bounded series of round trips.)
    with ControlClient(ep, peer_alive=p.alive) as c:
        for _ in range(200):
            reply = c.call(encode_request("GET_METRICS"), timeout_s=TIMEOUT)
            if decode_reply(reply)["device"]["kernels_gone"] == 1:
                break
        else:
            raise AssertionError(f"the device never noticed: {devices.log_text()}")
        status = decode_reply(c.call(encode_request("GET_STATUS"), timeout_s=TIMEOUT))
    assert status["status"] == 0
    assert f"the attached kernel (pid {kpid}) exited: resetting" in devices.log_text()
    with kernel.boot(devices=[kernel.Attach(ep)]) as k:
        dev = k.devices[0]
        assert dev.pid == p.pid
        assert dev.metrics()["device"]["kernels_gone"] == 1
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        assert k.sys.pread(fd, 512, 0) == b"k" * 512  # what the dead kernel wrote
        assert k.sys.pwrite(fd, b"n" * 512, 512) == 512
        k.sys.fsync(fd)
        assert k.sys.pread(fd, 1024, 0) == b"k" * 512 + b"n" * 512
    assert p.alive()
    with ControlClient(ep, peer_alive=p.alive) as c:  # a clean detach is not "gone"
        reply = c.call(encode_request("GET_METRICS"), timeout_s=TIMEOUT)
    assert decode_reply(reply)["device"]["kernels_gone"] == 1


def test_attach_spec_checks_its_options() -> None:
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: kernel.Attach("tcp://1.2.3.4:5"), "ipc://"),
        (lambda: kernel.Attach("ipc://relative/x.ctl"), "absolute"),
        (lambda: kernel.Attach("ipc:///tmp/" + "x" * 100), "too long"),
        (lambda: kernel.Attach("ipc:///tmp/x", reconnect_timeout=0), "reconnect_timeout"),
        (lambda: kernel.Attach("ipc:///tmp/x", name_prefix="Vd"), "name_prefix"),
        (lambda: kernel.Attach("ipc:///tmp/x", queue_size=3), "queue_size"),
        (lambda: kernel.Attach("ipc:///tmp/x", ip="10.0.0.1"), "ip"),
    ]
    for bad, what in cases:
        with pytest.raises(ValueError, match=what):
            bad()
    with pytest.raises(TypeError):
        kernel.Attach("ipc:///tmp/x").argv("ipc:///tmp/y")


# --------------------------------------------------------------------------- kinds


def _check_rng(k: kernel.Kernel) -> None:
    [dev] = k.devices
    assert dev.name == "rng0" and dev.device_id == DeviceId.ENTROPY
    fd = k.sys.open("/dev/hwrng")
    try:
        assert len(k.sys.read(fd, 1000)) == 1000
    finally:
        k.sys.close(fd)


def _check_net(k: kernel.Kernel) -> None:
    [dev] = k.devices
    assert dev.name == "eth0" and dev.device_id == DeviceId.NET
    assert dev.link_up and dev.mac is not None and dev.mac.startswith("02:")


def _check_kv(k: kernel.Kernel) -> None:
    [dev] = k.devices
    assert dev.name == "kv0"
    dev.driver.put("greeting", b"hello")  # type: ignore[attr-defined]
    assert dev.driver.get("greeting") == b"hello"  # type: ignore[attr-defined]


def _check_console(k: kernel.Kernel) -> None:
    [dev] = k.devices
    assert dev.name == "console0" and dev.device_id == DeviceId.CONSOLE
    fd = k.sys.open("/dev/hvc0", os.O_RDWR)
    try:
        assert k.sys.write(fd, b"ping") == 4
        got = b""
        while len(got) < 4:  # bounded: each read returns >= 1 byte or raises
            got += k.sys.read(fd, 100)
        assert got == b"ping"
    finally:
        k.sys.close(fd)


@pytest.mark.parametrize(
    ("kind", "args", "check"),
    [
        ("rng", ["--seed", "3"], _check_rng),
        ("net", ["--backend", "loopback"], _check_net),
        ("kv", [], _check_kv),
        ("console", ["--echo"], _check_console),
    ],
    ids=["rng", "net", "kv", "console"],
)
def test_every_kind_can_be_attached(
    devices: Devices, kind: str, args: list[str], check: Callable[[kernel.Kernel], None]
) -> None:
    """``python -m vdev KIND --control EP --shm-by-name`` works for every kind, and the
    kernel binds the right driver from the device id alone."""
    ep = devices.endpoint()
    p = devices.start(kind, *args, ep=ep)
    with kernel.boot(devices=[kernel.Attach(ep)]) as k:
        assert k.devices[0].pid == p.pid
        check(k)
    assert p.alive()
