"""Session leases on a transactional keyspace: records, expiry, and the transactions (pure).

A lease (etcd's, ZooKeeper's session) is a record in the keyspace it serves,
under the reserved prefix ``\\x00lease/`` (no client may write there): its
TTL, its deadline, and the keys attached to it. Every change to a lease is
a transaction of the transactional tier, so leases are as durable and as
serializable as the data they guard.

**Time is the group's, never a node's.** A lease granted or renewed by a
transaction committed at timestamp ``s`` expires at ``s + ttl`` (the record
holds ``expires_at_us`` null, meaning "my own commit timestamp plus ttl":
the writer cannot know ``s`` before the commit, and the record's version
*is* ``s``). A lease is expired only when ``TT.now().earliest > expires_at``
(``is_expired``): true time has certainly passed the deadline, whatever any
one node's clock says.

**Attachment is a version.** ``put(key, lease=L)`` is one transaction that
writes the key and the lease record, both at commit timestamp ``s``; the
record notes the key with attach version null ("my own version"), resolved
to the record's version the next time the record is rewritten. The key is
still attached to L exactly while its newest version is that ``s``: a later
put (with no lease, or another) or a delete gives the key a newer version,
so it is detached without touching L's record (etcd semantics). The expiry
deletes only the keys still attached, each under a ``version`` condition, so
a key overwritten after the expiry read them is never deleted by it.

**Expiry and keepalive race cleanly.** Both are transactions conditioned on
the lease record's version: whichever commits first changes (or deletes)
the record, and the other's condition fails. So keys never vanish while
the owner keeps the lease alive, and vanish together (one transaction,
across ranges by two-phase commit) within ttl + ε + the sweep interval +
one transaction after the owner's last keepalive.

The directory (``\\x00lease/dir``) lists the leases of a keyspace so that a
sweeper finds them without a scan; it bounds their number (``txn.max_leases``).
An id stays listed after its record is gone until a sweep prunes it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ringkv.errors import BadRequest, CorruptRecord, LeaseExpired, Overloaded, TooLarge
from ringkv.txn.requests import Condition, TxnRequest, Write, comparable_json
from ringkv.txn.truetime import TTInterval

__all__ = [
    "DIRECTORY_KEY",
    "RESERVED_PREFIX",
    "Directory",
    "LeaseId",
    "LeaseRecord",
    "attach_txn",
    "attached",
    "decode_directory",
    "decode_record",
    "encode_directory",
    "encode_record",
    "expired_error",
    "expires_at_us",
    "expiry_txn",
    "grant_room",
    "grant_txn",
    "grants_txn",
    "is_expired",
    "is_reserved",
    "keepalive_txn",
    "leased_txn",
    "new_id",
    "parse_id",
    "prune_txn",
    "record_key",
    "remaining_ms",
    "renewed",
    "still_attached",
]

RESERVED_PREFIX = b"\x00lease/"
DIRECTORY_KEY = RESERVED_PREFIX + b"dir"
_RECORD_PREFIX = RESERVED_PREFIX + b"r/"
# "<keyspace>:<16 hex digits>": the keyspace (a keyspace name has no ':') and a random tag.
LEASE_ID_PATTERN = r"^([A-Za-z0-9_.~-]{1,48}):([0-9a-f]{16})$"
_ID = re.compile(LEASE_ID_PATTERN)
MIN_TTL_S = 1


@dataclass(frozen=True)
class LeaseId:
    keyspace: str
    tag: str  # 16 hex digits

    def __str__(self) -> str:
        return f"{self.keyspace}:{self.tag}"


def new_id(keyspace: str, rng: random.Random) -> LeaseId:
    return LeaseId(keyspace, f"{rng.getrandbits(64):016x}")


def parse_id(text: object, *, field: str = "lease") -> LeaseId:
    """A lease id from untrusted input, or BadRequest naming ``field``."""
    match = _ID.match(text) if isinstance(text, str) else None
    if match is None:
        raise BadRequest(f"{field} must be a lease id (<keyspace>:<16 hex digits>, as POST "
                         "/v1/lease answers)", field=field)
    return LeaseId(match.group(1), match.group(2))


def record_key(lease: LeaseId) -> bytes:
    return _RECORD_PREFIX + lease.tag.encode()


def is_reserved(key: bytes) -> bool:
    """Keys no client may write: the leases' own records."""
    return key.startswith(RESERVED_PREFIX)


def check_ttl(value: object, max_ttl_s: int, *, field: str = "ttl") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_TTL_S <= value <= max_ttl_s:
        raise BadRequest(f"{field} must be a whole number of seconds from {MIN_TTL_S} to "
                         f"{max_ttl_s} (txn.max_lease_ttl_s)", field=field)
    return value


# -- the record ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRecord:
    ttl_s: int
    # None: this record's own version (its commit timestamp) + ttl.
    expires_at_us: int | None = None
    # key -> the version at which it was attached; None: this record's own version.
    keys: Mapping[bytes, int | None] = field(default_factory=dict)


