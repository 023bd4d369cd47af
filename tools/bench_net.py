"""``vlab bench net``: UDP_STREAM (and, with ``tcp=True``, TCP_STREAM) between two kernels
on the switch, beside native Python sockets over Linux loopback.

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

TCP_STREAM rows (``run_net(tcp=True)``, ``vlab bench net --tcp``), in netperf's style:
one connection per row, the sender writes messages of the row's size (``sendall``) for
S seconds, the goodput is the payload the *receiving* application read (from its first
read to the end of the send window). Both kernels use MTU 1500, a real Ethernet's:
``tcp-1024``, ``tcp-16384`` and ``tcp-65536`` run with HOST_TSO4/GUEST_TSO4 negotiated,
so the sender hands super-frames of up to 64 KiB to its device and they cross the
switch whole (as Linux loopback's GSO hands 64 KiB packets through its stack);
``tcp-65536-notso`` sends from a second kernel booted with ``offload=False``, so every
segment is at most one MSS and carries its own checksum. Native: a Python TCP
connection over 127.0.0.1 between this process and a peer process, same message size.
Kicks and interrupts per packet count *frames on the ring*: a TSO super-frame is one.
The ``stages`` table of the TCP rows gives the CPU time each process spent per MiB
received.

``ring=True`` (``vlab bench net --ring``): both kernels attach to ring ports of the
switch (``python -m vdev switch --ring-ports 3``, ``kernel.Attach``) instead of each
having a device process: app → kernel A's stack → ring → the switch (one copy, into
kernel B's receive buffer) → kernel B's stack → app. The stages table then shows 0 for
the device columns: the switch does the devices' work.

``queue_pairs=N`` (``vlab bench net --queue-pairs N``, 1..16) boots both kernels with N
virtio-net queue pairs (VIRTIO_NET_F_MQ, ``kernel.Net(queue_pairs=N)``). With N > 1
the UDP rows send from N threads, each with a socket of its own, on both paths (the
native row too, so the two stay comparable): each kernel thread transmits on its own
pair, and each socket's source port is picked so that the receiving device's flow hash
puts it on its own receive queue (:func:`_port_for_pair`). Kicks per packet count every
transmit queue of kernel A, interrupts per packet every receive queue of kernel B. The
TCP rows keep one connection (one flow: one pair).

``poll="off"`` (``vlab bench net --poll off``) boots every kernel -- this one and the
peer's -- with hybrid polling off on both sides of each ring (``poll_us=0``,
``device_poll_us=0``); the default leaves it on.

This is a benchmark, not a test: it prints numbers and never judges them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from tools.errors import CliError
from tools.table import render_table

__all__ = ["NetRow", "SIZES", "TCP_ROWS", "run_net", "cpu_seconds"]

#: Environment variable that carries ``--poll off`` to the peer process.
POLL_ENV = "VLAB_BENCH_POLL"
#: Environment variable that carries ``--queue-pairs N`` to the peer process.
PAIRS_ENV = "VLAB_BENCH_QUEUE_PAIRS"
#: The UDP port kernel B's receiver listens on.
UDP_PORT = 9000


def _queue_pairs() -> int:
    """The run's queue pairs (:data:`PAIRS_ENV`; 1 when unset)."""
    try:
        return max(1, int(os.environ.get(PAIRS_ENV, "1")))
    except ValueError:
        return 1


def _net_spec(**kw: Any) -> Any:
    """``kernel.Net(**kw)`` with the run's polling setting (:data:`POLL_ENV`) and queue
    pairs (:data:`PAIRS_ENV`)."""
    import kernel

    if os.environ.get(POLL_ENV) == "off":
        kw.update(poll_us=0, device_poll_us=0)
    pairs = _queue_pairs()
    if pairs > 1:
        kw.update(queue_pairs=pairs)
    return kernel.Net(**kw)


