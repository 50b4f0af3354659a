"""What the coordination recipes decide (sans-I/O): who holds a lock, whom a
waiter watches, whether a fenced write may land, who is in a group.

The recipes (``recipes.py``) are ZooKeeper's four, built as etcd's concurrency
package builds them, on session leases and watches. A contender (a lock's, an
election's candidate, a group's member) puts an *ephemeral* key attached to
its lease, ``<name>/<lease id>`` (``<name>/<member>`` in a group): it vanishes
when the owner stops renewing. The transactional tier has no scan of a key
range yet, so the contenders are also listed, in arrival order, in one *queue*
key, ``<name>``: each entry is ``[key, version]``, the contender key and the
version it was created at. An entry is *live* while its key still has that
version; once dead it stays dead (a lease id is never reused, and a key put
again has a new version), so the live entries before a contender only ever
shrink. Entries are appended by compare-and-set on the queue's version, which
prunes the dead ones at the same time; the append's commit timestamp is the
contender's place.

- The **holder** (lock owner, leader) is the first live entry: holders follow
  each other in queue order, one at a time.
- A **waiter** watches only the live entry just ahead of it (no herd), until
  that key is deleted, then decides again.
- The **fencing token** is the holder's place: the commit version of the append
  that queued it. Appends to one key commit at increasing versions, so every
  later holder has a larger token.
- A **fenced write** lands only if its token is at least the highest one the
  resource has accepted (and, in ``Lock.fenced_put``, only while the holder's
  key is still live: both conditions in one transaction).

**One transaction to queue** (``join_request``). A contender creates its key
(attached to its *session*'s lease: one lease, kept alive in the background,
shared by every recipe made from it, as in etcd's concurrency package) and
appends its entry in the same transaction, conditioned on the queue's version
as the client last saw it (``QueueView``). Its entry's version is that
transaction's commit timestamp, unknown before the commit, so the entry is
written with version null, "the queue's own version": a reader resolves it
with the version the queue key was read at (``parse_queue``), and every
rewrite writes it resolved. The transaction also reads the keys of the entries
ahead, so its answer says who is live ahead at the commit (``after_join``):
nobody, and the contender holds with no further read. The entries ahead of a
contender never gain a member (appends go at the end), and each stays dead
once dead, so a waiter reads only those keys and its own again
(``still_ahead``); it reads the queue too, not to decide but to plan its next
join from the queue as it stands (``view_read``). A release deletes the key; its
dead entry is pruned by the next append of a client that saw it dead.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_QUEUE_ENTRIES = 1000  # contenders waiting on one name (a transaction reads them all)
QUEUE_FORMAT = 2  # 2: an entry's version may be null, the queue's own version


class LockLost(Exception):
    """The lock (or leadership, or membership) is gone: its lease expired (the owner
    paused or was cut off past the TTL) or was revoked, so its key was deleted."""


class LockTimeout(TimeoutError):
    """The lock (or leadership) was not acquired within ``timeout_s``."""


class FencingRejected(Exception):
    """A fenced write carried a token lower than one the resource already accepted:
    a newer holder has written, so this one lost the lock."""

    def __init__(self, message: str, *, token: int, highest: int) -> None:
        super().__init__(message)
        self.token = token
        self.highest = highest


@dataclass(frozen=True)
class Entry:
    """One contender in a queue: its key and the version that key was created at."""

    key: str
    version: int


def queue_key(name: str) -> str:
    return name


def contender_key(name: str, owner: str) -> str:
    """The ephemeral key of a contender: ``<name>/<lease id>`` (``<name>/<member>``)."""
    if not name or not owner or "/" in owner:
        raise ValueError(f"a recipe needs a name and an owner without '/', got {name!r}, {owner!r}")
    return f"{name}/{owner}"


def fence_key(key: str) -> str:
    """Where a fenced resource keeps the highest token it accepted."""
    return f"{key}.fence"


def parse_queue(value: Any, version: int | None = None) -> list[Entry]:
    """The entries of a queue key's value (None: an empty queue) read at ``version``:
    an entry written with version null (its own append) was created at that version."""
    if value is None:
        return []
    if not isinstance(value, dict) or not isinstance(value.get("entries"), list):
        raise ValueError(f"not a recipe queue: {value!r}")
    entries = []
    for key, at in value["entries"]:
        if at is None:
            if version is None:
                raise ValueError("a queue entry of the queue's own version, read without it")
            at = version
        entries.append(Entry(str(key), int(at)))
    return entries


def queue_value(entries: Sequence[Entry], mine: str | None = None) -> dict[str, Any]:
    """The queue key's value; ``mine``: a key appended by this very write, whose version
    (the write's commit timestamp) is written null."""
    items: list[list[Any]] = [[e.key, e.version] for e in entries]
    if mine is not None:
        items.append([mine, None])
    return {"format": QUEUE_FORMAT, "entries": items}


def live(entries: Sequence[Entry], current: Mapping[str, int | None]) -> list[Entry]:
    """The entries whose key still holds the version it was created at, in queue order.
    ``current``: each key's version at one snapshot (None or missing: absent)."""
    return [e for e in entries if current.get(e.key) == e.version]


def appended(entries: Sequence[Entry], current: Mapping[str, int | None], mine: Entry,
             max_entries: int = MAX_QUEUE_ENTRIES) -> list[Entry]:
    """The queue after ``mine`` joins its end: dead entries and an older entry of the
    same key pruned. Raises ``OverflowError`` when it would exceed ``max_entries``."""
    kept = [e for e in live(entries, current) if e.key != mine.key]
    if len(kept) >= max_entries:
        raise OverflowError(f"{len(kept)} contenders already wait (at most {max_entries})")
    return [*kept, mine]


def removed(entries: Sequence[Entry], current: Mapping[str, int | None],
            key: str) -> list[Entry]:
    """The queue without ``key``'s entry, and without the dead ones."""
    return [e for e in live(entries, current) if e.key != key]


def holder(live_entries: Sequence[Entry]) -> Entry | None:
    """Who holds the lock (leads): the first live entry; None when nobody contends."""
    return live_entries[0] if live_entries else None


def ahead_of(live_entries: Sequence[Entry], mine: Entry) -> Entry | None:
    """The live entry just ahead of ``mine``, which its owner waits on; None when
    ``mine`` is first (it holds). Raises ``LockLost`` when ``mine`` is not live."""
    for index, entry in enumerate(live_entries):
        if entry == mine:
            return live_entries[index - 1] if index else None
    raise LockLost(f"contender key {mine.key!r} (version {mine.version}) is gone")


def fencing_allows(token: int, highest: int | None) -> bool:
    """Whether a resource that has accepted ``highest`` (None: nothing yet) takes a
    write fenced with ``token``: the same holder writes again, a newer one takes over,
    an older one is refused."""
    return highest is None or token >= highest


def fence_value(token: int, holder_key: str) -> dict[str, Any]:
    return {"token": token, "holder": holder_key}


def fence_token(value: Any) -> int | None:
    """The highest token a fence record holds (None: no fenced write yet)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("token"), int):
        raise ValueError(f"not a fence record: {value!r}")
    return int(value["token"])


def member_of(name: str, key: str) -> str:
    """The member name of a group key ``<name>/<member>``."""
    return key[len(name) + 1:] if key.startswith(name + "/") else key


# ---- queueing in one transaction (sessions) ------------------------------------------

@dataclass(frozen=True)
class QueueView:
    """The queue as this client last wrote or read it: its version (None: absent) and its
    entries, less those this client has since seen dead (they stay dead)."""

    version: int | None
    entries: tuple[Entry, ...]


EMPTY_VIEW = QueueView(None, ())


def view_of(value: Any, version: int | None) -> QueueView:
    """The view of a queue key read with ``value`` at ``version`` (None, None: absent)."""
    return QueueView(version, tuple(parse_queue(value, version)))


def keep_joining(lost_races: int, max_races: int, now_s: float,
                 deadline_s: float | None) -> bool:
    """Whether a contender whose join lost ``lost_races`` compare-and-sets in a row (another
    contender changed the queue first) tries again: until its deadline when it has one
    (a lock's acquire: contention is no reason to give up early, only its timeout is),
    else ``max_races`` times."""
    if deadline_s is not None:
        return now_s < deadline_s
    return lost_races < max_races


def join_request(name: str, key: str, value: Any, lease: str, view: QueueView,
                 max_entries: int = MAX_QUEUE_ENTRIES) -> dict[str, Any]:
    """The one transaction (``reads``, ``conditions``, ``writes``) that creates ``key``
    attached to ``lease`` and appends it to the queue ``name`` as seen in ``view``: it
    fails on the queue's version when another change came first (read it and plan
    again). It reads the keys of the entries ahead of ``key``, for ``after_join``.
    Raises ``OverflowError`` when ``max_entries`` would be exceeded."""
    ahead = [e for e in view.entries if e.key != key]
    if len(ahead) >= max_entries:
        raise OverflowError(f"{len(ahead)} contenders already wait (at most {max_entries})")
    qkey = queue_key(name)
    guard: dict[str, Any] = {"key": qkey, "version": view.version} \
        if view.version is not None else {"key": qkey, "absent": True}
    return {"reads": [e.key for e in ahead], "conditions": [guard], "writes": [
        {"op": "put", "key": key, "value": value, "lease": lease},
        {"op": "put", "key": qkey, "value": queue_value(ahead, mine=key)}]}


def join_answered(reads: Collection[str], current: Mapping[str, int | None]) -> bool:
    """Whether a committed ``join_request``'s answer says who was live ahead: it names
    every key the plan read (``current``: its versions; None: absent). An answer that
    does not, a retry of an attempt that committed (replayed from the outcome alone,
    with no reads, whether or not it says so), must not be read as "all dead": that
    would hold the lock beside a live holder. Read them again instead (``after_join``)."""
    return all(k in current for k in reads)


def after_join(view: QueueView, key: str, commit_ts: int,
               current: Mapping[str, int | None]) -> tuple[Entry, list[Entry], QueueView]:
    """What a committed ``join_request`` says: the contender's entry (created at the
    commit), the live entries ahead of it at the commit (``current``: the versions the
    transaction read; none: it holds), and the view the client keeps of the queue.
    ``current`` read after the commit (a replayed join) may name ``key`` too: its own key
    must still be at the commit's version, else ``LockLost``. (Entries ahead live now
    were live at the commit; those dead now stay dead.)"""
    mine = Entry(key, commit_ts)
    if key in current and current[key] != commit_ts:
        raise LockLost(f"contender key {key!r} (version {commit_ts}) is gone")
    ahead = live([e for e in view.entries if e.key != key], current)
    return mine, ahead, QueueView(commit_ts, (*ahead, mine))


def still_ahead(ahead: Sequence[Entry], mine: Entry,
                current: Mapping[str, int | None]) -> list[Entry]:
    """The entries ahead of ``mine`` still live (``current``: a read of their keys and of
    ``mine``'s, at one snapshot); none: it holds. ``LockLost`` when ``mine`` is dead."""
    if current.get(mine.key) != mine.version:
        raise LockLost(f"contender key {mine.key!r} (version {mine.version}) is gone")
    return live(ahead, current)


def view_read(value: Any, version: int | None,
              current: Mapping[str, int | None]) -> QueueView:
    """The view of a queue key read with ``value`` at ``version`` in the same snapshot as
    some of its contenders' keys (``current``: their versions; None: absent): the
    entries read dead are left out (they stay dead), the others kept. A waiter reads
    the queue beside the keys ahead of it, so that its next join, once it has released,
    plans from the queue as it stands rather than from the one it joined: in a queue
    whose other contenders all wait, that join then commits at its first attempt."""
    return QueueView(version, tuple(e for e in parse_queue(value, version)
                                    if e.key not in current or current[e.key] == e.version))


def without(view: QueueView, key: str) -> QueueView:
    """The view once ``key`` is deleted (released): its entry is dead."""
    return QueueView(view.version, tuple(e for e in view.entries if e.key != key))


def session_owner(lease: str, taken: Collection[str]) -> str:
    """The owner part of a session's contender key under one name: the lease id, as
    etcd names it, or ``<lease id>.<n>`` when another recipe of the same session
    already contends under that name (``taken``: their owners)."""
    if lease not in taken:
        return lease
    for n in itertools.count(2):  # bounded: one more than the recipes contending
        owner = f"{lease}.{n}"
        if owner not in taken:
            return owner
    raise AssertionError("unreachable")  # pragma: no cover
