"""A virtio-net device process whose control queue misbehaves (for test_net_mq.py):
``python -m vdev net ...`` exactly, except that every control command is answered
VIRTIO_NET_ERR (mode ``err``) or never answered at all (mode ``silent``: the chain is
kept until the device is reset).

    python -m tests.integration.mq_bad_ctrl_device err|silent net --backend ... --control EP
"""

from __future__ import annotations

import sys

import vdev.__main__
import vdev.net
from vdev.device import PENDING, Pending
from vdev.virtio.net import CTRL_ERR
from vdev.virtio.queue import Chain


class ErrNet(vdev.net.NetDevice):
    """Answers every control command with VIRTIO_NET_ERR."""

    def _control(self, chain: Chain) -> int:
        self.metrics.inc("ctrl_commands")
        chain.write(0, bytes((CTRL_ERR,)))
        return 1


class SilentNet(vdev.net.NetDevice):
    """Keeps every control command and never answers it."""

    def _control(self, chain: Chain) -> int | Pending:  # type: ignore[override]
        self.metrics.inc("ctrl_commands")
        return PENDING


def main(argv: list[str]) -> int:
    mode, rest = argv[0], argv[1:]
    # vdev.__main__ looks NetDevice up in vdev.net when it builds the device
    vdev.net.NetDevice = ErrNet if mode == "err" else SilentNet  # type: ignore[misc]
    return vdev.__main__.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
