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
* *transmit*: :meth:`SwitchBackend.send` never blocks; the switch completes checksums
  and cuts TSO frames for ports that need it, so :meth:`~SwitchBackend.offloads` is
  ``{"csum", "tso4"}``. Frames are *batched*: the first frame of a round of the device
  loop goes at once, alone, as an ``F | virtio_net_hdr | frame`` message (no added
  latency), and opens a batch window (a zero-delay timer on the device loop); until
  the window closes, on the loop's next round, ``send`` appends ``length |
  virtio_net_hdr | frame`` to a batch instead (the frame's bytes are copied at once, so
  the caller may reuse its buffer). The batch goes to the switch as one ``M`` message
  when the window closes, when it holds :data:`~vdev.switch.BATCH_MAX_FRAMES` frames or
  about :data:`~vdev.switch.BATCH_MAX_BYTES` bytes, and before any control message:
  the frames one drain of the transmit ring hands over cost two messages, two ZeroMQ
  calls on each end and one or two switch wake-ups. A frame too big to share a batch
  goes alone as an ``F`` message. A full queue towards the switch (``hwm`` messages)
  drops the batch (every frame in it counted ``switch_tx_dropped``);
  ``switch_tx_batches`` counts the batch messages sent.
* *receive*: the port is watched through the device loop (:class:`vdev.switch.RxGate`);
  each wake-up handles at most ``rx_budget`` messages, and reads only while
  ``sink.rx_buffers_available()``. Without receive buffers it stops reading: frames
  queue in ZeroMQ up to ``hwm``, then the switch drops them (the port's ``dropped``
  there). A batch message (``M``, which the switch sends because our hello's
  ``accepts`` says ``"batch"``) is handed to the sink record by record; when the
  buffers run out in the middle of one, the rest of it waits (the message is kept,
  with the offset of the next record) and goes first when buffers come back. Records
  are walked with every length checked against the message (a bad one ends the batch,
  counted ``switch_rx_malformed``), at most :data:`~vdev.switch.BATCH_MAX_FRAMES` per
  message. By default the port *accepts* checksum-offloaded and TSO frames as they are
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
``switch_tx_frames``, ``switch_tx_bytes``, ``switch_tx_batches``, ``switch_tx_dropped``
(queue full),
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
    BATCH,
    BATCH_MAX_BYTES,
    BATCH_MAX_FRAMES,
    BATCH_RECORD,
    KIND_BATCH,
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
_K_BATCH = KIND_BATCH[0]
_K_WELCOME = KIND_WELCOME[0]
_K_REGISTER = KIND_REGISTER[0]
_K_ERROR = KIND_ERROR[0]
_FRAME_AT = 1 + NET_HDR_SIZE  # kind byte + virtio_net_hdr

