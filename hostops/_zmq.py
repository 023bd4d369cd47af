"""Private ZeroMQ plumbing: the one process-wide context and socket set-up.

Every socket is created with ``LINGER 0`` so closing it (and terminating the context at
interpreter exit) never waits for undelivered messages.
"""

from __future__ import annotations

import os
from typing import Any, Self

import zmq

from hostops.errors import ChannelClosed

__all__ = ["context", "new_socket", "ipc_path", "IpcFile", "BoundSocket"]


def context() -> zmq.Context[zmq.Socket[bytes]]:
    """Return the process-wide ZeroMQ context (created on first use)."""
    return zmq.Context.instance()


def new_socket(kind: int) -> zmq.Socket[bytes]:
    """Create a socket of type ``kind`` with ``LINGER 0``."""
    sock: zmq.Socket[bytes] = context().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def ipc_path(endpoint: str) -> str | None:
    """Return the file path of an ``ipc://`` endpoint, or None for other transports."""
    if endpoint.startswith("ipc://"):
        return endpoint[len("ipc://") :]
    return None


class IpcFile:
    """Remembers the socket file a bind created so it can be removed on close.

    libzmq 4.3 does not unlink the file itself. We remove it only if the path still
    names the very file we bound (same device and inode), so a newer listener that
    re-bound the same endpoint is never disturbed.
    """

    def __init__(self, endpoint: str) -> None:
        self._path = ipc_path(endpoint)
        self._ident: tuple[int, int] | None = None
        if self._path is not None:
            try:
                st = os.lstat(self._path)
                self._ident = (st.st_dev, st.st_ino)
            except OSError:
                self._path = None

    def remove(self) -> None:
        """Unlink the socket file if it is still ours. Never raises."""
        if self._path is None or self._ident is None:
            return
        try:
            st = os.lstat(self._path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self._path)
        except OSError:
            pass
        self._path = None


class BoundSocket:
    """A socket this side binds (the listening end of a channel): bind with options,
    closed-state checks, ``close()`` that also removes the ``ipc://`` file, poller and
    context-manager support. Subclasses add what they receive and send."""

    #: What the socket is, for messages ("control server", "doorbell listener").
    what = "socket"

    def __init__(self, endpoint: str, kind: int, options: dict[int, Any]) -> None:
        self._endpoint = endpoint
        self._sock: zmq.Socket[bytes] | None = new_socket(kind)
        try:
            for opt, value in options.items():
                self._sock.setsockopt(opt, value)
            self._sock.bind(endpoint)
        except BaseException:
            self._sock.close(linger=0)
            self._sock = None
            raise
        self._ipc_file = IpcFile(endpoint)

    @property
    def endpoint(self) -> str:
        """The endpoint this socket is bound to."""
        return self._endpoint

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            raise ChannelClosed(f"{self.what} {self._endpoint} is closed")
        return self._sock

    def _pollable(self) -> zmq.Socket[bytes]:
        return self._socket()

    def close(self) -> None:
        """Close the socket and remove its ``ipc://`` file. Idempotent, never blocks."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=0)
            self._ipc_file.remove()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
