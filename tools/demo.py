"""``vlab demo``: the whole path of a request, end to end, in one command.

Boots one kernel with two devices, each a separate process: a virtio-blk disk on a
temporary image and a virtio-net NIC on the loopback backend (every frame it sends comes
back). On the disk it writes a pattern through ``k.sys.pwrite`` from several threads at
once (so several requests are in flight), reads it back through the device and checks
the image from the host side. On the NIC it does a UDP round trip between two
``k.sys`` sockets and pings the interface's own address — with the loopback backend
both really cross the device (ARP, IP, ICMP and UDP frames on the rings). It prints the
negotiated features and the per-queue and per-device counters of both.

With ``--trace`` (``run(trace=True)``) the kernel is booted with tracing on to a file in
the demo's temporary directory, and a :class:`tools.trace.LiveTail` prints every event
of every queue, of the kernel and of both device processes, while the demo runs.

``vlab demo --device KIND`` (:func:`run_device`) boots a kernel with one device of
that kind (built-in or installed through the ``vlab.devices`` entry points) and runs
its driver's demo. How a driver offers one: its class defines ``demo(self, k) ->
bool | None`` (the kernel is booted; print what happens; return False if a check
failed) — ``vlab new-device`` scaffolds one. The built-in example kinds (rng, console,
kv) have theirs here (:data:`BUILTIN_DEMOS`). Before booting, the kind's device class
is imported for its ``device_id`` and the driver the kernel would bind is looked up
(:func:`kernel.bus.VirtioBus.driver_for`, which loads the ``vlab.drivers`` plug-ins): a
kind without a driver or without a demo is one line and exit status 2.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kernel
from tools.errors import CliError
from tools.table import render_table

__all__ = [
    "run",
    "pattern",
    "tcp_digest_round_trip",
    "run_device",
    "find_demo",
    "BUILTIN_DEMOS",
    "DemoFunc",
]

CHUNK = 64 << 10
#: Bytes the demo sends over its TCP connection.
TCP_BYTES = 1 << 20
#: The demo NIC's address (a private subnet that only this kernel uses).
DEMO_IP = "10.0.0.2/24"
THREADS = 8


def pattern(offset: int, length: int) -> bytes:
    """Deterministic, position-dependent bytes (so a misplaced block is caught)."""
    out = bytearray()
    block = offset // 4096
    while len(out) < length + (offset % 4096):
        out += hashlib.sha256(block.to_bytes(8, "little")).digest() * 128
        block += 1
    start = offset % 4096
    return bytes(out[start : start + length])


def _check_image(path: str, write: bool) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CliError(f"image not found: {path}") from None
    except OSError as e:
        raise CliError(f"cannot use image {path}: {e.strerror}") from None
    if not os.path.isfile(path):
        raise CliError(f"image is not a regular file: {path}")
    if st.st_size < 512:
        raise CliError(f"image {path} is smaller than one 512-byte sector")
    if not os.access(path, os.R_OK | (os.W_OK if write else 0)):
        raise CliError(f"no permission to {'write' if write else 'read'} {path}")
    return st.st_size


def run(
    image: str | None = None, write: bool = False, size: int = 64 << 20, trace: bool = False
) -> int:
    """Run the demo; returns the exit status (0 when every check passed). ``trace``
    prints the live virtqueue trace of the demo's traffic."""
    if write and image is None:
        raise CliError("--write only makes sense with --image", 2)
    with tempfile.TemporaryDirectory(prefix="vlab-demo-") as tmp:
        if image is None:
            path = os.path.join(tmp, "disk.img")
            with open(path, "wb") as f:
                f.truncate(size)
            writable = True
        else:
            path = image
            size = _check_image(path, write)
            writable = write
        trace_path = os.path.join(tmp, "trace.jsonl") if trace else None
        return _demo(path, size, writable, temporary=image is None, trace_path=trace_path)


def _demo(
    path: str, size: int, writable: bool, temporary: bool, trace_path: str | None = None
) -> int:
    span = min(size - size % 512, 4 << 20)
    offsets = list(range(0, span, CHUNK))
    print(
        f"image: {path} ({size} bytes){' [temporary]' if temporary else ''}"
        f"{'' if writable else ' [read-only]'}"
    )
    saved: list[bytes] = []  # the user's bytes while the pattern is on their image
    from tools.trace import live_trace

    try:
        with live_trace(trace_path):
            return _run_kernel(path, span, offsets, writable, temporary, saved, trace_path)
    finally:
        if saved:  # the device path failed before restoring: put them back from the host
            with open(path, "r+b") as f:
                f.write(saved[0])
                os.fsync(f.fileno())
            print(f"  [ok] original {len(saved[0])} bytes restored from the host side")


