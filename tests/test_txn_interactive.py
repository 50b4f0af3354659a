"""Interactive and read-only transactions through the HTTP API on one standalone node
(issue #13 §2; ``server/handlers.py`` over ``txn/sessions.py``).

One node, RF 1, keyspace ``t`` transactional in four ranges, so that a
transaction over a few keys runs two-phase commit across ranges even here.
Checked: begin, get, put, delete, commit and abort; a transaction reads its
own writes and its writes are invisible to others until it commits; a
read-only transaction reads at its snapshot; an ended transaction's later
calls, and every error, name the transaction and why it ended; a call for a
transaction of another node names that node; bad input gets a 400, 404 or
413 naming the field; the native protocol reaches the same operations.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ringkv.clock import SystemClock
from ringkv.config import config_from_dict
from ringkv.errors import ProtocolError
from ringkv.net import native as core
from ringkv.net.codec import KIND_REQUEST, Frame
from ringkv.node import Node
from ringkv.server import handlers as h
from ringkv.server.api import build_app
from ringkv.server.native import _ROUTES
from ringkv.txn.ranges import RangeMap

Call = Callable[..., Awaitable[tuple[int, Any]]]
RANGES = 4


def serve(scenario: Callable[[Call, Node], Awaitable[None]], *,
          keyspaces: dict[str, Any] | None = None, txn: dict[str, Any] | None = None) -> None:
    config = config_from_dict({
        "storage": {"engine": "memory"},
        "txn": txn or {},
        "limits": {"max_value_bytes": 1024},
        "keyspaces": keyspaces or {
            "default": {"replication_factor": 1, "default_consistency": "ONE"},
            "t": {"replication_factor": 1, "tier": "transactional", "ranges": RANGES}},
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


def keys_in_ranges(node: Node, count: int) -> list[str]:
    """``count`` keys, each in a range of its own."""
    ranges: RangeMap = node.txn.range_map("t")
    found: dict[str, str] = {}
    for i in range(10_000):
        key = f"k{i}"
        found.setdefault(ranges.range_for_key(key.encode()).group_id, key)
        if len(found) == count:
            return list(found.values())
    raise AssertionError(f"no {count} keys in distinct ranges")


async def begin(call: Call, **body: Any) -> str:
    status, began = await call("POST", "/v1/txn/begin", json=body or None)
    assert status == 200, began
    return str(began["txn_id"])


def test_begin_put_get_delete_commit_across_ranges() -> None:
    async def scenario(call: Call, node: Node) -> None:
        a, b, c = keys_in_ranges(node, 3)
        status, _ = await call("PUT", f"/v1/kv/t/{c}", json={"value": "old"})
        assert status == 200
        status, began = await call("POST", "/v1/txn/begin", json={"keyspace": "t"})
        assert status == 200, began
        txn = began["txn_id"]
        assert txn.startswith(node.node_id + ":") and began["node_id"] == node.node_id
        assert began["keyspace"] == "t" and began["read_only"] is False
        assert isinstance(began["priority"], int)
        base = f"/v1/txn/{txn}/kv/t"
        status, missing = await call("GET", f"{base}/{a}")
        assert status == 404 and missing["error"]["found"] is False, missing
        assert missing["error"]["id"] == txn and missing["error"]["ended"] is None
        status, put = await call("PUT", f"{base}/{a}", json={"value": {"n": 1}})
        assert status == 200 and put["id"] == txn, put
        await call("PUT", f"{base}/{b}", json={"value": [1, 2]})
        # Its own writes, before commit; nobody else sees them yet.
        status, own = await call("GET", f"{base}/{a}")
        assert (status, own["value"], own["own_write"]) == (200, {"n": 1}, True), own
        status, old = await call("GET", f"{base}/{c}")
        assert (status, old["value"]) == (200, "old") and old["version"] > 0, old
        status, deleted = await call("DELETE", f"{base}/{c}")
        assert status == 200, deleted
        status, gone = await call("GET", f"{base}/{c}")
        assert status == 404 and gone["error"]["found"] is False, gone
        status, outside = await call("GET", f"/v1/kv/t/{a}?snapshot_ts=0")
        assert status == 404, outside
        status, done = await call("POST", f"/v1/txn/{txn}/commit")
        assert status == 200 and done["committed"] is True, done
        assert done["id"] == txn and done["commit_ts"] > 0
        assert len(done["receipt"]["ranges"]) == 3, done
        for key, want in ((a, {"n": 1}), (b, [1, 2])):
            status, got = await call("GET", f"/v1/kv/t/{key}")
            assert (status, got["value"], got["version"]) == (200, want, done["commit_ts"])
        status, got = await call("GET", f"/v1/kv/t/{c}")
        assert status == 404, got
        # Its outcome by id, from a range it wrote (as after a commit of unknown outcome).
        for key in (a, c):
            status, outcome = await call("GET", f"/v1/txn/{txn}?keyspace=t&key={key}")
            assert (status, outcome["status"], outcome["commit_ts"]) == (
                200, "committed", done["commit_ts"]), outcome
        # Once committed, every call names the transaction and how it ended.
        status, again = await call("PUT", f"{base}/{a}", json={"value": 2})
        assert status == 409 and again["error"]["reason"] == "committed", again
        assert again["error"]["id"] == txn and again["error"]["ended"] == "committed"

    serve(scenario)


def test_abort_applies_nothing_and_later_calls_say_why() -> None:
    async def scenario(call: Call, node: Node) -> None:
        a, b = keys_in_ranges(node, 2)
        await call("PUT", f"/v1/kv/t/{a}", json={"value": 1})
        txn = await begin(call)  # the only transactional keyspace is the default
        await call("PUT", f"/v1/txn/{txn}/kv/t/{a}", json={"value": 2})
        await call("DELETE", f"/v1/txn/{txn}/kv/t/{b}")
        status, aborted = await call("POST", f"/v1/txn/{txn}/abort")
        assert status == 200 and aborted["aborted"] is True, aborted
        status, got = await call("GET", f"/v1/kv/t/{a}")
        assert (status, got["value"]) == (200, 1)
        for method, path in (("GET", f"/v1/txn/{txn}/kv/t/{a}"),
                             ("POST", f"/v1/txn/{txn}/commit")):
            status, error = await call(method, path)
            assert status == 409, error
            assert error["error"]["code"] == "aborted" and error["error"]["reason"] == "client"
            assert error["error"]["id"] == txn and txn in error["error"]["message"]
        # The locks went with it: a one-shot write of the same key commits at once.
        status, put = await call("PUT", f"/v1/kv/t/{a}", json={"value": 3})
        assert status == 200, put

    serve(scenario)


def test_an_older_transaction_wounds_a_younger_one_which_names_why() -> None:
    async def scenario(call: Call, node: Node) -> None:
        (a,) = keys_in_ranges(node, 1)
        old = await begin(call, keyspace="t")
        young = await begin(call, keyspace="t")
        status, _ = await call("PUT", f"/v1/txn/{young}/kv/t/{a}", json={"value": "young"})
        assert status == 200
        status, _ = await call("PUT", f"/v1/txn/{old}/kv/t/{a}", json={"value": "old"})
        assert status == 200
        status, done = await call("POST", f"/v1/txn/{young}/commit")
        assert status == 409, done
        assert done["error"]["reason"] in ("wounded", "aborted") and done["error"]["id"] == young
        assert done["error"]["ended"] is not None
        status, done = await call("POST", f"/v1/txn/{old}/commit")
        assert status == 200 and done["committed"], done
        status, got = await call("GET", f"/v1/kv/t/{a}")
        assert got["value"] == "old"

    serve(scenario)


def test_a_repeated_call_under_its_idempotency_key_is_answered_once() -> None:
    """What a client does after a lost answer: the same call, the same key, the same node."""
    async def scenario(call: Call, node: Node) -> None:
        txn = await begin(call)
        for path in (f"/v1/txn/{txn}/kv/t/a", f"/v1/txn/{txn}/commit"):
            method = "PUT" if "/kv/" in path else "POST"
            body = {"value": 1} if method == "PUT" else None
            answers = [await call(method, path, json=body, headers={"Idempotency-Key": path})
                       for _ in range(2)]
            assert answers[0] == answers[1] and answers[0][0] == 200, answers
        status, again = await call("POST", f"/v1/txn/{txn}/commit")
        assert status == 409 and again["error"]["reason"] == "committed", again

    serve(scenario)


def test_an_idle_transaction_ends_and_says_so() -> None:
    async def scenario(call: Call, node: Node) -> None:
        (a,) = keys_in_ranges(node, 1)
        txn = await begin(call)
        status, _ = await call("PUT", f"/v1/txn/{txn}/kv/t/{a}", json={"value": 1})
        assert status == 200 and len(node.txn.sessions) == 1
        deadline_s = node.clock.monotonic_s() + 10.0
        while len(node.txn.sessions):
            assert node.clock.monotonic_s() < deadline_s, "the idle transaction never ended"
            await node.clock.sleep(0.05)
        status, error = await call("POST", f"/v1/txn/{txn}/commit")
        assert status == 409, error
        assert (error["error"]["reason"], error["error"]["ended"]) == ("idle", "idle")
        assert "idle" in error["error"]["message"] and txn in error["error"]["message"]
        # Its lock went with it.
        status, put = await call("PUT", f"/v1/kv/t/{a}", json={"value": 2})
        assert status == 200, put

    serve(scenario, txn={"idle_timeout_s": 0.5})


def test_read_only_transaction_reads_its_snapshot() -> None:
    async def scenario(call: Call, node: Node) -> None:
        a, b = keys_in_ranges(node, 2)
        await call("POST", "/v1/txn", json={"keyspace": "t", "writes": [
            {"op": "put", "key": a, "value": 50}, {"op": "put", "key": b, "value": 50}]})
        status, began = await call("POST", "/v1/txn/begin", json={"read_only": True})
        assert status == 200 and began["read_only"] and began["read_ts"] > 0, began
        txn = began["txn_id"]
        status, first = await call("GET", f"/v1/txn/{txn}/kv/t/{a}")
        assert (status, first["value"]) == (200, 50), first
        # A transfer that commits after the snapshot is not seen by it.
        status, moved = await call("POST", "/v1/txn", json={"keyspace": "t", "writes": [
            {"op": "put", "key": a, "value": 20}, {"op": "put", "key": b, "value": 80}]})
        assert status == 200 and moved["commit_ts"] > began["read_ts"], moved
        status, second = await call("GET", f"/v1/txn/{txn}/kv/t/{b}")
        assert (status, second["value"]) == (200, 50), second
        status, refused = await call("PUT", f"/v1/txn/{txn}/kv/t/{a}", json={"value": 1})
        assert status == 409 and refused["error"]["reason"] == "read_only", refused
        status, done = await call("POST", f"/v1/txn/{txn}/commit")
        assert status == 200 and done["read_ts"] == began["read_ts"], done

    serve(scenario)


def test_priority_is_kept_by_a_rerun() -> None:
    async def scenario(call: Call, node: Node) -> None:
        status, first = await call("POST", "/v1/txn/begin", json={})
        assert status == 200
        status, rerun = await call("POST", "/v1/txn/begin",
                                   json={"keyspace": "t", "priority": first["priority"]})
        assert status == 200 and rerun["priority"] == first["priority"], rerun
        assert rerun["txn_id"] != first["txn_id"]

    serve(scenario)


def test_bad_input_names_the_field() -> None:
    async def scenario(call: Call, node: Node) -> None:
        txn = await begin(call)
        base = f"/v1/txn/{txn}/kv"
        big = "x" * 2000
        other = f"{node.node_id}x:1:0000abcd"
        cases = [
            ("POST", "/v1/txn/begin", {"keyspace": "default"}, 400, "keyspace"),
            ("POST", "/v1/txn/begin", {"keyspace": "nope"}, 404, None),
            ("POST", "/v1/txn/begin", {"read_only": "yes"}, 400, "read_only"),
            ("POST", "/v1/txn/begin", {"priority": -1}, 400, "priority"),
            ("POST", "/v1/txn/begin", {"keyspace": "t", "ttl": 1}, 400, "ttl"),
            ("POST", "/v1/txn/begin", [1], 400, "body"),
            ("GET", "/v1/txn/bad%20id/kv/t/a", None, 400, "id"),
            ("GET", f"{base}/default/a", None, 400, "keyspace"),
            ("GET", f"{base}/nope/a", None, 404, None),
            ("PUT", f"{base}/t/a", {"val": 1}, 400, "val"),
            ("PUT", f"{base}/t/a", {}, 400, "value"),
            ("PUT", f"{base}/t/a", {"value": big}, 413, "value"),
            ("PUT", f"{base}/t/%FF", {"value": 1}, 400, "key"),
            ("DELETE", f"{base}/t/a", {"value": 1}, 400, "value"),
            ("POST", f"/v1/txn/{txn}/commit", {"now": True}, 400, "now"),
        ]
        for method, path, body, want, field in cases:
            status, answer = await call(method, path, json=body)
            assert status == want, (path, body, answer)
            assert answer["error"].get("field") == field, (path, body, answer)
        # A malformed body names the body.
        status, answer = await call("PUT", f"{base}/t/a", data=b"{nope",
                                    headers={"Content-Type": "application/json"})
        assert (status, answer["error"]["field"]) == (400, "body"), answer
        # None of that ended the transaction.
        status, put = await call("PUT", f"{base}/t/a", json={"value": 1})
        assert status == 200, put
        # Ids this node never gave, and ids of another node.
        status, unknown = await call("POST", f"/v1/txn/{node.node_id}:999:0000abcd/commit")
        assert status == 404 and unknown["error"]["reason"] == "unknown_txn", unknown
        status, plain = await call("POST", "/v1/txn/my-id/commit")
        assert status == 404 and plain["error"]["reason"] == "unknown_txn", plain
        status, elsewhere = await call("GET", f"/v1/txn/{other}/kv/t/a")
        assert status == 404, elsewhere
        error = elsewhere["error"]
        assert (error["reason"], error["node_id"], error["id"]) == (
            "other_node", f"{node.node_id}x", other), error
        # GET /v1/txn/{id} is still the outcome of a transaction id.
        status, outcome = await call("GET", "/v1/txn/never?keyspace=t&key=a")
        assert status == 404 and outcome["error"]["status"] == "not_committed", outcome

    serve(scenario)


def test_begin_needs_a_keyspace_when_there_are_several() -> None:
    async def scenario(call: Call, node: Node) -> None:
        status, answer = await call("POST", "/v1/txn/begin")
        assert status == 400 and answer["error"]["field"] == "keyspace", answer
        assert "t1" in answer["error"]["message"] and "t2" in answer["error"]["message"]
        txn = await begin(call, keyspace="t2")
        status, wrong = await call("PUT", f"/v1/txn/{txn}/kv/t1/a", json={"value": 1})
        assert status == 409 and wrong["error"]["reason"] == "keyspace", wrong

    serve(scenario, keyspaces={"t1": {"replication_factor": 1, "tier": "transactional"},
                               "t2": {"replication_factor": 1, "tier": "transactional"}})


def test_the_native_protocol_runs_the_same_calls() -> None:
    """Each verb decodes to its operation, and runs the handler HTTP runs."""
    assert _ROUTES["txn_begin"] is h.txn_begin and _ROUTES["txn_commit"] is h.txn_commit

    def request(verb: str, payload: dict[str, Any]) -> core.Request:
        return core.request(Frame(1, KIND_REQUEST, 5, verb, payload))

    got = request("txn_put", {"txn_id": "n1:1:0000abcd", "keyspace": "t", "key": "a",
                              "body": json.dumps({"value": 1}).encode()})
    assert (got.txn_id, got.keyspace, got.key) == ("n1:1:0000abcd", "t", "a")
    for verb in ("txn_get", "txn_put", "txn_delete", "txn_commit", "txn_abort"):
        assert core.OPERATIONS[verb] == verb and _ROUTES[verb] is getattr(h, verb)
        with pytest.raises(ProtocolError) as refused:
            request(verb, {"keyspace": "t", "key": "a"})
        assert refused.value.details["field"] == "txn_id"
    assert request("txn_begin", {"body": b"{}"}).verb == "txn_begin"
