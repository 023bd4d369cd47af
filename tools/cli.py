"""``vlab``: the command line of virtio-lab.

Every command reports a bad argument, a missing file or a failing device as one line
on stderr (``vlab: error: ...``) and a non-zero exit status: 2 for usage errors, 1 for
failures, 130 when interrupted. No traceback reaches the user unless ``VLAB_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from vdev.virtio.units import parse_size

__all__ = ["main", "CliError"]


class CliError(Exception):
    """A failure to report as one line; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{self.prog}: {message} (see '{self.prog} --help')", 2)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vlab`` (all subcommands)."""
    p = _Parser(
        prog="vlab",
        description="virtio-lab: a kernel core that reaches its devices only through virtio.",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser(
        "demo",
        help="boot a kernel with one virtio-blk device, write, read "
        "back, verify, and print the counters",
    )
    d.add_argument("--image", help="use this raw image (read-only unless --write)")
    d.add_argument(
        "--write",
        action="store_true",
        help="with --image: write a pattern, verify it, restore the original bytes",
    )
    d.add_argument(
        "--size", type=_size, default=64 << 20, help="size of the temporary image (default 64M)"
    )

    b = sub.add_parser("bench", help="benchmarks: the virtio path beside the native baseline")
    b.add_argument("target", choices=["blk"], help="what to benchmark")
    b.add_argument("--image", help="raw image to use (default: a temporary 128 MiB file)")
    b.add_argument(
        "--seconds",
        type=_positive_float,
        default=1.0,
        help="duration of each measurement (default 1.0)",
    )
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="run only this row (repeatable)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vlab`` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "demo":
            from tools import demo

            return demo.run(image=args.image, write=args.write, size=args.size)
        if args.command == "bench":
            from tools import bench

            return bench.run_blk(
                image=args.image, seconds=args.seconds, as_json=args.json, only=args.only
            )
        raise CliError(f"unknown command {args.command!r}", 2)
    except CliError as e:
        print(f"vlab: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("vlab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last line of defence: one line, not a traceback
        if os.environ.get("VLAB_DEBUG"):
            raise
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        where = f": {e.filename}" if isinstance(e, OSError) and e.filename else ""
        print(f"vlab: error: {type(e).__name__}: {msg}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
