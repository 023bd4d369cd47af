"""The stack's tunables, one frozen dataclass (defaults as in Linux where Linux has one).

Every timeout is configurable so that tests can make them small and wait on events
instead of sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["StackConfig", "EPHEMERAL_PORTS"]

#: Linux's default ``ip_local_port_range``.
EPHEMERAL_PORTS = (32768, 60999)


@dataclass(frozen=True, slots=True)
class StackConfig:
    """Tunables of a :class:`~kernel.net.stack.Stack` (validated on construction)."""

    #: TTL of the datagrams we originate (RFC 1700 recommends 64; Linux's default).
    ttl: int = 64
    #: How long a resolved ARP entry is used before it is dropped and resolved again.
    arp_reachable_s: float = 60.0
    #: Seconds between ARP requests for one address (Linux ``retrans_time``).
    arp_retry_s: float = 1.0
    #: ARP requests sent before giving up (Linux ``mcast_solicit``).
    arp_tries: int = 3
    #: Packets kept per address while it is being resolved; beyond it the oldest is
    #: dropped (``arp_queue_dropped``).
    arp_queue_len: int = 8
    #: After a failed resolution, sends to that address fail at once with EHOSTUNREACH
    #: for this long; then the next send resolves again.
    arp_failed_hold_s: float = 3.0
    #: Entries per interface; beyond it the oldest entry is evicted.
    arp_max_entries: int = 512
    #: A datagram whose fragments did not all arrive is dropped after this long
    #: (RFC 791 suggests 15 s as a lower bound; Linux uses 30 s).
    reasm_timeout_s: float = 30.0
    #: Bytes held by all partial datagrams (payload + per-fragment overhead).
    reasm_max_bytes: int = 4 * 1024 * 1024
    #: Fragments per datagram (a 64 KiB datagram at MTU 576 needs 120).
    reasm_max_frags: int = 256
    #: Default SO_RCVBUF of a UDP socket (Linux ``rmem_default``).
    udp_rcvbuf: int = 212992
    #: ICMP errors this host may send per second (token bucket; Linux's default) ...
    icmp_rate_per_s: float = 1000.0
    #: ... and in one burst.
    icmp_burst: int = 50

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            want_int = isinstance(f.default, int)
            if isinstance(v, bool) or not isinstance(v, int if want_int else int | float):
                kind = "an int" if want_int else "a number"
                raise ValueError(f"StackConfig.{f.name} must be {kind}, not {v!r}")
            if v <= 0:
                raise ValueError(f"StackConfig.{f.name} must be > 0, got {v!r}")
        if not 1 <= self.ttl <= 255:
            raise ValueError(f"StackConfig.ttl must be 1..255, got {self.ttl}")
