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

from tools.errors import CliError
from vdev.virtio.units import parse_size

__all__ = ["main", "CliError"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{self.prog}: {message} (see '{self.prog} --help')", 2)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _device_id(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


MAX_SECONDS = 86400.0


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < v <= MAX_SECONDS:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be > 0 and at most {MAX_SECONDS:.0f}: {text!r}")
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
    d.add_argument(
        "--trace",
        action="store_true",
        help="print the live virtqueue trace of the demo's traffic (one line per event)",
    )
    d.add_argument(
        "--device",
        metavar="KIND",
        help="instead: boot a kernel with one device of this kind (built-in or installed "
        "by entry point) and run its driver's demo",
    )

    b = sub.add_parser("bench", help="benchmarks: the virtio path beside the native baseline")
    b.add_argument(
        "target",
        choices=["blk", "net", "trace-cost"],
        help="blk: virtio-blk beside os.pread/pwrite; net: UDP_STREAM between two kernels "
        "on the switch beside native UDP over loopback; trace-cost: blk and net rows with "
        "the code before tracing, tracing off and tracing on, interleaved",
    )
    b.add_argument("--image", help="raw image to use (default: a temporary 128 MiB file)")
    b.add_argument(
        "--seconds",
        type=_positive_float,
        default=1.0,
        help="duration of each measurement (default 1.0)",
    )
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument(
        "--queues",
        type=int,
        default=1,
        metavar="N",
        help="blk: request queues of the disk, 1..16 (VIRTIO_BLK_F_MQ; the depth-32 rows "
        "then submit from N threads; default 1)",
    )
    b.add_argument(
        "--queue-pairs",
        type=int,
        default=1,
        metavar="N",
        help="net: virtio-net queue pairs of both kernels, 1..16 (VIRTIO_NET_F_MQ; the UDP "
        "rows then send from N threads; default 1)",
    )
    b.add_argument(
        "--poll",
        choices=("on", "off", "both"),
        default="on",
        help="hybrid polling in the kernels and devices (on: the default; off: every wait "
        "is a doorbell; blk only: both, each row with polling on and off)",
    )
    b.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="run only this row (repeatable)",
    )
    b.add_argument(
        "--tcp",
        action="store_true",
        help="net: TCP_STREAM rows (tcp-1024, tcp-16384, tcp-65536 with TSO, "
        "tcp-65536-notso) instead of UDP_STREAM",
    )
    b.add_argument(
        "--ring",
        action="store_true",
        help="net: both kernels attach to ring ports of the switch (python -m vdev switch "
        "--ring-ports): no device processes, frames copied ring to ring",
    )
    b.add_argument(
        "--stages",
        action="store_true",
        help="blk, net: also print the CPU time per request (blk) or packet (net) of each "
        "process on the virtio path",
    )
    b.add_argument(
        "--profile",
        metavar="DIR",
        help="blk, net: record the kernel and every device/switch process with py-spy "
        "while the virtio rows run; writes DIR/<role>.speedscope.json and DIR/summary.txt "
        "(top functions by own time; needs the bench extra)",
    )
    b.add_argument(
        "--plot",
        metavar="PATH",
        help="net: draw goodput against payload size, both paths, as a PNG (matplotlib)",
    )
    b.add_argument(
        "--rounds",
        type=int,
        default=9,
        help="trace-cost: interleaved rounds of the three configurations (default 9)",
    )
    b.add_argument(
        "--before",
        metavar="REV",
        default="dfe225f^",
        help="trace-cost: the commit before tracing (default dfe225f^)",
    )

    v = sub.add_parser(
        "vm",
        help="boot a small Linux guest in QEMU whose /dev/vda is a vhost-user-blk backend "
        "and/or whose eth0 is our virtio-net back-end on the switch",
    )
    v.add_argument("--setup", action="store_true", help="download and unpack the guest kernel")
    v.add_argument("--image", help="raw image to serve (default: a temporary empty one)")
    v.add_argument(
        "--size", type=_size, default=64 << 20, help="size of the temporary image (default 64M)"
    )
    v.add_argument(
        "--backend",
        choices=["vlab", "qsd"],
        default="vlab",
        help="vlab: python -m vdev blk --vhost-user (default); qsd: qemu-storage-daemon",
    )
    v.add_argument(
        "--run", metavar="CMD", help="shell command to run in the guest (exit status is ours)"
    )
    v.add_argument(
        "--timeout",
        type=_positive_float,
        default=180.0,
        help="kill the guest after S seconds (default 180)",
    )
    v.add_argument("--verbose", action="store_true", help="echo the guest console to stderr")
    v.add_argument(
        "--trace",
        metavar="FILE",
        help="the back-ends append their virtqueue trace (JSON Lines) to FILE: the "
        "device-side half of every request the guest's drivers make",
    )
    v.add_argument(
        "--faults",
        metavar="PLAN",
        help="a fault plan (.json/.toml/.yaml, docs/faults.md) the vlab back-ends inject "
        "into the guest's requests",
    )
    v.add_argument(
        "--net",
        nargs="?",
        const="auto",
        metavar="EP",
        help="give the guest eth0 (Linux's virtio_net over vhost-user, our net back-end) on "
        "the switch at the ipc:// endpoint EP; without EP (or 'auto') start a switch for "
        "the guest, stopped when it ends. With --net and no --image the guest has no disk",
    )
    v.add_argument(
        "--ip",
        metavar="ADDR/LEN",
        help="with --net: the address of the guest's eth0, e.g. 10.0.0.2/24",
    )
    v.add_argument(
        "--net-offload",
        choices=["on", "off"],
        default="on",
        help="with --net: 'off' turns off checksum and TSO offloads of the guest's NIC "
        "(QEMU's csum, guest_csum, host_tso4, guest_tso4; default on)",
    )
    r = sub.add_parser(
        "run",
        help="run an unmodified Python program on a kernel of its own: its AF_INET "
        "sockets, select and selectors use the kernel's network stack",
    )
    r.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="SPEC",
        help="a NIC: kernel.Net keyword arguments as key=value,... "
        "(e.g. backend=switch,switch=EP,ip=10.0.0.2/24); repeatable",
    )
    r.add_argument(
        "--blk",
        action="append",
        default=[],
        metavar="SPEC",
        help="a disk: kernel.Blk keyword arguments as key=value,... "
        "(e.g. path=disk.img,readonly=true); repeatable",
    )
    r.add_argument(
        "program",
        nargs=argparse.REMAINDER,
        metavar="-- python PROGRAM ARGS",
        help="python [-u] (PROGRAM | -m MODULE | -c CODE) ARGS...",
    )
    t = sub.add_parser(
        "trace",
        help="run a program with virtqueue tracing on (VLAB_TRACE), or turn a trace "
        "into text (--input)",
    )
    t.add_argument("-o", "--output", help="write the trace here (default: stdout)")
    t.add_argument(
        "--format",
        choices=["text", "jsonl", "perfetto", "pcapng"],
        default="text",
        help="text: one aligned line per event with decoded payloads; jsonl: the "
        "JSON Lines of docs/trace-format.md; perfetto: Trace Event JSON for "
        "ui.perfetto.dev; pcapng: the virtio-net frames (default text). Also: "
        "'vlab trace convert|stats|ring --help'",
    )
    t.add_argument("-i", "--input", help="convert this JSONL trace to text instead of running")
    t.add_argument(
        "program",
        nargs=argparse.REMAINDER,
        metavar="-- PROGRAM ARGS",
        help="the program to trace, e.g. -- python my_program.py",
    )
    dv = sub.add_parser(
        "devices",
        help="list the device kinds installed (built-in and by entry point) with their options",
    )
    dv.add_argument("--json", action="store_true", help="a machine-readable list")
    nd = sub.add_parser(
        "new-device",
        help="scaffold a package with a device, its kernel driver, tests and entry points",
    )
    nd.add_argument("name", help="the device kind: a lower-case identifier, e.g. 'mydev'")
    nd.add_argument("--dir", metavar="DIR", help="where to create it (default ./vlab-NAME)")
    nd.add_argument(
        "--device-id",
        type=_device_id,
        default=None,
        metavar="N",
        help="the vendor device id (decimal or 0x..., default 0xF1)",
    )
    cn = sub.add_parser(
        "console",
        help="attach this terminal to a virtio-console device: a small shell in the kernel "
        "reads /dev/hvc0 ('help', 'exit'; Ctrl-D ends)",
    )
    cn.add_argument(
        "--trace",
        action="store_true",
        help="print the virtqueue trace on stderr as the bytes go (one line per event)",
    )
    from tools import faults_cli

    faults_cli.add_parser(sub, _positive_float)
    return p


