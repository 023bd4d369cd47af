"""``vlab vm --trace``: a Linux guest's own virtio-blk driver drives our back-end, and
the back-end's half of every request (pop → push, with seq, head and descriptors) is
in the trace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop_require import skip_or_fail
from tools.vm import MissingPrerequisite, check_prerequisites

pytestmark = pytest.mark.integration


def test_vlab_vm_trace_records_the_device_side_of_the_guests_requests(tmp_path: Path) -> None:
    try:
        check_prerequisites("vlab")
    except MissingPrerequisite as e:
        skip_or_fail(str(e))
    trace = tmp_path / "vm.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.cli",
            "vm",
            "--trace",
            str(trace),
            "--run",
            "dd if=/dev/vda of=/dev/null bs=4k count=16 iflag=direct 2>&1 | tail -1",
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert run.returncode == 0, run
    assert "16+0 records out" in run.stdout, run
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    dev = [e for e in events if e["side"] == "device" and e.get("q") == 0]
    pops = [e for e in dev if e["kind"] == "pop"]
    pushes = [e for e in dev if e["kind"] == "push"]
    assert len(pops) >= 16, [e["kind"] for e in dev]  # the 16 direct reads at least
    # every chain the guest made available came back, in the same ring lifetime
    assert sorted((e["seq"], e["head"]) for e in pops) == sorted(
        (e["seq"], e["head"]) for e in pushes
    )
    # a direct 4 KiB read is header (16, readable) + data (4096) + status (1, writable)
    reads = [e for e in pops if e.get("wlen") == 4097 and e.get("rlen") == 16]
    assert len(reads) >= 16, pops[-3:]
    by_key = {(e["seq"], e["head"]): e for e in pushes}
    assert all(by_key[(e["seq"], e["head"])]["len"] == 4097 for e in reads)
    assert {e["pid"] for e in dev} == {dev[0]["pid"]}  # one back-end process wrote them
