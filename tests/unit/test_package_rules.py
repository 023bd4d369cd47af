"""The package rules of DESIGN.md, enforced on the source: only ``hostops`` touches
threads, sockets, shared memory and processes; the kernel never imports device
backends; the virtqueue core is sans-IO."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOST_ONLY = {
    "zmq",
    "posix_ipc",
    "threading",
    "_thread",
    "subprocess",
    "multiprocessing",
    "mmap",
    "socket",
    "select",
    "selectors",
    "signal",
    "asyncio",
    "concurrent",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _files(pkg: str) -> list[Path]:
    files = sorted((ROOT / pkg).rglob("*.py"))
    assert files, f"no sources under {pkg}/"
    return files


@pytest.mark.parametrize("pkg", ["vdev", "kernel"])
def test_only_hostops_touches_the_host(pkg: str) -> None:
    bad = {
        str(f.relative_to(ROOT)): sorted(m for m in _imports(f) if m.split(".")[0] in HOST_ONLY)
        for f in _files(pkg)
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"host modules imported outside hostops: {bad}"


def test_virtio_core_is_sans_io() -> None:
    allowed_third_party = {"msgpack"}
    for f in _files("vdev/virtio"):
        for m in _imports(f):
            top = m.split(".")[0]
            assert top not in HOST_ONLY | {"hostops", "kernel", "os", "io"}, (f, m)
            assert top in allowed_third_party or top in _stdlib() or top == "vdev", (f, m)


def test_kernel_never_imports_device_backends() -> None:
    for f in _files("kernel"):
        for m in _imports(f):
            if m.split(".")[0] == "vdev":
                assert m == "vdev.virtio" or m.startswith("vdev.virtio."), (f, m)


def test_hostops_imports_only_stdlib_zmq_posix_ipc() -> None:
    for f in _files("hostops"):
        for m in _imports(f):
            top = m.split(".")[0]
            assert top in _stdlib() | {"zmq", "posix_ipc", "hostops"}, (f, m)


def _stdlib() -> set[str]:
    import sys

    return set(sys.stdlib_module_names) | {"__future__"}


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import threading\nfrom zmq import Context\n")
    assert {"threading", "zmq"} <= _imports(bad)
