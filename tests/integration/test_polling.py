"""Hybrid polling with real processes: the window's end is no lost-wake-up point.

After a drain the device watches its avail ring (and, after an interrupt, the kernel's
interrupt thread watches the used ring) for an adaptive window before arming
notifications and sleeping (``vdev.virtio.poll``). Here a real device process serves a
real image while the test submits thousands of requests one at a time with random
gaps around the window's length, so requests arrive while a side is polling, exactly
as its window ends, and after it armed and slept. Every request must complete with
the right data, both sides must have seen both ways out of a window, and no completion
may have been rescued by the kernel's lost-interrupt check (that would hide a lost
wake-up as a 100 ms stall). With EVENT_IDX and without it.

Also: polling off on both sides really is off (no poll counted, every request is a
kick decision), an idle device does not poll when it wakes for other reasons, and bad
settings are refused with a message naming them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

import kernel
from vdev.virtio import DeviceId, F, PollWindow, UsageError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BLOCK = 4096
BLOCKS = 256  # 1 MiB image


class NoEventIdx(kernel.BlkDriver):
    """The stock virtio-blk driver without VIRTIO_RING_F_EVENT_IDX (flags only)."""

    supported_features = kernel.BlkDriver.supported_features & ~(1 << F.EVENT_IDX)


@pytest.fixture
def image(tmp_path) -> tuple[str, bytearray]:
    data = bytearray(os.urandom(BLOCK * BLOCKS))
    path = tmp_path / "poll.img"
    path.write_bytes(data)
    return str(path), data


def _spin(seconds: float) -> None:
    """Place the next request in time (a busy wait: no sleep, nothing waited for)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _boot(path: str, event_idx: bool, **kw: object) -> kernel.Kernel:
    bus = None
    if not event_idx:
        bus = kernel.VirtioBus()
        bus.register_driver(DeviceId.BLOCK, NoEventIdx)
    return kernel.boot(devices=[kernel.Blk(path, request_timeout=20, **kw)], bus=bus)


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
def test_poll_window_ends_as_requests_arrive(image, event_idx: bool) -> None:
    path, model = image
    rng = random.Random(12)
    ops = 4000
    window_us = 100
    # fixed windows: how long a poll lasts must not depend on how loaded the machine
    # is (an adaptive window may shrink to nothing there, and the test would no
    # longer be about polling)
    with _boot(path, event_idx, poll_us=window_us, device_poll_us=window_us, poll_fixed=True) as k:
        dev = k.devices[0]
        b = dev.block
        assert bool(dev.transport.features & (1 << F.EVENT_IDX)) is event_idx
        for i in range(ops):
            # back to back half of the time (polls find the request), otherwise a gap
            # of up to 1.5 windows: requests land before, at and after a window's end
            if rng.random() < 0.5:
                _spin(rng.uniform(0, 1.5 * window_us) / 1e6)
            blk = rng.randrange(BLOCKS)
            if i % 3 == 0:
                data = rng.randbytes(BLOCK)
                assert b.write(blk * BLOCK, data) == BLOCK
                model[blk * BLOCK : (blk + 1) * BLOCK] = data
            else:
                got = b.read(blk * BLOCK, BLOCK)
                assert got == bytes(model[blk * BLOCK : (blk + 1) * BLOCK]), f"op {i}"
        stats = dev.queues[0].stats
        device = dev.metrics()["device"]
        kpoll = dev.transport.poll
        recovery = dict(dev.transport.recovery)
    assert stats.requests == ops and stats.completions == ops
    assert stats.kicks_sent + stats.kicks_suppressed == ops
    # both ways out of the kernel's window and the device's, many times over
    dpoll = {k: v for k, v in device.items() if k.startswith("poll_")}
    assert kpoll.hits > 200 and kpoll.misses > 200, kpoll
    assert dpoll["poll_hits"] > 200 and dpoll["poll_misses"] > 200, dpoll
    assert kpoll.window == kpoll.max_s and dpoll["poll_window_us"] == window_us
    # requests that found the device armed were kicked; the others needed no doorbell
    assert stats.kicks_sent > 0 and stats.kicks_suppressed > 0
    # nothing was stranded and rescued by the periodic check
    assert recovery["lost_interrupts_recovered"] == 0, recovery
    assert recovery["timeouts"] == 0 and recovery["recoveries"] == 0, recovery
    with open(path, "rb") as f:
        assert f.read() == bytes(model)


def test_polling_off_on_both_sides(image) -> None:
    path, model = image
    with _boot(path, True, poll_us=0, device_poll_us=0) as k:
        dev = k.devices[0]
        for i in range(300):
            assert dev.block.read((i % BLOCKS) * BLOCK, BLOCK) == bytes(
                model[(i % BLOCKS) * BLOCK : (i % BLOCKS + 1) * BLOCK]
            )
        device = dev.metrics()["device"]
        kpoll = dev.transport.poll
        stats = dev.queues[0].stats
    assert not kpoll.enabled and kpoll.hits == kpoll.misses == 0 and kpoll.spent == 0
    assert device["poll_hits"] == device["poll_misses"] == device["poll_us"] == 0
    assert device["poll_window_us"] == 0
    assert stats.kicks_sent + stats.kicks_suppressed == 300
    # every completion came with an interrupt of its own (nobody polled for it)
    assert stats.interrupts == 300


def test_a_device_woken_without_ring_work_does_not_poll(image) -> None:
    path, _ = image
    with _boot(path, True) as k:
        dev = k.devices[0]
        for i in range(200):
            dev.block.read(i * BLOCK, BLOCK)
        before = dev.metrics()["device"]
        assert before["poll_hits"] + before["poll_misses"] > 0  # it did poll under load
        # control requests wake the device loop: no ring was served, so no poll
        for _ in range(50):
            after = dev.metrics()["device"]
        kspent = dev.transport.poll.spent
        for _ in range(50):
            dev.metrics()
        assert dev.transport.poll.spent == kspent
    for name in ("poll_hits", "poll_misses", "poll_us"):
        assert after[name] == before[name], name


def test_bad_poll_settings_are_refused(image) -> None:
    path, _ = image
    for kw in (
        {"poll_us": -1},
        {"poll_us": 10_001},
        {"poll_us": True},
        {"device_poll_us": "fast"},
        {"device_poll_us": -5},
        {"poll_fixed": 1},
    ):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=name):
            kernel.Blk(path, **kw)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        PollWindow(-1)
    for bad in ("abc", "-3", "20000", "nan"):
        r = subprocess.run(
            [sys.executable, "-m", "vdev", "blk", "--image", path, "--poll-us", bad]
            + ["--control", "ipc:///nonexistent/x"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 2, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "--poll-us" in lines[0], r.stderr
        assert "Traceback" not in r.stderr


def test_the_device_gets_the_kernels_setting(image) -> None:
    path, _ = image
    spec = kernel.Blk(path, device_poll_us=25)
    argv = spec.argv("ipc:///tmp/x")
    assert argv[argv.index("--poll-us") + 1] == "25"
    assert "--poll-us" not in kernel.Blk(path).argv("ipc:///tmp/x")
    assert "--poll-fixed" not in argv
    assert "--poll-fixed" in kernel.Blk(path, poll_fixed=True).argv("ipc:///tmp/x")
    with kernel.boot(devices=[spec]) as k:
        dev = k.devices[0]
        for i in range(50):
            dev.block.read(i * BLOCK, BLOCK)
        # the window never exceeds the bound the device was given
        assert 0 <= dev.metrics()["device"]["poll_window_us"] <= 25
