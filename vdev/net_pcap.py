"""The ``pcap`` backend of virtio-net: record traffic to a pcap file, replay one as traffic.

    python -m vdev net --backend pcap --record out.pcap [--replay in.pcap [--paced]] ...

Theory of operation
-------------------
``--record PATH`` writes every frame the driver transmits and every frame replayed to
the driver into a classic pcap file (LINKTYPE_ETHERNET, microsecond timestamps of the
wall clock; :mod:`vdev.virtio.pcap`). The backend takes no offloads
(:meth:`PcapBackend.offloads` is empty), so the device completes partial checksums and
cuts GSO frames into segments before they reach it: the file holds wire frames with
correct checksums, as tshark expects. Each record is one ``write`` to the file, so the
file is complete up to the last frame at any moment (a reader may follow it). Frames the
driver transmits go nowhere else: the file is the wire.

``--replay PATH`` plays the records of a pcap file as frames received from the wire. The
whole file is checked when the backend is created (magic, version, snaplen, link type,
every record), so a bad file is refused at start-up with the record number, and then
streamed again, one record at a time, during the replay (memory stays at one record).
Replay starts when the device process's loop starts, and a frame is handed to the
device only when the driver has posted receive buffers
(:meth:`~vdev.netbackend.FrameSink.rx_buffers_available`): while there is none the
backend checks again every :data:`RETRY_S` seconds with ``call_later``, so a driver that
posts its buffers late does not lose the replay. By default frames go as fast as buffers
allow (at most :data:`BUDGET` per turn of the device loop, then the loop serves its
queues); with ``--paced`` each frame waits until its timestamp, counted from the first
record, has elapsed since the replay started. A frame the device still refuses (the link
is down, it is larger than the driver's buffers, not a frame at all) is dropped and
counted; a record cut short by the capture's snaplen is skipped (``pcap_replay_truncated``).

Counters (in the device's metrics): ``pcap_recorded``, ``pcap_record_errors``,
``pcap_replayed`` (delivered to the driver), ``pcap_replay_dropped``,
``pcap_replay_truncated``, ``pcap_replay_waits`` (times the replay found no receive
buffer and waited), ``pcap_replay_done`` (1 once the file is finished).
"""

from __future__ import annotations

import argparse
import errno
import os
import time
from typing import Any

from hostops.clock import monotonic
from vdev.net import BackendOptionError, BackendSpec, OptionAdder, register_backend
from vdev.netbackend import FrameSink, NetBackend
from vdev.virtio.net import NetHdr
from vdev.virtio.pcap import (
    DEFAULT_SNAPLEN,
    LINKTYPE_ETHERNET,
    MAX_SNAPLEN,
    PcapError,
    PcapReader,
    PcapRecord,
    file_header,
    record,
)

__all__ = ["PcapBackend", "RETRY_S", "BUDGET", "READ_CHUNK", "check_pcap"]

#: Seconds between checks for receive buffers while the driver has none.
RETRY_S = 0.01
#: Frames replayed per turn of the device loop at most.
BUDGET = 64
#: Bytes read from the replay file at a time.
READ_CHUNK = 1 << 16

_PLAIN = NetHdr()


def _read_chunk(fd: int) -> bytes:
    return os.read(fd, READ_CHUNK)