def encode_record(record: LeaseRecord) -> bytes:
    return comparable_json({
        "ttl_s": record.ttl_s, "expires_at_us": record.expires_at_us,
        "keys": {k.decode(): v for k, v in sorted(record.keys.items())}})


def decode_record(raw: bytes) -> LeaseRecord:
    try:
        doc = json.loads(raw)
        ttl_s, expires, keys = doc["ttl_s"], doc["expires_at_us"], doc["keys"]
        if (not isinstance(ttl_s, int) or not isinstance(keys, dict)
                or not (expires is None or isinstance(expires, int))
                or not all(v is None or isinstance(v, int) for v in keys.values())):
            raise TypeError("field types")
        return LeaseRecord(ttl_s, expires, {k.encode(): v for k, v in keys.items()})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptRecord(f"a lease record is damaged: {exc}") from None


def expires_at_us(record: LeaseRecord, version_us: int) -> int:
    """The deadline of a record committed at ``version_us``."""
    if record.expires_at_us is not None:
        return record.expires_at_us
    return version_us + record.ttl_s * 1_000_000


def is_expired(record: LeaseRecord, version_us: int, now: TTInterval) -> bool:
    """True time has certainly passed the deadline (``TT.after``): never on one clock's say."""
    return now.after(expires_at_us(record, version_us))


