"""``vlab faults matrix``: every built-in fault kind against a real workload, one table.

Theory of operation
-------------------
A *row* is one fault kind (:data:`KINDS`: every action of ``docs/faults.md``) under one
workload. The parent runs each row in a child process of its own (``python -m
tools.faults_matrix --row KIND --workload W --seed S``) with a watchdog, so a row that
hangs or kills its kernel cannot take the matrix with it. The child boots a kernel whose
device carries the row's fault plan (``kernel.Blk(..., faults=plan)`` /
``kernel.Net(..., faults=plan)``, traced to a file so the faults that fired are
counted from the trace), runs the workload, checks its data and prints one JSON line.

Workloads:

* ``blk`` -- :data:`BLK_WRITES` writes of :data:`BLK_CHUNK` bytes (a distinct pattern per
  write) with an ``fsync`` after every :data:`BLK_FSYNC_EVERY`, a final ``fsync``, then
  a read of every write; after the kernel is down, the image is read from the host.
  The disk runs the block layer's integrity mode (``kernel.Blk(..., integrity=True)``:
  reads verified against CRCs of what was written, every fsync reads the journal back
  and rewrites what a device dropped or tore), so that silent device faults
  (``drop_write``, ``torn_write``, ``corrupt_read``) are repaired or reported;
  ``--integrity off`` runs the plain driver, which loses data under them.
* ``net`` -- a NIC on the loopback backend (every frame crosses the device twice):
  :data:`UDP_ROUNDS` UDP echo round trips (a UDP application retries: up to
  :data:`UDP_TRIES` sends per round), :data:`PINGS` pings (same retries) and a TCP
  transfer of :data:`TCP_BYTES` bytes whose SHA-256 comes back.

Outcome of a row, in this order of precedence:

========================  ==============================================================
``kernel-crash``          the child died or an exception other than OSError escaped the
                          kernel
``hang``                  the watchdog (``--timeout``) ended the row
``data-lost``             a call reported success but the data is wrong: a read returned
                          other bytes than were written, the image lacks a write that was
                          acknowledged before an acknowledged fsync, a datagram or the
                          TCP stream arrived altered
``clean-error``           some call failed with an OSError (its ``culprit`` is recorded);
                          nothing acknowledged was lost
``survived``              every call succeeded (retries of a UDP send/ping included)
========================  ==============================================================

``requests_affected`` counts the workload's calls that failed or needed a retry;
``recovery_ms`` is the longest call minus the median call (how long the worst stall
lasted, in ms); ``fired`` counts the faults the devices recorded (``fault`` trace
events). A row whose fault never fired says nothing: the matrix test checks ``fired``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KINDS",
    "OUTCOMES",
    "FaultKind",
    "plan_for",
    "run_row",
    "run_matrix",
    "render",
    "main",
]

OUTCOMES = ("survived", "clean-error", "data-lost", "hang", "kernel-crash")

BLK_CHUNK = 8192
BLK_WRITES = 24
BLK_FSYNC_EVERY = 4
BLK_IMAGE = 1 << 20
UDP_ROUNDS = 16
UDP_TRIES = 4
UDP_WAIT_S = 0.5
PINGS = 3
TCP_BYTES = 192 << 10
NET_IP = "10.0.0.2"
#: The kernel's per-request timeout in the matrix (a hung device must not cost long).
REQUEST_TIMEOUT_S = 2.0
#: Default watchdog per row.
ROW_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class FaultKind:
    """One built-in fault kind: its action, family, and the rule's trigger per workload
    (``when`` without ``event``; the event is chosen per workload by :func:`plan_for`)."""

    name: str
    family: str
    what: dict[str, Any]
    workloads: tuple[str, ...]
    when: dict[str, Any]


def _k(
    name: str,
    family: str,
    workloads: tuple[str, ...],
    when: dict[str, Any] | None = None,
    **params: Any,
) -> FaultKind:
    return FaultKind(
        name, family, {"action": name, **params}, workloads, {"nth": 3} if when is None else when
    )


_BOTH = ("blk", "net")
_ONCE = {"nth": 5, "times": 1}

#: Every built-in fault kind (the actions of ``docs/faults.md``), with the trigger the
#: matrix uses.
KINDS: tuple[FaultKind, ...] = (
    # virtio-blk
    _k("ioerr", "blk", ("blk",), {"nth": 3}),
    _k("unsupp", "blk", ("blk",), {"nth": 3}),
    _k("corrupt_read", "blk", ("blk",), {"nth": 2}, offset=100),
    _k("drop_write", "blk", ("blk",), {"nth": 3}),
    _k("drop_flush", "blk", ("blk",), {"nth": 2}),
    _k("torn_write", "blk", ("blk",), {"nth": 3}, sectors=1),
    _k("power_cut", "blk", ("blk",), {"nth": 10, "times": 1}),
    _k("latency", "blk", ("blk",), {"every": 4}, dist="uniform", low_s=0.001, high_s=0.02),
    # virtio-net
    _k("loss", "net", ("net",), {"probability": 0.05}),
    _k("gilbert_elliott", "net", ("net",), {}, p=0.05, r=0.5, h=0.3, k=1.0),
    _k("duplicate", "net", ("net",), {"every": 5}),
    _k("reorder", "net", ("net",), {"every": 7}, depth=2),
    _k("corrupt_byte", "net", ("net",), {"every": 9}, random=True),
    _k("delay", "net", ("net",), {"every": 3}, s=0.005, jitter_s=0.002),
    _k("rate_limit", "net", ("net",), {}, bits_per_s=50e6, burst_bytes=65536),
    _k("link_flap", "net", ("net",), {"nth": 40, "times": 1}, down_s=0.3),
    # the split virtqueue, as a malicious device
    _k("bad_used_id", "ring", _BOTH, _ONCE),
    _k("used_id_not_head", "ring", _BOTH, _ONCE),
    _k("double_complete", "ring", _BOTH, _ONCE),
    _k("used_len_too_big", "ring", _BOTH, _ONCE, extra=4096),
    _k("used_idx_jump", "ring", _BOTH, _ONCE, by=3),
    _k("withhold", "ring", _BOTH, _ONCE),
    _k("out_of_order", "ring", _BOTH, {"nth": 5, "times": 3}, depth=1),
    # notifications
    _k("drop_interrupt", "notify", _BOTH, {"every": 3}),
    _k("spurious_interrupt", "notify", _BOTH, {"every": 2}),
    _k("interrupt_storm", "notify", _BOTH, {"nth": 4, "times": 2}, n=200),
    _k("ignore_event_idx", "notify", _BOTH, {}),
    # device life cycle
    _k("refuse_features_ok", "lifecycle", _BOTH, {"nth": 1, "times": 1}),
    _k("needs_reset", "lifecycle", _BOTH, _ONCE),
    _k("crash", "lifecycle", _BOTH, _ONCE),
    _k("hang", "lifecycle", _BOTH, _ONCE),
)

_BY_NAME = {k.name: k for k in KINDS}

# The event a family's rule listens to, per workload.
_EVENTS: dict[tuple[str, str], dict[str, Any]] = {
    ("blk", "blk"): {"event": "device.request"},
    ("net", "net"): {"event": "net.rx"},
    ("ring", "blk"): {"event": "ring.push", "queue": 0},
    ("ring", "net"): {"event": "ring.push", "queue": 0},
    ("notify", "blk"): {"event": "notify.interrupt", "queue": 0},
    ("notify", "net"): {"event": "notify.interrupt", "queue": 0},
    ("lifecycle", "blk"): {"event": "device.request"},
    ("lifecycle", "net"): {"event": "net.tx"},
}
# Block actions that only follow one kind of request.
_BLK_EVENT = {
    "corrupt_read": "blk.read",
    "drop_write": "blk.write",
    "torn_write": "blk.write",
    "drop_flush": "blk.flush",
    "power_cut": "blk.write",
    "ioerr": "blk.write",
    "unsupp": "blk.read",
    "latency": "blk.read",
}


def plan_for(kind: FaultKind, workload: str, seed: int) -> dict[str, Any]:
    """The fault plan of one row: one rule, ``kind``'s action on its workload's event."""
    if workload not in kind.workloads:
        raise ValueError(f"fault {kind.name} does not apply to workload {workload}")
    when = dict(_EVENTS[(kind.family, workload)])
    if kind.family == "blk":
        when["event"] = _BLK_EVENT[kind.name]
    if kind.name == "refuse_features_ok":
        when = {"event": "control.SET_STATUS"}
    when.update(kind.when)
    return {"seed": seed, "rules": [{"name": kind.name, "when": when, "what": dict(kind.what)}]}


# =========================================================================== the child


#: What :meth:`_Calls.call` returns for a call that failed.
FAILED = object()


class _Calls:
    """What the workload's calls saw: latencies, errors (with culprit), retries."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.affected = 0
        self.lost: list[str] = []

    def call(self, what: str, fn: Callable[[], Any], tries: int = 1) -> Any:
        """Run ``fn`` up to ``tries`` times; its result, or :data:`FAILED` after an
        OSError on the last try (recorded). A call that needed a retry or failed is
        *affected*."""
        start = time.monotonic()
        try:
            for attempt in range(tries):
                try:
                    result = fn()
                except OSError as e:
                    if attempt + 1 < tries:
                        continue
                    self.affected += 1
                    culprit = getattr(e, "culprit", None)
                    self.errors.append(f"{what}: {e.strerror or e} (culprit {culprit})")
                    return FAILED
                if attempt:
                    self.affected += 1
                return result
            return FAILED
        finally:
            self.latencies.append(time.monotonic() - start)


