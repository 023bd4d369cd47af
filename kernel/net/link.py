"""What a network driver gives the stack: a *link* (one NIC, seen from the stack).

Theory of operation
-------------------
The stack never touches a virtqueue. A driver (the virtio-net driver, or a test's
in-memory link) implements :class:`Link`; :meth:`kernel.net.stack.Stack.add_interface`
wraps it in an interface (``eth0``, an address, routes). Frames cross as whole Ethernet
frames (destination MAC first, no virtio header) plus a :class:`TxOffload` /
:class:`RxInfo` that carries what the virtio-net header would:

* transmit: ``link.transmit(frame, offload)``. With ``offload.csum_start >= 0`` the
  frame's L4 checksum field holds only the pseudo-header sum and the link must get it
  completed (virtio ``NEEDS_CSUM``; allowed only when ``link.tx_csum``). With
  ``offload.gso_size > 0`` the frame is a TCPv4 super-segment the link must get cut into
  ``gso_size`` payload pieces (virtio ``GSO_TCPV4``; only when ``link.tso4``). A link
  never blocks: when it has no room it raises ``OSError(ENOBUFS)``; when the link is
  down ``OSError(ENETDOWN)``; when the device failed ``OSError(EIO)``.
* receive: the link calls the function given to :meth:`Link.set_receiver` with the
  frame (bytes or a memoryview valid only during the call) and an :class:`RxInfo`
  (``csum_valid``: the device vouched for the L4 checksum — virtio ``DATA_VALID`` — so
  the stack may skip checking it; ``csum_start >= 0``: the checksum is partial, as a
  ``NEEDS_CSUM`` frame from a local peer; ``gso_size``: a large receive). It runs on the
  driver's interrupt thread: it must not block.
* link state: the function given to :meth:`Link.set_link_listener` is called with the
  new state when it changes (STATUS bit, config-change interrupt).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Link", "TxOffload", "RxInfo", "NO_OFFLOAD", "PLAIN_RX", "Receiver"]


@dataclass(frozen=True, slots=True)
class TxOffload:
    """What the link must still do to a transmitted frame (see the module doc).

    ``csum_start``/``csum_offset``: offsets from the start of the Ethernet frame
    (``-1``: the checksum is complete). ``gso_size``: TCP payload bytes per segment
    (0: no segmentation); ``hdr_len``: Ethernet+IP+TCP header bytes of the frame."""

    csum_start: int = -1
    csum_offset: int = 0
    gso_size: int = 0
    hdr_len: int = 0


@dataclass(frozen=True, slots=True)
class RxInfo:
    """What the device said about a received frame (see the module doc)."""

    csum_valid: bool = False
    csum_start: int = -1
    csum_offset: int = 0
    gso_size: int = 0


NO_OFFLOAD = TxOffload()
PLAIN_RX = RxInfo()

#: ``receiver(frame, info)``: one received Ethernet frame (no virtio header).
Receiver = Callable[[bytes | memoryview, RxInfo], None]


class Link(Protocol):
    """One network interface card as the stack sees it."""

    @property
    def name(self) -> str:
        """Interface name (``eth0``)."""
        ...

    @property
    def mac(self) -> bytes:
        """Six-byte MAC address."""
        ...

    @property
    def mtu(self) -> int:
        """Largest IP packet (Ethernet payload) the link carries."""
        ...

    @property
    def tx_csum(self) -> bool:
        """The link completes partial checksums (TxOffload.csum_start)."""
        ...

    @property
    def tso4(self) -> bool:
        """The link segments TCPv4 super-segments (TxOffload.gso_size)."""
        ...

    @property
    def link_up(self) -> bool:
        """Carrier: False makes sends fail with ENETDOWN."""
        ...

    def transmit(self, frame: bytes | bytearray | memoryview, offload: TxOffload) -> None:
        """Send one Ethernet frame (never blocks; ENOBUFS / ENETDOWN / EIO)."""
        ...

    def set_receiver(self, receiver: Receiver) -> None:
        """Deliver received frames to ``receiver`` from now on."""
        ...

    def set_link_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(up)`` when the carrier changes."""
        ...
