"""Pending ranges: who will own what once the joins in progress finish (pure).

A joining node gossips STATUS=BOOT together with the tokens it has chosen
(Cassandra's own wire form is ``BOOT,<tokens>``); a BOOT without tokens is a
node that is still learning the ring. From the moment its tokens are known,
every coordinator computes the *future ring* (today's ring plus the joiners'
tokens) and, for each write, the *pending replicas*: replicas of the key on
the future ring that are not natural replicas on today's. Writes go to them
too, so nothing written while the joiner streams can slip past it
(Dynamo §4.9: "nodes ... will transfer the keys to the new node", with
writes to the moving ranges sent to both). Reads never go to them.

A leaving node (STATUS=LEAVING, decommission) stays a natural replica until
it is LEFT; the future ring lacks it, so the nodes that take its ranges over
are pending replicas of them while it streams its data out.

The consistency level still counts the natural replicas only; each pending
replica adds one to the acknowledgements required (Cassandra's
``blockFor + pending``): a QUORUM write acknowledged by two of three
natural replicas, one of which is about to hand its range to the joiner,
would otherwise be held by a single future replica.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from ringkv.gossip import state as gs
from ringkv.ring import NodeInfo, TokenRing


class HasStates(Protocol):
    def get(self, key: str) -> str | None: ...


def joining_from_gossip(
    states: Mapping[str, HasStates], self_id: str
) -> dict[str, tuple[tuple[int, ...], NodeInfo]]:
    """The peers joining with tokens (STATUS=BOOT and TOKENS set): tokens and info.

    ``self_id``'s own entry is left out: the node passes its own pending
    tokens to ``future_ring`` itself.
    """
    out: dict[str, tuple[tuple[int, ...], NodeInfo]] = {}
    for node_id, state in states.items():
        if node_id == self_id or state.get(gs.STATUS) != gs.BOOT:
            continue
        try:
            tokens = tuple(gs.parse_tokens(state.get(gs.TOKENS) or ""))
        except ValueError:
            continue  # validated on receipt; never trust it twice
        if tokens:
            info = NodeInfo(node_id, dc=state.get(gs.DC) or "dc1", rack=state.get(gs.RACK) or "rack1")
            out[node_id] = (tokens, info)
    return out


def leaving_from_gossip(states: Mapping[str, HasStates], self_id: str) -> frozenset[str]:
    """The peers that are LEAVING (decommissioning): on the ring until they are LEFT."""
    return frozenset(node_id for node_id, state in states.items()
                     if node_id != self_id and state.get(gs.STATUS) == gs.LEAVING)


def future_ring(
    ring: TokenRing, joining: Mapping[str, tuple[Sequence[int], NodeInfo]],
    leaving: frozenset[str] = frozenset(),
) -> TokenRing | None:
    """Today's ring with every joiner's tokens added and every leaving node
    taken off, or None when no node joins or leaves.

    A token that is already taken stays with its owner (the same rule as
    ``ring_from_gossip``: first by node id keeps it), so every node computes
    the same future ring.
    """
    joiners = {node_id: j for node_id, j in joining.items() if node_id not in ring.node_ids}
    leavers = [node_id for node_id in sorted(leaving) if node_id in ring.node_ids]
    if not joiners and not leavers:
        return None
    taken = {token for token, _ in ring.sorted_tokens}
    future = ring
    for node_id in leavers:
        future = future.without_node(node_id)
    for node_id in sorted(joiners):
        tokens, info = joiners[node_id]
        kept = [t for t in tokens if t not in taken]
        if kept:
            taken.update(kept)
            future = future.with_node(node_id, kept, info)
    return None if future is ring else future


def pending_replicas(
    natural: Sequence[str], future: TokenRing | None, token: int, rf: int
) -> tuple[str, ...]:
    """The replicas ``token`` will gain once the joins finish (none without a future ring)."""
    if future is None or not len(future):
        return ()
    return tuple([node for node in future.replicas(token, rf) if node not in natural])
