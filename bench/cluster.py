"""A 3-node cluster with RF=3 on this machine: put and get at ONE, QUORUM and ALL.

    python -m bench cluster [--duration 10] [--concurrency 50]

The load generator (its own process) spreads requests over all three nodes as
coordinators and reports ops/s, p50/p95/p99 and its own CPU use. Beside them,
the CPU all the node processes spent per completed op (from /proc), which
moves far less from run to run than ops/s does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench import proc_cpu
from bench.loadgen import LoadResult, compare, format_table, run_load
from ringkv.tools.launcher import free_port_block
from ringkv.tools.local_cluster import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = ("ONE", "QUORUM", "ALL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args(argv)

    results: list[LoadResult] = []
    with tempfile.TemporaryDirectory(prefix="ringkv-bench-cluster-") as tmp:
        cluster = LocalCluster(Path(tmp), nodes=args.nodes, rf=3,
                               base_client_port=free_port_block(args.nodes),
                               base_internode_port=free_port_block(args.nodes))
        try:
            cluster.up()
            urls = cluster.endpoints()
            pids = [node.proc.pid for node in cluster.procs if node.proc is not None]
            for op in ("put", "get"):
                for level in LEVELS:
                    cpu_before_s = proc_cpu.cpu_s(pids)
                    result = run_load(f"rf3 {level}", urls, f"/v1/kv/default/{{key}}?consistency={level}",
                                      op=op, concurrency=args.concurrency, duration_s=args.duration)
                    result.server_cpu_us_per_op = proc_cpu.us_per_op(
                        proc_cpu.cpu_s(pids) - cpu_before_s, result.ops)
                    results.append(result)
                    print(format_table([result]).splitlines()[-1], flush=True)
        finally:
            cluster.down()
    print()
    print(format_table(results))
    print()
    # What each stronger level costs against ONE, measured in this same run.
    ratios = []
    for op in ("put", "get"):
        one = next(r for r in results if r.op == op and r.label == "rf3 ONE")
        for level in LEVELS[1:]:
            ours = next(r for r in results if r.op == op and r.label == f"rf3 {level}")
            record, line = compare(f"{level}/ONE", ours, one)
            ratios.append(record)
            print(line)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "cluster.json"
    out.write_text(json.dumps({"results": [r.to_json() for r in results], "ratios": ratios},
                              indent=2))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
