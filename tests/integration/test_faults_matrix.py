"""``vlab faults matrix``: every built-in fault kind against the blk and net workloads,
with a fixed seed. The built-in drivers must show no data-lost, hang or kernel-crash
row, and every row's fault must really have fired (a row whose fault never fired would
prove nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tools import faults_matrix as fm
from vdev.virtio.faults import ACTIONS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SEED = 7
BAD = ("data-lost", "hang", "kernel-crash")


def _vlab(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_the_catalogue_covers_every_action_of_the_plan_format() -> None:
    assert {k.name for k in fm.KINDS} == set(ACTIONS)
    assert len(fm.KINDS) >= 30
    for name, workload in fm.rows_for("both"):
        plan = fm.plan_for(fm._BY_NAME[name], workload, SEED)
        assert plan["seed"] == SEED and len(plan["rules"]) == 1


@pytest.mark.parametrize("workload", ["blk", "net"])
def test_matrix_shows_nothing_lost_hung_or_crashed(workload: str) -> None:
    result = fm.run_matrix(workload, seed=SEED, jobs=2, timeout_s=120.0)
    rows = result["rows"]
    assert {r["fault"] for r in rows} == {k.name for k in fm.KINDS if workload in k.workloads}
    report = fm.render(result)
    bad = [r for r in rows if r["outcome"] in BAD]
    assert not bad, report
    silent = [r["fault"] for r in rows if r["fired"] < 1]
    assert not silent, f"faults that never fired: {silent}\n{report}"
    for r in rows:
        assert r["outcome"] in fm.OUTCOMES
        assert r["requests_affected"] >= 0 and r["recovery_ms"] >= 0
        if r["outcome"] == "clean-error":
            assert r["errors"], r  # a clean error names what the caller saw


def test_cli_json_shape_and_exit_status() -> None:
    r = _vlab(
        "faults",
        "matrix",
        "--workload",
        "blk",
        "--only",
        "ioerr,crash",
        "--seed",
        str(SEED),
        "--json",
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["seed"] == SEED
    assert [(x["fault"], x["workload"]) for x in doc["rows"]] == [
        ("ioerr", "blk"),
        ("crash", "blk"),
    ]
    for row in doc["rows"]:
        assert set(row) >= {"fault", "workload", "outcome", "requests_affected", "recovery_ms"}
    by = {x["fault"]: x for x in doc["rows"]}
    assert by["ioerr"]["outcome"] == "clean-error"  # the device said IOERR: the caller is told
    assert by["crash"]["outcome"] == "survived"  # restarted, resubmitted
    assert "2/2" in r.stderr  # the progress bar


def test_cli_refuses_bad_arguments_in_one_line() -> None:
    for args in (["--only", "nope"], ["--workload", "disk"], ["--seeds", "0"]):
        r = _vlab("faults", "matrix", *args)
        assert r.returncode == 2, args
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_faults_check_shows_a_plan_and_refuses_a_bad_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "plan.toml"
    good.write_text(
        'seed = 9\n[[rules]]\nname = "tear"\n'
        'when = { event = "blk.write", sector = [0, 63], nth = 3 }\n'
        'what = { action = "torn_write", sectors = 1 }\nset_state = "broken"\n'
    )
    r = _vlab("faults", "check", str(good))
    assert r.returncode == 0, r.stderr
    assert "1 rules, seed 9" in r.stdout and "tear: blk.write -> torn_write" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[rules]]\nwhen = { event = "blk.write", probability = 1.5 }\n'
        'what = { action = "ioerr" }\n'
    )
    r = _vlab("faults", "check", str(bad))
    assert r.returncode == 2
    assert "rule #0: when.probability" in r.stderr and r.stderr.count("\n") == 1
