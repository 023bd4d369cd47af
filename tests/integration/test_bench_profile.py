"""``vlab bench blk|net --profile DIR``, run for real: the ``vlab`` command in a child
process, its benchmark processes sampled by real ``py-spy record`` processes, the
profile files read back and checked (every role's files present and non-empty, the
speedscope documents well formed, the summary naming each process and functions of
our own packages), what the benchmark prints unchanged but for one last line.

Needs py-spy (the ``test`` and ``bench`` extras) and ptrace access to the benchmark's
processes (root here); without either the test skips and says why -- under
``VLAB_REQUIRE_INTEROP=1`` (CI) it fails instead.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop_require import skip_or_fail
from tools.profile import INSTALL_HINT, find_py_spy, parse_folded, top_functions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
CLI = ["-c", "import sys; from tools.cli import main; sys.exit(main())"]
RUN_TIMEOUT_S = 90
#: A function of ours in a summary line: ``  12.5%  10  Name.method (kernel/blk.py)``.
OUR_FUNCTION = re.compile(r"^ +[\d.]+% +\d+ +\S.* \((kernel|vdev|hostops)/[\w/]+\.py\)$", re.M)


def _run(
    tmp_path: Path, *args: str, python: str = sys.executable, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    run_env = dict(env if env is not None else os.environ, TMPDIR=str(tmp_path))
    run_env.pop("VLAB_DEBUG", None)
    try:
        return subprocess.run(
            [python, *CLI, *args],
            capture_output=True,
            text=True,
            env=run_env,
            cwd=str(ROOT),
            timeout=RUN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"vlab {' '.join(args)} did not finish within {RUN_TIMEOUT_S} s: {e}")


def _need_py_spy() -> None:
    if find_py_spy() is None:
        skip_or_fail(f"py-spy is not installed ({INSTALL_HINT})")


def _profiled(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``vlab bench ... --profile DIR``; skip (or fail under CI) where ptrace is
    refused."""
    _need_py_spy()
    out = tmp_path / "prof"
    run = _run(tmp_path, "bench", *args, "--profile", str(out))
    if run.returncode != 0 and "profiling needs ptrace" in run.stderr:
        skip_or_fail(f"py-spy may not read this machine's processes: {run.stderr.strip()}")
    assert run.returncode == 0, run
    return run, out


def _check_profiles(out: Path, roles: list[str]) -> str:
    """Every role's two files non-empty and well formed; returns summary.txt."""
    summary = (out / "summary.txt").read_text()
    for role in roles:
        folded = (out / f"{role}.folded.txt").read_text()
        assert folded, role
        total = 0
        for line in folded.splitlines():
            stack, count = line.rsplit(" ", 1)
            assert stack and int(count) > 0, line
            total += int(count)
        doc = json.loads((out / f"{role}.speedscope.json").read_text())
        frames = doc["shared"]["frames"]
        (prof,) = doc["profiles"]
        assert prof["type"] == "sampled" and prof["name"] == role
        assert len(prof["samples"]) == len(prof["weights"]) == len(folded.splitlines())
        assert sum(prof["weights"]) == prof["endValue"] == total
        assert all(0 <= i < len(frames) for s in prof["samples"] for i in s)
        # the summary's section of this role, with the same sample count
        m = re.search(rf"^== {re.escape(role)}: (\d+) samples$", summary, re.M)
        assert m, summary
        assert int(m.group(1)) == total, (role, summary)
    assert OUR_FUNCTION.search(summary), summary
    return summary


def test_bench_blk_profile(tmp_path):
    # the row where both processes work hardest per request (1 MiB copied on each side),
    # 0.5 s: on a busy machine py-spy gets few sampling rounds in a shorter run
    run, out = _profiled(tmp_path, "blk", "--seconds", "0.5", "--only", "seqread-1m")
    lines = run.stdout.splitlines()
    # what it prints without --profile (the settings, the table: header, rule, one row;
    # a blank line, the idle CPU line), then one line naming DIR
    assert len(lines) == 7 and lines[0].startswith("virtio-blk with 1 request queue"), lines
    assert lines[1].startswith("workload") and lines[3].startswith("seqread-1m ")
    assert lines[4] == "" and lines[5].startswith("idle "), lines
    assert lines[6].startswith("profile (kernel, vda): ") and str(out) in lines[6], lines
    assert run.stderr == "", run.stderr
    _check_profiles(out, ["kernel", "vda"])
    assert sorted(p.name for p in out.iterdir()) == [
        "kernel.folded.txt",
        "kernel.speedscope.json",
        "summary.txt",
        "vda.folded.txt",
        "vda.speedscope.json",
    ]


def test_bench_net_profile_json(tmp_path):
    run, out = _profiled(tmp_path, "net", "--seconds", "0.5", "--only", "udp-65507", "--json")
    # stdout stays one JSON object; the line naming DIR goes to stderr
    (line,) = run.stdout.splitlines()
    assert [r["name"] for r in json.loads(line)["rows"]] == ["udp-65507"]
    roles = ["kernel", "eth0", "switch", "peer-kernel", "peer-eth0"]
    assert run.stderr.startswith(f"profile ({', '.join(roles)}): "), run.stderr
    assert str(out) in run.stderr and len(run.stderr.splitlines()) == 1
    _check_profiles(out, roles)


def test_bench_profile_dir_is_a_file(tmp_path):
    _need_py_spy()
    f = tmp_path / "file"
    f.write_text("x")
    for target in (f, f / "sub"):
        run = _run(tmp_path, "bench", "blk", "--seconds", "0.05", "--profile", str(target))
        assert run.returncode == 2, run
        assert run.stdout == "", run  # refused before the run
        (err,) = run.stderr.splitlines()
        assert err.startswith("vlab: error: --profile: ") and str(target) in err, err
        assert "Traceback" not in run.stderr


def test_bench_profile_without_py_spy(tmp_path):
    """A Python whose bin directory has no py-spy, with no py-spy on PATH: one line
    saying how to install it, exit 2, before any benchmark runs."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    python = bindir / "python3"
    python.symlink_to(os.path.realpath(sys.executable))
    env = dict(os.environ)
    env["PATH"] = str(bindir)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *site.getsitepackages()])
    for net in (False, True):
        args = ["net", "--only", "udp-64"] if net else ["blk"]
        run = _run(
            tmp_path, "bench", *args, "--profile", str(tmp_path / "p"), python=str(python), env=env
        )
        assert run.returncode == 2, run
        assert run.stdout == "", run
        assert run.stderr == f"vlab: error: --profile needs py-spy: {INSTALL_HINT}\n", run
        assert not (tmp_path / "p").exists()


def test_summary_counts_own_time_by_function():
    """The summary's arithmetic on known collapsed stacks: own time is the innermost
    frame's, summed over its lines; malformed lines are skipped."""
    stacks = parse_folded(
        "main (a.py:1);f (kernel/x.py:3) 5\n"
        "main (a.py:1);f (kernel/x.py:4) 2\n"
        "main (a.py:1);g (vdev/y.py:9);f (kernel/x.py:3) 1\n"
        "main (a.py:1);g (vdev/y.py:9) 4\n"
        "no count here\n"
        "main (a.py:1) x\n"
    )
    assert sum(stacks.values()) == 12
    assert top_functions(stacks) == [("f (kernel/x.py)", 8), ("g (vdev/y.py)", 4)]
    assert top_functions(stacks, 1) == [("f (kernel/x.py)", 8)]
