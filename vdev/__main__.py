"""``python -m vdev KIND ...``: run one device process.

    python -m vdev blk --image PATH [--readonly] [--queue-size N] [--num-queues N]
                       --control ENDPOINT
    python -m vdev blk --memory SIZE [--readonly] [--queue-size N] [--num-queues N]
                       --control ENDPOINT
    python -m vdev blk --image PATH ... --vhost-user SOCKET_PATH
    python -m vdev net --backend NAME [backend options] [--mac MAC] [--mtu N]
                       [--queue-size N] [--queue-pairs N]
                       (--control ENDPOINT | --vhost-user SOCKET_PATH)
    python -m vdev rng [--seed N] (--control ENDPOINT | --vhost-user SOCKET_PATH)
    python -m vdev KIND|pkg.module:Class [its options] (--control EP | --vhost-user SOCK)

Any kind other than ``blk``, ``net`` and ``switch`` is looked up in
:mod:`vdev.registry` (built-ins such as ``rng``, the ``vlab.devices`` entry points,
kinds registered at run time) or, given as ``pkg.module:Class``, imported directly; its
options come from the kind's options hook and build the device (``--seed 7`` →
``RngDevice(seed=7)``). An unknown kind or class is one line on stderr, exit 2.

``blk --num-queues N`` (1..16, default 1) gives the disk N request queues and offers
VIRTIO_BLK_F_MQ when N > 1 (§5.2.3; ``num_queues`` in config space).

``net`` serves virtio-net (:mod:`vdev.net`) over the backend NAME: ``loopback`` (every
frame sent comes back), ``pcap`` (``--record PATH`` and/or ``--replay PATH
[--paced]``) and whatever else registered itself in :data:`vdev.net.BACKENDS` (``switch
--switch EP``, ``tap --ifname NAME``). An option of another backend than the one chosen
is refused. The default MAC is locally administered (first byte 02) and derived from the
control endpoint or socket path (a hash), so a device keeps its MAC across restarts on
the same endpoint; the MTU is 1500 unless ``--mtu`` (68..65535) says otherwise.
``--queue-pairs N`` (1..16, default 1) gives the NIC N receive/transmit queue pairs and
offers VIRTIO_NET_F_CTRL_VQ and VIRTIO_NET_F_MQ when N > 1 (§5.1.3, §5.1.6.5.6; not
with ``--vhost-user``).

The process binds a control server at ENDPOINT (``ipc://...``) and serves the kernel
until SIGTERM or until the process that launched it dies (SIGINT is ignored). With
``--shm-by-name`` (every kind, with ``--control``) it is a device started by hand for a
kernel to attach to (``kernel.Attach(ENDPOINT)``, like a vhost-user back-end daemon):
it maps the kernel's memory by POSIX shm name (it inherited no memfd), reports its pid
in GET_DEVICE_INFO and serves one attached kernel after another; the attaching kernel
puts its doorbells next to ENDPOINT (``<ENDPOINT>.kick``, ``<ENDPOINT>.call``). With
``--vhost-user`` it is instead a vhost-user back-end listening on SOCKET_PATH (see
:mod:`vdev.vhost_user`), serving one front-end (e.g. QEMU) after another until SIGTERM
or SIGINT; the socket file is removed on exit. A bad
argument, a missing image, a socket directory that does not exist or a ``--memory``
larger than the machine's RAM is reported as one line on stderr with exit status 2; a
resource that cannot be had at start-up (memory, a socket that cannot be bound) or a
failure while running as one line with status 1 -- never a traceback; a device loop
whose last-resort handler gave up (:data:`vdev.runtime.EXIT_INTERNAL_ERROR`) exits 70.

Every kind takes ``--faults PLAN`` (a fault plan, ``docs/faults.md``: the device then
injects its faults; a bad plan is one line naming the rule and the field, exit 2),
``--faults-state PATH`` (the plan's run is saved there after every fired fault and
resumed from it at start, so a device restarted after a ``crash`` continues the run)
and ``--faults-device NAME`` (the name the plan's ``device`` filter matches). The seed
in use is logged at start (and traced as a ``proc`` ``faults`` event). No traceback
unless ``VLAB_DEBUG=1``.

Every kind takes ``--poll-us US``: after draining a ring the device watches it up to
that many microseconds (an adaptive window, :mod:`vdev.virtio.poll`) before it arms
notifications and sleeps, so a driver that submits again quickly needs no doorbell;
``0`` turns hybrid polling off (default :data:`vdev.virtio.poll.DEFAULT_POLL_US`);
``--poll-fixed`` keeps every window at that bound (no adaptation).

This module stays cheap to import: the device and runtime are imported after the
arguments have been parsed.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vdev.virtio.constants import MAX_QUEUE_SIZE
from vdev.virtio.net import MAX_QUEUE_PAIRS
from vdev.virtio.poll import DEFAULT_POLL_US, MAX_POLL_US
from vdev.virtio.units import parse_size

if TYPE_CHECKING:
    from vdev.blk import BlkDevice
    from vdev.device import Device
    from vdev.injector import FaultInjector
    from vdev.net import BackendSpec, NetDevice

PROG = "python -m vdev"


class UsageFailure(Exception):
    """A bad command line: one line on stderr, exit status 2."""


class StartupFailure(Exception):
    """A resource the device needs could not be had at start-up (memory, a file, a
    socket): one line on stderr, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageFailure(f"{self.prog}: {message} (see '{self.prog} --help')")