def _port_for_pair(pair: int, pairs: int, src: str, dst: str, dport: int) -> int:
    """A UDP source port (from 20000 up) whose flow ``src:port -> dst:dport`` the
    receiving device's steering hash puts on receive queue ``pair`` of ``pairs``
    (:func:`vdev.virtio.net.flow_hash` over the flow as the receiver sees it)."""
    import socket
    import struct

    from vdev.virtio.net import flow_hash, flow_key

    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst)
    )
    for port in range(20000, 60000):  # bounded: a pair is hit within a few ports
        frame = bytes(12) + b"\x08\x00" + ip + struct.pack("!HHHH", port, dport, 8, 0)
        key = flow_key(frame, received=True)
        if key is not None and flow_hash(key) % pairs == pair:
            return port
    raise CliError(f"no source port hashes to queue pair {pair + 1} of {pairs}")


#: How a run's "where" names ring ports (``--ring``): ``ring:<switch endpoint>``.
RING = "ring:"


def _nic(where: str, index: int, *, ip: str, mtu: int, offload: bool = True) -> Any:
    """The NIC of one kernel of the run: a port of the switch at ``where`` through a
    device process of its own (``kernel.Net(backend="switch")``), or -- ``where`` is
    ``ring:<endpoint>`` (``--ring``) -- ring port ``index`` of that switch
    (``kernel.Attach``: no device process; its MTU is the switch's ``--ring-mtu``)."""
    import kernel

    if not where.startswith(RING):
        return _net_spec(backend="switch", switch=where, ip=ip, mtu=mtu, offload=offload)
    endpoint = f"{where[len(RING) :]}.ring{index}"
    if os.environ.get(POLL_ENV) == "off":
        return kernel.Attach(endpoint, ip=ip, offload=offload, poll_us=0)
    return kernel.Attach(endpoint, ip=ip, offload=offload)


#: Payload sizes of the rows (bytes).
SIZES = (64, 256, 1024, 4096, 16384, 65507)
#: The TCP_STREAM rows: (name, message size, offloads on the sending kernel).
TCP_ROWS = (
    ("tcp-1024", 1024, True),
    ("tcp-16384", 16384, True),
    ("tcp-65536", 65536, True),
    ("tcp-65536-notso", 65536, False),
)
#: The kernels' MTU in the TCP rows: a real Ethernet's, so TSO is what makes segments big.
TCP_MTU = 1500
TCP_PORT = 9001
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


def _rx_interrupts(dev: Any) -> int:
    """Interrupts of every receive queue of a kernel's NIC."""
    link = dev.link
    rxqs = getattr(link, "rxqs", None) or [dev.queues[0]]
    return sum(q.stats.interrupts for q in rxqs)


def _tx_kicks(dev: Any) -> int:
    """Kicks sent on every transmit queue of a kernel's NIC."""
    link = dev.link
    txqs = getattr(link, "txqs", None) or [dev.queues[1]]
    return sum(q.stats.kicks_sent for q in txqs)


def _receiver_counters(dev: Any) -> dict[str, Any]:
    """What a receiving kernel reports with each row: its NIC's receive interrupts and
    frames, and the device process's pid (for per-process CPU)."""
    return {
        "interrupts": _rx_interrupts(dev),
        "rx_frames": dev.rx_frames,
        "device_pid": dev.pid,
    }


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

    spec = _nic(switch, 1, ip="10.0.0.2/24", mtu=BENCH_MTU)
    with kernel.boot(devices=[spec]) as k:
        fd = k.sys.socket(2, 2)
        k.sys.setsockopt(fd, 1, 8, 8 << 20)  # SOL_SOCKET, SO_RCVBUF
        k.sys.bind(fd, ("10.0.0.2", UDP_PORT))
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
            return _receiver_counters(dev)

        print(json.dumps({"port": UDP_PORT}), flush=True)
        _serve_rows(box, extra)
        stop.set()
        t.join(2)


def _tcp_reader(recv_into: Any, box: list[_Counter]) -> None:
    """Read one connection to its end, counting into ``box[0]`` (``recv_into(buf)`` is
    the reading call: Python's socket or k.sys)."""
    buf = bytearray(1 << 20)
    while True:
        try:
            n = recv_into(buf)
        except (OSError, TimeoutError):
            return
        if not n:
            return
        box[0].add(n)


