"""TCP between two kernels over a lossy switch (``python -m vdev switch --impair``): the
switch loses, duplicates and reorders frames (seeded), and a 20 MiB transfer (TSO on;
and 6 MiB with offloads off) still arrives intact because TCP's recovery (RFC 6298
retransmission timer, RFC 5681 fast retransmit on duplicate ACKs, out-of-order
reassembly) did its work -- which the counters of both kernels and of the switch show.

The switch impairs whole frames: with TSO a lost frame is a super-frame of up to 64 KiB
(a burst loss of ~45 segments), so that run recovers mostly by retransmission timeouts;
without offloads every frame is one segment and fast retransmit does most of the work.
Also: an :class:`~vdev.switch.Impairment` is deterministic for a seed, and a bad
``--impair`` is a usage error."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tcppeer import TcpPeer

import kernel
from hostops.process import DeviceProcess, python_argv
from hostops.rundir import RuntimeDir
from kernel.files import SHUT_WR, SOCK_STREAM
from vdev.switch import (
    DUP,
    LOSE,
    PASS,
    REORDER,
    Impairment,
    SwitchClient,
    parse_impairment,
)

pytestmark = pytest.mark.integration

IMPAIR = "loss=0.02,dup=0.01,reorder=0.02,seed=7"
PEER_IP = "10.0.1.2"


@pytest.fixture(scope="module")
def lossy_switch() -> Iterator[str]:
    """A switch process with ``--impair``; yields its endpoint."""
    rundir = RuntimeDir.create()
    ep = rundir.endpoint("lossy")
    sw = DeviceProcess.launch(
        python_argv("vdev", "switch", "--listen", ep, "--impair", IMPAIR),
        name="switch",
        log_path=os.path.join(rundir.path, "switch.log"),
    )
    try:
        yield ep
    finally:
        sw.stop()
        sw.close()
        rundir.cleanup()


def _recv_to_eof(k: kernel.Kernel, fd: int) -> bytes:
    out = bytearray()
    while True:  # ends at EOF (or the socket timeout)
        d = k.sys.recv(fd, 65536)
        if not d:
            return bytes(out)
        out += d


@pytest.mark.parametrize(
    ("offload", "mib"), [(True, 20), (False, 6)], ids=["tso-20MiB", "no-offload-6MiB"]
)
def test_a_transfer_over_a_lossy_switch(lossy_switch: str, offload: bool, mib: int) -> None:
    """20 MiB with TSO super-frames (a lost frame is up to 64 KiB), and 6 MiB of
    MSS-sized segments without offloads (many more frames, so many more fates)."""
    peer = TcpPeer(backend="switch", switch=lossy_switch, ip=f"{PEER_IP}/24")
    try:
        spec = kernel.Net(backend="switch", switch=lossy_switch, ip="10.0.1.1/24", offload=offload)
        with kernel.boot(devices=[spec]) as k:
            # a LAN's round trip is far below Linux's 200 ms RTO floor: a lower floor
            # keeps the timeouts of the TSO run (burst losses) from dominating it
            k.net.tcp.config = dataclasses.replace(k.net.tcp.config, rto_min_s=0.05)
            with SwitchClient(lossy_switch) as c:
                sw0 = c.stats()["switch"]
            data = random.Random(mib).randbytes(mib * 1024 * 1024)
            fd = k.sys.socket(type=SOCK_STREAM)
            k.sys.settimeout(fd, 50)
            k.sys.connect(fd, (PEER_IP, 5001))
            k.sys.sendall(fd, data)
            k.sys.shutdown(fd, SHUT_WR)
            digest, count = _recv_to_eof(k, fd).decode().split()
            k.sys.close(fd)
            assert int(count) == len(data)
            assert digest == hashlib.sha256(data).hexdigest()
            sender = k.net.stats
            receiver = peer.call(op="stats")["stack"]
            with SwitchClient(lossy_switch) as c:
                sw = c.stats()
        impaired = {
            kind: sw["switch"][kind] - sw0[kind]
            for kind in ("impaired_lost", "impaired_dup", "impaired_reordered")
        }
        print(f"\nswitch {impaired}")
        print({n: sender[n] for n in sender if n.startswith("tcp_") and sender[n]})
        print({n: receiver[n] for n in receiver if n.startswith("tcp_") and receiver[n]})
        assert sw["impair"] == {"loss": 0.02, "dup": 0.01, "reorder": 0.02, "seed": 7}
        assert all(v > 0 for v in impaired.values()), impaired
        # losses were repaired by the sender ...
        assert sender["tcp_retransmits"] + sender["tcp_fast_retransmits"] > 0
        assert sender["tcp_dup_acks"] > 0
        # ... and the receiver saw holes (out of order) and duplicates (out of window)
        assert receiver["tcp_ooo_segments"] > 0
        assert receiver["tcp_bad_checksum"] == 0
    finally:
        peer.close()


def test_impairment_is_seeded_and_bad_specs_are_usage_errors(tmp_path: Path) -> None:
    """Same seed, same fates; a bad ``--impair`` is one line on stderr and exit 2."""
    a = Impairment(loss=0.1, dup=0.1, reorder=0.1, seed=3)
    b = parse_impairment("seed=3,reorder=0.1,dup=0.1,loss=0.1")
    fates = [a.draw() for _ in range(1000)]
    assert fates == [b.draw() for _ in range(1000)]
    assert {LOSE, DUP, REORDER, PASS} == set(fates)
    for bad in ("loss=2", "loss=0.6,dup=0.6", "drop=0.1", "loss", "seed=x", "loss=0.1,loss=0.2"):
        with pytest.raises(ValueError):
            parse_impairment(bad)
        r = subprocess.run(
            [sys.executable, "-m", "vdev", "switch", "--listen", f"ipc://{tmp_path}/s"]
            + ["--impair", bad],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 2, (bad, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "--impair" in r.stderr, r.stderr
