"""Our kernel's network stack against Linux's, over a TAP inside a network namespace.

Theory of operation
-------------------
The network rule: nothing here touches the host's own interfaces. Each test makes a
namespace ``vlabtest-<pid>-<hex>`` (:mod:`hostops.netns`) and runs *our kernel* inside
it: ``ip netns exec NS python tests/integration/nspeer.py kernel SPEC PORT`` boots
``kernel.Net(backend="tap", ifname="vlt0", ip="10.99.0.2/24", offload=...)``, whose
device process opens ``/dev/net/tun`` and so creates the TAP in the namespace. Linux
gets ``10.99.0.1/24`` on ``vlt0``. Everything Linux-side runs in the namespace too: its
``ping``, ``ip neigh``, a native UDP socket (``nspeer.py native``), ``tshark`` capturing
on ``vlt0``. The kernel peer and the native peer are driven by JSON lines (send,
recv, stats), every answer awaited with a deadline.

What is checked:

* Linux's ``ping`` (56 bytes, and 4000 bytes: fragmented both ways) gets its replies;
  Linux learned the kernel's MAC from the kernel's ARP reply (``ip neigh`` shows it
  REACHABLE or STALE) while the kernel, which learned Linux's from the request (RFC 826),
  never had to ask.
* A native socket and a ``k.sys`` socket exchange datagrams both ways at 1, 1472 (the
  largest unfragmented at MTU 1500), 1473 (two fragments) and 65507 bytes (the largest,
  45 fragments), data and addresses checked; Linux's own counters
  (``/proc/net/snmp`` in the namespace) show every datagram in and no checksum error.
* ``tshark -i vlt0`` records all of it (to a file, then decoded with ``tshark -r``):
  every frame well-formed, the kernel's ARP reply there, exactly the expected number of
  UDP frames from each side, and every IPv4 header checksum of the kernel's frames
  correct. UDP checksums, honestly: a datagram the kernel sent *unfragmented* with
  offloads on (CSUM negotiated) leaves the driver as ``NEEDS_CSUM`` with csum_start 34,
  csum_offset 6 and only the pseudo-header sum in the field (virtio §5.1.6.2); the TAP
  hands Linux that header, and Linux treats the packet as CHECKSUM_PARTIAL — the frame
  a packet socket sees on the TAP still carries the partial sum, which tshark, knowing
  nothing of the virtio header, calls "bad". For those frames the test asserts exactly
  that the field holds the pseudo-header sum of that datagram (nothing else would be
  correct) and that Linux accepted them (data received, ``InCsumErrors`` 0). Fragmented
  datagrams are always checksummed in software (an offload cannot span fragments):
  tshark must verify them "good" after reassembly. With ``offload=False`` nothing is
  offloaded and every checksum of the kernel's frames must be "good" — and Linux's
  too, since without GUEST_CSUM the backend gives Linux no ``TUN_F_CSUM`` (with it,
  Linux's unfragmented frames may be partial: judged only by the same exact rule).
  HOST_TSO4 is negotiated with offloads on, but this stack has no TCP yet, so no GSO
  frame is sent (``tx_gso_frames`` 0): TSO through a TAP is covered by
  ``test_tap.py``.

Teardown (also on failure): the peers get ``quit`` (the kernel shuts down, its device
process exits, the TAP goes with its fd), tshark is stopped, the namespace must hold no
process any more (``ip netns pids``), then it is deleted; the session fixture in
``tests/conftest.py`` checks that no namespace and no host-side TAP of this run remain.
Without root, ``ip``, ``/dev/net/tun``, ``ping`` or ``tshark`` the tests skip saying so
(and fail under ``VLAB_REQUIRE_INTEROP=1``).
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from test_net_pcap_kernel import (  # same directory (rootdir-relative)
    CSUM_BAD,
    CSUM_GOOD,
    flag,
    frames_for,
    ip4,
    parse_row,
    tshark,
    tshark_fields_argv,
    tshark_rows,
)

from hostops import netns
from hostops.clock import monotonic
from hostops.netns import NetNamespace
from tests.interop_require import require, skip_or_fail
from vdev.virtio.packet import ipv4_pseudo_sum

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TIMEOUT = 10.0
STARTUP_TIMEOUT = 30.0
NSPEER = Path(__file__).with_name("nspeer.py")
TAP = "vlt0"
LINUX_IP, KIP = "10.99.0.1", "10.99.0.2"
KPORT, LPORT = 7000, 9999
SIZES = (1, 1472, 1473, 65507)
#: Frame fields tshark prints while it captures (just enough to see progress).
LIVE_FIELDS = ("frame.number", "eth.src", "ip.proto")


# --------------------------------------------------------------------------- plumbing


class Lines:
    """Lines from a child's pipe, each awaited with a deadline (never a blind read)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._fd = stream.fileno()
        self._buf = b""
        self.eof = False

    def readline(self, timeout_s: float) -> str | None:
        """The next line (without its newline); None at end of file;
        ``TimeoutError`` if none is complete within ``timeout_s``."""
        deadline = monotonic() + timeout_s
        while b"\n" not in self._buf:  # each turn reads data, or ends
            if self.eof:
                rest, self._buf = self._buf, b""
                return rest.decode() if rest else None
            left = deadline - monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                raise TimeoutError("no complete line in time")
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                self.eof = True
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()


