"""The scale report (issue #12 §6) at small N, and its checker against planted faults.

The full report (10 to 1,000 nodes) is `python -m bench scale`; here 20 and 40
nodes show the same shape in seconds: a join gossips to everyone in
O(log N) rounds, a join or leave streams about 1/N of the data and a join
streams to the joiner alone (Dynamo §4.2, §6.2), and a QUORUM operation
at RF 3 plans the same messages whatever N is.
"""

from __future__ import annotations

import math
import random

import pytest

from bench.scale import main as bench_main
from ringkv.sim.scale import (
    JOINER,
    RF,
    balanced_ring,
    check,
    coordinator_messages,
    measure,
    moved_share,
)


@pytest.fixture(scope="module")
def healthy() -> list:
    return [measure(20, 1), measure(40, 1)]


def test_healthy_report_is_within_every_bound(healthy: list) -> None:
    assert check(healthy) == []
    for row in healthy:
        # Dynamo §6.2: a join moves about the joiner's fair share, a leave the leaver's.
        assert row.join_moved == pytest.approx(row.join_ideal, rel=0.25)
        assert row.leave_moved == pytest.approx(row.leave_ideal, rel=0.5)
        assert row.join_receivers == [JOINER]
        assert row.rounds_to_converge is not None and row.rounds_to_converge >= 1
        # RF 3 QUORUM: three writes and three acks; one data read and one digest, answered.
        assert (row.write_msgs, row.read_msgs) == (6.0, 4.0)
        assert row.write_network_msgs < row.write_msgs  # the coordinator is sometimes a replica


def test_moved_share_measures_streamed_copies() -> None:
    ring = balanced_ring(10, random.Random(3))
    assert moved_share(ring, ring, RF) == (0.0, [])
    leaver = ring.node_ids[0]
    moved, receivers = moved_share(ring, ring.without_node(leaver), RF)
    # A leave streams exactly the leaver's replicated share, to nodes other than it.
    assert moved == pytest.approx(ring.ownership(RF)[leaver] / RF)
    assert leaver not in receivers and receivers


def test_messages_per_op_do_not_depend_on_cluster_size() -> None:
    counts = [coordinator_messages(balanced_ring(n, random.Random(n)), random.Random(1), ops=50)
              for n in (5, 50, 500)]
    assert {(c["write"], c["read"]) for c in counts} == {(6.0, 4.0)}


def test_checker_catches_gossip_that_does_not_relay() -> None:
    # Planted: only the joiner itself passes on its state, so news of it spreads
    # one contact at a time (about N log N / 2 rounds), not by epidemic.
    rows = [measure(20, 1, fault="no-relay", max_rounds=30),
            measure(40, 1, fault="no-relay", max_rounds=30)]
    problems = check(rows)
    assert any("N=40" in p and "rounds" in p for p in problems), problems
    assert not any("moves" in p or "per op" in p for p in problems), problems


def test_checker_catches_a_join_that_redeals_the_ring() -> None:
    # Planted: placement by hash mod N, the whole ring dealt afresh on a join.
    rows = [measure(10, 1, fault="rehash"), measure(20, 1, fault="rehash")]
    problems = check(rows)
    assert any("a join moves" in p for p in problems), problems
    assert any("not to the joiner alone" in p for p in problems), problems
    assert all(row.join_moved > 0.5 for row in rows)


def test_checker_catches_a_coordinator_that_asks_every_node() -> None:
    rows = [measure(10, 1, fault="broadcast"), measure(20, 1, fault="broadcast")]
    problems = check(rows)
    assert any("write msgs per op differ" in p for p in problems), problems
    assert any("read msgs per op differ" in p for p in problems), problems


def test_convergence_bound_is_logarithmic() -> None:
    from ringkv.sim.scale import rounds_bound

    # The bound itself must stay O(log N): 1,000 nodes get about twice the rounds of 30.
    assert rounds_bound(1000) < 2 * rounds_bound(30)
    assert rounds_bound(1000) == pytest.approx(4 * math.log2(1001) + 4)


def test_bench_command_writes_results_and_fails_on_a_planted_fault(tmp_path, capsys) -> None:
    out = tmp_path / "scale.json"
    assert bench_main(["--sizes", "10,12", "--json", "--out", str(out)]) == 0
    assert '"problems": []' in out.read_text()
    assert bench_main(["--sizes", "10,12", "--fault", "broadcast", "--out", str(out)]) == 1
    assert "differ across N" in capsys.readouterr().out
