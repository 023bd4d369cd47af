"""The ``tap`` backend against real Linux, inside a network namespace the test creates.

The network rule: nothing here touches the host's own interfaces. Each test makes a
namespace ``vlabtest-<pid>-<hex>`` (:mod:`hostops.netns`) and starts the switch *inside*
it with ``ip netns exec NS python -m vdev.switch --listen EP --tap vlt0`` — the switch
opens the TAP through :class:`vdev.net_tap.TapBackend`, being its FrameSink, so the TAP
is born in the namespace. The test's own ports reach that switch over its ``ipc://``
socket file (a file: it crosses network namespaces). Linux gets ``10.99.0.1/24`` on
``vlt0``; the test plays ``10.99.0.2`` and talks to Linux's ARP, to a native UDP
socket that runs in the namespace (``ip netns exec NS python -c ...``) with a
checksum-offloaded frame, and to Linux's TCP with a TSO super-frame (which must enter
Linux as one frame: ``ip -s link`` counts it, the RST acknowledges all of it).

The namespace, the switch and the TAP are removed after every test, also on failure;
a module fixture checks that no namespace of this run is left. Without root, ``ip`` or
``/dev/net/tun`` the tests skip saying so (and fail under ``VLAB_REQUIRE_INTEROP=1``).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_switch import Port, by_name, run_until, stats  # same directory (rootdir-relative)

from hostops import netns
from hostops.clock import monotonic
from hostops.netns import NetNamespace
from hostops.process import DeviceProcess, python_argv
from hostops.rundir import RuntimeDir
from tests.interop_require import REQUIRE_ENV, require, skip_or_fail
from vdev.switch import EventLoop, SwitchClient
from vdev.virtio.net import GSO_TCPV4, HDR_F_NEEDS_CSUM, NetHdr
from vdev.virtio.packet import complete_checksum, inet_checksum, ipv4_pseudo_sum

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TIMEOUT = 10.0
TAP = "vlt0"
LINUX_IP = bytes([10, 99, 0, 1])
OUR_IP = bytes([10, 99, 0, 2])
BCAST = b"\xff" * 6


@pytest.fixture(scope="module", autouse=True)
def no_namespace_left() -> Iterator[None]:
    """Every namespace this run made is gone at the end of the module."""
    netns.sweep_stale_namespaces()
    mine = f"{netns.DEFAULT_PREFIX}-{os.getpid()}-"
    yield
    left = [n for n in netns.list_namespaces() if n.startswith(mine)]
    assert not left, f"network namespaces left behind: {left}"


@pytest.fixture
def ns() -> Iterator[NetNamespace]:
    why = netns.unavailable()
    if why is not None:
        skip_or_fail(why)
    require(os.path.exists("/dev/net/tun"), "/dev/net/tun is missing (no tun driver)")
    try:
        space = NetNamespace.create()
    except OSError as e:
        skip_or_fail(f"cannot create a network namespace: {e}")
    try:
        yield space
    finally:
        space.delete()


@pytest.fixture
def rundir() -> Iterator[RuntimeDir]:
    d = RuntimeDir.create()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop()
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture
def tap_switch(
    ns: NetNamespace, rundir: RuntimeDir, tmp_path: Path
) -> Iterator[tuple[str, DeviceProcess]]:
    """The switch with a TAP port, inside ``ns``; Linux's side configured."""
    ep = rundir.endpoint("sw")
    proc = DeviceProcess.launch(
        ns.argv(python_argv("vdev.switch", "--listen", ep, "--tap", TAP)),
        name="switch",
        log_path=str(tmp_path / "switch.log"),
    )
    try:
        try:
            with SwitchClient(ep) as c:
                st = c.stats(timeout_s=TIMEOUT)
        except TimeoutError:
            log = (tmp_path / "switch.log").read_text()
            skip_or_fail(f"the switch could not open a TAP in {ns.name}: {log.strip()}")
        assert f"tap:{TAP}" in by_name(st)
        ns.run(["ip", "addr", "add", "10.99.0.1/24", "dev", TAP])
        ns.run(["ip", "link", "set", TAP, "up"])
        yield ep, proc
    finally:
        proc.close()


def linux_mac(ns: NetNamespace) -> bytes:
    out = ns.run(["ip", "-j", "link", "show", TAP]).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


