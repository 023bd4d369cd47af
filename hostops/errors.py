"""Typed failures of the host-operations layer.

Theory of operation
-------------------
Every channel ``hostops`` offers (doorbells, the control channel, a device process) can
fail in exactly one way that matters to its user: the peer on the other side is no longer
reachable. That single condition is :class:`TransportError`; the subclasses only say *why*,
named (as in trio) after who is at fault:

* :class:`PeerGone` -- the peer process died or exited (it is the peer's fault);
* :class:`ChannelTimeout` -- the peer did not answer within the deadline (it may be hung);
* :class:`ChannelClosed` -- *we* closed the channel and then used it (it is our fault).

What happens next is the same for all of them: every operation on that channel fails, the
kernel fails the in-flight requests of the device with ``EIO``, and the device must be
reset or relaunched before it is used again. ``hostops`` itself never retries.
"""

from __future__ import annotations

__all__ = ["TransportError", "PeerGone", "ChannelTimeout", "ChannelClosed"]


class TransportError(Exception):
    """The channel to a peer is broken.

    What happens next: every operation on that channel fails; in-flight requests are
    failed with ``EIO`` by the kernel; the device must be reset or relaunched.
    """


class PeerGone(TransportError):
    """The peer process died or exited; nothing more will arrive from it."""


class ChannelTimeout(TransportError):
    """No reply arrived within the deadline; the peer may be hung or overloaded."""


class ChannelClosed(TransportError):
    """The channel was closed by this side; using it afterwards is a programming error."""
