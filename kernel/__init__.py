"""virtio-lab's kernel core: runs in the user's process, reaches devices only via virtio.

Theory of operation
-------------------
A small library OS in the spirit of the Linux Kernel Library. ``kernel.boot()`` starts
one process per device (``python -m vdev ...``) and binds a driver to each over the
virtio bus; from then on the user talks to the kernel (``k.sys.pwrite(...)``) and the
kernel talks to the devices only through split virtqueues in shared memory, ZeroMQ
doorbells and a vhost-user-like control channel. The layers, top down:

==================  =========================================================
``kernel.syscalls``  ``k.sys``: ``os``-style calls on ``/dev/vda`` …, errnos
``kernel.blk``       the block layer (async ``submit``, split, software queue)
                     and the virtio-blk driver
``kernel.bus``       the virtio bus: drivers registered by device id, probing
``kernel.drivers``   drivers beyond disk and NIC (virtio-rng: ``/dev/hwrng``)
``kernel.transport`` one device: shared region, queues, the interrupt thread,
                     failure handling; two ways to talk to it:
                     ``transport_zmq`` (our device process: ZeroMQ control
                     and doorbells) and ``transport_vhost_user`` (a
                     vhost-user back-end: Unix socket, memfd, eventfds)
``kernel.core``      ``boot()``, ``Kernel``, device handles, clean shutdown
``kernel.errors``    every error and its errno in one place
==================  =========================================================

A disk served by a vhost-user back-end (qemu-storage-daemon, or ``python -m vdev blk
--vhost-user SOCK``) is ``kernel.VhostUserBlk("/path/to/socket")``, a NIC served by a
vhost-user net back-end (``python -m vdev net --backend switch --switch EP
--vhost-user SOCK``, OVS-DPDK, VPP) ``kernel.VhostUserNet("/path/to/socket",
ip="10.0.0.2/24")``: the kernel then acts as QEMU does, and everything above the
transport is the same.

Any device ``python -m vdev`` runs is ``kernel.Custom("KIND" or "pkg.module:Class",
**options)`` (options become ``--key value`` flags); the driver that binds is chosen by
the device id the device reports (``kernel.register_driver``, ``vlab.drivers`` entry
points). Transports beyond ZeroMQ and vhost-user: ``kernel.register_transport``.

A device process somebody else runs (``python -m vdev KIND ... --control ENDPOINT
--shm-by-name``, like a vhost-user back-end daemon) is ``kernel.Attach(ENDPOINT)``: the
kernel connects to it, learns what it is from the device, and when it restarts waits
for it (``reconnect_timeout``) and resubmits what was in flight.

Example::

    import os, kernel
    with kernel.boot(devices=[kernel.Blk("disk.img")]) as k:
        fd = k.sys.open("/dev/vda", os.O_RDWR)
        k.sys.pwrite(fd, b"hello", 4096)
        assert k.sys.pread(fd, 5, 4096) == b"hello"
        print(k.devices[0].features, k.devices[0].queues[0].stats)
"""

from __future__ import annotations

from .blk import BlkDriver, BlockDevice
from .bus import VirtioBus, VirtioDriver, default_bus, register_driver
from .core import Kernel, RingView, VirtioDevice, boot, register_transport
from .drivers import RngDriver
from .errors import (
    DeviceControlError,
    DeviceGoneError,
    DeviceProbeError,
    KernelError,
)
from .specs import Attach, Blk, Custom, DeviceSpec, Net, VhostUserBlk, VhostUserNet
from .syscalls import Syscalls
from .transport import KernelQueue, VirtioTransport
from .transport_attach import AttachTransport
from .transport_vhost_user import VhostUserTransport
from .transport_zmq import ZmqTransport
from .virtio_net import NetDriver, NetLink

__all__ = [
    "boot",
    "Kernel",
    "VirtioDevice",
    "RingView",
    "DeviceSpec",
    "Blk",
    "VhostUserBlk",
    "Net",
    "VhostUserNet",
    "Custom",
    "Attach",
    "RngDriver",
    "register_transport",
    "NetDriver",
    "NetLink",
    "VirtioBus",
    "VirtioDriver",
    "default_bus",
    "register_driver",
    "BlkDriver",
    "BlockDevice",
    "Syscalls",
    "KernelQueue",
    "VirtioTransport",
    "ZmqTransport",
    "VhostUserTransport",
    "AttachTransport",
    "KernelError",
    "DeviceProbeError",
    "DeviceControlError",
    "DeviceGoneError",
]
