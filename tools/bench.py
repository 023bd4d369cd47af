"""``vlab bench blk``: virtio-blk beside native ``os.pread``/``os.pwrite``, same run.

Each row runs the same workload twice on the same file: through the kernel's block
layer (kernel → shared-memory ring → device process → image) and natively in this
process. The native side runs both as a plain loop and as a pool of ``depth`` threads;
the ratio uses the faster of the two. The virtio side keeps ``depth`` requests in
flight with the block layer's asynchronous ``submit`` (completions re-submit from the
interrupt thread), so depth 32 needs no 32 threads. Counters come from the queue's
stats: kicks and interrupts per request show how well notifications are suppressed.

With ``--queues N`` (N > 1) the disk has N request queues (VIRTIO_BLK_F_MQ) and the
rows of depth > 1 are driven by N submitting threads, ``depth / N`` requests in flight
each: a completion hands its place back to its thread, which submits the next request
on its own queue (a resubmission from the interrupt thread would always use that
thread's queue). Counters are summed over the queues.

Hybrid polling (``--poll``, :mod:`vdev.virtio.poll`): ``on`` (the default: the
kernel's interrupt thread and the device both watch their ring for an adaptive window
before sleeping), ``off`` (both arm notifications at once: every wait is a doorbell),
or ``both`` (every row twice, polling on and off, side by side from the same run).
After the rows the kernel and the device sit idle for twice ``--seconds`` (at most
:data:`IDLE_MEASURE_S`) and their CPU use over that time is printed: polling costs
nothing when nothing happens.

This is a benchmark, not a test: it prints numbers and never judges them.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import kernel
from tools.bench_net import cpu_seconds
from tools.errors import CliError
from tools.table import render_table

if TYPE_CHECKING:
    from tools.profile import Profiler

__all__ = ["Row", "WORKLOADS", "run_blk"]


@dataclass
class Row:
    """One benchmark row as printed and as emitted in JSON."""

    name: str
    unit: str
    virtio: float
    native: float
    ratio: float
    kicks_per_request: float
    interrupts_per_request: float


@dataclass(frozen=True)
class Workload:
    """What one row does."""

    name: str
    write: bool
    block: int
    depth: int
    sequential: bool

    @property
    def unit(self) -> str:
        """IOPS for small blocks, MB/s for large ones."""
        return "MB/s" if self.block >= 1 << 20 else "IOPS"


WORKLOADS = [
    Workload("randread-4k-qd1", False, 4096, 1, False),
    Workload("randread-4k-qd32", False, 4096, 32, False),
    Workload("randwrite-4k-qd1", True, 4096, 1, False),
    Workload("randwrite-4k-qd32", True, 4096, 32, False),
    Workload("seqread-1m", False, 1 << 20, 1, True),
    Workload("seqwrite-1m", True, 1 << 20, 1, True),
]

DEFAULT_IMAGE = 128 << 20


class _Offsets:
    """Thread-safe source of offsets: random 4 KiB-aligned or sequential, wrapping."""

    def __init__(self, w: Workload, size: int, seed: int) -> None:
        self.n = max(1, size // w.block)
        self.block = w.block
        self.seq = w.sequential
        self.rng = random.Random(seed)
        self.i = 0
        self.lock = threading.Lock()

    def next(self) -> int:
        with self.lock:
            if self.seq:
                i = self.i % self.n
                self.i += 1
                return i * self.block
            return self.rng.randrange(self.n) * self.block


def _rate(w: Workload, ops: int, elapsed: float) -> float:
    if elapsed <= 0:
        return 0.0
    return ops * w.block / elapsed / 1e6 if w.unit == "MB/s" else ops / elapsed


def _native_loop(fd: int, w: Workload, size: int, seconds: float, data: bytes) -> float:
    offs = _Offsets(w, size, 1)
    ops = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(16):
            off = offs.next()
            if w.write:
                os.pwrite(fd, data, off)
            else:
                os.pread(fd, w.block, off)
        ops += 16
        if time.perf_counter() >= deadline:
            break
    return _rate(w, ops, time.perf_counter() - start)


def _native_pool(fd: int, w: Workload, size: int, seconds: float, data: bytes) -> float:
    offs = _Offsets(w, size, 2)
    counts = [0] * w.depth
    start = time.perf_counter()
    deadline = start + seconds

    def worker(i: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            off = offs.next()
            if w.write:
                os.pwrite(fd, data, off)
            else:
                os.pread(fd, w.block, off)
            n += 1
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(w.depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _rate(w, sum(counts), time.perf_counter() - start)


def _virtio_threads(
    block: object, w: Workload, size: int, seconds: float, data: bytes, nthreads: int
) -> float:
    """Keep ``w.depth`` requests in flight for ``seconds`` from ``nthreads`` submitting
    threads (each its own request queue): every thread keeps its share in flight and
    replaces the requests that completed, in batches."""
    offs = _Offsets(w, size, 3)
    submit: Callable[..., None] = block.submit  # type: ignore[attr-defined]
    ops = [0] * nthreads
    errors: list[BaseException] = []
    limit = seconds + 60
    deadline = time.perf_counter() + seconds

    def worker(i: int) -> None:
        cond = threading.Condition(threading.Lock())
        box = {"done": 0, "want": 1}

        def done(result: object) -> None:
            with cond:
                if isinstance(result, BaseException):
                    errors.append(result)
                box["done"] += 1
                if box["done"] >= box["want"]:  # wake the thread once per batch
                    cond.notify()

        def issue() -> bool:
            try:
                if w.write:
                    submit("write", offs.next(), data, done)
                else:
                    submit("read", offs.next(), w.block, done)
                return True
            except OSError as e:  # the device failed: no callback will come
                errors.append(e)
                return False

        share = w.depth // nthreads + (1 if i < w.depth % nthreads else 0)
        batch = max(1, share // 4)  # refill in batches: fewer wake-ups of this thread
        inflight = sum(issue() for _ in range(share))
        while inflight:
            with cond:
                box["want"] = min(batch, inflight)
                if not cond.wait_for(lambda: box["done"] >= box["want"], limit):
                    errors.append(CliError(f"{w.name}: requests did not complete in {limit} s"))
                    return
                n, box["done"] = box["done"], 0
            inflight -= n
            ops[i] += n
            if errors or time.perf_counter() >= deadline:
                continue  # drain what is in flight
            inflight += sum(issue() for _ in range(n))

    start = time.perf_counter()
    threads = [
        threading.Thread(target=worker, args=(i,), name=f"bench-submit-{i}")
        for i in range(nthreads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit + 5)
    elapsed = time.perf_counter() - start
    if any(t.is_alive() for t in threads):
        raise CliError(f"{w.name}: submitting threads did not finish within {limit:.0f} s")
    if errors:
        raise CliError(f"{w.name}: virtio request failed: {errors[0]}")
    return _rate(w, sum(ops), elapsed)


def _virtio(block: object, w: Workload, size: int, seconds: float, data: bytes) -> float:
    """Keep ``w.depth`` requests in flight for ``seconds`` through the block layer."""
    offs = _Offsets(w, size, 3)
    submit: Callable[..., None] = block.submit  # type: ignore[attr-defined]
    lock = threading.Lock()
    finished = threading.Event()
    state = {"ops": 0, "inflight": 0, "error": None}
    deadline = time.perf_counter() + seconds

    def issue() -> None:
        off = offs.next()
        if w.write:
            submit("write", off, data, done)
        else:
            submit("read", off, w.block, done)

    def done(result: object) -> None:
        with lock:
            if isinstance(result, BaseException):
                state["error"] = state["error"] or result
                state["inflight"] -= 1
                if not state["inflight"]:
                    finished.set()
                return
            state["ops"] += 1
            again = state["error"] is None and time.perf_counter() < deadline
            if not again:
                state["inflight"] -= 1
                if not state["inflight"]:
                    finished.set()
                return
        try:
            issue()
        except OSError as e:  # the device failed: submit refuses, no callback will come
            done(e)

    start = time.perf_counter()
    with lock:
        state["inflight"] = w.depth
    for _ in range(w.depth):
        try:
            issue()
        except OSError as e:
            done(e)
    if not finished.wait(seconds + 60):
        raise CliError(f"{w.name}: requests did not complete within {seconds + 60:.0f} s")
    elapsed = time.perf_counter() - start
    if state["error"] is not None:
        raise CliError(f"{w.name}: virtio request failed: {state['error']}")
    return _rate(w, int(state["ops"]), elapsed)  # type: ignore[call-overload]


def _prepare_image(path: str, size: int) -> None:
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(chunk[: size % len(chunk)])


def run_blk(
    image: str | None = None,
    seconds: float = 1.0,
    as_json: bool = False,
    only: list[str] | None = None,
    profile: str | None = None,
    queues: int = 1,
    poll: str = "on",
    stages: bool = False,
) -> int:
    """Run the blk benchmark rows and print them; returns the exit status. With
    ``profile`` (a directory), py-spy records the kernel and the device process while
    the virtio rows run (:mod:`tools.profile`) and a last line names the directory.
    ``queues``: request queues of the disk (1..16; see the module docstring);
    ``poll``: hybrid polling ``"on"``, ``"off"`` or ``"both"``; ``stages``: also
    print the CPU time per request of the kernel and of the device (and how much of it
    went into polling)."""
    if poll not in POLL_MODES:
        raise CliError(f"--poll {poll!r}: not one of {', '.join(POLL_MODES)}", 2)
    if poll == "both" and profile is not None:
        raise CliError("--profile takes one polling setting: --poll on or --poll off", 2)
    if isinstance(queues, bool) or not isinstance(queues, int) or not 1 <= queues <= 16:
        raise CliError(f"--queues {queues!r}: not in 1..16", 2)
    names = [w.name for w in WORKLOADS]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise CliError(f"unknown row(s) {unknown}; rows are {names}", 2)
    selected = [w for w in WORKLOADS if not only or w.name in only]
    profiler = None
    if profile is not None:
        from tools import profile as profiling

        profiler = profiling.Profiler(*profiling.check_profile_dir(profile))
    with tempfile.TemporaryDirectory(prefix="vlab-bench-") as tmp:
        if image is None:
            path = os.path.join(tmp, "bench.img")
            _prepare_image(path, DEFAULT_IMAGE)
        else:
            path = image
            if not os.path.isfile(path):
                raise CliError(f"image not found: {path}")
        size = os.path.getsize(path)
        if size < (2 << 20):
            raise CliError(f"image {path} is too small for the benchmark (need >= 2 MiB)")
        rows: list[Row] = []
        idle: dict[str, dict[str, float]] = {}
        costs: dict[str, dict[str, float]] | None = {} if stages else None
        for mode in ("on", "off") if poll == "both" else (poll,):
            got, idle[mode] = _run_rows(
                path, size, seconds, selected, profiler, queues, mode, costs
            )
            rows += got
    if poll == "both":  # the same workload with polling on, then off
        rows.sort(key=lambda r: names.index(r.name.split(" ")[0]))
    if as_json:
        out: dict[str, object] = {"queues": queues, "poll": poll, "idle_cpu": idle}
        if costs is not None:
            out["stages"] = costs
        print(json.dumps({**out, "rows": [asdict(r) for r in rows]}))
    else:
        print(
            f"virtio-blk with {queues} request queue{'s' if queues > 1 else ''}, "
            f"hybrid polling {poll}"
        )
        print(
            render_table(
                ["workload", "unit", "virtio", "native", "virtio/native", "kicks/req", "irqs/req"],
                [
                    [
                        r.name,
                        r.unit,
                        r.virtio,
                        r.native,
                        r.ratio,
                        r.kicks_per_request,
                        r.interrupts_per_request,
                    ]
                    for r in rows
                ],
            )
        )
        if costs is not None:
            print()
            print("CPU time per request, by process on the virtio path (µs):")
            print(
                render_table(
                    ["workload", *STAGE_COLUMNS.values()],
                    [[r.name, *(costs[r.name][k] for k in STAGE_COLUMNS)] for r in rows],
                )
            )
        print()
        for mode, cpu in idle.items():
            print(
                f"idle {min(IDLE_MEASURE_S, 2 * seconds):g} s after the rows (polling {mode}): "
                + ", ".join(f"{who} {pct:.1f} % CPU" for who, pct in cpu.items())
            )
    if profiler is not None:
        print(profiler.report_line(), file=sys.stderr if as_json else sys.stdout)
    return 0


#: ``--poll`` values.
POLL_MODES = ("on", "off", "both")
#: Longest idle time after the rows over which the kernel's and the device's CPU use is
#: measured (twice ``--seconds`` when that is shorter).
IDLE_MEASURE_S = 2.0


def _idle_cpu(device_pid: int | None, seconds: float) -> dict[str, float]:
    """CPU use (percent of one core) of this process (the kernel) and of the device
    process while neither has anything to do for ``seconds``."""
    pids = {"kernel": os.getpid()}
    if device_pid:
        pids["device"] = device_pid
    before = {who: cpu_seconds(pid) for who, pid in pids.items()}
    start = time.perf_counter()
    time.sleep(seconds)  # a benchmark's measuring interval, not a wait for an event
    elapsed = time.perf_counter() - start
    return {
        who: round(100 * (cpu_seconds(pid) - before[who]) / elapsed, 2) for who, pid in pids.items()
    }


def _cpu_snapshot(dev: object) -> dict[str, float]:
    """CPU seconds so far of this process (the kernel) and of the device process, and
    the seconds each side spent in hybrid polling."""
    pid = dev.pid  # type: ignore[attr-defined]
    metrics = dev.metrics()["device"]  # type: ignore[attr-defined]
    return {
        "kernel": cpu_seconds(os.getpid()),
        "kernel_poll": dev.transport.poll.spent,  # type: ignore[attr-defined]
        "device": cpu_seconds(pid) if pid else 0.0,
        "device_poll": metrics.get("poll_us", 0) / 1e6,
    }


def _stage_costs(
    before: dict[str, float], after: dict[str, float], requests: int
) -> dict[str, float]:
    """µs per request between two snapshots: CPU time of the kernel and of the device,
    and the wall-clock time each spent in its polling loop (see :data:`STAGE_COLUMNS`)."""
    n = max(1, requests)
    return {k: round((after[k] - before[k]) * 1e6 / n, 2) for k in before}


#: The ``--stages`` table's columns (keys of :func:`_stage_costs`): CPU time of each
#: process, and the wall-clock time it spent in its polling loop (that loop yields the
#: CPU to whoever else wants it, so this can exceed the CPU time).
STAGE_COLUMNS = {
    "kernel": "kernel CPU",
    "kernel_poll": "kernel polling (wall)",
    "device": "device CPU",
    "device_poll": "device polling (wall)",
}


def _run_rows(
    path: str,
    size: int,
    seconds: float,
    selected: list[Workload],
    profiler: Profiler | None = None,
    queues: int = 1,
    poll: str = "on",
    stages: dict[str, dict[str, float]] | None = None,
) -> tuple[list[Row], dict[str, float]]:
    """Run the rows on one kernel with polling ``poll``; returns the rows and the idle
    CPU use after them. With ``stages`` (a dict), each row's CPU time per request by
    process goes there (:func:`_stage_costs`)."""
    rows: list[Row] = []
    polling = {} if poll == "on" else {"poll_us": 0, "device_poll_us": 0}
    suffix = " poll-off" if poll == "off" else ""
    data4k = os.urandom(4096)
    data1m = os.urandom(1 << 20)
    native_fd = os.open(path, os.O_RDWR)
    try:
        spec = kernel.Blk(path, queue_size=128, queues=queues, **polling)  # type: ignore[arg-type]
        with kernel.boot(devices=[spec]) as k:
            dev = k.devices[0]
            block = dev.block

            def run(w: Workload, data: bytes) -> float:
                if queues > 1 and w.depth > 1:
                    return _virtio_threads(block, w, size, seconds, data, queues)
                return _virtio(block, w, size, seconds, data)

            for w in selected:
                data = data1m if w.block >= 1 << 20 else data4k
                cpu = _cpu_snapshot(dev) if stages is not None else None
                before = _stats(dev)
                if profiler is None:
                    v = run(w, data)
                else:
                    with profiler.section({"kernel": os.getpid(), dev.name: dev.pid or 0}):
                        v = run(w, data)
                after = _stats(dev)
                if cpu is not None and stages is not None:
                    stages[w.name + suffix] = _stage_costs(
                        cpu, _cpu_snapshot(dev), after[0] - before[0]
                    )
                n1 = _native_loop(native_fd, w, size, seconds, data)
                n2 = _native_pool(native_fd, w, size, seconds, data)
                native = max(n1, n2)
                reqs = max(1, after[0] - before[0])
                rows.append(
                    Row(
                        name=w.name + suffix,
                        unit=w.unit,
                        virtio=round(v, 1),
                        native=round(native, 1),
                        ratio=round(v / native, 4) if native else 0.0,
                        kicks_per_request=round((after[1] - before[1]) / reqs, 4),
                        interrupts_per_request=round((after[2] - before[2]) / reqs, 4),
                    )
                )
            idle = _idle_cpu(dev.pid, min(IDLE_MEASURE_S, 2 * seconds))
    finally:
        os.close(native_fd)
    if profiler is not None:
        profiler.finish()
    return rows, idle


def _stats(dev: object) -> tuple[int, int, int]:
    req = kicks = irqs = 0
    for q in dev.queues:  # type: ignore[attr-defined]
        req += q.stats.requests
        kicks += q.stats.kicks_sent
        irqs += q.stats.interrupts
    return req, kicks, irqs
