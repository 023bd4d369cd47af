"""``k.sys``: the system-call layer, mirroring Python's :mod:`os` and :mod:`socket`.

Theory of operation
-------------------
:class:`Syscalls` is a file table: one fd space (lowest free number from 3, like a
process with stdin/stdout/stderr open) mapping numbers to :class:`kernel.files.File`
objects. Each kind of file implements its own operations -- a block device node is a
:class:`kernel.blockfile.BlockFile`, a socket a :class:`kernel.files.SocketFile`
subclass made by the network stack -- and every call here only resolves the fd and
calls the method, so a new kind of file adds a class, never a branch here.

Files come from two places: ``open(path)`` asks the node tables
(:class:`kernel.files.NodeTable`; the block device nodes ``/dev/vda`` ... are one,
:meth:`Syscalls.add_nodes` adds more), ``socket()`` asks the network stack given to the
constructor (:class:`NetStackAPI`). Errors are ``OSError`` with the errno Linux gives:

===========  ==================================================================
errno        when
===========  ==================================================================
EBADF        an fd that is not open (also one closed while a call waited on it)
ENOTSOCK     a socket call on an fd that is no socket
ENOENT       ``open``/``stat`` of a path no node table knows
EINVAL       an access mode of 3; ``socket()`` with a type outside the socket
             types or unknown flags or-ed into it; ``poll`` of more than
             :data:`MAX_FDS` entries
EMFILE       the table already holds :data:`MAX_FDS` fds
ENODEV       ``open``/``socket`` after the kernel shut down
EAFNOSUPPORT ``socket()`` without a network stack, or of a family it lacks
ESOCKTNOSUPPORT / EPROTONOSUPPORT  a type / protocol the family lacks (the stack)
ENETUNREACH  ``ping`` without a network stack
===========  ==================================================================

Everything else (what a block device answers, see :mod:`kernel.blockfile`; what a
socket answers, see the stack) comes from the file. Argument types are checked as the
:mod:`os`/:mod:`socket` functions check them (``TypeError``, ``ValueError``,
``OverflowError``): those are bugs in the caller, not conditions of the system.

Stream sockets add ``listen``, ``accept`` (installs the new connection at the lowest
free fd and returns ``(fd, peer)``), ``shutdown(fd, how)`` (``shutdown()`` without
arguments is the kernel's own: close everything), ``sendall``, ``recv_into`` and
``connect_ex``; each is a :class:`kernel.files.SocketFile` method (EOPNOTSUPP where a
kind of socket lacks it).

``poll(fds, timeout_s)`` is poll(2) over the table: every file reports its readiness
(:meth:`File.poll`) and wakes the :class:`kernel.files.Waiter` s registered with it
when that may have changed. ``poll`` registers one waiter with every file, then checks,
then sleeps -- a wake-up between the check and the sleep stays in the waiter, so it is
never lost -- and deregisters on the way out, exceptions included. An fd that is
closed (by another thread, or by :meth:`Syscalls.shutdown`) while polled is reported
``POLLNVAL``; closing it wakes the poller.

``close(fd)`` frees the number and, when no other fd (``dup``) refers to the file,
releases the file (:meth:`File.close`, which wakes callers blocked on it: they fail
with EBADF). :meth:`Syscalls.shutdown` closes every file. All calls are thread-safe:
the table has one lock, never held while a file operation runs.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from hostops.sync import Lock

from .blk import BlockDevice
from .blockfile import DEV_PREFIX, BlockNodes
from .errors import io_error
from .files import (
    AF_INET,
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLNVAL,
    SOCK_CLOEXEC,
    SOCK_DGRAM,
    SOCK_MAX,
    SOCK_NONBLOCK,
    SOCK_TYPE_MASK,
    File,
    NodeTable,
    SocketFile,
    Waiter,
    byte_view,
    check_buffersize,
    deadline_after,
    inet_address,
    remaining,
)

__all__ = ["Syscalls", "NetStackAPI", "FIRST_FD", "MAX_FDS", "AF_MAX", "DEV_PREFIX"]

log = logging.getLogger(__name__)

FIRST_FD = 3
#: Size of the fd table (Linux's default RLIMIT_NOFILE hard limit is far above the
#: soft 1024; this is the limit of one k.sys). Also the most entries one ``poll`` takes.
MAX_FDS = 65536
#: One past the largest address family number Linux knows (include/linux/socket.h):
#: ``socket()`` answers EAFNOSUPPORT at or above it, as ``__sock_create`` does.
AF_MAX = 46
_ALWAYS = POLLERR | POLLHUP


class NetStackAPI(Protocol):
    """What ``k.sys`` needs of a network stack."""

    def socket(self, family: int, type: int, proto: int) -> SocketFile:
        """A new socket (``type`` without SOCK_NONBLOCK/SOCK_CLOEXEC). Fails as Linux
        does: EAFNOSUPPORT for a family it lacks, ESOCKTNOSUPPORT for a type the family
        lacks, EPROTONOSUPPORT for a protocol the type lacks
        (:func:`kernel.files.socket_protocol` implements the rules)."""
        ...

    def ping(self, addr: str, count: int, timeout: float) -> list[float]:
        """Send ``count`` ICMP echo requests to the dotted-quad ``addr``; return the
        round-trip times in seconds of the replies that came within ``timeout``
        seconds each. Its errors (``TimeoutError`` when no reply came, ENETUNREACH,
        EHOSTUNREACH, ...) reach the caller of ``k.sys.ping`` unchanged."""
        ...


class Syscalls:
    """The ``os``/``socket``-like system-call interface of one kernel (``k.sys``).

    ``block_devices()`` returns the kernel's block devices by name (their nodes are
    ``/dev/<name>``); ``net`` is the network stack sockets come from (None: no
    networking, ``socket()`` fails with EAFNOSUPPORT).
    """

    def __init__(
        self,
        block_devices: Callable[[], dict[str, BlockDevice]],
        net: NetStackAPI | None = None,
    ) -> None:
        self._nodes: list[NodeTable] = [BlockNodes(block_devices)]
        self._net = net
        self._table: dict[int, File] = {}
        self._refs: dict[int, int] = {}  # id(file) -> how many fds refer to it
        self._lock = Lock()
        self._down = False

    # ------------------------------------------------------------------ fd table
    def add_nodes(self, table: NodeTable) -> None:
        """Let ``open``/``stat`` also find the nodes of ``table`` (asked after the
        tables already there)."""
        with self._lock:
            self._nodes.append(table)

    def _file(self, fd: int) -> File:
        if not isinstance(fd, int) or isinstance(fd, bool):
            raise TypeError(f"fd must be an int, not {type(fd).__name__}")
        with self._lock:
            f = self._table.get(fd)
        if f is None:
            raise io_error(errno.EBADF)
        return f

    def _sock(self, fd: int) -> SocketFile:
        f = self._file(fd)
        if not isinstance(f, SocketFile):
            raise io_error(errno.ENOTSOCK, f"fd {fd} is a {f.kind} file")
        return f

    def _install(self, f: File, what: str) -> int:
        """Put ``f`` at the lowest free fd; on failure ``f`` is released."""
        with self._lock:
            err = None
            if self._down:
                err = io_error(errno.ENODEV, "kernel shut down", what)
            elif len(self._table) >= MAX_FDS:
                err = io_error(errno.EMFILE, None, what)
            else:
                fd = self._lowest_free()
                self._table[fd] = f
                self._refs[id(f)] = 1
                return fd
        _release(f)
        raise err

    def _lowest_free(self) -> int:
        # Bounded: the table holds fewer than MAX_FDS entries (checked by the caller).
        fd = FIRST_FD
        while fd in self._table:
            fd += 1
        return fd

    def dup(self, fd: int) -> int:
        """A new fd (the lowest free) for the file of ``fd``; both share the file (and
        its position), which is released when the last of them is closed."""
        f = self._file(fd)
        with self._lock:
            if self._table.get(fd) is not f:
                raise io_error(errno.EBADF)
            if len(self._table) >= MAX_FDS:
                raise io_error(errno.EMFILE)
            new = self._lowest_free()
            self._table[new] = f
            self._refs[id(f)] += 1
            return new

    def close(self, fd: int) -> None:
        """Close ``fd`` (EBADF if it is not open). The file is released when no other
        fd refers to it; pollers and blocked callers of it are woken either way."""
        if not isinstance(fd, int) or isinstance(fd, bool):
            raise TypeError(f"fd must be an int, not {type(fd).__name__}")
        with self._lock:
            f = self._table.pop(fd, None)
            if f is None:
                raise io_error(errno.EBADF)
            self._refs[id(f)] -= 1
            last = self._refs[id(f)] == 0
            if last:
                del self._refs[id(f)]
        if last:
            f.close()
        else:
            f.wake()  # a poller of this fd now sees POLLNVAL

    def shutdown(self, fd: int | None = None, how: int | None = None) -> None:
        """``shutdown(fd, how)``: the socket call -- shut down reading (SHUT_RD),
        writing (SHUT_WR) or both (SHUT_RDWR) of the socket ``fd``.

        ``shutdown()`` without arguments: the kernel's own -- close every fd and release
        every file; later calls fail (EBADF; ``open`` and ``socket``: ENODEV)."""
        if fd is not None or how is not None:
            if how is None:
                raise TypeError("shutdown(fd, how) needs both arguments")
            self._sock(_int_arg("fd", fd)).shutdown(_int_arg("how", how))
            return
        with self._lock:
            self._down = True
            files = list({id(f): f for f in self._table.values()}.values())
            self._table.clear()
            self._refs.clear()
        for f in files:
            try:
                f.close()
            except Exception:
                log.exception("k.sys shutdown: closing %r failed", f)

    # ------------------------------------------------------------------ files by path
    def open(
        self, path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o777
    ) -> int:
        """Open the node ``path`` (``/dev/vda``); returns a new fd. ``mode`` is
        accepted for ``os.open`` compatibility and ignored."""
        p = _path(path)
        acc = flags & os.O_ACCMODE
        if acc not in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            raise io_error(errno.EINVAL, f"access mode {acc}", p)
        for table in self._node_tables():
            f = table.open(p, flags)
            if f is not None:
                return self._install(f, p)
        raise io_error(errno.ENOENT, None, p)

    def stat(self, path: str | os.PathLike[str]) -> os.stat_result:
        """``os.stat_result`` of the node ``path`` (ENOENT if no such node)."""
        p = _path(path)
        for table in self._node_tables():
            st = table.stat(p)
            if st is not None:
                return st
        raise io_error(errno.ENOENT, None, p)

    def _node_tables(self) -> list[NodeTable]:
        with self._lock:
            return list(self._nodes)

    # ------------------------------------------------------------------ any file
    def read(self, fd: int, n: int) -> bytes:
        """Read up to ``n`` bytes (at the file position, for a file that has one)."""
        return self._file(fd).read(n)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` (at the file position, for a file that has one); returns the
        count written."""
        return self._file(fd).write(data)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        """Read up to ``n`` bytes at ``offset`` (position unchanged; ESPIPE on a file
        without positions)."""
        return self._file(fd).pread(n, offset)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset`` (position unchanged); returns the count."""
        return self._file(fd).pwrite(data, offset)

    def preadv(self, fd: int, buffers: Any, offset: int) -> int:
        """``os.preadv``: read at ``offset`` into ``buffers`` (writable bytes-like
        objects, filled in turn, at most 1024); returns the count. A block file copies
        the data from shared memory straight into them."""
        return self._file(fd).preadv(buffers, offset)

    def pwritev(self, fd: int, buffers: Any, offset: int) -> int:
        """``os.pwritev``: write ``buffers`` one after the other at ``offset``;
        returns the count."""
        return self._file(fd).pwritev(buffers, offset)

    def preadinto(self, fd: int, buffer: Any, offset: int) -> int:
        """Read up to ``len(buffer)`` bytes at ``offset`` into ``buffer``; returns the
        count. :mod:`os` has no such call: it is ``pread`` with the ``readinto`` of
        :mod:`io` (``os.preadv(fd, [buffer], offset)``), named for both."""
        return self._file(fd).preadinto(buffer, offset)

    def lseek(self, fd: int, pos: int, how: int) -> int:
        """Move the file position (SEEK_SET / SEEK_CUR / SEEK_END); returns it."""
        return self._file(fd).lseek(pos, how)

    def fsync(self, fd: int) -> None:
        """Flush the file to stable storage (a block device: VIRTIO_BLK_T_FLUSH)."""
        self._file(fd).fsync()

    def fdatasync(self, fd: int) -> None:
        """Flush the file's data (a block device: the same as :meth:`fsync`)."""
        self._file(fd).fdatasync()

    def fstat(self, fd: int) -> os.stat_result:
        """``os.stat_result`` of the open file (a block node: S_IFBLK, ``st_size`` the
        device size; a socket: S_IFSOCK)."""
        return self._file(fd).fstat()

    # ------------------------------------------------------------------ sockets
    def socket(self, family: int = AF_INET, type: int = SOCK_DGRAM, proto: int = 0) -> int:
        """A new socket from the network stack; returns its fd. ``type`` may carry
        SOCK_NONBLOCK (the socket starts non-blocking) and SOCK_CLOEXEC (ignored)."""
        for name, v in (("family", family), ("type", type), ("proto", proto)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"socket {name} must be an int, not {v.__class__.__name__}")
        # sys_socket/__sock_create (net/socket.c): unknown flags and types are EINVAL,
        # a family out of range EAFNOSUPPORT.
        flags = type & ~SOCK_TYPE_MASK
        if flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC):
            raise io_error(errno.EINVAL, f"socket type {type}")
        kind = type & SOCK_TYPE_MASK
        if not 0 <= family < AF_MAX:
            raise io_error(errno.EAFNOSUPPORT, f"address family {family}")
        if kind >= SOCK_MAX:
            raise io_error(errno.EINVAL, f"socket type {kind}")
        if self._net is None:
            raise io_error(errno.EAFNOSUPPORT, "the kernel has no network stack")
        with self._lock:
            if self._down:
                raise io_error(errno.ENODEV, "kernel shut down")
        sock = self._net.socket(family, kind, proto)
        if not isinstance(sock, SocketFile):
            _release(sock)
            raise TypeError(f"the network stack returned {sock!r}, not a SocketFile")
        if flags & SOCK_NONBLOCK:
            sock.setblocking(False)
        return self._install(sock, sock.path)

    def bind(self, fd: int, addr: Any) -> None:
        """Bind the socket to the local address ``addr``."""
        self._sock(fd).bind(addr)

    def connect(self, fd: int, addr: Any) -> None:
        """Connect the socket to ``addr`` (a datagram socket: set its default peer)."""
        self._sock(fd).connect(addr)

    def sendto(self, fd: int, data: bytes | bytearray | memoryview, addr: Any) -> int:
        """Send ``data`` to ``addr``; returns the count sent."""
        s = self._sock(fd)
        return s.sendto(byte_view(data), addr)

    def send(self, fd: int, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        """Send ``data`` to the connected peer; returns the count sent."""
        s = self._sock(fd)
        return s.send(byte_view(data), _flags(flags))

    def recvfrom(self, fd: int, n: int, flags: int = 0) -> tuple[bytes, Any]:
        """Receive up to ``n`` bytes; returns them and the sender's address."""
        s = self._sock(fd)
        return s.recvfrom(check_buffersize(n, "recvfrom"), _flags(flags))

    def recv(self, fd: int, n: int, flags: int = 0) -> bytes:
        """Receive up to ``n`` bytes."""
        s = self._sock(fd)
        return s.recv(check_buffersize(n, "recv"), _flags(flags))

    def listen(self, fd: int, backlog: int = 128) -> None:
        """Listen for connections on a stream socket (``backlog``: queue bound)."""
        self._sock(fd).listen(_int_arg("backlog", backlog))

    def accept(self, fd: int) -> tuple[int, Any]:
        """The next connection of a listening socket: ``(new_fd, peer_address)``."""
        conn, addr = self._sock(fd).accept()
        return self._install(conn, conn.path), addr

    def connect_ex(self, fd: int, addr: Any) -> int:
        """``connect`` returning the errno (0 on success; EINPROGRESS non-blocking)."""
        return self._sock(fd).connect_ex(addr)

    def sendall(self, fd: int, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        """Send all of ``data`` (blocking per the socket's timeout)."""
        s = self._sock(fd)
        s.sendall(byte_view(data), _flags(flags))

    def recv_into(self, fd: int, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Receive into a writable buffer (at most ``nbytes``, 0: its size); the count,
        as ``socket.recv_into``. A datagram longer than that is truncated (the rest is
        discarded). EBADF for a bad fd; EAGAIN non-blocking with nothing queued;
        EINVAL (also a ``ValueError`` / ``TypeError``, as the socket module raises)
        for a read-only or non-buffer object, a negative ``nbytes`` or one larger than
        the buffer."""
        s = self._sock(fd)
        return s.recv_into(buffer, nbytes, _flags(flags))

    def recvfrom_into(
        self, fd: int, buffer: Any, nbytes: int = 0, flags: int = 0
    ) -> tuple[int, Any]:
        """:meth:`recv_into` that also returns the sender's address: ``(n, addr)``, as
        ``socket.recvfrom_into``."""
        s = self._sock(fd)
        return s.recvfrom_into(buffer, nbytes, _flags(flags))

    def getsockname(self, fd: int) -> Any:
        """The socket's local address."""
        return self._sock(fd).getsockname()

    def getpeername(self, fd: int) -> Any:
        """The socket's peer address (ENOTCONN when it has none)."""
        return self._sock(fd).getpeername()

    def setsockopt(self, fd: int, level: int, opt: int, value: Any) -> None:
        """Set a socket option; ``value`` is an int or a bytes-like object, as in
        ``socket.setsockopt``."""
        s = self._sock(fd)
        _int_arg("level", level)
        _int_arg("option", opt)
        if isinstance(value, bool):
            value = int(value)
        elif not isinstance(value, int):
            value = bytes(byte_view(value))
        s.setsockopt(level, opt, value)

    def getsockopt(self, fd: int, level: int, opt: int) -> Any:
        """Read a socket option."""
        s = self._sock(fd)
        return s.getsockopt(_int_arg("level", level), _int_arg("option", opt))

    def settimeout(self, fd: int, t: float | None) -> None:
        """``socket.settimeout``: None blocks, 0.0 is non-blocking, a positive number
        of seconds makes blocking calls raise ``TimeoutError`` when it passes."""
        self._sock(fd).settimeout(t)

    def gettimeout(self, fd: int) -> float | None:
        """The socket's timeout (None: blocking)."""
        return self._sock(fd).gettimeout()

    def setblocking(self, fd: int, flag: bool) -> None:
        """``setblocking(False)`` is ``settimeout(0.0)``, ``True`` is ``None``."""
        self._sock(fd).setblocking(bool(flag))

    def ping(self, addr: str, count: int = 3, timeout: float = 1.0) -> list[float]:
        """ICMP echo ``addr`` ``count`` times through the network stack; returns the
        round-trip times (seconds) of the replies that came within ``timeout`` seconds
        each (the stack's errors pass through). ENETUNREACH without a network stack."""
        if not isinstance(addr, str):
            raise TypeError(f"address must be a str, not {type(addr).__name__}")
        host, _ = inet_address((addr, 0))
        if not isinstance(count, int) or isinstance(count, bool):
            raise TypeError(f"count must be an int, not {type(count).__name__}")
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be a number, not {type(timeout).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if self._net is None:
            raise io_error(errno.ENETUNREACH, "the kernel has no network stack")
        return self._net.ping(host, count, float(timeout))

    # ------------------------------------------------------------------ poll
    def poll(
        self, fds: Iterable[int | tuple[int, int]], timeout_s: float | None = None
    ) -> list[tuple[int, int]]:
        """poll(2): wait until one of ``fds`` is ready; returns ``(fd, revents)`` for
        every ready entry, in the order given (an empty list when the timeout passed).

        ``fds`` holds ``(fd, events)`` pairs or plain fds (meaning POLLIN). ``revents``
        holds the requested events that are ready plus POLLERR/POLLHUP (always
        reported) or POLLNVAL (the fd is not open, or was closed while polled).
        Negative fds are ignored, as poll(2) does. ``timeout_s`` is in seconds: None
        waits forever, 0 only checks; negative is ``ValueError``.
        """
        entries = _poll_entries(fds)
        if timeout_s is not None:
            if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
                raise TypeError(f"timeout must be a number or None, not {type(timeout_s).__name__}")
            if timeout_s < 0:
                raise ValueError(f"timeout must be non-negative, not {timeout_s}")
        with self._lock:
            files = [self._table.get(fd) if fd >= 0 else None for fd, _ in entries]
        distinct = list({id(f): f for f in files if f is not None}.values())
        deadline = deadline_after(timeout_s)
        waiter = Waiter()
        registered: list[File] = []
        try:
            for f in distinct:
                f.add_waiter(waiter)
                registered.append(f)
            while True:
                ready = self._scan(entries, files)
                if ready:
                    return ready
                left = remaining(deadline)
                if left is not None and left <= 0:
                    return []
                waiter.wait(left)
        finally:
            for f in registered:
                f.remove_waiter(waiter)

    def _scan(
        self, entries: list[tuple[int, int]], files: list[File | None]
    ) -> list[tuple[int, int]]:
        """One readiness check of every entry (files resolved when the poll began)."""
        with self._lock:
            now = [self._table.get(fd) for fd, _ in entries]
        out: list[tuple[int, int]] = []
        for (fd, events), f, cur in zip(entries, files, now, strict=True):
            if fd < 0:
                continue
            if f is None or cur is not f or f.closed:
                out.append((fd, POLLNVAL))
                continue
            revents = f.poll() & (events | _ALWAYS)
            if revents:
                out.append((fd, revents))
        return out


def _path(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    return p if isinstance(p, str) else os.fsdecode(p)


def _release(f: Any) -> None:
    try:
        f.close()
    except Exception:
        log.exception("k.sys: releasing %r failed", f)


def _int_arg(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    return v


def _flags(flags: Any) -> int:
    return _int_arg("flags", flags)


def _poll_entries(fds: Iterable[int | tuple[int, int]]) -> list[tuple[int, int]]:
    """Validate ``poll``'s list: at most MAX_FDS entries (poll(2): EINVAL when nfds
    exceeds RLIMIT_NOFILE), each an fd or an ``(fd, events)`` pair, events 0..0xFFFF
    (a ``short`` in struct pollfd)."""
    if isinstance(fds, int | tuple | str | bytes):
        raise TypeError("poll: fds must be a list of fds or (fd, events) pairs")
    out: list[tuple[int, int]] = []
    for item in fds:
        if len(out) >= MAX_FDS:
            raise io_error(errno.EINVAL, f"poll: more than {MAX_FDS} entries")
        if isinstance(item, tuple):
            if len(item) != 2:
                raise TypeError(f"poll: an entry must be an fd or (fd, events), not {item!r}")
            fd, events = item
        else:
            fd, events = item, POLLIN
        _int_arg("fd", fd)
        _int_arg("events", events)
        if not 0 <= events <= 0xFFFF:
            raise ValueError(f"poll: events {events:#x} out of range 0..0xffff")
        out.append((fd, events))
    return out
