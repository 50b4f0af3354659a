"""CPU time that server processes spend, read from /proc (Linux).

Throughput on a shared machine drifts by up to 20% from run to run; the CPU a
node spends per operation barely moves, so the benchmarks report it beside
ops/s: read the processes' utime + stime before and after a phase and divide
by the operations completed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def parse_stat_cpu_ticks(stat: str) -> int:
    """utime + stime, in clock ticks, from the text of /proc/<pid>/stat.

    The second field is the command name in parentheses, which may itself hold
    spaces and parentheses, so the fields are counted from the last ')'.
    utime and stime are fields 14 and 15 (proc(5)); field 3 follows the ')'.
    """
    fields = stat[stat.rindex(")") + 1:].split()
    return int(fields[14 - 3]) + int(fields[15 - 3])


def cpu_s(pids: Iterable[int]) -> float:
    """The CPU seconds (user + system, all threads) the processes ``pids`` have used so far."""
    ticks = sum(parse_stat_cpu_ticks(Path(f"/proc/{pid}/stat").read_text()) for pid in pids)
    return ticks / CLOCK_TICKS_PER_S


def us_per_op(cpu_used_s: float, ops: int) -> float | None:
    """Microseconds of CPU per operation; None when no operation completed."""
    return round(cpu_used_s * 1e6 / ops, 1) if ops else None
