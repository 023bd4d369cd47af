"""Unit tests of the hardened kernel's pieces (issue 10): culprits on errors, the
recovery options of the specs, the sealed memfd, the kernel-side caps, and the
interrupt thread's periodic check / timeout / reset logic driven against the real
sans-IO device end of the ring (``vdev.virtio.DeviceQueue``)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

import kernel
from hostops.fdmem import MappingError, create_memfd, new_memfd, size_and_seal
from kernel.errors import (
    CULPRITS,
    DeviceGoneError,
    DeviceProbeError,
    copy_error,
    culprit_of,
    io_error,
    to_os_error,
)
from kernel.specs import resolve_fault_plan
from kernel.transport import (
    MAX_QUEUE_SIZE,
    MAX_QUEUES,
    DeviceInfo,
    KernelQueue,
    VirtioTransport,
    WaitedRequest,
)
from vdev.virtio import DeviceQueue, F, Rule, bit
from vdev.virtio.errors import DeviceSpecError
from vdev.virtio.faults import FaultPlan

# --------------------------------------------------------------------------- culprits


def test_io_error_carries_its_culprit_and_copies_keep_it() -> None:
    e = io_error(errno.EIO, "vda: gone", culprit="device-gone")
    assert e.errno == errno.EIO and culprit_of(e) == "device-gone"
    c = copy_error(e)
    assert c is not e and c.errno == e.errno and c.strerror == e.strerror
    assert culprit_of(c) == "device-gone"
    assert culprit_of(io_error(errno.EINVAL, culprit="caller")) == "caller"
    assert culprit_of(io_error(errno.ECONNRESET)) is None  # not about a device
    t = io_error(errno.ETIMEDOUT, culprit="timeout")
    assert isinstance(t, TimeoutError) and culprit_of(t) == "timeout"
    with pytest.raises(ValueError, match="culprit"):
        io_error(errno.EIO, culprit="somebody")
    assert set(CULPRITS) >= {"device-error", "device-broke-ring", "device-gone", "timeout"}


def test_to_os_error_names_the_culprit() -> None:
    spec = to_os_error(DeviceSpecError(Rule.USED_ID_OUT_OF_RANGE, "id 9"), "vda")
    assert spec.errno == errno.EIO and culprit_of(spec) == "device-broke-ring"
    gone = to_os_error(DeviceGoneError("vda", "GET_STATUS", "killed"))
    assert culprit_of(gone) == "device-gone"


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"on_device_death": "reboot"}, "on_device_death"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"request_timeout": True}, "request_timeout"),
        ({"restart_budget": (3,)}, "restart_budget"),
        ({"restart_budget": (-1, 60.0)}, "restart_budget"),
        ({"restart_budget": (3, 0)}, "restart_budget"),
        ({"faults": 42}, "faults"),
        ({"faults": {"rules": [{"when": {"event": "nope"}}]}}, "faults"),
    ],
)
def test_recovery_options_are_checked(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        kernel.Blk("x.img", **kw)
    with pytest.raises(ValueError, match=field):
        kernel.Net(**kw)
    with pytest.raises(ValueError, match=field):
        kernel.Custom("rng", **kw)


def test_recovery_options_defaults_and_custom_does_not_pass_them_on() -> None:
    b = kernel.Blk("x.img")
    assert (b.on_device_death, b.request_timeout, b.restart_budget) == ("restart", 30.0, (3, 60.0))
    assert b.restartable and not kernel.Blk.memory(4096).restartable
    c = kernel.Custom("rng", seed=1, on_device_death="fail", request_timeout=None)
    assert c.on_device_death == "fail" and c.request_timeout is None
    assert c.device_args() == ["--seed", "1"]


def test_argv_carries_the_fault_files() -> None:
    argv = kernel.Blk("x.img").argv("ipc://c", faults_file="/r/p.json", faults_state="/r/s")
    i = argv.index("--faults")
    assert argv[i : i + 4] == ["--faults", "/r/p.json", "--faults-state", "/r/s"]
    assert argv[-2:] == ["--control", "ipc://c"]
    assert "--faults" not in kernel.Blk("x.img").argv("ipc://c")


def test_fault_plans_resolve_with_their_seed(tmp_path: Path) -> None:
    plan = {"seed": 5, "rules": [{"when": {"event": "blk.read"}, "what": {"action": "ioerr"}}]}
    assert resolve_fault_plan(plan)["seed"] == 5
    assert resolve_fault_plan(FaultPlan.from_dict(plan)) == resolve_fault_plan(plan)
    j = tmp_path / "p.json"
    j.write_text(json.dumps(plan))
    assert resolve_fault_plan(str(j))["rules"] == resolve_fault_plan(plan)["rules"]
    t = tmp_path / "p.toml"
    t.write_text('seed = 5\n[[rules]]\nwhen = {event = "blk.read"}\nwhat = {action = "ioerr"}\n')
    assert resolve_fault_plan(t) == resolve_fault_plan(plan)
    drawn = resolve_fault_plan({"rules": []})
    assert isinstance(drawn["seed"], int)  # a seed is drawn and recorded
    spec = kernel.Blk("x.img", faults=plan)
    assert json.loads(spec.fault_plan_json() or "") == resolve_fault_plan(plan)
    with pytest.raises(ValueError, match="cannot read"):
        resolve_fault_plan(tmp_path / "missing.json")
    (tmp_path / "p.txt").write_text("{}")
    with pytest.raises(ValueError, match="format"):
        resolve_fault_plan(tmp_path / "p.txt")


# --------------------------------------------------------------------------- memfd


def test_size_and_seal_makes_a_region_nobody_can_resize() -> None:
    fd = new_memfd("t")
    try:
        m = size_and_seal(fd, 8192)
        assert m.size == 8192 and m.sealed
        for size in (4096, 16384):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        m.buf[0] = 7
        m.close()
        with pytest.raises(MappingError):
            size_and_seal(fd, 4096)  # sealed already: cannot be resized
    finally:
        os.close(fd)
    fd2, m2 = create_memfd(4096, seal=True)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd2, 0)
    finally:
        m2.close()
        os.close(fd2)


# --------------------------------------------------------------------------- the transport


class _Mem:
    """Anonymous memory standing in for the shared region (the unit tests run both
    ends of the ring in this process)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = memoryview(bytearray(size))

    def close(self) -> None:
        pass


