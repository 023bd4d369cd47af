"""``vlab console`` driven through a pty, as a learner's terminal would drive it: the test
holds the pty's master, ``vlab console`` runs with the other end as its stdin and
stdout (cooked mode: the line discipline echoes and hands over whole lines). Commands
typed here cross the device process and the virtqueues to the shell in the kernel, and
the answers come back; the counters of ``stats`` and of the closing summary agree with
what was typed and shown. Ctrl-D and ``exit`` end it with status 0 and nothing left
behind; ``--trace`` shows the descriptors on stderr.

Real parts only: a real ``vlab`` process, its real device process, real shm and
ZeroMQ. No sleeps: every wait is a ``select`` on the pty with a timeout.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

VLAB = [sys.executable, "-m", "tools.cli"]
TIMEOUT = 30.0
PROMPT = b"vlab$ "


class Terminal:
    """``vlab console ARGS`` on a pty; :meth:`type` and :meth:`expect` drive it."""

    def __init__(self, args: list[str], stderr_path: Path) -> None:
        self.master, slave = os.openpty()
        self.err = open(stderr_path, "wb")  # closed in close()
        self.proc = subprocess.Popen(
            [*VLAB, "console", *args], stdin=slave, stdout=slave, stderr=self.err
        )
        os.close(slave)
        self.out = b""
        self.typed = 0

    def read_until(self, done: object) -> None:
        """Read until ``done()`` holds (bounded by TIMEOUT without progress)."""
        assert callable(done)
        while not done():  # bounded: each round reads >= 1 byte or fails the test
            r, _, _ = select.select([self.master], [], [], TIMEOUT)
            assert r, f"no output for {TIMEOUT} s; so far: {self.out[-2000:]!r}"
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: every writer of the pty is gone
                chunk = b""
            assert chunk, f"the pty closed; output: {self.out[-2000:]!r}"
            self.out += chunk

    def expect(self, what: bytes, count: int = 1) -> None:
        """Wait until ``what`` has appeared ``count`` times in the output."""
        self.read_until(lambda: self.out.count(what) >= count)

    def command(self, line: bytes) -> bytes:
        """Type ``line`` + newline, wait for the next prompt; the answer (and echo)."""
        start, prompts = len(self.out), self.out.count(PROMPT)
        os.write(self.master, line + b"\n")
        self.typed += len(line) + 1
        self.expect(PROMPT, prompts + 1)
        return self.out[start:].replace(b"\r\n", b"\n")

    def ctrl_d(self) -> None:
        """End of input at the start of a line (the line discipline's VEOF)."""
        os.write(self.master, b"\x04")
        self.typed += 1  # the bridge sends EOT across

    def wait(self) -> int:
        """The exit status (the process must end within TIMEOUT)."""
        status = self.proc.wait(TIMEOUT)
        return status

    def drain(self) -> None:
        """Read what is left once the process has exited."""
        while True:  # bounded: until the pty is empty or gone
            r, _, _ = select.select([self.master], [], [], 0)
            if not r:
                return
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                return
            if not chunk:
                return
            self.out += chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        os.close(self.master)
        self.err.close()


def _summary(out: bytes) -> dict[str, int]:
    m = re.search(
        rb"console: typed (\d+) bytes, shown (\d+); device rx_bytes=(\d+) tx_bytes=(\d+) "
        rb"rx_dropped=(\d+) tx_dropped=(\d+); (\d+) commands",
        out,
    )
    assert m, out[-2000:]
    keys = ("typed", "shown", "rx_bytes", "tx_bytes", "rx_dropped", "tx_dropped", "commands")
    return dict(zip(keys, map(int, m.groups()), strict=True))


def _no_shm_of(pid: int) -> None:
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"vlab-{pid}-")]
    assert left == [], left


def test_commands_cross_the_virtqueues_and_ctrl_d_ends(tmp_path: Path) -> None:
    t = Terminal([], tmp_path / "stderr.txt")
    try:
        t.expect(PROMPT)
        assert b"a shell in the kernel on /dev/hvc0 (console0" in t.out
        answer = t.command(b"help")
        for cmd in (b"help", b"devices", b"stats", b"echo", b"exit"):
            assert b"\n  " + cmd + b" " in answer
        assert b"hello virtio-lab\n" in t.command(b"echo hello   virtio-lab")
        answer = t.command(b"devices")
        assert re.search(rb"console0\s+id 3\s+process \d+\s+.*VERSION_1", answer), answer
        assert b"sh: frobnicate: command not found" in t.command(b"frobnicate now")
        t.command(b"")  # an empty line: just a prompt
        assert b"sh: line longer than 1024 bytes, ignored" in t.command(b"echo " + b"x" * 1100)
        answer = t.command(b"stats")
        # everything typed so far reached the kernel through receiveq0, byte for byte
        rx = re.search(rb"device: rx_bytes=(\d+) rx_chains=(\d+) rx_dropped=0", answer)
        assert rx and int(rx.group(1)) == t.typed, answer
        drv = re.search(rb"driver: rx_bytes=(\d+)", answer)
        assert drv and int(drv.group(1)) == t.typed
        assert re.search(rb"queue 1: requests=\d+ completions=\d+", answer)
        t.ctrl_d()
        t.expect(b" commands")
        assert t.wait() == 0
        t.drain()
        assert b"bye" in t.out
        s = _summary(t.out)
        assert s["typed"] == s["rx_bytes"] == t.typed  # EOT included
        assert s["shown"] == s["tx_bytes"] > 0  # every byte the device sent was shown
        assert s["rx_dropped"] == s["tx_dropped"] == 0 and s["commands"] == 5
        assert b"Traceback" not in t.out
        _no_shm_of(t.proc.pid)
    finally:
        t.close()
    assert (tmp_path / "stderr.txt").read_bytes() == b""


def test_exit_with_trace_shows_descriptors(tmp_path: Path) -> None:
    t = Terminal(["--trace"], tmp_path / "stderr.txt")
    try:
        t.expect(PROMPT)
        assert b"ping\n" in t.command(b"echo ping")
        os.write(t.master, b"exit\n")
        t.typed += 5
        t.expect(b" commands")
        assert t.wait() == 0
        t.drain()
        s = _summary(t.out)
        assert s["typed"] == s["rx_bytes"] == t.typed and s["commands"] == 2
        assert s["shown"] == s["tx_bytes"]
        _no_shm_of(t.proc.pid)
    finally:
        t.close()
    trace = (tmp_path / "stderr.txt").read_text()
    # the typed line came back in a receive buffer, the answers went out on transmitq0
    assert re.search(r"console0\s+drv\s+q0\s+add\s", trace), trace[:2000]
    assert re.search(r"console0\s+dev\s+q0\s+push\s", trace)
    assert re.search(r"console0\s+drv\s+q1\s+add\s", trace)
    assert re.search(r"console0\s+dev\s+q1\s+pop\s", trace)
    assert re.search(r"trace: \d+ events", trace)
    assert "Traceback" not in trace


def test_bad_argument_is_one_line(tmp_path: Path) -> None:
    p = subprocess.run(
        [*VLAB, "console", "--bogus"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlab: error: ") and "--bogus" in lines[0]


def test_stdin_at_end_ends_at_once(tmp_path: Path) -> None:
    """With no terminal at all (stdin is /dev/null) the session ends cleanly too."""
    p = subprocess.run(
        [*VLAB, "console"],
        capture_output=True,
        timeout=TIMEOUT * 2,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    s = _summary(p.stdout)
    assert s["typed"] == s["rx_bytes"] == 1 and s["commands"] == 0
    assert b"bye" in p.stdout and p.stderr == b""
