"""Small statistics: percentiles, medians across repetitions, and how to print them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["fmt", "median", "percentile", "spread"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def spread(values: Sequence[float]) -> tuple[float, float]:
    """Lowest and highest of the repetitions, shown beside a median."""
    return (min(values), max(values)) if values else (math.nan, math.nan)


def fmt(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"
