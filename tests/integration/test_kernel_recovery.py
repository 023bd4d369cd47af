"""The hardened kernel (issue 10): a device process that dies, hangs, loses interrupts
or breaks the ring protocol is restarted or reset, and the callers of the I/O it had in
flight see success (or a clean, typed error) -- real device processes, real shm, real
ZeroMQ; faults injected with SIGKILL / SIGSTOP from the test or with the device's own
fault plans (``--faults``)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import threading
from pathlib import Path

import pytest

import kernel
from kernel.errors import culprit_of
from vdev.device import Device
from vdev.virtio import DeviceId

AF_INET, SOCK_STREAM = 2, 1  # Linux values, as k.sys takes them
IMAGE_SIZE = 4 << 20
TIMEOUT = 30.0


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(IMAGE_SIZE))
    return str(path)


def _oserror(code: int, fn, *args) -> OSError:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == code, ei.value
    return ei.value


def _kill(pid: int | None, sig: int = signal.SIGKILL) -> None:
    assert pid is not None
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- restart


@pytest.mark.parametrize("queues", [1, 2])
def test_sigkill_under_load_every_call_succeeds(image: str, queues: int) -> None:
    """Four threads write and read back their own regions while the device process is
    SIGKILLed: the kernel restarts it and resubmits what was in flight; every call
    succeeds, every read returns what was written, and the image holds it all. With two
    request queues (two threads on each) what was in flight on both is resubmitted and
    the acknowledged, unflushed writes are replayed from the journal."""
    k = kernel.boot(devices=[kernel.Blk(image, queues=queues)])
    written: dict[int, bytes] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    halfway = threading.Barrier(5)
    try:
        dev = k.devices[0]
        old_pid = dev.pid
        fd = k.sys.open("/dev/vda", os.O_RDWR)

        def worker(t: int) -> None:
            rnd = random.Random(t)
            base = t * (IMAGE_SIZE // 4)
            try:
                for i in range(60):
                    if i == 20:
                        halfway.wait(TIMEOUT)  # the kill happens now, mid-stream
                    off = base + rnd.randrange(0, (IMAGE_SIZE // 4 - 8192) // 512) * 512
                    data = rnd.randbytes(8192)
                    assert k.sys.pwrite(fd, data, off) == len(data)
                    assert k.sys.pread(fd, len(data), off) == data
                    with lock:
                        for j in range(0, len(data), 512):
                            written[off + j] = data[j : j + 512]
            except BaseException as e:  # noqa: BLE001 - asserted below
                errors.append(e)

        threads = [
            threading.Thread(target=worker, args=(t,), name=f"kill-{queues}-{t}") for t in range(4)
        ]
        for th in threads:
            th.start()
        halfway.wait(TIMEOUT)
        _kill(old_pid)
        for th in threads:
            th.join(TIMEOUT)
        assert not any(th.is_alive() for th in threads)
        assert errors == []
        assert dev.failed is None
        assert dev.pid != old_pid and dev.pid is not None
        assert dev.recovery["restarts"] == 1 and dev.recovery["recoveries"] == 1
        assert len(dev.queues) == queues and all(q.stats.requests > 0 for q in dev.queues)
        if queues > 1:
            assert dev.block.counters["journal_replayed"] > 0
        k.sys.fsync(fd)
    finally:
        k.shutdown()
    with open(image, "rb") as f:
        disk = f.read()
    for off, data in written.items():
        assert disk[off : off + 512] == data, off


def test_restart_budget_exhausted_fails_with_device_gone(image: str) -> None:
    """With a budget of one restart per minute, the second death fails the device:
    EIO with culprit "device-gone", for every later call too."""
    k = kernel.boot(devices=[kernel.Blk(image, restart_budget=(1, 60.0))])
    try:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        k.sys.pwrite(fd, b"x" * 512, 0)
        _kill(dev.pid)
        assert dev.wait_recovered(1, TIMEOUT)
        assert k.sys.pread(fd, 512, 0) == b"x" * 512
        _kill(dev.pid)
        failed = dev.wait_failed(TIMEOUT)
        assert failed is not None and failed.errno == errno.EIO
        assert culprit_of(failed) == "device-gone"
        assert "budget" in failed.strerror
        err = _oserror(errno.EIO, k.sys.pread, fd, 512, 0)
        assert culprit_of(err) == "device-gone"
        assert dev.recovery["restarts"] == 1
    finally:
        k.shutdown()


def test_ram_disk_is_not_restarted(tmp_path: Path) -> None:
    """A RAM disk's contents die with its process: its death fails it (EIO) instead
    of bringing back an empty disk."""
    with kernel.boot(devices=[kernel.Blk.memory(1 << 20)]) as k:
        dev = k.devices[0]
        _kill(dev.pid)
        failed = dev.wait_failed(TIMEOUT)
        assert failed is not None and culprit_of(failed) == "device-gone"
        assert dev.recovery["restarts"] == 0


def test_fail_policy_keeps_the_device_failed(image: str) -> None:
    """``on_device_death="fail"``: a death is final (EIO, culprit device-gone)."""
    with kernel.boot(devices=[kernel.Blk(image, on_device_death="fail")]) as k:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        _kill(dev.pid)
        failed = dev.wait_failed(TIMEOUT)
        assert failed is not None and culprit_of(failed) == "device-gone"
        err = _oserror(errno.EIO, k.sys.pread, fd, 512, 0)
        assert culprit_of(err) == "device-gone"
        assert dev.recovery["recoveries"] == 0


def test_argument_errors_name_the_caller(image: str) -> None:
    with kernel.boot(devices=[kernel.Blk(image)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        assert culprit_of(_oserror(errno.EINVAL, k.sys.pread, fd, 512, -1)) == "caller"
        blk = k.devices[0].block
        assert culprit_of(_oserror(errno.ENXIO, blk.read, IMAGE_SIZE, 512)) == "caller"


def test_region_is_a_sealed_memfd_the_device_cannot_shrink(image: str) -> None:
    """The ZeroMQ transport's region is a sealed memfd: neither side can change its
    size (the device inherited the same file), and no /dev/shm name exists."""
    with kernel.boot(devices=[kernel.Blk(image)]) as k:
        t = k.devices[0].transport
        fd = t._memfd  # type: ignore[attr-defined]
        assert fd is not None
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)
        size = os.fstat(fd).st_size
        assert size == t.region.size  # type: ignore[union-attr]
        # the device process holds the very same file
        pid = k.devices[0].pid
        assert os.path.samefile(f"/proc/{pid}/fd/{fd}", f"/proc/self/fd/{fd}")
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"vlab-{os.getpid()}-")]


def test_a_restarted_device_is_traced_like_the_first(image: str, tmp_path: Path) -> None:
    """With ``boot(trace=...)``, the restart is a ``recover``/``recovered`` pair in the
    kernel's events and the new device process writes to the same trace file."""
    from vdev.virtio.trace import read_events

    trace = tmp_path / "t.jsonl"
    k = kernel.boot(devices=[kernel.Blk(image)], trace=str(trace))
    try:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        old = dev.pid
        _kill(old)
        assert dev.wait_recovered(1, TIMEOUT)
        k.sys.pwrite(fd, b"t" * 512, 0)
        new = dev.pid
    finally:
        k.shutdown()
    with open(trace) as f:
        events = list(read_events(f))
    kinds = [e["kind"] for e in events if e["side"] == "driver"]
    assert "recover" in kinds and "recovered" in kinds
    [rec] = [e for e in events if e["kind"] == "recover"]
    assert rec["culprit"] == "device-gone"
    assert any(e["pid"] == new and e["side"] == "device" for e in events)
    assert new != old


