"""What a node snapshot is, and whether a node may be restored from one (pure).

A snapshot (``ringkv snapshot create``) is a point-in-time copy of one node's
eventual tier, kept under ``<node data dir>/snapshots/NAME``: a LevelDB of
the records below, and ``manifest.json`` saying whose it is, when it was
taken (the node's one clock) and what it holds. The manifest is written last,
so a directory without one is not a snapshot.

Which records are copied is decided here, by key prefix, and it is an
allow-list. The eventual tier's records restore as they are: cells are
last-write-wins with their own timestamps, and repair, read repair and hints
bring an old copy up to date. The transactional tier's records never leave
the node this way: they include Paxos acceptor state (promised ballots,
accepted values), and an acceptor brought back to an older state forgets
promises and votes it made since, which can let two different values be
chosen for one slot. The MVCC versions and 2PC records are only consistent
with that log, so they stay out with it; a new member of a group is caught
up by the group itself (snapshot catch-up, then the log).

For the same reason ``restore_refusal`` lets a node come back from a
snapshot under its own identity only when it can never have been a Paxos
voter (no transactional keyspace, and none in the snapshot). A node of a
cluster with transactional keyspaces comes back under a new node id that
replaces the old one (``--replace``): its groups then add it as a learner,
catch it up, and remove the old id, one member at a time, through their logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ringkv.config import TRANSACTIONAL
from ringkv.errors import BadRequest, ConfigError

FORMAT = 1
MANIFEST_FILE = "manifest.json"
LEVELDB_DIR = "leveldb"  # the copy, a LevelDB of its own
PEERS_FILE = "peers.json"  # the ring as the node last saw it, so a restore does not start alone
SNAPSHOTS_DIR = "snapshots"  # under the node's data directory
PARTIAL_SUFFIX = ".partial"  # a snapshot being written (or one a crash cut short)

# A name is one path component: letters, digits, '_', '.', '-', starting with a
# letter or digit (so never '.', '..' or hidden), at most MAX_NAME_LENGTH long.
MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

# The eventual tier's records: copied and restored as they are.
EVENTUAL_PREFIXES: dict[bytes, str] = {
    b"d": "cells (storage/keys.py)",
    b"w": "the newest cell timestamp, which must match the cells (storage/keys.py)",
    b"h": "hints for other replicas (repair/hints.py)",
    b"a": "when each range was last repaired (repair/history.py)",
}
# The transactional tier's records: never copied (see the module docstring).
TRANSACTIONAL_PREFIXES: dict[bytes, str] = {
    b"p": "Paxos acceptor state and log (txn/paxos_log.py)",
    b"r": "Paxos group membership records (txn/service.py)",
    b"x": "transaction outcomes (txn/service.py)",
    b"y": "two-phase commit records (txn/twopc_records.py)",
    b"m": "MVCC versions (txn/mvcc_keys.py)",
    b"g": "MVCC GC thresholds (txn/mvcc_keys.py)",
}
GROUP_RECORD_PREFIX = b"r"  # one per Paxos group this node is (or was) a member of
# Engine scan bounds of the copied prefixes, in key order: one scan each.
COPIED_RANGES: tuple[tuple[bytes, bytes], ...] = tuple(
    (prefix, bytes([prefix[0] + 1])) for prefix in sorted(EVENTUAL_PREFIXES)
)
DATA_PREFIX = b"d"  # cells: what the manifest's ``keys`` counts


def check_name(name: object) -> str:
    """A snapshot name from untrusted input, or ``BadRequest`` naming the field ``name``."""
    if not isinstance(name, str):
        raise BadRequest("name must be a string", field="name")
    if not 0 < len(name) <= MAX_NAME_LENGTH:
        raise BadRequest(f"name must be 1 to {MAX_NAME_LENGTH} characters, got {len(name)}",
                         field="name")
    if not _NAME.fullmatch(name):
        raise BadRequest("name may hold only letters, digits, '_', '.' and '-', and must start "
                         "with a letter or digit (it is a directory name: no path separators)",
                         field="name")
    return name


def default_name(wall_us: int) -> str:
    """The name of a snapshot taken at ``wall_us`` when none is given (UTC, sortable)."""
    return "snapshot-" + _utc(wall_us).strftime("%Y%m%dT%H%M%SZ")


def _utc(wall_us: int) -> datetime:
    return datetime.fromtimestamp(wall_us / 1_000_000, tz=timezone.utc)


def copied(key: bytes) -> bool:
    """Whether a snapshot copies the record under ``key``."""
    return key[:1] in EVENTUAL_PREFIXES


@dataclass(frozen=True)
class Manifest:
    name: str
    node_id: str
    cluster: str
    created_us: int  # the node's wall clock when the copy's point in time was taken
    keys: int  # cells (tombstones included) in the copy
    records: int  # every record copied (cells, hints, repair history, the newest timestamp)
    size_bytes: int  # the copy on disk
    tokens: tuple[int, ...]  # the node's tokens then (its identity on the ring)
    dc: str
    rack: str
    # Keyspace name -> {"tier", "replication_factor"}: the node's config essentials.
    keyspaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    txn_groups: int = 0  # Paxos groups the node was a member of (their state is not copied)

    @property
    def created(self) -> str:
        return _utc(self.created_us).isoformat().replace("+00:00", "Z")

    @property
    def transactional_keyspaces(self) -> list[str]:
        return sorted(name for name, ks in self.keyspaces.items()
                      if ks.get("tier") == TRANSACTIONAL)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "name": self.name, "node_id": self.node_id,
            "cluster": self.cluster, "created": self.created, "created_us": self.created_us,
            "keys": self.keys, "records": self.records, "size_bytes": self.size_bytes,
            "tokens": [str(t) for t in self.tokens],  # strings: 64-bit ints lose bits in JSON clients
            "dc": self.dc, "rack": self.rack, "keyspaces": self.keyspaces,
            "txn_groups": self.txn_groups, "tiers": ["eventual"],
            "excluded": sorted(p.decode() for p in TRANSACTIONAL_PREFIXES),
        }

    def summary(self) -> dict[str, Any]:
        """What ``list`` shows of it."""
        return {"name": self.name, "node_id": self.node_id, "created": self.created,
                "created_us": self.created_us, "keys": self.keys,
                "size_bytes": self.size_bytes}

    @staticmethod
    def from_json(doc: Any, source: str) -> Manifest:
        """A manifest read back, or ``ConfigError`` naming the field that is wrong."""
        def fail(name: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: snapshot manifest field {name!r} {why}",
                               field=f"manifest.{name}", source=source)

        if not isinstance(doc, dict):
            raise fail("format", "is missing: the manifest is not a JSON object")
        if doc.get("format") != FORMAT:
            raise fail("format", f"must be {FORMAT}, got {doc.get('format')!r}")

        def text(name: str) -> str:
            value = doc.get(name)
            if not isinstance(value, str) or not value:
                raise fail(name, "must be a non-empty string")
            return value

        def count(name: str) -> int:
            value = doc.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise fail(name, "must be a non-negative integer")
            return value

        tokens = doc.get("tokens")
        if not isinstance(tokens, list) or not tokens:
            raise fail("tokens", "must be a non-empty list")
        try:
            parsed = tuple(int(t) for t in tokens)
        except (TypeError, ValueError):
            raise fail("tokens", "must hold integers") from None
        keyspaces = doc.get("keyspaces")
        if not isinstance(keyspaces, dict) or not all(
                isinstance(ks, dict) for ks in keyspaces.values()):
            raise fail("keyspaces", "must map names to settings")
        try:
            check_name(doc.get("name"))
        except BadRequest as exc:
            raise fail("name", f"is not a snapshot name: {exc.message}") from None
        return Manifest(
            name=text("name"), node_id=text("node_id"), cluster=text("cluster"),
            created_us=count("created_us"), keys=count("keys"), records=count("records"),
            size_bytes=count("size_bytes"), tokens=parsed, dc=text("dc"), rack=text("rack"),
            keyspaces=keyspaces, txn_groups=count("txn_groups"),
        )


def restore_refusal(
    manifest: Manifest, *, cluster: str, node_id: str, replace_node_id: str | None,
    transactional_keyspaces: list[str], now_us: int, gc_grace_s: int,
) -> ConfigError | None:
    """Why the node ``node_id`` (configured with ``transactional_keyspaces``) may not be
    restored from ``manifest`` at ``now_us``, or None when it may. ``replace_node_id``:
    the node comes back under a new id in place of that dead one (``--replace``).

    A snapshot older than ``gc_grace_s`` is refused as Cassandra advises against
    it: the other replicas may have purged the tombstones of deletes made since,
    and repair would then spread the deleted cells back from this copy."""
    if manifest.cluster != cluster:
        return ConfigError(
            f"snapshot {manifest.name!r} belongs to cluster {manifest.cluster!r}, not "
            f"{cluster!r}", field="cluster.name")
    age_s = (now_us - manifest.created_us) / 1_000_000
    if age_s > gc_grace_s:
        return ConfigError(
            f"snapshot {manifest.name!r} is {age_s:.0f} s old, older than timing.gc_grace_s "
            f"({gc_grace_s} s): tombstones of deletes made since may be purged on the other "
            "replicas, and repair would bring the deleted data back from it",
            field="timing.gc_grace_s")
    if replace_node_id:
        if manifest.node_id != replace_node_id:
            return ConfigError(
                f"snapshot {manifest.name!r} is node {manifest.node_id!r}'s, but this node "
                f"replaces {replace_node_id!r}", field="cluster.replace_node_id")
        return None  # a new identity: its groups add it as a learner and catch it up
    if manifest.node_id != node_id:
        return ConfigError(
            f"snapshot {manifest.name!r} is node {manifest.node_id!r}'s, not {node_id!r}: "
            f"restore it as {manifest.node_id!r}, or under a new id with --replace "
            f"{manifest.node_id}", field="cluster.node_id")
    voter_of = sorted(set(transactional_keyspaces) | set(manifest.transactional_keyspaces))
    if voter_of or manifest.txn_groups:
        what = (f"transactional keyspaces {', '.join(voter_of)}" if voter_of
                else f"{manifest.txn_groups} Paxos groups")
        return ConfigError(
            f"node {node_id!r} may be a Paxos voter ({what}): restored under its own "
            "identity it would vote without the promises and accepts it made since the "
            "snapshot, which can let two values be chosen for one slot. Snapshots never "
            f"hold Paxos state; restore it under a new node id with --replace {node_id} "
            "(stop this one first): the groups add the new id as a learner, catch it up and "
            "then remove the old one", field="restore")
    return None
