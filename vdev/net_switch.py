"""The ``switch`` net backend: a virtio-net device as one port of the L2 switch.

    python -m vdev.switch --listen ipc:///path/sw.sock &
    python -m vdev net --backend switch --switch ipc:///path/sw.sock --control ...

Theory of operation
-------------------
:class:`SwitchBackend` connects a :class:`hostops.framechan.FramePort` (a ZeroMQ
``DEALER``) to the switch's endpoint and speaks the protocol of :mod:`vdev.switch`:

* *registration*: when the connection is up (the port's socket monitor says
  ``connected``) it sends a hello with the port's name, MAC, process id and the
  offloads it accepts; the switch's welcome brings the link up
  (``sink.set_link(True)``). Until then, and whenever the link is down, transmitted
  frames are dropped and counted — a NIC without carrier. The MAC is the one given,
  else the device's own (``sink.mac`` when the sink is a :class:`vdev.net.NetDevice`).
* *transmit*: :meth:`SwitchBackend.send` sends ``F | virtio_net_hdr | frame`` without
  blocking; the switch completes checksums and cuts TSO frames for ports that need it,
  so :meth:`~SwitchBackend.offloads` is ``{"csum", "tso4"}``. A full queue towards the
  switch (``hwm`` frames) drops the frame.
* *receive*: the port is watched through the device loop (:class:`vdev.switch.RxGate`);
  each wake-up handles at most ``rx_budget`` messages, and reads only while
  ``sink.rx_buffers_available()``. Without receive buffers it stops reading: frames
  queue in ZeroMQ up to ``hwm``, then the switch drops them (the port's ``dropped``
  there). By default the port *accepts* checksum-offloaded and TSO frames as they are
  (``accepts``): the net device shapes every received frame for what its driver
  negotiated (§5.1.6.4.1), in its own process, which spreads that work over the
  devices instead of loading the one switch process. A port created with
  ``accepts=frozenset()`` (or :meth:`~SwitchBackend.set_rx_offloads`) makes the switch
  do it instead.
* *the switch goes away*: the monitor reports ``disconnected``: link down
  (``sink.set_link(False)``). ZeroMQ keeps trying to reconnect to the same endpoint
  (every 100 ms); when a switch listens there again the monitor reports ``connected``,
  the backend registers anew, and the new switch's welcome brings the link back up. A
  switch that receives frames from a connection it does not know (restarted between
  two monitor events) answers "register again", which has the same effect.

Counters (``counters``, and through ``sink.count`` the device's metrics):
``switch_tx_frames``, ``switch_tx_bytes``, ``switch_tx_dropped`` (queue full),
``switch_tx_no_link``, ``switch_rx_frames``, ``switch_rx_bytes``, ``switch_rx_dropped``
(the device refused it), ``switch_rx_malformed``, ``switch_rx_paused``,
``switch_registrations``, ``switch_link_changes``, ``switch_refused``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import msgpack

from hostops.framechan import DEFAULT_HWM, FramePort
from vdev.net import BackendOptionError, BackendSpec, OptionAdder, register_backend
from vdev.netbackend import FrameSink, NetBackend
from vdev.switch import (
    KIND_BYE,
    KIND_ERROR,
    KIND_FRAME,
    KIND_REGISTER,
    KIND_WELCOME,
    OFFLOADS,
    RxGate,
    encode_hello,
)
from vdev.virtio.net import NET_HDR_SIZE, NetHdr

__all__ = ["SwitchBackend", "SWITCH_COUNTERS"]

_K_FRAME = KIND_FRAME[0]
_K_WELCOME = KIND_WELCOME[0]
_K_REGISTER = KIND_REGISTER[0]
_K_ERROR = KIND_ERROR[0]
_FRAME_AT = 1 + NET_HDR_SIZE  # kind byte + virtio_net_hdr

SWITCH_COUNTERS = (
    "switch_tx_frames",
    "switch_tx_bytes",
    "switch_tx_dropped",
    "switch_tx_no_link",
    "switch_rx_frames",
    "switch_rx_bytes",
    "switch_rx_dropped",
    "switch_rx_malformed",
    "switch_rx_paused",
    "switch_registrations",
    "switch_link_changes",
    "switch_refused",
)


class SwitchBackend(NetBackend):
    """A port of the switch listening at ``endpoint`` (``ipc://...``).

    ``mac`` (six bytes) is registered with the switch so that frames for it are not
    flooded (default: the device's MAC); ``port_name`` names the port in the switch's
    statistics (default ``net-<pid>``); ``accepts`` the offloaded frames it takes as
    they are; ``rx_budget`` bounds the messages handled per wake-up; ``hwm`` the frames
    queued in each direction. Connecting never fails: the link stays down until a
    switch answers.
    """

    name = "switch"

    def __init__(
        self,
        endpoint: str,
        *,
        mac: bytes | None = None,
        port_name: str = "",
        accepts: frozenset[str] = OFFLOADS,
        rx_budget: int = 64,
        hwm: int = DEFAULT_HWM,
    ) -> None:
        super().__init__()
        if not endpoint.startswith("ipc://") or len(endpoint) <= len("ipc://"):
            raise ValueError(f"not an ipc:// endpoint: {endpoint!r}")
        if mac is not None and (len(mac) != 6 or mac[0] & 1):
            raise ValueError("mac must be six bytes of a unicast address")
        self.endpoint = endpoint
        self.mac = mac
        self.port_name = port_name or f"net-{os.getpid()}"
        self.rx_budget = max(1, rx_budget)
        self.counters: dict[str, int] = dict.fromkeys(SWITCH_COUNTERS, 0)
        self.accepts = _valid(accepts)
        self.link_up = False
        self.port_number: int | None = None
        """The switch's number for this port (from its welcome), None while unregistered."""
        self.last_error = ""
        """The switch's message if it refused our hello."""
        self._connected = False
        self._port = FramePort(endpoint, hwm=hwm)
        assert self._port.monitor is not None
        self._monitor = self._port.monitor
        self._gate = RxGate(self._port, self._on_readable)

    def offloads(self) -> frozenset[str]:
        """The switch finishes offloads per destination: ``{"csum", "tso4"}``."""
        return OFFLOADS

    def attach(self, sink: FrameSink) -> None:
        """Start: link down until the switch welcomes us; watch the port and its
        connection events on ``sink``'s loop."""
        super().attach(sink)
        if self.mac is None:
            mac = getattr(sink, "mac", None)
            if isinstance(mac, bytes) and len(mac) == 6 and not mac[0] & 1:
                self.mac = mac
        sink.set_link(False)
        sink.watch(self._monitor, self._on_monitor)
        self._gate.start(sink)
        self._on_monitor()  # events that arrived before the watch

    def set_rx_offloads(self, offloads: frozenset[str]) -> None:
        """Change what the port accepts as it is (``"csum"``, ``"tso4"``; TSO only with
        csum) and tell the switch (a new hello)."""
        a = _valid(offloads)
        if a == self.accepts:
            return
        self.accepts = a
        if self._connected:
            self._hello()

    def resume_rx(self) -> None:
        """The driver added receive buffers: read again now (otherwise the backend
        looks again a couple of milliseconds after it ran out)."""
        self._gate.resume()

    # ------------------------------------------------------------------ internals
    def _hello(self) -> None:
        msg = encode_hello(name=self.port_name, mac=self.mac, accepts=self.accepts, pid=os.getpid())
        if self._port.send(msg):
            self.count("switch_registrations")

    def _set_link(self, up: bool) -> None:
        if up == self.link_up:
            return
        self.link_up = up
        self.count("switch_link_changes")
        if self.sink is not None:
            self.sink.set_link(up)

    def _on_monitor(self) -> None:
        for event in self._monitor.events():
            if event == "connected":
                self._connected = True
                self._hello()
            elif event == "disconnected":
                self._connected = False
                self.port_number = None
                self._set_link(False)

    def send(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """Send one frame to the switch; False (counted) without link or when the
        queue is full. Never blocks."""
        if not self.link_up:
            self.count("switch_tx_no_link")
            return False
        if not self._port.send((KIND_FRAME, hdr.pack(), frame)):
            self.count("switch_tx_dropped")
            return False
        self.count("switch_tx_frames")
        self.count("switch_tx_bytes", len(frame))
        return True

    def _on_readable(self) -> None:
        sink = self.sink
        if sink is None:
            return
        port = self._port
        for _ in range(self.rx_budget):
            # Back-pressure only once the switch has welcomed us: until then the next
            # message is the welcome (a control message), which must not wait for the
            # driver's receive buffers.
            if self.link_up and not sink.rx_buffers_available():
                self.count("switch_rx_paused")
                self._gate.pause()
                return
            malformed = port.malformed
            msg = port.recv()
            if msg is None:
                if port.malformed != malformed:
                    self.count("switch_rx_malformed")  # a multi-part message, skipped
                    continue
                return
            buf = msg.buffer
            kind = buf[0] if len(buf) else -1
            if kind == _K_FRAME:
                if len(buf) < _FRAME_AT:
                    self.count("switch_rx_malformed")
                    continue
                frame = buf[_FRAME_AT:]
                if sink.receive(NetHdr.unpack(buf, 1), frame):
                    self.count("switch_rx_frames")
                    self.count("switch_rx_bytes", len(frame))
                else:
                    self.count("switch_rx_dropped")
            elif kind == _K_WELCOME:
                self._on_welcome(bytes(buf[1:]))
            elif kind == _K_REGISTER:
                self.port_number = None
                self._set_link(False)
                self._hello()
            elif kind == _K_ERROR:
                self.count("switch_refused")
                self.last_error = bytes(buf[1:]).decode(errors="replace")
                print(f"switch port: refused by the switch: {self.last_error}", file=sys.stderr)
                self._set_link(False)
            else:
                self.count("switch_rx_malformed")

    def _on_welcome(self, payload: bytes) -> None:
        try:
            body = msgpack.unpackb(payload, raw=False)
            number = int(body["port"])
        except Exception:
            self.count("switch_rx_malformed")
            return
        self.port_number = number
        self._set_link(True)

    def close(self) -> None:
        """Say bye (best effort: the switch also notices the process or the connection
        going), stop watching and close the connection."""
        if self._connected:
            self._port.send(KIND_BYE)
        self._gate.stop()
        if self.sink is not None:
            self.sink.unwatch(self._monitor)
        self._port.close(linger_s=0.1)
        self.link_up = False


def _valid(accepts: frozenset[str]) -> frozenset[str]:
    a = frozenset(accepts) & OFFLOADS
    return a if "csum" in a else frozenset()


# --------------------------------------------------------------------------- registry


def _options(group: OptionAdder) -> None:
    group.add_argument(
        "--switch",
        metavar="ENDPOINT",
        help="switch: the ipc:// endpoint of a running 'python -m vdev.switch'",
    )


def _create(args: argparse.Namespace) -> SwitchBackend:
    endpoint: Any = getattr(args, "switch", None)
    if not endpoint:
        raise BackendOptionError("the switch backend needs --switch ENDPOINT")
    mac: Any = getattr(args, "mac", None)
    try:
        return SwitchBackend(endpoint, mac=mac if isinstance(mac, bytes) else None)
    except ValueError as e:
        raise BackendOptionError(str(e)) from None


register_backend(
    BackendSpec("switch", _create, _options, "a port of the L2 switch (--switch ENDPOINT)")
)
