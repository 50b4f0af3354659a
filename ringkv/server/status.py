"""What ``/v1/status`` and ``/v1/ring`` show: the cluster as one node sees it.

Views only: they read the node's ring, gossip state, storage and hint
counters, and render them (one row per node, like ``nodetool status``; the
ring with tokens and client addresses, for token-aware clients).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ringkv.gossip import state as gs
from ringkv.keyspaces import describe
from ringkv.net.native import GOSSIP_KEY as NATIVE_GOSSIP_KEY

if TYPE_CHECKING:
    from ringkv.node import Node


def cluster_status(node: Node) -> dict[str, Any]:
    """One row per node, like nodetool status."""
    ownership = node.ring.ownership(1) if len(node.ring) else {}
    rows = []
    if node.gossiper is None:
        rows.append(_row(node, node.node_id, "UP", gs.NORMAL, node.store.size_bytes(), None,
                         ownership))
    else:
        for row in node.gossiper.snapshot(node.clock.monotonic_s()):
            load = node.store.size_bytes() if row["local"] else row["load"]
            rows.append(_row(node, row["node_id"], row["state"], row["status"], load, row["phi"],
                             ownership))
    view = {
        "node_id": node.node_id,
        "cluster": node.config.cluster.name,
        # None once on the ring; else why not (e.g. waiting_for_seeds) and since when.
        "joining": node.join_status(),
        # Bootstrap streaming: ranges done/total, bytes, cells, rate, fallbacks.
        "streaming": node.streaming.view(node.clock.monotonic_s()),
        "nodes": rows,
        "keyspaces": describe(node.keyspaces),
        "storage": {"sync_mode": node.config.storage.commit_sync, **vars(node.store.stats)},
        "hints": vars(node.hints.stats),
    }
    # Anti-entropy repair: the scheduler, the run in progress, the last run,
    # and when each range this node replicates was last repaired.
    view["repair"] = node.repair.status()
    if node.txn.enabled:
        # TrueTime (ε, fenced or not and why), the Paxos groups here, their counters.
        view["transactional"] = node.txn.status_view()
    return view


def ring_view(node: Node) -> dict[str, Any]:
    ring = node.ring
    return {
        "partitioner": "murmur3",
        "nodes": [
            {
                "node_id": node_id,
                "client_address": client_address(node, node_id),
                "native_address": native_address(node, node_id),
                "tokens": list(ring.tokens_of(node_id)),
                "up": node.is_alive(node_id),
                # Placement is rack-aware once racks differ: clients need them to route.
                "dc": ring.info(node_id).dc,
                "rack": ring.info(node_id).rack,
            }
            for node_id in ring.node_ids
        ],
        "keyspaces": describe(node.keyspaces),
    }


def client_address(node: Node, node_id: str) -> str | None:
    if node_id == node.node_id or node.gossiper is None:
        return node.config.cluster.client_address
    state = node.gossiper.endpoint_states().get(node_id)
    return None if state is None else state.get(gs.CLIENT_ADDR)


def native_address(node: Node, node_id: str) -> str | None:
    """Where ``node_id``'s native protocol listens, if it has one and told us."""
    if node_id == node.node_id or node.gossiper is None:
        return node.native_address
    state = node.gossiper.endpoint_states().get(node_id)
    return None if state is None else state.get(NATIVE_GOSSIP_KEY)


def _row(
    node: Node, node_id: str, liveness: str, status: str | None, load: int | None,
    phi: float | None, ownership: Mapping[str, float],
) -> dict[str, Any]:
    in_ring = node_id in node.ring.node_ids
    info = node.ring.info(node_id) if in_ring else None
    return {
        "node_id": node_id,
        "address": client_address(node, node_id),
        "liveness": liveness,
        # BOOT is gossip's word; operators know it as JOINING (nodetool).
        "status": "JOINING" if status == gs.BOOT else (status or "UNKNOWN"),
        "load_bytes": load or 0,
        "tokens": len(node.ring.tokens_of(node_id)) if in_ring else 0,
        "owns": ownership.get(node_id, 0.0),
        "dc": info.dc if info else None,
        "rack": info.rack if info else None,
        "phi": None if phi is None else round(phi, 3),
    }
