"""Test helpers for TCP: two (or more) real stacks on an in-memory hub whose wire can
lose, duplicate and reorder TCP frames with a seeded RNG, with short TCP timeouts.

The wire is the stand-in (as in :mod:`test_stack_helpers`); the stacks, their TCP and
their sockets are the real ones. Delivery is threaded (like a driver's interrupt
thread). Nothing here sleeps: tests wait in blocking socket calls with timeouts.
"""

from __future__ import annotations

import random
import struct
from dataclasses import replace

from test_stack_helpers import Hub, Port

from hostops.timers import TimerHeap
from kernel.net import Stack
from kernel.net.link import TxOffload
from kernel.net.tcp import TcpConfig

__all__ = [
    "FAST",
    "LossyHub",
    "TcpLan",
    "is_tcp",
    "tcp_flags",
    "tcp_segment",
    "with_checksum",
]

#: Short timeouts for tests.
FAST = TcpConfig(
    rto_initial_s=0.05,
    rto_min_s=0.02,
    rto_max_s=0.5,
    max_retries=4,
    syn_retries=3,
    delack_s=0.01,
    time_wait_s=0.05,
    fin_timeout_s=0.5,
)


def is_tcp(frame: bytes) -> bool:
    """An IPv4/TCP Ethernet frame."""
    return len(frame) >= 34 and frame[12:14] == b"\x08\x00" and frame[23] == 6


def tcp_flags(frame: bytes) -> int:
    """The TCP flags of an IPv4/TCP frame (IP header length from IHL)."""
    ihl = (frame[14] & 0x0F) * 4
    return frame[14 + ihl + 13]


class LossyHub(Hub):
    """A threaded hub that loses (``loss``), duplicates (``dup``) and reorders
    (``reorder``: a frame is held back and sent after the next one) TCP frames with
    a seeded RNG. ``filter(frame) -> bool`` drops frames it returns True for."""

    def __init__(
        self, seed: int = 1, loss: float = 0.0, dup: float = 0.0, reorder: float = 0.0
    ) -> None:
        super().__init__(threaded=True)
        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder = loss, dup, reorder
        self.lost = self.duplicated = self.reordered = 0
        self._held: tuple[Port, bytes, TxOffload] | None = None

    def carry(self, src: Port, frame: bytes, offload: TxOffload) -> None:
        if not is_tcp(frame) or not (self.loss or self.dup or self.reorder):
            super().carry(src, frame, offload)
            return
        with self._cond:
            r = self.rng.random()
            held = self._held
            if r < self.loss:
                self.lost += 1
                return
            copies = 2 if self.rng.random() < self.dup else 1
            if copies == 2:
                self.duplicated += 1
            if held is None and self.rng.random() < self.reorder:
                self._held = (src, frame, offload)
                self.reordered += 1
                return
            self._held = None
        for _ in range(copies):
            super().carry(src, frame, offload)
        if held is not None:
            super().carry(*held)


class TcpLan:
    """``n`` stacks 10.0.0.1.. on one :class:`LossyHub` with TCP config ``config``;
    ``tso``: ports with checksum offload and TSO (frames stay whole on the hub)."""

    def __init__(
        self,
        n: int = 2,
        *,
        config: TcpConfig = FAST,
        hub: Hub | None = None,
        mtu: int = 1500,
        tso: bool = False,
    ) -> None:
        self.timers = TimerHeap("tcp-lan-timers")
        self.hub = hub if hub is not None else LossyHub()
        self.ports: list[Port] = []
        self.stacks: list[Stack] = []
        for i in range(n):
            mac = bytes((2, 0, 0, 0, 0, len(self.hub.ports) + 1))
            port = Port(self.hub, "eth0", mac, mtu, tx_csum=tso, tso4=tso)
            self.hub.ports.append(port)
            st = Stack(self.timers)
            st.tcp.config = config
            st.add_interface(port, f"10.0.0.{i + 1}/24")
            self.ports.append(port)
            self.stacks.append(st)

    def with_config(self, i: int, **changes: object) -> None:
        """Change stack ``i``'s TCP config."""
        st = self.stacks[i]
        st.tcp.config = replace(st.tcp.config, **changes)  # type: ignore[arg-type]

    def __enter__(self) -> TcpLan:
        return self

    def __exit__(self, *exc: object) -> None:
        for st in self.stacks:
            st.close()
        self.hub.close()
        self.timers.close()


def tcp_segment(
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    *,
    wnd: int = 65535,
    data: bytes = b"",
    options: bytes = b"",
    offset: int | None = None,
) -> bytes:
    """A hand-made TCP segment with checksum 0 (fill it with :func:`with_checksum`)."""
    hl = 20 + len(options)
    off = (hl // 4) if offset is None else offset
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, wnd, 0, 0) + (
        options + data
    )


def with_checksum(src: str, dst: str, seg: bytes, bad: bool = False) -> bytes:
    """``seg`` with its TCP checksum (wrong on purpose with ``bad``)."""
    from vdev.virtio.packet import inet_checksum, ipv4_pseudo_sum

    a = bytes(int(x) for x in src.split("."))
    b = bytes(int(x) for x in dst.split("."))
    c = inet_checksum(seg, ipv4_pseudo_sum(a, b, 6, len(seg)))
    if bad:
        c ^= 0x5555
    return seg[:16] + struct.pack("!H", c) + seg[18:]
