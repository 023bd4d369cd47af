"""virtio-lab's device side: the :class:`Device` plugin API, the device-process runtime
and the bundled devices.

* :mod:`vdev.virtio` — the spec in code, shared with the kernel (sans-IO);
* :mod:`vdev.device` — :class:`Device` and :class:`Metrics`, what a backend author
  subclasses; :data:`PENDING` (``handle()`` keeps the chain, ``complete()`` later),
  :class:`Chain` (what ``handle()`` receives) and :class:`TimerHandle`;
* :mod:`vdev.session` — :class:`~vdev.session.DeviceSession`, one device's rings, kept
  chains, event sources, timers and loop, whatever the transport;
* :mod:`vdev.runtime` — :class:`~vdev.runtime.DeviceRuntime`, the ZeroMQ transport of a
  device process (control channel, doorbells, shared memory);
* :mod:`vdev.vhost_user` — :class:`~vdev.vhost_user.VhostUserBackend`, the vhost-user
  transport (QEMU);
* :mod:`vdev.blk` — virtio-blk (:class:`~vdev.blk.BlkDevice`) and its backends;
* ``python -m vdev blk --image PATH --control ENDPOINT`` — run a device process.

Names are imported lazily so that ``import vdev.virtio`` (which the kernel does) does
not pull in the device side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Device", "Metrics", "RING_FEATURES", "PENDING", "Pending", "Chain", "TimerHandle"]

if TYPE_CHECKING:
    from .device import PENDING, RING_FEATURES, Chain, Device, Metrics, Pending, TimerHandle


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import device

        return getattr(device, name)
    raise AttributeError(f"module 'vdev' has no attribute {name!r}")
