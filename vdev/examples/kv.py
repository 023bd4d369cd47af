"""A key-value store device: a vendor device of our own protocol (not in the virtio spec).

Theory of operation
-------------------
Device id :data:`KV_DEVICE_ID` (``0xF0``): the virtio spec assigns ids one by one
(§5, today below 0x40); ``0xF0`` is far above them and clear of ``0x7E``/``0x7F``,
which the tests use for throw-away devices. No feature bits beyond the transport's,
no config space, one queue (``requestq``, 0). Every request is one chain::

    readable: le32 op | le32 key_len | le32 value_len | key | value
    writable: u8 status | value (GET with status OK only)

``op`` is GET (0), PUT (1) or DELETE (2); ``status`` is OK (0), NOT_FOUND (1),
BAD_REQUEST (2), TOO_BIG (3) or FULL (4). The used length is 1 + the value's length
for a GET that found its key, else 1. Checks, in order (each one counted):

* fewer than 12 readable bytes, no writable byte, an unknown op, an empty key, a GET or
  DELETE carrying a value, or a readable length other than 12 + key_len + value_len:
  BAD_REQUEST (``bad_requests``; a chain with no writable byte is answered with used
  length 0: there is nowhere to put a status, §2.7.8.2 lets the used length be 0);
* key_len > :data:`MAX_KEY` or value_len > :data:`MAX_VALUE`, or a GET whose value does
  not fit the writable part: TOO_BIG (``too_big``); lengths are checked before
  anything is read, so a huge length costs nothing;
* a PUT of a new key when ``max_entries`` keys are stored: FULL (``full``).

Counters (``GET_METRICS`` ``"device"``): ``requests``, ``gets``, ``puts``,
``deletes``, ``not_found``, ``bad_requests``, ``too_big``, ``full``, ``bytes_in``,
``bytes_out``.
"""

from __future__ import annotations

import argparse
import struct

from vdev.device import Device, Metrics
from vdev.virtio import Chain

__all__ = [
    "KvDevice",
    "KV_DEVICE_ID",
    "HEADER",
    "MAX_KEY",
    "MAX_VALUE",
    "DEFAULT_MAX_ENTRIES",
    "GET",
    "PUT",
    "DELETE",
    "OK",
    "NOT_FOUND",
    "BAD_REQUEST",
    "TOO_BIG",
    "FULL",
]

KV_DEVICE_ID = 0xF0  #: our vendor device id (see the module docstring)
HEADER = struct.Struct("<III")  #: op, key_len, value_len
MAX_KEY = 256  #: longest key, bytes
MAX_VALUE = 64 << 10  #: longest value, bytes
DEFAULT_MAX_ENTRIES = 4096  #: keys stored at most (``--max-entries``)
GET, PUT, DELETE = 0, 1, 2  #: request ops
OK, NOT_FOUND, BAD_REQUEST, TOO_BIG, FULL = 0, 1, 2, 3, 4  #: status bytes


class KvDevice(Device):
    """An in-memory key-value store on one request queue (see the module docstring)."""

    device_id = KV_DEVICE_ID
    name = "kv"
    num_queues = 1

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, queue_size: int = 256) -> None:
        super().__init__()
        if max_entries < 1 or queue_size < 1 or queue_size & (queue_size - 1):
            raise ValueError(f"kv: bad max_entries {max_entries} or queue_size {queue_size}")
        self.max_entries = max_entries
        self.max_queue_size = queue_size
        self.store: dict[bytes, bytes] = {}
        self.metrics = Metrics(
            "requests", "gets", "puts", "deletes", "not_found", "bad_requests", "too_big",
            "full", "bytes_in", "bytes_out",
        )  # fmt: skip

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The options of ``python -m vdev kv`` (the registry's hook)."""
        parser.add_argument(
            "--max-entries", type=int, metavar="N", help="keys stored at most (default 4096)"
        )

    def _status(self, chain: Chain, status: int, counter: str | None = None) -> int:
        if counter is not None:
            self.metrics.inc(counter)
        chain.write(0, bytes((status,)))
        return 1

    def handle(self, queue: int, chain: Chain) -> int:
        """Answer one request chain; returns the used length."""
        self.metrics.inc("requests")
        if not chain.writable_len:
            self.metrics.inc("bad_requests")  # nowhere to put the status: used length 0
            return 0
        if chain.readable_len < HEADER.size:
            return self._status(chain, BAD_REQUEST, "bad_requests")
        op, key_len, value_len = HEADER.unpack(chain.read(0, HEADER.size))
        if op not in (GET, PUT, DELETE) or key_len == 0 or (op != PUT and value_len):
            return self._status(chain, BAD_REQUEST, "bad_requests")
        if key_len > MAX_KEY or value_len > MAX_VALUE:
            return self._status(chain, TOO_BIG, "too_big")
        # the lengths are bounded now: the sum cannot be huge (§2.7.4: lengths are the driver's)
        if chain.readable_len != HEADER.size + key_len + value_len:
            return self._status(chain, BAD_REQUEST, "bad_requests")
        key = chain.read(HEADER.size, key_len)
        self.metrics.inc("bytes_in", key_len + value_len)
        if op == PUT:
            self.metrics.inc("puts")
            if key not in self.store and len(self.store) >= self.max_entries:
                return self._status(chain, FULL, "full")
            self.store[key] = chain.read(HEADER.size + key_len, value_len)
            return self._status(chain, OK)
        if op == DELETE:
            self.metrics.inc("deletes")
            if self.store.pop(key, None) is None:
                return self._status(chain, NOT_FOUND, "not_found")
            return self._status(chain, OK)
        self.metrics.inc("gets")
        value = self.store.get(key)
        if value is None:
            return self._status(chain, NOT_FOUND, "not_found")
        if 1 + len(value) > chain.writable_len:
            return self._status(chain, TOO_BIG, "too_big")
        chain.write(0, bytes((OK,)) + value)
        self.metrics.inc("bytes_out", len(value))
        return 1 + len(value)

    def reset(self) -> None:
        """Device reset: the store is emptied (a reset device starts afresh)."""
        self.store.clear()
