"""Devices beyond disk and NIC, end to end: ``kernel.Custom`` starts ``python -m vdev
KIND`` (a registered kind or a class path), the bus binds the driver of the device id
the device reports (virtio-rng: ``/dev/hwrng``), and the device's own counters agree.

Real parts only: real device processes, real shared memory, real ZeroMQ; the
vhost-user case a real back-end process on a real Unix socket. No sleeps: waits are on
the back-end's log (select) or on processes.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

import kernel
from vdev.examples.rng import SeededStream
from vdev.virtio import DeviceId

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 20.0


def read_all(k: kernel.Kernel, path: str, n: int) -> bytes:
    fd = k.sys.open(path)
    try:
        return k.sys.read(fd, n)
    finally:
        k.sys.close(fd)


def test_rng_by_kind_name() -> None:
    with kernel.boot(devices=[kernel.Custom("rng")]) as k:
        [dev] = k.devices
        assert dev.name == "rng0" and dev.device_id == DeviceId.ENTROPY
        assert isinstance(dev.driver, kernel.RngDriver)
        a = read_all(k, "/dev/hwrng", 5000)
        b = read_all(k, "/dev/rng0", 100)
        assert len(a) == 5000 and len(b) == 100 and a[:100] != b
        m = dev.metrics()
        assert m["device"]["bytes"] == 5100 and m["device"]["bad_requests"] == 0
        assert m["device"]["requests"] == dev.driver.counters["requests"] == 3  # 4096+904+100
        assert m["queues"][0]["chains"] == 3
        st = k.sys.stat("/dev/hwrng")
        assert stat.S_ISCHR(st.st_mode)


def test_seeded_rng_is_deterministic_across_boots() -> None:
    def boot_and_read(spec: kernel.Custom) -> bytes:
        with kernel.boot(devices=[spec]) as k:
            fd = k.sys.open("/dev/hwrng")
            # cut into reads of several sizes: the stream does not depend on them
            data = b"".join(k.sys.read(fd, n) for n in (1, 4095, 4096, 7000, 3))
            assert k.devices[0].metrics()["device"]["bytes"] == len(data)
            return data

    first = boot_and_read(kernel.Custom("rng", seed=7))
    again = boot_and_read(kernel.Custom("vdev.examples.rng:RngDevice", seed=7))
    other = boot_and_read(kernel.Custom("rng", seed=8))
    assert first == again == SeededStream(7).read(len(first))
    assert len(first) == 1 + 4095 + 4096 + 7000 + 3
    assert other != first


def test_hwrng_errors() -> None:
    with kernel.boot(devices=[kernel.Custom("rng", seed=1)]) as k:
        with pytest.raises(OSError) as e:
            k.sys.open("/dev/hwrng", os.O_RDWR)
        assert e.value.errno == errno.EINVAL
        fd = k.sys.open("/dev/hwrng")
        assert k.sys.read(fd, 0) == b""
        with pytest.raises(OSError) as e:
            k.sys.read(fd, -1)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            k.sys.write(fd, b"x")
        assert e.value.errno == errno.EINVAL
        k.sys.close(fd)
        with pytest.raises(OSError) as e:
            k.sys.open("/dev/rng1")
        assert e.value.errno == errno.ENOENT
    # after shutdown the device is gone: the fd table is closed
    with pytest.raises(OSError):
        k.sys.open("/dev/hwrng")


def test_two_rngs_and_a_disk() -> None:
    specs = [kernel.Custom("rng", seed=1), kernel.Blk.memory(1 << 20), kernel.Custom("rng", seed=2)]
    with kernel.boot(devices=specs) as k:
        assert [d.name for d in k.devices] == ["rng0", "vda", "rng1"]
        assert read_all(k, "/dev/hwrng", 64) == SeededStream(1).read(64)  # the first rng
        assert read_all(k, "/dev/rng1", 64) == SeededStream(2).read(64)


def test_custom_spec_checks() -> None:
    spec = kernel.Custom("rng", seed=7, verbose=True, quiet=False, skip=None)
    assert spec.device_args() == ["--seed", "7", "--verbose"]
    assert kernel.Custom("pkg.mod:Dev", name_prefix="kv").name_prefix == "kv"
    assert kernel.Custom("vdev.examples.rng:RngDevice").name_prefix == "rng"
    for bad in ("", "Bad Name", "pkg.mod:"):
        with pytest.raises(ValueError):
            kernel.Custom(bad)
    with pytest.raises(ValueError, match="option"):
        kernel.Custom("rng", seed=[1])
    with pytest.raises(ValueError, match="queue_size"):
        kernel.Custom("rng", queue_size=3)


def test_unknown_option_fails_the_probe_with_the_devices_message() -> None:
    with pytest.raises(kernel.DeviceProbeError) as e:
        kernel.boot(devices=[kernel.Custom("rng", colour="blue")])
    assert "--colour" in str(e.value)


@pytest.mark.parametrize(
    "args, says",
    [
        (["nosuchkind", "--control", "ipc:///tmp/x"], "invalid choice: 'nosuchkind'"),
        (["no_such_pkg.mod:Dev", "--control", "ipc:///tmp/x"], "cannot import no_such_pkg"),
        (["vdev.examples.rng:SeededStream", "--control", "ipc:///tmp/x"], "not a vdev.Device"),
        (["rng", "--seed", "x", "--control", "ipc:///tmp/x"], "invalid int value"),
        (["rng", "--seed", "1"], "--control"),
    ],
)
def test_device_command_line_errors(args: list[str], says: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "vdev", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert run.returncode == 2, run
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], run.stderr


# --------------------------------------------------------------------------- vhost-user


@dataclass(frozen=True)
class VhostUserRng(kernel.DeviceSpec):
    """A virtio-rng served by a vhost-user back-end at ``path`` (vhost-user has no
    device id on the wire: the spec says what it is)."""

    path: str = ""
    queue_size: int = 64

    kind: ClassVar[str] = "rng"
    name_prefix: ClassVar[str] = "rng"
    naming: ClassVar[str] = "numbers"
    transport: ClassVar[str] = "vhost-user"
    device_id: ClassVar[int] = int(DeviceId.ENTROPY)


class Backend:
    """``python -m vdev rng --seed N --vhost-user SOCK`` and its log, line by line."""

    def __init__(self, sock: str, seed: int) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vdev", "rng", "--seed", str(seed), "--vhost-user", sock],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        self.text = b""
        self.wait_for(b"listening on")

    def wait_for(self, what: bytes) -> None:
        deadline = time.monotonic() + TIMEOUT
        fd = self.proc.stderr.fileno()  # type: ignore[union-attr]
        while what not in self.text:
            left = deadline - time.monotonic()
            assert left > 0, f"no {what!r} in the back-end's log: {self.text!r}"
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                assert chunk or self.proc.poll() is None, self.text
                self.text += chunk

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(TIMEOUT)
        self.proc.stderr.close()  # type: ignore[union-attr]
        return rc


@pytest.fixture
def backend() -> Iterator[Backend]:
    d = tempfile.mkdtemp(prefix="vu-rng-", dir="/tmp")
    be = Backend(os.path.join(d, "rng.sock"), seed=11)
    try:
        yield be
    finally:
        rc = be.stop()
        left = os.path.exists(be.sock)
        shutil.rmtree(d, ignore_errors=True)
        assert rc == 0, be.text
        assert not left, "the back-end must remove its socket file"


def test_rng_over_vhost_user(backend: Backend) -> None:
    with kernel.boot(devices=[VhostUserRng(backend.sock)]) as k:
        [dev] = k.devices
        assert isinstance(dev.driver, kernel.RngDriver)
        assert read_all(k, "/dev/hwrng", 6000) == SeededStream(11).read(6000)


# --------------------------------------------------------------------------- plugins

PLUGIN_DEVICE = '''
from vdev import Chain, Device


class ShoutDevice(Device):
    """Answers every request with its bytes upper-cased (a made-up device id)."""

    device_id = 0x7F
    name = "shout"

    def __init__(self, times: int = 1) -> None:
        super().__init__()
        self.times = times
        self.metrics.declare("shouts")

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--times", type=int)

    def handle(self, queue: int, chain: Chain) -> int:
        data = chain.read(0, chain.readable_len).upper() * self.times
        n = min(len(data), chain.writable_len)
        chain.write(0, data[:n])
        self.metrics.inc("shouts")
        return n
'''

PLUGIN_DRIVER = """
from hostops.sync import Event
from kernel.bus import VirtioDriver


