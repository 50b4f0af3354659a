"""The transactional tier through the HTTP API on one standalone node (txn/service.py).

A keyspace with ``tier: transactional`` and RF 1 is one Paxos group of one
replica on a real clock. Checked: PUT/GET/DELETE are single-key
transactions answered with the commit timestamp as ``version`` and a
receipt naming the leader, ε and the commit wait (Spanner §4.1.2);
compare-and-set (issue #11 §6) commits when its condition holds and
answers 409 ``condition_failed`` with the current value and version when
it does not; a one-shot transaction reads and writes at one timestamp;
``GET /v1/txn/{id}`` gives a definite outcome; a snapshot read at a
timestamp sees the state as of that timestamp (Spanner §4.1.3); bad input
gets a 400 naming the field.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from ringkv.clock import SystemClock
from ringkv.config import config_from_dict
from ringkv.node import Node
from ringkv.server.api import build_app

Call = Callable[..., Awaitable[tuple[int, Any]]]


def serve(scenario: Callable[[Call, Node], Awaitable[None]], **txn: Any) -> None:
    """``scenario`` against one standalone node; ``txn``: its ``txn.*`` settings."""
    config = config_from_dict({
        "storage": {"engine": "memory"},
        "keyspaces": {"default": {"replication_factor": 1, "default_consistency": "ONE"},
                      "t": {"replication_factor": 1, "tier": "transactional"}},
        "txn": txn,
    })

    async def main() -> None:
        node = Node(config, clock=SystemClock(), standalone=True)
        await node.start()
        client = TestClient(TestServer(build_app(node)))
        await client.start_server()

        async def call(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
            response = await client.request(method, path, **kwargs)
            return response.status, await response.json()

        try:
            await scenario(call, node)
        finally:
            await client.close()
            await node.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_put_get_cas_delete() -> None:
    async def scenario(call: Call, node: Node) -> None:
        status, put = await call("PUT", "/v1/kv/t/a", json={"value": {"n": 1}})
        assert status == 200, put
        receipt = put["receipt"]
        assert receipt["leader"] == node.node_id and receipt["commit_ts"] == put["version"]
        assert receipt["commit_wait_ms"] >= 0 and receipt["epsilon_us"] >= 1000
        status, got = await call("GET", "/v1/kv/t/a")
        assert (status, got["value"], got["version"]) == (200, {"n": 1}, put["version"])
        # Compare-and-set on the version read: it commits once, and the stale retry fails.
        status, cas = await call("PUT", "/v1/kv/t/a", json={"value": 2, "if": {"version": got["version"]}})
        assert status == 200 and cas["version"] > got["version"]
        status, failed = await call("PUT", "/v1/kv/t/a", json={"value": 3, "if": {"version": got["version"]}})
        assert status == 409 and failed["error"]["code"] == "condition_failed"
        assert failed["error"]["current_value"] == 2
        assert failed["error"]["current_version"] == cas["version"]
        status, absent = await call("PUT", "/v1/kv/t/a", json={"value": 4, "if": {"absent": True}})
        assert status == 409, absent
        status, deleted = await call("DELETE", "/v1/kv/t/a", json={"if": {"equals": 2}})
        assert status == 200, deleted
        status, gone = await call("GET", "/v1/kv/t/a")
        assert status == 404, gone
        # A snapshot read at the CAS's timestamp still sees its value.
        status, old = await call("GET", f"/v1/kv/t/a?snapshot_ts={cas['version']}")
        assert (status, old["value"], old["version"]) == (200, 2, cas["version"])

    serve(scenario)


def test_one_shot_transaction_and_its_outcome() -> None:
    async def scenario(call: Call, node: Node) -> None:
        await call("PUT", "/v1/kv/t/x", json={"value": 10})
        status, txn = await call("POST", "/v1/txn", json={
            "keyspace": "t", "id": "move-1", "reads": ["x"],
            "conditions": [{"key": "x", "equals": 10}, {"key": "y", "absent": True}],
            "writes": [{"op": "put", "key": "y", "value": 10}, {"op": "delete", "key": "x"}]})
        assert status == 200 and txn["committed"], txn
        assert txn["reads"] == [{"key": "x", "found": True, "value": 10,
                                 "version": txn["reads"][0]["version"]}]
        status, outcome = await call("GET", "/v1/txn/move-1?keyspace=t")
        assert (status, outcome["status"], outcome["commit_ts"]) == (200, "committed", txn["commit_ts"])
        # A retry under the same id is not applied twice.
        status, again = await call("POST", "/v1/txn", json={
            "keyspace": "t", "id": "move-1", "writes": [{"op": "put", "key": "y", "value": 99}]})
        assert status == 200 and again.get("commit_ts") == txn["commit_ts"]
        # ... and says so: its empty reads are not what the transaction read.
        assert again["replayed"] is True and again["reads"] == [] and "replayed" not in txn
        status, y = await call("GET", "/v1/kv/t/y")
        assert y["value"] == 10
        status, unknown = await call("GET", "/v1/txn/never?keyspace=t")
        assert status == 404 and unknown["error"]["definitive"] is True
        status, failed = await call("POST", "/v1/txn", json={
            "keyspace": "t", "conditions": [{"key": "x", "absent": False}]})
        assert status == 400 and failed["error"]["field"] == "conditions[0].absent"

    serve(scenario)


def test_bad_input_names_the_field() -> None:
    async def scenario(call: Call, node: Node) -> None:
        cases = [
            ("PUT", "/v1/kv/t/a?consistency=QUORUM", {"value": 1}, 400, "consistency"),
            ("GET", "/v1/kv/t/a?consistency=ONE", None, 400, "consistency"),
            ("PUT", "/v1/kv/default/a", {"value": 1, "if": {"absent": True}}, 400, "if"),
            ("PUT", "/v1/kv/default/a?consistency=SERIAL", {"value": 1}, 400, "consistency"),
            ("POST", "/v1/txn", {"keyspace": "default", "reads": ["a"]}, 400, "keyspace"),
            ("PUT", "/v1/kv/t/a", {"value": 1, "if": {"version": -1}}, 400, "if.version"),
            ("PUT", "/v1/kv/t/a", {"value": 1, "ttl": 5}, 400, "ttl"),
            ("GET", "/v1/kv/t/a?snapshot_ts=x", None, 400, "snapshot_ts"),
            ("GET", "/v1/txn/a?keyspace=default", None, 400, "keyspace"),
            ("GET", "/v1/txn/bad%20id?keyspace=t", None, 400, "id"),
            ("POST", "/v1/batch", {"ops": [{"op": "get", "keyspace": "t", "key": "a"}]}, 400,
             "ops[0].keyspace"),
            ("GET", "/v1/kv/t", None, 400, "keyspace"),
        ]
        for method, path, body, want, field in cases:
            status, answer = await call(method, path, json=body)
            assert status == want, (path, answer)
            assert answer["error"]["field"] == field, (path, answer)

    serve(scenario)


def test_status_shows_truetime_and_groups() -> None:
    async def scenario(call: Call, node: Node) -> None:
        await call("PUT", "/v1/kv/t/a", json={"value": 1})
        status, view = await call("GET", "/v1/status")
        txn = view["transactional"]
        assert txn["truetime"]["fenced"] is False and txn["truetime"]["epsilon_us"] >= 1000
        assert [g["leads"] for g in txn["groups"].values()] == [True]
        metrics = node.metrics.render().decode()
        assert "ringkv_truetime_epsilon_seconds" in metrics
        assert "ringkv_truetime_fenced 0.0" in metrics

    serve(scenario)
