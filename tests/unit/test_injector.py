"""The device-side fault injector, in process: the real DeviceSession serving a device,
the real DriverQueue playing the driver on the same rings (a FlatMemory), and a fault
plan. Each ring / notify / lifecycle action is shown to fire when and only when its
trigger says, observed from the driver's side: the used ring it reads, the rule its
DriverQueue reports, the notifications it receives, the device's counters.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any, NoReturn

import pytest

from vdev.device import PENDING, Device, Pending
from vdev.injector import FaultInjector, FaultStateError
from vdev.runtime import DeviceRuntime
from vdev.session import DeviceSession, Ring
from vdev.virtio import DriverQueue, F, FlatMemory, RingLayout, Status, bit
from vdev.virtio.control import decode_reply, encode_request
from vdev.virtio.errors import Rule
from vdev.virtio.faults import FaultPlan
from vdev.virtio.queue import Chain
from vdev.virtio.ring import USED_ELEM
from vdev.virtio.trace import Tracer, decode_line

QSIZE = 8
RING_FEATURES = bit(F.VERSION_1) | bit(F.INDIRECT_DESC)


class Echo(Device):
    """Writes 4 bytes (or what fits) into every chain; fires no events of its own, so
    the session fires ``device.request`` for it."""

    device_id = 0x7E
    name = "echo"

    def handle(self, queue: int, chain: Chain) -> int:
        n = min(4, chain.writable_len)
        chain.write(0, b"ECHO"[:n])
        return n


class Keeper(Device):
    """Keeps every chain; the test completes them with :meth:`finish`."""

    device_id = 0x7D
    name = "keeper"

    def __init__(self) -> None:
        super().__init__()
        self.chains: list[Chain] = []

    def handle(self, queue: int, chain: Chain) -> Pending:
        self.chains.append(chain)
        return PENDING

    def finish(self, many: bool = False) -> None:
        chains, self.chains = self.chains, []
        if many:
            self.complete_many(0, [(c, 1) for c in chains])
        else:
            for c in chains:
                self.complete(0, c, 1)

    def released(self, queue: int) -> None:
        self.chains.clear()


class Crashed(Exception):
    """The session's crash, caught in process (instead of SIGKILL)."""


