"""The kernel's IPv4 stack: interfaces, Ethernet, ARP, IPv4, ICMP, UDP and sockets.

Theory of operation
-------------------
Layers as in a textbook (and as in lwIP or smoltcp)::

    sockets            UdpSocket, TcpSocket (SocketFile)       stack.socket()
    transports         ICMP 1, TCP 6, UDP 17                   register_protocol()
    IPv4               routes, TTL, checksum, fragments, reassembly
    ARP / Ethernet II  one ARP table per interface
    interface          a Link from a driver (MAC, MTU, offloads, carrier)

*Receive* runs on the driver's interrupt thread: ``link → _receive → Ethernet →``
ARP or ``_ip_input → handler.input``. It never blocks and never raises: every bad
frame is dropped and counted in :attr:`Stack.stats`. A frame passes Ethernet if it is
addressed to our MAC or to broadcast (other unicast and multicast is ignored,
``rx_other_mac``); runts and unknown ethertypes count as ``rx_bad_frames``. IPv4 checks
the header (:func:`kernel.net.ipv4.parse_header`), drops a broadcast or multicast
*source* (RFC 1122 §3.2.1.3, ``ip_bad_source``), keeps packets for one of our addresses,
the limited broadcast or the interface's subnet broadcast (this host does not forward:
``ip_not_for_us``), reassembles fragments and hands the packet to the handler registered
for its protocol number — an unknown one counts ``ip_unknown_protocol`` and is answered
with ICMP protocol unreachable.

*Send* (:meth:`Stack.send_ip`, used by the transports) runs on the caller's thread:
route lookup (longest prefix), carrier check, a header with a fresh identification and
the TTL, then the next hop's MAC: broadcast and multicast map directly, our own address
is looped back to our own input (except on a *hairpin* link — ``link.hairpin``, a
loopback wire that hands every frame back — where it goes out on the link to our own
MAC, so that traffic to ourselves really crosses the device), anything else asks the
interface's ARP table (which may queue the packet until the address resolves). A
packet larger than the MTU is fragmented. A transport may leave its checksum partial
(``csum_offset``): if the packet goes out whole on a link with ``tx_csum`` the link gets a
:class:`~kernel.net.link.TxOffload` (csum_start = Ethernet + IP header, csum_offset),
otherwise the checksum is completed in software first (a fragmented packet always).
A TCP packet is never fragmented: one larger than the MTU must come with ``gso_size``
(the MSS) and goes to a link with ``tso4`` and ``tx_csum`` as one super-frame
(:class:`~kernel.net.link.TxOffload` ``gso_size``/``hdr_len``); without them
:meth:`Stack.send_ip` refuses it with EMSGSIZE (TCP then sends MSS-sized segments).

*Errors* of :meth:`send_ip` are ``OSError`` for the caller (ENETUNREACH, ENETDOWN,
EHOSTUNREACH, EMSGSIZE, ENOBUFS, EIO). What the stack sends on its own (ARP, echo
replies, ICMP errors, packets that waited for ARP) uses the quiet path: errors are
counted (``tx_dropped_nobufs``, ``tx_dropped_down``, ``tx_errors``), never raised.

*Concurrency.* One stack lock guards the ARP tables, the reassembly table, routes and
interfaces; UDP has its own lock for its port table and each socket one for its queue.
No lock is held while a frame is transmitted or a handler runs: work that must follow a
locked section (a transmit, a queued packet, an error report) is collected as deferred
calls and run after the lock is released, so a link that delivers synchronously (a
test hub, loopback) can re-enter the stack safely. Timers (ARP retries and expiry,
reassembly timeouts) run on the one :class:`~hostops.timers.TimerHeap` of the kernel.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hostops.sync import Lock
from hostops.timers import TimerHeap
from vdev.virtio.packet import complete_checksum_into

from ..errors import io_error
from ..files import (
    AF_INET,
    IPPROTO_TCP,
    IPPROTO_UDP,
    SOCK_CLOEXEC,
    SOCK_DGRAM,
    SOCK_NONBLOCK,
    SOCK_STREAM,
    SOCK_TYPE_MASK,
    SocketFile,
    socket_protocol,
)
from .addr import (
    ANY,
    BROADCAST_MAC,
    LIMITED_BROADCAST,
    ip_ntoa,
    is_loopback,
    is_multicast,
    is_zeronet,
    parse_ip,
)
from .arp import ArpEntry, ArpTable
from .config import StackConfig
from .ether import ETH_HDR, ETH_HLEN, ETH_P_ARP, ETH_P_IP
from .icmp import ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, ICMP_PROT_UNREACH, IcmpProtocol
from .iface import Interface
from .ipv4 import (
    IP_DF,
    IP_HDR,
    MAX_IP_PAYLOAD,
    HeaderError,
    Reassembler,
    build_header,
    fragment,
    parse_header,
)
from .link import NO_OFFLOAD, Link, RxInfo, TxOffload
from .protocol import IPv4Packet, NetError, ProtocolHandler
from .route import Route, RouteTable
from .tcp import TCP_STAT_NAMES, TcpProtocol
from .udp import UdpProtocol

__all__ = ["Stack", "STAT_NAMES"]

log = logging.getLogger(__name__)

#: Every counter of :attr:`Stack.stats` (all present from the start, at 0).
STAT_NAMES = (
    # Ethernet / links
    "rx_frames",
    "rx_bad_frames",
    "rx_runt",
    "rx_unknown_ethertype",
    "rx_other_mac",
    "rx_errors",
    "tx_frames",
    "tx_dropped_nobufs",
    "tx_dropped_down",
    "tx_errors",
    "link_changes",
    # IPv4
    "ip_rx_packets",
    "ip_bad_header",
    "ip_bad_checksum",
    "ip_bad_source",
    "ip_not_for_us",
    "ip_out_no_route",
    "ip_unknown_protocol",
    "ip_delivered",
    "ip_loopback",
    "ip_tx_packets",
    "ip_frags_sent",
    "ip_frag_reassembled",
    "ip_frag_timeout",
    "ip_frag_dropped",
    "ip_frag_bad",
    "ip_frag_duplicate",
    "ip_frag_overlap",
    "ip_frag_inconsistent",
    "ip_frag_too_many",
    "ip_frag_evicted",
    # ARP
    "arp_received",
    "arp_bad",
    "arp_conflict",
    "arp_learned",
    "arp_requests_sent",
    "arp_replies_sent",
    "arp_failed",
    "arp_queue_dropped",
    "arp_unresolved_dropped",
    "arp_hold_refused",
    "arp_expired",
    "arp_evicted",
    # ICMP
    "icmp_bad_header",
    "icmp_bad_checksum",
    "icmp_echo_replied",
    "icmp_echo_ignored_broadcast",
    "icmp_echo_reply_unmatched",
    "icmp_errors_received",
    "icmp_error_not_ours",
    "icmp_unreach_sent",
    "icmp_errors_sent",
    "icmp_rate_limited",
    "icmp_ignored",
    # UDP
    "udp_rx_datagrams",
    "udp_tx_datagrams",
    "udp_bad_header",
    "udp_bad_checksum",
    "udp_no_port",
    "udp_rcvbuf_dropped",
    "udp_errors_delivered",
    "udp_errors_ignored",
    # TCP
    *TCP_STAT_NAMES,
)

Deferred = Callable[[], None]


@dataclass(slots=True)
class _OutPacket:
    """An IP packet on its way out: header, transport bytes, partial-checksum offset."""

    header: bytearray
    l4: bytearray
    csum_offset: int
    gso_size: int = 0

    def complete_checksum(self) -> None:
        """Finish a partial transport checksum in software (once)."""
        if self.csum_offset >= 0:
            complete_checksum_into(self.l4, 0, self.csum_offset)
            self.csum_offset = -1


def _ignore_frame(frame: bytes | memoryview, info: RxInfo) -> None:
    return None


def _ignore_state(up: bool) -> None:
    return None


class Stack:
    """One IPv4 network stack (see the module docstring).

    ``timers``: the kernel's timer heap (the stack makes and closes its own when None).
    ``config``: the tunables (:class:`~kernel.net.config.StackConfig`)."""

    def __init__(self, timers: TimerHeap | None = None, config: StackConfig | None = None) -> None:
        self.config = config if config is not None else StackConfig()
        self._own_timers = timers is None
        self.timers = timers if timers is not None else TimerHeap("net-timers")
        self._lock = Lock()
        self._stats_lock = Lock()
        self._stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self._ifaces: dict[str, Interface] = {}
        self._routes = RouteTable()
        self._local: frozenset[int] = frozenset()
        self._bcast: frozenset[int] = frozenset({LIMITED_BROADCAST})
        self._protocols: dict[int, ProtocolHandler] = {}
        self._socket_kinds: dict[tuple[int, int], tuple[int, ...]] = {}
        self._socket_factories: dict[tuple[int, int, int], Callable[[], SocketFile]] = {}
        self._reasm = Reassembler(self)
        self._ip_id = int.from_bytes(os.urandom(2), "big")
        self._closed = False
        #: The ICMP, UDP and TCP protocol handlers.
        self.icmp = IcmpProtocol(self)
        self.udp = UdpProtocol(self)
        self.tcp = TcpProtocol(self)
        self.register_protocol(1, self.icmp)
        self.register_protocol(IPPROTO_UDP, self.udp)
        self.register_protocol(IPPROTO_TCP, self.tcp)
        self.register_socket(AF_INET, SOCK_DGRAM, IPPROTO_UDP, self.udp.socket)
        self.register_socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, self.tcp.socket)

    # ------------------------------------------------------------------ counters
    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name``."""
        with self._stats_lock:
            self._stats[name] = self._stats.get(name, 0) + n

    @property
    def stats(self) -> dict[str, int]:
        """A snapshot of every counter (see :data:`STAT_NAMES`)."""
        with self._stats_lock:
            return dict(self._stats)

    # ------------------------------------------------------------------ set-up
    def add_interface(
        self, link: Link, ip: str = "10.0.0.2/24", gateway: str | None = None
    ) -> Interface:
        """Configure ``link`` with address ``ip`` (``a.b.c.d/prefix``): a connected route
        for the prefix and, with ``gateway``, a default route via it. ``ValueError``
        with a one-line message for a bad address, prefix, gateway, MAC or MTU."""
        name = link.name
        addr, plen = _parse_cidr(ip, name)
        mac = bytes(link.mac)
        if len(mac) != 6 or mac[0] & 1 or mac == b"\x00" * 6:
            raise ValueError(f"{name}: MAC {mac.hex(':')} is not a unicast Ethernet address")
        if link.mtu < 68:  # RFC 791 §3.2: every host must take a 68-byte datagram
            raise ValueError(f"{name}: MTU {link.mtu} is below the IPv4 minimum of 68")
        iface = Interface(link, addr, plen, None)
        gw: int | None = None
        if gateway is not None:
            gw = parse_ip(gateway) if isinstance(gateway, str) else None
            if gw is None:
                raise ValueError(f"{name}: gateway {gateway!r} is not a dotted-quad IPv4 address")
            if (
                not iface.contains(gw)
                or gw == addr
                or (plen <= 30 and gw in (iface.network, iface.broadcast))
            ):
                raise ValueError(
                    f"{name}: gateway {gateway} is not a host on the subnet "
                    f"{ip_ntoa(iface.network)}/{plen}"
                )
            iface.gateway = gw
        with self._lock:
            if self._closed:
                raise ValueError("the stack is closed")
            if name in self._ifaces:
                raise ValueError(f"an interface named {name} exists already")
            for other in self._ifaces.values():
                if other.address == addr:
                    raise ValueError(f"{name}: {ip_ntoa(addr)} is {other.name}'s address already")
            if gw is not None and self._routes.default() is not None:
                raise ValueError(
                    f"{name}: there is a default route already ({self._routes.default()})"
                )
            iface.arp = ArpTable(self, iface)
            self._ifaces[name] = iface
            self._routes.add(Route(iface.network, plen, None, iface, addr))
            if gw is not None:
                self._routes.add(Route(0, 0, gw, iface, addr))
            self._local = self._local | {addr}
            if iface.broadcast is not None:
                self._bcast = self._bcast | {iface.broadcast}
        link.set_link_listener(lambda up: self._on_link(iface, up))
        link.set_receiver(lambda frame, info: self._receive(iface, frame, info))
        return iface

    def add_route(self, dest: str, gateway: str) -> Route:
        """Add a route to ``dest`` (``a.b.c.d/prefix``; ``default`` for 0.0.0.0/0) via
        ``gateway``, which must be a host on a configured interface's subnet."""
        if dest == "default":
            dest = "0.0.0.0/0"
        net, plen = _parse_prefix(dest)
        gw = parse_ip(gateway) if isinstance(gateway, str) else None
        if gw is None:
            raise ValueError(f"gateway {gateway!r} is not a dotted-quad IPv4 address")
        with self._lock:
            for iface in self._ifaces.values():
                if iface.contains(gw) and gw != iface.address:
                    r = Route(net, plen, gw, iface, iface.address)
                    self._routes.add(r)
                    return r
        raise ValueError(f"gateway {gateway} is not on the subnet of any interface")

    @property
    def interfaces(self) -> dict[str, Interface]:
        """The interfaces by name (a copy)."""
        with self._lock:
            return dict(self._ifaces)

    @property
    def routes(self) -> list[Route]:
        """The routing table, in the order added."""
        with self._lock:
            return list(self._routes)

    def register_protocol(self, proto: int, handler: ProtocolHandler) -> None:
        """Deliver IP protocol ``proto`` (0..255) to ``handler``."""
        if not 0 <= proto <= 255:
            raise ValueError(f"IP protocol number {proto} is not 0..255")
        with self._lock:
            if proto in self._protocols:
                raise ValueError(f"IP protocol {proto} has a handler already")
            self._protocols[proto] = handler

    def register_socket(
        self, family: int, type: int, proto: int, factory: Callable[[], SocketFile]
    ) -> None:
        """Make ``socket(family, type, proto)`` return ``factory()``; the first protocol
        registered for a (family, type) is its default (``proto`` 0)."""
        with self._lock:
            key = (family, type)
            self._socket_kinds[key] = self._socket_kinds.get(key, ()) + (proto,)
            self._socket_factories[(family, type, proto)] = factory

    # ------------------------------------------------------------------ sockets, ping
    def socket(self, family: int = AF_INET, type: int = SOCK_DGRAM, proto: int = 0) -> SocketFile:
        """A new socket: EAFNOSUPPORT for a family, ESOCKTNOSUPPORT for a type the stack
        has no socket of, EPROTONOSUPPORT for a protocol, EINVAL for a bad type
        (SOCK_NONBLOCK / SOCK_CLOEXEC may be or-ed into ``type``)."""
        if isinstance(type, int) and not isinstance(type, bool):
            flags = type & ~SOCK_TYPE_MASK
            if flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC):
                raise io_error(errno.EINVAL, f"socket type {type:#x}")
            base = type & SOCK_TYPE_MASK
        else:
            flags, base = 0, type
        if self._closed:
            raise io_error(errno.ENETDOWN, "the network stack is closed")
        with self._lock:
            kinds = dict(self._socket_kinds)
        p = socket_protocol(family, base, proto, kinds)
        s = self._socket_factories[(family, base, p)]()
        if flags & SOCK_NONBLOCK:
            s.setblocking(False)
        return s

    def ping(self, addr: str, count: int = 3, timeout: float = 1.0) -> list[float]:
        """Send ``count`` ICMP echo requests to ``addr``; the round-trip times (seconds)
        of the replies that came. ``TimeoutError`` when none came; ENETUNREACH without
        a route, ENETDOWN without carrier, EHOSTUNREACH when ARP found nobody (see
        :mod:`kernel.net.icmp`)."""
        d = parse_ip(addr) if isinstance(addr, str) else None
        if d is None:
            raise io_error(errno.EINVAL, f"{addr!r} is not a dotted-quad IPv4 address")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive int, got {count!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        return self.icmp.ping(d, count, float(timeout))

    # ------------------------------------------------------------------ inspection
    def arp_entries(self, ifname: str | None = None) -> list[ArpEntry]:
        """The ARP table of one interface (the first when None)."""
        with self._lock:
            if ifname is None:
                if not self._ifaces:
                    return []
                ifname = next(iter(self._ifaces))
            return self._ifaces[ifname].arp.entries()

    def reassembly_bytes(self) -> int:
        """Bytes held by partial datagrams."""
        with self._lock:
            return self._reasm.bytes_held

    def reassembly_count(self) -> int:
        """Partial datagrams held."""
        with self._lock:
            return len(self._reasm)

    @property
    def reassembly(self) -> Reassembler:
        """The reassembly table (``len()`` is the number of partial datagrams)."""
        return self._reasm

    def is_local(self, addr: int) -> bool:
        """``addr`` is one of our interface addresses."""
        return addr in self._local

    def is_broadcast(self, addr: int) -> bool:
        """``addr`` is 255.255.255.255 or a configured subnet's broadcast address."""
        return addr in self._bcast

    # ------------------------------------------------------------------ routing / output
    def route(self, dst: int) -> Route:
        """The route to ``dst`` (``OSError(ENETUNREACH)`` when there is none)."""
        if is_zeronet(dst) or is_loopback(dst):
            raise io_error(errno.ENETUNREACH, f"{ip_ntoa(dst)} is not a destination here")
        with self._lock:
            r = self._routes.lookup(dst)
            if r is None and dst == LIMITED_BROADCAST and self._ifaces:
                first = next(iter(self._ifaces.values()))
                r = Route(first.network, first.prefix_len, None, first, first.address)
        if r is None:
            self.count("ip_out_no_route")
            raise io_error(errno.ENETUNREACH, f"no route to {ip_ntoa(dst)}")
        return r

    def send_ip(
        self,
        dst: int,
        proto: int,
        l4: bytearray,
        *,
        src: int = ANY,
        csum_offset: int = -1,
        ttl: int | None = None,
        tos: int = 0,
        df: bool = False,
        route: Route | None = None,
        gso_size: int = 0,
    ) -> None:
        """Send ``l4`` to ``dst`` as IP protocol ``proto`` (see the module docstring).

        ``csum_offset`` >= 0: the transport checksum at that offset of ``l4`` holds the
        pseudo-header sum and is to be completed (by the link or here). ``l4`` may be
        modified. Raises ``OSError``: ENETUNREACH, ENETDOWN, EMSGSIZE (more than 65535
        bytes, or larger than the MTU with ``df``, or a TCP packet larger than the MTU
        that the link cannot segment), EHOSTUNREACH (a failed ARP resolution is held),
        ENOBUFS/EIO from the link. ``gso_size`` > 0 (TCP only): the packet may exceed
        the MTU and is to be cut by the link into segments of that many payload bytes."""
        if self._closed:
            raise io_error(errno.ENETDOWN, "the network stack is closed")
        if route is None:
            route = self.route(dst)
        iface = route.iface
        if len(l4) > MAX_IP_PAYLOAD:
            raise io_error(errno.EMSGSIZE, f"{len(l4)} bytes do not fit an IPv4 packet")
        if src == ANY:
            src = route.src
        with self._lock:
            self._ip_id = ident = (self._ip_id + 1) & 0xFFFF
        header = build_header(
            src, dst, proto, len(l4), ident, ttl or self.config.ttl, tos, IP_DF if df else 0
        )
        item = _OutPacket(header, l4, csum_offset, gso_size if proto == IPPROTO_TCP else 0)
        self.count("ip_tx_packets")
        hairpin = getattr(iface.link, "hairpin", False)
        if dst in self._local and not (hairpin and dst == iface.address):
            self._loopback(iface, item, l2_broadcast=False)
            return
        if not iface.up:
            self.count("tx_dropped_down")
            raise io_error(errno.ENETDOWN, f"{iface.name} has no carrier")
        if df and len(header) + len(l4) > iface.mtu:
            raise io_error(errno.EMSGSIZE, f"larger than {iface.name}'s MTU {iface.mtu} with DF")
        if proto == IPPROTO_TCP and len(header) + len(l4) > iface.mtu:
            if not (item.gso_size > 0 and csum_offset >= 0 and iface.tso4 and iface.tx_csum):
                raise io_error(errno.EMSGSIZE, f"TCP segment above {iface.name}'s MTU")
        bcast = dst in self._bcast
        if hairpin and dst == iface.address:
            mac = iface.mac  # the link hands the frame straight back to us
        elif bcast:
            mac = BROADCAST_MAC
        elif is_multicast(dst):
            mac = b"\x01\x00\x5e" + (dst & 0x7FFFFF).to_bytes(3, "big")  # RFC 1112 §6.4
        else:
            out: list[Deferred] = []
            with self._lock:
                resolved = iface.arp.output(route.next_hop(dst), item, out)
            self._run(out)
            if resolved is None:
                return  # queued until the next hop resolves
            mac = resolved
        self._send_item(iface, mac, item)
        if bcast and not hairpin:
            self._loopback(iface, item, l2_broadcast=True)  # Linux loops broadcasts back

    def send_ip_quiet(self, dst: int, proto: int, l4: bytearray, *, src: int = ANY) -> bool:
        """:meth:`send_ip` for what the stack sends on its own: errors are counted (by
        :meth:`send_ip` and the link path), never raised. True if the packet went out or
        was queued."""
        try:
            self.send_ip(dst, proto, l4, src=src)
            return True
        except OSError as e:
            log.debug("stack-generated packet to %s dropped: %s", ip_ntoa(dst), e)
            return False

    def _send_item(self, iface: Interface, mac: bytes, item: _OutPacket) -> None:
        eth = ETH_HDR.pack(mac, iface.mac, ETH_P_IP)
        total = len(item.header) + len(item.l4)
        if total <= iface.mtu:
            offload = NO_OFFLOAD
            if item.csum_offset >= 0:
                if iface.tx_csum:
                    offload = TxOffload(
                        csum_start=ETH_HLEN + len(item.header), csum_offset=item.csum_offset
                    )
                else:
                    item.complete_checksum()
            self._tx(iface, b"".join((eth, item.header, item.l4)), offload)
            return
        if item.gso_size > 0 and item.csum_offset >= 0 and iface.tso4 and iface.tx_csum:
            hl = ETH_HLEN + len(item.header)
            tcp_hlen = (item.l4[12] >> 4) * 4  # RFC 9293 §3.1 Data Offset (our header)
            offload = TxOffload(
                csum_start=hl,
                csum_offset=item.csum_offset,
                gso_size=item.gso_size,
                hdr_len=hl + tcp_hlen,
            )
            self._tx(iface, b"".join((eth, item.header, item.l4)), offload)
            return
        if item.gso_size > 0:  # the link lost TSO while the packet waited: never fragment
            self.count("tx_errors")
            return
        item.complete_checksum()  # a checksum offload cannot span fragments
        for frag in fragment(item.header, item.l4, iface.mtu):
            self._tx(iface, eth + frag, NO_OFFLOAD)
            self.count("ip_frags_sent")

    def _tx(self, iface: Interface, frame: bytes, offload: TxOffload) -> None:
        try:
            iface.link.transmit(frame, offload)
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                self.count("tx_dropped_nobufs")
            elif e.errno == errno.ENETDOWN:
                self.count("tx_dropped_down")
            else:
                self.count("tx_errors")
            raise
        self.count("tx_frames")

    def _loopback(self, iface: Interface, item: _OutPacket, l2_broadcast: bool) -> None:
        self.count("ip_loopback")
        packet = bytes(item.header) + bytes(item.l4)
        self._ip_input(iface, memoryview(packet), True, l2_broadcast, local=True)

    # -- for ArpTable / Reassembler (ArpHost, ReasmHost)
    def run_locked(self, fn: Callable[[list[Deferred]], None]) -> None:
        """Run ``fn(out)`` under the stack lock, then every deferred call it left in
        ``out`` (nothing once the stack is closed)."""
        out: list[Deferred] = []
        with self._lock:
            if self._closed:
                return
            fn(out)
        self._run(out)

    def _run(self, out: list[Deferred]) -> None:
        for f in out:  # bounded: what one locked section produced
            try:
                f()
            except Exception:
                self.count("rx_errors")
                log.exception("deferred network work failed")

    def tx_frame_quiet(self, iface: Interface, frame: bytes) -> None:
        """Transmit a frame the stack made; errors are counted."""
        try:
            self._tx(iface, frame, NO_OFFLOAD)
        except OSError:
            pass

    def send_resolved(self, iface: Interface, mac: bytes, item: Any) -> None:
        """Transmit a packet that waited for ARP; errors are counted."""
        try:
            self._send_item(iface, mac, item)
        except OSError:
            pass

    def resolution_failed(self, iface: Interface, item: Any) -> None:
        """A packet was dropped because its next hop never answered ARP: report host
        unreachable to its protocol, as Linux's ``arp_error_report`` does."""
        assert isinstance(item, _OutPacket)
        _vi, _tos, _tot, _id, _ff, _ttl, proto, _c, src, dst = IP_HDR.unpack_from(item.header)
        err = NetError(
            errno=errno.EHOSTUNREACH,
            icmp_type=ICMP_DEST_UNREACH,
            icmp_code=ICMP_HOST_UNREACH,
            reporter=iface.address,
            src=src,
            dst=dst,
            proto=proto,
            l4=bytes(item.l4[:8]),
            local=True,
        )
        self.deliver_error(err)

    def deliver_error(self, err: NetError) -> None:
        """Hand an error about a packet we sent to its protocol's handler."""
        handler = self._protocols.get(err.proto)
        if handler is not None:
            handler.error(err)

    # ------------------------------------------------------------------ receive
    def _on_link(self, iface: Interface, up: bool) -> None:
        iface.up = bool(up)
        self.count("link_changes")

    def _receive(self, iface: Interface, frame: bytes | memoryview, info: RxInfo) -> None:
        if self._closed:
            return
        self.count("rx_frames")
        try:
            self._rx_ether(iface, frame, info)
        except Exception:
            self.count("rx_errors")
            log.exception("%s: receive path failed", iface.name)

    def _rx_ether(self, iface: Interface, frame: bytes | memoryview, info: RxInfo) -> None:
        mv = memoryview(frame).cast("B") if isinstance(frame, memoryview) else memoryview(frame)
        if len(mv) < ETH_HLEN:
            self.count("rx_bad_frames")
            self.count("rx_runt")
            return
        dst = bytes(mv[0:6])
        l2_bcast = dst == BROADCAST_MAC
        if not l2_bcast and dst != iface.mac:
            self.count("rx_other_mac")
            return
        ethertype = (mv[12] << 8) | mv[13]
        payload = mv[ETH_HLEN:]
        if ethertype == ETH_P_IP:
            valid = info.csum_valid or info.csum_start >= 0
            self._ip_input(iface, payload, valid, l2_bcast)
        elif ethertype == ETH_P_ARP:
            self.run_locked(lambda out: iface.arp.input(payload, out))
        else:
            self.count("rx_bad_frames")
            self.count("rx_unknown_ethertype")

    def _ip_input(
        self,
        iface: Interface,
        data: memoryview,
        csum_valid: bool,
        l2_broadcast: bool,
        local: bool = False,
    ) -> None:
        self.count("ip_rx_packets")
        try:
            h = parse_header(data)
        except HeaderError as e:
            self.count(e.counter)
            return
        data = data[: h.total]  # RFC 791 §3.1: bytes beyond Total Length are padding
        src, dst = h.src, h.dst
        if is_multicast(src) or src in self._bcast:  # RFC 1122 §3.2.1.3
            self.count("ip_bad_source")
            return
        ip_bcast = dst == LIMITED_BROADCAST or (
            iface.broadcast is not None and dst == iface.broadcast
        )
        if not ip_bcast and dst not in self._local:
            self.count("ip_not_for_us")
            return
        header: bytes = bytes(data[: h.ihl])
        payload: bytes | memoryview = data[h.ihl :]
        reassembled = False
        if h.is_fragment:
            done: list[tuple[bytes, bytes]] = []

            def add(out: list[Deferred]) -> None:
                r = self._reasm.add(h, header, bytes(payload))
                if r is not None:
                    done.append(r)

            self.run_locked(add)
            if not done:
                return
            header, payload = done[0]
            reassembled = True
        pkt = IPv4Packet(
            iface=iface,
            src=src,
            dst=dst,
            proto=h.proto,
            ttl=h.ttl,
            ident=h.ident,
            header=header,
            payload=payload,
            l2_broadcast=l2_broadcast,
            ip_broadcast=ip_bcast,
            csum_valid=local or (csum_valid and not reassembled),
            reassembled=reassembled,
            local=local,
        )
        handler = self._protocols.get(h.proto)
        if handler is None:
            self.count("ip_unknown_protocol")
            self.icmp.send_error(pkt, ICMP_DEST_UNREACH, ICMP_PROT_UNREACH)
            return
        self.count("ip_delivered")
        handler.input(pkt)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Close every socket (blocked callers get EBADF), fail running pings, cancel
        the stack's timers, detach from the links, and close the timer heap if the
        stack made it. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ifaces = list(self._ifaces.values())
            for iface in ifaces:
                iface.arp.clear()
            self._reasm.clear()
            handlers = list(self._protocols.values())
        for h in handlers:
            close = getattr(h, "close", None)
            if close is not None:
                close()
        for iface in ifaces:
            iface.link.set_receiver(_ignore_frame)
            iface.link.set_link_listener(_ignore_state)
        if self._own_timers:
            self.timers.close()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(i.cidr for i in self._ifaces.values())
        return f"<Stack [{names}]{' closed' if self._closed else ''}>"


def _parse_prefix(text: str) -> tuple[int, int]:
    """``a.b.c.d/n`` with the host bits zero."""
    addr, plen = _split_cidr(text, "route")
    if addr & ~(0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF:
        raise ValueError(f"route {text!r} has host bits set")
    return addr, plen


def _split_cidr(text: object, what: str) -> tuple[int, int]:
    if not isinstance(text, str):
        raise ValueError(f"{what}: address must be a string like 10.0.0.2/24, not {text!r}")
    host, sep, plen_s = text.partition("/")
    addr = parse_ip(host)
    if addr is None:
        raise ValueError(f"{what}: {host!r} is not a dotted-quad IPv4 address")
    if not sep:
        raise ValueError(f"{what}: {text!r} needs a prefix length (like {host}/24)")
    if not (plen_s.isascii() and plen_s.isdigit()) or int(plen_s) > 32:
        raise ValueError(f"{what}: prefix length {plen_s!r} is not 0..32")
    return addr, int(plen_s)


def _parse_cidr(text: object, name: str) -> tuple[int, int]:
    """An interface address: a unicast host address and its prefix."""
    addr, plen = _split_cidr(text, name)
    shown = ip_ntoa(addr)
    if is_zeronet(addr) or is_loopback(addr) or is_multicast(addr) or addr >= 0xF0000000:
        raise ValueError(f"{name}: {shown} is not a unicast host address")
    if plen <= 30:
        host_bits = ~(0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
        if (addr & host_bits) in (0, host_bits):
            raise ValueError(f"{name}: {shown}/{plen} is the subnet's network or broadcast address")
    return addr, plen