# --------------------------------------------------------------------------- timeouts


def test_silent_device_times_out_then_is_reset(image: str) -> None:
    """A device that stays alive but never completes (SIGSTOP): the request fails with
    ETIMEDOUT (culprit "timeout") after ``request_timeout``; the device is then killed
    and restarted (it does not answer the reset) and later requests succeed."""
    k = kernel.boot(devices=[kernel.Blk(image, request_timeout=1.0)])
    pid = k.devices[0].pid
    try:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        k.sys.pwrite(fd, b"y" * 512, 0)
        _kill(pid, signal.SIGSTOP)
        err = _oserror(errno.ETIMEDOUT, k.sys.pread, fd, 512, 0)
        assert culprit_of(err) == "timeout"
        assert dev.wait_recovered(1, TIMEOUT)
        assert dev.recovery["timeouts"] >= 1
        assert dev.pid != pid  # it did not answer the reset: restarted
        assert k.sys.pread(fd, 512, 0) == b"y" * 512
        assert dev.failed is None
    finally:
        _kill(pid, signal.SIGCONT)
        k.shutdown()


def test_hang_fault_times_out_then_device_works(image: str) -> None:
    """The device's own ``hang`` fault on the 3rd request: ETIMEDOUT for that request,
    then the device is brought back and serves again (the restarted process continues
    the plan's run, so it does not hang again at the same count)."""
    plan = {
        "seed": 1,
        "rules": [{"when": {"event": "device.request", "nth": 3}, "what": {"action": "hang"}}],
    }
    k = kernel.boot(devices=[kernel.Blk(image, request_timeout=1.0, faults=plan)])
    try:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        k.sys.pwrite(fd, b"z" * 512, 0)
        k.sys.pread(fd, 512, 0)
        err = _oserror(errno.ETIMEDOUT, k.sys.pread, fd, 512, 0)
        assert culprit_of(err) == "timeout"
        assert dev.wait_recovered(1, TIMEOUT)
        for _ in range(5):
            assert k.sys.pread(fd, 512, 0) == b"z" * 512
        assert dev.failed is None
    finally:
        k.shutdown()


