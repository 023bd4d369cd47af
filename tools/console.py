"""``vlab console``: this terminal on a virtio-console device, a small shell on the far side.

Theory of operation
-------------------
Three parties, two processes::

    terminal ⇄ vlab (bridge) ⇄ pty ⇄ device process ⇄ virtqueues ⇄ kernel: shell on /dev/hvc0
                                     (python -m vdev console --pty)

:func:`run` boots a kernel (in this process) with one ``console`` device in ``--pty``
mode: the device process makes a pty pair in raw mode, keeps the master and prints the
other end's path, which we read from its log. The *bridge* (:class:`Bridge`, on the main
thread) opens that end and copies bytes both ways: what the user types (our stdin) into
the pty — the device puts it into receive buffers on ``receiveq0`` — and whatever comes
out of the pty — what the device took from ``transmitq0`` — to our stdout. The
terminal stays as it is (cooked: the host's line discipline edits and echoes the line),
so the shell sees whole lines, as through a serial console with a line-buffered
terminal.

The *shell* (:class:`MiniShell`, on a thread of its own) is a program inside the
kernel: it uses only ``k.sys`` (open, poll, read and write of ``/dev/hvc0``). It prints
a prompt, reads bytes until a newline (at most :data:`MAX_LINE`; longer lines are
refused whole), runs the command (:data:`COMMANDS`: ``help``, ``devices``, ``stats``,
``echo``, ``exit``) and writes the answer back. Ctrl-D at the terminal is end of input
for the bridge, which sends the byte EOT (0x04) across, as a terminal's Ctrl-D would
cross a serial line; the shell treats EOT as ``exit``.

The end, in order: the shell says ``bye`` and stops; the bridge keeps copying until it
has shown every byte the device transmitted (the device's ``tx_bytes``, less any it
dropped: the output is never cut short), then the kernel shuts down (device process
stopped, shared memory freed). The last line (on stdout) is a summary: bytes typed and
shown by the bridge, bytes the device received and transmitted. Exit status 0; 1 with
one line if the device fails or goes away; 130 on Ctrl-C.

With ``--trace`` the kernel traces to a file in a temporary directory and
:class:`tools.trace.LiveTail` prints its events on stderr as they happen: each typed
line is a receive buffer's ``push`` on q0, each answer ``add``/``kick``/``pop`` on q1.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import kernel
from hostops.poll import FdSource, Poller, Waker
from hostops.sync import Event, start_thread
from kernel.files import POLLERR, POLLIN
from tools.errors import CliError

__all__ = ["run", "MiniShell", "Bridge", "COMMANDS", "MAX_LINE", "PROMPT", "EOT", "pty_path"]

#: The shell's prompt.
PROMPT = b"vlab$ "
#: End of transmission: the bridge sends it at end of input, the shell ends on it.
EOT = b"\x04"
#: Longest command line, bytes (a longer one is refused whole).
MAX_LINE = 1024
#: The commands and their one-line help.
COMMANDS: dict[str, str] = {
    "help": "this list",
    "devices": "the kernel's devices: name, device id, process, negotiated features",
    "stats": "counters of this console: the device's, the driver's, each queue's",
    "echo": "echo WORDS...: print the words back",
    "exit": "end the session (Ctrl-D too)",
}
_CHUNK = 4096
_SHELL_POLL_S = 1.0  # the shell checks its stop flag at least this often
_DRAIN_S = 10.0  # longest wait for the device's last output after the shell ended


def pty_path(dev: kernel.VirtioDevice) -> str:
    """The pty path a ``--pty`` console device printed (its log's ``/dev/...`` line)."""
    lines = [ln.strip() for ln in dev.transport.log_tail(50).splitlines()]
    paths = [ln for ln in lines if ln.startswith("/dev/")]
    if not paths:
        raise CliError(f"console: device {dev.name} printed no pty path", 1)
    return paths[-1]


class MiniShell:
    """A line-oriented program inside the kernel on ``/dev/hvc0`` (module docstring).

    :meth:`start` runs it on a thread; :attr:`done` is set when it has ended
    (``exit``, EOT, :meth:`stop` or a failed device: :attr:`error`). ``on_done`` is
    called then, on the shell's thread."""

    def __init__(
        self, k: kernel.Kernel, dev: kernel.VirtioDevice, on_done: Callable[[], None]
    ) -> None:
        self.k = k
        self.dev = dev
        self.on_done = on_done
        self.done = Event()
        self.error: OSError | None = None
        self.commands = 0  #: command lines run
        self._stop = Event()
        self._thread: Any = None

    def start(self) -> None:
        """Run the shell on a thread of its own."""
        self._thread = start_thread(self._main, name="vlab-console-shell")

    def stop(self) -> None:
        """Ask the shell to end (it checks at least once a second) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * _SHELL_POLL_S + 5.0)

    def _main(self) -> None:
        try:
            fd = self.k.sys.open("/dev/hvc0", os.O_RDWR)
            try:
                self._session(fd)
            finally:
                self.k.sys.close(fd)
        except OSError as e:
            self.error = e
        finally:
            self.done.set()
            self.on_done()

    def _say(self, fd: int, text: str) -> None:
        self.k.sys.write(fd, text.encode("utf-8", "replace"))

    def _session(self, fd: int) -> None:
        d = self.dev
        self._say(fd, f"virtio-lab console: a shell in the kernel on /dev/hvc0 ({d.name}, ")
        self._say(fd, f"device process {d.pid}). Type 'help'; 'exit' or Ctrl-D ends.\n")
        self.k.sys.write(fd, PROMPT)
        line = bytearray()
        skipping = False  # dropping the rest of an over-long line
        while not self._stop.is_set():  # bounded by the user: one round per read
            ready = self.k.sys.poll([(fd, POLLIN)], _SHELL_POLL_S)
            if not ready:
                continue
            if ready[0][1] & POLLERR and not ready[0][1] & POLLIN:
                raise OSError(errno.EIO, f"{d.name}: device failed")
            data = self.k.sys.read(fd, _CHUNK)
            pos = 0
            while pos < len(data):  # bounded: each round consumes >= 1 byte
                ends = [i for i in (data.find(b"\n", pos), data.find(EOT, pos)) if i >= 0]
                end = min(ends, default=-1)
                piece = data[pos:] if end < 0 else data[pos:end]
                pos = len(data) if end < 0 else end + 1
                if not skipping:
                    line += piece
                if len(line) > MAX_LINE:
                    line.clear()
                    skipping = True
                if end < 0:
                    break
                if data[end : end + 1] == EOT:
                    self._say(fd, "\nbye\n")
                    return
                if skipping:
                    self._say(fd, f"sh: line longer than {MAX_LINE} bytes, ignored\n")
                elif not self._run(fd, bytes(line).rstrip(b"\r").decode("utf-8", "replace")):
                    return
                line.clear()
                skipping = False
                self.k.sys.write(fd, PROMPT)

    def _run(self, fd: int, line: str) -> bool:
        """Run one command line; False when the session ends."""
        words = line.split()
        if not words:
            return True
        self.commands += 1
        cmd, args = words[0], words[1:]
        if cmd == "exit":
            self._say(fd, "bye\n")
            return False
        if cmd == "help":
            self._say(fd, "".join(f"  {c:<8} {h}\n" for c, h in COMMANDS.items()))
        elif cmd == "echo":
            self._say(fd, " ".join(args) + "\n")
        elif cmd == "devices":
            self._say(fd, self._devices())
        elif cmd == "stats":
            self._say(fd, self._stats())
        else:
            self._say(fd, f"sh: {cmd}: command not found (try 'help')\n")
        return True

    def _devices(self) -> str:
        out = []
        for d in self.k.devices:
            feats = ", ".join(d.features)
            out.append(f"  {d.name:<10} id {d.device_id:<4} process {d.pid:<8} {feats}\n")
        return "".join(out)

    def _stats(self) -> str:
        d = self.dev
        m = d.metrics().get("device", {})
        names = ("rx_bytes", "rx_chains", "rx_dropped", "tx_bytes", "tx_chains", "tx_dropped")
        out = ["  device: " + " ".join(f"{n}={m.get(n, 0)}" for n in names) + "\n"]
        counters = getattr(d.driver, "counters", {})
        out.append("  driver: " + " ".join(f"{n}={v}" for n, v in counters.items()) + "\n")
        for i, q in enumerate(d.queues):
            s = q.stats
            out.append(
                f"  queue {i}: requests={s.requests} completions={s.completions} "
                f"kicks={s.kicks_sent} kicks_suppressed={s.kicks_suppressed} "
                f"interrupts={s.interrupts}\n"
            )
        return "".join(out)


class Bridge:
    """Copies bytes between the user's terminal (``stdin_fd``/``stdout_fd``) and the
    pty ``peer_fd`` until :meth:`finish`; counts ``typed`` and ``shown`` bytes."""

    def __init__(self, stdin_fd: int, stdout_fd: int, peer_fd: int) -> None:
        self.stdin_fd, self.stdout_fd, self.peer_fd = stdin_fd, stdout_fd, peer_fd
        self.typed = 0  #: bytes sent into the pty (EOT included)
        self.shown = 0  #: bytes copied from the pty to stdout
        self.waker = Waker()
        self._poller = Poller()
        self._stdin = FdSource(stdin_fd)
        self._peer = FdSource(peer_fd)
        self._poller.register(self.waker)
        self._poller.register(self._stdin)
        self._poller.register(self._peer)
        self.stdin_open = True
        self.peer_open = True

    def finish(self) -> None:
        """From any thread: make :meth:`run` return."""
        self.waker.wake()

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:  # bounded: each round writes >= 1 byte (blocking fd) or raises
            n = os.write(fd, view)
            view = view[n:]

    def _from_stdin(self) -> None:
        data = os.read(self.stdin_fd, _CHUNK)
        if not data:  # end of input (Ctrl-D): EOT crosses, as it would a serial line
            data = EOT
            self._poller.unregister(self._stdin)
            self.stdin_open = False
        self._write_all(self.peer_fd, data)
        self.typed += len(data)

    def _from_peer(self) -> bool:
        try:
            data = os.read(self.peer_fd, _CHUNK)
        except BlockingIOError:
            return True
        except OSError:  # EIO: the device closed its end
            data = b""
        if not data:
            self._poller.unregister(self._peer)
            self.peer_open = False
            return False
        self._write_all(self.stdout_fd, data)
        self.shown += len(data)
        return True

    def run(self) -> None:
        """Copy both ways until :meth:`finish` is called or the pty closes."""
        while self.peer_open:  # bounded by the session: one round per event
            ready = self._poller.poll(None)
            if self.waker in ready:
                self.waker.drain()
                return
            if self._peer in ready and not self._from_peer():
                return
            if self._stdin in ready:
                self._from_stdin()

    def drain(self, want: int, timeout_s: float) -> None:
        """Copy from the pty until ``want`` bytes have been shown in all, it closes, or
        ``timeout_s`` passes without a byte."""
        self._poller.unregister(self._stdin)
        while self.peer_open and self.shown < want:  # bounded: each round shows >= 1 byte
            ready = self._poller.poll(timeout_s)
            if self.waker in ready:
                self.waker.drain()
            if self._peer not in ready:
                if not ready:
                    return
                continue
            self._from_peer()

    def close(self) -> None:
        """Release the waker (the fds are the caller's)."""
        self.waker.close()


def run(trace: bool = False, stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """``vlab console [--trace]``: attach the terminal (``stdin_fd``/``stdout_fd``) to
    a virtio-console device with :class:`MiniShell` on the kernel's side. Returns the
    exit status."""
    with tempfile.TemporaryDirectory(prefix="vlab-console-") as tmp:
        trace_path = os.path.join(tmp, "trace.jsonl") if trace else None
        from tools.trace import live_trace

        with live_trace(trace_path, sys.stderr):
            return _session(trace_path, stdin_fd, stdout_fd)


def _session(trace_path: str | None, stdin_fd: int, stdout_fd: int) -> int:
    with kernel.boot(devices=[kernel.Custom("console", pty=True)], trace=trace_path) as k:
        dev = k.devices[0]
        peer = os.open(pty_path(dev), os.O_RDWR | os.O_NOCTTY)
        try:
            os.set_blocking(peer, True)
            bridge = Bridge(stdin_fd, stdout_fd, peer)
            shell = MiniShell(k, dev, bridge.finish)
            try:
                shell.start()
                bridge.run()
                ended = shell.done.is_set()  # else the pty closed under us: the device is gone
                shell.stop()
                m = dev.metrics().get("device", {})
                # show everything the device transmitted before the kernel goes
                bridge.drain(m.get("tx_bytes", 0) - m.get("tx_dropped", 0), _DRAIN_S)
            finally:
                shell.stop()
                bridge.close()
            m = dev.metrics().get("device", {})
        finally:
            os.close(peer)
    summary = (
        f"console: typed {bridge.typed} bytes, shown {bridge.shown}; device rx_bytes="
        f"{m.get('rx_bytes', 0)} tx_bytes={m.get('tx_bytes', 0)} rx_dropped="
        f"{m.get('rx_dropped', 0)} tx_dropped={m.get('tx_dropped', 0)}; "
        f"{shell.commands} commands"
    )
    if shell.error is not None or not ended:
        why = shell.error.strerror if shell.error is not None else "the device went away"
        raise CliError(f"console: {why} ({summary})", 1)
    print(summary, flush=True)
    return 0
