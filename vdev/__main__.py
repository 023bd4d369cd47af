"""``python -m vdev KIND ...``: run one device process.

    python -m vdev blk --image PATH [--readonly] [--queue-size N] --control ENDPOINT
    python -m vdev blk --memory SIZE [--readonly] [--queue-size N] --control ENDPOINT
    python -m vdev blk --image PATH ... --vhost-user SOCKET_PATH

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
from typing import TYPE_CHECKING

from vdev.virtio.constants import MAX_QUEUE_SIZE
from vdev.virtio.units import parse_size

if TYPE_CHECKING:
    from vdev.blk import BlkDevice

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


def build_parser() -> argparse.ArgumentParser:
    """The command line (exposed for ``--help`` docs and tests)."""
    p = _Parser(prog=PROG, description="Run one virtio-lab device process.")
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
    return p


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


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the device, return the exit status."""
    debug = os.environ.get("VLAB_DEBUG") == "1"
    try:
        args = build_parser().parse_args(argv)
        device = _open_blk(args)
    except UsageFailure as e:
        print(str(e), file=sys.stderr)
        return 2
    try:
        if args.vhost_user is not None:
            from vdev.vhost_user import serve as serve_vhost_user

            return serve_vhost_user(device, args.vhost_user)
        from vdev.runtime import serve

        return serve(device, args.control)
    except Exception as e:
        if debug:
            raise
        print(f"{PROG} {args.kind}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
