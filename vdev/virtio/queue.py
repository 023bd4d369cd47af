"""The two ends of a split virtqueue, sans-IO (§2.7).

Theory of operation
-------------------
Neither class does I/O, starts threads or knows about doorbells. They read and write
the rings through a memory object (:mod:`vdev.virtio.memory`) and *return decisions*:

Driver side (:class:`DriverQueue`)::

    head = q.add(readable=[(addr, len)], writable=[(addr, len)], token=req)
    if q.kick_prepare():          # publishes avail.idx, applies EVENT_IDX / NO_NOTIFY
        ring_the_doorbell()
    ...on an interrupt (or when polling):
    while True:
        for token, length in q.get_used(): complete(token, length)
        if not q.enable_interrupts():   # re-enable, then re-check: no lost wake-up
            break

Device side (:class:`DeviceQueue`)::

    while True:                          # on a kick
        q.disable_notifications()
        while (chain := q.pop()) is not None:
            q.push(chain.head, handle(chain))
        if q.should_interrupt(): send_interrupt()
        if not q.enable_notifications():  # re-enable, then re-check
            break

Everything read from shared memory is untrusted. The device validates every chain
(§2.7.5) and raises :class:`ChainError` (complete that chain with length 0, go on) or
:class:`RingError` (the ring is broken: set DEVICE_NEEDS_RESET). The driver validates
every used entry (§2.7.8) and, on a violation, marks itself broken: it returns the
completions that were valid, then every later call raises the recorded
:class:`DeviceSpecError`, and :meth:`DriverQueue.abandon` hands back the tokens of the
requests that will never complete so the caller can fail them (EIO).

Every loop over ring data is bounded by the queue size (a chain's TTL is N).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .constants import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)
from .errors import (
    AddressError,
    ChainError,
    DeviceSpecError,
    QueueFull,
    RingError,
    Rule,
    UsageError,
)
from .memory import FlatMemory, GuestMemory
from .ring import DESC, USED_ELEM, RingLayout, vring_need_event

__all__ = [
    "Chain",
    "Segment",
    "DriverQueue",
    "DriverQueueStats",
    "DeviceQueue",
    "DeviceQueueStats",
    "gather",
    "scatter",
    "slices",
]

_U32_MAX = 0xFFFFFFFF


# --------------------------------------------------------------------------- helpers


def slices(views: Sequence[memoryview], offset: int, length: int) -> list[memoryview]:
    """The sub-views covering ``[offset, offset+length)`` of the concatenation of
    ``views`` (no copy). Raises ``UsageError`` if the range runs past the end."""
    out: list[memoryview] = []
    if offset < 0 or length < 0:
        raise UsageError("negative offset or length")
    for v in views:
        n = len(v)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, length)
        if take:
            out.append(v[offset : offset + take])
        length -= take
        offset = 0
        if not length:
            return out
    if length:
        raise UsageError(f"range runs {length} bytes past the end of the buffers")
    return out


def gather(views: Sequence[memoryview], offset: int, length: int) -> bytes:
    """Copy ``length`` bytes at ``offset`` out of the concatenated ``views``."""
    parts = slices(views, offset, length)
    if len(parts) == 1:
        return bytes(parts[0])
    return b"".join(parts)


def scatter(views: Sequence[memoryview], offset: int, data: bytes | memoryview) -> None:
    """Copy ``data`` into the concatenated ``views`` starting at ``offset``."""
    pos = 0
    for part in slices(views, offset, len(data)):
        n = len(part)
        part[:] = data[pos : pos + n]
        pos += n


@dataclass(frozen=True, slots=True)
class Segment:
    """One descriptor of a validated chain, as the driver wrote it."""

    addr: int
    length: int
    writable: bool
    indirect: bool  # came from an indirect table


#: How :meth:`DeviceQueue.pop` records a descriptor for :attr:`Chain.segments` without
#: building a :class:`Segment` on the data path: ``(addr, length, flags, indirect)``.
RawSegment = tuple[int, int, int, bool]


class Chain:
    """A validated descriptor chain, as the device pops it.

    ``readable`` and ``writable`` are views straight into guest memory, readable ones
    first (§2.7.4.2); ``segments`` records every descriptor for tracing (built on first
    use from what :meth:`DeviceQueue.pop` recorded, so the data path never pays for it).
    """

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len", "_segs")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
        segments: list[Segment] | list[RawSegment],
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self._segs: list[Segment] | list[RawSegment] = segments

    @property
    def segments(self) -> list[Segment]:
        """Every descriptor of the chain, in order, as the driver wrote it."""
        segs = self._segs
        if segs and not isinstance(segs[0], Segment):
            segs = self._segs = [
                Segment(a, ln, bool(fl & VRING_DESC_F_WRITE), ind) for a, ln, fl, ind in segs
            ]
        return segs  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"Chain(head={self.head}, readable_len={self.readable_len}, "
            f"writable_len={self.writable_len}, segments={self.segments!r})"
        )

    def release(self) -> None:
        """Drop the chain's views into guest memory (idempotent).

        Every view is released, so a later use of one (even a reference kept elsewhere)
        raises ``ValueError`` instead of touching memory the chain no longer owns, and
        the region they point into can be unmapped. Afterwards the chain is empty
        (``readable == writable == []``, both lengths 0); ``head`` and ``segments``
        stay for logs and traces.
        """
        views = self.readable + self.writable
        self.readable = []
        self.writable = []
        self.readable_len = self.writable_len = 0
        for v in views:
            try:
                v.release()
            except BufferError:  # exported (e.g. by a running preadv): dropped anyway
                pass

    def read(self, offset: int, length: int) -> bytes:
        """Copy bytes out of the readable part."""
        return gather(self.readable, offset, length)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Copy bytes into the writable part."""
        scatter(self.writable, offset, data)

    def readable_slices(self, offset: int, length: int) -> list[memoryview]:
        """Zero-copy views of part of the readable area (for ``os.pwritev``)."""
        return slices(self.readable, offset, length)

    def writable_slices(self, offset: int, length: int) -> list[memoryview]:
        """Zero-copy views of part of the writable area (for ``os.preadv``)."""
        return slices(self.writable, offset, length)


