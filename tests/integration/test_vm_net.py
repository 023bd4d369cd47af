"""Linux's own ``virtio_net`` on our net device over vhost-user, Linux guests on our switch.

A guest is ``tools.vm.Guest(net=GuestNet(switch=EP, ip=...))``: QEMU (TCG) with
``-netdev vhost-user`` whose back-end is ``python -m vdev net --vhost-user SOCK --backend
switch --switch EP``, one port of the switch at EP. The module's *lab* is one switch,
one of our kernels on it (``kernel.Net(backend="switch")``, 10.0.0.1) and one guest
(10.0.0.2); when network namespaces can be made, the switch runs inside one with a TAP
port whose Linux side is 10.0.0.254 (so the TAP test needs no guest of its own). The
tests:

* the guest and the kernel ping each other, the guest's busybox ``traceroute`` (UDP
  probes) ends at the kernel, which answers ICMP port unreachable; the kernel's device
  and the switch count the guest's frames; the features the guest's driver negotiated
  are in its back-end's log;
* two guests of their own (offloads on, then off): one serves a 20 MiB file with busybox
  ``httpd``, the other ``wget``\\ s it; the sha256 sums match; with offloads the frames
  cross the switch unsegmented (GSO, the back-ends' ``tx_gso_frames``/``rx_gso_frames``
  and the port counters), without them every frame is wire-sized;
* the net back-end is SIGKILLed under the running guest and started again on the same
  socket: QEMU (``reconnect=1``) reattaches and the guest's ping resumes;
* Linux's ``ping`` inside the namespace reaches the guest through the switch's TAP;
* ``vlab vm --net EP --ip ... --run 'ping -c 3 10.0.0.1'`` from the command line;
* (no QEMU) ``Device.complete_many`` publishes ``used.idx`` once, after every element.

Without QEMU, busybox-static or the guest kernel (``vlab vm --setup``) the guest tests
skip saying why (and fail under ``VLAB_REQUIRE_INTEROP=1``); so does the TAP test
without root, ``ip`` or ``/dev/net/tun``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import kernel
from hostops import netns
from hostops.netns import NetNamespace
from hostops.rundir import RuntimeDir
from tests.interop_require import skip_or_fail
from tools.vm import (
    Guest,
    GuestError,
    GuestNet,
    MissingPrerequisite,
    NetBackendProcess,
    Switch,
    check_prerequisites,
    start_all,
)
from vdev import PENDING, Chain, Device, Pending
from vdev.session import DeviceSession, Ring
from vdev.virtio import DriverQueue, F, FlatMemory, RingLayout, UsageError, bit
from vdev.virtio.constants import NetF

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KERNEL_IP = "10.0.0.1"
GUEST_IP = "10.0.0.2"
LINUX_IP = "10.0.0.254"  # the namespace's side of the TAP
TAP = "vlt0"
FILE_SIZE = 20 << 20
ETH_FRAME_MAX = 1514  # MTU 1500 + Ethernet header: the largest frame on a real wire


# --------------------------------------------------------------------------- the lab


@functools.cache
def _missing() -> str | None:
    try:
        check_prerequisites(None, net=True)
    except MissingPrerequisite as e:
        return str(e)
    return None


def _require_guest() -> None:
    why = _missing()
    if why is not None:
        skip_or_fail(why)


@dataclass
class Lab:
    """The module's switch, kernel and guest (see the module docstring)."""

    logs: Path
    switch: Switch
    k: kernel.Kernel
    guest: Guest
    ns: NetNamespace | None
    ns_problem: str  # why there is no namespace / TAP ("" when there is)

    @property
    def endpoint(self) -> str:
        return self.switch.endpoint


def _tap_namespace(ns: NetNamespace) -> None:
    """Linux's side of the TAP: 10.0.0.254/24, IPv6 off (no chatter on the switch)."""
    ns.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{TAP}.disable_ipv6=1"], check=False)
    ns.run(["ip", "addr", "add", f"{LINUX_IP}/24", "dev", TAP])
    ns.run(["ip", "link", "set", TAP, "up"])


