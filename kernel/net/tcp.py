"""TCP (RFC 9293): the protocol handler, connections and :class:`TcpSocket`.

Theory of operation
-------------------
*One socket is one connection.* A :class:`TcpSocket` carries the whole transmission
control block (RFC 9293 §3.3.1): SND.UNA/NXT/WND/WL1/WL2, ISS, RCV.NXT/WND, IRS, the
send buffer (bytes from SND.UNA on: unacknowledged, then unsent), the receive buffer
(in-order bytes not yet read) and the out-of-order queue. A listening socket keeps
its children: half-open ones (SYN-RECEIVED, the SYN queue) and established ones not yet
accepted (the accept queue), each bounded by the ``listen`` backlog; a SYN beyond that
is dropped and counted (``tcp_syn_dropped_backlog``), so a SYN flood costs bounded
memory.

*Locking.* One lock per :class:`TcpProtocol` guards every socket's state and the
tables. Receive processing, timers and socket calls take it, change state, and collect
the segments to send in a list; the segments go to IP after the lock is released,
through one transmit queue drained by whichever thread got there first (a thread that
finds the queue being drained only appends), so a synchronous link (loopback, a test
hub) that re-enters the stack never recurses without bound. A link whose transmit ring
is full (ENOBUFS) does not lose the segment: it stays at the head of the queue (counted
``tcp_tx_requeued``) and the queue is drained again by the next segment to send or by a
timer ``TX_RETRY_S`` later, as a qdisc would hold it.

*Receive* (RFC 9293 §3.10.7): checksum (unless the link vouched), header and options
(:mod:`kernel.net.tcp_wire`), demultiplexing to a connection or a listener, then the
event processing of the RFC: sequence acceptability, RST (RFC 5961 §3: only an exact
RCV.NXT match resets; another in-window RST gets a *challenge ACK*), SYN in a
synchronized state (challenge ACK, RFC 5961 §4), ACK (RFC 5961 §5: an ACK beyond SND.MAX
or too old is answered with an ACK and dropped), data (in order into the receive
buffer, out of order kept up to ``ooo_max_segments`` and reassembled) and FIN. A
segment for no connection is answered with a RST (RFC 9293 §3.10.7.1).

*Send.* ``send`` copies into the send buffer (bounded by SO_SNDBUF; a blocking call
waits for space) and pushes. The push sends while the usable window (the smaller of the
peer's window and the congestion window) allows, holding back a small segment while
data is unacknowledged (Nagle, RFC 896; off with TCP_NODELAY). With the route's
interface doing TSO (``tso4`` and checksum offload) one segment carries up to ~64 KiB
and IP hands it to the device with ``gso_size`` = MSS; otherwise segments are at most
one MSS (this stack never relies on IP fragmentation for TCP).

*Timers* (one :class:`~hostops.timers.TimerHeap` for the stack). Retransmission: RFC
6298 (SRTT/RTTVAR from timestamp echoes or, without timestamps, one timed segment at a
time with Karn's rule; RTO clamped to ``rto_min_s``..``rto_max_s``; doubled at each
expiry); after ``max_retries`` expiries the connection fails with ETIMEDOUT
(``syn_retries`` for a SYN). On expiry the congestion window drops to one segment and
sending restarts from SND.UNA. The persist timer probes a zero window (a zero-length
segment with an old sequence number, which the peer answers with an ACK carrying its
window) with the same back-off. Delayed ACKs: an ACK waits up to ``delack_s`` unless
two full segments are unacknowledged, data came out of order, or a FIN came. TIME-WAIT
lasts ``time_wait_s`` (short by default; 2*MSL would be minutes). SO_KEEPALIVE probes an
idle connection (RFC 1122 §4.2.3.6) and fails it with ETIMEDOUT when the probes go
unanswered.

*Congestion control*: NewReno (RFC 5681, RFC 6582). Initial window 10 segments (RFC
6928); slow start grows by the bytes acknowledged, congestion avoidance by about one
segment per window; three duplicate ACKs retransmit SND.UNA (fast retransmit) and enter
recovery (ssthresh = flight/2, window inflated by the duplicates); a partial ACK
retransmits the next hole; a full ACK deflates the window to ssthresh.

*Options*: MSS (from the route's MTU), window scale (the shift that makes SO_RCVBUF
fit 16 bits) and timestamps (RFC 7323; TSval in milliseconds; used for RTT and PAWS,
without the 24-day idle rule) are offered on a SYN and used if the peer offered them
too. SACK (RFC 2018) is neither offered nor used.

*Errors* are those of Linux: ECONNREFUSED (RST to our SYN), ECONNRESET (RST later),
ETIMEDOUT (retransmission limit), EPIPE (send after shutdown or after the peer reset
us and the reset was reported), ENOTCONN, EISCONN, EALREADY, EINPROGRESS, EADDRINUSE,
EINVAL. A pending error is reported once by the next call (or ``SO_ERROR``).
"""

from __future__ import annotations

import errno
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from hostops.clock import monotonic
from hostops.sync import Lock
from hostops.timers import TimerHandle
from vdev.virtio.packet import inet_sum, ipv4_pseudo_sum

from ..errors import io_error
from ..files import (
    AF_INET,
    IPPROTO_TCP,
    MSG_DONTWAIT,
    MSG_OOB,
    MSG_PEEK,
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLNVAL,
    POLLOUT,
    SHUT_RD,
    SHUT_RDWR,
    SHUT_WR,
    SO_ERROR,
    SO_KEEPALIVE,
    SO_RCVBUF,
    SO_REUSEADDR,
    SO_SNDBUF,
    SO_TYPE,
    SOCK_STREAM,
    SOL_SOCKET,
    SOL_TCP,
    TCP_NODELAY,
    SocketFile,
    deadline_after,
    inet_address,
    remaining,
    writable_view,
)
from .addr import ANY, ip_bytes, ip_ntoa, parse_ip
from .config import EPHEMERAL_PORTS
from .protocol import IPv4Packet, NetError
from .tcp_seq import seq_add, seq_ge, seq_gt, seq_le, seq_lt, seq_max, seq_sub
from .tcp_wire import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TCP_CSUM_OFFSET,
    Segment,
    SegmentError,
    build_segment,
    parse_segment,
)

if TYPE_CHECKING:
    from .route import Route
    from .stack import Stack

__all__ = [
    "TcpConfig",
    "TcpProtocol",
    "TcpSocket",
    "TCP_STAT_NAMES",
    "CLOSED",
    "LISTEN",
    "SYN_SENT",
    "SYN_RECEIVED",
    "ESTABLISHED",
    "FIN_WAIT_1",
    "FIN_WAIT_2",
    "CLOSE_WAIT",
    "CLOSING",
    "LAST_ACK",
    "TIME_WAIT",
]

#: TCP's counters in :attr:`kernel.net.stack.Stack.stats`.
TCP_STAT_NAMES = (
    "tcp_segments_in",
    "tcp_segments_out",
    "tcp_bad_checksum",
    "tcp_bad_header",
    "tcp_no_port",
    "tcp_rst_sent",
    "tcp_rst_received",
    "tcp_retransmits",
    "tcp_fast_retransmits",
    "tcp_timeouts",
    "tcp_dup_acks",
    "tcp_ooo_segments",
    "tcp_ooo_dropped",
    "tcp_out_of_window",
    "tcp_challenge_acks",
    "tcp_challenge_acks_limited",
    "tcp_syn_dropped_backlog",
    "tcp_accept_queue_full",
    "tcp_zero_window_probes",
    "tcp_active_opens",
    "tcp_passive_opens",
    "tcp_established",
    "tcp_conn_failed",
    "tcp_resets",
    "tcp_gso_segments",
    "tcp_tx_errors",
    "tcp_tx_requeued",
    "tcp_delayed_acks",
    "tcp_keepalive_probes",
    "tcp_paws_rejected",
)

CLOSED = "CLOSED"
LISTEN = "LISTEN"
SYN_SENT = "SYN-SENT"
SYN_RECEIVED = "SYN-RECEIVED"
ESTABLISHED = "ESTABLISHED"
FIN_WAIT_1 = "FIN-WAIT-1"
FIN_WAIT_2 = "FIN-WAIT-2"
CLOSE_WAIT = "CLOSE-WAIT"
CLOSING = "CLOSING"
LAST_ACK = "LAST-ACK"
TIME_WAIT = "TIME-WAIT"

_SYNCHRONIZED = frozenset(
    {ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT, CLOSING, LAST_ACK, TIME_WAIT}
)
_CAN_RECEIVE = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2})
_CAN_SEND = frozenset({ESTABLISHED, CLOSE_WAIT})

