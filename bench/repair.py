"""Anti-entropy repair on 3 node processes (RF 3): how long `ringkv repair` takes.

    python -m bench repair [--keys 10000] [--value-bytes 100]

One node is killed, ``--keys`` keys are written at QUORUM with hints off (so
only repair can bring them to it), the node is restarted, and a repair is
run on it. Reported: the repair's wall time, ranges compared and differed,
cells streamed, and cells streamed per second; then a second repair, with
every replica in step, which only builds and compares trees. Beside each, the
CPU the three nodes spent per key held (``bench/proc_cpu.py``), the figure to
judge a change by, and this process's own (it only sends the request and waits).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import proc_cpu
from ringkv.tools.launcher import free_port_block, http
from ringkv.tools.local_cluster import LocalCluster

BATCH = 500


def _repair(url: str, pids: list[int], keys: int) -> dict[str, Any]:
    started = time.monotonic()
    with proc_cpu.PhaseMeter(pids, in_process_gen=True) as meter:
        status, text = http("POST", f"{url}/v1/admin/repair", {}, timeout_s=3600)
    elapsed_s = time.monotonic() - started
    cpu = meter.result(keys)
    if status != 200:
        raise SystemExit(f"repair refused: {status} {text}")
    done = json.loads(text.splitlines()[-1])
    return {"wall_s": round(elapsed_s, 2), "ranges_compared": done["ranges_compared"],
            "ranges_differed": done["ranges_differed"], "cells_streamed": done["cells_streamed"],
            "cells_per_s": round(done["cells_streamed"] / elapsed_s),
            "node_cpu_us_per_key": cpu.node_us_per_op, "gen_cpu_us_per_key": cpu.gen_us_per_op,
            "gen_core_pct": cpu.gen_core_pct, "gen_limited": cpu.gen_limited}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench repair", description=__doc__)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ringkv-bench-repair-") as tmp:
        cluster = LocalCluster(Path(tmp), nodes=3, rf=3, base_client_port=free_port_block(3),
                               base_internode_port=free_port_block(3),
                               config_overrides={"timing.max_hint_window_s": 0,
                                                 "repair.scheduled": False})
        try:
            cluster.up(timeout_s=60)
            first, stale = cluster.procs[0], cluster.procs[2]
            stale.kill()
            value = "x" * args.value_bytes
            for start in range(0, args.keys, BATCH):
                ops = [{"op": "put", "key": f"key{i}", "value": value}
                       for i in range(start, min(args.keys, start + BATCH))]
                status, body = http("POST", f"{first.url}/v1/batch", {"ops": ops}, timeout_s=60)
                if status != 200 or not all(r["ok"] for r in body["results"]):
                    raise SystemExit(f"load failed: {status} {str(body)[:300]}")
            stale.start()
            cluster.wait_all_up(timeout_s=60)
            pids = [proc.proc.pid for proc in cluster.procs if proc.proc is not None]
            missed = _repair(stale.url, pids, args.keys)
            in_step = _repair(stale.url, pids, args.keys)
        finally:
            cluster.down()
    print(f"repair of {args.keys} keys ({args.value_bytes}-byte values) missed by one replica:")
    for name, row in (("missed writes", missed), ("in step", in_step)):
        print(f"  {name:<14} {row['wall_s']:>7.2f} s  {row['ranges_compared']} ranges compared, "
              f"{row['ranges_differed']} differed, {row['cells_streamed']} cells streamed "
              f"({row['cells_per_s']} cells/s); node CPU {row['node_cpu_us_per_key']} us/key, "
              f"this process {row['gen_cpu_us_per_key']} us/key ({row['gen_core_pct']:.0f}% "
              f"of a core{proc_cpu.gen_mark(row['gen_limited'])})")
    if missed["gen_limited"] or in_step["gen_limited"]:
        print(proc_cpu.GEN_LIMITED_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
