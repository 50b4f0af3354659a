"""The demo that `make run` shows, on three real node processes.

Both tiers: hinted handoff on the eventual keyspace (Dynamo §4.6), then
compare-and-set on the transactional keyspace surviving the SIGKILL of its
range's Paxos leader (Spanner §4.1). The demo's own waits have deadlines;
this test checks what it reports against what the cluster holds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ringkv.tools.launcher import free_port_block
from ringkv.tools.local_cluster import LocalCluster, demo_counter, demo_run_id, run_demo
from tests.procs import FAST_GOSSIP, http

pytestmark = pytest.mark.cluster


def test_demo_shows_both_tiers(tmp_path: Path) -> None:
    # Half-second gossip: the demo waits on membership (start-up, its victim DOWN and
    # UP again) and checks what it reports, not how soon.
    cluster = LocalCluster(tmp_path, nodes=3, rf=3, base_client_port=free_port_block(3),
                           base_internode_port=free_port_block(3), config_overrides={**FAST_GOSSIP})
    lines: list[str] = []
    try:
        cluster.up(timeout_s=30)
        run_id = run_demo(cluster, say=lines.append)
        counter = demo_counter(run_id)
        text = "\n".join(lines)
        assert "own replica now holds all 10 keys" in text, text
        assert re.search(r"hints stored by node1 in this run: ([1-9]\d*), replayed: \1", text), text
        assert "CAS with a stale version -> 409 condition_failed, current value 1" in text, text
        killed = re.search(r"kill (node\d), the range's Paxos leader", text)
        assert killed, text
        after = re.search(rf"CAS {counter} -> 2 .* through (node\d), .* (node\d) leads now", text)
        assert after and killed.group(1) not in after.groups(), text
        # Every node, the restarted leader too, holds the two increments, once each.
        for proc in cluster.procs:
            status, got = http("GET", f"{proc.url}/v1/kv/txn/{counter}")
            assert (status, got["value"]) == (200, 2), (proc.node_id, got)
            # Formed without streaming (a new cluster holds no data), and
            # restarted as a member: no node ever streamed.
            status, view = http("GET", f"{proc.url}/v1/status")
            assert view["streaming"]["state"] == "idle", (proc.node_id, view["streaming"])
        # A second run on this data (`make run` again) starts from nothing of its
        # own: none of its keys is on the node it will kill, its counter is absent,
        # so its checks cannot pass on what this run left.
        again = demo_run_id()
        assert again != run_id
        victim = cluster.procs[-1]
        for i in range(10):
            status, _ = http("GET", f"{victim.url}/v1/kv/default/demo-{again}-{i}?local=true")
            assert status == 404, (again, i)
        status, _ = http("GET", f"{cluster.procs[0].url}/v1/kv/txn/{demo_counter(again)}")
        assert status == 404
    finally:
        cluster.down()
