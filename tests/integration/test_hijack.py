"""``kernel.hijack`` and ``vlab run``: unmodified Python programs on the kernel's stack.

Real parts only: the programs in ``hijack_progs/`` know nothing of virtio-lab; ``vlab
run`` (a child process) boots a kernel in the program's own process with a NIC on a real
switch, next to a peer kernel in another process (``netpeer.Peer``, a UDP echo on port
7) or a second ``vlab run``. In-process tests boot a kernel with a loopback NIC,
``install`` the hijack and use the socket, select and selectors modules directly.
Nothing sleeps: children are waited on with timeouts, a server's readiness is a line it
prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import selectors
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netpeer import Peer, Switch, running_switch

import kernel
from kernel import hijack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
PROGS = Path(__file__).resolve().parent / "hijack_progs"
VLAB = [sys.executable, "-c", "import sys; from tools.cli import main; sys.exit(main())"]
RUN_TIMEOUT_S = 90


# =========================================================================== helpers


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def vlab_run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``vlab run ARGS`` to completion."""
    return subprocess.run(
        [*VLAB, "run", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=_env(),
        cwd=cwd or ROOT,
        stdin=subprocess.DEVNULL,
    )


class Background:
    """``vlab run ARGS`` in the background; :meth:`wait_line` waits for a stdout line."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [*VLAB, "run", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=_env(),
            cwd=cwd or ROOT,
        )
        self.lines: list[str] = []

    def wait_line(self, needle: str) -> str:
        """The first stdout line containing ``needle`` (fails if the program ends
        first; the suite's per-test timeout bounds the wait)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # bounded: ends when the child closes stdout
            self.lines.append(line)
            if needle in line:
                return line
        self.proc.wait(RUN_TIMEOUT_S)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        raise AssertionError(f"no {needle!r} line; status {self.proc.returncode}: {err}")

    def finish(self) -> tuple[int, str, str]:
        """Wait for the end; status, the rest of stdout, stderr."""
        out, err = self.proc.communicate(timeout=RUN_TIMEOUT_S)
        return self.proc.returncode, "".join(self.lines) + out, err

    def kill(self) -> None:
        """Make sure the child is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=RUN_TIMEOUT_S)


def _last_json(text: str) -> dict[str, Any]:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line in {text!r}"
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def _needs_tcp() -> None:
    if not hasattr(kernel.Syscalls, "listen"):
        pytest.skip("k.sys has no TCP yet (k.sys.listen missing)")


@pytest.fixture
def switch() -> Iterator[Switch]:
    with running_switch() as sw:
        yield sw


@pytest.fixture
def k() -> Iterator[kernel.Kernel]:
    """A kernel with a loopback NIC at 10.0.0.2 (traffic to itself crosses the device)."""
    with kernel.boot(devices=[kernel.Net(backend="loopback", ip="10.0.0.2/24")]) as kk:
        yield kk


@pytest.fixture
def hijacked(k: kernel.Kernel) -> Iterator[Any]:
    with hijack.hijacked(k) as st:
        yield st


# =========================================================================== vlab run: UDP


def test_unmodified_udp_program_with_selectors_talks_to_a_peer_kernel(switch: Switch) -> None:
    peer = Peer(backend="switch", switch=switch.endpoint, ip="10.0.0.2/24")
    try:
        before = peer.call(op="stats")["echoed"]
        r = vlab_run(
            "--net", f"backend=switch,switch={switch.endpoint},ip=10.0.0.3/24",
            "--", "python", str(PROGS / "udp_selectors.py"), "10.0.0.2", "7", "12",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        out = _last_json(r.stdout)
        assert out["matched"] == 12
        assert out["isinstance"] is True
        assert out["fileno"] >= hijack.FILENO_BASE
        assert out["sockname"][0] == "0.0.0.0" and out["sockname"][1] > 0  # auto-bound
        assert peer.call(op="stats")["echoed"] - before == 12
    finally:
        peer.close()


# =========================================================================== in process


def test_select_and_selectors_wake_on_kernel_data(k: kernel.Kernel, hijacked: Any) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("10.0.0.2", 5001))
    tx.bind(("10.0.0.2", 5000))
    assert isinstance(rx, socket.socket) and rx.fileno() >= hijack.FILENO_BASE
    assert select.select([rx], [], [], 0) == ([], [], [])
    assert select.select([], [tx], [], 0) == ([], [tx], [])

    class Tagged(socket.socket):  # a program's own subclass is on the kernel too
        def tag(self) -> str:
            return "mine"

    t = Tagged(socket.AF_INET, socket.SOCK_DGRAM)
    assert t.tag() == "mine" and t.fileno() >= hijack.FILENO_BASE
    t.bind(("10.0.0.2", 5002))
    assert t.getsockname() == ("10.0.0.2", 5002)
    t.close()

    # selectors, kernel socket only: the datagram crosses the loopback device first.
    sel = selectors.DefaultSelector()
    sel.register(rx, selectors.EVENT_READ, "rx")
    tx.sendto(b"one", ("10.0.0.2", 5001))
    events = sel.select(30)
    assert [(key.data, ev) for key, ev in events] == [("rx", selectors.EVENT_READ)]
    assert rx.recvfrom(100) == (b"one", ("10.0.0.2", 5000))
    assert sel.select(0) == []

    # a kernel socket and a host socketpair in one wait: each side wakes it.
    a, b = socket.socketpair()
    sel.register(a, selectors.EVENT_READ, "host")
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(sel.select(30)))
    waiter.start()
    tx.sendto(b"two", ("10.0.0.2", 5001))
    waiter.join(30)
    assert not waiter.is_alive()
    assert [key.data for key, _ in got[0]] == ["rx"]
    assert rx.recv(100) == b"two"
    b.send(b"x")
    assert [key.data for key, _ in sel.select(30)] == ["host"]
    assert a.recv(1) == b"x"

    # select.select and select.poll over both kinds.
    tx.sendto(b"three", ("10.0.0.2", 5001))
    assert select.select([rx, a], [], [], 30) == ([rx], [], [])
    assert select.select([rx, a], [b], [], 0) == ([rx], [b], [])
    p = select.poll()
    p.register(rx, select.POLLIN)
    p.register(a.fileno(), select.POLLIN)
    b.send(b"y")
    ready = dict(p.poll(30_000))
    assert ready.get(rx.fileno(), 0) & select.POLLIN
    assert ready.get(a.fileno(), 0) & select.POLLIN
    sel.close()
    for s in (rx, tx, a, b):
        s.close()
    assert hijacked.mixed_waits >= 3 and hijacked.kernel_waits >= 1
    assert hijacked.kernel_sockets == 3


def test_af_unix_falls_through_to_the_host(hijacked: Any, tmp_path: Path) -> None:
    a, b = socket.socketpair()
    assert a.family == socket.AF_UNIX and a.fileno() < hijack.FILENO_BASE
    assert isinstance(a, socket.socket)
    a.sendall(b"ping")
    assert b.recv(4) == b"ping"
    path = str(tmp_path / "u.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli.connect(path)
    conn, _ = srv.accept()
    with conn.makefile("rwb", buffering=0) as f:
        cli.sendall(b"line\n")
        assert f.readline() == b"line\n"
    for s in (a, b, srv, cli, conn):
        s.close()
    assert hijacked.host_sockets >= 4 and hijacked.kernel_sockets == 0


def test_what_the_kernel_cannot_do_fails_clearly(k: kernel.Kernel, hijacked: Any) -> None:
    with pytest.raises(OSError) as e:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    assert e.value.errno == 97  # EAFNOSUPPORT
    with pytest.raises(socket.gaierror, match="loopback"):
        socket.getaddrinfo("localhost", 80)
    with pytest.raises(socket.gaierror, match="no resolver"):
        socket.getaddrinfo("example.org", 80)
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("10.0.0.9", 80, socket.AF_INET6)
    infos = socket.getaddrinfo("10.0.0.9", "80", type=socket.SOCK_DGRAM)
    assert infos == [(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP, "", ("10.0.0.9", 80))]
    assert socket.getaddrinfo(None, 0, flags=socket.AI_PASSIVE)[0][4] == ("0.0.0.0", 0)
    assert socket.gethostbyname("10.0.0.9") == "10.0.0.9"
    assert socket.getfqdn("10.0.0.9") == "10.0.0.9"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(OSError) as e:
        s.sendmsg([b"x"])
    assert e.value.errno == 95  # EOPNOTSUPP
    with pytest.raises(OSError):
        os.fstat(s.fileno())  # no host fd has this number
    again = socket.socket(fileno=s.detach())  # a kernel fileno is taken back
    assert again.type == socket.SOCK_DGRAM and again.fileno() >= hijack.FILENO_BASE
    assert hijack.current_kernel() is k
    again.close()
    assert again.fileno() == -1
    assert hijacked.refused_sockets == 1 and hijacked.resolve_refused >= 3


def test_uninstall_puts_the_host_back(k: kernel.Kernel) -> None:
    host = (
        socket.socket,
        socket.getaddrinfo,
        select.select,
        select.poll,
        selectors.DefaultSelector,
    )
    with hijack.hijacked(k):
        assert socket.socket is not host[0]
        with pytest.raises(RuntimeError):
            hijack.install(k)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    now = (socket.socket, socket.getaddrinfo, select.select, select.poll, selectors.DefaultSelector)
    assert now == host
    assert hijack.stats() == {}
    s.close()


# =========================================================================== vlab run: TCP


def test_http_server_and_client_on_two_kernels(switch: Switch, tmp_path: Path) -> None:
    _needs_tcp()
    data = os.urandom(300_000)
    (tmp_path / "blob.bin").write_bytes(data)
    server = Background(
        "--net", f"backend=switch,switch={switch.endpoint},ip=10.0.0.2/24",
        "--", "python", "-u", "-m", "http.server", "8000", "--bind", "10.0.0.2",
        cwd=tmp_path,
    )  # fmt: skip
    try:
        server.wait_line("Serving HTTP on 10.0.0.2 port 8000")
        r = vlab_run(
            "--net", f"backend=switch,switch={switch.endpoint},ip=10.0.0.3/24",
            "--", "python", str(PROGS / "http_get.py"), "10.0.0.2", "8000", "/blob.bin",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        out = _last_json(r.stdout)
        assert out == {
            "status": 200,
            "length": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        server.proc.send_signal(2)  # SIGINT: http.server says so and exits 0
        status, _, err = server.finish()
        assert status == 0, err
        assert '"GET /blob.bin HTTP/1.1" 200' in err
    finally:
        server.kill()


def test_asyncio_echo_server_and_client_on_two_kernels(switch: Switch) -> None:
    _needs_tcp()
    server = Background(
        "--net", f"backend=switch,switch={switch.endpoint},ip=10.0.0.2/24",
        "--", "python", str(PROGS / "aio_echo_server.py"), "10.0.0.2", "7000",
    )  # fmt: skip
    try:
        server.wait_line("ready")
        n = 200_000
        r = vlab_run(
            "--net", f"backend=switch,switch={switch.endpoint},ip=10.0.0.3/24",
            "--", "python", str(PROGS / "aio_echo_client.py"), "10.0.0.2", "7000", str(n),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        out = _last_json(r.stdout)
        assert out["got"] == n and out["same"] is True
        status, text, err = server.finish()
        assert status == 0, err
        assert _last_json(text) == {"echoed": n}
    finally:
        server.kill()


# =========================================================================== vlab run: CLI


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("backend=loopback,colour=red", "--net: unknown key 'colour'"),
        ("mtu=big", "--net: mtu='big' is not an integer"),
        ("offload=maybe", "--net: offload='maybe' is not a boolean"),
        ("ip=10.0.0.300/24", "--net: Net: ip"),
        ("backend", "--net: 'backend' is not key=value"),
    ],
)
def test_bad_specs_are_one_line_and_status_2(spec: str, message: str) -> None:
    r = vlab_run("--net", spec, "--", "python", "-c", "print('never')")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vlab: error: {message}"), r.stderr


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ([], "run: give the program"),
        (["ls", "-l"], "run: only Python programs"),
        (["python", "/nonexistent/prog.py"], "run: no such program"),
        (["python", "-X", "dev", "p.py"], "run: python option '-X'"),
    ],
)
def test_bad_commands_are_one_line_and_status_2(command: list[str], message: str) -> None:
    r = vlab_run("--", *command)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vlab: error: {message}"), r.stderr


def test_the_programs_exit_status_is_passed_through(tmp_path: Path) -> None:
    prog = tmp_path / "p.py"
    prog.write_text("import sys, socket\nprint(sys.argv[1:])\nsys.exit(int(sys.argv[1]))\n")
    r = vlab_run("--", "python", str(prog), "7", "x")
    assert (r.returncode, r.stdout) == (7, "['7', 'x']\n"), r.stderr
    r = vlab_run("--", "python", "-c", "raise ValueError('boom')")
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == "ValueError: boom"
    r = vlab_run("--", "python", "-c", "import sys; sys.exit('bye')")
    assert (r.returncode, r.stderr) == (1, "bye\n")
    r = vlab_run("--", "python", "-c", "raise KeyboardInterrupt")
    assert r.returncode == 130


_BLOCKED = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.0.0.2", 9))
print("ready", flush=True)
s.recv(10)
"""


@pytest.mark.parametrize(("signum", "status"), [(15, 143), (2, 130)])
def test_sigterm_and_sigint_end_a_blocked_program_cleanly(signum: int, status: int) -> None:
    prog = Background(
        "--net", "backend=loopback,ip=10.0.0.2/24", "--", "python", "-c", _BLOCKED
    )  # fmt: skip
    try:
        prog.wait_line("ready")
        prog.proc.send_signal(signum)
        code, _, err = prog.finish()
        assert code == status, err
    finally:
        prog.kill()


def test_a_program_reaches_its_disk_through_the_kernel() -> None:
    code = (
        "import os, sys; from kernel import hijack; k = hijack.current_kernel(); "
        "print(k.sys.fstat(k.sys.open('/dev/vda', os.O_RDONLY)).st_size)"
    )
    r = vlab_run("--blk", "memory_size=1M", "--", "python", "-c", code)
    assert (r.returncode, r.stdout) == (0, f"{1 << 20}\n"), r.stderr
