"""Serving one device queue: the data path every transport shares.

Theory of operation
-------------------
Whatever carries the doorbells (ZeroMQ in :mod:`vdev.runtime`, eventfds in
:mod:`vdev.vhost_user`), serving a kicked queue is the same loop (§2.7.10 and the
disable–drain–re-enable–recheck rule of :mod:`vdev.virtio.queue`)::

    while True:
        dq.disable_notifications()
        while (chain := dq.pop()) is not None:      # at most ``budget`` per round
            dq.push(chain.head, device.handle(index, chain))
        if dq.should_interrupt(): notify()
        if not dq.enable_notifications(): break      # re-check: no lost wake-up

:class:`QueueServer` is that loop plus the per-chain rules, the same for every
transport:

=======================  ==================================================================
event                    what happens
=======================  ==================================================================
valid chain              ``n = device.handle(q, chain)``; ``push(head, n)``; count ``chains``
``ChainError``           ``push(head, 0)``; count ``bad_chains``; log; go on
``device.handle`` raises a device bug: log it; ``push(head, 0)``; count ``handler_errors``
or returns a bad length
``RingError``            propagated: the transport stops the queue and tells the driver
                         (DEVICE_NEEDS_RESET / the vhost-user error fd)
=======================  ==================================================================

Counters go into the ``counters`` dict the transport passes (``chains``, ``bad_chains``,
``handler_errors``, ``interrupts``) and per queue into :attr:`QueueServer.handler_errors`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

from vdev.device import Device
from vdev.virtio.errors import ChainError
from vdev.virtio.queue import Chain, DeviceQueue

__all__ = ["QueueServer", "SERVICE_COUNTERS", "INTERRUPT_EVERY"]

#: During a drain, the interrupt decision is also taken after every this many chains.
INTERRUPT_EVERY = 8

#: The counters :class:`QueueServer` increments in the transport's ``counters`` dict.
SERVICE_COUNTERS = ("chains", "bad_chains", "handler_errors", "interrupts")


class QueueServer:
    """The per-chain rules and the drain loop for ``device``'s queues.

    ``log(message, kind)`` is the transport's rate-limited logger; ``counters`` its
    counter dict (missing keys are created).
    """

    def __init__(
        self,
        device: Device,
        counters: dict[str, int],
        log: Callable[[str, str], None],
    ) -> None:
        self.device = device
        self.counters = counters
        for name in SERVICE_COUNTERS:
            counters.setdefault(name, 0)
        self._log = log
        #: handler errors per queue index (cumulative)
        self.handler_errors: dict[int, int] = {}

    def drain(self, index: int, dq: DeviceQueue, budget: int, notify: Callable[[], None]) -> bool:
        """Serve queue ``index`` for one round of at most ``budget`` chains; call
        ``notify()`` whenever the driver must be interrupted. Returns True if work is
        left (budget spent). :class:`~vdev.virtio.errors.RingError` propagates."""
        counters = self.counters
        pop = dq.pop
        push = dq.push
        handle = self.device.handle
        handled = chains = 0
        try:
            while True:
                dq.disable_notifications()
                while True:
                    if handled >= budget:
                        self._interrupt(dq, notify)
                        return True
                    try:
                        chain = pop()
                    except ChainError as e:
                        handled += 1
                        counters["bad_chains"] += 1
                        self._log(f"queue {index}: bad chain: {e}", "chain")
                        push(e.head, 0)
                        continue
                    if chain is None:
                        break
                    handled += 1
                    chains += 1
                    try:
                        written = handle(index, chain)
                    except Exception as e:
                        self._handler_error(
                            index, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
                        )
                        written = 0
                    # the usual answer (a plain int in range) costs one test
                    if type(written) is not int or not 0 <= written <= chain.writable_len:
                        written = self._check_written(index, chain, written)
                    push(chain.head, written)
                    del chain  # drop the views into guest memory now
                    if not chains % INTERRUPT_EVERY:
                        # let the driver complete what is done while we go on (no
                        # ping-pong); EVENT_IDX keeps this to one interrupt per reap
                        self._interrupt(dq, notify)
                self._interrupt(dq, notify)
                if not dq.enable_notifications():
                    return False
        finally:
            counters["chains"] += chains

    def _interrupt(self, dq: DeviceQueue, notify: Callable[[], None]) -> None:
        if dq.should_interrupt():
            self.counters["interrupts"] += 1
            notify()

    def call_device(self, index: int, chain: Chain) -> int:
        """``device.handle(index, chain)``, with its result checked; 0 on a device bug."""
        try:
            written = self.device.handle(index, chain)
        except Exception as e:
            self._handler_error(index, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            return 0
        return self._check_written(index, chain, written)

    def _check_written(self, index: int, chain: Chain, written: object) -> int:
        if (
            not isinstance(written, int)
            or isinstance(written, bool)
            or not 0 <= written <= chain.writable_len
        ):
            self._handler_error(
                index, f"handle() returned {written!r}; want an int in 0..{chain.writable_len}"
            )
            return 0
        return int(written)

    def _handler_error(self, index: int, what: str) -> None:
        self.handler_errors[index] = self.handler_errors.get(index, 0) + 1
        self.counters["handler_errors"] += 1
        self._log(f"queue {index}: device bug, request completed with length 0: {what}", "handler")
