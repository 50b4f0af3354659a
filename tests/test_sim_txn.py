"""Transactions across ranges in the simulator (issue #13 §3): the bank and
list-append workloads.

Three real nodes run their ``TxnService`` on virtual time; the transactional
keyspace is cut into four ranges, each its own Paxos group, and every
transaction with writes spans at least two, so it commits by two-phase commit
over their groups (Spanner §4.2.1). Reads are lock-free read-only
transactions at ``TT.now().latest`` (§4.1.4). The bank checker
(``sim/bank.py``) judges every read-only snapshot: the accounts sum to the
starting total and none is negative. The list-append checker
(``sim/list_append.py``, Elle) infers the dependency graph with real-time
edges and reports every cycle (strict serializability). Negative controls
plant a broken participant and must be caught.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from ringkv.cli import build_parser, main, sim_settings
from ringkv.ring import MAX_TOKEN, MIN_TOKEN, TokenRing
from ringkv.sim.list_append_workload import ListAppendSpec, pick_keys
from ringkv.sim.run import (
    SimResult,
    SimSettings,
    TXN_KEYSPACE,
    format_line,
    format_report,
    format_totals,
    run_counts,
    simulate,
)
from ringkv.sim.txn_client import keys_across_ranges, range_index
from ringkv.txn.ranges import RangeMap


def txn(workload: str, seed: int, **extra: object) -> SimSettings:
    """Small and quick: a few dozen transactions over a few virtual seconds."""
    values: dict[str, object] = {
        "nodes": 3, "ops": 20, "clients": 4, "keys": 4 if workload == "bank" else 8,
        "duration_s": 2.5, "boot": "provisioned", "workload": workload, "max_skew_s": 0.2,
        "ranges": 4,
    }
    values.update(extra)
    return SimSettings(seed=seed, **values)  # type: ignore[arg-type]


def _explain(result: SimResult) -> str:
    return (f"seed {result.settings.seed} failed; replay with: {result.settings.command()}\n"
            + format_report(result))


# -- keys across ranges ---------------------------------------------------------------------


def test_keys_are_dealt_over_every_range_as_the_nodes_place_them() -> None:
    rng = random.Random(3)
    ring = TokenRing({f"n{i}": [rng.randint(MIN_TOKEN, MAX_TOKEN) for _ in range(4)]
                      for i in range(3)})
    ranges = RangeMap(TXN_KEYSPACE, ring, 3, 4)
    keys = keys_across_ranges("acct", 8, 4)
    assert len(set(keys)) == 8
    placed = [ranges.ranges.index(ranges.range_for_key(k.encode())) for k in keys]
    assert placed == [range_index(k, 4) for k in keys] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_every_list_append_transaction_spans_two_ranges() -> None:
    keys = ListAppendSpec(ops=10, clients=1, keys=8, ranges=4, duration_s=1.0,
                          keyspace=TXN_KEYSPACE).key_names
    rng = random.Random(1)
    for _ in range(200):
        picked = pick_keys(rng, keys, 4, 3)
        assert len(set(picked)) == len(picked) >= 2
        assert len({range_index(k, 4) for k in picked}) >= 2


# -- the sweeps: 200 seeds each under partition, crash, pause and skew -----------------------

# Skew within the bound: a minority of clocks (the falsetickers TrueTime tolerates)
# 100-200 ms off and drifting, stepping now and then; the rest true.
SWEEP = ("partition", "crash", "pause", "skew")
SWEEP_SEEDS = range(200)


@pytest.mark.parametrize("seed", SWEEP_SEEDS)
def test_bank_transfers_across_ranges_keep_every_snapshot_whole(seed: int) -> None:
    result = simulate(txn("bank", seed, nemesis=SWEEP))
    assert result.verdict("bank").ok, _explain(result)
    assert result.ok, _explain(result)
    assert result.fault_count > 0
    assert run_counts(result)["reads"] > 0


@pytest.mark.parametrize("seed", SWEEP_SEEDS)
def test_list_append_across_ranges_is_strictly_serializable(seed: int) -> None:
    result = simulate(txn("list-append", seed, nemesis=SWEEP))
    assert result.verdict("list-append").ok, _explain(result)
    assert result.ok, _explain(result)
    assert result.fault_count > 0


# -- the nemeses aimed at two-phase commit ------------------------------------------------------


@pytest.mark.parametrize("workload", ["bank", "list-append"])
@pytest.mark.parametrize("seed", range(5))
def test_coordinator_killed_between_prepare_and_commit_and_participant_cut_off(
        workload: str, seed: int) -> None:
    """Gray and Lamport: the coordinator group's next leader finishes what its log
    holds; a participant cut off while prepared learns the outcome afterwards;
    nothing stays prepared after healing (the health verdict)."""
    result = simulate(txn(workload, seed, ops=80, duration_s=10.0,
                          nemesis=("kill-coordinator", "cut-prepared")))
    assert result.ok, _explain(result)
    faults = "\n".join(result.faults)
    assert "coordinator group" in faults or "participant group" in faults, faults


def test_the_two_pc_nemeses_strike_in_their_window() -> None:
    """Over a few seeds, both fire: a coordinator's leader killed between prepare
    and commit, and a participant's leader cut off while it holds a prepared
    transaction."""
    lines = [line for seed in range(3) for line in simulate(txn(
        "bank", seed, ops=60, duration_s=8.0,
        nemesis=("kill-coordinator", "cut-prepared"))).faults]
    assert any("leader of coordinator group" in line and "between prepare and commit" in line
               for line in lines), lines
    assert any("leader of participant group" in line and "prepared" in line
               for line in lines), lines


# -- negative controls ---------------------------------------------------------------------------


def _caught(settings: list[SimSettings], fault: str, verdict: str) -> list[SimResult]:
    """Every run passes as it is, and the same runs with ``fault`` planted: those caught."""
    caught = []
    for healthy in settings:
        result = simulate(healthy)
        assert result.ok, _explain(result)
        broken = simulate(dataclasses.replace(healthy, fault=fault))
        if not broken.ok:
            assert not broken.verdict(verdict).ok, format_report(broken)
            assert broken.verdict(verdict).excerpt, format_report(broken)
            assert "replay with:" in format_report(broken)
            caught.append(broken)
    return caught


def test_early_lock_release_is_caught_by_the_bank() -> None:
    """Two-phase locking: a participant that lets its locks go when it votes yes lets
    a second transfer read a balance the first is about to overwrite (a lost
    update): money appears or vanishes in a snapshot."""
    runs = [txn("bank", seed, ops=60, duration_s=5.0) for seed in (2, 3)]
    caught = _caught(runs, "early-lock-release", "bank")
    assert caught, "early-lock-release was never caught"
    assert "wrong-total" in "\n".join(caught[0].verdict("bank").excerpt)


def test_early_lock_release_is_caught_by_list_append() -> None:
    """The same bug seen by Elle: transactions read around one that still commits,
    so the dependency graph has a cycle."""
    runs = [txn("list-append", seed, ops=200, duration_s=10.0, clients=8, keys=4)
            for seed in (1, 2)]
    caught = _caught(runs, "early-lock-release", "list-append")
    assert caught, "early-lock-release was never caught"
    assert any(line.startswith("G") for line in caught[0].verdict("list-append").excerpt)


def test_skip_prepare_log_is_caught_by_the_bank() -> None:
    """Spanner §4.1.3 and §4.2.1: a participant that votes yes without logging its
    prepare holds no replica's safe time back (a read-only transaction reads one
    half of a transfer) and its group's next leader knows nothing of it (its half
    of a transfer is lost): a snapshot no longer sums to the total."""
    runs = [txn("bank", seed, ops=150, duration_s=12.0, clients=6,
                nemesis=("kill-coordinator", "cut-prepared")) for seed in (1, 4)]
    caught = _caught(runs, "skip-prepare-log", "bank")
    assert caught, "skip-prepare-log was never caught"


def test_the_fault_switches_and_nemeses_belong_to_their_workload() -> None:
    with pytest.raises(ValueError, match="early-lock-release"):
        SimSettings(seed=1, fault="ack-without-write", workload="bank")
    with pytest.raises(ValueError, match="skip-commit-wait"):
        SimSettings(seed=1, fault="early-lock-release", workload="register")
    with pytest.raises(ValueError, match="kill-coordinator"):
        SimSettings(seed=1, workload="register", nemesis=("kill-coordinator",))
    with pytest.raises(ValueError, match="ranges"):
        SimSettings(seed=1, workload="list-append", ranges=1)
    assert SimSettings(seed=1, workload="list-append", fault="skip-commit-wait").fault


# -- replay and history export ----------------------------------------------------------------


def test_same_seed_same_history_and_the_command_replays_it() -> None:
    settings = txn("list-append", 4, nemesis=("partition", "crash"), ranges=3)
    first, again = simulate(settings), simulate(settings)
    assert first.history_hash == again.history_hash
    assert [op.line() for op in first.history] == [op.line() for op in again.history]
    command = settings.command().split()
    assert "--ranges" in command and "list-append" in command
    assert sim_settings(build_parser().parse_args(command[1:])) == settings
    assert "anomalies 0" in format_line(first)
    assert "anomalies (G0, G1a/b/c, G-single, G2, with real time): 0" in format_totals([first])


def _pairs(events: list[dict[str, object]]) -> None:
    """Every invoke is followed by one completion of the same process, in time order."""
    open_: dict[object, dict[str, object]] = {}
    times = [e["time"] for e in events]
    assert times == sorted(times)  # type: ignore[type-var]
    for event in events:
        if event["type"] == "invoke":
            assert event["process"] not in open_
            open_[event["process"]] = event
        else:
            assert event["type"] in ("ok", "fail", "info")
            assert open_.pop(event["process"])["f"] == event["f"]
    assert not open_


@pytest.mark.parametrize("workload", ["bank", "list-append"])
def test_history_out_writes_the_client_history_in_jepsen_form(workload: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    out = tmp_path / "history.json"
    settings = txn(workload, 2, nemesis=("crash",))
    code = main([*settings.command().split()[1:], "--history-out", str(out)])
    assert code == 0, capsys.readouterr().out
    events = json.loads(out.read_text())
    _pairs(events)
    result = simulate(settings)
    assert events == json.loads(json.dumps(result.jepsen_events()))
    if workload == "bank":
        assert {e["f"] for e in events} == {"transfer", "read"}
        assert any(e["type"] == "ok" and e["f"] == "transfer" for e in events)
        reads = [e["value"] for e in events if e["type"] == "ok" and e["f"] == "read"]
        assert any(len(r) == 4 and sum(r.values()) == 40 for r in reads)
    else:
        assert {e["f"] for e in events} == {"txn"}
        appended = [op for e in events if e["type"] == "ok" for op in e["value"]
                    if op[0] == "append"]
        assert appended and all(isinstance(op[2], int) for op in appended)
    # A series writes one file per seed.
    main([*dataclasses.replace(settings, seed=5).command().split()[1:], "--seeds", "2",
          "--history-out", str(out)])
    assert json.loads((tmp_path / "history.seed5.json").read_text())
    assert json.loads((tmp_path / "history.seed6.json").read_text())


def test_history_out_for_the_register_workload(tmp_path: Path) -> None:
    out = tmp_path / "register.json"
    settings = SimSettings(seed=1, nodes=3, ops=30, clients=3, keys=2, duration_s=3.0,
                           boot="provisioned", workload="register")
    assert main([*settings.command().split()[1:], "--history-out", str(out)]) == 0
    events = json.loads(out.read_text())
    _pairs(events)
    assert {e["f"] for e in events} <= {"read", "write", "cas", "snapshot"}


# -- long runs -------------------------------------------------------------------------------------


@pytest.mark.soak
@pytest.mark.parametrize("workload", ["bank", "list-append"])
def test_soak_two_thousand_seeds(workload: str) -> None:
    failed = [r for seed in range(200, 2200)
              if not (r := simulate(txn(workload, seed, nemesis=SWEEP))).ok]
    assert not failed, "\n\n".join(_explain(r) for r in failed[:3])


@pytest.mark.soak
@pytest.mark.parametrize("workload", ["bank", "list-append"])
def test_soak_two_pc_nemeses_and_every_register_nemesis(workload: str) -> None:
    nemesis = ("partition", "crash", "pause", "skew", "clog", "leader", "kill-coordinator",
               "cut-prepared")
    failed = [r for seed in range(200)
              if not (r := simulate(txn(workload, seed, ops=100, duration_s=10.0,
                                        nemesis=nemesis))).ok]
    assert not failed, "\n\n".join(_explain(r) for r in failed[:3])


# -- the README's figures ---------------------------------------------------------------------


def test_the_across_ranges_figures_render_after_the_main_table() -> None:
    """Its rows and footnotes (numbered on from the main table's); a block alone can be
    rewritten (``--block across``) and an unknown one is refused."""
    from collections import Counter

    from ringkv.sim import guarantees

    totals = {name: Counter({"runs": 10, "ops": 3000, "committed": 700, "aborted": 50,
                             "unknown": 20, "reads": 1500, "anomalies": 0, "faults": 90,
                             "failed": 0, "unhealthy": 0})
              for name in guarantees.ACROSS_FOOTNOTES}
    totals["across_ctl_spl_bank"].update(failed=6, anomalies=31)
    text = guarantees.render_across(totals)
    first = len(guarantees.TABLE_FOOTNOTES) + 1
    for i, name in enumerate(guarantees.ACROSS_FOOTNOTES, start=first):
        assert f"\n{i}. `{guarantees.ACROSS_COMMANDS[name]}`" in text
    assert "**0 wrong snapshots** (sum or sign) in 10 runs" in text
    assert "**0 of 1,500 bank snapshots wrong**" in text
    assert "caught in 6 of 10 runs (31 wrong snapshots or anomalies)" in text
    for name in guarantees.ACROSS_FOOTNOTES:
        settings, seeds = guarantees.parse_command(guarantees.ACROSS_COMMANDS[name])
        assert settings.workload in ("bank", "list-append") and seeds == 10
    with pytest.raises(ValueError, match="no figure block nope"):
        guarantees.generate("", blocks=("nope",))


# -- a bug these runs found ------------------------------------------------------------------


def test_a_new_leader_reads_nothing_around_a_prepared_transaction() -> None:
    """Found by this workload: T8 appends to list16, list1 and list0 (three ranges)
    and its answer is lost; T14 (15.5-16.1 s) reads list16 with T8's append; T25
    (20.2-21.5 s), later in real time, read list0 without it, at list0's range's
    leader elected moments before, whose 2PC role had not yet recovered T8 (prepared
    there) nor re-taken its locks: the read took free shared locks and answered at
    the held-back safe time (G-single-realtime). A new leader now serves no
    one-range read or transaction before its 2PC roles have recovered."""
    result = simulate(txn("list-append", 4, ops=80, duration_s=10.0,
                          nemesis=("kill-coordinator", "cut-prepared")))
    assert result.ok, _explain(result)
    assert result.fault_count > 0
