"""Pure statistics helpers: percentiles and the median of per-round summaries.

Machines here are noisy, so a figure is quoted as the median over rounds of that round's
statistic (each round interleaves every mode, so they all see the same noise).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/min/max/mean and the count of ``values`` (whatever unit they are in)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def median_of_rounds(rounds: Sequence[Sequence[float]], q: float) -> float:
    """The median over rounds of each round's ``q``-th percentile."""
    per_round = [percentile(r, q) for r in rounds if r]
    return statistics.median(per_round) if per_round else math.nan
