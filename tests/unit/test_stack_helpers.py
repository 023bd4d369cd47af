"""Test helpers for the network stack: an in-memory Ethernet hub of :class:`Link` ports,
a ``Lan`` of stacks on one hub, and builders for hand-made (and broken) frames.

The hub is the only stand-in here, and it stands in for the *wire*, not for the thing
under test: frames go from one real :class:`kernel.net.stack.Stack` to the others. A
synchronous hub delivers on the sender's thread (as a loopback device would, re-entering
the stack); a threaded one delivers from its own thread (like a driver's interrupt
thread). A port that claims ``tx_csum`` gets frames with a partial checksum; the hub
completes it with ``vdev.virtio.packet`` as a NIC would (or, with
``partial_rx=True``, passes it on flagged as partial, as virtio does between local
peers). No test sleeps: waits are on events and conditions.
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from collections.abc import Callable

from hostops.sync import Condition, Event, Lock, Thread, start_thread
from hostops.timers import TimerHeap
from kernel.net import Stack, StackConfig
from kernel.net.link import PLAIN_RX, Receiver, RxInfo, TxOffload
from vdev.virtio.packet import complete_checksum, inet_checksum, ipv4_pseudo_sum

__all__ = [
    "live_threads",
    "Hub",
    "Port",
    "Lan",
    "eth",
    "ipv4",
    "udp",
    "ip_of",
    "pattern",
    "wait_timers",
]


def live_threads() -> set[int]:
    """Idents of the threads alive now (tests check that none is left behind)."""
    import threading  # the test may; the packages under test may not

    return {t.ident for t in threading.enumerate() if t.ident is not None and t.is_alive()}


class Port:
    """One :class:`kernel.net.link.Link` on a :class:`Hub`."""

    def __init__(
        self, hub: Hub, name: str, mac: bytes, mtu: int, tx_csum: bool, tso4: bool = False
    ) -> None:
        self._hub = hub
        self._name = name
        self._mac = mac
        self._mtu = mtu
        self._tx_csum = tx_csum
        self._tso4 = tso4
        self._up = True
        self._receiver: Receiver | None = None
        self._listener: Callable[[bool], None] | None = None
        #: Every frame transmitted, with its offload (as the link got them).
        self.sent: list[tuple[bytes, TxOffload]] = []
        #: errno to fail transmits with (ENOBUFS ...), None: transmit.
        self.fail_tx: int | None = None

    # -- Link
    @property
    def name(self) -> str:
        return self._name

    @property
    def mac(self) -> bytes:
        return self._mac

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def tx_csum(self) -> bool:
        return self._tx_csum

    @property
    def tso4(self) -> bool:
        return self._tso4

    @property
    def link_up(self) -> bool:
        return self._up

    def transmit(self, frame: bytes | bytearray | memoryview, offload: TxOffload) -> None:
        if not self._up:
            raise OSError(errno.ENETDOWN, "link down")
        if self.fail_tx is not None:
            raise OSError(self.fail_tx, "refused by the test")
        if offload.csum_start >= 0:
            assert self._tx_csum, "partial checksum on a link without tx_csum"
        frame = bytes(frame)
        self.sent.append((frame, offload))
        self._hub.carry(self, frame, offload)

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def set_link_listener(self, listener: Callable[[bool], None]) -> None:
        self._listener = listener

    # -- test controls
    def set_carrier(self, up: bool) -> None:
        """Change the carrier and tell the stack (as a config-change interrupt would)."""
        self._up = up
        if self._listener is not None:
            self._listener(up)

    def inject(self, frame: bytes | bytearray, info: RxInfo = PLAIN_RX) -> None:
        """Hand ``frame`` to the stack as the driver would."""
        assert self._receiver is not None
        self._receiver(memoryview(bytes(frame)), info)


class Hub:
    """An Ethernet hub: every frame goes to every other port whose carrier is up
    (stacks filter by MAC, as NICs do)."""

    def __init__(self, threaded: bool = False, partial_rx: bool = False) -> None:
        self.ports: list[Port] = []
        self.partial_rx = partial_rx
        #: ``drop(frame) -> bool``: frames for which it returns True are lost.
        self.drop: Callable[[bytes], bool] | None = None
        self.dropped = 0
        self._threaded = threaded
        self._cond = Condition(Lock())
        self._queue: deque[tuple[Port, bytes, RxInfo]] = deque()
        self._busy = False
        self._stop = False
        self._thread: Thread | None = None
        if threaded:
            self._thread = start_thread(self._run, name="test-hub")

    def port(self, name: str = "eth0", mtu: int = 1500, tx_csum: bool = False) -> Port:
        """A new port with a locally administered MAC 02:00:00:00:00:NN."""
        mac = bytes((2, 0, 0, 0, 0, len(self.ports) + 1))
        p = Port(self, name, mac, mtu, tx_csum)
        self.ports.append(p)
        return p

    def carry(self, src: Port, frame: bytes, offload: TxOffload) -> None:
        if self.drop is not None and self.drop(frame):
            self.dropped += 1
            return
        info = PLAIN_RX
        if offload.csum_start >= 0:
            if self.partial_rx:
                info = RxInfo(csum_start=offload.csum_start, csum_offset=offload.csum_offset)
            else:
                frame = complete_checksum(frame, offload.csum_start, offload.csum_offset)
        for p in self.ports:
            if p is src or not p.link_up or p._receiver is None:
                continue
            if self._threaded:
                with self._cond:
                    self._queue.append((p, frame, info))
                    self._cond.notify_all()
            else:
                p._receiver(memoryview(frame), info)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                p, frame, info = self._queue.popleft()
                self._busy = True
            try:
                if p._receiver is not None:
                    p._receiver(memoryview(frame), info)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until the threaded hub has delivered everything queued."""
        with self._cond:
            ok = self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)
        assert ok, "hub did not drain"

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()


