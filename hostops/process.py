"""Device processes: launch, supervision and parent-death detection.

Theory of operation
-------------------
Every device backend runs in a process of its own, started by the kernel with
:meth:`DeviceProcess.launch`. Two one-way signals tie the two processes' lifetimes
together without any polling or guessing:

* **Kernel learns of device death** through a *pidfd* (``os.pidfd_open``): it becomes
  readable the moment the child exits, so a :class:`~hostops.poll.Poller` that watches a
  :class:`DeviceProcess` wakes up immediately on a crash or SIGKILL. :meth:`alive` is a
  non-blocking check of the same fd.
* **Device learns of kernel death** through a *parent-watch pipe*: before launching, the
  parent creates a pipe, passes the read end to the child (``pass_fds``; its number is in
  the environment variable ``VLAB_PARENT_FD``) and keeps the write end open without ever
  writing. The write end is close-on-exec and held only by the parent, so when the parent
  dies -- however it dies -- the kernel closes it and the child's read end reports EOF.
  The child wraps this in :class:`ParentWatch` (:meth:`ParentWatch.from_env`).

The child gets its own session (``start_new_session=True``), so a Ctrl-C typed at the
terminal reaches only the kernel, which then shuts its devices down in order.
stdin is ``/dev/null``; stdout and stderr go to ``log_path`` (appended) or to the
parent's stderr. :meth:`DeviceProcess.stop` is SIGTERM, a grace period, then SIGKILL, and
always reaps the child, so no zombie and no orphan is left behind. Signals are sent to the
child's whole process group (which it leads), so helpers it forked go down with it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import IO

from hostops.trace import child_environment

__all__ = [
    "PARENT_FD_ENV",
    "DeviceProcess",
    "ParentWatch",
    "python_argv",
    "describe_returncode",
]

PARENT_FD_ENV = "VLAB_PARENT_FD"
"""Environment variable carrying the child's end of the parent-watch pipe."""


