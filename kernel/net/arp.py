"""ARP (RFC 826): resolving next-hop IPv4 addresses to MAC addresses, one table per link.

Theory of operation
-------------------
An entry (a *neighbour*) is in one of three states:

``incomplete``
    A request went out; packets for the address wait in a bounded queue
    (``arp_queue_len``; beyond it the oldest is dropped and counted
    ``arp_queue_dropped``). The request is repeated every ``arp_retry_s`` until
    ``arp_tries`` were sent; if no answer came ``arp_retry_s`` after the last one the
    entry becomes ``failed`` (``arp_failed``): the waiting packets are dropped
    (``arp_unresolved_dropped``) and each is reported to its sender as a local
    *host unreachable* error — Linux reports a failed resolution the same way
    (``arp_error_report`` sends itself ICMP host unreachable), so a *connected* UDP
    socket's next ``send``/``recv`` fails with EHOSTUNREACH and a ``ping`` raises it.
``failed``
    For ``arp_failed_hold_s`` every send to the address fails at once with
    ``OSError(EHOSTUNREACH)`` (connected or not, nothing is queued, no request is
    sent); then the entry is dropped and the next send starts a new resolution. An
    ARP packet from the address during the hold resolves it.
``reachable``
    The MAC is known; it is used for ``arp_reachable_s`` after the last ARP packet
    from that host, then the entry is dropped (``arp_expired``) and resolved again
    on the next send.

Reception follows RFC 826's "Packet Reception" algorithm: an entry that already exists
for the sender's protocol address is updated with the sender's hardware address (the
*merge*); if the target protocol address is ours, a new entry is added (learning from
requests addressed to us, and from replies to ours), and a request is answered. So a
gratuitous ARP (sender = target address) refreshes an entry we have and creates none.
An ARP packet that claims *our* address from another MAC never touches the table; it is
counted ``arp_conflict``. Packets with a multicast/broadcast sender MAC or sender
address, or with hardware/protocol types and lengths other than Ethernet/IPv4, are
dropped (``arp_bad``).

The table holds at most ``arp_max_entries`` entries; a new one evicts the oldest
(``arp_evicted``, its queue counted in ``arp_queue_dropped``).

Every method runs with the stack lock held and never transmits: what must be sent (ARP
frames, queued packets once resolved, error reports) is appended to ``out`` as
callables that the stack runs after releasing the lock. Timers come from the stack's
:class:`~hostops.timers.TimerHeap`; a generation number in each entry makes a timer
that fires after its entry changed a no-op.
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from hostops.timers import TimerHandle, TimerHeap

from ..errors import io_error
from .addr import (
    BROADCAST_MAC,
    LIMITED_BROADCAST,
    ZERO_MAC,
    ip_bytes,
    ip_ntoa,
    is_multicast,
    mac_str,
)
from .config import StackConfig
from .ether import ETH_P_ARP, ETH_P_IP, build_frame
from .iface import Interface

__all__ = [
    "ArpTable",
    "ArpEntry",
    "ArpHost",
    "ARP_PKT",
    "ARP_REQUEST",
    "ARP_REPLY",
    "INCOMPLETE",
    "REACHABLE",
    "FAILED",
    "arp_packet",
]

#: hrd, pro, hln, pln, op, sha, spa, tha, tpa (RFC 826 "Packet format").
ARP_PKT = struct.Struct("!HHBBH6s4s6s4s")
ARP_HRD_ETHER = 1
ARP_REQUEST = 1
ARP_REPLY = 2

INCOMPLETE = "incomplete"
REACHABLE = "reachable"
FAILED = "failed"

#: Something to run once the stack lock is released.
Deferred = Callable[[], None]


class ArpHost(Protocol):
    """What an :class:`ArpTable` needs from the stack."""

    @property
    def timers(self) -> TimerHeap:
        """The kernel's timer heap."""
        ...

    @property
    def config(self) -> StackConfig:
        """The tunables."""
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add to a counter."""
        ...

    def run_locked(self, fn: Callable[[list[Deferred]], None]) -> None:
        """Run ``fn(out)`` under the stack lock, then the deferred calls in ``out``."""
        ...

    def tx_frame_quiet(self, iface: Interface, frame: bytes) -> None:
        """Transmit a frame the stack generated (errors are counted)."""
        ...

    def send_resolved(self, iface: Interface, mac: bytes, item: Any) -> None:
        """Transmit a packet that waited for ``mac``."""
        ...

    def resolution_failed(self, iface: Interface, item: Any) -> None:
        """Report a packet dropped because its next hop did not answer."""
        ...


@dataclass(frozen=True, slots=True)
class ArpEntry:
    """One entry as :meth:`ArpTable.entries` shows it."""

    ip: str
    mac: str | None
    state: str
    queued: int


class _Neighbour:
    __slots__ = ("ip", "mac", "state", "queue", "tries", "timer", "gen")

    def __init__(self, ip: int, state: str) -> None:
        self.ip = ip
        self.mac: bytes | None = None
        self.state = state
        self.queue: deque[Any] = deque()
        self.tries = 0
        self.timer: TimerHandle | None = None
        self.gen = 0


def arp_packet(op: int, sha: bytes, spa: int, tha: bytes, tpa: int) -> bytes:
    """An Ethernet/IPv4 ARP packet (28 bytes)."""
    return ARP_PKT.pack(ARP_HRD_ETHER, ETH_P_IP, 6, 4, op, sha, ip_bytes(spa), tha, ip_bytes(tpa))


class ArpTable:
    """The neighbour table of one interface (see the module docstring)."""

    def __init__(self, host: ArpHost, iface: Interface) -> None:
        self._host = host
        self._iface = iface
        self._table: dict[int, _Neighbour] = {}

    # -- sending
    def output(self, next_hop: int, item: Any, out: list[Deferred]) -> bytes | None:
        """The MAC of ``next_hop``, or None when ``item`` was queued until it is
        resolved. ``OSError(EHOSTUNREACH)`` while a failed resolution is held."""
        nb = self._table.get(next_hop)
        if nb is None:
            nb = self._new(next_hop, INCOMPLETE)
            nb.queue.append(item)
            nb.tries = 1
            self._request(next_hop, out)
            self._arm(nb, self._host.config.arp_retry_s)
            return None
        if nb.state == REACHABLE:
            return nb.mac
        if nb.state == INCOMPLETE:
            if len(nb.queue) >= self._host.config.arp_queue_len:
                nb.queue.popleft()
                self._host.count("arp_queue_dropped")
            nb.queue.append(item)
            return None
        self._host.count("arp_hold_refused")
        raise io_error(errno.EHOSTUNREACH, f"{ip_ntoa(next_hop)} did not answer ARP")

    # -- receiving
    def input(self, data: bytes | memoryview, out: list[Deferred]) -> None:
        """One received ARP packet (the Ethernet payload)."""
        host, iface = self._host, self._iface
        if len(data) < ARP_PKT.size:
            host.count("arp_bad")
            return
        hrd, pro, hln, pln, op, sha, spa_b, _tha, tpa_b = ARP_PKT.unpack_from(data)
        # RFC 826 "Packet Reception": the hardware and protocol types must be ours.
        if hrd != ARP_HRD_ETHER or pro != ETH_P_IP or hln != 6 or pln != 4:
            host.count("arp_bad")
            return
        if op not in (ARP_REQUEST, ARP_REPLY):
            host.count("arp_bad")
            return
        spa = int.from_bytes(spa_b, "big")
        tpa = int.from_bytes(tpa_b, "big")
        # A group MAC or address is never a host's (RFC 1812 §3.3.2): never cache one.
        if sha[0] & 1 or is_multicast(spa) or spa == LIMITED_BROADCAST:
            host.count("arp_bad")
            return
        if sha == iface.mac:
            return  # our own packet, reflected
        host.count("arp_received")
        if spa == iface.address:
            # Another host claims our address (RFC 5227 §2.4 conflict): never let it
            # redirect our traffic by poisoning the table.
            host.count("arp_conflict")
            return
        merged = False
        nb = self._table.get(spa) if spa else None
        if nb is not None:
            self._resolved(nb, sha, out)
            merged = True
        if tpa == iface.address:
            if not merged and spa:
                nb = self._new(spa, INCOMPLETE)
                self._resolved(nb, sha, out)
                host.count("arp_learned")
            if op == ARP_REQUEST:
                reply = arp_packet(ARP_REPLY, iface.mac, iface.address, sha, spa)
                frame = build_frame(sha, iface.mac, ETH_P_ARP, reply)
                out.append(partial(host.tx_frame_quiet, iface, frame))
                host.count("arp_replies_sent")

    # -- inspection / shutdown
    def entries(self) -> list[ArpEntry]:
        """Every entry (the caller holds the stack lock)."""
        return [
            ArpEntry(ip_ntoa(n.ip), mac_str(n.mac) if n.mac else None, n.state, len(n.queue))
            for n in self._table.values()
        ]

    def lookup(self, ip: int) -> bytes | None:
        """The MAC of a reachable entry (None otherwise)."""
        nb = self._table.get(ip)
        return nb.mac if nb is not None and nb.state == REACHABLE else None

    def clear(self) -> None:
        """Cancel every timer and forget every entry (queued packets are dropped)."""
        for nb in self._table.values():
            if nb.timer is not None:
                nb.timer.cancel()
        self._table.clear()

    def __len__(self) -> int:
        return len(self._table)

    # -- internals
    def _new(self, ip: int, state: str) -> _Neighbour:
        limit = self._host.config.arp_max_entries
        while len(self._table) >= limit:  # bounded: at most one pass over the table
            oldest = next(iter(self._table.values()))
            self._drop(oldest)
            self._host.count("arp_evicted")
        nb = _Neighbour(ip, state)
        self._table[ip] = nb
        return nb

    def _drop(self, nb: _Neighbour) -> None:
        if nb.timer is not None:
            nb.timer.cancel()
        if nb.queue:
            self._host.count("arp_queue_dropped", len(nb.queue))
            nb.queue.clear()
        del self._table[nb.ip]

    def _resolved(self, nb: _Neighbour, mac: bytes, out: list[Deferred]) -> None:
        was = nb.state
        nb.mac = bytes(mac)
        nb.state = REACHABLE
        nb.tries = 0
        # most recently confirmed last: eviction takes the stalest entry
        del self._table[nb.ip]
        self._table[nb.ip] = nb
        self._arm(nb, self._host.config.arp_reachable_s)
        if was == INCOMPLETE and nb.queue:
            waiting = list(nb.queue)
            nb.queue.clear()
            for item in waiting:
                out.append(partial(self._host.send_resolved, self._iface, nb.mac, item))

    def _request(self, target: int, out: list[Deferred]) -> None:
        iface = self._iface
        pkt = arp_packet(ARP_REQUEST, iface.mac, iface.address, ZERO_MAC, target)
        frame = build_frame(BROADCAST_MAC, iface.mac, ETH_P_ARP, pkt)
        out.append(partial(self._host.tx_frame_quiet, iface, frame))
        self._host.count("arp_requests_sent")

    def _arm(self, nb: _Neighbour, delay: float) -> None:
        if nb.timer is not None:
            nb.timer.cancel()
        nb.gen += 1
        gen = nb.gen
        host = self._host
        nb.timer = host.timers.call_later(
            delay, lambda: host.run_locked(lambda out: self._fire(nb, gen, out))
        )

    def _fire(self, nb: _Neighbour, gen: int, out: list[Deferred]) -> None:
        if self._table.get(nb.ip) is not nb or nb.gen != gen:
            return  # superseded
        host, cfg = self._host, self._host.config
        if nb.state == INCOMPLETE:
            if nb.tries < cfg.arp_tries:
                nb.tries += 1
                self._request(nb.ip, out)
                self._arm(nb, cfg.arp_retry_s)
                return
            nb.state = FAILED
            dropped = list(nb.queue)
            nb.queue.clear()
            host.count("arp_failed")
            host.count("arp_unresolved_dropped", len(dropped))
            self._arm(nb, cfg.arp_failed_hold_s)
            for item in dropped:
                out.append(partial(host.resolution_failed, self._iface, item))
        elif nb.state == REACHABLE:
            nb.timer = None
            del self._table[nb.ip]
            host.count("arp_expired")
        else:  # FAILED: the hold is over
            nb.timer = None
            del self._table[nb.ip]