class _LocalTransport(VirtioTransport):
    """A transport whose device end is a :class:`DeviceQueue` in this process: a reset
    rebuilds the rings (the recovery logic under test is the base class's)."""

    kind = "local"

    def __init__(self, spec: kernel.DeviceSpec) -> None:
        super().__init__("vdx", spec, None)  # type: ignore[arg-type]
        self.info = DeviceInfo(2, 1, 8, "local")
        self.features = bit(F.VERSION_1)
        self.reinits = 0
        self.fail_reinit = False
        self.setup_memory()

    def _create_region(self, size: int) -> Any:
        return _Mem(size)

    def _hand_over_region(self, region: Any) -> None:
        pass

    def _setup_vring(self, index: int, layout: Any) -> Any:
        return lambda: None

    def _can_recover(self) -> bool:
        return True

    def _reinit_device(self, restart: bool) -> bool:
        self.reinits += 1
        if self.fail_reinit:
            raise DeviceGoneError(self.name, "RESET_DEVICE", "no answer")
        self._rebuild_queues()
        return restart


class _Token(WaitedRequest):
    """A completion token that also records ``expire``."""

    __slots__ = ("expired",)

    def __init__(self) -> None:
        super().__init__()
        self.expired: OSError | None = None

    def expire(self, error: OSError) -> None:
        self.expired = error


def _setup(**kw: Any) -> tuple[_LocalTransport, KernelQueue, list[tuple[list[Any], Any]]]:
    t = _LocalTransport(kernel.Blk("x.img", **kw))
    q = t.setup_queue(0, 8)
    q.watch = True
    q.timeout_s = t.spec.request_timeout
    handed: list[tuple[list[Any], Any]] = []
    q.on_reset = lambda tokens, err: handed.append((tokens, err))
    return t, q, handed


def _submit(t: _LocalTransport, q: KernelQueue, token: Any) -> None:
    with q.lock:
        q.add([(t.dma_base, 16)], [(t.dma_base + 16, 1)], token)
        q.publish()


