"""The ``tap`` net backend: a virtio-net device whose wire is a Linux TAP interface.

    python -m vdev net --backend tap --ifname NAME ...      (root / CAP_NET_ADMIN)

Theory of operation
-------------------
:class:`TapBackend` opens the interface with :class:`hostops.tap.Tap` (``IFF_TAP |
IFF_NO_PI | IFF_VNET_HDR``, a 12-byte ``virtio_net_hdr`` on every frame), so frames
cross between the driver and Linux with their offload header intact:

* transmit (driver → Linux): :meth:`TapBackend.send` writes header + frame in one
  ``writev``. Linux completes a ``NEEDS_CSUM`` checksum and segments a ``GSO_TCPV4``
  super-frame itself, so :meth:`~TapBackend.offloads` is ``{"csum", "tso4"}`` and the
  device hands such frames over unchanged. A write Linux refuses (interface down: EIO, a
  header it rejects: EINVAL, its queue full) drops the frame and is counted.
* receive (Linux → driver): the fd is non-blocking and watched through the device
  loop (:class:`vdev.switch.RxGate`). Each wake-up reads at most ``rx_budget`` frames
  and only while ``sink.rx_buffers_available()``: with no receive buffer the backend
  stops watching (frames wait in the kernel's queue, which drops beyond its length,
  like a NIC's FIFO) and looks again shortly or when :meth:`~TapBackend.resume_rx` is
  called.
* receive offloads: what Linux may give us is set with ``TUNSETOFFLOAD``. When the sink
  is a virtio-net device (it has the negotiated ``features``), the backend follows what
  the driver negotiated — GUEST_CSUM → ``TUN_F_CSUM``, GUEST_TSO4 → ``TUN_F_TSO4`` —
  checked at every wake-up, so Linux's partial-checksum and TSO frames reach a driver
  that takes them unchanged and nobody segments in Python; until then (and for other
  sinks) nothing is offloaded unless :meth:`~TapBackend.set_rx_offloads` says so. The
  device shapes whatever it receives for its driver anyway (§5.1.6.4.1), so a frame
  queued before a renegotiation is still delivered correctly.

Counters (``counters`` and, through ``sink.count``, the device's metrics):
``tap_tx_frames``, ``tap_tx_bytes``, ``tap_tx_errors``, ``tap_rx_frames``,
``tap_rx_bytes``, ``tap_rx_dropped`` (the device refused it), ``tap_rx_runts``,
``tap_rx_paused``, ``tap_offload_changes``.

The carrier of a TAP is the open fd: the link stays up while the backend lives.
"""

from __future__ import annotations

import argparse
from typing import Any

from hostops.tap import TUN_F_CSUM, TUN_F_TSO4, Tap, TapError
from vdev.net import BackendOptionError, BackendSpec, OptionAdder, register_backend
from vdev.netbackend import FrameSink, NetBackend
from vdev.switch import MAX_FRAME, RxGate
from vdev.virtio.constants import NetF, bit
from vdev.virtio.net import ETH_HLEN, NET_HDR_SIZE, NetHdr

__all__ = ["TapBackend", "TapError", "TAP_COUNTERS"]

TAP_COUNTERS = (
    "tap_tx_frames",
    "tap_tx_bytes",
    "tap_tx_errors",
    "tap_rx_frames",
    "tap_rx_bytes",
    "tap_rx_dropped",
    "tap_rx_runts",
    "tap_rx_paused",
    "tap_offload_changes",
)

_GUEST_CSUM = bit(NetF.GUEST_CSUM)
_GUEST_TSO4 = bit(NetF.GUEST_TSO4)


