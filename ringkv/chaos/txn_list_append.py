"""Elle's list-append workload on real processes: strict serializability across ranges
under leader faults.

    python -m ringkv.chaos.txn_list_append [--seed 1] [--duration 30] [--clients 6]
                                           [--ranges 4] [--per-range 2]
                                           [--fault unguarded-appends]

Three node processes hold the transactional keyspace ``txn`` cut into
``--ranges`` ranges, with ``--per-range`` list keys in every range (each key
holds a JSON list). Each client transaction appends a unique value to one or
two keys and reads up to two others:

1. a read-only transaction reads the lists to append to, with their versions
   (it is in the history too: a transaction of reads only);
2. one one-shot transaction then writes each list as read plus its new value,
   guarded by a ``version`` condition on each (``absent`` for a list not yet
   there), and reads the appended keys (under its locks, before its writes)
   and the other keys. Its micro-operations are, per appended key, the read
   the server returned and the append, then the other reads.

A failed condition or an abort is a failed transaction (nothing applied);
any other error leaves it unknown (``info``: its appends may show up, its
reads are unknown). A transaction retried by the client under its id and
found already committed returns no reads: it is kept as ok with its appends
only. Meanwhile the nemesis of ``txn_run.py`` SIGKILLs or SIGSTOPs the
leader of one of the groups; after the heal every key is read once more.

Judged by ``ringkv.sim.list_append`` with real-time edges (strict
serializability): no G0, G1a, G1b, G1c, G-single or G2 cycle, no
incompatible orders, duplicates, garbage or internal inconsistencies. The
history is written in Jepsen's form to ``history.json`` in the run's
directory, for Elle itself.

Negative control: ``--fault unguarded-appends`` drops the conditions, so two
transactions that read the same list both write it with their own value
appended, and one append is lost: later reads disagree on the order.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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
    Fault,
    TxnNemesisRun,
    judge_version_conditions,
    keys_across_ranges,
    ranges_of,
    write_jsonl,
)
from ringkv.client import AsyncClient
from ringkv.errors import Aborted, BadRequest, ConditionFailed, RingKVError
from ringkv.sim import list_append
from ringkv.sim.checkers import Verdict
from ringkv.sim.jepsen_history import from_list_append, write_jepsen_history
from ringkv.sim.list_append import APPEND, FAIL, INFO, OK, READ, MicroOp, Txn

MAX_APPENDS = 2  # keys appended to per transaction
MAX_READS = 2  # other keys read per transaction
HISTORY_FILE = "history.json"
DETAILS_FILE = "operations.jsonl"  # ids, versions, commit timestamps, receipts
SHOWN_ANOMALIES = 8


@dataclass
class ListAppendReport:
    seed: int
    ranges: int
    keys: list[str]
    txns: list[Txn]
    faults: list[tuple[Fault, str, float]]
    fault_groups: list[str]
    analysis: list_append.Report
    verdicts: list[Verdict]
    run_dir: Path
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)

    def counts(self) -> Counter[str]:
        """Transactions that append, by outcome; and read-only ones that answered."""
        counts: Counter[str] = Counter()
        for txn in self.txns:
            appends = any(f == APPEND for f, _, _ in txn.ops)
            counts[f"{'append' if appends else 'read'} {txn.status}"] += 1
            if txn.status == OK and len(ranges_of({str(k) for _, k, _ in txn.ops},
                                                  self.ranges)) > 1:
                counts[f"{'append' if appends else 'read'} ok across ranges"] += 1
        return counts

    def summary(self) -> str:
        counts = self.counts()
        kinds = Counter(fault.kind for fault, _, _ in self.faults)
        return "\n".join([
            f"ringkv txn list-append: seed {self.seed}, {len(self.keys)} keys, "
            f"history in {self.run_dir / HISTORY_FILE}",
            f"appending transactions: {counts['append ok']} ok ({counts['append ok across ranges']}"
            f" across ranges), {counts['append fail']} failed, {counts['append info']} unknown; "
            f"read-only: {counts['read ok']} ok ({counts['read ok across ranges']} across ranges)",
            "faults: " + ", ".join(f"{kind} {kinds[kind]}" for kind in FAULT_KINDS)
            + " (leaders of " + ", ".join(sorted(set(self.fault_groups))) + ")",
            *self.notes,
            *(v.render() for v in self.verdicts),
            "PASS" if self.ok else "FAIL",
        ])


def judge(txns: list[Txn], keys: list[str]) -> tuple[list_append.Report, list[Verdict]]:
    """The list-append checker (with real time), and the acknowledged appends against
    the final read."""
    analysis = list_append.analyse(txns, realtime=True)
    lines = tuple(line for a in analysis.anomalies[:SHOWN_ANOMALIES]
                  for line in a.render().split("\n"))
    verdicts = [Verdict("list-append", analysis.ok, analysis.summary(),
                        len(analysis.anomalies), lines)]
    return analysis, [*verdicts, judge_acknowledged(txns, keys)]


def judge_acknowledged(txns: list[Txn], keys: list[str]) -> Verdict:
    """Lists only grow, so the final read (after the heal) holds every value a
    committed transaction appended: one missing is a lost append, which no cycle
    shows when nobody read it before it was overwritten."""
    final = next((t for t in txns if t.process == "final" and t.status == OK), None)
    if final is None:
        return Verdict("acknowledged appends", False,
                       "the lists could not be read after the heal")
    held = {k: set(v) for f, k, v in final.ops if f == READ and isinstance(v, list)}
    lost = [(txn, key, value) for txn in txns if txn.status == OK
            for f, key, value in txn.ops if f == APPEND and value not in held.get(key, set())]
    acked = sum(1 for txn in txns if txn.status == OK for f, _, _ in txn.ops if f == APPEND)
    if not lost:
        return Verdict("acknowledged appends", True,
                       f"all {acked} acknowledged appends are in the final read of "
                       f"the {len(keys)} lists")
    return Verdict("acknowledged appends", False,
                   f"{len(lost)} of {acked} acknowledged appends missing from the final read",
                   len(lost), tuple(f"{key} {value!r}: {txn.describe()}"
                                    for txn, key, value in lost[:8]))


class TxnListAppendRun(TxnNemesisRun):
    """Appends and reads across ranges under leader faults (see the module)."""

    def __init__(self, run_dir: Path, *, seed: int, duration_s: float, clients: int = 6,
                 ranges: int = 4, per_range: int = 2, unguarded: bool = False,
                 say: Any = print) -> None:
        super().__init__(run_dir, seed=seed, duration_s=duration_s, clients=clients,
                         ranges=ranges, say=say)
        self.keys = keys_across_ranges("list", ranges, per_range)
        self.unguarded = unguarded  # the negative control: appends without conditions
        self.txns: list[Txn] = []
        self.details: list[dict[str, Any]] = []
        self._ids = itertools.count(1)  # transaction ids, and the unique values appended

    async def run(self) -> ListAppendReport:
        await self._run_cluster()
        write_jepsen_history(self.run_dir / HISTORY_FILE, from_list_append(self.txns))
        write_jsonl(self.run_dir / DETAILS_FILE, self.details)
        analysis, verdicts = judge(self.txns, self.keys)
        verdicts.append(judge_version_conditions(self.details, "append transaction"))
        return ListAppendReport(self.seed, self.ranges, self.keys, self.txns, self.done, self.fault_groups,
                                analysis, verdicts, self.run_dir)

    async def _setup(self) -> None:
        """Nothing to open: a list absent is empty. The first transactions wait out the
        first elections (their clients retry)."""

    async def _worker(self, n: int, stop: asyncio.Event) -> None:
        process = f"c{n}"
        rng = random.Random(f"{self.seed}/{process}/ops")
        async with self._client(process) as kv:
            for _ in range(10_000_000):  # bounded; stop ends it
                if stop.is_set():
                    return
                appended = rng.sample(self.keys, rng.randint(1, MAX_APPENDS))
                others = [k for k in self.keys if k not in appended]
                read = rng.sample(others, rng.randint(0, MAX_READS))
                if not await self._transaction(kv, process, appended, read):
                    await asyncio.sleep(0.05)  # do not spin while a range has no leader

    async def _read_only(self, kv: AsyncClient, process: str,
                         keys: list[str]) -> dict[str, tuple[list[Any], int | None]] | None:
        """A read-only transaction over ``keys``, recorded: each list with its version
        (None: absent), or None when it did not answer."""
        txn_id, start = next(self._ids), self.now()
        try:
            got = await kv.txn(KEYSPACE, reads=keys)
        except BadRequest:
            raise
        except RingKVError:
            # A read-only transaction changes nothing: its failure tells nothing.
            self.txns.append(Txn(txn_id, process, tuple((READ, k, None) for k in keys), INFO,
                                 start, None))
            return None
        lists = {k: _list(got.reads.get(k)) for k in keys}
        self.details.append({"txn": txn_id, "versions": {k: lists[k][1] for k in keys},
                             "receipt": got.receipt})
        self.txns.append(Txn(txn_id, process, tuple((READ, k, lists[k][0]) for k in keys), OK,
                             start, self.now()))
        return lists

    async def _transaction(self, kv: AsyncClient, process: str, appended: list[str],
                           read: list[str]) -> bool:
        """The pre-read, then the guarded appends with their reads; False when either
        did not answer."""
        before = await self._read_only(kv, process, appended)
        if before is None:
            return False
        txn_id = next(self._ids)
        conditions: list[dict[str, Any]] = []
        writes: list[dict[str, Any]] = []
        for key in appended:
            values, version = before[key]
            if not self.unguarded:
                conditions.append({"key": key, "version": version} if version is not None
                                  else {"key": key, "absent": True})
            writes.append({"op": "put", "key": key, "value": [*values, txn_id]})
        start = self.now()
        detail: dict[str, Any] = {"txn": txn_id, "txn_id": f"la-{self.seed}-{txn_id}",
                                  "conditions": conditions}
        try:
            got = await kv.txn(KEYSPACE, reads=[*appended, *read], conditions=conditions,
                               writes=writes, txn_id=detail["txn_id"])
        except (ConditionFailed, Aborted) as exc:
            status, seen, detail["error"] = FAIL, None, repr(exc)
        except BadRequest:
            raise  # a bug in this run, not a fault
        except RingKVError as exc:
            # Timeout, no leader, no node: it may have committed.
            status, seen, detail["error"] = INFO, None, repr(exc)
        else:
            status, seen = OK, got.reads
            detail.update(commit_ts=got.commit_ts, receipt=got.receipt,
                          versions={k: v.version for k, v in got.reads.items() if v is not None})
        detail["status"] = status
        self.details.append(detail)
        ops: list[MicroOp] = []
        for key in appended:
            # Committed but answered from its record (a retry of a lost answer): no reads.
            if seen is None or key in seen:
                ops.append((READ, key, None if seen is None else _list(seen[key])[0]))
            ops.append((APPEND, key, txn_id))
        ops.extend((READ, key, None if seen is None else _list(seen[key])[0])
                   for key in read if seen is None or key in seen)
        self.txns.append(Txn(txn_id, process, tuple(ops), status, start,
                             None if status == INFO else self.now()))
        return status != INFO

    async def _final(self) -> None:
        """Every list once more, in one read-only transaction, retried (bounded) while
        the groups settle."""
        async with self._client("final") as kv:
            for _ in range(FINAL_ATTEMPTS):
                if await self._read_only(kv, "final", self.keys) is not None:
                    return
                await asyncio.sleep(0.5)


def _list(got: Any) -> tuple[list[Any], int | None]:
    """A key as read (``Versioned`` or None): its list and version; absent is empty.
    A value that is not a list is kept as read, for the checker to name."""
    if got is None:
        return [], None
    return (list(got.value) if isinstance(got.value, list) else [got.value]), got.version


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m ringkv.chaos.txn_list_append",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--ranges", type=int, default=4)
    parser.add_argument("--per-range", type=int, default=2, help="list keys in each range")
    parser.add_argument("--fault", choices=["unguarded-appends"], default=None,
                        help="negative control: appends without their version conditions")
    parser.add_argument("--dir", type=Path, default=None, help="keep the run's data here")
    args = parser.parse_args(argv)
    run_dir = args.dir or Path(tempfile.mkdtemp(prefix="ringkv-txn-list-append-"))
    report = asyncio.run(TxnListAppendRun(run_dir, seed=args.seed, duration_s=args.duration,
                                          clients=args.clients, ranges=args.ranges,
                                          per_range=args.per_range,
                                          unguarded=args.fault == "unguarded-appends").run())
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
