"""YCSB-style workloads through the Python client, at ONE, QUORUM and ALL.

    python -m bench ycsb [--quick] [--target URL ...]      (also: ringkv bench ycsb)

Starts a local 3-node RF=3 cluster (or uses the nodes given with --target),
loads --keys keys, then runs each workload at each consistency level:

    A   update heavy   50% reads, 50% updates   (YCSB workload A)
    B   read mostly    95% reads,  5% updates   (YCSB workload B)
    C   read only     100% reads                (YCSB workload C)
    W   write only    100% updates

Keys are chosen from a Zipfian distribution, as in YCSB. The load generator
is a separate process (bench/loadgen.py) driving the token-aware AsyncClient
(or plain HTTP with --raw-http); it reports its own CPU use. Prints a live
progress line and a table of ops/s, p50/p95/p99/max latency, errors, the
nodes' CPU µs per op (the figure to judge changes by; local cluster only) and
the generator's own CPU per op, share of a core and event-loop lag, per
(workload, level); writes bench/results/ycsb.json and ycsb.png.

A phase the load generator limited is marked: ``*`` on the figure that
tripped the rule (``gen core``: a generator process above 80% of a core;
``gen lag``: its event loop late by more than a quarter of the median
latency, so the client held the requests in flight at the concurrency cap),
a note under the table, ``limited_by`` in the JSON, and hatched bars with a
legend entry in the plot (the rule: ``bench/loadgen.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import loadgen, proc_cpu
from bench.loadgen import LoadResult, run_load
from ringkv.clock import SystemClock
from ringkv.tools.launcher import free_port_block
from ringkv.tools.local_cluster import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = {"A": 0.5, "B": 0.95, "C": 1.0, "W": 0.0}
WORKLOAD_NAMES = {"A": "update heavy", "B": "read mostly", "C": "read only", "W": "write only"}
LEVELS = ("ONE", "QUORUM", "ALL")
LOAD_BATCH = 100
_CLOCK = SystemClock()


def load_keys(urls: list[str], count: int, value: object, say: Any) -> float:
    """Write key0..key{count-1} at QUORUM in batches; returns the seconds it took."""
    from ringkv.client import Client

    started = _CLOCK.monotonic_s()
    with Client(urls, consistency="QUORUM", timeout_s=10) as kv:
        for first in range(0, count, LOAD_BATCH):
            ops = [{"op": "put", "key": f"key{i}", "value": value}
                   for i in range(first, min(first + LOAD_BATCH, count))]
            failed = [r for r in kv.batch(ops) if not r.ok]
            if failed:
                raise RuntimeError(f"loading failed: {failed[0].error}")
            say(f"\rloading {min(first + LOAD_BATCH, count):>8,}/{count:,} keys", end="")
    took = _CLOCK.monotonic_s() - started
    say(f"\rloaded {count:,} keys in {took:.1f} s ({count / took:,.0f} keys/s)      ")
    return took


def format_table(results: list[LoadResult]) -> str:
    """The results table: one row per (workload, consistency level)."""
    return loadgen.format_table(results, leading=(
        ("workload", "<18", lambda r: r.label),
        ("level", "<8", lambda r: r.consistency or "-"),
    ))


def plot(results: list[LoadResult], path: Path, title: str) -> None:
    """Node CPU per op, throughput and latency per workload, one bar per consistency level;
    a generator-limited phase's bars are hatched and marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    workloads = list(dict.fromkeys(r.label for r in results))
    levels = list(dict.fromkeys(r.consistency for r in results))
    by_key = {(r.label, r.consistency): r for r in results}
    width = 0.8 / max(1, len(levels))
    fig, (cpu, left, right) = plt.subplots(1, 3, figsize=(19, 5))
    for i, level in enumerate(levels):
        xs = [w + (i - (len(levels) - 1) / 2) * width for w in range(len(workloads))]
        rows = [by_key.get((w, level)) for w in workloads]
        hatches = ["//" if r is not None and r.gen_limited else "" for r in rows]
        cpu.bar(xs, [r.server_cpu_us_per_op or 0 if r else 0 for r in rows], width, label=level,
                hatch=hatches)
        bars = left.bar(xs, [r.ops_per_s if r else 0 for r in rows], width, label=level,
                        hatch=hatches)
        for bar, r in zip(bars, rows):
            if r is not None and r.gen_limited:
                left.annotate(proc_cpu.GEN_LIMITED_MARK, (bar.get_x() + bar.get_width() / 2,
                                                         bar.get_height()), ha="center")
        right.bar(xs, [r.p99_ms if r else 0 for r in rows], width, alpha=0.45,
                  label=f"{level} p99", color=f"C{i}")
        right.bar(xs, [r.p50_ms if r else 0 for r in rows], width * 0.5,
                  label=f"{level} p50", color=f"C{i}")
    for axis, ylabel in ((cpu, "node CPU us/op (all nodes)"), (left, "ops/s"),
                         (right, "latency (ms)")):
        axis.set_xticks(range(len(workloads)), workloads, rotation=10)
        axis.set_ylabel(ylabel)
        axis.grid(axis="y", alpha=0.3)
    cpu.set_title("node CPU per op: judge changes by this")
    left.set_title("throughput (hatched *: generator-limited)"
                   if any(r.gen_limited for r in results) else "throughput")
    if any(r.gen_limited for r in results):
        reasons = sorted({r.limited_by for r in results if r.gen_limited})
        left.legend(handles=[Patch(facecolor="white", edgecolor="black", hatch="//",
                                   label=f"{proc_cpu.GEN_LIMITED_MARK} generator-limited "
                                         f"({', '.join(reasons)}; see the table's note)")],
                    fontsize="small", loc="lower right")
    right.set_title("latency: p50 (narrow) and p99 (wide)")
    # Plain swatches: a level's first bar may be hatched (generator-limited).
    cpu.legend(handles=[Patch(facecolor=f"C{i}", label=str(level)) for i, level in enumerate(levels)],
               title="consistency")
    right.legend(fontsize="small", ncol=len(levels))
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the harness (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench ycsb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short phases and fewer keys: done in under 2 minutes")
    parser.add_argument("--target", nargs="+", metavar="URL",
                        help="benchmark these running nodes instead of starting a cluster")
    parser.add_argument("--duration", type=float, help="seconds per phase (default 15; quick 3)")
    parser.add_argument("--keys", type=int, help="keys loaded (default 10000; quick 1000)")
    parser.add_argument("--concurrency", type=int, help="requests in flight (default 32; quick 16)")
    parser.add_argument("--workloads", default="A,B,C,W", help="comma-separated, from A,B,C,W")
    parser.add_argument("--levels", default=",".join(LEVELS), help="comma-separated levels")
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--uniform", action="store_true", help="uniform keys, not Zipfian")
    parser.add_argument("--raw-http", action="store_true",
                        help="plain HTTP spread over the nodes instead of the token-aware client")
    parser.add_argument("--out", default=str(RESULTS), help="directory for ycsb.json/ycsb.png")
    args = parser.parse_args(argv)
    duration = args.duration or (3.0 if args.quick else 15.0)
    keys = args.keys or (1000 if args.quick else 10_000)
    concurrency = args.concurrency or (16 if args.quick else 32)
    workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    levels = [level.strip().upper() for level in args.levels.split(",") if level.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {','.join(WORKLOADS)}")
    value = "x" * args.value_bytes
    key_dist = "uniform" if args.uniform else "zipfian"

    def say(text: str, end: str = "\n") -> None:
        print(text, end=end, flush=True)

    started = _CLOCK.monotonic_s()
    results: list[LoadResult] = []
    cluster: LocalCluster | None = None
    with tempfile.TemporaryDirectory(prefix="ringkv-bench-ycsb-") as tmp:
        try:
            if args.target:
                urls = list(args.target)
                pids: list[int] = []  # remote nodes: their CPU is not this machine's to read
                say(f"target: {', '.join(urls)}")
            else:
                cluster = LocalCluster(Path(tmp), nodes=3, rf=3,
                                       base_client_port=free_port_block(3),
                                       base_internode_port=free_port_block(3))
                say("starting a local 3-node cluster (RF=3) ...")
                cluster.up(timeout_s=60)
                urls = cluster.endpoints()
                pids = [proc.proc.pid for proc in cluster.procs if proc.proc is not None]
                say(f"cluster up in {_CLOCK.monotonic_s() - started:.1f} s: {', '.join(urls)}")
            load_s = load_keys(urls, keys, value, say)
            for workload in workloads:
                for level in levels:
                    label = f"{workload} {WORKLOAD_NAMES[workload]}"
                    phase = f"{workload} {level:<6}"

                    def progress(ops: int, errors: int, elapsed: float, phase: str = phase) -> None:
                        rate = ops / elapsed if elapsed > 0 else 0.0
                        say(f"\r  {phase} {elapsed:5.1f}/{duration:.0f} s {ops:>9,} ops "
                            f"{rate:>9,.0f} ops/s {errors:>6} errors", end="")

                    result = run_load(
                        label, urls, f"/v1/kv/default/{{key}}?consistency={level}",
                        op="mix", read_fraction=WORKLOADS[workload], key_dist=key_dist,
                        concurrency=concurrency, duration_s=duration, key_count=keys,
                        value=value, use_client=not args.raw_http, consistency=level,
                        on_progress=progress, node_pids=pids,
                    )
                    results.append(result)
                    node_us = result.server_cpu_us_per_op
                    say(f"\r  {phase} {result.ops_per_s:>9,.0f} ops/s  p50 {result.p50_ms:.2f} ms"
                        f"  p99 {result.p99_ms:.2f} ms  {result.errors} errors  node "
                        f"{'-' if node_us is None else f'{node_us:.0f}'} us/op  generator "
                        f"{result.client_cpu_pct:.0f}% of a core"
                        f"{f' (generator-limited: {result.limited_by})' if result.gen_limited else ''}"
                        + " " * 20)
        finally:
            if cluster is not None:
                cluster.down()
    elapsed = _CLOCK.monotonic_s() - started
    say("")
    say(format_table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = {
        "quick": args.quick, "target": args.target, "nodes": len(urls),
        "replication_factor": cluster.rf if cluster else None, "keys": keys, "duration_s": duration, "concurrency": concurrency,
        "key_distribution": key_dist, "value_bytes": args.value_bytes,
        "client": "raw-http" if args.raw_http else "ringkv.client.AsyncClient",
        "cpus": os.cpu_count(), "load_s": round(load_s, 2), "total_s": round(elapsed, 1),
    }
    json_path = out / "ycsb.json"
    json_path.write_text(json.dumps({"setup": setup, "results": [r.to_json() for r in results]},
                                    indent=2))
    png_path = out / "ycsb.png"
    plot(results, png_path, f"ringkv YCSB-style, {len(urls)} nodes, {keys:,} keys, "
                            f"{key_dist}, {concurrency} in flight, {duration:g} s per phase")
    say(f"\nresults: {json_path}\nplot:    {png_path}\n(total {elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