def _start_switch(
    stack: contextlib.ExitStack, rd: RuntimeDir, logs: Path
) -> tuple[Switch, NetNamespace | None, str]:
    """The switch: inside a fresh namespace with a TAP port if possible, else plain."""
    problem = netns.unavailable() or ("" if os.path.exists("/dev/net/tun") else "no /dev/net/tun")
    ns: NetNamespace | None = None
    if not problem:
        try:
            ns = NetNamespace.create()
        except OSError as e:
            problem = f"cannot create a network namespace: {e}"
    if ns is not None:
        stack.callback(ns.delete)
        sw = Switch(rd.endpoint("sw"), str(logs / "switch.log"), tap=TAP, wrap=ns.argv)
        try:
            sw.start()
        except GuestError as e:
            problem = f"the switch could not open a TAP in {ns.name}: {e}"
        else:
            stack.callback(sw.stop)
            _tap_namespace(ns)
            return sw, ns, ""
    sw = Switch(rd.endpoint("sw"), str(logs / "switch-plain.log"))
    sw.start()
    stack.callback(sw.stop)
    return sw, None, problem


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _require_guest()
    netns.sweep_stale_namespaces()
    logs = tmp_path_factory.mktemp("vm-net")
    rd = RuntimeDir.create()
    with contextlib.ExitStack() as stack:
        stack.callback(rd.cleanup)
        sw, ns, problem = _start_switch(stack, rd, logs)
        spec = kernel.Net(backend="switch", switch=sw.endpoint, ip=f"{KERNEL_IP}/24")
        k = stack.enter_context(kernel.boot(devices=[spec]))
        g = Guest(
            net=GuestNet(switch=sw.endpoint, ip=f"{GUEST_IP}/24"), log_dir=str(logs / "guest")
        )
        os.makedirs(logs / "guest")
        stack.enter_context(g)
        yield Lab(logs, sw, k, g, ns, problem)


def _port(stats: dict[str, Any], mac: str) -> dict[str, Any]:
    """The switch's port whose registered MAC is ``mac``."""
    found = [p for p in stats["ports"] if p["mac"] == mac]
    assert len(found) == 1, (mac, stats["ports"])
    port: dict[str, Any] = found[0]
    return port


def _bits(*names: str) -> int:
    return sum(bit(NetF[n]) for n in names)


#: What Linux's virtio_net negotiates with offloads on, of what the back-end sees
#: (QEMU keeps MAC and STATUS: they are its own config space).
OFFLOADS = _bits("CSUM", "GUEST_CSUM", "HOST_TSO4", "GUEST_TSO4")
ALWAYS = _bits("MRG_RXBUF", "MTU") | bit(F.VERSION_1) | bit(F.EVENT_IDX)


# --------------------------------------------------------------------------- guest + kernel


def test_guest_and_kernel_ping_each_other_and_traceroute_ends_at_the_kernel(lab: Lab) -> None:
    g, k = lab.guest, lab.k
    dev = k.devices[0]
    assert g.mac is not None and g.net_backend is not None
    before = _port(lab.switch.stats(), g.mac)
    rx_before = dev.rx_frames
    r = g.run(f"ping -c 3 -W 5 {KERNEL_IP}", timeout=60)
    assert r.status == 0 and "3 packets received" in r.output, r.output
    rtts = k.sys.ping(GUEST_IP, count=3, timeout=5.0)
    assert len(rtts) == 3 and all(t > 0 for t in rtts)
    # busybox traceroute: UDP probes to ports 33434.. with TTL 1, 2, ...; the kernel is
    # on the same link, so the first probe reaches it and its ICMP port unreachable ends
    # the trace at hop 1 (RFC 792 type 3 code 3, the probe quoted)
    r = g.run(f"traceroute -n -m 5 -q 1 -w 5 {KERNEL_IP}", timeout=90)
    assert r.status == 0, r.output
    hops = re.findall(r"^\s*(\d+)\s+(\S+)", r.output, re.M)
    assert hops == [("1", KERNEL_IP)], r.output
    st = k.net.stats
    assert st["udp_no_port"] >= 1 and st["icmp_unreach_sent"] >= 1, st
    # the kernel's device and the switch counted the guest's frames
    assert dev.rx_frames >= rx_before + 3 + 3 + 1  # echo requests, replies, the probe
    after = _port(lab.switch.stats(), g.mac)
    assert after["rx_frames"] >= before["rx_frames"] + 7, (before, after)
    assert after["tx_frames"] >= before["tx_frames"] + 7, (before, after)
    assert after["name"] == f"net-{g.net_backend.pid}"
    # what the guest's driver negotiated, as the back-end logged it
    offered = g.net_backend.offered_features()
    acked = g.net_backend.negotiated_features()
    assert offered is not None and acked is not None
    assert acked & ~offered == 0, f"acked {acked:#x} beyond offered {offered:#x}"
    assert acked & (OFFLOADS | ALWAYS) == OFFLOADS | ALWAYS, f"{acked:#x}"
    assert "NET_SET_MTU 1500" in g.net_backend.log_text()
    r = g.run("cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu /sys/class/net/eth0/carrier")
    assert r.output.split() == [g.mac, "1500", "1"], r.output


