"""Fault plans (vdev.virtio.faults, vdev.faultplan): triggers fire when and only when
they say, filters match exactly, decisions are reproducible from the seed, bad plans are
refused at load time with one line naming the rule and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vdev.faultplan import load_plan, plan_from_text, yaml_available
from vdev.virtio.faults import ACTIONS, FaultEvent, FaultPlan, FaultPlanError, Fired


def plan(*rules: dict[str, Any], seed: int = 1, **top: Any) -> FaultPlan:
    return FaultPlan.from_dict({"seed": seed, "rules": list(rules), **top})


def rule(event: str = "blk.write", action: str | None = "ioerr", **when: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"when": {"event": event, **when}}
    if action is not None:
        r["what"] = {"action": action}
    return r


def ev(kind: str = "blk.write", **kw: Any) -> FaultEvent:
    return FaultEvent(kind, **kw)


def fired_at(p: FaultPlan, events: list[FaultEvent]) -> list[int]:
    """The 1-based positions of the events at which something fired."""
    return [i for i, e in enumerate(events, 1) if p.decide(e)]


# --------------------------------------------------------------------------- triggers


def test_no_trigger_fires_on_every_matching_event() -> None:
    p = plan(rule())
    assert fired_at(p, [ev()] * 4) == [1, 2, 3, 4]
    assert p.counters == {"rule0": 4}


def test_nth_fires_on_the_nth_matching_event_only() -> None:
    p = plan(rule(nth=3))
    assert fired_at(p, [ev()] * 8) == [3]
    assert p.counters == {"rule0": 1}


def test_nth_counts_only_matching_events() -> None:
    p = plan(rule(nth=2, device="vda"))
    events = [ev(device="vdb"), ev(device="vda"), ev(device="vdb"), ev(device="vda"), ev()]
    assert fired_at(p, events) == [4]


def test_every() -> None:
    p = plan(rule(every=2))
    assert fired_at(p, [ev()] * 7) == [2, 4, 6]


def test_nth_with_every_starts_at_nth() -> None:
    p = plan(rule(nth=3, every=2))
    assert fired_at(p, [ev()] * 9) == [3, 5, 7, 9]


def test_times_caps() -> None:
    p = plan(rule(times=2))
    assert fired_at(p, [ev()] * 5) == [1, 2]
    p = plan(rule(every=2, times=2))
    assert fired_at(p, [ev()] * 10) == [2, 4]
    p = plan(rule(times=0))
    assert fired_at(p, [ev()] * 3) == []
    assert p.counters == {"rule0": 0}


def test_probability_zero_and_one() -> None:
    p = plan(rule(probability=0.0))
    assert fired_at(p, [ev()] * 50) == []
    p = plan(rule(probability=1.0))
    assert fired_at(p, [ev()] * 50) == list(range(1, 51))


def seq(p: FaultPlan, n: int = 200) -> list[int]:
    return fired_at(p, [ev()] * n)


def test_probability_is_reproducible_from_the_seed() -> None:
    a = seq(plan(rule(probability=0.5), seed=7))
    b = seq(plan(rule(probability=0.5), seed=7))
    c = seq(plan(rule(probability=0.5), seed=8))
    assert a == b
    assert a != c
    assert 0 < len(a) < 200


def test_probability_is_drawn_only_for_candidates() -> None:
    """The draw happens after nth/every: a rule with every=2 draws on even events only,
    so its decisions equal those of probability alone on the halved sequence."""
    halved = seq(plan(rule(probability=0.5), seed=3), 100)
    full = seq(plan(rule(every=2, probability=0.5), seed=3), 200)
    assert full == [2 * i for i in halved]


def test_after_uses_the_injected_clock() -> None:
    now = [100.0]
    p = FaultPlan.from_dict({"seed": 1, "rules": [rule(after=1.5)]}, clock=lambda: now[0])
    got = []
    for t in (100.0, 100.5, 101.4, 101.5, 103.0):
        now[0] = t
        got.append(bool(p.decide(ev())))
    assert got == [False, False, False, True, True]


def test_after_with_event_times_and_explicit_start() -> None:
    p = plan(rule(after=2.0, nth=1))
    p.start(10.0)
    assert fired_at(p, [ev(time=t) for t in (10.0, 11.9, 12.0, 13.0)]) == [3]
    # nth counts only events past 'after': the first one after 12.0 is the 1st match.
    assert p.rules[0].matches == 2


def test_state_machine_transitions() -> None:
    """As blkdebug: the 2nd write moves to 'broken'; in 'broken' reads fail, and a
    flush moves back to 'initial'."""
    p = plan(
        {"name": "arm", "when": {"event": "blk.write", "nth": 2}, "set_state": "broken"},
        {
            "name": "fail",
            "when": {"event": "blk.read", "state": "broken"},
            "what": {"action": "ioerr"},
        },
        {"name": "heal", "when": {"event": "blk.flush", "state": "broken"}, "set_state": "initial"},
    )
    assert p.state == "initial"
    assert p.decide(ev("blk.read")) == []
    assert p.decide(ev("blk.write")) == []
    assert p.decide(ev("blk.write")) == []  # 'arm' fires: no action, only the state
    assert p.state == "broken"
    assert [f.rule for f in p.decide(ev("blk.read"))] == ["fail"]
    assert p.decide(ev("blk.flush")) == []
    assert p.state == "initial"
    assert p.decide(ev("blk.read")) == []
    assert p.counters == {"arm": 1, "fail": 1, "heal": 1}
    assert p.warnings == []


def test_state_changes_after_the_event() -> None:
    """A set_state applies after every rule has seen the event (state read once)."""
    p = plan(
        {"name": "go", "when": {"event": "blk.write"}, "set_state": "s2"},
        {"name": "in2", "when": {"event": "blk.write", "state": "s2"}, "what": {"action": "ioerr"}},
    )
    assert p.decide(ev()) == []
    assert [f.rule for f in p.decide(ev())] == ["in2"]


def test_fired_records() -> None:
    p = plan(
        {
            "name": "a",
            "when": {"event": "blk.write"},
            "what": {"action": "torn_write", "sectors": 3},
        },
        {"name": "b", "when": {"event": "device.request"}, "what": {"action": "crash"}},
    )
    e = ev(device="vda", queue=0, opcode="OUT", sector=8, nbytes=4096)
    got = p.decide(e) + p.decide(ev("net.tx"))
    assert got == [
        Fired("a", "torn_write", {"sectors": 3}, e, 0),
        Fired("b", "crash", {}, e, 1),
        Fired("b", "crash", {}, ev("net.tx"), 2),
    ]
    assert p.decide(ev("ring.pop")) == []  # device.request: blk.* and net.* only
    assert got[0].trace_details() == {
        "rule": "a",
        "seq": 0,
        "params": {"sectors": 3},
        "event": "blk.write",
    }


def test_control_events() -> None:
    p = plan(rule("control.SET_STATUS", "refuse_features_ok"))
    assert fired_at(p, [ev("control.SET_FEATURES"), ev("control.SET_STATUS")]) == [2]


# --------------------------------------------------------------------------- filters


def test_sector_range_overlap() -> None:
    p = plan(rule(sector=[100, 199]))
    cases = {
        (0, 512): False,
        (99, 512): False,  # sector 99 only
        (99, 1024): True,  # 99..100
        (100, 512): True,
        (199, 4096): True,
        (200, 512): False,
        (50, 512 * 200): True,  # covers the whole range
    }
    for (sector, nbytes), want in cases.items():
        assert bool(p.decide(ev(sector=sector, nbytes=nbytes))) is want, (sector, nbytes)
    assert p.decide(ev()) == []  # no sector: no match
    assert bool(p.decide(ev(sector=150))) is True  # no size: one sector


def test_size_range_inclusive() -> None:
    p = plan(rule(size=[512, 4096]))
    got = [bool(p.decide(ev(nbytes=n))) for n in (0, 511, 512, 4096, 4097)]
    assert got == [False, False, True, True, False]
    assert p.decide(ev()) == []


def test_opcode_device_queue_filters() -> None:
    p = plan(rule("device.request", "crash", opcode=["IN", 4], device="vda", queue=[0, 2]))
    ok = dict(device="vda", queue=0, opcode="IN")
    assert p.decide(ev("blk.read", **ok))
    assert p.decide(ev("blk.read", **{**ok, "opcode": 4}))
    assert p.decide(ev("blk.read", **{**ok, "queue": 2}))
    assert not p.decide(ev("blk.read", **{**ok, "opcode": "OUT"}))
    assert not p.decide(ev("blk.read", **{**ok, "device": "vdb"}))
    assert not p.decide(ev("blk.read", **{**ok, "queue": 1}))
    assert not p.decide(ev("blk.read", device="vda", queue=0))  # no opcode
    assert p.counters == {"rule0": 3}


# --------------------------------------------------------------------------- determinism


def mixed_plan(seed: int) -> FaultPlan:
    return plan(
        {"when": {"event": "blk.read", "probability": 0.3}, "what": {"action": "ioerr"}},
        {
            "when": {"event": "blk.read", "every": 3},
            "what": {"action": "latency", "dist": "normal", "mean_s": 0.01, "stddev_s": 0.005},
        },
        {"when": {"event": "blk.read"}, "what": {"action": "corrupt_read", "random": True}},
        {"when": {"event": "net.tx"}, "what": {"action": "gilbert_elliott", "p": 0.2, "r": 0.4}},
        {
            "when": {"event": "net.tx", "probability": 0.5},
            "what": {"action": "delay", "s": 0.01, "jitter_s": 0.005},
        },
        {"when": {"event": "blk.write", "probability": 0.2}, "set_state": "x"},
        seed=seed,
    )


def run(p: FaultPlan) -> list[Fired]:
    out: list[Fired] = []
    for i in range(300):
        kind = ("blk.read", "net.tx", "blk.write")[i % 3]
        out += p.decide(ev(kind, sector=i, nbytes=512 * (1 + i % 8), time=i * 0.01))
    return out


def test_same_plan_seed_events_same_decisions() -> None:
    a, b = run(mixed_plan(42)), run(mixed_plan(42))
    assert a == b
    assert len({f.rule for f in a}) == 5
    c = run(mixed_plan(43))
    assert a != c
    p = mixed_plan(42)
    run(p)
    assert run(p.fresh()) == a
    assert run(p.fresh(seed=43)) == c


def test_random_parameters_are_drawn_and_in_bounds() -> None:
    fired = run(mixed_plan(5))
    for f in fired:
        if f.action == "corrupt_read":
            assert 0 <= f.params["offset"] < f.event.nbytes
            assert 1 <= f.params["xor"] <= 255
        if f.action == "latency":
            assert f.params["delay_s"] >= 0
        if f.action == "delay":
            assert 0.005 <= f.params["delay_s"] <= 0.015


def test_gilbert_elliott_extremes() -> None:
    always_bad = plan(
        rule("net.rx", None) | {"what": {"action": "gilbert_elliott", "p": 1, "r": 0}}
    )
    assert len(fired_at(always_bad, [ev("net.rx")] * 20)) == 20
    never_bad = plan(rule("net.rx", None) | {"what": {"action": "gilbert_elliott", "p": 0, "r": 1}})
    assert fired_at(never_bad, [ev("net.rx")] * 20) == []


def test_seed_recorded_and_round_trip() -> None:
    p = FaultPlan.from_dict({"rules": [rule(probability=0.5)]})
    assert isinstance(p.seed, int)
    assert p.to_dict()["seed"] == p.seed
    q = FaultPlan.from_dict(p.to_dict())
    assert q.seed == p.seed and q.to_dict() == p.to_dict()
    assert seq(q) == seq(p.fresh())
    assert FaultPlan.from_dict(p.to_dict(), seed=9).seed == 9


def test_every_action_accepts_its_parameters() -> None:
    """One valid rule per action; the docs' example catalogue stays loadable."""
    params: dict[str, dict[str, Any]] = {
        "corrupt_read": {"offset": 0},
        "corrupt_byte": {"offset": 14, "xor": 1},
        "torn_write": {"sectors": 1},
        "latency": {"s": 0.001},
        "gilbert_elliott": {"p": 0.1, "r": 0.5},
        "delay": {"s": 0.01},
        "rate_limit": {"bits_per_s": 1e6},
        "link_flap": {"down_s": 0.5},
        "interrupt_storm": {"n": 5},
    }
    event = {
        "blk": "blk.write",
        "net": "net.tx",
        "ring": "ring.push",
        "notify": "notify.interrupt",
        "lifecycle": "control.SET_STATUS",
    }
    special = {"corrupt_read": "blk.read", "drop_flush": "blk.flush"}
    rules = []
    for name, a in ACTIONS.items():
        e = special.get(name, event[a.family])
        rules.append(
            {"name": name, "when": {"event": e}, "what": {"action": name, **params.get(name, {})}}
        )
    assert len(plan(*rules).rules) == len(ACTIONS)


