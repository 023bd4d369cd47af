"""A UDP and TCP endpoint driven line by line, to run inside a network namespace.

    python tests/integration/nspeer.py kernel SPEC_JSON PORT
    python tests/integration/nspeer.py native ADDRESS PORT

``kernel`` boots our kernel with one ``kernel.Net(**SPEC)`` (e.g. on the ``tap``
backend: the device process opens the TAP, so started with ``ip netns exec NS`` the
TAP is born in that namespace) and binds a ``k.sys`` UDP socket to ``0.0.0.0:PORT``.
``native`` binds a Linux UDP socket (Python's ``socket``) to ``ADDRESS:PORT``. Either
prints one JSON line when ready (``{"ready": true, ...}``; the kernel adds its ``mac``,
``ip`` and negotiated ``features``) or ``{"error": "..."}`` and exits 1, then answers
commands, one JSON object per line, each with one JSON line:

* ``{"op": "send", "data": HEX, "to": [IP, PORT]}`` → ``{"sent": N}`` or ``{"errno": E}``
* ``{"op": "recv", "timeout": S}`` → ``{"data": HEX, "from": [IP, PORT]}``, or
  ``{"timeout": true}`` when nothing came within S seconds, or ``{"errno": E}``
* ``{"op": "ping", "addr": A, "count": N}`` (kernel) → ``{"rtts": [...]}`` / ``{"errno": E}``
* ``{"op": "stats"}`` (kernel) → the stack's counters (``stack``), the driver's link
  counters (``link``) and the device process's metrics (``device``)
* ``{"op": "tcp_upload", "to": [IP, PORT], "size": N, "seed": S, "timeout": T}`` →
  connects a TCP socket (``k.sys`` or Python's) to ``IP:PORT``, sends N bytes
  (``random.Random(S).randbytes(N)``), half-closes and reads the peer's answer to EOF:
  ``{"sent": N, "sha256": HEX, "reply": TEXT, "seconds": S}`` or ``{"errno": E}``
* ``{"op": "quit"}`` or end of input → shut down (the kernel: every device process,
  region and file goes with it) and exit 0.

TCP: both kinds also listen for TCP on the same port (``0.0.0.0:PORT`` / ``ADDRESS:PORT``)
as a *sink*: each connection is read to its end (the client half-closes), then the
sink answers ``"<sha256 hex> <byte count>"`` and closes. Any number of connections, one
thread each.

The test reads the answers with a deadline (it never waits on a silent peer forever).
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["main"]

MAX_DATAGRAM = 65535


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _commands() -> Any:
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            return
        yield cmd


#: Bytes per receive call of the TCP sinks.
RECV_CHUNK = 1 << 20


def _sink_one(recv_into: Callable[[Any], int], sendall: Callable[[bytes], None]) -> None:
    """Read one connection to EOF, then answer ``"<sha256> <count>"``."""
    h = hashlib.sha256()
    n = 0
    buf = bytearray(RECV_CHUNK)
    view = memoryview(buf)
    while True:  # ends at EOF (or an error: the socket's timeout bounds each wait)
        got = recv_into(buf)
        if not got:
            break
        h.update(view[:got])
        n += got
    sendall(f"{h.hexdigest()} {n}".encode())


def _upload(
    connect: Callable[[tuple[str, int]], None],
    sendall: Callable[[bytes], None],
    shut_wr: Callable[[], None],
    recv: Callable[[int], bytes],
    cmd: dict[str, Any],
) -> dict[str, Any]:
    """The ``tcp_upload`` op over one socket's calls."""
    data = random.Random(int(cmd["seed"])).randbytes(int(cmd["size"]))
    to = cmd["to"]
    t0 = time.monotonic()
    connect((to[0], int(to[1])))
    sendall(data)
    shut_wr()
    reply = bytearray()
    for _ in range(64):  # the answer is one short line; bounded however it arrives
        d = recv(4096)
        if not d:
            break
        reply += d
    return {
        "sent": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "reply": reply.decode(errors="replace"),
        "seconds": time.monotonic() - t0,
    }


def _native_tcp_sink(ls: socket.socket) -> None:
    while True:
        try:
            c, _ = ls.accept()
        except OSError:
            return

        def serve(c: socket.socket = c) -> None:
            with c:
                c.settimeout(60)
                try:
                    _sink_one(c.recv_into, c.sendall)
                except OSError as e:
                    print(f"nspeer: tcp sink: {e}", file=sys.stderr)

        threading.Thread(target=serve, daemon=True).start()