# --------------------------------------------------------------------------- two guests


@pytest.mark.parametrize("offload", [True, False], ids=["offload-on", "offload-off"])
def test_http_transfer_between_two_guests(lab: Lab, offload: bool, tmp_path: Path) -> None:
    server_ip, client_ip = ("10.0.0.11", "10.0.0.12") if offload else ("10.0.0.21", "10.0.0.22")
    guests = []
    for name, ip in (("server", server_ip), ("client", client_ip)):
        os.makedirs(tmp_path / name)
        net = GuestNet(switch=lab.endpoint, ip=f"{ip}/24", offload=offload)
        guests.append(Guest(net=net, log_dir=str(tmp_path / name)))
    server, client = guests
    start_all(guests)
    try:
        r = server.run(
            "set -e; mkdir -p /tmp/www; "
            f"head -c {FILE_SIZE} /dev/urandom > /tmp/www/big; "
            "httpd -p 80 -h /tmp/www; sha256sum /tmp/www/big",
            timeout=120,
        )
        assert r.status == 0, r.output
        served = r.output.split()[0]
        before = lab.switch.stats()
        r = client.run(
            f"wget -q -O /tmp/big http://{server_ip}/big && sha256sum /tmp/big && wc -c < /tmp/big",
            timeout=240,
        )
        assert r.status == 0, r.output
        got, _, size = r.output.split()
        assert (got, int(size)) == (served, FILE_SIZE)
        after = lab.switch.stats()
    finally:
        for g in guests:
            g.close()  # powers off: each back-end logs its device counters
    backends = [g.net_backend for g in guests]
    assert all(isinstance(b, NetBackendProcess) for b in backends)
    sb, cb = (b for b in backends if b is not None)
    assert server.mac is not None and client.mac is not None
    sp0, sp1 = _port(before, server.mac), _port(after, server.mac)
    cp0, cp1 = _port(before, client.mac), _port(after, client.mac)
    frames = sp1["rx_frames"] - sp0["rx_frames"]
    nbytes = sp1["rx_bytes"] - sp0["rx_bytes"]
    assert nbytes >= FILE_SIZE and cp1["tx_bytes"] - cp0["tx_bytes"] >= FILE_SIZE
    s_ctr, c_ctr = sb.device_counters(), cb.device_counters()
    s_feat, c_feat = sb.negotiated_features(), cb.negotiated_features()
    assert s_feat is not None and c_feat is not None
    assert s_ctr["tx_bytes"] >= FILE_SIZE and c_ctr["rx_bytes"] >= FILE_SIZE, (s_ctr, c_ctr)
    assert s_ctr["tx_bad_frames"] == c_ctr["rx_bad_frames"] == c_ctr["rx_dropped_too_big"] == 0
    if offload:
        assert s_feat & OFFLOADS == OFFLOADS and c_feat & OFFLOADS == OFFLOADS
        # TSO super-frames from the server's driver cross the switch as they are: fewer
        # frames than a wire would need, none cut by the switch or by either device
        assert frames * ETH_FRAME_MAX < nbytes, (frames, nbytes)
        assert after["switch"]["segmented"] == before["switch"]["segmented"]
        assert s_ctr["tx_gso_frames"] > 0 and s_ctr["tx_segments"] == 0, s_ctr
        assert c_ctr["rx_gso_frames"] > 0 and c_ctr["rx_segments"] == 0, c_ctr
        assert c_ctr["rx_merged"] > 0, "a 64 KiB frame takes several receive buffers"
    else:
        assert s_feat & OFFLOADS == 0 and c_feat & OFFLOADS == 0
        assert s_feat & ALWAYS == ALWAYS and c_feat & ALWAYS == ALWAYS
        assert frames * ETH_FRAME_MAX >= nbytes, "every frame is wire-sized"
        assert s_ctr["tx_gso_frames"] == s_ctr["tx_csum_offloaded"] == 0, s_ctr
        assert c_ctr["rx_gso_frames"] == 0 and c_ctr["tx_csum_offloaded"] == 0, c_ctr


# --------------------------------------------------------------------------- restart


