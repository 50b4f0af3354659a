"""Feeds a node's dashboard history: reads its metrics every ``interval_s`` (shell).

The readings come from the node's own Prometheus registry (the latency
histogram ``/metrics`` serves), restricted to that one family so a sample
does not run every gauge; the period is kept on the node's one clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ringkv.clock import Clock
from ringkv.metrics import LATENCY_BUCKETS_S, NodeMetrics
from ringkv.server.dashboard.history import History, Reading, reading_from_histograms

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 1.0
HISTORY_CAPACITY = 300  # five minutes at one sample a second
_BUCKET_SAMPLE = "ringkv_request_latency_seconds_bucket"


def read_metrics(metrics: NodeMetrics, clock: Clock,
                 txn_stats: Callable[[], dict[str, int]] | None = None) -> Reading:
    """The node's cumulative latency histogram (and commit counters), now."""
    counts: dict[tuple[str, str], list[int]] = {}
    bounds = len(LATENCY_BUCKETS_S) + 1
    for family in metrics.registry.restricted_registry([_BUCKET_SAMPLE]).collect():
        for sample in family.samples:
            if sample.name != _BUCKET_SAMPLE:
                continue
            labels = sample.labels
            series = counts.setdefault((labels["op"], labels["consistency"]), [0] * bounds)
            le = labels["le"]
            index = bounds - 1 if le == "+Inf" else LATENCY_BUCKETS_S.index(float(le))
            series[index] = int(sample.value)
    stats = txn_stats() if txn_stats is not None else {}
    return reading_from_histograms(
        clock.wall_us() // 1000, clock.monotonic_s(),
        ((op, level, c) for (op, level), c in sorted(counts.items())),
        commits=stats.get("commits", 0), commit_wait_us=stats.get("commit_wait_us", 0))


class Sampler:
    """Takes a reading every ``interval_s`` into ``history`` until stopped."""

    def __init__(self, metrics: NodeMetrics, clock: Clock, *,
                 txn_stats: Callable[[], dict[str, int]] | None = None,
                 interval_s: float = SAMPLE_INTERVAL_S,
                 capacity: int = HISTORY_CAPACITY) -> None:
        self._metrics = metrics
        self._clock = clock
        self._txn_stats = txn_stats
        self.interval_s = interval_s
        self.history = History(LATENCY_BUCKETS_S, capacity, interval_s)
        self._task: asyncio.Task[Any] | None = None

    def sample(self) -> None:
        self.history.record(read_metrics(self._metrics, self._clock, self._txn_stats))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a bad sample must not end the history
                log.exception("dashboard sample failed")
            await self._clock.sleep(self.interval_s)
