"""Driver-side validation of used entries (§2.7.8): a hostile device is simulated by
writing the used ring by hand. The driver must return the valid completions that came
before the bad entry, mark itself broken with the exact rule, refuse further work, and
hand back exactly the tokens that will never complete."""

from __future__ import annotations

import struct

import pytest

from vdev.virtio import DeviceSpecError, DriverQueue, FlatMemory, RingLayout, Rule

pytestmark = pytest.mark.timeout(60)

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
ELEM = struct.Struct("<II")
N = 8
DATA = 0x2000


class Hostile:
    """A DriverQueue plus a device that writes whatever it likes into the used ring."""

    def __init__(self, n: int = N, *, event_idx: bool = False) -> None:
        self.n = n
        self.buf = bytearray(1 << 16)
        self.lay = RingLayout.packed(n, 0)
        self.q = DriverQueue(FlatMemory(self.buf), self.lay, event_idx=event_idx)
        self.used_idx = 0
        self.heads: dict[str, int] = {}

    def add(self, token: str, writable: int = 16, readable: int = 8, segs: int = 1) -> int:
        k = len(self.heads)
        rd = [(DATA + 0x100 * k, readable)] if readable else []
        wr = [(DATA + 0x100 * k + 0x40 + 16 * j, writable) for j in range(segs)] if writable else []
        head = self.q.add(rd, wr, token)
        self.heads[token] = head
        return head

    def put(self, uid: int, ulen: int, *, publish: bool = True) -> None:
        ELEM.pack_into(self.buf, self.lay.used + 4 + 8 * (self.used_idx % self.n), uid, ulen)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self, idx: int | None = None) -> None:
        U16.pack_into(self.buf, self.lay.used + 2, self.used_idx if idx is None else idx & 0xFFFF)


def _assert_broken(h: Hostile, rule: Rule, remaining: set[str]) -> None:
    q = h.q
    assert q.broken is not None and q.broken.rule is rule
    with pytest.raises(DeviceSpecError) as ei:
        q.get_used()
    assert ei.value.rule is rule
    with pytest.raises(DeviceSpecError) as ei2:
        q.add([(DATA, 1)], [], "late")
    assert ei2.value.rule is rule
    assert "late" not in q.in_flight_tokens()
    assert set(q.in_flight_tokens()) == remaining
    left = q.abandon()
    assert sorted(left) == sorted(remaining)
    assert len(left) == len(remaining)  # each exactly once
    assert q.in_flight == 0
    assert q.abandon() == []
    assert q.broken.rule is rule  # abandon keeps the first recorded reason


def _three(h: Hostile) -> None:
    for t in ("A", "B", "C"):
        h.add(t)
    assert h.q.kick_prepare() is True


@pytest.mark.parametrize("bad_id", [N, N + 1, 0xFFFF, 0xFFFFFFFF])
def test_used_id_out_of_range(bad_id: int) -> None:
    h = Hostile()
    _three(h)
    h.put(h.heads["B"], 5)
    h.put(bad_id, 0)
    h.put(h.heads["A"], 1)  # after the bad one: must not be reaped
    assert h.q.get_used() == [("B", 5)]
    _assert_broken(h, Rule.USED_ID_OUT_OF_RANGE, {"A", "C"})
    assert h.q.stats.completions == 1


def test_used_id_not_in_flight_duplicate() -> None:
    h = Hostile()
    _three(h)
    h.put(h.heads["A"], 3)
    h.put(h.heads["A"], 3)  # completed twice
    assert h.q.get_used() == [("A", 3)]
    _assert_broken(h, Rule.USED_ID_NOT_IN_FLIGHT, {"B", "C"})


def _chain_descs(h: Hostile, head: int) -> list[int]:
    """Follow a chain through the descriptor table with our own offsets."""
    out = [head]
    while True:
        _, _, flags, nxt = DESC.unpack_from(h.buf, h.lay.desc + 16 * out[-1])
        if not flags & 1:
            return out
        out.append(nxt)


def test_used_id_not_in_flight_non_head() -> None:
    h = Hostile()
    head = h.add("A", segs=3)  # 4 descriptors; only the head may come back
    h.add("B")
    h.q.kick_prepare()
    assert h.q.num_free == N - 6
    descs = _chain_descs(h, head)
    assert len(descs) == 4 and len(set(descs)) == 4
    h.put(descs[2], 0)  # a descriptor of chain A that is not its head
    assert h.q.get_used() == []
    _assert_broken(h, Rule.USED_ID_NOT_IN_FLIGHT, {"A", "B"})


