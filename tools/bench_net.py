"""``vlab bench net``: UDP_STREAM between two kernels on the switch, beside native UDP.

What one row measures (netperf's UDP_STREAM): one application sends datagrams of the
row's payload size as fast as it can for S seconds; the goodput is what the *receiving*
application got (payload bits per second, from its first datagram to the end of the
send window). Both sides run in separate processes:

* virtio: this process boots kernel A (``kernel.Net(backend="switch")``); a peer process
  (``python -m tools.bench_net peer virtio``) boots kernel B on the same switch (a
  third process, ``python -m vdev switch``); both interfaces use MTU 65535, so neither
  side fragments (Linux loopback's MTU is 65536). Path: app → kernel A's stack →
  virtio-net ring → device process A → switch → device process B → ring → kernel B's
  stack → app.
* native: a peer process with a Python UDP socket on 127.0.0.1 receives what this
  process sends with another — the same Python code shape, Linux's stack in between.

Kicks and interrupts per packet come from kernel A's transmit queue and kernel B's
receive queue counters. A sender that finds the ring full waits for room (it never
counts a datagram that was not handed to the device).

This is a benchmark, not a test: it prints numbers and never judges them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from tools.errors import CliError
from tools.table import render_table

__all__ = ["NetRow", "SIZES", "run_net"]

#: Payload sizes of the rows (bytes).
SIZES = (64, 256, 1024, 4096, 16384, 65507)
#: Both kernels' MTU: as Linux loopback, big enough that no row fragments.
BENCH_MTU = 65535
_ENOBUFS = 105


@dataclass
class NetRow:
    """One row as printed and as emitted in JSON."""

    name: str
    unit: str
    virtio: float
    native: float
    ratio: float
    kicks_per_packet: float
    interrupts_per_packet: float


# --------------------------------------------------------------------------- peers
def _peer_native(size: int) -> None:
    """Receive UDP on 127.0.0.1; print the port; on EOF of stdin report bytes/time."""
    import socket
    import threading

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", 0))
    print(json.dumps({"port": s.getsockname()[1]}), flush=True)
    state = {"bytes": 0, "first": 0.0, "stop": False}

    def rx() -> None:
        s.settimeout(0.2)
        buf = bytearray(65536)
        while not state["stop"]:
            try:
                n = s.recv_into(buf)
            except TimeoutError:
                continue
            if not state["first"]:
                state["first"] = time.perf_counter()
            state["bytes"] += n

    t = threading.Thread(target=rx, daemon=True)
    t.start()
    sys.stdin.readline()  # the sender says "stop"
    end = time.perf_counter()
    state["stop"] = True
    t.join(2)
    print(json.dumps({"bytes": state["bytes"], "seconds": end - (state["first"] or end)}))
    s.close()


def _peer_virtio(switch: str, size: int) -> None:
    """Boot kernel B on the switch, receive UDP on port 9000; report like the native peer."""
    import threading

    import kernel

    spec = kernel.Net(backend="switch", switch=switch, ip="10.0.0.2/24", mtu=BENCH_MTU)
    with kernel.boot(devices=[spec]) as k:
        fd = k.sys.socket(2, 2)
        k.sys.setsockopt(fd, 1, 8, 8 << 20)  # SOL_SOCKET, SO_RCVBUF
        k.sys.bind(fd, ("10.0.0.2", 9000))
        print(json.dumps({"port": 9000}), flush=True)
        state: dict[str, Any] = {"bytes": 0, "first": 0.0, "stop": False}
        k.sys.settimeout(fd, 0.2)

        def rx() -> None:
            while not state["stop"]:
                try:
                    data = k.sys.recv(fd, 65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not state["first"]:
                    state["first"] = time.perf_counter()
                state["bytes"] += len(data)

        t = threading.Thread(target=rx, daemon=True)
        t.start()
        sys.stdin.readline()
        end = time.perf_counter()
        state["stop"] = True
        t.join(2)
        rxq = k.devices[0].queues[0].stats
        print(
            json.dumps(
                {
                    "bytes": state["bytes"],
                    "seconds": end - (state["first"] or end),
                    "interrupts": rxq.interrupts,
                    "rx_frames": k.devices[0].rx_frames,
                }
            )
        )


def _start_peer(*args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    p = subprocess.Popen(
        [sys.executable, "-m", "tools.bench_net", "peer", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        p.kill()
        p.wait()
        raise CliError(f"bench peer {' '.join(args)} did not start")
    return p, json.loads(line)


def _finish_peer(p: subprocess.Popen[str]) -> dict[str, Any]:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("stop\n")
    p.stdin.flush()
    line = p.stdout.readline()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if not line:
        raise CliError("bench peer ended without a report")
    out: dict[str, Any] = json.loads(line)
    return out


def _mbit(report: dict[str, Any]) -> float:
    secs = float(report["seconds"])
    return report["bytes"] * 8 / secs / 1e6 if secs > 0 else 0.0


# --------------------------------------------------------------------------- rows
def _native_row(size: int, seconds: float) -> float:
    import socket

    p, hello = _start_peer("native", str(size))
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("127.0.0.1", hello["port"]))
        payload = os.urandom(size)
        end = time.perf_counter() + seconds
        send = s.send
        while time.perf_counter() < end:
            for _ in range(64):
                try:
                    send(payload)
                except OSError:  # ENOBUFS/ECONNREFUSED: a lost datagram, go on
                    pass
        s.close()
    finally:
        report = _finish_peer(p)
    return _mbit(report)


def _virtio_row(k: Any, switch: str, size: int, seconds: float) -> tuple[float, float, float]:
    p, hello = _start_peer("virtio", switch, str(size))
    try:
        fd = k.sys.socket(2, 2)
        k.sys.connect(fd, ("10.0.0.2", hello["port"]))
        payload = os.urandom(size)
        dev = k.devices[0]
        txq = dev.queues[1].stats
        kicks0 = txq.kicks_sent
        sent0 = dev.tx_frames
        link = dev.link
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(16):
                try:
                    k.sys.send(fd, payload)
                except OSError as e:
                    if e.errno != _ENOBUFS:
                        raise CliError(f"udp-{size}: send failed: {e}") from None
                    link.wait_tx_room(0.1)
        kicks = txq.kicks_sent - kicks0
        frames = max(1, dev.tx_frames - sent0)
        k.sys.close(fd)
    finally:
        report = _finish_peer(p)
    rx_frames = max(1, int(report.get("rx_frames", 1)))
    return _mbit(report), kicks / frames, float(report.get("interrupts", 0)) / rx_frames


def run_net(
    seconds: float = 1.0,
    as_json: bool = False,
    plot: str | None = None,
    sizes: tuple[int, ...] = SIZES,
) -> int:
    """Run the UDP_STREAM rows and print them; returns the exit status."""
    import kernel
    from hostops.process import DeviceProcess, python_argv
    from hostops.rundir import RuntimeDir

    rows: list[NetRow] = []
    rundir = RuntimeDir.create()
    switch_ep = rundir.endpoint("bench-switch")
    sw = DeviceProcess.launch(
        python_argv("vdev", "switch", "--listen", switch_ep),
        name="switch",
        log_path=os.path.join(rundir.path, "switch.log"),
    )
    try:
        spec = kernel.Net(backend="switch", switch=switch_ep, ip="10.0.0.1/24", mtu=BENCH_MTU)
        with kernel.boot(devices=[spec]) as k:
            for size in sizes:
                v, kpp, ipp = _virtio_row(k, switch_ep, size, seconds)
                n = _native_row(size, seconds)
                rows.append(
                    NetRow(
                        name=f"udp-{size}",
                        unit="Mbit/s",
                        virtio=round(v, 1),
                        native=round(n, 1),
                        ratio=round(v / n, 4) if n else 0.0,
                        kicks_per_packet=round(kpp, 4),
                        interrupts_per_packet=round(ipp, 4),
                    )
                )
    finally:
        sw.stop()
        sw.close()
        rundir.cleanup()
    if as_json:
        print(json.dumps({"rows": [asdict(r) for r in rows]}))
    else:
        print(
            render_table(
                ["workload", "unit", "virtio", "native", "virtio/native", "kicks/pkt", "irqs/pkt"],
                [
                    [
                        r.name,
                        r.unit,
                        r.virtio,
                        r.native,
                        r.ratio,
                        r.kicks_per_packet,
                        r.interrupts_per_packet,
                    ]
                    for r in rows
                ],
            )
        )
    if plot:
        _plot(rows, plot)
    return 0


def _plot(rows: list[NetRow], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--plot needs matplotlib (pip install 'virtio-lab[bench]')") from None
    sizes = [int(r.name.split("-")[1]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(sizes, [r.native for r in rows], "o-", label="native Python UDP (Linux loopback)")
    ax.plot(sizes, [r.virtio for r in rows], "s-", label="virtio-lab (two kernels, switch)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("UDP payload (bytes)")
    ax.set_ylabel("received goodput (Mbit/s)")
    ax.set_title("UDP_STREAM, 2 processes, same run")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror}") from None
    plt.close(fig)


def _peer_main(argv: list[str]) -> int:
    if argv[:1] == ["native"]:
        _peer_native(int(argv[1]))
    elif argv[:1] == ["virtio"]:
        _peer_virtio(argv[1], int(argv[2]))
    else:
        print("usage: python -m tools.bench_net peer native|virtio ...", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        sys.exit(_peer_main(sys.argv[2:]))
    print("usage: python -m tools.bench_net peer ...", file=sys.stderr)
    sys.exit(2)
