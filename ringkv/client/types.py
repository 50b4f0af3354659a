"""What the client's calls return: plain, immutable values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ringkv.errors import RingKVError
from ringkv.hlc import Timestamp


@dataclass(frozen=True)
class Record:
    """A stored value: what ``get_with_meta`` and ``scan`` return.

    ``timestamp`` is the write's hybrid-logical-clock timestamp;
    ``expires_at_us`` is set when the write had a TTL; ``receipt`` says how
    the read was served (replicas asked and answered, read repair) and is
    None for scan items.
    """

    key: str
    value: Any
    timestamp: Timestamp
    expires_at_us: int | None = None
    receipt: dict[str, Any] | None = None


@dataclass(frozen=True)
class WriteResult:
    """The outcome of a put or delete.

    ``replayed`` is True when the node recognised the idempotency key of an
    earlier, already applied attempt and returned that attempt's result.
    """

    timestamp: Timestamp
    receipt: dict[str, Any]
    replayed: bool = False


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
