"""virtio-rng (entropy device, virtio §5.4): the smallest useful device.

Theory of operation
-------------------
The device has one queue (``requestq``, §5.4.2) and no feature bits or config space.
The driver makes device-writable buffers available; the device fills each with random
bytes and returns it, the used length saying how many it wrote (§5.4.6.1: at least
one, possibly fewer than the buffer holds). A chain with a driver-readable part breaks
§5.4.6.2 ("the driver MUST NOT place driver-readable buffers"): it is answered with
length 0 and counted as ``bad_requests``; a buffer larger than :data:`MAX_FILL` gets
:data:`MAX_FILL` bytes.

The bytes come from ``os.urandom`` or, with ``--seed N``, from a deterministic stream
(BLAKE2b of the seed and a block counter). The stream does not depend on how the
driver cuts its reads: any sequence of buffers receives the same bytes, in order — a
test can compare two boots with the same seed.

Counters (``GET_METRICS`` ``"device"``): ``requests``, ``bytes``, ``bad_requests``.
"""

from __future__ import annotations

import argparse
import hashlib
import os

from vdev.device import Device, Metrics
from vdev.virtio import Chain, DeviceId

__all__ = ["RngDevice", "SeededStream", "MAX_FILL"]

#: Most bytes put into one buffer (the spec lets the device write fewer, §5.4.6.1).
MAX_FILL = 64 << 10


def _queue_size(text: str) -> int:
    """A power of two in 1..32768 (§2.7), for argparse."""
    n = int(text) if text.isdigit() else 0
    if not 1 <= n <= 32768 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"queue size {text!r} is not a power of two in 1..32768")
    return n


class SeededStream:
    """A deterministic byte stream: BLAKE2b-512 of ``seed`` and a counter, block after
    block. ``read(n)`` returns the next ``n`` bytes, whatever the earlier sizes were."""

    def __init__(self, seed: int) -> None:
        self._key = seed.to_bytes(16, "little", signed=True)
        self._counter = 0
        self._left = b""

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes of the stream."""
        parts = [self._left]
        have = len(self._left)
        while have < n:  # bounded: each block adds 64 bytes
            block = hashlib.blake2b(self._counter.to_bytes(8, "little"), key=self._key).digest()
            self._counter += 1
            parts.append(block)
            have += len(block)
        data = b"".join(parts)
        self._left = data[n:]
        return data[:n]


class RngDevice(Device):
    """virtio-rng: fills every writable buffer of queue 0 with random bytes.

    ``seed`` (None: ``os.urandom``) makes the bytes a deterministic
    :class:`SeededStream`; ``queue_size`` is the largest ring the driver may use.
    """

    device_id = DeviceId.ENTROPY
    name = "rng"
    num_queues = 1

    def __init__(self, seed: int | None = None, queue_size: int = 256) -> None:
        super().__init__()
        self.max_queue_size = queue_size
        self.seed = seed
        self._stream = SeededStream(seed) if seed is not None else None
        self.metrics = Metrics("requests", "bytes", "bad_requests")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The command-line options of ``python -m vdev rng`` (the registry's hook):
        their ``dest`` names are the constructor's keyword arguments."""
        parser.add_argument(
            "--seed", type=int, metavar="N", help="deterministic bytes from this seed"
        )
        parser.add_argument(
            "--queue-size",
            type=_queue_size,
            metavar="N",
            default=256,
            help="largest queue size the driver may use (power of two, default 256)",
        )

    def _random(self, n: int) -> bytes:
        return self._stream.read(n) if self._stream is not None else os.urandom(n)

    def handle(self, queue: int, chain: Chain) -> int:
        """Fill the chain's writable part (at most :data:`MAX_FILL` bytes)."""
        self.metrics.inc("requests")
        if chain.readable_len or not chain.writable_len:
            # §5.4.6.2: the buffers are device-writable only; nothing to fill otherwise
            self.metrics.inc("bad_requests")
            return 0
        n = min(chain.writable_len, MAX_FILL)
        chain.write(0, self._random(n))
        self.metrics.inc("bytes", n)
        return n