def test_ping_resumes_after_the_net_backend_is_killed_and_restarted(lab: Lab) -> None:
    g = lab.guest
    nb = g.net_backend
    assert nb is not None
    r = g.run(f"ping -c 1 -W 5 {KERNEL_IP}", timeout=60)
    assert r.status == 0, r.output
    old_pid = nb.pid
    starts = nb.starts
    g.restart_net_backend(kill=True)  # SIGKILL: no goodbye; QEMU sees the socket close
    assert nb.pid != old_pid and nb.starts == starts + 1
    # QEMU redials every second; until then the guest's link is down: try (bounded)
    r = g.run(
        f"i=0; while [ $i -lt 60 ]; do ping -c 1 -W 1 {KERNEL_IP} >/dev/null && break; "
        "i=$((i + 1)); done; echo tries=$i; "
        f"ping -c 3 -W 5 {KERNEL_IP}",
        timeout=120,
    )
    assert r.status == 0 and "3 packets received" in r.output, r.output
    m = re.search(r"tries=(\d+)", r.output)
    assert m is not None and int(m.group(1)) < 60, r.output
    # the new back-end was set up again by QEMU, from where the used rings stood
    text = nb.log_text()
    restarted = text[text.rindex("listening on") :]
    assert "connection 1: device active" in restarted
    assert "NET_SET_MTU 1500" in restarted
    ports = [p for p in lab.switch.stats()["ports"] if p["pid"] == nb.pid]
    assert len(ports) == 1 and ports[0]["mac"] == g.mac and ports[0]["rx_frames"] >= 4, ports


# --------------------------------------------------------------------------- TAP


def test_linux_in_a_namespace_pings_the_guest_through_the_switch_tap(lab: Lab) -> None:
    if lab.ns is None:
        skip_or_fail(lab.ns_problem)
    r = lab.ns.run(["ping", "-c", "3", "-W", "5", GUEST_IP], timeout_s=60, check=False)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
    st = lab.switch.stats()
    assert f"tap:{TAP}" in {p["name"] for p in st["ports"]}
    r2 = lab.guest.run(f"ping -c 1 -W 5 {LINUX_IP}", timeout=60)
    assert r2.status == 0, r2.output


# --------------------------------------------------------------------------- the CLI


