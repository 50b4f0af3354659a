"""Jepsen's bank across hosts (``python -m ringkv.chaos.txn_bank --netns``): three
namespace hosts, each group's leader cut off by real iptables drops (all its
links, or only its outgoing packets), judged by the same bank checker as the
loopback run (``tests/test_txn_jepsen_bank.py``): every audit sums to the
starting total, no balance is negative, no two committed transfers wrote over
one version of an account."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ringkv.chaos.txn_bank import (
    HISTORY_FILE,
    NETNS_FAULT_KINDS,
    NETNS_HOLD_S,
    NetnsTxnBankRun,
    netns_schedule,
)
from ringkv.chaos.txn_run import LEASE_S
from tests.hosts import netns_hosts

SEED = 1
DURATION_S = 22.0  # two partitions, one of each kind (at 3 s and 14 s): about 45 s in all
RANGES = 4


def test_the_schedule_cuts_leaders_both_ways_for_longer_than_a_lease() -> None:
    for seed in range(20):
        faults = netns_schedule(seed, DURATION_S)
        assert {f.kind for f in faults} == set(NETNS_FAULT_KINDS), seed
        assert all(LEASE_S < NETNS_HOLD_S[0] <= f.hold_s <= NETNS_HOLD_S[1] for f in faults)
        assert all(f.at_s + f.hold_s < DURATION_S - 1.0 for f in faults)
        for fault, following in zip(faults, faults[1:]):
            assert fault.at_s + fault.hold_s < following.at_s
    assert netns_schedule(3, DURATION_S) == netns_schedule(3, DURATION_S)


@pytest.mark.cluster
@pytest.mark.soak
@pytest.mark.timeout(300)
def test_transfers_across_ranges_keep_the_total_when_leaders_are_cut_off(
        tmp_path: Path) -> None:
    with netns_hosts(3) as hosts:
        run = NetnsTxnBankRun(tmp_path, hosts, seed=SEED, duration_s=DURATION_S, clients=6,
                              ranges=RANGES)
        try:
            report = asyncio.run(run.run())
        finally:
            assert all(p.proc is None or p.proc.poll() is not None for p in run.procs), \
                "left running"
            assert all("DROP" not in hosts.rules(i) for i in range(3)), "left partitioned"
    summary = report.summary()
    print(summary)
    assert {fault.kind for fault, _, _ in report.faults} == set(NETNS_FAULT_KINDS), summary
    assert len(report.fault_groups) == len(report.faults) == 2, summary
    counts = report.counts()
    assert counts["transfer ok"] > 100 and counts["audit ok"] > 50, summary  # real work
    assert counts["transfer ok across ranges"] > 50, summary  # two-phase commits
    assert report.ok, summary
    events = json.loads((report.run_dir / HISTORY_FILE).read_text())
    assert len(events) == 2 * (len(report.transfers) + len(report.snapshots))
