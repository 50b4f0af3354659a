"""A real cluster: node processes on loopback, gossip, failure detection, quorums,
hinted handoff and read repair (Dynamo §4.5-§4.8)."""

from __future__ import annotations

import random
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from ringkv.ring import TokenRing
from ringkv.tools.local_cluster import NO_STREAMING, LocalCluster, node_view
from ringkv.tools.launcher import NodeProcess, free_port_block
from tests.procs import FAST_GOSSIP, http, wait_until

pytestmark = pytest.mark.cluster


def make_cluster(tmp_path: Path, nodes: int = 3, **overrides: Any) -> LocalCluster:
    return LocalCluster(tmp_path, nodes=nodes, rf=3, base_client_port=free_port_block(nodes),
                        base_internode_port=free_port_block(nodes), config_overrides=overrides)


def liveness(observer: NodeProcess, node_id: str) -> str | None:
    view = node_view(observer)
    return None if view is None or node_id not in view else view[node_id]["liveness"]


@pytest.fixture
def cluster(tmp_path: Path):
    """A cluster of its own, for a test that kills a node: half-second gossip."""
    cluster = make_cluster(tmp_path, **FAST_GOSSIP)
    try:
        cluster.up(timeout_s=30)
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def _module_cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = make_cluster(tmp_path_factory.mktemp("shared"))
    try:
        cluster.up(timeout_s=30)
        yield cluster
    finally:
        cluster.down()


@pytest.fixture
def shared_cluster(_module_cluster: LocalCluster) -> LocalCluster:
    """One cluster for the tests that leave every node running: each starts once
    every node sees every other UP again (a start-up is ~5 s of a test's time)."""
    _module_cluster.wait_all_up(timeout_s=30)
    return _module_cluster


def test_three_nodes_discover_each_other_from_one_seed(tmp_path: Path) -> None:
    """Dynamo §4.8.1: gossip-based membership; every node sees every node UP within 10 s.
    A new cluster holds no data, so they join without streaming (as ``cluster up``)."""
    cluster = make_cluster(tmp_path)
    cluster.build()
    try:
        for proc in cluster.procs:  # one after another; only node1 is a seed
            proc.extra_args.append(NO_STREAMING)
            proc.start()
        cluster.wait_all_up(timeout_s=10)
        status, body = http("GET", f"{cluster.procs[1].url}/v1/ring")
        assert status == 200 and len(body["nodes"]) == 3
        owns = [row["owns"] for row in node_view(cluster.procs[2]).values()]
        assert sum(owns) == pytest.approx(1.0)
    finally:
        cluster.down()


def test_a_paused_node_is_marked_down_then_up(shared_cluster: LocalCluster) -> None:
    """Phi-accrual detection (phi 8, 1 s gossip): DOWN within 15 s of SIGSTOP, UP after SIGCONT."""
    cluster = shared_cluster
    first, paused = cluster.procs[0], cluster.procs[2]
    paused.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: all(liveness(p, paused.node_id) == "DOWN" for p in cluster.procs[:2]),
                   timeout_s=15, interval_s=0.2, what="the paused node to be marked DOWN")
    finally:
        paused.signal(signal.SIGCONT)
    wait_until(lambda: liveness(first, paused.node_id) == "UP", timeout_s=15, interval_s=0.2,
               what="the resumed node to be marked UP")


def test_one_node_down_quorum_works_all_is_unavailable_and_hints_replay(
    cluster: LocalCluster,
) -> None:
    """Dynamo §4.6 sloppy quorum and hinted handoff, with Cassandra's strict replica set."""
    first, victim = cluster.procs[0], cluster.procs[2]
    victim.kill()
    wait_until(lambda: liveness(first, victim.node_id) == "DOWN", timeout_s=20, interval_s=0.2,
               what="the killed node to be marked DOWN")
    hints = 0
    for i in range(20):
        status, body = http("PUT", f"{first.url}/v1/kv/default/k{i}?consistency=QUORUM",
                            {"value": i})
        assert status == 200, body
        hints += body["receipt"]["hints_stored"]
        status, body = http("GET", f"{first.url}/v1/kv/default/k{i}?consistency=QUORUM")
        assert status == 200 and body["value"] == i
    assert hints == 20
    status, body = http("PUT", f"{first.url}/v1/kv/default/x?consistency=ALL", {"value": 1})
    assert status == 503
    assert (body["error"]["code"], body["error"]["required"], body["error"]["alive"]) == (
        "unavailable", 3, 2)
    status, body = http("GET", f"{first.url}/v1/kv/default/k1?consistency=ALL")
    assert status == 503 and body["error"]["required"] == 3

    victim.start()

    def replayed() -> bool:
        return all(
            http("GET", f"{victim.url}/v1/kv/default/k{i}?local=true")[0] == 200
            for i in range(20)
        )

    # No client read touches the victim: only hint replay can fill its replica.
    wait_until(replayed, timeout_s=30, interval_s=0.25, what="hints to be replayed")
    metrics = http("GET", f"{first.url}/metrics")[1]
    assert "ringkv_hints_replayed_total 20.0" in metrics


