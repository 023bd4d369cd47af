"""hostops' fd-passing pieces used by vhost-user: Unix sockets with SCM_RIGHTS,
eventfds and fd mappings. Real sockets and real fds, in one process."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostops.errors import ChannelTimeout, PeerGone
from hostops.eventfd import EventFd, NotAnEventFd
from hostops.fdmem import MappedFd, MappingError, create_memfd
from hostops.poll import Poller
from hostops.unix import BadAncillaryData, UnixConnection, UnixServer

pytestmark = pytest.mark.timeout(30)


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[UnixServer, UnixConnection, UnixConnection]]:
    server = UnixServer(str(tmp_path / "s.sock"))
    client = UnixConnection.connect(str(tmp_path / "s.sock"))
    conn = server.accept(timeout=5.0)
    assert conn is not None
    try:
        yield server, client, conn
    finally:
        client.close()
        conn.close()
        server.close()


def test_socket_file_is_private_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = UnixServer(str(path))
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    server.close()
    assert not path.exists()


def test_a_stale_socket_file_is_replaced_but_a_live_one_is_not(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    server = UnixServer(path)
    try:
        with pytest.raises(OSError):
            UnixServer(path)  # someone is listening: refuse to steal the path
    finally:
        server.close()


def test_bytes_and_fds_travel_together(pair) -> None:
    _, client, conn = pair
    r, w = os.pipe()
    try:
        client.send(b"header+payload", fds=[r])
        data, fds = conn.recv_message(len(b"header+payload"), max_fds=1)
        assert data == b"header+payload" and len(fds) == 1
        os.write(w, b"through the passed fd")
        assert os.read(fds[0], 100) == b"through the passed fd"
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)
    assert conn.peer_pid() == os.getpid()


def test_too_many_fds_are_refused_and_none_leak(pair) -> None:
    _, client, conn = pair
    pipes = [os.pipe() for _ in range(3)]
    before = _open_fds()
    client.send(b"x" * 12, fds=[r for r, _ in pipes])
    with pytest.raises(BadAncillaryData):
        conn.recv_message(12, max_fds=1)
    assert _open_fds() <= before  # every received fd was closed again
    for r, w in pipes:
        os.close(r)
        os.close(w)


def test_end_of_stream_mid_message_is_peer_gone(pair) -> None:
    _, client, conn = pair
    client.send(b"half")
    client.close()
    with pytest.raises(PeerGone, match="after 4 of 12 bytes"):
        conn.recv_message(12)


def test_a_silent_peer_times_out(pair) -> None:
    _, _, conn = pair
    with pytest.raises(ChannelTimeout):
        conn.recv_message(12, timeout=0.05)


def test_accept_without_a_client_returns_none(tmp_path: Path) -> None:
    with UnixServer(str(tmp_path / "s.sock")) as server:
        assert server.accept(timeout=0.0) is None


def test_eventfd_counts_and_polls() -> None:
    efd = EventFd.create()
    poller = Poller()
    poller.register(efd)
    try:
        assert poller.poll(0) == []
        assert efd.read() == 0
        efd.write(1)
        efd.write(2)
        assert poller.poll(1.0) == [efd]
        assert efd.read() == 3
        assert poller.poll(0) == []
    finally:
        poller.unregister(efd)
        efd.close()
    assert efd.closed
    efd.close()  # idempotent


def test_adopting_something_else_closes_it() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(NotAnEventFd):
            EventFd.adopt(r)
        with pytest.raises(OSError):
            os.fstat(r)  # closed by adopt
    finally:
        os.close(w)


def test_memfd_mapping_is_shared_between_mappings() -> None:
    fd, m1 = create_memfd(3 * 4096, "test")
    try:
        m2 = MappedFd.map(fd, 4096, offset=4096 + 100)  # unaligned offsets work
        m1.buf[4096 + 100 : 4096 + 105] = b"hello"
        assert bytes(m2.buf[:5]) == b"hello"
        m2.buf[10:13] = b"abc"
        assert bytes(m1.buf[4096 + 110 : 4096 + 113]) == b"abc"
        m2.close()
        assert m2.closed
    finally:
        m1.close()
        os.close(fd)


def test_a_region_larger_than_the_fd_is_refused_before_mapping() -> None:
    fd, m = create_memfd(4096)
    try:
        with pytest.raises(MappingError, match="holds 4096 bytes"):
            MappedFd.map(fd, 8192)
        with pytest.raises(MappingError):
            MappedFd.map(fd, 4096, offset=1)
        with pytest.raises(MappingError):
            MappedFd.map(fd, 0)
    finally:
        m.close()
        os.close(fd)


def test_a_pipe_is_not_memory() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(MappingError, match="not a regular file"):
            MappedFd.map(r, 4096)
    finally:
        os.close(r)
        os.close(w)
