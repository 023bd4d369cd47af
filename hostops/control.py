"""The request/reply control channel (bytes in, bytes out).

Theory of operation
-------------------
Control messages (features, config space, memory table, vring set-up, status, reset) are
synchronous request/reply exchanges in the style of vhost-user. This module moves opaque
byte strings; the msgpack codec lives in ``vdev.virtio``.

* The device side runs a :class:`ControlServer`: a bound ZeroMQ ``ROUTER``.
  :meth:`ControlServer.recv` returns ``(peer, payload)``; ``peer`` is an opaque token that
  must be passed back unchanged to :meth:`ControlServer.reply`.
* The kernel side uses a :class:`ControlClient`: a connected ``DEALER``.
  :meth:`ControlClient.call` sends a request and waits for its reply.

Wire format: the client sends ``[seq, payload]`` where ``seq`` is an 8-byte little-endian
sequence number; the ``ROUTER`` adds the client identity in front. The server's ``peer``
token is ``seq + identity`` and ``reply`` sends ``[identity, seq, payload]`` back. The
client accepts only a reply carrying the ``seq`` of the call in progress, so a late reply
to a call that already timed out is counted in :attr:`ControlClient.stale` and discarded
rather than returned to the next call. Frames of any other shape are counted in
``malformed`` and dropped on both sides; bad input never raises, and no receive loop
takes more than :data:`MAX_SKIP` junk messages in one go.

The client waits in slices of at most 50 ms; between slices it asks the optional
``peer_alive`` callback (typically :meth:`hostops.process.DeviceProcess.alive`) and raises
:class:`~hostops.errors.PeerGone` as soon as the device is known dead, instead of waiting
out the whole deadline; :class:`~hostops.errors.ChannelTimeout` is raised at the deadline.
Neither error closes the client: the caller decides (normally it resets the device).
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable

import zmq

from hostops._zmq import BoundSocket, new_socket
from hostops.errors import ChannelClosed, ChannelTimeout, PeerGone

__all__ = ["ControlServer", "ControlClient", "POLL_SLICE_S", "MAX_SKIP", "MAX_MESSAGE"]

POLL_SLICE_S = 0.05
"""Longest a :meth:`ControlClient.call` waits before re-checking ``peer_alive``."""

_SEQ = struct.Struct("<Q")
_SEQ_LEN = _SEQ.size
_HWM = 10_000

MAX_SKIP = 1024
"""Most malformed requests (server) or stale/malformed replies (client) one receive
call skips before it returns, so a flooding peer cannot hold the receiving loop."""

MAX_MESSAGE = 16 << 20
"""Largest control frame either side accepts (``ZMQ_MAXMSGSIZE``): a peer sending more
is disconnected by ZeroMQ before anything is allocated, so it cannot make us allocate
without bound (the client's call then times out)."""


def _to_ms(timeout_s: float) -> int:
    return max(0, int(timeout_s * 1000 + 0.999))


class ControlServer(BoundSocket):
    """Device side of the control channel: a bound ``ROUTER`` socket.

    Not thread-safe: receive and reply from one thread.
    """

    what = "control server"

    def __init__(self, endpoint: str) -> None:
        super().__init__(
            endpoint,
            zmq.ROUTER,
            {zmq.RCVHWM: _HWM, zmq.SNDHWM: _HWM, zmq.MAXMSGSIZE: MAX_MESSAGE},
        )
        self.malformed = 0
        """Requests dropped because their frames were not ``[identity, seq, payload]``."""

    def recv(self, timeout_s: float | None) -> tuple[bytes, bytes] | None:
        """Wait up to ``timeout_s`` (None: forever) for a request.

        Returns ``(peer, payload)`` or None on timeout. Malformed requests are counted
        and skipped; with a timeout, a call skips at most :data:`MAX_SKIP` of them and
        then returns None as on a timeout (a flood of junk cannot hold the caller: the
        rest waits for the next call, and a poller sees the socket readable again).
        """
        sock = self._socket()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        skipped = 0
        while True:
            if skipped >= MAX_SKIP and deadline is not None:
                return None
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                if deadline is None:
                    sock.poll(-1, zmq.POLLIN)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sock.poll(_to_ms(remaining), zmq.POLLIN):
                    return None
                continue
            if len(frames) != 3 or len(frames[1]) != _SEQ_LEN:
                self.malformed += 1
                skipped += 1
                continue
            identity, seq, payload = frames
            return seq + identity, payload

    def reply(self, peer: bytes, payload: bytes) -> None:
        """Send ``payload`` as the reply to the request that came with ``peer``.

        A reply to a client that has gone away is silently dropped.
        """
        sock = self._socket()
        if len(peer) <= _SEQ_LEN:
            raise ValueError("peer token was not produced by ControlServer.recv")
        try:
            sock.send_multipart([peer[_SEQ_LEN:], peer[:_SEQ_LEN], payload], zmq.NOBLOCK)
        except zmq.Again:
            pass  # the client stopped reading; it will time out


class ControlClient:
    """Kernel side of the control channel: a connected ``DEALER``. Thread-safe.

    ``peer_alive``, if given, is called between 50 ms wait slices; when it returns False
    the call fails with :class:`PeerGone`.
    """

    def __init__(self, endpoint: str, peer_alive: Callable[[], bool] | None = None) -> None:
        self._endpoint = endpoint
        self._peer_alive = peer_alive
        self._lock = threading.Lock()
        self._seq = 0
        self._sock: zmq.Socket[bytes] | None = new_socket(zmq.DEALER)
        try:
            self._sock.setsockopt(zmq.RCVHWM, _HWM)
            self._sock.setsockopt(zmq.SNDHWM, _HWM)
            self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
            self._sock.connect(endpoint)
        except BaseException:
            self._sock.close(linger=0)
            self._sock = None
            raise
        self.stale = 0
        """Late replies (to calls that had already failed) that were discarded."""
        self.malformed = 0
        """Replies dropped because their frames were not ``[seq, payload]``."""

    @property
    def endpoint(self) -> str:
        """The endpoint this client is connected to."""
        return self._endpoint

    def call(self, payload: bytes, timeout_s: float = 5.0) -> bytes:
        """Send ``payload`` and return the reply payload.

        Raises :class:`ChannelTimeout` if no reply arrives within ``timeout_s``,
        :class:`PeerGone` once ``peer_alive`` reports the peer dead, and
        :class:`ChannelClosed` after :meth:`close`.
        """
        with self._lock:
            sock = self._sock
            if sock is None:
                raise ChannelClosed(f"control client {self._endpoint} is closed")
            if self._peer_alive is not None and not self._peer_alive():
                raise PeerGone(f"control peer at {self._endpoint} is gone")
            deadline = time.monotonic() + timeout_s
            self._seq += 1
            seq = _SEQ.pack(self._seq)
            try:
                sock.send_multipart([seq, payload], zmq.NOBLOCK)
            except zmq.Again as exc:
                raise ChannelTimeout(
                    f"control peer at {self._endpoint} is not accepting requests"
                ) from exc
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChannelTimeout(f"no reply from {self._endpoint} within {timeout_s:g} s")
                if sock.poll(_to_ms(min(POLL_SLICE_S, remaining)), zmq.POLLIN):
                    reply = self._recv_reply(sock, seq)
                    if reply is not None:
                        return reply
                    continue
                if self._peer_alive is not None and not self._peer_alive():
                    raise PeerGone(f"control peer at {self._endpoint} died during a call")

    def _recv_reply(self, sock: zmq.Socket[bytes], seq: bytes) -> bytes | None:
        """Take pending replies (at most :data:`MAX_SKIP`: a peer flooding us with stale
        or malformed replies cannot keep :meth:`call` past its deadline); return the
        payload of the one matching ``seq``, or None."""
        for _ in range(MAX_SKIP):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            if len(frames) != 2 or len(frames[0]) != _SEQ_LEN:
                self.malformed += 1
            elif frames[0] != seq:
                self.stale += 1
            else:
                return frames[1]
        return None

    def close(self) -> None:
        """Close the socket. Waits for a call in progress (bounded by its timeout)."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=0)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
