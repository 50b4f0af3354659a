"""A write forwarded to its range's leader whose answer is lost has an unknown outcome.

The node a transaction reaches forwards it to the range's leader. When the
leader commits it but the answer never comes back, the forwarding node must
not tell the client "no leader" (503, which reads as "nothing was done"):
the write may well have committed, so the answer at the deadline is a 504
``timeout`` whose message says the outcome is not known and where to ask.
Checked on the simulator: three real nodes, the link from the leader back to
the forwarding node cut one way, so the request arrives and its answer is lost.
"""

from __future__ import annotations

import asyncio
import json
import random

from ringkv.errors import NoLeader, Timeout
from ringkv.sim.coordination import boot_cluster
from ringkv.sim.run import TXN_KEYSPACE
from ringkv.txn.requests import TxnRequest, Write
from ringkv.txn.service import Op

SEED = 5
KEY = b"forwarded"


def test_a_forward_whose_answer_is_lost_is_a_timeout_and_the_write_committed() -> None:
    loop, cluster = boot_cluster(SEED)
    seen: dict[str, object] = {}

    async def main() -> None:
        await cluster.boot(60, provision=random.Random(SEED))
        members = [m for m in cluster.machines if m.node is not None]
        # A read wakes the range's group (groups start on first use); then wait
        # (bounded) until some node leads KEY's range.
        first = members[0]
        assert first.node is not None
        warm = first.run(first.node.txn.execute(Op("get", TXN_KEYSPACE, key=KEY),
                                                started_s=first.node.clock.monotonic_s(),
                                                timeout_s=5))
        await asyncio.wait([warm], timeout=10)
        leader = forwarder = None
        for _ in range(200):
            rng = members[0].node.txn.range_of(TXN_KEYSPACE, [KEY])  # type: ignore[union-attr]
            leaders = [m for m in members if m.node is not None and (
                g := m.node.txn.groups.get(rng.group_id)) is not None and g.runner.is_leader()]
            if leaders:
                leader = leaders[0]
                forwarder = next(m for m in members if m is not leader)
                break
            await asyncio.sleep(0.1)
        assert leader is not None and forwarder is not None, "no leader for the key's range"
        # The request reaches the leader; its answer is lost on the way back.
        cluster.network.cut({(leader.node_id, forwarder.node_id)})
        node = forwarder.node
        assert node is not None
        request = TxnRequest(TXN_KEYSPACE, None, (), (), (Write(KEY, json.dumps("v").encode()),))
        task = forwarder.run(node.txn.execute(Op("txn", TXN_KEYSPACE, request),
                                              started_s=node.clock.monotonic_s(), timeout_s=1.5))
        await asyncio.wait([task], timeout=10)
        assert task.done()
        seen["error"] = task.exception()
        cluster.network.heal()
        # The write did commit: the 503 "no leader" would have been a lie.
        reader = leader.node
        assert reader is not None
        got = leader.run(reader.txn.execute(Op("get", TXN_KEYSPACE, key=KEY),
                                             started_s=reader.clock.monotonic_s(), timeout_s=3))
        await asyncio.wait([got], timeout=10)
        seen["read"] = got.result()

    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()
    error = seen["error"]
    assert isinstance(error, Timeout) and not isinstance(error, NoLeader), repr(error)
    assert error.http_status == 504 and "not known" in error.message
    assert "GET /v1/txn/" in error.message
    read = seen["read"]
    assert isinstance(read, dict)
    assert [(r["key"], r["value"]) for r in read["reads"]] == [(KEY, b'"v"')]
