"""The device plugin API: subclass :class:`Device` to add a virtio device to virtio-lab.

Theory of operation
-------------------
A device runs in a process of its own (``python -m vdev <kind> ...``). That process is a
:class:`vdev.runtime.DeviceRuntime` wrapped around one :class:`Device` object. The split
of work is the one Firecracker's ``devices/virtio`` uses: the *runtime* owns everything
generic, the *device* owns only what makes it a block device, a network card, ...

=================================  ==================================================
the runtime (``vdev.runtime``)     the device (your subclass)
=================================  ==================================================
the control channel (GET_FEATURES, says who it is (:attr:`Device.device_id`,
SET_MEM_TABLE, SET_VRING_*, ...),  :attr:`~Device.name`, :attr:`~Device.num_queues`,
the status byte and its order      :attr:`~Device.max_queue_size`), which
checks, feature negotiation,       device-specific feature bits it offers
shared memory, the doorbells,      (:meth:`~Device.device_features`), its config
the split rings (validation of     space (:meth:`~Device.config`), and how to serve
every descriptor, event            one request (:meth:`~Device.handle`).
suppression, interrupts), metrics
per queue, errors and resets
=================================  ==================================================

The life of a device, as the runtime drives it::

    dev = MyDevice(...)              # constructed once per process
    dev.device_features()            # asked at GET_FEATURES (ring bits are ORed in)
    dev.config()                     # asked at GET_CONFIG
    dev.activate(features)           # DRIVER_OK: ``features`` is what was negotiated
    dev.handle(queue, chain) -> n    # once per request, on the runtime's one thread
    ...
    dev.reset()                      # RESET_DEVICE / SET_STATUS 0; may be followed by
                                     # another negotiation and activate()

:meth:`~Device.handle` receives a :class:`~vdev.virtio.queue.Chain` that the runtime has
already validated against the spec (§2.7.5: in-range addresses, no loops, readable
before writable, ...): ``chain.readable`` / ``chain.writable`` are memoryviews straight
into the driver's shared memory, so a backend can ``os.preadv``/``os.pwritev`` into
them with no intermediate copy. What the runtime cannot validate is the *request*
inside the chain (a header too short, a sector out of range): that is the device's job,
and a bad request is answered with the device's own error status, counted in
:attr:`~Device.metrics`, and the device goes on. ``handle`` returns the number of bytes
it wrote into the writable part (the used length, §2.7.8). An exception escaping
``handle`` is treated as a bug in the device: the runtime logs it, completes the chain
with length 0, counts ``handler_errors`` and keeps serving.

Everything a device does happens on the runtime's single thread: no locking is needed,
and a slow ``handle`` delays every queue and the control channel (the runtime bounds
the work per round so that one busy queue cannot starve the others).

A minimal device (an entropy source, virtio §5.4)::

    class Rng(Device):
        device_id = DeviceId.ENTROPY
        name = "rng"
        num_queues = 1

        def handle(self, queue: int, chain: Chain) -> int:
            data = os.urandom(chain.writable_len)
            chain.write(0, data)
            self.metrics.inc("bytes", len(data))
            return len(data)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import ClassVar

from vdev.virtio.constants import F, bit
from vdev.virtio.control import ErrorCode
from vdev.virtio.errors import ProtocolError
from vdev.virtio.queue import Chain

__all__ = ["Device", "Metrics", "RING_FEATURES"]

#: Feature bits the runtime offers on behalf of every device: the split-ring transport
#: it implements (VERSION_1, EVENT_IDX, INDIRECT_DESC). A device never offers these.
RING_FEATURES = bit(F.VERSION_1) | bit(F.EVENT_IDX) | bit(F.INDIRECT_DESC)


class Metrics:
    """Plain named counters (Firecracker style): tests and ``GET_METRICS`` read them.

    Counters named at construction start at 0 and are always reported; :meth:`inc`
    creates any other counter on first use::

        m = Metrics("reads", "writes")
        m.inc("reads")
        m.inc("bytes_read", 4096)
        m.snapshot()   # {"reads": 1, "writes": 0, "bytes_read": 4096}
    """

    __slots__ = ("_counters",)

    def __init__(self, *names: str) -> None:
        self._counters: dict[str, int] = dict.fromkeys(names, 0)

    def declare(self, *names: str) -> None:
        """Make sure the counters ``names`` exist (at 0 if new)."""
        for name in names:
            self._counters.setdefault(name, 0)

    def inc(self, name: str, n: int = 1) -> None:
        """Add ``n`` (default 1) to counter ``name``."""
        self._counters[name] = self._counters.get(name, 0) + n

    def __getitem__(self, name: str) -> int:
        """The value of counter ``name`` (0 if it was never counted)."""
        return self._counters.get(name, 0)

    def __contains__(self, name: object) -> bool:
        return name in self._counters

    def __iter__(self) -> Iterator[str]:
        return iter(self._counters)

    def __len__(self) -> int:
        return len(self._counters)

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter, safe to keep or send."""
        return dict(self._counters)

    def merge(self, other: Metrics | dict[str, int] | Iterable[tuple[str, int]]) -> None:
        """Add every counter of ``other`` into this one."""
        items = other.snapshot().items() if isinstance(other, Metrics) else dict(other).items()
        for name, n in items:
            self.inc(name, n)

    def __repr__(self) -> str:
        return f"Metrics({self._counters!r})"