def _peer_native_tcp() -> None:
    """Accept TCP connections on 127.0.0.1 (port printed first) and read each to its
    end; rows via :func:`_serve_rows`."""
    import socket
    import threading

    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    box = [_Counter()]

    def acceptor() -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return

            def read(c: socket.socket = c) -> None:
                with c:
                    _tcp_reader(c.recv_into, box)

            threading.Thread(target=read, daemon=True).start()

    threading.Thread(target=acceptor, daemon=True).start()
    print(json.dumps({"port": ls.getsockname()[1]}), flush=True)
    _serve_rows(box)
    ls.close()


def _peer_virtio_tcp(switch: str) -> None:
    """Boot kernel B on the switch (MTU 1500, offloads on), accept TCP on
    :data:`TCP_PORT` and read each connection to its end; rows via :func:`_serve_rows`
    (the report adds kernel B's receive-queue interrupts and frames)."""
    import threading

    import kernel
    from kernel.files import SOCK_STREAM

    spec = _nic(switch, 1, ip="10.0.0.2/24", mtu=TCP_MTU)
    with kernel.boot(devices=[spec]) as k:
        lfd = k.sys.socket(type=SOCK_STREAM)
        k.sys.bind(lfd, ("0.0.0.0", TCP_PORT))
        k.sys.listen(lfd, 8)
        k.sys.settimeout(lfd, 0.2)
        box = [_Counter()]
        stop = threading.Event()

        def acceptor() -> None:
            while not stop.is_set():
                try:
                    c, _ = k.sys.accept(lfd)
                except TimeoutError:
                    continue
                except OSError:
                    return

                def read(c: int = c) -> None:
                    try:
                        _tcp_reader(lambda b: k.sys.recv_into(c, b), box)
                    finally:
                        k.sys.close(c)

                threading.Thread(target=read, daemon=True).start()

        t = threading.Thread(target=acceptor, daemon=True)
        t.start()
        dev = k.devices[0]

        def extra() -> dict[str, Any]:
            return _receiver_counters(dev)

        print(json.dumps({"port": TCP_PORT}), flush=True)
        _serve_rows(box, extra)
        stop.set()
        t.join(2)


def cpu_seconds(pid: int) -> float:
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
        # a kernel on a ring port has no device process: its "device" is the switch
        # (counted once, in its own column; pid 0 reads as no CPU)
        self.pids = [0 if i in (1, 3) and p == pids[2] else p for i, p in enumerate(pids)]
        self.start = [cpu_seconds(p) for p in self.pids]

    def per_packet_us(self, packets: int) -> list[float]:
        """CPU µs each process spent per packet since the start (``packets`` received)."""
        now = [cpu_seconds(p) for p in self.pids]
        return [(b - a) * 1e6 / max(1, packets) for a, b in zip(self.start, now, strict=True)]

    def per_mib_ms(self, nbytes: int) -> list[float]:
        """CPU ms each process spent per MiB received since the start."""
        now = [cpu_seconds(p) for p in self.pids]
        mib = max(1, nbytes) / (1 << 20)
        return [(b - a) * 1e3 / mib for a, b in zip(self.start, now, strict=True)]


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
def _in_threads(work: Any, count: int) -> None:
    """Run ``work(i)`` for i in 0..count-1: on this thread when ``count`` is 1, else on
    ``count`` threads at once; the first exception is raised here."""
    if count == 1:
        work(0)
        return
    from hostops.sync import start_thread

    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            work(i)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            errors.append(e)

    threads = [start_thread(body, i, name=f"bench-send-{i}") for i in range(count)]
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _native_row(peer: _Peer, size: int, seconds: float, senders: int = 1) -> float:
    import socket

    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(senders)]
    for s in socks:
        s.connect(("127.0.0.1", peer.hello["port"]))
    payload = os.urandom(size)
    peer.call("start")
    end = time.perf_counter() + seconds

    def work(i: int) -> None:
        send = socks[i].send
        while time.perf_counter() < end:
            for _ in range(64):
                try:
                    send(payload)
                except OSError:  # ENOBUFS/ECONNREFUSED: a lost datagram, go on
                    pass

    _in_threads(work, senders)
    report = peer.call("stop")
    for s in socks:
        s.close()
    return _mbit(report)