def _fd_ready(fd: int, timeout_s: float | None) -> bool:
    """True if ``fd`` is readable or hung up within ``timeout_s`` (None: forever)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000 + 0.999))
    return bool(poller.poll(timeout_ms))


def describe_returncode(returncode: int | None) -> str:
    """Human description of a :class:`subprocess.Popen` return code."""
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class DeviceProcess:
    """A supervised child process running a device backend.

    Build one with :meth:`launch`. Not meant to be shared by several supervising threads
    beyond the read-only checks (:meth:`alive`, :attr:`returncode`).
    """

    def __init__(self, popen: subprocess.Popen[bytes], name: str, watch_w: int) -> None:
        self._popen = popen
        self._name = name
        self._watch_w: int | None = watch_w
        self._closed = False
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (OSError, AttributeError):  # pragma: no cover - kernels before 5.3
            self._pidfd = None

    @classmethod
    def launch(
        cls,
        argv: list[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> DeviceProcess:
        """Start ``argv`` as a device process called ``name``.

        ``env`` entries are added to (and override) the inherited environment;
        ``VLAB_PARENT_FD`` is always set, and so is the trace destination when this
        process traces (:func:`hostops.trace.child_environment`). Output is appended to
        ``log_path`` if given, otherwise it goes to this process's stderr. ``pass_fds``
        are inherited by the child under the same numbers (e.g. a memfd it maps).
        """
        if not argv:
            raise ValueError("argv must not be empty")
        child_env = dict(os.environ)
        child_env.update(child_environment(name))
        if env is not None:
            child_env.update(env)
        watch_r, watch_w = os.pipe()  # both close-on-exec; pass_fds re-enables watch_r
        child_env[PARENT_FD_ENV] = str(watch_r)
        log: IO[bytes] | None = None
        try:
            if log_path is not None:
                log = open(log_path, "ab")  # handed to the child
            out: IO[bytes] | int = log if log is not None else 2  # our stderr
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env,
                close_fds=True,
                pass_fds=(watch_r, *pass_fds),
                start_new_session=True,
            )
        except BaseException:
            os.close(watch_w)
            raise
        finally:
            os.close(watch_r)
            if log is not None:
                log.close()
        return cls(popen, name, watch_w)

    # -- state ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The child's pid (also its process-group and session id)."""
        return self._popen.pid

    @property
    def name(self) -> str:
        """The name given at launch."""
        return self._name

    @property
    def returncode(self) -> int | None:
        """Exit status once reaped (negative: killed by that signal), else None."""
        return self._popen.returncode

    def alive(self) -> bool:
        """Non-blocking: True while the child has not exited (reaps it once it has)."""
        if self._popen.returncode is not None:
            return False
        if self._pidfd is not None:
            if not _fd_ready(self._pidfd, 0):
                return True
            self._popen.wait()
            return False
        return self._popen.poll() is None

    def wait(self, timeout_s: float | None) -> int | None:
        """Wait up to ``timeout_s`` (None: forever) for exit; return the code or None."""
        if self._popen.returncode is not None:
            return self._popen.returncode
        if self._pidfd is not None:
            if not _fd_ready(self._pidfd, timeout_s):
                return None
            return self._popen.wait()
        try:
            return self._popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def exit_description(self) -> str:
        """E.g. ``"exited with status 3"``, ``"killed by SIGKILL"`` or ``"running"``."""
        return describe_returncode(self._popen.returncode)

    # -- control ----------------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        if self._popen.returncode is not None:
            return  # reaped: the pid may already belong to someone else
        try:
            os.killpg(self._popen.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - the child changed its group
            self._popen.send_signal(sig)

    def terminate(self) -> None:
        """Send SIGTERM to the child's process group (no-op once reaped)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL to the child's process group (no-op once reaped)."""
        self._signal(signal.SIGKILL)

    def stop(self, timeout_s: float = 2.0) -> int:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; reap and return the code.

        Idempotent: once the child is reaped it returns the same code again.
        """
        if self._popen.returncode is not None:
            return self._popen.returncode
        self.terminate()
        code = self.wait(timeout_s)
        if code is None:
            self.kill()
            code = self._popen.wait()
        return code

    def _pollable(self) -> int:
        if self._closed:
            raise ValueError(f"DeviceProcess {self._name} is closed")
        if self._pidfd is None:  # pragma: no cover - kernels before 5.3
            raise RuntimeError("pidfd_open is unavailable; DeviceProcess cannot be polled")
        return self._pidfd

    def close(self) -> None:
        """Stop the child (if needed) and close the pidfd and the parent-watch pipe."""
        self.stop()
        self._closed = True
        pidfd, self._pidfd = self._pidfd, None
        watch_w, self._watch_w = self._watch_w, None
        for fd in (pidfd, watch_w):
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> DeviceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DeviceProcess {self._name} pid={self.pid} {self.exit_description()}>"


class ParentWatch:
    """Child side of the parent-watch pipe: tells a device process its parent died."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._ppid = os.getppid()

    @classmethod
    def from_env(cls) -> ParentWatch | None:
        """Adopt the fd named by ``VLAB_PARENT_FD``; None if unset or not a valid fd."""
        value = os.environ.get(PARENT_FD_ENV)
        if value is None:
            return None
        try:
            fd = int(value)
            os.fstat(fd)
        except (ValueError, OSError):
            return None
        os.set_inheritable(fd, False)  # our own children must not hold it
        return cls(fd)

    @property
    def fd(self) -> int | None:
        """The watched fd, or None once closed."""
        return self._fd

    def parent_gone(self) -> bool:
        """Non-blocking: True if the parent has died (pipe EOF or re-parented)."""
        if self._fd is not None and _fd_ready(self._fd, 0):
            return True
        return os.getppid() != self._ppid

    def wait(self, timeout_s: float | None) -> bool:
        """Block up to ``timeout_s`` (None: forever) for the parent to die; return it."""
        if self._fd is None:
            return self.parent_gone()
        return _fd_ready(self._fd, timeout_s) or self.parent_gone()

    def _pollable(self) -> int:
        if self._fd is None:
            raise ValueError("ParentWatch is closed")
        return self._fd

    def close(self) -> None:
        """Close the fd. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def python_argv(module: str, *args: str) -> list[str]:
    """Return ``[sys.executable, "-m", module, *args]``."""
    return [sys.executable, "-m", module, *args]
