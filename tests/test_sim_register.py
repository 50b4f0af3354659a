"""The register workload on the transactional tier, in the simulator (issue #11, §7).

Real nodes run their ``TxnService`` (Multi-Paxos groups with leases, TrueTime
from peer pings, commit wait) on virtual time. Clients read, write and
compare-and-set a few registers through random nodes; the history is judged
by the linearizability checker (Herlihy and Wing; Wing and Gong's search),
and, white-box against the simulator's true time, every commit's timestamp
``s`` must lie in the past when its leader answers (Spanner §4.1.2, commit
wait). Clients also make snapshot reads through any replica (Spanner §4.1.3):
each must return the newest commit at or below its timestamp, a bounded-
staleness read must be no older than its bound, and, white-box, every one
must be served at or below the serving replica's safe time. Negative
controls plant a broken node and must be caught.
"""

from __future__ import annotations

import dataclasses

import pytest

from ringkv.cli import build_parser, sim_settings
from ringkv.sim.run import (
    SimResult,
    SimSettings,
    format_line,
    format_report,
    run_counts,
    simulate,
)


def register(seed: int, **extra: object) -> SimSettings:
    values: dict[str, object] = {
        "nodes": 3, "ops": 100, "clients": 4, "keys": 3, "duration_s": 10.0,
        "boot": "provisioned", "workload": "register", "max_skew_s": 0.2,
    }
    values.update(extra)
    return SimSettings(seed=seed, **values)  # type: ignore[arg-type]


def _explain(result: SimResult) -> str:
    return (f"seed {result.settings.seed} failed; replay with: {result.settings.command()}\n"
            + format_report(result))


# -- the sweep: Spanner §4.1.2 (commit wait) and §4.2 (strict serializability) -------------

# Skew within the bound: a minority of clocks (the falsetickers TrueTime tolerates)
# 100-200 ms off and drifting up to 200 ppm, stepping now and then; the rest true.
SWEEP = ("partition", "crash", "pause", "skew")
SWEEP_SEEDS = range(200)


@pytest.mark.parametrize("seed", SWEEP_SEEDS)
def test_registers_stay_linearizable_and_commit_wait_holds_under_faults(seed: int) -> None:
    # One seed in four runs five nodes, so ranges have different replica sets and
    # requests are forwarded from nodes outside the group.
    settings = register(seed, nemesis=SWEEP) if seed % 4 else register(
        seed, nemesis=SWEEP, nodes=5, keys=4)
    result = simulate(settings)
    assert result.verdict("linearizable").ok, _explain(result)
    assert result.verdict("commit wait").ok, _explain(result)
    assert result.verdict("snapshot reads").ok, _explain(result)
    assert result.verdict("safe time").ok, _explain(result)
    assert result.ok, _explain(result)
    assert result.fault_count > 0


@pytest.mark.parametrize("seed", range(10))
def test_killing_or_cutting_off_the_leader_keeps_registers_linearizable(seed: int) -> None:
    result = simulate(register(seed, nemesis=("leader", "clog")))
    assert any("leader" in line for line in result.faults), "\n".join(result.faults)
    assert result.ok, _explain(result)


# -- negative controls -----------------------------------------------------------------------


def test_a_leader_that_skips_commit_wait_is_caught() -> None:
    """Spanner §4.1.2: without commit wait a client may hear of a commit whose ``s``
    is still in the future (the 5 ms ε floor exceeds the replication time here)."""
    healthy = simulate(register(1))
    assert healthy.ok, _explain(healthy)
    broken = simulate(dataclasses.replace(healthy.settings, fault="skip-commit-wait"))
    caught = broken.verdict("commit wait")
    assert not caught.ok and caught.count > 0 and caught.excerpt, format_report(broken)
    assert "replay with:" in format_report(broken)


def test_a_node_without_the_clock_fence_is_caught_under_skew_beyond_the_bound() -> None:
    """TrueTime's fence (issue #11 §1): a node whose clock is 1-2 s off (beyond the 250 ms
    bound) must refuse; one that carries on with its own clock is caught."""
    settings = register(1, nemesis=("skew", "leader"), max_skew_s=2.0)
    healthy = simulate(settings)
    assert healthy.ok, _explain(healthy)
    assert any("falseticker" in line for line in healthy.faults)
    broken = simulate(dataclasses.replace(settings, fault="no-fencing"))
    assert not broken.ok, format_report(broken)
    assert not broken.verdict("commit wait").ok, format_report(broken)


def test_a_replica_that_serves_snapshot_reads_above_its_safe_time_is_caught() -> None:
    """Spanner §4.1.3: a replica may serve a read at ``t`` only once its safe time has
    passed ``t``. One that serves at once is caught white-box in every run, and,
    black-box, reads that miss commits at or below their timestamp (a partitioned
    follower far behind) in most."""
    seeds = range(1, 5)
    healthy = [simulate(register(seed, nemesis=("partition",))) for seed in seeds]
    for result in healthy:
        assert result.ok, _explain(result)
        assert run_counts(result)["snapshots"] > 0
    broken = [simulate(dataclasses.replace(r.settings, fault="snapshot-ignores-safe-time"))
              for r in healthy]
    for result in broken:
        unsafe = result.verdict("safe time")
        assert not unsafe.ok and unsafe.count > 0 and unsafe.excerpt, format_report(result)
        assert "above its safe time" in unsafe.excerpt[0]
    wrong = [r.verdict("snapshot reads") for r in broken if not r.verdict("snapshot reads").ok]
    assert len(wrong) >= 2, "\n\n".join(format_report(r) for r in broken)
    assert all(v.count > 0 and "missed" in "".join(v.excerpt) for v in wrong)
    assert "replay with:" in format_report(broken[0])


def test_the_fault_switches_belong_to_their_workload() -> None:
    with pytest.raises(ValueError, match="skip-commit-wait"):
        SimSettings(seed=1, fault="ack-without-write", workload="register")
    with pytest.raises(ValueError, match="ack-without-write"):
        SimSettings(seed=1, fault="skip-commit-wait")
    with pytest.raises(ValueError, match="workload"):
        SimSettings(seed=1, workload="counter")


# -- replay ------------------------------------------------------------------------------------


def test_same_seed_same_register_history_and_the_command_replays_it() -> None:
    settings = register(4, nemesis=("partition", "crash"))
    first, again = simulate(settings), simulate(settings)
    assert first.history_hash == again.history_hash
    assert [op.line() for op in first.history] == [op.line() for op in again.history]
    assert simulate(register(5, nemesis=("partition", "crash"))).history_hash \
        != first.history_hash
    command = settings.command().split()
    assert "--workload" in command
    parsed = sim_settings(build_parser().parse_args(command[1:]))
    assert parsed == settings
    assert "not linearizable 0" in format_line(first)
    assert "snapshot reads wrong 0, too stale 0, above safe time 0" in format_line(first)
