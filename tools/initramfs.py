"""The guest's initramfs: a newc cpio writer of our own and the guest's ``/init``.

Theory of operation
-------------------
The Linux kernel unpacks an initramfs from one or more concatenated "newc" cpio
archives (``Documentation/driver-api/early-userspace/buffer-format.rst`` in the kernel
tree). Each member is a 110-byte ASCII header -- the magic ``070701`` and thirteen
8-digit hexadecimal fields (ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
devminor, rdevmajor, rdevminor, namesize, check) -- followed by the NUL-terminated
name, padded with NULs so the data starts on a 4-byte boundary, then the data, padded
to 4 bytes again. A member named ``TRAILER!!!`` ends the archive. ``namesize`` counts
the NUL; ``check`` is 0 (it is only used by the ``070702`` "crc" format). Because every
member starts 4-byte aligned and :meth:`CpioWriter.finish` pads the archive to 512
bytes, archives may be concatenated and the kernel unpacks them one after the other.

The archive built by :func:`build_initramfs` holds a static busybox with one symlink
per applet, the kernel modules (uncompressed ``.ko`` files, since busybox ``insmod``
cannot read ``.ko.xz``) and :data:`INIT_SCRIPT` as ``/init``. The script mounts proc,
sys and devtmpfs, quiets the kernel's console messages, loads the modules in the order
listed in ``/etc/vlab-modules``, waits (bounded) for ``/dev/vda`` and/or brings up the
network interface (see *Kernel command line* below) and then serves commands from the
serial console -- a small line protocol that keeps the archive the
same for every command (so it is built once and cached) and lets one boot run several
commands, with the host doing things (such as restarting the backend) in between:

* the guest prints ``@@VLAB-READY@@`` and reads lines from the console;
* the host sends the command base64-encoded, in lines of at most 76 characters (the
  tty's canonical mode limits a line to 4095 bytes), then a line ``@@END@@``;
* the guest writes the decoded command to a file, runs it with ``sh`` (so no quoting of
  the command ever matters), and prints ``@@VLAB-BEGIN@@``, the command's output
  (stdout and stderr), then ``@@VLAB-EXIT <status>@@``;
* a line ``@@POWEROFF@@`` (or end of input) makes it ``sync`` and ``poweroff -f``.

Console echo is switched off (``stty -echo``) so the host's input does not show up in
the output. If ``/dev/vda`` does not appear within about 10 s the guest prints
``@@VLAB-ERROR no /dev/vda@@`` and powers off; a failed ``insmod`` prints
``@@VLAB-ERROR insmod <name>@@`` and goes on (the wait for ``/dev/vda`` then decides).

Kernel command line. What the guest has is said on the kernel command line (``-append``),
so the archive stays the same for every guest; ``/init`` reads these words from
``/proc/cmdline``:

* ``vlab.disk=0``: there is no disk, do not wait for ``/dev/vda`` (default: wait);
* ``vlab.net=1``: wait (bounded, about 10 s) for the network interface ``eth0`` (a
  virtio-net device), then bring ``lo`` and ``eth0`` up (IPv6 off on ``eth0``, so the
  link carries only what the commands send) and wait (bounded, about 5 s, no error)
  for its carrier -- the driver learns the link state from the device a moment after
  the probe; ``@@VLAB-ERROR no eth0@@`` and power off if it never appears;
* ``vlab.ip=ADDR/LEN`` (implies ``vlab.net=1``): also ``ip addr add ADDR/LEN dev eth0``
  before the link goes up (``@@VLAB-ERROR ip addr add ...@@`` if that fails).
"""

from __future__ import annotations

import hashlib
import io
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "CpioWriter",
    "INIT_SCRIPT",
    "ModuleFile",
    "build_initramfs",
    "initramfs_key",
    "MARK_READY",
    "MARK_BEGIN",
    "MARK_EXIT",
    "MARK_ERROR",
    "CMD_END",
    "CMD_POWEROFF",
]

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_FIELD_MAX = 0xFFFFFFFF

