"""Recovering from a dead node on real processes (Dynamo §4.9, removing storage
nodes; Cassandra's removenode and replace_address): a node of four is
SIGKILLed for good, then either removed (``ringkv removenode``: the
surviving replicas stream its ranges to their new owners) or replaced by a
new node with an empty disk (``ringkv node --replace``). Afterwards every
acknowledged write is on each natural replica's own copy (local=true, read
first) and reads back at ALL."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ringkv.address import format_address
from ringkv.tools.launcher import NodeProcess, free_port
from ringkv.tools.local_cluster import LocalCluster, node_view
from tests.procs import http, wait_until
from tests.test_bootstrap_process import (
    Load,
    check_every_replica,
    make_cluster,
    put,
    ring_of,
    start_first,
)

pytestmark = pytest.mark.cluster


def write_seed_data(cluster: LocalCluster, count: int) -> dict[str, Any]:
    acked = {}
    for i in range(count):
        key, value = f"seed{i}", {"n": i, "pad": "x" * 50}
        assert put(cluster.procs[i % 4], key, value)
        acked[key] = value
    return acked


def kill_for_good(victim: NodeProcess, others: list[NodeProcess]) -> None:
    victim.kill()

    def down_everywhere() -> bool:
        return all((node_view(proc) or {}).get(victim.node_id, {}).get("liveness") == "DOWN"
                   for proc in others)

    wait_until(down_everywhere, timeout_s=60, interval_s=0.2,
               what=f"{victim.node_id} DOWN on every node")


def wait_ring(procs: list[NodeProcess], expected: set[str]) -> None:
    def settled() -> bool:
        return all(set(ring_of(proc).node_ids) == expected for proc in procs)

    wait_until(settled, timeout_s=30, interval_s=0.2, what=f"every ring to be {sorted(expected)}")


def test_removenode_restores_rf_copies_of_a_dead_nodes_ranges(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, 4)
    try:
        start_first(cluster, 4)
        first, victim = cluster.procs[0], cluster.procs[3]
        acked = write_seed_data(cluster, 300)

        # Refusals: a node that is alive, and a node nobody knows.
        status, body = http("POST", f"{first.url}/v1/removenode", {"node_id": "node2"})
        assert status == 409 and body["error"]["reason"] == "node_alive", body
        status, body = http("POST", f"{first.url}/v1/removenode", {"node_id": "nodeX"})
        assert status == 409 and body["error"]["reason"] == "unknown_node", body
        status, body = http("POST", f"{first.url}/v1/removenode", {})
        assert status == 400, body

        staying = cluster.procs[:3]
        kill_for_good(victim, staying)
        with Load(staying, prefix="remove", pause_s=0.02) as load:
            done = subprocess.run(
                [sys.executable, "-m", "ringkv.cli", "removenode", victim.node_id,
                 "--url", first.url, "--wait-s", "120"],
                capture_output=True, text=True, timeout=180, check=False)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "is removed (LEFT)" in done.stdout
            wait_ring(staying, {p.node_id for p in staying})
        view = http("GET", f"{first.url}/v1/status")[1]["streaming"]
        assert view["state"] == "done" and view["cells"] > 0
        assert view["ranges_done"] == view["ranges_total"] > 0
        # Once removed, it is unknown: removing it again is refused.
        status, body = http("POST", f"{first.url}/v1/removenode", {"node_id": victim.node_id})
        assert status == 409 and body["error"]["reason"] == "unknown_node", body
        assert len(load.acked) > 20
        check_every_replica(cluster, {**acked, **load.acked}, staying, consistency="ALL")
    finally:
        cluster.down()


def test_a_replacement_with_an_empty_disk_takes_over_a_dead_nodes_tokens_and_data(
    tmp_path: Path,
) -> None:
    cluster = make_cluster(tmp_path, 4)
    extra: list[NodeProcess] = []
    try:
        start_first(cluster, 4)
        acked = write_seed_data(cluster, 300)
        victim = cluster.procs[2]
        victim_tokens = ring_of(cluster.procs[0]).tokens_of(victim.node_id)
        seed = format_address("127.0.0.1", cluster.procs[0].internode_port)

        def new_node(node_id: str, replace: str) -> NodeProcess:
            proc = NodeProcess(node_id, tmp_path, client_port=free_port(),
                               internode_port=free_port(), config_path=cluster.config_file(),
                               extra_args=["--seeds", seed, "--replace", replace])
            extra.append(proc)
            return proc

        # Refusals: replacing a node that is alive, or one nobody knows, stops the new node.
        # Each waits a ring delay before it refuses: they run while the victim dies and
        # is replaced (their ids sort after node5's, so no joiner waits its turn on them).
        refusals = {"cannot replace node2: it is alive": new_node("node8", "node2").launch(),
                    "cannot replace nodeX: it is not on the cluster's ring":
                        new_node("node9", "nodeX").launch()}
        others = [p for p in cluster.procs if p is not victim]
        kill_for_good(victim, others)
        shutil.rmtree(tmp_path / victim.node_id)  # the lost disk

        replacement = new_node("node5", victim.node_id)
        with Load(others, prefix="replace", pause_s=0.02) as load:
            replacement.start()  # returns once it serves: NORMAL, every range streamed
            live = [*others, replacement]
            wait_ring(live, {p.node_id for p in live})
        for reason, refused in refusals.items():
            assert refused.proc is not None and refused.proc.wait(timeout=60) != 0
            assert reason in refused.log_tail(80), refused.log_tail(80)
        view = http("GET", f"{replacement.url}/v1/status")[1]["streaming"]
        assert view["state"] == "done" and view["cells"] > 0
        assert sorted(ring_of(replacement).tokens_of("node5")) == sorted(victim_tokens)
        assert len(load.acked) > 20
        check_every_replica(cluster, {**acked, **load.acked}, live, consistency="ALL")
    finally:
        for proc in extra:
            proc.stop()
        cluster.down()
