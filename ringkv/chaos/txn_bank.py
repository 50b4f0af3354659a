"""Jepsen's bank workload on real processes: transfers across ranges under leader faults.

    python -m ringkv.chaos.txn_bank [--seed 1] [--duration 30] [--clients 6] [--ranges 4]
                                    [--per-range 2] [--fault unguarded-transfers] [--netns]

Three node processes hold the transactional keyspace ``txn`` cut into
``--ranges`` ranges (one Paxos group each), with ``--per-range`` accounts in
every range, each opened with ``INITIAL`` by one transaction across all the
ranges. Clients (``ringkv.client.AsyncClient`` through random replicas)
either transfer or audit:

* a transfer reads both balances in a read-only transaction, then runs one
  one-shot transaction with a ``version`` condition on each account and the
  two writes (most pairs lie in different ranges: two-phase commit); it never
  overdraws, since it moves at most what it read;
* an audit is a read-only transaction over every account (a snapshot at
  ``TT.now().latest``, across every range).

Meanwhile the nemesis of ``txn_run.py`` SIGKILLs or SIGSTOPs the leader of
one of the groups. After the heal every account is read once more.

Judged by ``ringkv.sim.bank``: every complete snapshot (audits and the final
read) sums to the starting total, and no balance read, in any snapshot, is
negative. A transfer's outcome is ok, failed (a failed condition or an
abort: certainly not applied) or unknown (``info``). The history is written
in Jepsen's form to ``history.json`` in the run's directory.

Across hosts (``--netns``, ``NetnsTxnBankRun``): the three nodes run on
network-namespace hosts (``ringkv.tools.netns``), each binding its own
address, and the nemesis cuts a group's leader off with iptables drops instead
of killing it: ``isolate-leader`` (nothing reaches it, nothing leaves it) and
``mute-leader`` (its packets to the others are lost, theirs still reach it: it
hears its followers but cannot lead them). Clients in the root namespace still
reach every node, as Jepsen's do. The workload and the checkers are the same.

Negative control: ``--fault unguarded-transfers`` drops the two conditions, so
concurrent transfers from one account overwrite each other (lost updates);
the audits must then see money made or destroyed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringkv.chaos.txn_run import (
    FAULT_KINDS,
    FINAL_ATTEMPTS,
    KEYSPACE,
    LEASE_S,
    READY_TIMEOUT_S,
    Fault,
    TxnNemesisRun,
    judge_version_conditions,
    keys_across_ranges,
    schedule,
    ranges_of,
    write_jsonl,
)
from ringkv.client import AsyncClient
from ringkv.errors import Aborted, BadRequest, ConditionFailed, RingKVError
from ringkv.sim import bank
from ringkv.sim.bank import FAIL, INFO, OK, Snapshot, Transfer
from ringkv.sim.checkers import Verdict
from ringkv.sim.jepsen_history import from_bank, write_jepsen_history
from ringkv.tools.local_cluster import LocalCluster
from ringkv.tools.netns import NetnsError, NetnsHosts

INITIAL = 100  # each account's opening balance
MAX_AMOUNT = 5
AUDIT_SHARE = 0.3  # of the clients' operations; the rest are transfers
HISTORY_FILE = "history.json"
DETAILS_FILE = "operations.jsonl"  # ids, versions, commit timestamps, receipts


@dataclass
class BankReport:
    seed: int
    ranges: int
    initial: dict[str, int]
    transfers: list[Transfer]
    snapshots: list[Snapshot]
    faults: list[tuple[Fault, str, float]]
    fault_groups: list[str]
    verdicts: list[Verdict]
    run_dir: Path
    notes: list[str] = field(default_factory=list)
    fault_kinds: tuple[str, ...] = FAULT_KINDS

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)

    def counts(self) -> Counter[str]:
        """Transfers by outcome, and ok audits (full snapshots; the final read is one)."""
        counts: Counter[str] = Counter(f"transfer {t.status}" for t in self.transfers)
        counts["transfer ok across ranges"] = sum(
            1 for t in self.transfers
            if t.status == OK and len(ranges_of([t.src, t.dst], self.ranges)) > 1)
        counts["audit ok"] = len(full_snapshots(self.initial, self.snapshots))
        return counts

    def summary(self) -> str:
        counts = self.counts()
        kinds = Counter(fault.kind for fault, _, _ in self.faults)
        return "\n".join([
            f"ringkv txn bank: seed {self.seed}, {len(self.initial)} accounts, "
            f"history in {self.run_dir / HISTORY_FILE}",
            f"transfers: {counts['transfer ok']} ok ({counts['transfer ok across ranges']} "
            f"across ranges), {counts['transfer fail']} failed, "
            f"{counts['transfer info']} unknown; audits: {counts['audit ok']} ok",
            "faults: " + ", ".join(f"{kind} {kinds[kind]}" for kind in self.fault_kinds)
            + " (leaders of " + ", ".join(sorted(set(self.fault_groups))) + ")",
            *self.notes,
            *(v.render() for v in self.verdicts),
            "PASS" if self.ok else "FAIL",
        ])


def full_snapshots(initial: dict[str, int], snapshots: list[Snapshot]) -> list[Snapshot]:
    """The snapshots that answered for every account (audits and the final read)."""
    return [s for s in snapshots if s.status == OK
            and (s.total is not None or set(s.balances) == set(initial))]


def judge(initial: dict[str, int], transfers: list[Transfer],
          snapshots: list[Snapshot]) -> list[Verdict]:
    """The bank checker's verdict, and whether the final read happened."""
    anomalies = bank.check(initial, transfers, snapshots)
    full = full_snapshots(initial, snapshots)
    verdicts = [Verdict(
        "bank", not anomalies,
        f"{len(full)} full snapshots sum to {sum(initial.values())}, no balance negative"
        if not anomalies else f"{len(anomalies)} snapshots wrong",
        len(anomalies), tuple(line for a in anomalies[:8] for line in a.render().split("\n")))]
    final = [s for s in full if s.process == "final"]
    verdicts.append(Verdict("final read", bool(final),
                            "every account read after the heal" if final
                            else "the accounts could not be read after the heal"))
    return verdicts


