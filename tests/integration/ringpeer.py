"""A kernel in a process of its own attached to a device it did not start
(``kernel.Attach``): a ring port of the switch, or a ``--shm-by-name`` device process.

    python tests/integration/ringpeer.py SPEC_JSON

is :mod:`netpeer` (the UDP echo on port 7, the ``ping`` / ``stats`` / ``quit``
commands, the one JSON line ``{"ready": true, ...}``) with ``kernel.Attach(**SPEC)``
as its one device (``SPEC`` holds ``endpoint``, ``ip``, ``offload``, ...). A boot that
fails prints ``{"ready": false, "error": "<ExceptionType>: <message>"}`` and exits 3,
so a test can assert on why.

Imported by the tests, it provides :class:`RingPeer` (this script as a child process,
a :class:`netpeer.Peer`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import netpeer

import kernel

__all__ = ["RingPeer", "main"]

SCRIPT = Path(__file__).resolve()


class RingPeer(netpeer.Peer):
    """This script as a child: ``RingPeer(endpoint=EP, ip="10.0.0.2/24")``. The
    constructor returns once the kernel is up (:attr:`ready` True) or its boot failed
    (:attr:`ready` False, :attr:`error` says why; the child has exited)."""

    def __init__(self, **spec: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            hello = self._line()
        except BaseException:
            self.close()
            raise
        self.ready: bool = bool(hello.get("ready"))
        self.error: str = str(hello.get("error", ""))
        self.mac: str = str(hello.get("mac", ""))

    @property
    def pid(self) -> int:
        """The child's pid (the attached kernel's)."""
        return int(self.proc.pid)


def main() -> int:
    """Boot ``kernel.Attach(**SPEC)`` and serve as :func:`netpeer.main` does."""

    def attach(fields: dict[str, Any]) -> kernel.DeviceSpec:
        f = dict(fields)
        return kernel.Attach(f.pop("endpoint"), **f)

    netpeer.make_spec = attach  # netpeer.main looks it up when it is called
    try:
        return int(netpeer.main())
    except kernel.DeviceProbeError as e:
        print(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}), flush=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
