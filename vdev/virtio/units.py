"""Sizes as people write them on command lines: ``4096``, ``64K``, ``1M``, ``2GiB``."""

from __future__ import annotations

__all__ = ["parse_size"]

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, multiple_of: int = 1) -> int:
    """Parse a byte count with an optional binary suffix (K, M, G, T; "B"/"iB" allowed).

    Raises ``ValueError`` with a message fit for a user for anything else, for sizes
    that are not positive, and for sizes that are not a multiple of ``multiple_of``.
    """
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = _UNITS.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in _UNITS else t
    if not digits.isdigit():
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64K, 1M, 2G)")
    value = int(digits) * mult
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    if value % multiple_of:
        raise ValueError(f"size must be a multiple of {multiple_of}: {text!r}")
    return value
