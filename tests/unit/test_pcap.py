"""The pcap format (vdev.virtio.pcap) and the pcap backend's recording (vdev.net_pcap).

Files are written with our writer and read back; hand-made files cover the other byte
order and nanosecond timestamps; every malformed case must be refused with a message
naming the record. A file recorded through the device (partial checksums and a TSO
frame among its frames) is checked by our reader and, when it is installed, by tshark,
which must count the expected frames and find every checksum good.

Replay through a running device session is in ``test_net_device.py``.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.interop_require import skip_or_fail
from vdev.net import BackendOptionError, NetDevice
from vdev.net_pcap import PcapBackend, check_pcap
from vdev.virtio import Chain, NetF, bit
from vdev.virtio.net import GSO_TCPV4, HDR_F_NEEDS_CSUM, TX_QUEUE, NetHdr
from vdev.virtio.pcap import (
    DEFAULT_SNAPLEN,
    LINKTYPE_ETHERNET,
    MAGIC_NSEC,
    MAGIC_USEC,
    MAX_SNAPLEN,
    PcapError,
    PcapReader,
    file_header,
    read_all,
    record,
)

pytestmark = pytest.mark.timeout(60)

SRC_IP = bytes([10, 0, 0, 1])
DST_IP = bytes([10, 0, 0, 2])
ETH = bytes.fromhex("020000000002020000000001")


def frames(n: int = 20) -> list[bytes]:
    return [ETH + b"\x88\xb5" + bytes((i + k) & 0xFF for i in range(46 + 97 * k)) for k in range(n)]


# --------------------------------------------------------------------------- format


def test_write_then_read_back() -> None:
    fs = frames()
    ts = [1_700_000_000_000_000 + 1234 * k for k in range(len(fs))]
    data = file_header() + b"".join(record(f, t) for f, t in zip(fs, ts, strict=True))
    header, recs = read_all(data)
    assert header.version == (2, 4) and header.snaplen == DEFAULT_SNAPLEN
    assert header.linktype == LINKTYPE_ETHERNET and not header.nanoseconds
    assert [r.data for r in recs] == fs
    assert [r.number for r in recs] == list(range(1, len(fs) + 1))
    assert [r.ts_sec * 1_000_000 + r.ts_frac for r in recs] == ts
    assert all(r.orig_len == len(r.data) and not r.truncated for r in recs)
    assert recs[1].timestamp == pytest.approx(1_700_000_000.001234)
    assert struct.unpack_from("<I", data)[0] == MAGIC_USEC


def test_fed_in_small_pieces() -> None:
    fs = frames(5)
    data = file_header() + b"".join(record(f, 10**15) for f in fs)
    r = PcapReader()
    got = []
    for i in range(0, len(data), 7):
        r.feed(data[i : i + 7])
        while (rec := r.next_record()) is not None:
            got.append(rec.data)
    r.close()
    assert got == fs and r.count == 5 and r.buffered == 0


def test_snaplen_cuts_and_keeps_the_original_length() -> None:
    data = file_header(snaplen=100) + record(bytes(300), 0, snaplen=100)
    header, [rec] = read_all(data)
    assert header.snaplen == 100
    assert len(rec.data) == 100 and rec.orig_len == 300 and rec.truncated


def test_big_endian_nanosecond_file() -> None:
    hdr = struct.pack(">IHHiIII", MAGIC_NSEC, 2, 4, 0, 0, 1000, 1)
    rec = struct.pack(">IIII", 5, 999_999_999, 3, 10) + b"abc"
    header, [r] = read_all(hdr + rec)
    assert header.big_endian and header.nanoseconds
    assert (r.ts_sec, r.ts_frac, r.data, r.orig_len) == (5, 999_999_999, b"abc", 10)
    assert r.timestamp == pytest.approx(5.999999999)


def test_empty_capture_is_fine() -> None:
    header, recs = read_all(file_header())
    assert recs == [] and header.linktype == 1


def test_writer_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        file_header(snaplen=0)
    with pytest.raises(ValueError):
        file_header(snaplen=MAX_SNAPLEN + 1)
    with pytest.raises(ValueError):
        record(b"x", -1)


def _hdr(magic: int = MAGIC_USEC, major: int = 2, minor: int = 4, snaplen: int = 65535) -> bytes:
    return struct.pack("<IHHiIII", magic, major, minor, 0, 0, snaplen, 1)


def _rec(incl: int, orig: int | None = None, usec: int = 0, data: bytes | None = None) -> bytes:
    body = bytes(incl) if data is None else data
    return struct.pack("<IIII", 1, usec, incl, incl if orig is None else orig) + body


GOOD_REC = _rec(60)

MALFORMED = [
    (b"", "truncated file header: 0 of 24"),
    (_hdr()[:20], "truncated file header: 20 of 24"),
    (b"\x00" * 24, "not a pcap file: magic 00000000"),
    (b"GIF89a" + bytes(18), "not a pcap file"),
    (b"short text\n", "not a pcap file: magic 73686f72"),
    (struct.pack("<I", 0x0A0D0D0A) + bytes(20), "pcapng"),
    (_hdr(major=3), "unsupported pcap version 3.4"),
    (_hdr(major=1, minor=0), "unsupported pcap version 1.0"),
    (_hdr(minor=5), "unsupported pcap version 2.5"),
    (_hdr(snaplen=0), "bad snaplen 0"),
    (_hdr(snaplen=MAX_SNAPLEN + 1), f"bad snaplen {MAX_SNAPLEN + 1}"),
    (_hdr() + GOOD_REC + GOOD_REC[:10], "record 2: truncated record header (10 of 16"),
    (_hdr() + GOOD_REC + _rec(60)[:40], "record 2: truncated data (24 of 60"),
    (_hdr() + _rec(60)[:-1], "record 1: truncated data (59 of 60"),
    (_hdr(snaplen=100) + GOOD_REC * 2 + _rec(101), "record 3: captured length 101 exceeds"),
    (_hdr() + _rec(60, orig=59), "record 1: captured length 60 exceeds the packet length 59"),
    (_hdr() + GOOD_REC + _rec(60, usec=1_000_000), "record 2: sub-second timestamp"),
    (_hdr() + _rec(0xFFFFFFF0, data=b""), "record 1: captured length 4294967280 exceeds"),
]


@pytest.mark.parametrize("data,message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_files_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(PcapError) as ei:
        read_all(data)
    assert message in str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert "\n" not in str(ei.value)


def test_check_pcap_names_file_and_record(tmp_path: Path) -> None:
    good = tmp_path / "good.pcap"
    good.write_bytes(file_header() + b"".join(record(f, 0) for f in frames(3)))
    assert check_pcap(str(good)) == 3
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(file_header() + record(b"x" * 60, 0) + record(b"y" * 60, 0)[:-5])
    with pytest.raises(BackendOptionError, match=r"bad\.pcap: record 2: truncated data"):
        check_pcap(str(bad))
    other = tmp_path / "raw-ip.pcap"
    other.write_bytes(file_header(linktype=101))
    with pytest.raises(BackendOptionError, match="link type 101, not Ethernet"):
        check_pcap(str(other))
    with pytest.raises(BackendOptionError, match="cannot open"):
        check_pcap(str(tmp_path / "missing.pcap"))


def test_backend_option_errors(tmp_path: Path) -> None:
    with pytest.raises(BackendOptionError, match="--record PATH and/or --replay PATH"):
        PcapBackend()
    same = tmp_path / "x.pcap"
    same.write_bytes(file_header())
    with pytest.raises(BackendOptionError, match="same file"):
        PcapBackend(str(same), str(same))
    with pytest.raises(BackendOptionError, match="cannot create"):
        PcapBackend(str(tmp_path / "no" / "such" / "dir.pcap"))


# --------------------------------------------------------------------------- recording


def ref_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ip4(proto: int, l4: bytes, ident: int = 1) -> bytes:
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, 0x4000, 64, proto, 0, SRC_IP, DST_IP
        )
    )
    struct.pack_into("!H", ip, 10, ~ref_sum(bytes(ip)) & 0xFFFF)
    return ETH + b"\x08\x00" + bytes(ip) + l4


def partial_tcp(payload: bytes) -> bytes:
    tcp = bytearray(struct.pack("!HHIIBBHHH", 1234, 80, 9, 1, 0x50, 0x18, 65535, 0, 0))
    n = 20 + len(payload)
    struct.pack_into("!H", tcp, 16, ref_sum(SRC_IP + DST_IP + bytes([0, 6]) + struct.pack("!H", n)))
    return ip4(6, bytes(tcp) + payload)


def partial_udp(payload: bytes) -> bytes:
    n = 8 + len(payload)
    udp = bytearray(struct.pack("!HHHH", 5000, 53, n, 0))
    struct.pack_into("!H", udp, 6, ref_sum(SRC_IP + DST_IP + bytes([0, 17]) + struct.pack("!H", n)))
    return ip4(17, bytes(udp) + payload)


def transmit(dev: NetDevice, hdr: NetHdr, frame: bytes) -> None:
    """A TX chain as the session hands it to the device: one readable buffer."""
    buf = memoryview(bytearray(hdr.pack() + frame))
    assert dev.handle(TX_QUEUE, Chain(0, [buf], [], len(buf), 0, [])) == 0


def record_through_device(path: Path) -> list[int]:
    """Transmit a plain frame, partial TCP and UDP checksums and a TSO frame; return the
    lengths of the frames expected on the wire."""
    backend = PcapBackend(str(path))
    dev = NetDevice(backend, mac=ETH[6:12])
    dev.activate(
        bit(32) | bit(NetF.CSUM) | bit(NetF.HOST_TSO4) | bit(NetF.GUEST_CSUM) | bit(NetF.MTU)
    )
    plain = ETH + b"\x88\xb5" + bytes(100)
    tcp = partial_tcp(b"partial tcp checksum" * 10)
    udp = partial_udp(b"odd-length udp!")
    tso = partial_tcp(bytes((i * 5) & 0xFF for i in range(5000)))
    transmit(dev, NetHdr(), plain)
    transmit(dev, NetHdr(HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16), tcp)
    transmit(dev, NetHdr(HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6), udp)
    transmit(dev, NetHdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16), tso)
    assert dev.metrics["tx_frames"] == 4 and dev.metrics["tx_bad_frames"] == 0
    assert dev.metrics["pcap_recorded"] == 1 + 1 + 1 + 4
    dev.close()
    return [len(plain), len(tcp), len(udp), 1448 + 54, 1448 + 54, 1448 + 54, 5000 - 3 * 1448 + 54]


def test_recorded_frames_have_complete_checksums(tmp_path: Path) -> None:
    path = tmp_path / "rec.pcap"
    lengths = record_through_device(path)
    header, recs = read_all(path.read_bytes())
    assert header.linktype == LINKTYPE_ETHERNET
    assert [len(r.data) for r in recs] == lengths
    for r in recs[1:]:
        f = r.data
        ip = f[14:34]
        l4 = f[34:]
        assert ref_sum(ip) == 0xFFFF
        ph = SRC_IP + DST_IP + bytes([0, ip[9]]) + struct.pack("!H", len(l4))
        assert ref_sum(ph + l4) == 0xFFFF, f"record {r.number}: checksum verifies"
    stamps = [r.timestamp for r in recs]
    assert stamps == sorted(stamps)


def test_tshark_reads_a_recorded_file(tmp_path: Path) -> None:
    tshark = shutil.which("tshark")
    if tshark is None:
        skip_or_fail("tshark is not installed (apt-get install tshark)")
    path = tmp_path / "rec.pcap"
    lengths = record_through_device(path)
    out = subprocess.run(
        [
            tshark,
            "-n",
            "-r",
            str(path),
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-o",
            "ip.check_checksum:TRUE",
            "-T",
            "fields",
            "-e",
            "frame.len",
            "-e",
            "ip.checksum.status",
            "-e",
            "tcp.checksum.status",
            "-e",
            "udp.checksum.status",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LC_ALL": "C"},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines() if line.strip()]
    assert [int(r[0]) for r in rows] == lengths, "tshark counts every frame"
    assert rows[0][1:] == ["", "", ""], "the non-IP frame"
    for row in rows[1:]:
        ip_ok, tcp_ok, udp_ok = row[1], row[2], row[3]
        assert ip_ok == "1", row
        assert (tcp_ok or udp_ok) == "1", f"tshark finds the L4 checksum good: {row}"
