"""Fault plans in real device processes: ``python -m vdev KIND ... --faults PLAN``.

Real parts only: the device process launched with ``DeviceProcess.launch``, a real
POSIX shm region, real ZeroMQ doorbells and control channel, and a driver written here
on ``vdev.virtio`` (``DriverQueue`` and the control codec), so what a fault does is
observed from outside the process: the used ring the driver reads, the doorbells it
receives, the status byte, the device's counters (GET_METRICS), the process's exit
status, the trace file. Nothing sleeps: every wait is on a doorbell, a reply or the
process, with a deadline.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
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
from hostops.errors import ChannelTimeout
from hostops.process import DeviceProcess, python_argv
from hostops.rundir import RuntimeDir
from hostops.shm import SharedRegion
from vdev.virtio import DriverQueue, F, FlatMemory, RingLayout, Status, bit
from vdev.virtio.control import CONFIG_CHANGE, decode_reply, encode_request
from vdev.virtio.errors import Rule
from vdev.virtio.trace import read_events
from vdev.virtio.vhost_user import HEADER_SIZE, REPLY_KIND, ProtocolFeature, Req, decode_header
from vdev.virtio.vhost_user import decode_reply as vu_decode_reply
from vdev.virtio.vhost_user import encode as vu_encode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REGION_SIZE = 1 << 20
QSIZE = 16
STARTUP_TIMEOUT = 15.0
TIMEOUT = 10.0


@dataclass
class Dev:
    """One device process and the driver's end of its channels."""

    argv: list[str]
    proc: DeviceProcess
    ctl: ControlClient
    call: DoorbellListener
    kick_ep: str
    call_ep: str
    log_path: str
    kick: Doorbell | None = None
    region: SharedRegion | None = None
    memory: FlatMemory | None = None
    q: DriverQueue | None = None
    layout: RingLayout | None = None
    calls: list[int] = field(default_factory=list)
    done: dict[int, int] = field(default_factory=dict)
    next_buf: int = 0
    token: int = 0

    def req(self, type_: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        return decode_reply(self.ctl.call(encode_request(type_, **fields), timeout_s=timeout))

    def status(self) -> int:
        return int(self.req("GET_STATUS")["status"])

    def metrics(self) -> dict[str, int]:
        return dict(self.req("GET_METRICS")["device"])

    def negotiate(self) -> int:
        """Reset and negotiate everything offered; the status byte after FEATURES_OK."""
        self.req("RESET_DEVICE", timeout=STARTUP_TIMEOUT)
        self.req("SET_STATUS", status=Status.ACKNOWLEDGE)
        self.req("SET_STATUS", status=Status.ACKNOWLEDGE | Status.DRIVER)
        offered = int(self.req("GET_FEATURES")["features"])
        self.req("SET_FEATURES", features=offered & ~bit(F.EVENT_IDX))
        self.req("SET_STATUS", status=Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        return self.status()

    def bring_up(self) -> None:
        assert self.negotiate() & Status.FEATURES_OK
        self.region = SharedRegion.create(REGION_SIZE, tag="test")
        self.req(
            "SET_MEM_TABLE",
            regions=[{"guest_addr": 0, "size": self.region.size, "shm": self.region.name}],
        )
        self.region.unlink()
        self.memory = FlatMemory(self.region.buf, base=0, barrier=full_barrier)
        self.layout = lay = RingLayout.packed(QSIZE, 0)
        self.q = DriverQueue(self.memory, lay, event_idx=False, indirect=True)
        self.next_buf = (lay.end + 4095) & ~4095
        self.req("SET_VRING_NUM", index=0, num=QSIZE)
        self.req("SET_VRING_ADDR", index=0, desc=lay.desc, avail=lay.avail, used=lay.used)
        self.req("SET_VRING_BASE", index=0, base=0)
        self.req("SET_VRING_KICK", index=0, endpoint=self.kick_ep)
        self.req("SET_VRING_CALL", index=0, endpoint=self.call_ep)
        self.req("SET_VRING_ENABLE", index=0, enable=True)
        if self.kick is None:
            self.kick = Doorbell(self.kick_ep)
        self.req("SET_STATUS", status=15)

    def submit(self, nbytes: int = 32) -> int:
        """One rng request: a writable buffer of ``nbytes``; returns its token."""
        assert self.q is not None and self.kick is not None
        addr = self.next_buf
        self.next_buf += (nbytes + 63) & ~63
        self.token += 1
        self.q.add([], [(addr, nbytes)], self.token)
        if self.q.kick_prepare():
            self.kick.ring(0)
        return self.token

    def wait_calls(self, timeout: float = TIMEOUT) -> list[int]:
        got = self.call.wait(timeout)
        self.calls.extend(got)
        return got

    def complete(self, token: int, timeout: float = TIMEOUT) -> int:
        """Reap until ``token`` completes; AssertionError if the ring breaks or time runs
        out (the device must not hang the test)."""
        assert self.q is not None
        deadline = monotonic() + timeout
        while True:
            for t, n in self.q.get_used():
                self.done[t] = n
            if token in self.done:
                return self.done.pop(token)
            if self.q.broken is not None:
                raise AssertionError(f"ring broken: {self.q.broken}")
            if self.q.enable_interrupts():
                continue
            left = deadline - monotonic()
            if left <= 0:
                raise AssertionError(f"request {token} did not complete in {timeout}s")
            self.wait_calls(left)

    def request(self) -> int:
        return self.complete(self.submit())

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()
        except OSError:
            return ""

    def drop_memory(self) -> None:
        self.memory = self.q = None
        if self.region is not None:
            self.region.close()
            self.region = None

    def close(self) -> None:
        for closer in (
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
        self.drop_memory()


@pytest.fixture
def rundir() -> Iterator[RuntimeDir]:
    rd = RuntimeDir.create()
    try:
        yield rd
    finally:
        rd.cleanup()


Launch = Callable[..., Dev]


@pytest.fixture
def launch(rundir: RuntimeDir, tmp_path: Path) -> Iterator[Launch]:
    devices: list[Dev] = []

    def _launch(
        rules: list[dict[str, Any]] | None = None,
        *,
        seed: int = 1,
        state: bool = False,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        name: str = "vdx",
    ) -> Dev:
        if argv is None:
            plan = tmp_path / f"{name}-plan.json"
            plan.write_text(json.dumps({"seed": seed, "rules": rules or []}))
            extra = ["--faults", str(plan), "--faults-device", name]
            if state:
                extra += ["--faults-state", str(tmp_path / f"{name}-state.json")]
            argv = python_argv(
                "vdev", "rng", "--seed", "3", *extra, "--control", rundir.endpoint(f"{name}.ctl")
            )
        ctl_ep = argv[argv.index("--control") + 1]
        call_ep = rundir.endpoint(f"{name}.call")
        kick_ep = rundir.endpoint(f"{name}.kick")
        log_path = os.path.join(rundir.path, f"{name}.log")
        call = DoorbellListener(call_ep)
        try:
            proc = DeviceProcess.launch(argv, name=name, log_path=log_path, env=env)
        except BaseException:
            call.close()
            raise
        ctl = ControlClient(ctl_ep, peer_alive=proc.alive)
        dev = Dev(argv, proc, ctl, call, kick_ep, call_ep, log_path)
        devices.append(dev)
        dev.req("GET_DEVICE_INFO", timeout=STARTUP_TIMEOUT)
        return dev

    try:
        yield _launch
    finally:
        for d in devices:
            d.close()


def rule(event: str, action: str, **when: Any) -> dict[str, Any]:
    params = when.pop("params", {})
    return {
        "name": f"r-{action}",
        "when": {"event": event, **when},
        "what": {"action": action, **params},
    }


# --------------------------------------------------------------------------- crash


def test_crash_at_the_nth_request_and_the_restart_continues_the_run(
    launch: Launch, tmp_path: Path
) -> None:
    trace = tmp_path / "crash.jsonl"
    dev = launch(
        [rule("device.request", "crash", nth=3)], state=True, env={"VLAB_TRACE": str(trace)}
    )
    dev.bring_up()
    assert dev.request() == 32
    assert dev.request() == 32
    dev.submit()
    assert dev.proc.wait(TIMEOUT) == -signal.SIGKILL  # died at its 3rd request
    assert "fault plan: 1 rule(s), seed 1" in dev.log()  # the seed is logged at start
    assert "crash" in dev.log() and "SIGKILL" in dev.log()
    with trace.open() as f:  # flushed before the SIGKILL
        events = list(read_events(f))
    assert [e["name"] for e in events if e["kind"] == "fault"] == ["crash"]
    exits = [e for e in events if e["kind"] == "proc" and e.get("event") == "exit"]
    assert len(exits) == 1 and exits[0]["reason"].startswith("crash: fault #0 crash")
    argv = dev.argv
    dev.close()
    again = launch(argv=argv, name="vdx2")  # the same argv: the same plan and state file
    again.bring_up()
    for _ in range(5):  # requests 4..8 of the run: the 3rd was the run's, not this one's
        assert again.request() == 32
    assert again.proc.alive()
    assert "(resumed)" in again.log()
    m = again.metrics()
    assert m["faults_fired"] == 0 and m["fault:crash"] == 0 and m["chains"] == 5


def test_without_a_state_file_a_restart_crashes_again(launch: Launch) -> None:
    dev = launch([rule("device.request", "crash", nth=1)])
    dev.bring_up()
    dev.submit()
    assert dev.proc.wait(TIMEOUT) == -signal.SIGKILL
    argv = dev.argv
    dev.close()
    again = launch(argv=argv, name="vdx2")
    again.bring_up()
    again.submit()
    assert again.proc.wait(TIMEOUT) == -signal.SIGKILL


# --------------------------------------------------------------------------- hang


def test_hang_forever_stays_alive_and_still_exits_on_sigterm(launch: Launch) -> None:
    dev = launch([rule("control.GET_METRICS", "hang", nth=2)])
    dev.metrics()  # the 1st is answered
    with pytest.raises(ChannelTimeout):
        dev.req("GET_METRICS", timeout=0.5)  # the 2nd never is
    assert dev.proc.alive()
    dev.proc.terminate()
    assert dev.proc.wait(TIMEOUT) == 0  # SIGTERM is still heard
    assert "hang: not serving until stopped" in dev.log()


def test_a_timed_hang_serves_again_afterwards(launch: Launch) -> None:
    dev = launch([rule("device.request", "hang", nth=1, params={"s": 0.2})])
    dev.bring_up()
    assert dev.request() == 32  # answered once the hang is over
    assert dev.request() == 32
    assert "hang: over, serving again" in dev.log()
    assert dev.metrics()["fault:hang"] == 1


# --------------------------------------------------------------------------- lifecycle


def test_needs_reset_sets_the_status_bit_and_rings_config_change(launch: Launch) -> None:
    dev = launch([rule("device.request", "needs_reset", nth=2)])
    dev.bring_up()
    assert dev.request() == 32
    dev.submit()
    deadline = monotonic() + TIMEOUT
    while CONFIG_CHANGE not in dev.calls:  # bounded by the deadline
        assert monotonic() < deadline, "no config-change interrupt"
        dev.wait_calls(deadline - monotonic())
    assert dev.status() & Status.DEVICE_NEEDS_RESET
    m = dev.metrics()
    assert m["fault:needs_reset"] == 1 and m["chains"] == 2
    dev.drop_memory()
    dev.bring_up()  # a reset clears it
    assert not dev.status() & Status.DEVICE_NEEDS_RESET


def test_refuse_features_ok_once(launch: Launch) -> None:
    dev = launch([rule("control.SET_STATUS", "refuse_features_ok", times=1)])
    assert not dev.negotiate() & Status.FEATURES_OK
    assert dev.negotiate() & Status.FEATURES_OK
    assert dev.metrics()["fault:refuse_features_ok"] == 1


# --------------------------------------------------------------------------- ring, notify


def test_used_len_too_big_breaks_the_drivers_ring_at_the_nth_push(launch: Launch) -> None:
    dev = launch([rule("ring.push", "used_len_too_big", nth=2, params={"extra": 9})])
    dev.bring_up()
    assert dev.request() == 32
    with pytest.raises(AssertionError, match="ring broken"):
        dev.request()
    assert dev.q is not None
    assert getattr(dev.q.broken, "rule", None) is Rule.USED_LEN_TOO_BIG
    assert dev.metrics()["fault:used_len_too_big"] == 1


def test_interrupt_storm_and_dropped_interrupt_seen_at_the_call_doorbell(launch: Launch) -> None:
    dev = launch(
        [
            rule("notify.interrupt", "interrupt_storm", nth=1, params={"n": 6}),
            rule("notify.interrupt", "drop_interrupt", nth=2),
        ]
    )
    dev.bring_up()
    t = dev.submit()
    deadline = monotonic() + TIMEOUT
    while dev.call.received < 6:  # bounded by the deadline (wait() returns distinct ids)
        assert monotonic() < deadline, f"only {dev.call.received} of 6 interrupts"
        dev.wait_calls(deadline - monotonic())
    assert dev.complete(t) == 32
    m = dev.metrics()
    assert m["interrupts"] == 6 and m["fault:interrupt_storm"] == 1
    dev.submit()  # the 2nd interrupt is dropped: the driver must poll to see it
    deadline = monotonic() + TIMEOUT
    while dev.metrics()["chains"] < 2:  # bounded: the device served it
        assert monotonic() < deadline
    assert dev.metrics()["interrupts"] == 6 and dev.metrics()["fault:drop_interrupt"] == 1
    assert dev.call.received == 6
    assert dev.complete(dev.submit()) == 32  # the 3rd is sent: both are reaped
    assert dev.metrics()["interrupts"] == 7 and dev.done == {2: 32}  # reaped with the 3rd


# --------------------------------------------------------------------------- trace, replay


def _traced_run(launch: Launch, tmp_path: Path, tag: str) -> list[tuple[Any, ...]]:
    trace = tmp_path / f"{tag}.jsonl"
    rules = [
        rule("device.request", "hang", probability=0.5, params={"s": 0.0}),
        {
            "name": "ctl",
            "when": {"event": "control.SET_STATUS", "probability": 0.5},
            "what": {"action": "hang", "s": 0.0},
        },
    ]
    dev = launch(rules, seed=11, env={"VLAB_TRACE": str(trace)}, name=f"vd{tag}")
    dev.bring_up()
    for _ in range(12):
        assert dev.request() == 32
    dev.proc.terminate()
    assert dev.proc.wait(TIMEOUT) == 0
    with trace.open() as f:
        events = list(read_events(f))
    starts = [e for e in events if e["kind"] == "proc" and e.get("event") == "faults"]
    assert starts and starts[0]["seed"] == 11
    return [
        (e["name"], e["details"]["rule"], e["details"]["seq"], e["details"]["event"])
        for e in events
        if e["kind"] == "fault"
    ]


def test_same_plan_and_seed_replay_the_same_fault_events(launch: Launch, tmp_path: Path) -> None:
    a = _traced_run(launch, tmp_path, "a")
    b = _traced_run(launch, tmp_path, "b")
    assert a == b
    assert len(a) >= 3 and {x[1] for x in a} == {"r-hang", "ctl"}
    assert [x[2] for x in a] == list(range(len(a)))


# --------------------------------------------------------------------------- command line


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vdev", *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        env={**os.environ, "VLAB_DEBUG": ""},
    )


def test_a_bad_plan_is_one_line_naming_rule_and_field(tmp_path: Path, rundir: RuntimeDir) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[rules]]\nname = "tear"\nwhen = { event = "blk.write", probability = 1.5 }\n'
        'what = { action = "ioerr" }\n'
    )
    ep = rundir.endpoint("bad.ctl")
    for kind in (["blk", "--memory", "1M"], ["rng"], ["net", "--backend", "loopback"]):
        r = _run([*kind, "--faults", str(bad), "--control", ep])
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr
        assert "rule 'tear' (#0)" in lines[0] and "when.probability" in lines[0]
        assert str(bad) in lines[0]


