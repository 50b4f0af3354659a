"""The scale report (issue #12 §6): one join and one leave in clusters of 10 to 1,000 nodes.

    python -m bench scale [--sizes 10,30,100,1000] [--seed 1] [--json] [--fault F]

For each cluster size N, from the pure cores driven directly (ringkv/sim/scale.py):

    hear / conv    gossip rounds until every node has heard of a joining node, and
                   from its NORMAL until every node holds its tokens (real Gossipers,
                   JoinPlanner and allocate_tokens); bound = 4*log2(N+1)+4
    gossip         gossip messages (Syn, Ack, Ack2) per node per round
    join / leave   share of the replicated data (RF 3) streamed when one node joins
    moved          or leaves, against the ideal 1/(N+1) and 1/N (Dynamo §6.2)
    write / read   messages (requests + replies) a QUORUM write / read at RF 3 plans;
                   "net" leaves out the coordinator's own replica

The report is checked (ringkv.sim.scale.check) and the command exits 1 if a
figure is out of bounds; --fault plants a broken protocol to show that it would.
Results go to bench/results/scale.json, with each row's wall and CPU seconds.
The 1,000-node row takes about 6 minutes of CPU: gossip among 1,001 state
machines costs O(N^2) a round (every Syn carries a digest of every node), and
one token allocation against 16,000 tokens takes about 17 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ringkv.sim.scale import FAULTS, SIZES, ScaleRow, check, report, table

RESULTS = Path(__file__).resolve().parent / "results"


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: expected comma-separated integers, got {text!r}")
    if not sizes or any(not 4 <= n <= 2000 for n in sizes):
        raise argparse.ArgumentTypeError("--sizes: each size must be in 4..2000")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_sizes, default=list(SIZES),
                        help="cluster sizes, comma-separated (default 10,30,100,1000)")
    parser.add_argument("--seed", type=int, default=1, help="everything derives from it")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--fault", choices=FAULTS, default=None,
                        help="plant a broken protocol (the check must then fail)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json",
                        help="where to write the results (default bench/results/scale.json)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    timings: list[dict[str, float]] = []  # wall and CPU seconds of each row
    last = [started, time.process_time()]

    def progress(row: ScaleRow) -> None:
        now, cpu = time.monotonic(), time.process_time()
        timings.append({"wall_s": round(now - last[0], 1), "cpu_s": round(cpu - last[1], 1)})
        last[:] = [now, cpu]
        if not args.json:
            print(f"  N={row.nodes}: {timings[-1]['wall_s']:.0f} s wall, "
                  f"{timings[-1]['cpu_s']:.0f} s CPU", file=sys.stderr)

    rows = report(args.sizes, args.seed, fault=args.fault, progress=progress)
    problems = check(rows)
    result = {
        "command": "python -m bench scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "fault": args.fault,
        "wall_s": round(time.monotonic() - started, 1),
        "rows": [{**row.to_json(), **timing} for row, timing in zip(rows, timings)],
        "problems": problems,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(rows))
        print("\n".join(problems) if problems else "check: every figure within its bound")
        print(f"results: {args.out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
