"""What the client's calls return: plain, immutable values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from ringkv.errors import RingKVError
from ringkv.hlc import Timestamp

# A key as the calls take it: text, or bytes that are UTF-8 (keys are text on the wire;
# results name keys as ``str``).
Key: TypeAlias = str | bytes


@dataclass(frozen=True)
class Record:
    """A stored value: what ``get_with_meta`` and ``scan`` return.

    ``timestamp`` is the write's hybrid-logical-clock timestamp;
    ``expires_at_us`` is set when the write had a TTL (on the clock of the node
    that took the write), and ``ttl_remaining_ms`` then says how long the key
    has left as the node that answered counts it (rounded up); ``receipt`` says
    how the read was served (replicas asked and answered, read repair) and is
    None for scan items.
    """

    key: str
    value: Any
    timestamp: Timestamp
    expires_at_us: int | None = None
    receipt: dict[str, Any] | None = None
    ttl_remaining_ms: int | None = None


@dataclass(frozen=True)
class WriteResult:
    """The outcome of a put or delete.

    ``replayed`` is True when the node recognised the idempotency key (or,
    on a transactional keyspace, the transaction id) of an earlier, already
    applied attempt and returned that attempt's result.

    On a transactional keyspace ``version`` is the commit timestamp (µs, the
    key's new version, also ``timestamp.wall_us``), ``txn_id`` the
    transaction's id, and the receipt names the leader, ``commit_ts``,
    ``epsilon_us`` and ``commit_wait_ms`` (empty on a replay).
    """

    timestamp: Timestamp
    receipt: dict[str, Any]
    replayed: bool = False
    version: int | None = None
    txn_id: str | None = None


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one operation in a batch (each succeeds or fails on its own).

    For a get, ``found`` says whether the key exists and ``value`` holds its
    value; ``error`` is the typed error of a failed operation (``ok`` False).
    """

    key: str
    ok: bool
    found: bool | None = None
    value: Any = None
    timestamp: Timestamp | None = None
    error: RingKVError | None = None


@dataclass(frozen=True)
class Page:
    """One page of a scan; pass ``next_page_token`` back to continue (None: the end)."""

    items: list[Record]
    next_page_token: str | None
    receipt: dict[str, Any] | None = None


@dataclass(frozen=True)
class NodeView:
    """One node as the client last saw the ring: its id, URL and liveness."""

    node_id: str
    url: str | None
    up: bool


@dataclass(frozen=True)
class Versioned:
    """A key of a transactional keyspace as read: its value and ``version``
    (the commit timestamp of that value, µs). ``receipt``: the leader and
    ``read_ts`` of a strong read, or the replica, ``read_ts`` and ``safe_ts``
    of a snapshot read."""

    key: str
    value: Any
    version: int | None  # None: an interactive transaction's own write, not committed yet
    receipt: dict[str, Any] | None = None


@dataclass(frozen=True)
class TxnResult:
    """The outcome of a one-shot transaction that committed (or only read).

    ``reads`` maps each key read to what it held at the transaction's
    timestamp (None: absent). ``commit_ts`` is None for a read-only
    transaction. ``conflict_retries``: how many times the client retried it
    under the same id after a conflict abort. ``replayed``: the id had
    already committed (an earlier attempt's answer was lost); the node then
    returns no reads and no receipt.
    """

    id: str
    committed: bool
    commit_ts: int | None
    reads: dict[str, Versioned | None]
    receipt: dict[str, Any] | None
    conflict_retries: int = 0
    replayed: bool = False


@dataclass(frozen=True)
class TxnStatus:
    """What a range's leader knows of a transaction id: ``status`` is
    ``committed`` (with ``commit_ts``), ``pending``, or ``not_committed``
    (``definitive`` False when the leader may have forgotten older ids)."""

    id: str
    status: str
    commit_ts: int | None = None
    range: str | None = None
    definitive: bool = True


@dataclass(frozen=True)
class TxnHandle:
    """An interactive transaction as begun: its ``id``, the node that began it
    (``node_id``, ``url``: every call of the transaction goes there), and
    ``priority`` (µs; a rerun passes it to ``begin`` to keep its age under
    wound-wait). ``read_ts``: the snapshot of a read-only transaction."""

    id: str
    keyspace: str
    read_only: bool
    priority: int
    node_id: str
    url: str
    read_ts: int | None = None


@dataclass(frozen=True)
class TxnCommit:
    """An interactive transaction that committed: ``commit_ts`` (µs; None when it wrote
    nothing), or ``read_ts`` for a read-only one; ``receipt`` names its coordinator
    range and the ranges it touched."""

    id: str
    committed: bool
    commit_ts: int | None
    read_ts: int | None = None
    receipt: dict[str, Any] | None = None