#: The ``vlab trace`` subcommands that work on a trace file.
TRACE_TOOLS = ("convert", "stats", "ring")


def build_trace_tools_parser() -> argparse.ArgumentParser:
    """The parser of ``vlab trace convert|stats|ring`` (kept apart from ``vlab trace
    -- PROGRAM``, whose program words must not be taken for a subcommand)."""
    p = _Parser(prog="vlab trace", description="work on a JSONL virtqueue trace")
    sub = p.add_subparsers(dest="tool", required=True, parser_class=_Parser)
    c = sub.add_parser("convert", help="convert a trace to text, jsonl, perfetto or pcapng")
    c.add_argument("input", help="the JSONL trace")
    c.add_argument("-o", "--output", help="write here (default: stdout)")
    c.add_argument("--format", choices=["text", "jsonl", "perfetto", "pcapng"], default="text")
    st = sub.add_parser("stats", help="per-queue latency, kicks, interrupts, occupancy")
    st.add_argument("input", help="the JSONL trace")
    st.add_argument("--json", action="store_true", help="print the numbers as JSON")
    r = sub.add_parser("ring", help="draw a queue's rings as they were at an event")
    r.add_argument("input", help="the JSONL trace")
    r.add_argument("--queue", required=True, help="DEV:INDEX, e.g. vda:0")
    r.add_argument(
        "--at", type=int, help="the queue's N-th event (1-based, time order; default the last)"
    )
    r.add_argument("--html", metavar="PATH", help="write a self-contained HTML page with a slider")
    r.add_argument(
        "--follow", action="store_true", help="redraw as the file grows (Ctrl-C to stop)"
    )
    return p


