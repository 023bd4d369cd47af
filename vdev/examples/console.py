"""virtio-console (virtio §5.3): one port, bridged to stdio, a pty, or echoed back.

Theory of operation
-------------------
The device offers no feature bits, so it has exactly one port and two queues (§5.3.2):
``receiveq0`` (queue 0, device to driver) and ``transmitq0`` (queue 1, driver to
device). Without VIRTIO_CONSOLE_F_SIZE / F_MULTIPORT / F_EMERG_WRITE the config space
is not used (§5.3.4), so :meth:`ConsoleDevice.config` is empty; MULTIPORT (the control
queues and ports 1..n) is not implemented.

Receive buffers are kept (:data:`~vdev.device.PENDING`) until input arrives; input
fills them in order, one chain per piece of input at most (the used length says how
many bytes, §2.7.8.2). Input that finds no receive buffer waits in a bounded buffer of
``--buffer`` bytes; beyond it, bytes are dropped and counted (``rx_dropped``): the
device's loop never blocks on the driver. Transmitted chains are answered at once with
used length 0 (§5.3.6.2: nothing is written into them).

Where input comes from and output goes to (``--echo`` / ``--stdio`` / ``--pty``):

* ``--echo``: every transmitted byte comes back as input (for tests);
* ``--stdio`` (the default): output to the process's stdout, input from its stdin;
* ``--pty``: a new pty pair in raw mode; the device prints the pty's path on stdout.

Output is written without blocking: what the host side does not take now waits in a
bounded buffer (the same size), retried by a timer; beyond it, bytes are dropped and
counted (``tx_dropped``).

Counters (``GET_METRICS`` ``"device"``): ``rx_bytes``, ``rx_chains``, ``rx_dropped``,
``tx_bytes``, ``tx_chains``, ``tx_dropped``, ``bad_requests``.
"""

from __future__ import annotations

import argparse
import os
import sys
import termios
import tty
from collections import deque

from vdev.device import PENDING, Device, Metrics, Pending, TimerHandle
from vdev.virtio import Chain, DeviceId

__all__ = ["ConsoleDevice", "RECEIVEQ", "TRANSMITQ", "DEFAULT_BUFFER"]

RECEIVEQ = 0  #: receiveq0 (§5.3.2)
TRANSMITQ = 1  #: transmitq0 (§5.3.2)
DEFAULT_BUFFER = 64 << 10  #: bytes of input (and of output) that may wait
_READ = 4096  # bytes per read of the host fd
_RETRY_S = 0.01  # output retry period while the host side is full


