"""UDP (RFC 768): the protocol handler and :class:`UdpSocket`.

Theory of operation
-------------------
*Ports.* Bound sockets live in a table keyed by local port. Two sockets may share a
port only if both set SO_REUSEADDR before binding, or their local addresses differ and
neither is 0.0.0.0 (Linux's rule); otherwise ``bind`` fails with EADDRINUSE. Port 0
(and the implicit bind of a first ``send``/``connect``) takes a free ephemeral port from
32768..60999 (Linux's range), searched from a rotating cursor.

*Receive.* The header is checked (8 bytes; RFC 768 Length >= 8 and within the IP
payload; shorter is a truncated datagram, longer IP payload is trimmed), then the
checksum (RFC 768: over the pseudo-header, header and data; 0 means the sender did
not compute one) unless the link vouched for it (``RxInfo.csum_valid``, or a partial
checksum from a local peer) or the packet never left this host. The datagram goes to
the best matching socket as Linux scores them: a connected socket must be connected to
the sender, a socket bound to an address must be bound to the destination; connected
beats bound beats wildcard; among equals the last bound. A broadcast goes to every
matching socket. Each socket queues datagrams up to SO_RCVBUF bytes (each charged its
length plus :data:`DATAGRAM_OVERHEAD`; one datagram is always accepted into an empty
queue); beyond that they are dropped and counted (``udp_rcvbuf_dropped`` and the
socket's ``drops``). No socket: ``udp_no_port`` and, unless it was a broadcast, an ICMP
port unreachable (rate limited).

*Errors.* An ICMP error quoting a datagram we sent (or a failed ARP resolution,
reported as host unreachable) is matched to the socket by the quoted addresses and
ports. As on Linux without IP_RECVERR, only a *connected* socket takes it: its next
``send``/``sendto``/``recv``/``recvfrom`` raises it once (ECONNREFUSED for port
unreachable, EHOSTUNREACH for host unreachable ...), ``poll`` shows POLLERR until then,
and ``getsockopt(SO_ERROR)`` reads and clears it. Unconnected sockets ignore errors.

*Send.* ``sendto`` checks in this order: EBADF (closed), a pending error, EMSGSIZE
(more than 65507 bytes: 65535 - 20 - 8), EINVAL (port 0), EACCES (a broadcast
destination without SO_BROADCAST), ENETUNREACH (no route), ENETDOWN (the interface's
carrier is down). Then the socket is bound if it was not, and the datagram goes to IP
with the checksum left partial (the pseudo-header sum in the field) so that IP can hand
it to a link with checksum offload, or complete it in software. A datagram whose next
hop is still being resolved is queued (``send`` returns at once); a failed resolution
shows as described in :mod:`kernel.net.arp`. When the link has no room the datagram is
dropped and ``sendto`` raises ``OSError(ENOBUFS)`` at once — Linux would block on the
socket's send buffer or drop silently at the queueing discipline; we report it so a
caller can retry (``tx_dropped_nobufs`` counts it). ``send`` never blocks.

*Receive calls.* ``recvfrom(n)`` returns one datagram (truncated to ``n`` bytes; the rest
of it is discarded, as datagram sockets do) and the sender's ``(host, port)``; it blocks
per the socket timeout (``TimeoutError``; non-blocking: ``BlockingIOError`` EAGAIN).
``close`` unbinds, drops the queue and wakes blocked callers, who get EBADF.
"""

from __future__ import annotations

import errno
import os
import struct
from collections import deque
from typing import TYPE_CHECKING, Any

from hostops.sync import Lock
from vdev.virtio.packet import inet_sum, ipv4_pseudo_sum

from ..errors import io_error
from ..files import (
    AF_INET,
    IP_TTL,
    IPPROTO_UDP,
    MSG_DONTWAIT,
    MSG_OOB,
    MSG_PEEK,
    POLLERR,
    POLLIN,
    POLLNVAL,
    POLLOUT,
    SO_BROADCAST,
    SO_ERROR,
    SO_RCVBUF,
    SO_REUSEADDR,
    SO_TYPE,
    SOCK_DGRAM,
    SOL_IP,
    SOL_SOCKET,
    SocketFile,
    deadline_after,
    inet_address,
    remaining,
    writable_view,
)
from .addr import ANY, ip_bytes, ip_ntoa, parse_ip
from .config import EPHEMERAL_PORTS
from .protocol import IPv4Packet, NetError

if TYPE_CHECKING:
    from .stack import Stack

