"""The recipes' decisions (``client/recipes_core.py``), without a cluster: who
holds, whom a waiter watches, the fencing check, and a randomized run of the
queue protocol that checks holders never overlap and tokens only grow."""

from __future__ import annotations

import random
from typing import Any

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


# ---- sessions: queueing in one transaction -------------------------------------------

def test_a_join_is_one_transaction_that_says_who_is_live_ahead() -> None:
    lease = "txn:00000000000000ff"
    first = core.join_request("jobs", "jobs/a", {"v": 1}, lease, core.EMPTY_VIEW)
    assert first["conditions"] == [{"key": "jobs", "absent": True}] and first["reads"] == []
    assert first["writes"] == [
        {"op": "put", "key": "jobs/a", "value": {"v": 1}, "lease": lease},
        {"op": "put", "key": "jobs", "value": core.queue_value([], mine="jobs/a")}]
    # Committed at 10 with nobody ahead: it holds, and the view is the queue as written.
    mine, ahead, view = core.after_join(core.EMPTY_VIEW, "jobs/a", 10, {})
    assert mine == Entry("jobs/a", 10) and ahead == [] and view == core.QueueView(10, (mine,))
    # The stored value names its own entry's version null: a reader resolves it.
    stored = first["writes"][1]["value"]
    assert core.parse_queue(stored, 10) == [mine] and core.view_of(stored, 10) == view
    with pytest.raises(ValueError):
        core.parse_queue(stored)  # null, and no version to resolve it with
    # b joins behind a (conditioned on the queue's version, reading a's key).
    second = core.join_request("jobs", "jobs/b", None, lease, view)
    assert second["conditions"] == [{"key": "jobs", "version": 10}]
    assert second["reads"] == ["jobs/a"]
    b, ahead, view_b = core.after_join(view, "jobs/b", 12, {"jobs/a": 10})
    assert ahead == [mine] and view_b.entries == (mine, b)
    # a is released: b holds after reading only a's key and its own.
    assert core.still_ahead(ahead, b, {"jobs/a": None, "jobs/b": 12}) == []
    with pytest.raises(LockLost):
        core.still_ahead(ahead, b, {"jobs/a": None, "jobs/b": None})  # b's lease went
    # a joins again with the same key: its older (dead) entry is not ahead of it.
    again = core.join_request("jobs", "jobs/a", None, lease, view_b)
    assert again["reads"] == ["jobs/b"]
    assert core.without(view_b, "jobs/a").entries == (b,)
    with pytest.raises(OverflowError):
        core.join_request("jobs", "jobs/c", None, lease, view_b, max_entries=2)


def test_a_join_answered_without_its_reads_is_read_again_not_judged_all_dead() -> None:
    """A retried join whose first attempt committed is answered from the outcome alone:
    a commit and no reads. Read as "nobody live ahead", its contender would hold beside
    the live holder; ``join_answered`` says to read them again, and the read-back then
    judges the entries ahead, and the contender's own key."""
    holder = Entry("jobs/a", 10)
    view = core.QueueView(10, (holder,))
    plan = core.join_request("jobs", "jobs/b", None, "txn:00000000000000ff", view)
    assert core.join_answered(plan["reads"], {"jobs/a": 10})
    assert core.join_answered(plan["reads"], {"jobs/a": None})  # read, and absent
    assert not core.join_answered(plan["reads"], {})  # the replay's empty answer
    assert core.join_answered(core.join_request("jobs", "jobs/a", None, "l",
                                                core.EMPTY_VIEW)["reads"], {})
    # Read back after the commit at 12, with its own key: a is still ahead.
    mine, ahead, _ = core.after_join(view, "jobs/b", 12, {"jobs/a": 10, "jobs/b": 12})
    assert mine == Entry("jobs/b", 12) and ahead == [holder]
    with pytest.raises(LockLost):  # its own key went (lease) before the read-back
        core.after_join(view, "jobs/b", 12, {"jobs/a": 10, "jobs/b": None})


def test_a_waiters_read_of_the_queue_is_the_view_its_next_join_plans_from() -> None:
    """A waiter reads the queue beside the keys ahead of it and its own: the view it
    keeps is the queue as read, less the entries that read found dead, so that once it
    has held and released, its next join is conditioned on the queue's current version
    (it commits at once when nobody joined since) and does not plan to keep dead ones."""
    a, b, c = Entry("jobs/a", 10), Entry("jobs/b", 12), Entry("jobs/c", 14)
    stored = core.queue_value([a, b], mine="jobs/c")  # c's own join wrote it, at 14
    # b was read dead (a's key was not read: kept), c read live.
    view = core.view_read(stored, 14, {"jobs/b": None, "jobs/c": 14})
    assert view == core.QueueView(14, (a, c))
    # An entry whose key holds another version (put again: a new contender) is dead too.
    assert core.view_read(stored, 14, {"jobs/a": 11, "jobs/c": 14}).entries == (b, c)
    assert core.view_read(None, None, {}) == core.EMPTY_VIEW
    # c releases and joins again from it: conditioned on 14, reading only a's key.
    again = core.join_request("jobs", "jobs/c", None, "l", core.without(view, "jobs/c"))
    assert again["conditions"] == [{"key": "jobs", "version": 14}]
    assert again["reads"] == ["jobs/a"]


