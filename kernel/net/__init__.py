"""The kernel's network stack: IPv4 over Ethernet links, with ARP, ICMP, UDP and TCP sockets.

Theory of operation
-------------------
See :mod:`kernel.net.stack` for the layers and how a frame travels; each layer has its
module: :mod:`~kernel.net.link` (what a driver gives the stack), :mod:`~kernel.net.ether`,
:mod:`~kernel.net.arp`, :mod:`~kernel.net.ipv4` (header, fragmentation, reassembly),
:mod:`~kernel.net.route`, :mod:`~kernel.net.icmp`, :mod:`~kernel.net.udp` (protocol and
:class:`UdpSocket`), :mod:`~kernel.net.tcp` (connections and :class:`TcpSocket`, with
:mod:`~kernel.net.tcp_wire` for the header and :mod:`~kernel.net.tcp_seq` for sequence
arithmetic; its tunables are a :class:`TcpConfig`, ``stack.tcp.config``). Tunables are
:class:`StackConfig`; timers come from the kernel's one :class:`hostops.timers.TimerHeap`.

Example (two stacks joined by any pair of links)::

    a, b = Stack(), Stack()
    a.add_interface(link_a, "10.0.0.1/24")
    b.add_interface(link_b, "10.0.0.2/24")
    s = b.socket(); s.bind(("0.0.0.0", 9000))
    a.socket().sendto(b"hi", ("10.0.0.2", 9000))
    s.recvfrom(100)   # (b'hi', ('10.0.0.1', 3xxxx))
"""

from __future__ import annotations

from .arp import ArpEntry
from .config import EPHEMERAL_PORTS, StackConfig
from .iface import Interface
from .link import NO_OFFLOAD, PLAIN_RX, Link, Receiver, RxInfo, TxOffload
from .protocol import IPv4Packet, NetError, ProtocolHandler
from .route import Route
from .stack import STAT_NAMES, Stack
from .tcp import TcpConfig, TcpSocket
from .udp import MAX_UDP_PAYLOAD, UdpSocket

__all__ = [
    "Stack",
    "StackConfig",
    "STAT_NAMES",
    "EPHEMERAL_PORTS",
    "Interface",
    "Route",
    "ArpEntry",
    "UdpSocket",
    "TcpSocket",
    "TcpConfig",
    "MAX_UDP_PAYLOAD",
    "IPv4Packet",
    "NetError",
    "ProtocolHandler",
    "Link",
    "TxOffload",
    "RxInfo",
    "NO_OFFLOAD",
    "PLAIN_RX",
    "Receiver",
]
