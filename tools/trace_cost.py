"""``vlab bench trace-cost``: what tracing costs, against the code from before tracing.

Theory of operation
-------------------
Three configurations run the same benchmark rows:

* ``before``: the code from before tracing landed (``--before REV``, default
  :data:`DEFAULT_BEFORE`), checked out into a temporary ``git worktree``;
* ``off``: the current code with tracing off (``VLAB_TRACE`` removed from the
  environment);
* ``on``: the current code tracing to a file (``VLAB_TRACE`` set, so the benchmark's
  own kernel and its device processes trace, as any unmodified program would).

Each run is a fresh subprocess of that tree's CLI (``python -m tools.cli bench blk|net
--json --only ROW ...`` with the tree first on ``PYTHONPATH``, so the device processes
it starts import the same tree), and takes the ``virtio`` figure of each row. Rounds are
interleaved (round *r* runs the configurations rotated by *r*), so a machine that
slows down or speeds up during the session weighs on all three alike. Per row the
table gives the median of each configuration over the rounds, the ratios off/before
and on/before of those medians, and the spread of off/before: the lowest and highest
ratio of one round's ``off`` to the same round's ``before``, which says how far one
round can be trusted.

A tree whose ``vlab bench`` has no ``--only`` runs all its rows and the wanted ones are
picked from its JSON; one without ``--json`` cannot be measured (an error says so).
Blk rows share one image made once (``--image`` to give one). The worktree, the image
and the trace files are removed at the end, also on failure, Ctrl-C or SIGTERM.

This is a benchmark, not a test: it prints numbers and never judges them. Run it on a
quiet machine; it takes ``rounds × 3`` runs of each target.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from tools.errors import CliError
from tools.table import render_table

__all__ = [
    "DEFAULT_BEFORE",
    "DEFAULT_ROUNDS",
    "DEFAULT_ROWS",
    "CONFIGS",
    "CostRow",
    "target_of",
    "round_order",
    "pick_rows",
    "summarize",
    "format_table",
    "worktree",
    "run_trace_cost",
]

ROOT = Path(__file__).resolve().parents[1]
#: The commit before the one that brought tracing (dfe225f, "Virtqueue tracing").
DEFAULT_BEFORE = "dfe225f^"
DEFAULT_ROUNDS = 9
#: The configurations, in the order of round 0.
CONFIGS = ("before", "off", "on")
#: Every blk row and two UDP_STREAM rows (the README's table).
DEFAULT_ROWS = (
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd1",
    "randwrite-4k-qd32",
    "seqread-1m",
    "seqwrite-1m",
    "udp-1024",
    "udp-65507",
)
IMAGE_SIZE = 128 << 20  # as vlab bench blk's own temporary image
MAX_ROUNDS = 1000
RUN_TIMEOUT_S = 1800.0  # one benchmark subprocess
GIT_TIMEOUT_S = 300.0


@dataclass
class CostRow:
    """One row of the result: medians, their ratios and the spread of off/before."""

    name: str
    unit: str
    before: float
    off: float
    on: float
    off_before: float | None  # None: the before figure was 0
    on_before: float | None
    spread_min: float | None
    spread_max: float | None
    rounds: int


def target_of(row: str) -> str:
    """The benchmark a row belongs to: ``net`` (``udp-N``), ``net-tcp`` (``tcp-…``) or
    ``blk``."""
    if row.startswith("udp-"):
        return "net"
    if row.startswith("tcp-"):
        return "net-tcp"
    return "blk"


def round_order(r: int) -> tuple[str, ...]:
    """The configurations of round ``r``: :data:`CONFIGS` rotated by ``r``."""
    k = r % len(CONFIGS)
    return CONFIGS[k:] + CONFIGS[:k]


def pick_rows(stdout: str, wanted: Sequence[str], what: str) -> dict[str, tuple[str, float]]:
    """``{row: (unit, virtio)}`` for the ``wanted`` rows from a ``vlab bench --json``
    output (its last JSON object line with ``"rows"``); a missing row or a malformed
    output raises :class:`CliError` naming ``what`` ran."""
    doc: Any = None
    for line in reversed(stdout.splitlines()):
        if line.startswith("{") and '"rows"' in line:
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            break
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise CliError(f"{what}: no JSON rows in its output")
    got: dict[str, tuple[str, float]] = {}
    for row in doc["rows"]:
        if not isinstance(row, dict):
            continue
        name, unit, value = row.get("name"), row.get("unit"), row.get("virtio")
        if isinstance(name, str) and isinstance(value, int | float) and name in wanted:
            got[name] = (str(unit), float(value))
    missing = [r for r in wanted if r not in got]
    if missing:
        raise CliError(f"{what}: no result for row(s) {missing}")
    return got


def summarize(samples: dict[str, dict[str, list[float]]], units: dict[str, str]) -> list[CostRow]:
    """The rows from ``samples`` (row → configuration → one figure per round, rounds in
    the same order for every configuration)."""
    out: list[CostRow] = []
    for name, per in samples.items():
        med = {c: statistics.median(per[c]) for c in CONFIGS}
        ratios = [o / b for o, b in zip(per["off"], per["before"], strict=True) if b]
        base = med["before"]
        out.append(
            CostRow(
                name=name,
                unit=units.get(name, ""),
                before=med["before"],
                off=med["off"],
                on=med["on"],
                off_before=round(med["off"] / base, 4) if base else None,
                on_before=round(med["on"] / base, 4) if base else None,
                spread_min=round(min(ratios), 4) if ratios else None,
                spread_max=round(max(ratios), 4) if ratios else None,
                rounds=len(per["before"]),
            )
        )
    return out


def format_table(rows: Sequence[CostRow], before: str, rounds: int) -> str:
    """The result as text: a line saying what was compared, then one line per row."""
    head = (
        f"tracing cost: {rounds} interleaved round(s); before = {before}; "
        "medians of the virtio figure"
    )
    table = render_table(
        ["row", "unit", "before", "off", "on", "off/before", "on/before", "off/before spread"],
        [
            [
                r.name,
                r.unit,
                r.before,
                r.off,
                r.on,
                "-" if r.off_before is None else f"{r.off_before:.3f}",
                "-" if r.on_before is None else f"{r.on_before:.3f}",
                "-"
                if r.spread_min is None or r.spread_max is None
                else f"{r.spread_min:.3f}-{r.spread_max:.3f}",
            ]
            for r in rows
        ],
    )
    return f"{head}\n{table}"


def _git(*args: str) -> str:
    try:
        r = subprocess.run(
            ["git", "-C", str(ROOT), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
        )
    except FileNotFoundError:
        raise CliError("bench trace-cost: git is not installed") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["failed"])[-1]
        raise CliError(f"bench trace-cost: git {args[0]}: {last}")
    return r.stdout.strip()


@contextmanager
def worktree(rev: str, parent: str) -> Iterator[tuple[Path, str]]:
    """A detached ``git worktree`` of ``rev`` under ``parent``: yields (path, commit);
    removed (and pruned) on the way out, whatever happened."""
    sha = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    path = Path(parent) / "before"
    added = False
    try:
        _git("worktree", "add", "--detach", str(path), sha)
        added = True
        yield path, sha
    finally:
        if added:
            try:
                _git("worktree", "remove", "--force", str(path))
            except CliError:
                pass
        shutil.rmtree(path, ignore_errors=True)
        try:
            _git("worktree", "prune")
        except CliError:
            pass


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While inside, SIGTERM raises (so the ``finally`` blocks remove the worktree)."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise CliError("bench trace-cost: terminated", 128 + signal.SIGTERM)

    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _env(tree: Path, trace: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLAB_TRACE", None)
    env.pop("VLAB_TRACE_DEVICE", None)
    env.pop("VLAB_TRACE_KERNEL", None)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(tree) + (os.pathsep + pp if pp else "")
    if trace is not None:
        env["VLAB_TRACE"] = trace
    return env


def _bench_options(tree: Path) -> str:
    """The tree's ``vlab bench --help`` (to see which options it has)."""
    r = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "--help"],
        cwd=tree,
        env=_env(tree, None),
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
    )
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["failed"])[-1]
        raise CliError(f"bench trace-cost: {tree}: vlab bench --help: {last}")
    return r.stdout


