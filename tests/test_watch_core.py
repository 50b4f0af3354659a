"""The watch core (``txn/watch.py``) and the MVCC store's ``changes``: what a
watch stream delivers, in which order, from where a reconnect resumes, and
when a watcher is refused (compacted) or cut off (too slow).

The stream checker (``check_stream``) replays random commits, polls, page
limits and connection cuts through the real core and demands every commit
exactly once in (version, key) order; it is proved by planted bugs it
catches (a merge that keeps changes above its resolved point, one that trusts the
highest complete point instead of the lowest, a buffer that resumes after
a version it delivered only in part).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence

import pytest

from ringkv.auth.permissions import READ, Need, needs
from ringkv.errors import BY_CODE, Compacted
from ringkv.ring import token_for
from ringkv.storage.memory import MemoryEngine
from ringkv.txn import mvcc_keys
from ringkv.txn.mvcc import ChangeItem, MvccStore
from ringkv.txn.watch import (
    Change,
    Merged,
    Progress,
    RangeAnswer,
    WatchBuffer,
    error_json,
    event_json,
    fit,
    frame,
    merge,
    start_version,
)

MIN_TOKEN, MAX_TOKEN = mvcc_keys.MIN_TOKEN, mvcc_keys.MAX_TOKEN


def c(key: str, version: int, value: object = 0) -> Change:
    return Change(key.encode(), None if value is None else json.dumps(value).encode(), version)


# -- merge, fit, the buffer ------------------------------------------------------------------


def test_merge_orders_by_version_then_key_across_ranges_within_the_window() -> None:
    a = RangeAnswer([c("b", 5), c("z", 7), c("old", 3)], 20)
    b = RangeAnswer([c("a", 5), c("m", 6), c("late", 21)], 20)
    merged = merge(3, 20, [a, b])
    assert [(x.version_us, x.key) for x in merged.changes] == [
        (5, b"a"), (5, b"b"), (6, b"m"), (7, b"z")]
    assert merged.resolved_us == 20


def test_merge_is_complete_only_up_to_the_lowest_range_and_never_repeats() -> None:
    full = RangeAnswer([c("a", 4), c("b", 9)], 10)
    partial = RangeAnswer([c("x", 4), c("x", 4)], 6)  # its page ended at 6
    merged = merge(0, 10, [full, partial])
    assert [(x.version_us, x.key) for x in merged.changes] == [(4, b"a"), (4, b"x")]
    assert merged.resolved_us == 6  # b at 9 comes again next poll, from (6, ...]


def test_merge_leaves_out_the_lease_records_kept_beside_the_keys() -> None:
    lease_record = Change(b"\x00lease/dir", b"{}", 5)
    merged = merge(0, 10, [RangeAnswer([c("a", 5), lease_record], 10)])
    assert [x.key for x in merged.changes] == [b"a"]


def test_fit_cuts_between_versions_only() -> None:
    merged = Merged([c("a", 1), c("b", 2), c("c", 2), c("d", 3)], 10)
    assert fit(merged, 4) is merged
    assert fit(merged, 3) == Merged([c("a", 1), c("b", 2), c("c", 2)], 2)
    assert fit(merged, 2) == Merged([c("a", 1)], 1)  # never half of version 2
    assert fit(Merged([c("a", 1), c("b", 1)], 5), 1) is None


def test_buffer_resumes_after_whole_versions_only() -> None:
    buffer = WatchBuffer(10, 0, now_s=0.0)
    assert buffer.offer(Merged([c("a", 5), c("b", 5), c("c", 8)], 9))
    assert buffer.pop(0.0) == c("a", 5) and buffer.delivered_us == 0  # b of 5 still to come
    assert buffer.pop(0.0) == c("b", 5) and buffer.delivered_us == 5
    assert buffer.completes(c("b", 5))
    assert buffer.pop(0.0) == c("c", 8) and buffer.delivered_us == 8
    assert buffer.pop(0.1) is None and buffer.delivered_us == 9  # the resolved point, silently


def test_buffer_refuses_what_does_not_fit_and_keeps_nothing_of_it() -> None:
    buffer = WatchBuffer(3, 0, now_s=0.0)
    assert buffer.offer(Merged([c("a", 1), c("b", 2)], 2))
    assert not buffer.offer(Merged([c("c", 3), c("d", 4)], 4))
    assert buffer.events == 2 and buffer.room == 1 and buffer.offered_us == 2


def test_an_idle_stream_says_how_far_it_got_once_a_second() -> None:
    buffer = WatchBuffer(10, 100, now_s=0.0)
    buffer.offer(Merged([], 200))
    assert buffer.pop(0.5) is None and buffer.delivered_us == 200  # not idle long enough
    buffer.offer(Merged([], 300))
    assert buffer.pop(1.2) == Progress(300)
    buffer.offer(Merged([], 400))
    assert buffer.pop(1.5) is None  # a second since the last progress has not passed
    buffer.offer(Merged([], 500))
    assert buffer.pop(2.3) == Progress(500)


def test_start_version_and_the_wire() -> None:
    assert start_version(None, 1234) == 1234
    assert start_version(0, 1234) == 0  # all history, while GC has kept it
    assert event_json(c("k", 7, {"x": 1})) == {"type": "put", "key": "k", "version": 7,
                                              "value": {"x": 1}}
    assert event_json(c("k", 8, None)) == {"type": "delete", "key": "k", "version": 8}
    assert event_json(Progress(9)) == {"type": "progress", "version": 9}
    assert frame({"type": "progress", "version": 9}, sse=False) == \
        b'{"type":"progress","version":9}\n'
    assert frame({"type": "put", "version": 9}, sse=True, event_id=9) == \
        b'id: 9\nevent: put\ndata: {"type":"put","version":9}\n\n'
    final = error_json("watcher_too_slow", "slow", 41)
    assert final["error"] == {"code": "watcher_too_slow", "message": "slow", "last_version": 41}


# -- the stream checker: random commits, polls, pages and cuts ------------------------------


Merge = Callable[[int, int, Sequence[RangeAnswer]], Merged]


def answer(commits: list[Change], since: int, upto: int, limit: int) -> RangeAnswer:
    """What one range answers (as ``MvccStore.changes`` does): its changes in
    (since, upto], at most ``limit`` unless the first version is bigger."""
    window = sorted((x for x in commits if since < x.version_us <= upto),
                    key=lambda x: (x.version_us, x.key))
    if len(window) <= limit:
        return RangeAnswer(window, upto)
    cut = limit
    while cut > 0 and window[cut].version_us == window[cut - 1].version_us:
        cut -= 1
    if cut == 0:
        cut = sum(x.version_us == window[0].version_us for x in window)
        if cut == len(window):
            return RangeAnswer(window, upto)
    return RangeAnswer(window[:cut], window[cut].version_us - 1)


def run_stream(rng: random.Random, merge_fn: Merge = merge,
               buffer_cls: type[WatchBuffer] = WatchBuffer) -> tuple[list[Change], list[Change]]:
    """Commits land in three ranges over time while a watcher polls, reads part of
    its buffer, and now and then loses its connection and resumes, keeping (as the
    client does) the events it saw of a version it had not seen whole."""
    ranges: list[list[Change]] = [[], [], []]
    committed: list[Change] = []
    now = 1000
    delivered: list[Change] = []
    resume = now
    partial: set[tuple[int, bytes]] = set()

    def connect() -> WatchBuffer:
        return buffer_cls(50, resume, now_s=0.0)

    buffer = connect()
    for _ in range(120):
        for _ in range(rng.randrange(4)):  # commits: each a transaction in one range
            now += rng.randrange(1, 5)
            where = ranges[rng.randrange(3)]
            for key in rng.sample("abcdefgh", rng.randrange(1, 4)):
                change = Change(key.encode(), b"1", now)
                where.append(change)
                committed.append(change)
        since, upto = buffer.offered_us, now + rng.randrange(0, 3)
        now = max(now, upto)  # nothing commits at or below a point a poll read (safe time)
        limit = rng.randrange(1, 6)
        merged = merge_fn(since, upto, [answer(r, since, upto, limit) for r in ranges])
        fitted = fit(merged, buffer.room)
        if fitted is not None:
            buffer.offer(fitted)
        for _ in range(rng.randrange(0, 12)):
            item = buffer.pop(0.0)
            if isinstance(item, Change):
                at = (item.version_us, item.key)
                if at not in partial:
                    delivered.append(item)
                partial = {p for p in partial if p[0] > buffer.delivered_us} | (
                    {at} if buffer.delivered_us < item.version_us else set())
        if rng.random() < 0.15:  # the connection drops: resume where the buffer says
            resume = buffer.delivered_us
            buffer = connect()
    for _ in range(20):  # quiet at the end: everything comes out
        since = buffer.offered_us
        merged = merge_fn(since, now + 10, [answer(r, since, now + 10, 1000) for r in ranges])
        if (fitted := fit(merged, buffer.room)) is not None:
            buffer.offer(fitted)
        while (item := buffer.pop(0.0)) is not None:
            if isinstance(item, Change) and (item.version_us, item.key) not in partial:
                delivered.append(item)
    return committed, delivered


def check_stream(committed: list[Change], delivered: list[Change]) -> list[str]:
    """Every commit exactly once, in (version, key) order."""
    problems = []
    expected = sorted(committed, key=lambda x: (x.version_us, x.key))
    got = [(x.version_us, x.key) for x in delivered]
    if len(set(got)) != len(got):
        problems.append(f"{len(got) - len(set(got))} events delivered twice")
    missing = {(x.version_us, x.key) for x in expected} - set(got)
    if missing:
        problems.append(f"{len(missing)} commits never delivered, e.g. {sorted(missing)[:3]}")
    if got != sorted(got):
        problems.append("events out of (version, key) order")
    return problems


@pytest.mark.parametrize("seed", range(40))
def test_every_commit_once_in_order_across_pages_and_reconnects(seed: int) -> None:
    committed, delivered = run_stream(random.Random(seed))
    assert committed and check_stream(committed, delivered) == []


def _unfiltered_merge(since: int, upto: int, answers: Sequence[RangeAnswer]) -> Merged:
    """Planted: keeps the changes above the resolved point (they come again next poll)."""
    merged = merge(since, upto, answers)
    every = sorted((x for a in answers for x in a.changes), key=lambda x: (x.version_us, x.key))
    return Merged(every, merged.resolved_us)


def _highest_point_merge(since: int, upto: int, answers: Sequence[RangeAnswer]) -> Merged:
    """Planted: trusts the highest complete point, not the lowest (skips a range's rest)."""
    merged = merge(since, upto, [RangeAnswer(a.changes, upto) for a in answers])
    return merged


class _EagerBuffer(WatchBuffer):
    """Planted: resumes after a version as soon as one of its events is out."""

    def pop(self, now_s: float) -> Change | Progress | None:
        item = super().pop(now_s)
        if isinstance(item, Change):
            self.delivered_us = max(self.delivered_us, item.version_us)
        return item


@pytest.mark.parametrize("planted", [
    {"merge_fn": _unfiltered_merge}, {"merge_fn": _highest_point_merge},
    {"buffer_cls": _EagerBuffer}])
def test_the_stream_checker_catches_planted_bugs(planted: dict[str, object]) -> None:
    caught = 0
    for seed in range(40):
        committed, delivered = run_stream(random.Random(seed), **planted)  # type: ignore[arg-type]
        caught += bool(check_stream(committed, delivered))
    assert caught > 0


# -- MvccStore.changes --------------------------------------------------------------------------


def store_with(commits: dict[int, dict[bytes, bytes | None]]) -> MvccStore:
    store = MvccStore(MemoryEngine())
    for ts in sorted(commits):
        store.apply_now("ks", commits[ts], ts)
    return store


def test_changes_of_a_prefix_across_the_whole_ring_in_version_order() -> None:
    store = store_with({10: {b"p1": b"1", b"q": b"1"}, 20: {b"p2": b"2"},
                        30: {b"p1": None}, 40: {b"p3": b"3", b"p1": b"4"}})
    page = store.changes_now("ks", MIN_TOKEN, MIN_TOKEN, 10, 40, prefix=b"p", limit=100)
    assert page.items == [ChangeItem(b"p2", b"2", 20), ChangeItem(b"p1", None, 30),
                          ChangeItem(b"p1", b"4", 40), ChangeItem(b"p3", b"3", 40)]
    assert page.complete_through_us == 40
    one = store.changes_now("ks", 0, 0, 0, 35, exact=b"p1", limit=100)
    assert one.items == [ChangeItem(b"p1", b"1", 10), ChangeItem(b"p1", None, 30)]


def test_changes_of_wrapping_ranges_add_up_to_the_whole_ring() -> None:
    keys = [f"k{i}".encode() for i in range(60)]
    store = store_with({ts: {key: b"1"} for ts, key in enumerate(keys, start=1)})
    ends = [-(2**62), 0, 2**62, MAX_TOKEN]
    seen = []
    for start, end in zip([ends[-1], *ends[:-1]], ends):  # the first range wraps
        seen += store.changes_now("ks", start, end, 0, 100, limit=100).items
    assert sorted(item.key for item in seen) == sorted(keys)


def test_a_full_page_says_where_it_is_complete_and_keeps_a_transaction_whole() -> None:
    store = store_with({10: {b"a": b"1"}, 20: {b"b": b"1", b"c": b"1", b"d": b"1"},
                        30: {b"e": b"1"}})
    page = store.changes_now("ks", 0, 0, 0, 50, limit=2)
    assert [i.key for i in page.items] == [b"a"] and page.complete_through_us == 19
    page = store.changes_now("ks", 0, 0, 19, 50, limit=2)  # the whole transaction at 20
    assert [i.key for i in page.items] == [b"b", b"c", b"d"] and page.complete_through_us == 29
    page = store.changes_now("ks", 0, 0, 0, 50, limit=100, max_bytes=3)
    assert [i.key for i in page.items] == [b"a"] and page.complete_through_us == 19


def test_changes_below_the_gc_threshold_are_refused_naming_the_oldest_version() -> None:
    store = store_with({10: {b"a": b"1"}, 20: {b"a": b"2"}, 30: {b"a": b"3"}})
    assert store.gc("ks", 25).deleted == 1
    with pytest.raises(Compacted) as refused:
        store.changes_now("ks", 0, 0, 24, 40, limit=10)
    assert (refused.value.from_version, refused.value.oldest_version) == (24, 25)
    assert refused.value.http_status == 410 and BY_CODE["compacted"] is Compacted
    page = store.changes_now("ks", 0, 0, 25, 40, limit=10)  # from the threshold on: all there
    assert page.items == [ChangeItem(b"a", b"3", 30)]


def test_a_key_whose_token_is_outside_the_range_is_not_its_change() -> None:
    store = store_with({10: {b"a": b"1"}})
    token = token_for(b"a")
    assert store.changes_now("ks", token - 1, token, 0, 20, limit=5).items
    assert not store.changes_now("ks", token, token + 1, 0, 20, limit=5).items


def test_a_watch_needs_read_permission_on_its_keyspace() -> None:
    assert needs("watch", "w1", {}, b"") == [Need(READ, "w1")]
    assert needs("watch_keyspace", "w1", {"prefix": "true"}, b"") == [Need(READ, "w1")]