def test_a_lost_interrupt_is_found_one_tick_later() -> None:
    t, q, _ = _setup()
    dev = DeviceQueue(t.memory, q.layout)  # type: ignore[arg-type]
    tok = _Token()
    _submit(t, q, tok)
    chain = dev.pop()
    assert chain is not None
    dev.push(chain.head, 1)  # completed; the interrupt never comes
    t._tick(0.0)
    assert not tok.done.is_set()  # may be an interrupt on its way: wait one tick
    t._tick(0.1)
    assert tok.done.is_set() and tok.used_len == 1
    assert q.lost_interrupts_recovered == 1 and t.recovery["lost_interrupts_recovered"] == 1
    t._tick(0.2)  # nothing more in flight: nothing counted
    assert q.lost_interrupts_recovered == 1


def test_a_timed_out_request_expires_then_the_reset_hands_it_back() -> None:
    t, q, handed = _setup(request_timeout=0.5)
    old, slow, fresh = q.dq, _Token(), _Token()
    _submit(t, q, slow)
    t._tick(10.0)  # first seen in flight
    _submit(t, q, fresh)
    t._tick(10.4)
    assert slow.expired is None
    t._tick(10.6)
    assert slow.expired is not None and slow.expired.errno == errno.ETIMEDOUT
    assert culprit_of(slow.expired) == "timeout" and fresh.expired is None
    assert not slow.done.is_set()  # its buffers are still lent to the device
    assert t._recovery_req is not None and t._recovery_req[0] == "timeout"
    assert t._recover()
    assert t.reinits == 1 and t.recovery["resets"] == 1 and t.recovery["timeouts"] == 1
    [(tokens, err)] = handed
    assert set(map(id, tokens)) == {id(slow), id(fresh)} and err is None  # resubmit
    assert q.dq is not old and q.dq.in_flight == 0 and not q.paused
    assert q.stats.requests == 2  # counters go on across the reset
    assert t.failed is None


def test_a_broken_ring_fails_its_chains_with_the_ring_culprit() -> None:
    t, q, handed = _setup()
    tok = _Token()
    _submit(t, q, tok)
    mem = t.memory
    assert mem is not None
    used = q.layout.used
    mem.buf[used + 4 : used + 12] = (99).to_bytes(4, "little") + (1).to_bytes(4, "little")
    mem.buf[used + 2 : used + 4] = (1).to_bytes(2, "little")  # used.idx = 1: id 99 is bogus
    assert t.service_queue(q, interrupt=True) == 0
    assert t.recovery["ring_breaks"] == 1
    assert t._recover()
    [(tokens, err)] = handed
    assert tokens == [tok] and err is not None and err.errno == errno.EIO
    assert culprit_of(err) == "device-broke-ring"
    assert t.recovery["requests_failed_on_reset"] == 1


def test_fail_policy_and_exhausted_budget_fail_the_device() -> None:
    t, q, _ = _setup(on_device_death="fail")
    tok = _Token()
    _submit(t, q, tok)
    t.request_recovery("device-broke-ring", "queue 0 is broken")
    assert not t._recover()
    assert t.failed is not None and culprit_of(t.failed) == "device-broke-ring"
    assert tok.done.is_set() and tok.error is not None and tok.error.errno == errno.EIO
    assert culprit_of(tok.error) == "device-broke-ring" and t.reinits == 0

    t2, q2, _ = _setup(restart_budget=(1, 60.0))
    t2.request_recovery("timeout", "slow")
    assert t2._recover()
    tok2 = _Token()
    _submit(t2, q2, tok2)
    t2.request_recovery("timeout", "slow again")
    assert not t2._recover()
    assert t2.failed is not None and "budget" in t2.failed.strerror
    assert t2.failed.errno == errno.ETIMEDOUT and culprit_of(t2.failed) == "timeout"
    assert tok2.error is not None and culprit_of(tok2.error) == "timeout"


def test_a_failed_recovery_fails_the_held_requests() -> None:
    t, q, handed = _setup(restart_budget=(2, 60.0))
    t.fail_reinit = True
    tok = _Token()
    _submit(t, q, tok)
    t.request_recovery("device-gone", "device process killed by SIGKILL")
    assert not t._recover()
    assert t.reinits == 2 and t.recovery["recovery_failures"] == 2  # budget: two tries
    assert handed == []
    assert tok.error is not None and culprit_of(tok.error) == "device-gone"
    assert t.failed is not None and "recovery failed" in t.failed.strerror