_MIN_BUF = 4096
_MAX_BUF = 16 * 1024 * 1024
#: How soon segments held back by a full transmit ring are tried again (seconds).
TX_RETRY_S = 0.001
_MAX_TSO = 65535 - 20 - 60  # IP total length minus the largest IP and TCP headers


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """TCP's tunables (a stack has one: ``stack.tcp.config``; replace it before
    making sockets). Timeouts are seconds; tests make them small."""

    #: Initial retransmission timeout (RFC 6298 §2.1: 1 s).
    rto_initial_s: float = 1.0
    #: Lower bound of the RTO (Linux: 200 ms; RFC 6298 §2.4 says 1 s).
    rto_min_s: float = 0.2
    #: Upper bound of the RTO (RFC 6298 §2.5 allows >= 60 s).
    rto_max_s: float = 60.0
    #: Retransmission timeouts of one segment before the connection fails (ETIMEDOUT).
    max_retries: int = 15
    #: ... of a SYN before ``connect`` fails (ETIMEDOUT).
    syn_retries: int = 6
    #: Longest an ACK is delayed (RFC 9293 §3.8.6.3: < 0.5 s; Linux 40 ms).
    delack_s: float = 0.04
    #: TIME-WAIT duration (2*MSL would be 60-240 s; short here, configurable).
    time_wait_s: float = 1.0
    #: An orphaned connection (closed by its owner) waits this long in FIN-WAIT-2.
    fin_timeout_s: float = 60.0
    #: Default SO_RCVBUF / SO_SNDBUF.
    rcvbuf: int = 1024 * 1024
    sndbuf: int = 1024 * 1024
    #: SO_KEEPALIVE: idle time before the first probe, time between probes, and
    #: unanswered probes before the connection fails with ETIMEDOUT (Linux defaults).
    keepalive_idle_s: float = 7200.0
    keepalive_intvl_s: float = 75.0
    keepalive_probes: int = 9
    #: Out-of-order segments kept per connection (beyond: dropped, counted).
    ooo_max_segments: int = 256
    #: Challenge ACKs per second for the whole stack (RFC 5961 §7).
    challenge_acks_per_s: int = 1000
    #: Offer the timestamps and window scale options (RFC 7323).
    timestamps: bool = True
    window_scaling: bool = True
    #: The initial send sequence (None: random). Tests inject one (e.g. near 2**32).
    isn: Callable[[], int] | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("isn", "timestamps", "window_scaling"):
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise ValueError(f"TcpConfig.{f.name} must be a positive number, not {v!r}")


@dataclass(slots=True)
class _Out:
    """One segment ready for IP."""

    dst: int
    src: int
    seg: bytearray
    gso_size: int
    route: Route | None