# --------------------------------------------------------------------------- bad plans


BAD: list[tuple[Any, str]] = [
    (
        [{"when": {"event": "blk.bogus"}, "what": {"action": "ioerr"}}],
        "rule #0: when.event: unknown event",
    ),
    (
        [{"when": {"event": "control.NOPE"}, "what": {"action": "crash"}}],
        "rule #0: when.event: unknown control",
    ),
    (
        [{"name": "x", "when": {"event": "blk.read"}, "what": {"action": "explode"}}],
        "rule 'x' (#0): what.action: unknown action",
    ),
    (
        [{"name": "x", "when": {"event": "net.tx"}, "what": {"action": "ioerr"}}],
        "rule 'x' (#0): what.action: ioerr is a blk action",
    ),
    (
        [{"when": {"event": "blk.write"}, "what": {"action": "corrupt_read", "offset": 0}}],
        "rule #0: what.action: corrupt_read is only valid for blk.read",
    ),
    ([rule(sector=[10, 5])], "rule #0: when.sector: range reversed"),
    ([rule(size=[4096, 512])], "rule #0: when.size: range reversed"),
    ([rule(sector=[1])], "rule #0: when.sector: must be [first, last]"),
    ([rule("net.tx", "loss", sector=[0, 1])], "rule #0: when.sector: only for blk"),
    ([rule(colour="red")], "rule #0: when.colour: unknown key"),
    ([{**rule(), "whence": 1}], "rule #0: whence: unknown key"),
    ([rule(probability=1.5)], "rule #0: when.probability: must be in 0..1"),
    ([rule(probability=-0.1)], "rule #0: when.probability: must be in 0..1"),
    ([rule(nth=-1)], "rule #0: when.nth: must be an integer >= 1"),
    ([rule(nth=0)], "rule #0: when.nth: must be an integer >= 1"),
    ([rule(every=-2)], "rule #0: when.every: must be an integer >= 1"),
    ([rule(times=-1)], "rule #0: when.times: must be an integer >= 0"),
    ([rule(times=True)], "rule #0: when.times: must be an integer >= 0"),
    ([rule(after=-1)], "rule #0: when.after: must be >= 0"),
    ([rule(queue="zero")], "rule #0: when.queue: must be a queue index"),
    ([rule(device=[])], "rule #0: when.device: must be a device name"),
    (
        [rule(), {"name": "y", "when": {}, "what": {"action": "ioerr"}}],
        "rule 'y' (#1): when.event: required",
    ),
    ([{"name": "y", "when": {"event": "blk.read"}}], "rule 'y' (#0): what: required"),
    (
        [{"when": {"event": "blk.write"}, "what": {"action": "torn_write"}}],
        "rule #0: what.sectors: required by torn_write",
    ),
    (
        [{"when": {"event": "blk.write"}, "what": {"action": "torn_write", "sectors": -1}}],
        "rule #0: what.sectors: must be in 0",
    ),
    (
        [{"when": {"event": "blk.write"}, "what": {"action": "ioerr", "code": 5}}],
        "rule #0: what.code: not a parameter of ioerr",
    ),
    (
        [{"when": {"event": "net.tx"}, "what": {"action": "gilbert_elliott", "p": 2, "r": 0}}],
        "rule #0: what.p: must be in 0..1",
    ),
    (
        [
            {
                "when": {"event": "blk.read"},
                "what": {"action": "latency", "dist": "uniform", "low_s": 2, "high_s": 1},
            }
        ],
        "rule #0: what.low_s:",
    ),
    (
        [
            {
                "when": {"event": "blk.read"},
                "what": {"action": "latency", "dist": "normal", "mean_s": 1},
            }
        ],
        "rule #0: what.stddev_s: required",
    ),
    (
        [{"when": {"event": "blk.read"}, "what": {"action": "latency", "dist": "gamma"}}],
        "rule #0: what.dist: must be one of",
    ),
    (
        [{"when": {"event": "blk.read"}, "what": {"action": "corrupt_read"}}],
        "rule #0: what.offset: required unless random",
    ),
    (
        [{"name": "d", "when": {"event": "blk.read"}, "what": {"action": "ioerr"}}] * 2,
        "rule 'd' (#1): name: duplicate of rule #0",
    ),
    ([rule(state=7)], "rule #0: when.state: must be a state name"),
    (
        [{"when": {"event": "blk.read"}, "set_state": ""}],
        "rule #0: set_state: must be a state name",
    ),
    (["ioerr"], "rule #0: must be a table"),
]


