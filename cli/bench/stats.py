"""Latency summaries for the bench stages: nearest-rank percentiles over a list of samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LatencySummary", "nearest_rank", "summarize"]


def nearest_rank(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0 < p <= 100) by nearest rank: the smallest sample with at least
    p% of the samples at or below it, so p99 of 20 samples is the largest one."""
    if not values:
        raise ValueError("no samples")
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is not in (0, 100]")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class LatencySummary:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    def text(self) -> str:
        return (
            f"p50 {self.p50_ms:,.0f} ms, p99 {self.p99_ms:,.0f} ms, max {self.max_ms:,.0f} ms"
            f" (n={self.count})"
        )


def summarize(latencies_s: Sequence[float]) -> LatencySummary:
    """Samples in seconds, summary in milliseconds."""
    return LatencySummary(
        len(latencies_s),
        nearest_rank(latencies_s, 50) * 1000,
        nearest_rank(latencies_s, 99) * 1000,
        max(latencies_s) * 1000,
    )