def arp_request(src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    # RFC 826: htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4, op 1 (request)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src_mac + src_ip + bytes(6) + target_ip
    return BCAST + src_mac + b"\x08\x06" + arp.ljust(46, b"\0")


def udp_frame(
    dst_mac: bytes, src_mac: bytes, sport: int, dport: int, payload: bytes
) -> tuple[NetHdr, bytes]:
    """IPv4/UDP from OUR_IP to LINUX_IP with a partial checksum (NEEDS_CSUM, §5.1.6.2)."""
    ulen = 8 + len(payload)
    ip = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 1, 0x4000, 64, 17, 0, OUR_IP, LINUX_IP)
    )
    ip[10:12] = struct.pack("!H", inet_checksum(ip))
    udp = struct.pack("!HHHH", sport, dport, ulen, ipv4_pseudo_sum(OUR_IP, LINUX_IP, 17, ulen))
    hdr = NetHdr(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    return hdr, dst_mac + src_mac + b"\x08\x00" + bytes(ip) + udp + payload


def tcp_superframe(
    dst_mac: bytes, src_mac: bytes, *, seq: int, payload: bytes, mss: int
) -> tuple[NetHdr, bytes]:
    """An IPv4/TCP super-frame from OUR_IP:40000 to LINUX_IP:7 (PSH, no ACK) for TSO:
    GSO_TCPV4, NEEDS_CSUM, the pseudo-header sum in the checksum field (§5.1.6.2)."""
    tlen = 20 + len(payload)
    ip = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tlen, 9, 0x4000, 64, 6, 0, OUR_IP, LINUX_IP)
    )
    ip[10:12] = struct.pack("!H", inet_checksum(ip))
    partial = ipv4_pseudo_sum(OUR_IP, LINUX_IP, 6, tlen)
    tcp = struct.pack("!HHIIBBHHH", 40000, 7, seq, 0, 5 << 4, 0x08, 65535, partial, 0)
    hdr = NetHdr(
        flags=HDR_F_NEEDS_CSUM,
        gso_type=GSO_TCPV4,
        hdr_len=54,
        gso_size=mss,
        csum_start=34,
        csum_offset=16,
    )
    return hdr, dst_mac + src_mac + b"\x08\x00" + bytes(ip) + tcp + payload


_UDP_PEER = """
import select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.99.0.1", 9999))
print("ready", flush=True)
if not select.select([s], [], [], float(sys.argv[1]))[0]:
    print("timeout", flush=True)
    sys.exit(1)
data, addr = s.recvfrom(65535)
print(data.hex(), addr[0], addr[1], flush=True)
s.sendto(b"pong:" + data, addr)
"""


