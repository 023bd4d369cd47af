"""Bad frames from the wire, end to end: a pcap of hostile traffic is replayed into a
kernel through a real net device process; every bad frame is dropped and counted, the
kernel keeps working (the good datagram at the end arrives) and memory stays bounded."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import kernel
from vdev.virtio import pcap

pytestmark = pytest.mark.integration

KMAC = bytes.fromhex("02aabbccdd01")
PEER_MAC = bytes.fromhex("02aabbccdd02")
KIP = bytes([10, 0, 0, 2])
PEER_IP = bytes([10, 0, 0, 9])


def _csum(data: bytes) -> int:
    """RFC 1071, written out word by word (independent of the code under test)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ip(payload: bytes, *, ident: int = 1, flags_frag: int = 0, bad_csum: bool = False) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, flags_frag, 64, 17, 0, PEER_IP, KIP
    )
    c = _csum(hdr) ^ (0x5555 if bad_csum else 0)
    return hdr[:10] + struct.pack("!H", c) + hdr[12:] + payload


def _udp(data: bytes, dport: int, *, bad_csum: bool = False) -> bytes:
    head = struct.pack("!HHHH", 4000, dport, 8 + len(data), 0)
    pseudo = PEER_IP + KIP + struct.pack("!BBH", 0, 17, 8 + len(data))
    c = _csum(pseudo + head + data) or 0xFFFF
    if bad_csum:
        c ^= 0x00FF
    return head[:6] + struct.pack("!H", c) + data


def _eth(payload: bytes) -> bytes:
    return KMAC + PEER_MAC + b"\x08\x00" + payload


def _hostile_capture(path: Path, port: int) -> None:
    good = _udp(b"still alive", port)
    frag_payload = _udp(b"x" * 64, port)  # 72 bytes: fragments of 24 + 48 bytes
    frames = [
        b"\x01\x02\x03",  # runt: less than an Ethernet header
        KMAC + PEER_MAC + b"\x88\xb5" + b"?" * 40,  # an ethertype nobody speaks
        _eth(_ip(good)[:15]),  # truncated IP header
        _eth(_ip(good, bad_csum=True)),  # bad IP header checksum
        _eth(_ip(_udp(b"bad udp", port, bad_csum=True))),  # bad UDP checksum
        _eth(_ip(_udp(b"x", port))[:-1] + b""),  # IP total length beyond the frame
        # overlapping fragments: 0..24 and 16..64 (ident 7) — the whole datagram goes
        _eth(_ip(frag_payload[:24], ident=7, flags_frag=0x2000)),
        _eth(_ip(frag_payload[16:], ident=7, flags_frag=16 // 8)),
        # a first fragment whose rest never comes (ident 8): freed by the timeout
        _eth(_ip(frag_payload[:24], ident=8, flags_frag=0x2000)),
        _eth(_ip(good)),  # and a good datagram: must arrive
    ]
    data = pcap.file_header() + b"".join(
        # the good datagram comes a second after the rest (the replay is paced by
        # these timestamps), when the test's socket is long bound
        pcap.record(f, ts_us=i * 1000 + (1_000_000 if i == len(frames) - 1 else 0), snaplen=65535)
        for i, f in enumerate(frames)
    )
    path.write_bytes(data)


def test_hostile_frames_are_dropped_and_counted_and_the_kernel_goes_on(tmp_path: Path) -> None:
    cap = tmp_path / "hostile.pcap"
    port = 5005
    _hostile_capture(cap, port)
    spec = kernel.Net(
        backend="pcap", replay=str(cap), paced=True, mac="02:aa:bb:cc:dd:01", ip="10.0.0.2/24"
    )
    with kernel.boot(devices=[spec]) as k:
        fd = k.sys.socket()
        k.sys.bind(fd, ("0.0.0.0", port))
        k.sys.settimeout(fd, 10)
        data, addr = k.sys.recvfrom(fd, 100)
        assert (data, addr) == (b"still alive", ("10.0.0.9", 4000))
        st = k.net.stats
        dev = k.devices[0]
        m = dev.metrics()["device"]
        # the runt never reaches the stack: the device (or the driver) drops it
        assert m["rx_bad_frames"] + m["rx_dropped_too_big"] + dev.rx_bad_frames == 1, m
        assert st["rx_unknown_ethertype"] == 1, st
        assert st["ip_bad_checksum"] == 1, st
        assert st["ip_bad_header"] >= 2, st  # truncated header, total length too big
        assert st["udp_bad_checksum"] == 1, st
        assert st["ip_frag_overlap"] == 1, st
        assert k.net.reassembly_count() <= 1  # only the never-completed one waits
        assert 0 < k.net.reassembly_bytes() <= 1024  # one 24-byte fragment, with overhead
        assert st["rx_frames"] == 9, st  # every other frame reached the stack
