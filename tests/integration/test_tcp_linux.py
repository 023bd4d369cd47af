"""Our kernel's TCP against Linux's, over a TAP inside a network namespace.

Theory of operation
-------------------
The same network rule and plumbing as ``test_net_linux.py`` (whose fixtures and helpers
these tests use): each test makes a namespace, runs *our kernel* inside it on a TAP
(``nspeer.py kernel``, whose device process creates ``vlt0`` there), gives Linux
``10.99.0.1/24`` on it, and runs Linux's side in the namespace too: a native Python
TCP peer (``nspeer.py native``; both kinds also run a TCP *sink* that hashes a
connection to its end and answers ``"<sha256> <count>"``) and ``tshark`` capturing on
``vlt0``. Everything is removed afterwards, also on failure.

What is checked:

* A native Python TCP client in the namespace uploads 50 MiB to a ``k.sys`` server;
  the server's sha256 and count equal the client's. With offloads on, Linux hands the
  kernel TSO super-frames through the TAP (GUEST_TSO4): the kernel's receive path takes
  them whole. Linux's counters (``/proc/net/snmp``) show no TCP checksum error, the
  kernel's none either.
* A ``k.sys`` client uploads to a native Python TCP server in the namespace (not
  ``iperf3 -s``: its JSON control protocol was not implemented here, so the receiver is
  a native Python socket), hashes equal, while ``tshark -i vlt0`` records the frames.
  What is honest to assert on the capture: the packet socket sees the frames the device
  wrote to the TAP *before* Linux segments or checksums them. With offloads on (CSUM
  and HOST_TSO4), the kernel's data segments leave as ``NEEDS_CSUM`` (and the big ones
  as ``GSO_TCPV4`` super-frames of up to 64 KiB): their checksum field holds only the
  pseudo-header sum (virtio §5.1.6.2), which tshark calls "bad". So every TCP frame of
  the kernel must be either verified good by tshark or carry exactly the pseudo-header
  sum of its own addresses and length (nothing else is correct); at least one frame
  must be larger than the MTU (a super-frame crossed); Linux accepted all of it (data
  intact, ``Tcp.InCsumErrors`` 0). With ``offload=False`` nothing is offloaded: every
  TCP frame of the kernel must be verified good by tshark and be at most MTU-sized.

Skips (and fails under ``VLAB_REQUIRE_INTEROP=1``) without root, ``ip``,
``/dev/net/tun`` or ``tshark``, through the fixtures of ``test_net_linux.py``.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest
from test_net_linux import (  # noqa: F401  (fixtures are used by name)
    KIP,
    KPORT,
    LINUX_IP,
    LPORT,
    Capture,
    KernelOnTap,
    Peer,
    delta,
    kernel_on_tap,
    kernel_on_tap_offload,
    native,
    no_namespace_left,
    ns,
    snmp,
)
from test_net_pcap_kernel import CSUM_BAD, CSUM_GOOD, ip4, tshark

from vdev.virtio.packet import ipv4_pseudo_sum

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MTU = 1500
#: Fields read back from the capture (``tshark -r``), TCP checksums verified.
FIELDS = (
    "eth.src",
    "ip.src",
    "ip.dst",
    "ip.proto",
    "ip.len",
    "ip.hdr_len",
    "frame.len",
    "tcp.len",
    "tcp.checksum",
    "tcp.checksum.status",
    "_ws.malformed",
)


def _tcp_rows(path: Path) -> list[dict[str, str]]:
    """The TCP frames of ``path`` as tshark decodes them, with TCP checksums checked."""
    argv = [tshark(), "-r", str(path), "-n", "-o", "tcp.check_checksum:TRUE", "-Y", "tcp"]
    argv += ["-T", "fields", "-E", "separator=/t", "-E", "occurrence=f"]
    for f in FIELDS:
        argv += ["-e", f]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    rows = []
    for line in r.stdout.splitlines():
        if line:
            values = line.split("\t")
            rows.append(dict(zip(FIELDS, values + [""] * (len(FIELDS) - len(values)), strict=True)))
    return rows


def _upload_reply_ok(r: dict[str, object]) -> None:
    """The uploader's answer: the sink's "<sha256> <count>" matches what was sent."""
    assert "reply" in r, r
    digest, count = str(r["reply"]).split()
    assert (digest, int(count)) == (r["sha256"], r["sent"]), r


def test_native_client_uploads_50_mib_to_a_kernel_server(
    kernel_on_tap: KernelOnTap,  # noqa: F811
    native: Peer,  # noqa: F811
) -> None:
    k = kernel_on_tap
    before = snmp(k.ns)
    size = 50 * 1024 * 1024
    r = native.call(100, op="tcp_upload", to=[KIP, KPORT], size=size, seed=50, timeout=90)
    _upload_reply_ok(r)
    assert r["sent"] == size
    assert r["sha256"] == hashlib.sha256(random.Random(50).randbytes(size)).hexdigest()
    after = snmp(k.ns)
    assert delta(before, after, "Tcp.InCsumErrors") == delta(before, after, "Tcp.InErrs") == 0
    st = k.stats()["stack"]
    assert st["tcp_passive_opens"] == 1 and st["tcp_bad_checksum"] == 0
    assert st["tcp_bad_header"] == st["rx_bad_frames"] == 0
    print(f"\n50 MiB Linux -> kernel in {r['seconds']:.2f} s")


def test_kernel_client_uploads_to_a_native_server_and_tshark_checks_the_frames(
    kernel_on_tap_offload: KernelOnTap,  # noqa: F811
    native: Peer,  # noqa: F811
    tmp_path: Path,
) -> None:
    k = kernel_on_tap_offload
    offload = "CSUM" in k.features
    if offload:
        assert {"CSUM", "HOST_TSO4"} <= set(k.features), k.features
    size = 1024 * 1024
    cap = Capture(k.ns, tmp_path / "tap.pcap")
    try:
        before = snmp(k.ns)
        link0 = k.stats()["link"]
        r = k.peer.call(60, op="tcp_upload", to=[LINUX_IP, LPORT], size=size, seed=7, timeout=50)
        _upload_reply_ok(r)
        after = snmp(k.ns)
        link1 = k.stats()["link"]
        sent_frames = link1["tx_frames"] - link0["tx_frames"]
        cap.wait_for(
            lambda rows: sum(1 for x in rows if x["eth.src"] == k.mac) >= sent_frames,
            f"the kernel's {sent_frames} frames",
        )
    finally:
        cap.stop()
    assert delta(before, after, "Tcp.InCsumErrors") == delta(before, after, "Tcp.InErrs") == 0
    gso = link1["tx_gso_frames"] - link0["tx_gso_frames"]
    if offload:
        assert gso > 0, "with HOST_TSO4 the kernel should have sent super-frames"
    else:
        assert gso == 0 and link1["tx_csum_offloaded"] == link0["tx_csum_offloaded"]

    rows = _tcp_rows(cap.path)
    assert not [x for x in rows if x["_ws.malformed"]], "tshark found malformed frames"
    mine = [x for x in rows if x["eth.src"] == k.mac]
    assert mine and all((x["ip.src"], x["ip.dst"]) == (KIP, LINUX_IP) for x in mine)
    payload = sum(int(x["tcp.len"] or 0) for x in mine)
    assert payload >= size  # every byte crossed the TAP (retransmissions add to it)
    big = [x for x in mine if int(x["ip.len"]) > MTU]
    good = sum(1 for x in mine if x["tcp.checksum.status"] == CSUM_GOOD)
    print(f"\nkernel TCP frames {len(mine)}: checksum good {good}, above the MTU {len(big)}")
    if not offload:
        assert all(x["tcp.checksum.status"] == CSUM_GOOD for x in mine), [
            x for x in mine if x["tcp.checksum.status"] != CSUM_GOOD
        ][:3]
        assert not big and all(int(x["frame.len"]) <= MTU + 14 for x in mine)
        return
    assert big, "no super-frame in the capture"
    for x in mine:
        tcp_len = int(x["ip.len"]) - int(x["ip.hdr_len"])
        partial = ipv4_pseudo_sum(ip4(KIP), ip4(LINUX_IP), 6, tcp_len)
        verdict = x["tcp.checksum.status"]
        is_partial = verdict == CSUM_BAD and int(x["tcp.checksum"], 16) == partial
        assert verdict == CSUM_GOOD or is_partial, x
