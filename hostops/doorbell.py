"""ZeroMQ doorbells: the driver's *kick* and the device's *call*.

Theory of operation
-------------------
A doorbell carries no data, only "queue N has something for you". On the wire it is one
ZeroMQ message of exactly 2 bytes: the little-endian ``u16`` queue index. Several queues
share one endpoint, so one socket (and one poll entry) serves a whole device.

* :class:`DoorbellListener` binds a ``PULL`` socket; the side being notified owns it.
  :meth:`DoorbellListener.recv_all` takes what is pending without blocking (at most
  :data:`RECV_BATCH` messages per call: the rest stay queued, and the poller reports the
  socket ready again) and returns the distinct queue indices in first-arrival order -- a
  doorbell is level-triggered ("look at queue N"), so two kicks for the same queue need
  one look. Malformed messages are counted in :attr:`DoorbellListener.malformed` and
  dropped; a hostile peer cannot make the listener raise.
* :class:`Doorbell` connects a ``PUSH`` socket. :meth:`Doorbell.ring` never blocks: the
  send high-water mark is large (100 000 doorbells) and sends are ``NOBLOCK``; when that
  queue is full the peer has been gone for a long time and :class:`~hostops.errors.PeerGone`
  is raised. ``ZMQ_IMMEDIATE`` is deliberately *not* set, so rings made before the
  listener has bound are queued and delivered once it does.

All sockets come from the one process-wide context and have ``LINGER 0``, so ``close``
never hangs. The price: ``ring`` only queues the message for ZeroMQ's I/O thread, so a
doorbell rung immediately before :meth:`Doorbell.close` or process exit may never be
delivered. That is harmless for virtio -- the ring indices in shared memory are the truth
and the peer re-checks them -- but a process must not use a doorbell as its last word.
A listener removes its ``ipc://`` socket file when closed.
"""

from __future__ import annotations

import struct
import threading
from typing import cast

import zmq

from hostops._zmq import BoundSocket, new_socket
from hostops.errors import ChannelClosed, PeerGone

__all__ = ["DoorbellListener", "Doorbell", "HIGH_WATER_MARK", "RECV_BATCH"]

HIGH_WATER_MARK = 100_000
"""Doorbells queued per socket before :meth:`Doorbell.ring` reports the peer gone."""

RECV_BATCH = 4096
"""Most messages one :meth:`DoorbellListener.recv_all` takes (the rest wait a round)."""

_U16 = struct.Struct("<H")
_MAX_MESSAGE = 64  # bytes: anything larger disconnects the sender


class DoorbellListener(BoundSocket):
    """The receiving end of one or more doorbells: a bound ``PULL`` socket.

    Not thread-safe: receive from a single thread (typically the one that polls it).
    """

    what = "doorbell listener"

    def __init__(self, endpoint: str) -> None:
        # MAXMSGSIZE: a doorbell is 2 bytes; a peer pushing big messages is cut off by
        # ZeroMQ instead of making us queue up to RCVHWM of them in memory
        super().__init__(
            endpoint, zmq.PULL, {zmq.RCVHWM: HIGH_WATER_MARK, zmq.MAXMSGSIZE: _MAX_MESSAGE}
        )
        self.malformed = 0
        """Messages dropped because they were not exactly one 2-byte frame."""
        self.received = 0
        """Valid doorbell messages received (duplicates included)."""

    def recv_all(self, limit: int = RECV_BATCH) -> list[int]:
        """Take the pending doorbells without blocking, at most ``limit`` messages (a
        flooding peer cannot hold the caller here); return distinct queue indices.

        Indices are in order of first arrival; an empty list means nothing was pending.
        Messages beyond ``limit`` stay queued for the next call, and no wake-up is lost:
        a :class:`hostops.poll.Poller` (``zmq_poll`` on the socket itself, which
        re-reads ``ZMQ_EVENTS``) reports the socket readable again at once while any
        remain. Only a caller waiting on the raw ``ZMQ_FD`` (edge-triggered) would have
        to re-check :attr:`pending` before sleeping.
        """
        sock = self._socket()
        seen: dict[int, None] = {}
        events = sock.get
        # Ask ZMQ_EVENTS before each receive: ending the loop on zmq.Again would cost
        # an exception per wake-up.
        for _ in range(max(1, limit)):
            if not cast(int, events(zmq.EVENTS)) & zmq.POLLIN:
                break
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 1 or len(frames[0]) != 2:
                self.malformed += 1
                continue
            self.received += 1
            seen[_U16.unpack(frames[0])[0]] = None
        return list(seen)

    @property
    def pending(self) -> bool:
        """True if messages are waiting (e.g. left over by a bounded :meth:`recv_all`)."""
        return bool(cast(int, self._socket().get(zmq.EVENTS)) & zmq.POLLIN)

    def wait(self, timeout_s: float | None) -> list[int]:
        """Block up to ``timeout_s`` seconds (None: forever) for a doorbell, then drain.

        Returns an empty list on timeout.
        """
        sock = self._socket()
        timeout_ms = -1 if timeout_s is None else max(0, int(timeout_s * 1000 + 0.999))
        if sock.poll(timeout_ms, zmq.POLLIN):
            return self.recv_all()
        return []

    def __repr__(self) -> str:
        return f"<DoorbellListener {self._endpoint}{' closed' if self._sock is None else ''}>"


class Doorbell:
    """The ringing end of a doorbell: a connected ``PUSH`` socket. Thread-safe.

    ``high_water_mark`` (default :data:`HIGH_WATER_MARK`) bounds how many doorbells may
    wait for the peer before :meth:`ring` gives up with :class:`PeerGone`.
    """

    def __init__(self, endpoint: str, *, high_water_mark: int = HIGH_WATER_MARK) -> None:
        self._endpoint = endpoint
        self._lock = threading.Lock()
        self._sock: zmq.Socket[bytes] | None = new_socket(zmq.PUSH)
        try:
            self._sock.setsockopt(zmq.SNDHWM, high_water_mark)
            self._sock.connect(endpoint)
        except BaseException:
            self._sock.close(linger=0)
            self._sock = None
            raise
        self._hwm = high_water_mark
        self._payloads: dict[int, bytes] = {}  # queue index -> its 2-byte message
        self.rung = 0
        """Doorbells sent successfully."""

    @property
    def endpoint(self) -> str:
        """The endpoint this doorbell rings."""
        return self._endpoint

    def ring(self, queue_index: int) -> None:
        """Notify the listener about ``queue_index`` (0..65535). Never blocks.

        Raises :class:`PeerGone` if the peer has not drained the queued doorbells,
        :class:`ChannelClosed` after :meth:`close`, ValueError for a bad index.
        """
        payload = self._payloads.get(queue_index)
        if payload is None:
            if not 0 <= queue_index <= 0xFFFF:
                raise ValueError(f"queue index must be in 0..65535, got {queue_index}")
            payload = _U16.pack(queue_index)
            if len(self._payloads) < 64:
                self._payloads[queue_index] = payload
        with self._lock:
            sock = self._sock
            if sock is None:
                raise ChannelClosed(f"doorbell {self._endpoint} is closed")
            try:
                sock.send(payload, zmq.NOBLOCK)
            except zmq.Again as exc:
                raise PeerGone(
                    f"doorbell {self._endpoint}: {self._hwm} doorbells undelivered"
                ) from exc
            self.rung += 1

    def close(self) -> None:
        """Close the socket, dropping undelivered doorbells. Idempotent, never blocks.

        Doorbells still queued (e.g. rung just before) are discarded.
        """
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=0)

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Doorbell {self._endpoint}{' closed' if self._sock is None else ''}>"
