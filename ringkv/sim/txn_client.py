"""A simulated client of one-shot transactions across ranges (the bank and
list-append workloads share it).

A client sends a ``TxnRequest`` to a node's ``TxnService.execute`` inside
that node's process (a crash or pause of the node stops the request too) and
gives up half a second after the request's own deadline, as an HTTP client
would. What it learns is one of Jepsen's three outcomes:

* ``ok``: answered (a transaction with writes committed; one without writes,
  a lock-free read-only transaction, returned its snapshot);
* ``fail``: certainly did nothing: nobody listened (the node is down), the
  node's clock fence refused it before anything was sent, a condition did
  not hold (409), the transaction was aborted, or it had no writes (a read
  changes nothing);
* ``info``: anything else (a timeout, no leader, a lost answer): it may have
  committed.

Keys are placed by their token into the keyspace's fixed range slices
(``txn/ranges.py``), so a workload can spread its keys over every range and
make its transactions span several.
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass
from typing import Any

from ringkv.errors import Aborted, ConditionFailed, RingKVError
from ringkv.ring import token_for
from ringkv.sim.cluster import CRASHED, OFF, Machine, SimCluster
from ringkv.sim.history import FAIL, INFO, OK
from ringkv.sim.workload import wait_for_answer
from ringkv.txn.ranges import slice_ends
from ringkv.txn.requests import TxnRequest
from ringkv.txn.service import Op as TxnOp


def range_index(key: str, ranges: int) -> int:
    """Which of the keyspace's ``ranges`` fixed slices holds ``key``."""
    return bisect.bisect_left(slice_ends(ranges), token_for(key.encode())) % ranges


def keys_across_ranges(prefix: str, count: int, ranges: int) -> list[str]:
    """``count`` key names, dealt round-robin over the ranges: key i lies in
    range i mod ``ranges``, so any two neighbours lie in different ranges."""
    pools: list[list[str]] = [[] for _ in range(ranges)]
    per_range = -(-count // ranges)
    n = 0
    while any(len(pool) < per_range for pool in pools):  # ends: tokens spread evenly
        name = f"{prefix}{n}"
        pool = pools[range_index(name, ranges)]
        if len(pool) < per_range:
            pool.append(name)
        n += 1
    return [pools[i % ranges][i // ranges] for i in range(count)]


@dataclass(frozen=True)
class Outcome:
    status: str  # OK, FAIL or INFO
    answer: dict[str, Any] | None  # the node's answer, when OK
    error: str | None  # why not OK
    end: float | None  # loop time of the answer; None: the client gave up
    exc: RingKVError | None = None


class TxnClient:
    def __init__(self, cluster: SimCluster, keyspace: str, timeout_s: float) -> None:
        self.cluster = cluster
        self.loop = cluster.loop
        self.keyspace = keyspace
        self.timeout_s = timeout_s
        self.unexpected: list[str] = []  # exceptions that are not ringkv errors: bugs

    async def call(self, machine: Machine, request: TxnRequest, what: str) -> Outcome:
        """Run ``request`` through ``machine``'s node; ``what`` names it in a bug report."""
        now = self.loop.time()
        if machine.state in (CRASHED, OFF) or machine.node is None:
            return Outcome(FAIL, None, "connection refused", now)
        node = machine.node
        if node.txn.clock_status()["fenced"]:
            # What execute does first: a fenced node refuses, doing nothing.
            return Outcome(FAIL, None, "ClockUncertain", now)
        op = TxnOp("txn", self.keyspace, request)
        task = machine.run(node.txn.execute(op, started_s=node.clock.monotonic_s(),
                                            timeout_s=self.timeout_s))
        await wait_for_answer(self.loop, task, self.timeout_s + 0.5)
        if not task.done():
            return Outcome(INFO, None, "client timeout", None)
        end = self.loop.time()
        exc = task.exception()
        if exc is None:
            return Outcome(OK, task.result(), None, end)
        if not isinstance(exc, RingKVError):
            self.unexpected.append(f"{what}: {exc!r}")
            return Outcome(INFO, None, type(exc).__name__, end)
        if isinstance(exc, (ConditionFailed, Aborted)) or not request.writes:
            return Outcome(FAIL, None, type(exc).__name__, end, exc)
        return Outcome(INFO, None, type(exc).__name__, end, exc)


async def warm_up(client: TxnClient, keys: list[str], timeout_s: float) -> bool:
    """A read-only transaction of every key, retried until it answers (bounded): clocks
    are synced and every range's group has a leader before the clients start."""
    loop = client.loop
    deadline_s = loop.time() + timeout_s
    request = TxnRequest(client.keyspace, None, tuple(k.encode() for k in keys), (), ())
    while loop.time() < deadline_s:
        machine = client.cluster.machines[0]
        outcome = await client.call(machine, request, "warm-up")
        if outcome.status == OK:
            return True
        await asyncio.sleep(0.2)
    return False
