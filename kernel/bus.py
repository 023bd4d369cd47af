"""The virtio bus: drivers register by device id, devices are matched and probed.

Theory of operation
-------------------
As in Linux (``drivers/virtio/virtio.c``), binding is by the device id the device
reports, not by what the user asked for: :meth:`VirtioBus.probe` asks the transport
for GET_DEVICE_INFO, looks the id up in the table of registered drivers, lets the driver
class choose features from the offer (:meth:`VirtioDriver.features`), sets up the
shared memory, instantiates the driver and calls its :meth:`VirtioDriver.probe` (read
config space, set up queues, build the block device ...), then sets DRIVER_OK.

The built-in drivers register themselves on :data:`default_bus` when their module is
imported (``kernel.blk`` for DeviceId.BLOCK, ``kernel.virtio_net`` for NET,
``kernel.drivers.rng`` for ENTROPY; ``import kernel`` imports them all); a user's own
driver does exactly the same with :func:`register_driver` (``replace=True`` to take over
an id that already has a driver) or on a private :class:`VirtioBus` passed to
``kernel.boot(bus=...)``.

Driver plugins: a package declares drivers in the ``vlab.drivers`` entry-point group
(:data:`DRIVER_ENTRY_POINT_GROUP`), each either a module (imported: it registers its
drivers itself) or a ``module:Class`` :class:`VirtioDriver` subclass (registered for
its ``device_id``)::

    [project.entry-points."vlab.drivers"]
    kv = "mypkg.kv_driver:KvDriver"

The entry points are read once, the first time :data:`default_bus` meets a device id
no registered driver claims (so a built-in or explicitly registered driver always wins,
and a kernel without such devices never imports a plugin). A plugin that does not
import is logged and skipped: it cannot stop a boot whose devices do not need it.

Anything that goes wrong during a probe becomes a :class:`DeviceProbeError` naming the
device, saying what failed, with the tail of the device's log.
"""

from __future__ import annotations

import importlib
import logging
from importlib import metadata
from typing import Any, ClassVar

from hostops.sync import Lock
from vdev.virtio import DeviceId, F, VirtioError, bit

from .errors import DeviceControlError, DeviceGoneError, DeviceProbeError
from .transport import VirtioTransport

__all__ = [
    "VirtioDriver",
    "VirtioBus",
    "default_bus",
    "register_driver",
    "DRIVER_ENTRY_POINT_GROUP",
]

log = logging.getLogger(__name__)

#: The entry-point group of driver plugins.
DRIVER_ENTRY_POINT_GROUP = "vlab.drivers"


class VirtioDriver:
    """Base class of every driver on the bus.

    Subclasses set ``device_id`` and ``supported_features`` (a mask), may override
    :meth:`features` for a smarter choice, and implement :meth:`probe`. The instance
    gets the :class:`VirtioTransport` (``self.transport``) to read config and set up
    queues with.
    """

    device_id: ClassVar[int] = 0
    supported_features: ClassVar[int] = bit(F.VERSION_1)

    def __init__(self, transport: VirtioTransport) -> None:
        self.transport = transport

    @classmethod
    def features(cls, offered: int) -> int:
        """Choose the features to accept from ``offered`` (default: the intersection
        with ``supported_features``). VERSION_1 must be in the result."""
        return offered & cls.supported_features

    @classmethod
    def features_for(cls, transport: VirtioTransport, offered: int) -> int:
        """Choose features for this particular device (its spec is
        ``transport.spec``); the default is :meth:`features`."""
        return cls.features(offered)

    def probe(self) -> None:
        """Read config space and set up the queues (before DRIVER_OK)."""
        raise NotImplementedError

    def started(self) -> None:
        """The device is live (after DRIVER_OK): e.g. stock receive buffers."""

    def remove(self) -> None:
        """The device is going away (kernel shutdown); release driver resources."""

    @property
    def block(self) -> Any:
        """The block device this driver exposes (None if it is not a block driver)."""
        return None


