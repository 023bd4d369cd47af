"""Frame channels: messages of Ethernet frames between the L2 switch and its ports.

Theory of operation
-------------------
The switch (``python -m vdev switch``) and every port attached to it (the ``switch``
backend of a net device, a test's client, a stats query) exchange *messages*: one byte
string each. What a message means is the switch's business (:mod:`vdev.switch`); this
module only moves them, over ZeroMQ ``ipc://``:

* :class:`FrameHub` is the switch's end: a bound ``ROUTER``. :meth:`FrameHub.recv`
  returns ``(peer, message)``, where ``peer`` is the routing id ZeroMQ gave the
  sender's connection; :meth:`FrameHub.send` sends a message to one peer.
  ``ROUTER_MANDATORY`` is set, so a send to a peer whose connection is gone is
  *reported* (:attr:`SendStatus.UNROUTABLE`) instead of silently discarded, and a peer
  whose queue is full is reported as :attr:`SendStatus.FULL` -- the send never blocks.
* :class:`FramePort` is a port's end: a connected ``DEALER``. :meth:`FramePort.send`
  never blocks either (``False``: the queue towards the switch is full, the message is
  dropped). ZeroMQ reconnects by itself when the switch process is restarted on the
  same endpoint; the port's :class:`FrameMonitor` (a ZeroMQ socket monitor) reports
  ``"connected"`` / ``"disconnected"`` so the port can drop its carrier and register
  again -- a new switch knows nothing about the ports of the old one.

Every message is a *single* ZeroMQ part. That is cheaper (each part is a call into
libzmq on both ends of every hop) and it keeps a message atomic: a multi-part send
refused half-way leaves a ``DEALER`` silently discarding the *next* message
(libzmq's ``lb_t`` "dropping" mode), which a relay that retries cannot afford.
A message from a peer that has more than one part is counted in ``malformed`` and
dropped; one longer than ``max_message`` bytes makes libzmq drop the connection
(``ZMQ_MAXMSGSIZE``), so a peer cannot make the other side allocate without bound.

Received messages are ZeroMQ frames taken without a copy (``copy=False``):
``msg.buffer`` is a memoryview of the bytes, ``msg.bytes`` a copy. Handing a received
message to :meth:`FrameHub.send` forwards it without copying its bytes (libzmq shares
the reference-counted buffer), which is what the switch does when it relays a frame,
even to many ports. A message given as byte strings (several are joined) is copied
before the call returns, so the caller may reuse its buffers at once (a device's
transmit buffer in shared memory is handed back to the driver right after).

Memory is bounded on both ends: every socket has send and receive high-water marks
(``hwm`` messages, :data:`DEFAULT_HWM`), beyond which sends report "full".

Messages still queued when a socket is closed are not reliably delivered, even with a
linger period (a ``DEALER`` held back by its high-water mark loses its tail on close
with libzmq 4.3): nothing here depends on a "last word" -- the switch notices a port's
end through its process (:class:`PeerProcess`) or a failed send.

A second process binding the same ``ipc://`` path would silently take it over (libzmq
unlinks an existing socket file before it binds), so :class:`FrameHub` first checks with
:func:`unix_socket_in_use` that nobody is listening there and raises
``OSError(EADDRINUSE)`` if someone is.
"""

from __future__ import annotations

import enum
import errno
import os
import select
import socket
from collections.abc import Sequence
from typing import Any, Protocol, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from hostops._zmq import BoundSocket, ipc_path, new_socket
from hostops.errors import ChannelClosed

__all__ = [
    "DEFAULT_HWM",
    "DEFAULT_MAX_MESSAGE",
    "FrameHub",
    "FrameMonitor",
    "FramePort",
    "Part",
    "PeerProcess",
    "SendStatus",
    "unix_socket_in_use",
]

DEFAULT_HWM = 1024
"""Messages queued per connection and direction before sends report "full"."""

DEFAULT_MAX_MESSAGE = 1 << 17
"""Largest message accepted from a peer (bytes); a larger one drops its connection."""

#: Messages :meth:`FrameMonitor.events` reads at most per call (the monitor only ever
#: holds a handful: one per connect / disconnect).
_MONITOR_BATCH = 64


class Part(Protocol):
    """One received message: a ZeroMQ frame (read-only)."""

    @property
    def buffer(self) -> memoryview:
        """The part's bytes, without a copy."""
        ...

    @property
    def bytes(self) -> bytes:
        """A copy of the part's bytes."""
        ...


class SendStatus(enum.IntEnum):
    """What became of one :meth:`FrameHub.send`."""

    SENT = 0
    FULL = 1  # the peer's queue is at its high-water mark: dropped
    UNROUTABLE = 2  # no connection with that routing id (the peer is gone): dropped