def _virtio_row(
    k: Any,
    fds: list[int],
    peer: _Peer,
    size: int,
    seconds: float,
    stage_pids: list[int],
    profiler: Any = None,
) -> tuple[float, float, float, list[float]]:
    payload = os.urandom(size)
    dev = k.devices[0]
    link = dev.link
    before = peer.call("start")
    with _profiled(profiler, _roles(k, stage_pids, peer, before)):
        stages = _Stages([*stage_pids, before["device_pid"], peer.proc.pid])
        kicks0 = _tx_kicks(dev)
        sent0 = dev.tx_frames
        end = time.perf_counter() + seconds
        send = k.sys.send

        def work(i: int) -> None:
            fd = fds[i]
            while time.perf_counter() < end:
                for _ in range(16):
                    try:
                        send(fd, payload)
                    except OSError as e:
                        if e.errno != _ENOBUFS:
                            raise CliError(f"udp-{size}: send failed: {e}") from None
                        link.wait_tx_room(0.1)

        _in_threads(work, len(fds))
        kicks = _tx_kicks(dev) - kicks0
        frames = max(1, dev.tx_frames - sent0)
        report = peer.call("stop")
    irqs = report["interrupts"] - before["interrupts"]
    rx = max(1, report["rx_frames"] - before["rx_frames"])
    return _mbit(report), kicks / frames, irqs / rx, stages.per_packet_us(report["packets"])


def _native_tcp_row(peer: _Peer, size: int, seconds: float) -> float:
    import socket

    s = socket.create_connection(("127.0.0.1", peer.hello["port"]))
    payload = os.urandom(size)
    peer.call("start")
    end = time.perf_counter() + seconds
    sendall = s.sendall
    while time.perf_counter() < end:
        for _ in range(8):
            sendall(payload)
    report = peer.call("stop")
    s.close()
    return _mbit(report)


def _virtio_tcp_row(
    k: Any,
    peer: _Peer,
    name: str,
    size: int,
    seconds: float,
    stage_pids: list[int],
    profiler: Any = None,
    role_suffix: str = "",
) -> tuple[float, float, float, list[float]]:
    from kernel.files import SOCK_STREAM

    fd = k.sys.socket(type=SOCK_STREAM)
    try:
        k.sys.settimeout(fd, 30)
        k.sys.connect(fd, ("10.0.0.2", peer.hello["port"]))
        payload = os.urandom(size)
        dev = k.devices[0]
        before = peer.call("start")
        with _profiled(profiler, _roles(k, stage_pids, peer, before, role_suffix)):
            stages = _Stages([*stage_pids, before["device_pid"], peer.proc.pid])
            kicks0 = _tx_kicks(dev)
            sent0 = dev.tx_frames
            end = time.perf_counter() + seconds
            sendall = k.sys.sendall
            try:
                while time.perf_counter() < end:
                    for _ in range(8):
                        sendall(fd, payload)
            except OSError as e:
                raise CliError(f"{name}: send failed: {e}") from None
            kicks = _tx_kicks(dev) - kicks0
            frames = max(1, dev.tx_frames - sent0)
            report = peer.call("stop")
    finally:
        k.sys.close(fd)
    irqs = report["interrupts"] - before["interrupts"]
    rx = max(1, report["rx_frames"] - before["rx_frames"])
    return _mbit(report), kicks / frames, irqs / rx, stages.per_mib_ms(report["bytes"])


def _run_tcp(
    rows_wanted: list[tuple[str, int, bool]],
    seconds: float,
    switch_ep: str,
    sw_pid: int,
    profiler: Any = None,
) -> tuple[list[NetRow], list[list[Any]]]:
    import kernel

    rows: list[NetRow] = []
    stage_rows: list[list[Any]] = []
    vpeer = _Peer("virtio-tcp", switch_ep)
    npeer = _Peer("native-tcp")
    try:
        kernels: dict[bool, Any] = {}
        try:
            for name, size, offload in rows_wanted:
                if offload not in kernels:
                    ip = "10.0.0.1/24" if offload else "10.0.0.3/24"
                    spec = _nic(switch_ep, 0 if offload else 2, ip=ip, mtu=TCP_MTU, offload=offload)
                    kernels[offload] = kernel.boot(devices=[spec])
                k = kernels[offload]
                pids = [os.getpid(), k.devices[0].pid or 0, sw_pid]
                suffix = "" if offload else "-notso"  # the second kernel and its device
                v, kpp, ipp, cpu = _virtio_tcp_row(
                    k, vpeer, name, size, seconds, pids, profiler, suffix
                )
                n = _native_tcp_row(npeer, size, seconds)
                rows.append(
                    NetRow(
                        name=name,
                        unit="Mbit/s",
                        virtio=round(v, 1),
                        native=round(n, 1),
                        ratio=round(v / n, 4) if n else 0.0,
                        kicks_per_packet=round(kpp, 4),
                        interrupts_per_packet=round(ipp, 4),
                    )
                )
                stage_rows.append([name, *(round(ms, 1) for ms in cpu)])
        finally:
            for k in kernels.values():
                k.shutdown()
    finally:
        vpeer.close()
        npeer.close()
    return rows, stage_rows


