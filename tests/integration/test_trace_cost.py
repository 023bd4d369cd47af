"""``vlab bench trace-cost``: the pure parts (round order, picking rows from a tree whose
bench has no ``--only``, medians, ratios and spread), then one real run with the
smallest settings (one round, one short blk row: real worktree of the commit before
tracing, real benchmark subprocesses) that checks the table's shape and that the
worktree is gone afterwards, and a failing run that must remove it too."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tools.errors import CliError
from tools.trace_cost import (
    CONFIGS,
    DEFAULT_BEFORE,
    format_table,
    pick_rows,
    round_order,
    summarize,
    target_of,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240


def test_rounds_rotate_the_configurations() -> None:
    assert [round_order(r) for r in range(4)] == [
        ("before", "off", "on"),
        ("off", "on", "before"),
        ("on", "before", "off"),
        ("before", "off", "on"),
    ]
    assert [target_of(r) for r in ("seqread-1m", "udp-1024", "tcp-65536")] == [
        "blk",
        "net",
        "net-tcp",
    ]


def test_rows_are_picked_from_a_full_output() -> None:
    # a tree without --only prints every row: the wanted ones are picked
    rows = [
        {"name": n, "unit": "IOPS", "virtio": v, "native": 1.0}
        for n, v in (("a", 10.0), ("b", 20.0), ("c", 30.0))
    ]
    out = "noise\n" + json.dumps({"rows": rows}) + "\n"
    assert pick_rows(out, ["c", "a"], "x") == {"c": ("IOPS", 30.0), "a": ("IOPS", 10.0)}
    with pytest.raises(CliError, match=r"x: no result for row\(s\) \['d'\]"):
        pick_rows(out, ["a", "d"], "x")
    with pytest.raises(CliError, match="x: no JSON rows"):
        pick_rows("{}\n", ["a"], "x")


def test_medians_ratios_and_spread() -> None:
    samples = {
        "r": {"before": [100.0, 200.0, 110.0], "off": [101.0, 190.0, 121.0], "on": [50.0] * 3},
        "z": {"before": [0.0], "off": [5.0], "on": [1.0]},
    }
    rows = summarize(samples, {"r": "IOPS", "z": "Mbit/s"})
    r, z = rows
    assert (r.before, r.off, r.on) == (110.0, 121.0, 50.0)
    assert (r.off_before, r.on_before) == (1.1, round(50 / 110, 4))
    assert (r.spread_min, r.spread_max) == (0.95, 1.1)
    assert r.rounds == 3
    assert (z.off_before, z.on_before, z.spread_min) == (None, None, None)
    text = format_table(rows, "abc (rev)", 3).splitlines()
    assert text[0].startswith("tracing cost: 3 interleaved round(s); before = abc (rev)")
    assert text[1].split() == [
        "row",
        "unit",
        "before",
        "off",
        "on",
        "off/before",
        "on/before",
        "off/before",
        "spread",
    ]
    assert text[3].split() == ["r", "IOPS", "110", "121", "50.00", "1.100", "0.455", "0.950-1.100"]
    assert text[4].split()[-3:] == ["-", "-", "-"]
    assert len(CONFIGS) == 3


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60
    )


def _worktrees() -> set[str]:
    r = _git("worktree", "list", "--porcelain")
    return {line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("worktree ")}


@pytest.fixture
def before_rev() -> str:
    r = _git("rev-parse", "--verify", "--quiet", f"{DEFAULT_BEFORE}^{{commit}}")
    if r.returncode != 0:
        pytest.skip(f"not a git checkout with {DEFAULT_BEFORE} (git: {r.stderr.strip()})")
    return DEFAULT_BEFORE


def _vlab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "trace-cost", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def test_one_tiny_round_gives_the_table_and_removes_the_worktree(
    tmp_path: Path, before_rev: str
) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 << 20))
    trees = _worktrees()
    r = _vlab(
        "--rounds", "1", "--seconds", "0.05", "--only", "randread-4k-qd1", "--image", str(img)
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("tracing cost: 1 interleaved round(s); before = ")
    assert before_rev in lines[0]
    assert lines[1].split()[:7] == ["row", "unit", "before", "off", "on", "off/before", "on/before"]
    assert len(lines) == 4  # head, header, rule, one row
    row = lines[3].split()
    assert row[:2] == ["randread-4k-qd1", "IOPS"] and len(row) == 8
    before, off, on = (float(x.replace(",", "")) for x in row[2:5])
    assert before > 0 and off > 0 and on > 0
    assert float(row[5]) == pytest.approx(off / before, abs=0.01)
    assert _worktrees() == trees  # the worktree is gone
    assert not list(Path(tempfile.gettempdir()).glob("vlab-trace-cost-*/before"))


def test_a_failing_run_removes_the_worktree_too(tmp_path: Path, before_rev: str) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 << 20))
    trees = _worktrees()
    r = _vlab("--rounds", "1", "--only", "no-such-row", "--image", str(img))
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlab: error: bench blk (before, round 1)"), err
    assert _worktrees() == trees
    r = _vlab("--before", "no-such-rev-h6")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "git rev-parse" in r.stderr
    assert _worktrees() == trees
