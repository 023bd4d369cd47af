"""Waiting on several things at once: a self-pipe waker and a unified poller.

Theory of operation
-------------------
A device or kernel thread usually waits on several sources: doorbell sockets, the control
socket, the death of a peer process (a pidfd), the death of the parent (a pipe) and a
request from another thread to stop. :class:`Poller` waits on all of them with one
``zmq_poll`` call, which accepts ZeroMQ sockets and plain file descriptors alike.

Anything ``hostops`` hands out that can be waited on exposes ``_pollable()``, returning
either a ZeroMQ socket or an ``int`` fd. :meth:`Poller.register` takes the *object*;
:meth:`Poller.poll` returns the registered objects that are ready, in registration order.
"Ready" means readable -- and, for plain fds, also hang-up or error, since those are how a
closed pipe or an exited process's pidfd announce themselves (``zmq_poll`` reports a pipe
hang-up as ``POLLERR``, not ``POLLIN``).

:class:`Waker` is the classic self-pipe: another thread calls :meth:`Waker.wake` to make a
blocked :meth:`Poller.poll` return; the woken thread calls :meth:`Waker.drain`.

:class:`FdSource` makes any plain fd (a pipe, an eventfd, a socket owned by someone
else) pollable without taking ownership: closing it is still its owner's job, after
unregistering it.
"""

from __future__ import annotations

import os
from typing import Protocol

import zmq

__all__ = ["Pollable", "Waker", "Poller", "FdSource"]


class Pollable(Protocol):
    """Anything a :class:`Poller` can wait on."""

    def _pollable(self) -> zmq.Socket[bytes] | int: ...


class FdSource:
    """A plain file descriptor as a :class:`Pollable` (not owned: never closed here).

    Level-triggered like every fd in a :class:`Poller`: it is reported ready while it is
    readable, hung up or in error, so whoever handles it must read until it would
    block, and stop watching it at end of file.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise ValueError(f"not a file descriptor: {fd!r}")
        self.fd = fd

    def fileno(self) -> int:
        """The fd."""
        return self.fd

    def _pollable(self) -> int:
        return self.fd

    def __repr__(self) -> str:
        return f"FdSource({self.fd})"


class Waker:
    """A non-blocking self-pipe used to interrupt a :class:`Poller` from another thread."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False

    def wake(self) -> None:
        """Make the read end readable. Safe from any thread; never blocks."""
        if self._closed:
            return
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass  # pipe full: it is readable already
        except OSError:
            pass  # closed concurrently

    def drain(self) -> int:
        """Consume all pending wake-ups; return how many bytes were read."""
        total = 0
        while not self._closed:
            try:
                chunk = os.read(self._r, 4096)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            total += len(chunk)
        return total

    def fileno(self) -> int:
        """The read end's fd."""
        return self._r

    def wakeup_fd(self) -> int:
        """The (non-blocking) write end's fd, e.g. for ``signal.set_wakeup_fd``."""
        return self._w

    def _pollable(self) -> int:
        return self._r

    def close(self) -> None:
        """Close both ends. Idempotent."""
        if self._closed:
            return
        self._closed = True
        os.close(self._r)
        os.close(self._w)

    def __enter__(self) -> Waker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Poller:
    """Wait for any of several hostops objects to become readable.

    Not thread-safe: register, unregister and poll from one thread. Unregister an object
    before closing it; polling a closed socket or fd is an error.
    """

    def __init__(self) -> None:
        self._poller = zmq.Poller()
        self._objects: list[Pollable] = []
        self._keys: dict[int, zmq.Socket[bytes] | int] = {}

    def register(self, obj: Pollable) -> None:
        """Start watching ``obj`` (registering it twice is a no-op)."""
        if id(obj) in self._keys:
            return
        key = obj._pollable()
        flags = zmq.POLLIN if isinstance(key, zmq.Socket) else zmq.POLLIN | zmq.POLLERR
        self._poller.register(key, flags)
        self._objects.append(obj)
        self._keys[id(obj)] = key

    def unregister(self, obj: Pollable) -> None:
        """Stop watching ``obj`` (unknown objects are ignored)."""
        key = self._keys.pop(id(obj), None)
        if key is None:
            return
        self._objects = [o for o in self._objects if o is not obj]
        if key not in self._keys.values():
            self._poller.unregister(key)

    def poll(self, timeout_s: float | None) -> list[object]:
        """Wait up to ``timeout_s`` seconds (None: forever, 0: just check).

        Returns the registered objects that are ready, in registration order; an empty
        list on timeout.
        """
        timeout_ms = -1 if timeout_s is None else max(0, int(timeout_s * 1000 + 0.999))
        ready = zmq.zmq_poll(self._poller.sockets, timeout_ms)
        if not ready:
            return []
        events = dict(ready)
        return [obj for obj in self._objects if events.get(self._keys[id(obj)], 0)]
