"""Bootstrap streaming in the deterministic simulator (Dynamo §4.9; Cassandra's
bootstrap): the real nodes on virtual time, a fourth joining three that hold
data while a coordinator keeps writing."""

from __future__ import annotations

import asyncio
import random

from ringkv.coordinator import Coordinator
from ringkv.quorum import ConsistencyLevel
from ringkv.ring import token_for
from ringkv.sim.cluster import SimCluster
from ringkv.sim.loop import VirtualTimeLoop
from ringkv.sim.network import NetworkConditions, SimNetwork
from ringkv.sim.run import SimSettings, node_configs
from ringkv.versioning import encode_json_value

QUORUM = ConsistencyLevel.QUORUM


def test_a_joiner_streams_what_was_written_before_and_gets_what_is_written_during() -> None:
    loop = VirtualTimeLoop()
    network = SimNetwork(loop, random.Random(3), NetworkConditions())
    cluster = SimCluster(loop, network, node_configs(SimSettings(seed=3, nodes=4)), 3, Coordinator)
    n1, n2, n3, n4 = cluster.machines

    async def put(key: str, value: int) -> object:
        assert n1.node is not None
        return await n1.run(n1.node.put("default", key.encode(), encode_json_value(value), None,
                                        QUORUM))

    async def main() -> None:
        for machine in (n1, n2, n3):
            await machine.start()
        for i in range(300):
            await put(f"before{i}", i)
        await n4.start(wait_joined=False)
        assert n4.start_task is not None
        during = 0
        pending_seen = False
        while not n4.start_task.done() and during < 10_000:
            result = await put(f"during{during}", during)
            pending_seen |= "n4" in result.receipt.asked  # type: ignore[attr-defined]
            during += 1
            await asyncio.sleep(0.05)
        await n4.start_task
        assert pending_seen and during > 20
        node = n4.node
        assert node is not None and node.join_state is None
        progress = node.streaming.view(0.0)
        assert progress["state"] == "done" and progress["ranges_done"] == progress["ranges_total"]
        ring = node.ring
        keys = [(f"before{i}", i) for i in range(300)] + [(f"during{i}", i) for i in range(during)]
        mine = [(k, v) for k, v in keys if "n4" in ring.replicas(token_for(k.encode()), 3)]
        assert len(mine) > 100
        for key, value in mine:
            cell = node.local_replica.read("default", token_for(key.encode()), key.encode())
            assert cell is not None and cell.value == encode_json_value(value), key

    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()
