"""``python -m vdev net`` run for real: its command line, and the device process serving
a hand-written driver over real shared memory, ZeroMQ doorbells and control channel.

Bad command lines must end with exactly one line on stderr, status 2, no traceback.
A running device is asked who it is and what its config space holds (the default MAC is
derived from the endpoint), then driven on both queues through the loopback backend and
through the pcap backend (a replay file in, a recording out). A vhost-user device starts,
listens and removes its socket on SIGTERM. Nothing sleeps: every wait is on a process, a
reply or a doorbell, with a deadline.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hostops.barrier import full_barrier
from hostops.clock import monotonic
from hostops.control import ControlClient
from hostops.doorbell import Doorbell, DoorbellListener
from hostops.process import DeviceProcess, python_argv
from hostops.rundir import RuntimeDir
from hostops.shm import SharedRegion
from vdev.__main__ import default_mac
from vdev.net import NET_FEATURES
from vdev.virtio import DeviceId, DriverQueue, F, FlatMemory, NetF, RingLayout, Status, bit
from vdev.virtio.control import decode_reply, encode_request
from vdev.virtio.net import (
    NET_HDR_SIZE,
    RX_QUEUE,
    S_LINK_UP,
    TX_QUEUE,
    NetConfig,
    NetHdr,
    format_mac,
)
from vdev.virtio.pcap import file_header, read_all, record

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 30.0
STARTUP_TIMEOUT = 15.0
TIMEOUT = 10.0
QSIZE = 64
REGION_SIZE = 1 << 20
ETH = bytes.fromhex("020000000002020000000001")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vdev", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


# --------------------------------------------------------------------------- bad arguments


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    good = tmp_path / "good.pcap"
    good.write_bytes(file_header() + record(ETH + b"\x88\xb5" + bytes(46), 0))
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(file_header() + record(b"x" * 60, 0) + record(b"y" * 60, 0)[:30])
    text = tmp_path / "notes.txt"
    text.write_text("not a capture at all\n")
    return {
        "good": str(good),
        "bad": str(bad),
        "text": str(text),
        "missing": str(tmp_path / "missing.pcap"),
        "nodir": str(tmp_path / "no" / "dir" / "out.pcap"),
        "dir": str(tmp_path),
    }


EP = "ipc:///tmp/vlab-test-never-bound"
BAD = [
    (["net"], "required: --backend"),
    (["net", "--backend", "loopback"], "one of the arguments --control --vhost-user"),
    (["net", "--backend", "nope", "--control", EP], "unknown backend 'nope'"),
    (["net", "--backend", "pcap", "--control", EP], "--record PATH and/or --replay PATH"),
    (["net", "--backend", "pcap", "--replay", "{missing}", "--control", EP], "not found"),
    (["net", "--backend", "pcap", "--replay", "{text}", "--control", EP], "not a pcap file"),
    (["net", "--backend", "pcap", "--replay", "{bad}", "--control", EP], "record 2: truncated"),
    (["net", "--backend", "pcap", "--replay", "{dir}", "--control", EP], "cannot"),
    (["net", "--backend", "pcap", "--record", "{nodir}", "--control", EP], "cannot create"),
    (["net", "--backend", "pcap", "--record", "{good}", "--replay", "{good}", "--control", EP],
     "same file"),
    (["net", "--backend", "pcap", "--paced", "--record", "{nodir}", "--control", EP],
     "--paced needs --replay"),
    (["net", "--backend", "loopback", "--record", "{good}", "--control", EP],
     "--record is an option of the pcap backend"),
    (["net", "--backend", "loopback", "--mtu", "67", "--control", EP], "MTU 67 not in 68..65535"),
    (["net", "--backend", "loopback", "--mtu", "65536", "--control", EP], "not in 68..65535"),
    (["net", "--backend", "loopback", "--mtu", "big", "--control", EP], "not a number"),
    (["net", "--backend", "loopback", "--mac", "02:00:00:00:00", "--control", EP],
     "not a MAC address"),
    (["net", "--backend", "loopback", "--mac", "03:00:00:00:00:01", "--control", EP],
     "multicast"),
    (["net", "--backend", "loopback", "--mac", "00:00:00:00:00:00", "--control", EP],
     "not a usable MAC"),
    (["net", "--backend", "loopback", "--queue-size", "100", "--control", EP],
     "not a power of two"),
    (["net", "--backend", "loopback", "--control", "tcp://1.2.3.4:5"], "not an ipc:// endpoint"),
    (["net", "--backend", "loopback", "--control", EP, "--vhost-user", "/tmp/x.sock"],
     "not allowed with argument"),
    (["net", "--backend", "loopback", "--vhost-user", "/tmp/" + "x" * 120], "Unix socket path"),
]  # fmt: skip


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_command_lines(files: dict[str, str], argv: list[str], message: str) -> None:
    r = run_cli(*(a.format(**files) for a in argv))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not Path(files["nodir"]).exists()


def test_blk_still_parses_as_before(tmp_path: Path) -> None:
    r = run_cli("blk", "--image", str(tmp_path / "none.img"), "--control", EP)
    assert r.returncode == 2
    assert r.stderr.strip() == f"python -m vdev blk: image not found: {tmp_path / 'none.img'}"


def test_help_names_the_backends() -> None:
    r = run_cli("net", "--help")
    assert r.returncode == 0
    assert "loopback" in r.stdout and "pcap" in r.stdout and "--record" in r.stdout


# --------------------------------------------------------------------------- a driver


@dataclass
class NetDut:
    """One ``python -m vdev net`` process and the driver's end of its channels."""

    proc: DeviceProcess
    ctl: ControlClient
    call: DoorbellListener
    kick_ep: str
    call_ep: str
    log_path: str
    ctl_ep: str = ""
    kick: Doorbell | None = None
    region: SharedRegion | None = None
    memory: FlatMemory | None = None
    queues: list[DriverQueue] = field(default_factory=list)
    top: int = 0
    features: int = 0

    def req(self, type_: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        return decode_reply(self.ctl.call(encode_request(type_, **fields), timeout_s=timeout))

    def bring_up(self, accept: int) -> int:
        self.req("RESET_DEVICE")
        self.req("SET_STATUS", status=Status.ACKNOWLEDGE)
        self.req("SET_STATUS", status=Status.ACKNOWLEDGE | Status.DRIVER)
        offered = int(self.req("GET_FEATURES")["features"])
        self.features = offered & accept
        self.req("SET_FEATURES", features=self.features)
        self.req("SET_STATUS", status=Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        assert self.req("GET_STATUS")["status"] & Status.FEATURES_OK
        self.region = SharedRegion.create(REGION_SIZE, tag="test")
        self.req(
            "SET_MEM_TABLE",
            regions=[{"guest_addr": 0, "size": self.region.size, "shm": self.region.name}],
        )
        self.region.unlink()
        self.memory = FlatMemory(self.region.buf, base=0, barrier=full_barrier)
        base = 0
        for index in (RX_QUEUE, TX_QUEUE):
            lay = RingLayout.packed(QSIZE, base)
            base = (lay.end + 4095) & ~4095
            self.queues.append(DriverQueue(self.memory, lay, event_idx=True))
            self.req("SET_VRING_NUM", index=index, num=QSIZE)
            self.req("SET_VRING_ADDR", index=index, desc=lay.desc, avail=lay.avail, used=lay.used)
            self.req("SET_VRING_BASE", index=index, base=0)
            self.req("SET_VRING_KICK", index=index, endpoint=self.kick_ep)
            self.req("SET_VRING_CALL", index=index, endpoint=self.call_ep)
            self.req("SET_VRING_ENABLE", index=index, enable=True)
        self.top = base
        self.kick = Doorbell(self.kick_ep)
        self.req("SET_STATUS", status=15)
        assert self.req("GET_STATUS")["status"] == 15
        return offered

    def alloc(self, n: int) -> int:
        addr = self.top
        self.top = (addr + n + 63) & ~63
        assert self.top <= REGION_SIZE
        return addr

    def publish(self, index: int) -> None:
        assert self.kick is not None
        if self.queues[index].kick_prepare():
            self.kick.ring(index)

    def post_rx(self, count: int, size: int) -> None:
        for _ in range(count):
            addr = self.alloc(size)
            self.queues[RX_QUEUE].add([], [(addr, size)], (addr, size))
        self.publish(RX_QUEUE)

    def transmit(self, frame: bytes, hdr: NetHdr | None = None) -> None:
        assert self.memory is not None
        data = (hdr or NetHdr()).pack() + frame
        addr = self.alloc(len(data))
        self.memory.view(addr, len(data))[:] = data
        self.queues[TX_QUEUE].add([(addr, len(data))], [], ("tx", addr))
        self.publish(TX_QUEUE)

    def wait_for(self, index: int, count: int) -> list[tuple[Any, int]]:
        """Reap ``count`` used entries of queue ``index`` (waiting on the call bell)."""
        q = self.queues[index]
        got: list[tuple[Any, int]] = []
        deadline = monotonic() + TIMEOUT
        while True:
            got += q.get_used()
            if len(got) >= count:
                return got
            if q.enable_interrupts():
                continue
            left = deadline - monotonic()
            assert left > 0, f"queue {index}: {len(got)} of {count} completions\n{self.log()}"
            self.call.wait(left)

    def frames(self, used: list[tuple[Any, int]]) -> list[bytes]:
        assert self.memory is not None
        out = []
        for (addr, _size), n in used:
            data = bytes(self.memory.view(addr, n))
            assert NetHdr.unpack(data).num_buffers == 1
            out.append(data[NET_HDR_SIZE:])
        return out

    def metrics(self) -> dict[str, int]:
        return dict(self.req("GET_METRICS")["device"])

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()
        except OSError:
            return ""

    def close(self) -> None:
        for closer in (
            lambda: self.req("RESET_DEVICE", timeout=1.0) if self.proc.alive() else None,
            self.ctl.close,
            self.kick.close if self.kick else (lambda: None),
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


@pytest.fixture
def rundir() -> Iterator[RuntimeDir]:
    rd = RuntimeDir.create()
    try:
        yield rd
    finally:
        rd.cleanup()


@pytest.fixture
def launch(rundir: RuntimeDir) -> Iterator[Callable[..., NetDut]]:
    duts: list[NetDut] = []

    def _launch(*args: str, name: str = "eth0") -> NetDut:
        ctl_ep = rundir.endpoint(f"{name}.ctl")
        call_ep = rundir.endpoint(f"{name}.call")
        kick_ep = rundir.endpoint(f"{name}.kick")
        log_path = os.path.join(rundir.path, f"{name}.log")
        call = DoorbellListener(call_ep)
        try:
            proc = DeviceProcess.launch(
                python_argv("vdev", "net", *args, "--control", ctl_ep),
                name=name,
                log_path=log_path,
            )
        except BaseException:
            call.close()
            raise
        ctl = ControlClient(ctl_ep, peer_alive=proc.alive)
        dut = NetDut(proc, ctl, call, kick_ep, call_ep, log_path, ctl_ep)
        duts.append(dut)
        return dut

    try:
        yield _launch
    finally:
        for d in duts:
            d.close()


def raw_frame(n: int, seed: int = 0) -> bytes:
    return ETH + b"\x88\xb5" + bytes((i * 13 + seed) & 0xFF for i in range(n - 14))


ACCEPT = bit(F.VERSION_1) | bit(F.EVENT_IDX) | NET_FEATURES


# --------------------------------------------------------------------------- live devices


def test_identity_and_config_space(launch: Callable[..., NetDut]) -> None:
    d = launch("--backend", "loopback", "--mtu", "9000", "--queue-size", "64")
    info = d.req("GET_DEVICE_INFO", timeout=STARTUP_TIMEOUT)
    assert info == {"device_id": DeviceId.NET, "num_queues": 2, "max_queue_size": 64, "name": "net"}
    offered = int(d.req("GET_FEATURES")["features"])
    assert offered & NET_FEATURES == NET_FEATURES
    raw = d.req("GET_CONFIG", offset=0, size=12)["data"]
    cfg = NetConfig.unpack(raw)
    want_mac = default_mac(d.ctl_ep)
    assert cfg == NetConfig(want_mac, S_LINK_UP, 1, 9000), format_mac(cfg.mac)
    assert want_mac[0] == 0x02, "locally administered, unicast"


def test_explicit_mac(launch: Callable[..., NetDut]) -> None:
    d = launch("--backend", "loopback", "--mac", "52:54:00:12:34:56")
    raw = d.req("GET_CONFIG", offset=0, size=6, timeout=STARTUP_TIMEOUT)["data"]
    assert raw == bytes.fromhex("525400123456")


def test_loopback_device_process(launch: Callable[..., NetDut]) -> None:
    d = launch("--backend", "loopback")
    d.req("GET_DEVICE_INFO", timeout=STARTUP_TIMEOUT)
    d.bring_up(ACCEPT & ~bit(NetF.MRG_RXBUF))
    d.post_rx(16, 1526)
    sent = [raw_frame(n, seed=n) for n in (60, 61, 500, 1514)]
    for f in sent:
        d.transmit(f)
    assert len(d.wait_for(TX_QUEUE, len(sent))) == len(sent)
    assert d.frames(d.wait_for(RX_QUEUE, len(sent))) == sent
    m = d.metrics()
    assert m["tx_frames"] == m["rx_frames"] == 4
    assert m["rx_dropped_no_buffer"] == m["tx_bad_frames"] == 0


def test_pcap_device_process_replays_and_records(
    launch: Callable[..., NetDut], tmp_path: Path
) -> None:
    replay = [raw_frame(100 + k, seed=k) for k in range(5)]
    src = tmp_path / "in.pcap"
    src.write_bytes(file_header() + b"".join(record(f, 10**15 + k) for k, f in enumerate(replay)))
    out = tmp_path / "out.pcap"
    d = launch("--backend", "pcap", "--replay", str(src), "--record", str(out))
    d.req("GET_DEVICE_INFO", timeout=STARTUP_TIMEOUT)
    d.bring_up(ACCEPT)
    d.post_rx(8, 2048)  # the replay waited for these
    assert d.frames(d.wait_for(RX_QUEUE, 5)) == replay
    sent = raw_frame(300, seed=99)
    d.transmit(sent)
    d.wait_for(TX_QUEUE, 1)
    m = d.metrics()
    assert m["pcap_replayed"] == 5 and m["pcap_recorded"] == 6 and m["pcap_replay_done"] == 1
    _, recs = read_all(out.read_bytes())
    assert sorted(r.data for r in recs) == sorted([*replay, sent])


def test_vhost_user_socket_lifecycle(tmp_path: Path) -> None:
    sock = tmp_path / "net.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vdev", "net", "--backend", "loopback", "--vhost-user", str(sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        deadline = monotonic() + STARTUP_TIMEOUT
        seen = b""
        while b"listening on" not in seen:  # logged once the socket is bound
            left = deadline - monotonic()
            assert left > 0 and proc.poll() is None, seen.decode(errors="replace")
            ready, _, _ = select.select([proc.stderr], [], [], left)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 4096)
                assert chunk, f"stderr closed: {seen.decode(errors='replace')}"
                seen += chunk
        assert sock.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0
        assert not sock.exists(), "the socket file is removed on exit"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        if proc.stderr is not None:
            proc.stderr.close()
