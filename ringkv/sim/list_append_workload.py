"""The list-append workload (``ringkv sim --workload list-append``), Elle-style.

Keys hold JSON lists and are dealt over every range of the keyspace. A
client's transaction is a few micro-ops on distinct keys in at least two
ranges: reads of whole lists and appends of unique values. The API is
one-shot (reads, conditions and writes in one request), so an append is a
compare-and-set on the list:

1. a read-only transaction (lock-free, at ``TT.now().latest``) reads the
   lists to append to, with their versions;
2. one transaction then reads every key of the transaction under locks and
   writes each appended key's list plus its new value, guarded by a
   ``version`` condition (``absent`` for a key never written) on what step 1
   read. A failed condition or an abort: certainly not committed; any other
   error: unknown.

Under its locks the committed transaction saw each appended key exactly as
step 1 did (the version held), so its micro-ops are the reads it returned,
each appended key's read followed by its append. Step 1, and transactions
that only read (drawn now and then), are recorded as transactions of reads.
``sim/list_append.py`` infers the dependency graph, with real-time edges
(strict serializability), and reports every cycle.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any

from ringkv.sim.cluster import Machine, SimCluster
from ringkv.sim.history import FAIL, INFO, OK, Op
from ringkv.sim.list_append import APPEND, READ, MicroOp, Txn
from ringkv.sim.txn_client import Outcome, TxnClient, keys_across_ranges, range_index
from ringkv.txn.requests import Condition, TxnRequest, Write


@dataclass(frozen=True)
class ListAppendSpec:
    ops: int  # client transactions (an append's read-only pre-read counts one)
    clients: int
    keys: int
    ranges: int
    duration_s: float
    keyspace: str
    max_keys_per_txn: int = 3
    append_fraction: float = 0.6  # of a transaction's keys
    read_only_fraction: float = 0.2  # transactions that only read
    client_timeout_s: float = 3.0

    @property
    def key_names(self) -> list[str]:
        return keys_across_ranges("list", self.keys, self.ranges)


class ListAppendWorkload:
    def __init__(self, spec: ListAppendSpec, cluster: SimCluster, seed: int) -> None:
        self.spec = spec
        self.cluster = cluster
        self.loop = cluster.loop
        self.seed = seed
        self.client = TxnClient(cluster, spec.keyspace, spec.client_timeout_s)
        self.keys = spec.key_names
        self.txns: list[Txn] = []
        self.ops: list[Op] = []
        self._next_index = 0
        self._next_value = 0

    @property
    def unexpected(self) -> list[str]:
        return self.client.unexpected

    async def run(self) -> None:
        await asyncio.gather(*(self._client(c) for c in range(self.spec.clients)))

    async def _client(self, cid: int) -> None:
        spec = self.spec
        rng = random.Random(f"{self.seed}/list-append/{cid}")
        think_s = spec.clients * spec.duration_s / max(1, spec.ops)
        process = f"c{cid}"
        for _ in range(spec.ops):  # bounded: the shared budget ends it sooner
            await asyncio.sleep(rng.expovariate(1 / think_s))
            if self._next_index >= spec.ops:
                return
            keys = pick_keys(rng, self.keys, spec.ranges, spec.max_keys_per_txn)
            machine = rng.choice(self.cluster.machines)
            if rng.random() < spec.read_only_fraction:
                await self.read(process, machine, keys)
                continue
            appends = [k for k in keys if rng.random() < spec.append_fraction] or [keys[-1]]
            pre = await self.read(process, machine, appends)
            if pre is None or self._next_index >= spec.ops:
                continue
            machine = rng.choice(self.cluster.machines)
            await self.append(process, machine, keys, appends, pre)

    async def read(self, process: str, machine: Machine, keys: list[str], *,
                   final: bool = False) -> dict[str, tuple[list[int], int | None]] | None:
        """A read-only transaction of ``keys``: each list and its version, or None."""
        index = self._take_index()
        start = self.loop.time()
        request = TxnRequest(self.spec.keyspace, None, tuple(k.encode() for k in keys), (), ())
        outcome = await self.client.call(machine, request, f"read {keys}")
        got = None if outcome.answer is None else _lists(outcome.answer)
        ops: tuple[MicroOp, ...] = tuple(
            (READ, k, None if got is None else got[k][0]) for k in keys)
        status = OK if outcome.status == OK else FAIL  # a read changes nothing
        self._record(Txn(index, process, ops, status, start, outcome.end), machine.node_id,
                     outcome, final,
                     None if outcome.answer is None else outcome.answer["receipt"].get("read_ts"))
        return got

    async def append(self, process: str, machine: Machine, keys: list[str], appends: list[str],
                     pre: dict[str, tuple[list[int], int | None]]) -> Outcome:
        index = self._take_index()
        start = self.loop.time()
        values: dict[str, int] = {}
        for key in appends:
            self._next_value += 1
            values[key] = self._next_value
        conditions = tuple(
            Condition(k.encode(), "version", version_us=pre[k][1]) if pre[k][1] is not None
            else Condition(k.encode(), "absent") for k in appends)
        writes = tuple(Write(k.encode(), json.dumps([*pre[k][0], values[k]]).encode())
                       for k in appends)
        request = TxnRequest(self.spec.keyspace, f"{process}.{index}",
                             tuple(k.encode() for k in keys), conditions, writes)
        outcome = await self.client.call(machine, request, f"append {values} read {keys}")
        status = outcome.status
        got = None
        if status == OK:
            assert outcome.answer is not None
            if outcome.answer.get("committed"):
                got = _lists(outcome.answer)
            else:
                status = INFO  # answered without committing: not what it should get
        ops: list[MicroOp] = []
        for key in keys:
            ops.append((READ, key, None if got is None else got[key][0]))
            if key in values:
                ops.append((APPEND, key, values[key]))
        self._record(Txn(index, process, tuple(ops), status, start, outcome.end),
                     machine.node_id, outcome, False,
                     None if outcome.answer is None else outcome.answer.get("commit_ts"))
        return outcome

    async def final_read(self, attempts: int = 10) -> bool:
        """After healing: every list, retried a few times."""
        machines = self.cluster.machines
        for attempt in range(attempts):
            if await self.read("final", machines[attempt % len(machines)], self.keys,
                               final=True) is not None:
                return True
            await asyncio.sleep(1.0)
        return False

    def _take_index(self) -> int:
        index = self._next_index
        self._next_index += 1
        return index

    def _record(self, txn: Txn, node: str, outcome: Outcome, final: bool,
                ts: int | None) -> None:
        self.txns.append(txn)
        kind = "append" if any(op[0] == APPEND for op in txn.ops) else "read"
        self.ops.append(Op(txn.id, txn.process, kind, ",".join(str(op[1]) for op in txn.ops),
                           repr([list(op) for op in txn.ops]), txn.invoke, txn.complete,
                           txn.status, node, "SERIAL", outcome.error, final,
                           None if ts is None else (int(ts), 0)))

    def history(self) -> list[Op]:
        return sorted(self.ops, key=lambda op: op.index)


def pick_keys(rng: random.Random, keys: list[str], ranges: int, most: int) -> list[str]:
    """2 to ``most`` distinct keys, the first two in different ranges."""
    first = rng.choice(keys)
    second = rng.choice([k for k in keys if range_index(k, ranges) != range_index(first, ranges)]
                        or [k for k in keys if k != first])
    rest = [k for k in keys if k not in (first, second)]
    extra = rng.randint(0, max(0, min(len(rest), most - 2)))
    return [first, second, *rng.sample(rest, extra)]


def _lists(answer: dict[str, Any]) -> dict[str, tuple[list[int], int | None]]:
    """Each read key's list (absent: empty) and version."""
    out: dict[str, tuple[list[int], int | None]] = {}
    for read in answer["reads"]:
        value = read["value"]
        out[bytes(read["key"]).decode()] = ([] if value is None else list(json.loads(value)),
                                            read.get("version"))
    return out