MARK_READY = "@@VLAB-READY@@"
MARK_BEGIN = "@@VLAB-BEGIN@@"
MARK_EXIT = "@@VLAB-EXIT"  # followed by " <status>@@"
MARK_ERROR = "@@VLAB-ERROR"  # followed by " <what>@@"
CMD_END = "@@END@@"
CMD_POWEROFF = "@@POWEROFF@@"

INIT_SCRIPT = r"""#!/bin/sh
# /init of the virtio-lab guest (tools/initramfs.py explains the console protocol).
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo 2 > /proc/sys/kernel/printk
stty -echo 2>/dev/null
disk=1
net=0
addr=
for w in $(cat /proc/cmdline); do
  case "$w" in
    vlab.disk=0) disk=0 ;;
    vlab.net=1) net=1 ;;
    vlab.ip=*) net=1; addr="${w#vlab.ip=}" ;;
  esac
done
for m in $(cat /etc/vlab-modules); do
  insmod "/lib/modules/$m.ko" || echo "@@VLAB-ERROR insmod $m@@"
done
i=0
while [ $disk = 1 ] && [ ! -b /dev/vda ] && [ $i -lt 1000 ]; do
  usleep 10000
  i=$((i + 1))
done
if [ $disk = 1 ] && [ ! -b /dev/vda ]; then
  dmesg | tail -n 8
  echo "@@VLAB-ERROR no /dev/vda@@"
  sync
  poweroff -f
fi
i=0
while [ $net = 1 ] && [ ! -e /sys/class/net/eth0 ] && [ $i -lt 1000 ]; do
  usleep 10000
  i=$((i + 1))
done
if [ $net = 1 ]; then
  if [ ! -e /sys/class/net/eth0 ]; then
    dmesg | tail -n 8
    echo "@@VLAB-ERROR no eth0@@"
    sync
    poweroff -f
  fi
  ip link set lo up
  echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6 2>/dev/null
  if [ -n "$addr" ]; then
    ip addr add "$addr" dev eth0 || echo "@@VLAB-ERROR ip addr add $addr@@"
  fi
  ip link set eth0 up || echo "@@VLAB-ERROR ip link set eth0 up@@"
  i=0
  while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $i -lt 500 ]; do
    usleep 10000
    i=$((i + 1))
  done
fi
while true; do
  echo "@@VLAB-READY@@"
  : > /tmp/vlab-cmd.b64
  n=0
  ended=0
  while [ $n -lt 100000 ] && IFS= read -r line; do
    n=$((n + 1))
    case "$line" in
      @@END@@) ended=1; break ;;
      @@POWEROFF@@) break ;;
      *) echo "$line" >> /tmp/vlab-cmd.b64 ;;
    esac
  done
  [ $ended = 1 ] || break
  base64 -d /tmp/vlab-cmd.b64 > /tmp/vlab-cmd
  echo "@@VLAB-BEGIN@@"
  (cd / && sh /tmp/vlab-cmd) < /dev/null 2>&1
  st=$?
  echo "@@VLAB-EXIT $st@@"
done
sync
poweroff -f
"""
"""The guest's ``/init``: a busybox ``sh`` script (see the module docstring)."""


