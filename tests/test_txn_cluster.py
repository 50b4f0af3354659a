"""The transactional tier on three real node processes (txn/service.py over the transport).

A keyspace ``txn`` with RF 3 is one Paxos group over the three nodes.
Checked: a write through one node is read back strongly through another,
compare-and-set and one-shot transactions are forwarded to the range's
leader from any node (Spanner §4.2.1: work happens at the group leader);
after SIGKILL of the leader, a CAS through a survivor commits once the old
lease has run out and a new leader is elected (Spanner §4.1, disjoint
leases), no CAS is applied twice, and the unavailability (kill to first
successful commit) is about the lease plus an election.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ringkv.tools.launcher import NodeProcess, free_port_block
from ringkv.tools.local_cluster import LocalCluster
from tests.procs import http, wait_until

pytestmark = pytest.mark.cluster

LEASE_S = 2.0


def txn_cluster(data_dir: Path) -> LocalCluster:
    return LocalCluster(data_dir, nodes=3, rf=3, base_client_port=free_port_block(3),
                        base_internode_port=free_port_block(3), config_overrides={
                            "keyspaces.txn": {"replication_factor": 3, "tier": "transactional"},
                            "txn.lease_s": LEASE_S})


@pytest.fixture
def cluster(tmp_path: Path):
    cluster = txn_cluster(tmp_path)
    try:
        cluster.up(timeout_s=30)
        yield cluster
    finally:
        cluster.down()


def leader_of(procs: list[NodeProcess]) -> NodeProcess | None:
    for proc in procs:
        status, view = http("GET", f"{proc.url}/v1/status")
        groups = view.get("transactional", {}).get("groups", {}) if status == 200 else {}
        if any(g["leads"] for g in groups.values()):
            return proc
    return None


def put(proc: NodeProcess, key: str, body: dict[str, Any]) -> tuple[int, Any]:
    return http("PUT", f"{proc.url}/v1/kv/txn/{key}", body)


def test_put_get_cas_txn_and_leader_failover(cluster: LocalCluster) -> None:
    a, b, c = cluster.procs
    wait_until(lambda: put(a, "k", {"value": 0})[0] == 200, timeout_s=30, interval_s=0.2,
               what="the first transactional write (election and clock sync)")
    status, got = http("GET", f"{b.url}/v1/kv/txn/k")
    assert (status, got["value"]) == (200, 0), got
    status, cas = put(c, "k", {"value": 1, "if": {"version": got["version"]}})
    assert status == 200, cas
    status, stale = put(a, "k", {"value": 2, "if": {"version": got["version"]}})
    assert status == 409 and stale["error"]["current_value"] == 1, stale
    status, txn = http("POST", f"{b.url}/v1/txn", {
        "keyspace": "txn", "id": "t-1", "reads": ["k"],
        "writes": [{"op": "put", "key": "other", "value": "x"}]})
    assert status == 200 and txn["reads"][0]["value"] == 1, txn
    status, outcome = http("GET", f"{c.url}/v1/txn/t-1?keyspace=txn")
    assert status == 200 and outcome["commit_ts"] == txn["commit_ts"], outcome
    status, bad = http("GET", f"{a.url}/v1/kv/txn/k?consistency=QUORUM")
    assert status == 400 and bad["error"]["field"] == "consistency"
    status, snap = http("GET", f"{c.url}/v1/kv/txn/k?snapshot_ts={cas['version']}")
    assert (status, snap["value"]) == (200, 1), snap

    leader = leader_of(cluster.procs)
    assert leader is not None
    survivors = [p for p in cluster.procs if p is not leader]
    status, got = http("GET", f"{survivors[0].url}/v1/kv/txn/k")
    version = got["version"]
    leader.kill()
    killed_at = time.monotonic()
    committed = None
    attempts = 0
    while time.monotonic() - killed_at < 30:
        attempts += 1
        status, answer = put(survivors[attempts % 2], "k", {"value": 2, "if": {"version": version}})
        if status == 200:
            committed = answer
            break
        # Until the new leader: 503 no_leader or 504; never a lost or doubled CAS.
        assert status in (503, 504, 409), answer
        if status == 409:  # an attempt whose answer was lost did commit
            assert answer["error"]["current_value"] == 2
            committed = answer
            break
        time.sleep(0.05)
    unavailable_s = time.monotonic() - killed_at
    print(f"failover: kill to first commit {unavailable_s:.2f} s ({attempts} attempts)")
    assert committed is not None
    assert unavailable_s < LEASE_S + 6.0
    status, got = http("GET", f"{survivors[1].url}/v1/kv/txn/k")
    assert (status, got["value"]) == (200, 2), got
