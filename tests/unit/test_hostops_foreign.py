"""Unit tests for :class:`hostops.process.ForeignProcess` with real foreign children
(``sleep``, ``sh`` scripts, ``cat`` through pipes, a Python parent of a grandchild).

Every wait is on a pidfd or a pipe with a deadline -- never a sleep.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostops import Poller
from hostops.process import ForeignProcess, SupervisedProcess

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 10.0  # a deadline for things that happen at once; never reached when all is well


@pytest.fixture
def procs() -> Iterator[list[ForeignProcess]]:
    """Every ForeignProcess a test starts goes here; all are closed after."""
    started: list[ForeignProcess] = []
    yield started
    for proc in started:
        proc.close()
        assert not proc.alive()


def _launch(procs: list[ForeignProcess], argv: list[str], **kw: object) -> ForeignProcess:
    proc = ForeignProcess.launch(argv, name=os.path.basename(argv[0]), **kw)  # type: ignore[arg-type]
    procs.append(proc)
    return proc


def _read_until(proc: ForeignProcess, size: int) -> bytes:
    """Read ``size`` bytes from the program's stdout pipe (bounded by :data:`WAIT_S`)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    got = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    while len(got) < size:
        assert poller.poll(int(WAIT_S * 1000)), f"no output within {WAIT_S} s (got {got!r})"
        chunk = os.read(fd, size - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _read_line(proc: ForeignProcess) -> bytes:
    """Read one line (bounded) from the program's stdout pipe, byte by byte."""
    line = b""
    for _ in range(4096):  # bounded: lines in these tests are short
        ch = _read_until(proc, 1)
        if not ch:
            break
        line += ch
        if ch == b"\n":
            break
    return line


def _exits(pidfd: int, timeout_s: float = WAIT_S) -> bool:
    """True once the process behind ``pidfd`` (any process, not only a child) exits."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(int(timeout_s * 1000)))


# -- lifecycle ------------------------------------------------------------------------


def test_sleep_runs_in_its_own_session_until_stopped(procs: list[ForeignProcess]) -> None:
    proc = _launch(procs, ["sleep", "1000"])
    assert isinstance(proc, SupervisedProcess)
    assert proc.name == "sleep"
    assert proc.alive() and proc.returncode is None
    assert os.getsid(proc.pid) == proc.pid and os.getpgid(proc.pid) == proc.pid
    assert proc.wait(0) is None
    assert proc.exit_description() == "running"
    assert proc.stop() == -signal.SIGTERM
    assert not proc.alive()
    assert proc.returncode == -signal.SIGTERM
    assert proc.exit_description() == "killed by SIGTERM"
    assert proc.stop() == -signal.SIGTERM  # idempotent
    assert "ForeignProcess sleep" in repr(proc)
    proc.close()
    proc.close()  # idempotent
    proc.kill()  # a no-op once reaped


def test_exit_status_is_reported(procs: list[ForeignProcess]) -> None:
    proc = _launch(procs, ["sh", "-c", "exit 3"])
    assert proc.wait(WAIT_S) == 3
    assert proc.returncode == 3 and proc.exit_description() == "exited with status 3"


def test_kill_sends_sigkill(procs: list[ForeignProcess]) -> None:
    proc = _launch(procs, ["sleep", "1000"])
    proc.kill()
    assert proc.wait(WAIT_S) == -signal.SIGKILL


def test_sigterm_ignored_means_sigkill_after_the_grace(procs: list[ForeignProcess]) -> None:
    # exec keeps the ignored disposition, so the sleep ignores SIGTERM too
    script = "trap '' TERM; echo ready; exec sleep 1000"
    proc = _launch(procs, ["sh", "-c", script], stdout_pipe=True, grace_s=0.1)
    assert proc.grace_s == 0.1
    assert _read_line(proc) == b"ready\n"
    assert proc.stop() == -signal.SIGKILL


def test_stop_kills_group_stragglers_that_ignore_sigterm(procs: list[ForeignProcess]) -> None:
    # A helper in the program's process group ignores SIGTERM and outlives the leader;
    # stop() SIGKILLs the group again before it reaps the leader.
    script = "sh -c 'trap \"\" TERM; echo $$; exec sleep 1000' & exec sleep 1000"
    proc = _launch(procs, ["sh", "-c", script], stdout_pipe=True)
    helper = int(_read_line(proc))  # printed after its trap is in place
    assert os.getpgid(helper) == proc.pid
    pidfd = os.pidfd_open(helper)
    try:
        assert not _exits(pidfd, 0)
        assert proc.stop() == -signal.SIGTERM  # the leader took the SIGTERM
        assert _exits(pidfd), "the helper outlived stop()"
    finally:
        os.close(pidfd)


# -- pipes and logs -------------------------------------------------------------------


def test_cat_through_pipes(procs: list[ForeignProcess]) -> None:
    proc = _launch(procs, ["cat"], stdin_pipe=True, stdout_pipe=True)
    assert proc.stdin is not None and proc.stdout is not None
    data = b"hello\n" + bytes(range(256)) * 64  # more than one pipe read
    proc.stdin.write(data)
    proc.stdin.flush()
    assert _read_until(proc, len(data)) == data
    proc.stdin.close()  # EOF: cat exits by itself
    assert proc.wait(WAIT_S) == 0
    assert _read_until(proc, 1) == b""
    proc.close()
    assert proc.stdout.closed


def test_close_gives_eof_on_stdin_first(procs: list[ForeignProcess]) -> None:
    # the program ignores SIGTERM and exits 0 on EOF: close() closes stdin before it
    # signals, so the program ends by itself (status 0) well within the grace period
    script = "trap '' TERM; echo ready; exec cat"
    proc = _launch(procs, ["sh", "-c", script], stdin_pipe=True, stdout_pipe=True, grace_s=20)
    assert _read_line(proc) == b"ready\n"  # the trap is in place
    proc.close()
    assert proc.returncode == 0


def test_stdin_is_dev_null_by_default(procs: list[ForeignProcess]) -> None:
    proc = _launch(procs, ["cat"])  # reads /dev/null: EOF at once
    assert proc.stdin is None and proc.stdout is None
    assert proc.wait(WAIT_S) == 0


def test_log_is_appended_with_stdout_and_stderr(
    procs: list[ForeignProcess], tmp_path: Path
) -> None:
    log = tmp_path / "prog.log"
    log.write_text("earlier\n")
    for n in (1, 2):
        proc = _launch(procs, ["sh", "-c", f"echo out{n}; echo err{n} >&2"], log_path=str(log))
        assert proc.wait(WAIT_S) == 0
    assert log.read_text() == "earlier\nout1\nerr1\nout2\nerr2\n"


def test_stdout_pipe_and_stderr_log(procs: list[ForeignProcess], tmp_path: Path) -> None:
    log = tmp_path / "prog.log"
    proc = _launch(
        procs,
        ["sh", "-c", 'echo "out $VLAB_TEST_FOREIGN"; echo err >&2'],
        log_path=str(log),
        stdout_pipe=True,
        env={"VLAB_TEST_FOREIGN": "42"},
    )
    assert _read_line(proc) == b"out 42\n"
    assert proc.wait(WAIT_S) == 0
    assert log.read_text() == "err\n"


# -- waits ----------------------------------------------------------------------------


def test_a_poller_wakes_when_the_program_exits(procs: list[ForeignProcess]) -> None:
    proc = _launch(procs, ["cat"], stdin_pipe=True)
    poller = Poller()
    poller.register(proc)
    try:
        assert poller.poll(0) == []
        assert proc.stdin is not None
        proc.stdin.close()
        assert poller.poll(WAIT_S) == [proc]
    finally:
        poller.unregister(proc)
    assert proc.wait(0) == 0
    proc.close()
    with pytest.raises(ValueError, match="closed"):
        proc._pollable()


# -- bad input ------------------------------------------------------------------------


def test_bad_launches_raise_precise_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="argv"):
        ForeignProcess.launch([], name="nothing")
    with pytest.raises(ValueError, match="grace_s"):
        ForeignProcess.launch(["true"], name="true", grace_s=-1)
    with pytest.raises(FileNotFoundError):
        ForeignProcess.launch([str(tmp_path / "no-such-program")], name="missing")


# -- dying with the parent ------------------------------------------------------------

_PARENT = """
import sys
from hostops.process import ForeignProcess
child = ForeignProcess.launch(["sleep", "1000"], name="grandchild")
print(child.pid, flush=True)
sys.stdin.read()  # until the test closes the pipe or kills us
"""


def test_pdeathsig_kills_the_program_when_its_parent_dies(procs: list[ForeignProcess]) -> None:
    parent = _launch(
        procs,
        [sys.executable, "-c", _PARENT],
        stdin_pipe=True,
        stdout_pipe=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    grandchild = int(_read_line(parent))
    assert os.getsid(grandchild) == grandchild  # not in the parent's group: only
    pidfd = os.pidfd_open(grandchild)  # PR_SET_PDEATHSIG can take it down
    try:
        assert not _exits(pidfd, 0)
        parent.kill()  # no chance to clean up
        assert parent.wait(WAIT_S) == -signal.SIGKILL
        assert _exits(pidfd), "the grandchild outlived its parent"
    finally:
        os.close(pidfd)
