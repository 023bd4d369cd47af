"""Loading a fault plan (:mod:`vdev.virtio.faults`) from a file: JSON, TOML, or YAML
when PyYAML is importable.

The format is chosen by the file's suffix (``.json``, ``.toml``, ``.yaml``/``.yml``)
unless ``fmt`` is given. Every failure (missing file, syntax error, invalid plan) is a
:class:`~vdev.virtio.faults.FaultPlanError` with one line naming the file and what is
wrong, for a CLI to print as it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vdev.virtio.faults import FaultPlan, FaultPlanError

__all__ = ["FORMATS", "yaml_available", "plan_from_text", "load_plan"]

#: File suffix -> format name.
FORMATS = {".json": "json", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}

_MAX_PLAN_BYTES = 1 << 20  # a plan is a few rules; refuse anything huge


def _yaml() -> Any:
    try:
        return importlib.import_module("yaml")
    except ImportError:
        return None


def yaml_available() -> bool:
    """Is PyYAML importable (so YAML plans can be read)?"""
    return _yaml() is not None


def plan_from_text(
    text: str,
    fmt: str,
    *,
    seed: int | None = None,
    clock: Callable[[], float] | None = None,
) -> FaultPlan:
    """Parse and validate a plan in ``fmt`` ``json``, ``toml`` or ``yaml``."""
    if fmt != "yaml":
        return FaultPlan.from_text(text, fmt, seed=seed, clock=clock)
    yaml = _yaml()
    if yaml is None:
        raise FaultPlanError(
            "plan: YAML plans need PyYAML, which is not installed; use JSON or TOML"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise FaultPlanError(f"plan: YAML syntax: {' '.join(str(e).split())}") from None
    return FaultPlan.from_dict(data, seed=seed, clock=clock)


def load_plan(
    path: str | Path,
    *,
    fmt: str | None = None,
    seed: int | None = None,
    clock: Callable[[], float] | None = None,
) -> FaultPlan:
    """Read, parse and validate the plan at ``path``. Errors are one-line
    :class:`FaultPlanError` messages starting with the path."""
    p = Path(path)
    if fmt is None:
        fmt = FORMATS.get(p.suffix.lower())
        if fmt is None:
            known = ", ".join(FORMATS)
            raise FaultPlanError(f"{p}: unknown plan format {p.suffix!r} (suffixes: {known})")
    try:
        with p.open("rb") as f:
            raw = f.read(_MAX_PLAN_BYTES + 1)
    except OSError as e:
        raise FaultPlanError(f"{p}: cannot read: {e.strerror}") from None
    if len(raw) > _MAX_PLAN_BYTES:
        raise FaultPlanError(f"{p}: larger than {_MAX_PLAN_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FaultPlanError(f"{p}: not UTF-8 (byte {e.start})") from None
    try:
        return plan_from_text(text, fmt, seed=seed, clock=clock)
    except FaultPlanError as e:
        raise FaultPlanError(f"{p}: {e}") from None
