"""virtio-blk multi-queue (VIRTIO_BLK_F_MQ, issue 12): ``kernel.Blk(path, queues=N)``
sets up N request queues and each submitting thread uses its own. Real device
processes (``python -m vdev blk --num-queues N``), real shared memory, real ZeroMQ;
the data is checked against a model and the image from the host, the spreading
against every queue's own counters."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from callbacks import Done

import kernel
from kernel.errors import culprit_of
from vdev.virtio.trace import read_events

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 8 << 20
WAIT_S = 30.0


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(IMAGE_SIZE))
    return str(path)


def _host(image: str) -> bytes:
    with open(image, "rb") as f:
        return f.read()


def _requests(k: kernel.Kernel) -> list[int]:
    return [q.stats.requests for q in k.devices[0].queues]


def _run(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("queues", [2, 4])
def test_writer_and_reader_threads_match_a_model(image: str, queues: int) -> None:
    """Six threads write and read (k.sys and the block layer, 512 B .. 64 KiB) in
    regions of their own while two more read everything: every read of a thread's own
    region equals the model, each thread stays on one queue, every queue served
    requests, and the image equals the model byte for byte."""
    model = bytearray(IMAGE_SIZE)
    nthreads = 6
    region = IMAGE_SIZE // nthreads // 512 * 512
    errors: list[BaseException] = []
    seen: dict[str, set[int]] = {}
    stop = threading.Event()
    with kernel.boot(devices=[kernel.Blk(image, queues=queues)]) as k:
        dev = k.devices[0]
        blk = dev.block
        assert blk is not None and len(blk.queues) == queues == len(dev.queues)
        fd = k.sys.open("/dev/vda", os.O_RDWR)

        def writer(t: int) -> None:
            rnd = random.Random(t)
            base = t * region
            mine = seen.setdefault(f"mq-writer-{t}", set())
            try:
                for i in range(40):
                    n = rnd.choice([512, 4096, 8192, 65536])
                    off = base + rnd.randrange(0, (region - n) // 512) * 512
                    data = rnd.randbytes(n)
                    mine.add(blk.current_queue())
                    if i % 2:
                        assert k.sys.pwrite(fd, data, off) == n
                    else:
                        assert blk.write(off, data) == n
                    model[off : off + n] = data
                    got = k.sys.pread(fd, n, off) if i % 3 else blk.read(off, n)
                    assert got == data, (t, i)
                    off2 = base + rnd.randrange(0, (region - 4096) // 512) * 512
                    assert blk.read(off2, 4096) == bytes(model[off2 : off2 + 4096])
            except BaseException as e:  # noqa: BLE001 - asserted below
                errors.append(e)

        def reader(t: int) -> None:
            rnd = random.Random(100 + t)
            try:
                while not stop.is_set():
                    off = rnd.randrange(0, (IMAGE_SIZE - 65536) // 512) * 512
                    assert len(k.sys.pread(fd, 65536, off)) == 65536
            except BaseException as e:  # noqa: BLE001 - asserted below
                errors.append(e)

        readers = [
            threading.Thread(target=reader, args=(t,), name=f"mq-reader-{t}") for t in range(2)
        ]
        for r in readers:
            r.start()
        _run(
            [
                threading.Thread(target=writer, args=(t,), name=f"mq-writer-{t}")
                for t in range(nthreads)
            ]
        )
        stop.set()
        for r in readers:
            r.join(WAIT_S)
        assert errors == []
        assert all(len(qs) == 1 for qs in seen.values()), seen  # stable per thread
        assert len({q for qs in seen.values() for q in qs}) == queues
        assert all(n > 0 for n in _requests(k)), _requests(k)
        assert k.sys.pread(fd, IMAGE_SIZE, 0) == bytes(model)
        k.sys.fsync(fd)
        k.sys.close(fd)
        assert blk.pending == 0 and blk.idle()
    assert _host(image) == bytes(model)


def test_split_requests_spread_over_the_queues(image: str) -> None:
    """One thread's 2 MiB write and read (512 KiB requests) and a 1 MiB read into the
    caller's buffer go out as parts on every queue at once; the data is right."""
    data = random.Random(7).randbytes(2 << 20)
    with kernel.boot(devices=[kernel.Blk(image, queues=4)]) as k:
        blk = k.devices[0].block
        assert blk is not None and blk.max_request_bytes == 512 << 10
        before = _requests(k)
        assert blk.write(1 << 20, data) == len(data)
        after_write = _requests(k)
        assert [b - a for a, b in zip(before, after_write, strict=True)] == [1, 1, 1, 1]
        assert blk.read(1 << 20, len(data)) == data
        buf = bytearray(1 << 20)
        assert blk.read_into(1 << 20, 1 << 20, [(0, memoryview(buf))]) == 1 << 20
        assert buf == data[: 1 << 20]
        after = _requests(k)
        assert [b - a for a, b in zip(after_write, after, strict=True)] == [2, 2, 1, 1]
        # the async API with kick=False: kick() publishes every queue
        done = Done()
        for i in range(8):
            blk.submit("read", i * (1 << 20), 1 << 20, done, kick=False)
        blk.kick()
        done.wait_for(8)
        assert all(isinstance(r, bytes) and len(r) == 1 << 20 for r in done.results)
    assert _host(image)[1 << 20 : 3 << 20] == data


