"""Byte units and their human-readable form, shared by every report that prints a size.

A leaf (imports nothing of the package) in ``formats/``, the lowest folder whose users need it:
the pre-flight estimate (``models/preflight.py``) and the deployment report (``deploy/``) both
print sizes, and ``models/`` may not import from ``reporting/`` or ``deploy/`` (imports only point
down). Binary units throughout: ``1 GiB = 2**30`` bytes, ``1 MiB = 2**20`` bytes.
"""

from __future__ import annotations

GIB = 1 << 30
MIB = 1 << 20


def format_bytes(n: int | None, gib_decimals: int = 2) -> str:
    """``n`` bytes in GiB (``gib_decimals`` decimals) from 1 GiB up, else in whole MiB.

    A negative ``n`` (a shortfall) keeps its sign; ``None`` (not known) is ``"unknown"``::

        format_bytes(4_456_448_000)        -> "4.15 GiB"
        format_bytes(4_456_448_000, 1)     -> "4.2 GiB"
        format_bytes(512 * MIB)            -> "512 MiB"
        format_bytes(-3 * GIB // 2)        -> "-1.50 GiB"
    """
    if n is None:
        return "unknown"
    sign, size = ("-" if n < 0 else ""), abs(n)
    if size >= GIB:
        return f"{sign}{size / GIB:.{gib_decimals}f} GiB"
    return f"{sign}{size / MIB:.0f} MiB"
