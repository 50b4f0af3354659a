"""One Paxos group, three GroupRunners in one process, on LevelDB with real fsyncs.

    python -m bench.txn_group [--serial N] [--pipelined N] [--inflight K] [--memory]

The runners talk through coalescing outboxes and msgpack, delivered on the
next loop turn (no network). Reports commits/s, commit latency (p50, p99)
and CPU µs per commit (``time.process_time``, every thread of the process:
the three runners, their fsync threads, the codec), one proposal at a time
and with K in flight, and the leader's fsyncs per commit (group commit).
The leader's are measured from its election, so the serial figure counts
its few election fsyncs too.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

from ringkv.clock import SystemClock
from ringkv.errors import PeerUnreachable
from ringkv.storage.leveldb import LevelDBEngine
from ringkv.storage.memory import MemoryEngine
from ringkv.txn.group import COMMITTED, GroupRunner, route_batch
from ringkv.txn.mvcc import MvccStore
from ringkv.txn.paxos import Message
from ringkv.txn.paxos_messages import Outbox, SnapshotPage, SnapshotRequest
from ringkv.txn.ranges import Range
from ringkv.txn.truetime import TrueTime

GROUP = Range("txn", 0, 0, ("a", "b", "c"))


class Cluster:
    def __init__(self, root: Path | None) -> None:
        self.runners: dict[str, GroupRunner] = {}
        self.outboxes = {n: Outbox(n) for n in GROUP.replicas}
        self.engines: list[Any] = []
        clock = SystemClock()
        for node_id in GROUP.replicas:
            engine: Any = MemoryEngine() if root is None else LevelDBEngine(root / node_id)
            self.engines.append(engine)
            self.runners[node_id] = GroupRunner(
                node_id, GROUP, engine=engine, mvcc=MvccStore(engine), clock=clock, truetime=TrueTime(),
                send=self._sender(node_id), fetch_snapshot=self._fetch, rng=random.Random(node_id),
            )

    def _sender(self, src: str) -> Any:
        outbox = self.outboxes[src]

        def send(to: str, group_id: str, msg: Message) -> None:
            if not outbox:
                asyncio.get_running_loop().call_soon(self._flush, src)
            outbox.add(to, group_id, msg)
        return send

    def _flush(self, src: str) -> None:
        for to, batches in self.outboxes[src].take().items():
            for raw in batches:
                data = msgpack.packb(raw, use_bin_type=True)
                route_batch(msgpack.unpackb(data, raw=False), {GROUP.group_id: self.runners[to]},
                            expect_sender=src)

    async def _fetch(self, to: str, request: SnapshotRequest) -> SnapshotPage:
        raise PeerUnreachable("no snapshots in this benchmark", node_id=to)

    def leader(self) -> GroupRunner | None:
        return next((r for r in self.runners.values() if r.is_leader()), None)


async def measure(args: argparse.Namespace, root: Path | None) -> dict[str, Any]:
    cluster = Cluster(root)
    for runner in cluster.runners.values():
        runner.start()
    try:
        clock = SystemClock()
        deadline = clock.monotonic_s() + 10.0
        while (leader := cluster.leader()) is None:
            if clock.monotonic_s() > deadline:
                raise RuntimeError("no leader within 10 s")
            await clock.sleep(0.01)
        out: dict[str, Any] = {}
        latencies: list[float] = []
        cpu, wall = time.process_time(), clock.monotonic_s()
        for i in range(args.serial):
            started = clock.monotonic_s()
            outcome = await leader.propose_future(f"s{i}", [(f"k{i % 100}".encode(), b"x" * 100)])
            if outcome.status != COMMITTED:
                raise RuntimeError(f"serial commit {i}: {outcome}")
            latencies.append(clock.monotonic_s() - started)
        out["serial"] = summary(latencies, time.process_time() - cpu, clock.monotonic_s() - wall)
        out["serial"]["fsyncs"] = leader.stats.fsyncs / max(1, leader.stats.committed)
        fsyncs = leader.stats.fsyncs
        commits = leader.stats.committed
        latencies = []
        cpu, wall = time.process_time(), clock.monotonic_s()
        done = 0
        while done < args.pipelined:
            starts = clock.monotonic_s()
            futures = [leader.propose_future(f"p{done + i}", [(f"k{i}".encode(), b"x" * 100)])
                       for i in range(args.inflight)]
            for outcome in await asyncio.gather(*futures):
                if outcome.status != COMMITTED:
                    raise RuntimeError(f"pipelined commit: {outcome}")
                latencies.append(clock.monotonic_s() - starts)
            done += args.inflight
        out["pipelined"] = summary(latencies, time.process_time() - cpu, clock.monotonic_s() - wall)
        out["pipelined"]["fsyncs"] = (leader.stats.fsyncs - fsyncs) / max(1, leader.stats.committed - commits)
        return out
    finally:
        for runner in cluster.runners.values():
            runner.stop()
        for engine in cluster.engines:
            engine.close()


def summary(latencies: list[float], cpu_s: float, wall_s: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "commits_per_s": len(ordered) / wall_s,
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1e3,
        "cpu_us_per_commit": cpu_s / len(ordered) * 1e6,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.txn_group", description=__doc__.splitlines()[0])
    parser.add_argument("--serial", type=int, default=300)
    parser.add_argument("--pipelined", type=int, default=1024)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--memory", action="store_true", help="memory engines instead of LevelDB")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ringkv-group-") as tmp:
        result = asyncio.run(measure(args, None if args.memory else Path(tmp)))
    engine = "memory" if args.memory else "LevelDB (fsync)"
    print(f"one group, 3 runners in one process, {engine}:")
    for phase in ("serial", "pipelined"):
        r = result[phase]
        label = "1 in flight" if phase == "serial" else f"{args.inflight} in flight"
        print(f"  {label:>12}: {r['commits_per_s']:8.0f} commits/s  p50 {r['p50_ms']:6.2f} ms  "
              f"p99 {r['p99_ms']:6.2f} ms  CPU {r['cpu_us_per_commit']:5.0f} µs/commit  "
              f"leader fsyncs/commit {r['fsyncs']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
