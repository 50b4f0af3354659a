"""Bootstrap streaming under load: a 3-node RF=3 cluster holding data grows to 4.

    python -m bench bootstrap [--preload-s 20] [--duration 10] [--throughput-mib-s 8]

1. Three nodes; a put-only phase fills them (``--preload-s`` seconds, 1 KiB values).
2. Baseline: a QUORUM mix (half gets, half puts) for ``--duration`` seconds.
3. A fourth node joins and streams its ranges (throttled at
   ``streaming.throughput_mib_s``) while the same QUORUM mix runs again.

Reports the streaming throughput in MiB/s (bytes streamed over the
streaming time, as the joiner's /v1/status shows them), how much of the
loaded phase overlapped streaming, and the foreground p50/p99 in both
phases. Written to bench/results/bootstrap.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult, format_table, run_load
from ringkv.clock import SystemClock
from ringkv.tools.launcher import free_port_block, http, wait_until
from ringkv.tools.local_cluster import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results"
PATH = "/v1/kv/default/{key}?consistency=QUORUM"
KEYS = 50_000
VALUE = "x" * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench bootstrap", description=__doc__)
    parser.add_argument("--preload-s", type=float, default=20.0, help="seconds of puts first")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per QUORUM phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--throughput-mib-s", type=float, default=8.0,
                        help="streaming.throughput_mib_s of the joining node")
    args = parser.parse_args(argv)
    clock = SystemClock()

    with tempfile.TemporaryDirectory(prefix="ringkv-bench-bootstrap-") as tmp:
        cluster = LocalCluster(Path(tmp), nodes=4, rf=3, base_client_port=free_port_block(4),
                               base_internode_port=free_port_block(4),
                               config_overrides={"streaming.throughput_mib_s":
                                                 args.throughput_mib_s})
        cluster.build()
        try:
            for proc in cluster.procs[:3]:
                proc.start()
                cluster.wait_all_up(cluster.procs[: cluster.procs.index(proc) + 1])
            urls = [proc.url for proc in cluster.procs[:3]]
            preload = run_load("preload", urls, PATH, op="put", concurrency=args.concurrency,
                               duration_s=args.preload_s, key_count=KEYS, value=VALUE)
            print(format_table([preload]).splitlines()[-1], flush=True)
            baseline = run_load("QUORUM, no streaming", urls, PATH, op="mix",
                                read_fraction=0.5, concurrency=args.concurrency,
                                duration_s=args.duration, key_count=KEYS, value=VALUE)
            print(format_table([baseline]).splitlines()[-1], flush=True)

            joiner = cluster.procs[3]
            joiner.launch()

            def streaming() -> dict[str, Any] | None:
                try:
                    status, body = http("GET", f"{joiner.url}/v1/status", timeout_s=2)
                except OSError:
                    return None
                view = body.get("streaming") if status == 200 else None
                return view if view and view["state"] in ("streaming", "done") else None

            wait_until(streaming, timeout_s=120, interval_s=0.05, what="streaming to start")
            result: list[LoadResult] = []
            load = threading.Thread(target=lambda: result.append(run_load(
                "QUORUM, while streaming", urls, PATH, op="mix", read_fraction=0.5,
                concurrency=args.concurrency, duration_s=args.duration, key_count=KEYS,
                value=VALUE)))
            started_s = clock.monotonic_s()
            load.start()
            streamed_s: float | None = None
            while load.is_alive():
                view = streaming()
                if streamed_s is None and view is not None and view["state"] == "done":
                    streamed_s = clock.monotonic_s() - started_s
                load.join(timeout=0.1)
            during = result[0]
            print(format_table([during]).splitlines()[-1], flush=True)
            view = wait_until(lambda: (v := streaming()) and v["state"] == "done" and v,
                              timeout_s=600, interval_s=0.2, what="streaming to finish")
        finally:
            cluster.down()

    overlap = min(1.0, (streamed_s if streamed_s is not None else during.duration_s)
                  / during.duration_s)
    print()
    print(format_table([baseline, during]))
    print(f"\nstreaming: {view['ranges_total']} ranges, {view['cells']} cells, "
          f"{view['bytes'] / 2**20:.1f} MiB in {view['elapsed_s']:.1f} s = "
          f"{view['rate_mib_s']:.2f} MiB/s (throttle {args.throughput_mib_s} MiB/s); "
          f"streaming overlapped {100 * overlap:.0f}% of the loaded phase")
    print(f"QUORUM p50 {baseline.p50_ms:.2f} -> {during.p50_ms:.2f} ms, "
          f"p99 {baseline.p99_ms:.2f} -> {during.p99_ms:.2f} ms while streaming")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bootstrap.json"
    out.write_text(json.dumps({
        "preload": preload.to_json(), "baseline": baseline.to_json(),
        "during_streaming": during.to_json(), "streaming": view,
        "throttle_mib_s": args.throughput_mib_s, "overlap": overlap,
    }, indent=2))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
