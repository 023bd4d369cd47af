"""A minimal iperf3 TCP client, on Python's socket API only (so it runs under ``vlab run``).

    python tests/integration/iperf3_client.py SERVER PORT BYTES

Prints ``{"ready": true}`` and waits for one line on standard input (the test's signal
that the server's side of the network is configured), then runs one iperf3 test against
``iperf3 -s`` on ``SERVER:PORT``: one TCP stream, ``BYTES`` bytes, client to server. At
the end it prints one JSON line ``{"sent": N, "sndbuf": B, "server": {...}}``: the data
connection's SO_SNDBUF and the results the server sent back (its ``streams[0].bytes`` is
what it received); or ``{"error": "..."}`` and exits 1.

iperf3 counts what it has *read* when the client's ``TEST_END`` arrives, not what is
still in its socket buffers, so a server may report fewer bytes than were sent.

Theory of operation
-------------------
iperf3's control protocol, as this client speaks it (learnt from iperf3's documentation
and behaviour, states as iperf3 numbers them): the client opens the *control*
connection and sends a 37-byte cookie (36 characters and a NUL). From then on the server
drives the test with one-byte states on that connection:

* ``PARAM_EXCHANGE`` (9): the client sends its parameters, a JSON object framed by a
  4-byte big-endian length (``tcp``, ``num`` bytes, ``parallel`` 1, block ``len``...).
* ``CREATE_STREAMS`` (10): the client opens the data connection and sends the same
  cookie on it (that is how the server ties it to this test).
* ``TEST_START`` (1), then ``TEST_RUNNING`` (2): the client sends ``BYTES`` bytes on the
  data connection, then the state ``TEST_END`` (4) on the control connection.
* ``EXCHANGE_RESULTS`` (13): the client sends its results (framed JSON: CPU use and,
  per stream, its id, bytes, retransmits...), then reads the server's (framed JSON).
* ``DISPLAY_RESULTS`` (14): the client answers ``IPERF_DONE`` (16) and closes.
* ``ACCESS_DENIED`` (-1) / ``SERVER_ERROR`` (-2, followed by two 4-byte error codes):
  the test is over, reported as an error.

Every read is bounded: the sockets have a timeout, a frame's length is checked against
:data:`MAX_JSON`, and the state loop runs at most :data:`MAX_STATES` turns.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys
import time
from typing import Any

__all__ = ["main", "run_test"]

COOKIE_LEN = 37
COOKIE_CHARS = "abcdefghijklmnopqrstuvwxyz234567"
TEST_START, TEST_RUNNING, TEST_END = 1, 2, 4
PARAM_EXCHANGE, CREATE_STREAMS = 9, 10
EXCHANGE_RESULTS, DISPLAY_RESULTS, IPERF_DONE = 13, 14, 16
ACCESS_DENIED, SERVER_ERROR = -1, -2
#: The largest JSON frame accepted from the server (its results are a few KiB).
MAX_JSON = 1 << 20
#: More states than a whole test has; a server that says more is broken.
MAX_STATES = 32
BLOCK = 128 * 1024
TIMEOUT_S = 60.0
#: SO_SNDBUF of the data connection: what may still be unsent when the test ends.
SNDBUF = 256 * 1024


class Iperf3Error(Exception):
    """The server refused the test or broke the protocol."""


def _read_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:  # each turn reads at least a byte or ends (socket timeout)
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise Iperf3Error(f"the server closed the control connection ({len(buf)}/{n})")
        buf += chunk
    return bytes(buf)


def _send_json(s: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    s.sendall(struct.pack("!I", len(data)) + data)


def _read_json(s: socket.socket) -> Any:
    (n,) = struct.unpack("!I", _read_exact(s, 4))
    if n > MAX_JSON:
        raise Iperf3Error(f"the server announced a {n}-byte JSON frame")
    return json.loads(_read_exact(s, n))


def _state(s: socket.socket) -> int:
    (value,) = struct.unpack("b", _read_exact(s, 1))  # a signed char
    return int(value)


def run_test(server: str, port: int, nbytes: int) -> dict[str, Any]:
    """One TCP test of ``nbytes`` against ``server:port``; what was sent and the
    server's results."""
    cookie = "".join(random.choice(COOKIE_CHARS) for _ in range(COOKIE_LEN - 1)).encode()
    cookie += b"\0"
    ctl = socket.create_connection((server, port), timeout=TIMEOUT_S)
    data: socket.socket | None = None
    sent = sndbuf = 0
    t0 = t1 = time.monotonic()
    server_results: Any = None
    try:
        ctl.sendall(cookie)
        for _ in range(MAX_STATES):
            st = _state(ctl)
            if st == PARAM_EXCHANGE:
                params: dict[str, Any] = {
                    "tcp": True,
                    "omit": 0,
                    "num": nbytes,
                    "parallel": 1,
                    "len": BLOCK,
                }
                params["client_version"] = "virtio-lab"
                _send_json(ctl, params)
            elif st == CREATE_STREAMS:
                data = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                data.settimeout(TIMEOUT_S)
                data.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
                sndbuf = data.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                data.connect((server, port))
                data.sendall(cookie)
            elif st == TEST_START:
                pass
            elif st == TEST_RUNNING:
                if data is None:
                    raise Iperf3Error("TEST_RUNNING before CREATE_STREAMS")
                block = random.Random(nbytes).randbytes(BLOCK)
                t0 = time.monotonic()
                while sent < nbytes:  # bounded by nbytes
                    n = min(BLOCK, nbytes - sent)
                    data.sendall(block[:n])
                    sent += n
                t1 = time.monotonic()
                ctl.sendall(struct.pack("b", TEST_END))
            elif st == EXCHANGE_RESULTS:
                stream: dict[str, Any] = {"id": 1, "bytes": sent, "retransmits": 0, "jitter": 0}
                stream |= {"errors": 0, "packets": 0, "start_time": 0, "end_time": t1 - t0}
                mine: dict[str, Any] = {
                    "cpu_util_total": 0,
                    "cpu_util_user": 0,
                    "cpu_util_system": 0,
                }
                mine |= {"sender_has_retransmits": 0, "streams": [stream]}
                _send_json(ctl, mine)
                server_results = _read_json(ctl)
            elif st == DISPLAY_RESULTS:
                ctl.sendall(struct.pack("b", IPERF_DONE))
                out = {"sent": sent, "sndbuf": sndbuf, "seconds": t1 - t0}
                return out | {"server": server_results}
            elif st == ACCESS_DENIED:
                raise Iperf3Error("the server is busy (ACCESS_DENIED)")
            elif st == SERVER_ERROR:
                err, errno = struct.unpack("!ii", _read_exact(ctl, 8))
                raise Iperf3Error(f"the server failed: i_errno {err}, errno {errno}")
            else:
                raise Iperf3Error(f"unexpected state {st}")
        raise Iperf3Error(f"no end after {MAX_STATES} states")
    finally:
        if data is not None:
            data.close()
        ctl.close()


def main(argv: list[str]) -> int:
    """``SERVER PORT BYTES``: wait for the go line, run the test, print the result."""
    if len(argv) != 3 or not argv[1].isdigit() or not argv[2].isdigit():
        print("usage: iperf3_client.py SERVER PORT BYTES", file=sys.stderr)
        return 2
    print(json.dumps({"ready": True}), flush=True)
    if not sys.stdin.readline():
        print(json.dumps({"error": "no go line on standard input"}), flush=True)
        return 1
    try:
        out = run_test(argv[0], int(argv[1]), int(argv[2]))
    except (OSError, Iperf3Error, ValueError) as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
