"""The HTTP JSON API of one node, served in-process on the memory engine."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ringkv.clock import ManualClock
from ringkv.hlc import Timestamp
from ringkv.config import config_from_dict
from ringkv.node import Node
from ringkv.server.api import build_app

Scenario = Callable[[TestClient, Node, ManualClock], Awaitable[None]]


def serve(scenario: Scenario, **limits: int) -> None:
    config = config_from_dict(
        {
            "storage": {"engine": "memory"},
            "limits": {"max_key_bytes": 64, "max_value_bytes": 1024, "max_request_bytes": 4096,
                       "max_batch_ops": 10, "max_scan_page": 50, **limits},
            "keyspaces": {
                "default": {"replication_factor": 3, "default_consistency": "QUORUM"},
                "solo": {"replication_factor": 1, "default_consistency": "ONE"},
            },
        }
    )

    async def main() -> None:
        clock = ManualClock()
        node = Node(config, clock=clock, standalone=True)
        await node.start()
        client = TestClient(TestServer(build_app(node)))
        await client.start_server()
        try:
            await scenario(client, node, clock)
        finally:
            await client.close()
            await node.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=60))


async def call(client: TestClient, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = await client.request(method, path, **kwargs)
    return response.status, await response.json()


def test_put_get_delete_round_trip() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        status, body = await call(client, "PUT", "/v1/kv/default/hello", json={"value": "world"})
        assert status == 200 and body["ok"] is True
        assert body["receipt"]["answered"] == [node.node_id]
        status, body = await call(client, "GET", "/v1/kv/default/hello")
        assert status == 200
        assert body["value"] == "world" and body["key"] == "hello"
        assert body["receipt"]["consistency"] == "QUORUM"
        status, body = await call(client, "PUT", "/v1/kv/default/hello",
                                  json={"value": {"nested": [1, 2.5, None, True]}})
        status, body = await call(client, "GET", "/v1/kv/default/hello?consistency=one")
        assert body["value"] == {"nested": [1, 2.5, None, True]}
        status, body = await call(client, "DELETE", "/v1/kv/default/hello")
        assert status == 200
        status, body = await call(client, "GET", "/v1/kv/default/hello")
        assert status == 404 and body["error"]["code"] == "not_found"

    serve(scenario)


def test_keys_may_hold_slashes_and_unicode() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        for key in ("a/b/c", "ключ", "sp%20ace"):
            status, _ = await call(client, "PUT", f"/v1/kv/default/{key}", json={"value": key})
            assert status == 200
            status, body = await call(client, "GET", f"/v1/kv/default/{key}")
            assert status == 200 and body["value"] == key
        status, body = await call(client, "GET", "/v1/kv/default/sp ace")
        assert status == 200 and body["key"] == "sp ace"

    serve(scenario)


def test_ttl_expires_and_reads_as_absent() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        await call(client, "PUT", "/v1/kv/default/t", json={"value": 1, "ttl": 5})
        status, body = await call(client, "GET", "/v1/kv/default/t")
        assert status == 200 and "expires_at_us" in body
        clock.advance(6)
        status, _ = await call(client, "GET", "/v1/kv/default/t")
        assert status == 404

    serve(scenario)


def test_ttl_counts_from_the_local_clock_when_the_hlc_runs_ahead() -> None:
    """A peer with a fast clock pushes this node's HLC ahead (the HLC receive
    rule); a TTL must still last its seconds on this node's own clock."""

    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        node.hlc.observe(Timestamp(clock.wall_us() + 3600 * 1_000_000))  # an hour ahead
        await call(client, "PUT", "/v1/kv/default/t", json={"value": 1, "ttl": 5})
        status, body = await call(client, "GET", "/v1/kv/default/t")
        assert status == 200 and body["expires_at_us"] == clock.wall_us() + 5_000_000
        assert body["timestamp"][0] > clock.wall_us()  # ordered by the HLC all the same
        clock.advance(6)
        status, _ = await call(client, "GET", "/v1/kv/default/t")
        assert status == 404

    serve(scenario)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code", "field"),
    [
        ("PUT", "/v1/kv/default/k", {"data": b"{not json"}, 400, "bad_request", "body"),
        ("PUT", "/v1/kv/default/k", {"json": [1, 2]}, 400, "bad_request", "body"),
        ("PUT", "/v1/kv/default/k", {"json": {"valu": 1}}, 400, "bad_request", "value"),
        ("PUT", "/v1/kv/default/k", {"data": b'{"value": NaN}'}, 400, "bad_request", "body"),
        ("PUT", "/v1/kv/default/k", {"json": {"value": 1, "ttl": -1}}, 400, "bad_request", "ttl"),
        ("PUT", "/v1/kv/default/k", {"json": {"value": 1, "ttl": "soon"}}, 400, "bad_request", "ttl"),
        ("PUT", "/v1/kv/default/k?consistency=MOST", {"json": {"value": 1}}, 400, "bad_request",
         "consistency"),
        ("GET", "/v1/kv/default/k?consistency=ANY", {}, 400, "bad_request", "consistency"),
        ("GET", "/v1/kv/default/%FF%FE", {}, 400, "bad_request", "key"),
        ("GET", "/v1/kv/default/" + "k" * 65, {}, 413, "too_large", "key"),
        ("PUT", "/v1/kv/default/k", {"json": {"value": "x" * 2000}}, 413, "too_large", "value"),
        ("PUT", "/v1/kv/default/k", {"data": b'{"value":"' + b"x" * 5000 + b'"}'}, 413,
         "too_large", "body"),
        ("PUT", "/v1/kv/default/k", {"data": b"[" * 1500 + b"]" * 1500}, 400, "bad_request",
         "body"),
        ("GET", "/v1/kv/default?limit=0", {}, 400, "bad_request", "limit"),
        ("GET", "/v1/kv/default?page_token=garbage!", {}, 400, "bad_request", "page_token"),
        ("POST", "/v1/batch", {"json": {"ops": "nope"}}, 400, "bad_request", "ops"),
        ("POST", "/v1/batch", {"json": {"ops": [{"op": "put", "key": "k"}]}}, 400, "bad_request",
         "ops[0].value"),
        ("POST", "/v1/batch", {"json": {"ops": [{"op": "get", "key": "k"}] * 11}}, 413,
         "too_large", "ops"),
    ],
)
def test_bad_input_names_the_field(method, path, kwargs, status, code, field) -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        got_status, body = await call(client, method, path, **kwargs)
        assert (got_status, body["error"]["code"], body["error"].get("field")) == (
            status, code, field,
        ), body

    serve(scenario)


