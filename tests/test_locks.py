"""The leader's lock table (ringkv/txn/locks.py): two-phase locking with wound-wait,
as Spanner's read-write transactions use it (Spanner §4.2.1; Rosenkrantz, Stearns and
Lewis 1978). An older transaction wounds a younger holder; a younger one waits. Waits
run only from younger to older, so no deadlock can form; a committing transaction
cannot be wounded."""

from __future__ import annotations

import random

import pytest

from ringkv.txn.locks import Acquired, Granted, LockTable, Mode

S, X = Mode.SHARED, Mode.EXCLUSIVE
OLD, MID, YOUNG = (1, "old"), (2, "mid"), (3, "young")


def test_shared_locks_share_and_exclusive_excludes() -> None:
    table = LockTable()
    assert table.acquire("a", OLD, b"k", S) == Acquired(True, ())
    assert table.acquire("b", YOUNG, b"k", S) == Acquired(True, ())
    assert table.acquire("b", YOUNG, b"j", X) == Acquired(True, ())
    assert table.holds("a", b"k") is S and table.holds("b", b"j") is X
    # Asking again for what one holds is granted at once (X covers S).
    assert table.acquire("b", YOUNG, b"j", S).granted


@pytest.mark.parametrize("requester,holder,wounded", [
    ("old", "young", ("young",)),  # older asks, younger holds: wound
    ("young", "old", ()),  # younger asks, older holds: wait
])
def test_wound_wait(requester: str, holder: str, wounded: tuple[str, ...]) -> None:
    priority = {"old": OLD, "young": YOUNG}
    table = LockTable()
    assert table.acquire(holder, priority[holder], b"k", X).granted
    assert table.acquire(requester, priority[requester], b"k", X) == Acquired(False, wounded)
    # When the holder goes (aborted by the caller, or committed), the waiter holds it.
    assert table.release(holder) == [Granted(requester, b"k", X)]
    assert table.holds(requester, b"k") is X


def test_a_committing_transaction_is_not_wounded() -> None:
    table = LockTable()
    assert table.acquire("young", YOUNG, b"k", X).granted
    table.start_commit("young")
    assert table.acquire("old", OLD, b"k", S) == Acquired(False, ())
    with pytest.raises(ValueError, match="committing"):
        table.acquire("young", YOUNG, b"j", X)
    assert table.release("young") == [Granted("old", b"k", S)]


def test_waiters_are_granted_oldest_first_and_readers_together() -> None:
    table = LockTable()
    assert table.acquire("w", (0, "w"), b"k", X).granted
    assert table.acquire("r2", (5, "r2"), b"k", S) == Acquired(False, ())
    assert table.acquire("x1", (4, "x1"), b"k", X) == Acquired(False, ())
    assert table.acquire("r1", (3, "r1"), b"k", S) == Acquired(False, ())
    # Oldest first: r1 (3); x1 (4) conflicts with r1, so r2 waits behind it too.
    assert table.release("w") == [Granted("r1", b"k", S)]
    assert table.release("r1") == [Granted("x1", b"k", X)]
    assert table.release("x1") == [Granted("r2", b"k", S)]
    assert table.release("r2") == [] and len(table) == 0


def test_a_younger_reader_does_not_overtake_an_older_waiting_writer() -> None:
    table = LockTable()
    assert table.acquire("r0", (9, "r0"), b"k", S).granted
    assert table.acquire("w", (1, "w"), b"k", X) == Acquired(False, ("r0",))
    assert table.acquire("r1", (10, "r1"), b"k", S) == Acquired(False, ())  # not granted
    # An older reader than the writer does go first: it waits for nobody younger.
    assert table.acquire("r-old", (0, "r-old"), b"k", S).granted


def test_an_upgrade_waits_for_the_other_readers_and_wounds_younger_ones() -> None:
    table = LockTable()
    assert table.acquire("old", OLD, b"k", S).granted
    assert table.acquire("young", YOUNG, b"k", S).granted
    assert table.acquire("old", OLD, b"k", X) == Acquired(False, ("young",))
    assert table.release("young") == [Granted("old", b"k", X)]


def test_release_forgets_a_waiting_transaction() -> None:
    table = LockTable()
    assert table.acquire("old", OLD, b"k", X).granted
    assert not table.acquire("young", YOUNG, b"k", X).granted
    with pytest.raises(ValueError, match="already waits"):
        table.acquire("young", YOUNG, b"j", X)
    assert table.release("young") == []  # aborted while waiting
    assert table.release("old") == [] and len(table) == 0


# -- no deadlock, mutual exclusion, progress: a randomized run -------------------------


class NoWound(LockTable):
    """A planted bug: conflicts never wound, so older transactions wait for younger."""

    def acquire(self, txn, priority, key, mode):  # type: ignore[no-untyped-def]
        return Acquired(super().acquire(txn, priority, key, mode).granted, ())


def run_transactions(seed: int, table: LockTable, txns: int = 12, keys: int = 4,
                     max_steps: int = 5_000) -> tuple[int, bool]:
    """Transactions lock 1-3 random keys (reads, then maybe writes) one at a time and
    commit; the wounded abort and retry with their first priority. Returns (steps,
    whether a deadlock - a cycle of waits - ever formed). Checks mutual exclusion
    at every step."""
    rng = random.Random(seed)
    plans = {f"t{i}": [(rng.randrange(keys), rng.choice([S, X]))
                       for _ in range(rng.randint(1, 3))] for i in range(txns)}
    priority = {t: (i, t) for i, t in enumerate(plans)}
    progress = dict.fromkeys(plans, 0)  # locks held so far
    waiting: dict[str, bool] = dict.fromkeys(plans, False)
    done: set[str] = set()
    deadlock = False
    for step in range(max_steps):
        active = [t for t in plans if t not in done and not waiting[t]]
        if not active:
            if len(done) == len(plans):
                return step, deadlock
            deadlock = True  # everyone left waits for someone: a cycle
            return step, deadlock
        t = rng.choice(active)
        if progress[t] == len(plans[t]):
            table.start_commit(t)
            for granted in table.release(t):
                waiting[str(granted.txn)] = False
                progress[str(granted.txn)] += 1
            done.add(t)
            continue
        key, mode = plans[t][progress[t]]
        got = table.acquire(t, priority[t], f"k{key}".encode(), mode)
        if got.granted:
            progress[t] += 1
        else:
            waiting[t] = True
        for victim in map(str, got.wound):  # abort: release everything, start over
            for granted in table.release(victim):
                waiting[str(granted.txn)] = False
                progress[str(granted.txn)] += 1
            progress[victim], waiting[victim] = 0, False
        for k in range(keys):
            holders = [(h, table.holds(h, f"k{k}".encode())) for h in plans]
            modes = [m for _, m in holders if m is not None]
            assert X not in modes or len(modes) == 1, f"step {step}: k{k} held by {holders}"
    raise AssertionError(f"no progress within {max_steps} steps")


@pytest.mark.parametrize("seed", range(200))
def test_wound_wait_never_deadlocks_and_everyone_commits(seed: int) -> None:
    steps, deadlock = run_transactions(seed, LockTable())
    assert not deadlock


def test_the_run_catches_a_deadlock_when_nothing_is_wounded() -> None:
    deadlocks = sum(run_transactions(seed, NoWound())[1] for seed in range(200))
    assert deadlocks > 0
