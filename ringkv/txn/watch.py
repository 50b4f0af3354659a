"""Watches on a transactional keyspace: what a watch stream delivers, and when (pure).

A watch streams every committed write to one key, or to every key with a
prefix, in commit-timestamp order: CockroachDB's first changefeeds did it by
polling with resolved timestamps, and so does this. The serving node's loop
(``server/watch_http.py``) picks ``T`` = ``TT.now().latest`` and asks each
range involved for its committed writes in ``(last, T]``, served like a
snapshot read at ``T`` (Spanner §4.1.3: by a replica whose safe time has
passed ``T``, so no write at or below ``T`` is still to come). ``merge`` puts
the ranges' answers in (version, key) order and says up to where they are
complete; that point becomes ``last`` for the next poll. A write is thus
delivered once, in order, whichever replica or leader answers each poll.

The version of an event is its commit timestamp in microseconds, the
version a read of the key reports. Every write of one transaction has the
same version: a watcher that reconnects resumes after the last version it
saw *completely* (``from_version``: events strictly after it), so a cut in
the middle of a transaction's writes neither loses nor repeats any of them
(the client keeps the events it saw of that version and drops their
repeats).

``WatchBuffer`` holds what one watcher has not read yet, bounded: a watcher
that falls ``max_events`` behind is cut off (``watcher_too_slow``) with the
last version it received completely, from which it resumes. It also says
when an idle stream should carry a ``progress`` event: the version up to
which the watcher has seen everything, so that a reconnect after a long
quiet spell resumes from there instead of from a version garbage
collection may have collected since.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ringkv.txn.leases import RESERVED_PREFIX

PUT, DELETE, PROGRESS, ERROR = "put", "delete", "progress", "error"
WATCHER_TOO_SLOW = "watcher_too_slow"
PROGRESS_INTERVAL_S = 1.0  # an idle stream says how far it has got at most this often


@dataclass(frozen=True)
class Change:
    """One committed write: ``value`` (stored JSON) or None for a delete."""

    key: bytes
    value: bytes | None
    version_us: int

    @property
    def kind(self) -> str:
        return DELETE if self.value is None else PUT


@dataclass(frozen=True)
class Progress:
    """Everything up to ``version_us`` has been delivered."""

    version_us: int


class RangeAnswer(NamedTuple):
    """One range's answer to a poll: its changes in (since, complete_through_us]."""

    changes: Sequence[Change]
    complete_through_us: int


class Merged(NamedTuple):
    changes: list[Change]  # in (version, key) order, each once
    resolved_us: int  # every change at or below it is in ``changes`` or was delivered before


def start_version(from_version: int | None, now_us: int) -> int:
    """Where a new watch starts: after ``from_version``, or (none given) after the
    node's ``TT.now().latest``, so only writes committed from now on are streamed.
    ``from_version=0`` is no special case: all history, while GC has kept it all."""
    return now_us if from_version is None else from_version


def merge(since_us: int, upto_us: int, answers: Sequence[RangeAnswer]) -> Merged:
    """One poll's answers, from every range the watch spans, for (since_us, upto_us].

    A range may answer only part of the window (its page was full): the poll
    is complete up to the lowest point every range answered, and what lies
    above it is asked again next time (so it is never delivered twice).
    """
    resolved_us = upto_us
    for answer in answers:
        resolved_us = min(resolved_us, answer.complete_through_us)
    resolved_us = max(resolved_us, since_us)
    seen: set[tuple[int, bytes]] = set()
    changes = []
    for answer in answers:
        for change in answer.changes:
            at = (change.version_us, change.key)
            if change.key.startswith(RESERVED_PREFIX):
                continue  # a lease's own record: the tier's bookkeeping, not a client's key
            if since_us < change.version_us <= resolved_us and at not in seen:
                seen.add(at)
                changes.append(change)
    changes.sort(key=lambda change: (change.version_us, change.key))
    return Merged(changes, resolved_us)


def fit(merged: Merged, room: int) -> Merged | None:
    """The part of ``merged`` that fits in ``room`` events, cut between two versions
    (a transaction's writes stay together); None when not even its first version
    fits. What is left out is polled again (the resolved point stays below it)."""
    changes = merged.changes
    if len(changes) <= room:
        return merged
    cut = room
    while cut > 0 and changes[cut].version_us == changes[cut - 1].version_us:
        cut -= 1
    if cut == 0:
        return None
    return Merged(changes[:cut], changes[cut - 1].version_us)


def caught_up(offered_us: int, feed_from_us: Sequence[int]) -> bool:
    """Whether a watch polling on its own may switch to its node's shared polls: it
    has offered everything up to where each shared poll of its ranges can replay
    from (its kept answers, then the ones to come, are contiguous from there), so
    it gets no gap; what they bring at or below ``offered_us`` is dropped, never
    repeated."""
    return all(offered_us >= from_us for from_us in feed_from_us)


def matches(change: Change, key: bytes, prefix: bool) -> bool:
    """Whether a change of a whole range is one a watch of ``key`` (or prefix) gets."""
    return change.key.startswith(key) if prefix else change.key == key


