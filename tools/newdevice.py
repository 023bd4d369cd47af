"""``vlab new-device NAME``: scaffold a package with a device, its driver and their tests.

Theory of operation
-------------------
The templates are package data of :mod:`tools` (``tools/templates/newdevice/*.tmpl``,
read with :mod:`importlib.resources`, so they are there in an installed virtio-lab as
in a checkout). Each holds ``{{placeholder}}`` words that :func:`render` replaces:

============== ===================================== ==================
placeholder    what                                  for ``my_dev``
============== ===================================== ==================
``name``       the device kind (``python -m vdev``)  ``my_dev``
``pkg``        the Python package                    ``vlab_my_dev``
``dist``       the distribution (``pip``)            ``vlab-my-dev``
``Class``      the prefix of the class names         ``MyDev``
``prefix``     the kernel's device name prefix       ``mydev``
``device_id``  the vendor device id                  ``0xF1``
============== ===================================== ==================

(``prefix`` is what ``kernel.Custom(NAME)`` names the device: the kind without its
underscores, so the node is ``/dev/<prefix>0``.) :func:`scaffold` checks everything
before it writes anything: the name (:data:`NAME_RE`, not a built-in kind, not a kind
an installed package declares), the device id (:data:`MIN_DEVICE_ID` ..
:data:`MAX_DEVICE_ID`, not bound by a kernel driver already) and the directory (it must
not exist; its parent must). Then it creates the directory and writes the files
(:data:`LAYOUT`); if writing fails half-way, the directory is removed again.

The package it makes declares the device in the ``vlab.devices`` entry-point group and
the driver in ``vlab.drivers`` (the group :mod:`kernel.bus` reads when it meets a
device id no driver claims), so after ``pip install -e DIR`` both
``python -m vdev NAME`` and ``kernel.boot(devices=[kernel.Custom(NAME)])`` find them
with nothing imported by hand; the driver's ``demo(k)`` is what ``vlab demo --device
NAME`` runs.
"""

from __future__ import annotations

import keyword
import os
import re
import shutil
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

from tools.errors import CliError

__all__ = [
    "NAME_RE",
    "DEFAULT_DEVICE_ID",
    "MIN_DEVICE_ID",
    "MAX_DEVICE_ID",
    "LAYOUT",
    "Names",
    "check_name",
    "check_device_id",
    "names",
    "render",
    "scaffold",
    "run",
]

#: What a device name may look like: a lower-case identifier of at most 16 characters
#: (it becomes a Python package name, an entry-point name and a ``python -m vdev`` kind).
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,15}\Z")
#: The scaffold's vendor device id unless ``--device-id`` says otherwise (our own kv
#: example is 0xF0).
DEFAULT_DEVICE_ID = 0xF1
#: Ids below this are assigned (or kept for assignment) by the virtio spec (§5).
MIN_DEVICE_ID = 0x40
#: The largest device id (virtio-pci derives a 16-bit PCI device id from it, §4.1.2.1).
MAX_DEVICE_ID = 0xFFFF
#: Template → path in the new package (``{pkg}`` is the package's name).
LAYOUT: dict[str, str] = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "__init__.py.tmpl": "{pkg}/__init__.py",
    "device.py.tmpl": "{pkg}/device.py",
    "driver.py.tmpl": "{pkg}/driver.py",
    "test_device.py.tmpl": "tests/test_device.py",
    "test_kernel.py.tmpl": "tests/test_kernel.py",
}
#: ``python -m vdev`` subcommands that are not device kinds but still taken.
_RESERVED = {"switch"}
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True)
class Names:
    """Every name the templates use, derived from the device name (module docstring)."""

    name: str
    pkg: str
    dist: str
    Class: str  # the placeholder's spelling
    prefix: str
    device_id: str

    def as_dict(self) -> dict[str, str]:
        """Placeholder → value."""
        return {
            "name": self.name,
            "pkg": self.pkg,
            "dist": self.dist,
            "Class": self.Class,
            "prefix": self.prefix,
            "device_id": self.device_id,
        }


