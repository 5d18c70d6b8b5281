"""Percentiles as the benchmark reports them."""

from __future__ import annotations

import statistics


def percentiles(values: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99 (nearest rank) and max; {} for no values."""
    if not values:
        return {}
    xs = sorted(values)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]

    return {"mean": statistics.fmean(xs), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": xs[-1]}