@pytest.mark.parametrize(("rules", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_plans_refused_naming_rule_and_field(rules: Any, message: str) -> None:
    with pytest.raises(FaultPlanError) as ei:
        plan(*rules)
    text = str(ei.value)
    assert text.startswith(message), text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"rules": {}}, "plan: rules: must be a list"),
        ({"rules": [], "extra": 1}, "plan: extra: unknown key"),
        ({"rules": [], "seed": -1}, "plan: seed: must be an integer"),
        ({"rules": [], "seed": "x"}, "plan: seed: must be an integer"),
        ({"rules": [], "version": 2}, "plan: version: 2 unsupported"),
        ([], "plan: must be a table"),
    ],
)
def test_bad_plan_level_fields(doc: Any, message: str) -> None:
    with pytest.raises(FaultPlanError, match=f"^{message}"):
        FaultPlan.from_dict(doc)


def test_unreachable_state_is_a_warning() -> None:
    p = plan(
        {
            "name": "never",
            "when": {"event": "blk.read", "state": "ghost"},
            "what": {"action": "ioerr"},
        },
        {"name": "orphan", "when": {"event": "blk.read", "state": "island"}, "set_state": "ghost"},
        {"name": "unused", "when": {"event": "blk.read"}, "set_state": "nobody_reads_me"},
    )
    assert len(p.warnings) == 2
    assert p.warnings[0].startswith("rule 'never' (#0): when.state: 'ghost' is never reached")
    assert p.warnings[1].startswith("rule 'orphan' (#1): when.state: 'island' is never reached")