def test_vlab_vm_net_runs_ping_from_the_command_line(lab: Lab) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "tools.cli", "vm", "--net", lab.endpoint, "--ip",
         "10.0.0.9/24", "--timeout", "200", "--run", f"ping -c 3 -W 5 {KERNEL_IP}"],
        capture_output=True, text=True, timeout=260,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 packets received" in res.stdout, res.stdout
    assert re.search(r"guest booted in [0-9.]+ s \(eth0 02:[0-9a-f:]+, 10\.0\.0\.9/24", res.stderr)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ip", "10.0.0.2/24"], "--ip and --net-offload need --net"),
        (["--net", "--ip", "10.0.0.2"], "prefix length"),
        (["--net", "--ip", "10.0.0.0/24"], "network's own"),
        (["--net", "tcp://x"], "not an ipc:// endpoint"),
        (["--net", "--net-offload", "maybe"], "invalid choice"),
    ],
)
def test_vlab_vm_net_usage_errors_are_one_line(args: list[str], message: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "tools.cli", "vm", *args, "--run", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr


def test_vlab_vm_net_to_no_switch_is_one_line(tmp_path: Path) -> None:
    _require_guest()
    ep = f"ipc://{tmp_path}/nobody.sock"
    res = subprocess.run(
        [sys.executable, "-m", "tools.cli", "vm", "--net", ep, "--run", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip() == (
        f"vlab: error: no switch listens at {ep} (start one with 'python -m vdev switch "
        f"--listen {ep}', or give no endpoint to start one)"
    )


# --------------------------------------------------------------------------- complete_many


QSIZE = 16


class _Keeper(Device):
    """Keeps every chain; the test completes them."""

    device_id = 0x7E
    name = "keeper"
    num_queues = 1
    max_queue_size = QSIZE

    def __init__(self) -> None:
        super().__init__()
        self.chains: list[Chain] = []

    def handle(self, queue: int, chain: Chain) -> int | Pending:
        self.chains.append(chain)
        return PENDING


class _Transport:
    def __init__(self) -> None:
        self.interrupts = 0

    def interrupt(self, ring: Ring) -> None:
        self.interrupts += 1

    def ring_broken(self, ring: Ring, why: str) -> None:
        raise AssertionError(why)

    def config_interrupt(self) -> None:
        pass


def test_complete_many_shows_every_buffer_with_one_used_idx_store() -> None:
    """What Linux's MRG_RXBUF receive path needs (§5.1.6.4): the used elements of every
    buffer of a frame are in the used ring before ``used.idx`` moves, and it moves once."""
    layout = RingLayout.packed(QSIZE, 0)
    seen: list[int] = []  # used.idx at each barrier of the device

    def barrier() -> None:
        seen.append(int.from_bytes(buf[layout.used + 2 : layout.used + 4], "little"))

    buf = bytearray(1 << 16)
    mem = FlatMemory(buf, barrier=barrier)
    dev = _Keeper()
    transport = _Transport()
    session = DeviceSession(dev, transport)
    try:
        ring = session.rings[0]
        session.start_ring(ring, mem, layout, bit(F.VERSION_1) | bit(F.EVENT_IDX))
        ring.enabled = True
        drv = DriverQueue(mem, layout, event_idx=True)
        for i in range(4):
            drv.add([], [(0x8000 + i * 256, 256)], token=i)
        drv.kick_prepare()
        session.kick(0)
        session.serve_pending()
        assert len(dev.chains) == 4 and dev.kept(0) == 4
        a, b, c, d = dev.chains
        view = a.writable[0]  # a reference kept by a careless device
        # one bad entry (d listed twice): nothing is pushed, nothing changes
        with pytest.raises(UsageError, match="listed twice"):
            dev.complete_many(0, [(c, 1), (d, 1), (d, 2)])
        with pytest.raises(UsageError, match="used length"):
            dev.complete_many(0, [(c, 1), (d, 257)])
        assert drv.get_used() == [] and dev.kept(0) == 4
        seen.clear()
        dev.complete_many(0, [(a, 256), (b, 256), (c, 10)])
        assert seen and seen[0] == 0, "used.idx moved before the last element was written"
        assert int.from_bytes(buf[layout.used + 2 : layout.used + 4], "little") == 3
        assert drv.get_used() == [(0, 256), (1, 256), (2, 10)]
        assert dev.kept(0) == 1 and session.counters["completions"] == 3
        assert a.writable == [] and a.writable_len == 0
        with pytest.raises(ValueError):
            view[0] = 1  # the views were released with the completion
        with pytest.raises(UsageError, match="not kept"):
            dev.complete_many(0, [(a, 1)])  # already completed
        dev.complete(0, d, 0)  # the single completion still works alongside
        assert drv.get_used() == [(3, 0)]
    finally:
        session.close()


# --------------------------------------------------------------------------- a lossy link


def test_guest_tcp_over_a_lossy_link_completes(lab: Lab, tmp_path: Path) -> None:
    """A fault plan on the guest's net back-end (``vlab vm --faults``) loses every 20th
    frame both ways (deterministic: a download of 4 MiB is dozens of frames each way
    even as GSO super-frames): Linux's TCP retransmits and the download completes, byte
    for byte; the back-end counted what it dropped."""
    size = 4 << 20
    plan = tmp_path / "lossy.json"
    plan.write_text(
        '{"seed": 11, "rules": ['
        '{"name": "tx", "when": {"event": "net.tx", "every": 20}, '
        '"what": {"action": "loss"}},'
        '{"name": "rx", "when": {"event": "net.rx", "every": 20}, '
        '"what": {"action": "loss"}}]}'
    )
    k = lab.k
    data = os.urandom(size)
    listener = k.sys.socket(2, 1)  # AF_INET, SOCK_STREAM
    k.sys.bind(listener, (KERNEL_IP, 8081))
    k.sys.listen(listener, 1)
    k.sys.settimeout(listener, 120.0)
    served: list[int] = []

    def serve() -> None:  # a one-shot HTTP/1.0 server on the kernel's stack
        conn, _ = k.sys.accept(listener)
        try:
            k.sys.settimeout(conn, 120.0)
            k.sys.recv(conn, 4096)  # the request line and headers
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {size}\r\n\r\n".encode()
            k.sys.sendall(conn, head + data)
            served.append(size)
        finally:
            k.sys.close(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    os.makedirs(tmp_path / "lossy")
    net = GuestNet(switch=lab.endpoint, ip="10.0.0.31/24")
    g = Guest(net=net, log_dir=str(tmp_path / "lossy"), faults=str(plan))
    try:
        g.start()
        r = g.run(
            f"wget -q -O /tmp/big http://{KERNEL_IP}:8081/big && sha256sum /tmp/big "
            "&& wc -c < /tmp/big",
            timeout=200,
        )
    finally:
        g.close()
        t.join(timeout=30)
        k.sys.close(listener)
    assert r.status == 0, r.output
    got, _, n = r.output.split()
    assert (got, int(n)) == (hashlib.sha256(data).hexdigest(), size)
    assert served == [size]
    assert g.net_backend is not None
    c = g.net_backend.device_counters()
    assert c["tx_fault_lost"] > 0 and c["rx_fault_lost"] > 0, c
    assert c["faults_fired"] == c["tx_fault_lost"] + c["rx_fault_lost"], c
