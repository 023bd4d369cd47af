"""Linux eventfds as notification channels (vhost-user kick, call and error fds).

Theory of operation
-------------------
An eventfd is a kernel u64 counter: ``write(n)`` adds ``n`` and makes it readable,
``read()`` returns the sum and resets it to 0. vhost-user passes one per ring and
direction: the front-end writes the *kick* fd when it made buffers available, the
back-end writes the *call* fd to interrupt the guest, and the *err* fd to report a
broken ring.

:class:`EventFd` owns its fd: either one it created (:meth:`EventFd.create`) or one a
peer passed (:meth:`EventFd.adopt`, which checks that the fd really is an eventfd, so a
peer cannot hand us a pipe or a regular file that would read as garbage or poll
readable forever). The fd is switched to non-blocking: :meth:`read` returns 0 when the
counter is 0, never blocks. An eventfd is pollable (``_pollable()`` is its fd) by
:class:`hostops.Poller`.
"""

from __future__ import annotations

import os

__all__ = ["EventFd", "NotAnEventFd"]

_U64 = 8


class NotAnEventFd(ValueError):
    """The fd handed to :meth:`EventFd.adopt` is not an eventfd (it was closed)."""


def _is_eventfd(fd: int) -> bool | None:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None  # no /proc: cannot tell
    return target == "anon_inode:[eventfd]"


class EventFd:
    """One eventfd (owned: :meth:`close` closes it)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        os.set_blocking(fd, False)

    @classmethod
    def create(cls, initval: int = 0) -> EventFd:
        """A new eventfd (close-on-exec, non-blocking)."""
        return cls(os.eventfd(initval, os.EFD_CLOEXEC | os.EFD_NONBLOCK))

    @classmethod
    def adopt(cls, fd: int) -> EventFd:
        """Take ownership of ``fd`` received from a peer. If it is not an eventfd it is
        closed and :class:`NotAnEventFd` is raised."""
        if _is_eventfd(fd) is False:
            try:
                os.close(fd)
            finally:
                pass
            raise NotAnEventFd(f"fd {fd} is not an eventfd")
        return cls(fd)

    def fileno(self) -> int:
        """The fd (ValueError once closed)."""
        if self._fd is None:
            raise ValueError("eventfd is closed")
        return self._fd

    def _pollable(self) -> int:
        return self.fileno()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._fd is None

    def read(self) -> int:
        """Consume and return the counter (0 if nothing was signalled)."""
        try:
            data = os.read(self.fileno(), _U64)
        except BlockingIOError:
            return 0
        return int.from_bytes(data, "little") if len(data) == _U64 else 0

    def write(self, n: int = 1) -> None:
        """Add ``n`` to the counter (wakes whoever polls it)."""
        try:
            os.write(self.fileno(), n.to_bytes(_U64, "little"))
        except BlockingIOError:
            pass  # counter at its maximum: it is readable already

    def close(self) -> None:
        """Close the fd. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventFd({self._fd})"
