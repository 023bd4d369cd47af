"""Suite-wide guards: nothing a test starts may outlive the suite.

The session-scoped ``no_leftovers`` fixture snapshots child processes, ``/dev/shm``
segments named ``vlab-*``, our runtime directories, the network namespaces this run made
(``vlabtest-<pid>-*``, :mod:`hostops.netns`) and the TAP/TUN interfaces named ``vlt*`` or
``vlab*`` in the host's own namespace before the suite, and fails the run if any new one
is still there at the end — normal or failed tests alike. (Tests create their TAPs
inside their own namespaces; one of ours in the host namespace is a bug in itself.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostops import netns


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


def _namespaces() -> set[str]:
    """Network namespaces ``vlabtest-<pid>-<hex>`` of ours (made by this run, or by a
    run that is gone)."""
    prefix = netns.DEFAULT_PREFIX + "-"
    return {n for n in netns.list_namespaces() if _ours(n[len(prefix) :].split("-", 1)[0])}


#: Interface names our tests give TAP devices (``vlt0``, ``vltest...``, ``vlab...``).
_TAP_PREFIXES = ("vlt", "vlab")


def _host_taps() -> set[str]:
    """TUN/TAP interfaces with our names in the host's (this process's) namespace:
    ``ip -j link show type tun``. Empty without iproute2."""
    ip = shutil.which("ip", path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin:/bin")
    if ip is None:
        return set()
    try:
        r = subprocess.run(
            [ip, "-j", "link", "show", "type", "tun"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
        links = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []
    except (OSError, subprocess.SubprocessError, ValueError):
        return set()
    names = {str(link.get("ifname", "")) for link in links if isinstance(link, dict)}
    return {n for n in names if n.startswith(_TAP_PREFIXES)}


def snapshot() -> dict[str, set[Any]]:
    """Current child processes, vlab shm segments, runtime dirs, our network
    namespaces and our TAP interfaces in the host namespace."""
    return {
        "processes": _children(),
        "shm": _shm(),
        "rundirs": _rundirs(),
        "netns": _namespaces(),
        "host_taps": _host_taps(),
    }


def leftovers(before: dict[str, set[Any]]) -> dict[str, set[Any]]:
    """What exists now that did not exist in ``before``."""
    now = snapshot()
    return {k: v - before.get(k, set()) for k, v in now.items() if v - before.get(k, set())}


@pytest.fixture(scope="session", autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail the session if it leaves processes, shm segments, ipc files, network
    namespaces or host-side TAPs behind."""
    before = snapshot()
    yield
    left = leftovers(before)
    assert not left, f"the test suite left things behind: {left}"
