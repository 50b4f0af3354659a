"""Keyspaces as the cluster serves them: their settings, how they are shown,
and the schema version gossip spreads so a mismatch is visible (pure)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ringkv.quorum import ConsistencyLevel


@dataclass(frozen=True)
class KeyspaceSettings:
    name: str
    replication_factor: int
    default_consistency: ConsistencyLevel
    ranges: int | None = None  # a transactional keyspace's fixed slices (txn/ranges.py)


def describe(keyspaces: Mapping[str, KeyspaceSettings]) -> dict[str, Any]:
    """The keyspaces as JSON, for status, the ring view and the schema version."""
    return {
        name: {"replication_factor": ks.replication_factor,
               "default_consistency": ks.default_consistency.value,
               **({"ranges": ks.ranges} if ks.ranges is not None else {})}
        for name, ks in keyspaces.items()
    }


def schema_version(keyspaces: Mapping[str, KeyspaceSettings]) -> str:
    """A short digest of the keyspace definitions (Cassandra's schema version)."""
    text = json.dumps(describe(keyspaces), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
