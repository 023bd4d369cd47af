"""The routing table: connected routes and a default gateway, longest prefix match.

Routes are few (one per interface plus a default), so a lookup is a scan that keeps the
longest matching prefix (RFC 1812 §5.2.4.3); among equal prefixes the first added wins.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .addr import ip_ntoa, prefix_mask
from .iface import Interface

__all__ = ["Route", "RouteTable"]


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """``network/prefix_len [via gateway] dev iface``; ``src`` is the source address
    datagrams sent along it carry."""

    network: int
    prefix_len: int
    gateway: int | None
    iface: Interface
    src: int

    def matches(self, dst: int) -> bool:
        """``dst`` is inside this route's prefix."""
        return dst & prefix_mask(self.prefix_len) == self.network

    def next_hop(self, dst: int) -> int:
        """Where the frame goes on the link: the gateway, or ``dst`` itself."""
        return self.gateway if self.gateway is not None else dst

    def __str__(self) -> str:
        dest = "default" if self.prefix_len == 0 else f"{ip_ntoa(self.network)}/{self.prefix_len}"
        via = f" via {ip_ntoa(self.gateway)}" if self.gateway is not None else ""
        return f"{dest}{via} dev {self.iface.name} src {ip_ntoa(self.src)}"


class RouteTable:
    """An ordered list of :class:`Route` (not thread-safe: the stack locks it)."""

    def __init__(self) -> None:
        self._routes: list[Route] = []

    def add(self, route: Route) -> None:
        """Add a route."""
        self._routes.append(route)

    def lookup(self, dst: int) -> Route | None:
        """The longest-prefix route to ``dst`` (None: no route)."""
        best: Route | None = None
        for r in self._routes:
            if r.matches(dst) and (best is None or r.prefix_len > best.prefix_len):
                best = r
        return best

    def default(self) -> Route | None:
        """The default route, if any."""
        for r in self._routes:
            if r.prefix_len == 0:
                return r
        return None

    def __iter__(self) -> Iterator[Route]:
        return iter(list(self._routes))

    def __len__(self) -> int:
        return len(self._routes)