def _run_kernel(
    path: str,
    span: int,
    offsets: list[int],
    writable: bool,
    temporary: bool,
    saved: list[bytes],
    trace_path: str | None = None,
) -> int:
    devices = [kernel.Blk(path, readonly=not writable), kernel.Net(backend="loopback", ip=DEMO_IP)]
    with kernel.boot(devices=devices, trace=trace_path) as k:
        dev = k.devices[0]
        print(f"device /dev/{dev.name}: device id {dev.device_id}, process {dev.pid}")
        fd = k.sys.open(f"/dev/{dev.name}", os.O_RDWR if writable else os.O_RDONLY)
        try:
            original = b""
            if writable:
                if not temporary:
                    with open(path, "rb") as f:
                        original = f.read(span)
                    saved.append(original)

                def put(off: int) -> None:
                    data = pattern(off, min(CHUNK, span - off))
                    n = k.sys.pwrite(fd, data, off)
                    if n != len(data):
                        raise CliError(f"short write at {off}: {n} of {len(data)}")

                with ThreadPoolExecutor(THREADS) as pool:
                    list(pool.map(put, offsets))
                k.sys.fsync(fd)
                print(
                    f"wrote {span} bytes in {len(offsets)} writes from {THREADS} threads, fsync'd"
                )

            def get(off: int) -> bytes:
                return k.sys.pread(fd, min(CHUNK, span - off), off)

            with ThreadPoolExecutor(THREADS) as pool:
                got = b"".join(pool.map(get, offsets))
            with open(path, "rb") as f:
                host = f.read(span)
            ok = True
            if writable:
                want = pattern(0, span)
                ok &= _report("read back through virtio == pattern", got == want)
                ok &= _report("image file on the host  == pattern", host == want)
            else:
                ok &= _report("read through virtio == image file on the host", got == host)
            if original:
                n = k.sys.pwrite(fd, original, 0)
                k.sys.fsync(fd)
                with open(path, "rb") as f:
                    restored = f.read(span) == original
                if restored:
                    saved.clear()
                ok &= _report(f"original {n} bytes restored", restored)
        finally:
            k.sys.close(fd)
        _counters(dev)
        print()
        ok &= _net(k, k.devices[1])
    print()
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


def _net(k: kernel.Kernel, nic: kernel.VirtioDevice) -> bool:
    """A UDP round trip, a ping and a TCP transfer over the loopback NIC; True if all
    worked."""
    addr = DEMO_IP.split("/")[0]
    print(f"interface {nic.name}: {addr}, MAC {nic.mac}, MTU {nic.mtu}, process {nic.pid}")
    server = k.sys.socket()
    client = k.sys.socket()
    ok = True
    try:
        k.sys.bind(server, (addr, 7))
        k.sys.settimeout(server, 5.0)
        k.sys.settimeout(client, 5.0)
        msg = b"hello through virtio-net"
        k.sys.sendto(client, msg, (addr, 7))
        data, peer = k.sys.recvfrom(server, 2048)
        k.sys.sendto(server, data.upper(), peer)
        back, _ = k.sys.recvfrom(client, 2048)
        ok &= _report(f"UDP {peer[0]}:{peer[1]} -> {addr}:7 and back", back == msg.upper())
        rtts = k.sys.ping(addr, count=3, timeout=2.0)
        ms = ", ".join(f"{r * 1000:.2f} ms" for r in rtts)
        ok &= _report(f"ping {addr}: {len(rtts)} replies ({ms})", len(rtts) == 3)
        ok &= _tcp(k, addr)
    except OSError as e:
        ok &= _report(f"network round trip: {e}", False)
    finally:
        k.sys.close(server)
        k.sys.close(client)
    _counters(nic)
    print(f"frames: tx {nic.tx_frames}, rx {nic.rx_frames}, bad {nic.rx_bad_frames}")
    st = k.net.stats
    shown = (
        "icmp_echo_replied",
        "udp_tx_datagrams",
        "tcp_segments_out",
        "tcp_gso_segments",
        "tcp_retransmits",
    )
    print("stack: " + ", ".join(f"{n}={st[n]}" for n in shown))
    return ok


