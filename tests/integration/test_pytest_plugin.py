"""The pytest plugin shipped with the package (entry point ``pytest11``): marker,
fixtures, the seed in a failing test's report, and replay with ``--vlab-seed``.

Each case writes a small test file and runs pytest on it in a subprocess of this venv,
with the plugin loaded through its entry point (as any user's suite would get it)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, body: str, *args: str) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_user.py"
    test.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_plugin_is_an_installed_entry_point() -> None:
    names = {ep.value for ep in entry_points(group="pytest11")}
    assert "tools.pytest_plugin" in names


PLAN_TEST = """
    import os
    import pytest

    PLAN = {"rules": [{"name": "second-write", "when": {"event": "blk.write", "nth": 2},
                       "what": {"action": "ioerr"}}]}

    @pytest.mark.vlab_faults(PLAN, seed=41)
    def test_second_write_fails(vlab_kernel, fault_plan):
        assert fault_plan.seed == 41
        fd = vlab_kernel.sys.open("/dev/vda", os.O_RDWR)
        assert vlab_kernel.sys.pwrite(fd, b"a" * 512, 0) == 512
        with pytest.raises(OSError) as e:
            vlab_kernel.sys.pwrite(fd, b"b" * 512, 512)
        assert e.value.errno == 5
        assert vlab_kernel.sys.pwrite(fd, b"c" * 512, 1024) == 512
        assert vlab_kernel.sys.pread(fd, 512, 0) == b"a" * 512
        vlab_kernel.sys.close(fd)
        fired = vlab_kernel.devices[0].metrics()["device"]["faults_fired"]
        assert fired == 1

    def test_without_marker(vlab_kernel, fault_plan):
        assert fault_plan is None
        fd = vlab_kernel.sys.open("/dev/vda", os.O_RDWR)
        assert vlab_kernel.sys.pwrite(fd, b"x" * 512, 0) == 512
        vlab_kernel.sys.close(fd)
"""


def test_marker_and_fixtures_inject_the_plan(tmp_path: Path) -> None:
    r = _run(tmp_path, PLAN_TEST)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed" in r.stdout


FAILING = """
    import pytest

    @pytest.mark.vlab_faults({"rules": [{"when": {"event": "blk.read", "probability": 0.5},
                                          "what": {"action": "ioerr"}}]})
    def test_fails(fault_plan):
        print("SEED", fault_plan.seed)
        assert False, "deliberate"
"""


def test_a_failure_reports_its_seed_and_replays(tmp_path: Path) -> None:
    r = _run(tmp_path, FAILING)
    assert r.returncode == 1
    seeds = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("SEED ")]
    assert len(seeds) == 1
    seed = seeds[0]
    assert f"seed {seed} (replay: pytest --vlab-seed {seed}" in r.stdout
    again = _run(tmp_path, FAILING, "--vlab-seed", "12345")
    assert "SEED 12345" in again.stdout
    assert "seed 12345 (replay: pytest --vlab-seed 12345" in again.stdout


def test_a_bad_plan_fails_at_setup_with_the_rule_and_field(tmp_path: Path) -> None:
    r = _run(
        tmp_path,
        """
        import pytest

        @pytest.mark.vlab_faults({"rules": [{"name": "p", "when": {"event": "blk.read",
                                             "probability": 1.5}, "what": {"action": "ioerr"}}]})
        def test_x(fault_plan):
            pass
        """,
    )
    assert r.returncode == 1
    assert "rule 'p' (#0): when.probability" in r.stdout
    assert "Traceback" not in r.stdout
