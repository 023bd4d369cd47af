"""Run unmodified Python programs on the kernel's network stack (LKL's "hijack").

Theory of operation
-------------------
``install(k)`` routes Python's socket API -- the ``socket`` module's ``socket`` class,
``create_connection``, ``getaddrinfo`` and friends, ``select.select``,
``select.poll`` and the ``selectors`` classes -- to ``k.sys``, so ``socketserver``,
``http.server``, ``http.client``, ``urllib.request`` and asyncio's selector event loop
run on the kernel's stack without a change. The patching itself is host work and lives
in :mod:`hostops.interpose`; this module gives it the kernel as its stack:
``k.sys`` for the calls, and :meth:`KernelStack.watch`, which registers a
:class:`kernel.files.Waiter` with the files of the watched fds so that a wait on kernel
sockets and host fds together is woken when a kernel socket may have become ready.

What goes where:

==========================  ====================================================
``socket.socket(...)``      where it lives
==========================  ====================================================
AF_INET, SOCK_STREAM/DGRAM  the kernel (``k.sys.socket``)
AF_INET, SOCK_RAW / other   the kernel, which refuses it (ESOCKTNOSUPPORT)
AF_UNIX, ``socketpair()``   the host (local IPC, not networking)
AF_INET6, AF_PACKET, ...    refused: ``OSError(EAFNOSUPPORT)``
``fileno=`` a host fd       the host; ``fileno=`` a kernel socket's: the kernel
==========================  ====================================================

Names: numeric IPv4 only; ``"localhost"`` is the host's loopback, which the kernel's
stack does not have, so it is a ``socket.gaierror`` that says so. Files and every other
fd are untouched. ``fileno()`` of a kernel socket is
``hostops.interpose.FILENO_BASE`` + its kernel fd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hostops import interpose

from .files import File, Waiter

__all__ = [
    "install",
    "uninstall",
    "hijacked",
    "current_kernel",
    "KernelStack",
    "FILENO_BASE",
    "stats",
]

FILENO_BASE = interpose.FILENO_BASE


class _CallbackWaiter(Waiter):
    """A :class:`Waiter` that also calls a function when woken."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        super().__init__()
        self._fn = fn

    def wake(self) -> None:
        super().wake()
        self._fn()


class KernelStack:
    """The kernel as :class:`hostops.interpose.Stack`: ``sys`` is ``k.sys``."""

    def __init__(self, k: Any) -> None:
        self.kernel = k
        self.sys = k.sys

    def watch(self, fds: list[int], wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake`` whenever one of ``fds`` may have changed readiness (fds that
        are not open are skipped: ``poll`` reports them POLLNVAL)."""
        w = _CallbackWaiter(wake)
        files: list[File] = []
        for fd in fds:
            try:
                f = self.sys._file(fd)  # the table's own lookup (EBADF: not open)
            except OSError:
                continue
            f.add_waiter(w)
            files.append(f)

        def cancel() -> None:
            for f in files:
                f.remove_waiter(w)

        return cancel


def install(k: Any) -> interpose.Interposer:
    """Route Python's socket API to ``k``'s network stack (see the module doc);
    RuntimeError if something is already installed."""
    return interpose.install(KernelStack(k))


def uninstall() -> None:
    """Put the host's socket API back (no-op if not installed)."""
    interpose.uninstall()


def current_kernel() -> Any:
    """The kernel the socket API is routed to (None when not installed): how a program
    under ``vlab run`` reaches the rest of ``k.sys`` (its disks)."""
    st = interpose.active()
    stack = None if st is None else st.stack
    return stack.kernel if isinstance(stack, KernelStack) else None


def stats() -> dict[str, int]:
    """The counters of the current installation (empty when not installed)."""
    st = interpose.active()
    return {} if st is None else st.stats()


@contextmanager
def hijacked(k: Any) -> Iterator[interpose.Interposer]:
    """``with hijacked(k):`` -- :func:`install` on entry, :func:`uninstall` on exit."""
    st = install(k)
    try:
        yield st
    finally:
        uninstall()
