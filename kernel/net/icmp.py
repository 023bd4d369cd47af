"""ICMP (RFC 792): echo, errors received, errors sent, and ``ping``.

Theory of operation
-------------------
*Received.* The checksum covers the whole message (RFC 792); a short or badly summed
message is dropped (``icmp_bad_header`` / ``icmp_bad_checksum``). An echo request is
answered with an echo reply carrying the same identifier, sequence number and data
(``icmp_echo_replied``), except when it was sent to a broadcast address (ignored, as
Linux does by default: ``icmp_echo_ignore_broadcasts``). An echo reply goes to the
:meth:`IcmpProtocol.ping` call that owns its identifier — every call takes its own, so
concurrent pings never see each other's replies. A destination unreachable, time
exceeded or parameter problem quotes the header and the first 8 data bytes of a packet
we sent (RFC 792); it is checked (IPv4, IHL, our source address, not a later fragment)
and handed to the handler of the quoted protocol as a
:class:`~kernel.net.protocol.NetError` with the errno Linux gives it
(:func:`icmp_errno`).

*Sent.* :meth:`IcmpProtocol.send_error` builds destination unreachable messages (port
unreachable for UDP to a closed port, protocol unreachable for an unknown protocol)
under RFC 1122 §3.2.2's rules: never about an ICMP error, a broadcast or multicast
datagram, a datagram from an address that is not one host's. They are rate limited by
a token bucket (``icmp_rate_per_s``, ``icmp_burst``; ``icmp_rate_limited``).

*ping.* ``ping(dst, count, timeout)`` sends ``count`` echo requests one after the other,
each waiting up to ``timeout`` seconds for its reply (on a condition, woken by the
receive path), and returns the round-trip times of the replies that came, in seconds.
No reply at all raises ``TimeoutError``; an error reported for our echo requests (a
router's unreachable, or a failed ARP resolution: EHOSTUNREACH) ends the run and is
raised when no reply came; errors of the send itself (ENETUNREACH, ENETDOWN,
EHOSTUNREACH while a failed resolution is held, ENOBUFS) are raised at once.
"""

from __future__ import annotations

import errno
import os
import struct
from functools import partial
from typing import TYPE_CHECKING

from hostops.clock import monotonic
from hostops.sync import Condition, Lock
from vdev.virtio.packet import inet_checksum, inet_sum

from ..errors import io_error
from .addr import LIMITED_BROADCAST, ip_ntoa, is_loopback, is_multicast, is_zeronet
from .protocol import IPv4Packet, NetError

if TYPE_CHECKING:
    from .stack import Stack

__all__ = [
    "IcmpProtocol",
    "icmp_errno",
    "ICMP_ECHOREPLY",
    "ICMP_DEST_UNREACH",
    "ICMP_SOURCE_QUENCH",
    "ICMP_REDIRECT",
    "ICMP_ECHO",
    "ICMP_TIME_EXCEEDED",
    "ICMP_PARAMETERPROB",
    "ICMP_NET_UNREACH",
    "ICMP_HOST_UNREACH",
    "ICMP_PROT_UNREACH",
    "ICMP_PORT_UNREACH",
    "ICMP_FRAG_NEEDED",
    "IPPROTO_ICMP",
]

IPPROTO_ICMP = 1

ICMP_ECHOREPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_SOURCE_QUENCH = 4
ICMP_REDIRECT = 5
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETERPROB = 12

ICMP_NET_UNREACH = 0
ICMP_HOST_UNREACH = 1
ICMP_PROT_UNREACH = 2
ICMP_PORT_UNREACH = 3
ICMP_FRAG_NEEDED = 4

_ERROR_TYPES = (
    ICMP_DEST_UNREACH,
    ICMP_SOURCE_QUENCH,
    ICMP_REDIRECT,
    ICMP_TIME_EXCEEDED,
    ICMP_PARAMETERPROB,
)

_HDR = struct.Struct("!BBHHH")  # type, code, checksum, id, sequence (echo)

# Linux's icmp_err_convert[] (net/ipv4/icmp.c), indexed by destination-unreachable code.
_UNREACH_ERRNO = (
    errno.ENETUNREACH,  # 0 net unreachable
    errno.EHOSTUNREACH,  # 1 host unreachable
    errno.ENOPROTOOPT,  # 2 protocol unreachable
    errno.ECONNREFUSED,  # 3 port unreachable
    errno.EMSGSIZE,  # 4 fragmentation needed and DF set
    errno.EOPNOTSUPP,  # 5 source route failed
    errno.ENETUNREACH,  # 6 destination network unknown
    errno.EHOSTDOWN,  # 7 destination host unknown
    errno.ENONET,  # 8 source host isolated
    errno.ENETUNREACH,  # 9 network administratively prohibited
    errno.EHOSTUNREACH,  # 10 host administratively prohibited
    errno.ENETUNREACH,  # 11 network unreachable for TOS
    errno.EHOSTUNREACH,  # 12 host unreachable for TOS
    errno.EHOSTUNREACH,  # 13 communication administratively prohibited
    errno.EHOSTUNREACH,  # 14 host precedence violation
    errno.EHOSTUNREACH,  # 15 precedence cut-off
)