class ConsoleDevice(Device):
    """A single-port virtio-console; ``mode`` is ``"echo"``, ``"stdio"`` or ``"pty"``."""

    device_id = DeviceId.CONSOLE
    name = "console"
    num_queues = 2

    def __init__(self, mode: str = "stdio", buffer: int = DEFAULT_BUFFER) -> None:
        super().__init__()
        if mode not in ("echo", "stdio", "pty") or buffer < 1:
            raise ValueError(f"console: bad mode {mode!r} or buffer {buffer}")
        self.mode, self.limit = mode, buffer
        self.metrics = Metrics(
            "rx_bytes",
            "rx_chains",
            "rx_dropped",
            "tx_bytes",
            "tx_chains",
            "tx_dropped",
            "bad_requests",
        )
        self._rx: deque[Chain] = deque()  # kept receive buffers, in ring order
        self._in = bytearray()  # input waiting for a receive buffer (<= limit)
        self._out = bytearray()  # output waiting for the host side (<= limit)
        self._retry: TimerHandle | None = None
        self.in_fd = self.out_fd = -1
        self.pty_path, self._slave = "", -1
        if mode == "stdio":
            self.in_fd, self.out_fd = sys.stdin.fileno(), sys.stdout.fileno()
        elif mode == "pty":
            master, slave = os.openpty()
            tty.setraw(slave, termios.TCSANOW)
            self.pty_path, self._slave = os.ttyname(slave), slave
            self.in_fd = self.out_fd = master
            print(self.pty_path, flush=True)
        if self.in_fd >= 0:
            os.set_blocking(self.out_fd, False)
            os.set_blocking(self.in_fd, False)
            self.watch(self.in_fd, self._readable)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConsoleDevice:
        """Build the device from ``python -m vdev console`` options."""
        return cls(mode=args.mode or "stdio", buffer=args.buffer)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The options of ``python -m vdev console`` (the registry's hook)."""
        g = parser.add_mutually_exclusive_group()
        g.add_argument(
            "--echo",
            dest="mode",
            action="store_const",
            const="echo",
            help="send back everything the driver transmits",
        )
        g.add_argument(
            "--stdio",
            dest="mode",
            action="store_const",
            const="stdio",
            help="bridge to this process's stdin/stdout (default)",
        )
        g.add_argument(
            "--pty",
            dest="mode",
            action="store_const",
            const="pty",
            help="bridge to a new pty pair; its path is printed",
        )
        parser.add_argument(
            "--buffer",
            type=int,
            metavar="BYTES",
            default=DEFAULT_BUFFER,
            help="input/output that may wait before bytes are dropped",
        )

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        """Keep a receive buffer (or fill it from waiting input); take transmitted bytes."""
        if queue == RECEIVEQ:
            if chain.readable_len or not chain.writable_len:
                self.metrics.inc("bad_requests")  # §5.3.6.1: receive buffers are writable
                return 0
            if self._in:
                return self._fill(chain)
            self._rx.append(chain)
            return PENDING
        if chain.writable_len:  # §5.3.6.2: transmit buffers are device-readable only
            self.metrics.inc("bad_requests")
            return 0
        data = chain.read(0, chain.readable_len)
        self.metrics.inc("tx_chains")
        self.metrics.inc("tx_bytes", len(data))
        if self.mode == "echo":
            self._input(data)
        else:
            self._output(data)
        return 0

    def _fill(self, chain: Chain) -> int:
        n = min(len(self._in), chain.writable_len)
        chain.write(0, bytes(self._in[:n]))
        del self._in[:n]
        self.metrics.inc("rx_chains")
        self.metrics.inc("rx_bytes", n)
        return n

    def _input(self, data: bytes) -> None:
        """Bytes for the driver: into kept buffers, the rest waits (bounded)."""
        room = self.limit - len(self._in)
        if len(data) > room:
            self.metrics.inc("rx_dropped", len(data) - room)
            data = data[:room]
        self._in += data
        while self._rx and self._in:  # bounded: each round empties a buffer or the input
            chain = self._rx.popleft()
            self.complete(RECEIVEQ, chain, self._fill(chain))

    def _readable(self) -> None:
        try:
            data = os.read(self.in_fd, _READ)
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's other side closed
            data = b""
        if not data:
            self.unwatch(self.in_fd)
            return
        self._input(data)

    def _output(self, data: bytes) -> None:
        room = self.limit - len(self._out)
        if len(data) > room:
            self.metrics.inc("tx_dropped", len(data) - room)
            data = data[:room]
        self._out += data
        self._flush_out()

    def _flush_out(self) -> None:
        self._retry = None
        try:
            n = os.write(self.out_fd, self._out) if self._out else 0
        except BlockingIOError:
            n = 0
        except OSError:  # the host side is gone: what it would have got is dropped
            n = len(self._out)
            self.metrics.inc("tx_dropped", n)
        del self._out[:n]
        if self._out and self._retry is None:
            self._retry = self.call_later(_RETRY_S, self._flush_out)

    def released(self, queue: int) -> None:
        """The ring stopped: forget the receive buffers it kept."""
        if queue == RECEIVEQ:
            self._rx.clear()

    def reset(self) -> None:
        """Device reset: waiting input is dropped with the buffers."""
        self._rx.clear()
        self._in.clear()

    def close(self) -> None:
        """Process exit: stop watching; a pty pair is closed (stdio stays open)."""
        if self._retry is not None:
            self._retry.cancel()
        if self.in_fd >= 0:
            self.unwatch(self.in_fd)
        if self.mode == "pty":
            os.close(self.in_fd)
            os.close(self._slave)
        self.in_fd = self.out_fd = -1
