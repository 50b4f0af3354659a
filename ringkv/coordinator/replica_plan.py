"""Replica plans: decided once per request, before anything is sent (pure).

Like Cassandra's ``ReplicaPlan``: the natural replicas of a key come from the
ring, the live ones from the failure detector, and the consistency level sets
how many must answer. If too few are alive the request fails as Unavailable
before a single message goes out, so a client never sees a partial write that
was doomed from the start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ringkv.errors import Unavailable
from ringkv.quorum import ConsistencyLevel, block_for
from ringkv.ring import TokenRing
from ringkv.topology.pending import pending_replicas


class ReplicaPlan(NamedTuple):
    """Made for every request: a named tuple, immutable and quicker to build than
    a frozen dataclass (whose __init__ makes a setattr call per field)."""

    keyspace: str
    token: int
    consistency: ConsistencyLevel
    natural: tuple[str, ...]  # every replica of the key, in ring order
    live: tuple[str, ...]  # the replicas to send to (natural, then pending) believed up
    down: tuple[str, ...]
    block_for: int
    ring: TokenRing  # the ring the plan was made on
    # Writes only: replicas joining the key's range (topology.pending); they
    # are in live/down too, and each adds one to block_for.
    pending: tuple[str, ...] = ()


def plan_for(
    ring: TokenRing,
    keyspace: str,
    token: int,
    replication_factor: int,
    consistency: ConsistencyLevel,
    is_alive: Callable[[str], bool],
    *,
    write: bool,
    future: TokenRing | None = None,
) -> ReplicaPlan:
    """Decide who is asked and how many must answer, or raise Unavailable.

    A ring with fewer nodes than the replication factor (a one-node dev
    cluster, say) has fewer natural replicas; the consistency level is then
    measured against the replicas that exist, as Riak does with n_val on a
    small cluster. Down nodes still count as replicas, so losing a node never
    silently weakens a quorum.

    ``future`` is the ring once the joins in progress finish: a write also
    goes to the key's pending replicas on it, and waits for one more
    acknowledgement per pending replica (Cassandra's blockFor + pending),
    while the consistency level is still reckoned on the natural replicas.
    Reads never ask pending replicas.
    """
    natural = ring.replicas(token, replication_factor)
    pending = pending_replicas(natural, future, token, replication_factor) if write else ()
    targets = natural + pending if pending else natural
    # List comprehensions, not generators: these run for every request.
    live = tuple([node for node in targets if is_alive(node)])
    down = tuple([node for node in targets if node not in live])
    needed = block_for(consistency, len(natural))
    if pending and consistency is not ConsistencyLevel.ANY:
        needed += len(pending)
    enough = len(live) >= needed or (write and consistency is ConsistencyLevel.ANY)
    if not enough or needed > len(targets):
        raise Unavailable(
            f"consistency {consistency.value} needs {needed} live replicas of "
            f"{len(targets)} but {len(live)} are alive",
            consistency=consistency.value,
            required=needed,
            alive=len(live),
        )
    return ReplicaPlan(keyspace, token, consistency, natural, live, down, needed, ring, pending)
