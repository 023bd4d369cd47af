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

A Python signal handler runs only between bytecodes of the main thread. A thread
blocked in ``zmq_poll`` is woken by the signal's EINTR -- unless the signal lands just
*before* it enters the system call, and then it sleeps out its whole timeout before the
handler gets a chance. :func:`wake_on_signals` closes that window the standard way:
``signal.set_wakeup_fd`` makes the C-level handler write a byte into a :class:`Waker`
pipe the moment any signal with a Python handler arrives, so a Poller that watches that
Waker returns at once and the handler runs right after. Like :func:`on_terminate` it
installs only from the main thread and only when nobody else owns the wake-up fd
(asyncio does), and returns an ``uninstall`` function (call it before closing the
Waker).

Device processes call :func:`ignore_sigint`: they live in their own session, and they
shut down when the kernel tells them to or when their parent dies, never on a stray
SIGINT. :func:`register_atexit` is :func:`atexit.register` with an ``unregister``
function that removes exactly that registration. :func:`kill_self` is a device process's
deliberate crash (SIGKILL to itself, for fault injection).
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

from hostops.poll import Waker

__all__ = [
    "SIGTERM_EXIT_CODE",
    "on_terminate",
    "wake_on_signals",
    "ignore_sigint",
    "register_atexit",
    "kill_self",
]

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
"""Exit status used when SIGTERM makes the process exit (143)."""


def _noop() -> None:
    return None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def on_terminate(callback: Callable[[], None], *, exit: bool = True) -> Callable[[], None]:
    """Run ``callback`` when SIGTERM arrives, then (``exit=True``) exit with status 143.

    ``exit=False`` is for a program whose main loop stops by itself once ``callback``
    has asked it to (a device process: ``callback`` sets a flag and wakes its poller);
    nothing is then raised at whatever line the signal happened to interrupt.

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
            if exit:
                raise SystemExit(SIGTERM_EXIT_CODE)

    signal.signal(signal.SIGTERM, handler)

    def uninstall() -> None:
        if _in_main_thread() and signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)

    return uninstall


def wake_on_signals(waker: Waker) -> Callable[[], None]:
    """Make every signal that has a Python handler wake ``waker`` at once (via
    ``signal.set_wakeup_fd`` on its pipe), so a Poller watching it never sleeps through
    a signal that arrived just before it blocked.

    Installs only from the main thread and only when no wake-up fd is set. Returns an
    ``uninstall`` function (idempotent, main thread only) that clears the wake-up fd if
    it is still ours; call it before closing ``waker``.
    """
    if not _in_main_thread():
        return _noop
    fd = waker.wakeup_fd()
    previous = signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    if previous != -1:  # someone else (asyncio, the application) owns it: leave theirs
        signal.set_wakeup_fd(previous)
        return _noop
    done = False

    def uninstall() -> None:
        nonlocal done
        if done or not _in_main_thread():
            return
        done = True
        current = signal.set_wakeup_fd(-1)
        if current != fd:  # replaced meanwhile by someone else: put theirs back
            signal.set_wakeup_fd(current)

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


def kill_self() -> NoReturn:
    """SIGKILL this process now, as a power failure would end it: no ``finally`` block,
    no ``atexit`` hook, no flush runs (flush what must survive first). Used by a device
    process's ``crash`` fault. Does not return."""
    os.kill(os.getpid(), signal.SIGKILL)
    while True:  # pragma: no cover - the signal is delivered before kill() returns
        signal.pause()