_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
#: Parts of one malformed (multi-part) message discarded at most; the rest, if any,
#: is seen as further malformed messages.
_MAX_DISCARD = 64


def _discard_rest(sock: zmq.Socket[bytes]) -> None:
    for _ in range(_MAX_DISCARD):
        try:
            part = sock.recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return
        if not part.more:
            return


def unix_socket_in_use(path: str) -> bool:
    """True if a process accepts connections on the Unix socket file ``path``.

    A missing file, a file that is not a socket, or a socket file nobody listens on (left
    behind by a process that was killed) all count as "not in use"."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


class FrameHub(BoundSocket):
    """The switch's end: a bound ``ROUTER`` that receives from and sends to many ports.

    Not thread-safe: use it from one thread. ``hwm`` bounds the messages queued per
    connection in each direction.
    """

    what = "frame hub"

    def __init__(
        self, endpoint: str, *, hwm: int = DEFAULT_HWM, max_message: int = DEFAULT_MAX_MESSAGE
    ) -> None:
        path = ipc_path(endpoint)
        if path is not None and unix_socket_in_use(path):
            raise OSError(errno.EADDRINUSE, f"{endpoint} is in use by another process")
        super().__init__(
            endpoint,
            zmq.ROUTER,
            {
                zmq.ROUTER_MANDATORY: 1,
                zmq.SNDHWM: hwm,
                zmq.RCVHWM: hwm,
                zmq.MAXMSGSIZE: max_message,
            },
        )
        self.malformed = 0
        """Messages dropped because they had no routing id or no part after it."""

    def recv(self) -> tuple[bytes, Part] | None:
        """One pending message as ``(peer, message)`` without blocking; None if none
        is pending (or the one pending was malformed: counted in :attr:`malformed`)."""
        sock = self._socket()
        try:
            ident = sock.recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return None
        if not ident.more:
            self.malformed += 1
            return None
        msg: Any = sock.recv(_NOBLOCK, copy=False)  # the rest of a message is all there
        if msg.more:
            self.malformed += 1
            _discard_rest(sock)
            return None
        return ident.bytes, msg

    def readable(self) -> bool:
        """True if a message is waiting (cheap: no system call)."""
        return bool(cast(int, self._socket().get(zmq.EVENTS)) & _POLLIN)

    @staticmethod
    def part(data: bytes | bytearray | memoryview) -> Part:
        """``data`` copied once into a message that can then be sent to many peers
        without further copies."""
        frame: Part = zmq.Frame(bytes(data))
        return frame

    def send(
        self, peer: bytes, msg: Part | bytes | Sequence[bytes | bytearray | memoryview]
    ) -> SendStatus:
        """Send one message to ``peer``: a received message (forwarded without a copy),
        a byte string, or a list of byte strings (joined). Never blocks. Returns
        :attr:`SendStatus.FULL` when the peer's queue is at its high-water mark and
        :attr:`SendStatus.UNROUTABLE` when no connection has the routing id ``peer``
        (any more); in both cases nothing was sent."""
        sock = self._socket()
        if isinstance(msg, (list, tuple)):
            msg = b"".join(msg)
        try:
            sock.send(peer, _NOBLOCK_MORE)
        except zmq.Again:
            return SendStatus.FULL
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return SendStatus.UNROUTABLE
            raise
        # Once the routing id is accepted the (single) part cannot be refused.
        sock.send(cast(Any, msg), _NOBLOCK)
        return SendStatus.SENT


class FrameMonitor:
    """Connection events of a :class:`FramePort`: ``"connected"`` / ``"disconnected"``.

    Pollable (a :class:`~hostops.poll.Poller` or a device loop can watch it); call
    :meth:`events` when it is readable."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self._owner: zmq.Socket[bytes] | None = sock
        self._mon: zmq.Socket[bytes] | None = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
        )
        self._mon.setsockopt(zmq.LINGER, 0)

    def events(self) -> list[str]:
        """The events that happened since the last call, oldest first (bounded batch)."""
        mon = self._mon
        if mon is None:
            return []
        out: list[str] = []
        for _ in range(_MONITOR_BATCH):
            try:
                msg: Any = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                break
            event = msg.get("event")
            if event == zmq.EVENT_CONNECTED:
                out.append("connected")
            elif event == zmq.EVENT_DISCONNECTED:
                out.append("disconnected")
        return out

    def _pollable(self) -> zmq.Socket[bytes]:
        if self._mon is None:
            raise ChannelClosed("frame monitor is closed")
        return self._mon

    def fileno(self) -> int:
        """An fd that is readable when events may be pending (ZeroMQ ``ZMQ_FD``:
        edge-triggered; prefer polling the object itself)."""
        return int(self._pollable().get(zmq.FD))

    def close(self) -> None:
        """Stop monitoring and close the monitor socket. Idempotent."""
        mon, self._mon = self._mon, None
        owner, self._owner = self._owner, None
        if mon is not None:
            mon.close(linger=0)
        if owner is not None and not owner.closed:
            try:
                owner.disable_monitor()
            except zmq.ZMQError:
                pass