def _ring_views(memory: GuestMemory, layout: RingLayout) -> tuple[memoryview, ...]:
    layout.validate()
    n = layout.size
    return (
        memory.view(layout.desc, RingLayout.desc_bytes(n)),
        memory.view(layout.avail, RingLayout.avail_bytes(n)),
        memory.view(layout.used, RingLayout.used_bytes(n)),
    )


def _word_views(avail: memoryview, used: memoryview) -> tuple[memoryview, memoryview]:
    """u16 views of the avail and used rings.

    The other side reads ``idx``, ``flags`` and the event indices while we write them,
    so each must move in ONE 16-bit store/load (§2.7.13: "idx written last ... in one
    16-bit store"). ``struct`` with an explicit byte order copies byte by byte, and a
    peer can then see a half-written index; a native ``memoryview.cast("H")`` is one
    aligned 16-bit access. Native order equals the ring's little-endian order only on
    little-endian hosts, the only ones supported.
    """
    if sys.byteorder != "little":
        raise UsageError("virtqueues need a little-endian host (native u16 ring access)")
    return avail.cast("H"), used.cast("H")


# --------------------------------------------------------------------------- driver


@dataclass(slots=True)
class DriverQueueStats:
    """Plain counters kept by the driver side of one queue."""

    requests: int = 0  # chains made available
    completions: int = 0  # used entries reaped
    kicks_sent: int = 0  # kick_prepare() said "notify"
    kicks_suppressed: int = 0  # kick_prepare() said "no need" (EVENT_IDX / NO_NOTIFY)
    interrupts: int = 0  # interrupts the caller reported via note_interrupt()
    interrupts_suppressed: int = 0  # completions that came without an interrupt of their own


@dataclass(slots=True)
class _InFlight:
    token: Any
    descs: list[int]
    writable_len: int
    keep: bool = False  # the chain's descriptors stay written after use (republish)


