"""``vlab vm``: a small Linux guest in QEMU whose disk and network card are our devices.

A real Linux kernel, with its own ``virtio_blk`` driver, drives a block backend that
runs in a process of its own and talks vhost-user over a Unix socket: our Python
backend (``python -m vdev blk --image PATH --vhost-user SOCK``, ``backend="vlab"``) or
QEMU's ``qemu-storage-daemon`` (``backend="qsd"``, the known-good reference). With a
network (:class:`GuestNet`, ``vlab vm --net``) its ``virtio_net`` driver drives our
net device over vhost-user (``python -m vdev net --vhost-user SOCK --backend switch
--switch EP``), a port of our L2 switch, where other guests, our own kernels and a
host TAP (in a network namespace) meet it.

What it needs (Debian 12 package names)
---------------------------------------
* ``qemu-system-x86`` and ``qemu-system-common``: ``qemu-system-x86_64`` and
  ``qemu-storage-daemon`` (QEMU 7.2 is known to work; no KVM needed, it runs on TCG);
* ``busybox-static``: the guest's userland (a static ``/bin/busybox``);
* ``e2fsprogs`` (host ``e2fsck``, tests only);
* a guest kernel: Debian's ``linux-image-<abi>-amd64-unsigned``, *downloaded and
  unpacked, not installed*, by ``vlab vm --setup`` (``apt-get download`` +
  ``dpkg-deb -x``). The package is the one ``linux-image-amd64`` depends on, or
  ``$VLAB_KERNEL_PACKAGE``. Only the kernel image and the modules the guest needs are
  kept, uncompressed, in the cache directory: ``$VLAB_CACHE``, else
  ``$XDG_CACHE_HOME/virtio-lab``, else ``~/.cache/virtio-lab``.

Without them ``vlab vm`` fails with one line naming what is missing and how to get it
(:class:`MissingPrerequisite`); the tests skip with that line as the reason.

Theory of operation
-------------------
* **Kernel cache** (:func:`setup`, :func:`load_kernel`): the module closure of
  :data:`ROOT_MODULES` -- ``virtio_pci``, ``virtio_blk``, ``crc32c_generic``, ``ext4``
  (Debian serves ext2 with ext4), ``failover``, ``net_failover`` and ``virtio_net`` --
  is computed from each module's own ``depends=`` entry in its ``.modinfo``
  ELF section -- the package ships no ``modules.dep`` (``depmod`` makes it at install
  time) -- and ordered so every module comes after what it depends on. ``.ko.xz`` /
  ``.ko.gz`` are decompressed here (``lzma``/``gzip``), ``.ko.zst`` with the ``zstd``
  tool, because busybox ``insmod`` reads plain ELF only. ``kernel.json`` records the
  release, the package and the load order. A cache made before the network modules
  were in the list still boots disk-only guests; ``--setup`` again adds them (a net
  guest says so, :class:`MissingPrerequisite`).
* **PVH boot** (:func:`pvh_vmlinux`): QEMU boots the kernel's uncompressed ELF image
  (made once from ``vmlinuz`` -- its xz or gzip payload -- and kept beside it in the
  cache) through the PVH entry point: no SeaBIOS, no real-mode set-up, no
  self-decompression, which under TCG took longer than the kernel's own boot (a guest
  is up in ≈ 2.3 s instead of ≈ 4.9 s). A kernel without the PVH note boots from
  ``vmlinuz`` as before.
* **Initramfs** (:mod:`tools.initramfs`): busybox, applet links, modules and ``/init``
  in a newc cpio written by us, cached as ``initramfs-<hash of inputs>.cpio``. Commands
  do not go into the archive: ``/init`` reads them from the serial console (base64),
  runs them and prints ``@@VLAB-BEGIN@@`` / ``@@VLAB-EXIT <status>@@`` around their
  output, so one archive serves every command and one boot can run several. What the
  guest has is said on the kernel command line (``vlab.disk=0``: no disk to wait for;
  ``vlab.ip=ADDR/LEN``: configure ``eth0``), so the archive is the same for all.
* **Processes** (:class:`Guest`): a private ``0700`` run directory
  (:class:`hostops.RuntimeDir`) holds the vhost-user socket and the logs of the
  backend and of QEMU. The backend starts first; we wait for it to be ready by polling
  (never a blind sleep) with a deadline, watching its process at the same time: for
  ``qemu-storage-daemon`` the ``--pidfile`` it writes once its exports listen, for ours
  the socket file plus its ``listening on PATH`` log line. Then QEMU: TCG,
  memfd-backed shared guest RAM (the backend maps guest memory), the serial console
  on a pipe to us (QEMU's own messages go to ``qemu.log``, quoted in errors). Every
  child runs in its own session (a Ctrl-C at the terminal reaches only us) and dies
  with us, so nothing outlives a killed harness. :meth:`Guest.close` (also on
  exceptions, Ctrl-C and timeouts) stops QEMU and the backend (SIGTERM, grace,
  SIGKILL, reaped) and removes the run directory. A step that overruns its timeout
  kills QEMU and raises :class:`GuestTimeout` quoting the last console lines.
  This module has no process code of its own: our own helper processes (our blk
  backend, the net back-end, a switch) are :class:`hostops.process.DeviceProcess` es
  (they exit when we die through the parent-watch pipe, :class:`_Service`); QEMU and
  qemu-storage-daemon, which know nothing of that pipe, are
  :class:`hostops.process.ForeignProcess` es (killed with us by ``PR_SET_PDEATHSIG``).
  :func:`start_all` boots several guests at once (launch all, then wait for each).
* **Reconnect**: :meth:`Guest.restart_backend` stops the backend and starts a fresh
  one on the same socket path; with ``reconnect=True`` QEMU's chardev redials every
  second and brings the device back up with the guest none the wiser.
* **Network** (:class:`GuestNet`): the guest starts its net back-end
  (:class:`NetBackendProcess`, a port of the switch at ``GuestNet.switch``; with
  ``switch=None`` it first starts a :class:`Switch` of its own, stopped with it) and
  gives QEMU ``-chardev socket,...,reconnect=1 -netdev vhost-user -device
  virtio-net-pci,netdev=n0,mac=MAC,host_mtu=MTU,vectors=0,romfile=``. QEMU's virtio-net
  model keeps the config space (the MAC, link status, MTU); the back-end owns the rings
  and the data path, and QEMU offers the guest its features intersected with the
  back-end's (QEMU itself adds MAC, STATUS and the control queue, which it serves).
  The driver negotiates VIRTIO_NET_F_MTU from ``host_mtu``, so QEMU sends
  ``NET_SET_MTU`` and the device's MTU follows. ``offload=False`` adds
  ``csum=off,guest_csum=off,host_tso4=off,guest_tso4=off``. ``vectors=0`` (INTx, no
  MSI-X) works around QEMU 7.2 under TCG, which crashes setting up MSI-X vector
  notifiers for a vhost-served virtio-net (it reaches for KVM irqfds). The net chardev
  always redials (``reconnect=1``): :meth:`Guest.restart_net_backend` kills (or stops)
  the back-end and starts a new one on the same socket; QEMU takes the link down, sets
  the rings up again from where the used rings stand and brings the link back up.
  :meth:`NetBackendProcess.negotiated_features` and
  :meth:`~NetBackendProcess.device_counters` read the back-end's log.

Python API: :func:`run_in_guest` for one command, :class:`Guest` for several commands
in one boot, :func:`start_all` for several guests. ``python -m tools.vm --setup``
fetches the kernel without the project's dependencies installed (this module only
needs ``hostops`` and the standard library).
"""

