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

``transport`` says how the kernel reaches the device: ``"zmq"`` (the default: a device
process the kernel starts, :mod:`kernel.transport_zmq`) or ``"vhost-user"`` (a back-end
somebody else started, listening on a Unix socket: :class:`VhostUserBlk`,
:mod:`kernel.transport_vhost_user`). vhost-user has no device id on the wire, so such a
spec also says what the device is (``device_id``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from hostops.process import python_argv
from vdev.virtio import DeviceId

__all__ = ["DeviceSpec", "Blk", "VhostUserBlk"]


@dataclass(frozen=True)
class DeviceSpec:
    """Base of every device spec.

    Subclasses set ``kind`` (the ``vdev`` subcommand), ``name_prefix`` (the kernel's
    naming scheme) and implement :meth:`device_args`; ``queue_size`` is the ring size
    the driver asks for (capped by what the device allows).
    """

    kind: ClassVar[str] = ""
    name_prefix: ClassVar[str] = "vd"
    transport: ClassVar[str] = "zmq"

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


@dataclass(frozen=True)
class VhostUserBlk(DeviceSpec):
    """A virtio-blk device served by a vhost-user back-end listening on the Unix socket
    ``path`` (``qemu-storage-daemon --export type=vhost-user-blk,...``, ``python -m vdev
    blk --image IMG --vhost-user SOCK``, ...). The kernel connects to it as QEMU does;
    the back-end process is not the kernel's: it is neither started nor stopped by it.

    ``queue_size`` is the ring size the driver uses (a power of two; vhost-user cannot
    ask the back-end for its maximum, a back-end that allows less refuses
    SET_VRING_NUM and the probe fails saying so). Whether the disk is read-only is the
    back-end's decision (VIRTIO_BLK_F_RO).
    """

    path: str = ""
    queue_size: int = 128

    kind: ClassVar[str] = "blk"
    name_prefix: ClassVar[str] = "vd"
    transport: ClassVar[str] = "vhost-user"
    device_id: ClassVar[int] = int(DeviceId.BLOCK)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str | os.PathLike) or not os.fspath(self.path):
            raise ValueError(f"VhostUserBlk: socket path must be non-empty, got {self.path!r}")
        q = self.queue_size
        if not isinstance(q, int) or q < 1 or q > 32768 or q & (q - 1):
            raise ValueError(f"VhostUserBlk: queue_size {q!r} is not a power of two in 1..32768")

    def device_args(self) -> list[str]:
        """Not started by the kernel: there is no command line."""
        raise TypeError("a vhost-user device is not started by the kernel")

    def argv(self, control_endpoint: str) -> list[str]:
        """Not started by the kernel: there is no command line."""
        raise TypeError("a vhost-user device is not started by the kernel")
