"""Rack-aware placement, proved on real hosts: six namespace hosts in three racks, RF=3.

Placement is NetworkTopologyStrategy's inside one DC (``ringkv.ring``): a key's
replicas go to distinct racks before any rack holds two. So (a) every key's three
replicas sit in three racks, which the test checks both from the ring the client
fetched (``/v1/ring``) and physically, by reading each node's own copy; and (b)
losing a whole rack, cut off from the others by iptables drops, costs every key
one replica of three: QUORUM writes and reads through the other racks' nodes
keep succeeding, and after the heal every acknowledged write reads back at QUORUM
through any node, those of the lost rack included.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ringkv.client import Client
from ringkv.coordinator.snitch import MIN_SAMPLES
from ringkv.tools.launcher import NodeProcess, http, wait_until
from ringkv.tools.local_cluster import LocalCluster, node_view, rack_of
from tests.hosts import netns_hosts
from tests.procs import FAST_GOSSIP

pytestmark = pytest.mark.cluster

HOSTS = 6
RACKS = 3
KEYS = 300  # keys whose replica placement is checked against the ring
PHYSICAL_KEYS = 12  # of those, keys whose copies are looked for on every node
WRITES_CUT = 120  # QUORUM writes while the rack is cut off (each followed by a QUORUM read)
DETECTION_DEADLINE_S = 20.0
WARM_UP_READS = 2 * MIN_SAMPLES  # QUORUM reads through each coordinator before the cut


def _node_up(cluster: LocalCluster, timeout_s: float = 90.0) -> None:
    cluster.up(timeout_s, together=True)


def _local_holders(procs: list[NodeProcess], key: str) -> set[str]:
    """The nodes whose own replica holds ``key`` (``local=true`` reads no other node)."""
    held = set()
    for proc in procs:
        status, _ = http("GET", f"{proc.url}/v1/kv/default/{key}?local=true", timeout_s=5)
        if status == 200:
            held.add(proc.node_id)
    return held


def _all_see_down(observers: list[NodeProcess], targets: set[str]) -> bool:
    for proc in observers:
        view = node_view(proc)
        if view is None or any(view.get(t, {}).get("liveness") != "DOWN" for t in targets):
            return False
    return True


@pytest.mark.timeout(240)
def test_replicas_span_three_racks_and_losing_a_rack_loses_no_quorum(tmp_path: Path) -> None:
    with netns_hosts(HOSTS) as hosts:
        # Half-second gossip: six nodes started together take their turns to join in
        # gossip rounds; placement and quorum are what is checked, not how soon.
        cluster = LocalCluster(tmp_path, rf=3, config_overrides={**FAST_GOSSIP})
        cluster.build_on_hosts(hosts, racks=RACKS)
        rack = {p.node_id: rack_of(i, RACKS) for i, p in enumerate(cluster.procs)}
        assert Counter(rack.values()) == {"rack1": 2, "rack2": 2, "rack3": 2}
        try:
            _node_up(cluster)
            status, ring = http("GET", f"{cluster.procs[0].url}/v1/ring")
            assert status == 200
            assert {n["node_id"]: n["rack"] for n in ring["nodes"]} == rack  # as configured

            # (a) every key's replicas in three distinct racks, per the ring ...
            with Client(cluster.endpoints(), consistency="QUORUM", protocol="http") as client:
                client.refresh_ring()  # the client fetches /v1/ring lazily
                for i in range(KEYS):
                    replicas = client.replicas(f"key{i}")
                    assert len(replicas) == 3, (i, replicas)
                    assert len({rack[r] for r in replicas}) == 3, (i, replicas)
                # ... and on disk: a write at ALL lands on exactly those three nodes.
                for i in range(PHYSICAL_KEYS):
                    key = f"key{i}"
                    status, _ = http("PUT", f"{cluster.procs[0].url}/v1/kv/default/{key}"
                                     "?consistency=ALL", {"value": i})
                    assert status == 200
                    assert _local_holders(cluster.procs, key) == set(client.replicas(key)), key

            # (b) rack1 (both its hosts) cut off from racks 2 and 3.
            lost = [p for p in cluster.procs if rack[p.node_id] == "rack1"]
            kept = [p for p in cluster.procs if rack[p.node_id] != "rack1"]
            # Until the cut replicas are seen DOWN, a QUORUM read that asked one
            # of them is saved by speculative retry, which needs a history of
            # read latencies (snitch.MIN_SAMPLES) that a coordinator under load
            # has and a fresh one lacks: give each one that history first.
            for proc in kept:
                for i in range(WARM_UP_READS):
                    status, _ = http("GET", f"{proc.url}/v1/kv/default/key{i % PHYSICAL_KEYS}"
                                     "?consistency=QUORUM")
                    assert status == 200
            hosts.partition([p.host for p in lost], [p.host for p in kept])
            acknowledged: dict[str, int] = {}
            failures: list[str] = []

            def write_and_read(n: int) -> None:
                key, through = f"cut{n}", kept[n % len(kept)]
                status, body = http("PUT", f"{through.url}/v1/kv/default/{key}"
                                    "?consistency=QUORUM", {"value": n}, timeout_s=10)
                if status != 200:
                    failures.append(f"PUT {key} via {through.node_id}: {status} {body}")
                    return
                acknowledged[key] = n
                reader = kept[(n + 1) % len(kept)]
                status, body = http("GET", f"{reader.url}/v1/kv/default/{key}"
                                    "?consistency=QUORUM", timeout_s=10)
                if status != 200 or body.get("value") != n:
                    failures.append(f"GET {key} via {reader.node_id}: {status} {body}")

            # At once (the lost replicas still count as UP: the writes wait
            # out their answers) and once the others have seen the rack DOWN.
            for n in range(WRITES_CUT // 2):
                write_and_read(n)
            wait_until(lambda: _all_see_down(kept, {p.node_id for p in lost}),
                       timeout_s=DETECTION_DEADLINE_S, interval_s=0.2,
                       what="racks 2 and 3 to see rack1 DOWN")
            for n in range(WRITES_CUT // 2, WRITES_CUT):
                write_and_read(n)
            assert failures == [], "\n".join(failures)
            assert len(acknowledged) == WRITES_CUT
            # The lost rack cannot reach a quorum on its own: the cut is real.
            status, body = http("PUT", f"{lost[0].url}/v1/kv/default/probe?consistency=QUORUM",
                                {"value": 1}, timeout_s=10)
            assert status in (503, 504), (status, body)

            hosts.heal()
            cluster.wait_all_up(timeout_s=60)
            # Every acknowledged write reads back at QUORUM through every node.
            for n, (key, value) in enumerate(sorted(acknowledged.items())):
                through = cluster.procs[n % len(cluster.procs)]
                status, body = http("GET", f"{through.url}/v1/kv/default/{key}"
                                    "?consistency=QUORUM", timeout_s=10)
                assert (status, body.get("value")) == (200, value), (key, through.node_id, body)
        finally:
            cluster.down()