class Rig:
    """One queue of ``device`` under ``plan``: the session serves, a DriverQueue
    drives; the rig is the session's transport (records notifications and breakage)."""

    def __init__(
        self,
        device: Device,
        rules: list[dict[str, Any]] | None,
        *,
        event_idx: bool = False,
        seed: int = 1,
        state_path: str | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.interrupts = 0
        self.broken: list[tuple[int, str]] = []
        self.layout = RingLayout.packed(QSIZE, 0)
        self.memory = FlatMemory(bytearray(64 << 10))
        self.next_buf = (self.layout.end + 4095) & ~4095
        self.log = io.StringIO()
        self.session = DeviceSession(device, self, log_file=self.log)
        self.session.tracer = tracer
        if rules is not None:
            plan = FaultPlan.from_dict({"seed": seed, "rules": rules})
            self.injector: FaultInjector | None = FaultInjector(
                plan, device="vdx", state_path=state_path, clock=lambda: 0.0
            )
            self.session.attach_injector(self.injector)
        else:
            self.injector = None

        def crash(reason: str) -> NoReturn:
            raise Crashed(reason)

        self.session.on_crash = crash
        features = RING_FEATURES | (bit(F.EVENT_IDX) if event_idx else 0)
        ring = self.session.rings[0]
        self.session.check_num(ring, QSIZE, "test")
        self.dq = self.session.start_ring(ring, self.memory, self.layout, features)
        ring.enabled = True
        self.q = DriverQueue(self.memory, self.layout, event_idx=event_idx, indirect=True)
        device.activate(features)

    # -- the transport's part
    def interrupt(self, ring: Ring) -> None:
        self.interrupts += 1

    def ring_broken(self, ring: Ring, why: str) -> None:
        self.broken.append((ring.index, why))

    def config_interrupt(self) -> None:
        pass

    # -- the driver's part
    def add(self, token: Any, writable: tuple[int, ...] = (16,), readable: int = 0) -> int:
        r = []
        if readable:
            r.append((self.next_buf, readable))
            self.next_buf += 64
        w = []
        for n in writable:
            w.append((self.next_buf, n))
            self.next_buf += (n + 63) & ~63
        return self.q.add(r, w, token)

    def submit(self, n: int = 1, **kw: Any) -> list[int]:
        """Make ``n`` chains available, kick (as kick_prepare says), serve."""
        heads = [self.add(f"t{i}", **kw) for i in range(n)]
        self.kick_and_serve()
        return heads

    def kick_and_serve(self) -> None:
        if self.q.kick_prepare():
            self.session.kick(0)
        self.serve()

    def serve(self) -> None:
        for _ in range(100):  # bounded: a round serves up to the budget
            self.session.run_once(timeout=0)
            if not self.session.has_pending:
                return
        raise AssertionError("the device still has work after 100 rounds")

    def used(self) -> tuple[int, list[tuple[int, int]]]:
        """The used ring as the driver sees it: used.idx and the elements up to it."""
        view = self.memory.view(self.layout.used, RingLayout.used_bytes(QSIZE))
        idx = int.from_bytes(view[2:4], "little")
        elems = [USED_ELEM.unpack_from(view, 4 + 8 * (i % QSIZE)) for i in range(min(idx, QSIZE))]
        return idx, elems

    def reap(self) -> list[tuple[Any, int]]:
        return self.q.get_used()

    def counters(self) -> dict[str, int]:
        return self.session.metrics()


def rule(event: str, action: str, **when: Any) -> dict[str, Any]:
    params = when.pop("params", {})
    return {
        "name": f"{action}-rule",
        "when": {"event": event, **when},
        "what": {"action": action, **params},
    }


def broken_rule(q: DriverQueue) -> Rule | None:
    err = q.broken
    return getattr(err, "rule", None)


# --------------------------------------------------------------------------- ring faults


def test_bad_used_id_default_is_out_of_range_and_fires_only_on_its_nth() -> None:
    rig = Rig(Echo(), [rule("ring.push", "bad_used_id", nth=2)])
    rig.submit(1)
    assert rig.reap() == [("t0", 4)] and rig.q.broken is None
    rig.submit(1)
    _, elems = rig.used()
    assert elems[1][0] == QSIZE  # the queue size: out of range (§2.7.8)
    assert rig.reap() == []
    assert broken_rule(rig.q) is Rule.USED_ID_OUT_OF_RANGE
    c = rig.counters()
    assert c["faults_fired"] == 1 and c["fault:bad_used_id"] == 1


def test_bad_used_id_with_an_id_not_in_flight() -> None:
    rig = Rig(Echo(), [rule("ring.pop", "bad_used_id", nth=1, params={"id": 5})])
    rig.submit(1)
    assert rig.used()[1][0] == (5, 4)
    assert rig.reap() == [] and broken_rule(rig.q) is Rule.USED_ID_NOT_IN_FLIGHT


def test_used_id_not_head_names_the_chains_second_descriptor() -> None:
    rig = Rig(Echo(), [rule("ring.push", "used_id_not_head", nth=1)])
    head = rig.add("t0", writable=(8, 8))
    rig.kick_and_serve()
    uid, _ = rig.used()[1][0]
    assert uid != head and 0 <= uid < QSIZE
    assert rig.reap() == [] and broken_rule(rig.q) is Rule.USED_ID_NOT_IN_FLIGHT


def test_used_id_not_head_of_a_one_descriptor_chain_is_a_free_index() -> None:
    rig = Rig(Echo(), [rule("ring.push", "used_id_not_head", nth=2)])
    rig.submit(1)
    assert rig.reap() == [("t0", 4)]
    heads = rig.submit(1)
    uid, _ = rig.used()[1][1]
    assert uid not in heads and 0 <= uid < QSIZE
    assert broken_rule(rig.q) is None and rig.reap() == []
    assert broken_rule(rig.q) is Rule.USED_ID_NOT_IN_FLIGHT


def test_double_complete_pushes_the_same_head_twice() -> None:
    rig = Rig(Echo(), [rule("ring.push", "double_complete", nth=1)])
    (head,) = rig.submit(1)
    idx, elems = rig.used()
    assert idx == 2 and elems == [(head, 4), (head, 4)]
    assert rig.reap() == [] and broken_rule(rig.q) is Rule.USED_IDX_JUMP  # 2 used, 1 in flight


def test_used_len_too_big_claims_writable_plus_extra() -> None:
    rig = Rig(Echo(), [rule("ring.push", "used_len_too_big", every=2, params={"extra": 7})])
    rig.submit(1)
    assert rig.reap() == [("t0", 4)]
    rig.submit(1)
    assert rig.used()[1][1][1] == 16 + 7
    assert rig.reap() == [] and broken_rule(rig.q) is Rule.USED_LEN_TOO_BIG


def test_used_idx_jump_moves_used_idx_past_the_ring() -> None:
    rig = Rig(Echo(), [rule("ring.push", "used_idx_jump", nth=1, params={"by": 3})])
    rig.submit(1)
    assert rig.used()[0] == QSIZE + 3
    assert rig.reap() == [] and broken_rule(rig.q) is Rule.USED_IDX_JUMP


def test_withhold_never_completes_that_chain_and_a_reset_forgets_it() -> None:
    rig = Rig(Echo(), [rule("ring.push", "withhold", nth=2)])
    rig.submit(3)
    assert sorted(t for t, _ in rig.reap()) == ["t0", "t2"]
    assert rig.q.in_flight == 1 and rig.q.broken is None
    ring = rig.session.rings[0]
    assert len(ring.withheld) == 1
    rig.session.reset()
    assert not ring.withheld
    assert rig.counters()["fault:withhold"] == 1


def test_out_of_order_holds_a_completion_behind_depth_later_ones() -> None:
    rig = Rig(Echo(), [rule("ring.push", "out_of_order", nth=1, params={"depth": 2})])
    heads = rig.submit(4)
    _, elems = rig.used()
    assert [h for h, _ in elems] == [heads[1], heads[2], heads[0], heads[3]]
    assert [t for t, _ in rig.reap()] == ["t1", "t2", "t0", "t3"]  # legal: §2.7.8
    assert rig.q.broken is None


def test_ring_faults_fired_at_pop_apply_to_a_kept_chains_completion() -> None:
    dev = Keeper()
    rig = Rig(dev, [rule("ring.pop", "used_len_too_big", nth=2, params={"extra": 1})])
    rig.submit(2)
    assert rig.used()[0] == 0  # kept: nothing pushed yet
    dev.finish()
    _, elems = rig.used()
    assert [n for _, n in elems] == [1, 17]


def test_ring_push_fires_for_complete_many_and_leaves_clean_batches_whole() -> None:
    dev = Keeper()
    rig = Rig(dev, [rule("ring.push", "bad_used_id", nth=3)])
    rig.submit(2)
    dev.finish(many=True)
    assert [n for _, n in rig.reap()] == [1, 1]
    rig.submit(2)
    dev.finish(many=True)
    _, elems = rig.used()
    assert elems[2][0] == QSIZE and elems[3][1] == 1
    assert rig.counters()["fault:bad_used_id"] == 1


# --------------------------------------------------------------------------- notify faults


def test_drop_interrupt_loses_exactly_the_nth_notification() -> None:
    rig = Rig(Echo(), [rule("notify.interrupt", "drop_interrupt", nth=2)])
    rig.submit(1)
    assert rig.interrupts == 1
    rig.submit(1)
    assert rig.interrupts == 1  # dropped
    rig.submit(1)
    assert rig.interrupts == 2
    assert [t for t, _ in rig.reap()] == ["t0", "t0", "t0"]  # the work was done


def test_drop_interrupt_on_a_kick_ignores_the_kick() -> None:
    rig = Rig(Echo(), [rule("notify.kick", "drop_interrupt", nth=1)])
    rig.submit(1)
    assert rig.used()[0] == 0 and rig.session.counters["kicks_received"] == 1
    rig.add("t1")
    rig.q.kick_prepare()  # publishes avail.idx
    rig.session.kick(0)  # the next kick is heard: both are served
    rig.serve()
    assert rig.used()[0] == 2


def test_spurious_interrupt_adds_one_notification() -> None:
    rig = Rig(Echo(), [rule("notify.interrupt", "spurious_interrupt", nth=1)])
    rig.submit(1)
    assert rig.interrupts == 2
    rig.submit(1)
    assert rig.interrupts == 3


def test_spurious_interrupt_on_a_kick_notifies_with_nothing_used() -> None:
    rig = Rig(Echo(), [rule("notify.kick", "spurious_interrupt", nth=1)])
    rig.session.kick(0)  # nothing available
    rig.serve()
    assert rig.interrupts == 1 and rig.used()[0] == 0


def test_interrupt_storm_sends_n_notifications() -> None:
    rig = Rig(Echo(), [rule("notify.interrupt", "interrupt_storm", nth=2, params={"n": 25})])
    rig.submit(1)
    rig.submit(1)
    rig.submit(1)
    assert rig.interrupts == 1 + 25 + 1
    assert rig.counters()["interrupts"] == 27


def _suppressed_run(rules: list[dict[str, Any]] | None) -> int:
    """Three requests with EVENT_IDX and a driver that never moves used_event: only
    the first completion crosses it (§2.7.10)."""
    rig = Rig(Echo(), rules, event_idx=True)
    for _ in range(3):
        rig.submit(1)
    return rig.interrupts


def test_ignore_event_idx_notifies_when_used_event_says_not_to() -> None:
    assert _suppressed_run(None) == 1
    assert _suppressed_run([rule("notify.kick", "ignore_event_idx", nth=2)]) == 1 + 2


# --------------------------------------------------------------------------- lifecycle


def test_needs_reset_stops_serving_and_tells_the_transport() -> None:
    rig = Rig(Echo(), [rule("device.request", "needs_reset", nth=2)])
    rig.submit(1)
    assert rig.reap() == [("t0", 4)] and not rig.broken
    rig.submit(1)
    assert len(rig.broken) == 1 and "needs_reset" in rig.broken[0][1]
    assert rig.used()[0] == 1  # the second request stays unanswered
    rig.submit(1)
    assert rig.used()[0] == 1  # not served any more


def test_crash_at_the_nth_request() -> None:
    rig = Rig(Echo(), [rule("device.request", "crash", nth=2)])
    rig.submit(1)
    with pytest.raises(Crashed, match="crash"):
        rig.submit(1)
    assert rig.counters()["fault:crash"] == 1


def test_device_faults_returns_the_device_actions_and_runs_lifecycle_ones() -> None:
    dev = Echo()
    assert dev.faults("blk.read") == []  # no plan: nothing
    plan = [
        rule("blk.read", "ioerr", nth=1),
        {
            "name": "n",
            "when": {"event": "device.request", "nth": 1},
            "what": {"action": "needs_reset"},
        },
    ]
    rig = Rig(dev, plan)
    got = dev.faults("blk.read", queue=0, opcode="IN", sector=8, nbytes=512)
    assert [f.action for f in got] == ["ioerr"]
    assert got[0].event.device == "vdx" and got[0].event.sector == 8
    assert len(rig.broken) == 1  # needs_reset was carried out by the session


def test_hang_returns_at_once_when_the_session_is_stopping() -> None:
    rig = Rig(Echo(), [rule("device.request", "hang", nth=1)])  # forever
    rig.session.stopping = True
    assert rig.session.fire_faults("device.request", queue=0) == []  # returned: stopping
    assert rig.counters()["fault:hang"] == 1


def _runtime(rules: list[dict[str, Any]]) -> DeviceRuntime:
    plan = FaultPlan.from_dict({"rules": rules})
    inj = FaultInjector(plan, device="vdx")
    return DeviceRuntime(Echo(), "ipc://unused", watch_parent=False, injector=inj)


def _call(rt: DeviceRuntime, type_: str, **fields: Any) -> dict[str, Any]:
    return decode_reply(rt.handle_control(encode_request(type_, **fields)))


def _negotiate(rt: DeviceRuntime) -> int:
    _call(rt, "SET_STATUS", status=0)
    _call(rt, "SET_STATUS", status=Status.ACKNOWLEDGE)
    _call(rt, "SET_STATUS", status=Status.ACKNOWLEDGE | Status.DRIVER)
    offered = _call(rt, "GET_FEATURES")["features"]
    _call(rt, "SET_FEATURES", features=offered)
    _call(rt, "SET_STATUS", status=Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
    return int(_call(rt, "GET_STATUS")["status"])


def test_refuse_features_ok_leaves_features_ok_clear_once() -> None:
    rt = _runtime([rule("control.SET_FEATURES", "refuse_features_ok", times=1)])
    try:
        assert not _negotiate(rt) & Status.FEATURES_OK  # §3.1.1: the driver sees it
        assert _negotiate(rt) & Status.FEATURES_OK
        m = rt.metrics()
        assert m["fault:refuse_features_ok"] == 1 and m["faults_fired"] == 1
    finally:
        rt.close()


def test_control_events_fire_for_each_request() -> None:
    rt = _runtime([rule("control.GET_STATUS", "needs_reset", nth=2)])
    try:
        _call(rt, "GET_STATUS")
        assert not rt.status & Status.DEVICE_NEEDS_RESET
        assert _call(rt, "GET_STATUS")["status"] & Status.DEVICE_NEEDS_RESET
        assert rt.metrics()["config_interrupts_dropped"] == 1  # no call doorbell yet
    finally:
        rt.close()


# --------------------------------------------------------------------------- trace, replay


def test_every_fired_fault_is_a_trace_event_and_a_log_line() -> None:
    lines: list[str] = []
    tracer = Tracer(lines.append, lambda: 1, pid=1, kpid=None, dev="vdx", side="device")
    rig = Rig(Echo(), [rule("ring.push", "used_len_too_big", nth=1)], tracer=tracer)
    rig.submit(1)
    events = [decode_line(line) for line in lines]
    faults = [e for e in events if e["kind"] == "fault"]
    assert len(faults) == 1
    f = faults[0]
    assert f["name"] == "used_len_too_big" and f["q"] == 0
    d = f["details"]
    assert d["rule"] == "used_len_too_big-rule" and d["seq"] == 0 and d["event"] == "ring.push"
    assert d["params"] == {"extra": 1} and d["fields"] == {"device": "vdx", "queue": 0, "nbytes": 4}
    assert any(e["kind"] == "proc" and e.get("event") == "faults" for e in events)
    assert "fault #0 used_len_too_big (rule 'used_len_too_big-rule')" in rig.log.getvalue()


def _random_run(seed: int) -> list[tuple[str, str, int, int | None]]:
    rules = [
        rule("notify.interrupt", "spurious_interrupt", probability=0.3),
        rule("ring.push", "out_of_order", probability=0.2, params={"depth": 1}),
        {"name": "dr", "when": {"event": "device.request", "probability": 0.5}, "set_state": "x"},
    ]
    rig = Rig(Echo(), rules, seed=seed)
    for _ in range(20):
        rig.submit(1)
        rig.reap()
    assert rig.injector is not None
    return [(f.rule, f.action, f.seq, f.event.queue) for f in rig.injector.fired_log]


def test_same_plan_and_seed_give_the_same_fired_sequence() -> None:
    a = _random_run(7)
    assert a == _random_run(7)
    assert len(a) > 3
    assert a != _random_run(8)


# --------------------------------------------------------------------------- state file


def test_state_file_resumes_the_run(tmp_path: Path) -> None:
    state = str(tmp_path / "run.json")
    rules = [rule("notify.interrupt", "spurious_interrupt", nth=3)]
    rig = Rig(Echo(), rules, state_path=state)
    rig.submit(1)
    rig.submit(1)
    assert rig.interrupts == 2
    assert rig.injector is not None
    rig.injector.save_state()  # the process ends
    again = Rig(Echo(), rules, state_path=state)
    assert again.injector is not None and again.injector.resumed
    again.submit(1)  # the run's 3rd interrupt
    assert again.interrupts == 2
    assert again.injector.counters["fault:spurious_interrupt"] == 1
    fresh = Rig(Echo(), rules)
    fresh.submit(1)
    assert fresh.interrupts == 1


def test_state_is_saved_before_a_crash_so_the_restart_does_not_crash_again(
    tmp_path: Path,
) -> None:
    state = str(tmp_path / "run.json")
    rules = [rule("device.request", "crash", nth=3)]
    rig = Rig(Echo(), rules, state_path=state)
    rig.submit(2)
    with pytest.raises(Crashed):
        rig.submit(1)
    again = Rig(Echo(), rules, state_path=state)
    again.submit(5)  # requests 4..8 of the run
    assert again.used()[0] == 5


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not a fault run state"),
        ('{"format": "other"}', "format"),
        ("[1, 2]", "must be an object"),
    ],
)
def test_a_corrupt_state_file_is_a_one_line_error(tmp_path: Path, content: str, match: str) -> None:
    state = tmp_path / "run.json"
    state.write_text(content)
    plan = FaultPlan.from_dict({"rules": [rule("device.request", "crash", nth=3)]})
    with pytest.raises(FaultStateError, match=match) as ei:
        FaultInjector(plan, device="vdx", state_path=str(state))
    assert "\n" not in str(ei.value) and str(state) in str(ei.value)


