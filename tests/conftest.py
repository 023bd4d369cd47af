"""Suite-wide guards: nothing a test starts may outlive the suite.

The session-scoped ``no_leftovers`` fixture snapshots child processes, ``/dev/shm``
segments named ``vlab-*`` and our runtime directories before the suite and fails the
run if any new one is still there at the end — normal or failed tests alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _children() -> set[int]:
    me = os.getpid()
    out: set[int] = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # field 4 is the parent pid; the comm field may contain spaces, so split after ')'
        fields = stat.rsplit(")", 1)[1].split()
        if fields and int(fields[1]) == me and fields[0] != "Z":
            out.add(int(d.name))
    return out


def _ours(owner: str) -> bool:
    """Whether a name tagged with ``owner`` (a pid) is this run's: made by this process,
    or by a process that is gone (a leak). Live processes of *other* runs on the same
    machine are none of our business."""
    if not owner.isdigit():
        return False
    pid = int(owner)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _shm() -> set[str]:
    """``/dev/shm/vlab-<pid>-*`` segments of ours."""
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return set()
    return {n for n in names if n.startswith("vlab-") and _ours(n.split("-")[1])}


def _rundirs() -> set[str]:
    """``/tmp/vlab-<uid>/<pid>-*`` runtime directories (ipc socket files) of ours."""
    base = Path(f"/tmp/vlab-{os.getuid()}")
    if not base.is_dir():
        return set()
    return {str(p) for p in base.iterdir() if _ours(p.name.split("-")[0])}


def leftovers(before: dict[str, set]) -> dict[str, set]:
    """What exists now that did not exist in ``before``."""
    now = {"processes": _children(), "shm": _shm(), "rundirs": _rundirs()}
    return {k: v - before[k] for k, v in now.items() if v - before[k]}


def snapshot() -> dict[str, set]:
    """Current child processes, vlab shm segments and runtime dirs."""
    return {"processes": _children(), "shm": _shm(), "rundirs": _rundirs()}


@pytest.fixture(scope="session", autouse=True)
def no_leftovers():
    """Fail the session if it leaves processes, shm segments or ipc files behind."""
    before = snapshot()
    yield
    left = leftovers(before)
    assert not left, f"the test suite left things behind: {left}"