class FramePort:
    """A port's end: a ``DEALER`` connected to a :class:`FrameHub`.

    ``monitor=True`` (the default) adds :attr:`monitor`, which reports connection events.
    ``hwm`` bounds the messages queued in each direction, ``max_message`` the size of a
    message accepted from the hub. Not thread-safe.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        hwm: int = DEFAULT_HWM,
        monitor: bool = True,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self._endpoint = endpoint
        self.malformed = 0
        """Messages dropped because they had more than one part."""
        sock = new_socket(zmq.DEALER)
        self._sock: zmq.Socket[bytes] | None = sock
        self.monitor: FrameMonitor | None = None
        try:
            sock.setsockopt(zmq.SNDHWM, hwm)
            sock.setsockopt(zmq.RCVHWM, hwm)
            sock.setsockopt(zmq.MAXMSGSIZE, max_message)
            if monitor:
                self.monitor = FrameMonitor(sock)
            sock.connect(endpoint)
        except BaseException:
            self.close()
            raise

    @property
    def endpoint(self) -> str:
        """The endpoint this port connects to."""
        return self._endpoint

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            raise ChannelClosed(f"frame port {self._endpoint} is closed")
        return self._sock

    def send(self, msg: bytes | Sequence[bytes | bytearray | memoryview]) -> bool:
        """Send one message (a list of byte strings is joined into one); False --
        nothing sent -- if the queue to the hub is full. Never blocks; the bytes are
        copied before it returns."""
        if not isinstance(msg, bytes):
            msg = b"".join(msg)
        try:
            # copy=True: a 64 KiB memcpy costs a few µs; pyzmq's zero-copy path hands
            # every large message to its garbage-collector thread, which measured far
            # dearer (a third of the device process's time at 64 KiB frames)
            self._socket().send(msg, _NOBLOCK, copy=True)
        except zmq.Again:
            return False
        return True

    def recv(self) -> Part | None:
        """One pending message without blocking; None if nothing is pending (or the
        one pending had several parts: counted in :attr:`malformed`)."""
        sock = self._socket()
        try:
            msg: Any = sock.recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return None
        if msg.more:
            self.malformed += 1
            _discard_rest(sock)
            return None
        return cast(Part, msg)

    def readable(self) -> bool:
        """True if a message is waiting (cheap: no system call)."""
        return bool(cast(int, self._socket().get(zmq.EVENTS)) & zmq.POLLIN)

    def wait(self, timeout_s: float | None) -> bool:
        """Block up to ``timeout_s`` (None: forever) until a message is waiting."""
        timeout_ms = -1 if timeout_s is None else max(0, int(timeout_s * 1000 + 0.999))
        return bool(self._socket().poll(timeout_ms, zmq.POLLIN))

    def _pollable(self) -> zmq.Socket[bytes]:
        return self._socket()

    def fileno(self) -> int:
        """ZeroMQ's ``ZMQ_FD`` (edge-triggered; prefer polling the object itself)."""
        return int(self._socket().get(zmq.FD))

    def close(self, linger_s: float = 0.0) -> None:
        """Close the monitor and the socket. Messages still queued are dropped, or
        (``linger_s`` > 0) delivered by ZeroMQ's I/O thread for at most that long in
        the background -- ``close`` itself never waits. Idempotent."""
        if self.monitor is not None:
            self.monitor.close()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=max(0, int(linger_s * 1000)))

    def __enter__(self) -> FramePort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FramePort {self._endpoint}{' closed' if self._sock is None else ''}>"


class PeerProcess:
    """Watches a local process by pid (a pidfd): readable once the process has exited.

    The hub uses it for the process a port says it runs in, so that a port whose device
    process dies (SIGKILL included) is removed at once rather than at the next failed
    send. :meth:`open` returns None when the pid cannot be watched (no such process, or
    one in another pid namespace)."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd: int | None = fd

    @classmethod
    def open(cls, pid: int) -> PeerProcess | None:
        """Watch ``pid``; None if it does not exist or cannot be watched."""
        if pid <= 0:
            return None
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            return None
        return cls(pid, fd)

    def gone(self) -> bool:
        """Non-blocking: True once the process has exited."""
        fd = self._fd
        if fd is None:
            return True
        r, _, _ = select.select([fd], [], [], 0)
        return bool(r)

    def _pollable(self) -> int:
        if self._fd is None:
            raise ChannelClosed(f"watch of pid {self.pid} is closed")
        return self._fd

    def fileno(self) -> int:
        """The pidfd (readable once the process has exited)."""
        return self._pollable()

    def close(self) -> None:
        """Close the pidfd. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
