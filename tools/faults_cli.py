"""``vlab faults``: check a fault plan, run the fault matrix.

* ``vlab faults check PLAN [--seed N]`` -- load and validate a plan file (JSON, TOML,
  YAML), print its rules, seed and warnings; a bad plan is one line naming the rule and
  the field, exit 2.
* ``vlab faults matrix [--workload blk|net|both] [--seeds N] [--seed S] [--only K,...]
  [--jobs J] [--timeout S] [--integrity on|off] [--json]`` -- :mod:`tools.faults_matrix`:
  every built-in fault kind against a real workload; a progress bar on stderr, the table
  (or ``--json``) on stdout; exit 1 when a row lost data, hung or crashed the kernel.
  ``--integrity`` (default ``on``) runs the blk workload's disk in the block layer's
  integrity mode (``kernel.Blk(..., integrity=True)``), which repairs or reports the
  silent faults ``drop_write``, ``torn_write`` and ``corrupt_read``; ``off`` shows what
  the plain driver does (it loses data under them).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tools.errors import CliError

__all__ = ["add_parser", "run"]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= v <= 10000:
        raise argparse.ArgumentTypeError(f"must be 1..10000: {text!r}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= v < 1 << 63:
        raise argparse.ArgumentTypeError(f"must be 0..2^63-1: {text!r}")
    return v


def add_parser(sub: Any, float_type: Any) -> None:
    """Add ``faults`` and its sub-commands to ``vlab``'s sub-parsers."""
    f = sub.add_parser("faults", help="fault plans: check one, run the fault matrix")
    fsub = f.add_subparsers(dest="faults_command", required=True, parser_class=type(f))
    c = fsub.add_parser("check", help="validate a fault plan file and show it")
    c.add_argument("plan", help="a .json, .toml or .yaml plan")
    c.add_argument("--seed", type=_seed, help="override the plan's seed")
    m = fsub.add_parser("matrix", help="every built-in fault kind against a real workload")
    m.add_argument("--workload", choices=("blk", "net", "both"), default="both")
    m.add_argument("--seeds", type=_positive_int, default=1, help="seeds per row (default 1)")
    m.add_argument("--seed", type=_seed, default=1, help="first seed (default 1)")
    m.add_argument("--only", help="comma-separated fault kinds (default: all)")
    m.add_argument("--jobs", type=_positive_int, default=1, help="rows at a time (default 1)")
    m.add_argument(
        "--timeout", type=float_type, default=60.0, help="watchdog per row, s (default 60)"
    )
    m.add_argument(
        "--integrity",
        choices=("on", "off"),
        default="on",
        help="blk: the block layer's integrity mode (default on; off: the plain driver)",
    )
    m.add_argument("--json", action="store_true", help="print JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    """Run ``vlab faults ...``; returns the exit status."""
    if args.faults_command == "check":
        return _check(args.plan, args.seed)
    return _matrix(args)


def _check(path: str, seed: int | None) -> int:
    from vdev.faultplan import load_plan
    from vdev.virtio.faults import FaultPlanError

    try:
        plan = load_plan(path, seed=seed)
    except FaultPlanError as e:
        raise CliError(str(e), 2) from None
    except OSError as e:
        raise CliError(f"{path}: {e.strerror or e}", 2) from None
    print(f"{path}: {len(plan.rules)} rules, seed {plan.seed}, initial state {plan.state!r}")
    for r in plan.rules:
        what = r.action or "(state change only)"
        goes = f" -> state {r.set_state!r}" if r.set_state else ""
        print(f"  {r.name}: {r.raw.get('when', {}).get('event')} -> {what}{goes}")
    for w in plan.warnings:
        print(f"warning: {w}")
    return 0


def _matrix(args: argparse.Namespace) -> int:
    from tools import faults_matrix as fm

    only: list[str] = []
    if args.only:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        known = {k.name for k in fm.KINDS}
        bad = [s for s in only if s not in known]
        if bad:
            raise CliError(
                f"faults matrix: unknown fault kind {bad[0]!r} (known: {', '.join(sorted(known))})",
                2,
            )
    if not fm.rows_for(args.workload, only):
        raise CliError(f"faults matrix: no fault kind of {only} applies to {args.workload}", 2)
    tty = sys.stderr.isatty()

    def progress(done: int, total: int, row: dict[str, Any]) -> None:
        width = 30
        bar = "#" * (done * width // total)
        line = f"[{bar:<{width}}] {done}/{total} {row['fault']}/{row['workload']}: {row['outcome']}"
        if tty:
            end = "\n" if done == total else ""
            print(f"\r\033[K{line}", end=end, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    result = fm.run_matrix(
        args.workload,
        seeds=args.seeds,
        seed=args.seed,
        only=only,
        jobs=args.jobs,
        timeout_s=args.timeout,
        progress=progress,
        integrity=args.integrity == "on",
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(fm.render(result))
    bad_rows = [r for r in result["rows"] if r["outcome"] in ("data-lost", "hang", "kernel-crash")]
    return 1 if bad_rows else 0