class DriverQueue:
    """Driver end of one split virtqueue.

    ``memory`` maps the rings and buffers; ``layout`` says where the rings are. On
    construction the rings are zeroed (the driver owns them until DRIVER_OK).
    ``event_idx`` and ``indirect`` say whether VIRTIO_RING_F_EVENT_IDX and
    VIRTIO_RING_F_INDIRECT_DESC were negotiated. ``max_chain`` is the longest chain
    (indirect table included) the device accepts: its maximum queue size (§2.7.5.3.1;
    default and minimum: this ring's size).
    """

    def __init__(
        self,
        memory: GuestMemory,
        layout: RingLayout,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        max_chain: int | None = None,
    ) -> None:
        self.memory = memory
        self.layout = layout
        self.size = n = layout.size
        self.max_chain = max(n, max_chain or n)
        self.event_idx = event_idx
        self.indirect = indirect
        self._desc, self._avail, self._used = _ring_views(memory, layout)
        for v in (self._desc, self._avail, self._used):
            v[:] = bytes(len(v))
        self._free: list[int] = list(range(n - 1, -1, -1))  # stack of free descriptors
        self._inflight: list[_InFlight | None] = [None] * n
        self._n_inflight = 0
        # chains added with keep=True and used: head -> record, descriptors untouched
        self._kept: dict[int, _InFlight] = {}
        self._avail_idx = 0  # next avail index (shadow, not yet published)
        self._published = 0  # avail.idx last written to memory
        self._kicked = 0  # avail.idx at the last kick decision
        self._last_used = 0  # next used index to reap
        # u16 word views: one 16-bit load/store per index (see _word_views)
        self._a16, self._u16 = _word_views(self._avail, self._used)
        self._used_event = 2 + n  # word index of avail.used_event
        self._avail_event = 2 + 4 * n  # word index of used.avail_event
        self.broken: DeviceSpecError | UsageError | None = None
        self.stats = DriverQueueStats()
        self.delayed_interrupts = False
        """With EVENT_IDX: :meth:`enable_interrupts` asks for an interrupt only once
        three quarters of the chains in flight are used (as Linux's
        ``virtqueue_enable_cb_delayed`` does for transmit queues), not at the next."""

    # -- state
    @property
    def num_free(self) -> int:
        """Free descriptors."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains made available and not yet reaped."""
        return self._n_inflight

    def _check_broken(self) -> None:
        if self.broken is not None:
            raise self.broken

    # -- adding buffers
    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        token: Any,
        *,
        indirect_table: int | None = None,
        keep: bool = False,
    ) -> int:
        """Write one chain (readable buffers first, then writable ones) and put its head
        in the available ring; returns the head. Not visible to the device until
        :meth:`kick_prepare` publishes it.

        With ``keep`` the chain's descriptors are not freed when the device has used
        it: :meth:`republish` makes the same chain available again without writing
        its descriptors (e.g. a receive buffer recycled as it is), :meth:`forget`
        frees them.

        With ``indirect_table`` (a guest address with room for 16 bytes per buffer, and
        INDIRECT_DESC negotiated) the chain goes into that table and takes a single ring
        descriptor; the table may not hold more buffers than the queue has entries
        (§2.7.5.3.1). Raises :class:`QueueFull` if not enough descriptors are free,
        :class:`UsageError` for empty chains, bad lengths or too long a table, and the recorded
        :class:`DeviceSpecError` once the queue is broken.
        """
        if self.broken is not None:
            raise self.broken
        count = len(readable) + len(writable)
        if count == 0:
            raise UsageError("a chain needs at least one buffer")
        for a, ln in readable:
            if not 0 < ln <= _U32_MAX or a < 0:
                raise UsageError(f"bad buffer ({a:#x}, {ln})")
        wlen = 0
        for a, ln in writable:
            if not 0 < ln <= _U32_MAX or a < 0:
                raise UsageError(f"bad buffer ({a:#x}, {ln})")
            wlen += ln
        desc_pack = DESC.pack_into
        free = self._free
        if indirect_table is not None:
            if not self.indirect:
                raise UsageError("INDIRECT_DESC was not negotiated")
            if count > self.max_chain:  # §2.7.5.3.1: no chain longer than the queue size
                raise UsageError(
                    f"indirect table of {count} entries is longer than the queue ({self.max_chain})"
                )
            if not free:
                raise QueueFull("no free descriptor")
            table = self.memory.view(indirect_table, 16 * count)
            # entry i links to i + 1; the last one has no NEXT
            i = 0
            for a, ln in readable:
                i += 1
                desc_pack(table, 16 * i - 16, a, ln, VRING_DESC_F_NEXT, i)
            for a, ln in writable:
                i += 1
                desc_pack(table, 16 * i - 16, a, ln, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, i)
            # clear NEXT on the last entry (rewrite it: one more pack beats a test per entry)
            a, ln = writable[-1] if writable else readable[-1]
            desc_pack(table, 16 * count - 16, a, ln, VRING_DESC_F_WRITE if writable else 0, 0)
            head = free.pop()
            desc_pack(self._desc, 16 * head, indirect_table, 16 * count, VRING_DESC_F_INDIRECT, 0)
            descs = [head]
        else:
            if count > len(free):
                raise QueueFull(f"chain of {count} needs more than {len(free)} free")
            descs = free[-count:]
            del free[-count:]
            descs.reverse()  # pop order: the same descriptors, in the same order
            desc = self._desc
            i = 0
            for a, ln in readable:
                i += 1
                if i < count:
                    desc_pack(desc, 16 * descs[i - 1], a, ln, VRING_DESC_F_NEXT, descs[i])
                else:
                    desc_pack(desc, 16 * descs[i - 1], a, ln, 0, 0)
            for a, ln in writable:
                i += 1
                if i < count:
                    desc_pack(
                        desc,
                        16 * descs[i - 1],
                        a,
                        ln,
                        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                        descs[i],
                    )
                else:
                    desc_pack(desc, 16 * descs[i - 1], a, ln, VRING_DESC_F_WRITE, 0)
            head = descs[0]
        self._inflight[head] = _InFlight(token, descs, wlen, keep)
        self._n_inflight += 1
        self._a16[2 + self._avail_idx % self.size] = head
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.stats.requests += 1
        return head

    def republish(self, head: int, token: Any) -> None:
        """Make the used chain ``head`` (added with ``keep=True``) available again as
        it is, with ``token``: only its head goes into the available ring. The device
        never writes the descriptor table of a split ring (§2.7.5), so the chain is
        the one written by :meth:`add`; nothing read back from it is trusted anyway
        (completions are checked against this side's record). :class:`UsageError` if
        ``head`` is not a kept, used chain."""
        if self.broken is not None:
            raise self.broken
        rec = self._kept.pop(head, None)
        if rec is None:
            raise UsageError(f"descriptor {head} is not a kept chain")
        rec.token = token
        self._inflight[head] = rec
        self._n_inflight += 1
        self._a16[2 + self._avail_idx % self.size] = head
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.stats.requests += 1

    def forget(self, head: int) -> None:
        """Free the descriptors of the used, kept chain ``head`` (no-op if it is not
        one)."""
        rec = self._kept.pop(head, None)
        if rec is not None:
            self._free.extend(rec.descs)

    def kick_prepare(self) -> bool:
        """Publish every chain added since the last call (one 16-bit store of avail.idx,
        written last, §2.7.13) and decide whether the device must be notified: with
        EVENT_IDX by ``avail_event`` (§2.7.10), otherwise by the used ring's NO_NOTIFY
        flag. Returns True if the caller must ring the doorbell."""
        new = self._avail_idx
        old = self._kicked
        if new == old:
            return False
        self._a16[1] = new
        self._published = new
        self.memory.barrier()  # store avail.idx before loading avail_event / flags
        if self.event_idx:
            event = self._u16[self._avail_event]
            notify = vring_need_event(event, new, old)
        else:
            notify = not self._u16[0] & VRING_USED_F_NO_NOTIFY
        self._kicked = new
        if notify:
            self.stats.kicks_sent += 1
        else:
            self.stats.kicks_suppressed += 1
        return notify

    # -- completions
    def has_used(self) -> bool:
        """True if the device has published used entries not yet reaped."""
        return bool(self._u16[1] != self._last_used)

    def get_used(self, limit: int | None = None) -> list[tuple[Any, int]]:
        """Reap used entries: returns ``(token, written_len)`` in completion order and
        frees their descriptors. Every entry is validated (§2.7.8): on the first bad
        one the queue is marked broken and the valid completions before it are
        returned; the next call raises. At most ``limit`` (default: N) entries."""
        self._check_broken()
        used = self._used
        used_idx = self._u16[1]
        pending = (used_idx - self._last_used) & 0xFFFF
        if pending == 0:
            return []
        if pending > self._n_inflight:
            self._mark_broken(
                Rule.USED_IDX_JUMP,
                f"used.idx {used_idx} is {pending} ahead, {self._n_inflight} in flight",
            )
            return []
        n = self.size
        budget = min(pending, n if limit is None else max(0, limit))
        out: list[tuple[Any, int]] = []
        inflight = self._inflight
        free = self._free
        last = self._last_used
        for _ in range(budget):
            uid, ulen = USED_ELEM.unpack_from(used, 4 + 8 * (last % n))
            if uid >= n:
                self._mark_broken(Rule.USED_ID_OUT_OF_RANGE, f"id {uid}, queue size {n}")
                break
            rec = inflight[uid]
            if rec is None:
                self._mark_broken(Rule.USED_ID_NOT_IN_FLIGHT, f"id {uid}")
                break
            if ulen > rec.writable_len:
                self._mark_broken(
                    Rule.USED_LEN_TOO_BIG, f"id {uid}: len {ulen} > writable {rec.writable_len}"
                )
                break
            inflight[uid] = None
            if rec.keep:
                self._kept[uid] = rec
            else:
                free.extend(rec.descs)
            out.append((rec.token, ulen))
            last = (last + 1) & 0xFFFF
        self._last_used = last
        self._n_inflight -= len(out)
        self.stats.completions += len(out)
        return out

    def note_interrupt(self, reaped: int) -> None:
        """Count one interrupt that led to ``reaped`` completions (the rest of a batch
        counts as interrupts the device did not need to send)."""
        self.stats.interrupts += 1
        self.stats.interrupts_suppressed += max(0, reaped - 1)

    def note_polled(self, reaped: int) -> None:
        """Count completions reaped without any interrupt (e.g. by polling)."""
        self.stats.interrupts_suppressed += reaped

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (a hint, §2.7.7). Without EVENT_IDX this sets
        NO_INTERRUPT; with EVENT_IDX ``used_event`` is simply left behind."""
        if not self.event_idx:
            self._a16[0] = VRING_AVAIL_F_NO_INTERRUPT

    def enable_interrupts(self) -> bool:
        """Re-enable interrupts and re-check: returns True if used entries arrived in
        the meantime (reap again before sleeping — the lost-wake-up guard)."""
        if self.event_idx:
            # §2.7.10: the device interrupts once used.idx passes used_event. Delayed:
            # ahead < in flight, so the chains in flight always reach it.
            ahead = self._n_inflight * 3 // 4 if self.delayed_interrupts else 0
            self._a16[self._used_event] = (self._last_used + ahead) & 0xFFFF
        else:
            self._a16[0] = 0
        self.memory.barrier()
        return self.has_used()

    def _mark_broken(self, rule: Rule, detail: str) -> None:
        self.broken = DeviceSpecError(rule, detail)

    def abandon(self) -> list[Any]:
        """Forget every in-flight chain and return their tokens (to be failed with EIO)
        — for a broken queue or a dead device. The queue is unusable afterwards until a
        new one is built on a reset device."""
        tokens = [r.token for r in self._inflight if r is not None]
        self._inflight = [None] * self.size
        self._n_inflight = 0
        if self.broken is None:
            self.broken = UsageError("queue abandoned (device gone or reset); build a new one")
        return tokens

    def in_flight_tokens(self) -> list[Any]:
        """Tokens of chains made available and not yet completed (oldest head first is
        not guaranteed)."""
        return [r.token for r in self._inflight if r is not None]


# --------------------------------------------------------------------------- device


@dataclass(slots=True)
class DeviceQueueStats:
    """Plain counters kept by the device side of one queue."""

    chains: int = 0  # valid chains popped
    bad_chains: int = 0  # chains rejected by validation (completed with length 0)
    interrupts_sent: int = 0  # should_interrupt() said "notify"
    interrupts_suppressed: int = 0  # should_interrupt() said "no need"
    rule_violations: dict[str, int] = field(default_factory=dict)


class DeviceQueue:
    """Device end of one split virtqueue.

    ``last_avail`` is the next available index to process (SET_VRING_BASE). The used
    index starts from what the used ring holds, so a restarted device continues where
    the ring stands.

    ``max_chain`` caps the descriptors of one chain, indirect table included
    (§2.7.5.3.1: "no descriptor chain longer than the Queue Size of the device"; default
    and minimum: this ring's size). A device passes its *maximum* queue size: a driver
    may pick a smaller ring yet size its requests by what the device advertised (Linux
    takes virtio-blk's ``seg_max`` from the config space, which a device derives from
    its maximum), and QEMU itself accepts up to 1024. Either way a giant table is
    refused by its length, before it is mapped or walked.
    """

    def __init__(
        self,
        memory: GuestMemory,
        layout: RingLayout,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        last_avail: int = 0,
        max_chain: int | None = None,
    ) -> None:
        self.memory = memory
        self.layout = layout
        self.size = n = layout.size
        self.max_chain = max(n, max_chain or n)
        self.event_idx = event_idx
        self.indirect = indirect
        self._desc, self._avail, self._used = _ring_views(memory, layout)
        # u16 word views: one 16-bit load/store per index (see _word_views)
        self._a16, self._u16 = _word_views(self._avail, self._used)
        self.last_avail = last_avail & 0xFFFF
        self.used_idx = self._u16[1]
        self._signalled = self.used_idx  # used.idx at the last interrupt decision
        self._used_event = 2 + n  # word index of avail.used_event
        self._avail_event = 2 + 4 * n  # word index of used.avail_event
        self.broken: RingError | None = None
        self.stats = DeviceQueueStats()

    def _ring_error(self, rule: Rule, detail: str) -> RingError:
        self.broken = err = RingError(rule, detail)
        self.stats.rule_violations[rule.name] = self.stats.rule_violations.get(rule.name, 0) + 1
        return err

    def has_avail(self) -> bool:
        """True if the driver has published chains not yet popped."""
        return bool(self._a16[1] != self.last_avail)

    def pop(self) -> Chain | None:
        """Take the next available chain, validated; None if there is none.

        Raises :class:`ChainError` for a bad chain (already consumed: complete it with
        ``push(err.head, 0)`` and go on) and :class:`RingError` when the ring cannot be
        trusted (the queue is then broken and keeps raising)."""
        if self.broken is not None:
            raise self.broken
        avail_idx = self._a16[1]
        last = self.last_avail
        if avail_idx == last:
            return None
        n = self.size
        if (avail_idx - last) & 0xFFFF > n:
            raise self._ring_error(
                Rule.AVAIL_IDX_JUMP, f"avail.idx {avail_idx}, device at {last}, size {n}"
            )
        head = self._a16[2 + last % n]
        if head >= n:
            raise self._ring_error(Rule.HEAD_OUT_OF_RANGE, f"head {head}, queue size {n}")
        self.last_avail = (last + 1) & 0xFFFF
        try:
            chain = self._walk(head)
        except ChainError as e:
            self.stats.bad_chains += 1
            self.stats.rule_violations[e.rule.name] = (
                self.stats.rule_violations.get(e.rule.name, 0) + 1
            )
            raise
        self.stats.chains += 1
        return chain

    def _walk(self, head: int) -> Chain:
        memory = self.memory
        # FlatMemory (the usual case): bounds-check and slice inline; anything that
        # fails the inline check goes through memory.view() for its exact error
        if type(memory) is FlatMemory:
            mbuf: memoryview | None = memory.buf
            mbase = memory.base
            msize = memory.size
        else:
            mbuf = None
            mbase = msize = 0
        unpack = DESC.unpack_from
        table = self._desc
        table_size = self.size
        ttl = table_size
        in_indirect = False
        i = head
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        raw: list[RawSegment] = []
        rlen = wlen = 0
        steps = 0
        while True:
            steps += 1
            if steps > ttl:
                raise ChainError(Rule.CHAIN_LOOP, head, f"more than {ttl} descriptors")
            addr, length, flags, nxt = unpack(table, 16 * i)
            if flags & VRING_DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError(Rule.INDIRECT_NOT_NEGOTIATED, head)
                if in_indirect:
                    raise ChainError(Rule.NESTED_INDIRECT, head, f"entry {i}")
                if flags & VRING_DESC_F_NEXT:
                    raise ChainError(Rule.INDIRECT_WITH_NEXT, head, f"descriptor {i}")
                if length == 0 or length % 16:
                    raise ChainError(Rule.INDIRECT_LENGTH, head, f"length {length}")
                # §2.7.5.3.1: the whole chain, indirect table included, holds at most
                # the device's queue size; checked before the table is mapped or walked
                if length // 16 + len(raw) > self.max_chain:
                    raise ChainError(
                        Rule.CHAIN_TOO_LONG,
                        head,
                        f"indirect table of {length // 16} entries after {len(raw)} "
                        f"descriptor(s), at most {self.max_chain}",
                    )
                try:
                    table = memory.view(addr, length)
                except AddressError as e:
                    raise ChainError(
                        Rule.ADDRESS_OUT_OF_RANGE, head, f"indirect table: {e}"
                    ) from None
                in_indirect = True
                table_size = ttl = length // 16
                steps = 0
                i = 0
                continue
            off = addr - mbase
            if mbuf is not None and off >= 0 and off + length <= msize:
                view = mbuf[off : off + length]
            else:
                try:
                    view = memory.view(addr, length)
                except AddressError as e:
                    raise ChainError(Rule.ADDRESS_OUT_OF_RANGE, head, str(e)) from None
            if flags & VRING_DESC_F_WRITE:
                writable.append(view)
                wlen += length
            else:
                if writable:
                    raise ChainError(Rule.READABLE_AFTER_WRITABLE, head, f"descriptor {i}")
                readable.append(view)
                rlen += length
            if rlen + wlen > _U32_MAX:
                raise ChainError(Rule.LENGTH_OVERFLOW, head, f"{rlen + wlen} bytes")
            raw.append((addr, length, flags, in_indirect))
            if not flags & VRING_DESC_F_NEXT:
                return Chain(head, readable, writable, rlen, wlen, raw)
            if nxt >= table_size:
                raise ChainError(Rule.NEXT_OUT_OF_RANGE, head, f"next {nxt} >= {table_size}")
            i = nxt

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written into it:
        the used element is stored first, then used.idx (§2.7.8)."""
        if not 0 <= head < self.size:
            raise UsageError(f"head {head} out of range")
        if not 0 <= written <= _U32_MAX:
            raise UsageError(f"written length {written} out of range")
        idx = self.used_idx
        USED_ELEM.pack_into(self._used, 4 + 8 * (idx % self.size), head, written)
        self.used_idx = idx = (idx + 1) & 0xFFFF
        self._u16[1] = idx

    def should_interrupt(self) -> bool:
        """Decide whether the driver must be interrupted for what was pushed since the
        last decision: with EVENT_IDX by ``used_event`` (§2.7.10), otherwise by the
        avail ring's NO_INTERRUPT flag."""
        new = self.used_idx
        old = self._signalled
        if new == old:
            return False
        self.memory.barrier()  # store used.idx before loading used_event / flags
        if self.event_idx:
            event = self._a16[self._used_event]
            notify = vring_need_event(event, new, old)
        else:
            notify = not self._a16[0] & VRING_AVAIL_F_NO_INTERRUPT
        self._signalled = new
        if notify:
            self.stats.interrupts_sent += 1
        else:
            self.stats.interrupts_suppressed += 1
        return notify

    def disable_notifications(self) -> None:
        """Ask the driver not to kick while we drain (a hint, §2.7.10). Without
        EVENT_IDX this sets NO_NOTIFY; with EVENT_IDX ``avail_event`` is left behind."""
        if not self.event_idx:
            self._u16[0] = VRING_USED_F_NO_NOTIFY

    def enable_notifications(self) -> bool:
        """Re-enable kicks and re-check: returns True if chains arrived meanwhile
        (process them before sleeping — the lost-wake-up guard)."""
        if self.event_idx:
            self._u16[self._avail_event] = self.last_avail
        else:
            self._u16[0] = 0
        self.memory.barrier()
        return self.has_avail()
