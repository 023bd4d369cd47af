"""Integration tests for hostops with real child processes (``python -c`` children).

Children report progress by ringing a doorbell the test listens on, so every wait is a
poll with a deadline -- never a sleep.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostops import (
    PARENT_FD_ENV,
    DeviceProcess,
    DoorbellListener,
    Poller,
    RuntimeDir,
    SharedRegion,
    Waker,
)

pytestmark = [pytest.mark.timeout(30), pytest.mark.integration]

READY, OK, FAIL = 1, 2, 3


@pytest.fixture
def rundir() -> Iterator[RuntimeDir]:
    rd = RuntimeDir.create()
    yield rd
    rd.cleanup()
    assert not os.path.exists(rd.path)


@pytest.fixture
def bell(rundir: RuntimeDir) -> Iterator[DoorbellListener]:
    listener = DoorbellListener(rundir.endpoint("test-bell"))
    yield listener
    listener.close()


@pytest.fixture
def procs() -> Iterator[list[DeviceProcess]]:
    """Every DeviceProcess a test starts goes here; all are stopped and closed after."""
    started: list[DeviceProcess] = []
    yield started
    for proc in started:
        proc.close()
        assert not proc.alive()


def _child(code: str) -> list[str]:
    """argv running ``code`` with a doorbell ``bell`` connected to env ``BELL``."""
    prelude = "import os, sys\nfrom hostops import Doorbell\nbell = Doorbell(os.environ['BELL'])\n"
    return [sys.executable, "-c", prelude + textwrap.dedent(code)]


def _expect(listener: DoorbellListener, want: int, timeout_s: float = 15) -> list[int]:
    """Wait until doorbell index ``want`` arrives; return everything received."""
    got: list[int] = []
    deadline = time.monotonic() + timeout_s
    while want not in got:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"doorbell {want} not received within {timeout_s}s (got {got})"
        got += listener.wait(remaining)
    return got


def _launch(
    procs: list[DeviceProcess],
    code: str,
    bell: DoorbellListener,
    tmp_path: Path,
    env: dict[str, str] | None = None,
) -> DeviceProcess:
    proc = DeviceProcess.launch(
        _child(code),
        name="child",
        env={"BELL": bell.endpoint, **(env or {})},
        log_path=str(tmp_path / "child.log"),
    )
    procs.append(proc)
    return proc


# -- shared memory across processes -------------------------------------------------------


def test_region_shared_with_child_then_unlinked(
    bell: DoorbellListener, procs: list[DeviceProcess], tmp_path: Path
) -> None:
    region = SharedRegion.create(3 * 4096, tag="xproc")
    try:
        region.buf[0:5] = b"hello"
        code = f"""
        from hostops import SharedRegion
        r = SharedRegion.attach({region.name!r}, {region.size})
        ok = bytes(r.buf[0:5]) == b"hello"
        r.buf[3 * 4096 - 5:] = b"world"
        bell.ring(1)  # mapped: the creator may unlink now
        bell.ring(2 if ok else 3)
        import signal
        signal.pause()  # a doorbell rung just before exit could be lost: stay alive
        """
        proc = _launch(procs, code, bell, tmp_path)
        got = _expect(bell, OK)
        assert FAIL not in got and READY in got
        region.unlink()  # the leak-proof rule: unlink once the peer has it mapped
        assert not os.path.exists("/dev/shm" + region.name)
        assert bytes(region.buf[3 * 4096 - 5 :]) == b"world"
        assert proc.alive()
        assert proc.stop(10) == -signal.SIGTERM
    finally:
        region.unlink()
        region.close()


# -- DeviceProcess ----------------------------------------------------------------------


def test_launch_env_log_session_and_exit_status(
    bell: DoorbellListener, procs: list[DeviceProcess], tmp_path: Path
) -> None:
    code = f"""
    from hostops import ParentWatch
    pw = ParentWatch.from_env()
    print("X=" + os.environ["X"], "gone=" + str(pw.parent_gone()), flush=True)
    print("stdin=" + repr(sys.stdin.read()), flush=True)
    print("to-stderr", file=sys.stderr, flush=True)
    print("fd=" + os.environ[{PARENT_FD_ENV!r}], flush=True)
    raise SystemExit(3)
    """
    proc = _launch(procs, code, bell, tmp_path, env={"X": "42"})
    assert proc.name == "child" and proc.pid > 0
    assert os.getsid(proc.pid) == proc.pid  # own session: Ctrl-C does not reach it
    assert proc.wait(15) == 3
    assert proc.returncode == 3
    assert proc.exit_description() == "exited with status 3"
    assert not proc.alive()
    log = (tmp_path / "child.log").read_text()
    assert "X=42 gone=False" in log
    assert "stdin=''" in log and "to-stderr" in log
    assert "fd=" in log
    assert proc.stop() == 3  # idempotent on an exited child


def test_stop_terminates_and_is_idempotent(
    bell: DoorbellListener, procs: list[DeviceProcess], tmp_path: Path
) -> None:
    proc = _launch(procs, "import signal\nbell.ring(1)\nsignal.pause()\n", bell, tmp_path)
    _expect(bell, READY)
    assert proc.alive() and proc.returncode is None
    assert proc.exit_description() == "running"
    assert proc.wait(0) is None
    t0 = time.monotonic()
    assert proc.stop(timeout_s=10) == -signal.SIGTERM
    assert time.monotonic() - t0 < 10
    assert proc.exit_description() == "killed by SIGTERM"
    assert proc.stop() == -signal.SIGTERM
    assert not proc.alive()
    proc.terminate()  # no-op after reaping
    proc.kill()


def test_stop_escalates_to_sigkill(
    bell: DoorbellListener, procs: list[DeviceProcess], tmp_path: Path
) -> None:
    code = """
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    bell.ring(1)
    signal.pause()
    """
    proc = _launch(procs, code, bell, tmp_path)
    _expect(bell, READY)
    assert proc.stop(timeout_s=0.3) == -signal.SIGKILL
    assert proc.exit_description() == "killed by SIGKILL"


def test_pidfd_readable_in_poller_after_sigkill(
    bell: DoorbellListener, procs: list[DeviceProcess], tmp_path: Path
) -> None:
    proc = _launch(procs, "import signal\nbell.ring(1)\nsignal.pause()\n", bell, tmp_path)
    _expect(bell, READY)
    with Waker() as waker:
        poller = Poller()
        poller.register(waker)
        poller.register(proc)
        assert poller.poll(0) == []
        proc.kill()
        assert poller.poll(15) == [proc]
        assert not proc.alive()
        assert proc.returncode == -signal.SIGKILL
        assert proc.exit_description() == "killed by SIGKILL"
        waker.wake()
        assert poller.poll(0) == [waker, proc]
    proc.close()
    with pytest.raises(ValueError):
        proc._pollable()
    proc.close()  # idempotent


def test_on_terminate_in_child(
    bell: DoorbellListener, procs: list[DeviceProcess], tmp_path: Path
) -> None:
    code = """
    import signal
    from hostops import ignore_sigint, on_terminate
    ignore_sigint()
    on_terminate(lambda: print("cleanup-ran", flush=True))
    signal.raise_signal(signal.SIGINT)  # ignored
    bell.ring(1)
    signal.pause()
    """
    proc = _launch(procs, code, bell, tmp_path)
    _expect(bell, READY)
    assert proc.stop(timeout_s=10) == 143
    assert proc.exit_description() == "exited with status 143"
    assert "cleanup-ran" in (tmp_path / "child.log").read_text()


def test_register_atexit_unregister_in_child(procs: list[DeviceProcess], tmp_path: Path) -> None:
    code = """
    from hostops import register_atexit
    register_atexit(lambda: print("hook-A", flush=True))
    undo = register_atexit(lambda: print("hook-B", flush=True))
    register_atexit(lambda: print("hook-C", flush=True))
    undo()
    """
    proc = DeviceProcess.launch(
        [sys.executable, "-c", textwrap.dedent(code)],
        name="atexit",
        log_path=str(tmp_path / "atexit.log"),
    )
    procs.append(proc)
    assert proc.wait(15) == 0
    log = (tmp_path / "atexit.log").read_text().split()
    assert log == ["hook-C", "hook-A"]


# -- parent death -------------------------------------------------------------------------


def test_grandchild_notices_parent_death(bell: DoorbellListener, tmp_path: Path) -> None:
    """An intermediate process launches a grandchild, then dies; the grandchild must see
    it through ParentWatch and exit by itself."""
    grandchild = """
    from hostops import ParentWatch, Poller
    pw = ParentWatch.from_env()
    if pw is None:
        print("no-parent-watch", flush=True)
        raise SystemExit(1)
    bell.ring(1)
    poller = Poller()
    poller.register(pw)
    ready = poller.poll(20)
    print("gone" if ready == [pw] and pw.parent_gone() else "not-gone", flush=True)
    """
    gc_log = tmp_path / "gc.log"
    intermediate = f"""
    import signal
    from hostops import DeviceProcess
    gc = DeviceProcess.launch({_child(grandchild)!r}, name="gc", log_path={str(gc_log)!r})
    print(gc.pid, flush=True)
    signal.pause()  # until the test kills us
    """
    mid = DeviceProcess.launch(
        _child(intermediate),
        name="intermediate",
        env={"BELL": bell.endpoint},
        log_path=str(tmp_path / "mid.log"),
    )
    gc_pid = 0
    pidfd = -1
    try:
        _expect(bell, READY)  # the grandchild is up and watching
        gc_pid = int((tmp_path / "mid.log").read_text().split()[0])
        pidfd = os.pidfd_open(gc_pid)  # not our child: watch it through a pidfd
        assert select.select([pidfd], [], [], 0)[0] == []
        mid.kill()  # the intermediate dies without stopping the grandchild
        assert mid.wait(15) == -signal.SIGKILL
        assert select.select([pidfd], [], [], 15)[0] == [pidfd], "grandchild lingers"
        assert gc_log.read_text().split() == ["gone"]
    finally:
        mid.close()
        if pidfd >= 0:
            os.close(pidfd)
        if gc_pid:
            try:
                os.kill(gc_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_parent_watch_from_env_without_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from hostops import ParentWatch

    monkeypatch.delenv(PARENT_FD_ENV, raising=False)
    assert ParentWatch.from_env() is None
    monkeypatch.setenv(PARENT_FD_ENV, "not-a-number")
    assert ParentWatch.from_env() is None
    r, w = os.pipe()
    try:
        monkeypatch.setenv(PARENT_FD_ENV, str(r))
        pw = ParentWatch.from_env()
        assert pw is not None and pw._pollable() == r
        assert not pw.parent_gone()
        assert pw.wait(0) is False
        os.close(w)
        w = -1
        assert pw.parent_gone()
        assert pw.wait(5) is True
        pw.close()
        r = -1
        pw.close()
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