def test_a_sessions_recipes_under_one_name_get_their_own_keys() -> None:
    lease = "txn:00000000000000ff"
    assert core.session_owner(lease, set()) == lease  # etcd's <name>/<lease id>
    assert core.session_owner(lease, {lease}) == f"{lease}.2"
    assert core.session_owner(lease, {lease, f"{lease}.2"}) == f"{lease}.3"


def simulate_sessions(seed: int, *, broken: bool = False) -> list[tuple[int, str, str]]:
    """Clients with stale views of one queue, each with its own key (a session's),
    join in one transaction (a model store checks its condition and answers its
    reads at the commit), wait re-reading only the keys ahead, hold, release or lose
    their key (a lease lost). Returns the holders and tokens seen, for ``check``."""
    rng = random.Random(seed)
    store: dict[str, tuple[Any, int]] = {}  # key -> (value, version)
    clock = 0
    views = {c: core.EMPTY_VIEW for c in range(4)}
    state: dict[int, tuple[str, Entry | None, list[Entry]]] = {
        c: ("idle", None, []) for c in range(4)}
    log: list[tuple[int, str, str]] = []

    def version(key: str) -> int | None:
        return store[key][1] if key in store else None

    for step in range(300):
        c = rng.randrange(4)
        key = f"l/c{c}"
        status, mine, ahead = state[c]
        if rng.random() < 0.05 and key in store:  # the session's lease is lost
            del store[key]
        elif status == "idle":
            plan = core.join_request("l", key, None, "lease", views[c])
            guard = plan["conditions"][0]
            if version("l") != guard.get("version"):  # absent: None == None
                got = store.get("l")
                views[c] = core.view_of(*(got if got else (None, None)))
                continue  # plan again next time
            clock += 1
            current = {k: version(k) for k in plan["reads"]}
            for write in plan["writes"]:
                store[write["key"]] = (write["value"], clock)
            mine, ahead, views[c] = core.after_join(views[c], key, clock, current)
            state[c] = ("waiting", mine, ahead)
        elif status == "waiting":
            assert mine is not None
            current = {k: version(k) for k in [*(e.key for e in ahead), key]}
            got = store.get("l")  # read in the same snapshot: the next join plans from it
            views[c] = core.view_read(*(got if got else (None, None)), current)
            try:
                ahead = core.still_ahead(ahead, mine, current)
            except LockLost:
                state[c] = ("idle", None, [])
                continue
            if broken and len(ahead) == 1:
                ahead = []  # planted: a waiter that skips the last one ahead
            state[c] = ("holding", mine, []) if not ahead else ("waiting", mine, ahead)
        elif status == "holding" and rng.random() < 0.5:  # release: delete the key
            store.pop(key, None)
            views[c] = core.without(views[c], key)
            state[c] = ("idle", None, [])
        holders = [f"c{h}" for h, (s, m, _) in state.items()
                   if s == "holding" and m is not None and version(m.key) == m.version]
        for who in holders:
            token = state[int(who[1:])][1]
            assert token is not None
            log.append((token.version, "token", who))
        if len(holders) > 1:
            log.append((step, "overlap", ",".join(holders)))
    return log


@pytest.mark.parametrize("seed", range(30))
def test_sessions_holders_never_overlap_and_their_tokens_only_grow(seed: int) -> None:
    log = simulate_sessions(seed)
    assert len({who for _, kind, who in log if kind == "token"}) > 1  # they took turns
    check(log)


def test_the_checker_catches_a_planted_waiter_that_skips_the_one_ahead() -> None:
    caught = 0
    for seed in range(30):
        try:
            check(simulate_sessions(seed, broken=True))
        except AssertionError:
            caught += 1
    assert caught > 0


def test_a_join_that_keeps_losing_races_tries_until_its_deadline_not_a_fixed_count() -> None:
    """A lock's acquire has a deadline: contenders changing the queue first, however
    often, are no reason to give up before it (with four contenders a join lost 30
    races in a row in the benchmark). A join with no deadline (a group member's)
    stops after ``max_races``."""
    assert core.keep_joining(500, 50, now_s=10.0, deadline_s=10.5)
    assert not core.keep_joining(1, 50, now_s=10.5, deadline_s=10.5)
    assert core.keep_joining(49, 50, now_s=10.0, deadline_s=None)
    assert not core.keep_joining(50, 50, now_s=10.0, deadline_s=None)
