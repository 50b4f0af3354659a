"""A gossip bug the topology nemeses found (Dynamo §4.8: membership by gossip).

A restarted node can receive the answer to a Syn its previous incarnation
sent: an Ack carrying, for each endpoint that Syn named, only what lies above
the versions named (a delta). The new incarnation knows none of those
endpoints, so it took each delta for a whole state: no TOKENS, no STATUS.
Its digests then claimed those versions, so no peer ever sent the missing
keys, and it relayed the partial states to every new node: a replacement
found the dead node "not on the ring", and a joiner learned a ring without
the nodes concerned, for good."""

from __future__ import annotations

import random

import pytest

from ringkv.gossip.failure_detector import PhiAccrualFailureDetector
from ringkv.gossip.gossiper import Gossiper
from ringkv.gossip.state import (
    INTERNODE_ADDR,
    LOAD,
    NORMAL,
    STATUS,
    TOKENS,
    Ack,
    Syn,
    format_tokens,
)
from ringkv.sim.run import SimSettings, simulate

CLUSTER = "c"


def _gossiper(node_id: str, port: int, generation: int) -> Gossiper:
    g = Gossiper(node_id, CLUSTER, ["127.0.0.1:7999"], generation,
                 PhiAccrualFailureDetector(threshold=8.0))
    g.set_local(INTERNODE_ADDR, f"127.0.0.1:{port}")
    return g


def _syn(g: Gossiper) -> Syn:
    return next(out.msg for out in g.tick(1.0, random.Random(1))
                if isinstance(out.msg, Syn))


def _exchange(initiator: Gossiper, at: str, peer: Gossiper, peer_at: str) -> None:
    """One full round: ``initiator``'s Syn to ``peer``, its Ack, the Ack2."""
    for ack in peer.handle(at, _syn(initiator), 1.0):
        for ack2 in initiator.handle(peer_at, ack.msg, 1.0):
            peer.handle(at, ack2.msg, 1.0)


def test_an_ack_meant_for_the_previous_incarnation_does_not_leave_a_partial_state() -> None:
    x = _gossiper("x", 7002, generation=5)
    x.set_local(STATUS, NORMAL)
    x.set_local(TOKENS, format_tokens([1, 2, 3]))
    b = _gossiper("b", 7001, generation=1)
    old_a = _gossiper("a", 7000, generation=1)
    _exchange(x, "127.0.0.1:7002", b, "127.0.0.1:7001")
    _exchange(x, "127.0.0.1:7002", old_a, "127.0.0.1:7000")
    assert b.tokens_of("x") == old_a.tokens_of("x") == [1, 2, 3]
    x.set_local(LOAD, "42")  # a change b hears of and the old a does not
    _exchange(x, "127.0.0.1:7002", b, "127.0.0.1:7001")
    # The old a names x at the versions it holds; b answers with what lies above.
    stale_ack = b.handle("127.0.0.1:7000", _syn(old_a), 1.0)[0].msg
    assert isinstance(stale_ack, Ack) and set(stale_ack.states["x"].app) == {LOAD}
    # The old a dies; the new one, knowing nothing of x, gets that answer.
    new_a = _gossiper("a", 7000, generation=2)
    new_a.handle("127.0.0.1:7001", stale_ack, 2.0)
    assert new_a.tokens_of("x") == [] and new_a.status_of("x") is None
    # Its digests claim nothing of x, so the next round brings all of it.
    syn = _syn(new_a)
    assert [d.max_version for d in syn.digests if d.node_id == "x"] == [0]
    for ack in b.handle("127.0.0.1:7000", syn, 3.0):
        new_a.handle("127.0.0.1:7001", ack.msg, 3.0)
    assert new_a.tokens_of("x") == [1, 2, 3] and new_a.status_of("x") == NORMAL
    # More answers to the old incarnation's Syns may still come, so it is sure
    # only once it asked for x from version 0: when a peer's Syn names x.
    assert [d.max_version for d in _syn(new_a).digests if d.node_id == "x"] == [0]
    _exchange(b, "127.0.0.1:7001", new_a, "127.0.0.1:7000")
    # Whole now: its digest claims x's versions again (no state resent each round).
    again = _syn(new_a)
    assert [d.max_version for d in again.digests if d.node_id == "x"] == \
        [new_a.endpoint_states()["x"].max_version]


@pytest.mark.parametrize("seed", [1013, 1035])
def test_a_node_that_joins_after_restarts_learns_the_whole_ring(seed: int) -> None:
    """The runs that found it: kill -9 restarts left nodes holding partial states
    (1013: of n4 and n5, on two nodes; 1035: of n2, passed on from node to node
    as if whole); the node that joined through them never put those nodes on
    its ring, so the cluster never settled."""
    result = simulate(SimSettings(
        seed=seed, ops=500, duration_s=40, boot="provisioned", deletes=0.2, gc_grace_s=20,
        nemesis=("join", "decommission", "removenode", "wipe", "crash", "partition")))
    assert result.ok, "\n".join(v.render() for v in result.verdicts)
    assert any("join: n" in line and "is NORMAL" in line for line in result.faults)
