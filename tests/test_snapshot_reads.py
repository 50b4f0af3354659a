"""The snapshot-read checker (Spanner §4.1.3): a read at ``t`` returns the newest commit
at or below ``t``. Each rule is shown to pass a correct read and to catch a wrong one."""

from __future__ import annotations

from ringkv.sim.snapshot_reads import (
    COMMITTED,
    FAILED,
    UNKNOWN,
    KnownWrite,
    SnapshotRead,
    check_snapshot_reads,
    check_staleness,
)

WRITES = [
    KnownWrite("r0", "a", COMMITTED, 100),
    KnownWrite("r0", "b", COMMITTED, 200),
    KnownWrite("r0", "lost", FAILED),
    KnownWrite("r0", "maybe", UNKNOWN),
    KnownWrite("r1", "other", COMMITTED, 150),
]


def read(at: int, value: str | None, version: int | None = None, key: str = "r0") -> SnapshotRead:
    return SnapshotRead(7, "c1", "n2", key, f"snapshot_ts={at}", at, value, version)


def judge(*reads: SnapshotRead) -> tuple[bool, int, tuple[str, ...]]:
    verdict = check_snapshot_reads(reads, WRITES)
    return verdict.ok, verdict.count, verdict.excerpt


def test_the_newest_commit_at_or_below_the_timestamp_passes() -> None:
    ok, count, _ = judge(read(99, None), read(100, "a", 100), read(199, "a", 100),
                         read(200, "b", 200), read(10_000, "b", 200), read(150, "other", 150, "r1"))
    assert ok and count == 0


def test_a_read_that_misses_a_commit_at_or_below_its_timestamp_is_caught() -> None:
    """What a replica serving above its safe time returns: an older value, or none."""
    ok, count, excerpt = judge(read(200, "a", 100), read(120, None))
    assert not ok and count == 2
    assert "missed 'b', committed at 200" in excerpt[0]
    assert "missed 'a', committed at 100" in excerpt[1]


def test_a_read_that_returns_a_commit_above_its_timestamp_is_caught() -> None:
    ok, _, excerpt = judge(read(150, "b", 200))
    assert not ok and "committed at 200, after the read's timestamp" in excerpt[0]


def test_values_never_written_or_never_committed_are_caught() -> None:
    ok, count, excerpt = judge(read(300, "ghost", 250), read(300, "lost", 250),
                               read(300, "other", 150))  # r1's value, read from r0
    assert not ok and count == 3
    assert "never written" in excerpt[0] and "never committed" in excerpt[1]
    assert "never written" in excerpt[2]


def test_a_version_that_disagrees_with_the_known_commit_is_caught() -> None:
    ok, _, excerpt = judge(read(300, "b", 250))
    assert not ok and "version 250, but that write committed at 200" in excerpt[0]


def test_an_unknown_write_may_be_read_where_it_fits_among_the_known_commits() -> None:
    """An indeterminate write may have committed: at the timestamp the read names, if
    that is at or below the read's and no known commit lies between them."""
    assert judge(read(300, "maybe", 250))[0]
    ok, count, excerpt = judge(read(300, "maybe", 150), read(300, "maybe", 350),
                               read(300, "maybe", None))
    assert not ok and count == 3
    assert "newer than what it returned" in excerpt[0]
    assert "after the read's timestamp" in excerpt[1]
    assert "without a commit timestamp" in excerpt[2]


def test_a_bounded_staleness_read_older_than_its_bound_is_caught() -> None:
    """``?max_staleness_ms=``: served at a timestamp at most the bound before the true
    time at which it was asked (waiting for it is fine; older is not)."""
    asked_us = 10_000_000

    def bounded(read_ts_us: int) -> SnapshotRead:
        return SnapshotRead(3, "c0", "n1", "r0", "max_staleness_ms=250", read_ts_us, "b", 200,
                            250_000, asked_us)

    assert check_staleness([bounded(asked_us - 250_000), bounded(asked_us + 5_000),
                            read(100, "a", 100)]).ok  # a snapshot_ts read has no bound
    verdict = check_staleness([bounded(asked_us - 250_001), bounded(asked_us)])
    assert not verdict.ok and verdict.count == 1
    assert "250.001 ms before it was asked" in verdict.excerpt[0]
