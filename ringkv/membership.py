"""The ring as gossip describes it (pure).

Every node builds its ring from the endpoint states gossip has spread
(Dynamo §4.8, Cassandra's ``TokenMetadata``): a node is on the ring once it
announces NORMAL (or LEAVING) with tokens, and comes off when it announces
LEFT. Nodes still in BOOT are not owners yet; when bootstrap streaming
lands, they become *pending* owners here.

Peers saved by an earlier run stay on the ring until gossip says otherwise.
A restarted node therefore never believes it is alone and answers from its
own (stale) replica: until it hears from its peers, they are replicas that
are DOWN, and a quorum read fails as Unavailable instead of going back in
time (Cassandra keeps ``system.peers`` for this).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ringkv.gossip import state as gs
from ringkv.ring import NodeInfo, TokenRing

# What is remembered of a peer across restarts (peers.json): tokens, dc,
# rack, and the internode address to dial.
PeerRecord = dict[str, Any]


class HasStates(Protocol):
    def get(self, key: str) -> str | None: ...


def ring_from_gossip(
    states: Mapping[str, HasStates],
    saved_peers: Mapping[str, PeerRecord],
    self_info: NodeInfo,
    self_tokens: Sequence[int],
) -> tuple[TokenRing, dict[str, PeerRecord]]:
    """The ring, and the peers to remember, from gossip's endpoint states.

    ``states`` maps node ids to their gossiped application states (this
    node's own entry is ignored: ``self_info`` and ``self_tokens`` stand for
    it, and a node with no tokens yet is not on its own ring).
    """
    peers = dict(saved_peers)
    for node_id, state in states.items():
        status = state.get(gs.STATUS)
        if node_id == self_info.node_id or status is None or status == gs.BOOT:
            continue
        if status == gs.LEFT:
            peers.pop(node_id, None)
            continue
        node_tokens = gs.parse_tokens(state.get(gs.TOKENS) or "")
        if node_tokens:
            peers[node_id] = {
                "tokens": node_tokens,
                "dc": state.get(gs.DC) or "dc1",
                "rack": state.get(gs.RACK) or "rack1",
                "internode_addr": state.get(gs.INTERNODE_ADDR),
            }
    tokens: dict[str, list[int]] = {}
    infos: dict[str, NodeInfo] = {}
    if self_tokens:
        tokens[self_info.node_id] = list(self_tokens)
        infos[self_info.node_id] = self_info
    for node_id, peer in peers.items():
        tokens[node_id] = list(peer["tokens"])
        infos[node_id] = NodeInfo(node_id, dc=peer["dc"], rack=peer["rack"])
    # Two nodes that joined at once could still pick the same token; the
    # first by node id keeps it, so every node builds the same ring.
    seen: set[int] = set()
    for node_id in sorted(tokens):
        kept = [t for t in tokens[node_id] if t not in seen]
        seen.update(kept)
        if kept:
            tokens[node_id] = kept
        else:
            del tokens[node_id], infos[node_id]
    return TokenRing(tokens, infos), peers
