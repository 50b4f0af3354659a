"""The bank workload (``ringkv sim --workload bank``): transfers across ranges.

Jepsen's bank test on the transactional tier. Accounts are dealt over every
range of the keyspace and opened in one transaction. Each client, in turn:

* **transfers**: a read-only transaction of two accounts in different ranges
  (lock-free, at ``TT.now().latest``), then, if the first can pay, a one-shot
  transaction that writes both new balances guarded by ``version``
  conditions on both (compare-and-set on what it read): two-phase commit
  over the two ranges' groups. A failed condition or an abort changed
  nothing; any other error leaves the transfer's outcome unknown;
* **audits**: a read-only transaction of every account, one snapshot across
  every range.

``sim/bank.py`` judges every answered read-only transaction: a snapshot of
all the accounts must sum to the starting total, and no balance may be
negative (a two-account read is judged for sign only). After healing, a
final read of every account is judged the same way.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass

from ringkv.sim.bank import Snapshot, Transfer
from ringkv.sim.cluster import Machine, SimCluster
from ringkv.sim.history import FAIL, INFO, OK, Op
from ringkv.sim.txn_client import Outcome, TxnClient, keys_across_ranges, range_index
from ringkv.txn.requests import Condition, TxnRequest, Write


@dataclass(frozen=True)
class BankSpec:
    ops: int  # client transactions (a transfer's read and its write count one each)
    clients: int
    accounts: int
    ranges: int
    duration_s: float  # virtual seconds the ops are spread over
    keyspace: str
    start_balance: int = 10
    audit_fraction: float = 0.3
    max_amount: int = 5
    client_timeout_s: float = 3.0

    @property
    def account_names(self) -> list[str]:
        return keys_across_ranges("acct", self.accounts, self.ranges)


class BankWorkload:
    def __init__(self, spec: BankSpec, cluster: SimCluster, seed: int) -> None:
        self.spec = spec
        self.cluster = cluster
        self.loop = cluster.loop
        self.seed = seed
        self.client = TxnClient(cluster, spec.keyspace, spec.client_timeout_s)
        self.accounts = spec.account_names
        self.transfers: list[Transfer] = []
        self.snapshots: list[Snapshot] = []
        self.ops: list[Op] = []
        self.opened = False
        self._next_index = 0

    @property
    def unexpected(self) -> list[str]:
        return self.client.unexpected

    @property
    def initial(self) -> dict[str, int]:
        return {a: self.spec.start_balance for a in self.accounts}

    async def open(self, timeout_s: float) -> bool:
        """Open every account in one transaction across every range (before any fault),
        retried under one id until it commits or a condition shows it did (bounded)."""
        spec = self.spec
        request = TxnRequest(
            spec.keyspace, "open", (),
            tuple(Condition(a.encode(), "absent") for a in self.accounts),
            tuple(Write(a.encode(), json.dumps(spec.start_balance).encode())
                  for a in self.accounts))
        deadline_s = self.loop.time() + timeout_s
        while self.loop.time() < deadline_s:
            outcome = await self.client.call(self.cluster.machines[0], request, "open")
            if outcome.status == OK or outcome.error == "ConditionFailed":
                self.opened = True
                return True
            await asyncio.sleep(0.2)
        return False

    async def run(self) -> None:
        await asyncio.gather(*(self._client(c) for c in range(self.spec.clients)))

    async def _client(self, cid: int) -> None:
        spec = self.spec
        rng = random.Random(f"{self.seed}/bank/{cid}")
        think_s = spec.clients * spec.duration_s / max(1, spec.ops)
        process = f"c{cid}"
        for _ in range(spec.ops):  # bounded: the shared budget ends it sooner
            await asyncio.sleep(rng.expovariate(1 / think_s))
            if self._next_index >= spec.ops:
                return
            machine = rng.choice(self.cluster.machines)
            if rng.random() < spec.audit_fraction:
                await self.read(process, machine, self.accounts)
                continue
            src = rng.choice(self.accounts)
            dst = rng.choice([a for a in self.accounts
                              if range_index(a, spec.ranges) != range_index(src, spec.ranges)]
                             or [a for a in self.accounts if a != src])
            read = await self.read(process, machine, [src, dst])
            if read is None or self._next_index >= spec.ops:
                continue
            balances, versions = read
            if balances[src] <= 0:
                continue
            amount = rng.randint(1, min(spec.max_amount, balances[src]))
            await self.transfer(process, rng.choice(self.cluster.machines), src, dst, amount,
                                balances, versions)

    async def read(self, process: str, machine: Machine, accounts: list[str], *,
                   final: bool = False) -> tuple[dict[str, int], dict[str, int]] | None:
        """A read-only transaction of ``accounts``: their balances and versions, or None."""
        index = self._take_index()
        start = self.loop.time()
        request = TxnRequest(self.spec.keyspace, None, tuple(a.encode() for a in accounts), (), ())
        outcome = await self.client.call(machine, request, f"read {accounts}")
        balances: dict[str, int] = {}
        versions: dict[str, int] = {}
        if outcome.status == OK:
            assert outcome.answer is not None
            for read in outcome.answer["reads"]:
                account = bytes(read["key"]).decode()
                # An opened account read as absent counts 0: the total shows it.
                balances[account] = 0 if read["value"] is None else int(json.loads(read["value"]))
                versions[account] = read["version"]
        status = outcome.status if outcome.status == OK else FAIL  # a read changes nothing
        total = None if len(accounts) < len(self.accounts) else sum(self.initial.values())
        self.snapshots.append(Snapshot(index, process, balances, status, start, outcome.end,
                                       total))
        read_ts = None if outcome.answer is None else outcome.answer["receipt"].get("read_ts")
        self._record(index, process, "read", ",".join(accounts), repr(sorted(balances.items())),
                     start, outcome, machine.node_id, final, read_ts)
        return (balances, versions) if outcome.status == OK else None

    async def transfer(self, process: str, machine: Machine, src: str, dst: str, amount: int,
                       balances: dict[str, int], versions: dict[str, int]) -> Outcome:
        index = self._take_index()
        start = self.loop.time()
        conditions = tuple(Condition(a.encode(), "version", version_us=versions[a])
                           if versions.get(a) is not None else Condition(a.encode(), "absent")
                           for a in (src, dst))
        request = TxnRequest(self.spec.keyspace, f"{process}.{index}", (), conditions, (
            Write(src.encode(), json.dumps(balances[src] - amount).encode()),
            Write(dst.encode(), json.dumps(balances[dst] + amount).encode())))
        outcome = await self.client.call(machine, request, f"transfer {amount} {src} -> {dst}")
        status = outcome.status
        if status == OK and not (outcome.answer or {}).get("committed"):
            status = INFO  # answered without committing: not what a transfer should get
        self.transfers.append(Transfer(index, process, src, dst, amount, status, start,
                                       outcome.end))
        commit_ts = None if outcome.answer is None else outcome.answer.get("commit_ts")
        self._record(index, process, "transfer", f"{src},{dst}", str(amount), start, outcome,
                     machine.node_id, False, commit_ts)
        return outcome

    async def final_read(self, attempts: int = 10) -> bool:
        """After healing: every account, retried a few times."""
        machines = self.cluster.machines
        for attempt in range(attempts):
            got = await self.read("final", machines[attempt % len(machines)], self.accounts,
                                  final=True)
            if got is not None:
                return True
            await asyncio.sleep(1.0)
        return False

    def _take_index(self) -> int:
        index = self._next_index
        self._next_index += 1
        return index

    def _record(self, index: int, process: str, kind: str, key: str, value: str, start: float,
                outcome: Outcome, node: str, final: bool, ts: int | None) -> None:
        status = outcome.status if kind == "transfer" else (
            OK if outcome.status == OK else FAIL)
        self.ops.append(Op(index, process, kind, key, value, start, outcome.end, status, node,
                           "SERIAL", outcome.error, final,
                           None if ts is None else (int(ts), 0)))

    def history(self) -> list[Op]:
        return sorted(self.ops, key=lambda op: op.index)
