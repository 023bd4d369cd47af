"""Carry a fault plan out inside a device process: decide, count, trace, persist.

Theory of operation
-------------------
A :class:`~vdev.virtio.faults.FaultPlan` decides (sans-IO); a :class:`FaultInjector` is
the device process's one run of it. Whoever sees an event (the session for ring,
notify, control and lifecycle events; a device for its ``blk.*`` / ``net.*`` requests,
through :meth:`vdev.device.Device.faults`) calls :meth:`FaultInjector.fire`, which

1. builds the :class:`~vdev.virtio.faults.FaultEvent` (this device's name, the
   injector's clock) and asks the plan;
2. for every :class:`~vdev.virtio.faults.Fired`: counts it (``faults_fired`` and
   ``fault:<action>``, plain ints in :attr:`FaultInjector.counters`, merged into the
   device metrics by the session), appends it to :attr:`FaultInjector.fired_log`,
   writes a ``fault`` trace event (when traced) and one log line (rate limited);
3. saves the run (when it has a state file) *before* the caller carries anything
   out, so a fault that ends the process (``crash``, ``power_cut``) or makes the kernel
   kill it (``hang``) is on disk already;
4. returns the list; carrying the faults out is the caller's job.

The state file. A device process restarted on the same plan (the kernel restarts the
same argv after a crash) must continue the run, not start it again — otherwise a
``crash`` at the 3rd request would crash every incarnation at its 3rd request. With
``state_path`` the injector saves :meth:`FaultPlan.export_run` (rule counters,
Gilbert-Elliott chains, the plan state, the RNG state, the fired sequence number, the
event count, the start time) as JSON, atomically (a temporary file in the same
directory, then ``os.replace``), after every fired fault and on :meth:`save_state`. A
new injector with the same ``state_path`` resumes that run; a file that is corrupt or
saved from another plan or seed is refused with a one-line :class:`FaultStateError`.

Cost: nothing when a device has no plan (no injector exists). With one, every event
costs a :meth:`FaultPlan.decide` (a pass over the rules).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from hostops.clock import monotonic
from vdev.virtio.faults import ACTIONS, FaultEvent, FaultPlan, FaultStateError, Fired
from vdev.virtio.trace import Tracer

__all__ = [
    "FaultInjector",
    "FaultStateError",
    "LIFECYCLE_ACTIONS",
    "INJECTOR_COUNTERS",
    "trace_details",
    "describe",
]

#: Actions the session carries out itself, whatever event fired them.
LIFECYCLE_ACTIONS = frozenset(a for a, spec in ACTIONS.items() if spec.family == "lifecycle")

#: Counters every injector reports (``fault:<action>`` too, one per action in the plan).
INJECTOR_COUNTERS = ("faults_fired",)

_MAX_STATE_BYTES = 1 << 20  # a run state is a few KiB (the RNG's 625 words)


class FaultInjector:
    """One run of ``plan`` in the device ``device`` (the name the plan's ``device``
    filter matches). See the module docstring.

    ``state_path``: where the run is saved and resumed from (None: not persisted);
    ``clock``: seconds, for the plan's ``after`` triggers (the run starts at
    construction unless resumed). Raises :class:`FaultStateError` when the state file
    exists but cannot be resumed.
    """

    def __init__(
        self,
        plan: FaultPlan,
        *,
        device: str,
        state_path: str | None = None,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self.plan = plan
        self.device = device
        self.state_path = state_path
        self.clock = clock
        self.counters: dict[str, int] = dict.fromkeys(INJECTOR_COUNTERS, 0)
        for rule in plan.rules:
            if rule.action is not None:
                self.counters[f"fault:{rule.action}"] = 0
        #: Set by the session: each fired fault becomes a ``fault`` trace event.
        self.tracer: Tracer | None = None
        #: Set by the session: ``log(message, kind)`` (rate limited per kind).
        self.log: Callable[[str, str | None], None] | None = None
        #: Every fault fired in this process, in order.
        self.fired_log: list[Fired] = []
        #: The run was resumed from ``state_path``.
        self.resumed = False
        if state_path is not None and os.path.exists(state_path):
            self._resume(state_path)
        else:
            plan.start(clock())

    def _resume(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_STATE_BYTES + 1)
        except OSError as e:
            raise FaultStateError(f"{path}: cannot read: {e.strerror}") from None
        if len(raw) > _MAX_STATE_BYTES:
            raise FaultStateError(f"{path}: larger than {_MAX_STATE_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FaultStateError(f"{path}: not a fault run state (JSON: {msg})") from None
        try:
            self.plan.import_run(data)
        except FaultStateError as e:
            raise FaultStateError(f"{path}: {e}") from None
        self.resumed = True

    def fire(
        self,
        kind: str,
        *,
        queue: int | None = None,
        opcode: str | int | None = None,
        sector: int | None = None,
        nbytes: int | None = None,
    ) -> list[Fired]:
        """The faults that fire for one event of ``kind`` on this device, counted,
        logged, traced and (with a state file) saved before they are returned."""
        event = FaultEvent(
            kind,
            device=self.device,
            queue=queue,
            opcode=opcode,
            sector=sector,
            nbytes=nbytes,
            time=self.clock(),
        )
        fired = self.plan.decide(event)
        if not fired:
            return fired
        counters = self.counters
        tracer = self.tracer
        log = self.log
        for f in fired:
            counters["faults_fired"] += 1
            key = f"fault:{f.action}"
            counters[key] = counters.get(key, 0) + 1
            self.fired_log.append(f)
            if tracer is not None:
                tracer.fault(f.action, queue, **trace_details(f))
            if log is not None:
                log(f"fault #{f.seq} {f.action} (rule {f.rule!r}) on {describe(event)}", "fault")
        if self.state_path is not None:
            self.save_state()
        return fired

    def save_state(self) -> None:
        """Write the run to ``state_path`` atomically (temporary file + rename); no-op
        without a state file. An I/O error is logged, never raised (the device goes
        on; only a later resume would lose the run)."""
        path = self.state_path
        if path is None:
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.plan.export_run(), f, separators=(",", ":"))
            os.replace(tmp, path)
        except OSError as e:
            if self.log is not None:
                self.log(f"fault state {path}: cannot save: {e.strerror}", "fault_state")
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def describe(self) -> str:
        """One line for the start-up log: rules, seed, state file, resumed or not."""
        where = f", state {self.state_path}" if self.state_path else ""
        how = " (resumed)" if self.resumed else ""
        return (
            f"fault plan: {len(self.plan.rules)} rule(s), seed {self.plan.seed}, "
            f"device {self.device!r}{where}{how}"
        )

    def __repr__(self) -> str:
        return f"<FaultInjector {self.device!r} seed={self.plan.seed} fired={len(self.fired_log)}>"


def trace_details(f: Fired) -> dict[str, Any]:
    """The details of ``f``'s ``fault`` trace event: rule, seq, params, the event's
    kind and its fields (device, queue, opcode, sector, nbytes; absent ones left out)."""
    details = f.trace_details()
    ev = f.event
    fields = {
        k: v
        for k, v in (
            ("device", ev.device),
            ("queue", ev.queue),
            ("opcode", ev.opcode),
            ("sector", ev.sector),
            ("nbytes", ev.nbytes),
        )
        if v is not None
    }
    details["fields"] = fields
    return details


def describe(ev: FaultEvent) -> str:
    """``ev`` in a few words for a log line."""
    parts = [ev.kind]
    for k in ("queue", "opcode", "sector", "nbytes"):
        v = getattr(ev, k)
        if v is not None:
            parts.append(f"{k}={v}")
    return " ".join(parts)
