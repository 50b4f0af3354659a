"""The ring as gossip describes it (pure).

Every node builds its ring from the endpoint states gossip has spread
(Dynamo §4.8, Cassandra's ``TokenMetadata``): a node is on the ring once it
announces NORMAL (or LEAVING) with tokens, and comes off when it announces
LEFT (or a NORMAL node names it in REPLACES). Nodes still in BOOT are not owners yet: with tokens, they are
*pending* owners streaming their ranges (``topology.pending``).

Peers saved by an earlier run stay on the ring until gossip says otherwise.
A restarted node therefore never believes it is alone and answers from its
own (stale) replica: until it hears from its peers, they are replicas that
are DOWN, and a quorum read fails as Unavailable instead of going back in
time (Cassandra keeps ``system.peers`` for this).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping, Sequence
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
    # A NORMAL node that replaced a dead one (REPLACES) holds its tokens: the
    # dead node is off the ring even before its LEFT reaches this node.
    replaced = {state.get(gs.REPLACES) for node_id, state in states.items()
                if state.get(gs.STATUS) == gs.NORMAL and state.get(gs.REPLACES)}
    for node_id, state in states.items():
        status = state.get(gs.STATUS)
        if node_id == self_info.node_id or status is None or status == gs.BOOT:
            continue
        if status == gs.LEFT or node_id in replaced:
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


# -- joining ------------------------------------------------------------------

JOIN_LEARN_ROUNDS = 5  # gossip rounds a new node spends learning the ring (Cassandra's RING_DELAY)
SEED_RETRY_MAX_INTERVALS = 8  # a node waiting for seeds retries at most this many intervals apart
# Gossip rounds a new node waits, with no joiner ahead of it taking its
# tokens, before it passes over the first of them. A joiner ahead needs at
# most JOIN_LEARN_ROUNDS to finish learning, then a few rounds for its tokens
# to spread (about log2(n)); four times the learning rounds is ample.
JOIN_TURN_STALL_ROUNDS = 4 * JOIN_LEARN_ROUNDS

JOINING = "joining"  # gossiping with a seed that answered, learning the ring
WAITING_FOR_SEEDS = "waiting_for_seeds"  # no saved ring, and no seed has answered


class JoinStep(enum.Enum):
    DONE = "done"  # the ring is known: take tokens and go NORMAL
    START_ALONE = "start_alone"  # nobody answered, but this node may start a new cluster
    WAIT = "wait"  # nobody answered: keep gossiping with the seeds, backing off
    LEARN = "learn"  # a seed answered (or may still): gossip another round
    WAIT_TURN = "wait_turn"  # the ring is known, but a joiner ahead takes its tokens first


def streaming_joiners(
    states: Mapping[str, HasStates], self_id: str, may_be_alive: Callable[[str], bool]
) -> frozenset[str]:
    """The other nodes that have taken tokens but are still joining (BOOT with
    TOKENS: streaming their ranges), are LEAVING (streaming theirs out), or
    are removing a dead node (REMOVING: streaming its ranges to their new
    owners), and may be alive.

    They are ahead of every new joiner whatever their node id: a node takes
    tokens only once no other node is streaming, so joins stay one at a
    time from token-taking until NORMAL (Cassandra's consistent range
    movement), and each joiner plans its streams against a settled ring.
    """
    return frozenset(
        node_id for node_id, state in states.items()
        if node_id != self_id and may_be_alive(node_id) and (
            (state.get(gs.STATUS) == gs.BOOT and state.get(gs.TOKENS))
            or state.get(gs.STATUS) == gs.LEAVING or state.get(gs.REMOVING))
    )


def joiners_ahead(
    states: Mapping[str, HasStates], self_id: str, may_be_alive: Callable[[str], bool]
) -> frozenset[str]:
    """The nodes that are joining without tokens yet, may be alive, and come
    before ``self_id`` in the joining order (node ids, sorted as strings).

    Nodes that start together would each allocate tokens against the same
    ring and pick near-identical ones; so they take turns, in this order, and
    each allocates against a ring that holds the tokens of those before it.
    ``may_be_alive`` is gossip's: a node heard of a moment ago counts (it is
    not UP yet, but may well be joining too); one the failure detector has
    convicted does not hold anyone up.
    """
    return frozenset(
        node_id for node_id, state in states.items()
        if node_id < self_id and state.get(gs.STATUS) == gs.BOOT
        and not state.get(gs.TOKENS) and may_be_alive(node_id)
    )


class JoinPlanner:
    """How a new node (no saved ring) learns the ring before it takes tokens (pure).

    Each gossip round the node reports what it knows; ``step`` says what to
    do. For up to JOIN_LEARN_ROUNDS rounds it learns, until the ring holds
    every node heard of. If no other node has answered by then, it waits for
    one, doubling its retry interval up to SEED_RETRY_MAX_INTERVALS gossip
    intervals: without a saved ring and without an answer it would form a
    cluster of its own and acknowledge QUORUM writes held by one copy while
    the real cluster runs elsewhere (Cassandra refuses to start). It starts
    alone only if every seed is itself (under any of its names) or the
    operator asked for a new cluster. Once a seed answers, it learns the ring
    for up to JOIN_LEARN_ROUNDS more rounds.

    Once the ring is known, it waits its turn: while a node ahead of it
    (``joiners_ahead``) is still joining without tokens, it does not take
    tokens (Cassandra likewise has nodes join one at a time). The first
    joiner in the order waits for nobody, so someone always goes; each goes
    once the tokens of those before it reach it, so each allocates knowing
    them. A joiner that goes DOWN stops holding others up, and if the
    joiners ahead stay the same for JOIN_TURN_STALL_ROUNDS rounds (the first
    of them is stuck), the first is passed over for good.
    """

    def __init__(self, *, bootstrap_new_cluster: bool) -> None:
        self.bootstrap_new_cluster = bootstrap_new_cluster
        self.rounds = 0
        self.learn_until = JOIN_LEARN_ROUNDS
        self.state = JOINING  # or WAITING_FOR_SEEDS
        self.delay_intervals = 1  # the next wait, in gossip intervals
        self.ahead: frozenset[str] = frozenset()  # the joiners ahead when last asked
        self.ahead_since = 0  # the round at which they became those
        self.passed_over: set[str] = set()  # stuck joiners no longer waited for

    def step(self, *, known_peers: int, ring_size: int, only_seed_is_self: bool,
             joiners_ahead: Collection[str] = (),
             streaming: Collection[str] = ()) -> JoinStep:
        """One decision; after LEARN, WAIT or WAIT_TURN the caller gossips and
        waits ``delay_intervals`` gossip intervals, then calls ``step`` again.

        ``streaming``: joiners that hold tokens and still stream
        (``streaming_joiners``); they are waited for as long as they may be
        alive, however long streaming takes, and never passed over."""
        if streaming:
            self.ahead, self.ahead_since = frozenset(streaming), self.rounds
            self.state, self.delay_intervals = JOINING, 1
            self.rounds += 1
            return JoinStep.WAIT_TURN
        if ring_size and ring_size >= known_peers:
            return self._turn(joiners_ahead)  # we know a ring, and every node heard of is on it
        if known_peers == 0 and only_seed_is_self:
            return self._turn(joiners_ahead)  # we are the only seed: maybe the first node
        if known_peers == 0 and self.rounds >= JOIN_LEARN_ROUNDS:
            if self.bootstrap_new_cluster:
                return JoinStep.START_ALONE
            self.state = WAITING_FOR_SEEDS
            self.delay_intervals = min(2 * self.delay_intervals, SEED_RETRY_MAX_INTERVALS)
            self.rounds += 1
            return JoinStep.WAIT
        if known_peers > 0 and self.state == WAITING_FOR_SEEDS:
            self.state = JOINING  # a seed answered: learn the ring from it
            self.delay_intervals = 1
            self.learn_until = self.rounds + JOIN_LEARN_ROUNDS
        elif known_peers > 0 and self.rounds >= self.learn_until:
            return self._turn(joiners_ahead)
        self.rounds += 1
        return JoinStep.LEARN

    def _turn(self, joiners_ahead: Collection[str]) -> JoinStep:
        """DONE if no joiner ahead is still without tokens, else WAIT_TURN."""
        ahead = frozenset(joiners_ahead) - self.passed_over
        stalled = self.rounds - self.ahead_since >= JOIN_TURN_STALL_ROUNDS
        if ahead and ahead == self.ahead and stalled:
            self.passed_over.add(min(ahead))  # no progress: the first in line is stuck
            ahead -= self.passed_over
        if ahead != self.ahead:
            self.ahead, self.ahead_since = ahead, self.rounds
        if not ahead:
            return JoinStep.DONE
        self.state, self.delay_intervals = JOINING, 1
        self.rounds += 1
        return JoinStep.WAIT_TURN
