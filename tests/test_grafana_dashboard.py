"""The Grafana dashboard shipped under conf/grafana/ (issue #16 §5) asks only for
metrics a node exports, with the labels it exports them with.

Every query's ``ringkv_*`` series is looked up in the ``# TYPE`` lines of a live
node's /metrics (a node with both tiers and auth on, so that every family is
registered); a histogram's ``_bucket``, ``_sum`` and ``_count`` series belong
to its family. The label names a query filters or groups by must be ones the
family carries (or Prometheus's own ``instance`` and ``le``).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest

from ringkv.clock import SystemClock
from ringkv.config import config_from_dict
from ringkv.node import Node
from ringkv.server.api import build_app

DASHBOARD = Path(__file__).resolve().parent.parent / "conf" / "grafana" / "ringkv-dashboard.json"
SERIES = re.compile(r"\b(ringkv_[a-z_]+)(\{[^}]*\})?")
LABEL = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMETHEUS_LABELS = {"instance", "job", "le"}


def exported() -> tuple[dict[str, str], dict[str, set[str]]]:
    """Family name -> its type, and family -> the label names its samples carry."""
    config = config_from_dict({
        "storage": {"engine": "memory"},
        "keyspaces": {"default": {"replication_factor": 1, "default_consistency": "ONE"},
                      "t": {"replication_factor": 1, "tier": "transactional"}},
        "auth": {"enabled": True, "replication_factor": 1},
    })

    async def scrape() -> str:
        node = Node(config, clock=SystemClock(), standalone=True)
        await node.start()
        client = TestClient(TestServer(build_app(node)))
        await client.start_server()
        try:
            # A refused request, so that the labelled auth family has a sample too.
            await client.get("/v1/kv/default/a")
            response = await client.get("/v1/health")
            assert response.status == 200
            assert node.auth is not None
            # /metrics itself needs cluster admin when auth is on: read the node's registry.
            return generate_latest(node.metrics.registry).decode()
        finally:
            await client.close()
            await node.stop()

    text = asyncio.run(asyncio.wait_for(scrape(), timeout=60))
    types = {}
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            family = _family(name.split(" ")[0], types)
            if rest:
                labels.setdefault(family, set()).update(LABEL.findall(rest.split("}")[0]))
    return types, labels


def _family(series: str, types: dict[str, str]) -> str:
    if series in types:
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and types.get(base) == "histogram":
            return base
    return series


def _queries() -> list[tuple[str, str]]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel["targets"]]


def test_the_dashboard_is_grafana_json_with_a_datasource_and_node_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert "ringkv_node_info" in variables["instance"]["query"]
    assert len(dashboard["panels"]) >= 10
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def problems_in(title: str, expr: str, types: dict[str, str],
                labels: dict[str, set[str]]) -> list[str]:
    """What in ``expr`` no node exports: a series, a label it filters on, or a label
    it groups by that none of its series carry."""
    found = []
    families = set()
    for series, selector in SERIES.findall(expr):
        family = _family(series, types)
        if family not in types:
            found.append(f"{title}: {series} is not exported")
            continue
        families.add(family)
        unknown = set(LABEL.findall(selector or "")) - labels.get(family, set()) - PROMETHEUS_LABELS
        if unknown:
            found.append(f"{title}: {series} has no label {sorted(unknown)}")
    carried = set().union(*(labels.get(f, set()) for f in families)) | PROMETHEUS_LABELS
    for group in BY.findall(expr):
        unknown = {name.strip() for name in group.split(",") if name.strip()} - carried
        if unknown:
            found.append(f"{title}: grouped by {sorted(unknown)}, which no series carries")
    return found


def test_every_query_names_metrics_and_labels_a_node_exports() -> None:
    types, labels = exported()
    problems = []
    queried = set()
    for title, expr in _queries():
        problems += problems_in(title, expr, types, labels)
        queried.update(_family(series, types) for series, _ in SERIES.findall(expr))
    assert not problems, "\n".join(problems)
    # The headline families are on the board.
    assert {"ringkv_requests_total", "ringkv_request_latency_seconds",
            "ringkv_storage_bytes", "ringkv_truetime_epsilon_seconds"} <= queried


def test_the_check_catches_a_misspelt_metric_or_label() -> None:
    """The planted bugs: a metric no node exports, a label its samples lack, and a
    grouping by a label nobody carries are each reported."""
    types, labels = exported()
    assert problems_in("t", "rate(ringkv_request_total[1m])", types, labels) == [
        "t: ringkv_request_total is not exported"]  # the family is ringkv_requests_total
    assert problems_in("t", 'rate(ringkv_requests_total{level="ONE"}[1m])', types, labels) == [
        "t: ringkv_requests_total has no label ['level']"]
    assert problems_in("t", "sum by (shard) (ringkv_storage_bytes)", types, labels) == [
        "t: grouped by ['shard'], which no series carries"]
