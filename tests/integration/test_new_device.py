"""``vlab new-device``: a package scaffolded into a temporary directory is installed into
this venv (``pip install --no-build-isolation --no-deps --no-index -e``: offline), found
through its entry points by ``vlab devices``, ``vlab demo --device`` and the kernel, and
passes its own generated tests; it is uninstalled again whatever happens. Also: bad
names, ids and directories, and ``vlab demo --device`` for kinds with and without a
demo, each one line and exit status 2.

Real parts only: the generated tests and the demo boot real device processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools.cli import main
from tools.newdevice import LAYOUT, names
from vdev.conformance import RULES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

VLAB = [sys.executable, "-m", "tools.cli"]
PIP = [sys.executable, "-m", "pip"]
RUN_TIMEOUT_S = 120.0


@dataclass
class Run:
    status: int
    out: str
    err: str


def _run(argv: list[str], cwd: Path, timeout: float = RUN_TIMEOUT_S) -> Run:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    return Run(p.returncode, p.stdout, p.stderr)


def _one_line_error(r: Run, status: int = 2) -> str:
    assert r.status == status, (r.status, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlab: error: "), r.err
    assert "Traceback" not in r.err + r.out
    return lines[0]


@dataclass
class Scaffolded:
    name: str
    root: Path
    dist: str


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scaffolded]:
    """A package made by ``vlab new-device``, installed editable into this venv for
    the module's tests and uninstalled at the end (also when a test failed)."""
    base = tmp_path_factory.mktemp("newdev")
    name = f"nd{os.getpid()}"  # unique: other runs may share the venv
    root = base / f"vlab-{name}"
    r = _run([*VLAB, "new-device", name, "--dir", str(root)], base)
    assert r.status == 0, r.err
    dist = names(name).dist
    try:
        r = _run([*PIP, "install", "--no-build-isolation", "--no-deps", "--no-index", "-e",
                  str(root)], base)  # fmt: skip
        assert r.status == 0, r.out + r.err
        yield Scaffolded(name, root, dist)
    finally:
        r = _run([*PIP, "uninstall", "-y", dist], base)
        assert r.status == 0, r.out + r.err
        r = _run([*PIP, "show", dist], base)
        assert r.status != 0  # gone: the venv is as it was


def test_scaffold_layout(installed: Scaffolded) -> None:
    n = names(installed.name)
    want = {p.format(pkg=n.pkg) for p in LAYOUT.values()}
    got = {str(p.relative_to(installed.root)) for p in installed.root.rglob("*") if p.is_file()}
    assert want <= got
    pyproject = (installed.root / "pyproject.toml").read_text()
    assert f'{installed.name} = "{n.pkg}.device:{n.Class}Device"' in pyproject
    assert '[project.entry-points."vlab.drivers"]' in pyproject
    assert "DEVICE_ID = 0xF1" in (installed.root / n.pkg / "device.py").read_text()
    assert "{{" not in "".join(
        p.read_text() for p in installed.root.rglob("*") if p.is_file() and p.suffix != ".pyc"
    )


def test_generated_code_is_lint_clean(installed: Scaffolded) -> None:
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed in this venv")
    assert _run([str(ruff), "check", "."], installed.root).status == 0
    r = _run([str(ruff), "format", "--check", "."], installed.root)
    assert r.status == 0, r.out


def test_vlab_devices_lists_it(installed: Scaffolded) -> None:
    r = _run([*VLAB, "devices", "--json"], installed.root)
    assert r.status == 0, r.err
    [kind] = [k for k in json.loads(r.out) if k["name"] == installed.name]
    n = names(installed.name)
    assert kind["origin"] == installed.dist and kind["error"] is None
    assert kind["target"] == f"{n.pkg}.device:{n.Class}Device"
    assert ["--queue-size"] in [o["options"] for o in kind["options"]]


def test_vlab_demo_device_runs_its_driver_demo(installed: Scaffolded) -> None:
    r = _run([*VLAB, "demo", "--device", installed.name], installed.root)
    assert r.status == 0, r.out + r.err
    prefix = names(installed.name).prefix
    assert f"device /dev/{prefix}0: kind {installed.name!r}, device id 0xf1" in r.out
    assert f"/dev/{prefix}0: write b'REVERSE hello, virtio', read b'oitriv ,olleh\\n'" in r.out
    assert "driver.echo(b'ping') -> b'ping'" in r.out
    # the device process's counters, reported through GET_METRICS
    assert re.search(r"device counters: .*echoes=1.*requests=2.*reverses=1", r.out), r.out
    assert r.out.rstrip().endswith("demo: OK")


