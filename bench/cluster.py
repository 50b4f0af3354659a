"""A 3-node cluster with RF=3 on this machine: put and get at ONE, QUORUM and ALL,
over the native protocol and over HTTP, side by side in one run.

    python -m bench cluster [--duration 10] [--concurrency 50] [--protocol native,http]
                            [--levels ONE,QUORUM,ALL] [--client] [--tls]

The load generator (its own process) spreads requests over all three nodes as
coordinators and reports ops/s, p50/p95/p99 and its own CPU per op and share
of a core (a phase whose generator used more than 80% of a core is marked).
Beside them, the CPU all the node processes spent per completed op (from
/proc), which moves far less from run to run than ops/s does: judge changes
by it. A stronger level measuring more ops/s than a weaker one (QUORUM above
ONE) is flagged as noise, not printed silently. HTTP phases use the lean
keep-alive HTTP/1.1 generator, native phases a lean pipelined native one (one
connection per node); ``--client`` sends both through the Python
``AsyncClient`` instead (``protocol="native"`` or ``"http"``). Phases of the
two protocols alternate, so drift on a shared machine hits both alike, and
each native figure is compared with HTTP's from the same run.

``--tls`` runs the same phases against a cluster with TLS on both links (as
``ringkv cluster up --tls``: HTTPS and TLS-native for the generator, mutual TLS
between the nodes). Its cost is the difference from a plain run: run both,
alternated, and compare node CPU us/op.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.loadgen import LoadResult, compare, format_row, format_table, run_load
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
    parser.add_argument("--tls", action="store_true",
                        help="TLS on both links (client and internode), like cluster up --tls")
    args = parser.parse_args(argv)
    protocols = _choices(args.protocol, PROTOCOLS, "protocol")
    levels = _choices(args.levels.upper(), LEVELS, "levels")
    via = "client" if args.client else "lean"

    results: list[LoadResult] = []
    with tempfile.TemporaryDirectory(prefix="ringkv-bench-cluster-") as tmp:
        cluster = LocalCluster(Path(tmp), nodes=args.nodes, rf=3,
                               base_client_port=free_port_block(args.nodes),
                               base_internode_port=free_port_block(args.nodes), tls=args.tls)
        ca_file = str(cluster.certs_dir / "ca.crt") if args.tls else None
        try:
            cluster.up()
            urls = cluster.endpoints()
            pids = [node.proc.pid for node in cluster.procs if node.proc is not None]
            print(format_table([]), flush=True)
            for op in ("put", "get"):
                for level in levels:
                    for protocol in protocols:
                        result = run_load(
                            f"{protocol} rf3 {level}", urls,
                            f"/v1/kv/default/{{key}}?consistency={level}",
                            op=op, concurrency=args.concurrency, duration_s=args.duration,
                            protocol=protocol, use_client=args.client, consistency=level,
                            node_pids=pids, ca_file=ca_file)
                        results.append(result)
                        print(format_row(result), flush=True)
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
    noisy = stronger_above_weaker(results, levels, protocols)
    for line in noisy:
        print(line)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "cluster.json"
    out.write_text(json.dumps({"via": via, "duration_s": args.duration, "tls": args.tls,
                               "results": [r.to_json() for r in results],
                               "ratios": ratios, "noisy": noisy}, indent=2))
    print(f"\nresults written to {out}")
    return 0


def stronger_above_weaker(results: list[LoadResult], levels: list[str],
                          protocols: list[str]) -> list[str]:
    """A warning for each (op, protocol) where a stronger level's ops/s measured above a weaker
    one's. A stronger level never does less work, so that is the machine's noise, not the
    code: the phases were too short or the neighbours too busy to rank levels by ops/s."""
    warnings = []
    ordered = [level for level in LEVELS if level in levels]
    for op in ("put", "get"):
        for protocol in protocols:
            for weaker, stronger in zip(ordered, ordered[1:]):
                low = _find(results, op, f"{protocol} rf3 {weaker}")
                high = _find(results, op, f"{protocol} rf3 {stronger}")
                if high.ops_per_s > low.ops_per_s:
                    warnings.append(
                        f"noisy: {protocol} {op} at {stronger} measured {high.ops_per_s:,.0f} "
                        f"ops/s, above {weaker}'s {low.ops_per_s:,.0f}: phases too short or the "
                        f"machine too busy to rank levels by ops/s; judge by node CPU us/op "
                        f"({_us(high.server_cpu_us_per_op)} against "
                        f"{_us(low.server_cpu_us_per_op)})")
    return warnings


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _find(results: list[LoadResult], op: str, label: str) -> LoadResult:
    return next(r for r in results if r.op == op and r.label == label)


if __name__ == "__main__":
    sys.exit(main())
