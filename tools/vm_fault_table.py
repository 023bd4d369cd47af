"""What Linux's virtio_blk does with a device that breaks the rules: one guest per fault.

    python -m tools.vm_fault_table [--only KIND,...] [--markdown]

For each ring-protocol, notification and life-cycle fault kind (docs/faults.md), boots a
Linux guest on our vhost-user blk back-end with a plan that fires the fault once on the
guest's 20th request, runs ``dd`` reads in the background (so a request that never
comes back cannot block the console), and records: what the guest's kernel logged
(``dmesg`` lines about virtio / vda / blk that were not there at boot), what the
application saw (``dd``'s exit status, or "pending" when it had not returned after
:data:`SETTLE_S`), and whether the guest's shell still answered. The README's table is
this command's output on the machine that wrote it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from tools.vm import Guest, MissingPrerequisite, VmError, check_prerequisites

__all__ = ["KINDS", "probe", "main"]

#: (kind, plan ``what``, plan ``when`` event) -- the faults a driver must survive.
KINDS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("bad_used_id", {"action": "bad_used_id"}, "ring.push"),
    ("used_id_not_head", {"action": "used_id_not_head"}, "ring.push"),
    ("double_complete", {"action": "double_complete"}, "ring.push"),
    ("used_len_too_big", {"action": "used_len_too_big", "extra": 4096}, "ring.push"),
    ("used_idx_jump", {"action": "used_idx_jump", "by": 3}, "ring.push"),
    ("withhold", {"action": "withhold"}, "ring.push"),
    ("out_of_order", {"action": "out_of_order", "depth": 1}, "ring.push"),
    ("drop_interrupt", {"action": "drop_interrupt"}, "notify.interrupt"),
    ("spurious_interrupt", {"action": "spurious_interrupt"}, "notify.interrupt"),
    ("interrupt_storm", {"action": "interrupt_storm", "n": 1000}, "notify.interrupt"),
    ("ignore_event_idx", {"action": "ignore_event_idx"}, "notify.interrupt"),
    ("needs_reset", {"action": "needs_reset"}, "device.request"),
    ("hang", {"action": "hang"}, "device.request"),
    ("crash", {"action": "crash"}, "device.request"),
)
#: How long the guest's reads get after the fault before they count as pending.
SETTLE_S = 8.0
NTH = 20

_WORKLOAD = (
    "dmesg > /tmp/boot.log\n"
    "(dd if=/dev/vda of=/dev/null bs=4096 count=64 iflag=direct 2>/tmp/dd.err; "
    "echo $? > /tmp/dd.rc) &\n"
)
_REPORT = (
    "cat /tmp/dd.rc 2>/dev/null || echo pending\n"
    "dmesg | grep -v -F -x -f /tmp/boot.log | grep -i -E 'virtio|vda|blk|I/O' | tail -n 4\n"
)


def probe(
    kind: str, what: dict[str, Any], event: str, tmp: str, settle_s: float = SETTLE_S
) -> dict[str, str]:
    """Boot a guest under one fault, give its reads ``settle_s`` seconds; ``{"fault",
    "kernel_log", "application", "shell"}``."""
    img = os.path.join(tmp, f"{kind}.img")
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    when: dict[str, Any] = {"event": event, "nth": NTH, "times": 1}
    if event.startswith(("ring.", "notify.")):
        when["queue"] = 0
    plan = os.path.join(tmp, f"{kind}.json")
    with open(plan, "w") as f:
        json.dump({"seed": 1, "rules": [{"name": kind, "when": when, "what": what}]}, f)
    row = {"fault": kind, "kernel_log": "", "application": "", "shell": "answers"}
    with Guest(img, faults=plan, boot_timeout=120) as g:
        g.run(_WORKLOAD, timeout=30)
        try:
            g.run(f"sleep {settle_s}", timeout=settle_s + 30)
            r = g.run(_REPORT, timeout=30)
        except VmError as e:
            row["shell"] = f"no answer ({e})"
            return row
    lines = [ln.strip() for ln in r.output.splitlines() if ln.strip()]
    rc = lines[0] if lines else "?"
    row["application"] = (
        "read OK" if rc == "0" else "pending" if rc == "pending" else f"dd exit {rc}"
    )
    log = [ln.split("] ", 1)[-1] for ln in lines[1:]]
    row["kernel_log"] = "; ".join(log) or "(nothing)"
    return row


def main(argv: Sequence[str] | None = None) -> int:
    """Run the probes; print a table (``--markdown``: README form)."""
    p = argparse.ArgumentParser(prog="python -m tools.vm_fault_table")
    p.add_argument("--only", help="comma-separated fault kinds")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    try:
        check_prerequisites("vlab")
    except MissingPrerequisite as e:
        print(f"vm_fault_table: {e}", file=sys.stderr)
        return 2
    only = set(a.only.split(",")) if a.only else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlab-vmfaults-") as tmp:
        for kind, what, event in KINDS:
            if only is not None and kind not in only:
                continue
            print(f"... {kind}", file=sys.stderr, flush=True)
            rows.append(probe(kind, what, event, tmp))
    if a.markdown:
        print("| fault | what the guest's kernel logged | what the application saw | shell |")
        print("|---|---|---|---|")
        for r in rows:
            log = r["kernel_log"].replace("|", "\\|")
            print(f"| `{r['fault']}` | {log} | {r['application']} | {r['shell']} |")
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
