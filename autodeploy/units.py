"""Sizes as people read them: ``human_bytes(331_000)`` -> ``'323.2 KiB'`` (not ``'0.0003083 GiB'``)."""

from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def byte_unit(n: float) -> tuple[float, str]:
    """The largest unit in which ``n`` bytes is at least 1, as (bytes per unit, name)."""
    scale = 1.0
    for unit in UNITS[:-1]:
        if abs(n) < 1024 * scale:
            return scale, unit
        scale *= 1024
    return scale, UNITS[-1]


def human_bytes(n: float) -> str:
    scale, unit = byte_unit(n)
    return f"{n:.0f} B" if unit == "B" else f"{n / scale:.1f} {unit}"