class TxnBankRun(TxnNemesisRun):
    """Transfers and audits across ranges under leader faults (see the module)."""

    def __init__(self, run_dir: Path, *, seed: int, duration_s: float, clients: int = 6,
                 ranges: int = 4, per_range: int = 2, unguarded: bool = False,
                 say: Any = print) -> None:
        super().__init__(run_dir, seed=seed, duration_s=duration_s, clients=clients,
                         ranges=ranges, say=say)
        self.accounts = keys_across_ranges("acct", ranges, per_range)
        self.initial = dict.fromkeys(self.accounts, INITIAL)
        self.unguarded = unguarded  # the negative control: transfers without conditions
        self.transfers: list[Transfer] = []
        self.snapshots: list[Snapshot] = []
        self.details: list[dict[str, Any]] = []
        self._ids = 0

    def _next(self) -> int:
        self._ids += 1
        return self._ids

    async def run(self) -> BankReport:
        await self._run_cluster()
        write_jepsen_history(self.run_dir / HISTORY_FILE,
                             from_bank(self.transfers, self.snapshots))
        write_jsonl(self.run_dir / DETAILS_FILE, self.details)
        verdicts = [*judge(self.initial, self.transfers, self.snapshots),
                    judge_version_conditions(self.details, "transfer")]
        return BankReport(self.seed, self.ranges, self.initial, self.transfers, self.snapshots,
                          self.done, self.fault_groups, verdicts, self.run_dir,
                          fault_kinds=self.fault_kinds)

    fault_kinds = FAULT_KINDS

    async def _setup(self) -> None:
        """Every account opened with INITIAL by one transaction across every range,
        retried under one id until it is known to have committed."""
        deadline = self.now() + READY_TIMEOUT_S
        txn_id = f"bank-{self.seed}-open"
        async with self._client("setup") as kv:
            while True:
                try:
                    await kv.txn(KEYSPACE, conditions=[{"key": a, "absent": True}
                                                       for a in self.accounts],
                                 writes=[{"op": "put", "key": a, "value": INITIAL}
                                         for a in self.accounts], txn_id=txn_id)
                    return
                except BadRequest:
                    raise
                except RingKVError:
                    if self.now() > deadline:
                        raise
                    await asyncio.sleep(0.2)

    async def _worker(self, n: int, stop: asyncio.Event) -> None:
        process = f"c{n}"
        rng = random.Random(f"{self.seed}/{process}/ops")
        async with self._client(process) as kv:
            for attempt in range(10_000_000):  # bounded; stop ends it
                if stop.is_set():
                    return
                if rng.random() < AUDIT_SHARE:
                    done = await self._audit(kv, process)
                else:
                    done = await self._transfer(kv, process, rng, f"bank-{self.seed}-"
                                                f"{process}-{attempt}")
                if not done:
                    await asyncio.sleep(0.05)  # do not spin while a range has no leader

    async def _read(self, kv: AsyncClient, process: str,
                    accounts: list[str]) -> dict[str, tuple[Any, int]] | None:
        """A read-only transaction over ``accounts``, recorded as a snapshot: each
        balance with its version, or None when it did not answer."""
        index, start = self._next(), self.now()
        try:
            got = await kv.txn(KEYSPACE, reads=accounts)
        except BadRequest:
            raise
        except RingKVError:
            # A read changes nothing: whatever became of it, it tells nothing either.
            self.snapshots.append(Snapshot(index, process, {}, INFO, start, None))
            return None
        # A one-shot transaction's reads are committed values: each has a version.
        seen = {a: v for a, v in ((a, got.reads.get(a)) for a in accounts)
                if v is not None and v.version is not None and isinstance(v.value, int)}
        # A read of every account must hold the whole total: one that finds an
        # account absent (or not a balance) is judged on the sum of the others.
        total = sum(self.initial.values()) if len(accounts) == len(self.accounts) else None
        self.snapshots.append(Snapshot(index, process, {a: v.value for a, v in seen.items()},
                                       OK, start, self.now(), total=total))
        self.details.append({"index": index, "read": {a: [v.value, v.version]
                                                      for a, v in seen.items()},
                             "receipt": got.receipt})
        return {a: (v.value, v.version) for a, v in seen.items() if v.version is not None}

    async def _audit(self, kv: AsyncClient, process: str) -> bool:
        return await self._read(kv, process, self.accounts) is not None

    async def _transfer(self, kv: AsyncClient, process: str, rng: random.Random,
                        txn_id: str) -> bool:
        src, dst = rng.sample(self.accounts, 2)
        read = await self._read(kv, process, [src, dst])
        if read is None:
            return False
        if src not in read or dst not in read or read[src][0] < 1:
            return True  # nothing to move
        amount = rng.randint(1, min(MAX_AMOUNT, read[src][0]))
        (src_balance, src_version), (dst_balance, dst_version) = read[src], read[dst]
        conditions = [] if self.unguarded else [{"key": src, "version": src_version},
                                                {"key": dst, "version": dst_version}]
        writes = [{"op": "put", "key": src, "value": src_balance - amount},
                  {"op": "put", "key": dst, "value": dst_balance + amount}]
        index, start = self._next(), self.now()
        detail: dict[str, Any] = {"index": index, "txn_id": txn_id, "conditions": conditions,
                                  "writes": writes}
        try:
            got = await kv.txn(KEYSPACE, conditions=conditions, writes=writes, txn_id=txn_id)
        except (ConditionFailed, Aborted) as exc:
            status, detail["error"] = FAIL, repr(exc)  # certainly not applied
        except BadRequest:
            raise  # a bug in this run, not a fault
        except RingKVError as exc:
            # Timeout, no leader, no node: it may have committed.
            status, detail["error"] = INFO, repr(exc)
        else:
            status = OK
            detail.update(commit_ts=got.commit_ts, receipt=got.receipt,
                          conflict_retries=got.conflict_retries)
        detail["status"] = status
        self.details.append(detail)
        self.transfers.append(Transfer(index, process, src, dst, amount, status, start,
                                       None if status == INFO else self.now()))
        return status != INFO

    async def _final(self) -> None:
        """Every account once more, in one read-only transaction, retried (bounded)
        while the groups settle."""
        async with self._client("final") as kv:
            for _ in range(FINAL_ATTEMPTS):
                if await self._read(kv, "final", self.accounts) is not None:
                    return
                await asyncio.sleep(0.5)


