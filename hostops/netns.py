"""Network namespaces for tests: create one, run commands in it, remove it.

Theory of operation
-------------------
Tests that need real Linux networking (a TAP interface, a native socket that receives
what our devices send) must never touch the host's own interfaces. They create a
private network namespace with ``ip netns add``, start every process that needs it
with ``ip netns exec NAME ...`` (a TAP opened by such a process is born inside the
namespace; ``ipc://`` sockets are files and still reach across) and remove it with
``ip netns del`` — also when the test fails.

Names are ``<prefix>-<pid>-<hex>`` (``vlabtest-12345-a1b2c3``): the creating process's
pid lets :func:`sweep_stale_namespaces` remove the namespaces of runs that were killed,
and lets a leak check find the ones a test suite forgot (:func:`list_namespaces`).

Needs root (``CAP_SYS_ADMIN``) and iproute2's ``ip``; :func:`unavailable` says in one
line why namespaces cannot be used here, or returns None.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from hostops._util import pid_alive

__all__ = [
    "DEFAULT_PREFIX",
    "NetNamespace",
    "NetnsError",
    "list_namespaces",
    "sweep_stale_namespaces",
    "unavailable",
]

DEFAULT_PREFIX = "vlabtest"
_NETNS_DIR = "/run/netns"
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,15}")


class NetnsError(OSError):
    """An ``ip netns`` command failed (its stderr is in the message)."""


def _ip() -> str | None:
    return shutil.which("ip", path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin:/bin")


def unavailable() -> str | None:
    """Why network namespaces cannot be created here (one line), or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN)"
    if _ip() is None:
        return "the 'ip' command (Debian package iproute2) is not installed"
    return None


def _run(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
    )


class NetNamespace:
    """One network namespace made by :meth:`create`; :meth:`delete` (or leaving the
    ``with`` block) removes it. Processes still inside keep it alive until they exit,
    so stop them first."""

    def __init__(self, name: str, ip: str) -> None:
        self.name = name
        self._ip = ip
        self._deleted = False

    @classmethod
    def create(cls, prefix: str = DEFAULT_PREFIX) -> NetNamespace:
        """``ip netns add <prefix>-<pid>-<hex>`` and bring its loopback up.
        :class:`NetnsError` if that fails (see :func:`unavailable`)."""
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"namespace prefix must match {_PREFIX_RE.pattern}: {prefix!r}")
        ip = _ip()
        if ip is None:
            raise NetnsError(2, "the 'ip' command (iproute2) is not installed")
        name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        r = _run([ip, "netns", "add", name], 10.0)
        if r.returncode != 0:
            raise NetnsError(1, f"ip netns add {name}: {r.stderr.strip() or r.returncode}")
        ns = cls(name, ip)
        try:
            ns.run([ip, "link", "set", "lo", "up"])  # the path found above: PATH may lack sbin
        except BaseException:
            ns.delete()
            raise
        return ns

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` wrapped to run inside this namespace."""
        return [self._ip, "netns", "exec", self.name, *command]

    def run(
        self,
        command: Sequence[str],
        *,
        timeout_s: float = 10.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the namespace and wait for it (captured text output).
        With ``check``, a non-zero exit raises :class:`NetnsError` with its stderr."""
        r = subprocess.run(
            self.argv(command),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            env=None if env is None else {**os.environ, **env},
        )
        if check and r.returncode != 0:
            raise NetnsError(
                1, f"{' '.join(command)} in {self.name}: {r.stderr.strip() or r.returncode}"
            )
        return r

    def delete(self) -> None:
        """``ip netns del``. Idempotent; never raises."""
        if self._deleted:
            return
        self._deleted = True
        try:
            _run([self._ip, "netns", "del", self.name], 10.0)
        except (OSError, subprocess.SubprocessError):
            pass

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def __repr__(self) -> str:
        return f"<NetNamespace {self.name}{' deleted' if self._deleted else ''}>"


def list_namespaces(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Names of the existing namespaces made with ``prefix`` (any creator)."""
    try:
        names = os.listdir(_NETNS_DIR)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(prefix + "-"))


def sweep_stale_namespaces(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove the ``prefix`` namespaces whose creating process is dead; their names."""
    ip = _ip()
    removed: list[str] = []
    if ip is None:
        return removed
    for name in list_namespaces(prefix):
        owner = name[len(prefix) + 1 :].split("-", 1)[0]
        if not owner.isdigit() or pid_alive(int(owner)):
            continue
        try:
            r = _run([ip, "netns", "del", name], 10.0)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            removed.append(name)
    return removed