SWITCH_COUNTERS = (
    "switch_tx_frames",
    "switch_tx_bytes",
    "switch_tx_batches",
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
        # the batch being built: its parts (kind byte, then per frame its length and
        # header, and the frame's bytes), frames, bytes, and the flush timer
        self._tx_parts: list[bytes] = [KIND_BATCH]
        self._tx_frames = 0
        self._tx_bytes = 0
        self._tx_payload = 0
        self._tx_timer: Any = None
        # the rest of a batch message received while the driver had no buffers left:
        # (message view, offset of the next record, records walked so far)
        self._rx_rest: tuple[Any, memoryview, int, int] | None = None
        self._rx_timer: Any = None
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
        if self._rx_rest is not None and self._rx_timer is None and self.sink is not None:
            self._rx_timer = self.sink.call_later(0.0, self._rx_again)

    def _rx_again(self) -> None:
        self._rx_timer = None
        self._on_readable()

    # ------------------------------------------------------------------ internals
    def _hello(self) -> None:
        self.flush()
        msg = encode_hello(
            name=self.port_name, mac=self.mac, accepts=self.accepts | {BATCH}, pid=os.getpid()
        )
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
        """Queue one frame for the switch (in the current batch; see the module
        docstring); False (counted) without link or when the queue is full. Never
        blocks; ``frame`` is copied before it returns."""
        if not self.link_up:
            self.count("switch_tx_no_link")
            return False
        n = len(frame)
        if self._tx_timer is None and self.sink is not None:
            # the first frame of a round goes at once (no added latency) and opens the
            # batch window: what follows in the same round of the device loop is batched
            self._tx_timer = self.sink.call_later(0.0, self._flush_due)
            big = True
        else:
            big = n + BATCH_RECORD > BATCH_MAX_BYTES
        if big:  # alone (after the batch, if any)
            self.flush(keep_window=True)
            if not self._port.send((KIND_FRAME, hdr.pack(), frame)):
                self.count("switch_tx_dropped")
                return False
            self.count("switch_tx_frames")
            self.count("switch_tx_bytes", n)
            return True
        if self._tx_bytes + n + BATCH_RECORD > BATCH_MAX_BYTES:
            self.flush(keep_window=True)
        parts = self._tx_parts
        parts.append(n.to_bytes(4, "little") + hdr.pack())
        parts.append(frame if type(frame) is bytes else bytes(frame))
        self._tx_frames += 1
        self._tx_bytes += n + BATCH_RECORD
        self._tx_payload += n
        if self._tx_frames >= BATCH_MAX_FRAMES:
            self.flush(keep_window=True)
        return True

    def _flush_due(self) -> None:
        self._tx_timer = None
        self.flush()

    def flush(self, *, keep_window: bool = False) -> bool:
        """Send the batch being built now (nothing to send: True). False if the queue
        to the switch was full: its frames are dropped and counted. The batch window
        closes too unless ``keep_window``."""
        if self._tx_timer is not None and not keep_window:
            self._tx_timer.cancel()
            self._tx_timer = None
        frames = self._tx_frames
        if not frames:
            return True
        parts, self._tx_parts = self._tx_parts, [KIND_BATCH]
        payload = self._tx_payload
        self._tx_frames = self._tx_bytes = self._tx_payload = 0
        if not self.link_up:
            self.count("switch_tx_no_link", frames)
            return False
        if not self._port.send(parts):
            self.count("switch_tx_dropped", frames)
            return False
        self.count("switch_tx_batches")
        self.count("switch_tx_frames", frames)
        self.count("switch_tx_bytes", payload)
        return True

    def _on_readable(self) -> None:
        sink = self.sink
        if sink is None:
            return
        rest, self._rx_rest = self._rx_rest, None
        if rest is not None and not self._rx_batch(sink, *rest):
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
            elif kind == _K_BATCH:
                if not self._rx_batch(sink, msg, buf, 1, 0):
                    return
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

    def _rx_batch(self, sink: FrameSink, msg: Any, buf: memoryview, off: int, walked: int) -> bool:
        """Hand the records of a batch message from ``off`` on to ``sink``; False if
        the receive buffers ran out first (the rest is kept for later)."""
        total = len(buf)
        while off < total:  # bounded: at most BATCH_MAX_FRAMES records per message
            if walked >= BATCH_MAX_FRAMES or total - off < BATCH_RECORD:
                self.count("switch_rx_malformed")  # the switch's fault: the rest is dropped
                return True
            n = int.from_bytes(buf[off : off + 4], "little")
            end = off + BATCH_RECORD + n
            if end > total:  # the record's length runs past the message
                self.count("switch_rx_malformed")
                return True
            if self.link_up and not sink.rx_buffers_available():
                self._rx_rest = (msg, buf, off, walked)
                self.count("switch_rx_paused")
                self._gate.pause()
                if self._rx_timer is None:
                    self._rx_timer = sink.call_later(self._gate.retry_s, self._rx_again)
                return False
            walked += 1
            frame = buf[off + BATCH_RECORD : end]
            if sink.receive(NetHdr.unpack(buf, off + 4), frame):
                self.count("switch_rx_frames")
                self.count("switch_rx_bytes", n)
            else:
                self.count("switch_rx_dropped")
            off = end
        return True

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
            self.flush()
            self._port.send(KIND_BYE)
        for t in (self._tx_timer, self._rx_timer):
            if t is not None:
                t.cancel()
        self._tx_timer = self._rx_timer = None
        self._rx_rest = None
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
