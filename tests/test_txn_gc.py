"""Garbage collection on a running node: old MVCC versions and expired outcome records.

Spanner §4.1 keeps versions for snapshot reads; something must remove them,
or a transactional keyspace grows with every write it ever took. The node
collects, on its own, every version no read at or above ``now - mvcc_gc_s``
can see (CockroachDB's ``gc.ttlseconds``), keeps what an open read-only
transaction still reads, and refuses a read below what it collected by
name. The records that answer a retry of a named transaction expire after
``txn.outcome_retention_s``, as idempotency keys do; after that, "not
committed" is no longer said to be definitive.
"""

from __future__ import annotations

from collections.abc import Callable

from ringkv.clock import SystemClock
from ringkv.node import Node
from tests.test_txn_service import Call, serve

DEADLINE_S = 20.0


async def until(condition: Callable[[], bool], what: str) -> None:
    clock = SystemClock()
    deadline_s = clock.monotonic_s() + DEADLINE_S
    while not condition():
        assert clock.monotonic_s() < deadline_s, f"not within {DEADLINE_S} s: {what}"
        await clock.sleep(0.05)


def test_old_versions_are_collected_and_reads_below_them_refused_by_name() -> None:
    async def scenario(call: Call, node: Node) -> None:
        versions = []
        for value in (1, 2, 3):
            status, put = await call("PUT", "/v1/kv/t/a", json={"value": value})
            assert status == 200, put
            versions.append(put["version"])
        status, old = await call("GET", f"/v1/kv/t/a?snapshot_ts={versions[0]}")
        assert (status, old.get("value")) == (200, 1), old  # readable before GC
        # mvcc_gc_s is 1: a pass runs every second; the two older versions go.
        await until(lambda: node.txn.stats["gc_versions_deleted"] >= 2, "two versions collected")
        status, refused = await call("GET", f"/v1/kv/t/a?snapshot_ts={versions[0]}")
        assert status >= 400 and refused["error"]["code"] == "snapshot_too_old", refused
        # The newest version is never collected: it is what every later read sees.
        status, latest = await call("GET", "/v1/kv/t/a")
        assert (status, latest["value"], latest["version"]) == (200, 3, versions[2])
        # A read at the oldest timestamp still kept sees it too.
        threshold = refused["error"]["gc_threshold_ts"]
        assert threshold > versions[2], refused
        status, at_kept = await call("GET", f"/v1/kv/t/a?snapshot_ts={threshold}")
        assert (status, at_kept.get("value")) == (200, 3), at_kept

    serve(scenario, mvcc_gc_s=1)


def test_an_open_read_only_transaction_keeps_its_snapshot_readable() -> None:
    async def scenario(call: Call, node: Node) -> None:
        await call("PUT", "/v1/kv/t/other", json={"value": 1})
        await call("PUT", "/v1/kv/t/other", json={"value": 2})
        await call("PUT", "/v1/kv/t/b", json={"value": "before"})
        status, began = await call("POST", "/v1/txn/begin", json={"keyspace": "t",
                                                                  "read_only": True})
        assert status == 200, began
        txn_id = began["txn_id"]
        status, first = await call("GET", f"/v1/txn/{txn_id}/kv/t/b")
        assert (status, first["value"]) == (200, "before"), first
        for value in ("after-1", "after-2"):
            assert (await call("PUT", "/v1/kv/t/b", json={"value": value}))[0] == 200
        # Passes run (and collect the history older than the snapshot), but keep what
        # the snapshot reads.
        await until(lambda: node.txn.stats["gc_versions_deleted"] >= 1, "a pass collected")
        status, again = await call("GET", f"/v1/txn/{txn_id}/kv/t/b")
        assert (status, again["value"]) == (200, "before"), again
        assert (await call("POST", f"/v1/txn/{txn_id}/commit"))[0] == 200
        # Once it has ended, its snapshot is no longer held.
        deleted = node.txn.stats["gc_versions_deleted"]
        await until(lambda: node.txn.stats["gc_versions_deleted"] >= deleted + 2,
                    "the versions the transaction held collected")

    # Collected from 1 s back, but the open transaction's snapshot holds its versions.
    serve(scenario, mvcc_gc_s=1, max_duration_s=30)


def test_expired_outcomes_no_longer_answer_a_retry_or_claim_never_committed() -> None:
    async def scenario(call: Call, node: Node) -> None:
        body = {"keyspace": "t", "id": "pay-7", "writes": [{"op": "put", "key": "c", "value": 1}]}
        status, first = await call("POST", "/v1/txn", json=body)
        assert status == 200 and first["committed"], first
        status, replay = await call("POST", "/v1/txn", json=body)
        # A replay is answered from the record: the first commit's timestamp, no new receipt.
        assert replay["commit_ts"] == first["commit_ts"] and replay["receipt"] is None, replay
        status, never = await call("GET", "/v1/txn/never?keyspace=t")
        assert status == 404 and never["error"]["definitive"] is True, never
        # What a pass does once txn.outcome_retention_s has gone by since the commit.
        await node.txn._expire_outcomes(first["commit_ts"] + 1)
        assert node.txn.stats["outcomes_expired"] == 1
        status, gone = await call("GET", "/v1/txn/pay-7?keyspace=t")
        assert status == 404 and gone["error"]["definitive"] is False, gone
        assert "outcome_retention_s" in gone["error"]["message"], gone
        status, never = await call("GET", "/v1/txn/never?keyspace=t")
        assert status == 404 and never["error"]["definitive"] is False, never
        # A retry now runs again (as a reused idempotency key would, past its TTL).
        status, rerun = await call("POST", "/v1/txn", json=body)
        assert status == 200 and rerun["committed"] and rerun["receipt"] is not None, rerun
        assert rerun["commit_ts"] > first["commit_ts"]
        # A record younger than the cut stays.
        await node.txn._expire_outcomes(rerun["commit_ts"])
        status, kept = await call("GET", "/v1/txn/pay-7?keyspace=t")
        assert (status, kept["commit_ts"]) == (200, rerun["commit_ts"]), kept

    serve(scenario)