def test_a_queue_without_on_reset_cannot_be_recovered() -> None:
    t, q, _ = _setup()
    q.on_reset = None
    t.request_recovery("device-broke-ring", "needs reset")
    assert not t._recover()
    assert t.failed is not None and "resubmit" in t.failed.strerror


@pytest.mark.parametrize(
    ("nq", "qsize", "what"),
    [(65535, 128, "num_queues 65535"), (0, 128, "num_queues 0"), (1, 65536, "max_queue_size")],
)
def test_absurd_device_info_is_refused_at_probe(nq: int, qsize: int, what: str) -> None:
    t = _LocalTransport(kernel.Blk("x.img"))
    with pytest.raises(DeviceProbeError, match=what):
        t.check_info(DeviceInfo(2, nq, qsize, "liar"))
    t.check_info(DeviceInfo(2, MAX_QUEUES, MAX_QUEUE_SIZE, "fine"))


# --------------------------------------------------------------------------- blk journal


def _disk(**cfg: Any) -> Any:
    from kernel.blk import BlockDevice
    from vdev.virtio import BlkF
    from vdev.virtio.blk import BlkConfig

    t = _LocalTransport(kernel.Blk("x.img"))
    t.features |= bit(BlkF.FLUSH) | bit(BlkF.BLK_SIZE) | bit(BlkF.DISCARD)
    q = t.setup_queue(0, 8)
    return BlockDevice(t, q, BlkConfig(capacity=2048, **cfg))


def _ack(blk: Any, op: str, offset: int, arg: Any) -> None:
    """As if the device had acknowledged this request (the journal's input)."""
    from vdev.virtio import BlkType

    [r] = blk._build(op, offset, arg, lambda _r: None)
    if r.rtype != BlkType.FLUSH:
        blk._journal_add(r)
    else:
        blk._journal_trim(r.jseq)


def test_the_journal_keeps_unflushed_writes_and_replays_overlaps_in_waves() -> None:
    blk = _disk()
    _ack(blk, "write", 0, b"a" * 512)
    _ack(blk, "flush", 0, None)  # covers the first write
    _ack(blk, "write", 4096, b"b" * 1024)
    _ack(blk, "write", 8192, b"c" * 512)  # another 4 KiB: same wave
    _ack(blk, "write", 4096, b"d" * 512)  # overlaps "b": a later wave
    _ack(blk, "write_zeroes", 65536, 8192)  # zeros written (no WRITE_ZEROES feature)
    _ack(blk, "write", 0, bytearray(b"e" * 512))  # mutable data is copied
    assert [e[0] for e in blk._journal] == [2, 3, 4, 5, 6]
    replays = blk._replays()
    assert [(r.sector, r.wave) for r in replays] == [(8, 0), (16, 0), (8, 1), (128, 1), (0, 1)]
    assert [bytes(r.src[:1]) if r.src is not None else None for r in replays] == [
        b"b",
        b"c",
        b"d",
        None,
        b"e",
    ]
    assert blk._wave_left == [2, 3] and blk._replaying == 5
    assert blk.counters["journal_replayed"] == 5 and not blk._flush_error


def test_a_discard_is_a_replay_wave_of_its_own() -> None:
    blk = _disk()
    _ack(blk, "write", 0, b"a" * 512)
    _ack(blk, "discard", 1 << 19, 1 << 18)  # a sector range of any size
    _ack(blk, "write", 8192, b"b" * 512)
    assert [r.wave for r in blk._replays()] == [0, 1, 2]


def test_an_overflowing_journal_makes_the_next_flush_report_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kernel.blk

    monkeypatch.setattr(kernel.blk, "JOURNAL_MAX_BYTES", 1024)
    blk = _disk()
    for i in range(3):
        _ack(blk, "write", i * 512, b"x" * 512)
    assert blk.counters["journal_overflows"] == 1 and blk._jlost_upto == 3
    blk._replays()
    assert blk._flush_error  # the next FLUSH fails with EIO instead of promising
    _ack(blk, "flush", 0, None)
    assert blk._jlost_upto == -1 and not blk._journal


def test_a_huge_or_odd_blk_size_is_ignored() -> None:
    assert _disk(blk_size=4096).block_size == 4096
    assert _disk(blk_size=1 << 30).block_size == 512
    assert _disk(blk_size=3000).block_size == 512