def _size(text: str) -> int:
    try:
        return parse_size(text, multiple_of=512)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(what: str, most: int) -> Callable[[str], int]:
    """A parser of a count of ``what`` in 1..``most`` (queues, queue pairs)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not 1 <= n <= most:
            raise argparse.ArgumentTypeError(f"{n} {what}: not in 1..{most}")
        return n

    return parse


_num_queues = _count("queues", 16)  # blk --num-queues
_queue_pairs = _count("queue pairs", MAX_QUEUE_PAIRS)  # net --queue-pairs


def _queue_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 1 or n > MAX_QUEUE_SIZE or n & (n - 1):
        raise argparse.ArgumentTypeError(
            f"queue size {n} is not a power of two in 1..{MAX_QUEUE_SIZE}"
        )
    return n


def _poll_us(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_POLL_US:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of microseconds in 0..{MAX_POLL_US}"
        )
    return value


def _endpoint(text: str) -> str:
    if not text.startswith("ipc://") or len(text) <= len("ipc://"):
        raise argparse.ArgumentTypeError(f"not an ipc:// endpoint: {text!r}")
    _check_socket_dir(text[len("ipc://") :])
    return text


def _check_socket_dir(path: str) -> None:
    """The directory a socket is to be bound in must exist (else a clear usage error
    now rather than the transport's error later)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(
            f"directory {parent} does not exist (socket {path})"
        ) from None
    except OSError:
        return  # not ours to reach (permissions): the bind itself will say why
    if not stat.S_ISDIR(st.st_mode):
        raise argparse.ArgumentTypeError(f"{parent} is not a directory (socket {path})")


def build_parser(net_backends: dict[str, BackendSpec] | None = None) -> argparse.ArgumentParser:
    """The command line (exposed for ``--help`` docs and tests). ``net_backends`` are
    the backends ``net --backend`` offers, with their options; None: only ``loopback``
    is named and no backend module is imported (``blk`` stays cheap)."""
    p = _Parser(
        prog=PROG,
        description="Run one virtio-lab device process.",
        epilog="Other kinds: rng, those of installed packages (the vlab.devices entry "
        "points), or any device class as pkg.module:Class; see "
        f"'{PROG} KIND --help'. The switch: '{PROG} switch --help'.",
    )
    sub = p.add_subparsers(dest="kind", required=True, metavar="KIND", parser_class=_Parser)
    blk = sub.add_parser("blk", help="virtio-blk over a raw image file or RAM")
    src = blk.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="PATH", help="raw disk image to serve")
    src.add_argument(
        "--memory", metavar="SIZE", type=_size, help="serve a RAM disk of SIZE bytes (e.g. 64M)"
    )
    blk.add_argument("--readonly", action="store_true", help="offer VIRTIO_BLK_F_RO")
    blk.add_argument(
        "--queue-size",
        metavar="N",
        type=_queue_size,
        default=256,
        help="largest queue size the driver may use (power of two, default 256)",
    )
    blk.add_argument(
        "--num-queues",
        metavar="N",
        type=_num_queues,
        default=1,
        help="request queues, 1..16 (default 1; more offer VIRTIO_BLK_F_MQ)",
    )
    _add_transport(blk)
    _add_net(sub, net_backends)
    return p


