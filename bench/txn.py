"""The transactional tier on 3 node processes (keyspace ``txn``, RF 3, ε floor 1 ms).

    python -m bench txn [--duration 10] [--concurrency 32] [--keys 1000]
                        [--client lean|aio] [--procs 2] [--phases cas,txn,txn2,ro2,snapshot]
                        [--profile]

The keyspace is cut into 4 ranges (``ranges``). Five phases, each a closed
loop of ``concurrency`` workers:

* ``cas``: single-key compare-and-set commits. Each worker owns its key and
  keeps the version its last commit returned, so every operation is one
  conditional put (``"if": {"version": v}``) that commits (no read, no conflict);
* ``txn``: one-shot single-range transactions, each reading one key and
  writing two (``POST /v1/txn``), both keys in one range;
* ``txn2``: the same with the two keys in two ranges: two-phase commit over
  two Paxos groups (issue #13's target: >= 300 commits/s; Spanner's Table 4
  gives 17 ms for 2PC with one participant and 24.5 ms with two);
* ``ro2``: read-only transactions reading two keys in two ranges (a
  lock-free snapshot at ``TT.now().latest``), through random nodes;
* ``snapshot``: snapshot reads (``max_staleness_ms``) on random keys,
  through random nodes (any replica whose safe time has passed serves them).

The load comes from ``--client``: ``lean`` (the default) is
``bench/txn_load.py``, prebuilt HTTP/1.1 on keep-alive connections in
``--procs`` processes of its own, routed as the client routes (writes to the
leader the last receipt named); ``aio`` is the asyncio client
(``ringkv.client.AsyncClient``) in this process, which costs ~170 µs of CPU a
request and so, on a small machine, measures the client as much as the nodes.

Reported per phase: ops/s, p50 and p99 latency, the share of latency spent
in commit wait (the receipts' ``commit_wait_ms`` over the measured latency),
and, from ``/proc`` (``bench/proc_cpu.py``), the CPU µs per operation of the
leader, of each follower, of all three nodes, and of the load generator, side
by side. Throughput on a shared machine drifts; CPU per operation barely
moves, so compare changes by it. The load average is recorded with each run.
Targets from issue #11: ≥ 1,000 commits/s and ≥ 5,000 snapshot reads/s.

``--profile`` samples every node and the load generator with py-spy (only
samples holding the GIL: the idle event loop is not counted) during each
phase, and writes where the time goes (the functions most often on the
stack, and the ones on top) to ``bench/results/txn-profile-<phase>-<role>.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import proc_cpu
from bench.loadgen import percentile
from bench.txn_load import PHASES, RANGES, STALENESS_MS, Generators, key_pair
from ringkv.client import AsyncClient
from ringkv.tools.launcher import free_port_block
from ringkv.tools.local_cluster import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results"
KEYSPACE = "txn"
EPSILON_FLOOR_MS = 1.0
READY_TIMEOUT_S = 60.0

AioOp = Callable[[AsyncClient, int, random.Random], Awaitable[float | None]]


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


HEADER = (f"{'phase':<9} {'ops/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'wait%':>6} {'wait p50':>8} "
          f"| {'CPU µs/op:':<10} {'leader':>6} {'fol.1':>6} {'fol.2':>6} {'nodes':>6} "
          f"{'loadgen':>7} {'gen core':>9} | {'fsyncs/op':<10} {'leader':>6} {'fol.':>6} "
          f"| {'errors':>6}")


def phase_line(r: dict[str, Any]) -> str:
    wait = "-" if r["commit_wait_share"] is None else f"{100 * r['commit_wait_share']:.1f}%"
    gen_core = f"{r['loadgen_cpu_pct']:.0f}%{proc_cpu.gen_mark(r['gen_limited'])}"
    followers = [n["cpu_us_per_op"] for n in r["nodes"] if n["role"] != "leader"] + [None, None]
    leader = next((n["cpu_us_per_op"] for n in r["nodes"] if n["role"] == "leader"), None)
    leader_fsyncs = next((n.get("fsyncs_per_op") for n in r["nodes"] if n["role"] == "leader"),
                         None)
    follower_fsyncs = next((n.get("fsyncs_per_op") for n in r["nodes"]
                            if n["role"] != "leader"), None)
    return (f"{r['phase']:<9} {r['ops_per_s']:>7.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
            f"{wait:>6} {r['commit_wait_p50_ms'] or 0:>8.2f} | {'':<10} {_us(leader):>6} "
            f"{_us(followers[0]):>6} {_us(followers[1]):>6} "
            f"{_us(r['server_cpu_us_per_op']):>6} {_us(r['loadgen_cpu_us_per_op']):>7} "
            f"{gen_core:>9} | "
            f"{'':<10} {_ratio(leader_fsyncs):>6} {_ratio(follower_fsyncs):>6} | {r['errors']:>6}")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summarise(name: str, latencies_s: list[float], waits_ms: list[float], errors: list[str],
              cpu: proc_cpu.PhaseCpu, roles: dict[int, str],
              fsyncs: dict[int, int] | None = None) -> dict[str, Any]:
    """A phase's record; ``cpu`` is what ``proc_cpu.PhaseMeter`` measured over it."""
    ops = len(latencies_s)
    elapsed_s, node_cpu_s = cpu.elapsed_s, cpu.node_cpu_s
    ordered = sorted(1000 * x for x in latencies_s)
    total_ms = sum(ordered)
    share = sum(waits_ms) / total_ms if waits_ms and total_ms else None
    return {
        "phase": name, "ops": ops, "errors": len(errors),
        "first_errors": sorted(set(errors))[:3], "duration_s": round(elapsed_s, 2),
        "ops_per_s": round(ops / elapsed_s, 1),
        "p50_ms": round(percentile(ordered, 50), 3), "p99_ms": round(percentile(ordered, 99), 3),
        "commit_wait_share": None if share is None else round(share, 4),
        "commit_wait_p50_ms": round(percentile(sorted(waits_ms), 50), 3) if waits_ms else None,
        "server_cpu_us_per_op": cpu.node_us_per_op,
        # Each node alone: the leader does every commit and strong read; any node serves
        # snapshot reads.
        "nodes": [{"pid": pid, "role": roles[pid], "cpu_us_per_op": proc_cpu.us_per_op(cpu, ops),
                   "cpu_pct": round(100 * cpu / elapsed_s, 1),
                   # Group commit: the Paxos log's fsyncs on this node per operation.
                   "fsyncs_per_op": round((fsyncs or {}).get(pid, 0) / ops, 3)
                   if ops and fsyncs is not None else None}
                  for pid, cpu in sorted(node_cpu_s.items(), key=lambda kv: (roles[kv[0]] != "leader", roles[kv[0]]))],
        "loadgen_cpu_us_per_op": cpu.gen_us_per_op,
        "loadgen_cpu_pct": cpu.gen_core_pct,  # all generator processes, in % of one core
        "gen_limited": cpu.gen_limited,
    }