class Peer:
    """``nspeer.py`` in the namespace, driven by JSON lines (see its docstring)."""

    def __init__(self, ns: NetNamespace, what: str, args: list[str], log: Path) -> None:
        self.what = what
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                ns.argv([sys.executable, str(NSPEER), *args]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert self.proc.stdout is not None
        self._out = Lines(self.proc.stdout)
        self.hello: dict[str, Any] = {}

    def start(self) -> dict[str, Any]:
        """Wait for the peer's first line (``ready`` or ``error``)."""
        self.hello = self._answer(STARTUP_TIMEOUT)
        return self.hello

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._out.readline(timeout_s)
        except TimeoutError:
            raise AssertionError(f"the {self.what} said nothing in {timeout_s} s") from None
        if line is None:
            self.proc.wait(TIMEOUT)
            raise AssertionError(
                f"the {self.what} exited with {self.proc.returncode}: "
                f"{self.log.read_text().strip()[-2000:]}"
            )
        out: dict[str, Any] = json.loads(line)
        return out

    def call(self, timeout_s: float = TIMEOUT, **cmd: Any) -> dict[str, Any]:
        """Send one command, return its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        return self._answer(timeout_s)

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        """Send one datagram from the peer's socket."""
        r = self.call(op="send", data=data.hex(), to=list(to))
        assert r.get("sent") == len(data), (self.what, r)

    def recv(self) -> tuple[bytes, tuple[str, int]]:
        """Receive one datagram on the peer's socket (within :data:`TIMEOUT`)."""
        r = self.call(TIMEOUT + 5, op="recv", timeout=TIMEOUT)
        assert "data" in r, (self.what, r)
        return bytes.fromhex(r["data"]), (r["from"][0], int(r["from"][1]))

    def close(self) -> None:
        """``quit``, then wait; kill it if it does not go."""
        try:
            if self.proc.poll() is None:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None and not pipe.closed:
                    pipe.close()


class Capture:
    """``tshark -i vlt0`` in the namespace, writing a pcap file and printing a short
    line per frame so that the test knows what has been captured so far.
    ``-a duration`` bounds it even if nobody stopped it."""

    def __init__(self, ns: NetNamespace, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, str]] = []
        argv = [tshark(), "-i", TAP, "-l", "-w", str(path), "-F", "pcap", "-P"]
        argv += ["-a", "duration:80", *tshark_fields_argv(LIVE_FIELDS)]
        self.proc = subprocess.Popen(
            ns.argv(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._out = Lines(self.proc.stdout)
        # tshark says "Capture started." once dumpcap's socket is open (before that, a
        # frame would be missed); "Capturing on" comes earlier and does not promise it
        said: list[str] = []
        err = Lines(self.proc.stderr)
        deadline = monotonic() + STARTUP_TIMEOUT
        for _ in range(100):
            try:
                line = err.readline(max(0.0, deadline - monotonic()))
            except TimeoutError:
                line = None
            if line is None:
                self.stop()
                raise AssertionError(f"tshark did not start capturing: {said}")
            said.append(line)
            if "Capture started" in line:
                break

    def wait_for(self, done: Callable[[list[dict[str, str]]], bool], what: str) -> None:
        """Read frame lines until ``done(rows)`` holds (or fail after :data:`TIMEOUT`)."""
        deadline = monotonic() + TIMEOUT
        while not done(self.rows):
            try:
                line = self._out.readline(max(0.0, deadline - monotonic()))
            except TimeoutError:
                line = None
            assert line is not None, f"tshark did not see {what}: {len(self.rows)} frames"
            self.rows.append(parse_row(line, LIVE_FIELDS))

    def stop(self) -> None:
        """Stop tshark (SIGTERM to the process we started: it ends the capture and
        its dumpcap and closes the file) and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


def snmp(ns: NetNamespace) -> dict[str, dict[str, int]]:
    """Linux's ``/proc/net/snmp`` in the namespace: ``{"Udp": {"InDatagrams": n}, ...}``."""
    text = ns.run(["cat", "/proc/net/snmp"]).stdout
    out: dict[str, dict[str, int]] = {}
    lines = text.splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        proto, _, keys = names.partition(": ")
        out[proto] = dict(zip(keys.split(), map(int, values.split(": ")[1].split()), strict=True))
    return out


def delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], key: str) -> int:
    """How much ``Proto.Name`` (``"Udp.InDatagrams"``) grew."""
    proto, name = key.split(".")
    return after[proto][name] - before[proto][name]