def _add_net(sub: Any, backends: dict[str, BackendSpec] | None) -> None:
    net = sub.add_parser("net", help="virtio-net over a loopback, pcap, switch or TAP backend")
    names = sorted(backends) if backends else ["loopback"]
    net.add_argument(
        "--backend",
        metavar="NAME",
        required=True,
        help=f"where frames go: {', '.join(names)}",
    )
    net.add_argument(
        "--mac",
        metavar="MAC",
        type=_mac,
        help="aa:bb:cc:dd:ee:ff (default: 02:... derived from the endpoint)",
    )
    net.add_argument(
        "--mtu", metavar="N", type=_mtu, default=1500, help="MTU, 68..65535 (default 1500)"
    )
    net.add_argument(
        "--queue-size",
        metavar="N",
        type=_queue_size,
        default=256,
        help="largest queue size the driver may use (power of two, default 256)",
    )
    net.add_argument(
        "--queue-pairs",
        metavar="N",
        type=_queue_pairs,
        default=1,
        help="receive/transmit queue pairs, 1..16 (more than 1: VIRTIO_NET_F_MQ with a "
        "control queue; default 1)",
    )
    _add_transport(net)
    options: dict[str, list[tuple[str, str]]] = {}
    for name, spec in sorted((backends or {}).items()):
        if spec.add_options is None:
            continue
        group = _RecordingGroup(net.add_argument_group(f"{name} backend", spec.help or None))
        spec.add_options(group)
        options[name] = [(a.dest, a.option_strings[0]) for a in group.actions if a.option_strings]
    net.set_defaults(_net_options=options)


