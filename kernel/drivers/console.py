"""The virtio-console driver (virtio §5.3) and its node ``/dev/hvc0``.

Theory of operation
-------------------
:class:`ConsoleDriver` binds DeviceId.CONSOLE and negotiates no device feature, so the
device has one port and two queues (§5.3.2): ``receiveq0`` (0) and ``transmitq0``
(1); MULTIPORT, SIZE and EMERG_WRITE are not used, nor is the config space.

Receiving: after DRIVER_OK the driver makes :data:`RX_BUFFERS` device-writable
buffers of :data:`BUFFER_BYTES` available (§5.3.6.1). The interrupt thread copies what
each used buffer holds (the used length, checked by the queue against the buffer,
§2.7.8.2) into the driver's input buffer and gives the buffer back at once — unless
the input buffer holds :data:`RX_LIMIT` bytes or more: then the buffer is parked, and
returned by the ``read`` that makes room. A reader that does not read thus stops the
device (which buffers, then drops and counts, on its own side), never the kernel.

Transmitting: ``write`` cuts the data into pieces of at most :data:`BUFFER_BYTES`,
copies up to :data:`TX_BUFFERS` of them into the transmit buffers, adds one
device-readable chain each (§5.3.6.2), kicks once and waits for them all; writers are
serialised by one lock. Every wait is bounded: a chain not returned within
:data:`REQUEST_TIMEOUT_S` fails the device (``ETIMEDOUT``); a device that fails or goes
away fails waiting writers with ``EIO`` at once, and wakes readers and pollers.

The node (:class:`ConsoleFile`): ``read(n)`` returns what has arrived, at most ``n``
bytes; without data it blocks until some arrives, at most :data:`READ_TIMEOUT_S`
(``ETIMEDOUT``), or fails with ``EAGAIN`` when opened with ``O_NONBLOCK``. ``poll``
reports POLLIN when data is waiting, POLLOUT while the device is live, POLLERR once it
failed; arrivals wake pollers (:meth:`kernel.files.File.wake`).

Nodes: ``/dev/<name>`` (``/dev/console0``) and, for the first console of the kernel,
``/dev/hvc0`` (``k.sys`` asks tables in boot order). Counters
(:attr:`ConsoleDriver.counters`): ``rx_bytes``, ``rx_buffers``, ``parked``,
``tx_bytes``, ``tx_chains``, ``reads``, ``writes``.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import ClassVar

from hostops.sync import Event, Lock
from vdev.virtio import DeviceId, F, bit

from ..bus import VirtioDriver, register_driver
from ..errors import io_error
from ..files import POLLERR, POLLIN, POLLOUT, File, byte_view, check_buffersize
from ..transport import KernelQueue, VirtioTransport

__all__ = [
    "ConsoleDriver",
    "ConsoleFile",
    "ConsoleNodes",
    "HVC_PATH",
    "BUFFER_BYTES",
    "RX_BUFFERS",
    "TX_BUFFERS",
    "RX_LIMIT",
    "READ_TIMEOUT_S",
    "REQUEST_TIMEOUT_S",
]

#: The node of the kernel's (first) console.
HVC_PATH = "/dev/hvc0"
#: Bytes of one receive or transmit buffer.
BUFFER_BYTES = 4096
#: Receive buffers kept available to the device.
RX_BUFFERS = 16
#: Transmit buffers (chains in flight per batch of a write).
TX_BUFFERS = 16
#: Input held for readers before receive buffers are parked.
RX_LIMIT = 256 << 10
#: Longest a blocking read waits for input (then ETIMEDOUT).
READ_TIMEOUT_S = 30.0
#: Longest one transmit batch may take before the device is failed (ETIMEDOUT).
REQUEST_TIMEOUT_S = 10.0

RECEIVEQ, TRANSMITQ = 0, 1


class _RxBuffer:
    """One receive buffer: the token of its chain."""

    __slots__ = ("driver", "addr")

    def __init__(self, driver: ConsoleDriver, addr: int) -> None:
        self.driver = driver
        self.addr = addr

    def complete(self, used_len: int) -> None:
        self.driver._received(self, used_len)

    def fail(self, error: OSError) -> None:
        pass  # the transport failed: ConsoleDriver._failed wakes everyone


class _TxBatch:
    """The transmit chains of one write batch: done when all came back."""

    __slots__ = ("left", "done", "error")

    def __init__(self, n: int) -> None:
        self.left = n
        self.done = Event()
        self.error: OSError | None = None

    def complete(self, used_len: int) -> None:
        self.left -= 1  # tokens complete on the one interrupt thread
        if self.left <= 0:
            self.done.set()

    def fail(self, error: OSError) -> None:
        self.error = error
        self.done.set()


class ConsoleDriver(VirtioDriver):
    """The virtio-console driver: binds DeviceId.CONSOLE, one port (``/dev/hvc0``)."""

    device_id: ClassVar[int] = int(DeviceId.CONSOLE)
    supported_features: ClassVar[int] = bit(F.VERSION_1) | bit(F.EVENT_IDX)

    def __init__(self, transport: VirtioTransport) -> None:
        super().__init__(transport)
        self.rxq: KernelQueue | None = None
        self.txq: KernelQueue | None = None
        self._tx_bufs: list[int] = []
        self._rx_bufs: list[_RxBuffer] = []
        self._data = bytearray()  # input not read yet
        self._parked: list[_RxBuffer] = []
        self._lock = Lock()  # _data, _parked, _files
        self._write_lock = Lock()
        self._files: set[ConsoleFile] = set()
        self.counters: dict[str, int] = dict.fromkeys(
            ("rx_bytes", "rx_buffers", "parked", "tx_bytes", "tx_chains", "reads", "writes"), 0
        )

    def probe(self) -> None:
        """Set up both queues and the buffers (no config space, no device features)."""
        t = self.transport
        size = min(t.queue_cap, 64)
        self.rxq = t.setup_queue(RECEIVEQ, size)
        self.txq = t.setup_queue(TRANSMITQ, size)
        assert t.dma is not None
        n = min(size, RX_BUFFERS) + min(size, TX_BUFFERS)
        base = t.dma.alloc(n * BUFFER_BYTES)
        if base is None:
            raise t.probe_error("no DMA memory for the console buffers")
        addrs = [base + i * BUFFER_BYTES for i in range(n)]
        nrx = min(size, RX_BUFFERS)
        self._rx_bufs = [_RxBuffer(self, a) for a in addrs[:nrx]]
        self._tx_bufs = addrs[nrx:]
        self.rxq.refill = self.rxq.kick
        self.rxq.on_failed = self._failed
        self.txq.on_failed = self._failed

    def started(self) -> None:
        """After DRIVER_OK: make the receive buffers available."""
        q = self.rxq
        assert q is not None
        with q.lock:
            for b in self._rx_bufs:
                q.add([], [(b.addr, BUFFER_BYTES)], b)
        q.kick()

    def nodes(self) -> ConsoleNodes:
        """The k.sys node table of this device (``/dev/<name>``, maybe ``/dev/hvc0``)."""
        return ConsoleNodes(self)

    # ------------------------------------------------------------ receive
    def _received(self, buf: _RxBuffer, used_len: int) -> None:
        """Interrupt thread: ``buf`` came back holding ``used_len`` bytes."""
        t, q = self.transport, self.rxq
        mem = t.memory
        if mem is None or q is None:
            return
        view = mem.view(buf.addr, used_len)  # used_len <= BUFFER_BYTES: checked, §2.7.8.2
        try:
            data = bytes(view)
        finally:
            view.release()
        with self._lock:
            self._data += data
            self.counters["rx_bytes"] += used_len
            self.counters["rx_buffers"] += 1
            park = len(self._data) >= RX_LIMIT
            if park:
                self._parked.append(buf)
                self.counters["parked"] += 1
        if not park:
            with q.lock:
                if t.failed is None:
                    q.add([], [(buf.addr, BUFFER_BYTES)], buf)  # published by refill
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            files = list(self._files)
        for f in files:
            f.wake()

    def _failed(self, error: OSError) -> None:
        self._wake()

    def readable(self) -> bool:
        """Input is waiting."""
        return bool(self._data)

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes of the waiting input (returns parked buffers to the
        device once there is room)."""
        with self._lock:
            out = bytes(self._data[:n])
            del self._data[:n]
            self.counters["reads"] += 1
            back = self._parked if len(self._data) < RX_LIMIT else []
            if back:
                self._parked = []
        q = self.rxq
        if back and q is not None:
            with q.lock:
                if self.transport.failed is None:
                    for b in back:
                        q.add([], [(b.addr, BUFFER_BYTES)], b)
            q.kick()
        return out

    # ------------------------------------------------------------ transmit
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Send ``data`` on transmitq0; returns ``len(data)`` once the device took it."""
        t, q = self.transport, self.txq
        if q is None:
            raise io_error(errno.ENODEV, f"{t.name} is not probed")
        view = memoryview(data).cast("B")
        total = len(view)
        with self._write_lock:
            self.counters["writes"] += 1
            pos = 0
            while pos < total:  # bounded: each batch sends >= 1 byte
                mem = t.memory
                if t.failed is not None or mem is None:
                    raise io_error(errno.EIO, f"{t.name}: device failed")
                pieces: list[tuple[int, int]] = []
                for addr in self._tx_bufs:
                    if pos >= total:
                        break
                    n = min(BUFFER_BYTES, total - pos)
                    dst = mem.view(addr, n)
                    try:
                        dst[:] = view[pos : pos + n]
                    finally:
                        dst.release()
                    pieces.append((addr, n))
                    pos += n
                batch = _TxBatch(len(pieces))
                with q.lock:
                    if t.failed is not None:
                        raise io_error(errno.EIO, f"{t.name}: device failed")
                    for piece in pieces:
                        q.add([piece], [], batch)
                    need = q.publish()
                if need:
                    q.notify()
                if not batch.done.wait(REQUEST_TIMEOUT_S):
                    t.fail(io_error(errno.ETIMEDOUT, f"{t.name}: transmit not returned"))
                    raise io_error(errno.ETIMEDOUT, f"{t.name} did not take the output")
                if batch.error is not None:
                    raise OSError(batch.error.errno, batch.error.strerror)
                self.counters["tx_chains"] += len(pieces)
                self.counters["tx_bytes"] += sum(n for _, n in pieces)
        return total


class ConsoleFile(File):
    """An open console node: ``read``, ``write``, ``poll``; no positions."""

    kind = "console"

    def __init__(self, path: str, driver: ConsoleDriver, flags: int) -> None:
        super().__init__(path)
        self.driver = driver
        self.nonblocking = bool(flags & os.O_NONBLOCK)
        with driver._lock:
            driver._files.add(self)

    def poll(self) -> int:
        """POLLIN with input waiting, POLLOUT while the device is live, POLLERR after."""
        d = self.driver
        mask = POLLIN if d.readable() else 0
        return mask | (POLLERR if d.transport.failed is not None else POLLOUT)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of input; blocks (bounded) or EAGAIN (O_NONBLOCK) without."""
        if isinstance(n, int) and not isinstance(n, bool) and n < 0:
            raise io_error(errno.EINVAL, f"negative count {n}")
        n = check_buffersize(n, "read")
        if self.closed:
            raise io_error(errno.EBADF)
        if not n:
            return b""
        self.wait_for(POLLIN, 0 if self.nonblocking else READ_TIMEOUT_S)
        if not self.driver.readable():  # woken by a failure
            raise io_error(errno.EIO, f"{self.driver.transport.name}: device failed")
        return self.driver.take(n)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Send ``data`` to the device; returns its length."""
        if self.closed:
            raise io_error(errno.EBADF)
        return self.driver.write(byte_view(data))

    def fstat(self) -> os.stat_result:
        """A character device, like Linux's ``/dev/hvc0`` (229:0)."""
        return _char_stat()

    def close(self) -> None:
        """Close: stop being woken by the driver."""
        with self.driver._lock:
            self.driver._files.discard(self)
        super().close()


def _char_stat() -> os.stat_result:
    st = (stat.S_IFCHR | 0o600, 0, 0, 1, os.getuid(), os.getgid(), 0, 0, 0, 0)
    return os.stat_result(st, {"st_rdev": os.makedev(229, 0)})


class ConsoleNodes:
    """The node table of one console: ``/dev/<name>`` and :data:`HVC_PATH` (the first
    console's table answers it: ``k.sys`` asks tables in order)."""

    def __init__(self, driver: ConsoleDriver) -> None:
        self.driver = driver
        self.paths = {HVC_PATH, f"/dev/{driver.transport.name}"}

    def _ours(self, path: str) -> bool:
        return os.path.normpath(path) in self.paths if path else False

    def open(self, path: str, flags: int) -> File | None:
        """Open the node (any access mode; ``O_NONBLOCK`` honoured)."""
        return ConsoleFile(path, self.driver, flags) if self._ours(path) else None

    def stat(self, path: str) -> os.stat_result | None:
        """A character device's stat; None for other paths."""
        return _char_stat() if self._ours(path) else None


register_driver(DeviceId.CONSOLE, ConsoleDriver)
