"""virtio-lab's device side: the :class:`Device` plugin API, the device-process runtime
and the bundled devices.

* :mod:`vdev.virtio` — the spec in code, shared with the kernel (sans-IO);
* :mod:`vdev.device` — :class:`Device` and :class:`Metrics`, what a backend author
  subclasses;
* :mod:`vdev.runtime` — :class:`~vdev.runtime.DeviceRuntime`, the loop of a device
  process (control channel, doorbells, rings);
* :mod:`vdev.blk` — virtio-blk (:class:`~vdev.blk.BlkDevice`) and its backends;
* ``python -m vdev blk --image PATH --control ENDPOINT`` — run a device process.

Names are imported lazily so that ``import vdev.virtio`` (which the kernel does) does
not pull in the device side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Device", "Metrics", "RING_FEATURES"]

if TYPE_CHECKING:
    from .device import RING_FEATURES, Device, Metrics


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import device

        return getattr(device, name)
    raise AttributeError(f"module 'vdev' has no attribute {name!r}")
