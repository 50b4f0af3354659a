"""The read path's pure decisions: whom to ask, when it has enough, how answers
resolve (Dynamo §4.5; Cassandra's DigestResolver), and the snitch that ranks
replicas and times speculative retries (Dean and Barroso, "The Tail at Scale")."""

from __future__ import annotations

import pytest

from ringkv.coordinator.read_resolver import Ask, ReadRound, Resolution, resolve
from ringkv.coordinator.snitch import COLD_RETRY_S, MIN_SAMPLES, Snitch
from ringkv.hlc import Timestamp
from ringkv.quorum import Vote
from ringkv.versioning import Cell, cell_digest, tombstone

OLD = Cell(b'"old"', Timestamp(1))
NEW = Cell(b'"new"', Timestamp(2))
GONE = tombstone(Timestamp(3))


# -- resolve: data and digests in; winner, stale replicas, or "fetch data" out --

@pytest.mark.parametrize(
    "data,digests,corrupt,expected",
    [
        # Every digest matches the data: the data is the answer, nothing to repair.
        ({"a": NEW}, {"b": cell_digest(NEW), "c": cell_digest(NEW)}, [],
         Resolution(NEW, (), ())),
        # The key exists nowhere: the answer is "absent", and that is agreed too.
        ({"a": None}, {"b": cell_digest(None)}, [], Resolution(None, (), ())),
        # A digest disagrees: full data from every digest replica first.
        ({"a": OLD}, {"b": cell_digest(NEW), "c": cell_digest(OLD)}, [],
         Resolution(None, (), ("b", "c"))),
        # With full data: the newest wins; those that answered anything else are stale.
        ({"a": OLD, "b": NEW, "c": OLD}, {}, [], Resolution(NEW, ("a", "c"), ())),
        ({"a": None, "b": NEW}, {}, [], Resolution(NEW, ("a",), ())),
        # A tombstone is a newer write like any other (it wins, and is repaired).
        ({"a": NEW, "b": GONE}, {}, [], Resolution(GONE, ("a",), ())),
        # A replica whose record failed its checksum is repaired too.
        ({"a": NEW}, {"c": cell_digest(NEW)}, ["b"], Resolution(NEW, ("b",), ())),
        # Two data answers that disagree, even with matching digests, need resolving.
        ({"a": OLD, "c": NEW}, {"b": cell_digest(OLD)}, [], Resolution(None, (), ("b",))),
    ],
)
def test_resolve(data, digests, corrupt, expected) -> None:
    assert resolve(data, digests, corrupt) == expected


def test_resolve_needs_a_data_answer() -> None:
    with pytest.raises(ValueError):
        resolve({}, {"b": cell_digest(NEW)})


# -- ReadRound: one data read, block_for - 1 digests, spares when needed --

def test_a_read_asks_one_replica_for_data_and_the_others_for_digests() -> None:
    read = ReadRound(["a", "b", "c"], [], 3)
    assert read.start() == [Ask("a", True), Ask("b", False), Ask("c", False)]
    assert list(read.on_data("a", NEW)) == [] and read.vote is Vote.PENDING
    assert list(read.on_digest("b", cell_digest(NEW))) == [] and read.vote is Vote.PENDING
    assert list(read.on_digest("c", cell_digest(NEW))) == [] and read.vote is Vote.WON
    assert read.answered == ["a", "b", "c"]


def test_a_failure_that_loses_the_quorum_brings_in_a_spare_for_data() -> None:
    read = ReadRound(["a", "b"], ["c"], 2)
    read.start()
    read.on_data("a", NEW)
    assert read.on_failure("b") == [Ask("c", True)]
    assert read.speculative == ["c"] and read.vote is Vote.PENDING
    read.on_data("c", NEW)
    assert read.vote is Vote.WON


def test_a_failed_data_read_is_replaced_by_a_spare_data_read() -> None:
    read = ReadRound(["a", "b"], ["c"], 2)
    read.start()
    assert read.on_failure("a", corrupt=True) == [Ask("c", True)]
    read.on_digest("b", cell_digest(NEW))
    assert read.vote is Vote.PENDING  # a digest alone cannot finish a read
    read.on_data("c", NEW)
    assert read.vote is Vote.WON and read.corrupt == ["a"]


def test_without_spares_a_lost_read_is_lost() -> None:
    read = ReadRound(["a", "b"], [], 2)
    read.start()
    assert list(read.on_failure("b")) == []
    assert read.vote is Vote.LOST


def test_speculation_asks_one_spare_once() -> None:
    read = ReadRound(["a", "b"], ["c", "d"], 2)
    read.start()
    read.on_data("a", NEW)
    assert read.can_speculate
    assert read.on_slow() == [Ask("c", True)]
    assert not read.can_speculate and list(read.on_slow()) == []
    read.on_data("c", NEW)  # the spare answers before the slow replica
    assert read.vote is Vote.WON and "b" not in read.answered


def test_a_late_or_duplicate_answer_changes_nothing() -> None:
    read = ReadRound(["a", "b"], [], 2)
    read.start()
    read.on_data("a", NEW)
    read.on_data("a", OLD)  # delivered twice
    read.on_digest("z", cell_digest(OLD))  # never asked
    assert read.data == {"a": NEW} and read.digests == {} and read.vote is Vote.PENDING


# -- the snitch --

def test_the_snitch_ranks_this_node_first_then_the_fastest_peers() -> None:
    snitch = Snitch("a")
    snitch.answered("b", asked_at_s=0.0, now_s=0.050)
    snitch.answered("c", asked_at_s=0.0, now_s=0.010)
    assert snitch.by_proximity(["c", "b", "a"]) == ["a", "c", "b"]
    snitch.failed("c", timeout_s=2.0)  # a failure costs it the whole timeout
    assert snitch.by_proximity(["b", "c", "a"]) == ["a", "b", "c"]


def test_a_silent_replica_is_charged_for_the_wait_it_caused() -> None:
    snitch = Snitch("a")
    snitch.answered("b", 0.0, 0.001)
    snitch.answered("c", 0.0, 0.002)
    snitch.abandoned("b", asked_at_s=10.0, now_s=11.0)
    assert snitch.by_proximity(["b", "c"]) == ["c", "b"]


def test_speculative_retry_waits_for_enough_samples_and_has_a_floor() -> None:
    snitch = Snitch("a", retry_percentile=99.0, retry_min_s=0.02)
    assert snitch.speculate_after_s() == COLD_RETRY_S  # cold: a fixed wait, still a retry
    for i in range(MIN_SAMPLES - 1):
        snitch.answered("b", 0.0, 0.001)
    assert snitch.speculate_after_s() == COLD_RETRY_S
    snitch.answered("b", 0.0, 0.001)
    assert snitch.speculate_after_s() == 0.02  # the floor: 1 ms is below it
    snitch = Snitch("a", retry_percentile=50.0, retry_min_s=0.0)
    for i in range(100):
        snitch.answered("b", 0.0, i / 1000)
    assert snitch.speculate_after_s() == pytest.approx(0.050)


def test_a_speculative_answer_is_timed_from_its_own_request() -> None:
    snitch = Snitch("a")
    snitch.answered("c", asked_at_s=1.0, now_s=1.004)  # asked late, answered at once
    assert snitch.latencies.samples[-1] == pytest.approx(0.004)