# --------------------------------------------------------------------------- interrupts


def test_lost_interrupts_are_recovered(image: str) -> None:
    """Every interrupt of the device is dropped (``drop_interrupt``): requests still
    complete, found by the periodic used-ring check, and are counted."""
    plan = {
        "seed": 2,
        "rules": [{"when": {"event": "notify.interrupt"}, "what": {"action": "drop_interrupt"}}],
    }
    with kernel.boot(devices=[kernel.Blk(image, faults=plan)]) as k:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        for i in range(5):
            k.sys.pwrite(fd, bytes([i + 1]) * 4096, i * 4096)
        for i in range(5):
            assert k.sys.pread(fd, 4096, i * 4096) == bytes([i + 1]) * 4096
        assert dev.queues[0].lost_interrupts_recovered >= 10
        assert dev.recovery["lost_interrupts_recovered"] >= 10
        assert dev.metrics()["device"].get("fault:drop_interrupt", 1) >= 1
        assert dev.failed is None


def test_lost_receive_interrupts_are_recovered() -> None:
    """Every receive interrupt is dropped (``drop_interrupt`` on the receive queue): with
    EVENT_IDX one lost interrupt would stall the queue for good; the used-ring watch of
    the receive queue reaps the frames anyway and every UDP round trip succeeds."""
    plan = {
        "seed": 4,
        "rules": [
            {
                "when": {"event": "notify.interrupt", "queue": 0},
                "what": {"action": "drop_interrupt"},
            }
        ],
    }
    with kernel.boot(devices=[kernel.Net(backend="loopback", faults=plan)]) as k:
        dev = k.devices[0]
        server, client = k.sys.socket(), k.sys.socket()
        k.sys.bind(server, ("10.0.0.2", 7))
        k.sys.settimeout(server, TIMEOUT)
        k.sys.settimeout(client, TIMEOUT)
        for i in range(3):
            msg = f"round {i}".encode()
            k.sys.sendto(client, msg, ("10.0.0.2", 7))
            data, peer = k.sys.recvfrom(server, 2048)
            assert data == msg
            k.sys.sendto(server, data.upper(), peer)
            assert k.sys.recvfrom(client, 2048)[0] == msg.upper()
        k.sys.close(server)
        k.sys.close(client)
        assert dev.queues[0].lost_interrupts_recovered >= 3  # one per round at least
        assert dev.metrics()["device"]["fault:drop_interrupt"] >= 1
        assert dev.failed is None


# --------------------------------------------------------------------------- ring breakage


