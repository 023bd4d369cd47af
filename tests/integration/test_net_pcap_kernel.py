"""The kernel on the ``pcap`` backend, judged by Wireshark's dissectors (``tshark -r``).

Theory of operation
-------------------
The pcap backend's wire is a file: what the driver transmits is recorded (the backend
takes no offloads, so the device finishes every partial checksum first), and a capture
given with ``replay=PATH`` is played as received traffic. Two tests:

* **Record only.** A kernel with ``record=PATH`` and no peer sends UDP broadcasts at
  1, 1472, 1473 and 8000 bytes (one frame, one frame, two and six fragments at MTU
  1500), then sends a datagram to a made-up host on the subnet and pings it (both
  wait for ARP, which nobody answers: only the ARP requests are recorded).
  ``tshark -r`` of the recording must count exactly those frames, every IPv4 and UDP
  checksum correct, the UDP payloads reassembled equal to what was sent, nothing
  malformed.
* **Replay and record.** The test builds a capture itself with :mod:`vdev.virtio.pcap`
  (valid Ethernet/IPv4/UDP frames to the kernel's MAC and IP, checked by tshark first):
  an ARP request from a made-up peer, an ICMP echo request, UDP datagrams for a bound
  ``k.sys`` socket (one of them in three IPv4 fragments, one without a checksum), one
  with a wrong checksum, one for another MAC and one for a port nobody listens on. The
  socket must receive exactly the good datagrams, in order, byte for byte; the kernel's
  answers (ARP reply, echo reply, ICMP port unreachable, its own UDP datagrams to the
  peer it learned from ARP) must be in the recording with correct checksums.

A replay starts as soon as the driver posts receive buffers, which the stock driver does
while ``kernel.boot`` is still running: before any socket can be bound. So the second
test boots with a private bus whose net driver is the stock :class:`kernel.NetDriver`
except that it posts its receive buffers only when the test calls ``link.start()``
(after binding). The replay waits for them, which the device counts
(``pcap_replay_waits``) — the late-buffer path the backend promises to survive.

The device writes a frame to the file before it completes the chain, and its
``pcap_recorded`` counter says how many it wrote: a test that needs the recording
complete waits on that counter (each ``metrics()`` is a round trip to the device
process), with a deadline, before it reads the file.

Without ``tshark`` the tests skip (and fail under ``VLAB_REQUIRE_INTEROP=1``). The
helpers :func:`tshark_rows` and the frame builders are shared with
``test_net_linux.py``.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

import kernel
from hostops.clock import monotonic
from kernel.files import SO_BROADCAST, SOL_SOCKET
from kernel.virtio_net import NetDriver
from tests.interop_require import require
from vdev.virtio import DeviceId
from vdev.virtio.packet import inet_checksum, ipv4_pseudo_sum
from vdev.virtio.pcap import file_header, read_all, record

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TIMEOUT = 10.0

#: The columns :func:`tshark_rows` asks for (``-T fields``, first occurrence of each).
TSHARK_FIELDS = (
    "frame.number",
    "frame.len",
    "eth.src",
    "eth.dst",
    "eth.type",
    "arp.opcode",
    "arp.src.hw_mac",
    "arp.src.proto_ipv4",
    "arp.dst.proto_ipv4",
    "ip.src",
    "ip.dst",
    "ip.proto",
    "ip.id",
    "ip.flags.mf",
    "ip.frag_offset",
    "ip.checksum.status",
    "icmp.type",
    "icmp.code",
    "icmp.checksum.status",
    "udp.srcport",
    "udp.dstport",
    "udp.length",
    "udp.checksum",
    "udp.checksum.status",
    "udp.payload",
    "_ws.malformed",
)
#: Wireshark's checksum verdicts (``*.checksum.status``, epan/proto.h
#: ``PROTO_CHECKSUM_E_*``).
CSUM_BAD, CSUM_GOOD, CSUM_UNVERIFIED, CSUM_NOT_PRESENT = "0", "1", "2", "3"

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
BCAST_MAC = b"\xff" * 6

KMAC = "02:00:00:0a:00:02"  # the kernel's NIC
PEER_MAC = "02:00:00:0a:00:01"  # the made-up peer of the replay
OTHER_MAC = "02:00:00:0a:00:63"  # somebody else on the wire
KIP, PEER_IP, BCAST_IP, NOBODY_IP = "10.0.0.2", "10.0.0.1", "10.0.0.255", "10.0.0.77"
PORT, PEER_PORT, CLOSED_PORT = 5000, 6000, 5001


# --------------------------------------------------------------------------- tshark


def tshark() -> str:
    """The tshark binary; skips (fails under CI) without it."""
    path = shutil.which("tshark")
    require(path is not None, "tshark is not installed (Debian package tshark)")
    assert path is not None
    return path


def tshark_fields_argv(fields: Iterable[str] = TSHARK_FIELDS) -> list[str]:
    """tshark options: no name resolution, IPv4 and UDP checksums verified (Wireshark
    does not by default), one tab-separated line per frame with ``fields``."""
    argv = ["-n", "-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE"]
    argv += ["-T", "fields", "-E", "separator=/t", "-E", "occurrence=f"]
    for f in fields:
        argv += ["-e", f]
    return argv


def parse_row(line: str, fields: tuple[str, ...] = TSHARK_FIELDS) -> dict[str, str]:
    """One ``-T fields`` line as ``{field: text}`` (empty text: not in the frame)."""
    cols = line.rstrip("\n").split("\t")
    assert len(cols) == len(fields), f"tshark printed {len(cols)} columns: {line!r}"
    return dict(zip(fields, cols, strict=True))


def tshark_rows(path: Path, display_filter: str | None = None) -> list[dict[str, str]]:
    """Every frame of the capture ``path`` as decoded by ``tshark -r``."""
    argv = [tshark(), "-r", str(path), *tshark_fields_argv()]
    if display_filter:
        argv += ["-Y", display_filter]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return [parse_row(line) for line in r.stdout.splitlines() if line]


def flag(text: str) -> bool:
    """A tshark boolean field (``1``/``0``, older versions ``True``/``False``)."""
    return text in ("1", "True")


# --------------------------------------------------------------------------- frames


def mac(text: str) -> bytes:
    """``aa:bb:..`` as six bytes."""
    return bytes.fromhex(text.replace(":", ""))


def ip4(text: str) -> bytes:
    """A dotted quad as four bytes."""
    return bytes(int(p) for p in text.split("."))


def ether(dst: str | bytes, src: str, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet II frame (IEEE 802.3 §3.2.6: no FCS in a capture)."""
    d = dst if isinstance(dst, bytes) else mac(dst)
    return d + mac(src) + struct.pack("!H", ethertype) + payload


