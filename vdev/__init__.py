"""virtio-lab's device side: the :class:`Device` plugin API, the device-process runtime
and the bundled devices.

* :mod:`vdev.virtio` — the spec in code, shared with the kernel (sans-IO);
* :mod:`vdev.device` — :class:`Device` and :class:`Metrics`, what a backend author
  subclasses; :data:`PENDING` (``handle()`` keeps the chain, ``complete()`` later),
  :class:`Chain` (what ``handle()`` receives) and :class:`TimerHandle`;
* :func:`serve` — run a device in this process over ZeroMQ (for our kernel) or as a
  vhost-user back-end (for QEMU);
* :mod:`vdev.registry` — device kinds for ``python -m vdev KIND`` (built-ins, the
  ``vlab.devices`` entry points, :func:`register_kind`; or a ``pkg.module:Class``);
* :mod:`vdev.testing` — :class:`DeviceHarness`, a device driven in-process by the real
  driver queue and device session (unit tests of a device);
* :mod:`vdev.session` — :class:`~vdev.session.DeviceSession`, one device's rings, kept
  chains, event sources, timers and loop, whatever the transport;
* :mod:`vdev.runtime` — :class:`~vdev.runtime.DeviceRuntime`, the ZeroMQ transport of a
  device process (control channel, doorbells, shared memory);
* :mod:`vdev.vhost_user` — :class:`~vdev.vhost_user.VhostUserBackend`, the vhost-user
  transport (QEMU);
* :mod:`vdev.blk` — virtio-blk (:class:`~vdev.blk.BlkDevice`) and its backends;
  :mod:`vdev.net` — virtio-net; :mod:`vdev.examples.rng` — virtio-rng;
* ``python -m vdev KIND ... --control ENDPOINT`` — run a device process.

Names are imported lazily so that ``import vdev.virtio`` (which the kernel does) does
not pull in the device side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Device",
    "Metrics",
    "RING_FEATURES",
    "PENDING",
    "Pending",
    "Chain",
    "TimerHandle",
    "serve",
    "DeviceHarness",
    "DeviceKind",
    "register_kind",
]

if TYPE_CHECKING:
    from .device import PENDING, RING_FEATURES, Chain, Device, Metrics, Pending, TimerHandle
    from .registry import DeviceKind, register_kind
    from .testing import DeviceHarness

_FROM = {
    "DeviceHarness": "testing",
    "DeviceKind": "registry",
    "register_kind": "registry",
}


def serve(
    device: Device,
    *,
    control: str | None = None,
    vhost_user: str | None = None,
    shm_by_name: bool = False,
    poll_us: float | None = None,
) -> int:
    """Serve ``device`` in this process until SIGTERM (or the parent's death) and return
    the exit status: over ZeroMQ with the control channel bound at ``control``
    (``ipc://...``, what ``kernel.boot`` gives a device process; ``shm_by_name``: a
    device started by hand that ``kernel.Attach(control)`` connects to, as
    ``--shm-by-name``), or as a vhost-user back-end listening on the Unix socket
    ``vhost_user`` (for QEMU). Exactly one of the two; ValueError otherwise.
    ``poll_us`` bounds the device's hybrid-polling window (0: off; default
    :data:`vdev.virtio.poll.DEFAULT_POLL_US`)."""
    if (control is None) == (vhost_user is None):
        raise ValueError("serve: give exactly one of control= or vhost_user=")
    if shm_by_name and vhost_user is not None:
        raise ValueError("serve: shm_by_name is for control=, not vhost_user=")
    kw: dict[str, Any] = {} if poll_us is None else {"poll_us": poll_us}
    if vhost_user is not None:
        from .vhost_user import serve as serve_vhost_user

        return serve_vhost_user(device, vhost_user, **kw)
    from .runtime import serve as serve_zmq

    assert control is not None
    return serve_zmq(device, control, shm_by_name=shm_by_name, **kw)


def __getattr__(name: str) -> Any:
    if name in _FROM:
        import importlib

        return getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    if name in __all__:
        from . import device

        return getattr(device, name)
    raise AttributeError(f"module 'vdev' has no attribute {name!r}")
