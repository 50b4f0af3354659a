"""The transactional tier on 3 node processes (keyspace ``txn``, RF 3, ε floor 1 ms).

    python -m bench txn [--duration 10] [--concurrency 32] [--keys 1000] [--profile-leader]

Three phases through the asyncio client (``ringkv.client.AsyncClient``), each
a closed loop of ``concurrency`` workers in this process:

* ``cas``: single-key compare-and-set commits. Each worker owns its keys and
  keeps the version its last commit returned, so every operation is one
  ``put(key, n + 1, if_version=v)`` that commits (no read, no conflict);
* ``txn``: one-shot single-range transactions, each reading one key and
  writing two (``POST /v1/txn``);
* ``snapshot``: snapshot reads (``max_staleness_ms``) on random keys,
  through random nodes (any replica whose safe time has passed serves them).

Reported per phase: ops/s, p50 and p99 latency, the share of latency spent
in commit wait (the receipt's ``commit_wait_ms`` over the client's latency),
the CPU µs the three node processes spent per op (``bench/proc_cpu.py``),
the leader's share of it and its CPU use (% of one core), and this process's CPU (the client shares the machine's cores with the nodes).
Targets from issue #11: ≥ 1,000 commits/s and ≥ 5,000 snapshot reads/s.

``--profile-leader`` samples the range leader's process with py-spy during
the ``cas`` phase and prints where its time goes (the functions most often
on its stack, and the ones on top), to ``bench/results/txn-leader.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import urllib.request
from collections import Counter
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import proc_cpu
from bench.loadgen import percentile
from ringkv.client import AsyncClient
from ringkv.tools.launcher import free_port_block
from ringkv.tools.local_cluster import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results"
KEYSPACE = "txn"
EPSILON_FLOOR_MS = 1.0
STALENESS_MS = 1000
READY_TIMEOUT_S = 60.0


def phase_line(r: dict[str, Any]) -> str:
    wait = "-" if r["commit_wait_share"] is None else f"{100 * r['commit_wait_share']:.0f}%"
    return (f"{r['phase']:<9} {r['ops_per_s']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{wait:>11} {r['commit_wait_p50_ms'] or 0:>9.2f} "
            f"{r['server_cpu_us_per_op'] or 0:>10.0f} {r.get('leader_cpu_us_per_op') or 0:>10.0f} "
            f"{r.get('leader_cpu_pct') or 0:>8.0f} {r['client_cpu_pct']:>8.0f} {r['errors']:>6}")


HEADER = (f"{'phase':<9} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'commit wait':>11} "
          f"{'wait p50':>9} {'srv µs/op':>10} {'ldr µs/op':>10} {'leader%':>8} {'client%':>8} "
          f"{'errors':>6}")


async def run_phase(name: str, urls: list[str], pids: list[int], *, leader: int | None,
                    concurrency: int,
                    duration_s: float, op: Callable[[AsyncClient, int, random.Random],
                                                    Awaitable[float | None]]) -> dict[str, Any]:
    """``concurrency`` workers call ``op`` in a closed loop; it returns the receipt's commit
    wait (ms), or None when the operation has none."""
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
                latencies.append((time.perf_counter() - started) * 1000)
                if wait_ms is not None:
                    waits.append(wait_ms)

        cpu_before_s = proc_cpu.cpu_s(pids)
        leader_before_s = proc_cpu.cpu_s([leader]) if leader else 0.0
        own_before_s = time.process_time()
        began = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed_s = time.monotonic() - began
        server_cpu_s = proc_cpu.cpu_s(pids) - cpu_before_s
        leader_cpu_s = proc_cpu.cpu_s([leader]) - leader_before_s if leader else 0.0
        own_cpu_s = time.process_time() - own_before_s
    ordered = sorted(latencies)
    share = sum(waits) / sum(latencies) if waits and latencies else None
    return {
        "phase": name, "ops": len(latencies), "errors": len(errors),
        "first_errors": sorted(set(errors))[:3], "duration_s": round(elapsed_s, 2),
        "ops_per_s": round(len(latencies) / elapsed_s, 1),
        "p50_ms": round(percentile(ordered, 50), 3), "p99_ms": round(percentile(ordered, 99), 3),
        "commit_wait_share": None if share is None else round(share, 3),
        "commit_wait_p50_ms": round(percentile(sorted(waits), 50), 3) if waits else None,
        "server_cpu_us_per_op": proc_cpu.us_per_op(server_cpu_s, len(latencies)),
        # The range's leader alone: every commit and strong read is its work.
        "leader_cpu_us_per_op": proc_cpu.us_per_op(leader_cpu_s, len(latencies)) if leader
        else None,
        "leader_cpu_pct": round(100 * leader_cpu_s / elapsed_s, 1) if leader else None,
        "client_cpu_pct": round(100 * own_cpu_s / elapsed_s, 1),
    }


def leader_pid(urls: list[str], pids: list[int]) -> int | None:
    """The pid of the node whose /v1/status says it leads a group of ``txn``."""
    for url, pid in zip(urls, pids):
        with urllib.request.urlopen(f"{url}/v1/status", timeout=5) as response:
            view = json.loads(response.read())
        groups = view.get("transactional", {}).get("groups", {})
        if any(group.get("leads") for group in groups.values()):
            return pid
    return None


def start_profile(pid: int, seconds: float) -> tuple[subprocess.Popen[bytes], Path] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy not found: no profile", flush=True)
        return None
    RESULTS.mkdir(exist_ok=True)
    raw = RESULTS / "txn-leader.raw"
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", "200", "--format", "raw", "--output", str(raw),
                             "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, raw


def summarise_profile(raw: Path, top: int = 25) -> str:
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
    lines = [f"{total} samples of the leader during the cas phase", "", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


async def bench(urls: list[str], pids: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
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

    async def txn(kv: AsyncClient, index: int, rng: random.Random) -> float | None:
        a, b = f"t-{index}-a", f"t-{index}-b"
        result = await kv.txn(reads=[a], writes=[{"key": a, "value": rng.random()},
                                                  {"key": b, "value": index}])
        return float((result.receipt or {}).get("commit_wait_ms", 0.0))

    async def snapshot(kv: AsyncClient, index: int, rng: random.Random) -> float | None:
        await kv.get_versioned(f"k-{rng.randrange(args.keys)}", max_staleness_ms=STALENESS_MS)
        return None

    async def load(kv: AsyncClient, index: int, rng: random.Random) -> float | None:
        for i in range(index, args.keys, args.concurrency):
            await kv.put(f"k-{i}", i)
        return None

    # Keys for the snapshot reads (one pass, not timed as a phase).
    async with AsyncClient(urls, keyspace=KEYSPACE) as kv:
        await asyncio.gather(*(load(kv, i, random.Random(i)) for i in range(args.concurrency)))
    results = []
    for name, op in (("cas", cas), ("txn", txn), ("snapshot", snapshot)):
        profile = None
        if name == "cas" and args.profile_leader:
            pid = leader_pid(urls, pids)
            profile = None if pid is None else start_profile(pid, max(1.0, args.duration - 1))
        result = await run_phase(name, urls, pids, leader=leader_pid(urls, pids),
                                 concurrency=args.concurrency,
                                 duration_s=args.duration, op=op)
        print(phase_line(result), flush=True)
        results.append(result)
        if profile is not None:
            proc, raw = profile
            _, err = proc.communicate(timeout=60)
            if raw.exists():
                text = summarise_profile(raw)
                (RESULTS / "txn-leader.txt").write_text(text + "\n")
            else:
                print(f"py-spy gave no profile: {err.decode(errors='replace')[:300]}")
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
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--keys", type=int, default=1000, help="keys the snapshot reads hit")
    parser.add_argument("--profile-leader", action="store_true",
                        help="sample the leader with py-spy during the cas phase")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ringkv-bench-txn-") as tmp:
        cluster = LocalCluster(Path(tmp), nodes=3, rf=3, base_client_port=free_port_block(3),
                               base_internode_port=free_port_block(3), config_overrides={
                                   "keyspaces.txn": {"replication_factor": 3,
                                                     "tier": "transactional"},
                                   "truetime.min_uncertainty_ms": EPSILON_FLOOR_MS})
        try:
            cluster.up()
            urls = cluster.endpoints()
            pids = [node.proc.pid for node in cluster.procs if node.proc is not None]
            asyncio.run(wait_ready(urls))
            print(HEADER, flush=True)
            results = asyncio.run(bench(urls, pids, args))
        finally:
            cluster.down()
    for result in results:
        for line in result["first_errors"]:
            print(f"  {result['phase']} error: {line}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "txn.json"
    out.write_text(json.dumps({"epsilon_floor_ms": EPSILON_FLOOR_MS, "concurrency": args.concurrency,
                               "results": results}, indent=2))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
