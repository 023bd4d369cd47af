"""A private runtime directory for ``ipc://`` endpoints.

Theory of operation
-------------------
Doorbells and control channels are ZeroMQ ``ipc://`` sockets, i.e. Unix-domain socket
files. They live in a per-run directory ``/tmp/vlab-<uid>/<pid>-<random>``:

* the per-user parent ``/tmp/vlab-<uid>`` is created ``0700`` if missing; if it exists it
  must be a real directory (not a symlink) owned by us -- otherwise we refuse, since
  another user could then watch or hijack our sockets -- and its mode is tightened to
  ``0700``;
* the run directory itself is created ``0700`` and named after the creating pid, so
  :func:`sweep_stale_rundirs` can remove the directories of runs that were SIGKILLed.

Unix socket paths are limited to 107 bytes (``sun_path``); :meth:`RuntimeDir.endpoint`
checks that limit and the name's character set up front, so a bad name fails with a clear
:class:`ValueError` instead of an obscure ZeroMQ error. :meth:`RuntimeDir.cleanup` removes
the directory and everything in it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from types import TracebackType

from hostops._util import pid_alive

__all__ = ["RuntimeDir", "sweep_stale_rundirs", "SUN_PATH_MAX"]

SUN_PATH_MAX = 107
"""Longest usable Unix-domain socket path in bytes (``sizeof(sun_path) - 1``)."""

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_RUNDIR_RE = re.compile(r"([0-9]+)-[0-9a-f]+")
_DEFAULT_BASE = "/tmp"


def _user_parent(base: str) -> str:
    return os.path.join(base, f"vlab-{os.getuid()}")


def _ensure_private_parent(parent: str) -> None:
    """Create ``parent`` 0700, or verify an existing one is ours and make it 0700."""
    try:
        os.mkdir(parent, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{parent} exists and is not a directory; refusing to use it")
    if st.st_uid != os.getuid():
        raise PermissionError(
            f"{parent} is owned by uid {st.st_uid}, not {os.getuid()}; refusing to use it"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(parent, 0o700, follow_symlinks=False)


class RuntimeDir:
    """A private 0700 directory holding the ``ipc://`` socket files of one run."""

    def __init__(self, path: str) -> None:
        self._path = path

    @classmethod
    def create(cls, base: str | None = None) -> RuntimeDir:
        """Create ``<base>/vlab-<uid>/<pid>-<random>`` (``base`` defaults to ``/tmp``)."""
        parent = _user_parent(base or _DEFAULT_BASE)
        _ensure_private_parent(parent)
        while True:
            path = os.path.join(parent, f"{os.getpid()}-{secrets.token_hex(4)}")
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:  # pragma: no cover - 32 random bits collided
                continue
            break
        os.chmod(path, 0o700)  # in case the umask was unusual
        return cls(path)

    @property
    def path(self) -> str:
        """Absolute path of the directory."""
        return self._path

    def endpoint(self, name: str) -> str:
        """Return ``"ipc://<path>/<name>"`` for a socket file named ``name``.

        ``name`` must match ``[A-Za-z0-9._-]+`` (and not be ``.`` or ``..``); the socket
        path must be shorter than 107 bytes. Both violations raise ValueError.
        """
        if not _NAME_RE.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"endpoint name must match [A-Za-z0-9._-]+, got {name!r}")
        sock_path = os.path.join(self._path, name)
        length = len(os.fsencode(sock_path))
        if length >= SUN_PATH_MAX:
            raise ValueError(
                f"socket path {sock_path!r} is {length} bytes; Unix sockets allow fewer than "
                f"{SUN_PATH_MAX} -- use a shorter endpoint name or runtime base directory"
            )
        return f"ipc://{sock_path}"

    def cleanup(self) -> None:
        """Remove the directory and everything in it. Idempotent."""
        shutil.rmtree(self._path, ignore_errors=True)

    def __enter__(self) -> RuntimeDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<RuntimeDir {self._path}>"


def sweep_stale_rundirs(base: str | None = None) -> list[str]:
    """Remove ``<base>/vlab-<uid>/<pid>-*`` directories whose ``pid`` is dead.

    Returns the removed paths. ``base`` defaults to ``/tmp``.
    """
    parent = _user_parent(base or _DEFAULT_BASE)
    removed: list[str] = []
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return removed
    st = os.lstat(parent)
    if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
        return removed
    for entry in sorted(entries):
        match = _RUNDIR_RE.fullmatch(entry)
        if match is None:
            continue
        if pid_alive(int(match.group(1))):
            continue
        path = os.path.join(parent, entry)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(path)
    return removed