def start_peer(ns: NetNamespace) -> subprocess.Popen[str]:
    """A native UDP socket on 10.99.0.1:9999 in ``ns``: answers one datagram."""
    return subprocess.Popen(
        ns.argv([sys.executable, "-c", _UDP_PEER, str(TIMEOUT)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _readline(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    remaining = deadline - monotonic()
    if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
        raise AssertionError("the UDP peer in the namespace said nothing in time")
    return proc.stdout.readline().strip()


# --------------------------------------------------------------------------- tests


def test_linux_answers_our_arp_request_through_the_tap(
    ns: NetNamespace, tap_switch: tuple[str, DeviceProcess], loop: EventLoop
) -> None:
    ep, _ = tap_switch
    a = Port(loop, ep, 1, accepts=frozenset())
    try:
        run_until(loop, lambda: bool(a.sink.link), "link up")
        a.send(arp_request(a.mac, OUR_IP, LINUX_IP))

        def replied() -> bool:
            return any(
                f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" for _, f in a.sink.frames
            )

        run_until(loop, replied, "Linux's ARP reply")
    finally:
        a.backend.close()
    reply = next(f for _, f in a.sink.frames if f[12:14] == b"\x08\x06")
    tap_mac = linux_mac(ns)
    assert reply[0:6] == a.mac and reply[6:12] == tap_mac
    assert reply[22:28] == tap_mac and reply[28:32] == LINUX_IP  # sender: Linux
    assert reply[32:38] == a.mac and reply[38:42] == OUR_IP  # target: us
    st = stats(ep)
    tap = by_name(st)[f"tap:{TAP}"]
    assert tap["tx_frames"] >= 1 and tap["rx_frames"] >= 1
    assert st["tap"]["tap_tx_frames"] >= 1 and st["tap"]["tap_rx_frames"] >= 1


def test_a_needs_csum_udp_frame_reaches_a_native_socket_and_the_reply_comes_back(
    ns: NetNamespace, tap_switch: tuple[str, DeviceProcess], loop: EventLoop, tmp_path: Path
) -> None:
    ep, _ = tap_switch
    a = Port(loop, ep, 1, accepts=frozenset())  # the switch must finish Linux's offloads
    peer: subprocess.Popen[str] | None = None
    try:
        run_until(loop, lambda: bool(a.sink.link), "link up")
        tap_mac = linux_mac(ns)
        ns.run(["ip", "neigh", "replace", "10.99.0.2", "lladdr", a.mac.hex(":"), "dev", TAP])
        peer = start_peer(ns)
        deadline = monotonic() + TIMEOUT
        assert _readline(peer, deadline) == "ready"
        hdr, frame = udp_frame(tap_mac, a.mac, 4321, 9999, b"ping-through-the-tap")
        a.send(frame, hdr)  # crosses the switch as it is: the TAP port takes "csum"
        assert _readline(peer, deadline) == f"{b'ping-through-the-tap'.hex()} 10.99.0.2 4321"

        def pong() -> bool:
            return any(f[12:14] == b"\x08\x00" and f[23] == 17 for _, f in a.sink.frames)

        run_until(loop, pong, "the UDP reply")
        assert peer.wait(TIMEOUT) == 0
    finally:
        if peer is not None:
            peer.kill()
            peer.wait()
            assert peer.stdout is not None
            peer.stdout.close()
        a.backend.close()
    h, f = next((h, f) for h, f in a.sink.frames if f[12:14] == b"\x08\x00")
    assert f[0:6] == a.mac and f[6:12] == tap_mac
    assert f[26:30] == LINUX_IP and f[30:34] == OUR_IP
    assert f[42:] == b"pong:ping-through-the-tap"
    assert h.flags == 0  # a port without "csum" gets a finished frame...
    udp = f[34:]
    assert inet_checksum(udp, ipv4_pseudo_sum(LINUX_IP, OUR_IP, 17, len(udp))) == 0  # ...valid
    st = stats(ep)
    assert st["tap"]["tap_offload_changes"] == 1  # TUN_F_CSUM|TUN_F_TSO4 were set
    assert st["switch"]["checksummed"] >= 1  # Linux left the checksum to us (offloaded)
    assert st["switch"]["bad_hdr"] == 0 and st["switch"]["offload_errors"] == 0


def test_a_port_that_takes_offloads_gets_linux_partial_checksums_unchanged(
    ns: NetNamespace, tap_switch: tuple[str, DeviceProcess], loop: EventLoop, tmp_path: Path
) -> None:
    ep, _ = tap_switch
    a = Port(loop, ep, 1)  # accepts csum + tso4
    peer: subprocess.Popen[str] | None = None
    try:
        run_until(loop, lambda: bool(a.sink.link), "link up")
        tap_mac = linux_mac(ns)
        ns.run(["ip", "neigh", "replace", "10.99.0.2", "lladdr", a.mac.hex(":"), "dev", TAP])
        peer = start_peer(ns)
        deadline = monotonic() + TIMEOUT
        assert _readline(peer, deadline) == "ready"
        hdr, frame = udp_frame(tap_mac, a.mac, 4321, 9999, b"x" * 1000)
        a.send(frame, hdr)
        assert _readline(peer, deadline).startswith((b"x" * 4).hex())
        run_until(loop, lambda: any(f[12:14] == b"\x08\x00" for _, f in a.sink.frames), "reply")
        assert peer.wait(TIMEOUT) == 0
    finally:
        if peer is not None:
            peer.kill()
            peer.wait()
            assert peer.stdout is not None
            peer.stdout.close()
        a.backend.close()
    h, f = next((h, f) for h, f in a.sink.frames if f[12:14] == b"\x08\x00")
    assert h.flags & HDR_F_NEEDS_CSUM and h.csum_start == 34 and h.csum_offset == 6
    done = complete_checksum(f, h.csum_start, h.csum_offset)  # what a receiver would do
    udp = done[34:]
    assert udp[8:] == b"pong:" + b"x" * 1000
    assert inet_checksum(udp, ipv4_pseudo_sum(LINUX_IP, OUR_IP, 17, len(udp))) == 0
    assert stats(ep)["switch"]["checksummed"] == 0


def _rx_counters(ns: NetNamespace) -> tuple[int, int]:
    link = json.loads(ns.run(["ip", "-s", "-j", "link", "show", TAP]).stdout)[0]
    rx = link["stats64"]["rx"]
    return int(rx["packets"]), int(rx["bytes"])


def test_a_tso_super_frame_enters_linux_whole(
    ns: NetNamespace, tap_switch: tuple[str, DeviceProcess], loop: EventLoop
) -> None:
    ep, _ = tap_switch
    a = Port(loop, ep, 1)
    try:
        run_until(loop, lambda: bool(a.sink.link), "link up")
        tap_mac = linux_mac(ns)
        ns.run(["ip", "neigh", "replace", "10.99.0.2", "lladdr", a.mac.hex(":"), "dev", TAP])
        payload = bytes(range(256)) * 12  # 3072 bytes: three 1000-byte segments and a bit
        hdr, sf = tcp_superframe(tap_mac, a.mac, seq=1000, payload=payload, mss=1000)
        packets, nbytes = _rx_counters(ns)
        a.send(sf, hdr)

        def rst() -> bool:
            return any(f[12:14] == b"\x08\x00" and f[23] == 6 for _, f in a.sink.frames)

        run_until(loop, rst, "Linux's RST (nobody listens on that port)")
        after = _rx_counters(ns)
    finally:
        a.backend.close()
    assert after == (packets + 1, nbytes + len(sf))  # one write, one frame: not segmented
    _, f = next((h, f) for h, f in a.sink.frames if f[12:14] == b"\x08\x00" and f[23] == 6)
    seq, ack, flags = struct.unpack_from("!IIxB", f, 38)
    # RFC 793 "Reset Generation": to a segment without ACK the RST acknowledges
    # seq + length -- of the whole super-frame: Linux took every byte at once
    assert flags & 0x14 == 0x14  # RST|ACK
    assert ack == 1000 + len(payload)
    assert stats(ep)["switch"]["segmented"] == 0


def _cli(ns: NetNamespace, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return ns.run(argv, check=False, timeout_s=30)


def test_tap_errors_are_one_line_with_status_2(
    ns: NetNamespace, tap_switch: tuple[str, DeviceProcess], rundir: RuntimeDir
) -> None:
    ep2 = rundir.endpoint("sw2")
    busy = _cli(ns, python_argv("vdev.switch", "--listen", ep2, "--tap", TAP))
    not_tap = _cli(ns, python_argv("vdev.switch", "--listen", ep2, "--tap", "lo"))
    net = _cli(
        ns,
        python_argv("vdev", "net", "--backend", "tap", "--ifname", "lo", "--control", ep2),
    )
    for r, says in ((busy, "busy"), (not_tap, "not a TAP"), (net, "not a TAP")):
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
    assert not os.path.exists(ep2[len("ipc://") :])
    stats(tap_switch[0])  # the first switch and its TAP are untouched


def test_without_permission_the_tap_backend_fails_in_one_line(
    ns: NetNamespace, rundir: RuntimeDir
) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop root for this test")
    nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    if ns.run([*nobody, sys.executable, "-c", "pass"], check=False).returncode != 0:
        pytest.skip("this Python cannot run as an unprivileged user here")
    ep = rundir.endpoint("ctl")
    r = ns.run(
        [
            *nobody,
            *python_argv("vdev", "net", "--backend", "tap", "--ifname", TAP, "--control", ep),
        ],
        check=False,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "permission denied" in r.stderr and "CAP_NET_ADMIN" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert TAP not in ns.run(["ip", "link"]).stdout


# --------------------------------------------------------------------------- the CI rule


def test_require_skips_normally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    require(True, "never")
    with pytest.raises(pytest.skip.Exception, match="no widget"):
        require(False, "no widget")
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="required under CI: no widget"):
        require(False, "no widget")
    with pytest.raises(pytest.fail.Exception, match="required under CI: gone"):
        skip_or_fail("gone")