# --------------------------------------------------------------------------- text and files


JSON_PLAN = {
    "seed": 11,
    "rules": [
        {
            "name": "third-write",
            "when": {"event": "blk.write", "nth": 3},
            "what": {"action": "ioerr"},
        }
    ],
}

TOML_PLAN = """
seed = 11

[[rules]]
name = "third-write"
when = { event = "blk.write", nth = 3 }
what = { action = "ioerr" }

[[rules]]
name = "slow"
when = { event = "blk.read", sector = [0, 7] }
what = { action = "latency", dist = "uniform", low_s = 0.001, high_s = 0.002 }
"""


def test_from_text_json_and_toml() -> None:
    a = FaultPlan.from_text(json.dumps(JSON_PLAN), "json")
    b = FaultPlan.from_text(TOML_PLAN, "toml")
    assert a.seed == b.seed == 11
    assert fired_at(a, [ev()] * 4) == fired_at(b, [ev()] * 4) == [3]
    assert b.rules[1].params == {"dist": "uniform", "low_s": 0.001, "high_s": 0.002}


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        ('{"rules": [', "json", "plan: JSON syntax:"),
        ("rules = [", "toml", "plan: TOML syntax:"),
        ("{}", "ini", "plan: format 'ini' unknown"),
    ],
)
def test_syntax_errors(text: str, fmt: str, message: str) -> None:
    with pytest.raises(FaultPlanError) as ei:
        FaultPlan.from_text(text, fmt)
    assert str(ei.value).startswith(message) and "\n" not in str(ei.value)


