"""Which replica to ask first, and when to back a slow one up (pure).

Like Cassandra's dynamic snitch: every replica's read latency is kept as an
exponentially weighted average, and reads go to this node first (no network
hop), then to the peers that have been fastest. A replica that fails, or
keeps the coordinator waiting, is charged for the time it cost, so one that
is UP but silent (a one-way partition) stops being asked first.

Speculative retry (Dean and Barroso's hedged requests, Cassandra's
``speculative_retry``): once a read has waited longer than a high percentile
of recent replica latencies, a spare replica is asked too.

Time comes in as arguments (seconds on the caller's clock); nothing here
reads a clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

LATENCY_EWMA_WEIGHT = 0.2  # weight of the newest sample in a replica's latency estimate
MIN_SAMPLES = 20  # fewer recent samples than this: no percentile to trust
# Until then (a coordinator just started, or one that serves few reads), back a
# read up after this long: a replica cut off but not yet seen DOWN must not fail
# every read it was asked for until the failure detector catches up.
COLD_RETRY_S = 0.1


class LatencyWindow:
    """Recent replica read latencies, to decide when to retry speculatively.

    The percentile is recomputed every ``refresh_every`` samples rather than
    on every read: sorting on the hot path would cost more than it saves.
    """

    def __init__(self, size: int = 1000, refresh_every: int = 100) -> None:
        self.samples: deque[float] = deque(maxlen=size)
        self._refresh_every = refresh_every
        self._since_refresh = 0
        self._cached: dict[float, float] = {}

    def record(self, seconds: float) -> None:
        self.samples.append(seconds)
        self._since_refresh += 1
        if self._since_refresh >= self._refresh_every:
            self._since_refresh = 0
            self._cached.clear()

    def percentile(self, pct: float) -> float | None:
        if len(self.samples) < MIN_SAMPLES:
            return None
        if pct not in self._cached:
            ordered = sorted(self.samples)
            self._cached[pct] = ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]
        return self._cached[pct]


class Snitch:
    def __init__(
        self, self_node: str, *, retry_percentile: float = 99.0, retry_min_s: float = 0.02
    ) -> None:
        self.self_node = self_node
        self.retry_percentile = retry_percentile
        self.retry_min_s = retry_min_s
        self.latencies = LatencyWindow()
        self._latency_s: dict[str, float] = {}

    def answered(self, node: str, asked_at_s: float, now_s: float) -> None:
        """``node`` answered a read asked at ``asked_at_s``.

        Timed from its own request: a speculative answer's time must not
        include the wait before it was asked, or every speculation would
        raise the next threshold.
        """
        elapsed_s = now_s - asked_at_s
        self.latencies.record(elapsed_s)
        self._note(node, elapsed_s)

    def failed(self, node: str, timeout_s: float) -> None:
        """A failure ranks a replica as slow as the whole timeout."""
        self._note(node, timeout_s)

    def abandoned(self, node: str, asked_at_s: float, now_s: float) -> None:
        """The read finished without ``node``'s answer: it kept us waiting this long."""
        self._note(node, now_s - asked_at_s)

    def by_proximity(self, nodes: Iterable[str]) -> list[str]:
        """This node first (no network hop), then the peers that have been fastest."""
        latency_s = self._latency_s
        self_node = self.self_node

        def rank(node: str) -> tuple[int, float]:
            if node == self_node:
                return (0, 0.0)
            return (1, latency_s.get(node, 0.0))

        return sorted(nodes, key=rank)

    def speculate_after_s(self) -> float:
        """How long a read waits before asking a spare: a high percentile of recent
        latencies, or ``COLD_RETRY_S`` while too few are known to trust one."""
        observed = self.latencies.percentile(self.retry_percentile)
        if observed is None:
            return max(COLD_RETRY_S, self.retry_min_s)
        return max(observed, self.retry_min_s)

    def _note(self, node: str, seconds: float) -> None:
        previous = self._latency_s.get(node)
        self._latency_s[node] = (
            seconds if previous is None
            else (1 - LATENCY_EWMA_WEIGHT) * previous + LATENCY_EWMA_WEIGHT * seconds
        )
