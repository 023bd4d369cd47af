"""The PVH boot image of ``tools.vm``: made from a vmlinuz whose xz/gzip payload is an
ELF with the Xen PVH entry note, refused (and remembered) otherwise."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

from tools.vm import _has_pvh_note, pvh_vmlinux


def _elf(note_type: int | None) -> bytes:
    """A minimal ELF64: header, one program header (PT_NOTE when ``note_type``), the
    note ``Xen`` of that type."""
    note = b""
    if note_type is not None:
        note = struct.pack("<III", 4, 4, note_type) + b"Xen\0" + struct.pack("<I", 0x1000000)
    phoff = 64
    data_off = phoff + 56
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0, 64, 56, 1, 0, 0, 0)
    ptype = 4 if note_type is not None else 1
    phdr = struct.pack("<IIQQQQQQ", ptype, 4, data_off, 0, 0, len(note), len(note), 4)
    return ehdr + phdr + note


def _vmlinuz(tmp_path: Path, payload: bytes, name: str = "vmlinuz") -> Path:
    p = tmp_path / name
    p.write_bytes(b"MZ set-up code" + bytes(100) + payload + b"trailing bytes")
    return p


def test_the_note_is_found_and_its_absence_too() -> None:
    assert _has_pvh_note(_elf(18))
    assert not _has_pvh_note(_elf(17))  # another Xen note
    assert not _has_pvh_note(_elf(None))
    assert not _has_pvh_note(b"not an elf")
    assert not _has_pvh_note(_elf(18)[:70])  # program headers cut off


def test_a_gzip_payload_with_the_note_becomes_the_boot_image(tmp_path: Path) -> None:
    elf = _elf(18)
    z = _vmlinuz(tmp_path, gzip.compress(elf))
    out = pvh_vmlinux(z)
    assert out is not None and out.read_bytes() == elf and out.parent == tmp_path
    assert pvh_vmlinux(z) == out  # kept: made once
    assert not list(tmp_path.glob("*.tmp"))


def test_an_xz_payload_works_too(tmp_path: Path) -> None:
    elf = _elf(18)
    out = pvh_vmlinux(_vmlinuz(tmp_path, lzma.compress(elf, format=lzma.FORMAT_XZ)))
    assert out is not None and out.read_bytes() == elf


def test_no_note_or_no_payload_boots_vmlinuz_and_is_remembered(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    z = _vmlinuz(a, gzip.compress(_elf(None)))
    assert pvh_vmlinux(z) is None
    assert [p.name for p in a.iterdir() if p.name.endswith(".none")]
    assert pvh_vmlinux(z) is None
    b = tmp_path / "b"
    b.mkdir()
    assert pvh_vmlinux(_vmlinuz(b, b"no compressed payload here")) is None
    assert pvh_vmlinux(b / "missing") is None


def test_a_payload_cut_short_is_not_used(tmp_path: Path) -> None:
    packed = gzip.compress(_elf(18) + bytes(4096))
    assert pvh_vmlinux(_vmlinuz(tmp_path, packed[: len(packed) // 2])) is None