def test_load_json_and_toml_files(tmp_path: Path) -> None:
    j = tmp_path / "plan.json"
    j.write_text(json.dumps(JSON_PLAN))
    t = tmp_path / "plan.toml"
    t.write_text(TOML_PLAN)
    pj, pt = load_plan(j), load_plan(t)
    assert pj.to_dict()["rules"] == pt.to_dict()["rules"][:1]
    assert load_plan(j, seed=3).seed == 3


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[rules]]\nwhen = { event = "blk.write", nth = -1 }\nwhat = { action = "ioerr" }\n'
    )
    with pytest.raises(FaultPlanError, match=r"bad\.toml: rule #0: when\.nth: must be an integer"):
        load_plan(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(FaultPlanError, match=r"broken\.json: plan: JSON syntax"):
        load_plan(broken)
    with pytest.raises(FaultPlanError, match=r"missing\.json: cannot read: No such file"):
        load_plan(tmp_path / "missing.json")
    with pytest.raises(FaultPlanError, match=r"plan\.ini: unknown plan format '\.ini'"):
        load_plan(tmp_path / "plan.ini")


YAML_PLAN = """
seed: 11
rules:
  - name: third-write
    when: {event: blk.write, nth: 3}
    what: {action: ioerr}
"""


@pytest.mark.skipif(not yaml_available(), reason="PyYAML is not installed")
def test_load_yaml(tmp_path: Path) -> None:
    y = tmp_path / "plan.yaml"
    y.write_text(YAML_PLAN)
    assert fired_at(load_plan(y), [ev()] * 4) == [3]
    with pytest.raises(FaultPlanError, match="plan: YAML syntax"):
        plan_from_text("rules: [", "yaml")


def test_yaml_without_pyyaml_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vdev.faultplan

    monkeypatch.setattr(vdev.faultplan, "_yaml", lambda: None)  # as if PyYAML were missing
    y = tmp_path / "plan.yml"
    y.write_text(YAML_PLAN)
    with pytest.raises(FaultPlanError, match=r"plan\.yml: plan: YAML plans need PyYAML"):
        load_plan(y)


def test_the_docs_examples_load() -> None:
    """Every JSON and TOML example in docs/faults.md is a valid plan without warnings."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "faults.md").read_text()
    blocks = re.findall(r"```(json|toml)\n(.*?)```", doc, re.S)
    assert len(blocks) == 5
    for fmt, text in blocks:
        p = FaultPlan.from_text(text, fmt)
        assert p.rules and p.warnings == [], text