def remaining_ms(record: LeaseRecord, version_us: int, now: TTInterval) -> int:
    """How long the lease surely still lives (0: it may have expired)."""
    return max(0, (expires_at_us(record, version_us) - now.latest_us) // 1000)


def _resolved_keys(record: LeaseRecord, version_us: int) -> dict[bytes, int]:
    return {k: version_us if v is None else v for k, v in record.keys.items()}


def renewed(record: LeaseRecord, version_us: int) -> LeaseRecord:
    """The record a keepalive writes: the deadline is its own commit timestamp + ttl."""
    return LeaseRecord(record.ttl_s, None, _resolved_keys(record, version_us))


def attached(record: LeaseRecord, version_us: int, key: bytes | Iterable[bytes],
             max_keys: int) -> LeaseRecord:
    """The record a put attaching ``key`` (or each of several keys) writes (with the
    keys, at one commit timestamp): the deadline unchanged, the keys attached at the
    new version."""
    keys: dict[bytes, int | None] = dict(_resolved_keys(record, version_us))
    for one in [key] if isinstance(key, bytes) else key:
        keys[one] = None
    if len(keys) > max_keys:
        raise TooLarge(f"the lease has {max_keys} keys already (txn.max_keys_per_lease)",
                       field="lease", limit=max_keys, size=len(keys))
    return LeaseRecord(record.ttl_s, expires_at_us(record, version_us), keys)


def still_attached(record: LeaseRecord, version_us: int,
                   current: Mapping[bytes, tuple[bytes | None, int | None]]) -> dict[bytes, int]:
    """The keys still attached (key -> version): those whose newest version is the one
    that attached them. ``current``: each key's (value, version) as read now."""
    out: dict[bytes, int] = {}
    for key, at_us in sorted(_resolved_keys(record, version_us).items()):
        value, now_us = current.get(key, (None, None))
        if value is not None and now_us == at_us:
            out[key] = at_us
    return out


def pruned(record: LeaseRecord, version_us: int,
           current: Mapping[bytes, tuple[bytes | None, int | None]]) -> LeaseRecord:
    """The record without the keys detached since (a later write gave them a newer
    version; none can get the attaching version back), its deadline unchanged: what
    an attach to a full lease writes, so detached keys do not hold its places."""
    return LeaseRecord(record.ttl_s, expires_at_us(record, version_us),
                       dict(still_attached(record, version_us, current)))


# -- the transactions --------------------------------------------------------------------------


def grant_txn(keyspace: str, lease: LeaseId, ttl_s: int, directory: Directory,
              max_leases: int) -> TxnRequest:
    """Create the record (absent before: ids never collide) and list it in the
    directory, conditioned on the directory's version (the grant that loses a race
    retries with the new directory)."""
    return grants_txn(keyspace, [(lease, ttl_s)], directory, max_leases)


def grants_txn(keyspace: str, grants: Sequence[tuple[LeaseId, int]], directory: Directory,
               max_leases: int) -> TxnRequest:
    """``grant_txn`` for several leases at once (the grants a node has waiting, as one
    directory write): every record created, the directory listing them all."""
    if len(directory.tags) + len(grants) > max_leases:
        raise Overloaded(f"keyspace {keyspace!r} holds {len(directory.tags)} leases, "
                         f"{max_leases} at most (txn.max_leases)", reason="max_leases",
                         limit=max_leases)
    tags = sorted({*directory.tags, *(lease.tag for lease, _ in grants)})
    conditions = [Condition(record_key(lease), "absent") for lease, _ in grants]
    writes = [Write(record_key(lease), encode_record(LeaseRecord(ttl_s)))
              for lease, ttl_s in grants]
    return TxnRequest(
        keyspace, None, (),
        (*conditions, _directory_condition(directory)),
        (*writes, Write(DIRECTORY_KEY, encode_directory(tags))))


def grant_room(directory: Directory, max_leases: int) -> int:
    """How many more leases the keyspace may hold (``txn.max_leases``)."""
    return max(0, max_leases - len(directory.tags))


def keepalive_txn(keyspace: str, lease: LeaseId, record: LeaseRecord,
                  version_us: int) -> TxnRequest:
    """Renew: conditioned on the record as read (an expiry that committed first wins)."""
    return TxnRequest(keyspace, None, (),
                      (Condition(record_key(lease), "version", version_us=version_us),),
                      (Write(record_key(lease), encode_record(renewed(record, version_us))),))


def attach_txn(keyspace: str, lease: LeaseId, record: LeaseRecord, version_us: int,
               key: bytes, value: bytes, extra: Iterable[Condition], max_keys: int) -> TxnRequest:
    """Put ``key`` attached to ``lease``: the key and the record at one commit timestamp."""
    return TxnRequest(
        keyspace, None, (),
        (*extra, Condition(record_key(lease), "version", version_us=version_us)),
        (Write(key, value),
         Write(record_key(lease), encode_record(attached(record, version_us, key, max_keys)))))


def leased_txn(request: TxnRequest, records: Mapping[str, tuple[LeaseRecord, int]],
               max_keys: int) -> TxnRequest:
    """A one-shot transaction whose puts name leases (``Write.lease``), made plain: each
    lease's record (as read: ``records``, lease id -> (record, version)) is conditioned
    on its version and rewritten with the keys attached, at the transaction's commit
    timestamp, exactly as ``attach_txn`` does for one put. The caller's reads,
    conditions and writes are kept, and its id (a retry is still that transaction)."""
    conditions = list(request.conditions)
    writes = [Write(w.key, w.value) for w in request.writes]
    for lease_id, (record, version_us) in sorted(records.items()):
        keys = [w.key for w in request.writes if w.lease == lease_id]
        if not keys:
            continue
        rkey = record_key(parse_id(lease_id))
        conditions.append(Condition(rkey, "version", version_us=version_us))
        writes.append(Write(rkey, encode_record(attached(record, version_us, keys, max_keys))))
    return TxnRequest(request.keyspace, request.txn_id, request.reads, tuple(conditions),
                      tuple(writes))


def expiry_txn(keyspace: str, lease: LeaseId, version_us: int,
               attached_keys: Mapping[bytes, int]) -> TxnRequest:
    """Delete the record and every key still attached, at once: conditioned on the
    record's version (a keepalive that committed first wins) and on each key's
    (one overwritten since it was read is not this lease's to delete: the expiry is
    read and planned again)."""
    conditions = [Condition(record_key(lease), "version", version_us=version_us)]
    conditions += [Condition(k, "version", version_us=v) for k, v in sorted(attached_keys.items())]
    writes = [Write(record_key(lease), None)] + [Write(k, None) for k in sorted(attached_keys)]
    return TxnRequest(keyspace, None, (), tuple(conditions), tuple(writes))


def expired_error(lease: LeaseId) -> LeaseExpired:
    return LeaseExpired(f"lease {lease} has expired or was revoked (or never existed); take a "
                        "new one", lease=str(lease))


# -- the directory ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Directory:
    tags: tuple[str, ...] = ()
    version_us: int | None = None  # None: no directory yet


def encode_directory(tags: Iterable[str]) -> bytes:
    return comparable_json({"leases": sorted(tags)})


def decode_directory(raw: bytes | None, version_us: int | None) -> Directory:
    if raw is None:
        return Directory()
    try:
        tags = json.loads(raw)["leases"]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise TypeError("leases is not a list of strings")
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecord(f"the lease directory is damaged: {exc}") from None
    return Directory(tuple(tags), version_us)


def _directory_condition(directory: Directory) -> Condition:
    if directory.version_us is None:
        return Condition(DIRECTORY_KEY, "absent")
    return Condition(DIRECTORY_KEY, "version", version_us=directory.version_us)


def prune_txn(keyspace: str, directory: Directory, gone: Iterable[str]) -> TxnRequest | None:
    """Drop the ids whose records are gone from the directory (None: nothing to drop)."""
    dropped = set(gone) & set(directory.tags)
    if not dropped or directory.version_us is None:
        return None
    keep = [t for t in directory.tags if t not in dropped]
    return TxnRequest(keyspace, None, (), (_directory_condition(directory),),
                      (Write(DIRECTORY_KEY, encode_directory(keep)),))
