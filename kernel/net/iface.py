"""An interface: one :class:`~kernel.net.link.Link` with its IPv4 address.

The stack keeps what it must know about a NIC here: name, MAC, MTU, the offloads the
link negotiated (asked of the link on every send, never a global), carrier (kept up to
date by the link's listener), the address and its subnet, and the ARP table of the
link.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .addr import ip_ntoa, mac_str, prefix_mask
from .link import Link

if TYPE_CHECKING:
    from .arp import ArpTable

__all__ = ["Interface"]


class Interface:
    """One configured network interface (``eth0`` with ``10.0.0.2/24``)."""

    def __init__(self, link: Link, address: int, prefix_len: int, gateway: int | None) -> None:
        self.link = link
        #: Interface name (the link's).
        self.name: str = link.name
        #: Six-byte MAC address.
        self.mac: bytes = bytes(link.mac)
        self.address = address
        self.prefix_len = prefix_len
        self.netmask = prefix_mask(prefix_len)
        self.network = address & self.netmask
        #: The subnet's broadcast address (None for /31 and /32, which have none:
        #: RFC 3021).
        self.broadcast: int | None = (
            (self.network | (~self.netmask & 0xFFFFFFFF)) if prefix_len <= 30 else None
        )
        self.gateway = gateway
        #: Carrier, as the link last reported it.
        self.up: bool = bool(link.link_up)
        self.arp: ArpTable  # set by the stack

    @property
    def mtu(self) -> int:
        """Largest IP packet the link carries."""
        return int(self.link.mtu)

    @property
    def tx_csum(self) -> bool:
        """The link completes partial L4 checksums (asked of the link each time)."""
        return bool(self.link.tx_csum)

    @property
    def tso4(self) -> bool:
        """The link segments TCPv4 super-segments."""
        return bool(self.link.tso4)

    @property
    def ip(self) -> str:
        """The address as a dotted quad."""
        return ip_ntoa(self.address)

    @property
    def cidr(self) -> str:
        """``10.0.0.2/24``."""
        return f"{ip_ntoa(self.address)}/{self.prefix_len}"

    def contains(self, addr: int) -> bool:
        """``addr`` is on this interface's subnet."""
        return addr & self.netmask == self.network

    def __repr__(self) -> str:
        state = "up" if self.up else "down"
        return f"<Interface {self.name} {self.cidr} {mac_str(self.mac)} mtu {self.mtu} {state}>"