def ip_cmd() -> str:
    """iproute2's ``ip`` (also where a PATH without sbin does not look)."""
    ip = shutil.which("ip", path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin:/bin")
    assert ip is not None, "checked by hostops.netns.unavailable()"
    return ip


def ns_pids(space: NetNamespace) -> list[str]:
    """The processes inside ``space`` (``ip netns pids``, asked from outside it)."""
    r = subprocess.run(
        [ip_cmd(), "netns", "pids", space.name], capture_output=True, text=True, timeout=TIMEOUT
    )
    return r.stdout.split()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def no_namespace_left() -> Iterator[None]:
    """Every namespace this module made is gone at its end."""
    netns.sweep_stale_namespaces()
    mine = f"{netns.DEFAULT_PREFIX}-{os.getpid()}-"
    before = {n for n in netns.list_namespaces() if n.startswith(mine)}
    yield
    left = [n for n in netns.list_namespaces() if n.startswith(mine) and n not in before]
    assert not left, f"network namespaces left behind: {left}"


@pytest.fixture
def ns() -> Iterator[NetNamespace]:
    """A fresh namespace; afterwards no process may be left in it, then it is deleted."""
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
        assert not ns_pids(space), f"processes left in {space.name}: {ns_pids(space)}"
    finally:
        space.delete()


class KernelOnTap:
    """Our kernel in ``ns`` on a TAP, Linux's side configured."""

    def __init__(self, ns: NetNamespace, peer: Peer) -> None:
        self.ns = ns
        self.peer = peer
        self.mac: str = peer.hello["mac"]
        self.features: list[str] = peer.hello["features"]

    def stats(self) -> dict[str, Any]:
        """The kernel's ``stack``, ``link`` and ``device`` counters."""
        return self.peer.call(op="stats")


def _kernel_on_tap(ns: NetNamespace, tmp_path: Path, offload: bool) -> Iterator[KernelOnTap]:
    spec = {"backend": "tap", "ifname": TAP, "ip": f"{KIP}/24", "offload": offload}
    peer = Peer(ns, "kernel", ["kernel", json.dumps(spec), str(KPORT)], tmp_path / "kernel.log")
    try:
        hello = peer.start()
        if "error" in hello:
            skip_or_fail(f"our kernel could not open a TAP in {ns.name}: {hello['error']}")
        ns.run([ip_cmd(), "addr", "add", f"{LINUX_IP}/24", "dev", TAP])
        ns.run([ip_cmd(), "link", "set", TAP, "up"])
        yield KernelOnTap(ns, peer)
    finally:
        peer.close()
    assert peer.proc.returncode == 0, peer.log.read_text()
    gone = ns.run([ip_cmd(), "link", "show", TAP], check=False)
    assert gone.returncode != 0, f"{TAP} outlived the kernel: {gone.stdout}"


@pytest.fixture
def kernel_on_tap(ns: NetNamespace, tmp_path: Path) -> Iterator[KernelOnTap]:
    """Our kernel on a TAP in ``ns`` with offloads (the default)."""
    yield from _kernel_on_tap(ns, tmp_path, True)


@pytest.fixture(params=[True, False], ids=["offload", "no-offload"])
def kernel_on_tap_offload(
    ns: NetNamespace, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[KernelOnTap]:
    """Our kernel on a TAP in ``ns``, with and without offloads."""
    yield from _kernel_on_tap(ns, tmp_path, bool(request.param))


@pytest.fixture
def native(ns: NetNamespace, tmp_path: Path) -> Iterator[Peer]:
    """A Linux UDP socket on ``LINUX_IP:LPORT`` in ``ns``."""
    peer = Peer(ns, "native socket", ["native", LINUX_IP, str(LPORT)], tmp_path / "native.log")
    try:
        hello = peer.start()
        assert hello.get("ready"), hello
        yield peer
    finally:
        peer.close()


# --------------------------------------------------------------------------- tests


def test_linux_pings_the_kernel_and_learns_its_mac_from_its_arp_reply(
    kernel_on_tap: KernelOnTap,
) -> None:
    ping = shutil.which("ping")
    require(ping is not None, "ping is not installed (Debian package iputils-ping)")
    assert ping is not None
    k = kernel_on_tap
    ns = k.ns
    before = snmp(ns)
    # -W bounds the wait for each reply; -i 0.2 keeps it short (root may go lower)
    r = ns.run([ping, "-n", "-c", "3", "-i", "0.2", "-W", "5", KIP], check=False, timeout_s=30)
    assert r.returncode == 0 and " 3 received" in r.stdout, r.stdout + r.stderr
    big = ns.run([ping, "-n", "-c", "1", "-s", "4000", "-W", "5", KIP], check=False, timeout_s=30)
    assert big.returncode == 0 and " 1 received" in big.stdout, big.stdout + big.stderr
    assert "4008 bytes from" in big.stdout  # ping checks the echoed data itself
    after = snmp(ns)
    assert delta(before, after, "Icmp.InEchoReps") == 4
    assert delta(before, after, "Icmp.InErrors") == delta(before, after, "Icmp.InCsumErrors") == 0
    assert delta(before, after, "Ip.ReasmOKs") == 1  # the 4000-byte reply, in 3 fragments
    neigh = json.loads(ns.run([ip_cmd(), "-j", "neigh", "show", KIP, "dev", TAP]).stdout)
    assert len(neigh) == 1 and neigh[0]["lladdr"] == k.mac, neigh
    # REACHABLE right after the reply (confirmed for 15..45 s), STALE after that
    assert set(neigh[0]["state"]) & {"REACHABLE", "STALE"}, neigh
    st = k.stats()["stack"]
    assert st["arp_replies_sent"] == 1 and st["arp_requests_sent"] == 0  # RFC 826 merge
    assert st["icmp_echo_replied"] == 4 and st["icmp_bad_checksum"] == 0
    assert st["ip_frag_reassembled"] == 1 and st["ip_frags_sent"] == 3
    assert st["ip_bad_checksum"] == st["rx_bad_frames"] == 0


def _expected_frames(sizes: tuple[int, ...]) -> int:
    return sum(frames_for(n) for n in sizes)


def test_udp_both_ways_with_a_native_socket_and_tshark_checks_the_frames(
    kernel_on_tap_offload: KernelOnTap, native: Peer, tmp_path: Path
) -> None:
    k = kernel_on_tap_offload
    ns = k.ns
    offload = "CSUM" in k.features
    if offload:
        assert {"CSUM", "HOST_TSO4", "GUEST_CSUM"} <= set(k.features), k.features
    else:
        assert not {"CSUM", "HOST_TSO4", "GUEST_CSUM", "GUEST_TSO4"} & set(k.features)
    cap = Capture(ns, tmp_path / "tap.pcap")
    try:
        before = snmp(ns)
        rng = random.Random(1473)
        for n in SIZES:
            data = rng.randbytes(n)
            native.send(data, (KIP, KPORT))
            assert k.peer.recv() == (data, (LINUX_IP, LPORT)), n
            data = rng.randbytes(n)
            k.peer.send(data, (LINUX_IP, LPORT))
            assert native.recv() == (data, (KIP, KPORT)), n
        after = snmp(ns)
        want = _expected_frames(SIZES)

        def all_udp(rows: list[dict[str, str]]) -> bool:
            mine = sum(1 for r in rows if r["eth.src"] == k.mac and r["ip.proto"] == "17")
            theirs = sum(1 for r in rows if r["eth.src"] != k.mac and r["ip.proto"] == "17")
            return mine >= want and theirs >= want

        cap.wait_for(all_udp, f"{want} UDP frames each way")
    finally:
        cap.stop()
    counters = k.stats()

    # Linux took every datagram, none with a bad checksum
    assert delta(before, after, "Udp.InDatagrams") == len(SIZES)
    assert delta(before, after, "Udp.InCsumErrors") == delta(before, after, "Udp.InErrors") == 0
    assert delta(before, after, "Ip.ReasmOKs") == 2  # 1473 and 65507 bytes
    assert delta(before, after, "Ip.InHdrErrors") == 0
    # ...and so did the kernel
    st, link, dev = counters["stack"], counters["link"], counters["device"]
    assert st["udp_rx_datagrams"] == st["udp_tx_datagrams"] == len(SIZES)
    assert st["udp_bad_checksum"] == st["ip_bad_checksum"] == st["rx_bad_frames"] == 0
    assert st["ip_frag_reassembled"] == 2
    assert link["tx_csum_offloaded"] == (2 if offload else 0)  # the unfragmented two
    assert link["tx_gso_frames"] == 0  # no TCP in this stack yet: TSO unused
    assert dev.get("tap_tx_errors", 0) == dev.get("tap_rx_dropped", 0) == 0
    assert dev.get("tx_csum_completed", 0) == 0  # the TAP takes partial checksums as-is
    assert dev.get("tap_offload_changes", 0) == (1 if offload else 0)  # TUN_F_CSUM|TSO4

    rows = tshark_rows(cap.path)
    assert len(rows) >= len(cap.rows)
    assert not [r for r in rows if r["_ws.malformed"]], "tshark found malformed frames"
    mine = [r for r in rows if r["eth.src"] == k.mac]
    theirs = [r for r in rows if r["eth.src"] != k.mac]
    # the kernel answered Linux's ARP request
    assert any(
        (r["arp.opcode"], r["arp.src.hw_mac"], r["arp.src.proto_ipv4"]) == ("2", k.mac, KIP)
        for r in mine
    ), "no ARP reply from the kernel in the capture"
    my_udp = [r for r in mine if r["ip.proto"] == "17"]
    their_udp = [r for r in theirs if r["ip.proto"] == "17"]
    assert len(my_udp) == len(their_udp) == _expected_frames(SIZES)
    assert all(r["ip.checksum.status"] == CSUM_GOOD for r in mine if r["ip.proto"])
    assert all((r["ip.src"], r["ip.dst"]) == (KIP, LINUX_IP) for r in my_udp)
    # the kernel: partial exactly when it offloaded; Linux: partial only if allowed
    _check_udp_checksums(my_udp, KIP, LINUX_IP, unfragmented="partial" if offload else "good")
    _check_udp_checksums(their_udp, LINUX_IP, KIP, unfragmented="any" if offload else "good")


def _check_udp_checksums(
    rows: list[dict[str, str]], src: str, dst: str, *, unfragmented: str
) -> None:
    """The datagrams' UDP checksums as tshark judged them (see the module docstring).
    Fragmented: good after reassembly. Unfragmented: ``"good"``; ``"partial"``: exactly
    the pseudo-header sum a NEEDS_CSUM frame carries (virtio §5.1.6.2), which tshark
    calls bad; ``"any"``: one or the other."""
    whole = [r for r in rows if r["udp.length"]]  # the frame that completes a datagram
    assert [int(r["udp.length"]) for r in whole] == [n + 8 for n in SIZES]
    for r, n in zip(whole, SIZES, strict=True):
        verdict = r["udp.checksum.status"]
        fragmented = int(r["ip.frag_offset"] or 0) > 0 or flag(r["ip.flags.mf"])
        partial = ipv4_pseudo_sum(ip4(src), ip4(dst), 17, n + 8)
        is_partial = verdict == CSUM_BAD and int(r["udp.checksum"], 16) == partial
        if fragmented or unfragmented == "good":
            assert verdict == CSUM_GOOD, f"{src} sent {n} bytes: {r}"
        elif unfragmented == "partial":
            assert is_partial, f"{src} sent {n} bytes, not with a partial checksum: {r}"
        else:
            assert verdict == CSUM_GOOD or is_partial, f"{src} sent {n} bytes: {r}"