def _run_bench(
    tree: Path,
    target: str,
    rows: Sequence[str],
    *,
    seconds: float,
    image: str,
    options: str,
    trace: str | None,
    what: str,
) -> dict[str, tuple[str, float]]:
    argv = [sys.executable, "-m", "tools.cli", "bench", "net" if target != "blk" else "blk"]
    argv += ["--json", "--seconds", repr(seconds)]
    if target == "blk":
        argv += ["--image", image]
    if target == "net-tcp":
        argv.append("--tcp")
    if "--only" in options:
        for row in rows:
            argv += ["--only", row]
    try:
        r = subprocess.run(
            argv,
            cwd=tree,
            env=_env(tree, trace),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise CliError(f"{what}: no result within {RUN_TIMEOUT_S:.0f} s") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise CliError(f"{what} failed: {last}")
    return pick_rows(r.stdout, rows, what)


def _make_image(path: str, size: int) -> None:
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size // len(chunk)):
            f.write(chunk)


def run_trace_cost(
    *,
    before: str = DEFAULT_BEFORE,
    rounds: int = DEFAULT_ROUNDS,
    seconds: float = 1.0,
    only: Sequence[str] | None = None,
    image: str | None = None,
    as_json: bool = False,
) -> int:
    """Measure and print (see the module docstring); returns the exit status."""
    if not 1 <= rounds <= MAX_ROUNDS:
        raise CliError(f"bench trace-cost: --rounds must be in 1..{MAX_ROUNDS}", 2)
    rows = list(dict.fromkeys(only or DEFAULT_ROWS))
    by_target: dict[str, list[str]] = {}
    for row in rows:
        by_target.setdefault(target_of(row), []).append(row)
    if image is not None and not os.path.isfile(image):
        raise CliError(f"image not found: {image}")
    samples: dict[str, dict[str, list[float]]] = {r: {c: [] for c in CONFIGS} for r in rows}
    units: dict[str, str] = {}
    with _sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="vlab-trace-cost-") as tmp:
        with worktree(before, tmp) as (old_tree, sha):
            trees = {"before": old_tree, "off": ROOT, "on": ROOT}
            options = {"before": _bench_options(old_tree), "off": _bench_options(ROOT)}
            options["on"] = options["off"]
            for c in ("before", "off"):
                if "--json" not in options[c]:
                    raise CliError(
                        f"bench trace-cost: the tree at {before} has no `vlab bench --json`"
                    )
                if "net-tcp" in by_target and "--tcp" not in options[c]:
                    raise CliError(f"bench trace-cost: the tree at {before} has no TCP rows")
            img = image
            if "blk" in by_target and img is None:
                img = os.path.join(tmp, "bench.img")
                _make_image(img, IMAGE_SIZE)
            trace = os.path.join(tmp, "trace.jsonl")
            for r in range(rounds):
                for config in round_order(r):
                    for target, wanted in by_target.items():
                        what = f"bench {target} ({config}, round {r + 1})"
                        got = _run_bench(
                            trees[config],
                            target,
                            wanted,
                            seconds=seconds,
                            image=img or "",
                            options=options[config],
                            trace=trace if config == "on" else None,
                            what=what,
                        )
                        if config == "on":
                            try:
                                os.unlink(trace)  # a traced run writes a lot
                            except FileNotFoundError:
                                pass
                        for row, (unit, value) in got.items():
                            samples[row][config].append(value)
                            units.setdefault(row, unit)
            result = summarize(samples, units)
            wt = str(old_tree)
    if as_json:
        out = {
            "before": sha,
            "rev": before,
            "rounds": rounds,
            "worktree": wt,
            "rows": [asdict(r) for r in result],
            "samples": samples,
        }
        print(json.dumps(out))
    else:
        print(format_table(result, f"{sha[:12]} ({before})", rounds))
    return 0
