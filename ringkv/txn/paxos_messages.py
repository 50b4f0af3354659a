"""Paxos messages on the wire, coalesced per destination, and the log's commit value (pure).

Every message of ``txn/paxos.py`` has a msgpack-able wire shape, a list::

    [tag, field, field, ...]        (the sender is not in it: see below)

with a stable integer tag per type and the fields in the order of the
``_SCHEMAS`` table. Ballots are ``[round, node_id]``, entries
``[value, ts_us, noop]``, snapshots ``[handle, last_slot, max_ts_us]``;
a configuration entry, and a snapshot, append ``[member, ...]`` (the
group's members from then on), and the 3-element forms still decode.

**Coalescing** (CockroachDB's coalesced heartbeats). A node runs many
groups, and two nodes share most of them; every heartbeat, lease renewal and
acknowledgement between the two travels in one internode message per flush,
a *batch*::

    [BATCH_FORMAT, sender, [[group_id, message], ...]]

The sender is named once, by the envelope, never by a message: a batch's
messages all come from its sender (the receiver may also check that against
the connection's peer), so a peer cannot speak for a third node, and a
heartbeat costs its ballot, commit point and send time, about 20 bytes.
``Outbox`` collects what a node's groups send in one loop turn and hands
back one batch per destination, cut at a byte budget so no batch outgrows a
frame.

**Trust.** A peer may send anything. ``decode_message`` and ``decode_batch``
validate every field (type, range, enum) and raise ``ProtocolError`` naming
it, e.g. ``Accept.entries[2][1].ts_us``; nothing else escapes. A float that
is not finite is refused: a NaN send time would poison the lease arithmetic.
In a batch, one bad item is reported and the others are kept, so a peer
with one message type the receiver does not know still keeps its groups'
leases alive.

**The commit value.** ``Entry.value`` is opaque to Paxos; for the
transactional tier it is a ``CommitValue``: the transaction id, its commit
timestamp (equal to the entry's ``ts_us``) and its writes, each a key and a
value or ``None`` for a tombstone, packed with msgpack.

**Snapshot transfer.** A replica behind the compaction point fetches the
group's MVCC state at the snapshot in pages: ``SnapshotRequest`` and
``SnapshotPage`` are those request and answer shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from ringkv.errors import ProtocolError
from ringkv.limits import MAX_FRAME_BYTES, MAX_KEY_BYTES, MAX_VALUE_BYTES
from ringkv.txn.paxos import (
    Accept,
    Accepted,
    AcceptedSlot,
    Ballot,
    CatchUp,
    Commit,
    Entry,
    Heartbeat,
    HeartbeatAck,
    InstallSnapshot,
    Learn,
    Message,
    Prepare,
    Promise,
    Reject,
    Snapshot,
)

__all__ = [
    "BATCH_FORMAT", "MAX_NODE_ID_BYTES", "MAX_GROUP_ID_BYTES", "MAX_HANDLE_BYTES", "MAX_TXN_ID_BYTES",
    "MAX_INT", "REJECT_REASONS", "TAGS", "CommitValue", "Batch", "Outbox", "SnapshotRequest",
    "SnapshotPage", "encode_ballot", "decode_ballot", "encode_entry", "decode_entry",
    "encode_snapshot", "decode_snapshot", "encode_message", "decode_message", "encode_batch",
    "decode_batch", "estimate_bytes", "encode_commit_value", "decode_commit_value",
]

BATCH_FORMAT = 1
MAX_NODE_ID_BYTES = 255
MAX_GROUP_ID_BYTES = 512  # "keyspace/end token": 255 + 1 + 20 bytes, with room
MAX_HANDLE_BYTES = 512
MAX_TXN_ID_BYTES = 128
MAX_INT = 2**63 - 1  # slots, rounds and timestamps
MAX_MEMBERS = 64  # nodes in one group's configuration (RF is far below)
REJECT_REASONS = frozenset({"ballot", "lease", "restart", "snapshot"})
COMMIT_FORMAT = 1  # the first element of a packed CommitValue
MAX_SNAPSHOT_PAGE_ITEMS = 10_000

# Bytes a batch may reach before ``Outbox`` starts another (half a frame: the
# estimate is an estimate), and what an item costs beyond its values.
BATCH_BUDGET_BYTES = MAX_FRAME_BYTES // 2
ITEM_OVERHEAD_BYTES = 96


def _fail(where: str, what: str) -> ProtocolError:
    return ProtocolError(f"{where} {what}", field=where)


# --- field kinds: each is (encode, decode(raw, where)) ---------------------------------


def _int(raw: Any, where: str, low: int = 0, high: int = MAX_INT) -> int:
    # type(...) is int: msgpack booleans must not pass as integers.
    if type(raw) is not int or not low <= raw <= high:
        raise _fail(where, f"is not an integer in [{low}, {high}]")
    return raw


def _float(raw: Any, where: str, *, non_negative: bool = False) -> float:
    if type(raw) is int:
        raw = float(raw)
    if type(raw) is not float or not math.isfinite(raw) or (non_negative and raw < 0):
        raise _fail(where, "is not a finite number" + (" >= 0" if non_negative else ""))
    return raw


def _bool(raw: Any, where: str) -> bool:
    if type(raw) is not bool:
        raise _fail(where, "is not a boolean")
    return raw


def _str(raw: Any, where: str, max_bytes: int, *, empty: bool = False) -> str:
    if type(raw) is not str or (not raw and not empty) or len(raw) > max_bytes:
        raise _fail(where, f"is not a string of 1..{max_bytes} bytes")
    if len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise _fail(where, f"is longer than {max_bytes} bytes")
    return raw


def _node(raw: Any, where: str) -> str:
    return _str(raw, where, MAX_NODE_ID_BYTES)


def _list(raw: Any, where: str, length: int | None = None) -> list[Any]:
    if type(raw) is not list:
        raise _fail(where, "is not a list")
    if length is not None and len(raw) != length:
        raise _fail(where, f"has {len(raw)} elements, not {length}")
    return raw


def encode_ballot(ballot: Ballot) -> list[Any]:
    return [ballot.round, ballot.node_id]


def decode_ballot(raw: Any, where: str = "ballot") -> Ballot:
    round_, node = _list(raw, where, 2)
    round_ = _int(round_, f"{where}.round")
    if round_ == 0 and node == "":
        return Ballot(0, "")  # ZERO_BALLOT: "promised nothing yet"
    return Ballot(round_, _node(node, f"{where}.node_id"))


def _encode_members(members: tuple[str, ...] | None) -> list[Any]:
    return [] if members is None else [list(members)]


def _decode_members(raw: list[Any], where: str) -> tuple[str, ...] | None:
    """The optional trailing configuration: absent in records written before it existed."""
    if not raw:
        return None
    nodes = _list(raw[0], where)
    if not 1 <= len(nodes) <= MAX_MEMBERS:
        raise _fail(where, f"has {len(nodes)} members, not 1..{MAX_MEMBERS}")
    members = tuple(_node(node, f"{where}[{i}]") for i, node in enumerate(nodes))
    if len(set(members)) != len(members):
        raise _fail(where, "names a member twice")
    return tuple(sorted(members))


def _list_of(raw: Any, where: str, lengths: tuple[int, int]) -> list[Any]:
    items = _list(raw, where)
    if len(items) not in lengths:
        raise _fail(where, f"has {len(items)} elements, not {' or '.join(map(str, lengths))}")
    return items


def encode_entry(entry: Entry) -> list[Any]:
    return [entry.value, entry.ts_us, entry.noop, *_encode_members(entry.members)]


def decode_entry(raw: Any, where: str = "entry") -> Entry:
    items = _list_of(raw, where, (3, 4))
    value, ts_us, noop = items[:3]
    if type(value) is not bytes:
        raise _fail(f"{where}.value", "is not bytes")
    members = _decode_members(items[3:], f"{where}.members")
    return Entry(value, _int(ts_us, f"{where}.ts_us"), _bool(noop, f"{where}.noop"), members)


def encode_snapshot(snapshot: Snapshot) -> list[Any]:
    return [snapshot.handle, snapshot.last_slot, snapshot.max_ts_us, *_encode_members(snapshot.members)]


def decode_snapshot(raw: Any, where: str = "snapshot") -> Snapshot:
    items = _list_of(raw, where, (3, 4))
    handle, last_slot, max_ts_us = items[:3]
    return Snapshot(
        _str(handle, f"{where}.handle", MAX_HANDLE_BYTES),
        _int(last_slot, f"{where}.last_slot", 1),
        _int(max_ts_us, f"{where}.max_ts_us"),
        _decode_members(items[3:], f"{where}.members"),
    )


def _encode_slot_entries(items: tuple[tuple[int, Entry], ...]) -> list[Any]:
    return [[slot, encode_entry(entry)] for slot, entry in items]


def _decode_slot_entries(raw: Any, where: str) -> tuple[tuple[int, Entry], ...]:
    out = []
    for i, item in enumerate(_list(raw, where)):
        here = f"{where}[{i}]"
        slot, entry = _list(item, here, 2)
        out.append((_int(slot, f"{here}.slot", 1), decode_entry(entry, f"{here}.entry")))
    return tuple(out)


def _encode_accepted_slots(items: tuple[AcceptedSlot, ...]) -> list[Any]:
    return [[a.slot, encode_ballot(a.ballot), encode_entry(a.entry)] for a in items]


def _decode_accepted_slots(raw: Any, where: str) -> tuple[AcceptedSlot, ...]:
    out = []
    for i, item in enumerate(_list(raw, where)):
        here = f"{where}[{i}]"
        slot, ballot, entry = _list(item, here, 3)
        out.append(AcceptedSlot(
            _int(slot, f"{here}.slot", 1), decode_ballot(ballot, f"{here}.ballot"),
            decode_entry(entry, f"{here}.entry"),
        ))
    return tuple(out)


def _decode_slots(raw: Any, where: str) -> tuple[int, ...]:
    return tuple(_int(slot, f"{where}[{i}]", 1) for i, slot in enumerate(_list(raw, where)))


def _reason(raw: Any, where: str) -> str:
    if type(raw) is not str or raw not in REJECT_REASONS:
        raise _fail(where, f"is not one of {sorted(REJECT_REASONS)}")
    return str(raw)


def _same(value: Any) -> Any:
    return value


Kind = tuple[Callable[[Any], Any], Callable[[Any, str], Any]]
BALLOT: Kind = (encode_ballot, decode_ballot)
SLOT: Kind = (_same, lambda raw, where: _int(raw, where, 1))
SLOT_OR_ZERO: Kind = (_same, _int)  # a commit point: 0 before anything is chosen
TIME_S: Kind = (_same, _float)
DELAY_S: Kind = (_same, lambda raw, where: _float(raw, where, non_negative=True))
BOOL: Kind = (_same, _bool)
REASON: Kind = (_same, _reason)
SNAPSHOT: Kind = (encode_snapshot, decode_snapshot)
SLOT_ENTRIES: Kind = (_encode_slot_entries, _decode_slot_entries)
ACCEPTED_SLOTS: Kind = (_encode_accepted_slots, _decode_accepted_slots)
SLOTS: Kind = (list, _decode_slots)

# type -> (tag, fields after the sender). Tags are the wire's: never reuse one.
_SCHEMAS: dict[type, tuple[int, tuple[tuple[str, Kind], ...]]] = {
    Prepare: (1, (("ballot", BALLOT), ("from_slot", SLOT), ("sent_s", TIME_S))),
    Promise: (2, (("ballot", BALLOT), ("accepted", ACCEPTED_SLOTS), ("sent_s", TIME_S))),
    Accept: (3, (("ballot", BALLOT), ("entries", SLOT_ENTRIES), ("commit_through", SLOT_OR_ZERO))),
    Accepted: (4, (("ballot", BALLOT), ("slots", SLOTS))),
    Reject: (5, (("ballot", BALLOT), ("promised", BALLOT), ("reason", REASON),
                 ("retry_after_s", DELAY_S))),
    Heartbeat: (6, (("ballot", BALLOT), ("commit_through", SLOT_OR_ZERO), ("sent_s", TIME_S))),
    HeartbeatAck: (7, (("ballot", BALLOT), ("sent_s", TIME_S), ("commit_through", SLOT_OR_ZERO),
                       ("granted", BOOL))),
    Commit: (8, (("ballot", BALLOT), ("commit_through", SLOT_OR_ZERO))),
    CatchUp: (9, (("from_slot", SLOT),)),
    Learn: (10, (("entries", SLOT_ENTRIES),)),
    InstallSnapshot: (11, (("ballot", BALLOT), ("snapshot", SNAPSHOT))),
}
TAGS: dict[int, type] = {tag: cls for cls, (tag, _) in _SCHEMAS.items()}
if len(TAGS) != len(_SCHEMAS):
    raise AssertionError("two message types share a wire tag")


def encode_message(msg: Message) -> list[Any]:
    """The wire shape of ``msg``, without its sender (the envelope names it)."""
    tag, fields = _SCHEMAS[type(msg)]
    return [tag, *[kind[0](getattr(msg, name)) for name, kind in fields]]


def decode_message(raw: Any, sender: str) -> Message:
    """The message ``sender`` sent as ``raw``; ``ProtocolError`` naming the bad field."""
    if type(raw) is not list or not raw:
        raise _fail("message", "is not a non-empty list")
    tag = raw[0]
    cls = TAGS.get(tag) if type(tag) is int else None
    if cls is None:
        raise _fail("message.tag", f"{str(tag)[:20]!r} is not a known message type")
    _, fields = _SCHEMAS[cls]
    if len(raw) != len(fields) + 1:
        raise _fail(cls.__name__, f"has {len(raw) - 1} fields, not {len(fields)}")
    values = {
        name: kind[1](item, f"{cls.__name__}.{name}") for (name, kind), item in zip(fields, raw[1:])
    }
    message: Message = cls(sender=sender, **values)
    return message


# --- batches: every message of every group for one destination ----------------------------


@dataclass(frozen=True)
class Batch:
    """A decoded batch: its sender, its well-formed items, and what was wrong with the rest."""

    sender: str
    items: list[tuple[str, Message]]
    errors: list[ProtocolError]


def encode_batch(sender: str, items: Iterable[tuple[str, Message]]) -> list[Any]:
    return [BATCH_FORMAT, sender, [[group_id, encode_message(msg)] for group_id, msg in items]]


def decode_batch(raw: Any, *, expect_sender: str | None = None) -> Batch:
    """A batch; a bad envelope raises ``ProtocolError``, a bad item is kept in ``errors``."""
    fmt, sender, items = _list(raw, "batch", 3)
    if type(fmt) is not int or fmt != BATCH_FORMAT:
        raise _fail("batch.format", f"{str(fmt)[:20]!r} is not {BATCH_FORMAT}")
    sender = _node(sender, "batch.sender")
    if expect_sender is not None and sender != expect_sender:
        raise _fail("batch.sender", f"{sender!r} is not the connection's peer {expect_sender!r}")
    good: list[tuple[str, Message]] = []
    errors: list[ProtocolError] = []
    for i, item in enumerate(_list(items, "batch.items")):
        try:
            group_id, body = _list(item, f"batch.items[{i}]", 2)
            good.append((_str(group_id, f"batch.items[{i}].group_id", MAX_GROUP_ID_BYTES),
                         decode_message(body, sender)))
        except ProtocolError as exc:
            errors.append(exc)
    return Batch(sender, good, errors)


def estimate_bytes(msg: Message) -> int:
    """About how many bytes ``msg`` takes in a batch (values counted in full)."""
    size = ITEM_OVERHEAD_BYTES
    if isinstance(msg, (Accept, Learn)):
        size += sum(len(entry.value) + 32 for _, entry in msg.entries)
    elif isinstance(msg, Promise):
        size += sum(len(item.entry.value) + 48 for item in msg.accepted)
    elif isinstance(msg, Accepted):
        size += 10 * len(msg.slots)
    return size


class Outbox:
    """What a node's groups send during one loop turn, gathered per destination.

    ``add`` as the groups' ``send``; ``take`` once per turn returns, for
    each destination, the batches to send (one, unless the turn's messages
    to it outgrow ``budget_bytes``), in the order they were added.
    """

    def __init__(self, sender: str, *, budget_bytes: int = BATCH_BUDGET_BYTES) -> None:
        self.sender = sender
        self.budget_bytes = budget_bytes
        self._pending: dict[str, list[list[tuple[str, Message]]]] = {}
        self._sizes: dict[str, int] = {}
        self.messages = 0  # counters, for the figures: messages added, batches taken
        self.batches = 0

    def add(self, to: str, group_id: str, msg: Message) -> None:
        size = estimate_bytes(msg)
        chunks = self._pending.setdefault(to, [[]])
        if chunks[-1] and self._sizes.get(to, 0) + size > self.budget_bytes:
            chunks.append([])
            self._sizes[to] = 0
        chunks[-1].append((group_id, msg))
        self._sizes[to] = self._sizes.get(to, 0) + size
        self.messages += 1

    def __bool__(self) -> bool:
        return bool(self._pending)

    def take(self) -> dict[str, list[list[Any]]]:
        """Destination -> encoded batches; the outbox is empty afterwards."""
        out = {to: [encode_batch(self.sender, chunk) for chunk in chunks]
               for to, chunks in self._pending.items()}
        self.batches += sum(len(batches) for batches in out.values())
        self._pending.clear()
        self._sizes.clear()
        return out


# --- the log's commit value -----------------------------------------------------------------


@dataclass(frozen=True)
class CommitValue:
    """One transaction's commit, as a log entry's value: its writes at ``commit_ts_us``.

    ``writes`` pairs a key with its new value, or ``None`` for a tombstone;
    keys are distinct.
    """

    txn_id: str
    commit_ts_us: int
    writes: tuple[tuple[bytes, bytes | None], ...]


def _check_writes(writes: Sequence[Any], where: str, *, wire: bool) -> tuple[tuple[bytes, bytes | None], ...]:
    out: list[tuple[bytes, bytes | None]] = []
    seen: set[bytes] = set()
    for i, item in enumerate(writes):
        here = f"{where}[{i}]"
        if wire or type(item) is not tuple or len(item) != 2:
            item = _list(item, here, 2)
        key, value = item
        if type(key) is not bytes or not 0 < len(key) <= MAX_KEY_BYTES:
            raise _fail(f"{here}.key", f"is not bytes of 1..{MAX_KEY_BYTES}")
        if key in seen:
            raise _fail(f"{here}.key", "repeats an earlier key")
        seen.add(key)
        if value is not None and (type(value) is not bytes or len(value) > MAX_VALUE_BYTES):
            raise _fail(f"{here}.value", f"is neither nil nor bytes of at most {MAX_VALUE_BYTES}")
        out.append((key, value))
    return tuple(out)


def encode_commit_value(value: CommitValue) -> bytes:
    """Pack a commit for ``Entry.value``; a malformed one raises ``ProtocolError``."""
    _str(value.txn_id, "commit.txn_id", MAX_TXN_ID_BYTES)
    _int(value.commit_ts_us, "commit.commit_ts_us")
    writes = _check_writes(value.writes, "commit.writes", wire=False)
    return bytes(msgpack.packb(
        [COMMIT_FORMAT, value.txn_id, value.commit_ts_us, [[k, v] for k, v in writes]],
        use_bin_type=True,
    ))


def decode_commit_value(data: bytes) -> CommitValue:
    """Unpack ``Entry.value``; anything malformed is a ``ProtocolError`` naming the field."""
    n = len(data)
    try:
        raw = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True, max_str_len=n,
                              max_bin_len=n, max_array_len=n, max_map_len=n // 2, max_ext_len=n)
    except Exception as exc:  # msgpack raises many types
        raise _fail("commit", f"is not msgpack: {type(exc).__name__}") from None
    fmt, txn_id, commit_ts_us, writes = _list(raw, "commit", 4)
    if type(fmt) is not int or fmt != COMMIT_FORMAT:
        raise _fail("commit.format", f"{str(fmt)[:20]!r} is not {COMMIT_FORMAT}")
    return CommitValue(
        _str(txn_id, "commit.txn_id", MAX_TXN_ID_BYTES),
        _int(commit_ts_us, "commit.commit_ts_us"),
        _check_writes(_list(writes, "commit.writes"), "commit.writes", wire=True),
    )


# --- snapshot transfer ------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotRequest:
    """Ask a member for the group's MVCC state at ``snapshot``: engine records after ``after``."""

    group_id: str
    snapshot: Snapshot
    after: bytes | None
    limit: int

    def to_wire(self) -> list[Any]:
        return [self.group_id, encode_snapshot(self.snapshot), self.after, self.limit]

    @classmethod
    def from_wire(cls, raw: Any) -> SnapshotRequest:
        group_id, snapshot, after, limit = _list(raw, "snapshot_request", 4)
        if after is not None and type(after) is not bytes:
            raise _fail("snapshot_request.after", "is neither nil nor bytes")
        return cls(
            _str(group_id, "snapshot_request.group_id", MAX_GROUP_ID_BYTES),
            decode_snapshot(snapshot, "snapshot_request.snapshot"),
            after,
            _int(limit, "snapshot_request.limit", 1, MAX_SNAPSHOT_PAGE_ITEMS),
        )


