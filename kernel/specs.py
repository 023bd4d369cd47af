"""Device specifications: what ``kernel.boot(devices=[...])`` is asked to bring up.

Theory of operation
-------------------
A spec is a small frozen dataclass that knows two things: how to start its device
process (:meth:`DeviceSpec.argv` builds ``python -m vdev <kind> ... --control
ENDPOINT``) and how the kernel names the device (``name_prefix``: ``vd`` gives ``vda``,
``vdb``, ...). Everything else -- which driver binds, which features are taken -- is
decided on the virtio bus from what the device itself reports (GET_DEVICE_INFO,
GET_FEATURES), exactly as with hardware: the spec only says which backend to plug in.

New kinds (``Net``, ``Custom("pkg.module:Class", **opts)``) subclass
:class:`DeviceSpec`, set ``kind``/``name_prefix`` and implement :meth:`device_args`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from hostops.process import python_argv

__all__ = ["DeviceSpec", "Blk"]


@dataclass(frozen=True)
class DeviceSpec:
    """Base of every device spec.

    Subclasses set ``kind`` (the ``vdev`` subcommand), ``name_prefix`` (the kernel's
    naming scheme) and implement :meth:`device_args`; ``queue_size`` is the ring size
    the driver asks for (capped by what the device allows).
    """

    kind: ClassVar[str] = ""
    name_prefix: ClassVar[str] = "vd"

    def device_args(self) -> list[str]:
        """Command-line arguments of the device, after the subcommand and without
        ``--control``."""
        raise NotImplementedError

    @property
    def requested_queue_size(self) -> int:
        """The ring size the driver asks for (default 128)."""
        return int(getattr(self, "queue_size", 128))

    def argv(self, control_endpoint: str) -> list[str]:
        """The full command that starts this device's process, listening for control
        requests at ``control_endpoint``."""
        if not self.kind:
            raise TypeError(f"{type(self).__name__} does not name a device kind")
        return python_argv("vdev", self.kind, *self.device_args(), "--control", control_endpoint)


@dataclass(frozen=True)
class Blk(DeviceSpec):
    """A virtio-blk device backed by the raw image file ``path`` (or, with
    :meth:`Blk.memory`, by a RAM disk inside the device process).

    ``readonly`` starts the device with ``--readonly`` (it then offers
    VIRTIO_BLK_F_RO and the kernel refuses writes with EROFS); ``queue_size`` is the
    ring size requested (a power of two, capped by the device's maximum).
    """

    path: str | None = None
    readonly: bool = False
    queue_size: int = 128
    memory_size: int | None = None

    kind: ClassVar[str] = "blk"
    name_prefix: ClassVar[str] = "vd"

    def __post_init__(self) -> None:
        if (self.path is None) == (self.memory_size is None):
            raise ValueError("Blk: give exactly one of an image path or memory_size")
        if self.path is not None and (
            not isinstance(self.path, str | os.PathLike) or not os.fspath(self.path)
        ):
            raise ValueError(f"Blk: image path must be a non-empty path, got {self.path!r}")
        m = self.memory_size
        if m is not None and (not isinstance(m, int) or m <= 0 or m % 512):
            raise ValueError(f"Blk: memory size {m!r} is not a positive multiple of 512")
        q = self.queue_size
        if not isinstance(q, int) or q < 1 or q > 32768 or q & (q - 1):
            raise ValueError(f"Blk: queue_size {q!r} is not a power of two in 1..32768")

    @classmethod
    def memory(cls, size_bytes: int, *, readonly: bool = False, queue_size: int = 128) -> Blk:
        """A RAM disk of ``size_bytes`` (a multiple of 512) served by the device process
        (``--memory``): no image file, gone when the device stops."""
        return cls(None, readonly=readonly, queue_size=queue_size, memory_size=size_bytes)

    def device_args(self) -> list[str]:
        """``--image PATH`` or ``--memory SIZE``, then ``[--readonly] --queue-size N``."""
        if self.path is not None:
            args = ["--image", os.fspath(self.path)]
        else:
            args = ["--memory", str(self.memory_size)]
        if self.readonly:
            args.append("--readonly")
        args += ["--queue-size", str(self.queue_size)]
        return args
