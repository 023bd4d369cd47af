"""The L2 switch: a process of its own that net devices of any number of kernels attach to.

    python -m vdev.switch --listen ipc:///path/sw.sock [--age SECONDS] [--max-macs N]
                          [--max-ports N] [--hwm N] [--tap IFNAME]
                          [--impair loss=P,dup=P,reorder=P,seed=N]
                          [--ring-ports N [--ring-mtu N]]

(:func:`main` is also what a ``python -m vdev switch`` sub-command calls.)

Theory of operation
-------------------
A *learning bridge* as IEEE 802.1D describes it, in two layers:

* :class:`SwitchCore` is the forwarding logic with no I/O at all (unit-tested with an
  injectable clock): a table of ports, a :class:`MacTable` (source MAC → port, learned
  from every frame, aged out after ``age_s`` seconds, at most ``max_macs`` entries with
  the least recently seen evicted first), and :meth:`SwitchCore.decide`, which says
  where one frame goes: broadcast, multicast and unknown unicast destinations are
  *flooded* to every other port, a known unicast destination goes to its one port, a
  frame whose destination sits on the port it came from is *filtered*; frames shorter
  than an Ethernet header, with a multicast source address, or to the IEEE 802.1D
  reserved group addresses (01:80:C2:00:00:0X, "never forwarded", §7.12.6) are dropped.
  Every decision is counted per port and globally (:class:`PortCounters`,
  :class:`SwitchCounters`): plain ints that tests assert on.
* :class:`SwitchServer` is the process around it: one single-threaded
  :class:`EventLoop` over a :class:`hostops.framechan.FrameHub` (a ZeroMQ ``ROUTER`` on
  an ``ipc://`` endpoint), one pidfd per port process, an optional TAP port
  (:class:`vdev.net_tap.TapBackend`, for which the switch is the
  :class:`~vdev.netbackend.FrameSink`), timers and a signal wake-up.

Wire protocol (every message is one ZeroMQ part: a kind byte, then its payload):

==========================  =============  ===============================================
message                     direction      payload after the kind byte
==========================  =============  ===============================================
``H`` hello                 port → switch  msgpack ``{v, name, mac, accepts, pid}``
``W`` welcome               switch → port  msgpack ``{v, port, switch_pid}``
``F`` frame                 both           12-byte ``virtio_net_hdr``, the Ethernet frame
``B`` bye                   port → switch  —
``R`` register again        switch → port  — (a frame came from a connection the switch
                                           does not know: it was restarted)
``E`` error                 switch → port  UTF-8 message (a refused hello)
``S`` / ``s`` stats         any ↔ switch   msgpack ``{seq, after, timeout}`` /
                                           msgpack ``{seq, stats}``
==========================  =============  ===============================================

*Offloads.* A frame keeps its ``virtio_net_hdr``, so a checksum-offloaded
(``NEEDS_CSUM``) or TSO (``GSO_TCPV4``) frame crosses the switch as it is when the
receiving port said in its hello that it ``accepts`` ``"csum"`` / ``"tso4"``; for a
port that does not, the switch does what a NIC would: it completes the checksum or cuts
the segments (:func:`vdev.virtio.packet.complete_checksum`,
:func:`~vdev.virtio.packet.gso_segment_tcpv4`), once per flood, and clears
``DATA_VALID`` (§5.1.6.4.1: without GUEST_CSUM the flags must be zero). A header that
breaks §5.1.6.2.1 (GSO other than TCPv4, GSO without NEEDS_CSUM or without a
``gso_size``, a checksum field outside the frame) is dropped and counted ``bad_hdr``.

*Relaying* costs no copy in Python: a frame received from one port is handed to the
hub again as the very ZeroMQ message it arrived in (libzmq shares the buffer),
to one port or to all of them.

*Ports come and go.* A port is created by its hello (an update if the connection
already has one) and removed by its bye, by the exit of the process it announced (a
pidfd — SIGKILL included; a pid the switch cannot watch, e.g. from another pid
namespace, is counted ``unwatched_ports`` and such a port is removed by the other two
triggers only), or when a send finds its connection gone (``ROUTER_MANDATORY``).
Removing a port forgets the MACs learned on it. Every change increments
``generation``; a stats request with ``after=G`` is answered once the generation
exceeds ``G`` (or at its timeout), which lets a client wait for "port gone" without
polling.

*Bounded memory*: ZeroMQ high-water marks (``--hwm`` messages per port and direction;
a frame for a full port is dropped and counted), a cap on message size, the MAC table
cap, at most ``--max-ports`` ports, at most 64 deferred stats requests, and bounded
work per wake-up (``budget`` messages).

*Ring ports* (``--ring-ports N``): the switch itself serves N virtio-net devices
(:class:`vdev.net.NetDevice`, control endpoint ``<ENDPOINT>.ring<i>``, MAC
``02:76:6c:xx:xx:xx`` from a hash of that endpoint -- the same after a restart --,
MTU ``--ring-mtu``) the way a ``--shm-by-name`` device process
does: a kernel attaches to one (``kernel.Attach("ipc://.../sw.sock.ring0", ip=...)``,
one kernel per port at a time), the switch maps that kernel's memory, and the port's
rings are served by the switch's own loop (each device's
:class:`~vdev.runtime.DeviceRuntime` is *hosted* by the :class:`EventLoop`: one
thread, no locks). A frame a ring port's driver transmits is decided while it is still
in the driver's transmit buffer and copied once, straight into the receive buffer of a
ring port it goes to (``NetDevice.receive``) -- ring to ring, as OVS-DPDK, VPP and
Snabb do -- or into one ZeroMQ message for a port of the ZeroMQ kind. No device
process sits between a ring port's kernel and the switch. A frame for a ring port whose
driver has no free receive buffer waits in the port's backlog (bounded:
:data:`RING_BACKLOG_FRAMES`, :data:`RING_BACKLOG_BYTES`; beyond, dropped and counted
``full``) and goes in, in order, when the driver posts buffers. Ring ports do not busy-poll
(one device's spin would stall the rest) and are not traced on the switch's side (the
kernel's side is). A kernel that exits (SIGKILL included) resets its port at once; the
next kernel may attach.

*Impairment* (``--impair``, for testing transports over a bad path, as netem does):
every frame the switch would forward or flood is, by one seeded draw
(:class:`Impairment`), *lost* (not forwarded), *duplicated* (forwarded twice) or
*reordered* (held back and forwarded right after the next frame, or after
``REORDER_HOLD_S`` if no frame follows), with the probabilities given; each outcome is
counted (``impaired_lost``, ``impaired_dup``, ``impaired_reordered`` in the switch's
counters). Off by default.

*Life cycle*: SIGTERM or SIGINT → the loop ends, the socket file is removed, the final
statistics are printed as one JSON line on stdout, exit 0. (SIGTERM stops the loop
between two callbacks, through :func:`hostops.signals.on_terminate`; SIGINT is Python's
``KeyboardInterrupt``, which may cut the callback in progress short, so the final
counters can miss the frame being relayed at that instant.) Bad options: one line on
stderr, exit 2. The switch also exits when the process that launched it with
:class:`hostops.DeviceProcess` dies.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from hostops.clock import monotonic
from hostops.framechan import DEFAULT_HWM, FrameHub, FramePort, Part, PeerProcess, SendStatus
from hostops.poll import Poller, Waker
from hostops.process import ParentWatch
from hostops.signals import on_terminate, wake_on_signals
from hostops.tap import TapError
from vdev.netbackend import FrameSink, NetBackend
from vdev.virtio.net import (
    ETH_HLEN,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    NET_HDR_SIZE,
    NetHdr,
    format_mac,
)

__all__ = [
    "PROTOCOL_VERSION",
    "KIND_HELLO",
    "KIND_WELCOME",
    "KIND_FRAME",
    "KIND_BATCH",
    "BATCH",
    "BATCH_MAX_BYTES",
    "BATCH_MAX_FRAMES",
    "BATCH_RECORD",
    "KIND_BYE",
    "KIND_REGISTER",
    "KIND_ERROR",
    "KIND_STATS",
    "KIND_STATS_REPLY",
    "OFFLOADS",
    "MAX_FRAME",
    "DEFAULT_AGE_S",
    "DEFAULT_MAX_MACS",
    "DEFAULT_MAX_PORTS",
    "PortCounters",
    "SwitchCounters",
    "SwitchPort",
    "MacTable",
    "SwitchCore",
    "SwitchFull",
    "adapt_frame",
    "check_hdr",
    "encode_hello",
    "decode_hello",
    "EventLoop",
    "RxGate",
    "TimerHandle",
    "Impairment",
    "parse_impairment",
    "PASS",
    "LOSE",
    "DUP",
    "REORDER",
    "REORDER_HOLD_S",
    "SwitchServer",
    "SwitchClient",
    "main",
]

PROTOCOL_VERSION = 1
KIND_HELLO = b"H"
KIND_WELCOME = b"W"
KIND_FRAME = b"F"
KIND_BATCH = b"M"
KIND_BYE = b"B"
KIND_REGISTER = b"R"
KIND_ERROR = b"E"
KIND_STATS = b"S"
KIND_STATS_REPLY = b"s"

#: The offloads a port may accept: checksum completion left to the receiver, and TCPv4
#: super-frames (virtio-net GUEST_CSUM / GUEST_TSO4 on the receiving side).
OFFLOADS = frozenset({"csum", "tso4"})

#: Largest Ethernet frame that crosses the switch: an IPv4 packet of 65535 bytes (RFC 791
#: total length is 16 bits) behind an Ethernet header with one 802.1Q tag.
MAX_FRAME = 0xFFFF + ETH_HLEN + 4

#: The word a port puts in its hello's ``accepts`` to say it takes batch messages.
BATCH = "batch"
#: A batch record's header: the frame's length (little-endian u32), then the 12-byte
#: ``virtio_net_hdr``, then the frame.
BATCH_RECORD = 4 + NET_HDR_SIZE
#: Largest batch message a sender builds (well under the channel's message cap).
BATCH_MAX_BYTES = 64 * 1024
#: Most frames in one batch message; a receiver walks at most this many records of one.
BATCH_MAX_FRAMES = 256

DEFAULT_AGE_S = 300.0
DEFAULT_MAX_MACS = 4096
DEFAULT_MAX_PORTS = 256

_MAX_NAME = 64
_MAX_PENDING_STATS = 64
_MAX_STATS_WAIT_S = 30.0
_RESERVED_PREFIX = b"\x01\x80\xc2\x00\x00"  # IEEE 802.1D §7.12.6 reserved group addresses
_ZERO_MAC = b"\x00" * 6
_PLAIN = NetHdr()
_K_FRAME = KIND_FRAME[0]
_K_BATCH = KIND_BATCH[0]
_K_HELLO = KIND_HELLO[0]
_K_STATS = KIND_STATS[0]
_K_BYE = KIND_BYE[0]
#: Where the Ethernet frame starts in a frame message: kind byte + virtio_net_hdr.
_FRAME_AT = 1 + NET_HDR_SIZE


# ===================================================================== sans-IO core


@dataclass(slots=True)
class PortCounters:
    """Counters of one port, seen from the switch: ``rx_*`` are frames the switch
    received *from* the port, ``tx_*`` frames it sent *to* the port (segments count one
    each), ``flooded`` the part of ``tx_frames`` that were floods (broadcast, multicast,
    unknown unicast), ``dropped`` frames from the port that were discarded (malformed)
    plus frames for the port that could not be queued (its queue was full)."""

    rx_frames: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    dropped: int = 0
    flooded: int = 0


@dataclass(slots=True)
class SwitchCounters:
    """Counters of the whole switch (plain ints)."""

    frames: int = 0  # frames received from any port (well-formed or not)
    forwarded: int = 0  # frames sent to exactly one known port
    flooded: int = 0  # frames flooded to every other port
    filtered: int = 0  # destination learned on the port the frame came from
    dropped: int = 0  # frames dropped for any reason (sum of the reasons below and full)
    runts: int = 0  # shorter than an Ethernet header
    oversize: int = 0  # longer than MAX_FRAME
    bad_hdr: int = 0  # virtio_net_hdr missing or breaking §5.1.6.2.1
    bad_source: int = 0  # multicast source MAC (802.1D: never learned or forwarded)
    link_local: int = 0  # to 01:80:C2:00:00:0X (802.1D: never forwarded)
    full: int = 0  # a destination's queue was at its high-water mark
    offload_errors: int = 0  # a frame to complete/segment did not parse (PacketError)
    checksummed: int = 0  # checksums completed for ports without "csum"
    segmented: int = 0  # super-frames cut for ports without "tso4"
    unregistered: int = 0  # frames from connections that never said hello
    malformed: int = 0  # messages of unknown kind or shape
    ports_added: int = 0
    ports_removed: int = 0
    ports_refused: int = 0  # hellos refused (bad, or max_ports reached)
    unwatched_ports: int = 0  # ports whose process could not be watched (pidfd)
    impaired_lost: int = 0  # --impair: frames not forwarded on purpose
    impaired_dup: int = 0  # --impair: frames forwarded twice
    impaired_reordered: int = 0  # --impair: frames forwarded after the next one


@dataclass(slots=True)
class SwitchPort:
    """One port as the core knows it."""

    number: int
    name: str
    mac: bytes | None = None
    accepts: frozenset[str] = frozenset()
    pid: int = 0
    counters: PortCounters = field(default_factory=PortCounters)


class SwitchFull(Exception):
    """A port cannot be added: ``max_ports`` ports exist already."""


class MacTable:
    """Source MAC → port, with ageing and a size cap (least recently seen goes first).

    ``clock`` is any monotonic ``() -> seconds``. An entry is *seen* when a frame from
    that MAC arrives; it expires ``age_s`` seconds after it was last seen (checked at
    every lookup and by :meth:`expire`).
    """

    def __init__(
        self,
        *,
        age_s: float = DEFAULT_AGE_S,
        capacity: int = DEFAULT_MAX_MACS,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        if age_s <= 0:
            raise ValueError(f"age_s must be > 0, got {age_s!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        self.age_s = age_s
        self.capacity = capacity
        self._clock = clock
        # mac -> [port, last seen]; ordered by last seen (oldest first)
        self._entries: OrderedDict[bytes, list[Any]] = OrderedDict()
        self.learned = 0
        """New entries."""
        self.moved = 0
        """Entries that changed port (a station moved, or a loop)."""
        self.aged = 0
        """Entries dropped because they were not seen for ``age_s``."""
        self.evicted = 0
        """Entries dropped to make room (the table was full)."""

    def learn(self, mac: bytes, port: int) -> None:
        """Record that ``mac`` was seen on ``port`` now."""
        now = self._clock()
        e = self._entries.get(mac)
        if e is not None:
            if e[0] != port:
                e[0] = port
                self.moved += 1
            e[1] = now
            self._entries.move_to_end(mac)
            return
        if len(self._entries) >= self.capacity:
            self._entries.popitem(last=False)
            self.evicted += 1
        self._entries[mac] = [port, now]
        self.learned += 1

    def lookup(self, mac: bytes) -> int | None:
        """The port ``mac`` was last seen on, or None (unknown or aged out)."""
        e = self._entries.get(mac)
        if e is None:
            return None
        if self._clock() - e[1] >= self.age_s:
            del self._entries[mac]
            self.aged += 1
            return None
        port: int = e[0]
        return port

    def expire(self) -> int:
        """Drop every entry not seen for ``age_s``; return how many (bounded by the
        table size)."""
        limit = self._clock() - self.age_s
        n = 0
        for _ in range(len(self._entries)):
            mac, e = next(iter(self._entries.items()))
            if e[1] > limit:
                break
            del self._entries[mac]
            n += 1
        self.aged += n
        return n

    def next_expiry(self) -> float | None:
        """When the oldest entry expires (clock time), None if the table is empty."""
        for e in self._entries.values():
            t: float = e[1] + self.age_s
            return t
        return None

    def forget_port(self, port: int) -> int:
        """Drop every entry on ``port``; return how many."""
        gone = [mac for mac, e in self._entries.items() if e[0] == port]
        for mac in gone:
            del self._entries[mac]
        return len(gone)

    def entries(self) -> list[tuple[bytes, int, float]]:
        """``(mac, port, seconds since seen)`` for every entry, oldest first."""
        now = self._clock()
        return [(mac, e[0], now - e[1]) for mac, e in self._entries.items()]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, mac: object) -> bool:
        return self.lookup(mac) is not None if isinstance(mac, bytes) else False


class SwitchCore:
    """The forwarding decision and the bookkeeping of a learning switch (no I/O).

    Typical use, per frame received on port ``p``::

        outs, flooded = core.decide(p, frame)
        for o in outs:
            if send(o, frame): core.count_tx(o, len(frame), flooded)
            else:              core.count_full(o)
    """

    def __init__(
        self,
        *,
        age_s: float = DEFAULT_AGE_S,
        max_macs: int = DEFAULT_MAX_MACS,
        max_ports: int = DEFAULT_MAX_PORTS,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        if max_ports < 1:
            raise ValueError(f"max_ports must be >= 1, got {max_ports!r}")
        self.table = MacTable(age_s=age_s, capacity=max_macs, clock=clock)
        self.max_ports = max_ports
        self.ports: dict[int, SwitchPort] = {}
        self.counters = SwitchCounters()
        self.generation = 0
        """Incremented whenever a port is added, changed or removed."""
        self._next_number = 1

    # ------------------------------------------------------------------ ports
    def add_port(
        self,
        name: str,
        *,
        mac: bytes | None = None,
        accepts: frozenset[str] = frozenset(),
        pid: int = 0,
    ) -> SwitchPort:
        """Create a port (numbers are never reused); :class:`SwitchFull` at the cap.
        A given ``mac`` is learned at once, so unicast to a quiet port is not flooded."""
        if len(self.ports) >= self.max_ports:
            self.counters.ports_refused += 1
            raise SwitchFull(f"the switch has {self.max_ports} ports already")
        port = SwitchPort(self._next_number, name, mac, _valid_accepts(accepts), pid)
        self._next_number += 1
        self.ports[port.number] = port
        self.counters.ports_added += 1
        self.generation += 1
        if mac is not None and _learnable(mac):
            self.table.learn(mac, port.number)
        return port

    def update_port(
        self, number: int, *, name: str, mac: bytes | None, accepts: frozenset[str]
    ) -> None:
        """A port said hello again (e.g. its driver negotiated other offloads)."""
        port = self.ports[number]
        port.name = name
        port.accepts = _valid_accepts(accepts)
        if mac is not None and mac != port.mac and _learnable(mac):
            self.table.learn(mac, number)
        port.mac = mac
        self.generation += 1

    def remove_port(self, number: int) -> SwitchPort | None:
        """Remove a port and the MACs learned on it; None if there is no such port."""
        port = self.ports.pop(number, None)
        if port is None:
            return None
        self.table.forget_port(number)
        self.counters.ports_removed += 1
        self.generation += 1
        return port

    # ------------------------------------------------------------------ frames
    def decide(self, in_port: int, frame: bytes | memoryview) -> tuple[tuple[int, ...], bool]:
        """Where ``frame`` (received on ``in_port``) goes: ``(output ports, flooded)``.

        Counts the frame on ``in_port`` and learns its source. An empty tuple means the
        frame goes nowhere (dropped or filtered, counted). Transmissions are counted by
        the caller with :meth:`count_tx` / :meth:`count_full`, since only it knows
        whether each send succeeded."""
        c = self.counters
        c.frames += 1
        port = self.ports.get(in_port)
        if port is None:
            c.unregistered += 1
            c.dropped += 1
            return (), False
        pc = port.counters
        n = len(frame)
        pc.rx_frames += 1
        pc.rx_bytes += n
        if n < ETH_HLEN:  # IEEE 802.3 §3.1.1: DA, SA, type/length at least
            c.runts += 1
            return self._drop_in(pc)
        if n > MAX_FRAME:
            c.oversize += 1
            return self._drop_in(pc)
        head = bytes(frame[:12])
        dst = head[:6]
        src = head[6:]
        if src[0] & 1:  # 802.1D §7.8: a group address is never a source
            c.bad_source += 1
            return self._drop_in(pc)
        if src != _ZERO_MAC:
            self.table.learn(src, in_port)
        if dst[0] & 1:
            if dst[:5] == _RESERVED_PREFIX and dst[5] <= 0x0F:
                c.link_local += 1
                return self._drop_in(pc)
            return self._flood(in_port)
        out = self.table.lookup(dst)
        if out is None or out not in self.ports:
            return self._flood(in_port)
        if out == in_port:
            c.filtered += 1
            return (), False
        c.forwarded += 1
        return (out,), False

    def _flood(self, in_port: int) -> tuple[tuple[int, ...], bool]:
        self.counters.flooded += 1
        return tuple(p for p in self.ports if p != in_port), True

    def _drop_in(self, pc: PortCounters) -> tuple[tuple[int, ...], bool]:
        pc.dropped += 1
        self.counters.dropped += 1
        return (), False

    def count_bad(self, in_port: int, reason: str) -> None:
        """A message from ``in_port`` was dropped before :meth:`decide` (e.g.
        ``"bad_hdr"``, ``"malformed"``): counts the reason, the port's ``rx_frames``
        and ``dropped``."""
        c = self.counters
        c.frames += 1
        setattr(c, reason, getattr(c, reason) + 1)
        c.dropped += 1
        port = self.ports.get(in_port)
        if port is not None:
            port.counters.rx_frames += 1
            port.counters.dropped += 1

    def count_again(self, in_port: int, nbytes: int, flooded: bool) -> None:
        """Count a frame received on ``in_port`` that goes where the one before it
        went (same addresses, decided by :meth:`decide` an instant before, with a
        length that :meth:`decide` accepts): what :meth:`decide` would have counted."""
        c = self.counters
        c.frames += 1
        if flooded:
            c.flooded += 1
        else:
            c.forwarded += 1
        port = self.ports.get(in_port)
        if port is not None:
            port.counters.rx_frames += 1
            port.counters.rx_bytes += nbytes

    def count_tx(self, out_port: int, nbytes: int, flooded: bool) -> None:
        """One frame of ``nbytes`` was queued for ``out_port``."""
        port = self.ports.get(out_port)
        if port is None:
            return
        pc = port.counters
        pc.tx_frames += 1
        pc.tx_bytes += nbytes
        if flooded:
            pc.flooded += 1

    def count_full(self, out_port: int) -> None:
        """A frame for ``out_port`` was dropped: its queue was full."""
        self.counters.full += 1
        self.count_drop(out_port)

    def count_drop(self, out_port: int) -> None:
        """A frame for ``out_port`` was dropped (the reason is counted by the caller)."""
        self.counters.dropped += 1
        port = self.ports.get(out_port)
        if port is not None:
            port.counters.dropped += 1

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """Every counter, the ports and the MAC table, as plain data (msgpack/JSON)."""
        t = self.table
        sw = asdict(self.counters)
        sw.update(
            macs=len(t),
            macs_learned=t.learned,
            macs_moved=t.moved,
            macs_aged=t.aged,
            macs_evicted=t.evicted,
            ports=len(self.ports),
            generation=self.generation,
        )
        ports = [
            {
                "port": p.number,
                "name": p.name,
                "mac": format_mac(p.mac) if p.mac else None,
                "accepts": sorted(p.accepts),
                "pid": p.pid,
                **asdict(p.counters),
            }
            for p in self.ports.values()
        ]
        macs = [[format_mac(m), port, round(age, 3)] for m, port, age in t.entries()]
        return {"switch": sw, "ports": ports, "macs": macs}


# --------------------------------------------------------------------- impairment
#: Longest a frame held back for reordering waits for a frame to overtake it.
REORDER_HOLD_S = 0.005
#: Frames (and bytes) a ring port holds while its driver has no free receive buffer;
#: beyond that they are dropped, counted ``full`` (a ZeroMQ port's --hwm, for rings).
RING_BACKLOG_FRAMES = 1024
RING_BACKLOG_BYTES = 8 << 20

#: The fates :meth:`Impairment.draw` gives a frame.
PASS = 0
LOSE = 1
DUP = 2
REORDER = 3


class Impairment:
    """What happens to each frame on a deliberately bad path (``--impair``): one
    seeded draw per frame decides :data:`LOSE`, :data:`DUP`, :data:`REORDER` or
    :data:`PASS`, with probabilities ``loss``, ``dup`` and ``reorder`` (their sum at
    most 1). The same seed and the same sequence of frames give the same decisions."""

    def __init__(
        self, *, loss: float = 0.0, dup: float = 0.0, reorder: float = 0.0, seed: int = 0
    ) -> None:
        for name, p in (("loss", loss), ("dup", dup), ("reorder", reorder)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in 0..1, not {p!r}")
        if loss + dup + reorder > 1.0:
            raise ValueError("loss + dup + reorder must not exceed 1")
        import random

        self.loss = loss
        self.dup = dup
        self.reorder = reorder
        self.seed = seed
        self._random = random.Random(seed).random
        self._lose_below = loss
        self._dup_below = loss + dup
        self._reorder_below = loss + dup + reorder

    def draw(self) -> int:
        """The fate of the next frame."""
        x = self._random()
        if x < self._lose_below:
            return LOSE
        if x < self._dup_below:
            return DUP
        if x < self._reorder_below:
            return REORDER
        return PASS

    def describe(self) -> dict[str, float | int]:
        """The settings, as plain data (for the statistics)."""
        return {"loss": self.loss, "dup": self.dup, "reorder": self.reorder, "seed": self.seed}


def parse_impairment(text: str) -> Impairment:
    """``loss=P,dup=P,reorder=P,seed=N`` (any subset, any order) → :class:`Impairment`;
    ValueError with a precise message otherwise."""
    kw: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in ("loss", "dup", "reorder", "seed"):
            raise ValueError(f"expected loss=P,dup=P,reorder=P,seed=N, got {item!r}")
        if key in kw:
            raise ValueError(f"{key} given twice")
        try:
            kw[key] = int(value) if key == "seed" else float(value)
        except ValueError:
            raise ValueError(f"{key}: not a number: {value!r}") from None
        if key != "seed" and kw[key] != kw[key]:
            raise ValueError(f"{key}: not a number: {value!r}")
    return Impairment(**kw)


def _valid_accepts(accepts: frozenset[str]) -> frozenset[str]:
    """Known offloads only; "tso4" only with "csum" (virtio §5.1.3.1: GUEST_TSO4
    requires GUEST_CSUM)."""
    a = frozenset(accepts) & OFFLOADS
    if "csum" not in a:
        a = frozenset()
    return a


def _learnable(mac: bytes) -> bool:
    return len(mac) == 6 and not mac[0] & 1 and mac != _ZERO_MAC


# ===================================================================== offloads


def check_hdr(hdr: NetHdr, frame_len: int) -> str | None:
    """Why ``hdr`` is not acceptable on a frame of ``frame_len`` bytes, or None.

    virtio §5.1.6.2.1: GSO only as negotiated (the switch relays TCPv4 only), a GSO
    frame has NEEDS_CSUM and a ``gso_size``; with NEEDS_CSUM the checksum field
    (``csum_start + csum_offset``, 2 bytes) lies inside the frame."""
    gso = hdr.gso_type & ~GSO_ECN
    if gso not in (GSO_NONE, GSO_TCPV4):
        return f"gso_type {hdr.gso_type:#x} is not relayed"
    if gso == GSO_TCPV4 and (not hdr.flags & HDR_F_NEEDS_CSUM or hdr.gso_size == 0):
        return "GSO_TCPV4 without NEEDS_CSUM or gso_size"
    if hdr.flags & HDR_F_NEEDS_CSUM and hdr.csum_start + hdr.csum_offset + 2 > frame_len:
        return "checksum field outside the frame"
    return None


def adapt_frame(
    hdr: NetHdr, frame: bytes | memoryview, accepts: frozenset[str]
) -> list[tuple[NetHdr, bytes | memoryview]]:
    """What a port that accepts ``accepts`` gets for ``(hdr, frame)``: the frame as it
    is if it can take it, else the frame with its checksum completed, or its segments
    (checksums complete), each with a plain header — what a NIC without those offloads
    would have put on the wire. Raises :class:`vdev.virtio.packet.PacketError` for a
    frame that does not parse as its header says."""
    from vdev.virtio.packet import complete_checksum, gso_segment_tcpv4

    gso = hdr.gso_type & ~GSO_ECN
    if gso == GSO_TCPV4 and "tso4" not in accepts:
        plain = NetHdr()
        return [(plain, seg) for seg in gso_segment_tcpv4(frame, hdr.gso_size)]
    if hdr.flags & HDR_F_NEEDS_CSUM and "csum" not in accepts:
        return [(NetHdr(), complete_checksum(frame, hdr.csum_start, hdr.csum_offset))]
    if hdr.flags & HDR_F_DATA_VALID and "csum" not in accepts:
        return [(NetHdr(), frame)]
    return [(hdr, frame)]


# ===================================================================== wire protocol


def encode_hello(*, name: str, mac: bytes | None, accepts: frozenset[str], pid: int) -> list[bytes]:
    """A hello message (as the parts :meth:`hostops.framechan.FramePort.send` joins)."""
    body = {"v": PROTOCOL_VERSION, "name": name, "mac": mac, "accepts": sorted(accepts), "pid": pid}
    return [KIND_HELLO, msgpack.packb(body)]


def decode_hello(payload: bytes) -> tuple[str, bytes | None, frozenset[str], int]:
    """``(name, mac, accepts, pid)`` from a hello payload; ValueError naming the
    problem for anything malformed (the port's fault)."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:
        raise ValueError(f"hello is not msgpack: {e}") from None
    if not isinstance(body, dict):
        raise ValueError("hello is not a map")
    if body.get("v") != PROTOCOL_VERSION:
        raise ValueError(f"protocol version {body.get('v')!r} (this switch speaks 1)")
    name = body.get("name", "")
    if not isinstance(name, str) or len(name) > _MAX_NAME or not name.isprintable():
        raise ValueError(f"port name must be printable text of at most {_MAX_NAME} chars")
    mac = body.get("mac")
    if mac is not None and (not isinstance(mac, bytes) or len(mac) != 6 or mac[0] & 1):
        raise ValueError("mac must be 6 bytes of a unicast address or nil")
    accepts = body.get("accepts", [])
    if not isinstance(accepts, list) or len(accepts) > 8:
        raise ValueError("accepts must be a short list of offload names")
    if not all(isinstance(a, str) for a in accepts):
        raise ValueError("accepts must be a list of strings")
    pid = body.get("pid", 0)
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < 1 << 31:
        raise ValueError("pid must be a non-negative int")
    return name, mac, frozenset(accepts), pid


# ===================================================================== the loop


class TimerHandle:
    """A timer of an :class:`EventLoop`; :meth:`cancel` stops it if it has not run."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (no-op once it ran)."""
        self.cancelled = True

    def __lt__(self, other: TimerHandle) -> bool:
        return self.when < other.when


class _Fd:
    """A plain fd as a hostops pollable."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _pollable(self) -> int:
        return self.fd


class EventLoop:
    """One thread's loop: watched sources (level-triggered), timers, a stop flag.

    ``watch(source, cb)`` takes a hostops pollable (anything with ``_pollable()``), an
    object with ``fileno()`` or an int fd, and calls ``cb()`` while it is readable.
    ``call_later(delay_s, cb)`` runs ``cb()`` once. :meth:`run` loops until :meth:`stop`
    (safe from signal handlers and other threads). Used by the switch, and by tests to
    drive net backends with a :class:`~vdev.netbackend.FrameSink` of their own.
    """

    def __init__(self, clock: Callable[[], float] = monotonic) -> None:
        self._clock = clock
        self._poller = Poller()
        self._waker = Waker()
        self._poller.register(self._waker)
        self._watches: dict[int, tuple[Any, Callable[[], None]]] = {}  # id(pollable)
        self._keys: dict[int, Any] = {}  # id(source) -> pollable
        self._timers: list[TimerHandle] = []
        self._hosted: list[Any] = []  # DeviceSessions joined to this loop
        self._stopping = False
        self.callback_errors = 0
        """Exceptions escaping callbacks (logged, the loop goes on)."""

    @property
    def waker(self) -> Waker:
        """The loop's self-pipe (e.g. for :func:`hostops.signals.wake_on_signals`)."""
        return self._waker

    def _pollable_of(self, source: Any) -> Any:
        if hasattr(source, "_pollable"):
            return source
        fd = source if isinstance(source, int) else source.fileno()
        return _Fd(fd)

    def watch(self, source: Any, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``source`` is readable (replaces an earlier
        callback for the same source)."""
        key = id(source) if not isinstance(source, int) else -1 - source
        old = self._keys.get(key)
        if old is not None:
            self._watches[id(old)] = (old, callback)
            return
        p = self._pollable_of(source)
        self._keys[key] = p
        self._watches[id(p)] = (p, callback)
        self._poller.register(p)

    def unwatch(self, source: Any) -> None:
        """Stop watching ``source`` (unknown sources are ignored)."""
        key = id(source) if not isinstance(source, int) else -1 - source
        p = self._keys.pop(key, None)
        if p is None:
            return
        self._watches.pop(id(p), None)
        self._poller.unregister(p)

    def host(self, session: Any) -> None:
        """Host a :class:`vdev.session.DeviceSession` (its ``open(host=loop)`` calls
        this): every round asks ``session.round_timeout()`` before sleeping and calls
        ``session.after_round()`` after the callbacks and timers."""
        if session not in self._hosted:
            self._hosted.append(session)

    def unhost(self, session: Any) -> None:
        """Stop hosting ``session`` (unknown sessions are ignored)."""
        if session in self._hosted:
            self._hosted.remove(session)

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback()`` once, ``delay_s`` seconds from now."""
        t = TimerHandle(self._clock() + max(0.0, delay_s), callback)
        heapq.heappush(self._timers, t)
        return t

    def run_once(self, timeout_s: float | None) -> None:
        """Wait up to ``timeout_s`` (None: until something happens; shortened to the
        next timer) and dispatch whatever is ready and every due timer."""
        timers = self._timers
        while timers and timers[0].cancelled:
            heapq.heappop(timers)
        if timers:
            wait = max(0.0, timers[0].when - self._clock())
            timeout_s = wait if timeout_s is None else min(timeout_s, wait)
        hosted = self._hosted
        for session in hosted:
            t = session.round_timeout()
            if t is not None and (timeout_s is None or t < timeout_s):
                timeout_s = t
        for obj in self._poller.poll(timeout_s):
            if obj is self._waker:
                self._waker.drain()
                continue
            entry = self._watches.get(id(obj))
            if entry is None:  # unwatched by an earlier callback of this round
                continue
            self._call(entry[1])
        now = self._clock()
        for _ in range(len(timers)):
            if not timers or timers[0].when > now:
                break
            t = heapq.heappop(timers)
            if not t.cancelled:
                t.cancelled = True
                self._call(t.callback)
        for session in hosted[:] if hosted else ():
            self._call(session.after_round)

    def _call(self, cb: Callable[[], None]) -> None:
        try:
            cb()
        except Exception as e:  # a bug in a callback must not stop the switch
            self.callback_errors += 1
            if self.callback_errors <= 20:
                print(f"switch: callback failed: {type(e).__name__}: {e}", file=sys.stderr)

    def run(self) -> None:
        """Dispatch until :meth:`stop`."""
        while not self._stopping:
            self.run_once(None)

    def stop(self) -> None:
        """Make :meth:`run` return (signal-handler and thread safe)."""
        self._stopping = True
        self._waker.wake()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopping

    def close(self) -> None:
        """Forget every watch and timer and close the waker (not the sources)."""
        for p, _ in list(self._watches.values()):
            self._poller.unregister(p)
        self._watches.clear()
        self._keys.clear()
        self._timers.clear()
        self._hosted.clear()
        self._waker.close()


class RxGate:
    """Back-pressure for a backend's receive path: watch ``source`` only while the
    device has receive buffers.

    The device loop's watches are level-triggered, so a backend that stops reading for
    lack of buffers must also stop watching, or it is called again at once. :meth:`pause`
    unwatches and re-checks after ``retry_s`` (a timer on the device loop);
    :meth:`resume` watches again at once (a device that knows when the driver added
    receive buffers can call the backend's ``resume_rx()``, which calls it).
    """

    def __init__(
        self, source: Any, callback: Callable[[], None], *, retry_s: float = 0.002
    ) -> None:
        self.source = source
        self.callback = callback
        self.retry_s = retry_s
        self.sink: Any = None
        self.watching = False
        self._timer: Any = None
        self.pauses = 0
        """Times the receive path stopped for lack of receive buffers."""

    def start(self, sink: Any) -> None:
        """Begin watching on ``sink`` (a :class:`~vdev.netbackend.FrameSink`)."""
        self.sink = sink
        self.resume()

    def pause(self) -> None:
        """No receive buffers: stop watching, look again in ``retry_s``."""
        if self.sink is None:
            return
        if self.watching:
            self.sink.unwatch(self.source)
            self.watching = False
            self.pauses += 1
        if self._timer is None:
            self._timer = self.sink.call_later(self.retry_s, self._retry)

    def _retry(self) -> None:
        self._timer = None
        self.resume()

    def resume(self) -> None:
        """Watch again (idempotent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sink is not None and not self.watching:
            self.sink.watch(self.source, self.callback)
            self.watching = True

    def stop(self) -> None:
        """Stop watching and cancel the retry timer (before closing the source)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sink is not None and self.watching:
            self.sink.unwatch(self.source)
        self.watching = False


# ===================================================================== the server


@dataclass(slots=True)
class _Link:
    """How the server reaches one port: a ZeroMQ peer, or in this process (the TAP
    backend's ``send``; a ring port's backend, which hands frames to its device)."""

    peer: bytes | None = None
    local: Callable[[NetHdr, bytes | memoryview], bool] | None = None
    watch: PeerProcess | None = None
    batch: bool = False  # the port said it takes batch messages
    ring: _RingBackend | None = None  # a ring port


class _RingBackend(NetBackend):
    """The backend of a ring port's :class:`~vdev.net.NetDevice`: what its driver
    transmits is switched at once, in this process, straight from the driver's transmit
    buffer (:meth:`SwitchServer.from_ring`); what the switch sends to the port goes
    straight into the driver's receive buffers (``NetDevice.receive``)."""

    name = "ring"
    takes_views = True  # from_ring copies the frame to where it goes before returning

    def __init__(self, server: SwitchServer, number: int) -> None:
        super().__init__()
        self._server = server
        self.number = number
        #: Frames for this port that found its driver without a free receive buffer,
        #: oldest first (at most RING_BACKLOG_FRAMES / RING_BACKLOG_BYTES).
        self.backlog: deque[tuple[NetHdr, bytes]] = deque()
        self.backlog_bytes = 0
        self._flush_timer: Any = None
        self._device: Any = None  # the NetDevice (its ``active``)

    def attach(self, sink: FrameSink) -> None:
        """The port's device."""
        super().attach(sink)
        self._device = sink

    def deliver(self, hdr: NetHdr, frame: bytes | memoryview) -> bool | None:
        """Hand a frame to the driver, or queue it while the driver has no free
        receive buffer (then and while older frames wait): True delivered or queued,
        False dropped by the device (counted there), None: the backlog is full."""
        sink = self.sink
        if sink is None:
            return None
        if not self.backlog and (sink.rx_buffers_available() or not self._device.active):
            return sink.receive(hdr, frame)  # no driver attached: dropped, counted there
        if (
            len(self.backlog) >= RING_BACKLOG_FRAMES
            or self.backlog_bytes + len(frame) > RING_BACKLOG_BYTES
        ):
            return None
        self.backlog.append((hdr, bytes(frame)))
        self.backlog_bytes += len(frame)
        self.count("ring_backlogged")
        return True

    def resume_rx(self) -> None:
        """The driver posted receive buffers after having none: deliver the backlog
        (from the loop, right after the drain that took the buffers)."""
        if self.backlog and self._flush_timer is None and self.sink is not None:
            self._flush_timer = self.sink.call_later(0.0, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        sink = self.sink
        backlog = self.backlog
        while backlog and sink is not None and sink.rx_buffers_available():
            hdr, frame = backlog.popleft()  # bounded: the backlog's length
            self.backlog_bytes -= len(frame)
            sink.receive(hdr, frame)

    def reset(self) -> None:
        """The port's driver is gone: the frames waiting for it are dropped."""
        if self.backlog:
            self.count("ring_backlog_dropped_reset", len(self.backlog))
        self.backlog.clear()
        self.backlog_bytes = 0

    def offloads(self) -> frozenset[str]:
        """Offloaded frames cross as they are (a receiving device shapes them)."""
        return OFFLOADS

    def send(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """Switch one frame the port's driver sent."""
        return self._server.from_ring(self.number, hdr, frame)


@dataclass(slots=True)
class RingPort:
    """One ring port: a virtio-net device served by the switch process itself, at
    ``endpoint``, for one kernel at a time to attach to (``kernel.Attach(endpoint)``)."""

    number: int
    endpoint: str
    mac: bytes
    device: Any  # vdev.net.NetDevice
    runtime: Any  # vdev.runtime.DeviceRuntime (hosted by the switch's loop)


class _TapSink:
    """The switch as the :class:`~vdev.netbackend.FrameSink` of its TAP port."""

    def __init__(self, server: SwitchServer, number: int) -> None:
        self._server = server
        self.number = number
        self.link_up = True

    def receive(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        return self._server.from_tap(self.number, hdr, frame)

    def rx_buffers_available(self) -> bool:
        return True  # the switch drops for full ports instead of holding frames back

    def set_link(self, up: bool) -> None:
        self.link_up = up

    def watch(self, source: Any, callback: Callable[[], None]) -> None:
        self._server.loop.watch(source, callback)

    def unwatch(self, source: Any) -> None:
        self._server.loop.unwatch(source)

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Any:
        return self._server.loop.call_later(delay_s, callback)

    def count(self, name: str, n: int = 1) -> None:
        c = self._server.tap_counters
        c[name] = c.get(name, 0) + n


class SwitchServer:
    """The switch process's loop around a :class:`SwitchCore` (see the module doc).

    ``run()`` blocks until :meth:`stop` (or SIGTERM/SIGINT when ``signals=True``) and
    returns the exit status. ``budget`` bounds the messages handled per wake-up.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        age_s: float = DEFAULT_AGE_S,
        max_macs: int = DEFAULT_MAX_MACS,
        max_ports: int = DEFAULT_MAX_PORTS,
        hwm: int = DEFAULT_HWM,
        tap: str | None = None,
        budget: int = 256,
        log: Any = None,
        impair: Impairment | None = None,
        ring_ports: int = 0,
        ring_mtu: int = 1500,
    ) -> None:
        self.core = SwitchCore(age_s=age_s, max_macs=max_macs, max_ports=max_ports)
        self.impair = impair
        self._held: tuple[tuple[int, ...], bool, NetHdr | None, Any, Any] | None = None
        self.rings: list[RingPort] = []
        self._held_timer: TimerHandle | None = None
        self.endpoint = endpoint
        self.budget = max(1, budget)
        self.loop = EventLoop()
        self._log_file = log if log is not None else sys.stderr
        self._links: dict[int, _Link] = {}
        self._by_peer: dict[bytes, int] = {}
        self._pid_watches: dict[int, PeerProcess] = {}
        self._pending_stats: list[tuple[bytes, int, int, float]] = []
        self._stats_timer: TimerHandle | None = None
        self._age_timer: TimerHandle | None = None
        self.tap_counters: dict[str, int] = {}
        self._parent: ParentWatch | None = None
        self._hub: FrameHub | None = None
        self._tap_backend: Any = None
        try:
            self._hub = FrameHub(endpoint, hwm=hwm)
            self.loop.watch(self._hub, self._on_hub)
            if tap is not None:
                self._open_tap(tap)
            for i in range(ring_ports):
                self._open_ring(i, ring_mtu)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ life cycle
    def run(self, *, signals: bool = False) -> int:
        """Serve until stopped; returns 0. ``signals``: SIGTERM stops the loop (and the
        loop's waker becomes the signal wake-up fd), and the launching process's death
        too (``VLAB_PARENT_FD``). Main thread only for ``signals``."""
        undo_term: Callable[[], None] = _noop
        undo_wake: Callable[[], None] = _noop
        if signals:
            undo_term = on_terminate(self.stop, exit=False)
            undo_wake = wake_on_signals(self.loop.waker)
            self._parent = ParentWatch.from_env()
            if self._parent is not None:
                self.loop.watch(self._parent, self._on_parent)
        self._log(f"listening on {self.endpoint}")
        self._arm_ageing()
        try:
            self.loop.run()
        finally:
            undo_wake()
            undo_term()
        return 0

    def stop(self) -> None:
        """Ask :meth:`run` to return (signal-handler and thread safe)."""
        self.loop.stop()

    def close(self) -> None:
        """Close the hub (removing its socket file), the TAP and every watch.
        Idempotent."""
        self._held = None
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        for ring in self.rings:
            ring.runtime.close()  # its device, memory, control socket and doorbells
        self.rings.clear()
        for number in list(self._links):
            self._drop_link(number)
        for w in self._pid_watches.values():
            w.close()
        self._pid_watches.clear()
        if self._tap_backend is not None:
            tap, self._tap_backend = self._tap_backend, None
            try:
                tap.close()
            except OSError:
                pass
        if self._hub is not None:
            hub, self._hub = self._hub, None
            self.loop.unwatch(hub)
            hub.close()
        if self._parent is not None:
            parent, self._parent = self._parent, None
            self.loop.unwatch(parent)
            parent.close()
        self.loop.close()

    def _on_parent(self) -> None:
        if self._parent is not None and self._parent.parent_gone():
            self._log("the launching process is gone: exiting")
            self.stop()
        elif self._parent is not None:
            self.loop.unwatch(self._parent)

    def _log(self, msg: str) -> None:
        try:
            print(f"switch: {msg}", file=self._log_file, flush=True)
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ the hub
    def _on_hub(self) -> None:
        hub = self._hub
        if hub is None:
            return
        for _ in range(self.budget):
            got = hub.recv()
            if got is None:
                if not hub.readable():
                    return
                continue  # a malformed message was skipped
            peer, msg = got
            buf = msg.buffer
            if not len(buf):
                self.core.counters.malformed += 1
                continue
            kind = buf[0]
            if kind == _K_FRAME:
                self._on_frame(peer, msg, buf)
            elif kind == _K_BATCH:
                self._on_batch(peer, msg, buf)
            elif kind == _K_HELLO:
                self._on_hello(peer, bytes(buf[1:]))
            elif kind == _K_STATS:
                self._on_stats(peer, bytes(buf[1:]))
            elif kind == _K_BYE:
                number = self._by_peer.get(peer)
                if number is not None:
                    self._remove(number, "said bye")
            else:
                self.core.counters.malformed += 1

    def _on_frame(self, peer: bytes, msg: Part, buf: memoryview) -> None:
        number = self._by_peer.get(peer)
        core = self.core
        if number is None:
            core.counters.frames += 1
            core.counters.unregistered += 1
            core.counters.dropped += 1
            assert self._hub is not None
            self._hub.send(peer, KIND_REGISTER)
            return
        if len(buf) < _FRAME_AT:
            core.count_bad(number, "bad_hdr")
            return
        frame = buf[_FRAME_AT:]
        hdr: NetHdr | None = None
        if buf[1] or buf[2]:  # flags or gso_type: an offloaded frame, check it
            hdr = NetHdr.unpack(buf, 1)
            if check_hdr(hdr, len(frame)) is not None:
                core.count_bad(number, "bad_hdr")
                return
        outs, flooded = core.decide(number, frame)
        if outs:
            if self.impair is None:
                self._deliver(outs, flooded, hdr, msg, frame)
            else:
                self._impaired(outs, flooded, hdr, msg, frame)

    def _on_batch(self, peer: bytes, msg: Part, buf: memoryview) -> None:
        """A batch message: every record is decided as a frame message would be; what
        goes to a port that takes batches is gathered into one message per port (the
        received message itself, not copied, when a port gets every record unchanged);
        other ports get frame messages one by one."""
        number = self._by_peer.get(peer)
        core = self.core
        hub = self._hub
        assert hub is not None
        if number is None:
            core.counters.frames += 1
            core.counters.unregistered += 1
            core.counters.dropped += 1
            hub.send(peer, KIND_REGISTER)
            return
        links = self._links
        ports = core.ports
        gathered: dict[int, list[tuple[int, bool, memoryview | bytes]]] = {}
        total = len(buf)
        off = 1
        records = 0
        intact = True  # every record was well-formed (the message may be relayed as is)
        headers: dict[bytes, NetHdr] = {}  # at most BATCH_MAX_FRAMES entries
        last_head = b""
        outs: tuple[int, ...] = ()
        flooded = False
        for _ in range(BATCH_MAX_FRAMES):  # bounded: a batch holds at most this many
            if off >= total:
                break
            if total - off < BATCH_RECORD:
                core.count_bad(number, "malformed")
                intact = False
                break
            flen = int.from_bytes(buf[off : off + 4], "little")
            end = off + BATCH_RECORD + flen
            if end > total:  # the record's length runs past the message
                core.count_bad(number, "malformed")
                intact = False
                break
            records += 1
            rec = buf[off:end]
            frame = buf[off + BATCH_RECORD : end]
            hdr: NetHdr | None = None
            if buf[off + 4] or buf[off + 5]:  # flags or gso_type: check it (§5.1.6.2.1)
                hb = bytes(buf[off + 4 : off + BATCH_RECORD])
                hdr = headers.get(hb)  # a stream's frames mostly share one header
                if hdr is None:
                    hdr = headers[hb] = NetHdr.unpack(hb)
                if check_hdr(hdr, flen) is not None:
                    core.count_bad(number, "bad_hdr")
                    intact = False
                    off = end
                    continue
            off = end
            head = bytes(frame[:12])
            if head == last_head and ETH_HLEN <= flen <= MAX_FRAME:
                # the same addresses as the frame before, decided an instant ago: the
                # same way (learning and ageing would change nothing in between)
                core.count_again(number, flen, flooded)
            else:
                outs, flooded = core.decide(number, frame)
                last_head = head if outs else b""
            if not outs:
                intact = False
                continue
            if self.impair is not None:
                fmsg = [KIND_FRAME, bytes(rec[4:BATCH_RECORD]), frame]
                self._impaired(outs, flooded, hdr, fmsg, frame)
                continue
            for o in outs:
                link = links.get(o)
                port = ports.get(o)
                if link is None or port is None:
                    continue
                if not link.batch or link.peer is None:
                    fmsg = [KIND_FRAME, bytes(rec[4:BATCH_RECORD]), frame]
                    self._deliver((o,), flooded, hdr, fmsg, frame)
                    continue
                out = gathered.get(o)
                if out is None:
                    out = gathered[o] = []
                if hdr is None or _takes(hdr, port.accepts):
                    out.append((flen, flooded, rec))
                    continue
                pieces = self._adapt(hdr, frame, port.accepts)
                if pieces is None:
                    core.count_drop(o)
                    continue
                for h, piece in pieces:
                    n = len(piece)
                    out.append((n, flooded, b"".join((n.to_bytes(4, "little"), h.pack(), piece))))
        if off < total and intact:  # records beyond the bound: the sender's fault
            core.count_bad(number, "malformed")
            intact = False
        for o, out in gathered.items():
            link = links.get(o)
            if link is None or link.peer is None or not out:
                continue
            whole = intact and len(out) == records and all(type(r) is memoryview for *_, r in out)
            m: Part | list[bytes | memoryview] = (
                msg if whole else [KIND_BATCH, *(r for *_, r in out)]
            )
            status = hub.send(link.peer, m)
            if status is SendStatus.SENT:
                for n, flooded, _r in out:
                    core.count_tx(o, n, flooded)
            elif status is SendStatus.FULL:
                for _ in out:
                    core.count_full(o)
            else:
                self._remove(o, "connection gone")

    def _impaired(
        self,
        outs: tuple[int, ...],
        flooded: bool,
        hdr: NetHdr | None,
        msg: Part | list[Any] | None,
        frame: bytes | memoryview,
    ) -> None:
        """:meth:`_deliver` through the :class:`Impairment` (see the module doc)."""
        assert self.impair is not None
        c = self.core.counters
        fate = self.impair.draw()
        if fate == LOSE:
            c.impaired_lost += 1
            return
        if fate == REORDER and self._held is None:
            c.impaired_reordered += 1
            self._held = (outs, flooded, hdr, msg, frame)
            self._held_timer = self.loop.call_later(REORDER_HOLD_S, self._release_held)
            return
        self._deliver(outs, flooded, hdr, msg, frame)
        if fate == DUP:
            c.impaired_dup += 1
            self._deliver(outs, flooded, hdr, msg, frame)
        self._release_held()

    def _release_held(self) -> None:
        """Forward the frame held back for reordering, if any."""
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        held, self._held = self._held, None
        if held is not None:
            self._deliver(*held)

    def _deliver(
        self,
        outs: tuple[int, ...],
        flooded: bool,
        hdr: NetHdr | None,
        msg: Part | list[Any] | None,
        frame: bytes | memoryview,
    ) -> None:
        """Send one frame to ``outs``: ``msg`` is the whole frame message as received
        (forwarded as it is; or its parts, from a batch), ``hdr`` its header (None: a
        plain header)."""
        core = self.core
        n = len(frame)
        adapted: dict[frozenset[str], list[tuple[NetHdr, bytes | memoryview]] | None] = {}
        # (filled only for ports that need a frame finished; once per kind of port)
        for o in outs:
            link = self._links.get(o)
            port = core.ports.get(o)
            if link is None or port is None:
                continue
            if hdr is None or _takes(hdr, port.accepts):
                if link.peer is not None:
                    if msg is None:  # from a ring port: the message is made once, here
                        msg = [KIND_FRAME, (hdr or _PLAIN).pack(), frame]
                    self._send(o, link.peer, msg, n, flooded)
                else:
                    self._send_local(o, link, hdr or _PLAIN, frame, flooded)
                continue
            if port.accepts not in adapted:
                adapted[port.accepts] = self._adapt(hdr, frame, port.accepts)
            pieces = adapted[port.accepts]
            if pieces is None:
                core.count_drop(o)
                continue
            for h, piece in pieces:
                if link.peer is not None:
                    out = [KIND_FRAME, h.pack(), piece]
                    if not self._send(o, link.peer, out, len(piece), flooded):
                        break
                else:
                    self._send_local(o, link, h, piece, flooded)

    def _adapt(
        self, hdr: NetHdr, frame: bytes | memoryview, accepts: frozenset[str]
    ) -> list[tuple[NetHdr, bytes | memoryview]] | None:
        from vdev.virtio.packet import PacketError

        try:
            pieces = adapt_frame(hdr, frame, accepts)
        except PacketError:
            self.core.counters.offload_errors += 1
            return None
        if hdr.gso_type & ~GSO_ECN == GSO_TCPV4 and "tso4" not in accepts:
            self.core.counters.segmented += 1
        elif hdr.flags & HDR_F_NEEDS_CSUM and "csum" not in accepts:
            self.core.counters.checksummed += 1
        return pieces

    def _send(
        self,
        number: int,
        peer: bytes,
        msg: Part | Sequence[bytes | memoryview],
        n: int,
        flooded: bool,
    ) -> bool:
        hub = self._hub
        assert hub is not None
        status = hub.send(peer, msg)
        if status is SendStatus.SENT:
            self.core.count_tx(number, n, flooded)
            return True
        if status is SendStatus.FULL:
            self.core.count_full(number)
            return False
        self._remove(number, "connection gone")
        return False

    def _send_local(
        self, number: int, link: _Link, hdr: NetHdr, frame: bytes | memoryview, flooded: bool
    ) -> None:
        if link.ring is not None:
            took = link.ring.deliver(hdr, frame)
            if took is None:
                self.core.count_full(number)
            elif took:
                self.core.count_tx(number, len(frame), flooded)
            else:  # refused by the device (link down, over its MTU: counted there)
                self.core.count_drop(number)
            return
        if link.local is not None and link.local(hdr, frame):
            self.core.count_tx(number, len(frame), flooded)
        else:
            self.core.count_full(number)

    def from_tap(self, number: int, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """A frame read from the TAP port (called by its backend through the sink)."""
        core = self.core
        offloaded = bool(hdr.flags or hdr.gso_type)
        if offloaded and check_hdr(hdr, len(frame)) is not None:
            core.count_bad(number, "bad_hdr")
            return False
        outs, flooded = core.decide(number, frame)
        if not outs:
            return False
        hub = self._hub
        assert hub is not None
        # one copy out of the backend's reusable read buffer, shared by every send
        msg = hub.part(b"".join((KIND_FRAME, hdr.pack(), frame)))
        args = (outs, flooded, hdr if offloaded else None, msg, msg.buffer[_FRAME_AT:])
        if self.impair is None:
            self._deliver(*args)
        else:
            self._impaired(*args)
        return True

    # ------------------------------------------------------------------ ports
    def _on_hello(self, peer: bytes, payload: bytes) -> None:
        hub = self._hub
        assert hub is not None
        core = self.core
        try:
            name, mac, accepts, pid = decode_hello(payload)
        except ValueError as e:
            core.counters.ports_refused += 1
            hub.send(peer, [KIND_ERROR, str(e).encode()])
            return
        number = self._by_peer.get(peer)
        if number is not None:
            core.update_port(number, name=name, mac=mac, accepts=accepts)
            link = self._links.get(number)
            if link is not None:
                link.batch = BATCH in accepts
        else:
            try:
                port = core.add_port(
                    name or f"port{core.counters.ports_added + 1}",
                    mac=mac,
                    accepts=accepts,
                    pid=pid,
                )
            except SwitchFull as e:
                hub.send(peer, [KIND_ERROR, str(e).encode()])
                return
            number = port.number
            self._links[number] = _Link(peer=peer, batch=BATCH in accepts)
            self._by_peer[peer] = number
            self._watch_pid(number, pid)
            mac_text = format_mac(mac) if mac else "-"
            self._log(f"port {number} ({port.name}, mac {mac_text}, pid {pid}) attached")
        welcome = {"v": PROTOCOL_VERSION, "port": number, "switch_pid": os.getpid()}
        hub.send(peer, [KIND_WELCOME, msgpack.packb(welcome)])
        self._answer_stats()

    def _watch_pid(self, number: int, pid: int) -> None:
        if pid == 0:
            self.core.counters.unwatched_ports += 1
            return
        w = self._pid_watches.get(pid)
        if w is None:
            w = PeerProcess.open(pid)
            if w is None:
                self.core.counters.unwatched_ports += 1
                return
            self._pid_watches[pid] = w
            self.loop.watch(w, lambda: self._on_pid_exit(pid))
        self._links[number].watch = w

    def _on_pid_exit(self, pid: int) -> None:
        w = self._pid_watches.pop(pid, None)
        if w is not None:
            self.loop.unwatch(w)
            w.close()
        for number, port in list(self.core.ports.items()):
            link = self._links.get(number)
            if port.pid == pid and link is not None and link.peer is not None:
                self._remove(number, f"process {pid} exited")

    def _remove(self, number: int, why: str) -> None:
        port = self.core.remove_port(number)
        self._drop_link(number)
        if port is not None:
            self._log(f"port {number} ({port.name}) removed: {why}")
            self._answer_stats()

    def _drop_link(self, number: int) -> None:
        link = self._links.pop(number, None)
        if link is None:
            return
        if link.peer is not None:
            self._by_peer.pop(link.peer, None)
        w = link.watch
        if w is not None and not any(x.watch is w for x in self._links.values()):
            for pid, pw in list(self._pid_watches.items()):
                if pw is w:
                    del self._pid_watches[pid]
            self.loop.unwatch(w)
            w.close()

    def _open_tap(self, ifname: str) -> None:
        from vdev.net_tap import TapBackend

        backend = TapBackend(ifname)
        self._tap_backend = backend
        port = self.core.add_port(f"tap:{ifname}", accepts=backend.offloads(), pid=os.getpid())
        self._links[port.number] = _Link(local=backend.send)
        backend.attach(_TapSink(self, port.number))
        backend.set_rx_offloads(OFFLOADS)

    def _open_ring(self, index: int, mtu: int) -> None:
        """Ring port ``index``: a virtio-net device served by this process at
        ``<listen endpoint>.ring<index>`` (see "Ring ports" in the module doc)."""
        from vdev.net import NetDevice
        from vdev.runtime import DeviceRuntime

        endpoint = f"{self.endpoint}.ring{index}"
        # locally administered, unicast, from the endpoint: a switch restarted on the
        # same endpoint gives its ports the MACs the attached kernels already use
        mac = bytes((0x02, 0x76, 0x6C)) + hashlib.sha256(endpoint.encode()).digest()[:3]
        port = self.core.add_port(f"ring{index}", mac=mac, accepts=OFFLOADS, pid=os.getpid())
        backend = _RingBackend(self, port.number)
        device = NetDevice(backend, mac=mac, mtu=mtu)
        self._links[port.number] = _Link(ring=backend)
        runtime = DeviceRuntime(
            device,
            endpoint,
            watch_parent=False,
            log=self._log_file,
            shm_by_name=True,
            poll_us=0,
            host=self.loop,
        )
        self.rings.append(RingPort(port.number, endpoint, mac, device, runtime))
        runtime.start()
        self._log(f"ring port {port.number} (mac {format_mac(mac)}) on {endpoint}")

    def from_ring(self, number: int, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """A frame the driver of ring port ``number`` sent (already checked by its
        device, §5.1.6.2.1); ``frame`` may be a view of the driver's transmit buffer,
        valid until this returns: a ring port gets it copied straight into its
        driver's receive buffer, a ZeroMQ port as a message made once."""
        outs, flooded = self.core.decide(number, frame)
        if not outs:
            return False
        offloaded = hdr if hdr.flags or hdr.gso_type else None
        if self.impair is None:
            self._deliver(outs, flooded, offloaded, None, frame)
        else:  # a frame held back for reordering outlives the driver's buffer
            self._impaired(outs, flooded, offloaded, None, bytes(frame))
        return True

    # ------------------------------------------------------------------ ageing
    def _arm_ageing(self) -> None:
        """Sweep the MAC table when its oldest entry expires (at most every second)."""
        t = self.core.table
        t.expire()
        nxt = t.next_expiry()
        delay = t.age_s if nxt is None else max(1.0, nxt - monotonic())
        self._age_timer = self.loop.call_later(delay, self._arm_ageing)

    # ------------------------------------------------------------------ stats
    def _on_stats(self, peer: bytes, payload: bytes) -> None:
        hub = self._hub
        assert hub is not None
        seq, after, timeout = 0, None, 0.0
        if payload:
            try:
                req = msgpack.unpackb(payload, raw=False)
                seq = int(req.get("seq", 0))
                after = req.get("after")
                timeout = float(req.get("timeout", 0.0))
            except Exception:
                self.core.counters.malformed += 1
                return
        if (
            isinstance(after, int)
            and after >= self.core.generation
            and len(self._pending_stats) < _MAX_PENDING_STATS
        ):
            deadline = monotonic() + min(max(timeout, 0.0), _MAX_STATS_WAIT_S)
            self._pending_stats.append((peer, seq, after, deadline))
            self._arm_stats_timer()
            return
        self._reply_stats(peer, seq)

    def _reply_stats(self, peer: bytes, seq: int) -> None:
        assert self._hub is not None
        st = self.stats()
        self._hub.send(peer, [KIND_STATS_REPLY, msgpack.packb({"seq": seq, "stats": st})])

    def stats(self) -> dict[str, Any]:
        """The core's statistics plus the TAP backend's counters."""
        st = self.core.stats()
        st["tap"] = dict(self.tap_counters)
        st["rings"] = [
            {
                "port": r.number,
                "endpoint": r.endpoint,
                "mac": format_mac(r.mac),
                "attached": r.runtime.driver_ok,
                "kernels_gone": r.runtime.counters["kernels_gone"],
                "device": r.device.metrics.snapshot(),
            }
            for r in self.rings
        ]
        st["impair"] = self.impair.describe() if self.impair is not None else None
        st["switch"]["callback_errors"] = self.loop.callback_errors
        if self._hub is not None:  # messages of more than one part, dropped by the hub
            st["switch"]["malformed"] += self._hub.malformed
        return st

    def _answer_stats(self) -> None:
        """Answer deferred stats requests whose generation has passed or timed out."""
        if not self._pending_stats:
            return
        now = monotonic()
        gen = self.core.generation
        keep = []
        for peer, seq, after, deadline in self._pending_stats:
            if gen > after or now >= deadline:
                self._reply_stats(peer, seq)
            else:
                keep.append((peer, seq, after, deadline))
        self._pending_stats = keep
        self._arm_stats_timer()

    def _arm_stats_timer(self) -> None:
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
        if self._pending_stats:
            first = min(d for _, _, _, d in self._pending_stats)
            self._stats_timer = self.loop.call_later(first - monotonic(), self._answer_stats)


def _takes(hdr: NetHdr, accepts: frozenset[str]) -> bool:
    """Whether a port accepting ``accepts`` takes ``hdr``'s frame unchanged."""
    if hdr.gso_type & ~GSO_ECN:
        return "tso4" in accepts
    return "csum" in accepts if hdr.flags & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) else True


def _noop() -> None:
    return None


# ===================================================================== client


class SwitchClient:
    """Ask a running switch for its statistics (a connection of its own, not a port).

    ``stats()`` returns at once; ``wait(predicate)`` waits for a port change that
    makes ``predicate(stats)`` true, without polling: it asks the switch to answer only
    once its ``generation`` has moved on."""

    def __init__(self, endpoint: str) -> None:
        self._port = FramePort(endpoint, monitor=False)
        self._seq = 0

    def stats(self, *, after: int | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
        """The switch's statistics (see :meth:`SwitchCore.stats`). With ``after``, the
        switch answers once its generation exceeds ``after`` (or after ``timeout_s``).
        TimeoutError if no answer arrives in ``timeout_s`` (+1 s)."""
        self._seq += 1
        seq = self._seq
        req = {"seq": seq, "after": after, "timeout": timeout_s}
        if not self._port.send([KIND_STATS, msgpack.packb(req)]):
            raise TimeoutError(f"switch at {self._port.endpoint} is not accepting requests")
        deadline = monotonic() + timeout_s + 1.0
        while True:
            remaining = deadline - monotonic()
            if remaining <= 0 or not self._port.wait(remaining):
                raise TimeoutError(f"no stats from the switch at {self._port.endpoint}")
            msg = self._port.recv()
            if msg is None or msg.bytes[:1] != KIND_STATS_REPLY:
                continue
            body = msgpack.unpackb(msg.bytes[1:], raw=False)
            if body.get("seq") == seq:
                st: dict[str, Any] = body["stats"]
                return st

    def wait(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """Stats once ``predicate(stats)`` holds after a port change; TimeoutError."""
        deadline = monotonic() + timeout_s
        st = self.stats()
        while not predicate(st):
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise TimeoutError(f"switch state never matched; last: {st['switch']}")
            st = self.stats(after=st["switch"]["generation"], timeout_s=remaining)
        return st

    def close(self) -> None:
        """Close the connection."""
        self._port.close()

    def __enter__(self) -> SwitchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ===================================================================== command line

PROG = "python -m vdev.switch"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return v


def _bounded_int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is not in {lo}..{hi}")
        return v

    return parse


def _endpoint(text: str) -> str:
    path = text[len("ipc://") :] if text.startswith("ipc://") else ""
    if not path:
        raise argparse.ArgumentTypeError(f"not an ipc:// endpoint: {text!r}")
    if len(os.fsencode(path)) >= 107:
        raise argparse.ArgumentTypeError(f"socket path is too long for a Unix socket: {path!r}")
    return text


def _ifname(text: str) -> str:
    if (
        not 1 <= len(text.encode()) <= 15
        or "/" in text
        or text in (".", "..")
        or any(c.isspace() for c in text)
    ):
        raise argparse.ArgumentTypeError(f"not an interface name (1-15 chars): {text!r}")
    return text


def _impairment(text: str) -> Impairment:
    try:
        return parse_impairment(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line."""
    p = _Parser(prog=prog, description="Run the virtio-lab L2 learning switch.")
    p.add_argument(
        "--listen",
        required=True,
        metavar="ENDPOINT",
        type=_endpoint,
        help="ipc:// endpoint the ports connect to",
    )
    p.add_argument(
        "--age",
        type=_positive_float,
        default=DEFAULT_AGE_S,
        metavar="SECONDS",
        help=f"forget a MAC not seen for this long (default {DEFAULT_AGE_S:g})",
    )
    p.add_argument(
        "--max-macs",
        type=_bounded_int(1, 1 << 20),
        default=DEFAULT_MAX_MACS,
        metavar="N",
        help=f"MAC table size (default {DEFAULT_MAX_MACS})",
    )
    p.add_argument(
        "--max-ports",
        type=_bounded_int(1, 4096),
        default=DEFAULT_MAX_PORTS,
        metavar="N",
        help=f"most ports at once (default {DEFAULT_MAX_PORTS})",
    )
    p.add_argument(
        "--hwm",
        type=_bounded_int(1, 1 << 20),
        default=DEFAULT_HWM,
        metavar="N",
        help=f"frames queued per port and direction (default {DEFAULT_HWM})",
    )
    p.add_argument(
        "--tap",
        type=_ifname,
        metavar="IFNAME",
        help="also switch to the Linux TAP interface IFNAME (root)",
    )
    p.add_argument(
        "--impair",
        type=_impairment,
        metavar="loss=P,dup=P,reorder=P,seed=N",
        help="lose, duplicate and reorder forwarded frames with these probabilities "
        "(seeded; for tests)",
    )
    p.add_argument(
        "--ring-ports",
        type=_bounded_int(0, 64),
        default=0,
        metavar="N",
        help="serve N virtio-net devices in this process, at ENDPOINT.ring0 ... for "
        "kernels to attach to (kernel.Attach): frames go ring to ring, no device process",
    )
    p.add_argument(
        "--ring-mtu",
        type=_bounded_int(68, 65535),
        default=1500,
        metavar="N",
        help="the MTU of the ring ports' devices (default 1500)",
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Run the switch; the exit status (0 after SIGTERM/SIGINT, 2 for bad usage, 1 for
    a failure while running). ``prog`` names the command in messages."""
    debug = os.environ.get("VLAB_DEBUG") == "1"
    try:
        args = build_parser(prog).parse_args(argv)
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    try:
        server = SwitchServer(
            args.listen,
            age_s=args.age,
            max_macs=args.max_macs,
            max_ports=args.max_ports,
            hwm=args.hwm,
            tap=args.tap,
            impair=args.impair,
            ring_ports=args.ring_ports,
            ring_mtu=args.ring_mtu,
        )
    except TapError as e:
        if debug:
            raise
        print(f"{prog}: {e.strerror or e}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug:
            raise
        print(f"{prog}: cannot listen on {args.listen}: {e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(f"{prog}: cannot listen on {args.listen}: {e}", file=sys.stderr)
        return 2
    status = 0
    try:
        status = server.run(signals=True)
    except KeyboardInterrupt:
        status = 0
    except Exception as e:
        if debug:
            raise
        print(f"{prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        status = 1
    finally:
        try:
            final = server.stats()
        except Exception:
            final = {}
        server.close()
    try:
        print(json.dumps(final, separators=(",", ":")), flush=True)
    except (OSError, ValueError):
        pass
    return status


if __name__ == "__main__":
    sys.exit(main())
