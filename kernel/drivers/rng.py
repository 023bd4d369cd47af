"""The virtio-rng driver (virtio §5.4) and its node ``/dev/hwrng``.

Theory of operation
-------------------
:class:`RngDriver` binds DeviceId.ENTROPY. At probe it sets up the one queue
(``requestq``) and takes one page of the DMA pool as its buffer. A read of the node
(:class:`HwrngFile`, ``k.sys.read(fd, n)``) asks the device for bytes one buffer at a
time: it adds a chain of one device-writable descriptor (§5.4.6: the driver places
only device-writable buffers), kicks, and sleeps on the request's event until the
interrupt thread completes it; the used length says how many bytes the device wrote
(§5.4.6.1: possibly fewer than asked). ``read(fd, n)`` returns exactly ``n`` bytes
(as Linux's ``rng_dev_read`` loops), at most :data:`MAX_READ` per call.

Every wait is bounded: one request by :data:`REQUEST_TIMEOUT_S` (``ETIMEDOUT``), a
read by at most :data:`MAX_EMPTY` answers of length 0 in a row (``EIO``); a device
that fails or goes away fails the waiting read with ``EIO`` at once. A used length
above the buffer is impossible here: the queue rejects it (§2.7.8.2) and the
transport fails the device. Reads are serialised by one lock per device (one buffer,
as Linux serialises ``/dev/hwrng`` readers with ``rng_mutex``).

Nodes: the driver's :meth:`RngDriver.nodes` table has ``/dev/<name>`` (``/dev/rng0``)
and, for the first rng device of the kernel, ``/dev/hwrng``; ``kernel.boot`` adds it
to ``k.sys``. Counters (:attr:`RngDriver.counters`): ``reads``, ``requests``,
``bytes``, ``empty_answers``.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import ClassVar

from hostops.sync import Lock
from vdev.virtio import DeviceId, F, QueueFull, bit

from ..bus import VirtioDriver, register_driver
from ..errors import copy_error, io_error
from ..files import POLLIN, File, check_buffersize
from ..transport import KernelQueue, VirtioTransport, WaitedRequest

__all__ = [
    "RngDriver",
    "HwrngFile",
    "RngNodes",
    "HWRNG_PATH",
    "MAX_READ",
    "BUFFER_BYTES",
    "REQUEST_TIMEOUT_S",
    "MAX_EMPTY",
]

#: The node of the kernel's (first) hardware random number generator.
HWRNG_PATH = "/dev/hwrng"
#: Most bytes one ``read`` returns.
MAX_READ = 1 << 20
#: The driver's buffer: the most bytes asked of the device per request.
BUFFER_BYTES = 4096
#: How long one request may take before the read fails with ETIMEDOUT.
REQUEST_TIMEOUT_S = 10.0
#: Answers of length 0 in a row after which a read fails with EIO.
MAX_EMPTY = 16


class RngDriver(VirtioDriver):
    """The virtio-rng driver: binds DeviceId.ENTROPY, reads entropy for ``/dev/hwrng``."""

    device_id: ClassVar[int] = int(DeviceId.ENTROPY)
    supported_features: ClassVar[int] = bit(F.VERSION_1) | bit(F.EVENT_IDX)

    def __init__(self, transport: VirtioTransport) -> None:
        super().__init__(transport)
        self.queue: KernelQueue | None = None
        self._buf = 0
        self._lock = Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("reads", "requests", "bytes", "empty_answers"), 0
        )

    def probe(self) -> None:
        """Set up queue 0 (no config space, no device features) and the buffer."""
        t = self.transport
        self.queue = t.setup_queue(0, min(t.queue_cap, 64))
        assert t.dma is not None
        addr = t.dma.alloc(BUFFER_BYTES)
        if addr is None:
            raise t.probe_error("no DMA memory for the entropy buffer")
        self._buf = addr

    def nodes(self) -> RngNodes:
        """The k.sys node table of this device (``/dev/<name>``, maybe ``/dev/hwrng``)."""
        return RngNodes(self)

    def read(self, n: int) -> bytes:
        """``n`` bytes of the device's entropy (``0 <= n <= MAX_READ``), blocking until
        the device has written them (bounded; see the module docstring)."""
        if n > MAX_READ:
            n = MAX_READ
        out: list[bytes] = []
        have = 0
        empty = 0
        with self._lock:
            self.counters["reads"] += 1
            while have < n:  # bounded: each round adds >= 1 byte or counts an empty one
                got = self._request(min(n - have, BUFFER_BYTES))
                if not got:
                    empty += 1
                    self.counters["empty_answers"] += 1
                    if empty >= MAX_EMPTY:
                        raise io_error(
                            errno.EIO, f"{self.transport.name}: {empty} empty answers in a row"
                        )
                    continue
                empty = 0
                out.append(got)
                have += len(got)
            self.counters["bytes"] += have
        return b"".join(out)

    def _request(self, size: int) -> bytes:
        q = self.queue
        t = self.transport
        if q is None:
            raise io_error(errno.ENODEV, f"{t.name} is not probed")
        req = WaitedRequest()
        with q.lock:
            if t.failed is not None:
                raise copy_error(t.failed)
            try:
                q.add([], [(self._buf, size)], req)
            except QueueFull:  # cannot happen: one request at a time (the read lock)
                raise io_error(errno.EAGAIN, "rng queue full") from None
            need = q.publish()
        self.counters["requests"] += 1
        if need:
            q.notify()
        if not req.done.wait(REQUEST_TIMEOUT_S):
            t.fail(io_error(errno.ETIMEDOUT, f"{t.name}: no entropy within {REQUEST_TIMEOUT_S} s"))
            raise io_error(errno.ETIMEDOUT, f"{t.name} gave no entropy")
        if req.error is not None:
            raise copy_error(req.error)
        mem = t.memory
        if mem is None:
            raise io_error(errno.EIO, f"{t.name}: kernel shut down")
        # the queue checked used_len <= the buffer's writable length (§2.7.8.2)
        view = mem.view(self._buf, req.used_len)
        try:
            return bytes(view)
        finally:
            view.release()


class HwrngFile(File):
    """An open rng node: ``read(n)`` returns ``n`` bytes of entropy; no positions."""

    kind = "rng"

    def __init__(self, path: str, driver: RngDriver) -> None:
        super().__init__(path)
        self.driver = driver

    def poll(self) -> int:
        """Always readable (a read blocks only while the device fills the buffer)."""
        return POLLIN

    def read(self, n: int) -> bytes:
        """``n`` bytes of entropy (at most :data:`MAX_READ`); EINVAL for a negative
        count, EBADF once closed."""
        if isinstance(n, int) and not isinstance(n, bool) and n < 0:
            raise io_error(errno.EINVAL, f"negative count {n}")
        n = check_buffersize(n, "read")
        if self.closed:
            raise io_error(errno.EBADF)
        return self.driver.read(n) if n else b""

    def fstat(self) -> os.stat_result:
        """A character device, like Linux's ``/dev/hwrng`` (10:183)."""
        return _char_stat()