def test_a_corrupt_state_file_is_one_line_exit_2(tmp_path: Path, rundir: RuntimeDir) -> None:
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"rules": [rule("device.request", "crash", nth=2)]}))
    state = tmp_path / "s.json"
    state.write_text('{"format": "vlab-fault-run/1", "plan": "x"}')
    r = _run(
        [
            "rng",
            "--faults",
            str(plan),
            "--faults-state",
            str(state),
            "--control",
            rundir.endpoint("c"),
        ]
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "another plan or seed" in r.stderr
    r = _run(["rng", "--faults-state", str(state), "--control", rundir.endpoint("c")])
    assert r.returncode == 2 and "need --faults" in r.stderr


# --------------------------------------------------------------------------- vhost-user


class _VhostUser:
    """A back-end process (``--vhost-user``) with its log on a pipe, and one raw
    front-end connection."""

    def __init__(self, argv: list[str], sock_path: str) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        self.text = ""
        self.wait_log("listening on")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(sock_path)

    def wait_log(self, text: str) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = monotonic() + TIMEOUT
        while text not in self.text:  # bounded by the deadline
            left = deadline - monotonic()
            assert left > 0, f"no {text!r} in the log: {self.text}"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                assert chunk, f"back-end exited: {self.text}"
                self.text += chunk.decode(errors="replace")

    def request(self, req: Req, payload: object = None) -> object:
        """Send ``req`` (asking for an ack when it has no reply); its reply or ack."""
        has_reply = req in REPLY_KIND
        self.sock.sendall(vu_encode(req, payload, need_reply=not has_reply))  # type: ignore[arg-type]
        head = self._recv(HEADER_SIZE)
        hdr = decode_header(head, reply=True)
        return vu_decode_reply(req, hdr, self._recv(hdr.size))

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:  # bounded: the socket has a timeout
            chunk = self.sock.recv(n - len(out))
            assert chunk, "back-end closed the connection"
            out += chunk
        return out

    def close(self) -> int:
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.proc.wait(TIMEOUT)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return rc


def test_vhost_user_control_events_and_refused_features(tmp_path: Path) -> None:
    plan = tmp_path / "p.json"
    plan.write_text(
        json.dumps({"rules": [rule("control.SET_FEATURES", "refuse_features_ok", times=1)]})
    )
    sock_path = str(tmp_path / "vu.sock")
    be = _VhostUser(
        python_argv("vdev", "rng", "--faults", str(plan), "--vhost-user", sock_path), sock_path
    )
    try:
        offered = be.request(Req.GET_FEATURES)
        assert isinstance(offered, int)
        proto = be.request(Req.GET_PROTOCOL_FEATURES)
        assert isinstance(proto, int) and proto & bit(ProtocolFeature.REPLY_ACK)
        # not acked: REPLY_ACK is not negotiated before this message is served
        be.sock.sendall(vu_encode(Req.SET_PROTOCOL_FEATURES, bit(ProtocolFeature.REPLY_ACK)))
        assert be.request(Req.SET_FEATURES, offered) != 0  # nacked: refused once
        assert be.request(Req.SET_FEATURES, offered) == 0
        be.wait_log(
            "fault #0 refuse_features_ok (rule 'r-refuse_features_ok') on control.SET_FEATURES"
        )
    finally:
        assert be.close() == 0
    assert not os.path.exists(sock_path)


def test_a_hung_device_still_exits_when_its_parent_dies(rundir: RuntimeDir, tmp_path: Path) -> None:
    plan = tmp_path / "hang.json"
    plan.write_text(json.dumps({"rules": [rule("control.GET_STATUS", "hang")]}))
    ep = rundir.endpoint("orphan.ctl")
    script = (
        "import sys\n"
        "from hostops.process import DeviceProcess, python_argv\n"
        "from hostops.sync import Event\n"
        "p = DeviceProcess.launch(python_argv('vdev', 'rng', '--faults', sys.argv[3],"
        " '--control', sys.argv[1]), name='orphan', log_path=sys.argv[2])\n"
        "Event().wait()\n"
    )
    log = os.path.join(rundir.path, "orphan.log")
    parent = DeviceProcess.launch(
        [sys.executable, "-c", script, ep, log, str(plan)],
        name="parent",
        log_path=os.path.join(rundir.path, "parent.log"),
    )
    ctl = ControlClient(ep, peer_alive=parent.alive)
    pidfd = -1
    try:
        ctl.call(encode_request("GET_DEVICE_INFO"), timeout_s=STARTUP_TIMEOUT)
        with pytest.raises(ChannelTimeout):
            ctl.call(encode_request("GET_STATUS"), timeout_s=0.5)  # hung from now on
        children = [
            int(d.name)
            for d in Path("/proc").iterdir()
            if d.name.isdigit() and _ppid(d) == parent.pid
        ]
        assert len(children) == 1, children
        pidfd = os.pidfd_open(children[0])
        parent.kill()
        assert parent.wait(TIMEOUT) is not None
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        assert poller.poll(int(TIMEOUT * 1000)), "the hung device outlived its parent"
        assert "hang: not serving until stopped" in Path(log).read_text()
    finally:
        ctl.close()
        if pidfd >= 0:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(pidfd)
        parent.kill()
        parent.close()


def _ppid(d: Path) -> int:
    try:
        return int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


# --------------------------------------------------------------------------- through the kernel


def test_fault_counters_reach_the_kernel_metrics(tmp_path: Path) -> None:
    import kernel

    image = tmp_path / "d.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    plan = {
        "seed": 4,
        "rules": [
            rule("notify.interrupt", "spurious_interrupt", nth=1),
            rule("control.GET_METRICS", "hang", nth=1, params={"s": 0.0}),
        ],
    }
    with kernel.boot(devices=[kernel.Blk(str(image), faults=plan)]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        k.sys.pwrite(fd, b"x" * 512, 0)
        k.sys.fsync(fd)
        k.sys.close(fd)
        [dev] = k.devices
        m = dev.metrics()["device"]
    assert m["faults_fired"] == 2
    assert m["fault:spurious_interrupt"] == 1 and m["fault:hang"] == 1
