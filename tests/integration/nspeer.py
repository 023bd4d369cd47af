"""A UDP endpoint driven line by line, to run inside a network namespace.

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
* ``{"op": "quit"}`` or end of input → shut down (the kernel: every device process,
  region and file goes with it) and exit 0.

The test reads the answers with a deadline (it never waits on a silent peer forever).
"""

from __future__ import annotations

import json
import socket
import sys
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


def _native(address: str, port: int) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((address, port))
    except OSError as e:
        _say({"error": f"cannot bind {address}:{port}: {e}"})
        return 1
    _say({"ready": True})
    with s:
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
                else:
                    _say({"error": f"unknown op {op!r}"})
            except OSError as e:
                _say({"errno": e.errno, "error": str(e)})
    return 0


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
        _say({"ready": True, "mac": dev.mac, "ip": spec.ip, "features": dev.features})
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
    return 0


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