#: Data bytes of our echo requests (what ``ping`` sends by default: 56).
PING_DATA = bytes(range(56))


def icmp_errno(icmp_type: int, code: int) -> int:
    """The errno a socket reports for an ICMP error (as Linux maps it)."""
    if icmp_type == ICMP_DEST_UNREACH:
        return _UNREACH_ERRNO[code] if code < len(_UNREACH_ERRNO) else errno.EHOSTUNREACH
    if icmp_type == ICMP_PARAMETERPROB:
        return errno.EPROTO
    return errno.EHOSTUNREACH  # time exceeded and the rest


class _PingSession:
    __slots__ = ("ident", "dst", "cond", "sent", "rtt", "error", "closed")

    def __init__(self, ident: int, dst: int) -> None:
        self.ident = ident
        self.dst = dst
        self.cond = Condition(Lock())
        self.sent: dict[int, float] = {}
        self.rtt: dict[int, float] = {}
        self.error: OSError | None = None
        self.closed = False

    def answered(self, seq: int) -> bool:
        """The wait for ``seq`` is over (reply, error, or closed)."""
        return seq in self.rtt or self.error is not None or self.closed


class IcmpProtocol:
    """The ICMP handler of a stack (registered for protocol 1)."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self._lock = Lock()
        self._sessions: dict[int, _PingSession] = {}
        self._next_id = int.from_bytes(os.urandom(2), "big")
        cfg = stack.config
        self._tokens = float(cfg.icmp_burst)
        self._last = monotonic()

    # -- receive
    def input(self, pkt: IPv4Packet) -> None:
        """One ICMP message for us."""
        st = self._stack
        d = pkt.payload
        if len(d) < 8:  # RFC 792: type, code, checksum and 4 more bytes
            st.count("icmp_bad_header")
            return
        if inet_sum(d) % 0xFFFF:  # RFC 792: the checksum covers the whole message
            st.count("icmp_bad_checksum")
            return
        t = d[0]
        if t == ICMP_ECHO:
            if pkt.ip_broadcast or pkt.l2_broadcast:
                st.count("icmp_echo_ignored_broadcast")
                return
            reply = bytearray(d)
            reply[0] = ICMP_ECHOREPLY
            reply[2:4] = b"\x00\x00"
            struct.pack_into("!H", reply, 2, inet_checksum(reply))
            if st.send_ip_quiet(pkt.src, IPPROTO_ICMP, reply, src=pkt.dst):
                st.count("icmp_echo_replied")
        elif t == ICMP_ECHOREPLY:
            self._echo_reply(pkt)
        elif t in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, ICMP_PARAMETERPROB):
            self._error_in(pkt, t, d[1])
        else:
            st.count("icmp_ignored")

    def _echo_reply(self, pkt: IPv4Packet) -> None:
        d = pkt.payload
        _t, _c, _s, ident, seq = _HDR.unpack_from(d)
        now = monotonic()
        with self._lock:
            s = self._sessions.get(ident)
        if s is None or pkt.src != s.dst or bytes(d[8:]) != PING_DATA:
            self._stack.count("icmp_echo_reply_unmatched")
            return
        with s.cond:
            t0 = s.sent.get(seq)
            if t0 is None or seq in s.rtt:
                self._stack.count("icmp_echo_reply_unmatched")
                return
            s.rtt[seq] = now - t0
            s.cond.notify_all()

    def _error_in(self, pkt: IPv4Packet, t: int, code: int) -> None:
        st = self._stack
        inner = pkt.payload[8:]
        # RFC 792: the original header plus at least its first 64 data bits
        if len(inner) < 28 or inner[0] >> 4 != 4:
            st.count("icmp_bad_header")
            return
        ihl = (inner[0] & 0x0F) * 4
        if ihl < 20 or len(inner) < ihl + 8:
            st.count("icmp_bad_header")
            return
        ff, _ttl, proto, _c, osrc, odst = struct.unpack_from("!HBBHII", inner, 6)
        if ff & 0x1FFF or not st.is_local(osrc):
            st.count("icmp_error_not_ours")  # not about a packet we sent whole
            return
        st.count("icmp_errors_received")
        err = NetError(
            errno=icmp_errno(t, code),
            icmp_type=t,
            icmp_code=code,
            reporter=pkt.src,
            src=osrc,
            dst=odst,
            proto=proto,
            l4=bytes(inner[ihl : ihl + 8]),
        )
        st.deliver_error(err)

    def error(self, err: NetError) -> None:
        """An error about one of our echo requests: ends that ping."""
        if len(err.l4) < 8 or err.l4[0] != ICMP_ECHO:
            return
        ident = struct.unpack_from("!H", err.l4, 4)[0]
        with self._lock:
            s = self._sessions.get(ident)
        if s is None or s.dst != err.dst:
            return
        with s.cond:
            if s.error is None:
                s.error = io_error(err.errno, f"from {ip_ntoa(err.reporter)}")
            s.cond.notify_all()

    # -- send errors
    def send_error(self, pkt: IPv4Packet, icmp_type: int, code: int) -> None:
        """Send an ICMP error about ``pkt`` to its source, if RFC 1122 §3.2.2 allows."""
        st = self._stack
        src = pkt.src
        if pkt.l2_broadcast or pkt.ip_broadcast or is_multicast(pkt.dst):
            return  # §3.2.2: never about a broadcast or multicast datagram
        if (
            is_zeronet(src)
            or is_multicast(src)
            or is_loopback(src)
            or src == LIMITED_BROADCAST
            or st.is_broadcast(src)
        ):
            return  # §3.2.2: never to an address that is not one host's
        if pkt.proto == IPPROTO_ICMP and (len(pkt.payload) < 1 or pkt.payload[0] in _ERROR_TYPES):
            return  # §3.2.2: never about an ICMP error
        if not self._take_token():
            st.count("icmp_rate_limited")
            return
        msg = bytearray(struct.pack("!BBHI", icmp_type, code, 0, 0))
        msg += pkt.header
        msg += bytes(pkt.payload[:8])
        struct.pack_into("!H", msg, 2, inet_checksum(msg))
        if st.send_ip_quiet(src, IPPROTO_ICMP, msg, src=pkt.dst if st.is_local(pkt.dst) else 0):
            st.count("icmp_unreach_sent" if icmp_type == ICMP_DEST_UNREACH else "icmp_errors_sent")

    def _take_token(self) -> bool:
        cfg = self._stack.config
        with self._lock:
            now = monotonic()
            self._tokens = min(
                float(cfg.icmp_burst), self._tokens + (now - self._last) * cfg.icmp_rate_per_s
            )
            self._last = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True

    # -- ping
    def ping(self, dst: int, count: int, timeout: float) -> list[float]:
        """See the module docstring."""
        st = self._stack
        route = st.route(dst)
        if st.is_broadcast(dst) or is_multicast(dst):
            raise io_error(errno.EACCES, "ping to a broadcast or multicast address")
        s = self._open_session(dst)
        try:
            for seq in range(count):  # bounded by the caller's count
                msg = bytearray(_HDR.pack(ICMP_ECHO, 0, 0, s.ident, seq & 0xFFFF) + PING_DATA)
                struct.pack_into("!H", msg, 2, inet_checksum(msg))
                with s.cond:
                    s.sent[seq & 0xFFFF] = monotonic()
                st.send_ip(dst, IPPROTO_ICMP, msg, route=route)
                with s.cond:
                    s.cond.wait_for(partial(s.answered, seq & 0xFFFF), timeout)
                    if s.closed:
                        raise io_error(errno.ENETDOWN, "the stack was closed")
                    if s.error is not None:
                        break
            with s.cond:
                rtts = [s.rtt[k] for k in sorted(s.rtt)]
                err = s.error
        finally:
            with self._lock:
                self._sessions.pop(s.ident, None)
        if rtts:
            return rtts
        if err is not None:
            raise err
        raise TimeoutError(errno.ETIMEDOUT, f"no echo reply from {ip_ntoa(dst)} ({count} sent)")

    def _open_session(self, dst: int) -> _PingSession:
        with self._lock:
            for _ in range(0x10000):  # bounded: there are 65536 identifiers
                ident = self._next_id
                self._next_id = (self._next_id + 1) & 0xFFFF
                if ident not in self._sessions:
                    s = _PingSession(ident, dst)
                    self._sessions[ident] = s
                    return s
        raise io_error(errno.EAGAIN, "every ICMP identifier is in use")

    def close(self) -> None:
        """Fail every running ping (the stack is closing)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            with s.cond:
                s.closed = True
                s.cond.notify_all()