from __future__ import annotations

import base64
import functools
import gzip
import ipaddress
import json
import lzma
import os
import re
import secrets
import selectors
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tools.initramfs import (
    CMD_END,
    CMD_POWEROFF,
    MARK_BEGIN,
    MARK_ERROR,
    MARK_EXIT,
    MARK_READY,
    ModuleFile,
    build_initramfs,
    initramfs_key,
)

if TYPE_CHECKING:
    from hostops.process import ForeignProcess, SupervisedProcess
    from hostops.rundir import RuntimeDir

__all__ = [
    "VmError",
    "MissingPrerequisite",
    "GuestError",
    "GuestTimeout",
    "KernelFiles",
    "GuestResult",
    "Backend",
    "NetBackendProcess",
    "Switch",
    "GuestNet",
    "Guest",
    "BACKENDS",
    "OFFLOAD_PROPERTIES",
    "SMOKE_COMMAND",
    "NET_SMOKE_COMMAND",
    "ROOT_MODULES",
    "NET_MODULES",
    "cache_dir",
    "setup",
    "load_kernel",
    "find_busybox",
    "check_prerequisites",
    "vlab_backend_supported",
    "vlab_net_supported",
    "random_mac",
    "run_in_guest",
    "start_all",
    "run",
    "main",
]

BACKENDS = ("vlab", "qsd")
ROOT_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "failover",
    "net_failover",
    "virtio_net",
)
"""What the guest loads; their dependencies are added and ordered by :func:`setup`."""
NET_MODULES = ("failover", "net_failover", "virtio_net")
"""The modules a guest with a network interface needs (a cache made before they were
in :data:`ROOT_MODULES` lacks them: ``--setup`` again adds them)."""

QEMU = "qemu-system-x86_64"
QSD = "qemu-storage-daemon"
KERNEL_META_PACKAGE = "linux-image-amd64"
_MANIFEST = "kernel.json"
_MAX_MODULES = 64  # bound on the dependency walk
_CONSOLE_TAIL = 30  # console lines quoted in error messages
_MAX_CONSOLE = 64 << 20  # console bytes kept, so a babbling guest cannot eat our memory


class VmError(Exception):
    """``vlab vm`` failed; the message is one line for the user."""


class MissingPrerequisite(VmError):
    """A package, tool or the kernel cache is missing; the message says how to get it."""


class GuestError(VmError):
    """The guest, QEMU or the backend misbehaved (crashed, no ``/dev/vda``, ...)."""


class GuestTimeout(GuestError):
    """The guest did not finish a step in time; QEMU was killed."""


# -- locations and prerequisites -------------------------------------------------------