def run_net(
    seconds: float = 1.0,
    as_json: bool = False,
    plot: str | None = None,
    only: list[str] | None = None,
    stages_table: bool = False,
    tcp: bool = False,
    profile: str | None = None,
    poll: str = "on",
    ring: bool = False,
    queue_pairs: int = 1,
) -> int:
    """Run the UDP_STREAM rows -- or, with ``tcp``, the TCP_STREAM rows
    (:data:`TCP_ROWS`) -- and print them (with ``stages_table``, also the CPU time each
    process on the virtio path spent per received packet, or per MiB for TCP); returns
    the exit status. With ``profile`` (a directory), py-spy records every process on the
    virtio path while the virtio rows run (:mod:`tools.profile`) and a last line names
    the directory. ``poll`` ``"off"`` turns hybrid polling off in every kernel and
    device of the run. ``ring``: the kernels attach to ring ports of the switch
    (``--ring-ports``) instead of each having a device process. ``queue_pairs``: both
    kernels' NICs have that many queue pairs (see the module docstring)."""
    if poll not in ("on", "off"):
        raise CliError(f"--poll {poll!r}: bench net takes on or off", 2)
    if isinstance(queue_pairs, bool) or not isinstance(queue_pairs, int):
        raise CliError(f"--queue-pairs {queue_pairs!r}: not a number", 2)
    if not 1 <= queue_pairs <= 16:
        raise CliError(f"--queue-pairs {queue_pairs}: bench net takes 1..16", 2)
    if ring and queue_pairs > 1:
        raise CliError("bench net: --queue-pairs goes with device processes, not --ring", 2)
    saved = {v: os.environ.get(v) for v in (POLL_ENV, PAIRS_ENV)}
    os.environ[POLL_ENV] = poll  # this process's kernels and, inherited, the peer's
    os.environ[PAIRS_ENV] = str(queue_pairs)
    try:
        return _run_net(seconds, as_json, plot, only, stages_table, tcp, profile, ring)
    finally:
        for var, old in saved.items():
            if old is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = old


def _run_net(
    seconds: float,
    as_json: bool,
    plot: str | None,
    only: list[str] | None,
    stages_table: bool,
    tcp: bool,
    profile: str | None,
    ring: bool = False,
) -> int:
    if tcp:
        return _run_net_tcp(seconds, as_json, plot, only, stages_table, profile, ring)
    picked = _select([f"udp-{n}" for n in SIZES], only)
    sizes = [n for n in SIZES if f"udp-{n}" in picked]
    if plot:
        _check_plot_target(plot)
    profiler = _profiler(profile)
    import kernel

    rows: list[NetRow] = []
    stage_rows: list[list[Any]] = []
    with _bench_switch(BENCH_MTU if ring else None) as (switch_ep, switch_pid):
        spec = _nic(switch_ep, 0, ip="10.0.0.1/24", mtu=BENCH_MTU)
        with kernel.boot(devices=[spec]) as k:
            vpeer = _Peer("virtio", switch_ep)
            npeer = _Peer("native")
            try:
                pairs = _queue_pairs()
                fds = []
                for i in range(pairs):  # one socket per sending thread (module docstring)
                    fd = k.sys.socket(2, 2)
                    if pairs > 1:
                        port = _port_for_pair(i, pairs, "10.0.0.1", "10.0.0.2", UDP_PORT)
                        k.sys.bind(fd, ("10.0.0.1", port))
                    k.sys.connect(fd, ("10.0.0.2", vpeer.hello["port"]))
                    fds.append(fd)
                pids = [os.getpid(), k.devices[0].pid or 0, switch_pid]
                for size in sizes:
                    row, cpu = _row(k, fds, vpeer, npeer, size, seconds, pids, profiler)
                    rows.append(row)
                    stage_rows.append([row.name, *(round(us, 1) for us in cpu)])
            finally:
                vpeer.close()
                npeer.close()
    stages = "CPU time per received packet, by process on the virtio path (µs):"
    _report(rows, as_json, plot, stage_rows if stages_table else None, stages, _queue_pairs(), ring)
    _profile_done(profiler, as_json)
    return 0


