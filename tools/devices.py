"""``vlab devices``: the device kinds ``python -m vdev`` can run, with their options.

Theory of operation
-------------------
The kinds come from :func:`vdev.registry.kinds` (built-ins, ``vlab.devices`` entry
points, kinds registered in this process). For each kind :func:`describe` imports its
class (:meth:`vdev.registry.DeviceKind.load`) and runs its options hook on a fresh
argparse parser, then reads the options back from the parser's actions: option
strings, metavar, default, help. ``blk`` and ``net`` keep their own command lines
(:func:`vdev.__main__.build_parser`), whose subparsers are read the same way. The
runtime's ``--control`` / ``--vhost-user`` (every kind has them) are not listed.

A kind whose module does not import, whose class is not a device or whose hook fails
is listed with the error on one line (``error``) instead of its options: one broken
package never hides the others, and never prints a traceback.

Entry-point kinds are attributed to the distribution that declares them
(``origin``: its package name); built-ins say ``built-in``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from tools.table import render_table
from vdev.registry import ENTRY_POINT_GROUP, DeviceKind, kinds

__all__ = ["OptionInfo", "KindInfo", "describe", "describe_all", "run"]

#: Options every kind has (the runtime's), not listed per kind.
RUNTIME_OPTIONS = {"control", "vhost_user", "help"}


@dataclass
class OptionInfo:
    """One command-line option of a kind."""

    options: list[str]
    metavar: str | None
    default: Any
    help: str


@dataclass
class KindInfo:
    """One device kind: where it comes from, its class, help and options (or the
    one-line ``error`` that kept them from being read)."""

    name: str
    origin: str
    target: str
    help: str
    options: list[OptionInfo] = field(default_factory=list)
    error: str | None = None


class _QuietParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def _plain(value: Any) -> Any:
    """A default as JSON can carry it (anything else as its ``str``)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _options(parser: argparse.ArgumentParser, skip: set[str]) -> list[OptionInfo]:
    out: list[OptionInfo] = []
    for a in parser._actions:
        if not a.option_strings or a.dest in skip or a.help == argparse.SUPPRESS:
            continue
        default = None if a.default is argparse.SUPPRESS else a.default
        metavar = a.metavar if isinstance(a.metavar, str) else None
        if metavar is None and a.nargs != 0:
            metavar = a.dest.upper()
        out.append(OptionInfo(list(a.option_strings), metavar, _plain(default), a.help or ""))
    return out


def _entry_point_packages() -> dict[str, str]:
    """Kind name → the distribution declaring it in ``vlab.devices``."""
    out: dict[str, str] = {}
    try:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            out[ep.name] = dist.name if dist is not None else "entry point"
    except Exception:  # broken metadata: the registry's own origin stays
        pass
    return out


def _own_command_line(name: str) -> argparse.ArgumentParser:
    """The subparser of ``blk`` / ``net`` in ``python -m vdev``."""
    from vdev.__main__ import build_parser, load_net_backends

    parser = build_parser(load_net_backends() if name == "net" else None)
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices[name]  # type: ignore[no-any-return]
    raise LookupError(f"python -m vdev has no {name} command")


def describe(kind: DeviceKind, package: str | None = None) -> KindInfo:
    """What ``vlab devices`` says about ``kind``; never raises."""
    origin = {"builtin": "built-in"}.get(kind.origin, kind.origin)
    if kind.origin == "entry point" and package:
        origin = package
    info = KindInfo(kind.name, origin, kind.target, kind.help)
    try:
        cls = kind.load()
        if not info.help:
            info.help = (cls.__doc__ or "").strip().split("\n")[0]
        if kind.origin == "builtin" and kind.name in ("blk", "net"):
            parser = _own_command_line(kind.name)
        else:
            parser = _QuietParser(prog=kind.name, add_help=False)
            hook = kind.options_hook(cls)
            if hook is not None:
                hook(parser)
        info.options = _options(parser, RUNTIME_OPTIONS)
    except Exception as e:  # any failure of a plug-in: one line, never a traceback
        text = str(e).strip().split("\n")[0]
        info.error = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return info


def describe_all() -> list[KindInfo]:
    """Every known kind, built-ins first, then the others by name."""
    packages = _entry_point_packages()
    found = kinds()
    order = sorted(found.values(), key=lambda k: (k.origin != "builtin", k.name))
    return [describe(k, packages.get(k.name)) for k in order]


def render(infos: list[KindInfo]) -> str:
    """The readable listing: one table of kinds, then each kind's options."""
    rows = [[i.name, i.origin, i.target, i.error or i.help] for i in infos]
    parts = [render_table(["kind", "origin", "class", "help"], rows)]
    for i in infos:
        head = f"{i.name} ({i.target})"
        if i.error is not None:
            parts.append(f"{head}: cannot be loaded: {i.error}")
            continue
        if not i.options:
            parts.append(f"{head}: no options")
            continue
        opts = [
            [", ".join(o.options), o.metavar or "", "" if o.default is None else str(o.default),
             o.help]
            for o in i.options
        ]  # fmt: skip
        parts.append(f"{head}:\n" + render_table(["option", "metavar", "default", "help"], opts))
    parts.append("Every kind also takes --control ENDPOINT or --vhost-user SOCKET_PATH.")
    return "\n\n".join(parts)


def run(as_json: bool = False) -> int:
    """``vlab devices [--json]``: print the listing; exit status 0."""
    infos = describe_all()
    if as_json:
        print(json.dumps([asdict(i) for i in infos], indent=2))
    else:
        print(render(infos))
    return 0
