"""Signal handling and exit hooks.

Theory of operation
-------------------
The kernel runs inside the user's process, so ``hostops`` must not grab signals the
application owns. :func:`on_terminate` installs a SIGTERM handler only when nobody else
has (the current handler is ``SIG_DFL``) and only from the main thread (Python allows
signal handlers nowhere else); the handler runs the callback -- typically "stop all
devices" -- and then raises ``SystemExit(143)`` (128 + SIGTERM) so ``finally`` blocks and
``atexit`` hooks run. It returns an ``uninstall`` function that restores the previous
handler; outside the main thread, or when a handler is already set, both are no-ops.

Device processes call :func:`ignore_sigint`: they live in their own session, and they
shut down when the kernel tells them to or when their parent dies, never on a stray
SIGINT. :func:`register_atexit` is :func:`atexit.register` with an ``unregister``
function that removes exactly that registration.
"""

from __future__ import annotations

import atexit
import signal
import threading
from collections.abc import Callable
from types import FrameType

__all__ = ["SIGTERM_EXIT_CODE", "on_terminate", "ignore_sigint", "register_atexit"]

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
"""Exit status used when SIGTERM makes the process exit (143)."""


def _noop() -> None:
    return None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def on_terminate(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` then exit with status 143 when SIGTERM arrives.

    Installs the handler only from the main thread and only if SIGTERM currently has its
    default disposition. Returns an ``uninstall`` function (idempotent) that restores the
    previous handler if ours is still installed; it must be called from the main thread.
    """
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return _noop
    previous = signal.SIG_DFL

    def handler(signum: int, frame: FrameType | None) -> None:
        try:
            callback()
        finally:
            raise SystemExit(SIGTERM_EXIT_CODE)

    signal.signal(signal.SIGTERM, handler)

    def uninstall() -> None:
        if _in_main_thread() and signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)

    return uninstall


def ignore_sigint() -> None:
    """Ignore SIGINT in this process (for device processes). Main thread only; else no-op."""
    if _in_main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def register_atexit(fn: Callable[[], object]) -> Callable[[], None]:
    """Run ``fn`` at interpreter exit; return a function that cancels this registration."""

    def hook() -> None:
        fn()

    atexit.register(hook)

    def unregister() -> None:
        atexit.unregister(hook)

    return unregister