def cache_dir() -> Path:
    """``$VLAB_CACHE``, else ``$XDG_CACHE_HOME/virtio-lab``, else ``~/.cache/virtio-lab``."""
    if os.environ.get("VLAB_CACHE"):
        return Path(os.environ["VLAB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "virtio-lab"


def _which(tool: str, packages: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise MissingPrerequisite(
            f"{tool} not found: install the Debian package(s) {packages} "
            f"(apt-get install {packages})"
        )
    return path


def _elf_is_static(data: bytes) -> bool:
    """True for an ELF64 executable without a PT_INTERP program header."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    if phnum > 256 or phoff + phnum * phentsize > len(data):
        return False
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def find_busybox() -> Path:
    """The static busybox (``busybox-static``), or :class:`MissingPrerequisite`."""
    for cand in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""):
        if cand and os.path.isfile(cand):
            with open(cand, "rb") as f:
                if _elf_is_static(f.read()):
                    return Path(cand)
    raise MissingPrerequisite(
        "no static busybox found: install the Debian package busybox-static "
        "(apt-get install busybox-static)"
    )


@functools.cache
def _vdev_help(kind: str) -> str:
    try:
        out = subprocess.run(
            [sys.executable, "-m", "vdev", kind, "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout


def vlab_backend_supported() -> bool:
    """Whether ``python -m vdev blk`` has ``--vhost-user`` (the vlab backend exists)."""
    return "--vhost-user" in _vdev_help("blk")


def vlab_net_supported() -> bool:
    """Whether ``python -m vdev net`` serves vhost-user over the switch backend."""
    text = _vdev_help("net")
    return "--vhost-user" in text and "--switch" in text


def check_prerequisites(
    backend: str | None = "vlab", cache: Path | None = None, *, net: bool = False
) -> None:
    """Raise :class:`MissingPrerequisite` naming the first missing piece for a guest
    with a disk from ``backend`` (None: no disk) and, with ``net``, a network
    interface on our net back-end."""
    if backend is not None and backend not in BACKENDS:
        raise VmError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    _which(QEMU, "qemu-system-x86 qemu-system-common")
    if backend == "qsd":
        _which(QSD, "qemu-system-common")
    find_busybox()
    kernel = load_kernel(cache)
    if backend == "vlab" and not vlab_backend_supported():
        raise MissingPrerequisite(
            "the vlab backend is not available: 'python -m vdev blk --help' has no "
            "--vhost-user (use --backend qsd)"
        )
    if net:
        missing = [m for m in NET_MODULES if m not in kernel.modules]
        if missing:
            raise MissingPrerequisite(
                f"the guest kernel cache has no {missing[0]} module (it predates the "
                "network support): run 'vlab vm --setup' again"
            )
        if not vlab_net_supported():
            raise MissingPrerequisite(
                "the net back-end is not available: 'python -m vdev net --help' has no "
                "--vhost-user or no switch backend"
            )


# -- the kernel cache -----------------------------------------------------------------


@dataclass(frozen=True)
class KernelFiles:
    """The unpacked guest kernel in the cache."""

    directory: Path
    release: str
    package: str
    vmlinuz: Path
    modules: tuple[str, ...]  # load order

    def module_path(self, name: str) -> Path:
        """The uncompressed ``.ko`` file of module ``name``."""
        return self.directory / "modules" / f"{name}.ko"

    @property
    def boot_image(self) -> Path:
        """What QEMU's ``-kernel`` gets: the uncompressed ``vmlinux`` for a PVH boot
        when one could be made (:func:`pvh_vmlinux`), else ``vmlinuz``."""
        return pvh_vmlinux(self.vmlinuz) or self.vmlinuz


#: XEN_ELFNOTE_PHYS32_ENTRY: the ELF note that makes a ``vmlinux`` bootable with PVH.
_PVH_NOTE = 18
_PT_NOTE = 4


def _has_pvh_note(elf: bytes) -> bool:
    """Whether ``elf`` (an ELF64 image) has the Xen PVH entry note (bounded walk of
    its program headers and notes)."""
    if elf[:4] != b"\x7fELF" or len(elf) < 64 or elf[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    if phnum > 64 or phentsize < 56 or phoff + phnum * phentsize > len(elf):
        return False
    for i in range(phnum):
        ptype, _flags, off, _va, _pa, filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if ptype != _PT_NOTE or off + filesz > len(elf):
            continue
        pos, end = off, off + filesz
        for _ in range(256):  # bounded: notes in one segment
            if pos + 12 > end:
                break
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz]
            if name == b"Xen\0" and ntype == _PVH_NOTE:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _unpack_whole(magic: bytes, data: bytes) -> bytes:
    """The xz or gzip stream at the start of ``data`` decompressed, or b"" if it is
    corrupt or cut short (what follows the stream is ignored)."""
    dec: Any = (
        lzma.LZMADecompressor(format=lzma.FORMAT_XZ) if magic[0] == 0xFD else zlib.decompressobj(31)
    )
    try:
        out: bytes = dec.decompress(data)
    except (lzma.LZMAError, zlib.error, EOFError):
        return b""
    return out if dec.eof else b""


def pvh_vmlinux(vmlinuz: Path) -> Path | None:
    """The uncompressed kernel beside ``vmlinuz`` (``vmlinux-<size>-<mtime>``, made once
    and kept in the cache), if its payload is xz or gzip and it has the PVH entry note;
    else None.

    Why: under TCG, SeaBIOS, the real-mode set-up and the kernel decompressing itself
    take longer than the kernel's own boot; QEMU loads a PVH ``vmlinux`` straight into
    guest memory and jumps to its 32-bit entry, so a guest is up in about half the
    time. Made atomically (a temporary file renamed), so guests booting at once can
    all ask; anything unexpected means "boot vmlinuz as before"."""
    try:
        st = vmlinuz.stat()
    except OSError:
        return None
    tag = f"{st.st_size}-{st.st_mtime_ns}"  # a vmlinuz unpacked again gets a new one
    out = vmlinuz.with_name(f"vmlinux-{tag}")
    if out.is_file():
        return out
    none = vmlinuz.with_name(f"vmlinux-{tag}.none")  # remembered: this kernel cannot
    if none.exists():
        return None
    try:
        packed = vmlinuz.read_bytes()
        elf = b""
        for magic in (b"\xfd7zXZ\x00", b"\x1f\x8b\x08\x00"):  # xz, gzip
            at = packed.find(magic)
            if at >= 0:
                elf = _unpack_whole(magic, packed[at:])
                if elf[:4] == b"\x7fELF":
                    break
        if not _has_pvh_note(elf):
            none.touch()
            return None
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        tmp.write_bytes(elf)
        os.replace(tmp, out)
    except OSError:
        return None
    return out


def load_kernel(cache: Path | None = None) -> KernelFiles:
    """The kernel :func:`setup` left in the cache, or :class:`MissingPrerequisite`."""
    cache = cache or cache_dir()
    manifest = cache / _MANIFEST
    hint = f"run 'vlab vm --setup' to download and unpack Debian's {KERNEL_META_PACKAGE}"
    hint += " kernel (needs apt-get and dpkg-deb)"
    try:
        meta = json.loads(manifest.read_text())
        directory = cache / str(meta["directory"])
        k = KernelFiles(
            directory=directory,
            release=str(meta["release"]),
            package=str(meta["package"]),
            vmlinuz=directory / "vmlinuz",
            modules=tuple(str(m) for m in meta["modules"]),
        )
    except FileNotFoundError:
        raise MissingPrerequisite(f"no guest kernel in {cache}: {hint}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MissingPrerequisite(f"unreadable {manifest} ({e}): {hint}") from None
    missing = [p for p in [k.vmlinuz, *map(k.module_path, k.modules)] if not p.is_file()]
    if missing:
        raise MissingPrerequisite(f"guest kernel cache incomplete ({missing[0]}): {hint}")
    return k


def _modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list of a module, read from its ``.modinfo`` ELF section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise VmError("not an ELF64 kernel module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)
    if shnum > 4096 or shstrndx >= shnum or shoff + shnum * shentsize > len(ko):
        raise VmError("corrupt ELF section table in kernel module")

    def section(i: int) -> tuple[int, int, int]:
        name, _type = struct.unpack_from("<II", ko, shoff + i * shentsize)
        off, size = struct.unpack_from("<QQ", ko, shoff + i * shentsize + 24)
        return name, off, size

    _, stroff, strsize = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = ko.find(b"\0", stroff + name, stroff + strsize)
        if ko[stroff + name : end] == b".modinfo":
            for entry in ko[off : off + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[8:].decode().split(",") if d]
            return []
    return []


def _read_module(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".ko.zst"):
        zstd = _which("zstd", "zstd")
        return subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=True).stdout
    return raw


def _module_index(moddir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for p in moddir.rglob("*.ko*"):
        m = re.fullmatch(r"(.+)\.ko(\.xz|\.gz|\.zst)?", p.name)
        if m:
            index[m.group(1).replace("-", "_")] = p
    return index


def _module_order(index: dict[str, Path], roots: Sequence[str]) -> list[tuple[str, bytes]]:
    """Roots plus their dependencies, each after what it depends on."""
    done: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in stack or len(stack) > _MAX_MODULES:
            raise VmError(f"module dependency loop: {' -> '.join(stack + (name,))}")
        if name not in index:
            raise VmError(f"kernel module {name} not in the package")
        data = _read_module(index[name])
        for dep in _modinfo_depends(data):
            visit(dep.replace("-", "_"), stack + (name,))
        seen.add(name)
        done.append((name, data))
        if len(done) > _MAX_MODULES:
            raise VmError("too many kernel modules")

    for r in roots:
        visit(r, ())
    return done


def _run_logged(argv: list[str], log: Callable[[str], None], **kw: object) -> str:
    log("+ " + " ".join(argv))
    try:
        res = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise MissingPrerequisite(
            f"{argv[0]} not found (setup needs apt-get and dpkg-deb)"
        ) from None
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip().splitlines()
        raise VmError(f"'{' '.join(argv)}' failed: {err[-1] if err else res.returncode}")
    return str(res.stdout)


def _choose_package(log: Callable[[str], None]) -> str:
    if os.environ.get("VLAB_KERNEL_PACKAGE"):
        return os.environ["VLAB_KERNEL_PACKAGE"]
    out = _run_logged(["apt-cache", "depends", KERNEL_META_PACKAGE], log)
    m = re.search(r"Depends:\s*(linux-image-\S+-amd64)\s*$", out, re.M)
    if m:
        return m.group(1) + "-unsigned"
    out = _run_logged(
        ["apt-cache", "search", "--names-only", r"^linux-image-[0-9.]+-[0-9]+-amd64-unsigned$"],
        log,
    )
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    if not names:
        raise MissingPrerequisite("no linux-image-*-amd64-unsigned package known to apt")

    def key(n: str) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", n)]

    return max(names, key=key)


def setup(cache: Path | None = None, log: Callable[[str], None] = print) -> KernelFiles:
    """Download and unpack the guest kernel into the cache (see the module docstring).

    Every external command is logged (``+ argv``) through ``log``. Idempotent: an
    existing cache for the same package is reused.
    """
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    pkg = _choose_package(log)
    try:
        k = load_kernel(cache)
        if k.package == pkg and set(ROOT_MODULES) <= set(k.modules):
            log(f"guest kernel {k.release} ({pkg}) already in {cache}; boots {k.boot_image.name}")
            return k
    except MissingPrerequisite:
        pass
    with tempfile.TemporaryDirectory(prefix="setup-", dir=cache) as tmp:
        os.chmod(tmp, 0o755)  # apt's _apt sandbox user must be able to write the .deb
        _run_logged(["apt-get", "download", "-q", pkg], log, cwd=tmp)
        debs = sorted(Path(tmp).glob("*.deb"))
        if not debs:
            raise VmError(f"apt-get download {pkg} left no .deb in {tmp}")
        root = Path(tmp) / "root"
        _run_logged(["dpkg-deb", "-x", str(debs[0]), str(root)], log)
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise VmError(f"{pkg} has no boot/vmlinuz-*")
        release = vmlinuz[0].name[len("vmlinuz-") :]
        moddir = next(
            (
                d
                for d in (root / "lib/modules" / release, root / "usr/lib/modules" / release)
                if d.is_dir()
            ),
            None,
        )
        if moddir is None:
            raise VmError(f"{pkg} has no lib/modules/{release}")
        order = _module_order(_module_index(moddir), ROOT_MODULES)
        name = f"kernel-{release}"
        stage = Path(tmp) / name
        (stage / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz[0], stage / "vmlinuz")
        for mod, data in order:
            (stage / "modules" / f"{mod}.ko").write_bytes(data)
        final = cache / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(stage, final)
        manifest = {
            "directory": name,
            "release": release,
            "package": pkg,
            "deb": debs[0].name,
            "modules": [m for m, _ in order],
        }
        tmp_manifest = cache / f".{_MANIFEST}.tmp"
        tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp_manifest, cache / _MANIFEST)
    k = load_kernel(cache)
    log(f"guest kernel {k.release} ({pkg}) unpacked to {k.directory}")
    log(f"modules (load order): {' '.join(k.modules)}")
    log(f"boots {k.boot_image.name}")  # makes the PVH vmlinux now, not at the first boot
    return k


def _initramfs(kernel: KernelFiles, cache: Path) -> Path:
    """The cached initramfs for ``kernel`` and this busybox (built on first use)."""
    bb = find_busybox()
    busybox = bb.read_bytes()
    applets = subprocess.run(
        [str(bb), "--list"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    mods = [ModuleFile(m, kernel.module_path(m).read_bytes()) for m in kernel.modules]
    path = cache / f"initramfs-{initramfs_key(busybox, applets, mods)}.cpio"
    if not path.is_file():
        data = build_initramfs(busybox, applets, mods)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".initramfs-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


# -- processes ------------------------------------------------------------------------


def _wait_for(cond: Callable[[], bool], proc: SupervisedProcess, timeout_s: float) -> bool:
    """Poll ``cond`` until true, ``proc`` exits (False) or the timeout (False).

    Waits between polls on the process (its pidfd), so an exit is noticed at once.
    """
    deadline = time.monotonic() + timeout_s
    interval = 0.005
    while True:
        if cond():
            return True
        left = deadline - time.monotonic()
        if left <= 0 or not proc.alive():
            return cond()
        proc.wait(min(interval, left))  # wakes at once if it exits
        interval = min(interval * 2, 0.1)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class _Service:
    """One supervised helper process of the harness, with a log file (appended across
    restarts): :meth:`start` launches it and waits (bounded, watching the process) for
    :meth:`_ready`; :meth:`stop`, :meth:`kill`, :meth:`restart`; :meth:`wait_log`
    reads what it logged. Our own Python processes are launched with
    :class:`hostops.process.DeviceProcess` (own session; they exit when we die, through
    the parent-watch pipe), foreign programs with
    :class:`hostops.process.ForeignProcess`."""

    #: What the process is, in messages.
    what = "process"

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        self.starts = 0
        self._proc: SupervisedProcess | None = None
        self._log_mark = 0  # log characters before the current start

    def argv(self) -> list[str]:
        """The command line of the process."""
        raise NotImplementedError

    def _launch(self) -> SupervisedProcess:
        from hostops.process import DeviceProcess  # lazily: --setup runs without the venv

        return DeviceProcess.launch(self.argv(), name=self.what, log_path=self.log_path)

    def _prepare(self) -> None:
        """Before each start (e.g. remove a stale socket file)."""

    def _ready(self) -> bool:
        """The process serves (polled after the start)."""
        raise NotImplementedError

    def _logged_since_start(self, text: str) -> bool:
        return text in self.log_text()[self._log_mark :]

    @property
    def pid(self) -> int | None:
        """The running process's pid."""
        return self._proc.pid if self._proc is not None and self._proc.alive() else None

    def alive(self) -> bool:
        """Whether the process is running."""
        return self._proc is not None and self._proc.alive()

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the process and wait until it is ready; :class:`GuestError` with its
        last log lines if it exits or is not ready in time."""
        if self.alive():
            raise VmError(f"{self.what} already running")
        if self._proc is not None:
            self._proc.close()
            self._proc = None
        self._prepare()
        self._log_mark = len(self.log_text())
        self._proc = proc = self._launch()
        self.starts += 1
        if not _wait_for(self._ready, proc, timeout_s):
            rc = proc.returncode if not proc.alive() else None
            self.stop()
            why = f"exited with status {rc}" if rc is not None else f"not ready in {timeout_s} s"
            raise GuestError(f"{self.what} {why}: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the process (SIGTERM, grace, SIGKILL, reaped); idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.close()

    def kill(self) -> None:
        """SIGKILL the process and reap it (nothing of it runs afterwards)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(None)
            proc.close()

    def restart(self, timeout_s: float = 30.0) -> None:
        """Stop the process and start a new one."""
        self.stop()
        self.start(timeout_s)

    def wait_log(self, pattern: str, timeout_s: float = 10.0) -> re.Match[str]:
        """Wait (polling, bounded) until the log matches the regular expression
        ``pattern``; return the last match. How tests read the counters our processes
        log (e.g. when a vhost-user connection ends)."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout_s
        interval = 0.005
        while True:
            found = list(rx.finditer(self.log_text()))
            if found:
                return found[-1]
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"{self.what} never logged /{pattern}/: {self.log_tail()}")
            proc = self._proc
            if proc is not None and proc.alive():
                proc.wait(min(interval, left))  # wakes at once if it exits
            else:
                time.sleep(min(interval, left))  # nothing to wait on: the log is final
            interval = min(interval * 2, 0.1)

    def log_text(self) -> str:
        """Everything the process (all its starts) logged so far."""
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self) -> str:
        """The last lines of the log, on one line."""
        lines = [ln for ln in self.log_text().splitlines() if ln.strip()]
        return " | ".join(lines[-3:]) or "(no output)"


def _fault_args(plan: str | None, socket_path: str) -> list[str]:
    """``--faults PLAN --faults-state STATE`` for a vlab back-end (the state file beside
    its socket, so a restarted back-end continues the run), or nothing."""
    if plan is None:
        return []
    return ["--faults", plan, "--faults-state", socket_path + ".faults-state"]


class Backend(_Service):
    """One vhost-user-blk backend process serving ``image`` on ``socket_path``.

    ``kind`` is ``"vlab"`` (``python -m vdev blk --vhost-user``) or ``"qsd"``
    (``qemu-storage-daemon``). Output goes to ``log_path`` (appended across restarts).
    ``faults`` is a fault plan file the vlab backend injects (``--faults``, docs/faults.md);
    with a state file beside the socket, a restarted backend continues the plan's run.
    """

    def __init__(
        self, kind: str, image: str, socket_path: str, log_path: str, *, faults: str | None = None
    ) -> None:
        if kind not in BACKENDS:
            raise VmError(f"unknown backend {kind!r} (choose from {', '.join(BACKENDS)})")
        if faults is not None and kind != "vlab":
            raise VmError(f"fault plans need the vlab backend, not {kind}")
        super().__init__(log_path)
        self.faults = faults
        self.kind = kind
        self.what = f"{kind} backend"
        self.image = image
        self.socket_path = socket_path
        self._pidfile = socket_path + ".pid"

    def argv(self) -> list[str]:
        """The command line of the backend process."""
        if self.kind == "qsd":
            return [
                _which(QSD, "qemu-system-common"),
                "--blockdev",
                f"driver=file,node-name=disk,filename={_qemu_escape(self.image)}",
                "--export",
                "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,"
                f"addr.path={_qemu_escape(self.socket_path)},writable=on",
                "--pidfile",
                self._pidfile,
            ]
        return [
            sys.executable,
            "-m",
            "vdev",
            "blk",
            "--image",
            self.image,
            "--vhost-user",
            self.socket_path,
            *_fault_args(self.faults, self.socket_path),
        ]

    def _launch(self) -> SupervisedProcess:
        if self.kind == "qsd":
            from hostops.process import ForeignProcess  # lazily: --setup runs without the venv

            # it knows nothing of the parent-watch pipe: PR_SET_PDEATHSIG instead
            return ForeignProcess.launch(
                self.argv(), name=self.what, log_path=self.log_path, grace_s=5.0
            )
        return super()._launch()

    def _prepare(self) -> None:
        for p in (self.socket_path, self._pidfile):
            if os.path.lexists(p):
                os.unlink(p)

    def _ready(self) -> bool:
        if self.kind == "qsd":
            # qemu-storage-daemon writes its pid file after its exports are listening
            try:
                return os.path.getsize(self._pidfile) > 0 and _is_socket(self.socket_path)
            except OSError:
                return False
        # vdev.vhost_user logs "listening on PATH" once the socket listens
        return _is_socket(self.socket_path) and self._logged_since_start("listening on")


def _ipc_path(endpoint: str) -> str:
    if not endpoint.startswith("ipc://") or len(endpoint) <= len("ipc://"):
        raise VmError(f"not an ipc:// endpoint: {endpoint!r}")
    return endpoint[len("ipc://") :]


class Switch(_Service):
    """A ``python -m vdev switch --listen ENDPOINT [--tap IFNAME]`` process.

    ``wrap`` turns the command line into the one to run, e.g.
    :meth:`hostops.netns.NetNamespace.argv` to run the switch (and the TAP it opens)
    inside a network namespace. :meth:`stats` asks the running switch for its counters
    (:class:`vdev.switch.SwitchClient`)."""

    what = "switch"

    def __init__(
        self,
        endpoint: str,
        log_path: str,
        *,
        tap: str | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        super().__init__(log_path)
        self.endpoint = endpoint
        self.path = _ipc_path(endpoint)
        self.tap = tap
        self._wrap = wrap

    def argv(self) -> list[str]:
        """``python -m vdev switch --listen ENDPOINT [--tap IFNAME]`` (wrapped)."""
        argv = [sys.executable, "-m", "vdev", "switch", "--listen", self.endpoint]
        if self.tap is not None:
            argv += ["--tap", self.tap]
        return self._wrap(argv) if self._wrap is not None else argv

    def _prepare(self) -> None:
        if os.path.lexists(self.path):
            os.unlink(self.path)

    def _ready(self) -> bool:
        # the switch logs "listening on" once its socket is bound and its TAP is open
        return _is_socket(self.path) and self._logged_since_start("listening on")

    def stats(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """The switch's statistics (``{"switch": {...}, "ports": [...], ...}``)."""
        from vdev.switch import SwitchClient

        with SwitchClient(self.endpoint) as c:
            return c.stats(timeout_s=timeout_s)


def _features(match: re.Match[str] | None) -> int | None:
    return int(match.group(1), 16) if match is not None else None


class NetBackendProcess(_Service):
    """The guest's network back-end: ``python -m vdev net --vhost-user SOCKET --backend
    switch --switch ENDPOINT --mac MAC [--mtu N]``, one port of the switch at
    ``switch``; QEMU's ``-netdev vhost-user`` connects to ``socket_path``.

    :meth:`negotiated_features` and :meth:`device_counters` read what it logged:
    the features of the latest activation and the device's counters at the end of
    the latest vhost-user connection."""

    what = "net back-end"

    def __init__(
        self,
        socket_path: str,
        switch: str,
        log_path: str,
        *,
        mac: str,
        mtu: int = 1500,
        faults: str | None = None,
    ) -> None:
        super().__init__(log_path)
        self.faults = faults
        _ipc_path(switch)
        self.socket_path = socket_path
        self.switch = switch
        self.mac = mac
        self.mtu = mtu

    def argv(self) -> list[str]:
        """The back-end's command line."""
        return [
            sys.executable,
            "-m",
            "vdev",
            "net",
            "--backend",
            "switch",
            "--switch",
            self.switch,
            "--mac",
            self.mac,
            "--mtu",
            str(self.mtu),
            "--vhost-user",
            self.socket_path,
            *_fault_args(self.faults, self.socket_path),
        ]

    def _prepare(self) -> None:
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)

    def _ready(self) -> bool:
        return _is_socket(self.socket_path) and self._logged_since_start("listening on")

    def offered_features(self) -> int | None:
        """The virtio features the back-end offered (its ``listening on`` line)."""
        return _features(_last(r"listening on .*features (0x[0-9a-f]+)\)", self.log_text()))

    def negotiated_features(self) -> int | None:
        """The features the guest's driver negotiated at the latest activation (the
        back-end logs ``device active, features 0x...``), None before any."""
        return _features(_last(r"device active, features (0x[0-9a-f]+)", self.log_text()))

    def device_counters(self) -> dict[str, int]:
        """The device's counters logged when the latest vhost-user connection ended
        (``{}`` before any ended)."""
        m = _last(r"device counters: (.*)$", self.log_text())
        if m is None or m.group(1) == "-":
            return {}
        out: dict[str, int] = {}
        for item in m.group(1).split(", "):
            name, _, value = item.rpartition(" ")
            if name and value.lstrip("-").isdigit():
                out[name] = int(value)
        return out


def _last(pattern: str, text: str) -> re.Match[str] | None:
    found = list(re.finditer(pattern, text, re.M))
    return found[-1] if found else None


def _qemu_escape(value: str) -> str:
    """Escape a value for a QEMU ``key=value,...`` option (commas are doubled)."""
    return value.replace(",", ",,")


#: The QEMU ``virtio-net-pci`` properties ``offload=False`` turns off.
OFFLOAD_PROPERTIES = ("csum", "guest_csum", "host_tso4", "guest_tso4")


def random_mac() -> str:
    """A random locally administered unicast MAC (``02:xx:xx:xx:xx:xx``)."""
    return ":".join(f"{b:02x}" for b in b"\x02" + secrets.token_bytes(5))


def _check_cidr(text: str) -> str:
    """``ADDR/LEN`` of an interface (``10.0.0.2/24``), normalised; VmError otherwise."""
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError as e:
        raise VmError(f"not an IPv4 address/prefix length: {text!r} ({e})") from None
    net = iface.network
    if "/" not in text:
        raise VmError(f"give the prefix length too (ADDR/LEN, e.g. 10.0.0.2/24): {text!r}")
    if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
        raise VmError(f"{text} is the network's own or its broadcast address")
    return str(iface)


@dataclass(frozen=True)
class GuestNet:
    """How a guest is attached to the network.

    ``switch``: the ``ipc://`` endpoint of a running switch (``python -m vdev switch
    --listen EP``), or None: the guest starts a switch of its own (stopped with it).
    ``ip``: the interface's address with its prefix length (``"10.0.0.2/24"``), or None
    (the link is up without an IPv4 address). ``mac``: default a random locally
    administered one. ``offload``: False turns off QEMU's ``csum``, ``guest_csum``,
    ``host_tso4`` and ``guest_tso4`` (the driver then negotiates none of them). ``mtu``:
    QEMU's ``host_mtu`` (the driver negotiates VIRTIO_NET_F_MTU and uses it; the
    back-end learns it from ``NET_SET_MTU``)."""

    switch: str | None = None
    ip: str | None = None
    mac: str | None = None
    offload: bool = True
    mtu: int = 1500

    def __post_init__(self) -> None:
        if self.switch is not None:
            _ipc_path(self.switch)
        if self.ip is not None:
            object.__setattr__(self, "ip", _check_cidr(self.ip))
        if self.mac is not None:
            m = re.fullmatch(r"([0-9a-fA-F]{2})(:[0-9a-fA-F]{2}){5}", self.mac)
            if m is None or int(self.mac[:2], 16) & 1:
                raise VmError(f"not a unicast MAC address (aa:bb:cc:dd:ee:ff): {self.mac!r}")
            object.__setattr__(self, "mac", self.mac.lower())
        if not 68 <= self.mtu <= 65535:
            raise VmError(f"MTU {self.mtu} not in 68..65535")


@dataclass
class GuestResult:
    """What one command printed in the guest and its exit status."""

    status: int
    output: str
    seconds: float = 0.0


@dataclass
class _Console:
    buf: bytearray = field(default_factory=bytearray)
    pos: int = 0  # start of the next unread line in buf
    lines: list[str] = field(default_factory=list)
    cursor: int = 0  # the next line _wait_line has not looked at


class Guest:
    """A booted guest: a disk (``/dev/vda``, a vhost-user-blk backend) and/or a network
    interface (``eth0``, virtio-net over vhost-user to our net back-end on a switch).

    ``with Guest(image, backend="qsd") as g: r = g.run("cat /sys/block/vda/size")``;
    ``with Guest(net=GuestNet(switch=EP, ip="10.0.0.2/24")) as g: g.run("ping -c 1 ...")``.
    :meth:`start` (called by ``__enter__``) starts the backends (and a switch of its own
    when ``net.switch`` is None) and QEMU and waits for the guest's first prompt;
    :meth:`run` runs one shell command and returns a :class:`GuestResult`;
    :meth:`restart_backend` restarts the disk's backend on the same socket,
    :meth:`restart_net_backend` the network's; :meth:`close` powers the guest off (or
    kills it) and cleans up everything. ``console`` is called with every console line as
    it arrives (live output). ``backend`` is a kind (``"vlab"``/``"qsd"``: the guest
    starts and stops its own) or a running :class:`Backend` (the caller owns it, e.g. to
    keep it across boots). ``image`` None: no disk (then ``net`` is needed).
    """

    def __init__(
        self,
        image: str | None = None,
        *,
        backend: str | Backend = "vlab",
        net: GuestNet | None = None,
        reconnect: bool = False,
        boot_timeout: float = 120.0,
        memory_mb: int = 256,
        num_queues: int = 1,
        cache: Path | None = None,
        console: Callable[[str], None] | None = None,
        log_dir: str | None = None,
        faults: str | None = None,
    ) -> None:
        if image is None and net is None:
            raise VmError("a guest needs a disk image or a network (or both)")
        if image is not None:
            if not os.path.isfile(image):
                raise VmError(f"image not found: {image}")
            if os.path.getsize(image) < 512:
                raise VmError(f"image {image} is smaller than one 512-byte sector")
        self.image = os.path.abspath(image) if image is not None else None
        self._own_backend = not isinstance(backend, Backend)
        self.backend_kind: str | None = (
            None if image is None else backend.kind if isinstance(backend, Backend) else backend
        )
        self.reconnect = reconnect
        self.faults = faults
        """A fault plan file both back-ends the guest starts inject (``--faults``)."""
        self.boot_timeout = boot_timeout
        self.memory_mb = memory_mb
        self.num_queues = num_queues
        self.cache = cache or cache_dir()
        self.net = net
        self.mac: str | None = None
        if net is not None:
            self.mac = net.mac or random_mac()
        self._console_cb = console
        self.log_dir = log_dir
        """Where the logs of QEMU and of the processes the guest starts go (default:
        the run directory, removed by :meth:`close`)."""
        self._logs = ""  # the log directory in use
        self._rundir: RuntimeDir | None = None
        self._qemu: ForeignProcess | None = None
        self._sel: selectors.BaseSelector | None = None
        self._con = _Console()
        self.backend: Backend | None = (
            None if self._own_backend or image is None else backend  # type: ignore[assignment]
        )
        self.net_backend: NetBackendProcess | None = None
        self.switch: Switch | None = None
        """The switch the guest started itself (``net.switch`` None), else None."""
        self.boot_seconds = 0.0
        self._t_launch = 0.0

    @property
    def switch_endpoint(self) -> str | None:
        """The endpoint of the switch the guest is attached to."""
        if self.net is None:
            return None
        if self.net.switch is not None:
            return self.net.switch
        return self.switch.endpoint if self.switch is not None else None

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Guest:
        try:
            self.start()
        except BaseException:
            self.close(graceful=False)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(graceful=exc_type is None)

    def _qemu_argv(self, kernel: KernelFiles, initramfs: Path) -> list[str]:
        mem = f"{self.memory_mb}M"
        append = "console=ttyS0 quiet loglevel=2 panic=-1"
        if self.image is None:
            append += " vlab.disk=0"
        if self.net is not None:
            append += f" vlab.ip={self.net.ip}" if self.net.ip else " vlab.net=1"
        argv = [
            _which(QEMU, "qemu-system-x86 qemu-system-common"),
            "-accel", "tcg",
            "-m", mem,
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa", "node,memdev=mem",
            "-nodefaults", "-no-user-config",
            "-display", "none",
            "-serial", "stdio",
            "-monitor", "none",
            "-no-reboot",
            "-kernel", str(kernel.boot_image),
            "-initrd", str(initramfs),
            "-append", append,
        ]  # fmt: skip
        if self.backend is not None:
            chardev = f"socket,id=c0,path={_qemu_escape(self.backend.socket_path)}"
            if self.reconnect:
                chardev += ",reconnect=1"
            argv += [
                "-chardev", chardev,
                "-device", f"vhost-user-blk-pci,chardev=c0,num-queues={self.num_queues}",
            ]  # fmt: skip
        if self.net is not None and self.net_backend is not None:
            # vectors=0: no MSI-X. QEMU 7.2 under TCG crashes (SIGSEGV) setting up the
            # MSI-X vector notifiers of a virtio-net whose rings a vhost back-end serves
            # (it reaches for KVM irqfds that do not exist without KVM); with INTx the
            # call eventfds are relayed by QEMU's main loop. romfile=: no option ROM.
            nic = (
                f"virtio-net-pci,netdev=n0,mac={self.mac},host_mtu={self.net.mtu},"
                "vectors=0,romfile="
            )
            if not self.net.offload:
                nic += "".join(f",{p}=off" for p in OFFLOAD_PROPERTIES)
            argv += [
                "-chardev",
                # reconnect=1: QEMU redials a restarted back-end (link down meanwhile)
                f"socket,id=c1,path={_qemu_escape(self.net_backend.socket_path)},reconnect=1",
                "-netdev", "vhost-user,id=n0,chardev=c1",
                "-device", nic,
            ]  # fmt: skip
        return argv

    def start(self) -> None:
        """Start the backends (and a switch), then QEMU, and wait for the first prompt
        (:meth:`launch` unless done already, then :meth:`wait_booted`)."""
        if self._qemu is None:
            self.launch()
        self.wait_booted()

    def wait_booted(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout``, default ``boot_timeout``) for the guest's first
        prompt after :meth:`launch`."""
        if self._qemu is None:
            raise VmError("guest not launched")
        if self.boot_seconds:
            return
        self._wait_line(
            lambda ln: ln == MARK_READY,
            self.boot_timeout if timeout is None else timeout,
            "boot",
        )
        self.boot_seconds = time.monotonic() - self._t_launch

    def launch(self) -> None:
        """Start the backends (and a switch) and QEMU, without waiting for the boot:
        several guests boot at once with ``launch()`` each, then ``wait_booted()``
        each (see :func:`start_all`)."""
        check_prerequisites(self.backend_kind, self.cache, net=self.net is not None)
        kernel = load_kernel(self.cache)
        initramfs = _initramfs(kernel, self.cache)
        # lazily: --setup runs without the venv
        from hostops.rundir import RuntimeDir, sweep_stale_rundirs

        sweep_stale_rundirs()  # run dirs of harnesses that were SIGKILLed
        self._rundir = rd = RuntimeDir.create()
        self._logs = logs = self.log_dir or rd.path
        if self.image is not None and self._own_backend:
            assert self.backend_kind is not None
            sock = os.path.join(rd.path, "vhost.sock")
            log = os.path.join(logs, "backend.log")
            self.backend = Backend(self.backend_kind, self.image, sock, log, faults=self.faults)
            self.backend.start()
        if self.backend is not None and not self.backend.alive():
            raise VmError("the given backend is not running (call its start() first)")
        if self.net is not None:
            assert self.mac is not None
            endpoint = self.net.switch
            if endpoint is not None and not _is_socket(_ipc_path(endpoint)):
                raise VmError(
                    f"no switch listens at {endpoint} (start one with 'python -m vdev "
                    f"switch --listen {endpoint}', or give no endpoint to start one)"
                )
            if endpoint is None:
                self.switch = Switch(rd.endpoint("sw"), os.path.join(logs, "switch.log"))
                self.switch.start()
                endpoint = self.switch.endpoint
            self.net_backend = NetBackendProcess(
                os.path.join(rd.path, "net.sock"),
                endpoint,
                os.path.join(logs, "net.log"),
                mac=self.mac,
                mtu=self.net.mtu,
                faults=self.faults,
            )
            self.net_backend.start()
        argv = self._qemu_argv(kernel, initramfs)
        self._t_launch = time.monotonic()
        from hostops.process import ForeignProcess  # lazily: --setup runs without the venv

        # the serial console on a pipe pair; QEMU's own messages to qemu.log
        self._qemu = ForeignProcess.launch(
            argv,
            name="qemu",
            log_path=os.path.join(logs, "qemu.log"),
            stdin_pipe=True,
            stdout_pipe=True,
            grace_s=2.0,
        )
        assert self._qemu.stdout is not None
        os.set_blocking(self._qemu.stdout.fileno(), False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._qemu.stdout.fileno(), selectors.EVENT_READ)

    def run(self, command: str, timeout: float = 120.0) -> GuestResult:
        """Run ``command`` with the guest's ``sh``; return its output and exit status."""
        if self._qemu is None:
            raise VmError("guest not started")
        t0 = time.monotonic()
        self._send_command(command)
        begin, _ = self._wait_line(lambda ln: ln == MARK_BEGIN, timeout, "command start")
        left = max(0.1, timeout - (time.monotonic() - t0))
        end, line = self._wait_line(lambda ln: ln.startswith(MARK_EXIT + " "), left, "command")
        m = re.fullmatch(re.escape(MARK_EXIT) + r" (\d+)@@", line)
        if m is None:
            raise GuestError(f"garbled exit marker from the guest: {line!r}")
        out_lines = self._con.lines[begin + 1 : end]
        left = max(0.1, timeout - (time.monotonic() - t0))
        self._wait_line(lambda ln: ln == MARK_READY, left, "prompt")
        return GuestResult(
            int(m.group(1)), "".join(ln + "\n" for ln in out_lines), time.monotonic() - t0
        )

    def restart_backend(self, timeout: float = 30.0) -> None:
        """Stop the disk's backend and start a new one on the same socket path."""
        if self.backend is None:
            raise VmError("guest not started or without a disk")
        self.backend.restart(timeout)

    def restart_net_backend(self, *, kill: bool = True, timeout: float = 30.0) -> None:
        """Stop the network back-end -- SIGKILL with ``kill``, else SIGTERM -- and start
        a new one on the same socket. QEMU's chardev (``reconnect=1``) redials within
        about a second and restarts the rings where the used ring stands; the guest
        sees its link go down and up."""
        nb = self.net_backend
        if nb is None:
            raise VmError("guest not started or without a network")
        if kill:
            nb.kill()
        else:
            nb.stop()
        nb.start(timeout)

    def poweroff(self, timeout: float = 30.0) -> None:
        """Ask the guest to sync and power off; wait for QEMU to exit."""
        if self._qemu is None or not self._qemu.alive():
            return
        self._send_lines([CMD_POWEROFF])
        deadline = time.monotonic() + timeout
        while self._qemu.alive():
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestTimeout(f"guest did not power off within {timeout:g} s")
            self._pump(min(left, 0.5))
        self._pump(0)

    def close(self, graceful: bool = True) -> None:
        """Power off (if ``graceful``) or kill QEMU, stop the backends (and the switch
        the guest started), remove the run directory. Idempotent; never raises for
        cleanup trouble."""
        try:
            if graceful and self._qemu is not None and self._qemu.alive():
                try:
                    self.poweroff()
                except (VmError, OSError):
                    pass
        finally:
            qemu, self._qemu = self._qemu, None
            if qemu is not None:
                qemu.close()  # stdin closed, SIGTERM, grace, SIGKILL, reaped; pipes closed
            if self._sel is not None:
                self._sel.close()
                self._sel = None
            if self.backend is not None and self._own_backend:
                self.backend.stop()
            if self.net_backend is not None:
                self.net_backend.stop()  # SIGTERM: it logs its counters on the way out
            if self.switch is not None:
                self.switch.stop()
            if self._rundir is not None:
                self._rundir.cleanup()
                self._rundir = None

    # -- console ---------------------------------------------------------------------

    @property
    def console_lines(self) -> list[str]:
        """Every console line so far (carriage returns stripped)."""
        return list(self._con.lines)

    def _send_lines(self, lines: Iterable[str]) -> None:
        assert self._qemu is not None and self._qemu.stdin is not None
        try:
            self._qemu.stdin.write("".join(ln + "\n" for ln in lines).encode())
            self._qemu.stdin.flush()
        except BrokenPipeError:
            raise GuestError(f"QEMU is gone: {self._tail()}") from None

    def _send_command(self, command: str) -> None:
        b64 = base64.b64encode(command.encode()).decode()
        self._send_lines([b64[i : i + 76] for i in range(0, len(b64), 76)] + [CMD_END])

    def _pump(self, timeout: float) -> bool:
        """Read what QEMU printed (waiting up to ``timeout``); False at end of output."""
        assert self._qemu is not None and self._qemu.stdout is not None and self._sel
        if not self._sel.select(timeout):
            return True
        try:
            chunk = os.read(self._qemu.stdout.fileno(), 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        con = self._con
        con.buf += chunk
        while True:
            nl = con.buf.find(b"\n", con.pos)
            if nl < 0:
                break
            line = con.buf[con.pos : nl].decode(errors="replace").rstrip("\r")
            con.pos = nl + 1
            con.lines.append(line)
            if self._console_cb is not None:
                self._console_cb(line)
        if con.pos > _MAX_CONSOLE:
            del con.buf[: con.pos]
            con.pos = 0
        return True

    def _wait_line(self, want: Callable[[str], bool], timeout: float, what: str) -> tuple[int, str]:
        """Wait for the next unconsumed console line matching ``want``; return its index
        and text (lines before it are consumed). Raise on guest errors and timeouts."""
        deadline = time.monotonic() + timeout
        con = self._con
        while True:
            while con.cursor < len(con.lines):
                i, line = con.cursor, con.lines[con.cursor]
                con.cursor += 1
                if line.startswith(MARK_ERROR):
                    raise GuestError(f"guest reported {line.strip('@')}: {self._tail()}")
                if want(line):
                    return i, line
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill_qemu()
                raise GuestTimeout(
                    f"guest {what} did not finish within {timeout:.1f} s; QEMU killed; "
                    f"console: {self._tail()}; QEMU: {self._qemu_log_tail()}"
                )
            if not self._pump(min(left, 1.0)):
                rc = self._qemu.wait(None) if self._qemu is not None else None
                raise GuestError(
                    f"QEMU exited (status {rc}) during {what}; console: {self._tail()}; "
                    f"QEMU: {self._qemu_log_tail()}; "
                    f"backend: {self.backend.log_tail() if self.backend else '-'}; "
                    f"net back-end: {self.net_backend.log_tail() if self.net_backend else '-'}"
                )

    def _qemu_log_tail(self) -> str:
        if not self._logs:
            return "-"
        try:
            text = Path(self._logs, "qemu.log").read_text(errors="replace")
        except OSError:
            return "-"
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return " | ".join(lines[-3:]) or "(no output)"

    def _kill_qemu(self) -> None:
        if self._qemu is not None:
            self._qemu.kill()  # its process group; a no-op once reaped

    def _tail(self) -> str:
        lines = [ln for ln in self._con.lines if ln.strip()][-_CONSOLE_TAIL:]
        return " | ".join(lines[-8:]) or "(no console output)"


def start_all(guests: Sequence[Guest]) -> None:
    """Boot ``guests`` at once: launch every one, then wait for each. If one fails,
    every guest is closed (killed) and the error propagates."""
    try:
        for g in guests:
            g.launch()
        for g in guests:
            g.wait_booted()
    except BaseException:
        for g in guests:
            g.close(graceful=False)
        raise


def run_in_guest(
    image: str, command: str, *, backend: str = "vlab", timeout: float = 180.0, **kw: object
) -> tuple[int, str]:
    """Boot a guest on ``image``, run ``command``, power off; ``(status, output)``."""
    deadline = time.monotonic() + timeout
    with Guest(image, backend=backend, boot_timeout=timeout, **kw) as g:  # type: ignore[arg-type]
        r = g.run(command, timeout=max(1.0, deadline - time.monotonic()))
    return r.status, r.output


# -- the command line -----------------------------------------------------------------

SMOKE_COMMAND = (
    'echo "vda: $(cat /sys/block/vda/size) sectors of 512 bytes"; '
    "dd if=/dev/vda bs=512 count=1 2>/dev/null | md5sum | "
    "sed 's/ .*//; s/^/md5 of sector 0: /'"
)
"""What ``vlab vm`` runs without ``--run``."""

NET_SMOKE_COMMAND = "ip addr show dev eth0"
"""What ``vlab vm --net`` (without ``--image``) runs without ``--run``."""


def run(
    *,
    image: str | None = None,
    backend: str = "vlab",
    command: str | None = None,
    timeout: float = 180.0,
    size: int = 64 << 20,
    do_setup: bool = False,
    verbose: bool = False,
    net: str | None = None,
    ip: str | None = None,
    net_offload: bool = True,
    trace: str | None = None,
    faults: str | None = None,
) -> int:
    """``vlab vm``: the CLI entry; returns the exit status (the guest command's status).

    ``faults``: a fault plan file (docs/faults.md) the back-ends inject into what the
    guest's own drivers do (the vlab backend only).

    ``trace``: the back-end processes (disk and network) append their virtqueue trace
    to this file (JSON Lines, ``docs/trace-format.md``): the device-side half of every
    request the guest's own drivers make.

    ``net``: attach the guest to the switch at this ``ipc://`` endpoint, or ``"auto"``
    to start a switch for the guest (stopped when it ends); ``ip`` and ``net_offload``
    configure that interface (:class:`GuestNet`). With ``net`` and no ``image`` the
    guest has no disk."""
    from tools.errors import CliError

    try:
        if do_setup:
            setup(log=lambda s: print(s, flush=True))
            return 0
        if image is not None and not os.path.isfile(image):
            raise CliError(f"image not found: {image}")
        if net is None and (ip is not None or not net_offload):
            raise CliError("vm: --ip and --net-offload need --net", 2)
        if faults is not None:
            from vdev.faultplan import load_plan
            from vdev.virtio.faults import FaultPlanError

            if image is not None and backend != "vlab":
                raise CliError(f"vm: --faults needs the vlab backend, not {backend}", 2)
            try:
                load_plan(faults)
            except FaultPlanError as e:
                raise CliError(f"vm: --faults: {e}", 2) from None
            except OSError as e:
                raise CliError(f"vm: --faults: {faults}: {e.strerror or e}", 2) from None
            faults = os.path.abspath(faults)
        attach = None
        if net is not None:
            try:
                attach = GuestNet(switch=None if net == "auto" else net, ip=ip, offload=net_offload)
            except VmError as e:
                raise CliError(f"vm: {e}", 2) from None
        if trace is not None:
            parent = os.path.dirname(os.path.abspath(trace))
            if not os.path.isdir(parent):
                raise CliError(f"vm: --trace: directory {parent} does not exist", 2)
            from hostops.trace import set_child_destination  # lazily, as DeviceProcess

            set_child_destination(trace)
        with tempfile.TemporaryDirectory(prefix="vlab-vm-") as tmp:
            if image is None and attach is None:
                image = os.path.join(tmp, "disk.img")
                with open(image, "wb") as f:
                    f.truncate(size)
            cb = (lambda s: print(f"| {s}", file=sys.stderr, flush=True)) if verbose else None
            deadline = time.monotonic() + timeout
            guest = Guest(
                image, backend=backend, net=attach, boot_timeout=timeout, console=cb, faults=faults
            )
            with guest as g:
                what = [f"{backend} backend"] if image is not None else []
                if attach is not None:
                    addr = f", {attach.ip}" if attach.ip else ""
                    own = " (its own)" if attach.switch is None else ""
                    what.append(f"eth0 {g.mac}{addr} on the switch {g.switch_endpoint}{own}")
                print(
                    f"vlab vm: guest booted in {g.boot_seconds:.1f} s ({'; '.join(what)})",
                    file=sys.stderr,
                )
                default = SMOKE_COMMAND if image is not None else NET_SMOKE_COMMAND
                r = g.run(command or default, max(1.0, deadline - time.monotonic()))
                sys.stdout.write(r.output)
                sys.stdout.flush()
            return r.status
    except VmError as e:
        raise CliError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tools.vm ...``: the same as ``vlab vm ...``; ``--setup`` alone runs
    with the standard library only (CI fetches the kernel before the venv exists)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--setup"]:
        try:
            setup(log=lambda s: print(s, flush=True))
        except VmError as e:
            print(f"vlab: error: {e}", file=sys.stderr)
            return 1
        return 0
    from tools.cli import main as cli_main

    return cli_main(["vm", *args])


if __name__ == "__main__":
    sys.exit(main())