def ipv4(
    src: str, dst: str, proto: int, payload: bytes, *, ident: int, frag: int = 0, mf: bool = False
) -> bytes:
    """An IPv4 packet (RFC 791 §3.1) with a correct header checksum; ``frag`` is the
    fragment offset in bytes (a multiple of 8)."""
    assert frag % 8 == 0
    ff = (0x2000 if mf else 0) | (frag // 8)
    h = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, ff, 64, proto, 0, ip4(src), ip4(dst)
        )
    )
    h[10:12] = struct.pack("!H", inet_checksum(h))
    return bytes(h) + payload


def udp(
    src: str, dst: str, sport: int, dport: int, data: bytes, *, csum: int | None = None
) -> bytes:
    """A UDP datagram (RFC 768) with its checksum over the pseudo-header (a computed 0
    is sent as 0xFFFF); ``csum`` overrides it (0: no checksum)."""
    n = 8 + len(data)
    head = struct.pack("!HHHH", sport, dport, n, 0)
    if csum is None:
        csum = inet_checksum(head + data, ipv4_pseudo_sum(ip4(src), ip4(dst), 17, n)) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, n, csum) + data


def udp_frames(
    dst_mac: str, src_mac: str, src: str, dst: str, dgram: bytes, *, ident: int, mtu: int = 1500
) -> list[bytes]:
    """``dgram`` (a whole UDP datagram) in IPv4 packets of at most ``mtu`` bytes: one,
    or fragments of ``mtu - 20`` rounded down to 8 (RFC 791 §3.2, fragmentation)."""
    step = (mtu - 20) // 8 * 8
    if len(dgram) + 20 <= mtu:
        return [ether(dst_mac, src_mac, ETH_P_IP, ipv4(src, dst, 17, dgram, ident=ident))]
    out = []
    for off in range(0, len(dgram), step):
        piece = dgram[off : off + step]
        more = off + step < len(dgram)
        out.append(
            ether(
                dst_mac,
                src_mac,
                ETH_P_IP,
                ipv4(src, dst, 17, piece, ident=ident, frag=off, mf=more),
            )
        )
    return out


def arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    """An ARP request (RFC 826: Ethernet, IPv4, opcode 1), broadcast."""
    body = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1)
    body += mac(src_mac) + ip4(src_ip) + bytes(6) + ip4(target_ip)
    return ether(BCAST_MAC, src_mac, ETH_P_ARP, body.ljust(46, b"\0"))


def icmp_echo(ident: int, seq: int, data: bytes) -> bytes:
    """An ICMP echo request (RFC 792, type 8) with its checksum."""
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, inet_checksum(head + data), ident, seq) + data


def frames_for(size: int, mtu: int = 1500) -> int:
    """How many IPv4 packets a UDP datagram of ``size`` payload bytes needs at ``mtu``."""
    total = size + 8
    step = (mtu - 20) // 8 * 8
    return 1 if total + 20 <= mtu else -(-total // step)


# --------------------------------------------------------------------------- kernel


class HeldRxNetDriver(NetDriver):
    """The stock virtio-net driver, except that after DRIVER_OK it leaves the receive
    ring empty until the test calls ``link.start()`` (which the stock ``started()``
    does at once). Nothing else differs."""

    def started(self) -> None:
        """Post no receive buffers yet (the test does, through ``link.start()``)."""


def held_rx_bus() -> kernel.VirtioBus:
    """A private virtio bus with :class:`HeldRxNetDriver` for virtio-net."""
    bus = kernel.VirtioBus()
    bus.register_driver(DeviceId.NET, HeldRxNetDriver)
    return bus


def wait_recorded(dev: kernel.VirtioDevice, n: int) -> dict[str, int]:
    """Wait until the device has written at least ``n`` frames to its recording (its
    ``pcap_recorded`` counter; every ``metrics()`` is a round trip to the device
    process); returns its metrics."""
    deadline = monotonic() + TIMEOUT
    while True:
        m: dict[str, int] = dev.metrics()["device"]
        if m.get("pcap_recorded", 0) >= n:
            return m
        assert monotonic() < deadline, f"only {m.get('pcap_recorded')} of {n} frames recorded"


def _by_src(rows: list[dict[str, str]], src: str) -> list[dict[str, str]]:
    return [r for r in rows if r["eth.src"] == src]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_record_only_tshark_counts_the_frames_and_checks_every_checksum(
    tmp_path: Path, offload: bool
) -> None:
    tshark()
    rec = tmp_path / "rec.pcap"
    rng = random.Random(7)
    sizes = (1, 1472, 1473, 8000)
    sent = [rng.randbytes(n) for n in sizes]
    spec = kernel.Net(backend="pcap", record=str(rec), ip=f"{KIP}/24", mac=KMAC, offload=offload)
    with kernel.boot(devices=[spec]) as k:
        dev = k.devices[0]
        fd = k.sys.socket()
        k.sys.setsockopt(fd, SOL_SOCKET, SO_BROADCAST, 1)
        for data in sent:
            assert k.sys.sendto(fd, data, (BCAST_IP, PORT)) == len(data)
        with pytest.raises(PermissionError):  # as Linux's ping without -b: EACCES
            k.sys.ping(BCAST_IP, count=1, timeout=0.3)
        # a made-up host: the datagram and the echo request wait for ARP, which
        # nobody answers, so only the kernel's ARP requests reach the wire
        k.sys.sendto(fd, b"anyone?", (NOBODY_IP, PORT))
        with pytest.raises(TimeoutError):
            k.sys.ping(NOBODY_IP, count=1, timeout=0.3)
        udp_frames_sent = sum(frames_for(n) for n in sizes)
        m = wait_recorded(dev, udp_frames_sent + 1)
        stats = k.net.stats
    # what the device did: the pcap backend takes no offloads, so with CSUM
    # negotiated the device completed the two unfragmented datagrams' checksums
    assert m.get("tx_csum_completed", 0) == (2 if offload else 0)
    assert ("CSUM" in dev.features) == offload
    assert stats["arp_requests_sent"] >= 1 and stats["udp_tx_datagrams"] == len(sizes) + 1
    _, records = read_all(rec.read_bytes())
    rows = tshark_rows(rec)
    assert len(rows) == len(records) >= udp_frames_sent + 1  # ARP retries may add some
    assert not [r for r in rows if r["_ws.malformed"]]
    assert all(r["eth.src"] == KMAC for r in rows)
    ip_rows = [r for r in rows if r["eth.type"] == f"0x{ETH_P_IP:04x}"]
    arp_rows = [r for r in rows if r["eth.type"] == f"0x{ETH_P_ARP:04x}"]
    assert len(ip_rows) + len(arp_rows) == len(rows)
    # UDP: every fragment, each datagram reassembled by tshark with a good checksum
    udp_rows = [r for r in ip_rows if r["ip.proto"] == "17"]
    assert len(udp_rows) == udp_frames_sent
    assert all(r["eth.dst"] == "ff:ff:ff:ff:ff:ff" and r["ip.dst"] == BCAST_IP for r in udp_rows)
    assert all(r["ip.checksum.status"] == CSUM_GOOD for r in ip_rows)
    whole = [r for r in udp_rows if r["udp.length"]]
    assert [int(r["udp.length"]) for r in whole] == [n + 8 for n in sizes]
    assert [r["udp.checksum.status"] for r in whole] == [CSUM_GOOD] * len(sizes)
    assert [bytes.fromhex(r["udp.payload"].replace(":", "")) for r in whole] == sent
    assert len(udp_rows) == len(ip_rows)  # the echo request never left (no ARP reply)
    # ARP: who-has the made-up host, tell the kernel
    assert arp_rows and all(
        (r["arp.opcode"], r["arp.src.hw_mac"], r["arp.src.proto_ipv4"], r["arp.dst.proto_ipv4"])
        == ("1", KMAC, KIP, NOBODY_IP)
        for r in arp_rows
    )


def _replay_capture() -> tuple[list[bytes], list[bytes]]:
    """The frames of the replay (in order) and the UDP payloads the socket must get."""
    rng = random.Random(11)
    good = [rng.randbytes(1), rng.randbytes(1472), rng.randbytes(3000), b"no checksum"]
    frames: list[bytes] = [arp_request(PEER_MAC, PEER_IP, KIP)]
    echo = icmp_echo(0x4242, 1, bytes(range(56)))
    frames.append(ether(KMAC, PEER_MAC, ETH_P_IP, ipv4(PEER_IP, KIP, 1, echo, ident=1)))
    ident = 100
    for data in good[:3]:
        dgram = udp(PEER_IP, KIP, PEER_PORT, PORT, data)
        frames += udp_frames(KMAC, PEER_MAC, PEER_IP, KIP, dgram, ident=ident)
        ident += 1
    wrong = udp(PEER_IP, KIP, PEER_PORT, PORT, b"corrupted", csum=0x1234)
    frames += udp_frames(KMAC, PEER_MAC, PEER_IP, KIP, wrong, ident=ident)
    elsewhere = udp(PEER_IP, KIP, PEER_PORT, PORT, b"not for this MAC")
    frames += udp_frames(OTHER_MAC, PEER_MAC, PEER_IP, KIP, elsewhere, ident=ident + 1)
    no_sum = udp(PEER_IP, KIP, PEER_PORT, PORT, good[3], csum=0)  # RFC 768: "no checksum"
    frames += udp_frames(KMAC, PEER_MAC, PEER_IP, KIP, no_sum, ident=ident + 2)
    closed = udp(PEER_IP, KIP, PEER_PORT, CLOSED_PORT, b"is anybody there")
    frames += udp_frames(KMAC, PEER_MAC, PEER_IP, KIP, closed, ident=ident + 3)  # last
    return frames, good


def test_a_built_capture_is_replayed_into_a_socket_and_the_answers_are_recorded(
    tmp_path: Path,
) -> None:
    tshark()
    frames, good = _replay_capture()
    replay = tmp_path / "in.pcap"
    t0 = 1_700_000_000_000_000
    replay.write_bytes(
        file_header() + b"".join(record(f, t0 + 1000 * i) for i, f in enumerate(frames))
    )
    # the test's own frames are what it says they are (Wireshark's dissectors agree)
    built = tshark_rows(replay)
    assert len(built) == len(frames) and not [r for r in built if r["_ws.malformed"]]
    assert all(r["ip.checksum.status"] == CSUM_GOOD for r in built if r["ip.proto"])
    verdicts = [r["udp.checksum.status"] for r in built if r["udp.length"]]
    assert verdicts == [CSUM_GOOD] * 3 + [CSUM_BAD, CSUM_GOOD, CSUM_NOT_PRESENT, CSUM_GOOD]

    rec = tmp_path / "out.pcap"
    spec = kernel.Net(backend="pcap", record=str(rec), replay=str(replay), ip=f"{KIP}/24", mac=KMAC)
    replies = [b"x" * 100, random.Random(12).randbytes(3000)]
    with kernel.boot(devices=[spec], bus=held_rx_bus()) as k:
        dev = k.devices[0]
        assert isinstance(dev.driver, HeldRxNetDriver) and dev.link is not None
        fd = k.sys.socket()
        k.sys.bind(fd, ("0.0.0.0", PORT))
        k.sys.settimeout(fd, TIMEOUT)
        dev.link.start()  # receive buffers: now the replay flows
        got: list[tuple[bytes, tuple[str, int]]] = []
        for _ in good:
            try:
                got.append(k.sys.recvfrom(fd, 65535))
            except TimeoutError:
                pytest.fail(
                    f"datagram {len(got) + 1} of {len(good)} never came; device: "
                    f"{dev.metrics()['device']}; stack: {k.net.stats}"
                )
        for data in replies:  # back to the peer, whose MAC the kernel learned by ARP
            k.sys.sendto(fd, data, (PEER_IP, PEER_PORT))
        kernel_frames = 1 + 1 + 1 + sum(frames_for(len(d)) for d in replies)
        m = wait_recorded(dev, len(frames) + kernel_frames)
        assert k.sys.poll([fd], 0) == []  # nothing else reached the socket
        stats = k.net.stats
    assert got == [(data, (PEER_IP, PEER_PORT)) for data in good]
    # (a device counter appears in its metrics once it is first counted)
    assert m["pcap_replayed"] == len(frames) and m.get("pcap_replay_dropped", 0) == 0
    assert m["pcap_replay_done"] == 1 and m["pcap_replay_waits"] >= 1
    assert m["pcap_recorded"] == len(frames) + kernel_frames
    assert stats["udp_rx_datagrams"] == len(good)
    assert stats["udp_bad_checksum"] == 1 and stats["rx_other_mac"] == 1
    assert stats["udp_no_port"] == 1 and stats["icmp_unreach_sent"] == 1
    assert stats["icmp_echo_replied"] == 1 and stats["ip_frag_reassembled"] == 1
    assert stats["arp_replies_sent"] == 1 and stats["arp_requests_sent"] == 0

    # the recording: the replayed frames as they were, then the kernel's answers
    _, records = read_all(rec.read_bytes())
    assert len(records) == len(frames) + kernel_frames
    theirs = [r.data for r in records if r.data[6:12] != mac(KMAC)]
    assert theirs == frames
    rows = tshark_rows(rec)
    assert len(rows) == len(records) and not [r for r in rows if r["_ws.malformed"]]
    mine = _by_src(rows, KMAC)
    assert len(mine) == kernel_frames
    assert all(r["eth.dst"] == PEER_MAC for r in mine)
    arp = [r for r in mine if r["arp.opcode"]]
    assert [(r["arp.opcode"], r["arp.src.hw_mac"], r["arp.src.proto_ipv4"]) for r in arp] == [
        ("2", KMAC, KIP)
    ]
    ip_rows = [r for r in mine if r["ip.proto"]]
    assert all(r["ip.checksum.status"] == CSUM_GOOD for r in ip_rows)
    assert all((r["ip.src"], r["ip.dst"]) == (KIP, PEER_IP) for r in ip_rows)
    icmp = [(r["icmp.type"], r["icmp.code"], r["icmp.checksum.status"]) for r in ip_rows]
    assert sorted(i for i in icmp if i[0]) == [("0", "0", CSUM_GOOD), ("3", "3", CSUM_GOOD)]
    dgrams = [r for r in ip_rows if r["ip.proto"] == "17"]
    assert len(dgrams) == sum(frames_for(len(d)) for d in replies)
    whole = [r for r in dgrams if r["udp.length"]]
    assert [r["udp.checksum.status"] for r in whole] == [CSUM_GOOD] * len(replies)
    assert [(r["udp.srcport"], r["udp.dstport"]) for r in whole] == [
        (str(PORT), str(PEER_PORT))
    ] * len(replies)
    assert [bytes.fromhex(r["udp.payload"].replace(":", "")) for r in whole] == replies
