"""The device API for devices that keep chains, over both transports, in real processes.

``Relay`` below is a device written only against the public API (``vdev.Device``,
``vdev.PENDING``): it keeps every request and completes it later, from event sources of
its own — a FIFO it watches from ``__init__`` (each byte the test writes is a command,
``c``: answer the oldest request on queue 0) and ``call_later`` timers (queue 1). This
very file is the device process's program (``python tests/integration/test_device_api.py
--control EP | --vhost-user SOCK``), so the device runs in a process of its own, over
real shared memory, real ZeroMQ doorbells or a real vhost-user socket with memfds and
eventfds. The drivers are written here on ``vdev.virtio`` (``DriverQueue``).

Nothing sleeps: the device writes one byte to an *ack* FIFO per request it keeps
(``h``) and per command batch it ran (``a``); the test waits on that FIFO, on doorbells,
eventfds, sockets and the device's log, always with a deadline. A request/reply on the
control channel after an ack proves the interrupts that batch owed have been decided.
Counters: the device's own are in its config space (GET_CONFIG on both transports); the
session's come from GET_METRICS (ZeroMQ) or the totals the vhost-user back-end logs
when a connection ends.
"""

from __future__ import annotations

import argparse
import array
import mmap
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostops.barrier import full_barrier
from hostops.control import ControlClient
from hostops.doorbell import Doorbell, DoorbellListener
from hostops.process import DeviceProcess
from hostops.rundir import RuntimeDir
from hostops.shm import SharedRegion
from vdev import PENDING, Chain, Device, Pending, TimerHandle
from vdev.virtio import DriverQueue, F, FlatMemory, RegionMemory, RingLayout, UsageError, bit
from vdev.virtio.control import CONFIG_CHANGE, decode_reply, encode_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
QSIZE = 64
REGION = 1 << 20
TIMEOUT = 10.0
STARTUP_TIMEOUT = 15.0
LONG = 3600.0  # a timer that must never fire: the test ends long before

#: The device's own counters, in this order after the u32 generation in its config.
RELAY_COUNTERS = (
    "handled",
    "commands",
    "idle_commands",
    "usage_errors",
    "views_released",
    "released_calls",
    "timers_cancelled",
    "resets_seen",
)
CONFIG = struct.Struct(f"<{1 + len(RELAY_COUNTERS)}I")


# =========================================================================== the device