def _hdr(
    *,
    ino: int,
    mode: int,
    nlink: int,
    mtime: int,
    filesize: int,
    rdevmajor: int,
    rdevminor: int,
    namesize: int,
) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, filesize, 0, 0, rdevmajor, rdevminor, namesize, 0)
    for f in fields:
        if not 0 <= f <= _FIELD_MAX:
            raise ValueError(f"cpio header field out of range: {f}")
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Writes a newc (``070701``) cpio archive into a binary stream.

    Names are relative paths without a leading ``/`` (``"bin/busybox"``); parent
    directories must be added before their members (the kernel does not create them).
    Every member gets owner 0:0, ``mtime`` 0 (so equal inputs give equal bytes) and a
    fresh inode number. Call :meth:`finish` once at the end.
    """

    def __init__(self, out: io.BufferedIOBase | io.BytesIO) -> None:
        self._out = out
        self._ino = 1
        self._written = 0
        self._names: set[str] = set()
        self._finished = False

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self._written += len(data)

    def _member(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if self._finished:
            raise ValueError("archive already finished")
        if name != TRAILER:
            if not name or name.startswith("/") or "\0" in name or ".." in name.split("/"):
                raise ValueError(f"bad cpio member name: {name!r}")
            if name in self._names:
                raise ValueError(f"duplicate cpio member: {name!r}")
            self._names.add(name)
        raw = name.encode() + b"\0"
        is_dir = stat.S_ISDIR(mode)
        header = _hdr(
            ino=self._ino if name != TRAILER else 0,
            mode=mode,
            nlink=2 if is_dir else 1,
            mtime=0,
            filesize=len(data),
            rdevmajor=rdev[0],
            rdevminor=rdev[1],
            namesize=len(raw),
        )
        self._ino += 1
        self._emit(header + raw + _pad4(len(header) + len(raw)))
        if data:
            self._emit(data + _pad4(len(data)))

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        """Add a directory."""
        self._member(name, stat.S_IFDIR | perm)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        """Add a regular file with contents ``data``."""
        self._member(name, stat.S_IFREG | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        """Add a symbolic link ``name`` -> ``target`` (the target is the data)."""
        self._member(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Add a character device node."""
        self._member(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> int:
        """Write the ``TRAILER!!!`` member and pad to 512 bytes; returns the size."""
        self._member(TRAILER, 0)
        self._emit(b"\0" * (-self._written % 512))
        self._finished = True
        return self._written


@dataclass(frozen=True)
class ModuleFile:
    """One kernel module for the initramfs: its name and uncompressed ``.ko`` bytes."""

    name: str
    data: bytes


def initramfs_key(busybox: bytes, applets: Sequence[str], modules: Sequence[ModuleFile]) -> str:
    """A hash of everything :func:`build_initramfs` puts in the archive (a cache key)."""
    h = hashlib.sha256()
    h.update(b"vlab-initramfs-v1\0")
    h.update(INIT_SCRIPT.encode())
    h.update(hashlib.sha256(busybox).digest())
    h.update("\0".join(applets).encode() + b"\0\0")
    for m in modules:
        h.update(m.name.encode() + b"\0" + hashlib.sha256(m.data).digest())
    return h.hexdigest()[:24]


def build_initramfs(busybox: bytes, applets: Iterable[str], modules: Sequence[ModuleFile]) -> bytes:
    """The whole initramfs as bytes: busybox + applet links + modules (in load order) +
    ``/init``. ``applets`` are the names ``busybox --list`` printed."""
    buf = io.BytesIO()
    w = CpioWriter(buf)
    for d in ("bin", "sbin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "mnt"):
        w.add_dir(d, 0o1777 if d == "tmp" else 0o755)
    # the kernel opens /dev/console for init's stdio before /init can mount devtmpfs
    w.add_chardev("dev/console", 5, 1)
    w.add_chardev("dev/null", 1, 3, 0o666)
    w.add_file("bin/busybox", busybox, 0o755)
    for a in sorted(set(applets)):
        if a and a != "busybox" and "/" not in a and a not in (".", ".."):
            w.add_symlink(f"bin/{a}", "busybox")
    w.add_symlink("sbin/init", "/init")
    for m in modules:
        w.add_file(f"lib/modules/{m.name}.ko", m.data)
    w.add_file("etc/vlab-modules", "".join(f"{m.name}\n" for m in modules).encode())
    w.add_file("init", INIT_SCRIPT.encode(), 0o755)
    w.finish()
    return buf.getvalue()