def test_generated_tests_pass(installed: Scaffolded) -> None:
    r = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        installed.root,
        timeout=180,
    )
    summary = r.out.strip().splitlines()[-1] if r.out.strip() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}
    assert r.status == 0, r.out[-3000:] + r.err[-2000:]
    # 2 harness tests, one per conformance rule, 2 end-to-end tests
    assert counts == {"passed": 4 + len(RULES)}, summary


def test_name_taken_once_installed(installed: Scaffolded, tmp_path: Path) -> None:
    r = _run([*VLAB, "new-device", installed.name], tmp_path)
    line = _one_line_error(r)
    assert "already installed" in line and installed.dist in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["9lives"], "bad name"),
        (["My-Dev"], "bad name"),
        (["a" * 17], "bad name"),
        (["class"], "Python keyword"),
        (["blk"], "built-in device kind"),
        (["kv"], "built-in device kind"),
        (["switch"], "built-in device kind"),
        (["okname", "--device-id", "3"], "outside 0x40..0xffff"),
        (["okname", "--device-id", "0x10000"], "outside 0x40..0xffff"),
        (["okname", "--device-id", "0xF0"], "taken by the kernel driver kernel.drivers.kv"),
        (["okname", "--device-id", "zz"], "not an integer"),
        (["okname", "--dir", "no/such/parent/dir"], "no directory"),
    ],
)
def test_bad_arguments_are_one_line(
    args: list[str], expect: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        status = main(["new-device", *args])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and expect in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_refuses_an_existing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "there"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    assert main(["new-device", "okname", "--dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert "exists; will not overwrite it" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in target.iterdir()] == ["mine.txt"]


def test_default_directory_and_custom_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["new-device", "okname", "--device-id", "0x1234"]) == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "vendor device id 0x1234" in out and "vlab demo --device okname" in out
    root = tmp_path / "vlab-okname"
    assert "DEVICE_ID = 0x1234" in (root / "vlab_okname" / "device.py").read_text()
    assert "DEVICE_ID = 0x1234" in (root / "vlab_okname" / "driver.py").read_text()


def test_demo_device_of_builtin_kinds(tmp_path: Path) -> None:
    r = _run([*VLAB, "demo", "--device", "kv"], tmp_path)
    assert r.status == 0, r.out + r.err
    assert "/dev/kv0: GET colour" in r.out and "-> OK blue" in r.out
    assert re.search(r"device counters: .*puts=2", r.out), r.out
    assert r.out.rstrip().endswith("demo: OK")


def test_demo_device_rng_traced_and_console(tmp_path: Path) -> None:
    r = _run([*VLAB, "demo", "--device", "rng", "--trace"], tmp_path)
    assert r.status == 0, r.out + r.err
    assert "/dev/hwrng: read 16 bytes: " in r.out
    # the demo's two reads, each one descriptor added, popped, pushed and reaped
    for side, event in (("drv", "add"), ("dev", "pop"), ("dev", "push"), ("drv", "reap")):
        assert len(re.findall(rf"rng0\s+{side}\s+q0\s+{event}\s", r.out)) == 2, event
    assert re.search(r"trace: \d+ events", r.out) and r.out.rstrip().endswith("demo: OK")
    r = _run([*VLAB, "demo", "--device", "console"], tmp_path)
    assert r.status == 0, r.out + r.err
    assert "read back b'hello through virtio-console'" in r.out
    assert re.search(r"device counters: .*rx_bytes=28.*tx_bytes=28", r.out), r.out


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--device", "blk"], "has no demo"),
        (["--device", "nosuchkind"], "invalid choice"),
        (["--device", "no_such_module_x:Dev"], "cannot import"),
        (["--device", "kv", "--image", "x.img"], "no --image/--write"),
    ],
)
def test_demo_device_errors_are_one_line(
    args: list[str], expect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expect in err, err
