"""Which versions GC removes: never one a snapshot read at or above the
horizon would see (Spanner §4.1), in bounded batches that can stop anywhere."""

from __future__ import annotations

import random

import pytest

from ringkv.txn.mvcc_gc import MVCC_GC_S, GcCandidate, gc_horizon_us, plan_gc

S = 1_000_000


@pytest.mark.parametrize(
    ("now_us", "snapshots", "gc_s", "horizon"),
    [
        (1000 * S, [], MVCC_GC_S, 400 * S),  # nothing open: mvcc_gc_s ago
        (1000 * S, [900 * S], MVCC_GC_S, 400 * S),  # a recent snapshot does not hold GC back
        (1000 * S, [900 * S, 123 * S], MVCC_GC_S, 123 * S),  # the oldest open snapshot does
        (1000 * S, {400 * S}, MVCC_GC_S, 400 * S),
        (1000 * S, [], 0.5, 1000 * S - S // 2),
        (10 * S, [], MVCC_GC_S, 10 * S - 600 * S),  # early in time: below zero, collects nothing
    ],
)
def test_gc_horizon_is_the_older_of_gc_age_and_oldest_open_snapshot(
    now_us: int, snapshots, gc_s: float, horizon: int
) -> None:
    assert gc_horizon_us(now_us, snapshots, mvcc_gc_s=gc_s) == horizon


def test_gc_keeps_600_seconds_by_default() -> None:
    assert MVCC_GC_S == 600
    assert gc_horizon_us(1000 * S, iter(())) == 400 * S


def versions(owner: str, *stamps: int, tombstones: tuple[int, ...] = ()) -> list[GcCandidate]:
    """Candidates of one key, newest first, as the engine orders them."""
    ordered = sorted(stamps, reverse=True)
    return [
        GcCandidate(f"{owner}/{2**32 - ts:010d}".encode(), owner.encode(), ts, ts in tombstones)
        for ts in ordered
    ]


def raws(candidates: list[GcCandidate], *stamps: int) -> list[bytes]:
    return [c.raw for c in candidates if c.commit_ts_us in stamps]


@pytest.mark.parametrize(
    ("stamps", "tombstones", "horizon", "deleted"),
    [
        ((10, 20, 30), (), 25, (10,)),  # 20 is what a read at 25 sees; 10 is shadowed
        ((10, 20, 30), (), 5, ()),  # everything is above the horizon
        ((10, 20, 30), (), 30, (10, 20)),
        ((10, 20, 30), (20,), 25, (10, 20)),  # newest <= horizon is a tombstone: all of it goes
        ((10, 20, 30), (10,), 25, (10,)),
        ((10, 20, 30), (30,), 35, (10, 20, 30)),  # a deleted key vanishes
        ((10, 20, 30), (30,), 25, (10,)),  # the tombstone is above the horizon: it stays
        ((10,), (), 100, ()),  # a single live version is what reads see
        ((10,), (10,), 100, (10,)),
    ],
)
def test_plan_table(stamps, tombstones, horizon, deleted) -> None:
    candidates = versions("k", *stamps, tombstones=tombstones)
    plan = plan_gc(candidates, horizon, reached_end=True)
    assert sorted(plan.deletes) == sorted(raws(candidates, *deleted))
    assert plan.resume is None


def test_a_batch_ending_inside_a_key_keeps_its_tombstone_and_resumes_there() -> None:
    """Dropping the tombstone while an older version is left (in the next
    batch) would make that version visible again."""
    candidates = versions("k", 10, 20, 30, tombstones=(30,))
    plan = plan_gc(candidates[:2], 100, reached_end=False)
    assert plan.deletes == raws(candidates, 20)
    assert plan.resume == raws(candidates, 30)[0]
    # The next batch starts at the tombstone again, sees the rest, and drops all.
    rest = [candidates[0], candidates[2]]
    assert sorted(plan_gc(rest, 100, reached_end=True).deletes) == sorted(raws(candidates, 10, 30))


def test_a_batch_of_versions_above_the_horizon_resumes_after_the_last() -> None:
    candidates = versions("k", 50, 60)
    plan = plan_gc(candidates, 40, reached_end=False)
    assert plan.deletes == []
    assert plan.resume == candidates[-1].raw + b"\x00"


def test_a_tombstone_is_dropped_when_its_key_ends_inside_the_batch() -> None:
    candidates = versions("a", 10, 20, tombstones=(20,)) + versions("b", 5)
    plan = plan_gc(candidates, 100, reached_end=False)
    assert sorted(plan.deletes) == sorted(raws(candidates[:2], 10, 20))
    assert plan.resume == candidates[-1].raw  # b's kept version


def _visible(history: list[tuple[int, bool]], at_ts: int) -> tuple[int, bool] | None:
    below = [v for v in history if v[0] <= at_ts]
    return max(below) if below else None


def _as_read(version: tuple[int, bool] | None) -> int | None:
    """What a read returns: the version's timestamp, or None when absent or deleted."""
    return None if version is None or version[1] else version[0]


@pytest.mark.parametrize("seed", range(40))
def test_batched_plans_never_change_a_read_at_or_above_the_horizon(seed: int) -> None:
    """Random histories, random batch sizes: after every batch, every read at
    or above the horizon returns what it did before GC (Spanner §4.1)."""
    rng = random.Random(seed)
    history = {
        f"k{i}": [(ts, rng.random() < 0.3) for ts in rng.sample(range(1, 60), rng.randint(1, 8))]
        for i in range(rng.randint(1, 6))
    }
    horizon = rng.randint(0, 70)
    stored = sorted(
        (c for key, vs in history.items() for c in versions(key, *(ts for ts, _ in vs),
                                                           tombstones=tuple(ts for ts, t in vs if t))),
        key=lambda c: c.raw,
    )
    reads = range(horizon, 72)
    expected = {key: [_as_read(_visible(vs, t)) for t in reads] for key, vs in history.items()}
    cursor: bytes | None = b""
    for _ in range(200):
        assert cursor is not None
        batch_size = rng.randint(2, 5)
        batch = [c for c in stored if c.raw >= cursor][:batch_size]
        plan = plan_gc(batch, horizon, reached_end=len(batch) < batch_size)
        stored = [c for c in stored if c.raw not in set(plan.deletes)]
        for key in history:
            left = [(c.commit_ts_us, c.tombstone) for c in stored if c.owner == key.encode()]
            assert [_as_read(_visible(left, t)) for t in reads] == expected[key], (key, horizon)
        cursor = plan.resume
        if cursor is None:
            break
    assert cursor is None, "the pass did not finish"
    # And it collected: per key, only the versions above the horizon and the one it sees live.
    for key, vs in history.items():
        left = sorted((c.commit_ts_us, c.tombstone) for c in stored if c.owner == key.encode())
        seen = _visible(vs, horizon)
        keep = sorted(v for v in vs if v[0] > horizon) + ([seen] if seen and not seen[1] else [])
        assert left == sorted(keep)