class _RecordingGroup:
    """An argument group that remembers the options a backend added to it."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.actions: list[argparse.Action] = []

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        action: argparse.Action = self.group.add_argument(*names, **kwargs)
        self.actions.append(action)
        return action


def _add_transport(kind: argparse.ArgumentParser) -> None:
    """Exactly one of ``--control`` (our ZeroMQ runtime) or ``--vhost-user`` (a
    vhost-user back-end socket, for QEMU), for every device kind."""
    transport = kind.add_mutually_exclusive_group(required=True)
    transport.add_argument(
        "--control",
        metavar="ENDPOINT",
        type=_endpoint,
        help="ipc:// endpoint to bind the control channel at",
    )
    transport.add_argument(
        "--vhost-user",
        metavar="SOCKET_PATH",
        type=_socket_path,
        help="serve as a vhost-user back-end on this Unix socket (e.g. for QEMU)",
    )
    kind.add_argument(
        "--shm-by-name",
        action="store_true",
        help="with --control: a device started by hand for a kernel to attach to "
        "(kernel.Attach(ENDPOINT)): map memory by POSIX shm name, report the pid",
    )
    kind.add_argument(
        "--poll-us",
        metavar="US",
        type=_poll_us,
        default=DEFAULT_POLL_US,
        help="hybrid polling: watch a drained ring up to this many microseconds before "
        f"sleeping (adaptive; 0 turns it off; default {DEFAULT_POLL_US})",
    )
    kind.add_argument(
        "--poll-fixed",
        action="store_true",
        help="hybrid polling: every poll lasts exactly --poll-us (no adaptation)",
    )
    faults = kind.add_argument_group("fault injection (docs/faults.md)")
    faults.add_argument(
        "--faults",
        metavar="PLAN",
        help="inject the faults of this plan (.json, .toml, .yaml)",
    )
    faults.add_argument(
        "--faults-state",
        metavar="PATH",
        help="save the plan's run here and resume it when restarted (needs --faults)",
    )
    faults.add_argument(
        "--faults-device",
        metavar="NAME",
        help="the device name the plan's 'device' filter matches (default: "
        "$VLAB_DEVICE_NAME, $VLAB_TRACE_DEVICE, else the device kind's name)",
    )


def _mac(text: str) -> bytes:
    from vdev.virtio.net import parse_mac

    try:
        mac = parse_mac(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if mac[0] & 1:
        raise argparse.ArgumentTypeError(f"{text} is a multicast address, not a NIC's")
    if mac == bytes(6):
        raise argparse.ArgumentTypeError("00:00:00:00:00:00 is not a usable MAC address")
    return mac


def _mtu(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 68 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"MTU {n} not in 68..65535")
    return n


def default_mac(endpoint: str) -> bytes:
    """The MAC a net device gets without ``--mac``: 02 (locally administered, unicast)
    and five bytes of the SHA-256 of its control endpoint or socket path."""
    import hashlib

    return b"\x02" + hashlib.sha256(endpoint.encode()).digest()[:5]


def _socket_path(text: str) -> str:
    if not text or len(os.fsencode(text)) >= 108:
        raise argparse.ArgumentTypeError(f"not a usable Unix socket path: {text!r}")
    _check_socket_dir(text)
    return text


def _open_blk(args: argparse.Namespace) -> BlkDevice:
    from vdev.blk import BlkDevice, MemoryBackend, RawFileBackend

    if args.memory is not None:
        ram = _physical_memory()
        if ram and args.memory > ram:
            raise UsageFailure(
                f"{PROG} blk: --memory {args.memory} bytes is more than this machine's "
                f"{ram} bytes of RAM"
            )
        try:
            backend: MemoryBackend | RawFileBackend = MemoryBackend(args.memory, args.readonly)
        except MemoryError:
            raise StartupFailure(
                f"{PROG} blk: cannot allocate a {args.memory}-byte RAM disk"
            ) from None
    else:
        path = args.image
        if not os.path.exists(path):
            raise UsageFailure(f"{PROG} blk: image not found: {path}")
        if os.path.isdir(path):
            raise UsageFailure(f"{PROG} blk: image is a directory: {path}")
        try:
            backend = RawFileBackend(path, readonly=args.readonly)
        except OSError as e:
            raise UsageFailure(f"{PROG} blk: cannot open image {path}: {e.strerror}") from None
    return BlkDevice(backend, queue_size=args.queue_size, num_queues=args.num_queues)


def _physical_memory() -> int:
    """Bytes of RAM (0 if unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _open_net(args: argparse.Namespace) -> NetDevice:
    from vdev.net import BackendOptionError, NetDevice

    backends = load_net_backends()
    name = args.backend
    spec = backends.get(name)
    if spec is None:
        raise UsageFailure(
            f"{PROG} net: unknown backend {name!r} (choose from {', '.join(sorted(backends))})"
        )
    for other, opts in args._net_options.items():
        if other == name:
            continue
        for dest, flag in opts:
            if getattr(args, dest, None) not in (None, False):
                raise UsageFailure(
                    f"{PROG} net: {flag} is an option of the {other} backend, not of {name}"
                )
    try:
        backend = spec.create(args)
    except BackendOptionError as e:
        raise UsageFailure(f"{PROG} net --backend {name}: {e}") from None
    endpoint = args.control if args.control is not None else args.vhost_user
    mac = args.mac if args.mac is not None else default_mac(endpoint)
    if args.queue_pairs > 1 and args.vhost_user is not None:
        backend.close()
        # a vhost-user front-end keeps the control queue itself (and would enable the
        # pairs with SET_VRING_ENABLE), which this back-end does not implement
        raise UsageFailure(f"{PROG} net: --queue-pairs goes with --control, not --vhost-user")
    try:
        return NetDevice(
            backend,
            mac=mac,
            mtu=args.mtu,
            queue_size=args.queue_size,
            queue_pairs=args.queue_pairs,
        )
    except Exception:
        backend.close()
        raise


def load_net_backends() -> dict[str, BackendSpec]:
    """Every registered net backend (imports the backend modules)."""
    from vdev.net import load_backends

    return load_backends()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the device, return the exit status."""
    debug = os.environ.get("VLAB_DEBUG") == "1"
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["switch"]:  # a process of its own, not a device (vdev.switch)
        from vdev.switch import main as switch_main

        return switch_main(argv[1:], prog=f"{PROG} switch")
    try:
        # the net backends (and their options) are imported only for ``net``
        try:
            backends = load_net_backends() if argv[:1] == ["net"] else None
        except Exception as e:  # a backend module that does not import: a bug, not usage
            if debug:
                raise
            print(f"{PROG} net: cannot load the backends: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        device: Device
        if argv and argv[0] not in ("blk", "net") and not argv[0].startswith("-"):
            kind, args, device = _open_kind(argv[0], argv[1:])
        else:
            args = build_parser(backends).parse_args(argv)
            kind = args.kind
            device = _open_net(args) if args.kind == "net" else _open_blk(args)
    except UsageFailure as e:
        print(str(e), file=sys.stderr)
        return 2
    except StartupFailure as e:
        print(str(e), file=sys.stderr)
        return 1
    except Exception as e:  # any other start-up failure: one line, never a traceback
        if debug:
            raise
        what = argv[0] if argv else ""
        print(f"{PROG} {what}: cannot start: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    try:
        if getattr(args, "shm_by_name", False) and args.vhost_user is not None:
            raise UsageFailure(
                f"{PROG} {kind}: --shm-by-name goes with --control, not --vhost-user"
            )
        injector = _load_faults(args, device, kind)
    except UsageFailure as e:
        device.close()
        print(str(e), file=sys.stderr)
        return 2
    return _serve(device, args, kind, debug, injector)


def _load_faults(args: argparse.Namespace, device: Device, kind: str) -> FaultInjector | None:
    """The fault injector ``--faults`` asks for (None without it): the plan loaded and
    validated, the run resumed from ``--faults-state`` if that file exists. A bad plan
    or state file is a :class:`UsageFailure` naming the rule and field."""
    plan_path = getattr(args, "faults", None)
    state_path = getattr(args, "faults_state", None)
    if plan_path is None:
        if state_path is not None or getattr(args, "faults_device", None) is not None:
            raise UsageFailure(f"{PROG} {kind}: --faults-state/--faults-device need --faults")
        return None
    from vdev.faultplan import load_plan
    from vdev.injector import FaultInjector
    from vdev.virtio.faults import FaultPlanError, FaultStateError

    name = (
        args.faults_device
        or os.environ.get("VLAB_DEVICE_NAME")
        or os.environ.get("VLAB_TRACE_DEVICE")
        or device.name
    )
    try:
        plan = load_plan(plan_path)
        return FaultInjector(plan, device=name, state_path=state_path)
    except (FaultPlanError, FaultStateError) as e:
        raise UsageFailure(f"{PROG} {kind}: --faults: {e}") from None


def _serve(
    device: Device,
    args: argparse.Namespace,
    kind: str,
    debug: bool,
    injector: FaultInjector | None = None,
) -> int:
    """Serve ``device`` over the transport the command line chose (under ``injector``'s
    fault plan, if any)."""
    kw: dict[str, Any] = {"poll_us": args.poll_us, "poll_fixed": args.poll_fixed}
    if injector is not None:
        kw["injector"] = injector
    try:
        if args.vhost_user is not None:
            from vdev.vhost_user import serve as serve_vhost_user

            return serve_vhost_user(device, args.vhost_user, **kw)
        from vdev.runtime import serve as serve_zmq

        return serve_zmq(device, args.control, shm_by_name=args.shm_by_name, **kw)
    except Exception as e:
        if debug:
            raise
        print(f"{PROG} {kind}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _open_kind(name: str, argv: list[str]) -> tuple[str, argparse.Namespace, Device]:
    """A device of any other kind (:mod:`vdev.registry`: a registered name or a
    ``pkg.module:Class`` path): its options from the kind's hook, then the device built
    from them. Every failure the user can fix is a :class:`UsageFailure`."""
    from vdev.device import Device as DeviceClass
    from vdev.registry import KindError, device_kwargs, lookup

    try:
        kind = lookup(name)
        cls = kind.load()
    except KindError as e:
        raise UsageFailure(f"{PROG}: {e}") from None
    prog = f"{PROG} {name}"
    parser = _Parser(prog=prog, description=kind.help or (cls.__doc__ or "").split("\n")[0])
    hook = kind.options_hook(cls)
    before = {a.dest for a in parser._actions}
    if hook is not None:
        hook(parser)
    dests = [a.dest for a in parser._actions if a.dest not in before]
    _add_transport(parser)
    args = parser.parse_args(argv)
    from_args = getattr(cls, "from_args", None)
    try:
        if callable(from_args):
            device = from_args(args)
        else:
            device = cls(**device_kwargs(args, dests))
    except (ValueError, TypeError, OSError) as e:
        raise UsageFailure(f"{prog}: {e}") from None
    if not isinstance(device, DeviceClass):
        raise UsageFailure(f"{prog}: {kind.target} did not build a vdev.Device")
    return name, args, device


if __name__ == "__main__":
    sys.exit(main())
