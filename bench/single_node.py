"""Single node vs a bare aiohttp + plyvel handler, side by side in one run.

    python -m bench single-node [--duration 10]

Both servers run as separate processes on loopback with the same load
generator (its own process) at 1 and 50 concurrent connections. ringkv runs in
periodic commit-sync mode, like the bare handler's unsynced LevelDB writes.
The ratio column is ringkv ops/s over bare ops/s. Each phase also reports the
CPU its server process spent per completed op (from /proc), which moves far
less from run to run than ops/s does (judge changes by it), and the load
generator's own CPU per op and share of a core (marked above 80%).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.loadgen import LoadResult, compare, format_row, format_table, run_load
from ringkv.tools.launcher import NodeProcess, free_port, http, wait_until

RESULTS = Path(__file__).resolve().parent / "results"


def start_bare(path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bare_server", "--port", str(port), "--path", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return http("GET", f"{url}/kv/probe", timeout_s=1)[0] in (200, 404)
        except OSError:
            return False

    wait_until(ready, timeout_s=30, what="bare server")
    return proc, url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench single-node", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    args = parser.parse_args(argv)

    results: list[LoadResult] = []
    with tempfile.TemporaryDirectory(prefix="ringkv-bench-") as tmp:
        node = NodeProcess("bench", Path(tmp) / "ringkv", extra_args=["--commit-sync", "periodic"])
        bare_proc, bare_url = start_bare(Path(tmp) / "bare")
        try:
            node.start()
            assert node.proc is not None
            print(format_table([]), flush=True)
            targets = [
                ("bare", bare_url, "/kv/{key}", bare_proc.pid),
                ("ringkv", node.url, "/v1/kv/default/{key}", node.proc.pid),
            ]
            for op in ("put", "get"):
                for concurrency in args.concurrency:
                    # Alternate targets within each phase so drift hits both alike.
                    for label, url, path, pid in targets:
                        result = run_load(label, url, path, op=op, concurrency=concurrency,
                                          duration_s=args.duration, node_pids=[pid])
                        results.append(result)
                        print(format_row(result), flush=True)
        finally:
            node.stop()
            bare_proc.terminate()
            bare_proc.wait(timeout=15)

    print()
    print(format_table(results))
    print()
    ratios = []
    for op in ("put", "get"):
        for concurrency in args.concurrency:
            bare = next(r for r in results if (r.label, r.op, r.concurrency) == ("bare", op, concurrency))
            ours = next(r for r in results if (r.label, r.op, r.concurrency) == ("ringkv", op, concurrency))
            record, line = compare("ringkv/bare", ours, bare)
            ratios.append(record)
            print(line)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "single_node.json"
    out.write_text(json.dumps({"results": [r.to_json() for r in results], "ratios": ratios},
                              indent=2))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
