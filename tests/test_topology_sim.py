"""Bootstrap streaming in the deterministic simulator (Dynamo §4.9; Cassandra's
bootstrap): the real nodes on virtual time, a fourth joining three that hold
data while a coordinator keeps writing."""

from __future__ import annotations

import asyncio
import random

from ringkv.coordinator import Coordinator
from ringkv.gossip import state as gs
from ringkv.quorum import ConsistencyLevel
from ringkv.ring import token_for
from ringkv.sim.cluster import SimCluster
from ringkv.sim.loop import VirtualTimeLoop
from ringkv.sim.network import NetworkConditions, SimNetwork
from ringkv.sim.run import SimSettings, node_configs
from ringkv.versioning import encode_json_value
from tests.sim_waits import until

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


def test_removenode_and_replace_recover_dead_nodes_and_refuse_what_is_unsafe() -> None:
    """Cassandra's removenode then replace_address, on virtual time: n4 dies and
    is removed (its ranges stream from the survivors to their new owners), then
    n3 dies and n5 takes its place with an empty disk. Every write acknowledged
    before or during either change ends up on each natural replica's own copy."""
    import dataclasses

    from ringkv.errors import TopologyRefused

    loop = VirtualTimeLoop()
    network = SimNetwork(loop, random.Random(5), NetworkConditions())
    configs = node_configs(SimSettings(seed=5, nodes=5))
    # n5 replaces n3 (``ringkv node --replace n3``).
    configs[4] = dataclasses.replace(
        configs[4], cluster=dataclasses.replace(configs[4].cluster, replace_node_id="n3"))
    cluster = SimCluster(loop, network, configs, 5, Coordinator)
    n1, n2, n3, n4, n5 = cluster.machines
    acked: dict[str, int] = {}

    async def put(key: str, value: int) -> None:
        assert n1.node is not None
        await n1.run(n1.node.put("default", key.encode(), encode_json_value(value), None, QUORUM))
        acked[key] = value

    def refused(call: object) -> str:
        try:
            call()  # type: ignore[operator]
        except TopologyRefused as exc:
            return exc.reason
        raise AssertionError("not refused")

    def check_every_replica(live: list[str]) -> None:
        node = n1.node
        assert node is not None and sorted(node.ring.node_ids) == sorted(live)
        for key, value in acked.items():
            for replica in node.ring.replicas(token_for(key.encode()), 3):
                peer = cluster.by_id(replica).node
                assert peer is not None and sorted(peer.ring.node_ids) == sorted(live)
                cell = peer.read_local("default", key.encode())
                assert cell is not None and cell.value == encode_json_value(value), (key, replica)

    async def main() -> None:
        for machine in (n1, n2, n3, n4):
            await machine.start()
        node1, node2 = n1.node, n2.node
        assert node1 is not None and node2 is not None
        await until(lambda: all(len(m.node.ring) == 4 for m in (n1, n2, n3, n4)
                                if m.node is not None), "one ring of four")
        for i in range(200):
            await put(f"before{i}", i)
        assert refused(lambda: node1.removenode("n2")) == "node_alive"
        assert refused(lambda: node1.removenode("n1")) == "node_alive"
        assert refused(lambda: node1.removenode("nX")) == "unknown_node"

        n4.crash(power=True)
        await until(lambda: not node1.is_alive("n4") and not node2.is_alive("n4"), "n4 DOWN")
        hinted_n4 = 0
        for i in range(50):  # writes n4 replicates while down: n1 keeps hints for it
            await put(f"hinted{i}", i)
            hinted_n4 = await n1.run(node1.hints.count("n4"))
            if hinted_n4:
                break
        node1.removenode("n4")
        await until(lambda: node2.future_ring is not None, "n2 to learn n4 is LEAVING")
        # One topology change at a time, wherever it is asked for.
        assert refused(lambda: node1.removenode("n3")) == "topology_change_running"
        assert refused(lambda: node2.decommission()) == "topology_change_running"
        # n1 says REMOVING while it runs: a second removal of n4 elsewhere is refused,
        # and a new node would wait its turn (membership.streaming_joiners).
        await until(lambda: node2.gossiper.endpoint_states()["n1"].get(gs.REMOVING) == "n4",
                    "n2 to learn n1 is removing n4")
        assert refused(lambda: node2.removenode("n4")) == "topology_change_running"
        during = 0
        while node1.removing and during < 10_000:
            await put(f"remove{during}", during)
            during += 1
            await asyncio.sleep(0.05)
        assert during > 20 and node1.streaming.state == "done"
        await until(lambda: "n4" not in node2.ring.node_ids, "n4 off n2's ring")
        await until(lambda: node2.gossiper.endpoint_states()["n1"].get(gs.REMOVING) == "",
                    "n1's removal to end in n2's view")
        # The hints kept for n4 while it was down go with it (it never comes back).
        await until(lambda: "n4" not in node1.hints.targets, "n4's hints dropped")
        assert hinted_n4 > 0 and await n1.run(node1.hints.count("n4")) == 0
        check_every_replica(["n1", "n2", "n3"])

        n3.crash(power=True)
        await until(lambda: not node1.is_alive("n3") and not node2.is_alive("n3"), "n3 DOWN")
        assert refused(lambda: node1.removenode("n3")) == "too_few_nodes"  # 2 < RF 3
        await n5.start(wait_joined=False)
        assert n5.start_task is not None
        during = 0
        while not n5.start_task.done() and during < 10_000:
            await put(f"replace{during}", during)
            during += 1
            await asyncio.sleep(0.05)
        await n5.start_task
        assert during > 20
        node5 = n5.node
        assert node5 is not None and node5.streaming.state == "done"
        await until(lambda: "n3" not in node1.ring.node_ids and "n3" not in node2.ring.node_ids,
                    "n3 off every ring")
        assert node5.ring.tokens_of("n5") == node1.ring.tokens_of("n5")
        check_every_replica(["n1", "n2", "n5"])

    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()
