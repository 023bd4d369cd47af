"""An acknowledged fsync is a promise: after a ``power_cut`` at any point of a workload,
the image holds every byte acknowledged before the last completed flush.

The workload: 12 writes of two sectors each over an 8-sector area (so later writes
overwrite earlier ones, flushed or not), an fsync after every third. A ``power_cut``
fault fires at the k-th event, the device rolls back every write since its last real
flush, fsyncs and SIGKILLs itself. The image is then read from the host and compared
with the model's image at the last completed flush.

* In-process, every k: the device (BlkDevice on a real image file) is served by the
  real DeviceSession in a DeviceHarness, whose crash hook raises instead of SIGKILL;
  k runs over every write (``blk.write`` nth=k) and over every request (the k-th
  step as a ``blk.write`` or ``blk.flush`` trigger: the cut may hit a flush).
* Real processes, a few k: ``kernel.Blk(image, faults=...)``. With
  ``on_device_death="fail"`` the k-th write fails with EIO and the image is checked as
  the cut left it; with the default ``"restart"`` the kernel restarts the device
  (which continues the same fault run, so the cut does not fire again) and resubmits
  the write: the workload completes and the image holds all of it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, NoReturn

import pytest

import kernel
from vdev.blk import BlkDevice, RawFileBackend
from vdev.injector import FaultInjector
from vdev.testing import DeviceHarness
from vdev.virtio import SECTOR_SIZE, BlkStatus, BlkType
from vdev.virtio.blk import REQ_HEADER
from vdev.virtio.faults import FaultPlan

pytestmark = pytest.mark.timeout(120)

SECTORS = 16
SIZE = SECTORS * SECTOR_SIZE
WRITES = 12
FSYNC_EVERY = 3


def workload() -> list[tuple[str, int, bytes]]:
    """("write", offset, data) and ("fsync", 0, b"") steps."""
    steps: list[tuple[str, int, bytes]] = []
    for i in range(1, WRITES + 1):
        sector = (i * 5) % 8
        steps.append(("write", sector * SECTOR_SIZE, bytes([i]) * (2 * SECTOR_SIZE)))
        if i % FSYNC_EVERY == 0:
            steps.append(("fsync", 0, b""))
    return steps


class Model:
    """The image as the driver was told it is: after each acknowledged step."""

    def __init__(self, initial: bytes) -> None:
        self.image = bytearray(initial)
        self.flushed = bytes(initial)

    def done(self, op: str, offset: int, data: bytes) -> None:
        if op == "write":
            self.image[offset : offset + len(data)] = data
        else:
            self.flushed = bytes(self.image)


def check_promise(image: bytes, model: Model) -> None:
    """Every byte acknowledged before the last completed flush is in ``image`` (bytes
    written after that flush may or may not have landed: only the flushed image is
    promised; this device rolls back all of them, so the image equals it)."""
    assert image == model.flushed


class PowerCut(BaseException):
    """The in-process stand-in for SIGKILL (escapes the session's drain)."""


def _crash(reason: str) -> NoReturn:
    raise PowerCut(reason)


def run_in_process(path: Path, when: dict[str, Any]) -> Model:
    initial = bytes(range(256)) * (SIZE // 256)
    path.write_bytes(initial)
    model = Model(initial)
    device = BlkDevice(RawFileBackend(path))
    with DeviceHarness(device) as h:
        rules = [{"when": when, "what": {"action": "power_cut"}}]
        injector = FaultInjector(FaultPlan.from_dict({"seed": 0, "rules": rules}), device="vda")
        h.session.attach_injector(injector)
        h.session.on_crash = _crash
        h.negotiate()
        try:
            for op, offset, data in workload():
                if op == "write":
                    hdr = REQ_HEADER.pack(BlkType.OUT, 0, offset // SECTOR_SIZE)
                    c = h.request(0, [hdr, data], [1])
                else:
                    c = h.request(0, [REQ_HEADER.pack(BlkType.FLUSH, 0, 0)], [1])
                assert c.written[-1] == BlkStatus.OK
                model.done(op, offset, data)
        except PowerCut:
            assert device.metrics["power_cuts"] == 1
            return model
    raise AssertionError("the power cut never came")


STEPS = len(workload())


@pytest.mark.parametrize("k", range(1, WRITES + 1))
def test_power_cut_at_every_write(tmp_path: Path, k: int) -> None:
    path = tmp_path / "disk.img"
    model = run_in_process(path, {"event": "blk.write", "nth": k})
    check_promise(path.read_bytes(), model)


def nth_request(k: int) -> dict[str, Any]:
    """A trigger for the k-th step of the workload, a write or an fsync."""
    ops = [op for op, _, _ in workload()]
    op = ops[k - 1]
    return {"event": "blk.write" if op == "write" else "blk.flush", "nth": ops[:k].count(op)}


@pytest.mark.parametrize("k", range(1, STEPS + 1))
def test_power_cut_at_every_request(tmp_path: Path, k: int) -> None:
    """The cut may hit a flush too: that flush does not count."""
    path = tmp_path / "disk.img"
    model = run_in_process(path, nth_request(k))
    check_promise(path.read_bytes(), model)


def test_power_cut_after_a_lying_flush(tmp_path: Path) -> None:
    """With ``drop_flush`` the data of the flush that lied is lost at the cut: the
    promise is broken on purpose — the device shows the driver what a disk with a
    volatile cache that ignores flushes does."""
    path = tmp_path / "disk.img"
    initial = bytes(SIZE)
    path.write_bytes(initial)
    device = BlkDevice(RawFileBackend(path))
    with DeviceHarness(device) as h:
        rules = [
            {"when": {"event": "blk.flush", "nth": 2}, "what": {"action": "drop_flush"}},
            {"when": {"event": "blk.write", "nth": 9}, "what": {"action": "power_cut"}},
        ]
        h.session.attach_injector(
            FaultInjector(FaultPlan.from_dict({"rules": rules}), device="vda")
        )
        h.session.on_crash = _crash
        h.negotiate()
        model = Model(initial)
        flushes: list[bytes] = []
        with pytest.raises(PowerCut):
            for op, offset, data in workload():
                if op == "write":
                    hdr = REQ_HEADER.pack(BlkType.OUT, 0, offset // SECTOR_SIZE)
                    h.request(0, [hdr, data], [1])
                else:
                    h.request(0, [REQ_HEADER.pack(BlkType.FLUSH, 0, 0)], [1])
                model.done(op, offset, data)
                if op == "fsync":
                    flushes.append(model.flushed)
    # two flushes completed, the 2nd lied: the image is as the 1st left it
    assert len(flushes) == 2 and path.read_bytes() == flushes[0] != flushes[1]


# --------------------------------------------------------------------------- processes


def run_kernel(path: Path, k: int, policy: str) -> tuple[Model, bool, list[int]]:
    """The workload through ``k.sys`` with a power cut at the k-th write. Returns the
    model, whether a call failed (EIO), and the device pids seen."""
    initial = bytes(range(256)) * (SIZE // 256)
    path.write_bytes(initial)
    model = Model(initial)
    rules = [{"when": {"event": "blk.write", "nth": k}, "what": {"action": "power_cut"}}]
    spec = kernel.Blk(str(path), faults={"seed": 0, "rules": rules}, on_device_death=policy)
    failed = False
    with kernel.boot(devices=[spec]) as kk:
        pids = [kk.devices[0].pid]
        fd = kk.sys.open("/dev/vda", os.O_RDWR)
        for op, offset, data in workload():
            try:
                if op == "write":
                    assert kk.sys.pwrite(fd, data, offset) == len(data)
                else:
                    kk.sys.fsync(fd)
            except OSError as e:
                assert e.errno == errno.EIO and policy == "fail"
                failed = True
                break
            model.done(op, offset, data)
        pids.append(kk.devices[0].pid)
    return model, failed, pids


@pytest.mark.integration
@pytest.mark.parametrize("k", [1, 5, WRITES])
def test_power_cut_in_a_device_process(tmp_path: Path, k: int) -> None:
    path = tmp_path / "disk.img"
    model, failed, _ = run_kernel(path, k, "fail")
    assert failed
    check_promise(path.read_bytes(), model)


@pytest.mark.integration
def test_power_cut_then_restart_completes_the_workload(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    model, failed, pids = run_kernel(path, 5, "restart")
    assert not failed and pids[0] != pids[1]
    assert path.read_bytes() == bytes(model.image) == model.flushed
