"""A second kernel in a process of its own, for the network tests.

    python tests/integration/netpeer.py SPEC_JSON

boots ``kernel.Net(**SPEC)``, runs a UDP echo service on port 7 (every datagram goes
back to its sender) and prints one JSON line ``{"ready": true, "mac": ..., "ip": ...}``.
It then reads commands, one JSON object per line, and answers each with one line:

* ``{"op": "ping", "addr": A, "count": N}`` → ``{"rtts": [...]}`` or ``{"error": errno}``
* ``{"op": "stats"}`` → the device's and the stack's counters
* ``{"op": "quit"}`` (or end of input) → shuts the kernel down and exits 0.
"""

from __future__ import annotations

import json
import sys
import threading

import kernel


def main() -> int:
    spec = kernel.Net(**json.loads(sys.argv[1]))
    with kernel.boot(devices=[spec]) as k:
        fd = k.sys.socket()
        k.sys.setsockopt(fd, 1, 8, 16 << 20)  # SOL_SOCKET, SO_RCVBUF
        k.sys.bind(fd, ("0.0.0.0", 7))
        k.sys.settimeout(fd, 0.5)
        stop = threading.Event()
        echoed = [0]

        def echo() -> None:
            while not stop.is_set():
                try:
                    data, addr = k.sys.recvfrom(fd, 65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                try:
                    k.sys.sendto(fd, data, addr)
                    echoed[0] += 1
                except OSError as e:
                    print(f"netpeer: echo to {addr} failed: {e}", file=sys.stderr)

        t = threading.Thread(target=echo, name="netpeer-echo", daemon=True)
        t.start()
        dev = k.devices[0]
        print(json.dumps({"ready": True, "mac": dev.mac, "ip": spec.ip}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "quit":
                break
            if op == "ping":
                try:
                    out: dict[str, object] = {
                        "rtts": k.sys.ping(cmd["addr"], count=cmd.get("count", 3))
                    }
                except OSError as e:
                    out = {"error": e.errno}
            elif op == "stats":
                out = {
                    "rx_frames": dev.rx_frames,
                    "tx_frames": dev.tx_frames,
                    "echoed": echoed[0],
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