def test_bad_used_id_fails_the_request_then_the_device_is_reset(image: str) -> None:
    """The device pushes an out-of-range used id for the 5th chain: that request fails
    with EIO (culprit "device-broke-ring"), the device is reset (same process), and the
    following requests succeed."""
    plan = {
        "seed": 3,
        "rules": [{"when": {"event": "ring.push", "nth": 5}, "what": {"action": "bad_used_id"}}],
    }
    with kernel.boot(devices=[kernel.Blk(image, faults=plan)]) as k:
        dev = k.devices[0]
        pid = dev.pid
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        for i in range(4):
            k.sys.pwrite(fd, bytes([0x40 + i]) * 512, i * 512)
        err = _oserror(errno.EIO, k.sys.pread, fd, 512, 0)
        assert culprit_of(err) == "device-broke-ring"
        assert dev.wait_recovered(1, TIMEOUT)
        for i in range(4):
            assert k.sys.pread(fd, 512, i * 512) == bytes([0x40 + i]) * 512
        assert dev.recovery["resets"] == 1 and dev.recovery["ring_breaks"] == 1
        assert dev.pid == pid and dev.failed is None


def test_a_device_that_keeps_breaking_the_ring_is_failed(image: str) -> None:
    """Every used entry is bad: after the restart budget the device fails for good,
    with culprit "device-broke-ring"."""
    plan = {
        "seed": 4,
        "rules": [{"when": {"event": "ring.push"}, "what": {"action": "bad_used_id"}}],
    }
    spec = kernel.Blk(image, faults=plan, restart_budget=(2, 60.0))
    with kernel.boot(devices=[spec]) as k:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        for _ in range(3):
            err = _oserror(errno.EIO, k.sys.pread, fd, 512, 0)
            assert culprit_of(err) == "device-broke-ring"
        failed = dev.wait_failed(TIMEOUT)
        assert failed is not None and culprit_of(failed) == "device-broke-ring"
        assert dev.recovery["resets"] == 2
        _oserror(errno.EIO, k.sys.pread, fd, 512, 0)


# --------------------------------------------------------------------------- fault plans


def test_crash_fault_restarts_once_and_every_write_lands(image: str) -> None:
    """The device's own ``crash`` fault on its 10th request: the kernel restarts it
    (the new process continues the plan's run from ``--faults-state``, so it does not
    crash again at the same count) and all 30 writes succeed and reach the image."""
    plan = {
        "seed": 5,
        "rules": [{"when": {"event": "device.request", "nth": 10}, "what": {"action": "crash"}}],
    }
    k = kernel.boot(devices=[kernel.Blk(image, faults=plan)])
    try:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        for i in range(30):
            assert k.sys.pwrite(fd, bytes([i + 1]) * 512, i * 512) == 512
        k.sys.fsync(fd)
        assert dev.recovery["restarts"] == 1 and dev.failed is None
        assert os.path.exists(os.path.join(k.rundir.path, "vda.faults-state"))
    finally:
        k.shutdown()
    with open(image, "rb") as f:
        disk = f.read(30 * 512)
    assert disk == b"".join(bytes([i + 1]) * 512 for i in range(30))


def test_power_cut_then_restart_keeps_the_fsync_promise(image: str) -> None:
    """A ``power_cut`` on the 7th write rolls the image back to its last flush and
    kills the device: writes 4, 5 and 6 were acknowledged but not flushed (5 and 6 to
    the same place). The kernel restarts the device, replays its journal of
    acknowledged unflushed writes before anything else (overlapping ones in order),
    resubmits write 7; the next fsync succeeds and -- checked from the host right after
    it -- the image holds every write acknowledged before it, the later of 5 and 6."""
    plan = {
        "seed": 7,
        "rules": [{"when": {"event": "blk.write", "nth": 7}, "what": {"action": "power_cut"}}],
    }
    steps = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (5, 6), (7, 7), (8, 8)]  # (slot, byte)
    k = kernel.boot(devices=[kernel.Blk(image, faults=plan)])
    try:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        want: dict[int, int] = {}
        for n, (slot, value) in enumerate(steps, 1):
            assert k.sys.pwrite(fd, bytes([value]) * 1024, slot * 4096) == 1024
            want[slot] = value
            if n == 3:
                k.sys.fsync(fd)
        k.sys.fsync(fd)
        with open(image, "rb") as f:
            disk = f.read()
        for slot, value in want.items():
            assert disk[slot * 4096 : slot * 4096 + 1024] == bytes([value]) * 1024, slot
        assert dev.recovery["restarts"] == 1
        assert dev.block is not None and dev.block.counters["journal_replayed"] == 3
    finally:
        k.shutdown()