class Lan:
    """``n`` stacks on one hub, 10.0.0.1/24 ... (each on its own ``eth0``), one timer
    heap; a context manager that closes everything. ``gateway`` is the default route
    of every stack but the one that has that address."""

    def __init__(
        self,
        n: int = 2,
        *,
        mtu: int | list[int] = 1500,
        tx_csum: bool | list[bool] = False,
        threaded: bool = False,
        partial_rx: bool = False,
        config: StackConfig | None = None,
        gateway: str | None = None,
    ) -> None:
        self.timers = TimerHeap("lan-timers")
        self.hub = Hub(threaded=threaded, partial_rx=partial_rx)
        self.ports: list[Port] = []
        self.stacks: list[Stack] = []
        for i in range(n):
            m = mtu[i] if isinstance(mtu, list) else mtu
            c = tx_csum[i] if isinstance(tx_csum, list) else tx_csum
            port = self.hub.port("eth0", m, c)
            st = Stack(self.timers, config)
            addr = f"10.0.0.{i + 1}"
            st.add_interface(port, f"{addr}/24", gateway if gateway != addr else None)
            self.ports.append(port)
            self.stacks.append(st)

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc: object) -> None:
        for st in self.stacks:
            st.close()
        self.hub.close()
        self.timers.close()


def ip_of(i: int) -> str:
    """The address of the ``i``-th stack of a :class:`Lan`."""
    return f"10.0.0.{i + 1}"


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that differ with position and seed (so misplaced data shows)."""
    block = bytes((seed * 7 + i * 31 + (i >> 8)) & 0xFF for i in range(min(n, 65536)))
    return (block * (n // len(block) + 1))[:n] if n else b""


def wait_timers(timers: TimerHeap, delay: float) -> None:
    """Return once every timer armed so far with a delay up to ``delay`` has run: a timer
    armed now with that delay runs after them (the heap runs in deadline order)."""
    ev = Event()
    timers.call_later(delay, ev.set)
    assert ev.wait(30), "timer heap stalled"


# -- frame builders (for hand-made and broken input)
def _aton(a: str) -> bytes:
    return bytes(int(x) for x in a.split("."))


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet II frame."""
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    *,
    ident: int = 0x1234,
    flags_frag: int = 0,
    ttl: int = 64,
    total: int | None = None,
    ihl: int = 5,
    version: int = 4,
    csum: int | None = None,
) -> bytes:
    """An IPv4 packet; every field can be made wrong on purpose."""
    options = b"\x01" * ((ihl - 5) * 4)  # NOPs
    hl = ihl * 4
    tot = hl + len(payload) if total is None else total
    h = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            (version << 4) | ihl,
            0,
            tot,
            ident,
            flags_frag,
            ttl,
            proto,
            0,
            _aton(src),
            _aton(dst),
        )
        + options
    )
    struct.pack_into("!H", h, 10, inet_checksum(h) if csum is None else csum)
    return bytes(h) + payload


def udp(
    src: str, dst: str, sport: int, dport: int, data: bytes, *, csum: int | None = None
) -> bytes:
    """A UDP datagram with a correct checksum (or ``csum``)."""
    length = 8 + len(data)
    seg = bytearray(struct.pack("!HHHH", sport, dport, length, 0) + data)
    if csum is None:
        c = inet_checksum(seg, ipv4_pseudo_sum(_aton(src), _aton(dst), 17, length)) or 0xFFFF
    else:
        c = csum
    struct.pack_into("!H", seg, 6, c)
    return bytes(seg)