class Fanin:
    """A live watch's share of its node's polls, one per range it spans: what each
    range's shared poll brought (its own keys only) and up to where it is resolved.
    ``take`` hands out what every range has resolved, merged as one poll of all of
    them (``merge``): a version's events together, once each range is past it."""

    def __init__(self, ranges: int, at_us: int) -> None:
        self._pending: list[list[Change]] = [[] for _ in range(ranges)]
        self._resolved: list[int] = [at_us] * ranges

    def add(self, index: int, changes: Sequence[Change], resolved_us: int) -> None:
        self._pending[index].extend(changes)
        self._resolved[index] = max(self._resolved[index], resolved_us)

    def take(self, since_us: int, room: int) -> Merged | None:
        """What is resolved above ``since_us``, fitted to ``room`` (``fit``); None when
        not even its first version fits (nothing is taken then)."""
        upto_us = min(self._resolved)
        answers = [RangeAnswer(p, r) for p, r in zip(self._pending, self._resolved, strict=True)]
        fitted = fit(merge(since_us, upto_us, answers), room)
        if fitted is None:
            return None
        cut_us = fitted.resolved_us
        self._pending = [[c for c in p if c.version_us > cut_us] for p in self._pending]
        return fitted


class WatchBuffer:
    """What one watcher has not read yet: events and the points they resolve, bounded.

    The poll loop ``offer``s each poll; the writer ``pop``s one item at a
    time and writes it out. ``delivered_us`` is the resume point: the highest
    version whose every event has been popped (or a resolved point popped).
    """

    def __init__(self, max_events: int, start_us: int, *, now_s: float,
                 progress_interval_s: float = PROGRESS_INTERVAL_S) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        self.max_events = max_events
        self.delivered_us = start_us
        self.progress_interval_s = progress_interval_s
        self._items: deque[Change | int] = deque()  # an int: a resolved point
        self._events = 0
        self._offered_us = start_us
        self._last_write_s = now_s
        self._progress_us = start_us  # the last point the stream said it had reached

    @property
    def events(self) -> int:
        return self._events

    @property
    def room(self) -> int:
        """Events that may still be offered."""
        return self.max_events - self._events

    @property
    def offered_us(self) -> int:
        """Where the next poll starts: everything at or below it is offered."""
        return self._offered_us

    def offer(self, merged: Merged) -> bool:
        """Queue one poll's changes and its resolved point. False: they do not fit
        (the watcher is too slow to read); nothing was queued then."""
        if self._events + len(merged.changes) > self.max_events:
            return False
        if merged.resolved_us <= self._offered_us and not merged.changes:
            return True
        self._items.extend(merged.changes)
        self._events += len(merged.changes)
        if self._items and isinstance(self._items[-1], int):
            self._items[-1] = merged.resolved_us  # two resolved points in a row: the later
        else:
            self._items.append(merged.resolved_us)
        self._offered_us = max(self._offered_us, merged.resolved_us)
        return True

    def pop(self, now_s: float) -> Change | Progress | None:
        """The next item to write, or None when there is nothing to write now.

        A resolved point is written as a ``Progress`` only when the stream has
        been idle ``progress_interval_s`` and it moved; else it only moves
        ``delivered_us``, silently."""
        while self._items:
            item = self._items.popleft()
            if isinstance(item, Change):
                self._events -= 1
                following = self._items[0] if self._items else None
                if not (isinstance(following, Change) and following.version_us == item.version_us):
                    self.delivered_us = max(self.delivered_us, item.version_us)
                self._last_write_s = now_s
                return item
            self.delivered_us = max(self.delivered_us, item)
            if (now_s - self._last_write_s >= self.progress_interval_s
                    and self.delivered_us > self._progress_us):
                self._progress_us = self.delivered_us
                self._last_write_s = now_s
                return Progress(self.delivered_us)
        return None

    def completes(self, change: Change) -> bool:
        """Whether ``change``, just popped, was the last event of its version."""
        return self.delivered_us >= change.version_us


# -- the wire --------------------------------------------------------------------------


def event_json(item: Change | Progress) -> dict[str, Any]:
    """One event as JSON: ``type`` put, delete or progress; ``key``; ``value`` (puts);
    ``version`` (the commit timestamp in µs, as a read reports it)."""
    if isinstance(item, Progress):
        return {"type": PROGRESS, "version": item.version_us}
    event: dict[str, Any] = {"type": item.kind, "key": item.key.decode(errors="replace"),
                             "version": item.version_us}
    if item.value is not None:
        event["value"] = json.loads(item.value)
    return event


def error_json(code: str, message: str, last_version_us: int, **details: Any) -> dict[str, Any]:
    """The last event of a stream the node ends: ``last_version`` is where to resume."""
    return {"type": ERROR, "error": {"code": code, "message": message,
                                     "last_version": last_version_us, **details}}


_ENCODER = json.JSONEncoder(separators=(",", ":"))


def frame(event: dict[str, Any], *, sse: bool, event_id: int | None = None) -> bytes:
    """An event as one NDJSON line, or as a server-sent event (``id`` only on events
    after which a reconnect may resume: EventSource's Last-Event-ID is then right)."""
    data = _ENCODER.encode(event)
    if not sse:
        return data.encode() + b"\n"
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event['type']}\ndata: {data}\n\n".encode()