class VirtioBus:
    """A table of drivers by device id, and the probe sequence that binds them.

    With ``plugins`` the ``vlab.drivers`` entry points are loaded the first time a
    device id has no driver (:data:`default_bus` does this; a private bus does not).
    """

    def __init__(self, *, plugins: bool = False) -> None:
        self._drivers: dict[int, type[VirtioDriver]] = {}
        self._lock = Lock()
        self._plugins = plugins
        self._plugins_loaded = False
        #: ``module-or-class: error`` of each plugin that failed to load.
        self.plugin_errors: list[str] = []

    def register_driver(
        self, device_id: int, driver_cls: type[VirtioDriver], *, replace: bool = False
    ) -> None:
        """Bind devices reporting ``device_id`` to ``driver_cls``. Raises ValueError if
        another driver already has the id (unless ``replace``)."""
        if not (isinstance(driver_cls, type) and issubclass(driver_cls, VirtioDriver)):
            raise TypeError(f"{driver_cls!r} is not a VirtioDriver subclass")
        with self._lock:
            old = self._drivers.get(int(device_id))
            if old is not None and old is not driver_cls and not replace:
                raise ValueError(
                    f"device id {device_id} already has driver {old.__name__} "
                    "(pass replace=True to take it over)"
                )
            self._drivers[int(device_id)] = driver_cls

    def unregister_driver(self, device_id: int) -> None:
        """Remove the driver of ``device_id`` (no error if there is none)."""
        with self._lock:
            self._drivers.pop(int(device_id), None)

    def driver_for(self, device_id: int) -> type[VirtioDriver] | None:
        """The driver class registered for ``device_id``, or None (after loading the
        driver plugins once, on a bus that has them)."""
        with self._lock:
            cls = self._drivers.get(int(device_id))
            load = cls is None and self._plugins and not self._plugins_loaded
            self._plugins_loaded = self._plugins_loaded or load
        if load:
            self.load_plugins()
            with self._lock:
                cls = self._drivers.get(int(device_id))
        return cls

    def load_plugins(self) -> None:
        """Load every ``vlab.drivers`` entry point: a module is imported (it registers
        its drivers on :data:`default_bus`), a :class:`VirtioDriver` class is registered
        here for its ``device_id`` unless that id has a driver already. Failures are
        logged and kept in :attr:`plugin_errors`."""
        for ep in metadata.entry_points(group=DRIVER_ENTRY_POINT_GROUP):
            try:
                module_name, _, attr = ep.value.partition(":")
                module = importlib.import_module(module_name.strip())
                if not attr:
                    continue
                cls = getattr(module, attr.strip())
                if not (isinstance(cls, type) and issubclass(cls, VirtioDriver)):
                    raise TypeError(f"{ep.value} is not a VirtioDriver subclass")
                if self.driver_for_registered(cls.device_id) is None:
                    self.register_driver(cls.device_id, cls)
            except Exception as e:  # a broken plugin must not stop the boot
                what = f"{ep.value}: {type(e).__name__}: {e}"
                self.plugin_errors.append(what)
                log.warning("driver plugin %s skipped: %s", ep.name, what)

    def driver_for_registered(self, device_id: int) -> type[VirtioDriver] | None:
        """The driver registered for ``device_id`` now (no plugin loading), or None."""
        with self._lock:
            return self._drivers.get(int(device_id))

    def probe(self, transport: VirtioTransport) -> VirtioDriver:
        """Bring up the device behind ``transport`` (launched already) with the driver
        registered for its device id; returns the bound driver. Raises
        :class:`DeviceProbeError` on any failure."""
        try:
            info = transport.get_device_info()
            transport.check_info(info)  # kernel-side caps on what the device reports
            cls = self.driver_for(info.device_id)
            if cls is None:
                try:
                    kind = DeviceId(info.device_id).name
                except ValueError:
                    kind = "unknown"
                raise transport.probe_error(
                    f"no driver registered for device id {info.device_id} ({kind}, "
                    f"device calls itself {info.name!r})"
                )
            transport.negotiate(lambda offered: cls.features_for(transport, offered))
            transport.setup_memory()
            driver = cls(transport)
            driver.probe()
            transport.driver_ok()
            driver.started()
            return driver
        except DeviceProbeError:
            raise
        except DeviceGoneError as e:
            raise transport.probe_error(f"{e.request}: device is gone ({e.cause})") from e
        except DeviceControlError as e:
            raise transport.probe_error(
                f"{e.request} refused by the device: {e.code}: {e.message}"
            ) from e
        except (VirtioError, ValueError, OSError) as e:
            raise transport.probe_error(f"{type(e).__name__}: {e}") from e


#: The bus ``kernel.boot`` uses unless told otherwise; built-in drivers register here.
default_bus = VirtioBus(plugins=True)


def register_driver(
    device_id: int, driver_cls: type[VirtioDriver], *, replace: bool = False
) -> None:
    """Register ``driver_cls`` for ``device_id`` on :data:`default_bus`."""
    default_bus.register_driver(device_id, driver_cls, replace=replace)
