"""TCP sequence-number arithmetic modulo 2**32 (RFC 9293 §3.4).

Theory of operation
-------------------
Sequence numbers wrap: ``a`` is "before" ``b`` when the distance from ``a`` forward to
``b`` is less than 2**31 (serial number arithmetic, RFC 1982 §3.2). Every comparison of
sequence or acknowledgment numbers in :mod:`kernel.net.tcp` goes through these
functions, never through ``<`` on raw numbers, so a connection whose ISN is just below
2**32 works across the wrap.
"""

from __future__ import annotations

__all__ = ["SEQ_MASK", "seq_add", "seq_sub", "seq_lt", "seq_le", "seq_gt", "seq_ge", "seq_max"]

SEQ_MASK = 0xFFFFFFFF
_HALF = 0x80000000


def seq_add(a: int, n: int) -> int:
    """``a + n`` modulo 2**32 (``n`` may be negative)."""
    return (a + n) & SEQ_MASK


def seq_sub(a: int, b: int) -> int:
    """The signed distance ``a - b`` (in -2**31 .. 2**31-1)."""
    d = (a - b) & SEQ_MASK
    return d - (1 << 32) if d & _HALF else d


def seq_lt(a: int, b: int) -> bool:
    """``a`` comes before ``b``."""
    return seq_sub(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    """``a`` comes before ``b`` or is ``b``."""
    return seq_sub(a, b) <= 0


def seq_gt(a: int, b: int) -> bool:
    """``a`` comes after ``b``."""
    return seq_sub(a, b) > 0


def seq_ge(a: int, b: int) -> bool:
    """``a`` comes after ``b`` or is ``b``."""
    return seq_sub(a, b) >= 0


def seq_max(a: int, b: int) -> int:
    """The later of ``a`` and ``b``."""
    return a if seq_ge(a, b) else b
