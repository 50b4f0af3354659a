"""Two-phase commit's messages and log records on the wire (pure).

``txn/twopc.py`` speaks between Paxos groups (a message goes to a group and
its shell delivers it to that group's leader) and logs its records through
each group's Paxos log. Both have a msgpack-able shape in the style of
``txn/paxos_messages.py``: a message is ``[tag, field, ...]`` with a stable
tag per type; a record is packed to bytes (a Paxos ``Entry.value``) as
``[RECORD_FORMAT, tag, field, ...]``. A ``CommitValue``'s first element is
1, a 2PC record's is ``RECORD_FORMAT`` (2), so a group's apply path tells
the two apart by that element.

A peer may send anything: every field is validated (type, range, length,
distinctness) and a bad one raises ``ProtocolError`` naming it, e.g.
``CommitRequest.participants[1].writes[0].key``.

Messages (``S`` = sending group, ``C`` = coordinator group, ``P`` = participant):

* ``CommitRequest`` client → C: the transaction's writes per participant
  group, and whether the client ran operations (reads, locks) there first;
* ``PrepareRequest`` C → P: prepare these writes, report to ``coordinator``;
* ``Vote`` P → C: prepared at ``prepare_ts_us``, or refused;
* ``Decision`` C → P: the outcome (commit at ``commit_ts_us``, or abort);
* ``Ack`` P → C: the outcome is logged here;
* ``Inquiry`` P → C: cooperative termination, "what became of it?".

Records: ``BeginRecord`` and ``DecisionRecord`` (coordinator),
``PreparedRecord`` and ``OutcomeRecord`` (participant). Each carries what a
successor leader needs to finish the transaction without asking anyone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

# The Paxos wire's field checkers: one set of rules for every message of the tier.
from ringkv.txn.paxos_messages import (
    MAX_GROUP_ID_BYTES,
    MAX_TXN_ID_BYTES,
    _bool,
    _check_writes,
    _fail,
    _int,
    _list,
    _str,
)

__all__ = [
    "RECORD_FORMAT", "MAX_PARTICIPANTS", "Writes", "Priority", "Participant", "CommitRequest",
    "PrepareRequest", "Vote", "Decision", "Ack", "Inquiry", "Message", "BeginRecord",
    "DecisionRecord", "PreparedRecord", "OutcomeRecord", "Record", "encode_message",
    "decode_message", "is_record", "encode_record", "decode_record",
]

RECORD_FORMAT = 2  # a CommitValue's is 1
MAX_PARTICIPANTS = 64  # groups one transaction may write

Writes = tuple[tuple[bytes, bytes | None], ...]
Priority = tuple[int, str]  # (first start timestamp µs, first txn id): kept across retries


@dataclass(frozen=True)
class Participant:
    """One group a transaction writes: its writes there, and whether the client
    ran operations there before committing (then the group must still hold
    the transaction's locks, or the commit is refused)."""

    group: str
    writes: Writes
    active_here: bool = False


# --- messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitRequest:
    txn_id: str
    priority: Priority
    participants: tuple[Participant, ...]


@dataclass(frozen=True)
class PrepareRequest:
    txn_id: str
    coordinator: str
    priority: Priority
    writes: Writes
    active_here: bool


@dataclass(frozen=True)
class Vote:
    txn_id: str
    participant: str
    prepared: bool
    prepare_ts_us: int  # 0 when refused


@dataclass(frozen=True)
class Decision:
    txn_id: str
    coordinator: str  # where the Ack goes
    commit: bool
    commit_ts_us: int  # 0 for an abort


@dataclass(frozen=True)
class Ack:
    txn_id: str
    participant: str


@dataclass(frozen=True)
class Inquiry:
    txn_id: str
    participant: str


Message = CommitRequest | PrepareRequest | Vote | Decision | Ack | Inquiry

# --- records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BeginRecord:
    """Coordinator: the transaction started committing with these participants."""

    txn_id: str
    priority: Priority
    participants: tuple[Participant, ...]


@dataclass(frozen=True)
class DecisionRecord:
    """Coordinator: the outcome, and every group that must hear it. A commit
    carries the coordinator group's own writes, which take effect at
    ``commit_ts_us`` as the record is applied: the coordinator group logs
    neither a prepare nor an outcome of its own (Spanner §4.2.1: the
    coordinator leader logs a commit record, its participants prepare)."""

    txn_id: str
    commit: bool
    commit_ts_us: int
    groups: tuple[str, ...]
    writes: Writes = ()


@dataclass(frozen=True)
class PreparedRecord:
    """Participant: write locks held, prepared at ``prepare_ts_us``."""

    txn_id: str
    coordinator: str
    priority: Priority
    prepare_ts_us: int
    writes: Writes


@dataclass(frozen=True)
class OutcomeRecord:
    """Participant: the outcome; a commit's writes take effect at ``commit_ts_us``."""

    txn_id: str
    commit: bool
    commit_ts_us: int
    writes: Writes


Record = BeginRecord | DecisionRecord | PreparedRecord | OutcomeRecord

# --- field kinds -------------------------------------------------------------------------


def _txn(raw: Any, where: str) -> str:
    return _str(raw, where, MAX_TXN_ID_BYTES)


def _group(raw: Any, where: str) -> str:
    return _str(raw, where, MAX_GROUP_ID_BYTES)


def _priority(raw: Any, where: str) -> Priority:
    ts_us, txn_id = _list(raw, where, 2)
    return (_int(ts_us, f"{where}.ts_us"), _txn(txn_id, f"{where}.txn_id"))


def _writes(raw: Any, where: str) -> Writes:
    return _check_writes(_list(raw, where), where, wire=True)


def _encode_writes(writes: Writes) -> list[Any]:
    return [[k, v] for k, v in writes]


def _encode_participants(items: tuple[Participant, ...]) -> list[Any]:
    return [[p.group, _encode_writes(p.writes), p.active_here] for p in items]


def _participants(raw: Any, where: str) -> tuple[Participant, ...]:
    items = _list(raw, where)
    if not 1 <= len(items) <= MAX_PARTICIPANTS:
        raise _fail(where, f"has {len(items)} participants, not 1..{MAX_PARTICIPANTS}")
    out = []
    for i, item in enumerate(items):
        here = f"{where}[{i}]"
        group, writes, active = _list(item, here, 3)
        out.append(Participant(_group(group, f"{here}.group"), _writes(writes, f"{here}.writes"),
                               _bool(active, f"{here}.active_here")))
    if len({p.group for p in out}) != len(out):
        raise _fail(where, "names a group twice")
    return tuple(out)


def _groups(raw: Any, where: str) -> tuple[str, ...]:
    items = _list(raw, where)
    if not 1 <= len(items) <= MAX_PARTICIPANTS:
        raise _fail(where, f"has {len(items)} groups, not 1..{MAX_PARTICIPANTS}")
    out = tuple(_group(g, f"{where}[{i}]") for i, g in enumerate(items))
    if len(set(out)) != len(out):
        raise _fail(where, "names a group twice")
    return out


def _same(value: Any) -> Any:
    return value


Kind = tuple[Callable[[Any], Any], Callable[[Any, str], Any]]
TXN: Kind = (_same, _txn)
GROUP: Kind = (_same, _group)
TS: Kind = (_same, _int)
BOOL: Kind = (_same, _bool)
PRIORITY: Kind = (list, _priority)
WRITES: Kind = (_encode_writes, _writes)
PARTICIPANTS: Kind = (_encode_participants, _participants)
GROUPS: Kind = (list, _groups)

# type -> (tag, fields). Tags are the wire's: never reuse one.
_MESSAGES: dict[type, tuple[int, tuple[tuple[str, Kind], ...]]] = {
    CommitRequest: (1, (("txn_id", TXN), ("priority", PRIORITY), ("participants", PARTICIPANTS))),
    PrepareRequest: (2, (("txn_id", TXN), ("coordinator", GROUP), ("priority", PRIORITY),
                         ("writes", WRITES), ("active_here", BOOL))),
    Vote: (3, (("txn_id", TXN), ("participant", GROUP), ("prepared", BOOL), ("prepare_ts_us", TS))),
    Decision: (4, (("txn_id", TXN), ("coordinator", GROUP), ("commit", BOOL), ("commit_ts_us", TS))),
    Ack: (5, (("txn_id", TXN), ("participant", GROUP))),
    Inquiry: (6, (("txn_id", TXN), ("participant", GROUP))),
}
_RECORDS: dict[type, tuple[int, tuple[tuple[str, Kind], ...]]] = {
    BeginRecord: (1, (("txn_id", TXN), ("priority", PRIORITY), ("participants", PARTICIPANTS))),
    DecisionRecord: (2, (("txn_id", TXN), ("commit", BOOL), ("commit_ts_us", TS), ("groups", GROUPS),
                         ("writes", WRITES))),
    PreparedRecord: (3, (("txn_id", TXN), ("coordinator", GROUP), ("priority", PRIORITY),
                         ("prepare_ts_us", TS), ("writes", WRITES))),
    OutcomeRecord: (4, (("txn_id", TXN), ("commit", BOOL), ("commit_ts_us", TS), ("writes", WRITES))),
}
MESSAGE_TAGS: dict[int, type] = {tag: cls for cls, (tag, _) in _MESSAGES.items()}
RECORD_TAGS: dict[int, type] = {tag: cls for cls, (tag, _) in _RECORDS.items()}
if len(MESSAGE_TAGS) != len(_MESSAGES) or len(RECORD_TAGS) != len(_RECORDS):
    raise AssertionError("two types share a wire tag")


def _encode(schemas: dict[type, tuple[int, tuple[tuple[str, Kind], ...]]], obj: Any) -> list[Any]:
    tag, fields = schemas[type(obj)]
    return [tag, *[kind[0](getattr(obj, name)) for name, kind in fields]]


def _decode(schemas: dict[type, tuple[int, tuple[tuple[str, Kind], ...]]],
            tags: dict[int, type], raw: Any, what: str) -> Any:
    if type(raw) is not list or not raw:
        raise _fail(what, "is not a non-empty list")
    tag = raw[0]
    cls = tags.get(tag) if type(tag) is int else None
    if cls is None:
        raise _fail(f"{what}.tag", f"{str(tag)[:20]!r} is not a known {what} type")
    _, fields = schemas[cls]
    if len(raw) != len(fields) + 1:
        raise _fail(cls.__name__, f"has {len(raw) - 1} fields, not {len(fields)}")
    values = {name: kind[1](item, f"{cls.__name__}.{name}") for (name, kind), item in zip(fields, raw[1:])}
    obj = cls(**values)
    _check_outcome(obj)
    return obj


def _check_outcome(obj: Any) -> None:
    """An abort carries no timestamp and no writes; a refusal no prepare timestamp."""
    name = type(obj).__name__
    if isinstance(obj, (Decision, DecisionRecord, OutcomeRecord)) and not obj.commit and obj.commit_ts_us:
        raise _fail(f"{name}.commit_ts_us", "is not 0 for an abort")
    if isinstance(obj, (OutcomeRecord, DecisionRecord)) and not obj.commit and obj.writes:
        raise _fail(f"{name}.writes", "is not empty for an abort")
    if isinstance(obj, Vote) and not obj.prepared and obj.prepare_ts_us:
        raise _fail(f"{name}.prepare_ts_us", "is not 0 for a refusal")


def encode_message(msg: Message) -> list[Any]:
    return _encode(_MESSAGES, msg)


def decode_message(raw: Any) -> Message:
    """The message in ``raw``; ``ProtocolError`` naming the bad field."""
    msg: Message = _decode(_MESSAGES, MESSAGE_TAGS, raw, "message")
    return msg


def is_record(data: bytes) -> bool:
    """Whether a Paxos ``Entry.value`` holds a 2PC record (not a ``CommitValue``):
    both are short msgpack arrays whose first element is their format."""
    return len(data) > 1 and data[0] & 0xF0 == 0x90 and data[1] == RECORD_FORMAT


def encode_record(record: Record) -> bytes:
    """Pack a record for a Paxos ``Entry.value``."""
    return bytes(msgpack.packb([RECORD_FORMAT, *_encode(_RECORDS, record)], use_bin_type=True))


def decode_record(data: bytes) -> Record:
    """Unpack a record; anything malformed is a ``ProtocolError`` naming the field."""
    n = len(data)
    try:
        raw = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True, max_str_len=n,
                              max_bin_len=n, max_array_len=n, max_map_len=n // 2, max_ext_len=n)
    except Exception as exc:  # msgpack raises many types
        raise _fail("record", f"is not msgpack: {type(exc).__name__}") from None
    if type(raw) is not list or not raw or type(raw[0]) is not int or raw[0] != RECORD_FORMAT:
        raise _fail("record.format", f"is not {RECORD_FORMAT}")
    record: Record = _decode(_RECORDS, RECORD_TAGS, raw[1:], "record")
    return record
