"""Child processes: launch, supervision and parent-death detection.

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
child's whole process group (which it leads), so helpers it forked go down with it; once
the leader has exited, :meth:`~SupervisedProcess.stop` SIGKILLs the group once more
*before* reaping it (while the unreaped leader pins its pid, so the number cannot have
been reused), which takes down helpers that ignored SIGTERM.

**Foreign programs** (QEMU, qemu-storage-daemon: anything that knows nothing of the
parent-watch pipe) are :class:`ForeignProcess` es, with the same calls. They get their
own session too, and ``PR_SET_PDEATHSIG`` = SIGKILL (``prctl(2)`` through ctypes, set
between fork and exec): the Linux kernel kills them when we die. The child re-checks
its parent right after the ``prctl`` and exits if we died before it took hold. Caveat of
``prctl(2)``: the "parent" is the *thread* that forked, so launch foreign programs from
a thread that outlives them (normally the main thread). stdin is ``/dev/null`` or a pipe
(:attr:`ForeignProcess.stdin`), stdout the log (appended), our stderr or a pipe
(:attr:`ForeignProcess.stdout`); stderr goes to the log or to our stderr.

Both kinds derive from :class:`SupervisedProcess`: pid, a pidfd for waits (a
:class:`~hostops.poll.Poller` can watch either), :meth:`~SupervisedProcess.alive`,
:meth:`~SupervisedProcess.wait`, :meth:`~SupervisedProcess.kill`,
:meth:`~SupervisedProcess.stop` and :meth:`~SupervisedProcess.close`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import IO

from hostops.trace import child_environment

__all__ = [
    "PARENT_FD_ENV",
    "DeviceProcess",
    "ForeignProcess",
    "ParentWatch",
    "SupervisedProcess",
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


_PR_SET_PDEATHSIG = 1
"""``prctl(2)`` option: the signal the calling process gets when its parent dies."""


@functools.lru_cache(maxsize=1)
def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up once in the parent (never between fork and exec)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl Linux
        return None


def _die_with_parent(parent_pid: int, prctl: Callable[..., int] | None) -> Callable[[], None]:
    """A ``preexec_fn`` asking for SIGKILL when ``parent_pid`` dies (``PR_SET_PDEATHSIG``)."""

    def preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the prctl took hold
            os._exit(128 + int(signal.SIGKILL))

    return preexec


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


class SupervisedProcess:
    """A supervised child process that leads a session of its own.

    What :class:`DeviceProcess` and :class:`ForeignProcess` share: the pid, a pidfd for
    waits (also what a :class:`~hostops.poll.Poller` watches), the exit status, signals
    to the whole process group, and :meth:`stop` (SIGTERM, grace, SIGKILL, reaped). Built
    by the subclasses' ``launch``. Not meant to be shared by several supervising threads
    beyond the read-only checks (:meth:`alive`, :attr:`returncode`).
    """

    #: Default grace period of :meth:`stop` between SIGTERM and SIGKILL, in seconds.
    grace_s: float = 2.0

    def __init__(self, popen: subprocess.Popen[bytes], name: str) -> None:
        self._popen = popen
        self._name = name
        self._closed = False
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (OSError, AttributeError):  # pragma: no cover - kernels before 5.3
            self._pidfd = None

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
        if not self._exited(timeout_s):
            return None
        return self._popen.wait()

    def _exited(self, timeout_s: float | None) -> bool:
        """Wait up to ``timeout_s`` for the exit *without reaping* (when a pidfd exists)."""
        if self._popen.returncode is not None:
            return True
        if self._pidfd is not None:
            return _fd_ready(self._pidfd, timeout_s)
        try:  # pragma: no cover - kernels before 5.3: reaps
            self._popen.wait(timeout_s)
        except subprocess.TimeoutExpired:  # pragma: no cover
            return False
        return True  # pragma: no cover

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

    def stop(self, timeout_s: float | None = None) -> int:
        """SIGTERM, wait up to ``timeout_s`` (None: :attr:`grace_s`), then SIGKILL; reap
        and return the code.

        Once the leader has exited, and before it is reaped, the process group gets a
        SIGKILL too, so helpers that ignored SIGTERM do not outlive it. Idempotent: once
        the child is reaped it returns the same code again.
        """
        if self._popen.returncode is not None:
            return self._popen.returncode
        self.terminate()
        if not self._exited(self.grace_s if timeout_s is None else timeout_s):
            self.kill()
            self._exited(None)
        # The leader is a zombie we have not reaped: its pid (= the group id) cannot have
        # been reused, so this reaches only what is left of its own group (not an
        # escalation: the leader itself is gone).
        self._signal(signal.SIGKILL)
        return self._popen.wait()

    def _pollable(self) -> int:
        if self._closed:
            raise ValueError(f"{type(self).__name__} {self._name} is closed")
        if self._pidfd is None:  # pragma: no cover - kernels before 5.3
            raise RuntimeError(f"pidfd_open is unavailable; {type(self).__name__} cannot be polled")
        return self._pidfd

    def _release(self) -> None:
        """Free what a subclass holds besides the pidfd (called by :meth:`close`)."""

    def close(self) -> None:
        """Stop the child (if needed) and close the pidfd and what else watches it."""
        self.stop()
        self._closed = True
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)
        self._release()

    def __enter__(self) -> SupervisedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name} pid={self.pid} {self.exit_description()}>"


class DeviceProcess(SupervisedProcess):
    """A supervised child process running a device backend.

    Build one with :meth:`launch`. Not meant to be shared by several supervising threads
    beyond the read-only checks (:meth:`alive`, :attr:`returncode`).
    """

    def __init__(self, popen: subprocess.Popen[bytes], name: str, watch_w: int) -> None:
        super().__init__(popen, name)
        self._watch_w: int | None = watch_w

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

    def _release(self) -> None:
        watch_w, self._watch_w = self._watch_w, None
        if watch_w is not None:
            os.close(watch_w)

    def __enter__(self) -> DeviceProcess:
        return self


class ForeignProcess(SupervisedProcess):
    """A supervised foreign program (QEMU, qemu-storage-daemon, any tool): own session,
    SIGKILLed by the Linux kernel when we die (``PR_SET_PDEATHSIG``), optional pipes.

    Build one with :meth:`launch`; the same calls as :class:`DeviceProcess`.
    :meth:`close` closes the stdin pipe first (the program sees EOF), then stops the
    program (SIGTERM, :attr:`grace_s`, SIGKILL, reaped) and closes the stdout pipe.
    """

    def __init__(self, popen: subprocess.Popen[bytes], name: str, grace_s: float) -> None:
        super().__init__(popen, name)
        self.grace_s = grace_s

    @classmethod
    def launch(
        cls,
        argv: list[str],
        *,
        name: str,
        log_path: str | None = None,
        stdin_pipe: bool = False,
        stdout_pipe: bool = False,
        env: Mapping[str, str] | None = None,
        grace_s: float = 2.0,
    ) -> ForeignProcess:
        """Start ``argv`` as a foreign program called ``name``.

        stdin is ``/dev/null``, or a pipe to :attr:`stdin` with ``stdin_pipe``. stdout
        goes to a pipe from :attr:`stdout` with ``stdout_pipe``, else where stderr goes;
        stderr is appended to ``log_path`` if given, else it goes to this process's
        stderr. ``env`` entries are added to (and override) the inherited environment.
        ``grace_s`` is how long :meth:`stop` (and :meth:`close`) wait after SIGTERM.
        Raises ``OSError`` (e.g. ``FileNotFoundError``) if the program cannot be run.
        """
        if not argv:
            raise ValueError("argv must not be empty")
        if grace_s < 0:
            raise ValueError(f"grace_s must not be negative: {grace_s}")
        child_env: dict[str, str] | None = None
        if env is not None:
            child_env = dict(os.environ)
            child_env.update(env)
        preexec = _die_with_parent(os.getpid(), _prctl())
        log: IO[bytes] | None = None
        try:
            if log_path is not None:
                log = open(log_path, "ab")  # handed to the child
            err: IO[bytes] | int = log if log is not None else 2  # our stderr
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else err,
                stderr=err,
                env=child_env,
                close_fds=True,
                start_new_session=True,
                preexec_fn=preexec,
            )
        finally:
            if log is not None:
                log.close()
        return cls(popen, name, grace_s)

    @property
    def stdin(self) -> IO[bytes] | None:
        """The pipe to the program's stdin (``stdin_pipe``), else None."""
        return self._popen.stdin

    @property
    def stdout(self) -> IO[bytes] | None:
        """The pipe from the program's stdout (``stdout_pipe``), else None."""
        return self._popen.stdout

    def close(self) -> None:
        """Close the stdin pipe, stop the program (if needed), close the pidfd and the
        stdout pipe. Idempotent."""
        pipe = self._popen.stdin
        if pipe is not None and not pipe.closed:
            try:
                pipe.close()
            except OSError:  # unflushed data and the program is gone (EPIPE)
                pass
        super().close()

    def _release(self) -> None:
        for pipe in (self._popen.stdin, self._popen.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except OSError:
                    pass

    def __enter__(self) -> ForeignProcess:
        return self


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