def check_name(name: str) -> None:
    """Raise :class:`CliError` (status 2, one line) unless ``name`` can be a new kind."""
    from vdev.registry import BUILTIN_KINDS, ENTRY_POINT_GROUP

    if not NAME_RE.match(name):
        raise CliError(
            f"new-device: bad name {name!r}: a lower-case letter, then up to 15 lower-case "
            "letters, digits or '_'",
            2,
        )
    if keyword.iskeyword(name):
        raise CliError(f"new-device: {name!r} is a Python keyword", 2)
    if name in BUILTIN_KINDS or name in _RESERVED:
        raise CliError(f"new-device: {name!r} is a built-in device kind; choose another name", 2)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            dist = getattr(ep, "dist", None)
            by = dist.name if dist is not None else ep.value
            raise CliError(f"new-device: device kind {name!r} is already installed (by {by})", 2)


def check_device_id(device_id: int) -> None:
    """Raise :class:`CliError` (status 2) unless ``device_id`` is a free vendor id."""
    if not MIN_DEVICE_ID <= device_id <= MAX_DEVICE_ID:
        raise CliError(
            f"new-device: device id {device_id:#x} is outside {MIN_DEVICE_ID:#x}.."
            f"{MAX_DEVICE_ID:#x} (ids below {MIN_DEVICE_ID:#x} belong to the virtio spec, §5)",
            2,
        )
    from kernel.bus import default_bus

    taken = default_bus.driver_for(device_id)  # built-ins and installed driver plugins
    if taken is not None:
        raise CliError(
            f"new-device: device id {device_id:#x} is taken by the kernel driver "
            f"{taken.__module__}.{taken.__name__}; pass another --device-id",
            2,
        )


def names(name: str, device_id: int = DEFAULT_DEVICE_ID) -> Names:
    """The template names for device ``name`` (not checked: see :func:`check_name`)."""
    return Names(
        name=name,
        pkg=f"vlab_{name}",
        dist=f"vlab-{name.replace('_', '-')}",
        Class="".join(part.capitalize() for part in name.split("_")),
        prefix=re.sub(r"[^a-z0-9]", "", name)[:16],
        device_id=f"0x{device_id:02X}",
    )


def render(template: str, values: dict[str, str]) -> str:
    """``template`` with every ``{{placeholder}}`` replaced; ValueError for an unknown
    placeholder (a broken template, never the user's fault)."""

    def one(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            raise ValueError(f"template placeholder {{{{{key}}}}} has no value")
        return values[key]

    return _PLACEHOLDER.sub(one, template)


def _template(name: str) -> str:
    return (resources.files("tools") / "templates" / "newdevice" / name).read_text("utf-8")


def scaffold(
    name: str, directory: str | os.PathLike[str] | None = None, device_id: int = DEFAULT_DEVICE_ID
) -> list[Path]:
    """Write the package for device ``name`` into ``directory`` (default
    ``./vlab-NAME``, which must not exist) and return the files written.
    :class:`CliError` (status 2) for a bad name, id or directory."""
    check_name(name)
    check_device_id(device_id)
    n = names(name, device_id)
    root = Path(directory if directory is not None else f"vlab-{name}")
    if root.exists() or root.is_symlink():
        raise CliError(f"new-device: {root} exists; will not overwrite it", 2)
    if not root.absolute().parent.is_dir():
        raise CliError(f"new-device: no directory {root.absolute().parent} to create {root} in", 2)
    values = n.as_dict()
    texts = {path.format(pkg=n.pkg): render(_template(t), values) for t, path in LAYOUT.items()}
    try:
        root.mkdir()
    except OSError as e:
        raise CliError(f"new-device: cannot create {root}: {e.strerror}", 1) from None
    written: list[Path] = []
    try:
        for rel, text in texts.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    except OSError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise CliError(f"new-device: cannot write {root}: {e.strerror}", 1) from None
    return written


def run(name: str, directory: str | None = None, device_id: int = DEFAULT_DEVICE_ID) -> int:
    """``vlab new-device NAME [--dir DIR] [--device-id N]``: scaffold and say what next."""
    files = scaffold(name, directory, device_id)
    root = files[0].parent
    n = names(name, device_id)
    print(f"created {root}/ (device kind {name!r}, vendor device id {n.device_id}):")
    for f in files:
        print(f"  {f.relative_to(root)}")
    print()
    print("next:")
    print(f"  pip install --no-build-isolation -e {root}")
    print("  vlab devices")
    print(f"  vlab demo --device {name}")
    print(f"  cd {root} && python -m pytest")
    return 0
