"""``vlab bench blk``: virtio-blk beside native ``os.pread``/``os.pwrite``, same run.

Each row runs the same workload twice on the same file: through the kernel's block
layer (kernel → shared-memory ring → device process → image) and natively in this
process. The native side runs both as a plain loop and as a pool of ``depth`` threads;
the ratio uses the faster of the two. The virtio side keeps ``depth`` requests in
flight with the block layer's asynchronous ``submit`` (completions re-submit from the
interrupt thread), so depth 32 needs no 32 threads. Counters come from the queue's
stats: kicks and interrupts per request show how well notifications are suppressed.

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
) -> int:
    """Run the blk benchmark rows and print them; returns the exit status. With
    ``profile`` (a directory), py-spy records the kernel and the device process while
    the virtio rows run (:mod:`tools.profile`) and a last line names the directory."""
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
        rows = _run_rows(path, size, seconds, selected, profiler)
    if as_json:
        print(json.dumps({"rows": [asdict(r) for r in rows]}))
    else:
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
    if profiler is not None:
        print(profiler.report_line(), file=sys.stderr if as_json else sys.stdout)
    return 0


def _run_rows(
    path: str,
    size: int,
    seconds: float,
    selected: list[Workload],
    profiler: Profiler | None = None,
) -> list[Row]:
    rows: list[Row] = []
    data4k = os.urandom(4096)
    data1m = os.urandom(1 << 20)
    native_fd = os.open(path, os.O_RDWR)
    try:
        with kernel.boot(devices=[kernel.Blk(path, queue_size=128)]) as k:
            dev = k.devices[0]
            block = dev.block
            for w in selected:
                data = data1m if w.block >= 1 << 20 else data4k
                before = _stats(dev)
                if profiler is None:
                    v = _virtio(block, w, size, seconds, data)
                else:
                    with profiler.section({"kernel": os.getpid(), dev.name: dev.pid or 0}):
                        v = _virtio(block, w, size, seconds, data)
                after = _stats(dev)
                n1 = _native_loop(native_fd, w, size, seconds, data)
                n2 = _native_pool(native_fd, w, size, seconds, data)
                native = max(n1, n2)
                reqs = max(1, after[0] - before[0])
                rows.append(
                    Row(
                        name=w.name,
                        unit=w.unit,
                        virtio=round(v, 1),
                        native=round(native, 1),
                        ratio=round(v / native, 4) if native else 0.0,
                        kicks_per_request=round((after[1] - before[1]) / reqs, 4),
                        interrupts_per_request=round((after[2] - before[2]) / reqs, 4),
                    )
                )
    finally:
        os.close(native_fd)
    if profiler is not None:
        profiler.finish()
    return rows


def _stats(dev: object) -> tuple[int, int, int]:
    req = kicks = irqs = 0
    for q in dev.queues:  # type: ignore[attr-defined]
        req += q.stats.requests
        kicks += q.stats.kicks_sent
        irqs += q.stats.interrupts
    return req, kicks, irqs
