"""Prometheus metrics for one node (served at GET /metrics).

Each node has its own registry, so several nodes in one process (tests, the
simulator) never mix their numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Buckets in seconds: from sub-millisecond local hits to multi-second timeouts.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class NodeMetrics:
    def __init__(self, node_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"node": node_id}
        self.requests = Counter(
            "ringkv_requests",
            "Client API requests served, by operation, consistency level and outcome",
            ["op", "consistency", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ringkv_request_latency_seconds",
            "Client API request latency, by operation and consistency level",
            ["op", "consistency"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.coordinated = Counter(
            "ringkv_coordinated_keys",
            "Keys this node coordinated, and whether it was one of the key's replicas",
            ["replica"],
            registry=self.registry,
        )
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
        self.speculative_retries = Counter(
            "ringkv_speculative_retries", "Reads that asked an extra replica because one was slow",
            registry=self.registry,
        )
        self.info = Gauge(
            "ringkv_node_info", "Constant 1, labelled with the node id", list(labels),
            registry=self.registry,
        )
        self.info.labels(**labels).set(1)
        self._coordinated_children = {
            flag: self.coordinated.labels(str(flag).lower()) for flag in (True, False)
        }
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe_request(self, op: str, consistency: str, status: int, seconds: float) -> None:
        """Count one client request and its latency (label children are cached: hot path)."""
        key = (op, consistency, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(op, consistency, str(status)),
                self.latency.labels(op, consistency),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def coordinated_by_replica(self, is_replica: bool) -> None:
        self._coordinated_children[is_replica].inc()

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read when /metrics is scraped."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