class Device:
    """Base class of every virtio device backend (the plugin API).

    Set the class attributes, override what your device needs, and hand an instance to
    :class:`vdev.runtime.DeviceRuntime` (or to the ``python -m vdev`` entry point).
    Instances may override the class attributes in ``__init__`` (e.g. a queue size taken
    from the command line).

    Attributes:
        device_id: the virtio device ID (§5), e.g. ``DeviceId.BLOCK``.
        name: a short name for logs and ``GET_DEVICE_INFO``.
        num_queues: how many virtqueues the device has (indices ``0..num_queues-1``).
        max_queue_size: the largest queue size the device accepts (a power of two, at
            most 32768); the driver may choose any power of two up to it.
        metrics: the device's counters, reported by ``GET_METRICS`` under ``"device"``
            next to the runtime's own.
        features: the feature bits negotiated at the last :meth:`activate` (0 before).
    """

    device_id: ClassVar[int] = 0
    name: ClassVar[str] = "device"
    num_queues: int = 1
    max_queue_size: int = 256

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.features = 0

    # ------------------------------------------------------------------ negotiation
    def device_features(self) -> int:
        """The device-specific feature bits offered to the driver (§2.2).

        Return only your device type's bits (e.g. ``bit(BlkF.FLUSH)``); the runtime ORs
        in :data:`RING_FEATURES`. Asked at every ``GET_FEATURES``; keep it constant for
        the life of the process. The default offers nothing.
        """
        return 0

    def config(self) -> bytes:
        """The device configuration space (§4.x / per device type, e.g. ``BlkConfig``).

        ``GET_CONFIG offset size`` replies with ``config()[offset:offset+size]`` or
        BAD_VALUE if that runs past the end. The default is empty.
        """
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver writes ``data`` at ``offset`` of the config space (``SET_CONFIG``).

        Raise :class:`~vdev.virtio.errors.ProtocolError` to refuse; the driver then gets
        an error reply with that code and message. The default refuses every write
        (BAD_VALUE "config space is read-only"), which is right for most devices.
        """
        raise ProtocolError(ErrorCode.BAD_VALUE, "config space is read-only")

    # ------------------------------------------------------------------ life cycle
    def activate(self, features: int) -> None:
        """The driver set DRIVER_OK; ``features`` is the negotiated feature set (a
        subset of what was offered, always including VERSION_1).

        Called once per negotiation, before the first :meth:`handle`. Raise to refuse
        activation: the driver gets DEVICE_ERROR and the status does not change.
        The default records ``features`` in :attr:`features`.
        """
        self.features = features

    def reset(self) -> None:
        """The driver reset the device (``RESET_DEVICE`` or ``SET_STATUS 0``).

        Forget everything negotiated; keep backend state that outlives a reset (an
        image file's contents) and keep :attr:`metrics` (counters are cumulative for the
        life of the process). The default clears :attr:`features`.
        """
        self.features = 0

    def close(self) -> None:
        """The device process is exiting: release backend resources (files, sockets).
        Called once by the runtime. The default does nothing."""

    # ------------------------------------------------------------------ data path
    def handle(self, queue: int, chain: Chain) -> int:
        """Serve one request: the chain that the driver made available on ``queue``.

        ``chain`` has been validated by the runtime (every buffer lies inside shared
        memory, readable buffers come first). Read the request from ``chain.readable``
        (``chain.read(offset, n)`` copies; ``chain.readable_slices(offset, n)`` gives
        zero-copy views), write the response into ``chain.writable`` (``chain.write``,
        ``chain.writable_slices``), and return how many bytes you wrote into the
        writable part, counted from its start (the used length, §2.7.8.2): it must not
        exceed ``chain.writable_len``.

        A malformed *request* is not an exception: answer it with the device type's
        error status, count it in :attr:`metrics` and return. Errors of the host
        backend (``OSError``) likewise become an error status. An exception that does
        escape is a bug: the runtime logs it, completes the chain with length 0 and
        counts ``handler_errors``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement handle()")

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} id={self.device_id} "
            f"queues={self.num_queues} max_queue_size={self.max_queue_size}>"
        )