def test_small_rings_back_pressure_every_queue(image: str) -> None:
    """Rings of 4 entries, two queues, four threads submitting 300 writes each without
    waiting: the software queues take the excess (backpressure), every request
    completes once, both queues carry half, and the image holds the last writes."""
    done = Done()
    most = [0]
    with kernel.boot(devices=[kernel.Blk(image, queue_size=4, queues=2)]) as k:
        blk = k.devices[0].block
        assert blk is not None

        def submitter(t: int) -> None:
            for i in range(300):
                blk.submit("write", (t * 300 + i) * 4096, bytes([t + 1]) * 4096, done)
                most[0] = max(most[0], blk.pending)

        _run([threading.Thread(target=submitter, args=(t,), name=f"mq-bp-{t}") for t in range(4)])
        done.wait_for(1200)
        assert done.results == [4096] * 1200
        assert most[0] > 0, "the rings never filled up"
        assert _requests(k) == [600, 600] and blk.idle() and blk.pending == 0
    disk = _host(image)
    for t in range(4):
        assert disk[t * 300 * 4096 : (t + 1) * 300 * 4096] == bytes([t + 1]) * 300 * 4096


# --------------------------------------------------------------------------- recovery


# the SIGKILL-under-load run with two queues is test_kernel_recovery's, parametrized


def test_silent_device_with_two_queues_times_out_then_is_reset(image: str) -> None:
    """A stopped device process: a request on queue 1 times out (ETIMEDOUT, culprit
    "timeout"), the device is restarted, and both queues work again."""
    k = kernel.boot(devices=[kernel.Blk(image, queues=2, request_timeout=1.0)])
    dev = k.devices[0]
    pid = dev.pid
    assert pid is not None
    try:
        blk = dev.block
        assert blk is not None
        blk.write(0, b"a" * 4096)  # the main thread: queue 0
        box: list[Any] = []

        def other() -> None:
            box.append(blk.current_queue())
            os.kill(pid, signal.SIGSTOP)
            try:
                blk.write(4096, b"b" * 4096)
            except OSError as e:
                box.append(e)

        _run([threading.Thread(target=other, name="mq-silent")])
        assert box[0] == 1
        assert isinstance(box[1], OSError) and box[1].errno == errno.ETIMEDOUT
        assert culprit_of(box[1]) == "timeout"
        assert dev.wait_recovered(1, WAIT_S)
        assert dev.pid != pid  # it did not answer the reset: restarted
        for name in ("mq-after-0", "mq-after-1"):
            th = threading.Thread(target=lambda: blk.write(8192, b"c" * 4096), name=name)
            _run([th])
        assert blk.read(0, 4096) == b"a" * 4096 and blk.read(8192, 4096) == b"c" * 4096
        assert all(n > 0 for n in _requests(k))
        assert dev.failed is None
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # restarted: the old process is gone
            pass
        k.shutdown()


# --------------------------------------------------------------------------- integrity


def test_integrity_with_two_queues_repairs_a_dropped_write(image: str) -> None:
    """Integrity mode with two queues: two threads (one per queue) write; the device
    drops one write; the fsync reads the journal back (through queue 0), rewrites the
    lost sectors and flushes -- the image holds every write; concurrent reads on both
    queues return only what was written."""
    plan = {
        "seed": 3,
        "rules": [{"when": {"event": "blk.write", "nth": 3}, "what": {"action": "drop_write"}}],
    }
    chunks = {i: random.Random(i).randbytes(4096) for i in range(16)}
    with kernel.boot(devices=[kernel.Blk(image, queues=2, integrity=True, faults=plan)]) as k:
        blk = k.devices[0].block
        assert blk is not None and blk.integrity
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        errors: list[BaseException] = []

        def writer(t: int) -> None:
            try:
                for i in range(t, 16, 2):
                    assert k.sys.pwrite(fd, chunks[i], i * 4096) == 4096
            except BaseException as e:  # noqa: BLE001 - asserted below
                errors.append(e)

        for t in range(2):  # one after the other: the dropped write is deterministic
            _run([threading.Thread(target=writer, args=(t,), name=f"mq-int-{t}")])
        assert errors == []
        assert all(n > 0 for n in _requests(k))
        k.sys.fsync(fd)
        c = blk.counters
        assert c["integrity_mismatches"] == 8 and c["integrity_repaired"] == 8
        assert c["integrity_errors"] == 0
        want = b"".join(chunks[i] for i in range(16))

        def reader(t: int) -> None:
            try:
                for _ in range(5):
                    assert k.sys.pread(fd, len(want), 0) == want
            except BaseException as e:  # noqa: BLE001 - asserted below
                errors.append(e)

        _run([threading.Thread(target=reader, args=(t,), name=f"mq-iread-{t}") for t in range(2)])
        assert errors == []
        k.sys.close(fd)
    assert _host(image)[: len(want)] == want


