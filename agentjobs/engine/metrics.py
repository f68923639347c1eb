"""Counters and histograms the engine keeps for `/metrics` and `/health`.

Updated from the commit hook (one place, after durability), so the figures describe what
the journal holds. No per-tenant labels: tenants must not learn about each other.
"""

from __future__ import annotations

import bisect
from collections import Counter

import attrs

__all__ = ["Histogram", "Metrics"]

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0)


@attrs.define(slots=True)
class Histogram:
    """A Prometheus-style histogram: cumulative only when rendered."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = attrs.Factory(lambda self: [0] * (len(self.buckets) + 1), takes_self=True)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out = []
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            out.append((f"{bound:g}", running))
        out.append(("+Inf", self.count))
        return out


@attrs.define(slots=True)
class Metrics:
    submitted_total: int = 0
    finished_total: Counter[str] = attrs.Factory(Counter)
    retries_total: int = 0
    cancel_requests_total: int = 0
    queue_wait_seconds: Histogram = attrs.Factory(Histogram)
    run_seconds: Histogram = attrs.Factory(Histogram)
