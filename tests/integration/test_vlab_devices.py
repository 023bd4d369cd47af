"""``vlab devices``: the installed device kinds with their origin, class, help and
options, as a table and as JSON; kinds of installed packages (real ``vlab.devices``
entry points of a distribution put on ``PYTHONPATH``), one of which does not import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tools.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]


def _by_name(listing: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k["name"]: k for k in listing}


def _option(kind: dict[str, Any], flag: str) -> dict[str, Any]:
    [opt] = [o for o in kind["options"] if flag in o["options"]]
    return opt


def test_json_lists_builtins_with_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--json"]) == 0
    kinds = _by_name(json.loads(capsys.readouterr().out))
    assert {"blk", "net", "rng", "console"} <= set(kinds)
    for k in kinds.values():
        assert set(k) == {"name", "origin", "target", "help", "options", "error"}
        for o in k["options"]:
            assert set(o) == {"options", "metavar", "default", "help"}
    for name in ("blk", "net", "rng", "console"):
        assert kinds[name]["origin"] == "built-in" and kinds[name]["error"] is None
        assert kinds[name]["help"]
    assert kinds["rng"]["target"] == "vdev.examples.rng:RngDevice"
    assert _option(kinds["rng"], "--seed")["metavar"] == "N"
    assert _option(kinds["rng"], "--queue-size")["default"] == 256
    assert kinds["console"]["target"] == "vdev.examples.console:ConsoleDevice"
    assert {"--echo", "--stdio", "--pty", "--buffer"} <= {
        f for o in kinds["console"]["options"] for f in o["options"]
    }
    assert _option(kinds["blk"], "--image")["metavar"] == "PATH"
    assert _option(kinds["net"], "--backend")["metavar"] == "NAME"
    assert _option(kinds["net"], "--mtu")["default"] == 1500
    every = {f for k in kinds.values() for o in k["options"] for f in o["options"]}
    assert "--control" not in every and "--vhost-user" not in every


def test_table_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["kind", "origin", "class", "help"]
    table = lines[2 : lines.index("", 2)]  # the kinds, up to the blank line
    rows = {line.split()[0]: line.split() for line in table}
    assert {"blk", "net", "rng", "console", "kv"} <= set(rows)
    assert rows["console"][1:3] == ["built-in", "vdev.examples.console:ConsoleDevice"]
    assert rows["rng"][1:3] == ["built-in", "vdev.examples.rng:RngDevice"]
    assert "--seed" in out and "deterministic bytes from this seed" in out
    assert "Traceback" not in out


def _fake_distribution(root: Path) -> None:
    """A distribution ``fake-devices`` declaring two kinds: one that works (the rng
    class under another name) and one whose module does not exist."""
    info = root / "fake_devices-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-devices\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[vlab.devices]\n"
        "myrng = vdev.examples.rng:RngDevice\n"
        "broken = no_such_module_for_vlab:Device\n"
    )


def _vlab(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=30,
    )


def test_entry_point_kinds_and_a_broken_one(tmp_path: Path) -> None:
    _fake_distribution(tmp_path)
    run = _vlab(["devices", "--json"], tmp_path)
    assert run.returncode == 0, run.stderr
    kinds = _by_name(json.loads(run.stdout))
    assert kinds["myrng"]["origin"] == "fake-devices" and kinds["myrng"]["error"] is None
    assert _option(kinds["myrng"], "--seed")["metavar"] == "N"
    broken = kinds["broken"]
    assert broken["origin"] == "fake-devices" and broken["options"] == []
    assert "no_such_module_for_vlab" in broken["error"] and "\n" not in broken["error"]
    assert kinds["rng"]["error"] is None  # one broken package hides nothing else

    table = _vlab(["devices"], tmp_path)
    assert table.returncode == 0 and "Traceback" not in table.stdout + table.stderr
    row, detail = [ln for ln in table.stdout.splitlines() if ln.startswith("broken ")]
    assert "fake-devices" in row and "cannot import no_such_module_for_vlab" in row
    assert "cannot be loaded" in detail