async def run_aio(name: str, urls: list[str], pids: list[int], roles: dict[int, str], *,
                  concurrency: int, duration_s: float, op: AioOp) -> dict[str, Any]:
    """``concurrency`` workers of the asyncio client in this process call ``op`` in a closed
    loop; it returns the receipt's commit wait (ms), or None when the operation has none."""
    latencies: list[float] = []
    waits: list[float] = []
    errors: list[str] = []
    async with AsyncClient(urls, keyspace=KEYSPACE, timeout_s=5.0, pool_size=concurrency) as kv:
        await kv.refresh_ring()
        stop_at = time.monotonic() + duration_s

        async def worker(index: int) -> None:
            rng = random.Random(index)
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    wait_ms = await op(kv, index, rng)
                except Exception as exc:  # counted, reported with the first few
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                latencies.append(time.perf_counter() - started)
                if wait_ms is not None:
                    waits.append(wait_ms)

        fsyncs_before = node_fsyncs(urls, pids)
        with proc_cpu.PhaseMeter(pids, in_process_gen=True) as meter:
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        fsyncs_after = node_fsyncs(urls, pids)
    return summarise(name, latencies, waits, errors, meter.result(len(latencies)), roles,
                     {pid: fsyncs_after[pid] - fsyncs_before[pid] for pid in pids})


