"""A conformance suite any backend author can run on a :class:`~vdev.device.Device`.

Theory of operation
-------------------
:func:`check_device_conformance` builds fresh devices from ``device_factory`` and plays
the driver against each with :class:`vdev.testing.DeviceHarness` (the real
``DriverQueue`` and the real ``DeviceSession``: the code a device process runs). Every
check is a named rule (:data:`RULES`); the report maps each rule to ``None`` (passed) or
one line saying what broke::

    from vdev.conformance import check_device_conformance
    report = check_device_conformance(lambda: MyDevice())
    report.assert_ok()          # one AssertionError listing every failed rule

For ``pytest.mark.parametrize``, :func:`conformance_cases` yields ``(rule, check)``
pairs; ``check()`` raises ``AssertionError`` when its rule fails.

A probe is the chain each check makes available: by default one readable buffer of
16 zero bytes and one writable buffer of 64 bytes (pass ``probe`` to shape it for the
device). A device may complete a probe (with any status) or keep it (``PENDING``);
what it must not do is crash, lose it, complete it twice or claim more bytes than the
chain can hold.

Attribution: the session turns several device bugs into counters rather than ring
damage (a ``handle()`` result larger than the writable part becomes a handler error
with length 0; a second completion of one chain raises ``UsageError`` in the device and
counts ``stale_completions``). Each rule looks only at the evidence it owns, read from
the harness's public record (:attr:`vdev.testing.DeviceHarness.device_faults`, the
``rule`` of an :class:`~vdev.testing.InvariantError`, the session's counters), never
from log wording, so one bug fails one rule:

* ``used_len`` owns ``bad_length`` / ``complete_bad_length`` device faults and the
  harness's ``used_len`` invariant (§2.7.8.2);
* ``double_complete`` owns ``stale_completions`` with no reset in between, and the
  harness's ``double_complete`` invariant;
* ``reset_mid_io`` owns ``stale_completions`` that appear only after a reset;
* ``malformed_chains`` owns exceptions out of ``handle()`` (``raised`` device faults);
* ``malformed_ring`` runs the hostile driver (:func:`vdev.testing.hostile_driver`, two
  cases of every kind in :data:`vdev.testing.HOSTILE_KINDS`): loops, ``next`` out of
  range, nested and giant indirect tables, huge and out-of-range buffers,
  readable-after-writable, avail index jumps, kicks before DRIVER_OK, zero-length and
  garbage chains, written straight into the ring: each malformed chain must be
  completed with length 0 or the ring declared broken without reaching ``handle()``,
  and the device must serve a valid request afterwards. The session filters these
  before ``handle()``, so this rule mostly guards the session/transport.

"Forgets the EVENT_IDX re-check" at the Device API level (rule ``no_lost_completion``):
a device that defers work (keeps chains, completes them from a timer or a watched
source) must, after draining its backlog, look again for chains that arrived while
it drained. The check makes a burst of chains available on every queue whose single
probe the device completes on its own (run, then due timers), runs every pending timer
(bounded) and asserts every chain of the burst was completed; a device that completes
a batch and drops the last chain, or never re-arms, fails it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from vdev.device import RING_FEATURES, Device
from vdev.testing import HOSTILE_KINDS, DeviceHarness, InvariantError, Request, hostile_driver
from vdev.virtio import F, bit

__all__ = [
    "RULES",
    "ConformanceReport",
    "Probe",
    "check_device_conformance",
    "conformance_cases",
]

#: A probe: ``queue -> (readable buffers, writable sizes)``.
Probe = Callable[[int], tuple[Sequence[bytes], Sequence[int]]]

#: The rules, in the order they run.
RULES: tuple[str, ...] = (
    "status",
    "features",
    "kick_before_driver_ok",
    "reset_mid_io",
    "no_lost_completion",
    "config",
    "queue_sizes",
    "malformed_chains",
    "malformed_ring",
    "used_len",
    "double_complete",
)

#: Transport feature bits (§6) the session implements; any other bit in 28..40 offered
#: by a device is one nobody implements.
_TRANSPORT_LO, _TRANSPORT_HI = 28, 40
#: Most timer rounds a check runs while waiting for deferred completions.
_MAX_TIMER_ROUNDS = 64
#: Chains in one burst (capped by the queue size).
_BURST = 8


def _default_probe(queue: int) -> tuple[Sequence[bytes], Sequence[int]]:
    return [bytes(16)], [64]


@dataclass
class ConformanceReport:
    """What :func:`check_device_conformance` found: ``results[rule]`` is ``None``
    (passed) or a one-line failure."""

    device: str
    results: dict[str, str | None] = field(default_factory=dict)

    @property
    def failed(self) -> dict[str, str]:
        """The failed rules and why."""
        return {r: why for r, why in self.results.items() if why is not None}

    @property
    def ok(self) -> bool:
        """Every rule passed."""
        return not self.failed

    def assert_ok(self) -> None:
        """Raise one ``AssertionError`` listing every failed rule."""
        if self.failed:
            lines = [f"{r}: {why}" for r, why in self.failed.items()]
            raise AssertionError(f"{self.device} fails conformance:\n  " + "\n  ".join(lines))


class _Fail(AssertionError):
    """A rule failed (the message says why)."""


class _Ctx:
    """What every check needs: the factory, the probe, the sizes."""

    def __init__(
        self,
        factory: Callable[[], Device],
        probe: Probe,
        queues: Sequence[int] | None,
        max_queue_size: int | None,
    ) -> None:
        self.factory = factory
        self.probe = probe
        self.queues = queues
        self.max_queue_size = max_queue_size

    def harness(self, queue_size: int | None = None) -> DeviceHarness:
        dev = self.factory()
        if queue_size is None:
            queue_size = min(dev.max_queue_size, self.max_queue_size or 256, 256)
        return DeviceHarness(dev, queue_size=queue_size)

    def qs(self, h: DeviceHarness) -> list[int]:
        return self.qs_of(h.device)

    def qs_of(self, dev: Device) -> list[int]:
        n = dev.num_queues
        return [q for q in (self.queues if self.queues is not None else range(n)) if q < n]

    def submit(self, h: DeviceHarness, q: int) -> Request:
        out, ins = self.probe(q)
        if len(out) + len(ins) > h.queue_size:  # a ring too small for the shape
            out, ins = [], [sum(len(b) for b in out) + sum(ins)]
        return h.submit(q, out, ins)


def _reset(h: DeviceHarness) -> None:
    """Reset (the harness zeroes the rings, as a driver hands fresh rings to the
    re-negotiated device)."""
    h.reset()


def _settle(h: DeviceHarness) -> None:
    """Run due timers until none is left (bounded)."""
    for _ in range(_MAX_TIMER_ROUNDS):
        if not h.fire_timers():
            return


def _invariant_rule(e: InvariantError) -> str | None:
    """The rule that owns a broken harness invariant (by its ``rule``)."""
    return e.rule if e.rule in ("used_len", "double_complete") else None


def _crashes(h: DeviceHarness, start: int) -> list[str]:
    """Exceptions out of ``handle()`` since fault ``start`` (the harness's record)."""
    return [f.detail for f in h.device_faults[start:] if f.kind == "raised"]


def _served(req: Request) -> bool:
    return req.done or not req.released


# ---------------------------------------------------------------------- the rules
def _check_status(c: _Ctx) -> None:
    with c.harness() as h:
        for _ in range(2):  # negotiate, serve, reset; twice
            h.negotiate()
            for q in c.qs(h):
                c.submit(h, q)
                _settle(h)
            _reset(h)
            for q in range(h.device.num_queues):
                if h.session.kept(q):
                    raise _Fail(f"queue {q} still holds {h.session.kept(q)} chains after reset")
        h.negotiate()
        for q in c.qs(h):
            req = c.submit(h, q)
            if not _served(req):
                raise _Fail(f"queue {q}: probe not served after reset and re-negotiation")


def _check_features(c: _Ctx) -> None:
    dev = c.factory()
    offered = dev.device_features()
    for b in range(_TRANSPORT_LO, _TRANSPORT_HI + 1):
        # §6: transport bits other than the ones the session implements are not the
        # device's to offer
        if offered & bit(b) and not bit(b) & RING_FEATURES:
            raise _Fail(f"offers transport feature bit {b}, which nothing implements")
    dev.close()
    with c.harness() as h:
        unknown = 1 << 63
        while unknown & h.offered and unknown > 1:  # bounded: 63 steps
            unknown >>= 1
        try:
            h.negotiate(h.offered | unknown)
        except ValueError:
            pass  # refused, as the runtime refuses FEATURES_OK (§3.1.1)
        else:
            raise _Fail("an unoffered feature bit was accepted")
        h.negotiate(bit(F.VERSION_1))  # the minimum: the device must still work
        for q in c.qs(h):
            c.submit(h, q)
        _reset(h)
        h.negotiate()
        for q in c.qs(h):
            c.submit(h, q)


def _check_kick_before_driver_ok(c: _Ctx) -> None:
    with c.harness() as h:
        for q in range(h.device.num_queues):
            h.session.kick(q)
        h.run_pending()
        if h.session.counters["chains"]:
            raise _Fail("chains were served before DRIVER_OK")
        h.negotiate()
        for q in c.qs(h):
            c.submit(h, q)


def _check_reset_mid_io(c: _Ctx) -> None:
    with c.harness() as h:
        h.negotiate()
        for q in c.qs(h):  # warm-up: a device that double-completes shows it here
            c.submit(h, q)
            _settle(h)
        stale_before = h.session.counters["stale_completions"]
        for q in c.qs(h):  # then chains in flight (kept or not) at the reset
            for _ in range(min(4, h.queue_size)):
                c.submit(h, q)
        _reset(h)
        for q in range(h.device.num_queues):
            if h.session.kept(q):
                raise _Fail(f"queue {q} still holds chains after reset")
        h.negotiate()
        for q in c.qs(h):
            for _ in range(min(4, h.queue_size)):
                c.submit(h, q)
        _settle(h)
        stale = h.session.counters["stale_completions"]
        if stale_before == 0 and stale:
            raise _Fail(f"{stale} chains released by the reset were completed afterwards")


def _check_no_lost_completion(c: _Ctx) -> None:
    with c.harness() as h:
        h.negotiate()
        for q in c.qs(h):
            first = c.submit(h, q)
            _settle(h)
            if not first.done:
                continue  # the device keeps chains on this queue until an outside event
            burst = [c.submit(h, q) for _ in range(min(_BURST, h.queue_size))]
            _settle(h)
            lost = [r.head for r in burst if not r.done]
            if lost:
                raise _Fail(f"queue {q}: {len(lost)} of {len(burst)} chains never completed")


def _check_config(c: _Ctx) -> None:
    with c.harness() as h:
        before = bytes(h.device.config())
        h.negotiate()
        again = bytes(h.device.config())
        if len(again) != len(before):
            raise _Fail(f"config space changed size: {len(before)} -> {len(again)}")
        if bytes(h.device.config()) != again:
            raise _Fail("two config reads in a row differ")
        if h.config_interrupts:
            raise _Fail("config-change interrupt with nothing changed")


def _check_queue_sizes(c: _Ctx) -> None:
    dev = c.factory()
    top = min(dev.max_queue_size, c.max_queue_size or dev.max_queue_size)
    dev.close()
    size = 1
    while size <= top:  # bounded: log2(32768) + 1 sizes
        with c.harness(size) as h:
            h.negotiate()
            for q in c.qs(h):
                req = c.submit(h, q)
                _settle(h)
                if not _served(req):
                    raise _Fail(f"queue size {size}, queue {q}: probe dropped")
        size *= 2


def _check_malformed(c: _Ctx) -> None:
    shapes: list[tuple[list[bytes], list[int]]] = [
        ([b"\xff" * 16], []),  # readable only
        ([], [1]),  # one writable byte
        ([b"\x00"], [1]),  # tiny both
        ([b"\xff" * 4096], [4096]),  # garbage header, big buffers
    ]
    with c.harness() as h:
        h.negotiate()
        start = len(h.device_faults)
        for q in c.qs(h):
            for out, ins in shapes:
                h.submit(q, out, ins)
            _settle(h)
            req = c.submit(h, q)
            if not _served(req):
                raise _Fail(f"queue {q}: probe dropped after malformed chains")
        bad = _crashes(h, start)
        if bad:
            raise _Fail(f"{len(bad)} malformed chains crashed the device: {bad[0][:120]}")


def _check_malformed_ring(c: _Ctx) -> None:
    """The hostile driver (:func:`vdev.testing.hostile_driver`): every kind of
    malformed chain and broken ring written straight into the rings (bypassing the
    DriverQueue, which refuses to build them): each must be completed with length 0 or
    the ring declared broken, never reach ``handle()``, and the device must serve a
    valid request after a reset. Exceptions out of ``handle()`` are left to
    ``malformed_chains``."""
    dev = c.factory()
    size = min(64, dev.max_queue_size, c.max_queue_size or 64)
    qs = c.qs_of(dev)
    report = hostile_driver(
        dev, seed=0, cases=2 * len(HOSTILE_KINDS), queues=qs, queue_size=size, probe=c.probe
    )
    if report.failures:
        raise _Fail(f"{len(report.failures)} hostile case(s) failed: {report.failures[0]}")


def _check_used_len(c: _Ctx) -> None:
    with c.harness() as h:
        h.negotiate()
        for q in c.qs(h):
            c.submit(h, q)
            _settle(h)
        for f in h.device_faults:
            if f.kind in ("bad_length", "complete_bad_length"):
                raise _Fail(f"queue {f.queue}: {f.detail}"[:160])


def _check_double_complete(c: _Ctx) -> None:
    with c.harness() as h:
        h.negotiate()
        for q in c.qs(h):
            for _ in range(min(4, h.queue_size)):
                c.submit(h, q)
            _settle(h)
        stale = h.session.counters["stale_completions"]
        if stale:
            raise _Fail(f"{stale} completions of chains already completed (§2.7.8)")


_CHECKS: dict[str, Callable[[_Ctx], None]] = {
    "status": _check_status,
    "features": _check_features,
    "kick_before_driver_ok": _check_kick_before_driver_ok,
    "reset_mid_io": _check_reset_mid_io,
    "no_lost_completion": _check_no_lost_completion,
    "config": _check_config,
    "queue_sizes": _check_queue_sizes,
    "malformed_chains": _check_malformed,
    "malformed_ring": _check_malformed_ring,
    "used_len": _check_used_len,
    "double_complete": _check_double_complete,
}


def _run(rule: str, c: _Ctx, results: dict[str, str | None]) -> None:
    try:
        _CHECKS[rule](c)
    except _Fail as e:
        results[rule] = results.get(rule) or str(e)
    except InvariantError as e:
        owner = _invariant_rule(e) or rule
        results[owner] = results.get(owner) or str(e)
    except Exception as e:  # the device (or the kit) raised: the rule fails
        results[rule] = results.get(rule) or f"{type(e).__name__}: {e}"
    results.setdefault(rule, None)


def check_device_conformance(
    device_factory: Callable[[], Device],
    *,
    queues: Sequence[int] | None = None,
    max_queue_size: int | None = None,
    probe: Probe | None = None,
) -> ConformanceReport:
    """Run every rule of :data:`RULES` on fresh devices from ``device_factory``.

    ``queues``: the queues to drive (default all); ``max_queue_size``: the largest ring
    tried (default the device's, rings above 256 are not built by default);
    ``probe``: the chain shape per queue (see the module docstring)."""
    c = _Ctx(device_factory, probe or _default_probe, queues, max_queue_size)
    sample = device_factory()
    report = ConformanceReport(type(sample).__name__)
    sample.close()
    results: dict[str, str | None] = {}
    for rule in RULES:
        _run(rule, c, results)
    report.results = {rule: results.get(rule) for rule in RULES}
    return report


def conformance_cases(
    device_factory: Callable[[], Device],
    *,
    queues: Sequence[int] | None = None,
    max_queue_size: int | None = None,
    probe: Probe | None = None,
) -> Iterator[tuple[str, Callable[[], None]]]:
    """``(rule, check)`` pairs for ``pytest.mark.parametrize``; ``check()`` raises
    ``AssertionError`` naming the rule when it fails."""
    c = _Ctx(device_factory, probe or _default_probe, queues, max_queue_size)
    for rule in RULES:

        def check(rule: str = rule) -> None:
            results: dict[str, str | None] = {}
            _run(rule, c, results)
            if results.get(rule):
                raise AssertionError(f"{rule}: {results[rule]}")

        yield rule, check