def check_pcap(path: str) -> int:
    """Read the whole file ``path`` and check it is a classic pcap file of Ethernet
    frames; return its number of records. ``BackendOptionError`` naming the file and
    the problem (the record number for a bad record) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise BackendOptionError(f"cannot open {path}: {e.strerror}") from None
    try:
        reader = PcapReader()
        while True:
            chunk = _read_chunk(fd)
            if not chunk:
                break
            reader.feed(chunk)
            while reader.next_record() is not None:
                pass
        reader.close()
    except PcapError as e:
        raise BackendOptionError(f"{path}: {e}") from None
    except OSError as e:
        raise BackendOptionError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    header = reader.header
    assert header is not None
    if header.linktype != LINKTYPE_ETHERNET:
        raise BackendOptionError(
            f"{path}: link type {header.linktype}, not Ethernet ({LINKTYPE_ETHERNET})"
        )
    return reader.count


class PcapBackend(NetBackend):
    """Record to and/or replay from classic pcap files (see the module docstring).

    ``record``/``replay`` are paths (at least one); ``paced`` replays at the file's
    timestamps. Files are opened (and the replay file checked) here: a problem raises
    :class:`~vdev.net.BackendOptionError`.
    """

    name = "pcap"

    def __init__(
        self, record: str | None = None, replay: str | None = None, *, paced: bool = False
    ) -> None:
        super().__init__()
        if record is None and replay is None:
            raise BackendOptionError("the pcap backend needs --record PATH and/or --replay PATH")
        if record is not None and replay is not None and _same_file(record, replay):
            raise BackendOptionError(f"--record and --replay name the same file: {record}")
        self.record_path = record
        self.replay_path = replay
        self.paced = paced
        self.replay_total = check_pcap(replay) if replay is not None else 0
        self._rec_fd = -1
        self._replay_fd = -1
        self._reader: PcapReader | None = None
        self._next: PcapRecord | None = None
        self._timer: Any = None
        self._start = 0.0  # monotonic time the replay started (paced)
        self._first_ts: float | None = None
        self._closed = False
        if record is not None:
            try:
                fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise BackendOptionError(f"cannot create {record}: {e.strerror}") from None
            self._rec_fd = fd
            try:
                self._write(file_header(DEFAULT_SNAPLEN, LINKTYPE_ETHERNET))
            except OSError as e:
                self.close()
                raise BackendOptionError(f"cannot write {record}: {e.strerror}") from None
        if replay is not None:
            try:
                self._replay_fd = os.open(replay, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                self.close()
                raise BackendOptionError(f"cannot open {replay}: {e.strerror}") from None
            self._reader = PcapReader()

    # ------------------------------------------------------------------ NetBackend
    def attach(self, sink: FrameSink) -> None:
        """Start the replay (if any) on the device loop."""
        super().attach(sink)
        if self._reader is not None:
            self._start = monotonic()
            self._timer = sink.call_later(0.0, self._pump)

    def send(self, hdr: NetHdr, frame: bytes | memoryview) -> bool:
        """Record a transmitted frame (the file is the wire). False only when nothing
        records (replay-only): the frame goes nowhere."""
        if self._rec_fd < 0:
            return False
        return self._record(frame)

    def close(self) -> None:
        """Stop the replay and close the files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self._reader = None
        self._next = None
        for name in ("_rec_fd", "_replay_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    # ------------------------------------------------------------------ record
    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        for _ in range(len(data) + 1):  # bounded: every write makes progress or raises
            if not view:
                return
            n = os.write(self._rec_fd, view)
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress")
            view = view[n:]

    def _record(self, frame: bytes | memoryview) -> bool:
        sink = self.sink
        try:
            self._write(record(frame, time.time_ns() // 1000, DEFAULT_SNAPLEN))
        except OSError:
            if sink is not None:
                sink.count("pcap_record_errors")
            return False
        if sink is not None:
            sink.count("pcap_recorded")
        return True

    # ------------------------------------------------------------------ replay
    def _peek(self) -> PcapRecord | None:
        """The next record of the replay file, or None at its end (or on a read error:
        the file changed since it was checked)."""
        if self._next is not None:
            return self._next
        reader = self._reader
        if reader is None:
            return None
        for _ in range(MAX_SNAPLEN // READ_CHUNK + 2):  # a record spans few chunks
            try:
                rec = reader.next_record()
            except PcapError:
                return None
            if rec is not None:
                self._next = rec
                return rec
            try:
                chunk = _read_chunk(self._replay_fd)
            except OSError:
                return None
            if not chunk:
                return None
            reader.feed(chunk)
        return None

    def _finish(self) -> None:
        sink = self.sink
        self._reader = None
        self._next = None
        fd, self._replay_fd = self._replay_fd, -1
        if fd >= 0:
            os.close(fd)
        if sink is not None:
            sink.count("pcap_replay_done")

    def _pump(self) -> None:
        """Replay frames while the driver has buffers (and, paced, while they are due)."""
        self._timer = None
        sink = self.sink
        if sink is None or self._closed:
            return
        for _ in range(BUDGET):
            rec = self._peek()
            if rec is None:
                self._finish()
                return
            if self.paced:
                if self._first_ts is None:
                    self._first_ts = rec.timestamp
                wait = self._start + (rec.timestamp - self._first_ts) - monotonic()
                if wait > 0:
                    self._timer = sink.call_later(wait, self._pump)
                    return
            if rec.truncated:
                self._next = None
                sink.count("pcap_replay_truncated")
                continue
            if not sink.rx_buffers_available():
                sink.count("pcap_replay_waits")
                self._timer = sink.call_later(RETRY_S, self._pump)
                return
            self._next = None
            if sink.receive(_PLAIN, rec.data):
                sink.count("pcap_replayed")
                if self._rec_fd >= 0:
                    self._record(rec.data)
            else:
                sink.count("pcap_replay_dropped")
        self._timer = sink.call_later(0.0, self._pump)  # budget spent: let the loop run


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _add_options(group: OptionAdder) -> None:
    group.add_argument(
        "--record", metavar="PATH", help="pcap: write every frame sent and received to PATH"
    )
    group.add_argument(
        "--replay", metavar="PATH", help="pcap: play the frames of PATH as received traffic"
    )
    group.add_argument(
        "--paced",
        action="store_true",
        help="pcap: replay at the pace of the file's timestamps (default: as fast as "
        "the driver posts buffers)",
    )


def _create(args: argparse.Namespace) -> PcapBackend:
    if args.paced and args.replay is None:
        raise BackendOptionError("--paced needs --replay PATH")
    if args.replay is not None and not os.path.exists(args.replay):
        raise BackendOptionError(f"replay file not found: {args.replay}")
    return PcapBackend(args.record, args.replay, paced=args.paced)


register_backend(
    BackendSpec(
        "pcap",
        _create,
        _add_options,
        "record frames to a pcap file (--record) and/or replay one (--replay)",
    )
)
