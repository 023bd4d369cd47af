"""Drivers for device kinds beyond the built-in disk and NIC.

Importing this package registers every driver in it on :data:`kernel.bus.default_bus`
(``import kernel`` does). Each driver is a :class:`kernel.bus.VirtioDriver` subclass
in a module of its own; a driver that gives ``k.sys`` nodes has a ``nodes()`` method
returning a :class:`kernel.files.NodeTable`, which ``kernel.boot`` adds to ``k.sys``.

* :mod:`kernel.drivers.rng` — virtio-rng (DeviceId.ENTROPY): ``/dev/hwrng``.
* :mod:`kernel.drivers.console` — virtio-console (DeviceId.CONSOLE): ``/dev/hvc0``.
* :mod:`kernel.drivers.kv` — our key-value store (vendor id 0xF0): ``/dev/kv0``.

Drivers of other packages register with :func:`kernel.register_driver` or through the
``vlab.drivers`` entry-point group (see :mod:`kernel.bus`).
"""

from __future__ import annotations

from .console import HVC_PATH, ConsoleDriver, ConsoleFile, ConsoleNodes
from .kv import KV_DEVICE_ID, KvDriver, KvFile, KvNodes
from .rng import HWRNG_PATH, HwrngFile, RngDriver, RngNodes

__all__ = [
    "RngDriver",
    "RngNodes",
    "HwrngFile",
    "HWRNG_PATH",
    "ConsoleDriver",
    "ConsoleNodes",
    "ConsoleFile",
    "HVC_PATH",
    "KvDriver",
    "KvNodes",
    "KvFile",
    "KV_DEVICE_ID",
]