def _tcp(k: kernel.Kernel, addr: str) -> bool:
    """A TCP connection over the same NIC: the client sends TCP_BYTES, the server (a
    thread) answers with the SHA-256 of what it got; True if it matches."""
    data = os.urandom(TCP_BYTES)
    good = tcp_digest_round_trip(k, addr, data) == hashlib.sha256(data).digest()
    return _report(f"TCP {TCP_BYTES >> 10} KiB to {addr}:8080, SHA-256 echoed back", good)


def tcp_digest_round_trip(
    k: kernel.Kernel, addr: str, data: bytes, port: int = 8080, timeout_s: float = 10.0
) -> bytes:
    """Send ``data`` over a TCP connection to a server thread on ``addr:port`` of the
    same kernel, which answers with the SHA-256 of what it received; returns that
    digest. OSErrors of either side are raised."""
    listener = k.sys.socket(2, 1)  # AF_INET, SOCK_STREAM
    client = k.sys.socket(2, 1)
    try:
        k.sys.bind(listener, (addr, port))
        k.sys.listen(listener, 1)
        k.sys.settimeout(listener, timeout_s)

        def serve() -> bytes:
            conn, _ = k.sys.accept(listener)
            try:
                k.sys.settimeout(conn, timeout_s)
                h = hashlib.sha256()
                while chunk := k.sys.recv(conn, 65536):
                    h.update(chunk)
                k.sys.sendall(conn, h.digest())
                return h.digest()
            finally:
                k.sys.close(conn)

        with ThreadPoolExecutor(1) as pool:
            server = pool.submit(serve)
            k.sys.settimeout(client, timeout_s)
            k.sys.connect(client, (addr, port))
            k.sys.sendall(client, data)
            k.sys.shutdown(client, 1)  # SHUT_WR: the server sees the end of the data
            digest = bytes(k.sys.recv(client, 64))
            server.result(timeout=timeout_s)
        return digest
    finally:
        k.sys.close(client)
        k.sys.close(listener)


def _counters(dev: kernel.VirtioDevice) -> None:
    """Print the negotiated features, the queue table and the device's own counters."""
    print()
    print(f"{dev.name} negotiated features: " + ", ".join(dev.features))
    print()
    rows = []
    for i, q in enumerate(dev.queues):
        s = q.stats
        rows.append(
            [
                str(i),
                s.requests,
                s.kicks_sent,
                s.kicks_suppressed,
                s.interrupts,
                s.interrupts_suppressed,
                s.completions,
            ]
        )
    print(
        render_table(
            [
                "queue",
                "requests",
                "kicks sent",
                "kicks suppressed",
                "interrupts",
                "interrupts suppressed",
                "completions",
            ],
            rows,
        )
    )
    metrics = dev.metrics()
    interesting = {k: v for k, v in metrics.get("device", {}).items() if v}
    if interesting:
        print()
        print("device counters: " + ", ".join(f"{k}={v}" for k, v in sorted(interesting.items())))


def _report(what: str, good: bool) -> bool:
    print(f"  [{'ok' if good else 'FAIL'}] {what}")
    return good


# --------------------------------------------------------------------------- --device

#: A demo: called with the booted kernel and the bound driver; False means a check failed.
DemoFunc = Callable[["kernel.Kernel", Any], "bool | None"]


def _rng_demo(k: kernel.Kernel, driver: Any) -> bool:
    """Read /dev/hwrng twice (seeded: the bytes are the same in every run)."""
    fd = k.sys.open("/dev/hwrng", os.O_RDONLY)
    try:
        a, b = k.sys.read(fd, 16), k.sys.read(fd, 4096)
    finally:
        k.sys.close(fd)
    print(f"/dev/hwrng: read 16 bytes: {a.hex()}")
    print(f"/dev/hwrng: read {len(b)} more bytes, {len(set(b))} distinct byte values")
    return _report("16 + 4096 bytes of entropy through virtio-rng", len(a) + len(b) == 4112)