def test_unknown_routes_keyspaces_and_methods_are_json_errors() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        status, body = await call(client, "GET", "/v1/kv/nope/k")
        assert status == 404 and body["error"]["keyspace"] == "nope"
        status, body = await call(client, "GET", "/nowhere")
        assert status == 404 and body["error"]["code"] == "not_found"
        status, body = await call(client, "PATCH", "/v1/kv/default/k")
        assert status == 405 and body["error"]["code"] == "method_not_allowed"

    serve(scenario)


def test_unavailable_when_the_level_exceeds_the_replicas() -> None:
    """A one-node ring has one replica: ALL works, THREE cannot (503, required/alive)."""

    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        status, _ = await call(client, "PUT", "/v1/kv/default/k?consistency=ALL", json={"value": 1})
        assert status == 200
        status, body = await call(client, "PUT", "/v1/kv/default/k?consistency=THREE",
                                  json={"value": 1})
        assert status == 503
        assert body["error"] | {} == body["error"]
        assert (body["error"]["code"], body["error"]["required"], body["error"]["alive"]) == (
            "unavailable", 3, 1,
        )

    serve(scenario)


def test_batch_runs_each_op_and_reports_each_result() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        ops = [
            {"op": "put", "key": "a", "value": 1},
            {"op": "put", "keyspace": "solo", "key": "b", "value": [2], "ttl": 60},
            {"op": "get", "key": "missing"},
        ]
        status, body = await call(client, "POST", "/v1/batch", json={"ops": ops})
        assert status == 200
        assert [r["ok"] for r in body["results"]] == [True, True, True]
        assert body["results"][2]["found"] is False
        ops = [{"op": "get", "key": "a"}, {"op": "delete", "key": "a"},
               {"op": "get", "keyspace": "solo", "key": "b"}]
        status, body = await call(client, "POST", "/v1/batch?consistency=ONE", json={"ops": ops})
        assert body["results"][0]["value"] == 1
        assert body["results"][2]["value"] == [2]
        status, _ = await call(client, "GET", "/v1/kv/default/a")
        assert status == 404

    serve(scenario)


