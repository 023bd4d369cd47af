"""Where a virtio-net device's frames go: the backend interface.

Theory of operation
-------------------
:class:`vdev.net.NetDevice` owns the virtqueues; a :class:`NetBackend` owns the outside
world (a loopback wire, a port of the L2 switch, a Linux TAP interface, a pcap file).
The device calls the backend; the backend calls the device back through the
:class:`FrameSink` it was attached to:

* transmit (driver → outside): ``backend.send(hdr, frame)`` with the frame's
  :class:`~vdev.virtio.net.NetHdr` and the Ethernet frame (no virtio header). If the
  backend says it takes offloaded frames (:meth:`NetBackend.offloads` returns the
  ``NetHdr`` features it accepts, e.g. ``{"csum", "tso4"}``) the device hands frames
  with ``NEEDS_CSUM`` / ``GSO_TCPV4`` as they are; otherwise the device completes the
  checksum and cuts the segments first, as hardware would, and ``hdr`` is plain.
  ``send`` never blocks: a frame it cannot take now is dropped and it returns False.
* receive (outside → driver): the backend calls ``sink.receive(hdr, frame)`` from the
  device process's one loop (from a callback it registered with ``sink.watch(...)``,
  or from within ``send`` for a loopback). ``receive`` returns False when the frame was
  dropped (no receive buffer, bad header); the backend may use
  ``sink.rx_buffers_available()`` to apply back-pressure instead of reading frames
  it would only drop.
* link state: a backend that loses its carrier calls ``sink.set_link(False)``.

Everything runs on the device process's single thread: no locks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from vdev.virtio.net import NetHdr

__all__ = ["FrameSink", "NetBackend"]


class FrameSink(Protocol):
    """What a backend may call on the device it is attached to."""

    def receive(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """Deliver one frame to the driver; False if it was dropped (and counted).
        With a fault plan a frame may be held (delay, reorder, rate limit): the device
        keeps a copy, so ``frame`` may be reused as soon as this returns, and True then
        means "taken"."""
        ...

    def rx_buffers_available(self) -> bool:
        """True if the driver has given receive buffers that are not yet used."""
        ...

    def set_link(self, up: bool) -> None:
        """Change the carrier (STATUS bit + config-change interrupt)."""
        ...

    def watch(self, source: Any, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the device loop when ``source`` is readable."""
        ...

    def unwatch(self, source: Any) -> None:
        """Stop watching ``source``."""
        ...

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Any:
        """Run ``callback()`` on the device loop after ``delay_s`` (``.cancel()``)."""
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the device counter ``name`` (reported by GET_METRICS)."""
        ...


class NetBackend:
    """Base of the backends. Subclasses set :attr:`name` and override :meth:`send`
    (and :meth:`attach`/:meth:`close` when they have resources)."""

    #: The ``--backend`` name.
    name = ""

    #: True: :meth:`send` is done with ``frame`` when it returns (it copies what it
    #: keeps), so the device hands it a view of the driver's transmit buffer instead
    #: of a copy -- the frame is copied once, by the backend, straight to where it
    #: goes. False (the default): the device copies the frame out of shared memory
    #: first, so the backend may keep it. (Frames held by a fault plan are always
    #: copies.)
    takes_views = False

    def __init__(self) -> None:
        self.sink: FrameSink | None = None
        #: The backend's own counters (also added to the device's, see :meth:`count`).
        self.counters: dict[str, int] = {}

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the backend counter ``name`` and to the device's counter of
        the same name (GET_METRICS)."""
        self.counters[name] = self.counters.get(name, 0) + n
        if self.sink is not None:
            self.sink.count(name, n)

    def resume_rx(self) -> None:
        """The driver posted a receive buffer after having none: a backend that stopped
        reading for lack of buffers reads again now. The default does nothing."""

    def reset(self) -> None:
        """The device was reset: the driver and its buffers are gone, so frames the
        backend holds for them are dropped. The default does nothing."""

    def offloads(self) -> frozenset[str]:
        """What this backend accepts as-is: ``"csum"`` (NEEDS_CSUM frames) and/or
        ``"tso4"`` (GSO_TCPV4 super-frames). The default: nothing."""
        return frozenset()

    def attach(self, sink: FrameSink) -> None:
        """The device is ready for frames (called once, before any :meth:`send`):
        register event sources with ``sink.watch`` here."""
        self.sink = sink

    def send(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """Send one frame out; False if dropped. Never blocks."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files, sockets and mappings (the device process is exiting)."""
