"""Benchmarks: `python -m bench <name> [options]`.

    single-node   one ringkv node vs a bare aiohttp + plyvel handler
    cluster       a 3-node RF=3 cluster: put and get at ONE, QUORUM and ALL
    ycsb          YCSB-style workloads A, B, C and write-only through the Python client,
                  at ONE, QUORUM and ALL (--quick: under 2 minutes); table, JSON and a plot
    sim-speed     the deterministic simulator: simulated client ops per wall-clock second
    txn           the transactional tier on 3 node processes: CAS commits/s, one-shot txns/s,
                  snapshot reads/s (p50, p99, commit-wait share, server CPU µs/op)
    bootstrap     a 3-node cluster holding data grows to 4: streaming MiB/s, and QUORUM p50/p99
                  while the joiner streams against the same load with no streaming
    txn-group     one Paxos group (3 GroupRunners in one process, LevelDB): commits/s, latency, CPU/commit
    repair        anti-entropy repair on 3 node processes: time and cells streamed for N missed keys
    scale         10 to 1,000 nodes: gossip rounds after a join, data moved by a join or leave,
                  coordinator messages per QUORUM op (pure cores; --json)
    etcd          a 3-node RF=3 cluster at QUORUM against a 3-member etcd: puts and linearizable
                  reads, phases alternating, ratios against issue #14's targets (1.5x, 2x)
    coordination  the same two clusters: watch event latency (commit to delivery, p50/p99) and
                  lock acquisitions/s with 1 and 4 contenders, ringkv beside etcd (issue #17)
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    commands = {
        "single-node": "bench.single_node",
        "cluster": "bench.cluster",
        "ycsb": "bench.ycsb",
        "sim-speed": "bench.sim_speed",
        "txn-group": "bench.txn_group",
        "txn": "bench.txn",
        "repair": "bench.repair",
        "scale": "bench.scale",
        "bootstrap": "bench.bootstrap",
        "etcd": "bench.etcd",
        "coordination": "bench.coordination",
    }
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    module = __import__(commands[argv[0]], fromlist=["main"])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
