"""A second kernel in a process of its own, and the switch-side helpers of the net tests.

    python tests/integration/netpeer.py SPEC_JSON

boots one NIC -- ``kernel.Net(**SPEC)``, or ``kernel.VhostUserNet(**SPEC)`` when SPEC
has ``"transport": "vhost-user"`` (then ``path`` is the socket of a vhost-user net
back-end somebody else started) -- runs a UDP echo service on port 7 (every datagram
goes back to its sender) and prints one JSON line ``{"ready": true, "mac": ..., "ip":
...}``. It then reads commands, one JSON object per line, and answers each with one line:

* ``{"op": "ping", "addr": A, "count": N, "timeout": S}`` → ``{"rtts": [...]}`` or
  ``{"error": errno}``
* ``{"op": "stats"}`` → the device's and the stack's counters, ``echoed`` (datagrams
  sent back, counted before the reply leaves) and ``echo_errors``
* ``{"op": "quit"}`` (or end of input) → shuts the kernel down and exits 0.

Imported by the tests (``tests/integration`` is on ``sys.path`` under pytest), it also
provides what they share: :class:`Switch` (a ``python -m vdev switch`` process),
:class:`Peer` (this script as a child), :class:`NetBackendProcess` (a ``python -m vdev
net --backend switch --vhost-user SOCK`` back-end) and :class:`Nics`, which makes the
NIC specs of a test for one transport -- for ``"vhost-user"`` it starts a back-end per
NIC, in the switch's runtime directory, and returns once that back-end said it listens
and is a port of the switch, so nothing sleeps or polls.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kernel

PEER = Path(__file__).resolve()
#: The transports a NIC of these tests can use.
TRANSPORTS = ("zmq", "vhost-user")
#: How long a back-end may take to become a switch port.
BACKEND_START_S = 20.0


# =========================================================================== helpers


@contextlib.contextmanager
def running_switch() -> Iterator[Switch]:
    """A started :class:`Switch` in a runtime directory of its own; stopped and the
    directory removed on the way out (the body of the tests' ``switch`` fixtures)."""
    from hostops.rundir import RuntimeDir

    rundir = RuntimeDir.create()
    sw = Switch(rundir)
    sw.start()
    try:
        yield sw
    finally:
        sw.stop()
        rundir.cleanup()


class Switch:
    """A ``python -m vdev switch`` process on an endpoint of ``rundir``."""

    def __init__(self, rundir: Any) -> None:
        self.rundir = rundir
        self.endpoint: str = rundir.endpoint("sw")
        self.log = os.path.join(rundir.path, "switch.log")
        self.proc: Any = None

    def start(self) -> None:
        """Start (or restart) the switch process."""
        from hostops.process import DeviceProcess, python_argv

        self.proc = DeviceProcess.launch(
            python_argv("vdev", "switch", "--listen", self.endpoint),
            name="switch",
            log_path=self.log,
        )

    def stats(self, **kw: Any) -> dict[str, Any]:
        """The switch's statistics (``vdev.switch.SwitchClient.stats``)."""
        from vdev.switch import SwitchClient

        with SwitchClient(self.endpoint) as c:
            return c.stats(**kw)

    def wait(self, predicate: Any, timeout_s: float = BACKEND_START_S) -> dict[str, Any]:
        """Statistics once ``predicate(stats)`` holds (waits on port changes)."""
        from vdev.switch import SwitchClient

        with SwitchClient(self.endpoint) as c:
            return c.wait(predicate, timeout_s)

    def port_of(self, pid: int) -> dict[str, Any]:
        """The switch's counters of the port the process ``pid`` announced."""
        ports: list[dict[str, Any]] = [p for p in self.stats()["ports"] if p["pid"] == pid]
        assert len(ports) == 1, f"no single port of pid {pid}: {ports}"
        return ports[0]

    def kill(self) -> None:
        """SIGKILL the switch (the endpoint stays for a restart)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc.close()
            self.proc = None

    def stop(self) -> None:
        """Stop the switch (SIGTERM, then SIGKILL)."""
        if self.proc is not None:
            self.proc.stop()
            self.proc.close()
            self.proc = None


class NetBackendProcess:
    """``python -m vdev net --backend switch --switch EP --vhost-user SOCK [ARGS]``: a
    vhost-user net back-end that is a port of ``switch``, launched with
    :class:`hostops.process.DeviceProcess`.

    Its log goes through a FIFO that a thread copies into :attr:`log` line by line, so
    the test can wait for what the back-end says: :meth:`start` returns once it logged
    ``listening on`` (its socket listens) and the switch lists its port; :meth:`wait_log`
    waits for any other line. After :meth:`stop` the whole log is in the file (the copy
    ends at the FIFO's end of file, when the process is gone)."""

    def __init__(self, switch: Switch, name: str, *args: str) -> None:
        self.switch = switch
        self.sock = os.path.join(switch.rundir.path, f"{name}.sock")
        self.log = os.path.join(switch.rundir.path, f"{name}.log")
        self.args = args
        self.proc: Any = None
        self._text = ""
        self._eof = False
        self._cond = threading.Condition()
        self._tee: threading.Thread | None = None

    def start(self) -> NetBackendProcess:
        """Launch the back-end; return once its socket listens and it is a switch port."""
        from hostops.process import DeviceProcess, python_argv

        argv = python_argv(
            "vdev", "net", "--backend", "switch", "--switch", self.switch.endpoint,
            *self.args, "--vhost-user", self.sock,
        )  # fmt: skip
        fifo = self.log + ".fifo"
        os.mkfifo(fifo, 0o600)
        try:
            rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader before the writer
            try:
                self.proc = DeviceProcess.launch(
                    argv, name=os.path.basename(self.sock), log_path=fifo
                )
            except BaseException:
                os.close(rfd)
                raise
        finally:
            os.unlink(fifo)  # both ends are open: the name is not needed any more
        os.set_blocking(rfd, True)
        self._tee = threading.Thread(target=self._copy, args=(rfd,), name="be-log", daemon=True)
        self._tee.start()
        self.wait_log(r"listening on ")
        pid = self.proc.pid
        try:
            self.switch.wait(lambda st: any(p["pid"] == pid for p in st["ports"]))
        except TimeoutError:
            raise AssertionError(
                f"back-end {self.proc!r} never became a switch port: {self.log_text()}"
            ) from None
        return self

    def _copy(self, rfd: int) -> None:
        try:
            with open(self.log, "a") as out:
                while True:
                    chunk = os.read(rfd, 65536)
                    if not chunk:
                        return
                    text = chunk.decode(errors="replace")
                    out.write(text)
                    out.flush()
                    with self._cond:
                        self._text += text
                        self._cond.notify_all()
        finally:
            os.close(rfd)
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def wait_log(self, pattern: str, timeout_s: float = BACKEND_START_S) -> re.Match[str]:
        """Wait until the back-end logged a line matching ``pattern`` (a regex);
        AssertionError if it does not in ``timeout_s`` or exits first."""
        rx = re.compile(pattern, re.M)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            m = rx.search(self._text)
            if m is not None:
                found.append(m)
            return m is not None or self._eof

        with self._cond:
            self._cond.wait_for(seen, timeout_s)
        assert found, f"the back-end never logged {pattern!r}: {self.log_text()}"
        return found[0]

    @property
    def pid(self) -> int:
        """The back-end's pid."""
        assert self.proc is not None
        return int(self.proc.pid)

    def log_text(self) -> str:
        """Everything the back-end logged so far (all of it after :meth:`stop`)."""
        with self._cond:
            return self._text

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL); the exit status (None if never started)."""
        if self.proc is None:
            return None
        code = int(self.proc.stop(10.0))
        self.proc.close()
        self.proc = None
        if self._tee is not None:
            self._tee.join(10.0)
            assert not self._tee.is_alive(), "the back-end's log never ended"
        return code


class Nics:
    """The NIC specs of one test on ``switch`` over ``transport`` (see the module doc).
    :meth:`close` stops the back-ends it started."""

    def __init__(self, transport: str, switch: Switch) -> None:
        assert transport in TRANSPORTS, transport
        self.transport = transport
        self.switch = switch
        self.backends: list[NetBackendProcess] = []

    def backend(self, *args: str) -> NetBackendProcess:
        """Start one more vhost-user back-end on the switch (extra ``args``)."""
        be = NetBackendProcess(self.switch, f"nic{len(self.backends)}", *args)
        self.backends.append(be)
        return be.start()

    def fields(self, **kw: Any) -> dict[str, Any]:
        """Keyword arguments of a NIC spec (JSON-able, for :class:`Peer` too)."""
        if self.transport == "zmq":
            return {"backend": "switch", "switch": self.switch.endpoint, **kw}
        be = self.backend()  # the front-end tells it the MTU (NET_SET_MTU)
        return {"transport": "vhost-user", "path": be.sock, **kw}

    def spec(self, **kw: Any) -> kernel.DeviceSpec:
        """A NIC spec (``ip=``, ``mtu=``, ... as for ``kernel.Net``)."""
        return make_spec(self.fields(**kw))

    def close(self) -> None:
        """Stop every back-end started."""
        for be in self.backends:
            be.stop()
        self.backends.clear()


class Peer:
    """A kernel in another process (this script) with a UDP echo on port 7."""

    def __init__(self, **spec: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = self._line()
        assert hello.get("ready"), hello
        self.mac: str = hello["mac"]

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"peer exited with {self.proc.poll()}"
        out: dict[str, Any] = json.loads(line)
        return out

    def call(self, **cmd: Any) -> dict[str, Any]:
        """Send one command, return its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        """Quit the peer (killing it if it does not)."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def make_spec(fields: dict[str, Any]) -> kernel.DeviceSpec:
    """``kernel.VhostUserNet`` for ``"transport": "vhost-user"``, else ``kernel.Net``."""
    f = dict(fields)
    if f.pop("transport", "zmq") == "vhost-user":
        return kernel.VhostUserNet(**f)
    return kernel.Net(**f)


# =========================================================================== the peer


def main() -> int:
    spec = make_spec(json.loads(sys.argv[1]))
    with kernel.boot(devices=[spec]) as k:
        fd = k.sys.socket()
        k.sys.setsockopt(fd, 1, 8, 16 << 20)  # SOL_SOCKET, SO_RCVBUF
        k.sys.bind(fd, ("0.0.0.0", 7))
        k.sys.settimeout(fd, 0.5)
        stop = threading.Event()
        echoed = [0]  # counted before the reply leaves: whoever got it sees the count
        echo_errors = [0]

        def echo() -> None:
            while not stop.is_set():
                try:
                    data, addr = k.sys.recvfrom(fd, 65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                echoed[0] += 1
                try:
                    k.sys.sendto(fd, data, addr)
                except OSError as e:
                    echo_errors[0] += 1
                    print(f"netpeer: echo to {addr} failed: {e}", file=sys.stderr)

        t = threading.Thread(target=echo, name="netpeer-echo", daemon=True)
        t.start()
        dev = k.devices[0]
        ip = getattr(spec, "ip", "")
        print(json.dumps({"ready": True, "mac": dev.mac, "ip": ip}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "quit":
                break
            if op == "ping":
                try:
                    rtts = k.sys.ping(
                        cmd["addr"], count=cmd.get("count", 3), timeout=cmd.get("timeout", 1.0)
                    )
                    out: dict[str, object] = {"rtts": rtts}
                except OSError as e:
                    out = {"error": e.errno}
            elif op == "stats":
                out = {
                    "rx_frames": dev.rx_frames,
                    "tx_frames": dev.tx_frames,
                    "echoed": echoed[0],
                    "echo_errors": echo_errors[0],
                    "stack": k.net.stats,
                }
            else:
                out = {"error": f"unknown op {op!r}"}
            print(json.dumps(out), flush=True)
        stop.set()
        t.join(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