class Relay(Device):
    """Keeps every request; answers with the request upper-cased, later.

    Queue 0: answered one per ``c`` command read from the command FIFO. Queue 1: the
    request is ``@SECONDS:...``; answered by a timer after SECONDS. Other commands:
    ``s`` tries to complete every chain released by a stop or reset (each must raise
    UsageError), ``g`` changes the config space and notifies the driver, ``x`` raises
    (a bug in the callback). One ``h`` goes to the ack FIFO per request kept, one ``a``
    per command batch (written before the callback returns)."""

    device_id = 0x7D
    name = "relay"
    num_queues = 2
    max_queue_size = QSIZE

    def __init__(self, commands: str, acks: str) -> None:
        super().__init__()
        self.metrics.declare(*RELAY_COUNTERS)
        self.cmd_fd = os.open(commands, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.ack_fd = os.open(acks, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.generation = 0
        self.waiting: deque[Chain] = deque()
        self.timers: dict[Chain, TimerHandle] = {}
        self.views: dict[Chain, memoryview] = {}  # a view of each kept chain, to probe
        self.stale: list[tuple[int, Chain]] = []
        self.watch(self.cmd_fd, self.on_commands)  # before the runtime exists

    def config(self) -> bytes:
        return CONFIG.pack(self.generation, *(self.metrics[n] for n in RELAY_COUNTERS))

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        self.metrics.inc("handled")
        self.views[chain] = chain.writable[0]
        if queue == 0:
            self.waiting.append(chain)
        else:
            head = chain.read(0, min(chain.readable_len, 16)).split(b":")[0]
            delay = float(head[1:]) if head[:1] == b"@" else 0.0
            self.timers[chain] = self.call_later(delay, lambda: self.on_timer(chain))
        os.write(self.ack_fd, b"h")
        return PENDING

    def answer(self, queue: int, chain: Chain) -> None:
        data = chain.read(0, min(chain.readable_len, chain.writable_len)).upper()
        chain.write(0, data)
        del self.views[chain]
        self.complete(queue, chain, len(data))

    def on_timer(self, chain: Chain) -> None:
        del self.timers[chain]
        self.answer(1, chain)

    def on_commands(self) -> None:
        try:
            data = os.read(self.cmd_fd, 256)  # bounded; the rest comes next round
        except BlockingIOError:
            return
        try:
            for cmd in data:
                self.metrics.inc("commands")
                if cmd == ord("c"):
                    if self.waiting:
                        self.answer(0, self.waiting.popleft())
                    else:
                        self.metrics.inc("idle_commands")
                elif cmd == ord("s"):
                    while self.stale:
                        queue, chain = self.stale.pop()
                        try:
                            self.complete(queue, chain, 0)
                        except UsageError:
                            self.metrics.inc("usage_errors")
                elif cmd == ord("g"):
                    self.generation += 1
                    self.notify_config_change()
                elif cmd == ord("x"):
                    raise RuntimeError("relay: bug in a callback, on purpose")
        finally:
            os.write(self.ack_fd, b"a")

    def released(self, queue: int) -> None:
        self.metrics.inc("released_calls")
        if queue == 0:
            chains = list(self.waiting)
            self.waiting.clear()
        else:
            chains = list(self.timers)
            for chain in chains:
                if self.timers.pop(chain).cancel():
                    self.metrics.inc("timers_cancelled")
        for chain in chains:
            view = self.views.pop(chain)
            try:
                bytes(view)
            except ValueError:  # the session dropped the chain's memory
                if chain.writable == [] and chain.writable_len == 0:
                    self.metrics.inc("views_released")
            self.stale.append((queue, chain))

    def reset(self) -> None:
        self.metrics.inc("resets_seen")
        super().reset()

    def close(self) -> None:
        os.close(self.cmd_fd)
        os.close(self.ack_fd)


def main(argv: list[str] | None = None) -> int:
    """The device process: ``--control EP`` (ZeroMQ) or ``--vhost-user SOCK``."""
    p = argparse.ArgumentParser(prog="relay")
    p.add_argument("--commands", required=True)
    p.add_argument("--acks", required=True)
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--control")
    t.add_argument("--vhost-user")
    args = p.parse_args(argv)
    device = Relay(args.commands, args.acks)
    if args.vhost_user:
        from vdev.vhost_user import serve as serve_vhost_user

        return serve_vhost_user(device, args.vhost_user)
    from vdev.runtime import serve

    return serve(device, args.control)


# =========================================================================== drivers


class Driver:
    """What both transports' drivers share: rings in memory, buffers, the FIFOs."""

    def __init__(self, tmp: Path) -> None:
        self.cmd_path, self.ack_path = str(tmp / "commands"), str(tmp / "acks")
        os.mkfifo(self.cmd_path)
        os.mkfifo(self.ack_path)
        self.cmd_fd = os.open(self.cmd_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.ack_fd = os.open(self.ack_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.memory: Any = None
        self.queues: list[DriverQueue] = []
        self.layouts = [RingLayout.packed(QSIZE, 0), RingLayout.packed(QSIZE, 0x4000)]
        self.bufs: dict[int, tuple[int, int]] = {}
        self.token = 0
        self.top = 0x10000
        self.irqs = [0, 0]

    def make_queues(self, features: int) -> None:
        self.queues = [
            DriverQueue(
                self.memory,
                lay,
                event_idx=bool(features & bit(F.EVENT_IDX)),
                indirect=bool(features & bit(F.INDIRECT_DESC)),
            )
            for lay in self.layouts
        ]

    def submit(self, queue: int, data: bytes, wlen: int = 32) -> int:
        if self.top + len(data) + wlen + 128 > REGION:
            self.top = 0x10000
        r, self.top = self.top, self.top + ((len(data) + 63) & ~63)
        w, self.top = self.top, self.top + ((wlen + 63) & ~63)
        self.memory.view(r, len(data))[:] = data
        self.token += 1
        self.bufs[self.token] = (w, wlen)
        self.queues[queue].add([(r, len(data))], [(w, wlen)], self.token)
        return self.token

    def kick(self, queue: int) -> None:
        if self.queues[queue].kick_prepare():
            self.ring_kick(queue)

    def ring_kick(self, queue: int) -> None:
        raise NotImplementedError

    def reap(self, queue: int) -> list[tuple[int, int, bytes]]:
        out = []
        for token, n in self.queues[queue].get_used():
            w, _ = self.bufs.pop(token)
            out.append((token, n, bytes(self.memory.view(w, n))))
        return out

    def wait_used(self, queue: int, n: int) -> list[tuple[int, int, bytes]]:
        got: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            got += self.reap(queue)
            if len(got) >= n:
                assert len(got) == n, got
                return got
            if self.queues[queue].enable_interrupts():
                continue
            left = deadline - time.monotonic()
            assert left > 0, f"queue {queue}: {len(got)} of {n} completions"
            self.wait_interrupt(queue, left)

    def wait_interrupt(self, queue: int, timeout: float) -> None:
        raise NotImplementedError

    def expect_acks(self, want: bytes) -> None:
        got = b""
        deadline = time.monotonic() + TIMEOUT
        while len(got) < len(want):
            left = deadline - time.monotonic()
            assert left > 0, f"acks: got {got!r}, want {want!r}"
            if select.select([self.ack_fd], [], [], left)[0]:
                got += os.read(self.ack_fd, len(want) - len(got))
        assert got == want

    def command(self, cmds: bytes) -> None:
        """Send one batch of commands (one write: one callback) and wait for its ack."""
        assert os.write(self.cmd_fd, cmds) == len(cmds)
        self.expect_acks(b"a")

    def device_counters(self) -> dict[str, int]:
        values = CONFIG.unpack(self.read_config(CONFIG.size))
        return {"generation": values[0], **dict(zip(RELAY_COUNTERS, values[1:], strict=True))}

    def read_config(self, size: int) -> bytes:
        raise NotImplementedError

    def interrupts(self, queue: int) -> int:
        """Interrupts sent for ``queue`` so far (after a round trip that proves the
        device has decided them)."""
        raise NotImplementedError

    def close_fifos(self) -> None:
        os.close(self.cmd_fd)
        os.close(self.ack_fd)


class ZmqDriver(Driver):
    """Our control channel, a POSIX shm region and ZeroMQ doorbells."""

    def __init__(self, tmp: Path, rundir: RuntimeDir) -> None:
        super().__init__(tmp)
        self.ctl_ep = rundir.endpoint("relay.ctl")
        self.kick_ep = rundir.endpoint("relay.kick")
        self.call_ep = rundir.endpoint("relay.call")
        self.log_path = os.path.join(rundir.path, "relay.log")
        self.call = DoorbellListener(self.call_ep)
        self.calls_seen: list[int] = []
        argv = [sys.executable, __file__, "--control", self.ctl_ep]
        argv += ["--commands", self.cmd_path, "--acks", self.ack_path]
        self.proc = DeviceProcess.launch(argv, name="relay", log_path=self.log_path)
        self.ctl = ControlClient(self.ctl_ep, peer_alive=self.proc.alive)
        self.kick_bell = Doorbell(self.kick_ep)
        self.region: SharedRegion | None = None

    def req(self, type_: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        return decode_reply(self.ctl.call(encode_request(type_, **fields), timeout_s=timeout))

    def bring_up(self) -> None:
        info = self.req("GET_DEVICE_INFO", timeout=STARTUP_TIMEOUT)
        assert info["device_id"] == Relay.device_id and info["num_queues"] == 2
        self.req("RESET_DEVICE")
        self.req("SET_STATUS", status=1)
        self.req("SET_STATUS", status=3)
        features = int(self.req("GET_FEATURES")["features"])
        assert features & bit(F.EVENT_IDX)
        self.req("SET_FEATURES", features=features)
        self.req("SET_STATUS", status=11)
        if self.region is not None:
            self.memory = None
            self.region.close()
        self.region = SharedRegion.create(REGION, tag="test")
        self.req(
            "SET_MEM_TABLE",
            regions=[{"guest_addr": 0, "size": REGION, "shm": self.region.name}],
        )
        self.region.unlink()
        self.memory = FlatMemory(self.region.buf, base=0, barrier=full_barrier)
        self.make_queues(features)
        for i, lay in enumerate(self.layouts):
            self.req("SET_VRING_NUM", index=i, num=QSIZE)
            self.req("SET_VRING_ADDR", index=i, desc=lay.desc, avail=lay.avail, used=lay.used)
            self.req("SET_VRING_BASE", index=i, base=0)
            self.req("SET_VRING_KICK", index=i, endpoint=self.kick_ep)
            self.req("SET_VRING_CALL", index=i, endpoint=self.call_ep)
            self.req("SET_VRING_ENABLE", index=i, enable=True)
        self.req("SET_STATUS", status=15)

    def ring_kick(self, queue: int) -> None:
        self.kick_bell.ring(queue)

    def wait_interrupt(self, queue: int, timeout: float) -> None:
        self.calls_seen += self.call.wait(timeout)

    def wait_config_change(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while CONFIG_CHANGE not in self.calls_seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no CONFIG_CHANGE; saw {self.calls_seen}"
            self.calls_seen += self.call.wait(left)

    def read_config(self, size: int) -> bytes:
        return bytes(self.req("GET_CONFIG", offset=0, size=size)["data"])

    def interrupts(self, queue: int) -> int:
        return int(self.req("GET_METRICS")["queues"][queue]["interrupts_sent"])

    def get_vring_base(self, queue: int) -> int:
        return int(self.req("GET_VRING_BASE", index=queue)["base"])

    def reset(self) -> None:
        self.req("SET_STATUS", status=0)  # the other way to reset: RESET_DEVICE is below

    def session_counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.req("GET_METRICS")["device"].items()}

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()
        except OSError:
            return ""

    def close(self) -> None:
        for closer in (
            lambda: self.req("RESET_DEVICE", timeout=1.0) if self.proc.alive() else None,
            self.ctl.close,
            self.kick_bell.close,
            self.call.close,
            lambda: self.proc.stop(),
            self.proc.close,
        ):
            try:
                closer()
            except Exception:
                pass
        self.memory = None
        self.queues = []
        if self.region is not None:
            self.region.unlink()
            self.region.close()
        self.close_fifos()


USER = 0x7F00_0000_0000  # where the region sits in the front-end's "address space"


class VhostUserDriver(Driver):
    """A QEMU-like vhost-user front-end: memfd memory, eventfds, the back-end's log."""

    def __init__(self, tmp: Path) -> None:
        from vdev.virtio import vhost_user as vu

        super().__init__(tmp)
        self.vu = vu
        self.sock_path = str(tmp / "relay.sock")
        argv = [sys.executable, __file__, "--vhost-user", self.sock_path]
        argv += ["--commands", self.cmd_path, "--acks", self.ack_path]
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        self._buf = b""
        self.lines: list[str] = []
        self._seen = 0
        self.sock: socket.socket | None = None
        self.fds: list[int] = []
        self.maps: list[mmap.mmap] = []
        self.kicks = [-1, -1]
        self.calls = [-1, -1]
        self.wait_log("listening on")

    # -- the back-end's log
    def _pump(self, timeout: float) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            return
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            assert self.proc.poll() is None, f"back-end exited: {self.lines}"
            return
        self._buf += chunk
        *done, self._buf = self._buf.split(b"\n")
        self.lines += [d.decode(errors="replace") for d in done]

    def wait_log(self, text: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while True:
            for i in range(self._seen, len(self.lines)):
                if text in self.lines[i]:
                    self._seen = i + 1
                    return self.lines[i]
            left = deadline - time.monotonic()
            assert left > 0, f"no log line with {text!r} in {self.lines}"
            self._pump(left)

    # -- wire
    def request(
        self, req: Any, payload: object = None, fds: tuple[int, ...] = (), ack: bool = True
    ) -> object:
        """Send ``req``; its reply, or the REPLY_ACK value (None when ``not ack``)."""
        vu = self.vu
        assert self.sock is not None
        has_reply = req in vu.REPLY_KIND
        data = vu.encode(req, payload, need_reply=ack and not has_reply)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.sock.sendmsg([data], anc if fds else [])
        if not has_reply and not ack:
            return None
        hdr = vu.decode_header(self._recv(vu.HEADER_SIZE), reply=True)
        return vu.decode_reply(req, hdr, self._recv(hdr.size))

    def _recv(self, n: int) -> bytes:
        assert self.sock is not None
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "back-end closed the connection"
            out += chunk
        return out

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(self.sock_path)
        self.wait_log("front-end connected")
        vu, Req = self.vu, self.vu.Req
        want = (
            bit(vu.ProtocolFeature.MQ)
            | bit(vu.ProtocolFeature.REPLY_ACK)
            | bit(vu.ProtocolFeature.CONFIG)
            | bit(vu.ProtocolFeature.RESET_DEVICE)
        )
        assert int(self.request(Req.GET_PROTOCOL_FEATURES)) & want == want  # type: ignore[call-overload]
        self.request(Req.SET_PROTOCOL_FEATURES, want, ack=False)  # REPLY_ACK not yet on
        assert self.request(Req.GET_QUEUE_NUM) == 2
        assert self.request(Req.SET_OWNER) == 0

    def bring_up(self) -> None:
        vu, Req = self.vu, self.vu.Req
        if self.sock is None:
            self.connect()
        features = self.request(Req.GET_FEATURES)
        assert isinstance(features, int) and features & bit(F.EVENT_IDX)
        assert self.request(Req.SET_FEATURES, features) == 0
        fd = os.memfd_create("relay", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, REGION)
        self.fds.append(fd)
        m = mmap.mmap(fd, REGION, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.maps.append(m)
        table = vu.MemoryTable((vu.MemoryRegion(0, REGION, USER, 0),))
        assert self.request(Req.SET_MEM_TABLE, table, (fd,)) == 0
        self.memory = RegionMemory([(0, memoryview(m))])
        self.make_queues(features)
        for i, lay in enumerate(self.layouts):
            self._drain_calls()
            kick, call = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2))
            self.fds += [kick, call]
            self.kicks[i], self.calls[i] = kick, call
            addr = vu.VringAddr(i, 0, lay.desc + USER, lay.used + USER, lay.avail + USER, 0)
            assert self.request(Req.SET_VRING_NUM, vu.VringState(i, QSIZE)) == 0
            assert self.request(Req.SET_VRING_BASE, vu.VringState(i, 0)) == 0
            assert self.request(Req.SET_VRING_ADDR, addr) == 0
            assert self.request(Req.SET_VRING_KICK, i, (kick,)) == 0
            assert self.request(Req.SET_VRING_CALL, i, (call,)) == 0
            assert self.request(Req.SET_VRING_ENABLE, vu.VringState(i, 1)) == 0

    def ring_kick(self, queue: int) -> None:
        os.eventfd_write(self.kicks[queue], 1)

    def _drain_calls(self) -> None:
        for i, fd in enumerate(self.calls):
            if fd >= 0:
                try:
                    self.irqs[i] += os.eventfd_read(fd)  # the counter: one per interrupt
                except BlockingIOError:
                    pass

    def wait_interrupt(self, queue: int, timeout: float) -> None:
        if select.select([self.calls[queue]], [], [], timeout)[0]:
            self._drain_calls()

    def read_config(self, size: int) -> bytes:
        cfg = self.request(self.vu.Req.GET_CONFIG, self.vu.ConfigPayload(0, size, 0, bytes(size)))
        assert isinstance(cfg, self.vu.ConfigPayload)
        return cfg.data

    def interrupts(self, queue: int) -> int:
        self.read_config(4)  # a round trip: whatever the device owed is decided
        self._drain_calls()
        return self.irqs[queue]

    def get_vring_base(self, queue: int) -> int:
        st = self.request(self.vu.Req.GET_VRING_BASE, self.vu.VringState(queue, 0))
        assert isinstance(st, self.vu.VringState)
        return st.num

    def reset(self) -> None:
        assert self.request(self.vu.Req.RESET_DEVICE) == 0

    def disconnect(self) -> dict[str, int]:
        """Close the connection; return the session totals the back-end logs."""
        self._drain_calls()
        assert self.sock is not None
        self.sock.close()
        self.sock = None
        self.queues = []
        self.memory = None
        for m in self.maps:
            try:
                m.close()
            except BufferError:
                pass
        self.maps.clear()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.kicks, self.calls = [-1, -1], [-1, -1]
        line = self.wait_log("closed")
        totals = re.search(r"\(totals: (.*)\)$", line)
        assert totals, line
        return {k: int(v) for k, v in (kv.rsplit(" ", 1) for kv in totals[1].split(", "))}

    def session_counters(self) -> dict[str, int]:
        return self.disconnect()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.disconnect()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(TIMEOUT)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        self.close_fifos()
        assert rc == 0, self.lines
        assert not os.path.exists(self.sock_path)


# =========================================================================== fixtures


@pytest.fixture
def rundir() -> Iterator[RuntimeDir]:
    rd = RuntimeDir.create()
    try:
        yield rd
    finally:
        rd.cleanup()


@pytest.fixture(params=["zmq", "vhost-user"])
def driver(request: pytest.FixtureRequest, tmp_path: Path, rundir: RuntimeDir) -> Iterator[Any]:
    d: Driver
    d = ZmqDriver(tmp_path, rundir) if request.param == "zmq" else VhostUserDriver(tmp_path)
    try:
        yield d
    finally:
        d.close()


def _upper(words: list[bytes]) -> list[tuple[int, bytes]]:
    return [(len(w), w.upper()) for w in words]


# =========================================================================== tests


def test_kept_chains_completed_from_the_devices_own_sources(driver: Any) -> None:
    """Keep, complete from the watched FIFO and from timers, EVENT_IDX batching, a bug
    in a callback, GET_VRING_BASE and a reset with chains kept, then work again."""
    d = driver
    d.bring_up()

    # -- queue 0: kept until a command says so; queue 1: a timer answers
    words = [b"alpha", b"beta", b"gamma"]
    tokens = [d.submit(0, w) for w in words]
    d.kick(0)
    d.expect_acks(b"hhh")
    assert d.reap(0) == [], "kept chains are not used yet"
    assert d.device_counters()["handled"] == 3
    d.command(b"ccc")
    got = d.wait_used(0, 3)
    assert [t for t, _, _ in got] == tokens and [(n, b) for _, n, b in got] == _upper(words)
    t = d.submit(1, b"@0:delta")
    d.kick(1)
    d.expect_acks(b"h")
    assert d.wait_used(1, 1) == [(t, 8, b"@0:DELTA")]
    assert d.interrupts(0) == 1 and d.interrupts(1) == 1

    # -- EVENT_IDX (§2.7.10): one decision per callback, suppressed while the driver
    # has not caught up with used_event
    assert not d.queues[0].enable_interrupts()  # used_event = 3
    batch = [b"w%d" % i for i in range(8)]
    for w in batch:
        d.submit(0, w)
    d.kick(0)
    d.expect_acks(b"h" * 8)
    d.command(b"c" * 8)
    assert d.interrupts(0) == 2, "8 completions in one callback: one interrupt"
    more = [b"m%d" % i for i in range(4)]
    for w in more:
        d.submit(0, w)
    d.kick(0)
    d.expect_acks(b"hhhh")
    d.command(b"cccc")
    assert d.interrupts(0) == 2, "used_event is behind: no interrupt (§2.7.10)"
    assert [(n, b) for _, n, b in d.reap(0)] == _upper(batch + more)
    assert not d.queues[0].enable_interrupts()  # used_event = 15
    for w in (b"y", b"z"):
        d.submit(0, w)
    d.kick(0)
    d.expect_acks(b"hh")
    d.command(b"cc")
    assert d.interrupts(0) == 3
    assert [(n, b) for _, n, b in d.reap(0)] == _upper([b"y", b"z"])

    # -- a bug in the device's callback is counted; the device goes on
    d.command(b"x")
    d.command(b"c")  # nothing waits: an idle command
    assert d.device_counters()["idle_commands"] == 1

    # -- GET_VRING_BASE stops queue 0: its two kept chains are released, never used
    for w in (b"k1", b"k2"):
        d.submit(0, w)
    d.kick(0)
    d.expect_acks(b"hh")
    assert d.get_vring_base(0) == 3 + 8 + 4 + 2 + 2
    c = d.device_counters()
    assert c["released_calls"] == 1 and c["views_released"] == 2
    d.command(b"s")  # completing a released chain raises UsageError in the device
    assert d.device_counters()["usage_errors"] == 2

    # -- a reset with chains kept on queue 1 (timers that must never fire)
    for w in (b"@%d:t1" % LONG, b"@%d:t2" % LONG):
        d.submit(1, w)
    d.kick(1)
    d.expect_acks(b"hh")
    resets = d.device_counters()["resets_seen"]
    d.reset()
    c = d.device_counters()
    assert c["released_calls"] == 2 and c["views_released"] == 4
    assert c["timers_cancelled"] == 2 and c["resets_seen"] == resets + 1
    d.command(b"s")
    assert d.device_counters()["usage_errors"] == 4

    # -- negotiated again, the same device process works
    d.bring_up()
    t = d.submit(0, b"again")
    d.kick(0)
    d.expect_acks(b"h")
    d.command(b"c")
    assert d.wait_used(0, 1) == [(t, 5, b"AGAIN")]

    s = d.session_counters()
    assert s["chains_kept"] == 3 + 1 + 8 + 4 + 2 + 2 + 2 + 1
    assert s["completions"] == 3 + 1 + 8 + 4 + 2 + 1
    assert s["chains_released"] == 4 and s["stale_completions"] == 4
    assert s["timers_fired"] == 1 and s["handler_errors"] == 1
    # q0: 3 batches that interrupted + the last one; q1: the timer's
    assert s["interrupts"] == 5


def test_config_change_over_zmq_rings_config_change(tmp_path: Path, rundir: RuntimeDir) -> None:
    d = ZmqDriver(tmp_path, rundir)
    try:
        d.bring_up()
        assert d.device_counters()["generation"] == 0
        d.command(b"g")
        d.wait_config_change()
        assert d.device_counters()["generation"] == 1
        s = d.session_counters()
        assert s["config_interrupts"] == 1 and s["config_interrupts_dropped"] == 0
        assert d.req("GET_STATUS")["status"] == 15, "a config change is not an error"
    finally:
        d.close()
    assert "Traceback" not in d.log()


def test_vhost_user_config_change_is_counted_and_disconnect_releases(tmp_path: Path) -> None:
    d = VhostUserDriver(tmp_path)
    try:
        d.bring_up()
        d.command(b"g")
        d.command(b"g")
        assert d.device_counters()["generation"] == 2
        d.wait_log("config change not announced")
        for w in (b"one", b"two", b"three"):
            d.submit(0, w)
        d.kick(0)
        d.expect_acks(b"hhh")
        s = d.disconnect()  # the front-end goes away with three chains kept
        assert s["config_interrupts_unsupported"] == 2
        assert s["chains_released"] == 3 and s["chains_kept"] == 3
        # logged before the "closed" line
        assert "vhost-user relay: queue 0: 3 kept chain(s) released" in d.lines
        # the next front-end gets a device that works
        d.bring_up()
        assert d.device_counters()["resets_seen"] == 1
        assert d.device_counters()["views_released"] == 3
        t = d.submit(0, b"next")
        d.kick(0)
        d.expect_acks(b"h")
        d.command(b"c")
        assert d.wait_used(0, 1) == [(t, 4, b"NEXT")]
    finally:
        d.close()
    assert sum("config change not announced" in line for line in d.lines) == 1


if __name__ == "__main__":
    sys.exit(main())
