"""A node the ring moved on without never serves its old data again (Cassandra
refuses a decommissioned or removed node), on virtual time: n4 dies, is removed
(removenode) and comes back; n3 dies, n5 takes its place (replace) and n3 comes
back. Each stops at start-up, told by a shadow round, and later starts refuse
at once. A node that only restarted carries on as before."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from ringkv.coordinator import Coordinator
from ringkv.errors import TopologyRefused
from ringkv.sim.cluster import SimCluster
from ringkv.sim.loop import VirtualTimeLoop
from ringkv.sim.network import NetworkConditions, SimNetwork
from ringkv.sim.run import SimSettings, node_configs
from tests.sim_waits import until


def test_a_removed_or_replaced_node_that_comes_back_stops_and_a_restarted_one_serves() -> None:
    loop = VirtualTimeLoop()
    network = SimNetwork(loop, random.Random(21), NetworkConditions())
    configs = node_configs(SimSettings(seed=21, nodes=5))
    configs[4] = dataclasses.replace(
        configs[4], cluster=dataclasses.replace(configs[4].cluster, replace_node_id="n3"))
    cluster = SimCluster(loop, network, configs, 21, Coordinator)
    n1, n2, n3, n4, n5 = cluster.machines

    async def refused_at_start(machine: object) -> str:
        with pytest.raises(TopologyRefused) as info:
            await machine.start()  # type: ignore[attr-defined]
        machine.crash()  # type: ignore[attr-defined]  # the process ends
        return info.value.reason

    async def main() -> None:
        for machine in (n1, n2, n3, n4):
            await machine.start()
        node1 = n1.node
        assert node1 is not None
        await until(lambda: all(m.node is not None and len(m.node.ring) == 4
                                for m in (n1, n2, n3, n4)), "one ring of four")

        # A plain restart: asked, answered, and back on the ring with its tokens.
        tokens = node1.ring.tokens_of("n2")
        n2.crash()
        await n2.start()
        assert n2.node is not None and n2.node.join_state is None
        assert n2.node.ring.tokens_of("n2") == tokens

        n4.crash(power=True)
        await until(lambda: not node1.is_alive("n4"), "n4 DOWN")
        node1.removenode("n4")
        await until(lambda: not node1.removing, "the removal of n4")
        assert "n4" not in node1.ring.node_ids
        assert await refused_at_start(n4) == "removed"
        assert await refused_at_start(n4) == "removed"  # remembered: refused at once
        assert "n4" not in node1.ring.node_ids

        n3.crash(power=True)
        await until(lambda: not node1.is_alive("n3"), "n3 DOWN")
        await n5.start()
        await until(lambda: "n3" not in node1.ring.node_ids, "n3 off the ring")
        assert await refused_at_start(n3) == "removed"
        assert sorted(node1.ring.node_ids) == ["n1", "n2", "n5"]

    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()