@dataclass(frozen=True)
class SnapshotPage:
    """MVCC version records (engine key, record) in key order. ``resume_after``:
    ask again after this key (it may lie past the last item: records newer than
    the snapshot are skipped, not sent); None when the group is done.
    ``gc_threshold_us``: the sender's GC threshold for the keyspace, which the
    receiver adopts (older history may be thinned)."""

    items: tuple[tuple[bytes, bytes], ...]
    resume_after: bytes | None
    gc_threshold_us: int

    def to_wire(self) -> list[Any]:
        return [[[k, v] for k, v in self.items], self.resume_after, self.gc_threshold_us]

    @classmethod
    def from_wire(cls, raw: Any) -> SnapshotPage:
        items, resume_after, threshold = _list(raw, "snapshot_page", 3)
        out = []
        for i, item in enumerate(_list(items, "snapshot_page.items")):
            key, record = _list(item, f"snapshot_page.items[{i}]", 2)
            if type(key) is not bytes or type(record) is not bytes:
                raise _fail(f"snapshot_page.items[{i}]", "is not [bytes, bytes]")
            out.append((key, record))
        if resume_after is not None and type(resume_after) is not bytes:
            raise _fail("snapshot_page.resume_after", "is neither nil nor bytes")
        return cls(tuple(out), resume_after, _int(threshold, "snapshot_page.gc_threshold_us"))
