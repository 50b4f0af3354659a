"""A Jepsen-style run of the transactional tier on real processes: CAS counters under leader faults.

    python -m ringkv.chaos.txn_run [--seed 1] [--duration 30] [--clients 6] [--counters 3]
                                   [--fault blind-increments]

Three node processes on 127.0.0.1 hold a transactional keyspace ``txn``
(RF 3: one Paxos group, ``txn.lease_s`` 2 s). Clients, each its own
``ringkv.client.AsyncClient`` sending through random replicas (no leader
hints), increment a few counters by compare-and-set: a strong read gives
the value ``v`` and its version, then ``put(v + 1, if_version=version)``.
Meanwhile a nemesis, on a schedule drawn from the seed, finds the range's
current leader and SIGKILLs it (restarting it on the same data after the
hold) or SIGSTOPs it (then SIGCONT). Then everything heals and each counter
is read once more.

Judged (issue #11 §7; Spanner §4.1, Paxos Made Simple §2):

* every counter equals the number of acknowledged increments of it, plus at
  most the increments whose outcome the client could not learn;
* the register history (reads, and each CAS as ``cas v -> v + 1``: ok,
  failed, or unknown) is linearizable, by ``ringkv.sim.linearizability``.
  A version CAS is a value CAS here: counters only grow, so a value names
  one version.

Negative control: ``--fault blind-increments`` writes ``v + 1`` without the
condition (and records it as a CAS), the lost-update bug the condition
exists to prevent; both checks must then fail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ringkv.client import AsyncClient
from ringkv.clock import SystemClock
from ringkv.errors import BadRequest, ConditionFailed, RingKVError
from ringkv.ring import token_for
from ringkv.sim.checkers import Verdict
from ringkv.sim.linearizability import RegisterOp, linearizable
from ringkv.tools.launcher import NodeProcess, free_port_block, http
from ringkv.tools.local_cluster import LocalCluster
from ringkv.txn.ranges import slice_of

_CLOCK = SystemClock()
KEYSPACE = "txn"
LEASE_S = 2.0
FAULT_KINDS = ("kill-leader", "pause-leader")
WARMUP_S = 3.0  # load runs this long before the first fault
SLOT_S = 7.0  # one fault per slot: held for HOLD_S, then calm
HOLD_S = (2.0, 4.0)
REQUEST_TIMEOUT_S = 2.0  # per client attempt
MAX_RETRIES = 4
STATUS_TIMEOUT_S = 1.0  # asking a node whether it leads (a paused one never answers)
READY_TIMEOUT_S = 60.0
LEADER_POLLS = 10
FINAL_ATTEMPTS = 40


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str  # "kill-leader" | "pause-leader"
    hold_s: float


def schedule(seed: int, duration_s: float, *, kinds: Sequence[str] = FAULT_KINDS,
             hold_s: tuple[float, float] = HOLD_S, slot_s: float = SLOT_S) -> list[Fault]:
    """One fault per slot, the kinds alternating from a seeded start, each over a second
    before ``duration_s``."""
    rng = random.Random(seed)
    order = list(kinds)
    rng.shuffle(order)
    faults: list[Fault] = []
    at = WARMUP_S
    while True:
        hold = round(rng.uniform(*hold_s), 2)
        if at + hold > duration_s - 1.0:
            return faults
        faults.append(Fault(round(at, 2), order[len(faults) % len(order)], hold))
        at += slot_s


def keys_across_ranges(prefix: str, ranges: int, per_range: int) -> list[str]:
    """``per_range`` key names in each of ``ranges`` equal slices of the ring (the
    keyspace's ranges: ``txn/ranges.py``), so transactions over them cross ranges."""
    by_slice: dict[int, list[str]] = {i: [] for i in range(ranges)}
    for n in range(100_000):  # bounded: equal slices fill within a few dozen names
        name = f"{prefix}{n}"
        found = by_slice[slice_of(token_for(name.encode()), ranges)]
        if len(found) < per_range:
            found.append(name)
        if all(len(names) == per_range for names in by_slice.values()):
            break
    return [name for i in range(ranges) for name in by_slice[i]]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object a line: what a run saw of each operation beyond its history
    (transaction ids, versions read, commit timestamps, receipts), for diagnosis."""
    with open(path, "w") as out:
        for row in rows:
            out.write(json.dumps(row, default=repr) + "\n")


def judge_version_conditions(details: list[dict[str, Any]], what: str) -> Verdict:
    """No two committed transactions wrote a key over the same version of it (or both
    over its absence). Each was guarded by that condition, so a second one is a lost
    update, whether or not a later read happened to show it. ``details``: rows with
    ``status``, ``conditions`` (as sent), ``txn_id``, ``commit_ts`` and ``receipt``."""
    by_version: dict[tuple[str, object], list[dict[str, Any]]] = {}
    for row in details:
        if row.get("status") == "ok":
            for cond in row.get("conditions", ()):
                seen = cond["version"] if "version" in cond else "absent"
                by_version.setdefault((cond["key"], seen), []).append(row)
    twice = {kv: rows for kv, rows in by_version.items() if len(rows) > 1}
    if not twice:
        return Verdict("version conditions", True,
                       f"{len(by_version)} versions each overwritten by one committed {what}")
    lines = []
    for (key, version), rows in sorted(twice.items(), key=str):
        shown = []
        for row in rows:
            receipt = row.get("receipt") or {}
            where = receipt.get("ranges") or receipt.get("range")
            leader = f" leader {receipt['leader']}" if "leader" in receipt else ""
            shown.append(f"{row.get('txn_id')} commit_ts {row.get('commit_ts')} "
                         f"ranges {where}{leader}")
        lines.append(f"{key} version {version}: " + "; ".join(shown))
    return Verdict("version conditions", False,
                   f"{len(twice)} versions overwritten by two committed {what}s (lost updates)",
                   len(twice), tuple(lines[:8]))


def ranges_of(keys: list[str] | set[str], ranges: int) -> set[int]:
    """Which of ``ranges`` equal slices ``keys`` fall in."""
    return {slice_of(token_for(key.encode()), ranges) for key in keys}


@dataclass
class TxnReport:
    seed: int
    history: list[RegisterOp]
    faults: list[tuple[Fault, str, float]]  # each fault, the node it hit, when (run time)
    acked: dict[str, int]
    unknown: dict[str, int]
    final: dict[str, Any]
    verdicts: list[Verdict]
    run_dir: Path
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)

    def unavailable_s(self) -> list[float | None]:
        """For each fault, from its start to the first increment acknowledged after it
        that began after it (the range's unavailability, lease plus election)."""
        acked = sorted((op.start, op.end) for op in self.history
                       if op.kind == "cas" and op.ok and op.end is not None
                       and op.process != "setup")
        gaps: list[float | None] = []
        for _, _, at in self.faults:
            ends = [end for start, end in acked if start >= at]
            gaps.append(round(min(ends) - at, 3) if ends else None)
        return gaps

    def summary(self) -> str:
        cas = Counter("ok" if op.ok else "failed" if op.ok is False else "unknown"
                      for op in self.history if op.kind == "cas" and op.process != "setup")
        reads = sum(1 for op in self.history if op.kind == "read")
        kinds = Counter(fault.kind for fault, _, _ in self.faults)
        gaps = ", ".join(f"{fault.kind} {gap:.2f} s" if gap is not None else f"{fault.kind} -"
                         for (fault, _, _), gap in zip(self.faults, self.unavailable_s()))
        return "\n".join([
            f"ringkv txn chaos: seed {self.seed}, history in {self.run_dir / 'history.jsonl'}",
            f"increments: {cas['ok']} acknowledged, {cas['failed']} failed conditions, "
            f"{cas['unknown']} unknown; {reads} reads",
            "faults: " + ", ".join(f"{kind} {kinds[kind]}" for kind in FAULT_KINDS),
            f"fault to the next acknowledged increment: {gaps}",
            *(f"counter {key}: {self.final.get(key)} = {self.acked[key]} acknowledged "
              f"+ 0..{self.unknown[key]} unknown" for key in sorted(self.acked)),
            *self.notes,
            *(v.render() for v in self.verdicts),
            "PASS" if self.ok else "FAIL",
        ])


def judge_counters(acked: dict[str, int], unknown: dict[str, int],
                   final: dict[str, Any]) -> Verdict:
    """Each counter holds its acknowledged increments plus some of the unknown ones."""
    bad = [f"{key}: {final.get(key)!r}, {acked[key]} acknowledged, {unknown[key]} unknown"
           for key in sorted(acked)
           if not isinstance(final.get(key), int)
           or not acked[key] <= final[key] <= acked[key] + unknown[key]]
    total = sum(acked.values())
    if not bad:
        return Verdict("counters", True, f"{len(acked)} counters hold their {total} "
                                         "acknowledged increments, none lost or doubled")
    return Verdict("counters", False, f"{len(bad)} of {len(acked)} counters wrong", len(bad),
                   tuple(bad))


class TxnNemesisRun:
    """What every transactional run here shares: three node processes holding
    ``KEYSPACE`` (RF 3, cut into ``ranges`` slices, one Paxos group each),
    clients, and a nemesis that SIGKILLs or SIGSTOPs the leader of one of the
    groups on the seed's schedule, then heals everything.

    A workload supplies ``_setup`` (before the load), ``_worker`` (one client's
    loop until ``stop``) and ``_final`` (after the heal); ``_run_cluster`` runs
    them in that order and always takes the processes down."""

    def __init__(self, run_dir: Path, *, seed: int, duration_s: float, clients: int,
                 ranges: int = 1, say: Any = print) -> None:
        self.run_dir = run_dir
        self.seed = seed
        self.duration_s = duration_s
        self.clients = clients
        self.ranges = ranges
        self.say = say
        self.done: list[tuple[Fault, str, float]] = []
        self.fault_groups: list[str] = []  # the group whose leader each fault hit
        self.cluster: LocalCluster | None = None
        self._nemesis_rng = random.Random(f"{seed}/nemesis")
        self._led: dict[str, list[str]] = {}  # node -> the groups it led, when last asked
        self._t0 = _CLOCK.monotonic_s()

    def now(self) -> float:
        return _CLOCK.monotonic_s() - self._t0

    @property
    def procs(self) -> list[NodeProcess]:
        return self.cluster.procs if self.cluster is not None else []

    async def _run_cluster(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        keyspace: dict[str, Any] = {"replication_factor": 3, "tier": "transactional"}
        if self.ranges > 1:
            keyspace["ranges"] = self.ranges
        try:
            self.cluster = LocalCluster(
                self.run_dir, nodes=3, rf=3, base_client_port=free_port_block(3),
                base_internode_port=free_port_block(3), config_overrides={
                    f"keyspaces.{KEYSPACE}": keyspace, "txn.lease_s": LEASE_S})
            await asyncio.to_thread(self.cluster.up, 60.0)
            self.say("cluster up: " + ", ".join(f"{p.node_id} {p.url}" for p in self.procs))
            await self._setup()
            await self._load_and_faults(schedule(self.seed, self.duration_s))
            await self._final()
        finally:
            if self.cluster is not None:
                await asyncio.to_thread(self.cluster.down)  # SIGCONTs a paused node first

    async def _setup(self) -> None:
        raise NotImplementedError

    async def _worker(self, n: int, stop: asyncio.Event) -> None:
        raise NotImplementedError

    async def _final(self) -> None:
        raise NotImplementedError

    def _client(self, process: str) -> AsyncClient:
        return AsyncClient([p.url for p in self.procs], keyspace=KEYSPACE,
                           timeout_s=REQUEST_TIMEOUT_S, max_retries=MAX_RETRIES,
                           leader_hints=False, rng=random.Random(f"{self.seed}/{process}"))

    async def _load_and_faults(self, faults: list[Fault]) -> None:
        zero = self.now()  # the schedule's zero
        stop = asyncio.Event()
        workers = [asyncio.create_task(self._worker(n, stop)) for n in range(self.clients)]
        nemesis = asyncio.create_task(self._nemesis(faults, zero))
        try:
            await asyncio.sleep(self.duration_s)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), timeout=60.0)
            await asyncio.wait_for(nemesis, timeout=60.0)
        finally:
            for task in (*workers, nemesis):
                task.cancel()
        self.say(f"{self.now():6.1f}s load stopped; healing")
        for proc in self.procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.signal(signal.SIGCONT)
            else:
                await asyncio.to_thread(proc.start)

    async def _leader(self) -> tuple[NodeProcess, str] | None:
        """A group's leader and the group, asked for a few seconds (an election may be
        running); with several ranges, one of the groups led, chosen by the seed."""
        for _ in range(LEADER_POLLS):
            leaders = await self._leaders_now()
            if leaders:
                return self._nemesis_rng.choice(leaders)
            await asyncio.sleep(0.3)
        return None

    async def _leaders_now(self) -> list[tuple[NodeProcess, str]]:
        """Each group that some node says it leads, with that node (GET /v1/status)."""
        leaders: list[tuple[NodeProcess, str]] = []
        for proc in self.procs:
            if proc.proc is None or proc.proc.poll() is not None:
                continue
            try:
                status, view = await asyncio.to_thread(http, "GET", f"{proc.url}/v1/status",
                                                       timeout_s=STATUS_TIMEOUT_S)
            except OSError:
                continue
            groups = view.get("transactional", {}).get("groups", {}) if status == 200 else {}
            leaders.extend((proc, gid) for gid, g in sorted(groups.items()) if g.get("leads"))
        self._led = {proc.node_id: [gid for p, gid in leaders if p is proc] for proc, _ in leaders}
        return leaders

    async def _nemesis(self, faults: list[Fault], zero: float) -> None:
        for fault in faults:
            await asyncio.sleep(max(0.0, zero + fault.at_s - self.now()))
            found = await self._leader()
            if found is None:
                self.say(f"{self.now():6.1f}s nemesis: no leader to {fault.kind}")
                continue
            target, group = found
            self.say(f"{self.now():6.1f}s nemesis: {fault.kind} {target.node_id} "
                     f"(leader of {group}; leads {', '.join(self._led.get(target.node_id, []))})"
                     f" for {fault.hold_s}s")
            if fault.kind == "kill-leader":
                await asyncio.to_thread(target.kill)
            else:
                target.signal(signal.SIGSTOP)
            self.done.append((fault, target.node_id, self.now()))
            self.fault_groups.append(group)
            await asyncio.sleep(max(0.0, zero + fault.at_s + fault.hold_s - self.now()))
            if fault.kind == "kill-leader":
                await asyncio.to_thread(target.start)  # same data dir
            else:
                target.signal(signal.SIGCONT)
            self.say(f"{self.now():6.1f}s nemesis: healed {fault.kind} {target.node_id}")


class TxnChaosRun(TxnNemesisRun):
    """Three nodes, CAS-increment clients, a leader-killing nemesis (see the module)."""

    def __init__(self, run_dir: Path, *, seed: int, duration_s: float, clients: int = 6,
                 counters: int = 3, blind: bool = False, say: Any = print) -> None:
        super().__init__(run_dir, seed=seed, duration_s=duration_s, clients=clients, say=say)
        self.keys = [f"counter{i}" for i in range(counters)]
        self.blind = blind  # the negative control: increments without their condition
        self.history: list[RegisterOp] = []
        self.acked = dict.fromkeys(self.keys, 0)
        self.unknown = dict.fromkeys(self.keys, 0)
        self.final: dict[str, Any] = {}

    async def run(self) -> TxnReport:
        await self._run_cluster()
        with open(self.run_dir / "history.jsonl", "w") as out:
            for op in self.history:
                out.write(json.dumps(asdict(op)) + "\n")
        verdicts = [judge_counters(self.acked, self.unknown, self.final),
                    linearizable(self.history)]
        return TxnReport(self.seed, self.history, self.done, self.acked, self.unknown,
                         self.final, verdicts, self.run_dir)

    async def _setup(self) -> None:
        """Every counter starts at 0 (a CAS from absent), once the group has a leader."""
        deadline = self.now() + READY_TIMEOUT_S
        async with self._client("setup") as kv:
            for key in self.keys:
                while True:
                    start = self.now()
                    try:
                        await kv.put(key, 0, if_absent=True)
                    except ConditionFailed:
                        # An earlier attempt whose answer was lost did it.
                        self.history.append(RegisterOp("setup", "cas", key, 0, start, None,
                                                       expected=None, ok=None))
                        break
                    except RingKVError:
                        self.history.append(RegisterOp("setup", "cas", key, 0, start, None,
                                                       expected=None, ok=None))
                        if self.now() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                        continue
                    self.history.append(RegisterOp("setup", "cas", key, 0, start, self.now(),
                                                   expected=None, ok=True))
                    break

    async def _worker(self, n: int, stop: asyncio.Event) -> None:
        process = f"c{n}"
        rng = random.Random(f"{self.seed}/{process}/ops")
        async with self._client(process) as kv:
            for _ in range(10_000_000):  # bounded; stop ends it
                if stop.is_set():
                    return
                if not await self._increment(kv, process, rng.choice(self.keys)):
                    await asyncio.sleep(0.05)  # do not spin while the range has no leader

    async def _increment(self, kv: AsyncClient, process: str, key: str) -> bool:
        """One read and one CAS; False when either did not succeed."""
        start = self.now()
        try:
            got = await kv.get_versioned(key)
        except RingKVError:
            return False  # a failed read tells nothing: left out of the history
        value = None if got is None else got.value
        self.history.append(RegisterOp(process, "read", key, value, start, self.now()))
        if got is None or not isinstance(value, int):
            return False
        start = self.now()
        try:
            await kv.put(key, value + 1, if_version=None if self.blind else got.version)
        except ConditionFailed:
            self.history.append(RegisterOp(process, "cas", key, value + 1, start, self.now(),
                                           expected=value, ok=False))
            return True
        except BadRequest:
            raise  # a bug in this run, not a fault
        except RingKVError:
            # Timeout, no leader, no node, aborted after its retries: an attempt
            # may have committed, so the outcome is unknown.
            self.unknown[key] += 1
            self.history.append(RegisterOp(process, "cas", key, value + 1, start, None,
                                           expected=value, ok=None))
            return False
        self.acked[key] += 1
        self.history.append(RegisterOp(process, "cas", key, value + 1, start, self.now(),
                                       expected=value, ok=True))
        return True

    async def _final(self) -> None:
        """Each counter once more, strongly, retried (bounded) while the group settles."""
        final: dict[str, Any] = {}
        async with self._client("final") as kv:
            for key in self.keys:
                for _ in range(FINAL_ATTEMPTS):
                    start = self.now()
                    try:
                        got = await kv.get_versioned(key)
                    except RingKVError:
                        await asyncio.sleep(0.5)
                        continue
                    final[key] = None if got is None else got.value
                    self.history.append(RegisterOp("final", "read", key, final[key], start,
                                                   self.now()))
                    break
        self.final = final


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m ringkv.chaos.txn_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--counters", type=int, default=3)
    parser.add_argument("--fault", choices=["blind-increments"], default=None,
                        help="negative control: increments without their condition")
    parser.add_argument("--dir", type=Path, default=None, help="keep the run's data here")
    args = parser.parse_args(argv)
    run_dir = args.dir or Path(tempfile.mkdtemp(prefix="ringkv-txn-chaos-"))
    report = asyncio.run(TxnChaosRun(run_dir, seed=args.seed, duration_s=args.duration,
                                     clients=args.clients, counters=args.counters,
                                     blind=args.fault == "blind-increments").run())
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