def _select(names: list[str], only: list[str] | None) -> list[str]:
    """The rows ``--only`` asks for (all by default); a usage error names unknown ones."""
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise CliError(f"unknown row(s) {unknown}; rows are {names}", 2)
    return [n for n in names if not only or n in only]


@contextlib.contextmanager
def _bench_switch(ring_mtu: int | None = None) -> Iterator[tuple[str, int]]:
    """A ``python -m vdev switch`` process in a private runtime directory for the run:
    yields where the kernels plug in (its endpoint; with ``ring_mtu``, ``ring:<endpoint>``:
    the switch serves three ring ports of that MTU, see :func:`_nic`) and its pid;
    stopped and cleaned up on the way out."""
    from hostops.process import DeviceProcess, python_argv
    from hostops.rundir import RuntimeDir

    rundir = RuntimeDir.create()
    try:
        switch_ep = rundir.endpoint("bench-switch")
        argv = ["vdev", "switch", "--listen", switch_ep]
        if ring_mtu is not None:
            argv += ["--ring-ports", "3", "--ring-mtu", str(ring_mtu)]
        sw = DeviceProcess.launch(
            python_argv(*argv),
            name="switch",
            log_path=os.path.join(rundir.path, "switch.log"),
        )
        try:
            if ring_mtu is not None:
                _wait_rings(switch_ep, sw)
                switch_ep = RING + switch_ep
            yield switch_ep, sw.pid
        finally:
            sw.stop()
            sw.close()
    finally:
        rundir.cleanup()


def _wait_rings(endpoint: str, sw: Any) -> None:
    """Wait until the switch answers (its ring ports exist once it does)."""
    from vdev.switch import SwitchClient

    with SwitchClient(endpoint) as client:
        for _ in range(20):
            try:
                client.stats(timeout_s=0.5)
                return
            except TimeoutError:
                if not sw.alive:
                    break
    raise CliError("bench net: the switch with ring ports did not start")


def _report(
    rows: list[NetRow],
    as_json: bool,
    plot: str | None,
    stage_rows: list[list[Any]] | None,
    stages_title: str,
    queue_pairs: int = 1,
    ring: bool = False,
) -> None:
    """Print the rows (and the per-process table), draw the plot."""
    _print(rows, as_json, queue_pairs, ring)
    if stage_rows is not None and not as_json:
        print()
        print(stages_title)
        print(render_table(["workload", *_Stages.NAMES], stage_rows))
    if plot:
        _plot(rows, plot)


def _run_net_tcp(
    seconds: float,
    as_json: bool,
    plot: str | None,
    only: list[str] | None,
    stages_table: bool,
    profile: str | None = None,
    ring: bool = False,
) -> int:
    picked = _select([r[0] for r in TCP_ROWS], only)
    wanted = [r for r in TCP_ROWS if r[0] in picked]
    if plot:
        _check_plot_target(plot)
    profiler = _profiler(profile)
    with _bench_switch(TCP_MTU if ring else None) as (switch_ep, switch_pid):
        rows, stage_rows = _run_tcp(wanted, seconds, switch_ep, switch_pid, profiler)
    stages = "CPU time per MiB received, by process on the virtio path (ms):"
    _report(rows, as_json, plot, stage_rows if stages_table else None, stages, _queue_pairs(), ring)
    _profile_done(profiler, as_json)
    return 0


