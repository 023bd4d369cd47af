"""The classic pcap capture file format (libpcap 2.4), sans-IO: bytes in, records out.

Theory of operation
-------------------
A pcap file is a 24-byte global header followed by records, each a 16-byte record
header and the captured bytes::

    global:  u32 magic | u16 version_major | u16 version_minor | i32 thiszone
             | u32 sigfigs | u32 snaplen | u32 linktype
    record:  u32 ts_sec | u32 ts_frac | u32 incl_len | u32 orig_len | incl_len bytes

The magic says both the byte order of every later field (``a1b2c3d4`` read in the
writer's order) and the timestamp resolution (``a1b2c3d4``: microseconds, ``a1b23c4d``:
nanoseconds). We write little-endian, microsecond files with LINKTYPE_ETHERNET (1), which
every pcap reader (tcpdump, tshark, Wireshark, scapy) accepts.

:class:`PcapReader` is incremental, as h11 is: :meth:`~PcapReader.feed` it bytes in
chunks of any size, take records with :meth:`~PcapReader.next_record`, and call
:meth:`~PcapReader.close` at end of input, which refuses a file that stops in the middle
of a record. Everything read is checked before it is used — magic, version, snaplen, each
record's lengths against the snaplen and each other, the sub-second field's range — and a
bad file raises :class:`PcapError` (a ``ValueError``) naming the record number (1-based,
as Wireshark counts) and what is wrong. The reader holds only what was fed and not yet
parsed (feed it in chunks and take records as they come to stay small); a record's
length is checked against the snaplen, at most :data:`MAX_SNAPLEN`, before any of its
data is waited for.

:func:`file_header` and :func:`record` are the writer: they return the bytes to append.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "PcapError",
    "PcapHeader",
    "PcapRecord",
    "PcapReader",
    "LINKTYPE_ETHERNET",
    "MAGIC_USEC",
    "MAGIC_NSEC",
    "MAGIC_PCAPNG",
    "MAX_SNAPLEN",
    "DEFAULT_SNAPLEN",
    "FILE_HEADER_SIZE",
    "RECORD_HEADER_SIZE",
    "file_header",
    "record",
    "read_all",
]

LINKTYPE_ETHERNET = 1
MAGIC_USEC = 0xA1B2C3D4
MAGIC_NSEC = 0xA1B23C4D
#: A pcapng section header block starts with this (byte-order independent).
MAGIC_PCAPNG = 0x0A0D0D0A
#: The largest snaplen libpcap accepts (``MAXIMUM_SNAPLEN``); records are never longer.
MAX_SNAPLEN = 262144
#: What we write: a whole 64 KiB IP packet plus its Ethernet and VLAN headers fits.
DEFAULT_SNAPLEN = 65535 + 18
FILE_HEADER_SIZE = 24
RECORD_HEADER_SIZE = 16

_LE_HEADER = struct.Struct("<IHHiIII")
_BE_HEADER = struct.Struct(">IHHiIII")
_LE_RECORD = struct.Struct("<IIII")
_BE_RECORD = struct.Struct(">IIII")


class PcapError(ValueError):
    """The input is not a well-formed classic pcap file (the file's fault)."""


@dataclass(frozen=True, slots=True)
class PcapHeader:
    """The global header. ``nanoseconds``: record timestamps count ns, not µs."""

    version: tuple[int, int]
    snaplen: int
    linktype: int
    nanoseconds: bool = False
    big_endian: bool = False
    thiszone: int = 0


@dataclass(frozen=True, slots=True)
class PcapRecord:
    """One captured packet. ``number`` counts from 1; ``ts_frac`` is in µs (or ns when
    the file says so); ``data`` may be shorter than ``orig_len`` (cut at the snaplen)."""

    number: int
    ts_sec: int
    ts_frac: int
    orig_len: int
    data: bytes
    nanoseconds: bool = False

    @property
    def timestamp(self) -> float:
        """Seconds since the epoch, as a float."""
        return self.ts_sec + self.ts_frac / (1e9 if self.nanoseconds else 1e6)

    @property
    def truncated(self) -> bool:
        """True if the capture holds less than the packet had."""
        return len(self.data) < self.orig_len


def file_header(snaplen: int = DEFAULT_SNAPLEN, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    """The 24 bytes that start a little-endian, microsecond pcap file (version 2.4)."""
    if not 1 <= snaplen <= MAX_SNAPLEN:
        raise ValueError(f"snaplen {snaplen} not in 1..{MAX_SNAPLEN}")
    if not 0 <= linktype <= 0xFFFFFFFF:
        raise ValueError(f"linktype {linktype} is not a u32")
    return _LE_HEADER.pack(MAGIC_USEC, 2, 4, 0, 0, snaplen, linktype)


def record(
    data: bytes | bytearray | memoryview, ts_us: int, snaplen: int = DEFAULT_SNAPLEN
) -> bytes:
    """One record (header + data) for a file written by :func:`file_header` with the same
    ``snaplen``: ``ts_us`` is the capture time in microseconds since the epoch; data
    beyond ``snaplen`` is cut (``orig_len`` keeps the full length)."""
    if ts_us < 0 or ts_us // 1_000_000 > 0xFFFFFFFF:
        raise ValueError(f"timestamp {ts_us} µs does not fit a pcap record")
    n = len(data)
    if n > 0xFFFFFFFF:
        raise ValueError(f"packet of {n} bytes is too long for a pcap record")
    incl = min(n, snaplen)
    sec, usec = divmod(ts_us, 1_000_000)
    return _LE_RECORD.pack(sec, usec, incl, n) + bytes(memoryview(data)[:incl])


class PcapReader:
    """Incremental reader of a classic pcap file (see the module docstring).

    ::

        r = PcapReader()
        r.feed(chunk)                 # any number of times
        while (rec := r.next_record()) is not None: ...
        r.close()                     # at end of input: PcapError if it stopped mid-record
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # parsed up to here; compacted on feed (linear, not quadratic)
        self.header: PcapHeader | None = None
        self._rec: struct.Struct = _LE_RECORD
        #: how many records were returned so far
        self.count = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add the next bytes of the file."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet parsed."""
        return len(self._buf) - self._pos

    def want_more(self) -> bool:
        """True if :meth:`next_record` cannot return anything before more is fed."""
        left = self.buffered
        if self.header is None:
            return left < FILE_HEADER_SIZE
        if left < RECORD_HEADER_SIZE:
            return True
        incl = int(self._rec.unpack_from(self._buf, self._pos)[2])
        return left < RECORD_HEADER_SIZE + incl

    def read_header(self) -> PcapHeader | None:
        """The global header, parsed once 24 bytes are in (None before; but
        :class:`PcapError` as soon as the first 4 bytes are not a pcap magic)."""
        if self.header is not None:
            return self.header
        if self.buffered < 4:
            return None
        # the magic alone tells a foreign file: refuse it before 24 bytes are in
        magic_le = struct.unpack_from("<I", self._buf, 0)[0]
        magic_be = struct.unpack_from(">I", self._buf, 0)[0]
        if magic_le in (MAGIC_USEC, MAGIC_NSEC):
            fmt, rec, magic, big = _LE_HEADER, _LE_RECORD, magic_le, False
        elif magic_be in (MAGIC_USEC, MAGIC_NSEC):
            fmt, rec, magic, big = _BE_HEADER, _BE_RECORD, magic_be, True
        elif magic_le == MAGIC_PCAPNG:
            raise PcapError("a pcapng file, not classic pcap (convert it: editcap -F pcap IN OUT)")
        else:
            raise PcapError(f"not a pcap file: magic {bytes(self._buf[:4]).hex()}")
        if self.buffered < FILE_HEADER_SIZE:
            return None
        _, major, minor, zone, _sigfigs, snaplen, linktype = fmt.unpack_from(self._buf, 0)
        # libpcap's savefile.c: major version 2 is the only one ever written; 2.4 is
        # current and readers accept the older 2.x minors.
        if major != 2 or minor > 4:
            raise PcapError(f"unsupported pcap version {major}.{minor} (want 2.4)")
        if not 1 <= snaplen <= MAX_SNAPLEN:
            raise PcapError(f"bad snaplen {snaplen} in the file header (want 1..{MAX_SNAPLEN})")
        self._pos += FILE_HEADER_SIZE
        self._rec = rec
        self.header = PcapHeader(
            (major, minor), snaplen, linktype & 0x0FFFFFFF, magic == MAGIC_NSEC, big, zone
        )
        return self.header

    def next_record(self) -> PcapRecord | None:
        """The next complete record, or None until more bytes are fed. Raises
        :class:`PcapError` naming the record if it is malformed."""
        header = self.read_header()
        pos = self._pos
        if header is None or len(self._buf) - pos < RECORD_HEADER_SIZE:
            return None
        number = self.count + 1
        sec, frac, incl, orig = self._rec.unpack_from(self._buf, pos)
        limit = 1_000_000_000 if header.nanoseconds else 1_000_000
        if frac >= limit:
            unit = "ns" if header.nanoseconds else "µs"
            raise PcapError(f"record {number}: sub-second timestamp {frac} {unit} >= 1 s")
        if incl > header.snaplen:
            raise PcapError(
                f"record {number}: captured length {incl} exceeds the file's snaplen "
                f"{header.snaplen}"
            )
        if incl > orig:
            raise PcapError(
                f"record {number}: captured length {incl} exceeds the packet length {orig}"
            )
        end = pos + RECORD_HEADER_SIZE + incl
        if len(self._buf) < end:
            return None
        data = bytes(self._buf[pos + RECORD_HEADER_SIZE : end])
        self._pos = end
        self.count = number
        return PcapRecord(number, sec, frac, orig, data, header.nanoseconds)

    def close(self) -> None:
        """End of input: :class:`PcapError` if a header or record was cut short."""
        if self.header is None:
            self.read_header()
            if self.header is None:
                raise PcapError(
                    f"truncated file header: {self.buffered} of {FILE_HEADER_SIZE} bytes"
                )
        self.next_record()  # raises for a malformed record header already complete
        left = self.buffered
        if left:
            number = self.count + 1
            if left < RECORD_HEADER_SIZE:
                raise PcapError(
                    f"record {number}: truncated record header "
                    f"({left} of {RECORD_HEADER_SIZE} bytes)"
                )
            incl = self._rec.unpack_from(self._buf, self._pos)[2]
            raise PcapError(
                f"record {number}: truncated data ({left - RECORD_HEADER_SIZE} of {incl} bytes)"
            )


def read_all(data: bytes | bytearray | memoryview) -> tuple[PcapHeader, list[PcapRecord]]:
    """Parse a whole file held in memory: its header and every record."""
    r = PcapReader()
    r.feed(data)
    out: list[PcapRecord] = []
    while (rec := r.next_record()) is not None:
        out.append(rec)
    r.close()
    assert r.header is not None  # close() raised otherwise
    return r.header, out