def _kv_demo(k: kernel.Kernel, driver: Any) -> bool:
    """Lines of the /dev/kv0 protocol, then the driver's typed calls."""
    fd = k.sys.open("/dev/kv0", os.O_RDWR)
    try:
        lines = b"PUT colour blue\nGET colour\nDEL colour\nGET colour\n"
        k.sys.write(fd, lines)
        answers = k.sys.read(fd, 4096)
    finally:
        k.sys.close(fd)
    for q, a in zip(lines.splitlines(), answers.splitlines(), strict=False):
        print(f"/dev/kv0: {q.decode():<18} -> {a.decode()}")
    driver.put("greeting", b"hello through virtio")
    got = driver.get("greeting")
    print(f"driver.get('greeting') -> {got!r}")
    good = answers == b"OK\nOK blue\nOK\nERR ENOENT\n" and got == b"hello through virtio"
    return _report("PUT/GET/DEL through the key-value device", good)


def _console_demo(k: kernel.Kernel, driver: Any) -> bool:
    """Write to /dev/hvc0 of an echoing console and read it back."""
    fd = k.sys.open("/dev/hvc0", os.O_RDWR)
    msg = b"hello through virtio-console"
    try:
        k.sys.write(fd, msg)
        got = b""
        while len(got) < len(msg):  # bounded: each read returns >= 1 byte or raises
            got += k.sys.read(fd, 4096)
    finally:
        k.sys.close(fd)
    print(f"/dev/hvc0: wrote {msg!r}, read back {got!r}")
    return _report("transmitq0 -> device (echo) -> receiveq0", got == msg)


#: Kind → (the spec options the demo boots it with, the demo) for the built-in examples.
BUILTIN_DEMOS: dict[str, tuple[dict[str, Any], DemoFunc]] = {
    "rng": ({"seed": 7}, _rng_demo),
    "kv": ({}, _kv_demo),
    "console": ({"echo": True}, _console_demo),
}


def find_demo(kind: str) -> tuple[dict[str, Any], DemoFunc | None, str]:
    """The options to boot ``kind`` with, its demo (None: it has none) and the name of
    the driver class the kernel would bind. :class:`CliError` (status 2) when the kind
    is unknown, does not load or has no kernel driver."""
    from vdev.registry import KindError, lookup

    try:
        cls = lookup(kind).load()
    except KindError as e:
        raise CliError(f"demo --device: {e}", 2) from None
    drv = kernel.default_bus.driver_for(cls.device_id)
    if drv is None:
        raise CliError(
            f"demo --device: no kernel driver for device id {cls.device_id:#x} "
            f"(device kind {kind!r}, {cls.__module__}.{cls.__name__})",
            2,
        )
    driver_name = f"{drv.__module__}.{drv.__name__}"
    method = getattr(drv, "demo", None)
    if callable(method):
        return {}, lambda k, d: d.demo(k), driver_name
    if kind in BUILTIN_DEMOS:
        options, fn = BUILTIN_DEMOS[kind]
        return dict(options), fn, driver_name
    return {}, None, driver_name


def run_device(kind: str, trace: bool = False) -> int:
    """``vlab demo --device KIND [--trace]``: boot a kernel with one device of ``kind``
    and run its driver's demo; 0 when it passed, 1 when it failed, 2 (one line) when
    the kind has no demo."""
    options, fn, driver_name = find_demo(kind)
    if fn is None:
        hint = " ('vlab demo' without --device shows blk and net)" if kind in ("blk", "net") else ""
        raise CliError(
            f"demo --device: device kind {kind!r} has no demo: its driver {driver_name} "
            f"defines no demo(k){hint}",
            2,
        )
    with tempfile.TemporaryDirectory(prefix="vlab-demo-") as tmp:
        trace_path = os.path.join(tmp, "trace.jsonl") if trace else None
        from tools.trace import live_trace

        with live_trace(trace_path):
            ok = _run_device_demo(kind, options, fn, trace_path)
    print()
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


def _run_device_demo(
    kind: str, options: dict[str, Any], fn: DemoFunc, trace_path: str | None
) -> bool:
    with kernel.boot(devices=[kernel.Custom(kind, **options)], trace=trace_path) as k:
        dev = k.devices[0]
        driver = dev.driver
        print(
            f"device /dev/{dev.name}: kind {kind!r}, device id {dev.device_id:#x}, "
            f"process {dev.pid}, driver {type(driver).__module__}.{type(driver).__name__}"
        )
        print()
        try:
            ok = fn(k, driver) is not False
        except OSError as e:  # the device or driver failed: one line, then the counters
            ok = _report(f"demo stopped: {type(e).__name__}: {e}", False)
        _counters(dev)
    return ok
