"""``python -m vdev KIND ...``: run one device process.

    python -m vdev blk --image PATH [--readonly] [--queue-size N] --control ENDPOINT
    python -m vdev blk --memory SIZE [--readonly] [--queue-size N] --control ENDPOINT
    python -m vdev blk --image PATH ... --vhost-user SOCKET_PATH
    python -m vdev net --backend NAME [backend options] [--mac MAC] [--mtu N]
                       [--queue-size N] (--control ENDPOINT | --vhost-user SOCKET_PATH)
    python -m vdev rng [--seed N] (--control ENDPOINT | --vhost-user SOCKET_PATH)
    python -m vdev KIND|pkg.module:Class [its options] (--control EP | --vhost-user SOCK)

Any kind other than ``blk``, ``net`` and ``switch`` is looked up in
:mod:`vdev.registry` (built-ins such as ``rng``, the ``vlab.devices`` entry points,
kinds registered at run time) or, given as ``pkg.module:Class``, imported directly; its
options come from the kind's options hook and build the device (``--seed 7`` →
``RngDevice(seed=7)``). An unknown kind or class is one line on stderr, exit 2.

``net`` serves virtio-net (:mod:`vdev.net`) over the backend NAME: ``loopback`` (every
frame sent comes back), ``pcap`` (``--record PATH`` and/or ``--replay PATH
[--paced]``) and whatever else registered itself in :data:`vdev.net.BACKENDS` (``switch
--switch EP``, ``tap --ifname NAME``). An option of another backend than the one chosen
is refused. The default MAC is locally administered (first byte 02) and derived from the
control endpoint or socket path (a hash), so a device keeps its MAC across restarts on
the same endpoint; the MTU is 1500 unless ``--mtu`` (68..65535) says otherwise.

The process binds a control server at ENDPOINT (``ipc://...``) and serves the kernel
until SIGTERM or until the process that launched it dies (SIGINT is ignored). With
``--vhost-user`` it is instead a vhost-user back-end listening on SOCKET_PATH (see
:mod:`vdev.vhost_user`), serving one front-end (e.g. QEMU) after another until SIGTERM
or SIGINT; the socket file is removed on exit. A bad
argument or a missing image is reported as one line on stderr with exit status 2; a
failure while running as one line with status 1. No traceback unless ``VLAB_DEBUG=1``.

This module stays cheap to import: the device and runtime are imported after the
arguments have been parsed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vdev.virtio.constants import MAX_QUEUE_SIZE
from vdev.virtio.units import parse_size

if TYPE_CHECKING:
    from vdev.blk import BlkDevice
    from vdev.device import Device
    from vdev.net import BackendSpec, NetDevice

PROG = "python -m vdev"


class UsageFailure(Exception):
    """A bad command line: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageFailure(f"{self.prog}: {message} (see '{self.prog} --help')")


def _size(text: str) -> int:
    try:
        return parse_size(text, multiple_of=512)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def _endpoint(text: str) -> str:
    if not text.startswith("ipc://") or len(text) <= len("ipc://"):
        raise argparse.ArgumentTypeError(f"not an ipc:// endpoint: {text!r}")
    return text


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
    return text


def _open_blk(args: argparse.Namespace) -> BlkDevice:
    from vdev.blk import BlkDevice, MemoryBackend, RawFileBackend

    if args.memory is not None:
        backend: MemoryBackend | RawFileBackend = MemoryBackend(args.memory, args.readonly)
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
    return BlkDevice(backend, queue_size=args.queue_size)


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
    try:
        return NetDevice(backend, mac=mac, mtu=args.mtu, queue_size=args.queue_size)
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
    return _serve(device, args, kind, debug)


def _serve(device: Device, args: argparse.Namespace, kind: str, debug: bool) -> int:
    """Serve ``device`` over the transport the command line chose."""
    from vdev import serve

    try:
        return serve(device, control=args.control, vhost_user=args.vhost_user)
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