# --------------------------------------------------------------------------- block file, trace


def test_readahead_and_trace_with_two_queues(image: str, tmp_path: Path) -> None:
    """Sequential reads through /dev/vda on two threads hit the readahead windows and
    return the image; the trace has requests on both queues (``q`` 0 and 1)."""
    data = random.Random(9).randbytes(IMAGE_SIZE)
    Path(image).write_bytes(data)
    trace = tmp_path / "mq.jsonl"
    errors: list[BaseException] = []
    with kernel.boot(devices=[kernel.Blk(image, queues=2)], trace=str(trace)) as k:
        blk = k.devices[0].block
        assert blk is not None

        def reader(t: int) -> None:
            try:
                fd = k.sys.open("/dev/vda", os.O_RDONLY)
                base = t * (IMAGE_SIZE // 2)
                for off in range(base, base + (1 << 20), 16384):
                    assert k.sys.pread(fd, 16384, off) == data[off : off + 16384]
                k.sys.close(fd)
            except BaseException as e:  # noqa: BLE001 - asserted below
                errors.append(e)

        _run([threading.Thread(target=reader, args=(t,), name=f"mq-ra-{t}") for t in range(2)])
        assert errors == []
        assert blk.counters["readahead_hits"] > 0
        assert k.trace_sink is not None
        k.trace_sink.flush()
    with open(trace, "rb") as f:
        events = list(read_events(f))
    adds = [e for e in events if e.get("side") == "driver" and e.get("kind") == "add"]
    assert {e["q"] for e in adds} == {0, 1}
    assert all(e["payload"]["blk"]["type"] == "IN" for e in adds)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("value", "exc"),
    [(0, ValueError), (17, ValueError), (-2, ValueError), ("2", TypeError), (2.0, TypeError),
     (True, TypeError), (None, TypeError)],
)  # fmt: skip
def test_bad_queues_values_are_refused_at_the_spec(value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="queues"):
        kernel.Blk("x.img", queues=value)


def test_mq_is_negotiated_only_with_several_queues(image: str) -> None:
    """queues=1: no --num-queues for the device, no MQ, one queue; queues=3: the device
    is started with --num-queues 3, MQ is negotiated and three queues exist."""
    assert "--num-queues" not in kernel.Blk(image).device_args()
    assert kernel.Blk(image, queues=3).device_args()[-2:] == ["--num-queues", "3"]
    with kernel.boot(devices=[kernel.Blk(image)]) as k:
        dev = k.devices[0]
        assert "MQ" not in dev.features and len(dev.queues) == 1
        assert dev.block is not None and dev.block.current_queue() == 0
    with kernel.boot(devices=[kernel.Blk(image, queues=3)]) as k:
        dev = k.devices[0]
        assert "MQ" in dev.features and len(dev.queues) == 3
        assert dev.block is not None and len(dev.block.queues) == 3
        assert dev.metrics()["queues"][2] is not None


# --------------------------------------------------------------------------- vlab bench


def _vlab(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cli = ["-c", "import sys; from tools.cli import main; sys.exit(main())"]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("VLAB_DEBUG", None)
    return subprocess.run(
        [sys.executable, *cli, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=90,
    )


def test_vlab_bench_blk_with_two_queues(tmp_path: Path, image: str) -> None:
    """``vlab bench blk --queues 2``: the depth-32 row runs from two submitting threads
    and says how many queues it used; a bad count is one line and exit 2."""
    run = _vlab(
        tmp_path, "bench", "blk", "--image", image, "--queues", "2", "--seconds", "0.1",
        "--only", "randread-4k-qd32", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["queues"] == 2 and [r["name"] for r in out["rows"]] == ["randread-4k-qd32"]
    assert out["rows"][0]["virtio"] > 0
    text = _vlab(
        tmp_path, "bench", "blk", "--image", image, "--queues", "2", "--seconds", "0.05",
        "--only", "randwrite-4k-qd1",
    )  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("virtio-blk with 2 request queues")
    for bad in ("0", "17"):
        run = _vlab(tmp_path, "bench", "blk", "--queues", bad)
        assert run.returncode == 2
        assert run.stderr.strip().count("\n") == 0 and "--queues" in run.stderr
        assert "Traceback" not in run.stderr
    run = _vlab(tmp_path, "bench", "net", "--queues", "2")
    assert run.returncode == 2 and "--queues" in run.stderr and "bench blk" in run.stderr


@pytest.mark.parametrize("bad", ["0", "17", "two"])
def test_device_refuses_a_bad_num_queues(tmp_path: Path, image: str, bad: str) -> None:
    """``python -m vdev blk --num-queues`` outside 1..16: one line, exit 2."""
    run = subprocess.run(
        [sys.executable, "-m", "vdev", "blk", "--image", image, "--num-queues", bad,
         "--control", f"ipc://{tmp_path}/ctl"],
        capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )  # fmt: skip
    assert run.returncode == 2, run
    assert "--num-queues" in run.stderr and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0, run.stderr
