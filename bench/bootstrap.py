"""Bootstrap streaming: a 3-node RF=3 cluster holding data grows to 4, then 5.

    python -m bench bootstrap [--preload-s 20] [--duration 8] [--throughput-mib-s 2]

1. Three nodes; a put-only phase fills them (``--preload-s`` seconds, 1 KiB values).
2. Baseline: a QUORUM mix (half gets, half puts) for ``--duration`` seconds.
3. node4 joins and streams its ranges, throttled at ``--throughput-mib-s``
   (so its streaming spans the phase), while the same QUORUM mix runs again.
4. node5 joins with streaming unthrottled and no load: what streaming can do.

Reports the streaming throughput in MiB/s of both joins (bytes streamed
over the streaming time, as each joiner's /v1/status shows them), how much
of the loaded phase overlapped streaming, and the foreground p50/p99 with
and without streaming. Written to bench/results/bootstrap.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml

from bench.loadgen import LoadResult, format_row, format_table, run_load
from ringkv.clock import SystemClock
from ringkv.tools.launcher import NodeProcess, free_port_block, http, wait_until
from ringkv.tools.local_cluster import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results"
PATH = "/v1/kv/default/{key}?consistency=QUORUM"
KEYS = 50_000
VALUE = "x" * 1000
UNTHROTTLED_MIB_S = 10_000.0


def _streaming_view(proc: NodeProcess) -> dict[str, Any] | None:
    """The joiner's streaming progress once it streams (or has streamed), else None."""
    try:
        status, body = http("GET", f"{proc.url}/v1/status", timeout_s=2)
    except OSError:
        return None
    view = body.get("streaming") if status == 200 else None
    return view if view and view["state"] in ("streaming", "done") else None


def _join(proc: NodeProcess) -> None:
    proc.launch()
    wait_until(lambda: _streaming_view(proc), timeout_s=120, interval_s=0.05,
               what=f"{proc.node_id} to start streaming")


def _streamed(proc: NodeProcess) -> dict[str, Any]:
    view = wait_until(lambda: (v := _streaming_view(proc)) is not None and v["state"] == "done"
                      and v, timeout_s=600, interval_s=0.1,
                      what=f"{proc.node_id} to finish streaming")
    assert isinstance(view, dict)
    return view


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench bootstrap", description=__doc__)
    parser.add_argument("--preload-s", type=float, default=20.0, help="seconds of puts first")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per QUORUM phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--throughput-mib-s", type=float, default=2.0,
                        help="streaming.throughput_mib_s of the node joining under load "
                             "(low enough that its streaming spans the loaded phase)")
    args = parser.parse_args(argv)
    clock = SystemClock()

    with tempfile.TemporaryDirectory(prefix="ringkv-bench-bootstrap-") as tmp:
        cluster = LocalCluster(Path(tmp), nodes=5, rf=3, base_client_port=free_port_block(5),
                               base_internode_port=free_port_block(5),
                               config_overrides={"streaming.throughput_mib_s":
                                                 args.throughput_mib_s})
        cluster.build()
        # The fifth node streams as fast as it can: its own config file.
        fast = Path(tmp) / "unthrottled.yaml"
        config = yaml.safe_load(cluster.config_file().read_text())
        config["streaming"]["throughput_mib_s"] = UNTHROTTLED_MIB_S
        fast.write_text(yaml.safe_dump(config))
        cluster.procs[4].config_path = fast
        try:
            for proc in cluster.procs[:3]:
                proc.start()
                cluster.wait_all_up(cluster.procs[: cluster.procs.index(proc) + 1])
            urls = [proc.url for proc in cluster.procs[:3]]
            pids = [proc.proc.pid for proc in cluster.procs[:3] if proc.proc is not None]
            print(format_table([]), flush=True)
            preload = run_load("preload", urls, PATH, op="put", concurrency=args.concurrency,
                               duration_s=args.preload_s, key_count=KEYS, value=VALUE,
                               node_pids=pids)
            print(format_row(preload), flush=True)
            baseline = run_load("no stream", urls, PATH, op="mix", read_fraction=0.5,
                                concurrency=args.concurrency, duration_s=args.duration,
                                key_count=KEYS, value=VALUE, node_pids=pids)
            print(format_row(baseline), flush=True)

            # node4 joins, throttled, while the same QUORUM mix runs.
            joiner = cluster.procs[3]
            _join(joiner)
            assert joiner.proc is not None
            result: list[LoadResult] = []
            # The joiner's CPU counts too: streaming is part of what this phase costs.
            load = threading.Thread(target=lambda: result.append(run_load(
                "streaming", urls, PATH, op="mix", read_fraction=0.5,
                concurrency=args.concurrency, duration_s=args.duration, key_count=KEYS,
                value=VALUE, node_pids=pids + [joiner.proc.pid])))
            started_s = clock.monotonic_s()
            load.start()
            streamed_s: float | None = None
            while load.is_alive():
                view = _streaming_view(joiner)
                if streamed_s is None and view is not None and view["state"] == "done":
                    streamed_s = clock.monotonic_s() - started_s
                load.join(timeout=0.1)
            during = result[0]
            print(format_row(during), flush=True)
            throttled = _streamed(joiner)
            cluster.wait_all_up(cluster.procs[:4])

            # node5 joins unthrottled, with no load: what streaming can do here.
            _join(cluster.procs[4])
            unthrottled = _streamed(cluster.procs[4])
        finally:
            cluster.down()

    overlap = min(1.0, (streamed_s if streamed_s is not None else during.duration_s)
                  / during.duration_s)
    print()
    print(format_table([baseline, during]))
    print()
    for label, view in (("under load, throttled at "
                         f"{args.throughput_mib_s:g} MiB/s", throttled),
                        ("no load, unthrottled", unthrottled)):
        print(f"streaming {label}: {view['ranges_total']} ranges, {view['cells']} cells, "
              f"{view['bytes'] / 2**20:.1f} MiB in {view['elapsed_s']:.1f} s = "
              f"{view['rate_mib_s']:.2f} MiB/s")
    print(f"streaming overlapped {100 * overlap:.0f}% of the loaded phase"
          + ("" if overlap >= 1.0 else " (lower --throughput-mib-s to cover it all)"))
    print(f"QUORUM p50 {baseline.p50_ms:.2f} -> {during.p50_ms:.2f} ms, "
          f"p99 {baseline.p99_ms:.2f} -> {during.p99_ms:.2f} ms while streaming")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bootstrap.json"
    out.write_text(json.dumps({
        "preload": preload.to_json(), "baseline": baseline.to_json(),
        "during_streaming": during.to_json(), "streaming_throttled": throttled,
        "streaming_unthrottled": unthrottled, "throttle_mib_s": args.throughput_mib_s,
        "overlap": overlap,
    }, indent=2))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
