"""A 3-node cluster with RF=3 on this machine: put and get at ONE, QUORUM and ALL,
over the native protocol and over HTTP, side by side in one run.

    python -m bench cluster [--duration 10] [--concurrency 50] [--protocol native,http]
                            [--levels ONE,QUORUM,ALL] [--client]

The load generator (its own process) spreads requests over all three nodes as
coordinators and reports ops/s, p50/p95/p99 and its own CPU use. Beside them,
the CPU all the node processes spent per completed op (from /proc), which
moves far less from run to run than ops/s does. HTTP phases use the lean
keep-alive HTTP/1.1 generator, native phases a lean pipelined native one (one
connection per node); ``--client`` sends both through the Python
``AsyncClient`` instead (``protocol="native"`` or ``"http"``). Phases of the
two protocols alternate, so drift on a shared machine hits both alike, and
each native figure is compared with HTTP's from the same run.
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
PROTOCOLS = ("native", "http")


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    bad = [part for part in chosen if part not in allowed]
    if bad or not chosen:
        raise SystemExit(f"--{what}: choose from {', '.join(allowed)}; got {text!r}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--protocol", default="native,http",
                        help="native, http, or both (native,http: side by side)")
    parser.add_argument("--levels", default=",".join(LEVELS), help="consistency levels")
    parser.add_argument("--client", action="store_true",
                        help="through the Python AsyncClient instead of the lean generators")
    args = parser.parse_args(argv)
    protocols = _choices(args.protocol, PROTOCOLS, "protocol")
    levels = _choices(args.levels.upper(), LEVELS, "levels")
    via = "client" if args.client else "lean"

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
                for level in levels:
                    for protocol in protocols:
                        cpu_before_s = proc_cpu.cpu_s(pids)
                        result = run_load(
                            f"{protocol} rf3 {level}", urls,
                            f"/v1/kv/default/{{key}}?consistency={level}",
                            op=op, concurrency=args.concurrency, duration_s=args.duration,
                            protocol=protocol, use_client=args.client, consistency=level)
                        result.server_cpu_us_per_op = proc_cpu.us_per_op(
                            proc_cpu.cpu_s(pids) - cpu_before_s, result.ops)
                        results.append(result)
                        print(format_table([result]).splitlines()[-1], flush=True)
        finally:
            cluster.down()
    print()
    print(format_table(results))
    print()
    ratios = []
    for op in ("put", "get"):
        for level in levels:
            if len(protocols) == 2:  # native against HTTP, measured in this same run
                ours = _find(results, op, f"native rf3 {level}")
                http = _find(results, op, f"http rf3 {level}")
                record, line = compare(f"native/http {level}", ours, http)
                ratios.append(record)
                print(line)
            if level != "ONE" and "ONE" in levels:  # what a stronger level costs against ONE
                for protocol in protocols:
                    ours = _find(results, op, f"{protocol} rf3 {level}")
                    one = _find(results, op, f"{protocol} rf3 ONE")
                    record, line = compare(f"{protocol} {level}/ONE", ours, one)
                    ratios.append(record)
                    print(line)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "cluster.json"
    out.write_text(json.dumps({"via": via, "results": [r.to_json() for r in results],
                               "ratios": ratios}, indent=2))
    print(f"\nresults written to {out}")
    return 0


def _find(results: list[LoadResult], op: str, label: str) -> LoadResult:
    return next(r for r in results if r.op == op and r.label == label)


if __name__ == "__main__":
    sys.exit(main())
