"""The recipes' decisions (``client/recipes_core.py``), without a cluster: who
holds, whom a waiter watches, the fencing check, and a randomized run of the
queue protocol that checks holders never overlap and tokens only grow."""

from __future__ import annotations

import random

import pytest

from ringkv.client import recipes_core as core
from ringkv.client.recipes_core import Entry, LockLost


def test_the_holder_is_the_first_live_entry_and_a_waiter_watches_the_one_ahead() -> None:
    a, b, c = Entry("jobs/a", 10), Entry("jobs/b", 20), Entry("jobs/c", 30)
    current = {"jobs/a": 10, "jobs/b": 20, "jobs/c": 30}
    alive = core.live([a, b, c], current)
    assert core.holder(alive) == a
    assert core.ahead_of(alive, a) is None
    assert core.ahead_of(alive, c) == b  # not the holder: no herd
    # b dies (its key deleted) and a is overwritten: c holds.
    current = {"jobs/a": 11, "jobs/c": 30}
    alive = core.live([a, b, c], current)
    assert alive == [c] and core.ahead_of(alive, c) is None
    with pytest.raises(LockLost):
        core.ahead_of(alive, a)  # a's creation version is gone: it lost the lock


def test_appending_prunes_the_dead_and_an_older_entry_of_the_same_key() -> None:
    a, b = Entry("q/a", 1), Entry("q/b", 2)
    after = core.appended([a, b], {"q/b": 2, "q/a": 1}, Entry("q/a", 5))
    assert after == [b, Entry("q/a", 5)]
    assert core.appended([a, b], {"q/b": 2}, Entry("q/c", 7)) == [b, Entry("q/c", 7)]
    assert core.removed([a, b], {"q/a": 1, "q/b": 2}, "q/a") == [b]
    with pytest.raises(OverflowError):
        core.appended([a, b], {"q/a": 1, "q/b": 2}, Entry("q/c", 7), max_entries=2)
    assert core.parse_queue(core.queue_value([a, b])) == [a, b]
    assert core.parse_queue(None) == []
    with pytest.raises(ValueError):
        core.parse_queue({"nope": 1})


def test_the_fencing_check_refuses_only_an_older_token() -> None:
    assert core.fencing_allows(5, None)
    assert core.fencing_allows(5, 5)  # the same holder writes again
    assert core.fencing_allows(6, 5)
    assert not core.fencing_allows(4, 5)
    assert core.fence_token(core.fence_value(9, "k")) == 9
    assert core.fence_token(None) is None


def test_names_and_members() -> None:
    assert core.contender_key("jobs", "txn:00ff") == "jobs/txn:00ff"
    assert core.member_of("workers", "workers/w1") == "w1"
    with pytest.raises(ValueError):
        core.contender_key("jobs", "a/b")


def simulate(seed: int, *, broken_ahead: bool = False) -> list[tuple[int, str, str]]:
    """Contenders queue, die, release; at each step every live contender that the
    core says is first believes it holds. Returns (step, event, who) for checking."""
    rng = random.Random(seed)
    clock = 0
    queue: list[Entry] = []
    keys: dict[str, int] = {}  # the store: key -> version (absent: gone)
    log: list[tuple[int, str, str]] = []
    tokens: dict[str, int] = {}
    for step in range(200):
        clock += 1
        roll = rng.random()
        if roll < 0.4:  # a new contender: put its key, then append (maybe interleaved)
            key = f"l/{step}"
            keys[key] = clock
            queue = core.appended(queue, keys, Entry(key, clock))
            clock += 1
            tokens[key] = clock  # the append's commit version
        elif roll < 0.7 and keys:  # one dies or releases: its key is deleted
            del keys[rng.choice(sorted(keys))]
        alive = core.live(queue, keys)
        holders = []
        for entry in alive:
            ahead = core.ahead_of(alive, entry)
            if broken_ahead:
                ahead = None if entry.version % 3 == 0 else ahead  # planted: some skip the queue
            if ahead is None:
                holders.append(entry.key)
        for who in holders:
            log.append((step, "holds", who))
        if len(holders) > 1:
            log.append((step, "overlap", ",".join(holders)))
        for who in holders:
            log.append((tokens[who], "token", who))
    return log


def check(log: list[tuple[int, str, str]]) -> None:
    assert not [e for e in log if e[1] == "overlap"], "two contenders held at once"
    succession: list[tuple[int, str]] = []
    for token, kind, who in log:
        if kind == "token" and (not succession or succession[-1][1] != who):
            succession.append((token, who))
    assert [t for t, _ in succession] == sorted({t for t, _ in succession}), \
        "a later holder had a smaller token"


@pytest.mark.parametrize("seed", range(30))
def test_holders_never_overlap_and_their_tokens_only_grow(seed: int) -> None:
    check(simulate(seed))


def test_the_checker_catches_a_planted_queue_jumper() -> None:
    caught = 0
    for seed in range(30):
        try:
            check(simulate(seed, broken_ahead=True))
        except AssertionError:
            caught += 1
    assert caught > 0