def test_used_id_not_in_flight_never_used() -> None:
    h = Hostile()
    _three(h)
    free = [i for i in range(N) if i not in h.heads.values()]
    h.put(h.heads["C"], 0)
    h.put(free[-1], 0)
    assert h.q.get_used() == [("C", 0)]
    _assert_broken(h, Rule.USED_ID_NOT_IN_FLIGHT, {"A", "B"})


@pytest.mark.parametrize(("writable", "segs", "bad_len"), [(16, 1, 17), (16, 3, 49), (0, 0, 1)])
def test_used_len_too_big(writable: int, segs: int, bad_len: int) -> None:
    h = Hostile()
    h.add("A")
    h.add("B", writable=writable, segs=segs)
    h.add("C")
    h.q.kick_prepare()
    h.put(h.heads["A"], 16)  # exactly the writable size: fine
    h.put(h.heads["B"], bad_len)
    assert h.q.get_used() == [("A", 16)]
    _assert_broken(h, Rule.USED_LEN_TOO_BIG, {"B", "C"})


def test_used_len_at_limit_multi_segment_ok() -> None:
    h = Hostile()
    h.add("A", writable=16, segs=3)
    h.q.kick_prepare()
    h.put(h.heads["A"], 48)
    assert h.q.get_used() == [("A", 48)]
    assert h.q.broken is None and h.q.num_free == N


def test_used_idx_jump_after_valid_completions() -> None:
    h = Hostile()
    _three(h)
    h.put(h.heads["A"], 2)
    assert h.q.get_used() == [("A", 2)]
    assert h.q.broken is None
    # two still in flight; the device claims three more completions
    h.put(h.heads["B"], 0, publish=False)
    h.put(h.heads["C"], 0, publish=False)
    h.publish(h.used_idx + 1)
    assert h.q.get_used() == []
    _assert_broken(h, Rule.USED_IDX_JUMP, {"B", "C"})
    assert h.q.stats.completions == 1


@pytest.mark.parametrize("ahead", [2, N, N + 1, 0x8000])
def test_used_idx_jump_beyond_in_flight(ahead: int) -> None:
    h = Hostile()
    h.add("A")
    h.q.kick_prepare()
    h.put(h.heads["A"], 0, publish=False)
    h.publish(ahead)  # one chain in flight, `ahead` completions claimed
    assert h.q.has_used() is True
    assert h.q.get_used() == []
    _assert_broken(h, Rule.USED_IDX_JUMP, {"A"})


def test_used_idx_backwards_is_a_jump() -> None:
    h = Hostile()
    _three(h)
    h.put(h.heads["A"], 0)
    assert h.q.get_used() == [("A", 0)]
    h.publish(0)  # used.idx goes back from 1 to 0: 0xFFFF ahead
    assert h.q.get_used() == []
    _assert_broken(h, Rule.USED_IDX_JUMP, {"B", "C"})


def test_get_used_limit_leaves_rest_for_later() -> None:
    h = Hostile()
    _three(h)
    for t, ln in (("C", 1), ("A", 2), ("B", 3)):
        h.put(h.heads[t], ln)
    assert h.q.get_used(limit=2) == [("C", 1), ("A", 2)]
    assert h.q.in_flight == 1 and h.q.has_used() is True
    assert h.q.get_used() == [("B", 3)]
    assert h.q.num_free == N and h.q.in_flight == 0
    assert h.q.stats.completions == 3


def test_valid_completions_then_bad_after_wrap() -> None:
    # Drive both indices to just below 65536, then break across the wrap.
    h = Hostile(n=4)
    for i in range(65534):
        head = h.q.add([(DATA, 1)], [(DATA + 64, 8)], i)
        h.q.kick_prepare()
        h.put(head, 8)
        assert h.q.get_used() == [(i, 8)]
    assert U16.unpack_from(h.buf, h.lay.used + 2)[0] == 65534
    for t in ("A", "B", "C"):
        h.add(t, readable=0)
    h.q.kick_prepare()
    h.put(h.heads["A"], 1)  # used idx 65535
    h.put(h.heads["B"], 2)  # used idx 0 (wrapped)
    h.put(h.heads["A"], 3)  # duplicate
    assert h.q.get_used() == [("A", 1), ("B", 2)]
    _assert_broken(h, Rule.USED_ID_NOT_IN_FLIGHT, {"C"})