def run_lean(name: str, urls: list[str], pids: list[int], roles: dict[int, str],
             leaders: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    generators = Generators(name, urls, leaders, procs=args.procs, concurrency=args.concurrency,
                            duration_s=args.duration, keys=args.keys)
    time.sleep(1.0)  # the children start and import before the clock starts
    profiles = start_profiles(name, roles, generators.pids, args.duration) if args.profile else []
    fsyncs_before = node_fsyncs(urls, pids)
    with proc_cpu.PhaseMeter(pids) as meter:
        generators.go()
        result = generators.results()
    for cpu_s in result["cpu_s"]:
        meter.add_reported_gen(cpu_s)
    fsyncs_after = node_fsyncs(urls, pids)
    finish_profiles(profiles)
    return summarise(name, result["latencies_s"], result["waits_ms"], result["errors"],
                     meter.result(len(result["latencies_s"])), roles,
                     {pid: fsyncs_after[pid] - fsyncs_before[pid] for pid in pids})


def node_ids(urls: list[str]) -> dict[str, int]:
    """node id -> index into ``urls``, from each node's own /v1/status."""
    out = {}
    for index, url in enumerate(urls):
        with urllib.request.urlopen(f"{url}/v1/status", timeout=5) as response:
            view = json.loads(response.read())
        out[view["node_id"]] = index
    return out


def _status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/v1/status", timeout=5) as response:
        view: dict[str, Any] = json.loads(response.read())
    return view


def node_fsyncs(urls: list[str], pids: list[int]) -> dict[int, int]:
    """pid -> the Paxos log fsyncs so far over the node's groups (its /v1/status)."""
    return {pid: sum(int(group.get("fsyncs", 0)) for group in
                     _status(url).get("transactional", {}).get("groups", {}).values())
            for url, pid in zip(urls, pids)}


def node_roles(urls: list[str], pids: list[int]) -> dict[int, str]:
    """pid -> "leader" for the node whose /v1/status says it leads a group of ``txn``,
    "follower-N" for the others."""
    roles = {}
    followers = 0
    for url, pid in zip(urls, pids):
        with urllib.request.urlopen(f"{url}/v1/status", timeout=5) as response:
            view = json.loads(response.read())
        groups = view.get("transactional", {}).get("groups", {})
        if any(group.get("leads") for group in groups.values()):
            roles[pid] = "leader"
        else:
            followers += 1
            roles[pid] = f"follower-{followers}"
    return roles


def start_profiles(phase: str, roles: dict[int, str], loadgen_pids: list[int],
                   seconds: float) -> list[tuple[subprocess.Popen[bytes], Path]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy not found: no profile", flush=True)
        return []
    RESULTS.mkdir(exist_ok=True)
    targets = dict(roles) | {pid: f"loadgen-{i + 1}" for i, pid in enumerate(loadgen_pids)}
    started = []
    for pid, role in targets.items():
        raw = RESULTS / f"txn-profile-{phase}-{role}.raw"
        proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration",
                                 str(max(1, int(seconds) - 1)), "--rate", "100", "--gil",
                                 "--format", "raw", "--output", str(raw), "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append((proc, raw))
    return started


def finish_profiles(started: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    for proc, raw in started:
        _, err = proc.communicate(timeout=60)
        if raw.exists():
            raw.with_suffix(".txt").write_text(summarise_profile(raw) + "\n")
            raw.unlink()
        else:
            print(f"py-spy gave no profile: {err.decode(errors='replace')[:300]}")


def summarise_profile(raw: Path, top: int = 45) -> str:
    """Collapsed stacks → the functions most often on the stack (inclusive) and on top (self)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f.split(" (")[0] + " " + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                  for f in stack.split(";")]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    total = max(total, 1)
    lines = [f"{total} samples holding the GIL ({raw.stem})", "", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def aio_ops(args: argparse.Namespace) -> dict[str, AioOp]:
    versions: dict[str, tuple[int, int]] = {}  # a worker's key -> (value, version)

    async def cas(kv: AsyncClient, index: int, rng: random.Random) -> float | None:
        key = f"cas-{index}"
        value, version = versions.get(key, (0, 0))
        if version == 0:
            result = await kv.put(key, 0)
        else:
            result = await kv.put(key, value + 1, if_version=version)
        assert result.version is not None
        versions[key] = (value + 1 if version else 0, result.version)
        return float(result.receipt.get("commit_wait_ms", 0.0))

    async def one_shot(kv: AsyncClient, index: int, rng: random.Random, a: str,
                       b: str) -> float | None:
        result = await kv.txn(reads=[a], writes=[{"key": a, "value": rng.random()},
                                                  {"key": b, "value": index}])
        return float((result.receipt or {}).get("commit_wait_ms", 0.0))

    async def txn(kv: AsyncClient, index: int, rng: random.Random) -> float | None:
        return await one_shot(kv, index, rng, *key_pair(f"t-{index}", same_range=True))

    async def txn2(kv: AsyncClient, index: int, rng: random.Random) -> float | None:
        return await one_shot(kv, index, rng, *key_pair(f"t2-{index}", same_range=False))

    async def ro2(kv: AsyncClient, index: int, rng: random.Random) -> float | None:
        await kv.txn(reads=list(key_pair(f"t2-{index}", same_range=False)))
        return None

    async def snapshot(kv: AsyncClient, index: int, rng: random.Random) -> float | None:
        await kv.get_versioned(f"k-{rng.randrange(args.keys)}", max_staleness_ms=STALENESS_MS)
        return None

    return {"cas": cas, "txn": txn, "txn2": txn2, "ro2": ro2, "snapshot": snapshot}


async def load_keys(urls: list[str], args: argparse.Namespace) -> None:
    """The keys the snapshot reads hit (one pass, not timed as a phase)."""
    async def load(kv: AsyncClient, index: int) -> None:
        for i in range(index, args.keys, args.concurrency):
            await kv.put(f"k-{i}", i)

    async with AsyncClient(urls, keyspace=KEYSPACE) as kv:
        await asyncio.gather(*(load(kv, i) for i in range(args.concurrency)))


def bench(urls: list[str], pids: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    asyncio.run(load_keys(urls, args))
    leaders = node_ids(urls)
    ops = aio_ops(args)
    results = []
    for name in args.phases:
        roles = node_roles(urls, pids)
        if args.client == "lean":
            result = run_lean(name, urls, pids, roles, leaders, args)
        else:
            async def aio_phase() -> dict[str, Any]:
                profiles = start_profiles(name, roles, [os.getpid()], args.duration) \
                    if args.profile else []
                try:
                    return await run_aio(name, urls, pids, roles, concurrency=args.concurrency,
                                         duration_s=args.duration, op=ops[name])
                finally:
                    finish_profiles(profiles)
            result = asyncio.run(aio_phase())
        print(phase_line(result), flush=True)
        results.append(result)
    return results


async def wait_ready(urls: list[str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with AsyncClient(urls, keyspace=KEYSPACE, timeout_s=2.0, max_retries=0) as kv:
        while True:
            try:
                await kv.put("warm", 0)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench txn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="operations in flight (workers), over all generator processes")
    parser.add_argument("--keys", type=int, default=1000, help="keys the snapshot reads hit")
    parser.add_argument("--client", choices=("lean", "aio"), default="lean",
                        help="lean: bench/txn_load.py in processes of its own; aio: the "
                             "asyncio client in this process")
    parser.add_argument("--procs", type=int, default=2, help="lean generator processes")
    parser.add_argument("--phases", type=lambda text: text.split(","), default=list(PHASES),
                        help="comma-separated, from " + ",".join(PHASES))
    parser.add_argument("--profile", action="store_true",
                        help="sample every node and the load generator with py-spy")
    parser.add_argument("--out", type=Path, default=RESULTS / "txn.json")
    args = parser.parse_args(argv)
    if not set(args.phases) <= set(PHASES) or not 1 <= args.procs <= args.concurrency:
        parser.error(f"--phases must come from {','.join(PHASES)}; --procs from 1 to --concurrency")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ringkv-bench-txn-") as tmp:
        cluster = LocalCluster(Path(tmp), nodes=3, rf=3, base_client_port=free_port_block(3),
                               base_internode_port=free_port_block(3), config_overrides={
                                   "keyspaces.txn": {"replication_factor": 3,
                                                     "tier": "transactional", "ranges": RANGES},
                                   "truetime.min_uncertainty_ms": EPSILON_FLOOR_MS})
        try:
            cluster.up()
            urls = cluster.endpoints()
            pids = [node.proc.pid for node in cluster.procs if node.proc is not None]
            asyncio.run(wait_ready(urls))
            print(f"client {args.client}" + (f" ({args.procs} processes)" if args.client == "lean"
                                              else "") + f", concurrency {args.concurrency}, "
                  f"load average before {load_before[0]:.2f}", flush=True)
            print(HEADER, flush=True)
            results = bench(urls, pids, args)
        finally:
            cluster.down()
    load_after = os.getloadavg()
    if any(result["gen_limited"] for result in results):
        print(proc_cpu.GEN_LIMITED_NOTE)
    for result in results:
        for line in result["first_errors"]:
            print(f"  {result['phase']} error: {line}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "epsilon_floor_ms": EPSILON_FLOOR_MS, "client": args.client, "procs": args.procs,
        "concurrency": args.concurrency, "duration_s": args.duration,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results}, indent=2))
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
