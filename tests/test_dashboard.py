"""The dashboard's history (pure, on a ManualClock) and its routes (one node in-process).

The browser test, a live cluster in headless Chromium, is tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ringkv.clock import ManualClock
from ringkv.metrics import LATENCY_BUCKETS_S, NodeMetrics
from ringkv.node import Node
from ringkv.server.api import build_app
from ringkv.server.dashboard.history import ALL_LEVELS, History, Reading, quantile_s
from ringkv.server.dashboard.sampler import Sampler, read_metrics
from ringkv.tools.launcher import free_port_block
from ringkv.tools.local_cluster import LocalCluster
from tests.procs import http
from tests.test_api import ApiTestServer, api_config, call
from tests.test_auth_api import Call, ShiftedClock, basic
from tests.test_auth_api import serve as serve_with_auth

BOUNDS = (0.001, 0.01, 0.1)  # three finite buckets and +Inf: easy to count by hand


def reading(clock: ManualClock, **levels: tuple[int, ...]) -> Reading:
    return Reading(clock.wall_us() // 1000, clock.monotonic_s(), levels)


# -- percentiles from buckets ----------------------------------------------------


def test_quantile_interpolates_inside_the_bucket_that_holds_the_rank() -> None:
    # 10 observations <= 1 ms, 10 more in (1 ms, 10 ms]: the median is the top of the first
    # bucket, p75 half-way through the second, p99 near its top.
    cumulative = (10, 20, 20, 20)
    assert quantile_s(0.5, BOUNDS, cumulative) == pytest.approx(0.001)
    assert quantile_s(0.75, BOUNDS, cumulative) == pytest.approx(0.001 + 0.009 * 0.5)
    assert quantile_s(0.99, BOUNDS, cumulative) == pytest.approx(0.001 + 0.009 * 0.98)
    assert quantile_s(0.5, BOUNDS, (4, 4, 4, 4)) == pytest.approx(0.0005)  # from 0 up to 1 ms


def test_quantile_without_observations_is_none_and_past_the_last_bound_is_that_bound() -> None:
    assert quantile_s(0.5, BOUNDS, (0, 0, 0, 0)) is None
    assert quantile_s(0.99, BOUNDS, (0, 0, 1, 10)) == 0.1  # all that is known: "over 100 ms"
    with pytest.raises(ValueError):
        quantile_s(0.5, BOUNDS, (1, 2, 3))  # no +Inf bucket


# -- the history -------------------------------------------------------------------


def test_a_sample_is_the_rate_and_percentiles_between_two_readings() -> None:
    clock = ManualClock()
    history = History(BOUNDS, capacity=10)
    assert history.record(reading(clock, QUORUM=(5, 5, 5, 5))) is None  # a baseline only
    clock.advance(2.0)
    # 20 more QUORUM requests in 2 s, all in (1 ms, 10 ms]; 4 ONE requests under 1 ms.
    sample = history.record(reading(clock, QUORUM=(5, 25, 25, 25), ONE=(4, 4, 4, 4)))
    assert sample is not None and sample["t_ms"] == clock.wall_us() // 1000
    quorum, one, everything = (sample["levels"][k] for k in ("QUORUM", "ONE", ALL_LEVELS))
    assert quorum["ops_per_s"] == 10.0 and one["ops_per_s"] == 2.0
    assert everything["ops_per_s"] == 12.0
    assert quorum["p50_ms"] == pytest.approx(5.5)  # half-way through (1, 10] ms
    assert quorum["p99_ms"] == pytest.approx(1 + 9 * 0.99)
    assert one["p50_ms"] == pytest.approx(0.5)
    # The sum: 4 of 24 under 1 ms, so the median is in the second bucket.
    assert everything["p50_ms"] == pytest.approx(1 + 9 * (12 - 4) / 20)
    assert sample["commit_wait_ms"] is None  # nothing committed
    clock.advance(1.0)
    idle = history.record(reading(clock, QUORUM=(5, 25, 25, 25), ONE=(4, 4, 4, 4)))
    assert idle is not None and idle["levels"]["QUORUM"] == {
        "ops_per_s": 0.0, "p50_ms": None, "p99_ms": None}


def test_the_history_keeps_only_its_capacity() -> None:
    clock = ManualClock()
    history = History(BOUNDS, capacity=5, interval_s=1.0)
    for i in range(50):
        history.record(reading(clock, ONE=(i, i, i, i)))
        clock.advance(1.0)
    view = history.view()
    assert len(view["samples"]) == 5 and view["capacity"] == 5
    # The newest five: the last reading was taken 49 s in.
    last_ms = (ManualClock().wall_us() // 1000) + 49_000
    assert [s["t_ms"] for s in view["samples"]] == [last_ms - 4000 + 1000 * i for i in range(5)]
    assert all(s["levels"]["ONE"]["ops_per_s"] == 1.0 for s in view["samples"])
    with pytest.raises(ValueError):
        History(BOUNDS, capacity=0)


def test_counters_that_go_backwards_start_a_new_baseline() -> None:
    clock = ManualClock()
    history = History(BOUNDS, capacity=5)
    history.record(reading(clock, ONE=(10, 10, 10, 10)))
    clock.advance(1.0)
    assert history.record(reading(clock, ONE=(1, 1, 1, 1))) is None  # never a negative rate
    clock.advance(1.0)
    sample = history.record(reading(clock, ONE=(3, 3, 3, 3)))
    assert sample is not None and sample["levels"]["ONE"]["ops_per_s"] == 2.0
    assert history.record(reading(clock, ONE=(3, 3, 3, 3))) is None  # no time passed


def test_commit_wait_is_the_mean_of_the_interval() -> None:
    clock = ManualClock()
    history = History(BOUNDS, capacity=5)
    history.record(Reading(0, clock.monotonic_s(), {}, commits=2, commit_wait_us=3000))
    clock.advance(1.0)
    sample = history.record(Reading(1, clock.monotonic_s(), {}, commits=6, commit_wait_us=11000))
    assert sample is not None and sample["commit_wait_ms"] == 2.0  # 8 ms over 4 commits
    assert sample["levels"] == {ALL_LEVELS: {"ops_per_s": 0.0, "p50_ms": None, "p99_ms": None}}


def test_the_sampler_reads_the_nodes_metrics_and_leaves_out_info_routes() -> None:
    clock = ManualClock()
    metrics = NodeMetrics("n1")
    sampler = Sampler(metrics, clock, interval_s=1.0, capacity=3)
    sampler.sample()
    for _ in range(30):
        metrics.observe_request("put", "QUORUM", 200, 0.002)  # in (1, 2.5] ms
    for _ in range(10):
        metrics.observe_request("get", "ONE", 200, 0.0004)
    for _ in range(100):  # the dashboard's own polling is not load
        metrics.observe_request("status", "default", 200, 0.5)
        metrics.observe_request("dashboard_cluster", "default", 200, 0.5)
    clock.advance(2.0)
    sampler.sample()
    (sample,) = sampler.history.view()["samples"]
    levels = sample["levels"]
    assert set(levels) == {"QUORUM", "ONE", ALL_LEVELS}
    assert levels["QUORUM"]["ops_per_s"] == 15.0 and levels[ALL_LEVELS]["ops_per_s"] == 20.0
    assert 1.0 < levels["QUORUM"]["p50_ms"] <= 2.5 and levels["ONE"]["p99_ms"] <= 0.5
    # A planted bug: reading the wrong bucket bounds would put QUORUM's median elsewhere.
    raw = read_metrics(metrics, clock)
    assert raw.buckets["QUORUM"][LATENCY_BUCKETS_S.index(0.0025)] == 30
    assert raw.buckets["QUORUM"][LATENCY_BUCKETS_S.index(0.001)] == 0
    for _ in range(5):
        clock.advance(1.0)
        sampler.sample()
    assert len(sampler.history.samples) == 3  # the bound holds


# -- the routes, one node in-process -----------------------------------------------


def serve(scenario: Any) -> None:
    config = api_config()

    async def main() -> None:
        clock = ManualClock()
        node = Node(config, clock=clock, standalone=True)
        await node.start()
        client = TestClient(ApiTestServer(build_app(node), config.limits))
        await client.start_server()
        try:
            await scenario(client, node, clock)
        finally:
            await client.close()
            await node.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_the_page_and_its_files_are_served_from_the_package() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        for path, kind, marker in (("/ui", "text/html", "<svg id=\"ring\""),
                                   ("/ui/", "text/html", "<svg id=\"ring\""),
                                   ("/ui/dashboard.js", "application/javascript",
                                    "/v1/dashboard/cluster"),
                                   ("/ui/dashboard.css", "text/css", ".chart")):
            response = await client.get(path)
            assert response.status == 200 and response.content_type == kind, path
            assert marker in await response.text(), path
        status, body = await call(client, "GET", "/ui/../api.py")
        assert status == 404 and body["error"]["code"] == "not_found"
        status, body = await call(client, "GET", "/ui/secret.txt")
        assert status == 404 and body["error"]["code"] == "not_found"

    serve(scenario)


def test_node_and_cluster_views_carry_the_history_hints_and_repair() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        for i in range(5):
            assert (await call(client, "PUT", f"/v1/kv/solo/k{i}?consistency=ONE",
                               json={"value": i}))[0] == 200
        clock.advance(1.0)
        # The sampler runs on the loop's time: wait (bounded) for a sample with the puts.
        for _ in range(100):
            status, view = await call(client, "GET", "/v1/dashboard/node")
            assert status == 200
            samples = view["history"]["samples"]
            if any(s["levels"].get("ONE", {}).get("ops_per_s") for s in samples):
                break
            await asyncio.sleep(0.05)
            clock.advance(0.5)
        else:
            pytest.fail(f"no sample saw the puts: {view['history']}")
        assert view["node_id"] == node.node_id
        assert view["hints"]["pending"] == 0 and view["repair"]["last_finished_ms"] is None
        assert view["transactional"] is None  # no transactional keyspace here
        status, cluster = await call(client, "GET", "/v1/dashboard/cluster")
        assert status == 200 and list(cluster["nodes"]) == [node.node_id]
        assert cluster["nodes"][node.node_id]["history"]["capacity"] == 300

    serve(scenario)


def test_with_auth_the_page_and_its_json_need_cluster_admin(
        capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(call: Call, node: Node, password: str, clock: ShiftedClock) -> None:
        admin = basic("admin", password)
        for path in ("/ui", "/ui/", "/ui/dashboard.js", "/v1/dashboard/node",
                     "/v1/dashboard/cluster"):
            status, body, headers = await call("GET", path)
            assert status == 401, (path, body)  # the browser asks for a login
            assert headers["WWW-Authenticate"].startswith("Basic")
        status, _, _ = await call("POST", "/v1/auth/users", headers=admin, json={
            "name": "reader", "password": "reader-password-1",
            "grants": [{"permission": "read", "keyspace": "default"}]})
        assert status == 201
        reader = basic("reader", "reader-password-1")
        for path in ("/v1/dashboard/node", "/v1/dashboard/cluster"):
            status, body, _ = await call("GET", path, headers=reader)
            assert status == 403 and body["error"]["code"] == "forbidden", (path, body)
        status, body, _ = await call("GET", "/v1/dashboard/cluster", headers=admin)
        assert status == 200 and node.node_id in body["nodes"]
        summary = body["nodes"][node.node_id]
        assert summary["transactional"]["truetime"]["fenced"] in (True, False)
        status, page, _ = await call("GET", "/ui", headers=admin)
        assert status == 200 and "ringkv dashboard" in page

    serve_with_auth(scenario, capsys)


# -- the cluster view across real processes, over HTTPS ------------------------------


@pytest.mark.cluster
def test_the_cluster_view_gathers_every_node_over_https(tmp_path: Path) -> None:
    """``/v1/dashboard/cluster`` asks each peer's HTTPS client API, checking its
    certificate against the cluster CA; a killed peer becomes an error at once."""
    cluster = LocalCluster(tmp_path, nodes=3, rf=3, tls=True,
                           base_client_port=free_port_block(3),
                           base_internode_port=free_port_block(3),
                           config_overrides={"timing.gossip_interval_ms": 500})
    try:
        cluster.up(timeout_s=30, together=True)
        first, victim = cluster.procs[0], cluster.procs[2]
        context = first.client_context()
        for proc in cluster.procs:
            assert http("PUT", f"{proc.url}/v1/kv/default/k-{proc.node_id}",
                        {"value": 1}, context=context)[0] == 200
        status, view = http("GET", f"{first.url}/v1/dashboard/cluster", context=context)
        assert status == 200, view
        nodes = view["nodes"]
        assert set(nodes) == {proc.node_id for proc in cluster.procs}
        assert all("error" not in n and n["history"]["capacity"] == 300
                   for n in nodes.values()), nodes
        assert {n["node_id"] for n in nodes.values()} == set(nodes)
        victim.kill()
        status, view = http("GET", f"{first.url}/v1/dashboard/cluster", context=context)
        assert status == 200 and "unreachable" in view["nodes"][victim.node_id]["error"]
        assert "error" not in view["nodes"][first.node_id]
    finally:
        cluster.down()