class TcpProtocol:
    """The TCP handler of a stack (protocol 6): port table, demultiplexing, timers."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        #: The tunables (replace before making sockets).
        self.config = TcpConfig()
        self._lock = Lock()
        self._conns: dict[tuple[int, int, int, int], TcpSocket] = {}
        self._listeners: dict[int, list[TcpSocket]] = {}
        self._bound: dict[int, list[TcpSocket]] = {}
        self._sockets: set[TcpSocket] = set()
        lo, hi = EPHEMERAL_PORTS
        self._cursor = lo + int.from_bytes(os.urandom(2), "big") % (hi - lo + 1)
        self._txq: deque[_Out] = deque()
        self._txlock = Lock()
        self._draining = False
        self._retry: TimerHandle | None = None
        self._challenge_window = 0
        self._challenge_count = 0
        self._closed = False

    # ------------------------------------------------------------------ sockets
    def socket(self) -> TcpSocket:
        """A new unbound socket."""
        s = TcpSocket(self)
        with self._lock:
            self._sockets.add(s)
        return s

    def connections(self) -> list[tuple[str, tuple[str, int], tuple[str, int]]]:
        """``(state, local, remote)`` of every connection (for tests and listings)."""
        with self._lock:
            return [
                (s.state, (ip_ntoa(k[0]), k[1]), (ip_ntoa(k[2]), k[3]))
                for k, s in self._conns.items()
            ]

    def isn(self) -> int:
        """A fresh initial sequence number (RFC 9293 §3.4.1; random here)."""
        f = self.config.isn
        return (f() if f is not None else int.from_bytes(os.urandom(4), "big")) & 0xFFFFFFFF

    # -- the port table (lock held)
    def _conflicts(self, sock: TcpSocket, addr: int, port: int) -> bool:
        for other in self._bound.get(port, ()):  # bounded by the sockets on the port
            if other is sock:
                continue
            if other.laddr != ANY and addr != ANY and other.laddr != addr:
                continue
            if sock.reuseaddr and other.state != LISTEN and (other.reuseaddr or other.orphan):
                continue
            return True
        return False

    def _bind_locked(self, sock: TcpSocket, addr: int, port: int) -> None:
        if port == 0:
            port = self._ephemeral_locked()
        elif self._conflicts(sock, addr, port):
            raise io_error(errno.EADDRINUSE, f"{ip_ntoa(addr)}:{port}")
        sock.laddr, sock.lport = addr, port
        self._bound.setdefault(port, []).append(sock)

    def _ephemeral_locked(self) -> int:
        lo, hi = EPHEMERAL_PORTS
        for _ in range(hi - lo + 1):  # bounded: one pass over the range
            port = self._cursor
            self._cursor = lo if port >= hi else port + 1
            if port not in self._bound:
                return port
        raise io_error(errno.EADDRINUSE, "no free ephemeral port")

    def _unbind_locked(self, sock: TcpSocket) -> None:
        lst = self._bound.get(sock.lport)
        if lst is not None and sock in lst:
            lst.remove(sock)
            if not lst:
                del self._bound[sock.lport]

    def _forget_locked(self, sock: TcpSocket) -> None:
        """Remove a connection that reached CLOSED from every table."""
        if sock.key is not None and self._conns.get(sock.key) is sock:
            del self._conns[sock.key]
        if sock.parent is None:
            self._unbind_locked(sock)
        else:
            sock.parent._children_gone(sock)
        ls = self._listeners.get(sock.lport)
        if ls is not None and sock in ls:
            ls.remove(sock)
            if not ls:
                del self._listeners[sock.lport]
        if sock.orphan or sock.closed:
            self._sockets.discard(sock)
        sock._cancel_timers()

    # ------------------------------------------------------------------ output
    def _emit(self, out: list[_Out]) -> None:
        """Send collected segments (no TCP lock held); see "Locking"."""
        with self._txlock:
            if not out and not self._txq:
                return
            self._txq.extend(out)
            if self._draining:
                return
            self._draining = True
        st = self.stack
        while True:  # bounded by what the protocol produces; each pass sends one
            with self._txlock:
                if not self._txq:
                    self._draining = False
                    return
                o = self._txq.popleft()
            # send_ip may complete the checksum in place: keep the pseudo-header sum
            # for a segment that has to be sent again (ENOBUFS below)
            csum = o.seg[TCP_CSUM_OFFSET : TCP_CSUM_OFFSET + 2]
            try:
                st.send_ip(
                    o.dst,
                    IPPROTO_TCP,
                    o.seg,
                    src=o.src,
                    csum_offset=TCP_CSUM_OFFSET,
                    route=o.route,
                    gso_size=o.gso_size,
                )
                st.count("tcp_segments_out")
                if o.gso_size:
                    st.count("tcp_gso_segments")
            except OSError as e:
                if e.errno == errno.ENOBUFS and not self._closed:
                    # the transmit ring is full: like a qdisc, keep the segment (and
                    # those after it, in order) and try again when the ring has
                    # drained a little -- a local drop would cost a retransmission
                    o.seg[TCP_CSUM_OFFSET : TCP_CSUM_OFFSET + 2] = csum
                    with self._txlock:
                        self._txq.appendleft(o)
                        self._draining = False
                        arm = self._retry is None
                        if arm:
                            self._retry = st.timers.call_later(TX_RETRY_S, self._tx_retry)
                    st.count("tcp_tx_requeued")
                    return
                st.count("tcp_tx_errors")  # a lost segment: retransmission repairs it
            except Exception:
                st.count("tcp_tx_errors")

    def _tx_retry(self) -> None:
        """Timer: send what a full transmit ring held back."""
        with self._txlock:
            self._retry = None
            if self._closed:
                self._txq.clear()
                return
        self._emit([])

    def _raw(
        self,
        src: int,
        dst: int,
        sport: int,
        dport: int,
        seq: int,
        ack: int,
        flags: int,
        out: list[_Out],
    ) -> None:
        pseudo = ipv4_pseudo_sum(ip_bytes(src), ip_bytes(dst), IPPROTO_TCP, 20)
        seg = build_segment(sport, dport, seq, ack, flags, 0, pseudo)
        out.append(_Out(dst, src, seg, 0, None))

    def _reset_for(self, pkt: IPv4Packet, seg: Segment, out: list[_Out]) -> None:
        """The RST answering a segment with no connection (RFC 9293 §3.10.7.1)."""
        if seg.flags & RST or pkt.ip_broadcast or pkt.l2_broadcast:
            return
        if seg.flags & ACK:
            self._raw(pkt.dst, pkt.src, seg.dport, seg.sport, seg.ack, 0, RST, out)
        else:
            ack = seq_add(seg.seq, seg.seg_len)
            self._raw(pkt.dst, pkt.src, seg.dport, seg.sport, 0, ack, RST | ACK, out)
        self.stack.count("tcp_rst_sent")

    def challenge_ack_allowed(self) -> bool:
        """RFC 5961 §7: at most ``challenge_acks_per_s`` challenge ACKs a second."""
        now = int(monotonic())
        if now != self._challenge_window:
            self._challenge_window, self._challenge_count = now, 0
        if self._challenge_count >= self.config.challenge_acks_per_s:
            self.stack.count("tcp_challenge_acks_limited")
            return False
        self._challenge_count += 1
        self.stack.count("tcp_challenge_acks")
        return True

    # ------------------------------------------------------------------ input
    def input(self, pkt: IPv4Packet) -> None:
        """One TCP segment for this host."""
        st = self.stack
        d = pkt.payload
        if pkt.ip_broadcast or pkt.l2_broadcast:  # RFC 1122 §4.2.3.10: unicast only
            st.count("tcp_bad_header")
            return
        if not pkt.csum_valid:
            # RFC 9293 §3.1 Checksum: over the pseudo-header, header and data
            pseudo = ipv4_pseudo_sum(ip_bytes(pkt.src), ip_bytes(pkt.dst), IPPROTO_TCP, len(d))
            if inet_sum(d, pseudo) % 0xFFFF:
                st.count("tcp_bad_checksum")
                return
        try:
            seg = parse_segment(d)
        except SegmentError as e:
            st.count(e.counter)
            return
        st.count("tcp_segments_in")
        out: list[_Out] = []
        wake: list[TcpSocket] = []
        with self._lock:
            if self._closed:
                return
            sock = self._conns.get((pkt.dst, seg.dport, pkt.src, seg.sport))
            if sock is not None:
                sock._segment(pkt, seg, out, wake)
            else:
                lst = self._listener_for(pkt.dst, seg.dport)
                if lst is not None:
                    lst._listen_input(pkt, seg, out, wake)
                else:
                    st.count("tcp_no_port")
                    self._reset_for(pkt, seg, out)
        for s in wake:
            s.wake()
        self._emit(out)

    def _listener_for(self, addr: int, port: int) -> TcpSocket | None:
        best = None
        for s in self._listeners.get(port, ()):  # bounded by the listeners on the port
            if s.laddr == addr:
                return s
            if s.laddr == ANY:
                best = s
        return best

    def error(self, err: NetError) -> None:
        """An ICMP error about a segment we sent: a connection still in SYN-SENT fails
        with it (a hard error for an opening connection); others ignore it (soft)."""
        if len(err.l4) < 8:
            return
        sport, dport, seq = struct.unpack_from("!HHI", err.l4)
        wake: list[TcpSocket] = []
        with self._lock:
            s = self._conns.get((err.src, sport, err.dst, dport))
            if s is not None and s.state == SYN_SENT and seq == s.iss:
                s._fail(err.errno, wake)
        for w in wake:
            w.wake()

    def _timer(self, sock: TcpSocket, which: str) -> None:
        out: list[_Out] = []
        wake: list[TcpSocket] = []
        with self._lock:
            if self._closed:
                return
            sock._on_timer(which, out, wake)
        for s in wake:
            s.wake()
        self._emit(out)

    def close(self) -> None:
        """Abort every connection (the stack is closing; blocked callers get EBADF)."""
        with self._lock:
            self._closed = True
            socks = list(self._sockets) + list(self._conns.values())
            for s in socks:
                s._cancel_timers()
        with self._txlock:
            self._txq.clear()
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
        for s in socks:
            if not s.closed:
                s.closed = True
                SocketFile.close(s)


class TcpSocket(SocketFile):
    """An AF_INET/SOCK_STREAM socket and its connection (see the module docstring)."""

    kind = "tcp"
    family = AF_INET
    type = SOCK_STREAM
    proto = IPPROTO_TCP

    def __init__(self, tcp: TcpProtocol, parent: TcpSocket | None = None) -> None:
        super().__init__("socket:[TCP]")
        self._tcp = tcp
        self._stack = tcp.stack
        cfg = tcp.config
        self.state = CLOSED
        self.laddr = ANY
        self.lport = 0
        self.raddr = ANY
        self.rport = 0
        self.key: tuple[int, int, int, int] | None = None
        self.parent = parent
        self.route: Route | None = None
        self.reuseaddr = False
        self.nodelay = False
        self.keepalive = False
        self.rcvbuf = cfg.rcvbuf
        self.sndbuf = cfg.sndbuf
        #: Closed by its owner but still finishing (FIN, TIME-WAIT) in the background.
        self.orphan = False
        self.error = 0
        self._connecting = False  # a non-blocking connect is in progress
        self._ever_connected = False
        self.shut_rd = False
        self.shut_wr = False
        # listening
        self.backlog = 0
        self._syn_queue: list[TcpSocket] = []
        self._accept_queue: deque[TcpSocket] = deque()
        # send side (RFC 9293 §3.3.1)
        self.iss = 0
        self.snd_una = 0
        self.snd_nxt = 0
        self.snd_max = 0
        self.snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.max_snd_wnd = 0
        self.sndq = bytearray()  # from SND.UNA: unacked then unsent data
        self.fin_queued = False
        self.fin_seq: int | None = None  # the sequence number our FIN took
        self.mss = 536  # RFC 9293 §3.7.1 default send MSS
        self.seg_size = 536  # payload per full segment (MSS less options)
        self.snd_wscale = 0
        self.rcv_wscale = 0
        self.ws_ok = False
        self.ts_ok = False
        self.ts_recent = 0
        # receive side
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_adv = 0  # right edge we advertised
        self.rcvq = bytearray()
        self.ooo: dict[int, tuple[bytes, bool]] = {}
        self.fin_received = False
        self._unacked_rx = 0
        # congestion (RFC 5681 / 6582)
        self.cwnd = 0
        self.ssthresh = 0x7FFFFFFF
        self.dupacks = 0
        self.recover: int | None = None
        # RTT (RFC 6298)
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = cfg.rto_initial_s
        self.retries = 0
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        # timers
        self._rtx_deadline: float | None = None
        self._rtx_timer: TimerHandle | None = None
        self._persist = False
        #: zero-window probes sent since the peer was last heard (persist timer)
        self._probes_unanswered = 0
        self._delack: TimerHandle | None = None
        self._tw_timer: TimerHandle | None = None
        self._ka_timer: TimerHandle | None = None
        self._last_rx = 0.0
        self._ka_sent = 0

    # ================================================================== helpers
    @property
    def _cfg(self) -> TcpConfig:
        return self._tcp.config

    def _check_open(self) -> None:
        if self.closed:
            raise io_error(errno.EBADF)

    def _take_error(self) -> int:
        e, self.error = self.error, 0
        return e

    def _now(self) -> float:
        return monotonic()

    def _ts_val(self) -> int:
        return int(self._now() * 1000) & 0xFFFFFFFF

    def _rcv_window(self) -> int:
        """Free receive-buffer space (what the window follows)."""
        held = len(self.rcvq) + sum(len(d) for d, _ in self.ooo.values())
        return max(0, self.rcvbuf - held)

    def _mk(
        self, seq: int, flags: int, data: bytes | bytearray | memoryview = b"", gso: int = 0
    ) -> _Out:
        """A segment of this connection (its header filled in at this moment)."""
        syn = bool(flags & SYN)
        if syn:
            wnd = min(self._rcv_window(), 0xFFFF)  # never scaled (RFC 7323 §2.2)
            if flags & ACK:
                self.rcv_adv = seq_add(self.rcv_nxt, wnd)
        else:
            w = self._rcv_window()
            # never shrink the window we already offered (RFC 9293 §3.8.6.2.2)
            w = max(w, seq_sub(self.rcv_adv, self.rcv_nxt))
            wnd = min(w >> self.rcv_wscale, 0xFFFF)
            self.rcv_adv = seq_add(self.rcv_nxt, wnd << self.rcv_wscale)
        if flags & ACK:
            self._unacked_rx = 0
            if self._delack is not None:
                self._delack.cancel()
                self._delack = None
        ts = None
        if (syn and self._cfg.timestamps and (self.ts_ok or not flags & ACK)) or (
            not syn and self.ts_ok
        ):
            ts = (self._ts_val(), self.ts_recent if flags & ACK else 0)
        mss = wscale = None
        if syn:
            mss = self._local_mss()
            if self._cfg.window_scaling and (self.ws_ok or not flags & ACK):
                wscale = self.rcv_wscale
        opt_len = (4 if mss else 0) + (4 if wscale is not None else 0) + (12 if ts else 0)
        length = 20 + opt_len + len(data)
        pseudo = ipv4_pseudo_sum(ip_bytes(self.laddr), ip_bytes(self.raddr), IPPROTO_TCP, length)
        seg = build_segment(
            self.lport,
            self.rport,
            seq,
            self.rcv_nxt if flags & ACK else 0,
            flags,
            wnd,
            pseudo,
            data,
            mss=mss,
            wscale=wscale,
            ts=ts,
        )
        return _Out(self.raddr, self.laddr, seg, gso, self.route)

    def _local_mss(self) -> int:
        mtu = self.route.iface.mtu if self.route is not None else 576
        return max(mtu - 40, 88)

    def _ack_now(self, out: list[_Out]) -> None:
        out.append(self._mk(self.snd_nxt, ACK))

    def _schedule_ack(self, out: list[_Out], nbytes: int) -> None:
        self._unacked_rx += nbytes
        if self._unacked_rx >= 2 * self.seg_size:
            self._ack_now(out)
        elif self._delack is None:
            self._stack.count("tcp_delayed_acks")
            self._delack = self._arm(self._cfg.delack_s, "delack")

    def _arm(self, delay: float, which: str) -> TimerHandle:
        tcp = self._tcp
        return self._stack.timers.call_later(delay, lambda: tcp._timer(self, which))

    def _set_rtx(self) -> None:
        """(Re)start the retransmission timer: RTO from now."""
        self._rtx_deadline = self._now() + self.rto
        if self._rtx_timer is None or self._rtx_timer.fired or self._rtx_timer.cancelled:
            self._rtx_timer = self._arm(self.rto, "rtx")

    def _stop_rtx(self) -> None:
        self._rtx_deadline = None
        self._persist = False

    def _cancel_timers(self) -> None:
        for t in (self._rtx_timer, self._delack, self._tw_timer, self._ka_timer):
            if t is not None:
                t.cancel()
        self._rtx_timer = self._delack = self._tw_timer = self._ka_timer = None
        self._rtx_deadline = None

    def _set_state(self, state: str, wake: list[TcpSocket]) -> None:
        self.state = state
        wake.append(self)

    def _fail(self, code: int, wake: list[TcpSocket]) -> None:
        """The connection is gone with ``code`` (reported once to the owner)."""
        if self.state == SYN_SENT or (self.state == SYN_RECEIVED and self.parent is None):
            self._stack.count("tcp_conn_failed")
        self.error = code
        self._connecting = False
        self.sndq.clear()
        self._to_closed(wake)

    def _to_closed(self, wake: list[TcpSocket]) -> None:
        self._set_state(CLOSED, wake)
        self._tcp._forget_locked(self)
        self.shut_wr = True

    def _enter_time_wait(self, wake: list[TcpSocket]) -> None:
        self._set_state(TIME_WAIT, wake)
        self._stop_rtx()
        if self._tw_timer is not None:
            self._tw_timer.cancel()
        self._tw_timer = self._arm(self._cfg.time_wait_s, "timewait")

    # ================================================================== RTT (RFC 6298)
    def _rtt_sample(self, r: float) -> None:
        cfg = self._cfg
        if self.srtt is None:  # §2.2
            self.srtt, self.rttvar = r, r / 2
        else:  # §2.3, alpha 1/8, beta 1/4
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        self.rto = min(max(self.srtt + max(0.001, 4 * self.rttvar), cfg.rto_min_s), cfg.rto_max_s)

    # ================================================================== output
    def _flight(self) -> int:
        return seq_sub(self.snd_nxt, self.snd_una)

    def _push(self, out: list[_Out], wake: list[TcpSocket] | None = None) -> None:
        """Send what the windows allow (see "Send")."""
        if self.state not in _SYNCHRONIZED or self.state == TIME_WAIT:
            return
        seg_size = self.seg_size
        max_chunk = self._max_chunk()
        for _ in range(4096):  # bounded: each pass sends >= 1 byte or stops
            off = seq_sub(self.snd_nxt, self.snd_una)
            avail = len(self.sndq) - off
            wnd = min(self.snd_wnd, self.cwnd)
            usable = wnd - self._flight()
            if avail <= 0:
                if (
                    self.fin_queued
                    and self.fin_seq is None
                    and avail == 0
                    and self.state in (ESTABLISHED, CLOSE_WAIT)
                ):
                    self.fin_seq = self.snd_nxt
                    out.append(self._mk(self.snd_nxt, FIN | ACK))
                    self.snd_nxt = seq_add(self.snd_nxt, 1)
                    self.snd_max = seq_max(self.snd_max, self.snd_nxt)
                    if self.state == ESTABLISHED:
                        self.state = FIN_WAIT_1
                    else:
                        self.state = LAST_ACK
                    if wake is not None:
                        wake.append(self)
                    if self._rtx_deadline is None or self._persist:
                        self._persist = False
                        self._set_rtx()
                elif (
                    self.fin_seq is not None
                    and self.snd_nxt == self.fin_seq
                    and self.state in (FIN_WAIT_1, LAST_ACK, CLOSING)
                ):  # go-back-N reached the FIN again: resend it
                    out.append(self._mk(self.snd_nxt, FIN | ACK))
                    self.snd_nxt = seq_add(self.snd_nxt, 1)
                return
            n = min(avail, usable, max_chunk)
            if n <= 0:
                if self.snd_wnd == 0 and self._flight() == 0 and self._rtx_deadline is None:
                    self._persist = True  # RFC 9293 §3.8.6.1: probe a zero window
                    self._set_rtx()
                return
            if n < seg_size and n < avail and self._flight() > 0:
                return  # sender SWS avoidance (RFC 9293 §3.8.6.2.1)
            if n < seg_size and self._flight() > 0 and not self.nodelay and not self.fin_queued:
                return  # Nagle (RFC 896): one small segment in flight at a time
            data = self.sndq[off : off + n]
            flags = ACK | (PSH if n == avail else 0)
            gso = seg_size if n > seg_size else 0
            if self._rtt_seq is None and not self.ts_ok and self.snd_nxt == self.snd_max:
                self._rtt_seq, self._rtt_time = seq_add(self.snd_nxt, n), self._now()
            out.append(self._mk(self.snd_nxt, flags, data, gso))
            if seq_lt(self.snd_nxt, self.snd_max):
                self._stack.count("tcp_retransmits")
            self.snd_nxt = seq_add(self.snd_nxt, n)
            self.snd_max = seq_max(self.snd_max, self.snd_nxt)
            if self._rtx_deadline is None or self._persist:
                self._persist = False
                self._set_rtx()

    def _max_chunk(self) -> int:
        """Payload bytes one segment may carry: one MSS, or ~64 KiB with TSO."""
        iface = self.route.iface if self.route is not None else None
        if iface is not None and iface.tso4 and iface.tx_csum:
            return (_MAX_TSO // self.seg_size) * self.seg_size
        return self.seg_size

    def _retransmit_first(self, out: list[_Out]) -> None:
        """Resend the segment at SND.UNA (fast retransmit, partial ACK). With TSO what
        is lost is usually a whole super-frame (a device or the switch dropped it), so
        a whole super-frame is resent; without SACK one MSS would repair ~45 times
        slower."""
        n = min(len(self.sndq), self._max_chunk(), max(self._flight(), self.seg_size))
        if n > 0:
            gso = self.seg_size if n > self.seg_size else 0
            out.append(self._mk(self.snd_una, ACK, self.sndq[:n], gso))
        elif self.fin_seq is not None:
            out.append(self._mk(self.snd_una, FIN | ACK))
        self._stack.count("tcp_retransmits")
        self._rtt_seq = None  # Karn: no sample from a retransmitted segment

    # ================================================================== timers
    def _arm_keepalive(self) -> None:
        if self.keepalive and self._ka_timer is None and self.state in _SYNCHRONIZED:
            self._ka_timer = self._arm(self._cfg.keepalive_idle_s, "keepalive")

    def _on_keepalive(self, out: list[_Out], wake: list[TcpSocket]) -> None:
        """SO_KEEPALIVE (RFC 1122 §4.2.3.6): after ``keepalive_idle_s`` without a
        segment from the peer, probe every ``keepalive_intvl_s`` (a segment with an
        old sequence number that the peer must ACK); fail after the last probe."""
        self._ka_timer = None
        cfg = self._cfg
        if not self.keepalive or self.state not in (ESTABLISHED, CLOSE_WAIT, FIN_WAIT_2):
            return
        idle = self._now() - self._last_rx
        if self._ka_sent == 0 and idle < cfg.keepalive_idle_s:
            self._ka_timer = self._arm(cfg.keepalive_idle_s - idle, "keepalive")
            return
        if self._ka_sent >= cfg.keepalive_probes:
            self._fail(errno.ETIMEDOUT, wake)
            return
        self._ka_sent += 1
        self._stack.count("tcp_keepalive_probes")
        out.append(self._mk(seq_add(self.snd_una, -1), ACK))
        self._ka_timer = self._arm(cfg.keepalive_intvl_s, "keepalive")

    def _on_timer(self, which: str, out: list[_Out], wake: list[TcpSocket]) -> None:
        if which == "keepalive":
            self._on_keepalive(out, wake)
            return
        if which == "delack":
            self._delack = None
            if self.state in _SYNCHRONIZED and self._unacked_rx:
                self._ack_now(out)
            return
        if which == "timewait":
            self._tw_timer = None
            if self.state in (TIME_WAIT, FIN_WAIT_2):
                self._to_closed(wake)
            return
        # retransmission / persist
        if self._rtx_deadline is None or self.state in (CLOSED, LISTEN, TIME_WAIT):
            self._rtx_timer = None
            return
        now = self._now()
        if now < self._rtx_deadline:
            self._rtx_timer = self._arm(self._rtx_deadline - now, "rtx")
            return
        self._rtx_timer = None
        cfg = self._cfg
        self.rto = min(self.rto * 2, cfg.rto_max_s)  # RFC 6298 §5.5
        if self._persist:
            if self.snd_wnd == 0 and self.sndq:
                # RFC 1122 §4.2.2.17: probe for as long as the peer answers; like Linux,
                # give up (ETIMEDOUT) after max_retries probes that got no answer at all
                # (a peer that vanished with its window closed).
                if self._probes_unanswered:
                    self._stack.count("tcp_timeouts")
                    if self._probes_unanswered > cfg.max_retries:
                        self._fail(errno.ETIMEDOUT, wake)
                        return
                self._probes_unanswered += 1
                self._stack.count("tcp_zero_window_probes")
                out.append(self._mk(seq_add(self.snd_una, -1), ACK))
                self._set_rtx()
            else:
                self._persist = False
                self._rtx_deadline = None
                self._push(out, wake)
            return
        self.retries += 1
        self._stack.count("tcp_timeouts")
        limit = cfg.syn_retries if self.state in (SYN_SENT, SYN_RECEIVED) else cfg.max_retries
        if self.retries > limit:
            if self.state == SYN_RECEIVED and self.parent is not None:
                self._to_closed(wake)  # a half-open child just goes away
            else:
                self._fail(errno.ETIMEDOUT, wake)
            return
        self._rtt_seq = None
        if self.state == SYN_SENT:
            self._stack.count("tcp_retransmits")
            out.append(self._mk(self.iss, SYN))
            self._set_rtx()
            return
        if self.state == SYN_RECEIVED:
            self._stack.count("tcp_retransmits")
            out.append(self._mk(self.iss, SYN | ACK))
            self._set_rtx()
            return
        # RFC 5681 §3.1 (4): ssthresh = max(FlightSize / 2, 2*SMSS), cwnd = 1 segment
        self.ssthresh = max(self._flight() // 2, 2 * self.seg_size)
        self.cwnd = self.seg_size
        self.dupacks = 0
        self.recover = self.snd_max  # RFC 6582 §3.2 (after a timeout)
        self.snd_nxt = self.snd_una
        if self.fin_seq is not None and not self.sndq:
            out.append(self._mk(self.snd_una, FIN | ACK))
            self.snd_nxt = seq_add(self.snd_una, 1)
            self._stack.count("tcp_retransmits")
        else:
            self._push(out, wake)
        self._set_rtx()

    # ================================================================== input
    def _listen_input(
        self, pkt: IPv4Packet, seg: Segment, out: list[_Out], wake: list[TcpSocket]
    ) -> None:
        """RFC 9293 §3.10.7.2: a segment for a listening socket."""
        tcp = self._tcp
        st = self._stack
        if seg.flags & RST:
            return
        if seg.flags & ACK:
            st.count("tcp_rst_sent")
            tcp._raw(pkt.dst, pkt.src, seg.dport, seg.sport, seg.ack, 0, RST, out)
            return
        if not seg.flags & SYN or seg.flags & FIN:
            return
        if len(self._syn_queue) >= self.backlog or len(self._accept_queue) >= self.backlog:
            st.count("tcp_syn_dropped_backlog")  # bounded SYN queue: drop, no state kept
            return
        c = TcpSocket(tcp, parent=self)
        c.laddr, c.lport, c.raddr, c.rport = pkt.dst, seg.dport, pkt.src, seg.sport
        c.rcvbuf, c.sndbuf, c.nodelay = self.rcvbuf, self.sndbuf, self.nodelay
        c.keepalive = self.keepalive
        try:
            c.route = st.route(pkt.src)
        except OSError:
            return
        c.key = (c.laddr, c.lport, c.raddr, c.rport)
        c._init_rcv_wscale()
        c._take_syn_options(seg)
        c.irs = seg.seq
        c.rcv_nxt = seq_add(seg.seq, 1)
        c.rcv_adv = c.rcv_nxt
        c.iss = tcp.isn()
        c.snd_una = c.iss
        c.snd_nxt = c.snd_max = seq_add(c.iss, 1)
        c.snd_wnd = seg.wnd  # never scaled in a SYN (RFC 7323 §2.2)
        c.snd_wl1, c.snd_wl2 = seg.seq, c.iss
        c.state = SYN_RECEIVED
        tcp._conns[c.key] = c
        self._syn_queue.append(c)
        st.count("tcp_passive_opens")
        out.append(c._mk(c.iss, SYN | ACK))
        c._set_rtx()

    def _children_gone(self, child: TcpSocket) -> None:
        if child in self._syn_queue:
            self._syn_queue.remove(child)
        if child in self._accept_queue:
            self._accept_queue.remove(child)

    def _init_rcv_wscale(self) -> None:
        s = 0
        if self._cfg.window_scaling:
            while (self.rcvbuf >> s) > 0xFFFF and s < 14:  # RFC 7323 §2.3: at most 14
                s += 1
        self.rcv_wscale = s

    def _take_syn_options(self, seg: Segment) -> None:
        """Use the options of the peer's SYN (RFC 9293 §3.7.1, RFC 7323)."""
        mss = seg.mss if seg.mss else 536  # RFC 9293 §3.7.1: 536 when absent
        self.mss = max(64, min(mss, self._local_mss()))
        if seg.wscale is None or not self._cfg.window_scaling:
            self.snd_wscale = self.rcv_wscale = 0  # RFC 7323 §2.2: both or neither
            self.ws_ok = False
        else:
            self.snd_wscale = seg.wscale
            self.ws_ok = True
        self.ts_ok = seg.ts is not None and self._cfg.timestamps
        if self.ts_ok and seg.ts is not None:
            self.ts_recent = seg.ts[0]
        self.seg_size = self.mss - (12 if self.ts_ok else 0)
        self.cwnd = 10 * self.seg_size  # RFC 6928

    def _segment(
        self, pkt: IPv4Packet, seg: Segment, out: list[_Out], wake: list[TcpSocket]
    ) -> None:
        """RFC 9293 §3.10.7.3/.4: a segment for this connection."""
        st = self._stack
        flags = seg.flags
        self._last_rx = self._now()
        self._ka_sent = 0
        if self.state == SYN_SENT:
            self._syn_sent_input(seg, out, wake)
            return
        # 0. PAWS (RFC 7323 §5.3 R1): a timestamp older than TS.Recent is an old
        # duplicate: ACK it and drop it (a RST is not subject to PAWS)
        if (
            self.ts_ok
            and seg.ts is not None
            and not flags & RST
            and seq_lt(seg.ts[0], self.ts_recent)
        ):
            st.count("tcp_paws_rejected")
            self._ack_now(out)
            return
        # 1. sequence acceptability (RFC 9293 §3.10.7.4, the four cases)
        slen = seg.seg_len
        rwnd = max(seq_sub(self.rcv_adv, self.rcv_nxt), 0)
        if slen == 0:
            ok = (seg.seq == self.rcv_nxt) if rwnd == 0 else self._in_rwnd(seg.seq, rwnd)
        else:
            last = seq_add(seg.seq, slen - 1)
            ok = rwnd > 0 and (self._in_rwnd(seg.seq, rwnd) or self._in_rwnd(last, rwnd))
            if not ok and rwnd == 0 and seg.seq == self.rcv_nxt:
                ok = True  # a zero-window probe: keep its ACK, drop its data below
                seg.data = seg.data[:0]
                seg.flags &= ~FIN
                flags = seg.flags
        if not ok:
            st.count("tcp_out_of_window")
            if not flags & RST:
                self._ack_now(out)
            return
        if self.ts_ok and seg.ts is not None and seq_le(seg.seq, self.rcv_nxt):
            self.ts_recent = seg.ts[0]  # RFC 7323 §4.3
        # 2. RST (RFC 5961 §3.2)
        if flags & RST:
            if seg.seq != self.rcv_nxt:
                if self._tcp.challenge_ack_allowed():
                    self._ack_now(out)
                return
            st.count("tcp_rst_received")
            if self.state == SYN_RECEIVED and self.parent is not None:
                self._to_closed(wake)
            elif self.state == SYN_RECEIVED:
                self._fail(errno.ECONNREFUSED, wake)
            elif self.state in (CLOSING, LAST_ACK, TIME_WAIT):
                self._to_closed(wake)
            else:
                st.count("tcp_resets")
                self._fail(errno.ECONNRESET, wake)
                self.rcvq.clear()
            return
        # 3. SYN in a synchronized state (RFC 5961 §4)
        if flags & SYN:
            if self.state == SYN_RECEIVED and self.parent is not None and seg.seq == self.irs:
                out.append(self._mk(self.iss, SYN | ACK))  # a retransmitted SYN
                return
            if self._tcp.challenge_ack_allowed():
                self._ack_now(out)
            return
        # 4. ACK
        if not flags & ACK:
            return
        if self.state == SYN_RECEIVED:
            if not (seq_lt(self.snd_una, seg.ack) and seq_le(seg.ack, self.snd_max)):
                st.count("tcp_rst_sent")
                self._tcp._raw(self.laddr, self.raddr, self.lport, self.rport, seg.ack, 0, RST, out)
                return
            parent = self.parent
            if parent is not None:
                if len(parent._accept_queue) >= max(parent.backlog, 1) or parent.closed:
                    st.count("tcp_accept_queue_full")  # drop the ACK; the peer retries
                    return
                parent._syn_queue.remove(self)
                parent._accept_queue.append(self)
                wake.append(parent)
            self._established(wake)
            self.snd_wnd = seg.wnd << self.snd_wscale
            self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
            self.snd_wl1, self.snd_wl2 = seg.seq, seg.ack
        if not self._ack_input(seg, out, wake):
            return
        if self.state == CLOSED:
            return
        # 6. data
        if seg.data and self.closed and self.state in (FIN_WAIT_1, FIN_WAIT_2, CLOSING):
            # nobody will read it: reset (as Linux does for a closed socket)
            out.append(self._mk(self.snd_nxt, RST | ACK))
            st.count("tcp_rst_sent")
            self._to_closed(wake)
            return
        if seg.data or flags & FIN:
            if self.state in _CAN_RECEIVE:
                self._data_input(seg, out, wake)
            elif self.state == TIME_WAIT and flags & FIN:
                self._ack_now(out)  # a retransmitted FIN: ACK and restart (RFC 9293)
                self._enter_time_wait(wake)
            else:
                self._ack_now(out)

    def _in_rwnd(self, s: int, rwnd: int) -> bool:
        return seq_le(self.rcv_nxt, s) and seq_lt(s, seq_add(self.rcv_nxt, rwnd))

    def _established(self, wake: list[TcpSocket]) -> None:
        self._set_state(ESTABLISHED, wake)
        self._ever_connected = True
        self._connecting = False
        self.retries = 0
        self._stop_rtx()
        self._stack.count("tcp_established")
        self._last_rx = self._now()
        self._arm_keepalive()

    def _syn_sent_input(self, seg: Segment, out: list[_Out], wake: list[TcpSocket]) -> None:
        """RFC 9293 §3.10.7.3."""
        st = self._stack
        flags = seg.flags
        if flags & ACK and not (seq_lt(self.iss, seg.ack) and seq_le(seg.ack, self.snd_max)):
            if not flags & RST:
                st.count("tcp_rst_sent")
                self._tcp._raw(self.laddr, self.raddr, self.lport, self.rport, seg.ack, 0, RST, out)
            return
        if flags & RST:
            if flags & ACK:  # RFC 5961 §3.2: acceptable ACK makes the RST acceptable
                st.count("tcp_rst_received")
                self._fail(errno.ECONNREFUSED, wake)
            return
        if not flags & SYN:
            return
        self.irs = seg.seq
        self.rcv_nxt = seq_add(seg.seq, 1)
        self.rcv_adv = self.rcv_nxt
        self._take_syn_options(seg)
        self.snd_wnd = seg.wnd
        self.snd_wl1, self.snd_wl2 = seg.seq, seg.ack
        if flags & ACK:
            if self.ts_ok and seg.ts is not None and seg.ts[1]:
                self._rtt_sample(max(0.0, (self._ts_val() - seg.ts[1]) & 0xFFFFFFFF) / 1000)
            elif self.retries == 0 and self._rtt_time:
                self._rtt_sample(self._now() - self._rtt_time)
            self.snd_una = seg.ack
            self._rtt_seq = None
            self._established(wake)
            self._ack_now(out)
            self._push(out, wake)
        else:  # simultaneous open (RFC 9293 §3.5, figure 7)
            self.state = SYN_RECEIVED
            out.append(self._mk(self.iss, SYN | ACK))
            self._set_rtx()

    def _ack_input(self, seg: Segment, out: list[_Out], wake: list[TcpSocket]) -> bool:
        """The ACK field (RFC 9293 §3.10.7.4 fifth step, RFC 5961 §5); False: drop."""
        self._probes_unanswered = 0  # the peer is alive (it answers, window or not)
        ack = seg.ack
        if seq_gt(ack, self.snd_max):  # acks something not yet sent
            self._ack_now(out)
            return False
        if seq_lt(ack, seq_add(self.snd_una, -max(self.max_snd_wnd, 65535))):
            if self._tcp.challenge_ack_allowed():  # RFC 5961 §5.2: too old
                self._ack_now(out)
            return False
        wnd = seg.wnd << self.snd_wscale
        acked = seq_sub(ack, self.snd_una)
        if acked > 0:
            self._on_new_ack(seg, ack, acked, out, wake)
        elif (
            acked == 0
            and not seg.data
            and not seg.flags & FIN
            and wnd == self.snd_wnd
            and self._flight() > 0
        ):
            self._on_dup_ack(out)
        # window update (RFC 9293 §3.10.7.4: SND.WL1/WL2 rule)
        if seq_lt(self.snd_wl1, seg.seq) or (self.snd_wl1 == seg.seq and seq_le(self.snd_wl2, ack)):
            opened = wnd > self.snd_wnd
            self.snd_wnd, self.snd_wl1, self.snd_wl2 = wnd, seg.seq, ack
            self.max_snd_wnd = max(self.max_snd_wnd, wnd)
            if opened and self._persist:
                self._persist = False
                self._rtx_deadline = None
            if opened:
                acked = max(acked, 1)
        if acked > 0:
            self._push(out, wake)
        # our FIN acknowledged?
        fin_acked = self.fin_seq is not None and seq_gt(ack, self.fin_seq)
        if fin_acked:
            if self.state == FIN_WAIT_1:
                self._set_state(FIN_WAIT_2, wake)
                if self.orphan:
                    if self._tw_timer is not None:
                        self._tw_timer.cancel()
                    self._tw_timer = self._arm(self._cfg.fin_timeout_s, "timewait")
            elif self.state == CLOSING:
                self._enter_time_wait(wake)
            elif self.state == LAST_ACK:
                self._to_closed(wake)
                return False
        return True

    def _on_new_ack(
        self, seg: Segment, ack: int, acked: int, out: list[_Out], wake: list[TcpSocket]
    ) -> None:
        cfg = self._cfg
        data_acked = min(acked, len(self.sndq))
        del self.sndq[:data_acked]
        self.snd_una = ack
        if seq_lt(self.snd_nxt, self.snd_una):
            self.snd_nxt = self.snd_una
        self.retries = 0
        # RTT sample (RFC 6298 §3; RFC 7323 §4)
        if self.ts_ok and seg.ts is not None and seg.ts[1]:
            r = ((self._ts_val() - seg.ts[1]) & 0xFFFFFFFF) / 1000
            if r < cfg.rto_max_s:
                self._rtt_sample(r)
        elif self._rtt_seq is not None and seq_ge(ack, self._rtt_seq):
            self._rtt_sample(self._now() - self._rtt_time)
            self._rtt_seq = None
        # congestion control
        if self.recover is not None and self.dupacks >= 3:
            if seq_ge(ack, self.recover):  # full ACK (RFC 6582 §3.2 step 3)
                self.cwnd = min(self.ssthresh, max(self._flight(), self.seg_size) + self.seg_size)
                self.dupacks = 0
                self.recover = None
            else:  # partial ACK: retransmit the next hole, deflate
                self._retransmit_first(out)
                self.cwnd = max(self.cwnd - acked + self.seg_size, self.seg_size)
        else:
            self.dupacks = 0
            if self.recover is not None and seq_ge(ack, self.recover):
                self.recover = None
            if self.cwnd < self.ssthresh:
                self.cwnd += acked  # slow start (bytes acknowledged)
            else:
                self.cwnd += max(1, self.seg_size * self.seg_size // max(self.cwnd, 1))
        self.cwnd = min(self.cwnd, 1 << 30)
        if self._flight() > 0:
            self._rtx_deadline = None
            self._set_rtx()
        else:
            self._stop_rtx()
        wake.append(self)  # send space freed

    def _on_dup_ack(self, out: list[_Out]) -> None:
        st = self._stack
        st.count("tcp_dup_acks")
        self.dupacks += 1
        if self.dupacks == 3:
            # RFC 5681 §3.2 steps 2-3, RFC 6582 §3.2 step 2
            st.count("tcp_fast_retransmits")
            self.ssthresh = max(self._flight() // 2, 2 * self.seg_size)
            self.recover = self.snd_max
            self._retransmit_first(out)
            self.cwnd = self.ssthresh + 3 * self.seg_size
        elif self.dupacks > 3:
            self.cwnd += self.seg_size  # inflate (RFC 5681 §3.2 step 4)
            self._push(out)

    def _data_input(self, seg: Segment, out: list[_Out], wake: list[TcpSocket]) -> None:
        """Text and FIN (RFC 9293 §3.10.7.4 seventh and eighth steps)."""
        st = self._stack
        data = seg.data
        s = seg.seq
        fin = bool(seg.flags & FIN)
        # trim what we already have (left edge)
        d = seq_sub(self.rcv_nxt, s)
        if d > 0:
            if d >= len(data):
                if fin and d == len(data):
                    data = data[:0]
                    s = self.rcv_nxt
                else:
                    self._ack_now(out)  # a duplicate: re-ACK
                    return
            else:
                data = data[d:]
                s = self.rcv_nxt
        # trim to the window (right edge)
        room = max(seq_sub(self.rcv_adv, s), 0)
        if len(data) > room:
            data = data[:room]
            fin = False
        if s != self.rcv_nxt:
            st.count("tcp_ooo_segments")
            if len(self.ooo) < self._cfg.ooo_max_segments and (data or fin):
                old = self.ooo.get(s)
                if old is None or len(old[0]) < len(data):
                    self.ooo[s] = (bytes(data), fin)
            else:
                st.count("tcp_ooo_dropped")
            self._ack_now(out)  # RFC 5681 §4.2: an immediate duplicate ACK
            return
        if self.shut_rd:
            pass  # data after SHUT_RD is discarded (as Linux does)
        else:
            self.rcvq += data
        self.rcv_nxt = seq_add(self.rcv_nxt, len(data))
        got = len(data)
        had_ooo = bool(self.ooo)
        for _ in range(self._cfg.ooo_max_segments + 1):  # bounded by the queue
            if fin or not self.ooo:
                break
            nxt = None
            for k in list(self.ooo):
                if seq_le(k, self.rcv_nxt):
                    dd, ff = self.ooo.pop(k)
                    skip = seq_sub(self.rcv_nxt, k)
                    if skip < len(dd) or (ff and skip == len(dd)):
                        nxt = (dd[skip:], ff)
                        break
            if nxt is None:
                break
            dd, ff = nxt
            if not self.shut_rd:
                self.rcvq += dd
            self.rcv_nxt = seq_add(self.rcv_nxt, len(dd))
            got += len(dd)
            fin = ff
        if got or fin:
            wake.append(self)
        if fin:
            self.rcv_nxt = seq_add(self.rcv_nxt, 1)
            self.fin_received = True
            self.ooo.clear()
            self._ack_now(out)
            if self.state == ESTABLISHED:
                self._set_state(CLOSE_WAIT, wake)
            elif self.state == FIN_WAIT_1:
                if self.fin_seq is not None and seq_gt(self.snd_una, self.fin_seq):
                    self._enter_time_wait(wake)
                else:
                    self._set_state(CLOSING, wake)
            elif self.state == FIN_WAIT_2:
                self._enter_time_wait(wake)
            return
        if had_ooo:
            self._ack_now(out)
        else:
            self._schedule_ack(out, got)

    # ================================================================== readiness
    def poll(self) -> int:
        """POLLIN: data, EOF or a pending connection; POLLOUT: connected with send
        space; POLLERR: a pending error; POLLHUP: both directions finished."""
        if self.closed:
            return POLLNVAL
        mask = 0
        st = self.state
        if st == LISTEN:
            return POLLIN if self._accept_queue else 0
        if self.error:
            mask |= POLLERR
        if self.rcvq or self.fin_received or self.shut_rd:
            mask |= POLLIN
        if st in (SYN_SENT, SYN_RECEIVED):
            return mask
        if st in _CAN_SEND and not self.shut_wr and len(self.sndq) < self.sndbuf:
            mask |= POLLOUT
        if st == CLOSED:
            mask |= POLLOUT | POLLHUP | (POLLIN if self._ever_connected else 0)
        elif self.shut_wr and (self.fin_received or self.shut_rd):
            mask |= POLLHUP
        return mask

    # ================================================================== addresses
    def bind(self, addr: tuple[str, int]) -> None:
        """Bind to ``(host, port)``: EADDRNOTAVAIL, EADDRINUSE, EINVAL if bound."""
        self._check_open()
        host, port = inet_address(addr)
        a = parse_ip(host)
        assert a is not None
        if a != ANY and not self._stack.is_local(a):
            raise io_error(errno.EADDRNOTAVAIL, f"{host} is not an address of this host")
        with self._tcp._lock:
            if self.lport or self.state != CLOSED:
                raise io_error(errno.EINVAL, "socket is already bound")
            self._tcp._bind_locked(self, a, port)

    def getsockname(self) -> tuple[str, int]:
        """The local address (``('0.0.0.0', 0)`` until bound)."""
        return ip_ntoa(self.laddr), self.lport

    def getpeername(self) -> tuple[str, int]:
        """The peer (ENOTCONN unless connected)."""
        if self.state in (CLOSED, LISTEN, SYN_SENT) or (
            self.state == SYN_RECEIVED and self.parent is None
        ):
            raise io_error(errno.ENOTCONN)
        return ip_ntoa(self.raddr), self.rport

    # ================================================================== listen / accept
    def listen(self, backlog: int = 128) -> None:
        """Listen with a SYN queue and an accept queue of ``backlog`` each (clamped to
        1..4096); binds to an ephemeral port if unbound. EINVAL when connected."""
        self._check_open()
        backlog = min(max(int(backlog), 1), 4096)
        with self._tcp._lock:
            if self.state == LISTEN:
                self.backlog = backlog
                return
            if self.state != CLOSED or self._ever_connected:
                raise io_error(errno.EINVAL, "socket is connected")
            if not self.lport:
                self._tcp._bind_locked(self, ANY, 0)
            for other in self._tcp._listeners.get(self.lport, ()):
                if other.laddr in (ANY, self.laddr) or self.laddr == ANY:
                    raise io_error(errno.EADDRINUSE, f"port {self.lport} has a listener")
            self.backlog = backlog
            self.state = LISTEN
            self._init_rcv_wscale()
            self._tcp._listeners.setdefault(self.lport, []).append(self)

    def accept(self) -> tuple[TcpSocket, tuple[str, int]]:
        """The next established connection and its peer (EINVAL unless listening)."""
        deadline = deadline_after(self.timeout)
        while True:  # ends with a connection, an error, or the deadline
            self._check_open()
            with self._tcp._lock:
                if self.state != LISTEN:
                    raise io_error(errno.EINVAL, "socket is not listening")
                if self._accept_queue:
                    c = self._accept_queue.popleft()
                    c.parent = None
                    self._tcp._bound.setdefault(c.lport, []).append(c)
                    self._tcp._sockets.add(c)
                    return c, (ip_ntoa(c.raddr), c.rport)
            self.wait_for(POLLIN, _left(self.timeout, deadline))

    # ================================================================== connect
    def connect(self, addr: tuple[str, int]) -> None:
        """Open a connection (blocking per the timeout; non-blocking: EINPROGRESS, then
        POLLOUT; EALREADY while in progress; EISCONN when connected)."""
        self._check_open()
        host, port = inet_address(addr)
        d = parse_ip(host)
        assert d is not None
        tcp = self._tcp
        out: list[_Out] = []
        with tcp._lock:
            if self.state == LISTEN:
                raise io_error(errno.EINVAL, "socket is listening")
            if self.state in (SYN_SENT, SYN_RECEIVED) and self._connecting:
                raise io_error(errno.EALREADY)
            if self.state != CLOSED or self._ever_connected:
                if self.state == CLOSED and self.error:
                    raise io_error(self._take_error())
                raise io_error(errno.EISCONN)
            if self.error:
                raise io_error(self._take_error())
            if port == 0 or d == ANY:
                raise io_error(errno.ECONNREFUSED if port == 0 else errno.EINVAL)
            route = self._stack.route(d)
            if not route.iface.up:
                raise io_error(errno.ENETDOWN, f"{route.iface.name} has no carrier")
            if not self.lport:
                tcp._bind_locked(self, ANY, 0)
            if self.laddr == ANY:
                self.laddr = route.src
            key = (self.laddr, self.lport, d, port)
            if key in tcp._conns:
                raise io_error(errno.EADDRNOTAVAIL, "that connection exists already")
            self.raddr, self.rport, self.route, self.key = d, port, route, key
            self._init_rcv_wscale()
            self.iss = tcp.isn()
            self.snd_una = self.iss
            self.snd_nxt = self.snd_max = seq_add(self.iss, 1)
            self.mss = self.seg_size = self._local_mss()
            self.state = SYN_SENT
            self._connecting = True
            self.retries = 0
            self._rtt_time = self._now()
            tcp._conns[key] = self
            self._stack.count("tcp_active_opens")
            out.append(self._mk(self.iss, SYN))
            self._set_rtx()
        tcp._emit(out)
        if self.timeout == 0.0:
            raise io_error(errno.EINPROGRESS)
        self._wait_connected(deadline_after(self.timeout))

    def _wait_connected(self, deadline: float | None) -> None:
        while True:  # ends when connected, failed, or at the deadline
            with self._tcp._lock:
                if self.state not in (SYN_SENT, SYN_RECEIVED):
                    if self.error:
                        raise io_error(self._take_error())
                    if self.state == CLOSED:
                        raise io_error(errno.ECONNREFUSED)
                    return
            try:
                self.wait_for(POLLOUT, _left(self.timeout, deadline))
            except OSError as e:
                if e.errno == errno.ETIMEDOUT:
                    raise TimeoutError(errno.ETIMEDOUT, "timed out") from None
                raise

    def connect_ex(self, addr: tuple[str, int]) -> int:
        """``connect`` returning the errno (0 on success) instead of raising."""
        try:
            self.connect(addr)
        except OSError as e:
            return e.errno or errno.EIO
        return 0

    # ================================================================== send
    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Queue up to all of ``data``; blocks (per the timeout) until some fits."""
        if flags & MSG_OOB:
            raise io_error(errno.EOPNOTSUPP, "MSG_OOB is not supported")
        mv = memoryview(data).cast("B")
        timeout = 0.0 if flags & MSG_DONTWAIT else self.timeout
        deadline = deadline_after(timeout)
        tcp = self._tcp
        while True:  # ends when something is queued, on an error, or at the deadline
            self._check_open()
            out: list[_Out] = []
            wake: list[TcpSocket] = []
            with tcp._lock:
                if self.error:
                    raise io_error(self._take_error())
                if self.shut_wr or self.fin_queued:
                    raise io_error(errno.EPIPE)
                if self.state in (SYN_SENT, SYN_RECEIVED) and timeout == 0.0:
                    raise io_error(errno.EAGAIN)
                if self.state not in _CAN_SEND and self.state not in (SYN_SENT, SYN_RECEIVED):
                    if self._ever_connected:
                        raise io_error(errno.EPIPE)
                    raise io_error(errno.ENOTCONN)
                room = self.sndbuf - len(self.sndq)
                if self.state in _CAN_SEND and room > 0:
                    n = min(room, mv.nbytes)
                    self.sndq += mv[:n]
                    self._push(out, wake)
                else:
                    n = -1
            if n >= 0:
                tcp._emit(out)
                for s in wake:
                    s.wake()
                return n
            self.wait_for(POLLOUT, _left(timeout, deadline))

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        """Send all of ``data`` (blocking; the timeout applies to each wait)."""
        mv = memoryview(data).cast("B")
        off = 0
        while off < mv.nbytes:  # bounded: each pass queues >= 1 byte or raises
            off += self.send(mv[off:], flags)

    # ================================================================== receive
    def recv(self, n: int, flags: int = 0) -> bytes:
        """Up to ``n`` bytes; b"" at end of stream. MSG_PEEK, MSG_DONTWAIT."""
        buf = bytearray(n)
        got = self._recv(memoryview(buf), n, flags)
        return bytes(buf[:got])

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Receive into ``buffer`` (at most ``nbytes``, 0: its size); the count. The
        bytes go from the receive queue to ``buffer`` in one copy."""
        mv = writable_view(buffer, nbytes, "recv_into")
        return self._recv(mv, mv.nbytes, flags)

    def recvfrom_into(
        self, buffer: Any, nbytes: int = 0, flags: int = 0
    ) -> tuple[int, tuple[str, int]]:
        """:meth:`recv_into` and the peer's address."""
        mv = writable_view(buffer, nbytes, "recvfrom_into")
        n = self._recv(mv, mv.nbytes, flags)
        return n, (ip_ntoa(self.raddr), self.rport)

    def recvfrom(self, n: int, flags: int = 0) -> tuple[bytes, tuple[str, int]]:
        """``recv`` and the peer's address."""
        data = self.recv(n, flags)
        return data, (ip_ntoa(self.raddr), self.rport)

    def _recv(self, buf: memoryview, n: int, flags: int) -> int:
        if flags & MSG_OOB:
            raise io_error(errno.EOPNOTSUPP, "MSG_OOB is not supported")
        timeout = 0.0 if flags & MSG_DONTWAIT else self.timeout
        deadline = deadline_after(timeout)
        tcp = self._tcp
        while True:  # ends with data, EOF, an error, or the deadline
            self._check_open()
            out: list[_Out] = []
            with tcp._lock:
                if self.state == LISTEN or (self.state == CLOSED and not self._ever_connected):
                    if self.error:
                        raise io_error(self._take_error())
                    raise io_error(errno.ENOTCONN)
                if self.rcvq and n > 0:
                    k = min(n, len(self.rcvq))
                    with memoryview(self.rcvq) as q:  # released before the del below
                        buf[:k] = q[:k]
                    if not flags & MSG_PEEK:
                        before = self._rcv_window()
                        del self.rcvq[:k]
                        self._window_update(before, out)
                    done = k
                elif self.error:
                    raise io_error(self._take_error())
                elif self.fin_received or self.shut_rd or self.state == CLOSED or n == 0:
                    done = 0
                else:
                    done = -1
            if done >= 0:
                tcp._emit(out)
                return done
            self.wait_for(POLLIN, _left(timeout, deadline))

    def _window_update(self, before: int, out: list[_Out]) -> None:
        """After a read: tell the peer when the window opened by enough (RFC 9293
        §3.8.6.2.2, receiver SWS avoidance)."""
        if self.state not in _CAN_RECEIVE:
            return
        offered = max(seq_sub(self.rcv_adv, self.rcv_nxt), 0)
        now = self._rcv_window()
        if now - offered >= min(self.rcvbuf // 2, 2 * self.seg_size) or (
            offered < self.seg_size <= now
        ):
            self._ack_now(out)

    # ================================================================== shutdown / close
    def shutdown(self, how: int) -> None:
        """SHUT_RD: further reads see EOF; SHUT_WR: send a FIN after the queued data;
        SHUT_RDWR both. ENOTCONN unless connected; EINVAL for another ``how``."""
        self._check_open()
        if how not in (SHUT_RD, SHUT_WR, SHUT_RDWR):
            raise io_error(errno.EINVAL, f"shutdown how={how}")
        tcp = self._tcp
        out: list[_Out] = []
        wake: list[TcpSocket] = [self]
        with tcp._lock:
            if self.state == LISTEN:
                if how != SHUT_WR:
                    self._abort_listener(out, wake)
                return
            if self.state in (CLOSED, SYN_SENT) or (
                self.state == SYN_RECEIVED and self.parent is None
            ):
                raise io_error(errno.ENOTCONN)
            if how in (SHUT_RD, SHUT_RDWR):
                self.shut_rd = True
                self.rcvq.clear()
            if how in (SHUT_WR, SHUT_RDWR) and not self.fin_queued:
                self.fin_queued = True
                self.shut_wr = True
                self._push(out, wake)
        tcp._emit(out)
        for s in wake:
            s.wake()

    def _abort_listener(self, out: list[_Out], wake: list[TcpSocket]) -> None:
        tcp = self._tcp
        for c in list(self._syn_queue) + list(self._accept_queue):
            out.append(c._mk(c.snd_nxt, RST | ACK))
            self._stack.count("tcp_rst_sent")
            c.orphan = True
            c._to_closed(wake)
        self._syn_queue.clear()
        self._accept_queue.clear()
        ls = tcp._listeners.get(self.lport)
        if ls is not None and self in ls:
            ls.remove(self)
            if not ls:
                del tcp._listeners[self.lport]
        self.state = CLOSED

    def close(self) -> None:
        """Close: a listener resets its pending connections; a connection with unread
        data is reset (as Linux does); otherwise a FIN follows the queued data and the
        connection finishes in the background. Blocked callers get EBADF."""
        if self.closed:
            return
        tcp = self._tcp
        out: list[_Out] = []
        wake: list[TcpSocket] = []
        with tcp._lock:
            self.closed = True
            self.orphan = True
            st = self.state
            if st == LISTEN:
                self._abort_listener(out, wake)
                tcp._unbind_locked(self)
                tcp._sockets.discard(self)
            elif st in (CLOSED, SYN_SENT) or (st == SYN_RECEIVED and self.parent is None):
                if st != CLOSED:
                    self._to_closed(wake)
                tcp._unbind_locked(self)
                tcp._sockets.discard(self)
            elif self.rcvq and not tcp._closed:
                out.append(self._mk(self.snd_nxt, RST | ACK))
                self._stack.count("tcp_rst_sent")
                self.rcvq.clear()
                self._to_closed(wake)
            elif st in (ESTABLISHED, CLOSE_WAIT, SYN_RECEIVED):
                self.fin_queued = True
                self.shut_wr = True
                self._push(out, wake)
                if self.state == FIN_WAIT_2 or (self.state == FIN_WAIT_1 and not self.sndq):
                    pass
            # FIN-WAIT-*, CLOSING, LAST-ACK, TIME-WAIT: finish in the background
            if self.state == FIN_WAIT_2:
                if self._tw_timer is None:
                    self._tw_timer = self._arm(self._cfg.fin_timeout_s, "timewait")
        tcp._emit(out)
        SocketFile.close(self)

    # ================================================================== options
    def setsockopt(self, level: int, option: int, value: Any) -> None:
        """SOL_SOCKET: SO_REUSEADDR, SO_RCVBUF, SO_SNDBUF (clamped to 4 KiB..16 MiB),
        SO_KEEPALIVE (probes per ``TcpConfig.keepalive_*``); SOL_TCP: TCP_NODELAY."""
        self._check_open()
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int):
            raise TypeError(f"socket option value must be an int, not {type(value).__name__}")
        out: list[_Out] = []
        with self._tcp._lock:
            if level == SOL_SOCKET and option == SO_REUSEADDR:
                self.reuseaddr = value != 0
            elif level == SOL_SOCKET and option == SO_RCVBUF:
                self.rcvbuf = min(max(value, _MIN_BUF), _MAX_BUF)
            elif level == SOL_SOCKET and option == SO_SNDBUF:
                self.sndbuf = min(max(value, _MIN_BUF), _MAX_BUF)
            elif level == SOL_SOCKET and option == SO_KEEPALIVE:
                self.keepalive = value != 0
                self._arm_keepalive()
            elif level == SOL_TCP and option == TCP_NODELAY:
                self.nodelay = value != 0
                if self.nodelay:
                    self._push(out)
            else:
                raise io_error(errno.ENOPROTOOPT)
        self._tcp._emit(out)

    def getsockopt(self, level: int, option: int) -> Any:
        """The options of :meth:`setsockopt`, SO_TYPE, SO_ERROR (read and clear)."""
        self._check_open()
        if level == SOL_SOCKET:
            if option == SO_REUSEADDR:
                return int(self.reuseaddr)
            if option == SO_RCVBUF:
                return self.rcvbuf
            if option == SO_SNDBUF:
                return self.sndbuf
            if option == SO_KEEPALIVE:
                return int(self.keepalive)
            if option == SO_TYPE:
                return SOCK_STREAM
            if option == SO_ERROR:
                with self._tcp._lock:
                    return self._take_error()
        elif level == SOL_TCP and option == TCP_NODELAY:
            return int(self.nodelay)
        raise io_error(errno.ENOPROTOOPT)

    def __repr__(self) -> str:
        return (
            f"<TcpSocket {ip_ntoa(self.laddr)}:{self.lport} -> {ip_ntoa(self.raddr)}:"
            f"{self.rport} {self.state}{' closed' if self.closed else ''}>"
        )


def _left(timeout: float | None, deadline: float | None) -> float | None:
    """What ``wait_for`` gets: the time left, keeping 0.0 (non-blocking) as is."""
    if timeout == 0.0:
        return 0.0
    left = remaining(deadline)
    if left is not None and left <= 0:
        raise TimeoutError(errno.ETIMEDOUT, "timed out")
    return left