def test_power_cut_beyond_the_journal_fails_the_next_fsync(
    image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the acknowledged unflushed writes outgrow the journal, a restart cannot
    replay them: the next fsync fails with EIO (culprit "device-gone") instead of
    promising what the image does not hold; the one after succeeds again."""
    import kernel.blk

    monkeypatch.setattr(kernel.blk, "JOURNAL_MAX_BYTES", 2048)
    plan = {
        "seed": 8,
        "rules": [{"when": {"event": "blk.write", "nth": 5}, "what": {"action": "power_cut"}}],
    }
    with kernel.boot(devices=[kernel.Blk(image, faults=plan)]) as k:
        dev = k.devices[0]
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        k.sys.pwrite(fd, b"\x01" * 1024, 0)
        k.sys.fsync(fd)
        for i in range(2, 6):  # 3 KiB unflushed > 2 KiB: the journal overflows
            assert k.sys.pwrite(fd, bytes([i]) * 1024, i * 4096) == 1024
        err = _oserror(errno.EIO, k.sys.fsync, fd)
        assert culprit_of(err) == "device-gone" and "lost" in err.strerror
        k.sys.fsync(fd)
        assert dev.recovery["restarts"] == 1
        assert dev.block is not None and dev.block.counters["flush_errors_reported"] == 1
        assert dev.block.counters["journal_overflows"] == 1


def test_needs_reset_fault_resets_the_device(image: str) -> None:
    """``needs_reset`` on the 3rd request: DEVICE_NEEDS_RESET, the kernel resets the
    device (same process) and the disk works on."""
    plan = {
        "seed": 6,
        "rules": [
            {"when": {"event": "device.request", "nth": 3}, "what": {"action": "needs_reset"}}
        ],
    }
    with kernel.boot(devices=[kernel.Blk(image, faults=plan)]) as k:
        dev = k.devices[0]
        pid = dev.pid
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        results = []
        for i in range(6):
            try:
                results.append(k.sys.pwrite(fd, b"n" * 512, i * 512))
            except OSError as e:
                assert culprit_of(e) == "device-broke-ring", e
                assert dev.wait_recovered(1, TIMEOUT)
                results.append(e)
        assert dev.wait_recovered(1, TIMEOUT)
        assert k.sys.pread(fd, 512, 0) == b"n" * 512
        assert dev.recovery["resets"] == 1 and dev.pid == pid and dev.failed is None
        assert sum(1 for r in results if r == 512) >= 5


def test_fault_plan_is_written_with_its_seed_and_passed_to_the_device(
    image: str, tmp_path: Path
) -> None:
    """``faults=PATH``: the kernel writes the plan with its seed into its run
    directory and starts the device with ``--faults FILE --faults-state FILE2``."""
    src = tmp_path / "plan.json"
    src.write_text(json.dumps({"rules": []}))
    with kernel.boot(devices=[kernel.Blk(image, faults=str(src))]) as k:
        t = k.devices[0].transport
        path = os.path.join(k.rundir.path, "vda.faults.json")
        plan = json.loads(Path(path).read_text())
        assert plan["rules"] == [] and isinstance(plan["seed"], int)
        cmdline = Path(f"/proc/{t.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--faults" in cmdline and path.encode() in cmdline
        assert b"--faults-state" in cmdline


def test_fault_plan_device_filter_matches_the_kernels_name(tmp_path: Path) -> None:
    """A rule for ``device: vdb`` fires on the kernel's second disk only: IOERR reads
    there (EIO, culprit "device-error"), vda untouched."""
    plan = {
        "seed": 10,
        "rules": [{"when": {"event": "blk.read", "device": "vdb"}, "what": {"action": "ioerr"}}],
    }
    specs = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.img"
        path.write_bytes(bytes(1 << 20))
        specs.append(kernel.Blk(str(path), faults=plan))
    with kernel.boot(devices=specs) as k:
        a = k.sys.open("/dev/vda", os.O_RDWR)
        b = k.sys.open("/dev/vdb", os.O_RDWR)
        assert k.sys.pread(a, 512, 0) == bytes(512)
        err = _oserror(errno.EIO, k.sys.pread, b, 512, 0)
        assert culprit_of(err) == "device-error"
        assert k.devices[1].failed is None


def test_bad_fault_plan_is_refused_at_the_spec() -> None:
    with pytest.raises(ValueError, match="probability"):
        kernel.Blk(
            "x.img",
            faults={"rules": [{"when": {"event": "blk.read", "probability": 2}}]},
        )


# --------------------------------------------------------------------------- caps


class ManyQueuesDevice(Device):
    """A device (started by the tests below as ``python -m vdev MODULE:Class``) that
    claims 65535 queues: the kernel must refuse it at probe, naming the value."""

    device_id = DeviceId.ENTROPY
    name = "many"
    num_queues = 65535


def test_a_device_claiming_65535_queues_is_refused_at_probe() -> None:
    spec = kernel.Custom("tests.integration.test_kernel_recovery:ManyQueuesDevice")
    with pytest.raises(kernel.DeviceProbeError, match="num_queues 65535"):
        kernel.boot(devices=[spec])


# --------------------------------------------------------------------------- net


def test_nic_restart_keeps_its_mac_and_udp_and_ping_work_again() -> None:
    """SIGKILL of a NIC's device process: it comes back with the same MAC, receive
    buffers posted again; ping and UDP work afterwards."""
    spec = kernel.Net(backend="loopback", ip="10.0.0.1/24")
    with kernel.boot(devices=[spec]) as k:
        dev = k.devices[0]
        mac, pid = dev.mac, dev.pid
        assert len(k.sys.ping("10.0.0.1", count=1)) == 1
        _kill(pid)
        assert dev.wait_recovered(1, TIMEOUT)
        assert dev.pid != pid and dev.mac == mac
        assert len(k.sys.ping("10.0.0.1", count=2, timeout=5.0)) == 2
        s = k.sys.socket()
        k.sys.bind(s, ("10.0.0.1", 9000))
        k.sys.settimeout(s, 5.0)
        k.sys.sendto(s, b"after", ("10.0.0.1", 9000))
        data, _ = k.sys.recvfrom(s, 100)
        assert data == b"after"
        assert dev.failed is None


def test_hung_nic_is_brought_back_by_the_transmit_timeout() -> None:
    """The NIC's device hangs at its 3rd transmitted frame: the frames stay with it
    past ``request_timeout``, the kernel resets (restarts) it, drops and counts them,
    and the interface works again."""
    plan = {
        "seed": 9,
        "rules": [{"when": {"event": "net.tx", "nth": 3}, "what": {"action": "hang"}}],
    }
    spec = kernel.Net(backend="loopback", ip="10.0.0.1/24", request_timeout=1.0, faults=plan)
    with kernel.boot(devices=[spec]) as k:
        dev = k.devices[0]
        s = k.sys.socket()
        k.sys.bind(s, ("10.0.0.1", 9001))
        for i in range(4):
            try:
                k.sys.sendto(s, b"%d" % i, ("10.0.0.1", 9001))
            except OSError as e:  # ENOBUFS while the device is being reset
                assert e.errno == errno.ENOBUFS
        assert dev.wait_recovered(1, TIMEOUT)
        assert dev.recovery["timeouts"] >= 1
        assert dev.link is not None and dev.link.counters["tx_dropped_reset"] >= 1
        k.sys.settimeout(s, 5.0)
        k.sys.sendto(s, b"after", ("10.0.0.1", 9001))
        for _ in range(6):  # datagrams sent before the hang may come first
            if k.sys.recvfrom(s, 100)[0] == b"after":
                break
        else:
            pytest.fail("the datagram sent after the restart never arrived")
        assert dev.failed is None


def test_tcp_survives_a_nic_restart() -> None:
    """A TCP transfer across a restart of the NIC's device process: every byte arrives
    (frames lost in the restart are retransmitted)."""
    spec = kernel.Net(backend="loopback", ip="10.0.0.1/24")
    payload = random.Random(7).randbytes(1 << 20)
    got = bytearray()
    with kernel.boot(devices=[spec]) as k:
        dev = k.devices[0]
        ls = k.sys.socket(AF_INET, SOCK_STREAM)
        k.sys.bind(ls, ("10.0.0.1", 7000))
        k.sys.listen(ls, 1)
        done = threading.Event()

        def receiver() -> None:
            c, _ = k.sys.accept(ls)
            k.sys.settimeout(c, TIMEOUT)
            while len(got) < len(payload):
                chunk = k.sys.recv(c, 65536)
                if not chunk:
                    break
                got.extend(chunk)
            k.sys.close(c)
            done.set()

        th = threading.Thread(target=receiver)
        th.start()
        cs = k.sys.socket(AF_INET, SOCK_STREAM)
        k.sys.settimeout(cs, TIMEOUT)
        k.sys.connect(cs, ("10.0.0.1", 7000))
        half = len(payload) // 2
        k.sys.sendall(cs, payload[:half])
        pid = dev.pid
        _kill(pid)
        assert dev.wait_recovered(1, TIMEOUT)
        k.sys.sendall(cs, payload[half:])
        assert done.wait(TIMEOUT)
        th.join(TIMEOUT)
        k.sys.close(cs)
        assert bytes(got) == payload
        assert dev.pid != pid


# --------------------------------------------------------------------------- shutdown


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_shutdown_during_a_recovery_leaves_nothing(image: str, sig: int) -> None:
    """The kernel shuts down while a device is being restarted (after SIGKILL) or
    while its requests wait to time out (SIGSTOP): every caller returns (success or
    an OSError with a culprit), and no process, segment or socket file remains (the
    session fixture checks)."""
    k = kernel.boot(devices=[kernel.Blk(image, request_timeout=0.5)])
    pid = k.devices[0].pid
    outcome: list[object] = []
    started = threading.Event()

    def reader() -> None:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        try:
            while True:
                k.sys.pread(fd, 4096, 0)
                started.set()
        except OSError as e:
            outcome.append(e)

    th = threading.Thread(target=reader)
    th.start()
    try:
        assert started.wait(TIMEOUT)
        _kill(pid, sig)
    finally:
        k.shutdown()
        _kill(pid, signal.SIGCONT)
    th.join(TIMEOUT)
    assert not th.is_alive()
    [err] = outcome
    assert isinstance(err, OSError)
    # the fd table closes first (EBADF from k.sys), else the device layer says why
    assert err.errno == errno.EBADF or culprit_of(err) in ("shutdown", "device-gone", "timeout")
    assert not os.path.exists(f"/proc/{pid}")  # reaped, not a zombie


def test_a_device_process_inherits_the_memfd_under_its_number(tmp_path: Path) -> None:
    """``DeviceProcess.launch(pass_fds=...)``: the child sees the same file under the
    same number (and nothing else of ours leaks into it)."""
    import sys

    from hostops.fdmem import new_memfd, size_and_seal
    from hostops.process import DeviceProcess

    fd = new_memfd("t")
    other = new_memfd("not-passed")
    try:
        m = size_and_seal(fd, 4096)
        m.buf[:5] = b"hello"
        out = tmp_path / "out"
        code = (
            "import mmap, os, sys; fd = int(os.environ['FD']); "
            "m = mmap.mmap(fd, 4096); "
            f"ok = not os.path.exists('/proc/self/fd/{other}'); "
            f"open({str(out)!r}, 'w').write(m[:5].decode() + str(ok))"
        )
        with DeviceProcess.launch(
            [sys.executable, "-c", code], name="t", env={"FD": str(fd)}, pass_fds=(fd,)
        ) as p:
            assert p.wait(30) == 0
        assert out.read_text() == "helloTrue"
        m.close()
    finally:
        os.close(fd)
        os.close(other)
