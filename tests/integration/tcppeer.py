"""A kernel in a process of its own with TCP services, for the TCP integration tests.

    python tests/integration/tcppeer.py SPEC_JSON

boots one NIC (``kernel.Net(**SPEC)``), listens on two ports and prints one JSON line
``{"ready": true}``:

* port 5001, *sink*: reads a connection to its end (the client half-closes), then
  answers ``"<sha256 hex> <byte count>"`` and closes;
* port 5002, *echo*: sends back everything it reads, closes after the client's FIN.

It then reads commands, one JSON object per line, answering each with one line:

* ``{"op": "connect_many", "addr": A, "port": P, "n": N, "size": S}``: opens N
  connections to ``A:P`` at once, sends S pattern bytes on each, half-closes, reads the
  echo back; answers ``{"ok": count of intact echoes, "errors": [...]}``;
* ``{"op": "stats"}``: ``{"stack": k.net.stats, "link": the NIC's counters, "pid":
  this process, "device_pid": the NIC's device process}``;
* ``{"op": "quit"}`` (or end of input): shuts down and exits 0.

Imported by the tests, it also provides :class:`TcpPeer` (this script as a child
process) and :func:`pattern`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import kernel
from kernel.files import SHUT_WR, SOCK_STREAM

__all__ = ["TcpPeer", "pattern", "main"]

SCRIPT = Path(__file__).resolve()


class TcpPeer:
    """This script as a child process: ``TcpPeer(**spec)`` boots its kernel with
    ``kernel.Net(**spec)`` and returns once it is ready; :meth:`call` sends one command
    and returns its answer; :meth:`close` quits it (kills it if it does not)."""

    def __init__(self, **spec: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = self._line()
        if not hello.get("ready"):
            self.close()
            raise RuntimeError(f"tcppeer did not start: {hello}")

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"tcppeer exited with {self.proc.poll()}")
        out: dict[str, Any] = json.loads(line)
        return out

    def call(self, **cmd: Any) -> dict[str, Any]:
        """Send one command (see the module doc) and return the answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        """Quit the peer (SIGKILL if it does not end within 20 s); idempotent."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        else:
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


def pattern(n: int, seed: int) -> bytes:
    """``n`` bytes depending on position and seed."""
    block = bytes((seed * 13 + i * 7 + (i >> 8)) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def _serve(k: kernel.Kernel, port: int, handler: Any, stop: threading.Event) -> None:
    fd = k.sys.socket(type=SOCK_STREAM)
    k.sys.bind(fd, ("0.0.0.0", port))
    k.sys.listen(fd, 128)
    k.sys.settimeout(fd, 0.5)
    while not stop.is_set():
        try:
            c, _addr = k.sys.accept(fd)
        except TimeoutError:
            continue
        except OSError:
            return
        k.sys.settimeout(c, 60)
        threading.Thread(target=handler, args=(k, c), daemon=True).start()


def _sink(k: kernel.Kernel, c: int) -> None:
    h = hashlib.sha256()
    n = 0
    buf = bytearray(1 << 20)
    try:
        while True:
            got = k.sys.recv_into(c, buf)
            if not got:
                break
            h.update(memoryview(buf)[:got])
            n += got
        k.sys.sendall(c, f"{h.hexdigest()} {n}".encode())
    except OSError as e:
        print(f"tcppeer: sink: {e}", file=sys.stderr)
    finally:
        k.sys.close(c)


def _echo(k: kernel.Kernel, c: int) -> None:
    try:
        while True:
            d = k.sys.recv(c, 65536)
            if not d:
                break
            k.sys.sendall(c, d)
    except OSError as e:
        print(f"tcppeer: echo: {e}", file=sys.stderr)
    finally:
        k.sys.close(c)


def _client(k: kernel.Kernel, addr: str, port: int, size: int, seed: int, res: list[Any]) -> None:
    fd = k.sys.socket(type=SOCK_STREAM)
    try:
        k.sys.settimeout(fd, 60)
        k.sys.connect(fd, (addr, port))
        data = pattern(size, seed)
        k.sys.sendall(fd, data)
        k.sys.shutdown(fd, SHUT_WR)
        got = bytearray()
        while True:
            d = k.sys.recv(fd, 65536)
            if not d:
                break
            got += d
        res.append(True if bytes(got) == data else f"echo {seed} differs")
    except OSError as e:
        res.append(f"client {seed}: {e}")
    finally:
        k.sys.close(fd)


def main() -> int:
    """Run the peer (see the module doc); 0 after ``quit``."""
    spec = kernel.Net(**json.loads(sys.argv[1]))
    with kernel.boot(devices=[spec]) as k:
        stop = threading.Event()
        servers = [
            threading.Thread(target=_serve, args=(k, p, h, stop), daemon=True)
            for p, h in ((5001, _sink), (5002, _echo))
        ]
        for t in servers:
            t.start()
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "quit":
                break
            if op == "connect_many":
                res: list[Any] = []
                ts = [
                    threading.Thread(
                        target=_client,
                        args=(k, cmd["addr"], cmd["port"], cmd["size"], i, res),
                        daemon=True,
                    )
                    for i in range(cmd["n"])
                ]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join(120)
                out: dict[str, Any] = {
                    "ok": sum(1 for r in res if r is True),
                    "errors": [r for r in res if r is not True],
                }
            elif op == "stats":
                out = {
                    "stack": k.net.stats,
                    "link": dict(k.devices[0].link.counters),
                    "pid": os.getpid(),
                    "device_pid": k.devices[0].pid,
                }
            else:
                out = {"error": f"unknown op {op!r}"}
            print(json.dumps(out), flush=True)
        stop.set()
        for t in servers:
            t.join(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