def _char_stat() -> os.stat_result:
    uid, gid = os.getuid(), os.getgid()
    rdev = os.makedev(10, 183)
    st = (stat.S_IFCHR | 0o600, 0, 0, 1, uid, gid, 0, 0, 0, 0)
    return os.stat_result(st, {"st_rdev": rdev})


class RngNodes:
    """The node table of one rng device: ``/dev/<name>`` and, if this is the first rng
    of its kernel, :data:`HWRNG_PATH` (``k.sys`` asks tables in order, so the first
    device's table answers ``/dev/hwrng``)."""

    def __init__(self, driver: RngDriver) -> None:
        self.driver = driver
        self.paths = {HWRNG_PATH, f"/dev/{driver.transport.name}"}

    def _ours(self, path: str) -> bool:
        return os.path.normpath(path) in self.paths if path else False

    def open(self, path: str, flags: int) -> File | None:
        """Open the node read-only (EINVAL for a write mode, as Linux's
        ``rng_dev_open``)."""
        if not self._ours(path):
            return None
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise io_error(errno.EINVAL, "the entropy device is read-only", path)
        return HwrngFile(path, self.driver)

    def stat(self, path: str) -> os.stat_result | None:
        """A character device's stat; None for other paths."""
        return _char_stat() if self._ours(path) else None


register_driver(DeviceId.ENTROPY, RngDriver)
