"""Unit tests for hostops: in-process, real shm / sockets / pipes, no child processes."""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator

import posix_ipc
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

import hostops
from hostops import (
    ChannelClosed,
    ChannelTimeout,
    ControlClient,
    ControlServer,
    Doorbell,
    DoorbellListener,
    PageAllocator,
    PeerGone,
    Poller,
    RuntimeDir,
    SharedRegion,
    Timer,
    TransportError,
    Waker,
)
from hostops._zmq import new_socket

pytestmark = pytest.mark.timeout(30)


def _dead_pid() -> int:
    """A pid that cannot exist: pids are always below pid_max."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def _our_segments() -> set[str]:
    prefix = f"vlab-{os.getpid()}-"
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    before = _our_segments()
    yield
    assert _our_segments() == before


@pytest.fixture
def rundir() -> Iterator[RuntimeDir]:
    rd = RuntimeDir.create()
    yield rd
    rd.cleanup()
    assert not os.path.exists(rd.path)


# -- errors, clock, sync ------------------------------------------------------------------


def test_error_hierarchy() -> None:
    for cls in (PeerGone, ChannelTimeout, ChannelClosed):
        assert issubclass(cls, TransportError)
    assert not issubclass(PeerGone, ChannelTimeout)
    assert set(hostops.__all__) >= {"TransportError", "SharedRegion", "Poller", "Doorbell"}
    for name in hostops.__all__:
        assert hasattr(hostops, name), name


def test_python_argv() -> None:
    assert hostops.python_argv("vdev", "blk", "--x") == [sys.executable, "-m", "vdev", "blk", "--x"]


def test_monotonic_clocks_advance() -> None:
    a, an = hostops.monotonic(), hostops.monotonic_ns()
    b, bn = hostops.monotonic(), hostops.monotonic_ns()
    assert b >= a and bn >= an
    assert abs(an / 1e9 - a) < 1.0


def test_timer_fires_once() -> None:
    fired = threading.Event()
    calls: list[str] = []

    def fn() -> None:
        calls.append(hostops.current_thread_name())
        fired.set()

    timer = Timer(0.01, fn)
    timer.start()
    assert fired.wait(10)
    assert timer.cancel() is False
    assert calls == ["hostops-timer"]
    assert timer.fired
    with pytest.raises(RuntimeError):
        timer.start()


def test_timer_cancel_before_firing() -> None:
    calls: list[int] = []
    timer = Timer(60.0, lambda: calls.append(1))
    timer.start()
    assert timer.cancel() is True
    assert timer.cancel() is False
    timer._timer.join(5)
    assert not timer._timer.is_alive()
    assert calls == []
    assert not timer.fired


def test_start_thread_runs_named_daemon() -> None:
    seen: dict[str, object] = {}
    done = hostops.Event()

    def body(x: int, y: int) -> None:
        seen["sum"] = x + y
        seen["name"] = hostops.current_thread_name()
        seen["main"] = hostops.is_main_thread()
        done.set()

    thread = hostops.start_thread(body, 2, 3, name="worker-1")
    assert done.wait(10)
    thread.join(10)
    assert not thread.is_alive()
    assert thread.daemon and thread.name == "worker-1" and thread.ident is not None
    assert seen == {"sum": 5, "name": "worker-1", "main": False}
    assert hostops.is_main_thread()


def test_full_barrier_concurrent_callers() -> None:
    counts = [0, 0]

    def spin(slot: int) -> None:
        for _ in range(10_000):
            hostops.full_barrier()
            counts[slot] += 1

    threads = [hostops.start_thread(spin, i, name=f"fence-{i}") for i in range(2)]
    for t in threads:
        t.join(20)
        assert not t.is_alive()
    assert counts == [10_000, 10_000]


def test_sync_aliases_are_usable() -> None:
    lock, rlock = hostops.Lock(), hostops.RLock()
    with lock, rlock, rlock:
        assert lock.locked()
    cond = hostops.Condition()
    with cond:
        assert cond.wait(0) is False
    sem = hostops.BoundedSemaphore(1)
    assert sem.acquire(blocking=False)
    assert not sem.acquire(blocking=False)
    sem.release()
    with pytest.raises(ValueError):
        sem.release()
    assert hostops.Semaphore(0).acquire(timeout=0) is False


# -- shared memory ----------------------------------------------------------------------


def test_region_create_attach_share_and_unlink() -> None:
    region = SharedRegion.create(5000, tag="blk0")
    try:
        assert region.name.startswith(f"/vlab-{os.getpid()}-blk0-")
        assert region.size == 8192 and len(region.buf) == 8192
        assert region.created
        st_ = os.stat("/dev/shm" + region.name)
        assert stat.S_IMODE(st_.st_mode) == 0o600 and st_.st_size == 8192
        assert bytes(region.buf[:16]) == bytes(16)  # zero-filled
        peer = SharedRegion.attach(region.name, 8192)
        try:
            assert not peer.created
            region.buf[100:105] = b"hello"
            assert bytes(peer.buf[100:105]) == b"hello"
            region.unlink()
            region.unlink()  # idempotent
            assert not os.path.exists("/dev/shm" + region.name)
            peer.buf[8000:8003] = b"abc"  # both mappings survive the unlink
            assert bytes(region.buf[8000:8003]) == b"abc"
            with pytest.raises(FileNotFoundError):
                SharedRegion.attach(region.name, 4096)
        finally:
            peer.close()
    finally:
        region.unlink()
        region.close()
    assert region.fd is None and region.closed
    region.close()  # idempotent
    with pytest.raises(ValueError):
        _ = region.buf


def test_region_context_manager_unlinks_when_created() -> None:
    with SharedRegion.create(1, tag="cm") as region:
        path = "/dev/shm" + region.name
        assert os.path.exists(path) and region.size == 4096
        assert region.fd is not None
    assert not os.path.exists(path)
    assert region.closed and region.fd is None


def test_region_close_with_live_subview_does_not_raise() -> None:
    with SharedRegion.create(4096, tag="sub") as region:
        sub = region.buf[10:20]
        sub[0] = 7
        region.close()  # must not raise BufferError
        assert region.fd is None
        assert sub[0] == 7  # the mapping stays valid while the view lives
        sub.release()


def test_region_attach_errors_and_bad_arguments() -> None:
    with pytest.raises(FileNotFoundError):
        SharedRegion.attach(f"/vlab-{os.getpid()}-missing-00", 4096)
    with SharedRegion.create(4096, tag="small") as region:
        with pytest.raises(ValueError, match="4096 bytes, 8192 requested"):
            SharedRegion.attach(region.name, 8192)
    with pytest.raises(ValueError):
        SharedRegion.create(0)
    with pytest.raises(ValueError):
        SharedRegion.create(4096, tag="bad/tag")


def test_sweep_stale_segments_removes_only_dead_owners() -> None:
    stale = f"/vlab-{_dead_pid()}-dev-deadbeef"
    shm = posix_ipc.SharedMemory(stale, posix_ipc.O_CREX, mode=0o600, size=4096)
    os.close(shm.fd)
    try:
        with SharedRegion.create(4096, tag="live") as live:
            removed = hostops.sweep_stale_segments()
            assert stale in removed
            assert live.name not in removed
            assert os.path.exists("/dev/shm" + live.name)
            assert not os.path.exists("/dev/shm" + stale)
    finally:
        try:
            posix_ipc.unlink_shared_memory(stale)
        except posix_ipc.ExistentialError:
            pass


# -- page allocator ---------------------------------------------------------------------


def test_allocator_basic_alignment_and_rounding() -> None:
    pa = PageAllocator(base=0x10000, size=16 * 4096)
    assert pa.capacity == 16 * 4096 and pa.free_bytes == pa.capacity and pa.used_bytes == 0
    a = pa.alloc(1)
    b = pa.alloc(5 * 4096)  # rounded to 8 pages, aligned to 8 pages
    assert a is not None and b is not None
    assert (a - 0x10000) % 4096 == 0
    assert (b - 0x10000) % (8 * 4096) == 0
    assert pa.block_size(a) == 4096 and pa.block_size(b) == 8 * 4096
    assert pa.used_bytes == 9 * 4096 and pa.free_bytes == 7 * 4096
    pa.free(b)
    pa.free(a)
    assert pa.used_bytes == 0
    assert pa.alloc(16 * 4096) == 0x10000  # fully coalesced


def test_allocator_exhaustion_double_free_and_bad_sizes() -> None:
    pa = PageAllocator(0, 4 * 4096)
    addrs = [pa.alloc(4096) for _ in range(4)]
    assert sorted(a for a in addrs if a is not None) == [0, 4096, 8192, 12288]
    assert pa.alloc(1) is None
    assert pa.free_bytes == 0
    pa.free(4096)
    with pytest.raises(ValueError):
        pa.free(4096)
    with pytest.raises(ValueError):
        pa.free(4096 + 1)
    with pytest.raises(ValueError):
        pa.free(1 << 40)
    with pytest.raises(ValueError):
        pa.alloc(0)
    with pytest.raises(ValueError):
        pa.alloc(-5)
    with pytest.raises(ValueError):
        pa.alloc(4 * 4096 + 1)
    with pytest.raises(ValueError):
        PageAllocator(0, 100)


def test_allocator_fragmentation_and_coalescing() -> None:
    pa = PageAllocator(0, 4 * 4096)
    got_pages = [pa.alloc(4096) for _ in range(4)]
    by_addr = sorted(a for a in got_pages if a is not None)
    assert by_addr == [0, 4096, 8192, 12288]
    pa.free(by_addr[1])
    pa.free(by_addr[2])  # two free pages, but not buddies
    assert pa.free_bytes == 2 * 4096
    assert pa.alloc(2 * 4096) is None
    pa.free(by_addr[0])  # pages 0 and 1 merge
    got = pa.alloc(2 * 4096)
    assert got == 0
    assert pa.alloc(4096) == by_addr[2]


def test_allocator_non_power_of_two_pool() -> None:
    pa = PageAllocator(4096, 6 * 4096 + 100)  # tail truncated to whole pages
    assert pa.capacity == 6 * 4096
    assert pa.alloc(5 * 4096) is None  # rounds to 8 pages: no such block in a 6-page pool
    big = pa.alloc(4 * 4096)
    mid = pa.alloc(2 * 4096)
    assert big == 4096 and mid == 4096 + 4 * 4096
    assert pa.alloc(1) is None
    pa.free(big)
    pa.free(mid)
    assert pa.free_bytes == pa.capacity


@settings(max_examples=200, deadline=None)
@given(
    npages=st.integers(1, 80),
    ops=st.lists(st.tuples(st.booleans(), st.integers(1, 100 * 4096), st.integers(0, 10**6))),
)
def test_allocator_property(npages: int, ops: list[tuple[bool, int, int]]) -> None:
    base = 3 * 4096
    pa = PageAllocator(base, npages * 4096)
    live: dict[int, int] = {}
    for is_alloc, nbytes, pick in ops:
        if is_alloc or not live:
            if nbytes > pa.capacity:
                with pytest.raises(ValueError):
                    pa.alloc(nbytes)
                continue
            addr = pa.alloc(nbytes)
            if addr is None:
                continue
            size = pa.block_size(addr)
            assert size >= nbytes and size & (size - 1) == 0
            assert (addr - base) % size == 0
            assert base <= addr and addr + size <= base + pa.capacity
            for other, osize in live.items():
                assert addr + size <= other or other + osize <= addr, "overlap"
            live[addr] = size
        else:
            addr = sorted(live)[pick % len(live)]
            pa.free(addr)
            del live[addr]
        assert pa.used_bytes == sum(live.values())
        assert pa.free_bytes == pa.capacity - pa.used_bytes
    for addr in list(live):
        pa.free(addr)
    assert pa.used_bytes == 0 and pa.free_bytes == pa.capacity
    largest = 1 << (npages.bit_length() - 1)
    assert pa.alloc(largest * 4096) == base  # everything coalesced back


def test_allocator_thread_safety() -> None:
    pa = PageAllocator(0, 256 * 4096)
    errors: list[str] = []
    owned: set[int] = set()
    owned_lock = threading.Lock()

    def worker() -> None:
        for i in range(2000):
            addr = pa.alloc(4096 * (1 + i % 3))
            if addr is None:
                continue
            with owned_lock:
                if addr in owned:
                    errors.append(f"duplicate {addr}")
                owned.add(addr)
            with owned_lock:
                owned.discard(addr)
            pa.free(addr)

    threads = [hostops.start_thread(worker, name=f"alloc-{i}") for i in range(4)]
    for t in threads:
        t.join(20)
        assert not t.is_alive()
    assert errors == []
    assert pa.used_bytes == 0


# -- runtime directory ------------------------------------------------------------------


def test_rundir_modes_endpoint_and_cleanup() -> None:
    rd = RuntimeDir.create()
    try:
        parent = os.path.dirname(rd.path)
        assert parent == f"/tmp/vlab-{os.getuid()}"
        assert os.path.basename(rd.path).startswith(f"{os.getpid()}-")
        for path in (parent, rd.path):
            st_ = os.lstat(path)
            assert stat.S_IMODE(st_.st_mode) == 0o700 and st_.st_uid == os.getuid()
        assert rd.endpoint("kick.0_a-b") == f"ipc://{rd.path}/kick.0_a-b"
        for bad in ("", "a/b", "..", ".", "a b", "ké"):
            with pytest.raises(ValueError):
                rd.endpoint(bad)
        with pytest.raises(ValueError, match="Unix sockets allow fewer than 107"):
            rd.endpoint("x" * 100)
        with open(os.path.join(rd.path, "junk"), "w") as f:
            f.write("x")
    finally:
        rd.cleanup()
    assert not os.path.exists(rd.path)
    rd.cleanup()  # idempotent


def test_rundir_tightens_own_parent_and_refuses_foreign(tmp_path: os.PathLike[str]) -> None:
    base = str(tmp_path)
    parent = os.path.join(base, f"vlab-{os.getuid()}")
    os.mkdir(parent, 0o755)
    os.chmod(parent, 0o755)
    with RuntimeDir.create(base) as rd:
        assert stat.S_IMODE(os.lstat(parent).st_mode) == 0o700
        assert os.path.dirname(rd.path) == parent
    assert not os.path.exists(rd.path)
    os.rmdir(parent)
    os.symlink(base, parent)
    with pytest.raises(PermissionError, match="not a directory"):
        RuntimeDir.create(base)
    os.unlink(parent)
    if os.getuid() != 0:
        pytest.skip("changing a directory's owner needs root")
    os.mkdir(parent, 0o700)
    os.chown(parent, 65534, 65534)
    with pytest.raises(PermissionError, match="owned by uid 65534"):
        RuntimeDir.create(base)


def test_sweep_stale_rundirs(tmp_path: os.PathLike[str]) -> None:
    base = str(tmp_path)
    with RuntimeDir.create(base) as live:
        stale = os.path.join(os.path.dirname(live.path), f"{_dead_pid()}-deadbeef")
        os.mkdir(stale, 0o700)
        open(os.path.join(stale, "sock"), "w").close()
        other = os.path.join(os.path.dirname(live.path), "not-a-rundir")
        os.mkdir(other)
        assert hostops.sweep_stale_rundirs(base) == [stale]
        assert not os.path.exists(stale)
        assert os.path.isdir(live.path) and os.path.isdir(other)
    assert hostops.sweep_stale_rundirs(os.path.join(base, "nowhere")) == []


# -- poller and waker -------------------------------------------------------------------


def test_waker_interrupts_poll_from_another_thread() -> None:
    with Waker() as waker:
        poller = Poller()
        poller.register(waker)
        poller.register(waker)  # no-op
        assert poller.poll(0) == []
        started = threading.Event()

        def wake_later() -> None:
            started.wait(10)
            waker.wake()
            waker.wake()

        t = hostops.start_thread(wake_later, name="waker")
        started.set()
        t0 = time.monotonic()
        assert poller.poll(20) == [waker]
        assert time.monotonic() - t0 < 15
        t.join(10)
        assert waker.drain() == 2
        assert poller.poll(0) == []
        assert waker.fileno() == waker._pollable()
        poller.unregister(waker)
        waker.wake()
        assert poller.poll(0) == []  # no longer watched
    waker.wake()  # after close: ignored, no error


def test_poller_returns_ready_objects_in_registration_order(rundir: RuntimeDir) -> None:
    ep = rundir.endpoint("bell")
    with DoorbellListener(ep) as listener, Doorbell(ep) as bell, Waker() as w1, Waker() as w2:
        poller = Poller()
        for obj in (w1, listener, w2):
            poller.register(obj)
        w2.wake()
        bell.ring(4)
        deadline = time.monotonic() + 10
        ready: list[object] = []
        while len(ready) < 2 and time.monotonic() < deadline:
            ready = poller.poll(1)
        assert ready == [listener, w2]
        assert listener.recv_all() == [4]
        w2.drain()
        assert poller.poll(0) == []


# -- doorbells --------------------------------------------------------------------------


def _drain_until(listener: DoorbellListener, want: set[int], timeout_s: float = 10) -> list[int]:
    got: list[int] = []
    deadline = time.monotonic() + timeout_s
    while not want <= set(got) and time.monotonic() < deadline:
        got += listener.wait(deadline - time.monotonic())
    return got


def test_doorbell_ring_and_drain_multiple_indices(rundir: RuntimeDir) -> None:
    ep = rundir.endpoint("kick")
    listener = DoorbellListener(ep)
    bell = Doorbell(ep)
    try:
        assert listener.recv_all() == []
        for q in (2, 0, 2, 65535, 0):
            bell.ring(q)
        got = _drain_until(listener, {0, 2, 65535})
        assert sorted(set(got)) == [0, 2, 65535]
        assert got[0] == 2
        assert listener.received == 5 and bell.rung == 5
        assert listener.malformed == 0
        assert listener.wait(0) == []
        with pytest.raises(ValueError):
            bell.ring(65536)
        with pytest.raises(ValueError):
            bell.ring(-1)
    finally:
        bell.close()
        listener.close()
    assert not os.path.exists(ep[len("ipc://") :])
    with pytest.raises(ChannelClosed):
        bell.ring(0)
    with pytest.raises(ChannelClosed):
        listener.recv_all()
    bell.close()
    listener.close()


def test_doorbell_malformed_messages_are_counted(rundir: RuntimeDir) -> None:
    ep = rundir.endpoint("kick")
    with DoorbellListener(ep) as listener:
        raw = new_socket(zmq.PUSH)
        try:
            raw.connect(ep)
            raw.send(b"x")
            raw.send(b"abc")
            raw.send(b"")
            raw.send_multipart([b"\x01\x00", b"\x02\x00"])
            raw.send(b"\x07\x00")
            got = _drain_until(listener, {7})
        finally:
            raw.close(linger=0)
        assert got == [7]
        assert listener.malformed == 4
        assert listener.received == 1


def test_doorbell_rings_before_listener_binds_are_delivered(rundir: RuntimeDir) -> None:
    ep = rundir.endpoint("late")
    with Doorbell(ep) as bell:
        bell.ring(1)
        bell.ring(3)
        with DoorbellListener(ep) as listener:
            assert sorted(_drain_until(listener, {1, 3})) == [1, 3]


def test_doorbell_peer_gone_when_queue_full(rundir: RuntimeDir) -> None:
    with Doorbell(rundir.endpoint("nobody"), high_water_mark=10) as bell:
        with pytest.raises(PeerGone):
            for _ in range(10_000):
                bell.ring(0)
        assert 10 <= bell.rung < 10_000


# -- control channel --------------------------------------------------------------------


class _Server:
    """Runs a ControlServer on a thread; replies with a transformation of each request."""

    def __init__(self, endpoint: str) -> None:
        self.server = ControlServer(endpoint)
        self.stop = threading.Event()
        self.requests: list[bytes] = []
        self.thread = hostops.start_thread(self._run, name="ctl-server")

    def _run(self) -> None:
        while not self.stop.is_set():
            got = self.server.recv(0.05)
            if got is None:
                continue
            peer, payload = got
            self.requests.append(payload)
            self.server.reply(peer, b"re:" + payload)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.server.close()


def test_control_call_and_reply(rundir: RuntimeDir) -> None:
    ep = rundir.endpoint("ctl")
    srv = _Server(ep)
    client = ControlClient(ep)
    try:
        assert client.call(b"GET_FEATURES", 10) == b"re:GET_FEATURES"
        assert client.call(b"", 10) == b"re:"
        big = bytes(range(256)) * 1000
        assert client.call(big, 10) == b"re:" + big
        results: list[bytes] = []

        def caller(i: int) -> None:
            for j in range(20):
                results.append(client.call(f"{i}-{j}".encode(), 10))

        threads = [hostops.start_thread(caller, i, name=f"caller-{i}") for i in range(3)]
        for t in threads:
            t.join(20)
        assert sorted(results) == sorted(
            f"re:{i}-{j}".encode() for i in range(3) for j in range(20)
        )
        assert client.stale == 0 and client.malformed == 0
        assert len(srv.requests) == 63
    finally:
        client.close()
        srv.close()
    assert not os.path.exists(ep[len("ipc://") :])
    with pytest.raises(ChannelClosed):
        client.call(b"x")


def test_control_timeout_then_late_reply_is_discarded(rundir: RuntimeDir) -> None:
    ep = rundir.endpoint("ctl")
    server = ControlServer(ep)
    client = ControlClient(ep)
    go = threading.Event()
    served: list[bytes] = []

    def slow_server() -> None:
        first = server.recv(10)
        assert first is not None
        go.wait(10)
        server.reply(first[0], b"late-A")
        second = server.recv(10)
        assert second is not None
        served.append(second[1])
        server.reply(second[0], b"reply-B")

    t = hostops.start_thread(slow_server, name="slow-server")
    try:
        t0 = time.monotonic()
        with pytest.raises(ChannelTimeout):
            client.call(b"A", timeout_s=0.2)
        assert 0.2 <= time.monotonic() - t0 < 5
        go.set()
        assert client.call(b"B", timeout_s=10) == b"reply-B"
        assert client.stale == 1
        assert served == [b"B"]
    finally:
        go.set()
        t.join(10)
        client.close()
        server.close()


def test_control_peer_gone(rundir: RuntimeDir) -> None:
    ep = rundir.endpoint("ctl")
    alive = threading.Event()
    alive.set()
    with ControlServer(ep) as server:
        client = ControlClient(ep, peer_alive=alive.is_set)
        try:

            def die_on_request() -> None:
                assert server.recv(10) is not None
                alive.clear()  # the "device" dies without replying

            t = hostops.start_thread(die_on_request, name="dying-server")
            t0 = time.monotonic()
            with pytest.raises(PeerGone):
                client.call(b"SET_STATUS", timeout_s=20)
            assert time.monotonic() - t0 < 10  # noticed by supervision, not the deadline
            t.join(10)
            t0 = time.monotonic()
            with pytest.raises(PeerGone):  # known dead: fails before sending
                client.call(b"again", timeout_s=20)
            assert time.monotonic() - t0 < 1
            assert server.recv(0) is None
        finally:
            client.close()


def test_control_malformed_frames_never_raise(rundir: RuntimeDir) -> None:
    ep = rundir.endpoint("ctl")
    with ControlServer(ep) as server:
        raw = new_socket(zmq.DEALER)
        try:
            raw.connect(ep)
            raw.send(b"no-seq")
            raw.send_multipart([b"short", b"payload"])
            raw.send_multipart([b"12345678", b"a", b"b"])
            raw.send_multipart([b"12345678", b"good"])
            got = server.recv(10)
            assert got is not None and got[1] == b"good"
            assert server.malformed == 3
            server.reply(got[0], b"ok")
            assert raw.poll(10_000)
            assert raw.recv_multipart() == [b"12345678", b"ok"]
            server.reply(b"\0" * 8 + b"unknown-peer", b"dropped")  # silently dropped
            with pytest.raises(ValueError):
                server.reply(b"short", b"x")
        finally:
            raw.close(linger=0)
    with pytest.raises(ChannelClosed):
        server.recv(0)


def test_control_client_drops_malformed_replies(rundir: RuntimeDir) -> None:
    ep = rundir.endpoint("ctl")
    raw = new_socket(zmq.ROUTER)
    raw.bind(ep)
    client = ControlClient(ep)

    def evil_server() -> None:
        assert raw.poll(10_000)
        identity, seq, payload = raw.recv_multipart()
        raw.send_multipart([identity, b"junk"])
        raw.send_multipart([identity, seq, b"x", b"y"])
        raw.send_multipart([identity, seq, b"ok:" + payload])

    t = hostops.start_thread(evil_server, name="evil-server")
    try:
        assert client.call(b"q", 10) == b"ok:q"
        assert client.malformed == 2 and client.stale == 0
    finally:
        t.join(10)
        client.close()
        raw.close(linger=0)


# -- signals ----------------------------------------------------------------------------


def test_on_terminate_runs_callback_and_exits_143() -> None:
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    calls: list[int] = []
    uninstall = hostops.on_terminate(lambda: calls.append(1))
    try:
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert hostops.on_terminate(lambda: calls.append(2))() is None  # already owned: no-op
        with pytest.raises(SystemExit) as info:
            signal.raise_signal(signal.SIGTERM)
        assert info.value.code == 143
        assert calls == [1]
    finally:
        uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    uninstall()


def test_on_terminate_outside_main_thread_is_noop() -> None:
    result: list[object] = []

    def body() -> None:
        uninstall = hostops.on_terminate(lambda: None)
        result.append(signal.getsignal(signal.SIGTERM))
        uninstall()

    t = hostops.start_thread(body, name="not-main")
    t.join(10)
    assert result == [signal.SIG_DFL]


def test_wake_on_signals_makes_a_signal_wake_the_poller() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    waker = Waker()
    poller = Poller()
    poller.register(waker)
    try:
        uninstall = hostops.wake_on_signals(waker)
        try:
            assert poller.poll(0) == []
            signal.raise_signal(signal.SIGUSR1)
            assert seen == [signal.SIGUSR1]
            assert poller.poll(0) == [waker]  # the C-level handler wrote into the pipe
            assert waker.drain() >= 1
            other = Waker()
            try:  # the wake-up fd is taken: a second install is a no-op
                assert hostops.wake_on_signals(other)() is None
            finally:
                other.close()
        finally:
            uninstall()
        assert signal.set_wakeup_fd(-1) == -1  # uninstall cleared it
        uninstall()  # idempotent
        signal.raise_signal(signal.SIGUSR1)
        assert poller.poll(0) == []
    finally:
        poller.unregister(waker)
        waker.close()
        signal.signal(signal.SIGUSR1, previous)


def test_wake_on_signals_outside_main_thread_is_noop() -> None:
    done: list[bool] = []
    waker = Waker()

    def body() -> None:
        hostops.wake_on_signals(waker)()  # neither call may touch the wake-up fd
        done.append(True)

    try:
        t = hostops.start_thread(body, name="not-main")
        t.join(10)
        assert done == [True]
        assert signal.set_wakeup_fd(-1) == -1  # nothing was installed
    finally:
        waker.close()


def test_ignore_sigint() -> None:
    previous = signal.getsignal(signal.SIGINT)
    try:
        hostops.ignore_sigint()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)  # would raise KeyboardInterrupt otherwise
    finally:
        signal.signal(signal.SIGINT, previous)