def test_a_state_file_of_another_plan_or_seed_is_refused(tmp_path: Path) -> None:
    state = str(tmp_path / "run.json")
    plan = FaultPlan.from_dict({"seed": 1, "rules": [rule("device.request", "crash", nth=3)]})
    FaultInjector(plan, device="vdx", state_path=state).save_state()
    data = json.loads(Path(state).read_text())
    assert data["seed"] == 1
    other = FaultPlan.from_dict({"seed": 2, "rules": [rule("device.request", "crash", nth=3)]})
    with pytest.raises(FaultStateError, match="another plan or seed"):
        FaultInjector(other, device="vdx", state_path=state)
    again = FaultPlan.from_dict({"seed": 1, "rules": [rule("device.request", "crash", nth=3)]})
    assert FaultInjector(again, device="vdx", state_path=state).resumed


def test_export_import_run_continues_decisions_exactly() -> None:
    d = {
        "seed": 5,
        "rules": [
            {
                "name": "ge",
                "when": {"event": "net.tx"},
                "what": {"action": "gilbert_elliott", "p": 0.3, "r": 0.4},
            },
            {"name": "p", "when": {"event": "net.tx", "probability": 0.5}, "set_state": "s"},
        ],
    }
    from vdev.virtio.faults import FaultEvent

    whole = FaultPlan.from_dict(d)
    first = FaultPlan.from_dict(d)
    evs = [FaultEvent("net.tx", time=0.0) for _ in range(40)]
    ref = [[f.seq for f in whole.decide(e)] for e in evs]
    part = [[f.seq for f in first.decide(e)] for e in evs[:20]]
    saved = json.loads(json.dumps(first.export_run()))
    second = FaultPlan.from_dict(d)
    second.import_run(saved)
    part += [[f.seq for f in second.decide(e)] for e in evs[20:]]
    assert part == ref and second.state == whole.state and second.counters == whole.counters