def _profiler(profile: str | None) -> Any:
    """A :class:`tools.profile.Profiler` for ``--profile DIR`` (checked before the run:
    py-spy installed, DIR writable), or None."""
    if profile is None:
        return None
    from tools import profile as profiling

    return profiling.Profiler(*profiling.check_profile_dir(profile))


def _profile_done(profiler: Any, as_json: bool) -> None:
    """Write the profiles and print the one line naming them (to stderr under --json,
    so stdout stays one JSON object)."""
    if profiler is not None:
        profiler.finish()
        print(profiler.report_line(), file=sys.stderr if as_json else sys.stdout)


def _roles(
    k: Any, stage_pids: list[int], peer: _Peer, before: dict[str, Any], suffix: str = ""
) -> dict[str, int]:
    """Role -> pid of every process on the virtio path of a row: this kernel, its
    device (``eth0``), the switch, the peer kernel and the peer's device (one NIC, so
    also ``eth0`` there)."""
    name = k.devices[0].name
    roles = {
        "kernel": stage_pids[0],
        f"{name}{suffix}": stage_pids[1],
        "switch": stage_pids[2],
        "peer-kernel": peer.proc.pid,
        f"peer-{name}": int(before.get("device_pid") or 0),
    }
    # ring ports: the devices are the switch itself, profiled once as "switch"
    return {r: p for r, p in roles.items() if r == "switch" or p != stage_pids[2]}


def _profiled(profiler: Any, roles: dict[str, int]) -> contextlib.AbstractContextManager[Any]:
    """Profile ``roles`` while the block runs (nothing without a profiler)."""
    if profiler is None:
        return contextlib.nullcontext()
    cm: contextlib.AbstractContextManager[Any] = profiler.section(roles)
    return cm


def _row(
    k: Any,
    fds: list[int],
    vpeer: _Peer,
    npeer: _Peer,
    size: int,
    seconds: float,
    pids: list[int],
    profiler: Any = None,
) -> tuple[NetRow, list[float]]:
    v, kpp, ipp, cpu = _virtio_row(k, fds, vpeer, size, seconds, pids, profiler)
    n = _native_row(npeer, size, seconds, len(fds))
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


def _print(rows: list[NetRow], as_json: bool, queue_pairs: int = 1, ring: bool = False) -> None:
    ports = "ring" if ring else "device processes"
    if as_json:
        doc = {"queue_pairs": queue_pairs, "ports": ports, "rows": [asdict(r) for r in rows]}
        print(json.dumps(doc))
    else:
        print(f"virtio-net queue pairs: {queue_pairs}; switch ports: {ports}")
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
    proto = "TCP" if rows and rows[0].name.startswith("tcp-") else "UDP"
    main = [r for r in rows if not r.name.endswith("-notso")]
    extra = [r for r in rows if r.name.endswith("-notso")]
    sizes = [int(r.name.split("-")[1]) for r in main]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(sizes, [r.native for r in main], "o-", label=f"native Python {proto} (Linux loopback)")
    label = "virtio-lab (two kernels, switch" + (", TSO)" if proto == "TCP" else ")")
    ax.plot(sizes, [r.virtio for r in main], "s-", label=label)
    for r in extra:
        size = int(r.name.split("-")[1])
        ax.plot([size], [r.virtio], "x", markersize=9, label="virtio-lab without TSO")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("UDP payload (bytes)" if proto == "UDP" else "TCP message size (bytes)")
    ax.set_ylabel("received goodput (Mbit/s)")
    ax.set_title(f"{proto}_STREAM, 2 processes, same run")
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
    elif argv[:1] == ["virtio"] and len(argv) == 2:
        _peer_virtio(argv[1])
    elif argv[:1] == ["native-tcp"]:
        _peer_native_tcp()
    elif argv[:1] == ["virtio-tcp"] and len(argv) == 2:
        _peer_virtio_tcp(argv[1])
    else:
        print(
            "usage: python -m tools.bench_net peer native|native-tcp|virtio EP|virtio-tcp EP",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        sys.exit(_peer_main(sys.argv[2:]))
    print("usage: python -m tools.bench_net peer ...", file=sys.stderr)
    sys.exit(2)