__all__ = [
    "UdpProtocol",
    "UdpSocket",
    "UDP_HDR",
    "MAX_UDP_PAYLOAD",
    "DATAGRAM_OVERHEAD",
    "MIN_RCVBUF",
    "MAX_RCVBUF",
]

UDP_HDR = struct.Struct("!HHHH")
#: 65535 - 20 (IPv4 header) - 8 (UDP header).
MAX_UDP_PAYLOAD = 65507
#: Bytes a queued datagram is charged against SO_RCVBUF beyond its data.
DATAGRAM_OVERHEAD = 64
#: SO_RCVBUF is clamped to this range.
MIN_RCVBUF = 1024
MAX_RCVBUF = 16 * 1024 * 1024
_CSUM_OFFSET = 6  # the checksum field, from the start of the UDP header


class UdpProtocol:
    """The UDP handler of a stack (registered for protocol 17) and its port table."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self._lock = Lock()
        self._ports: dict[int, list[UdpSocket]] = {}
        self._sockets: set[UdpSocket] = set()
        lo, hi = EPHEMERAL_PORTS
        self._cursor = lo + int.from_bytes(os.urandom(2), "big") % (hi - lo + 1)

    def socket(self) -> UdpSocket:
        """A new unbound socket."""
        s = UdpSocket(self)
        with self._lock:
            self._sockets.add(s)
        return s

    # -- the port table
    def _conflicts(self, sock: UdpSocket, addr: int, port: int) -> bool:
        for other in self._ports.get(port, ()):
            if other is sock:
                continue
            if other.laddr != ANY and addr != ANY and other.laddr != addr:
                continue
            if other.reuseaddr and sock.reuseaddr:
                continue
            return True
        return False

    def bind(self, sock: UdpSocket, addr: int, port: int) -> None:
        """Bind ``sock`` (EINVAL if already bound, EADDRINUSE on a conflict)."""
        with self._lock:
            if sock.lport:
                raise io_error(errno.EINVAL, "socket is already bound")
            self._bind_locked(sock, addr, port)

    def _bind_locked(self, sock: UdpSocket, addr: int, port: int) -> None:
        if sock.closed:
            raise io_error(errno.EBADF)
        if port == 0:
            port = self._ephemeral_locked()
        elif self._conflicts(sock, addr, port):
            raise io_error(errno.EADDRINUSE, f"{ip_ntoa(addr)}:{port}")
        sock.laddr, sock.lport = addr, port
        self._ports.setdefault(port, []).append(sock)

    def _ephemeral_locked(self) -> int:
        lo, hi = EPHEMERAL_PORTS
        span = hi - lo + 1
        for _ in range(span):  # bounded: one pass over the range
            port = self._cursor
            self._cursor = lo if port >= hi else port + 1
            if port not in self._ports:
                return port
        raise io_error(errno.EADDRINUSE, "no free ephemeral port")

    def autobind(self, sock: UdpSocket) -> None:
        """Bind an unbound socket to 0.0.0.0 and an ephemeral port."""
        with self._lock:
            if not sock.lport:
                self._bind_locked(sock, ANY, 0)

    def set_connected(self, sock: UdpSocket, peer: tuple[int, int], src: int) -> None:
        """Record the peer; bind implicitly, narrowing 0.0.0.0 to ``src`` (Linux's
        ``ip4_datagram_connect``)."""
        with self._lock:
            if sock.closed:
                raise io_error(errno.EBADF)
            if not sock.lport:
                self._bind_locked(sock, ANY, 0)
            if sock.laddr == ANY:
                sock.laddr = src
            sock.peer = peer

    def unbind(self, sock: UdpSocket) -> None:
        """Forget ``sock`` (at close)."""
        with self._lock:
            self._sockets.discard(sock)
            if sock.lport:
                lst = self._ports.get(sock.lport)
                if lst is not None and sock in lst:
                    lst.remove(sock)
                    if not lst:
                        del self._ports[sock.lport]

    def bound_ports(self) -> dict[int, int]:
        """``{port: sockets bound to it}`` (for tests and ``ss``-like listings)."""
        with self._lock:
            return {p: len(v) for p, v in self._ports.items()}

    def _lookup(self, src: int, sport: int, dst: int, dport: int, bcast: bool) -> list[UdpSocket]:
        best: list[UdpSocket] = []
        best_score = -1
        with self._lock:
            for s in self._ports.get(dport, ()):  # bounded by the sockets on the port
                score = 0
                if s.laddr != ANY:
                    if s.laddr != dst:
                        continue
                    score += 1
                if s.peer is not None:
                    if s.peer != (src, sport):
                        continue
                    score += 2
                if bcast:
                    best.append(s)
                elif score >= best_score:
                    best, best_score = [s], score
        return best

    # -- ProtocolHandler
    def input(self, pkt: IPv4Packet) -> None:
        """One UDP datagram for this host."""
        st = self.stack
        d = pkt.payload
        if len(d) < 8:  # RFC 768: the header is 8 bytes
            st.count("udp_bad_header")
            return
        sport, dport, ulen, csum = UDP_HDR.unpack_from(d)
        if ulen < 8 or ulen > len(d):  # RFC 768 Length: header included, inside IP
            st.count("udp_bad_header")
            return
        d = d[:ulen]
        if csum and not pkt.csum_valid:
            # RFC 768 Checksum: over pseudo-header, header and data; all ones when right
            pseudo = ipv4_pseudo_sum(ip_bytes(pkt.src), ip_bytes(pkt.dst), IPPROTO_UDP, ulen)
            if inet_sum(d, pseudo) % 0xFFFF:
                st.count("udp_bad_checksum")
                return
        if dport == 0:  # port 0 is reserved: nobody listens there
            st.count("udp_no_port")
            return
        socks = self._lookup(pkt.src, sport, pkt.dst, dport, pkt.ip_broadcast)
        if not socks:
            st.count("udp_no_port")
            if not pkt.ip_broadcast:
                st.icmp.send_error(pkt, 3, 3)  # destination unreachable: port
            return
        st.count("udp_rx_datagrams")
        data = bytes(d[8:])
        addr = (ip_ntoa(pkt.src), sport)
        for s in socks:
            if not s._deliver(data, addr):
                st.count("udp_rcvbuf_dropped")

    def error(self, err: NetError) -> None:
        """An ICMP (or local) error quoting a datagram we sent: to the connected socket
        it belongs to (see the module docstring)."""
        if len(err.l4) < 4:
            return
        sport, dport = struct.unpack_from("!HH", err.l4)
        # look up as if it were the peer's answer: connected sockets match first
        for s in self._lookup(err.dst, dport, err.src, sport, False):
            if s.peer is not None:
                s._set_error(err.errno)
                self.stack.count("udp_errors_delivered")
                return
        self.stack.count("udp_errors_ignored")

    def close(self) -> None:
        """Close every socket (the stack is closing)."""
        with self._lock:
            socks = list(self._sockets)
        for s in socks:
            s.close()


class UdpSocket(SocketFile):
    """An AF_INET/SOCK_DGRAM socket (see the module docstring for every behaviour)."""

    kind = "udp"
    family = AF_INET
    type = SOCK_DGRAM
    proto = IPPROTO_UDP

    def __init__(self, udp: UdpProtocol) -> None:
        super().__init__("socket:[UDP]")
        self._udp = udp
        self._stack = udp.stack
        self._qlock = Lock()
        self._queue: deque[tuple[bytes, tuple[str, int]]] = deque()
        self._queued = 0
        self._error = 0
        #: Local address and port (0.0.0.0 / 0 while unbound).
        self.laddr = ANY
        self.lport = 0
        #: (address, port) of the peer once connected.
        self.peer: tuple[int, int] | None = None
        self.rcvbuf = self._stack.config.udp_rcvbuf
        self.reuseaddr = False
        self.broadcast = False
        self.ttl: int | None = None
        #: Datagrams dropped because SO_RCVBUF was full.
        self.drops = 0

    # -- helpers
    def _check_open(self) -> None:
        if self.closed:
            raise io_error(errno.EBADF)

    def _take_error(self) -> int:
        with self._qlock:
            e, self._error = self._error, 0
        return e

    def _raise_pending(self) -> None:
        if not self._error:  # the usual case, without the lock (a plain int read)
            return
        e = self._take_error()
        if e:
            raise io_error(e)

    def _deliver(self, data: bytes, addr: tuple[str, int]) -> bool:
        charge = len(data) + DATAGRAM_OVERHEAD
        with self._qlock:
            if self.closed:
                return True
            if self._queue and self._queued + charge > self.rcvbuf:
                self.drops += 1
                return False
            self._queue.append((data, addr))
            self._queued += charge
        self.wake()
        return True

    def _set_error(self, code: int) -> None:
        with self._qlock:
            self._error = code
        self.wake()

    # -- readiness
    def poll(self) -> int:
        """POLLOUT always (sends never block), POLLIN with a datagram queued, POLLERR
        with an error pending."""
        if self.closed:
            return POLLNVAL
        mask = POLLOUT
        if self._queue:
            mask |= POLLIN
        if self._error:
            mask |= POLLERR
        return mask

    # -- addresses
    def bind(self, addr: tuple[str, int]) -> None:
        """Bind to ``(host, port)``: EADDRNOTAVAIL for a host that is not ours (0.0.0.0
        and our broadcast addresses are allowed), EADDRINUSE, EINVAL if bound."""
        self._check_open()
        host, port = inet_address(addr)
        a = parse_ip(host)
        assert a is not None
        if a != ANY and not (self._stack.is_local(a) or self._stack.is_broadcast(a)):
            raise io_error(errno.EADDRNOTAVAIL, f"{host} is not an address of this host")
        self._udp.bind(self, a, port)

    def connect(self, addr: tuple[str, int]) -> None:
        """Set the default peer and receive only from it (ENETUNREACH without a route,
        EACCES for a broadcast peer without SO_BROADCAST)."""
        self._check_open()
        host, port = inet_address(addr)
        d = parse_ip(host)
        assert d is not None
        if port == 0:
            raise io_error(errno.EINVAL, "port 0 is not a destination")
        route = self._stack.route(d)
        if self._stack.is_broadcast(d) and not self.broadcast:
            raise io_error(errno.EACCES, "broadcast peer without SO_BROADCAST")
        self._udp.set_connected(self, (d, port), route.src)

    def getsockname(self) -> tuple[str, int]:
        """The local address (``('0.0.0.0', 0)`` until bound)."""
        return ip_ntoa(self.laddr), self.lport

    def getpeername(self) -> tuple[str, int]:
        """The peer (ENOTCONN when not connected)."""
        if self.peer is None:
            raise io_error(errno.ENOTCONN)
        return ip_ntoa(self.peer[0]), self.peer[1]

    # -- sending
    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Send to the peer (EDESTADDRREQ when not connected)."""
        self._check_open()
        peer = self.peer
        if peer is None:
            raise io_error(errno.EDESTADDRREQ)
        return self._send(data, peer, flags)

    def sendto(self, data: bytes | bytearray | memoryview, addr: tuple[str, int]) -> int:
        """Send one datagram to ``addr``; returns its length."""
        self._check_open()
        host, port = inet_address(addr)
        d = parse_ip(host)
        assert d is not None
        return self._send(data, (d, port), 0)

    def _send(self, data: bytes | bytearray | memoryview, dest: tuple[int, int], flags: int) -> int:
        st = self._stack
        if flags & MSG_OOB:
            raise io_error(errno.EOPNOTSUPP, "MSG_OOB on a UDP socket")
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        self._raise_pending()
        if n > MAX_UDP_PAYLOAD:  # RFC 791 §3.1: total length is 16 bits
            raise io_error(errno.EMSGSIZE, f"{n} bytes > {MAX_UDP_PAYLOAD}")
        d, dport = dest
        if dport == 0:
            raise io_error(errno.EINVAL, "port 0 is not a destination")
        if st.is_broadcast(d) and not self.broadcast:
            raise io_error(errno.EACCES, "broadcast destination without SO_BROADCAST")
        route = st.route(d)
        if not route.iface.up:
            raise io_error(errno.ENETDOWN, f"{route.iface.name} has no carrier")
        if not self.lport:
            self._udp.autobind(self)
        src = self.laddr if st.is_local(self.laddr) else route.src
        length = 8 + n
        pseudo = ipv4_pseudo_sum(ip_bytes(src), ip_bytes(d), IPPROTO_UDP, length)
        seg = bytearray(UDP_HDR.pack(self.lport, dport, length, pseudo))
        seg += mv
        st.send_ip(
            d, IPPROTO_UDP, seg, src=src, csum_offset=_CSUM_OFFSET, ttl=self.ttl, route=route
        )
        st.count("udp_tx_datagrams")
        return n

    # -- receiving
    def recv(self, n: int, flags: int = 0) -> bytes:
        """One datagram's data, truncated to ``n`` bytes."""
        return self.recvfrom(n, flags)[0]

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """One datagram's data written into ``buffer`` (truncated to ``nbytes``; 0:
        the buffer's size); the count (see :meth:`recvfrom_into`)."""
        return self.recvfrom_into(buffer, nbytes, flags)[0]

    def recvfrom_into(
        self, buffer: Any, nbytes: int = 0, flags: int = 0
    ) -> tuple[int, tuple[str, int]]:
        """One datagram written into ``buffer`` (truncated to ``nbytes``, 0: the
        buffer's size; the rest of a longer datagram is discarded) and its sender.

        Copies: the stack copied the payload once out of the receive buffer in shared
        memory into the queued ``bytes`` (the ring's buffer is recycled at once); this
        copies it from there into ``buffer``, with no bytes object in between."""
        mv = writable_view(buffer, nbytes, "recvfrom_into")
        data, addr = self._take(flags)
        k = min(len(data), mv.nbytes)
        if k == len(data):
            mv[:k] = data
        else:
            with memoryview(data) as d:
                mv[:k] = d[:k]
        return k, addr

    def recvfrom(self, n: int, flags: int = 0) -> tuple[bytes, tuple[str, int]]:
        """One datagram (truncated to ``n``) and its sender; MSG_PEEK leaves it queued,
        MSG_DONTWAIT does not block."""
        if n < 0:
            raise ValueError("negative buffersize in recvfrom")
        data, addr = self._take(flags)
        return data[:n], addr

    def _take(self, flags: int) -> tuple[bytes, tuple[str, int]]:
        """The next datagram, whole, dequeued (unless MSG_PEEK); blocks per the
        timeout (MSG_DONTWAIT: not at all)."""
        if flags & MSG_OOB:
            raise io_error(errno.EOPNOTSUPP, "MSG_OOB on a UDP socket")
        timeout = 0.0 if flags & MSG_DONTWAIT else self.timeout
        deadline = deadline_after(timeout)
        while True:  # ends with a datagram, an error, or the deadline
            self._check_open()
            with self._qlock:
                if self._error:
                    e, self._error = self._error, 0
                    raise io_error(e)
                if self._queue:
                    data, addr = self._queue[0]
                    if not flags & MSG_PEEK:
                        self._queue.popleft()
                        self._queued -= len(data) + DATAGRAM_OVERHEAD
                    return data, addr
            left = remaining(deadline)
            if timeout is not None and timeout > 0 and left == 0:
                raise TimeoutError(errno.ETIMEDOUT, "timed out")
            self.wait_for(POLLIN, left)

    # -- options
    def setsockopt(self, level: int, option: int, value: Any) -> None:
        """SOL_SOCKET: SO_RCVBUF (clamped to 1 KiB..16 MiB; the bound on queued bytes,
        not doubled as Linux reports it), SO_REUSEADDR, SO_BROADCAST; SOL_IP: IP_TTL
        (1..255, -1 for the default)."""
        self._check_open()
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int):
            raise TypeError(f"socket option value must be an int, not {type(value).__name__}")
        if level == SOL_SOCKET:
            if option == SO_RCVBUF:
                self.rcvbuf = min(max(value, MIN_RCVBUF), MAX_RCVBUF)
                return
            if option == SO_REUSEADDR:
                self.reuseaddr = value != 0
                return
            if option == SO_BROADCAST:
                self.broadcast = value != 0
                return
        elif level == SOL_IP and option == IP_TTL:
            if value == -1:
                self.ttl = None
                return
            if not 1 <= value <= 255:
                raise io_error(errno.EINVAL, f"IP_TTL {value}")
            self.ttl = value
            return
        raise io_error(errno.ENOPROTOOPT)

    def getsockopt(self, level: int, option: int) -> Any:
        """The options of :meth:`setsockopt`, plus SO_TYPE and SO_ERROR (reads and
        clears the pending error)."""
        self._check_open()
        if level == SOL_SOCKET:
            if option == SO_RCVBUF:
                return self.rcvbuf
            if option == SO_REUSEADDR:
                return int(self.reuseaddr)
            if option == SO_BROADCAST:
                return int(self.broadcast)
            if option == SO_TYPE:
                return SOCK_DGRAM
            if option == SO_ERROR:
                return self._take_error()
        elif level == SOL_IP and option == IP_TTL:
            return self.ttl if self.ttl is not None else self._stack.config.ttl
        raise io_error(errno.ENOPROTOOPT)

    # -- close
    def close(self) -> None:
        """Unbind, drop queued datagrams, wake blocked callers (they get EBADF)."""
        if self.closed:
            return
        self._udp.unbind(self)
        with self._qlock:
            self.closed = True
            self._queue.clear()
            self._queued = 0
        super().close()

    def __repr__(self) -> str:
        peer = f" -> {ip_ntoa(self.peer[0])}:{self.peer[1]}" if self.peer else ""
        state = " closed" if self.closed else ""
        return f"<UdpSocket {ip_ntoa(self.laddr)}:{self.lport}{peer}{state}>"