def test_probability_with_a_seed_drops_exactly_the_drawn_interrupts() -> None:
    seed = 3
    rig = Rig(Echo(), [rule("notify.interrupt", "drop_interrupt", probability=0.5)], seed=seed)
    sent = []
    for _ in range(20):
        before = rig.interrupts
        rig.submit(1)
        rig.reap()
        sent.append(rig.interrupts - before)
    draws = random.Random(seed)  # one draw per matching event (docs/faults.md)
    assert sent == [0 if draws.random() < 0.5 else 1 for _ in range(20)]
    assert 0 < sum(sent) < 20


def test_times_limits_how_often_a_rule_fires() -> None:
    rig = Rig(Echo(), [rule("ring.push", "withhold", every=2, times=2)])
    rig.submit(7)
    assert sorted(t for t, _ in rig.reap()) == ["t0", "t2", "t4", "t5", "t6"]
    assert rig.counters()["fault:withhold"] == 2


def test_a_plan_without_a_seed_resumes_with_the_saved_runs_seed(tmp_path: Path) -> None:
    state = str(tmp_path / "run.json")
    d = {"rules": [rule("device.request", "crash", nth=3, probability=0.9)]}
    first = FaultInjector(FaultPlan.from_dict(d), device="vdx", state_path=state)
    first.save_state()
    again = FaultInjector(FaultPlan.from_dict(d), device="vdx", state_path=state)
    assert again.resumed and again.plan.seed == first.plan.seed
    assert f"seed {first.plan.seed}" in again.describe()
