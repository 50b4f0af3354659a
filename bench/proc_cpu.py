"""CPU time that benchmark processes spend, per operation: the benchmarks' headline figure.

Throughput on a shared machine drifts by up to 20% from run to run; the CPU a
node spends per operation barely moves, so regressions are judged by it. Every
bench phase that runs node processes measures through ``PhaseMeter``: the
nodes' utime + stime from /proc before and after the phase, summed and divided
by the operations completed; beside it, the load generator's own CPU per
operation and its share of a core. A generator above ``GEN_LIMITED_SHARE`` of
a core was (or nearly was) the bottleneck: that phase's ops/s measure the
generator as much as the nodes, and the tables and plots mark it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ringkv.clock import Clock, SystemClock

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# Above this share of one core, a generator process counts as the phase's limit.
GEN_LIMITED_SHARE = 0.8
GEN_LIMITED_MARK = "*"
_CLOCK = SystemClock()
GEN_LIMITED_NOTE = (f"{GEN_LIMITED_MARK} generator-limited: a load generator process used more "
                    f"than {GEN_LIMITED_SHARE:.0%} of a core, so that phase's ops/s measure it "
                    "as much as the nodes")


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


def own_cpu_s() -> float:
    """The CPU seconds (user + system, all threads) this process has used so far.

    A generator process reads this around its own run and reports the
    difference: its /proc entry may be gone by the time the parent could read it.
    """
    times = os.times()
    return times.user + times.system


def us_per_op(cpu_used_s: float, ops: int) -> float | None:
    """Microseconds of CPU per operation; None when no operation completed."""
    return round(cpu_used_s * 1e6 / ops, 1) if ops else None


@dataclass(frozen=True)
class PhaseCpu:
    """What one phase cost in CPU: per node process, and per load generator process."""

    ops: int
    elapsed_s: float
    node_cpu_s: dict[int, float]  # node pid -> CPU seconds over the phase
    gen_cpu_s: tuple[float, ...]  # one entry per generator process

    @property
    def node_us_per_op(self) -> float | None:
        return us_per_op(sum(self.node_cpu_s.values()), self.ops) if self.node_cpu_s else None

    @property
    def gen_us_per_op(self) -> float | None:
        return us_per_op(sum(self.gen_cpu_s), self.ops) if self.gen_cpu_s else None

    @property
    def gen_core_pct(self) -> float:
        """All generator processes together, in % of one core."""
        return round(100 * sum(self.gen_cpu_s) / self.elapsed_s, 1) if self.elapsed_s > 0 else 0.0

    @property
    def gen_limited(self) -> bool:
        """Some generator process used more than GEN_LIMITED_SHARE of a core (a Python
        generator is one GIL: one core is all one process can use)."""
        return self.elapsed_s > 0 and any(
            cpu / self.elapsed_s > GEN_LIMITED_SHARE for cpu in self.gen_cpu_s)


class PhaseMeter:
    """Measures one phase: ``start()`` and ``stop()`` around it (or ``with``), then ``result(ops)``.

    Node CPU comes from /proc/<pid>/stat of ``node_pids``. Generator CPU comes
    from /proc of ``gen_pids`` (processes alive at both ends), from this
    process (``in_process_gen``: the generator runs here), and from what
    generator processes measured of themselves and reported (``add_reported_gen``).
    ``pid_cpu_s``, ``own_cpu`` and ``clock`` are /proc, this process and the
    system clock unless a test plants its own.
    """

    def __init__(self, node_pids: Sequence[int], *, gen_pids: Sequence[int] = (),
                 in_process_gen: bool = False,
                 pid_cpu_s: Callable[[int], float] = lambda pid: cpu_s([pid]),
                 own_cpu: Callable[[], float] = own_cpu_s, clock: Clock = _CLOCK) -> None:
        self._pid_cpu_s = pid_cpu_s
        self._own_cpu = own_cpu
        self._clock = clock
        self.node_pids = list(node_pids)
        self.gen_pids = list(gen_pids)
        self.in_process_gen = in_process_gen
        self._reported: list[float] = []
        self._node_before: dict[int, float] = {}
        self._node_used: dict[int, float] = {}
        self._gen_before: dict[int, float] = {}
        self._gen_used: list[float] = []
        self._own_before_s = 0.0
        self._began_s = 0.0
        self.elapsed_s = 0.0

    def start(self) -> None:
        self._node_before = {pid: self._pid_cpu_s(pid) for pid in self.node_pids}
        self._gen_before = {pid: self._pid_cpu_s(pid) for pid in self.gen_pids}
        self._own_before_s = self._own_cpu()
        self._began_s = self._clock.monotonic_s()

    def stop(self) -> None:
        self.elapsed_s = self._clock.monotonic_s() - self._began_s
        own_used_s = self._own_cpu() - self._own_before_s
        self._node_used = {pid: self._pid_cpu_s(pid) - before
                           for pid, before in self._node_before.items()}
        self._gen_used = [self._pid_cpu_s(pid) - before
                          for pid, before in self._gen_before.items()]
        if self.in_process_gen:
            self._gen_used.append(own_used_s)

    def add_reported_gen(self, cpu_used_s: float) -> None:
        """A generator process's own CPU over the phase, as it measured it (``own_cpu_s``)."""
        self._reported.append(cpu_used_s)

    def __enter__(self) -> PhaseMeter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def result(self, ops: int, elapsed_s: float | None = None) -> PhaseCpu:
        """The phase's figures; ``elapsed_s``: the generator's own measure of the phase, if
        it ran it (else the wall time between start and stop)."""
        return PhaseCpu(ops=ops, elapsed_s=self.elapsed_s if elapsed_s is None else elapsed_s,
                        node_cpu_s=dict(self._node_used),
                        gen_cpu_s=tuple(self._gen_used + self._reported))


def gen_mark(limited: bool) -> str:
    return GEN_LIMITED_MARK if limited else ""
