"""Typed internode messages for the replica verbs, and their msgpack-safe wire shapes.

A peer may send anything, so every ``from_wire`` validates the shape and
raises ``ProtocolError`` naming what is wrong; nothing else escapes. Cells
travel as their storage record (which carries a CRC), so a cell corrupted in
transit is caught exactly like one corrupted on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ringkv.errors import CorruptRecord, ProtocolError
from ringkv.versioning import Cell, decode_cell, encode_cell

# Replica verbs (gossip uses its own verbs, see ringkv.gossip).
WRITE = "replica.write"
READ = "replica.read"
DIGEST = "replica.digest"
SCAN = "replica.scan"

MAX_NAME_BYTES = 255
TOKEN_MIN = -(2**63)
TOKEN_MAX = 2**63 - 1


def cell_to_wire(cell: Cell | None) -> bytes | None:
    return None if cell is None else encode_cell(cell)


def cell_from_wire(data: Any) -> Cell | None:
    if data is None:
        return None
    if not isinstance(data, bytes):
        raise ProtocolError("cell must be bytes or nil")
    try:
        return decode_cell(data)
    except CorruptRecord as exc:
        raise ProtocolError(f"corrupt cell on the wire: {exc.message}") from None


def _field(obj: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, dict):
        raise ProtocolError("message body must be a map")
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ProtocolError(f"field {name!r} is missing or has the wrong type")
    return value


def _token(obj: Any, name: str) -> int:
    value = _field(obj, name, int)
    if not TOKEN_MIN <= value <= TOKEN_MAX:
        raise ProtocolError(f"field {name!r} is not a token")
    return value


def _keyspace(obj: Any) -> str:
    value = _field(obj, "ks", str)
    if not value or len(value.encode()) > MAX_NAME_BYTES:
        raise ProtocolError("field 'ks' is not a keyspace name")
    return value


class KeyRef(NamedTuple):
    """Which key a replica verb is about (a named tuple: one is built for every
    replica request, on both ends, and a frozen dataclass builds slowly)."""

    keyspace: str
    token: int
    key: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"ks": self.keyspace, "t": self.token, "k": self.key}

    @classmethod
    def from_wire(cls, obj: Any) -> KeyRef:
        if type(obj) is dict:
            # A well-formed reference, checked in one go (every replica request
            # passes here); anything else goes through the checks that name what
            # is wrong with it.
            keyspace, token, key = obj.get("ks"), obj.get("t"), obj.get("k")
            if (type(keyspace) is str and type(token) is int and type(key) is bytes
                    and keyspace and len(keyspace.encode()) <= MAX_NAME_BYTES
                    and TOKEN_MIN <= token <= TOKEN_MAX):
                return cls(keyspace, token, key)
        return cls(_keyspace(obj), _token(obj, "t"), _field(obj, "k", bytes))


@dataclass(frozen=True)
class ScanRequest:
    keyspace: str
    after_token: int
    after_key: bytes | None
    end_token: int
    limit: int

    def to_wire(self) -> dict[str, Any]:
        return {"ks": self.keyspace, "at": self.after_token, "ak": self.after_key,
                "end": self.end_token, "n": self.limit}

    @classmethod
    def from_wire(cls, obj: Any) -> ScanRequest:
        after_key = obj.get("ak") if isinstance(obj, dict) else None
        if after_key is not None and not isinstance(after_key, bytes):
            raise ProtocolError("field 'ak' must be bytes or nil")
        limit = _field(obj, "n", int)
        if limit < 1:
            raise ProtocolError("field 'n' must be positive")
        return cls(_keyspace(obj), _token(obj, "at"), after_key, _token(obj, "end"), limit)


@dataclass(frozen=True)
class ScanReply:
    """What a replica returns for one scan request, in (token, key) order.

    ``truncated``: the replica stopped early, at its item cap or its byte
    budget, so more cells may follow the last one in the requested range. A
    reply that is not truncated and shorter than asked covers the whole range.
    """

    items: list[tuple[int, bytes, Cell]]
    truncated: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"i": [[token, key, encode_cell(cell)] for token, key, cell in self.items],
                "more": self.truncated}

    @classmethod
    def from_wire(cls, obj: Any) -> ScanReply:
        raw_items = _field(obj, "i", list)
        truncated = _field(obj, "more", bool)
        out = []
        for item in raw_items:
            if not (isinstance(item, list) and len(item) == 3):
                raise ProtocolError("scan item must be [token, key, cell]")
            token, key, record = item
            if not isinstance(token, int) or not isinstance(key, bytes):
                raise ProtocolError("scan item has the wrong types")
            cell = cell_from_wire(record)
            if cell is None:
                raise ProtocolError("scan item has no cell")
            out.append((token, key, cell))
        if truncated and not out:
            raise ProtocolError("a truncated scan reply must hold at least one item")
        return cls(out, truncated)


# Anti-entropy repair verbs (repair/service.py): build a Merkle tree of a range,
# and pull the cells of some sub-ranges from the sender.
REPAIR_TREE = "repair.tree"
REPAIR_SYNC = "repair.sync"
REPAIR_PREFIX = "repair."
# A sync names at most one run per tree leaf (2**merkle.MAX_DEPTH).
MAX_SYNC_PIECES = 1 << 15


@dataclass(frozen=True)
class RepairTreeRequest:
    """Build the tree of ``token_range`` (part of the ring range ``ring_range``) at ``depth``."""

    keyspace: str
    token_range: tuple[int, int]
    ring_range: tuple[int, int]
    depth: int

    def to_wire(self) -> dict[str, Any]:
        return {"ks": self.keyspace, "s": self.token_range[0], "e": self.token_range[1],
                "rs": self.ring_range[0], "re": self.ring_range[1], "d": self.depth}

    @classmethod
    def from_wire(cls, obj: Any) -> RepairTreeRequest:
        depth = _field(obj, "d", int)
        if not 0 <= depth <= 15:
            raise ProtocolError("field 'd' is not a tree depth")
        return cls(_keyspace(obj), (_token(obj, "s"), _token(obj, "e")),
                   (_token(obj, "rs"), _token(obj, "re")), depth)


@dataclass(frozen=True)
class RepairSyncRequest:
    """Pull ``pieces`` of ``ring_range`` from the sender; then, given
    ``repaired_at_us``, record the ring range as repaired at that time (the
    sender's whole repair of it succeeded with every replica)."""

    keyspace: str
    ring_range: tuple[int, int]
    pieces: list[tuple[int, int]]
    repaired_at_us: int | None

    def to_wire(self) -> dict[str, Any]:
        return {"ks": self.keyspace, "rs": self.ring_range[0], "re": self.ring_range[1],
                "p": [[s, e] for s, e in self.pieces], "at": self.repaired_at_us}

    @classmethod
    def from_wire(cls, obj: Any) -> RepairSyncRequest:
        raw = _field(obj, "p", list)
        if len(raw) > MAX_SYNC_PIECES:
            raise ProtocolError(f"field 'p' has more than {MAX_SYNC_PIECES} pieces")
        pieces = []
        for piece in raw:
            if not (isinstance(piece, list) and len(piece) == 2):
                raise ProtocolError("a sync piece must be [start, end]")
            pieces.append((_token({"t": piece[0]}, "t"), _token({"t": piece[1]}, "t")))
        at = obj.get("at")
        if at is not None and (isinstance(at, bool) or not isinstance(at, int) or at < 0):
            raise ProtocolError("field 'at' must be a wall-clock time in µs or nil")
        return cls(_keyspace(obj), (_token(obj, "rs"), _token(obj, "re")), pieces, at)
