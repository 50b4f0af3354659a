"""Prometheus metrics for one node (served at GET /metrics).

Each node has its own registry, so several nodes in one process (tests, the
simulator) never mix their numbers.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

# Buckets in seconds: from sub-millisecond local hits to multi-second timeouts.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _RequestCollector:
    """Request counts, latencies and coordination counts, exposed on scrape."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        # (op, consistency) -> [count per bucket, then +Inf], and the sum of seconds
        self.latency: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        self.coordinated = {True: 0, False: 0}

    def observe(self, op: str, consistency: str, status: int, seconds: float) -> None:
        key = (op, consistency, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        series = self.latency.get((op, consistency))
        if series is None:
            series = self.latency[(op, consistency)] = ([0] * (len(LATENCY_BUCKETS_S) + 1), [0.0])
        series[0][bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1  # le is inclusive
        series[1][0] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "ringkv_requests",
            "Client API requests served, by operation, consistency level and outcome",
            labels=["op", "consistency", "status"],
        )
        for labels, count in sorted(self.requests.items()):
            requests.add_metric(list(labels), count)
        yield requests
        latency = HistogramMetricFamily(
            "ringkv_request_latency_seconds",
            "Client API request latency, by operation and consistency level",
            labels=["op", "consistency"],
        )
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS_S] + ["+Inf"]
        for latency_labels, (counts, total) in sorted(self.latency.items()):
            latency.add_metric(list(latency_labels), list(zip(bounds, itertools.accumulate(counts))),
                               sum_value=total[0])
        yield latency
        coordinated = CounterMetricFamily(
            "ringkv_coordinated_keys",
            "Keys this node coordinated, and whether it was one of the key's replicas",
            labels=["replica"],
        )
        for flag in (True, False):
            coordinated.add_metric([str(flag).lower()], self.coordinated[flag])
        yield coordinated


class _ReadOnScrape:
    """One gauge family with labels, its samples read on every scrape."""

    def __init__(self, name: str, documentation: str, labels: list[str],
                 read: Callable[[], Iterable[tuple[list[str], float]]]) -> None:
        self._name, self._doc, self._labels, self._read = name, documentation, labels, read

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self._name, self._doc, labels=self._labels)
        for values, value in self._read():
            family.add_metric(values, value)
        yield family


class NodeMetrics:
    def __init__(self, node_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"node": node_id}
        # Counted on every request: plain numbers here, metric families only
        # when /metrics is scraped (prometheus_client's own take a lock each).
        self._hot = _RequestCollector()
        self.registry.register(self._hot)
        self.read_repairs = Counter(
            "ringkv_read_repairs", "Reads that repaired at least one stale replica",
            registry=self.registry,
        )
        self.hints_stored = Counter(
            "ringkv_hints_stored", "Hints stored for replicas that missed a write",
            registry=self.registry,
        )
        self.hints_replayed = Counter(
            "ringkv_hints_replayed", "Hints delivered to their replica", registry=self.registry
        )
        self.hints_expired = Counter(
            "ringkv_hints_expired", "Hints dropped because they outlived max_hint_window_s",
            registry=self.registry,
        )
        self.hints_not_stored = Counter(
            "ringkv_hints_not_stored",
            "Hints not stored because their replica was down longer than max_hint_window_s",
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "ringkv_auth_failures", "Requests refused authentication (401, or 429 when an "
            "address failed too often), by reason", ["reason"], registry=self.registry,
        )
        self.auth_forbidden = Counter(
            "ringkv_auth_forbidden", "Authenticated requests refused a permission (403)",
            registry=self.registry,
        )
        self.speculative_retries = Counter(
            "ringkv_speculative_retries", "Reads that asked an extra replica because one was slow",
            registry=self.registry,
        )
        self.info = Gauge(
            "ringkv_node_info", "Constant 1, labelled with the node id", list(labels),
            registry=self.registry,
        )
        self.info.labels(**labels).set(1)

    def observe_request(self, op: str, consistency: str, status: int, seconds: float) -> None:
        """Count one client request and its latency."""
        self._hot.observe(op, consistency, status, seconds)

    def coordinated_by_replica(self, is_replica: bool) -> None:
        self._hot.coordinated[is_replica] += 1

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read when /metrics is scraped."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def labelled_gauge(self, name: str, documentation: str, labels: list[str],
                       read: Callable[[], Iterable[tuple[list[str], float]]]) -> None:
        """A gauge family whose labelled samples are read when /metrics is scraped."""
        self.registry.register(_ReadOnScrape(name, documentation, labels, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