class _Req:
    def __init__(self):
        self.done = Event()
        self.used_len = -1

    def complete(self, used_len):
        self.used_len = used_len
        self.done.set()

    def fail(self, error):
        self.done.set()


class ShoutDriver(VirtioDriver):
    device_id = 0x7F

    def probe(self):
        t = self.transport
        self.queue = t.setup_queue(0, 8)
        self.buf = t.dma.alloc(4096)

    def shout(self, data: bytes) -> bytes:
        t, q = self.transport, self.queue
        t.memory.view(self.buf, len(data))[:] = data
        req = _Req()
        with q.lock:
            q.add([(self.buf, len(data))], [(self.buf + 2048, 2048)], req)
            need = q.publish()
        if need:
            q.notify()
        assert req.done.wait(10)
        return bytes(t.memory.view(self.buf + 2048, req.used_len))
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed-looking package: modules plus a dist-info with entry points, on the
    path of this process and of the device processes it starts."""
    pkg = tmp_path / "shoutplug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "dev.py").write_text(PLUGIN_DEVICE)
    (pkg / "drv.py").write_text(PLUGIN_DRIVER)
    info = tmp_path / "shoutplug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shoutplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[vlab.devices]\nshout = shoutplug.dev:ShoutDevice\n\n"
        "[vlab.drivers]\nshout = shoutplug.drv:ShoutDriver\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + (os.pathsep + old if old else ""))
    return tmp_path


def test_device_and_driver_from_entry_points(plugin: Path) -> None:
    bus = kernel.VirtioBus(plugins=True)  # a fresh bus: reads the entry points on a miss
    with kernel.boot(devices=[kernel.Custom("shout", times=2)], bus=bus) as k:
        [dev] = k.devices
        assert dev.name == "shout0" and type(dev.driver).__name__ == "ShoutDriver"
        assert dev.driver.shout(b"hello") == b"HELLOHELLO"  # type: ignore[attr-defined]
        assert dev.metrics()["device"]["shouts"] == 1
    assert bus.plugin_errors == []


def test_device_death_fails_reads_with_eio() -> None:
    with kernel.boot(devices=[kernel.Custom("rng", seed=3)]) as k:
        [dev] = k.devices
        fd = k.sys.open("/dev/hwrng")
        assert k.sys.read(fd, 10) == SeededStream(3).read(10)
        assert dev.pid is not None
        os.kill(dev.pid, signal.SIGKILL)
        failed = dev.wait_failed(TIMEOUT)
        assert failed is not None and failed.errno == errno.EIO
        with pytest.raises(OSError) as e:
            k.sys.read(fd, 10)
        assert e.value.errno == errno.EIO
        assert dev.driver.counters["bytes"] == 10  # type: ignore[attr-defined]