async def scan_all(client: TestClient, keyspace: str, limit: int) -> tuple[dict[str, Any], int]:
    """Every item of a paged scan, checking that no key comes twice; and the page count."""
    seen: dict[str, Any] = {}
    token = None
    for pages in range(1, 201):  # bounded
        query = f"?limit={limit}" + (f"&page_token={token}" if token else "")
        status, body = await call(client, "GET", f"/v1/kv/{keyspace}{query}")
        assert status == 200, body
        for item in body["items"]:
            assert item["key"] not in seen
            seen[item["key"]] = item["value"]
        token = body["next_page_token"]
        if token is None:
            return seen, pages
    raise AssertionError("the scan never ended")


def test_scan_pages_through_a_keyspace_in_token_order() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        expected = {f"key-{i}": i for i in range(37)}
        for key, value in expected.items():
            await call(client, "PUT", f"/v1/kv/default/{key}", json={"value": value})
        await call(client, "DELETE", "/v1/kv/default/key-3")
        del expected["key-3"]
        await call(client, "PUT", "/v1/kv/solo/elsewhere", json={"value": 0})
        seen, _ = await scan_all(client, "default", limit=5)
        assert seen == expected

    serve(scenario)


@pytest.mark.parametrize("bound", ["items", "bytes"])
def test_a_scan_stopped_by_a_replica_bound_skips_nothing(
    bound: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica caps each scan reply (in items, and in bytes so that a reply of
    large values still fits one internode frame); a capped reply is marked, and
    the coordinator ends the page there instead of taking the range as done."""
    import ringkv.replica.local

    if bound == "items":
        monkeypatch.setattr(ringkv.replica.local, "MAX_SCAN_ITEMS", 4)
    else:
        monkeypatch.setattr(ringkv.replica.local, "MAX_SCAN_REPLY_BYTES", 400)

    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        expected = {f"key-{i}": "v" * 50 for i in range(40)}
        for key, value in expected.items():
            await call(client, "PUT", f"/v1/kv/solo/{key}", json={"value": value})
        seen, pages = await scan_all(client, "solo", limit=20)
        assert seen == expected
        assert pages > 2  # 20 per page would have needed two

    serve(scenario)


def test_status_ring_and_metrics() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        await call(client, "PUT", "/v1/kv/default/m", json={"value": 1})
        status, body = await call(client, "GET", "/v1/status")
        assert status == 200 and body["nodes"][0]["node_id"] == node.node_id
        assert body["nodes"][0]["owns"] == pytest.approx(1.0)
        status, body = await call(client, "GET", "/v1/ring")
        assert len(body["nodes"][0]["tokens"]) == node.config.cluster.num_tokens
        response = await client.get("/metrics")
        text = await response.text()
        assert 'ringkv_requests_total{consistency="default",op="put",status="200"} 1.0' in text
        assert "ringkv_request_latency_seconds_bucket" in text
        assert "ringkv_storage_bytes" in text

    serve(scenario)
