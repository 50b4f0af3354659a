"""The Python client on the transactional tier of three real node processes.

Same cluster as ``test_txn_cluster.py`` (keyspace ``txn``, RF 3, one Paxos
group). Checked through both clients: a conditional put returns the commit
timestamp as the key's version and a receipt with the leader and commit
wait (Spanner §4.1.2); a stale condition raises ``ConditionFailed`` with the
current value and version; a one-shot transaction reads and writes at one
timestamp (Spanner §4.2.1) and its outcome is found by id; a snapshot read
at a version returns that version (Spanner §4.1.3); concurrent increments
through random nodes each apply exactly once.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from ringkv.client import AsyncClient, Client
from ringkv.client.blocking import Transaction
from ringkv.errors import ConditionFailed
from ringkv.tools.local_cluster import LocalCluster
from tests.procs import http, wait_until
from tests.test_txn_cluster import txn_cluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """One cluster for both tests: neither stops a node, and their keys differ."""
    cluster = txn_cluster(tmp_path_factory.mktemp("client-txn"))
    try:
        cluster.up(timeout_s=30)
        yield cluster
    finally:
        cluster.down()


def ready(kv: Client) -> bool:
    try:
        kv.put("warm", 0)
        return True
    except Exception:
        return False


def increment(kv: Client, key: str) -> int:
    """One compare-and-set increment, read again after each failed condition."""
    while True:
        got = kv.get_versioned(key)
        assert got is not None
        try:
            kv.put(key, got.value + 1, if_version=got.version)
            return int(got.value) + 1
        except ConditionFailed:
            continue


def test_client_cas_txn_status_and_snapshot(cluster: LocalCluster) -> None:
    urls = [p.url for p in cluster.procs]
    with Client(urls, keyspace="txn", timeout_s=5.0) as kv:
        wait_until(lambda: ready(kv), timeout_s=30, interval_s=0.2,
                   what="the first transactional write (election and clock sync)")
        first = kv.put("k", 0, if_absent=True)
        assert first.version and first.txn_id and first.receipt["leader"]
        assert first.receipt["commit_wait_ms"] >= 0
        got = kv.get_versioned("k")
        assert got is not None and (got.value, got.version) == (0, first.version)
        assert kv.get("k") == 0
        second = kv.put("k", 1, if_version=first.version)
        with pytest.raises(ConditionFailed) as stale:
            kv.put("k", 2, if_version=first.version)
        assert (stale.value.current_value, stale.value.current_version) == (1, second.version)
        with pytest.raises(ConditionFailed):
            kv.delete("k", if_equals=0)
        result = kv.txn(reads=["k"], conditions=[{"key": "k", "equals": 1}],
                        writes=[{"op": "put", "key": "other", "value": "x"}])
        assert result.committed and result.reads["k"] is not None
        assert result.reads["k"].value == 1 and result.commit_ts is not None
        status = kv.txn_status(result.id)
        assert (status.status, status.commit_ts) == ("committed", result.commit_ts)
        assert kv.txn_status("never-ran").status == "not_committed"
        old = kv.get_versioned("k", snapshot_ts=first.version)
        assert old is not None and old.value == 0
        # Replaying a committed id returns its outcome, not a second commit.
        again = kv.put("k", 99, if_version=first.version, txn_id=second.txn_id)
        assert (again.version, again.replayed) == (second.version, True)
        assert kv.get("k") == 1

        kv.put("counter", 0)
        done: list[int] = []
        threads = [threading.Thread(target=lambda: done.extend(
            increment(kv, "counter") for _ in range(10))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert sorted(done) == list(range(1, 41))  # each increment applied exactly once
        assert kv.get("counter") == 40

    async def async_calls() -> None:
        async with AsyncClient(urls, keyspace="txn") as akv:
            wrote = await akv.put("a", {"n": 1}, if_absent=True)
            with pytest.raises(ConditionFailed) as exists:
                await akv.put("a", {"n": 2}, if_absent=True)
            assert exists.value.current_version == wrote.version
            result = await akv.txn(reads=["a"], writes=[{"op": "delete", "key": "a"}])
            assert result.reads["a"] is not None and result.reads["a"].value == {"n": 1}
            assert await akv.get_versioned("a") is None
            assert (await akv.txn_status(result.id)).status == "committed"

    asyncio.run(async_calls())


def test_interactive_transactions_across_nodes(cluster: LocalCluster) -> None:
    """A transaction's calls all go to the node that began it (the others say where it
    lives), and concurrent ``run_transaction`` increments, rerun after the conflicts
    wound-wait settles, each apply exactly once."""
    urls = [p.url for p in cluster.procs]
    with Client(urls, keyspace="txn", timeout_s=5.0) as kv:
        wait_until(lambda: ready(kv), timeout_s=30, interval_s=0.2,
                   what="the first transactional write (election and clock sync)")
        kv.txn(writes=[{"op": "put", "key": "x", "value": 10},
                       {"op": "put", "key": "y", "value": 10}])
        with kv.transaction() as tx:
            tx.put("x", tx.get("x") - 5)
            tx.put("y", tx.get("y") + 5)
            home = tx.handle
        assert home is not None and tx.outcome is not None and tx.outcome.committed
        assert (kv.get("x"), kv.get("y")) == (5, 15)
        elsewhere = next(p for p in cluster.procs if p.node_id != home.node_id)
        status, answer = http("GET", f"{elsewhere.url}/v1/txn/{home.id}/kv/txn/x")
        assert status == 404, answer
        assert (answer["error"]["reason"], answer["error"]["node_id"]) == (
            "other_node", home.node_id)

        attempts: list[str] = []

        def add_one(tx: Transaction) -> None:
            attempts.append(tx.id or "")
            tx.put("n", (tx.get("n") or 0) + 1)

        threads = [threading.Thread(target=lambda: [
            kv.run_transaction(add_one, keyspace="txn", max_retries=50) for _ in range(10)])
            for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert kv.get("n") == 40  # no increment lost, none applied twice
        assert len(attempts) >= 40
