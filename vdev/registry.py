"""Device kinds: what ``python -m vdev KIND`` can run.

Theory of operation
-------------------
A *kind* is a name bound to a :class:`~vdev.device.Device` subclass given as a
``"pkg.module:Class"`` path, plus an optional options hook that adds the kind's
command-line options to an argparse parser. Three places provide kinds:

* the built-ins (:data:`BUILTIN_KINDS`): ``blk``, ``net`` (both keep their own
  command lines in :mod:`vdev.__main__`), ``rng`` (:mod:`vdev.examples.rng`) and
  ``console`` (:mod:`vdev.examples.console`);
* installed packages, through the entry-point group :data:`ENTRY_POINT_GROUP`
  (``vlab.devices``): in a package's ``pyproject.toml``::

      [project.entry-points."vlab.devices"]
      kv = "mypkg.kv:KvDevice"

* :func:`register_kind` at run time (a test, or a module imported first).

Anything else that contains a ``:`` is taken as a class path itself (``python -m vdev
mypkg.kv:KvDevice --control EP``), so a device needs no registration at all to run.

How a device is built from its command line: the options hook (the kind's
``add_options``, else the class's ``add_arguments`` static/class method, if any) adds
options to the parser; after parsing, ``Class.from_args(args)`` is called if the class
defines it, else ``Class(**kwargs)`` with every option the hook added whose value is not
None (``--seed 7`` → ``seed=7``). ``--control`` / ``--vhost-user`` are the
runtime's and are never passed to the device.

Only names are looked at until a kind is used: the module of a kind is imported by
:meth:`DeviceKind.load`, and the entry points are read once, on the first lookup that
the built-ins and registered kinds do not answer.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from vdev.device import Device

__all__ = [
    "DeviceKind",
    "KindError",
    "BUILTIN_KINDS",
    "ENTRY_POINT_GROUP",
    "register_kind",
    "kinds",
    "lookup",
    "load_class",
    "device_kwargs",
]

#: The entry-point group installed packages declare device kinds in.
ENTRY_POINT_GROUP = "vlab.devices"

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")

OptionsHook = Callable[[argparse.ArgumentParser], None]


class KindError(Exception):
    """A device kind that cannot be used: unknown, not importable, not a Device
    subclass (the user's fault: ``python -m vdev`` prints it on one line, exit 2)."""


@dataclass(frozen=True)
class DeviceKind:
    """One kind: ``name`` (the ``python -m vdev`` subcommand), ``target``
    (``"pkg.module:Class"``), an optional ``add_options(parser)`` hook, a one-line
    ``help`` and where it came from (``"builtin"``, ``"entry point"``,
    ``"registered"``, ``"path"``)."""

    name: str
    target: str
    add_options: OptionsHook | None = None
    help: str = ""
    origin: str = "registered"

    def load(self) -> type[Device]:
        """Import and return the device class (:class:`KindError` if impossible)."""
        return load_class(self.target)

    def options_hook(self, cls: type[Device]) -> OptionsHook | None:
        """The hook that adds this kind's options: ``add_options`` or the class's
        ``add_arguments``."""
        if self.add_options is not None:
            return self.add_options
        hook = getattr(cls, "add_arguments", None)
        return hook if callable(hook) else None


#: The kinds every installation has.
BUILTIN_KINDS: dict[str, DeviceKind] = {
    k.name: k
    for k in (
        DeviceKind("blk", "vdev.blk:BlkDevice", None, "virtio-blk (image or RAM)", "builtin"),
        DeviceKind("net", "vdev.net:NetDevice", None, "virtio-net on a backend", "builtin"),
        DeviceKind("rng", "vdev.examples.rng:RngDevice", None, "virtio-rng", "builtin"),
        DeviceKind(
            "console",
            "vdev.examples.console:ConsoleDevice",
            None,
            "virtio-console (stdio, pty or echo)",
            "builtin",
        ),
        DeviceKind("kv", "vdev.examples.kv:KvDevice", None, "key-value store (vendor)", "builtin"),
    )
}

_registered: dict[str, DeviceKind] = {}
_entry_points: dict[str, DeviceKind] | None = None


def register_kind(kind: DeviceKind, *, replace: bool = False) -> None:
    """Make ``kind`` available to ``python -m vdev`` in this process. ValueError for a
    bad name or target, or a name already taken (unless ``replace``)."""
    if not _NAME.match(kind.name):
        raise ValueError(f"bad device kind name {kind.name!r} (lower case, digits, - and _)")
    if not _PATH.match(kind.target):
        raise ValueError(f"bad device class path {kind.target!r} (want 'pkg.module:Class')")
    if not replace and (kind.name in _registered or kind.name in BUILTIN_KINDS):
        raise ValueError(f"device kind {kind.name!r} exists (pass replace=True)")
    _registered[kind.name] = kind


def _load_entry_points() -> dict[str, DeviceKind]:
    global _entry_points
    if _entry_points is None:
        found: dict[str, DeviceKind] = {}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if _NAME.match(ep.name) and _PATH.match(ep.value):
                found[ep.name] = DeviceKind(ep.name, ep.value, None, "", "entry point")
        _entry_points = found
    return _entry_points


def kinds() -> dict[str, DeviceKind]:
    """Every known kind by name: entry points, then built-ins, then registered ones
    (a later source wins a name clash)."""
    out = dict(_load_entry_points())
    out.update(BUILTIN_KINDS)
    out.update(_registered)
    return out


def lookup(name: str) -> DeviceKind:
    """The kind ``name`` (a registered name or a ``"pkg.module:Class"`` path);
    :class:`KindError` if there is none."""
    if name in _registered:
        return _registered[name]
    if name in BUILTIN_KINDS:
        return BUILTIN_KINDS[name]
    if ":" in name:
        if not _PATH.match(name):
            raise KindError(f"bad device class path {name!r} (want 'pkg.module:Class')")
        return DeviceKind(name, name, None, "", "path")
    found = _load_entry_points().get(name)
    if found is None:
        known = ", ".join(sorted({*kinds(), "switch"}))
        raise KindError(
            f"argument KIND: invalid choice: {name!r} (choose from {known}, or a pkg.module:Class)"
        )
    return found


def load_class(target: str) -> type[Device]:
    """Import ``"pkg.module:Class"`` and check it is a :class:`Device` subclass."""
    if not _PATH.match(target):
        raise KindError(f"bad device class path {target!r} (want 'pkg.module:Class')")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise KindError(f"cannot import {module_name}: {e}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise KindError(f"module {module_name} has no {attr}")
    if not (isinstance(cls, type) and issubclass(cls, Device)):
        raise KindError(f"{target} is not a vdev.Device subclass")
    return cls


def device_kwargs(args: argparse.Namespace, dests: list[str]) -> dict[str, Any]:
    """The keyword arguments of a device built from parsed options: every ``dest`` in
    ``dests`` whose value is not None."""
    out: dict[str, Any] = {}
    for dest in dests:
        value = getattr(args, dest, None)
        if value is not None:
            out[dest] = value
    return out
