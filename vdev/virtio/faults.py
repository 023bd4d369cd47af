"""Fault plans: the format, its validator and the trigger engine, sans-IO.

Theory of operation
-------------------
A *fault plan* is a list of rules, each ``when`` (an event kind, filters and triggers)
→ ``what`` (an action with parameters), optionally limited to a plan *state* and
optionally moving the plan to another state (``set_state``, as QEMU blkdebug's
set-state). The format is documented in ``docs/faults.md``; :meth:`FaultPlan.from_dict`
and :meth:`FaultPlan.from_text` (JSON, TOML) validate a plan completely at load time and
raise :class:`FaultPlanError` with one line naming the rule and the field.

The engine does no I/O and executes nothing: whoever sees an event (a device session,
a transport) describes it as a :class:`FaultEvent` and calls :meth:`FaultPlan.decide`,
which returns the faults that fire as :class:`Fired` records; carrying them out is the
caller's job. ``decide`` is deterministic: one ``random.Random(seed)`` per plan run,
drawn from only in the order documented in ``docs/faults.md`` ("Determinism"), so the
same plan, seed and sequence of events always give the same decisions.

For each event, the rules are evaluated in plan order against the state the plan had
when the event arrived::

    for rule in rules:
        kind matches? state matches? filters match? time >= after?   -> else skip
        matches += 1
        fired == times?                                              -> skip
        nth / every select this match?                               -> else skip
        probability: one draw, fires iff draw < p                    -> else skip
        gilbert_elliott: step its two-state chain (two draws)        -> fires iff lost
        fired += 1; record Fired (unless the rule has no action); remember set_state
    state = the last remembered set_state, if any
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PLAN_VERSION",
    "EVENTS",
    "ACTIONS",
    "CONTROL_MESSAGES",
    "FaultPlanError",
    "FaultStateError",
    "FaultEvent",
    "Fired",
    "FaultRule",
    "FaultPlan",
]

#: The plan format's version (``version`` key; absent means 1).
PLAN_VERSION = 1

#: Event kinds and their family. ``control.<MESSAGE>`` events are family ``control``.
EVENTS: dict[str, str] = {
    "blk.read": "blk",
    "blk.write": "blk",
    "blk.flush": "blk",
    "blk.discard": "blk",
    "net.tx": "net",
    "net.rx": "net",
    "ring.pop": "ring",
    "ring.push": "ring",
    "notify.kick": "notify",
    "notify.interrupt": "notify",
    "device.request": "device",
}

#: Control messages a ``control.<MESSAGE>`` rule may name: our control channel's
#: requests (:data:`vdev.virtio.control.REQUESTS`) and vhost-user's front-end requests.
CONTROL_MESSAGES: frozenset[str] = frozenset(
    {
        "GET_DEVICE_INFO",
        "GET_FEATURES",
        "SET_FEATURES",
        "GET_CONFIG",
        "SET_CONFIG",
        "SET_MEM_TABLE",
        "SET_VRING_NUM",
        "SET_VRING_ADDR",
        "SET_VRING_BASE",
        "GET_VRING_BASE",
        "SET_VRING_KICK",
        "SET_VRING_CALL",
        "SET_VRING_ENABLE",
        "SET_STATUS",
        "GET_STATUS",
        "RESET_DEVICE",
        "GET_METRICS",
        "SET_OWNER",
        "RESET_OWNER",
        "SET_LOG_BASE",
        "SET_LOG_FD",
        "SET_VRING_ERR",
        "GET_PROTOCOL_FEATURES",
        "SET_PROTOCOL_FEATURES",
        "GET_QUEUE_NUM",
        "GET_MAX_MEM_SLOTS",
        "ADD_MEM_REG",
        "REM_MEM_REG",
    }
)

_CONTROL_RE = re.compile(r"control\.([A-Z][A-Z0-9_]*)\Z")
_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")

# Which event families each action family may be attached to.
_FAMILY_EVENTS: dict[str, frozenset[str]] = {
    "blk": frozenset({"blk"}),
    "net": frozenset({"net"}),
    "ring": frozenset({"ring"}),
    "notify": frozenset({"notify"}),
    "lifecycle": frozenset({"blk", "net", "ring", "notify", "control", "device"}),
}

_MAX_RULES = 1024
_MAX_LIST = 64  # entries in a device / queue / opcode list filter


# --------------------------------------------------------------------------- params


@dataclass(frozen=True)
class _Param:
    """One parameter of an action: its type, bounds and default."""

    kind: str  # "int" | "float" | "prob" | "bool" | "choice"
    required: bool = False
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()


def _p(kind: str, **kw: Any) -> _Param:
    return _Param(kind, **kw)


@dataclass(frozen=True)
class _Action:
    family: str
    params: dict[str, _Param]
    events: frozenset[str] | None = None  # narrower than the family (None: the family's)
    check: Callable[[dict[str, Any]], str | None] | None = None


def _check_corrupt(p: dict[str, Any]) -> str | None:
    if p.get("random") and "offset" in p:
        return "offset: give either offset (with xor) or random=true, not both"
    if not p.get("random") and "offset" not in p:
        return "offset: required unless random=true"
    return None


def _check_latency(p: dict[str, Any]) -> str | None:
    need = {"fixed": ("s",), "uniform": ("low_s", "high_s"), "normal": ("mean_s", "stddev_s")}
    dist = p["dist"]
    for key in ("s", "low_s", "high_s", "mean_s", "stddev_s"):
        if key in p and key not in need[dist]:
            return f"{key}: not a parameter of dist={dist!r} (takes {', '.join(need[dist])})"
    for key in need[dist]:
        if key not in p:
            return f"{key}: required for dist={dist!r}"
    if dist == "uniform" and p["low_s"] > p["high_s"]:
        return f"low_s: {p['low_s']} > high_s {p['high_s']}"
    return None


_SEC: dict[str, Any] = {"kind": "float", "lo": 0.0, "hi": 3600.0}
_BYTE_OFF = _p("int", lo=0, hi=(1 << 32) - 1)
_XOR = _p("int", default=0xFF, lo=1, hi=0xFF)

#: Every action: its family, parameter schema, and the events it may be attached to.
ACTIONS: dict[str, _Action] = {
    # virtio-blk (§5.2.6): the request's status, its data, its timing.
    "ioerr": _Action("blk", {}),
    "unsupp": _Action("blk", {}),
    "corrupt_read": _Action(
        "blk",
        {"offset": _BYTE_OFF, "xor": _XOR, "random": _p("bool", default=False)},
        frozenset({"blk.read"}),
        _check_corrupt,
    ),
    "drop_write": _Action("blk", {}, frozenset({"blk.write"})),
    "drop_flush": _Action("blk", {}, frozenset({"blk.flush"})),
    "torn_write": _Action(
        "blk", {"sectors": _p("int", required=True, lo=0, hi=1 << 24)}, frozenset({"blk.write"})
    ),
    "power_cut": _Action("blk", {}),
    "latency": _Action(
        "blk",
        {
            "dist": _p("choice", default="fixed", choices=("fixed", "uniform", "normal")),
            "s": _p(**_SEC),
            "low_s": _p(**_SEC),
            "high_s": _p(**_SEC),
            "mean_s": _p(**_SEC),
            "stddev_s": _p(**_SEC),
        },
        None,
        _check_latency,
    ),
    # virtio-net (§5.1.6): what happens to a frame.
    "loss": _Action("net", {}),
    "gilbert_elliott": _Action(
        "net",
        {
            "p": _p("prob", required=True),
            "r": _p("prob", required=True),
            "h": _p("prob", default=0.0),
            "k": _p("prob", default=1.0),
        },
    ),
    "duplicate": _Action("net", {"count": _p("int", default=1, lo=1, hi=64)}),
    "reorder": _Action("net", {"depth": _p("int", default=1, lo=1, hi=1024)}),
    "corrupt_byte": _Action(
        "net",
        {"offset": _BYTE_OFF, "xor": _XOR, "random": _p("bool", default=False)},
        None,
        _check_corrupt,
    ),
    "delay": _Action("net", {"s": _p(required=True, **_SEC), "jitter_s": _p(default=0.0, **_SEC)}),
    "rate_limit": _Action(
        "net",
        {
            "bits_per_s": _p("float", required=True, lo=1.0, hi=1e12),
            "burst_bytes": _p("int", default=0, lo=0, hi=1 << 30),
        },
    ),
    "link_flap": _Action("net", {"down_s": _p(required=True, **_SEC)}),
    # The split virtqueue (§2.7.8): the device breaking the used-ring rules.
    "bad_used_id": _Action("ring", {"id": _p("int", lo=0, hi=0xFFFFFFFF)}),
    "used_id_not_head": _Action("ring", {}),
    "double_complete": _Action("ring", {}),
    "used_len_too_big": _Action("ring", {"extra": _p("int", default=1, lo=1, hi=0xFFFFFFFF)}),
    "used_idx_jump": _Action("ring", {"by": _p("int", default=1, lo=1, hi=0xFFFF)}),
    "withhold": _Action("ring", {}),
    "out_of_order": _Action("ring", {"depth": _p("int", default=1, lo=1, hi=1024)}),
    # Notifications (§2.7.7, §2.7.10).
    "drop_interrupt": _Action("notify", {}),
    "spurious_interrupt": _Action("notify", {}),
    "interrupt_storm": _Action("notify", {"n": _p("int", required=True, lo=1, hi=1 << 20)}),
    "ignore_event_idx": _Action("notify", {}),
    # Device life cycle (§2.1, §3.1).
    "refuse_features_ok": _Action("lifecycle", {}),
    "needs_reset": _Action("lifecycle", {}),
    "crash": _Action("lifecycle", {}),
    "hang": _Action("lifecycle", {"s": _p(**_SEC)}),
}

_WHEN_KEYS = frozenset(
    {
        "event",
        "device",
        "queue",
        "opcode",
        "sector",
        "size",
        "state",
        "nth",
        "every",
        "times",
        "probability",
        "after",
    }
)
_RULE_KEYS = frozenset({"name", "when", "what", "set_state"})
_PLAN_KEYS = frozenset({"version", "seed", "initial_state", "rules"})
_STATE_FORMAT = "vlab-fault-run/1"  # FaultPlan.export_run's format tag
_SECTOR = 512  # §5.2.6: sectors are 512 bytes whatever the block size


# --------------------------------------------------------------------------- errors


class FaultPlanError(ValueError):
    """A fault plan is invalid (the plan's author is at fault). The message is one line
    naming the rule (``rule 'name' (#i)``, or ``plan``) and the field."""


class FaultStateError(ValueError):
    """A saved run state (:meth:`FaultPlan.import_run`) is corrupt or belongs to another
    plan (the state file is at fault). The message is one line naming the field."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """Something a device or transport is about to do, described for the plan.

    ``kind`` is an event of :data:`EVENTS` or ``control.<MESSAGE>``; ``device`` the
    device's name (``vda``, ``eth0``); ``queue`` its queue index; ``opcode`` the
    request's type (virtio-blk ``IN``/``OUT``/..., or any value the caller uses);
    ``sector`` the first 512-byte sector; ``nbytes`` the data length; ``time`` seconds
    on the caller's clock (None: ask the plan's injected clock, else 0)."""

    kind: str
    device: str | None = None
    queue: int | None = None
    opcode: str | int | None = None
    sector: int | None = None
    nbytes: int | None = None
    time: float | None = None


@dataclass(frozen=True, slots=True)
class Fired:
    """One fault that fired: the ``rule`` (its name), the ``action`` and its ``params``
    (defaults filled in, random choices already drawn), the ``event`` and ``seq``, the
    plan-wide sequence number of fired faults (0, 1, 2, ...)."""

    rule: str
    action: str
    params: dict[str, Any]
    event: FaultEvent
    seq: int

    def trace_details(self) -> dict[str, Any]:
        """The fields for ``Tracer.fault(fired.action, fired.event.queue, **details)``
        (:mod:`vdev.virtio.trace`): rule, seq, params and the event's kind."""
        return {"rule": self.rule, "seq": self.seq, "params": self.params, "event": self.event.kind}


@dataclass
class FaultRule:
    """One validated rule. ``fired`` and ``matches`` are its counters."""

    name: str
    index: int
    event: str
    family: str
    devices: tuple[str, ...] | None = None
    queues: tuple[int, ...] | None = None
    opcodes: tuple[str | int, ...] | None = None
    sector: tuple[int, int] | None = None
    size: tuple[int, int] | None = None
    state: str | None = None
    nth: int | None = None
    every: int | None = None
    times: int | None = None
    probability: float | None = None
    after: float | None = None
    action: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    set_state: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    matches: int = 0
    fired: int = 0
    ge_bad: bool = False  # gilbert_elliott: the chain is in its bad state

    def matches_kind(self, kind: str) -> bool:
        """Does an event of ``kind`` match this rule's ``event``?"""
        if self.event == kind:
            return True
        return self.event == "device.request" and kind.split(".", 1)[0] in ("blk", "net")

    def matches_filters(self, ev: FaultEvent) -> bool:
        """Do ``ev``'s device, queue, opcode, sector and size pass the filters? An event
        that lacks a filtered field does not match."""
        if self.devices is not None and ev.device not in self.devices:
            return False
        if self.queues is not None and ev.queue not in self.queues:
            return False
        if self.opcodes is not None and ev.opcode not in self.opcodes:
            return False
        if self.size is not None:
            if ev.nbytes is None or not self.size[0] <= ev.nbytes <= self.size[1]:
                return False
        if self.sector is not None:
            if ev.sector is None:
                return False
            # The request covers [sector, sector + ceil(nbytes / 512)), at least 1 sector.
            n = max(1, -(-(ev.nbytes or 0) // _SECTOR))
            if ev.sector > self.sector[1] or ev.sector + n - 1 < self.sector[0]:
                return False
        return True


# --------------------------------------------------------------------------- validation


def _where(index: int, name: str | None) -> str:
    return f"rule {name!r} (#{index})" if name else f"rule #{index}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def _one_or_list(v: Any, ok: Callable[[Any], bool], what: str) -> tuple[Any, ...]:
    items = v if isinstance(v, list) else [v]
    if not items or len(items) > _MAX_LIST:
        raise ValueError(f"must be {what} or a list of 1..{_MAX_LIST} of them")
    for x in items:
        if not ok(x):
            raise ValueError(f"must be {what} or a list of them, got {x!r}")
    return tuple(items)


def _range(v: Any) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)):
        raise ValueError(f"must be [first, last] (two integers), got {v!r}")
    lo, hi = v
    if lo < 0:
        raise ValueError(f"first {lo} is negative")
    if lo > hi:
        raise ValueError(f"range reversed: first {lo} > last {hi}")
    return lo, hi


def _param(p: _Param, v: Any) -> Any:
    if p.kind == "bool":
        if not isinstance(v, bool):
            raise ValueError(f"must be true or false, got {v!r}")
        return v
    if p.kind == "choice":
        if v not in p.choices:
            raise ValueError(f"must be one of {', '.join(p.choices)}, got {v!r}")
        return v
    if p.kind == "int":
        if not _is_int(v):
            raise ValueError(f"must be an integer, got {v!r}")
    elif not _is_num(v):
        raise ValueError(f"must be a number, got {v!r}")
    lo, hi = (0.0, 1.0) if p.kind == "prob" else (p.lo, p.hi)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if lo is not None and hi is not None:
            span = f"in {lo:g}..{hi:g}"
        else:
            span = f">= {lo:g}" if lo is not None else f"<= {hi:g}"
        raise ValueError(f"must be {span}, got {v!r}")
    return v if p.kind == "int" else float(v)


def _parse_rule(index: int, d: Any) -> FaultRule:
    if not isinstance(d, Mapping):
        raise FaultPlanError(f"rule #{index}: must be a table/object, got {type(d).__name__}")
    name = d.get("name")
    if name is not None and not (isinstance(name, str) and _NAME_RE.match(name)):
        raise FaultPlanError(f"rule #{index}: name: must be 1..64 of [A-Za-z0-9_.:-], got {name!r}")
    at = _where(index, name)

    def bad(fld: str, msg: str) -> FaultPlanError:
        return FaultPlanError(f"{at}: {fld}: {msg}")

    for k in d:
        if k not in _RULE_KEYS:
            raise bad(str(k), f"unknown key (known: {', '.join(sorted(_RULE_KEYS))})")
    when = d.get("when")
    if not isinstance(when, Mapping):
        raise bad("when", "required, a table/object with at least 'event'")
    for k in when:
        if k not in _WHEN_KEYS:
            raise bad(f"when.{k}", f"unknown key (known: {', '.join(sorted(_WHEN_KEYS))})")
    event = when.get("event")
    if not isinstance(event, str):
        raise bad("when.event", f"required, a string, got {event!r}")
    if event in EVENTS:
        family = EVENTS[event]
    elif m := _CONTROL_RE.match(event):
        if m.group(1) not in CONTROL_MESSAGES:
            raise bad("when.event", f"unknown control message {m.group(1)!r}")
        family = "control"
    else:
        raise bad("when.event", f"unknown event {event!r} (known: {', '.join(EVENTS)}, control.X)")
    rule = FaultRule(name=name or f"rule{index}", index=index, event=event, family=family)
    try:
        fld = "when.device"
        if "device" in when:
            rule.devices = _one_or_list(
                when["device"], lambda x: isinstance(x, str) and bool(x), "a device name"
            )
        fld = "when.queue"
        if "queue" in when:
            rule.queues = _one_or_list(
                when["queue"], lambda x: _is_int(x) and 0 <= x <= 0xFFFF, "a queue index 0..65535"
            )
        fld = "when.opcode"
        if "opcode" in when:
            rule.opcodes = _one_or_list(
                when["opcode"], lambda x: isinstance(x, str) or _is_int(x), "an opcode"
            )
        for fld in ("when.sector", "when.size"):
            key = fld[5:]
            if key in when:
                if key == "sector" and family not in ("blk", "device"):
                    raise ValueError(f"only for blk.* and device.request events, not {event}")
                setattr(rule, key, _range(when[key]))
        for fld in ("when.nth", "when.every", "when.times"):
            key = fld[5:]
            if key in when:
                v = when[key]
                if not _is_int(v) or v < (0 if key == "times" else 1):
                    low = 0 if key == "times" else 1
                    raise ValueError(f"must be an integer >= {low}, got {v!r}")
                setattr(rule, key, v)
        fld = "when.probability"
        if "probability" in when:
            rule.probability = _param(_Param("prob"), when["probability"])
        fld = "when.after"
        if "after" in when:
            rule.after = _param(_Param("float", lo=0.0), when["after"])
        fld = "when.state"
        if "state" in when:
            if not (isinstance(when["state"], str) and _NAME_RE.match(when["state"])):
                raise ValueError(f"must be a state name, got {when['state']!r}")
            rule.state = when["state"]
        fld = "set_state"
        if "set_state" in d:
            if not (isinstance(d["set_state"], str) and _NAME_RE.match(d["set_state"])):
                raise ValueError(f"must be a state name, got {d['set_state']!r}")
            rule.set_state = d["set_state"]
    except ValueError as e:
        raise bad(fld, str(e)) from None
    what = d.get("what")
    if what is None:
        if rule.set_state is None:
            raise bad("what", "required (a rule without an action must have set_state)")
    else:
        _parse_what(rule, what, bad)
    rule.raw = _plain(dict(d))
    return rule


def _parse_what(rule: FaultRule, what: Any, bad: Callable[[str, str], FaultPlanError]) -> None:
    if not isinstance(what, Mapping):
        raise bad("what", "must be a table/object with 'action'")
    action = what.get("action")
    if not isinstance(action, str) or action not in ACTIONS:
        raise bad("what.action", f"unknown action {action!r}")
    spec = ACTIONS[action]
    allowed = _FAMILY_EVENTS[spec.family]
    if rule.family not in allowed:
        raise bad(
            "what.action",
            f"{action} is a {spec.family} action, not valid for {rule.event} events",
        )
    if spec.events is not None and rule.event not in spec.events:
        raise bad("what.action", f"{action} is only valid for {', '.join(sorted(spec.events))}")
    params: dict[str, Any] = {}
    for k, v in what.items():
        if k == "action":
            continue
        if k not in spec.params:
            known = ", ".join(spec.params) or "none"
            raise bad(f"what.{k}", f"not a parameter of {action} (parameters: {known})")
        try:
            params[k] = _param(spec.params[k], v)
        except ValueError as e:
            raise bad(f"what.{k}", str(e)) from None
    for k, p in spec.params.items():
        if k not in params:
            if p.required:
                raise bad(f"what.{k}", f"required by {action}")
            if p.default is not None:
                params[k] = p.default
    if spec.check is not None and (msg := spec.check(params)) is not None:
        fld, _, text = msg.partition(": ")
        raise bad(f"what.{fld}", text)
    rule.action = action
    rule.params = params


def _plain(v: Any) -> Any:
    """A deep copy of parsed plan data as plain dicts/lists (TOML gives dict subclasses
    on some versions; YAML may give tuples)."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def _reachable(initial: str, rules: list[FaultRule]) -> set[str]:
    seen = {initial}
    frontier = [initial]
    while frontier:  # bounded: each state enters the frontier at most once
        s = frontier.pop()
        for r in rules:
            if r.set_state and r.set_state not in seen and r.state in (None, s):
                seen.add(r.set_state)
                frontier.append(r.set_state)
    return seen


# --------------------------------------------------------------------------- the plan


class FaultPlan:
    """A validated fault plan and the state of one run of it.

    Build it with :meth:`from_dict` or :meth:`from_text`; ask it with :meth:`decide`.
    ``seed`` is the run's seed (given, from the plan, or drawn once and recorded here);
    ``state`` the current state; ``warnings`` what was legal but suspicious;
    ``counters`` fired faults per rule name; ``clock`` the injected clock used for
    events without a ``time``."""

    def __init__(
        self,
        rules: list[FaultRule],
        *,
        seed: int,
        initial_state: str = "initial",
        version: int = PLAN_VERSION,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.rules = rules
        self.seed = seed
        self.initial_state = initial_state
        self.version = version
        self.clock = clock
        self.state = initial_state
        self.rng = random.Random(seed)
        self.start_time: float | None = None
        self.events = 0
        self.fired_total = 0
        self.warnings: list[str] = []
        #: The seed was drawn (neither the plan nor the caller gave one): a saved run
        #: of this plan may bring its own (:meth:`import_run` with ``adopt_seed``).
        self.seed_drawn = False
        reach = _reachable(initial_state, rules)
        for r in rules:
            if r.state is not None and r.state not in reach:
                self.warnings.append(
                    f"{_where(r.index, r.raw.get('name'))}: when.state: {r.state!r} is never "
                    f"reached (not the initial state and no reachable rule sets it)"
                )

    # -- loading

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        *,
        seed: int | None = None,
        clock: Callable[[], float] | None = None,
    ) -> FaultPlan:
        """Validate plan data (parsed JSON/TOML/YAML or Python objects). ``seed``
        overrides the plan's ``seed``; with neither one is drawn and recorded in
        :attr:`seed`. Raises :class:`FaultPlanError`."""
        if not isinstance(d, Mapping):
            raise FaultPlanError(f"plan: must be a table/object, got {type(d).__name__}")
        for k in d:
            if k not in _PLAN_KEYS:
                raise FaultPlanError(
                    f"plan: {k}: unknown key (known: {', '.join(sorted(_PLAN_KEYS))})"
                )
        version = d.get("version", PLAN_VERSION)
        if version != PLAN_VERSION or not _is_int(version):
            raise FaultPlanError(f"plan: version: {version!r} unsupported (this reader: 1)")
        plan_seed = d.get("seed")
        if plan_seed is not None and not (_is_int(plan_seed) and 0 <= plan_seed < 1 << 64):
            raise FaultPlanError(f"plan: seed: must be an integer 0..2^64-1, got {plan_seed!r}")
        initial = d.get("initial_state", "initial")
        if not (isinstance(initial, str) and _NAME_RE.match(initial)):
            raise FaultPlanError(f"plan: initial_state: must be a state name, got {initial!r}")
        rules_d = d.get("rules", [])
        if not isinstance(rules_d, list):
            raise FaultPlanError("plan: rules: must be a list of rules")
        if len(rules_d) > _MAX_RULES:
            raise FaultPlanError(f"plan: rules: at most {_MAX_RULES} rules, got {len(rules_d)}")
        rules = [_parse_rule(i, r) for i, r in enumerate(rules_d)]
        names: dict[str, int] = {}
        for r in rules:
            if r.name in names:
                raise FaultPlanError(
                    f"{_where(r.index, r.name)}: name: duplicate of rule #{names[r.name]}"
                )
            names[r.name] = r.index
        drawn = seed is None and plan_seed is None
        if seed is None:
            seed = plan_seed if plan_seed is not None else random.randrange(1 << 63)
        plan = cls(rules, seed=seed, initial_state=initial, version=version, clock=clock)
        plan.seed_drawn = drawn
        return plan

    @classmethod
    def from_text(
        cls,
        text: str,
        fmt: str,
        *,
        seed: int | None = None,
        clock: Callable[[], float] | None = None,
    ) -> FaultPlan:
        """Parse and validate a plan written as ``fmt`` ``"json"`` or ``"toml"`` (YAML:
        :func:`vdev.faultplan.plan_from_text`). Syntax errors are FaultPlanErrors."""
        if fmt == "json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise FaultPlanError(
                    f"plan: JSON syntax: {e.msg} at line {e.lineno} column {e.colno}"
                ) from None
        elif fmt == "toml":
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise FaultPlanError(f"plan: TOML syntax: {e}".splitlines()[0]) from None
        else:
            raise FaultPlanError(f"plan: format {fmt!r} unknown here (json, toml)")
        return cls.from_dict(data, seed=seed, clock=clock)

    def to_dict(self) -> dict[str, Any]:
        """The plan as data (with its seed), such that ``from_dict(to_dict())`` is the
        same plan."""
        return {
            "version": self.version,
            "seed": self.seed,
            "initial_state": self.initial_state,
            "rules": [_plain(r.raw) for r in self.rules],
        }

    def fresh(self, seed: int | None = None) -> FaultPlan:
        """A new run of the same plan: state, counters and RNG from the start (the same
        seed unless ``seed`` is given)."""
        return FaultPlan.from_dict(
            self.to_dict(), seed=self.seed if seed is None else seed, clock=self.clock
        )

    # -- run state (a device process restarted on the same run continues it)

    def fingerprint(self) -> str:
        """A digest of the plan as data (rules, seed, initial state): a saved run state
        is only accepted by the plan it was saved from."""
        return self._fingerprint(self.seed)

    def _fingerprint(self, seed: int) -> str:
        data = self.to_dict()
        data["seed"] = seed
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def export_run(self) -> dict[str, Any]:
        """The state of this run as plain data (JSON-able): the plan's fingerprint, the
        state, the event and fired counts, the start time, the RNG's state and per rule
        its ``matches``, ``fired`` and Gilbert-Elliott chain state.
        :meth:`import_run` on a fresh run of the same plan continues it exactly."""
        version, words, gauss = self.rng.getstate()
        return {
            "format": _STATE_FORMAT,
            "plan": self.fingerprint(),
            "seed": self.seed,
            "state": self.state,
            "events": self.events,
            "fired_total": self.fired_total,
            "start_time": self.start_time,
            "rng": [version, list(words), gauss],
            "rules": {r.name: [r.matches, r.fired, r.ge_bad] for r in self.rules},
        }

    def import_run(self, d: Any) -> None:
        """Continue the run :meth:`export_run` saved. Everything is checked before
        anything changes: :class:`FaultStateError` (one line naming the field) for data
        that is malformed or saved from another plan or seed. A plan whose seed was
        drawn (:attr:`seed_drawn`) takes the saved run's seed."""

        def bad(fld: str, msg: str) -> FaultStateError:
            return FaultStateError(f"state: {fld}: {msg}")

        if not isinstance(d, Mapping):
            raise bad("(top)", f"must be an object, got {type(d).__name__}")
        if d.get("format") != _STATE_FORMAT:
            raise bad("format", f"not a fault-plan run state (want {_STATE_FORMAT!r})")
        saved_seed = d.get("seed")
        seed = self.seed
        if (
            self.seed_drawn
            and isinstance(saved_seed, int)
            and not isinstance(saved_seed, bool)
            and 0 <= saved_seed < 1 << 64
        ):
            seed = saved_seed
        if d.get("plan") != self._fingerprint(seed) or saved_seed != seed:
            raise bad("plan", "saved from another plan or seed")
        state = d.get("state")
        if not (isinstance(state, str) and _NAME_RE.match(state)):
            raise bad("state", f"must be a state name, got {state!r}")
        counts: dict[str, int] = {}
        for key in ("events", "fired_total"):
            v = d.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(key, f"must be an integer >= 0, got {v!r}")
            counts[key] = v
        start = d.get("start_time")
        if start is not None and not _is_num(start):
            raise bad("start_time", f"must be a number or null, got {start!r}")
        rng = d.get("rng")
        # random.Random's state: (version, 625 words of 32 bits, gauss_next)
        if not (
            isinstance(rng, list)
            and len(rng) == 3
            and _is_int(rng[0])
            and isinstance(rng[1], list)
            and len(rng[1]) == 625
            and all(_is_int(w) and 0 <= w < 1 << 32 for w in rng[1])
            and (rng[2] is None or _is_num(rng[2]))
        ):
            raise bad("rng", "not a saved random.Random state")
        probe = random.Random()
        try:
            probe.setstate((rng[0], tuple(rng[1]), rng[2]))
        except (ValueError, TypeError) as e:
            raise bad("rng", str(e)) from None
        rules = d.get("rules")
        if not isinstance(rules, Mapping) or set(rules) != {r.name for r in self.rules}:
            raise bad("rules", "must name exactly the plan's rules")
        per_rule: dict[str, tuple[int, int, bool]] = {}
        for name, v in rules.items():
            if not (
                isinstance(v, list)
                and len(v) == 3
                and all(_is_int(x) and x >= 0 for x in v[:2])
                and isinstance(v[2], bool)
            ):
                raise bad(f"rules.{name}", f"must be [matches, fired, ge_bad], got {v!r}")
            per_rule[name] = (v[0], v[1], v[2])
        self.seed = seed
        self.seed_drawn = False
        self.state = state
        self.events = counts["events"]
        self.fired_total = counts["fired_total"]
        self.start_time = None if start is None else float(start)
        self.rng = probe
        for r in self.rules:
            r.matches, r.fired, r.ge_bad = per_rule[r.name]

    # -- running

    @property
    def counters(self) -> dict[str, int]:
        """Fired faults per rule name (rules that never fired included, as 0)."""
        return {r.name: r.fired for r in self.rules}

    def start(self, now: float) -> None:
        """Set the time ``after`` counts from (default: the first event's time)."""
        self.start_time = now

    def decide(self, event: FaultEvent) -> list[Fired]:
        """The faults that fire for ``event``, in rule order. Advances the counters, the
        RNG and the state exactly as ``docs/faults.md`` describes."""
        now = event.time
        if now is None:
            now = self.clock() if self.clock is not None else 0.0
        if self.start_time is None:
            self.start_time = now
        self.events += 1
        state = self.state
        new_state: str | None = None
        out: list[Fired] = []
        for r in self.rules:  # bounded: _MAX_RULES
            if not r.matches_kind(event.kind):
                continue
            if r.state is not None and r.state != state:
                continue
            if not r.matches_filters(event):
                continue
            if r.after is not None and now - self.start_time < r.after:
                continue
            r.matches += 1
            m = r.matches
            if r.times is not None and r.fired >= r.times:
                continue
            if r.nth is not None:
                if m < r.nth or (m != r.nth and r.every is None):
                    continue
                if r.every is not None and (m - r.nth) % r.every:
                    continue
            elif r.every is not None and m % r.every:
                continue
            if r.probability is not None and not self.rng.random() < r.probability:
                continue
            if r.action == "gilbert_elliott" and not self._ge_lost(r):
                continue
            r.fired += 1
            if r.set_state is not None:
                new_state = r.set_state
            if r.action is not None:
                out.append(
                    Fired(r.name, r.action, self._resolve(r, event), event, self.fired_total)
                )
                self.fired_total += 1
        if new_state is not None:
            self.state = new_state
        return out

    def _ge_lost(self, r: FaultRule) -> bool:
        """Step a Gilbert-Elliott chain: one draw for the transition (good→bad with
        ``p``, bad→good with ``r``), then one for the loss (lost with 1-h in the bad
        state, 1-k in the good state)."""
        p = r.params
        if r.ge_bad:
            r.ge_bad = not self.rng.random() < p["r"]
        else:
            r.ge_bad = self.rng.random() < p["p"]
        keep = p["h"] if r.ge_bad else p["k"]
        return not self.rng.random() < keep

    def _resolve(self, r: FaultRule, ev: FaultEvent) -> dict[str, Any]:
        """The action's parameters with its random choices drawn (``docs/faults.md``)."""
        p = dict(r.params)
        a = r.action
        if a == "latency":
            dist = p["dist"]
            if dist == "fixed":
                p["delay_s"] = p["s"]
            elif dist == "uniform":
                p["delay_s"] = self.rng.uniform(p["low_s"], p["high_s"])
            else:
                p["delay_s"] = max(0.0, self.rng.gauss(p["mean_s"], p["stddev_s"]))
        elif a == "delay":
            j = p["jitter_s"]
            p["delay_s"] = max(0.0, p["s"] + self.rng.uniform(-j, j)) if j else p["s"]
        elif a in ("corrupt_read", "corrupt_byte") and p.get("random"):
            n = ev.nbytes or 0
            p["offset"] = self.rng.randrange(n) if n > 0 else 0
            p["xor"] = self.rng.randrange(1, 256)
        return p
