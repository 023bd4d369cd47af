"""The driver of our key-value store device (vendor id 0xF0) and its node ``/dev/kv0``.

Theory of operation
-------------------
:class:`KvDriver` binds :data:`KV_DEVICE_ID`, a device of our own protocol (not in the
virtio spec; the device side is ``vdev/examples/kv.py``, whose docstring is the wire
format). It negotiates no device feature and uses one queue (``requestq``, 0).

At probe it takes :data:`SLOTS` request slots from the DMA pool, each big enough for
the largest request (a 12-byte header, a key of :data:`MAX_KEY` bytes, a value of
:data:`MAX_VALUE` bytes: device-readable) and the largest answer (a status byte and a
value: device-writable). A call takes a free slot (a semaphore: at most :data:`SLOTS`
requests in flight, more callers wait), copies the request in, adds the two-buffer
chain under the queue lock, publishes, notifies if the ring asks for it, and sleeps on
the request's event until the interrupt thread completes it (the :class:`_Request`
token is a :class:`kernel.transport.Completion`). Every wait is bounded: a request not
answered within :data:`REQUEST_TIMEOUT_S` fails the device (``ETIMEDOUT``); a device
that fails or goes away fails the waiting calls with ``EIO`` at once.

Errors (``OSError``): NOT_FOUND → ``ENOENT``, BAD_REQUEST → ``EINVAL``, TOO_BIG →
``E2BIG``, FULL → ``ENOSPC``; a used length of 0 or an unknown status → ``EIO`` (the
device broke the protocol). Keys are checked before anything is sent: ``bytes`` or
``str`` (UTF-8), 1..:data:`MAX_KEY` bytes; values at most :data:`MAX_VALUE` bytes.

The API: ``k.device("kv0").driver`` is the :class:`KvDriver`: ``get(key) -> bytes``,
``put(key, value)``, ``delete(key)``, safe from many threads. The node ``/dev/<name>``
(``/dev/kv0``, :class:`KvFile`) speaks a line protocol for programs that only have
``k.sys``: write lines ``PUT key value\\n``, ``GET key\\n``, ``DEL key\\n`` (the key
is one word, the value the rest of the line); each line's answer is queued for
``read``: ``OK\\n``, ``OK value\\n`` (GET) or ``ERR ENOENT\\n`` (the errno's name).
A read with nothing queued returns ``b""``. Counters (:attr:`KvDriver.counters`):
``requests``, ``gets``, ``puts``, ``deletes``, ``errors``, ``bytes_out``, ``bytes_in``.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from typing import ClassVar

from hostops.sync import Lock, Semaphore
from vdev.virtio import F, QueueFull, bit

from ..bus import VirtioDriver, register_driver
from ..errors import copy_error, io_error
from ..files import File, byte_view, check_buffersize
from ..transport import KernelQueue, VirtioTransport, WaitedRequest

__all__ = [
    "KvDriver",
    "KvFile",
    "KvNodes",
    "KV_DEVICE_ID",
    "MAX_KEY",
    "MAX_VALUE",
    "SLOTS",
    "REQUEST_TIMEOUT_S",
    "MAX_LINE",
]

#: Our vendor device id (the device's ``vdev.examples.kv.KV_DEVICE_ID``).
KV_DEVICE_ID = 0xF0
#: Longest key and value, bytes (the device's limits).
MAX_KEY, MAX_VALUE = 256, 64 << 10
#: Requests in flight at most (one DMA slot each).
SLOTS = 8
#: How long one request may take before the device is failed (ETIMEDOUT).
REQUEST_TIMEOUT_S = 10.0
#: Longest line of the node's protocol (longer ones are answered ``ERR E2BIG``).
MAX_LINE = 2 * MAX_KEY + MAX_VALUE
_REPLY_LIMIT = 1 << 20  # bytes of queued node answers at most (ENOBUFS beyond)

_HEADER = struct.Struct("<III")  # op, key_len, value_len
_GET, _PUT, _DELETE = 0, 1, 2
_ERRNO = {1: errno.ENOENT, 2: errno.EINVAL, 3: errno.E2BIG, 4: errno.ENOSPC}
_OUT = (_HEADER.size + MAX_KEY + MAX_VALUE + 4095) & ~4095
_IN = (1 + MAX_VALUE + 4095) & ~4095


def _key(key: bytes | str) -> bytes:
    k = key.encode() if isinstance(key, str) else bytes(key)
    if not k:
        raise io_error(errno.EINVAL, "empty key")
    if len(k) > MAX_KEY:
        raise io_error(errno.E2BIG, f"key of {len(k)} bytes (most {MAX_KEY})")
    return k


class KvDriver(VirtioDriver):
    """The key-value store driver: ``get``/``put``/``delete`` (module docstring)."""

    device_id: ClassVar[int] = KV_DEVICE_ID
    supported_features: ClassVar[int] = bit(F.VERSION_1) | bit(F.EVENT_IDX)

    def __init__(self, transport: VirtioTransport) -> None:
        super().__init__(transport)
        self.queue: KernelQueue | None = None
        self._free: list[int] = []
        self._free_lock = Lock()
        self._slots = Semaphore(0)
        self.counters: dict[str, int] = dict.fromkeys(
            ("requests", "gets", "puts", "deletes", "errors", "bytes_out", "bytes_in"), 0
        )
        self._count_lock = Lock()

    def probe(self) -> None:
        """Set up queue 0 and the request slots (no config space, no device features)."""
        t = self.transport
        size = min(t.queue_cap, 64)
        self.queue = t.setup_queue(0, size)
        assert t.dma is not None
        n = min(SLOTS, size // 2)  # two descriptors per request
        base = t.dma.alloc(n * (_OUT + _IN))
        if base is None:
            raise t.probe_error("no DMA memory for the kv request slots")
        self._free = [base + i * (_OUT + _IN) for i in range(n)]
        self._slots = Semaphore(n)

    def nodes(self) -> KvNodes:
        """The k.sys node table of this device (``/dev/<name>``)."""
        return KvNodes(self)

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self.counters[name] += n

    def get(self, key: bytes | str) -> bytes:
        """The value stored under ``key``; ENOENT if there is none."""
        self._count("gets")
        status, value = self.request(_HEADER.pack(_GET, len(k := _key(key)), 0) + k)
        return self._check(status, value)

    def put(self, key: bytes | str, value: bytes | bytearray | memoryview) -> None:
        """Store ``value`` (at most :data:`MAX_VALUE` bytes) under ``key``."""
        self._count("puts")
        k, v = _key(key), bytes(value)
        if len(v) > MAX_VALUE:
            raise io_error(errno.E2BIG, f"value of {len(v)} bytes (most {MAX_VALUE})")
        self._check(*self.request(_HEADER.pack(_PUT, len(k), len(v)) + k + v))

    def delete(self, key: bytes | str) -> None:
        """Remove ``key``; ENOENT if it was not stored."""
        self._count("deletes")
        k = _key(key)
        self._check(*self.request(_HEADER.pack(_DELETE, len(k), 0) + k))

    def _check(self, status: int, value: bytes) -> bytes:
        if status == 0:
            return value
        self._count("errors")
        if status not in _ERRNO:
            raise io_error(errno.EIO, f"{self.transport.name}: unknown status {status}")
        return_errno = _ERRNO[status]
        raise io_error(return_errno, f"{self.transport.name}: {os.strerror(return_errno)}")

    def request(self, payload: bytes, writable: int = 1 + MAX_VALUE) -> tuple[int, bytes]:
        """Send one raw request (the device-readable bytes, as they are: nothing is
        checked, so tests can send malformed ones) with ``writable`` (1..1 + MAX_VALUE)
        device-writable bytes; returns (status, the bytes after it)."""
        t, q = self.transport, self.queue
        if q is None:
            raise io_error(errno.ENODEV, f"{t.name} is not probed")
        if not 0 < len(payload) <= _OUT or not 0 < writable <= _IN:
            raise io_error(errno.EINVAL, "request or answer does not fit a slot")
        if not self._slots.acquire(timeout=REQUEST_TIMEOUT_S):
            raise io_error(errno.ETIMEDOUT, f"{t.name}: no free request slot")
        with self._free_lock:
            slot = self._free.pop()
        try:
            return self._send(slot, payload, writable)
        finally:
            with self._free_lock:
                self._free.append(slot)
            self._slots.release()

    def _send(self, slot: int, payload: bytes, writable: int) -> tuple[int, bytes]:
        t, q = self.transport, self.queue
        assert q is not None
        mem = t.memory
        if t.failed is not None or mem is None:
            raise io_error(errno.EIO, f"{t.name}: device failed", culprit="device-gone")
        dst = mem.view(slot, len(payload))
        try:
            dst[:] = payload
        finally:
            dst.release()
        req = WaitedRequest()
        with q.lock:
            if t.failed is not None:
                raise io_error(errno.EIO, f"{t.name}: device failed", culprit="device-gone")
            try:
                q.add([(slot, len(payload))], [(slot + _OUT, writable)], req)
            except QueueFull:  # cannot happen: slots <= queue size / 2
                raise io_error(errno.EAGAIN, "kv queue full") from None
            need = q.publish()
        self._count("requests")
        self._count("bytes_out", len(payload))
        if need:
            q.notify()
        if not req.done.wait(REQUEST_TIMEOUT_S):
            t.fail(io_error(errno.ETIMEDOUT, f"{t.name}: request not answered"))
            raise io_error(errno.ETIMEDOUT, f"{t.name} did not answer")
        if req.error is not None:
            raise copy_error(req.error)
        mem = t.memory
        if mem is None:
            raise io_error(errno.EIO, f"{t.name}: kernel shut down")
        if req.used_len < 1:  # our protocol: every answer starts with the status byte
            raise io_error(errno.EIO, f"{t.name}: answer without a status")
        # the queue checked used_len <= the writable buffer (§2.7.8.2)
        view = mem.view(slot + _OUT, req.used_len)
        try:
            answer = bytes(view)
        finally:
            view.release()
        self._count("bytes_in", len(answer) - 1)
        return answer[0], answer[1:]


class KvFile(File):
    """An open ``/dev/kv0``: the line protocol of the module docstring."""

    kind = "kv"

    def __init__(self, path: str, driver: KvDriver) -> None:
        super().__init__(path)
        self.driver = driver
        self._line = bytearray()  # a line not finished yet (<= MAX_LINE)
        self._skip = False  # dropping the rest of an over-long line
        self._replies = bytearray()
        self._lock = Lock()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Take lines; each finished line runs and queues its answer. ENOBUFS when
        more than 1 MiB of answers wait unread."""
        if self.closed:
            raise io_error(errno.EBADF)
        view = bytes(byte_view(data))
        with self._lock:
            if len(self._replies) > _REPLY_LIMIT:
                raise io_error(errno.ENOBUFS, "answers not read")
            pos = 0
            while pos < len(view):  # bounded: each round consumes >= 1 byte
                end = view.find(b"\n", pos)
                piece = view[pos:] if end < 0 else view[pos:end]
                pos = len(view) if end < 0 else end + 1
                if not self._skip:
                    self._line += piece
                if len(self._line) > MAX_LINE:
                    self._line.clear()
                    self._skip = True
                if end >= 0:
                    if self._skip:
                        self._replies += b"ERR E2BIG\n"
                    else:
                        self._replies += self._run(bytes(self._line))
                    self._line.clear()
                    self._skip = False
        return len(view)

    def _run(self, line: bytes) -> bytes:
        words = line.split(b" ", 2)
        try:
            if words[0] == b"GET" and len(words) == 2:
                return b"OK " + self.driver.get(words[1]) + b"\n"
            if words[0] == b"PUT" and len(words) == 3:
                self.driver.put(words[1], words[2])
                return b"OK\n"
            if words[0] == b"DEL" and len(words) == 2:
                self.driver.delete(words[1])
                return b"OK\n"
            return b"ERR EINVAL\n"
        except OSError as e:
            return b"ERR " + errno.errorcode.get(e.errno or errno.EIO, "EIO").encode() + b"\n"

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of queued answers (``b""`` when none wait)."""
        if isinstance(n, int) and not isinstance(n, bool) and n < 0:
            raise io_error(errno.EINVAL, f"negative count {n}")
        n = check_buffersize(n, "read")
        if self.closed:
            raise io_error(errno.EBADF)
        with self._lock:
            out = bytes(self._replies[:n])
            del self._replies[:n]
        return out

    def fstat(self) -> os.stat_result:
        """A character device (major 240: Linux's range for local/experimental use)."""
        return _char_stat()


def _char_stat() -> os.stat_result:
    st = (stat.S_IFCHR | 0o600, 0, 0, 1, os.getuid(), os.getgid(), 0, 0, 0, 0)
    return os.stat_result(st, {"st_rdev": os.makedev(240, 0)})


class KvNodes:
    """The node table of one kv device: ``/dev/<name>``."""

    def __init__(self, driver: KvDriver) -> None:
        self.driver = driver
        self.path = f"/dev/{driver.transport.name}"

    def _ours(self, path: str) -> bool:
        return bool(path) and os.path.normpath(path) == self.path

    def open(self, path: str, flags: int) -> File | None:
        """Open the node (any access mode)."""
        return KvFile(path, self.driver) if self._ours(path) else None

    def stat(self, path: str) -> os.stat_result | None:
        """A character device's stat; None for other paths."""
        return _char_stat() if self._ours(path) else None


register_driver(KV_DEVICE_ID, KvDriver)
