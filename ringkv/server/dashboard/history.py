"""A node's recent request rates and latencies, for the dashboard (pure).

The node's metrics are cumulative: request counts per latency bucket since
the process started. The sampler reads them every second or two
(``Reading``); ``History`` keeps the difference between consecutive readings
as one ``Sample`` (ops/s, p50 and p99 per consistency level, and the mean
commit wait of the transactions committed meanwhile), the last ``capacity``
of them only, so memory stays bounded however long the node runs.

Percentiles come from the histogram's buckets, interpolated linearly inside
the bucket that holds the rank (as Prometheus' ``histogram_quantile``): a
latency is known to the width of its bucket, no finer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The operations that are client traffic; the info routes (status, ring,
# metrics, the dashboard's own) would otherwise show as load on every poll.
DATA_OPS = frozenset({
    "get", "put", "delete", "scan", "batch", "txn", "txn_status", "txn_begin", "txn_get",
    "txn_put", "txn_delete", "txn_commit", "txn_abort",
})
ALL_LEVELS = "all"  # the series that sums every consistency level
QUANTILES = (("p50_ms", 0.5), ("p99_ms", 0.99))


@dataclass(frozen=True)
class Reading:
    """The node's cumulative counters at one instant."""

    wall_ms: int  # when, for the chart's time axis (wall time lines up across nodes)
    monotonic_s: float  # when, for the rates (never goes backwards)
    # consistency level -> cumulative request counts per latency bucket (``le``
    # inclusive, the last one +Inf, so it is the level's total), data ops only
    buckets: Mapping[str, tuple[int, ...]]
    commits: int = 0  # transactions committed here as leader
    commit_wait_us: int = 0  # their commit wait, summed


def reading_from_histograms(wall_ms: int, monotonic_s: float,
                            series: Iterable[tuple[str, str, Sequence[int]]],
                            commits: int = 0, commit_wait_us: int = 0) -> Reading:
    """A ``Reading`` from the latency histogram's series: (op, consistency level,
    cumulative bucket counts). Only data operations count; their series are
    summed per level (cumulative counts add up bucket by bucket)."""
    per_level: dict[str, list[int]] = {}
    for op, level, counts in series:
        if op not in DATA_OPS:
            continue
        total = per_level.setdefault(level, [0] * len(counts))
        if len(total) != len(counts):
            raise ValueError(f"series {op}/{level} has {len(counts)} buckets, not {len(total)}")
        for i, count in enumerate(counts):
            total[i] += count
    return Reading(wall_ms, monotonic_s, {lvl: tuple(c) for lvl, c in per_level.items()},
                   commits, commit_wait_us)


def quantile_s(q: float, bounds_s: Sequence[float], cumulative: Sequence[int]) -> float | None:
    """The ``q`` quantile of a histogram (``cumulative[i]``: observations <= ``bounds_s[i]``,
    the last entry +Inf), interpolated inside its bucket; None without observations.
    A rank in the +Inf bucket answers the largest finite bound: all that is known."""
    if len(cumulative) != len(bounds_s) + 1:
        raise ValueError("a histogram has one more bucket (+Inf) than finite bounds")
    total = cumulative[-1]
    if total <= 0:
        return None
    rank = q * total
    for i, count in enumerate(cumulative):
        if count >= rank and count > 0:
            if i == len(bounds_s):
                return bounds_s[-1]
            below = cumulative[i - 1] if i else 0
            lower = bounds_s[i - 1] if i else 0.0
            inside = count - below
            fraction = (rank - below) / inside if inside else 1.0
            return lower + (bounds_s[i] - lower) * fraction
    return bounds_s[-1]


@dataclass
class History:
    """The last ``capacity`` samples, each the difference of two consecutive readings."""

    bounds_s: tuple[float, ...]
    capacity: int
    interval_s: float = 1.0  # the sampler's period, shown to the page
    samples: deque[dict[str, Any]] = field(init=False)
    _last: Reading | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.samples = deque(maxlen=self.capacity)  # the bound: old samples fall off

    def record(self, reading: Reading) -> dict[str, Any] | None:
        """Take a reading; the sample it completes (None for the first one, or after
        the counters went backwards, which only a restart of them can do)."""
        last, self._last = self._last, reading
        if last is None:
            return None
        elapsed_s = reading.monotonic_s - last.monotonic_s
        if elapsed_s <= 0 or _went_back(last, reading):
            return None
        levels: dict[str, dict[str, float | None]] = {}
        all_delta: list[int] | None = None
        for level in sorted(reading.buckets):
            now = reading.buckets[level]
            before = last.buckets.get(level, (0,) * len(now))
            delta = [a - b for a, b in zip(now, before)]
            levels[level] = self._stats(delta, elapsed_s)
            all_delta = delta if all_delta is None else [a + b for a, b in zip(all_delta, delta)]
        empty = [0] * (len(self.bounds_s) + 1)
        levels[ALL_LEVELS] = self._stats(all_delta or empty, elapsed_s)
        commits = reading.commits - last.commits
        waited_us = reading.commit_wait_us - last.commit_wait_us
        sample = {
            "t_ms": reading.wall_ms,
            "levels": levels,
            # Mean commit wait of this interval's commits; None when none committed.
            "commit_wait_ms": round(waited_us / commits / 1000, 3) if commits > 0 else None,
        }
        self.samples.append(sample)
        return sample

    def _stats(self, cumulative_delta: Sequence[int], elapsed_s: float) -> dict[str, float | None]:
        stats: dict[str, float | None] = {"ops_per_s": round(cumulative_delta[-1] / elapsed_s, 3)}
        for name, q in QUANTILES:
            value_s = quantile_s(q, self.bounds_s, cumulative_delta)
            stats[name] = None if value_s is None else round(value_s * 1000, 3)
        return stats

    def view(self) -> dict[str, Any]:
        """The JSON the dashboard reads (``GET /v1/dashboard/node``'s ``history``)."""
        return {"interval_s": self.interval_s, "capacity": self.capacity,
                "samples": list(self.samples)}


def _went_back(before: Reading, after: Reading) -> bool:
    if after.commits < before.commits or after.commit_wait_us < before.commit_wait_us:
        return True
    for level, counts in before.buckets.items():
        now = after.buckets.get(level)
        if now is None or any(a < b for a, b in zip(now, counts)):
            return True
    return False
