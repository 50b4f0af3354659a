"""The benchmarks' CPU-per-operation reading from /proc (bench/proc_cpu.py, proc(5))."""

from __future__ import annotations

import os

import pytest

from bench import proc_cpu
from ringkv.tools.launcher import wait_until


def test_utime_and_stime_are_counted_after_a_command_name_with_spaces_and_parens() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    stat = "4242 (my (odd) node) S 1 4242 4242 0 -1 4194560 10 0 0 0 250 40 7 3 20 0 1 0\n"
    assert proc_cpu.parse_stat_cpu_ticks(stat) == 290  # utime + stime, not the children's 7 + 3


def test_cpu_of_a_busy_process_grows() -> None:
    before_s = proc_cpu.cpu_s([os.getpid()])

    def burned_a_tick() -> bool:
        sum(range(20_000))
        return proc_cpu.cpu_s([os.getpid()]) > before_s

    wait_until(burned_a_tick, timeout_s=10, interval_s=0, what="this process's CPU time to grow")


def test_per_op_in_microseconds_and_none_without_ops() -> None:
    assert proc_cpu.us_per_op(0.5, 1000) == pytest.approx(500.0)
    assert proc_cpu.us_per_op(0.5, 0) is None