def _native_upload(cmd: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as c:
        c.settimeout(float(cmd.get("timeout", 60)))
        return _upload(c.connect, c.sendall, lambda: c.shutdown(socket.SHUT_WR), c.recv, cmd)


def _native(address: str, port: int) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((address, port))
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((address, port))
        ls.listen(16)
    except OSError as e:
        _say({"error": f"cannot bind {address}:{port}: {e}"})
        return 1
    threading.Thread(target=_native_tcp_sink, args=(ls,), daemon=True).start()
    _say({"ready": True})
    with s, ls:
        for cmd in _commands():
            op = cmd.get("op")
            try:
                if op == "send":
                    to = cmd["to"]
                    _say({"sent": s.sendto(bytes.fromhex(cmd["data"]), (to[0], int(to[1])))})
                elif op == "recv":
                    s.settimeout(float(cmd["timeout"]))
                    try:
                        data, addr = s.recvfrom(MAX_DATAGRAM)
                    except TimeoutError:
                        _say({"timeout": True})
                        continue
                    _say({"data": data.hex(), "from": [addr[0], addr[1]]})
                elif op == "tcp_upload":
                    _say(_native_upload(cmd))
                else:
                    _say({"error": f"unknown op {op!r}"})
            except OSError as e:
                _say({"errno": e.errno, "error": str(e)})
    return 0


def _kernel_tcp_sink(k: Any, lfd: int, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            c, _ = k.sys.accept(lfd)
        except TimeoutError:
            continue
        except OSError:
            return

        def serve(c: int = c) -> None:
            try:
                k.sys.settimeout(c, 60)
                _sink_one(lambda b: k.sys.recv_into(c, b), lambda d: k.sys.sendall(c, d))
            except OSError as e:
                print(f"nspeer: kernel tcp sink: {e}", file=sys.stderr)
            finally:
                k.sys.close(c)

        threading.Thread(target=serve, daemon=True).start()


def _kernel_upload(k: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    from kernel.files import SHUT_WR, SOCK_STREAM

    fd = k.sys.socket(type=SOCK_STREAM)
    try:
        k.sys.settimeout(fd, float(cmd.get("timeout", 60)))
        return _upload(
            lambda a: k.sys.connect(fd, a),
            lambda d: k.sys.sendall(fd, d),
            lambda: k.sys.shutdown(fd, SHUT_WR),
            lambda n: k.sys.recv(fd, n),
            cmd,
        )
    finally:
        k.sys.close(fd)


def _kernel(spec_json: str, port: int) -> int:
    import kernel  # only this mode needs it
    from kernel.files import SO_RCVBUF, SOL_SOCKET

    spec = kernel.Net(**json.loads(spec_json))
    try:
        k = kernel.boot(devices=[spec])
    except (OSError, ValueError) as e:
        _say({"error": f"boot failed: {e}"})
        return 1
    with k:
        dev = k.devices[0]
        fd = k.sys.socket()
        k.sys.setsockopt(fd, SOL_SOCKET, SO_RCVBUF, 16 << 20)
        k.sys.bind(fd, ("0.0.0.0", port))
        from kernel.files import SOCK_STREAM

        lfd = k.sys.socket(type=SOCK_STREAM)
        k.sys.bind(lfd, ("0.0.0.0", port))
        k.sys.listen(lfd, 16)
        k.sys.settimeout(lfd, 0.5)
        stop = threading.Event()
        sink = threading.Thread(target=_kernel_tcp_sink, args=(k, lfd, stop), daemon=True)
        sink.start()
        _say({"ready": True, "mac": dev.mac, "ip": spec.ip, "features": dev.features})
        try:
            _kernel_commands(k, dev, fd)
        finally:
            stop.set()
            sink.join(5)
    return 0


def _kernel_commands(k: Any, dev: Any, fd: int) -> None:
    """Answer the commands of the ``kernel`` kind until ``quit``."""
    for cmd in _commands():
        op = cmd.get("op")
        try:
            if op == "send":
                to = cmd["to"]
                n = k.sys.sendto(fd, bytes.fromhex(cmd["data"]), (to[0], int(to[1])))
                _say({"sent": n})
            elif op == "recv":
                k.sys.settimeout(fd, float(cmd["timeout"]))
                try:
                    data, addr = k.sys.recvfrom(fd, MAX_DATAGRAM)
                except TimeoutError:
                    _say({"timeout": True})
                    continue
                _say({"data": data.hex(), "from": [addr[0], addr[1]]})
            elif op == "ping":
                rtts = k.sys.ping(cmd["addr"], count=int(cmd.get("count", 3)), timeout=2.0)
                _say({"rtts": rtts})
            elif op == "tcp_upload":
                _say(_kernel_upload(k, cmd))
            elif op == "stats":
                link = dev.link
                _say(
                    {
                        "stack": k.net.stats,
                        "link": dict(link.counters) if link is not None else {},
                        "device": dev.metrics().get("device", {}),
                    }
                )
            else:
                _say({"error": f"unknown op {op!r}"})
        except OSError as e:
            _say({"errno": e.errno, "error": str(e)})


def main(argv: list[str]) -> int:
    """Run the peer named by ``argv[0]`` (``kernel`` or ``native``)."""
    if len(argv) != 3 or argv[0] not in ("kernel", "native") or not argv[2].isdigit():
        print("usage: nspeer.py (kernel SPEC_JSON | native ADDRESS) PORT", file=sys.stderr)
        return 2
    if argv[0] == "native":
        return _native(argv[1], int(argv[2]))
    return _kernel(argv[1], int(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