NETNS_FAULT_KINDS = ("isolate-leader", "mute-leader")
# A cut leader's lease must run out and a new one be elected before its groups
# serve again: holds outlast the lease with room for an election.
NETNS_HOLD_S = (LEASE_S + 2.0, LEASE_S + 4.0)
NETNS_SLOT_S = 11.0


def netns_schedule(seed: int, duration_s: float) -> list[Fault]:
    """One partition per slot, the kinds alternating from a seeded start, each healed
    over a second before ``duration_s``."""
    return schedule(seed, duration_s, kinds=NETNS_FAULT_KINDS, hold_s=NETNS_HOLD_S,
                    slot_s=NETNS_SLOT_S)


class NetnsTxnBankRun(TxnBankRun):
    """The bank on three namespace hosts; the nemesis partitions a group's leader
    with iptables instead of killing it (see the module)."""

    fault_kinds = NETNS_FAULT_KINDS

    def __init__(self, run_dir: Path, hosts: NetnsHosts, **options: Any) -> None:
        if len(hosts.hosts) != 3:
            raise ValueError(f"the bank runs on 3 hosts, not {len(hosts.hosts)}")
        super().__init__(run_dir, **options)
        self.net = hosts

    async def _run_cluster(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        keyspace: dict[str, Any] = {"replication_factor": 3, "tier": "transactional"}
        if self.ranges > 1:
            keyspace["ranges"] = self.ranges
        self.cluster = LocalCluster(self.run_dir, rf=3, config_overrides={
            f"keyspaces.{KEYSPACE}": keyspace, "txn.lease_s": LEASE_S})
        self.cluster.build_on_hosts(self.net)
        try:
            await asyncio.to_thread(self.cluster.up, 90.0, together=True)
            self.say("cluster up: " + ", ".join(f"{p.node_id} {p.url}" for p in self.procs))
            await self._setup()
            await self._load_and_faults(netns_schedule(self.seed, self.duration_s))
            await self._final()
        finally:
            await asyncio.to_thread(self.net.heal)
            await asyncio.to_thread(self.cluster.down)

    async def _load_and_faults(self, faults: list[Fault]) -> None:
        try:
            await super()._load_and_faults(faults)
        finally:
            await asyncio.to_thread(self.net.heal)  # should the nemesis not have healed

    async def _nemesis(self, faults: list[Fault], zero: float) -> None:
        net = self.net
        for fault in faults:
            await asyncio.sleep(max(0.0, zero + fault.at_s - self.now()))
            found = await self._leader()
            if found is None:
                self.say(f"{self.now():6.1f}s nemesis: no leader to {fault.kind}")
                continue
            target, group = found
            others = [p.host for p in self.procs if p is not target]
            self.say(f"{self.now():6.1f}s nemesis: {fault.kind} {target.node_id} "
                     f"(leader of {group}; leads {', '.join(self._led.get(target.node_id, []))})"
                     f" for {fault.hold_s}s")
            if fault.kind == "isolate-leader":
                await asyncio.to_thread(net.isolate, target.host)
            else:  # mute-leader: one way, from the leader to everyone else
                for other in others:
                    await asyncio.to_thread(net.drop, target.host, other)
            self.done.append((fault, target.node_id, self.now()))
            self.fault_groups.append(group)
            await asyncio.sleep(max(0.0, zero + fault.at_s + fault.hold_s - self.now()))
            await asyncio.to_thread(net.heal)
            self.say(f"{self.now():6.1f}s nemesis: healed {fault.kind} {target.node_id}")


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m ringkv.chaos.txn_bank", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--ranges", type=int, default=4)
    parser.add_argument("--per-range", type=int, default=2, help="accounts in each range")
    parser.add_argument("--fault", choices=["unguarded-transfers"], default=None,
                        help="negative control: transfers without their version conditions")
    parser.add_argument("--dir", type=Path, default=None, help="keep the run's data here")
    parser.add_argument("--netns", action="store_true",
                        help="3 nodes on network-namespace hosts, leaders cut off by iptables "
                             "(root, iproute2 and iptables)")
    args = parser.parse_args(argv)
    run_dir = args.dir or Path(tempfile.mkdtemp(prefix="ringkv-txn-bank-"))
    options: dict[str, Any] = dict(seed=args.seed, duration_s=args.duration, clients=args.clients,
                                   ranges=args.ranges, per_range=args.per_range,
                                   unguarded=args.fault == "unguarded-transfers")
    if args.netns:
        try:
            with NetnsHosts(3) as hosts:
                report = asyncio.run(NetnsTxnBankRun(run_dir, hosts, **options).run())
        except NetnsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        report = asyncio.run(TxnBankRun(run_dir, **options).run())
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