def test_read_repair_fixes_a_stale_replica(tmp_path: Path) -> None:
    """Dynamo §4.5 read repair: a QUORUM read coordinated by the stale replica repairs it."""
    cluster = make_cluster(tmp_path, **FAST_GOSSIP, **{"timing.max_hint_window_s": 0})  # no hints
    try:
        cluster.up(timeout_s=30)
        first, stale = cluster.procs[0], cluster.procs[2]
        stale.kill()
        wait_until(lambda: liveness(first, stale.node_id) == "DOWN", timeout_s=20,
                   interval_s=0.2, what="the killed node to be marked DOWN")
        for i in range(10):
            assert http("PUT", f"{first.url}/v1/kv/default/r{i}", {"value": i})[0] == 200
        stale.start()
        cluster.wait_all_up(timeout_s=30)
        assert http("GET", f"{stale.url}/v1/kv/default/r3?local=true")[0] == 404
        for i in range(10):
            status, body = http("GET", f"{stale.url}/v1/kv/default/r{i}?consistency=QUORUM")
            assert status == 200 and body["value"] == i
            assert body["receipt"]["read_repair"] is True
            assert stale.node_id in body["receipt"]["repaired"]
            assert http("GET", f"{stale.url}/v1/kv/default/r{i}?local=true")[1]["value"] == i
    finally:
        cluster.down()


def test_garbage_on_the_internode_port_neither_crashes_nor_stalls(
        shared_cluster: LocalCluster) -> None:
    cluster = shared_cluster
    target = cluster.procs[1]
    rng = random.Random(7)
    for size in (1, 4, 100, 70_000):
        with socket.create_connection(("127.0.0.1", target.internode_port), timeout=5) as sock:
            sock.sendall(bytes(rng.getrandbits(8) for _ in range(size)))
    with socket.create_connection(("127.0.0.1", target.internode_port), timeout=5) as sock:
        sock.sendall(b"\xff\xff\xff\xff" + b"x" * 100)  # an absurd frame length
    assert target.proc.poll() is None
    status, body = http("PUT", f"{target.url}/v1/kv/default/after?consistency=ALL", {"value": 1})
    assert status == 200, body
    cluster.wait_all_up(timeout_s=10)


def _scan(url: str) -> dict[str, Any]:
    """Every key of the default keyspace through one node, paged at QUORUM; each once."""
    seen: dict[str, Any] = {}
    token = None
    for _ in range(100):  # bounded: the shared cluster holds well under 700 keys
        query = "?limit=7&consistency=QUORUM" + (f"&page_token={token}" if token else "")
        status, body = http("GET", f"{url}/v1/kv/default{query}")
        assert status == 200, body
        for item in body["items"]:
            assert item["key"] not in seen
            seen[item["key"]] = item["value"]
        token = body["next_page_token"]
        if token is None:
            return seen
    raise AssertionError("the scan did not end within 100 pages")


def test_scan_and_batch_cover_the_whole_ring(shared_cluster: LocalCluster) -> None:
    """A paged QUORUM scan through any node returns every key exactly once, in token order.
    The cluster is shared: what other tests wrote is there before the batch, and after."""
    first, other = shared_cluster.procs[0], shared_cluster.procs[1]
    before = _scan(other.url)
    ops = [{"op": "put", "key": f"scan{i}", "value": i} for i in range(60)]
    status, body = http("POST", f"{first.url}/v1/batch?consistency=QUORUM", {"ops": ops})
    assert status == 200 and all(result["ok"] for result in body["results"])
    assert _scan(other.url) == {**before, **{f"scan{i}": i for i in range(60)}}
    assert not set(before) & {f"scan{i}" for i in range(60)}


def test_nodes_started_at_once_own_at_most_1_25x_the_mean(tmp_path: Path) -> None:
    """Dynamo §4.2 (vnodes): five new nodes launched together (node1 the seed of all) take
    tokens in turn, each knowing the tokens of those before, so each owns about a fifth.

    They form a new cluster that holds no data, so they join without streaming, as
    ``ringkv cluster up`` forms one (a joiner that streams adds a ring delay each;
    tests/test_bootstrap_process.py covers those). Their turns pass in gossip rounds,
    so half-second rounds: the shares are what is checked, not how soon."""
    cluster = make_cluster(tmp_path, nodes=5, **FAST_GOSSIP)
    cluster.build()
    try:
        for proc in cluster.procs:
            proc.extra_args.append(NO_STREAMING)
            proc.launch()
        cluster.wait_all_up(timeout_s=120)
        status, body = http("GET", f"{cluster.procs[-1].url}/v1/ring")
        assert status == 200
        ring = TokenRing({row["node_id"]: row["tokens"] for row in body["nodes"]})
        ownership = ring.ownership()
        assert len(ownership) == 5
        assert max(ownership.values()) * 5 <= 1.25, ownership
    finally:
        cluster.down()