def _trace_tools(argv: Sequence[str]) -> int:
    from tools import trace

    args = build_trace_tools_parser().parse_args(argv)
    if args.tool == "convert":
        return trace.convert_main(args.input, args.output, args.format)
    if args.tool == "stats":
        return trace.stats_main(args.input, args.json)
    return trace.ring_main(args.input, args.queue, args.at, args.html, args.follow)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vlab`` console script; returns the exit status."""
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        if len(words) >= 2 and words[0] == "trace" and words[1] in TRACE_TOOLS:
            return _trace_tools(words[1:])
        args = build_parser().parse_args(words)
        if args.command == "demo":
            from tools import demo

            if args.device is not None:
                if args.image or args.write:
                    raise CliError("demo: --device boots its own device; no --image/--write", 2)
                return demo.run_device(args.device, trace=args.trace)
            return demo.run(image=args.image, write=args.write, size=args.size, trace=args.trace)
        if args.command == "bench":
            if args.target == "trace-cost":
                from tools import trace_cost

                if args.plot or args.tcp or args.stages or args.ring:
                    raise CliError(
                        "bench trace-cost: --plot, --tcp, --ring and --stages are for net", 2
                    )
                if args.profile is not None:
                    raise CliError("bench trace-cost: --profile is for bench blk and net", 2)
                if args.queues != 1 or args.poll != "on":
                    raise CliError("bench trace-cost: --queues and --poll are for bench blk", 2)
                if args.queue_pairs != 1:
                    raise CliError("bench trace-cost: --queue-pairs is for bench net", 2)
                return trace_cost.run_trace_cost(
                    before=args.before,
                    rounds=args.rounds,
                    seconds=args.seconds,
                    only=args.only,
                    image=args.image,
                    as_json=args.json,
                )
            if args.target == "net":
                from tools import bench_net

                if args.image:
                    raise CliError("bench net: --image is for bench blk", 2)
                if args.queues != 1:
                    raise CliError("bench net: --queues is for bench blk", 2)
                if args.poll == "both":
                    raise CliError("bench net: --poll takes on or off (both is for bench blk)", 2)
                return bench_net.run_net(
                    seconds=args.seconds,
                    as_json=args.json,
                    plot=args.plot,
                    only=args.only,
                    stages_table=args.stages,
                    tcp=args.tcp,
                    profile=args.profile,
                    poll=args.poll,
                    ring=args.ring,
                    queue_pairs=args.queue_pairs,
                )
            from tools import bench

            if args.plot or args.tcp or args.ring:
                raise CliError("bench blk: --plot, --tcp and --ring are for bench net", 2)
            if args.queue_pairs != 1:
                raise CliError("bench blk: --queue-pairs is for bench net (blk: --queues)", 2)
            return bench.run_blk(
                image=args.image,
                seconds=args.seconds,
                as_json=args.json,
                only=args.only,
                profile=args.profile,
                queues=args.queues,
                poll=args.poll,
                stages=args.stages,
            )
        if args.command == "vm":
            from tools import vm

            if args.setup and (args.image or args.run or args.net):
                raise CliError("vm: --setup does not boot a guest; run it alone", 2)
            return vm.run(
                image=args.image,
                backend=args.backend,
                command=args.run,
                timeout=args.timeout,
                size=args.size,
                do_setup=args.setup,
                verbose=args.verbose,
                net=args.net,
                ip=args.ip,
                net_offload=args.net_offload == "on",
                trace=args.trace,
                faults=args.faults,
            )
        if args.command == "trace":
            from tools import trace

            return trace.main(args.input, args.output, args.format, list(args.program))
        if args.command == "run":
            from tools import run

            words = list(args.program)
            if words and words[0] == "--":
                words.pop(0)
            return run.run(args.net, args.blk, words)
        if args.command == "devices":
            from tools import devices

            return devices.run(as_json=args.json)
        if args.command == "new-device":
            from tools import newdevice

            device_id = newdevice.DEFAULT_DEVICE_ID if args.device_id is None else args.device_id
            return newdevice.run(args.name, args.dir, device_id)
        if args.command == "console":
            from tools import console

            return console.run(trace=args.trace)
        if args.command == "faults":
            from tools import faults_cli

            return faults_cli.run(args)
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