def _pattern(i: int) -> bytes:
    seed = hashlib.sha256(f"vlab-matrix-{i}".encode()).digest()
    return (seed * (BLK_CHUNK // len(seed) + 1))[:BLK_CHUNK]


def _blk_workload(k: Any, calls: _Calls) -> list[int]:
    """Writes with periodic fsync, then a read of each write an acknowledged fsync
    covers; returns those writes (the fsync promise: they must be in the image)."""
    fd = k.sys.open("/dev/vda", os.O_RDWR)
    acked: list[int] = []
    promised: list[int] = []
    try:
        for i in range(BLK_WRITES):
            data = _pattern(i)
            n = calls.call(f"pwrite #{i}", lambda d=data, o=i * BLK_CHUNK: k.sys.pwrite(fd, d, o))
            if n == BLK_CHUNK:
                acked.append(i)
            elif n is not FAILED:
                calls.lost.append(f"pwrite #{i}: short write {n}")
            if (i + 1) % BLK_FSYNC_EVERY == 0 or i + 1 == BLK_WRITES:
                if calls.call(f"fsync after #{i}", lambda: k.sys.fsync(fd)) is not FAILED:
                    promised = list(acked)
        for i in promised:
            got = calls.call(f"pread #{i}", lambda o=i * BLK_CHUNK: k.sys.pread(fd, BLK_CHUNK, o))
            if got is not FAILED and got != _pattern(i):
                calls.lost.append(f"pread #{i}: wrong data returned as success")
    finally:
        k.sys.close(fd)
    return promised


def _check_image(image: str, promised: list[int], calls: _Calls) -> None:
    with open(image, "rb") as f:
        for i in promised:
            f.seek(i * BLK_CHUNK)
            if f.read(BLK_CHUNK) != _pattern(i):
                calls.lost.append(f"image: write #{i} acknowledged before an fsync is not there")


def _net_workload(k: Any, calls: _Calls) -> None:
    import threading

    server = k.sys.socket()
    client = k.sys.socket()
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            try:
                data, peer = k.sys.recvfrom(server, 2048)
                k.sys.sendto(server, data, peer)
            except OSError:
                continue

    try:
        k.sys.bind(server, (NET_IP, 7))
        k.sys.settimeout(server, 0.2)
        k.sys.settimeout(client, UDP_WAIT_S)
        t = threading.Thread(target=echo, daemon=True)
        t.start()
        for i in range(UDP_ROUNDS):
            msg = hashlib.sha256(f"udp-{i}".encode()).digest() * 8

            def rt(m: bytes = msg) -> bytes:
                k.sys.sendto(client, m, (NET_IP, 7))
                while True:  # skip stale echoes of earlier tries (duplicates, late ones)
                    back, _ = k.sys.recvfrom(client, 2048)
                    if back == m or len(back) != len(m) or back[:32] == m[:32]:
                        return bytes(back)

            back = calls.call(f"udp #{i}", rt, tries=UDP_TRIES)
            if back is not FAILED and back != msg:
                calls.lost.append(f"udp #{i}: datagram altered")
        for i in range(PINGS):

            def one() -> list[float]:
                rtts = k.sys.ping(NET_IP, count=1, timeout=UDP_WAIT_S)
                if not rtts:
                    raise TimeoutError(110, "no echo reply")
                return rtts

            calls.call(f"ping #{i}", one, tries=UDP_TRIES)
        stop.set()
        t.join(timeout=2.0)
        calls.call("tcp", lambda: _tcp(k, calls))
    finally:
        stop.set()
        k.sys.close(client)
        k.sys.close(server)


def _tcp(k: Any, calls: _Calls) -> None:
    from tools.demo import tcp_digest_round_trip

    data = hashlib.sha256(b"tcp").digest() * (TCP_BYTES // 32)
    if tcp_digest_round_trip(k, NET_IP, data, timeout_s=20.0) != hashlib.sha256(data).digest():
        calls.lost.append("tcp: the stream arrived altered")


def _count_fired(trace_path: str) -> int:
    fired = 0
    try:
        with open(trace_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"fault"' not in line:
                    continue
                try:
                    if json.loads(line).get("kind") == "fault":
                        fired += 1
                except ValueError:
                    continue  # a line cut by a SIGKILL
    except FileNotFoundError:
        pass
    return fired


def child_row(kind_name: str, workload: str, seed: int, integrity: bool = True) -> dict[str, Any]:
    """Run one row in this process; the row's result (outcome kernel-crash when a
    non-OSError escapes). ``integrity``: the blk workload's disk runs the block layer's
    integrity mode (``kernel.Blk(..., integrity=True)``)."""
    import kernel

    kind = _BY_NAME[kind_name]
    plan = plan_for(kind, workload, seed)
    calls = _Calls()
    crash = ""
    with tempfile.TemporaryDirectory(prefix="vlab-matrix-") as tmp:
        trace = os.path.join(tmp, "trace.jsonl")
        image = os.path.join(tmp, "disk.img")
        promised: list[int] = []
        try:
            if workload == "blk":
                with open(image, "wb") as f:
                    f.truncate(BLK_IMAGE)
                spec: Any = kernel.Blk(
                    image, faults=plan, request_timeout=REQUEST_TIMEOUT_S, integrity=integrity
                )
            else:
                spec = kernel.Net(
                    backend="loopback",
                    ip=f"{NET_IP}/24",
                    faults=plan,
                    request_timeout=REQUEST_TIMEOUT_S,
                )
            try:
                k = kernel.boot(devices=[spec], trace=trace)
            except (OSError, kernel.DeviceProbeError) as e:  # refused at bring-up: told
                calls.errors.append(f"boot: {type(e).__name__}: {e}")
                calls.affected += 1
            else:
                with k:
                    if workload == "blk":
                        promised = _blk_workload(k, calls)
                    else:
                        _net_workload(k, calls)
            if workload == "blk":
                _check_image(image, promised, calls)
        except Exception as e:  # not an OSError: the kernel broke
            if isinstance(e, OSError):
                calls.errors.append(f"{type(e).__name__}: {e}")
            else:
                crash = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        fired = _count_fired(trace)
    lat = calls.latencies
    recovery = (max(lat) - statistics.median(lat)) * 1000 if lat else 0.0
    if crash:
        outcome = "kernel-crash"
    elif calls.lost:
        outcome = "data-lost"
    elif calls.errors:
        outcome = "clean-error"
    else:
        outcome = "survived"
    return {
        "fault": kind_name,
        "workload": workload,
        "outcome": outcome,
        "requests_affected": calls.affected,
        "recovery_ms": round(recovery, 1),
        "fired": fired,
        "errors": calls.errors[:5],
        "lost": calls.lost[:5],
        "crash": crash,
    }


# =========================================================================== the parent


def run_row(
    kind: str, workload: str, seed: int, timeout_s: float = ROW_TIMEOUT_S, integrity: bool = True
) -> dict[str, Any]:
    """Run one row in a child process with a watchdog; never raises for the row's own
    failures (they are its outcome). ``integrity``: see :func:`child_row`."""
    argv = [
        sys.executable,
        "-m",
        "tools.faults_matrix",
        "--row",
        kind,
        "--workload",
        workload,
        "--seed",
        str(seed),
        "--integrity",
        "on" if integrity else "off",
    ]
    base = {"fault": kind, "workload": workload, "requests_affected": 0, "fired": 0}
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        return {**base, "outcome": "hang", "recovery_ms": timeout_s * 1000}
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                result: dict[str, Any] = json.loads(line)
                return result
            except ValueError:
                break
    tail = err.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    return {**base, "outcome": "kernel-crash", "recovery_ms": 0.0, "crash": tail[0]}


def _kill_group(proc: subprocess.Popen[str]) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def rows_for(workload: str, only: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The (fault, workload) rows of a matrix run."""
    loads = ("blk", "net") if workload == "both" else (workload,)
    out = []
    for w in loads:
        for kind in KINDS:
            if w in kind.workloads and (not only or kind.name in only):
                out.append((kind.name, w))
    return out


def run_matrix(
    workload: str = "both",
    seeds: int = 1,
    seed: int = 1,
    only: Sequence[str] = (),
    jobs: int = 1,
    timeout_s: float = ROW_TIMEOUT_S,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    integrity: bool = True,
) -> dict[str, Any]:
    """Every row for ``seeds`` seeds starting at ``seed``; ``jobs`` rows at a time
    (``integrity``: the blk disk's integrity mode, :func:`child_row`).
    Returns ``{"seed", "seeds", "rows": [...]}``."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [(k, w, s) for s in range(seed, seed + seeds) for (k, w) in rows_for(workload, only)]
    rows: list[dict[str, Any]] = [{} for _ in todo]
    done = 0

    def one(i: int) -> None:
        nonlocal done
        k, w, s = todo[i]
        r = run_row(k, w, s, timeout_s, integrity)
        r["seed"] = s
        rows[i] = r
        done += 1
        if progress is not None:
            progress(done, len(todo), r)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(one, range(len(todo))))
    return {"seed": seed, "seeds": seeds, "rows": rows}


def render(result: dict[str, Any]) -> str:
    """The matrix as a text table, one row per fault and workload (and seed)."""
    from tools.table import render_table

    body = [
        [
            r["fault"],
            r["workload"],
            str(r.get("seed", "")),
            r["outcome"],
            str(r.get("fired", "")),
            str(r["requests_affected"]),
            f"{r['recovery_ms']:.0f}",
            "; ".join(r.get("lost") or r.get("errors") or ([r["crash"]] if r.get("crash") else []))[
                :70
            ],
        ]
        for r in result["rows"]
    ]
    counts = {o: sum(r["outcome"] == o for r in result["rows"]) for o in OUTCOMES}
    summary = ", ".join(f"{n} {o}" for o, n in counts.items())
    table = render_table(
        ["fault", "workload", "seed", "outcome", "fired", "affected", "recovery ms", "detail"],
        body,
    )
    return f"{table}\n{len(result['rows'])} rows: {summary}"


def main(argv: Sequence[str] | None = None) -> int:
    """The child entry point (``--row``): run one row, print its JSON line."""
    p = argparse.ArgumentParser(prog="python -m tools.faults_matrix")
    p.add_argument("--row", required=True, choices=sorted(_BY_NAME))
    p.add_argument("--workload", required=True, choices=("blk", "net"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--integrity", choices=("on", "off"), default="on")
    a = p.parse_args(argv)
    result = child_row(a.row, a.workload, a.seed, a.integrity == "on")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
