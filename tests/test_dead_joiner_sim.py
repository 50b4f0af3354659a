"""A joiner that dies while it streams (Cassandra's failed bootstrap), on virtual
time: its pending tokens keep adding it to writes' ``block_for`` (Dynamo §4.9's
pending replicas) until ``removenode`` marks it LEFT. It owned nothing, so
nothing streams, and the next joiner may go."""

from __future__ import annotations

import asyncio
import random

from ringkv.coordinator import Coordinator
from ringkv.errors import TopologyRefused
from ringkv.gossip import state as gs
from ringkv.quorum import ConsistencyLevel
from ringkv.sim.cluster import SimCluster
from ringkv.sim.loop import VirtualTimeLoop
from ringkv.sim.network import NetworkConditions, SimNetwork
from ringkv.sim.run import SimSettings, node_configs
from ringkv.versioning import encode_json_value
from tests.sim_waits import until

QUORUM = ConsistencyLevel.QUORUM


def test_removenode_of_a_joiner_that_died_takes_its_pending_ranges_away() -> None:
    loop = VirtualTimeLoop()
    network = SimNetwork(loop, random.Random(11), NetworkConditions())
    cluster = SimCluster(loop, network, node_configs(SimSettings(seed=11, nodes=4)), 11,
                         Coordinator)
    n1, n2, n3, n4 = cluster.machines

    async def main() -> None:
        for machine in (n1, n2, n3):
            await machine.start()
        node1 = n1.node
        assert node1 is not None
        for i in range(100):
            await n1.run(node1.put("default", f"k{i}".encode(), encode_json_value(i), None,
                                   QUORUM))
        await n4.start(wait_joined=False)
        await until(lambda: all(m.node is not None and m.node.future_ring is not None
                                and "n4" in m.node.future_ring.node_ids for m in (n1, n2, n3)),
                    "every node to see n4's pending tokens")
        n4.crash(power=True)
        await until(lambda: not node1.is_alive("n4"), "n4 DOWN")
        assert node1.future_ring is not None  # dead, and still pending

        view = node1.removenode("n4")
        assert view["removing"] == "n4" and view["state"] == "done" and view["cells"] == 0
        assert node1.future_ring is None  # its pending ranges are gone at once
        assert node1.gossiper is not None
        assert node1.gossiper.endpoint_states()["n4"].get(gs.STATUS) == gs.LEFT
        node2 = n2.node
        assert node2 is not None
        await until(lambda: node2.future_ring is None, "n2 to learn n4 LEFT")
        # Writes are back to the natural replicas alone, and a second removal is refused.
        result = await n1.run(node1.put("default", b"after", encode_json_value(1), None, QUORUM))
        assert "n4" not in result.receipt.asked  # type: ignore[attr-defined]
        try:
            node1.removenode("n4")
        except TopologyRefused as exc:
            assert exc.reason == "unknown_node"
        else:
            raise AssertionError("removing n4 twice was not refused")

    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()


def test_a_live_joiner_is_not_removed() -> None:
    loop = VirtualTimeLoop()
    network = SimNetwork(loop, random.Random(12), NetworkConditions())
    cluster = SimCluster(loop, network, node_configs(SimSettings(seed=12, nodes=4)), 12,
                         Coordinator)
    n1, n2, n3, n4 = cluster.machines

    async def main() -> None:
        for machine in (n1, n2, n3):
            await machine.start()
        node1 = n1.node
        assert node1 is not None
        await n4.start(wait_joined=False)
        await until(lambda: node1.future_ring is not None and "n4" in node1.future_ring.node_ids
                    and node1.is_alive("n4"), "n1 to see n4 joining and UP")
        try:
            node1.removenode("n4")
        except TopologyRefused as exc:
            assert exc.reason == "node_alive" and "joining" in str(exc)
        else:
            raise AssertionError("a live joiner was removed")
        assert n4.start_task is not None
        await n4.start_task  # it goes on to join
        assert n4.node is not None and n4.node.join_state is None

    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()
