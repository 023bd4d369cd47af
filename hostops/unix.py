"""Unix stream sockets that carry file descriptors (the vhost-user transport).

Theory of operation
-------------------
:class:`UnixServer` binds a listening ``AF_UNIX``/``SOCK_STREAM`` socket at a path and
hands out one :class:`UnixConnection` per :meth:`~UnixServer.accept`. The socket file
is made 0600 right after ``bind`` (only our user may connect); a *stale* socket file
left by a dead process is removed first (we try to connect to it: refused means
nobody listens), while a live one or a file that is not a socket is never touched.
:meth:`UnixServer.close` removes the socket file if it is still the one we created.

:meth:`UnixConnection.recv_message` reads *exactly* ``size`` bytes within a deadline
and returns the file descriptors that came with them (``SCM_RIGHTS``, received with
``MSG_CMSG_CLOEXEC`` so they never leak into child processes). The fd rules are strict
so that a peer can never make us leak descriptors:

* more fds than the caller allows, or a truncated control message (``MSG_CTRUNC``):
  every fd received is closed and :class:`BadAncillaryData` is raised;
* any error after fds were received closes them before raising.

End of stream is :class:`~hostops.errors.PeerGone`, a missed deadline
:class:`~hostops.errors.ChannelTimeout`; both (and ``BadAncillaryData``) are
:class:`~hostops.errors.TransportError`: the connection is unusable, close it.

Both classes are pollable (``_pollable()`` returns the fd) for :class:`hostops.Poller`.
:meth:`UnixConnection.peer_pid` reports the peer process (``SO_PEERCRED``).
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Sequence

from hostops.errors import ChannelClosed, ChannelTimeout, PeerGone, TransportError

__all__ = ["UnixServer", "UnixConnection", "BadAncillaryData", "DEFAULT_TIMEOUT_S"]

#: How long the rest of a message may take once it has started (seconds).
DEFAULT_TIMEOUT_S = 5.0
_MAX_FDS_LIMIT = 253  # SCM_MAX_FD


class BadAncillaryData(TransportError):
    """The peer sent more file descriptors than allowed, or a truncated control
    message. Every fd that arrived has been closed."""


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _wait(sock: socket.socket, events: int, deadline: float) -> None:
    p = select.poll()
    p.register(sock.fileno(), events)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ChannelTimeout("unix socket: timed out")
        if p.poll(max(1, int(left * 1000))):
            return


class UnixConnection:
    """One connected stream socket (non-blocking underneath; every call has a deadline)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock

    @classmethod
    def connect(cls, path: str, timeout: float = DEFAULT_TIMEOUT_S) -> UnixConnection:
        """Connect to the server at ``path`` (for front-ends and tests)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise PeerGone(f"connect {path}: {e.strerror or e}") from None
        return cls(sock)

    def _s(self) -> socket.socket:
        if self._sock is None:
            raise ChannelClosed("unix connection is closed")
        return self._sock

    def fileno(self) -> int:
        """The socket's fd."""
        return self._s().fileno()

    def _pollable(self) -> int:
        return self._s().fileno()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._sock is None

    def recv_message(
        self, size: int, max_fds: int = 0, timeout: float | None = DEFAULT_TIMEOUT_S
    ) -> tuple[bytes, list[int]]:
        """Read exactly ``size`` bytes and the fds sent with them (at most ``max_fds``).

        ``timeout`` bounds the whole read (None: no bound). Raises PeerGone at end of
        stream (even mid-message), ChannelTimeout, BadAncillaryData; fds received before
        an error are closed. The caller owns the returned fds.
        """
        sock = self._s()
        if size < 0 or not 0 <= max_fds <= _MAX_FDS_LIMIT:
            raise ValueError(f"bad size {size} / max_fds {max_fds}")
        if size == 0:
            return b"", []
        deadline = float("inf") if timeout is None else time.monotonic() + timeout
        # Room for one fd more than allowed, so that "too many" is seen, not truncated.
        cmsg_room = socket.CMSG_SPACE((max_fds + 1) * 4)
        chunks: list[bytes] = []
        got = 0
        fds: list[int] = []
        try:
            while got < size:
                try:
                    data, ancdata, flags, _ = sock.recvmsg(
                        size - got,
                        cmsg_room,
                        socket.MSG_CMSG_CLOEXEC,
                    )
                except (BlockingIOError, InterruptedError):
                    _wait(sock, select.POLLIN, deadline)
                    continue
                except OSError as e:
                    raise PeerGone(f"unix socket: {e.strerror or e}") from None
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        arr = array.array("i")
                        arr.frombytes(payload[: len(payload) - len(payload) % 4])
                        fds.extend(arr)
                if flags & socket.MSG_CTRUNC:
                    raise BadAncillaryData(f"control message truncated (more than {max_fds} fds?)")
                if len(fds) > max_fds:
                    raise BadAncillaryData(f"peer sent {len(fds)} fds, at most {max_fds} allowed")
                if not data:
                    raise PeerGone(
                        "peer closed the connection"
                        + (f" after {got} of {size} bytes" if got else "")
                    )
                chunks.append(data)
                got += len(data)
        except BaseException:
            _close_all(fds)
            raise
        return b"".join(chunks), fds

    def peer_pid(self) -> int | None:
        """The pid of the process at the other end (``SO_PEERCRED``: the process that
        connected or listened, as of ``connect``/``accept``), or None if the host cannot
        say."""
        try:
            raw = self._s().getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except (OSError, AttributeError):
            return None
        pid = int(struct.unpack("3i", raw)[0])
        return pid if pid > 0 else None

    def recv_ready(self) -> bool:
        """True if at least one byte (or end of stream) can be read now."""
        p = select.poll()
        p.register(self._s().fileno(), select.POLLIN)
        return bool(p.poll(0))

    def send(
        self, data: bytes, fds: Sequence[int] = (), timeout: float | None = DEFAULT_TIMEOUT_S
    ) -> None:
        """Send all of ``data``; ``fds`` go with its first byte. Raises PeerGone or
        ChannelTimeout. The caller keeps ownership of ``fds``."""
        sock = self._s()
        deadline = float("inf") if timeout is None else time.monotonic() + timeout
        view = memoryview(data)
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        while view:
            try:
                n = sock.sendmsg([view], anc)
            except (BlockingIOError, InterruptedError):
                _wait(sock, select.POLLOUT, deadline)
                continue
            except OSError as e:
                raise PeerGone(f"unix socket: {e.strerror or e}") from None
            view = view[n:]
            anc = []

    def close(self) -> None:
        """Close the socket. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> UnixConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UnixServer:
    """A listening Unix stream socket at ``path`` (0600; stale socket files replaced)."""

    def __init__(self, path: str, backlog: int = 4) -> None:
        self.path = path
        self._remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(backlog)
            sock.setblocking(False)
            self._ino = os.stat(path).st_ino
        except OSError:
            sock.close()
            raise
        self._sock: socket.socket | None = sock

    @staticmethod
    def _remove_stale(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)  # nobody listens: a leftover of a dead process
            except FileNotFoundError:
                pass
            return
        except OSError:
            pass
        finally:
            probe.close()
        raise FileExistsError(errno.EADDRINUSE, "a server is listening there", path)

    def fileno(self) -> int:
        """The listening socket's fd."""
        if self._sock is None:
            raise ChannelClosed("unix server is closed")
        return self._sock.fileno()

    def _pollable(self) -> int:
        return self.fileno()

    def accept(self, timeout: float | None = 0.0) -> UnixConnection | None:
        """The next connection, or None if none arrived within ``timeout`` seconds."""
        if self._sock is None:
            raise ChannelClosed("unix server is closed")
        deadline = float("inf") if timeout is None else time.monotonic() + timeout
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                if time.monotonic() >= deadline:
                    return None
                try:
                    _wait(self._sock, select.POLLIN, deadline)
                except ChannelTimeout:
                    return None
                continue
            conn.setblocking(False)
            return UnixConnection(conn)

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.close()
        finally:
            try:
                if os.lstat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
            except OSError:
                pass

    def __enter__(self) -> UnixServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
