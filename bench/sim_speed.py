"""How fast the deterministic simulator runs: simulated client ops per wall-clock second.

    python -m bench sim-speed [--seeds 3]

Each row runs whole simulations (boot, workload, heal, final reads, checks) of
5 real nodes at QUORUM/QUORUM and divides the client ops by the time taken:
wall clock, and this process's CPU time (the two differ when the machine is
shared). Rows:

    dense         10000 ops by 20 clients over 60 virtual s, no faults: the cost per op
    dense+faults  the same under partition, crash, pause and clog
    cli-default   `ringkv sim`'s defaults: 2000 ops over 60 virtual s, where the
                  nodes' own background work (gossip every second) weighs more
    sweep-seed    one seed of tests/test_sim.py's 200-seed sweep (250 ops)

Results go to bench/results/sim_speed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ringkv.sim.run import SimSettings, simulate

RESULTS = Path(__file__).resolve().parent / "results"
FAULTS = ("partition", "crash", "pause", "clog")

ROWS: dict[str, dict[str, object]] = {
    "dense": {"ops": 10000, "clients": 20, "duration_s": 60.0, "boot": "provisioned"},
    "dense+faults": {"ops": 10000, "clients": 20, "duration_s": 60.0, "boot": "provisioned",
                     "nemesis": FAULTS},
    "cli-default": {},
    "sweep-seed": {"ops": 250, "duration_s": 20.0, "boot": "provisioned"},
}


@dataclass
class Row:
    name: str
    runs: int
    ops: int
    wall_s: float
    cpu_s: float
    virtual_s: float

    def to_json(self) -> dict[str, object]:
        return {**vars(self), "ops_per_wall_s": self.ops / self.wall_s,
                "ops_per_cpu_s": self.ops / self.cpu_s}

    def line(self) -> str:
        return (f"{self.name:<14} {self.runs:>4} {self.ops:>7} {self.wall_s:>8.2f} "
                f"{self.ops / self.wall_s:>10.0f} {self.ops / self.cpu_s:>10.0f} "
                f"{self.virtual_s / self.wall_s:>9.0f}x")


HEADER = (f"{'workload':<14} {'runs':>4} {'ops':>7} {'wall s':>8} {'ops/wall-s':>10} "
          f"{'ops/cpu-s':>10} {'virt/wall':>10}")


def measure(name: str, seeds: range) -> Row:
    row = Row(name, 0, 0, 0.0, 0.0, 0.0)
    for seed in seeds:
        cpu = time.process_time()
        result = simulate(SimSettings(seed=seed, **ROWS[name]))  # type: ignore[arg-type]
        row.cpu_s += time.process_time() - cpu
        row.wall_s += result.wall_s
        row.virtual_s += result.virtual_s
        row.ops += result.client_ops
        row.runs += 1
        if not result.ok:
            print(f"warning: {result.settings.command()} failed its checks", file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sim-speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="runs per row (seeds 1..N)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    args = parser.parse_args(argv)

    print(HEADER, flush=True)
    rows = []
    for name in args.rows.split(","):
        if name not in ROWS:
            parser.error(f"unknown row {name!r}; choose from {', '.join(ROWS)}")
        seeds = range(1, 1 + (args.seeds * 10 if name == "sweep-seed" else args.seeds))
        rows.append(measure(name, seeds))
        print(rows[-1].line(), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "sim_speed.json"
    out.write_text(json.dumps({"rows": [row.to_json() for row in rows]}, indent=2))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