class TapBackend(NetBackend):
    """A virtio-net backend on the TAP interface ``ifname`` (opened at construction:
    :class:`~hostops.tap.TapError` — an ``OSError`` with a one-line message — if that
    is not possible). ``rx_budget`` bounds the frames read per wake-up."""

    name = "tap"

    def __init__(self, ifname: str, *, rx_budget: int = 64) -> None:
        super().__init__()
        self.tap = Tap.open(ifname)
        self.rx_budget = max(1, rx_budget)
        self.counters: dict[str, int] = dict.fromkeys(TAP_COUNTERS, 0)
        self.rx_offloads: frozenset[str] = frozenset()
        """What Linux may hand us offloaded (``TUNSETOFFLOAD``)."""
        self._follow = True
        self._features_seen: int | None = None
        self._buf = bytearray(NET_HDR_SIZE + MAX_FRAME)
        self._view = memoryview(self._buf)
        self._gate = RxGate(self.tap, self._on_readable)

    @property
    def ifname(self) -> str:
        """The interface's name."""
        return self.tap.ifname

    def offloads(self) -> frozenset[str]:
        """Linux finishes checksums and segments what we write: ``{"csum", "tso4"}``."""
        return frozenset({"csum", "tso4"})

    def attach(self, sink: FrameSink) -> None:
        """Start reading from the interface through ``sink``'s loop."""
        super().attach(sink)
        self._gate.start(sink)

    def set_rx_offloads(self, offloads: frozenset[str]) -> None:
        """Let Linux give us these offloaded frames (``"csum"``, ``"tso4"``; TSO only
        with csum) from now on, instead of following the device's negotiated features:
        ``TUNSETOFFLOAD``. :class:`TapError` if refused."""
        self._follow = False
        self._apply(offloads)

    def _apply(self, offloads: frozenset[str]) -> None:
        flags = 0
        if "csum" in offloads:
            flags |= TUN_F_CSUM
            if "tso4" in offloads:
                flags |= TUN_F_TSO4
        if flags != self.tap.offload_flags:
            self.tap.set_offload(flags)
            self.count("tap_offload_changes")
        self.rx_offloads = frozenset(
            n for n, f in (("csum", TUN_F_CSUM), ("tso4", TUN_F_TSO4)) if flags & f
        )

    def _follow_features(self, sink: Any) -> None:
        """Match TUNSETOFFLOAD to the driver's GUEST_CSUM / GUEST_TSO4 (if the sink is
        a device that tells its negotiated ``features``)."""
        features = getattr(sink, "features", None)
        if not isinstance(features, int) or features == self._features_seen:
            return
        self._features_seen = features
        want = set()
        if features & _GUEST_CSUM:
            want.add("csum")
            if features & _GUEST_TSO4:
                want.add("tso4")
        try:
            self._apply(frozenset(want))
        except TapError:
            self._follow = False  # the kernel refuses: stay without receive offloads

    def resume_rx(self) -> None:
        """The driver added receive buffers: read again now (otherwise the backend
        looks again a couple of milliseconds after it ran out)."""
        self._gate.resume()

    def send(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """Write one frame to Linux; False (counted ``tap_tx_errors``) if refused."""
        n = len(frame)
        if n < ETH_HLEN or n > MAX_FRAME:
            self.count("tap_tx_errors")
            return False
        try:
            self.tap.write([hdr.pack(), frame])
        except OSError:
            self.count("tap_tx_errors")
            return False
        self.count("tap_tx_frames")
        self.count("tap_tx_bytes", n)
        return True

    def _on_readable(self) -> None:
        sink = self.sink
        if sink is None:
            return
        if self._follow:
            self._follow_features(sink)
        view = self._view
        for _ in range(self.rx_budget):
            if not sink.rx_buffers_available():
                self.count("tap_rx_paused")
                self._gate.pause()
                return
            try:
                n = self.tap.read_into(self._buf)
            except OSError:
                self._gate.pause()  # the interface went away under us; retry later
                return
            if n is None:
                return
            if n < NET_HDR_SIZE + ETH_HLEN:
                self.count("tap_rx_runts")
                continue
            # Linux writes the first 10 bytes of a 12-byte header (tun_put_user skips
            # num_buffers): whatever a previous read left there is meaningless.
            self._buf[10:12] = b"\x01\x00"
            frame = view[NET_HDR_SIZE:n]
            if sink.receive(NetHdr.unpack(view), frame):
                self.count("tap_rx_frames")
                self.count("tap_rx_bytes", n - NET_HDR_SIZE)
            else:
                self.count("tap_rx_dropped")

    def close(self) -> None:
        """Stop watching and close the TAP (the interface disappears)."""
        self._gate.stop()
        self.tap.close()


# --------------------------------------------------------------------------- registry


def _options(group: OptionAdder) -> None:
    group.add_argument(
        "--ifname", metavar="NAME", help="tap: the TAP interface to create or attach to (root)"
    )


def _create(args: argparse.Namespace) -> TapBackend:
    ifname: Any = getattr(args, "ifname", None)
    if not ifname:
        raise BackendOptionError("the tap backend needs --ifname NAME")
    try:
        return TapBackend(ifname)
    except (TapError, ValueError) as e:
        raise BackendOptionError(str(e.strerror if isinstance(e, OSError) else e)) from None


register_backend(
    BackendSpec("tap", _create, _options, "a Linux TAP interface (--ifname NAME, root)")
)
