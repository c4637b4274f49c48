"""Percentiles and means, as every bench report computes them."""

from __future__ import annotations

import math

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def distribution(values: list[float]) -> dict:
    result = {f"p{p}": percentile(values, p) for p in PERCENTILES}
    result["mean"] = mean(values)
    return result
