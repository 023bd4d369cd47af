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
class _Counter:
    """What a receiving peer counts during one row (reset by ``start``)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.first = 0.0
        self.packets = 0

    def add(self, n: int) -> None:
        if not self.first:
            self.first = time.perf_counter()
        self.bytes += n
        self.packets += 1


def _serve_rows(counter_box: list[_Counter], extra: Any = None) -> None:
    """The peer's command loop on stdin: ``start`` resets the count, ``stop`` reports
    it (bytes, seconds from the first datagram to now), ``quit`` ends."""
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "start":
            counter_box[0] = _Counter()
            out: dict[str, Any] = {"ok": True}
            if extra is not None:
                out.update(extra())
            print(json.dumps(out), flush=True)
        elif cmd == "stop":
            c = counter_box[0]
            end = time.perf_counter()
            out = {"bytes": c.bytes, "packets": c.packets, "seconds": end - (c.first or end)}
            if extra is not None:
                out.update(extra())
            print(json.dumps(out), flush=True)
        else:
            return


def _peer_native() -> None:
    """Receive UDP on 127.0.0.1 (port printed first); rows via :func:`_serve_rows`."""
    import socket
    import threading

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", 0))
    box = [_Counter()]
    stop = threading.Event()

    def rx() -> None:
        s.settimeout(0.2)
        buf = bytearray(65536)
        while not stop.is_set():
            try:
                n = s.recv_into(buf)
            except TimeoutError:
                continue
            box[0].add(n)

    t = threading.Thread(target=rx, daemon=True)
    t.start()
    print(json.dumps({"port": s.getsockname()[1]}), flush=True)
    _serve_rows(box)
    stop.set()
    t.join(2)
    s.close()


def _peer_virtio(switch: str) -> None:
    """Boot kernel B on the switch, receive UDP on port 9000; rows via
    :func:`_serve_rows` (the report adds kernel B's receive-queue interrupts)."""
    import threading

    import kernel

    spec = kernel.Net(backend="switch", switch=switch, ip="10.0.0.2/24", mtu=BENCH_MTU)
    with kernel.boot(devices=[spec]) as k:
        fd = k.sys.socket(2, 2)
        k.sys.setsockopt(fd, 1, 8, 8 << 20)  # SOL_SOCKET, SO_RCVBUF
        k.sys.bind(fd, ("10.0.0.2", 9000))
        k.sys.settimeout(fd, 0.2)
        box = [_Counter()]
        stop = threading.Event()

        def rx() -> None:
            while not stop.is_set():
                try:
                    data = k.sys.recv(fd, 65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                box[0].add(len(data))

        t = threading.Thread(target=rx, daemon=True)
        t.start()
        dev = k.devices[0]

        def extra() -> dict[str, Any]:
            return {
                "interrupts": dev.queues[0].stats.interrupts,
                "rx_frames": dev.rx_frames,
                "device_pid": dev.pid,
            }

        print(json.dumps({"port": 9000}), flush=True)
        _serve_rows(box, extra)
        stop.set()
        t.join(2)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Stages:
    """CPU time per packet of every process on the virtio path, for ``--stages``."""

    NAMES = ("sender kernel", "sender device", "switch", "receiver device", "receiver kernel")

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start = [_cpu_seconds(p) for p in pids]

    def per_packet_us(self, packets: int) -> list[float]:
        now = [_cpu_seconds(p) for p in self.pids]
        return [(b - a) * 1e6 / max(1, packets) for a, b in zip(self.start, now, strict=True)]


class _Peer:
    """A receiving peer process (``python -m tools.bench_net peer ...``)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.bench_net", "peer", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.hello = self._read(f"bench peer {' '.join(args)} did not start")

    def _read(self, what: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise CliError(what)
        out: dict[str, Any] = json.loads(line)
        return out

    def call(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read(f"bench peer ended without answering {cmd!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _mbit(report: dict[str, Any]) -> float:
    secs = float(report["seconds"])
    return report["bytes"] * 8 / secs / 1e6 if secs > 0 else 0.0


# --------------------------------------------------------------------------- rows
def _native_row(peer: _Peer, size: int, seconds: float) -> float:
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", peer.hello["port"]))
    payload = os.urandom(size)
    peer.call("start")
    end = time.perf_counter() + seconds
    send = s.send
    while time.perf_counter() < end:
        for _ in range(64):
            try:
                send(payload)
            except OSError:  # ENOBUFS/ECONNREFUSED: a lost datagram, go on
                pass
    report = peer.call("stop")
    s.close()
    return _mbit(report)


def _virtio_row(
    k: Any, fd: int, peer: _Peer, size: int, seconds: float, stage_pids: list[int]
) -> tuple[float, float, float, list[float]]:
    payload = os.urandom(size)
    dev = k.devices[0]
    txq = dev.queues[1].stats
    link = dev.link
    before = peer.call("start")
    stages = _Stages([*stage_pids, before["device_pid"], peer.proc.pid])
    kicks0 = txq.kicks_sent
    sent0 = dev.tx_frames
    end = time.perf_counter() + seconds
    send = k.sys.send
    while time.perf_counter() < end:
        for _ in range(16):
            try:
                send(fd, payload)
            except OSError as e:
                if e.errno != _ENOBUFS:
                    raise CliError(f"udp-{size}: send failed: {e}") from None
                link.wait_tx_room(0.1)
    kicks = txq.kicks_sent - kicks0
    frames = max(1, dev.tx_frames - sent0)
    report = peer.call("stop")
    irqs = report["interrupts"] - before["interrupts"]
    rx = max(1, report["rx_frames"] - before["rx_frames"])
    return _mbit(report), kicks / frames, irqs / rx, stages.per_packet_us(report["packets"])


def run_net(
    seconds: float = 1.0,
    as_json: bool = False,
    plot: str | None = None,
    only: list[str] | None = None,
    stages_table: bool = False,
) -> int:
    """Run the UDP_STREAM rows and print them (with ``stages_table``, also the CPU time
    each process on the virtio path spent per received packet); returns the exit
    status."""
    names = [f"udp-{n}" for n in SIZES]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise CliError(f"unknown row(s) {unknown}; rows are {names}", 2)
    sizes = [n for n in SIZES if not only or f"udp-{n}" in only]
    if plot:
        _check_plot_target(plot)
    import kernel
    from hostops.process import DeviceProcess, python_argv
    from hostops.rundir import RuntimeDir

    rows: list[NetRow] = []
    stage_rows: list[list[Any]] = []
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
            vpeer = _Peer("virtio", switch_ep)
            npeer = _Peer("native")
            try:
                fd = k.sys.socket(2, 2)
                k.sys.connect(fd, ("10.0.0.2", vpeer.hello["port"]))
                pids = [os.getpid(), k.devices[0].pid, sw.pid]
                for size in sizes:
                    row, cpu = _row(k, fd, vpeer, npeer, size, seconds, pids)
                    rows.append(row)
                    stage_rows.append([row.name, *(round(us, 1) for us in cpu)])
            finally:
                vpeer.close()
                npeer.close()
    finally:
        sw.stop()
        sw.close()
        rundir.cleanup()
    _print(rows, as_json)
    if stages_table and not as_json:
        print()
        print("CPU time per received packet, by process on the virtio path (µs):")
        print(render_table(["workload", *_Stages.NAMES], stage_rows))
    if plot:
        _plot(rows, plot)
    return 0


def _row(
    k: Any, fd: int, vpeer: _Peer, npeer: _Peer, size: int, seconds: float, pids: list[int]
) -> tuple[NetRow, list[float]]:
    v, kpp, ipp, cpu = _virtio_row(k, fd, vpeer, size, seconds, pids)
    n = _native_row(npeer, size, seconds)
    row = NetRow(
        name=f"udp-{size}",
        unit="Mbit/s",
        virtio=round(v, 1),
        native=round(n, 1),
        ratio=round(v / n, 4) if n else 0.0,
        kicks_per_packet=round(kpp, 4),
        interrupts_per_packet=round(ipp, 4),
    )
    return row, cpu


def _print(rows: list[NetRow], as_json: bool) -> None:
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


def _check_plot_target(path: str) -> None:
    """Fail before the run, not after it: matplotlib present, directory writable."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("--plot needs matplotlib (pip install matplotlib)", 2) from None
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CliError(f"--plot: directory {parent} does not exist", 2)
    if not os.access(parent, os.W_OK):
        raise CliError(f"--plot: directory {parent} is not writable", 2)


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
        _peer_native()
    elif argv[:1] == ["virtio"]:
        _peer_virtio(argv[1])
    else:
        print("usage: python -m tools.bench_net peer native|virtio ...", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        sys.exit(_peer_main(sys.argv[2:]))
    print("usage: python -m tools.bench_net peer ...", file=sys.stderr)
    sys.exit(2)
