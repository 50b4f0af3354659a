"""The benchmarks' headline figure, CPU per operation (bench/proc_cpu.py, issue #14 §3).

utime + stime of the node processes from /proc/<pid>/stat (proc(5)) before and
after a phase, over the operations completed; beside it the load generator's
own CPU per op and its share of a core, with phases whose generator used more
than 80% of a core marked in every table and plot.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bench import proc_cpu
from bench.cluster import stronger_above_weaker
from bench.loadgen import (
    GEN_LAG_NOTE,
    LAG_FLOOR_MS,
    LoadResult,
    format_row,
    format_table,
    lag_limited,
    loop_lag_ms,
    run_load,
)
from bench.proc_cpu import GEN_LIMITED_MARK, GEN_LIMITED_NOTE, PhaseCpu, PhaseMeter
from ringkv.clock import ManualClock

# Burns the CPU seconds given on the command line when told to, then waits to be let go:
# alive at both ends of the measured phase, and idle outside it.
BURNER = """
import os, sys
print("ready", flush=True)
sys.stdin.readline()
start = sum(os.times()[:2])
while sum(os.times()[:2]) - start < float(sys.argv[1]):
    sum(range(1000))
print("burnt", flush=True)
sys.stdin.readline()
"""


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError("the burner did not answer in time")
    return proc.stdout.readline().strip()


def _measure_burner(burn_s: float, *, as_generator: bool) -> PhaseCpu:
    proc = subprocess.Popen([sys.executable, "-c", BURNER, str(burn_s)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None
        assert _read_line(proc, 30) == "ready"
        meter = PhaseMeter([] if as_generator else [proc.pid],
                           gen_pids=[proc.pid] if as_generator else [])
        meter.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert _read_line(proc, 60) == "burnt"
        meter.stop()
        proc.stdin.write("bye\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return meter.result(1000)


def test_a_node_burning_known_cpu_measures_within_a_factor_of_it() -> None:
    # 0.3 s of CPU over 1,000 ops is 300 µs/op; clock ticks (10 ms) and the load of a shared
    # machine move it a little, never by a factor of two.
    cpu = _measure_burner(0.3, as_generator=False)
    assert cpu.node_us_per_op is not None and 150 <= cpu.node_us_per_op <= 600
    assert cpu.gen_cpu_s == () and cpu.gen_us_per_op is None


def test_a_generator_process_is_read_from_proc_too() -> None:
    cpu = _measure_burner(0.3, as_generator=True)
    assert cpu.gen_us_per_op is not None and 150 <= cpu.gen_us_per_op <= 600
    assert cpu.node_us_per_op is None


def _planted(share_of_core: float, *, in_process: bool) -> PhaseCpu:
    """A generator that uses ``share_of_core`` of a core over a 10 s phase, on a planted clock
    and /proc (a real spinner gets what the neighbours leave it on a shared machine)."""
    clock = ManualClock()
    gen_pid, node_pid = 4242, 4343
    used = {gen_pid: 0.0, node_pid: 0.0, "own": 0.0}
    meter = PhaseMeter([node_pid], gen_pids=[] if in_process else [gen_pid],
                       in_process_gen=in_process, pid_cpu_s=lambda pid: used[pid],
                       own_cpu=lambda: used["own"], clock=clock)
    with meter:
        clock.advance(10.0)
        used[node_pid] += 2.0
        used["own" if in_process else gen_pid] += 10.0 * share_of_core
    return meter.result(10_000)


@pytest.mark.parametrize("in_process", [False, True])
def test_a_spinning_generator_is_marked_and_a_light_one_is_not(in_process: bool) -> None:
    spinning = _planted(1.0, in_process=in_process)
    assert spinning.gen_limited and spinning.gen_core_pct == 100.0
    assert spinning.node_us_per_op == 200.0 and spinning.gen_us_per_op == 1000.0
    assert _planted(0.81, in_process=in_process).gen_limited
    assert not _planted(0.79, in_process=in_process).gen_limited
    assert not _planted(0.1, in_process=in_process).gen_limited


def test_limited_means_one_process_above_80_percent_not_the_sum() -> None:
    # Two generator processes at 60% each: 120% of a core in all, neither the bottleneck.
    two = PhaseCpu(ops=100, elapsed_s=10.0, node_cpu_s={1: 1.0}, gen_cpu_s=(6.0, 6.0))
    assert two.gen_core_pct == 120.0 and not two.gen_limited
    reported = PhaseMeter([])
    reported.start()
    reported.stop()
    reported.add_reported_gen(9.0)
    assert reported.result(100, elapsed_s=10.0).gen_limited


def _result(label: str = "x", ops_per_s: float = 1000.0, **cpu: object) -> LoadResult:
    result = LoadResult(label=label, op="put", concurrency=8, ops=1000, errors=0, duration_s=1.0,
                        ops_per_s=ops_per_s, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0, max_ms=4.0,
                        client_cpu_pct=0.0)
    result.apply(PhaseCpu(ops=1000, elapsed_s=1.0, node_cpu_s={1: 0.25},
                          gen_cpu_s=(cpu.get("gen_s", 0.05),)))  # type: ignore[arg-type]
    return result


def test_the_table_shows_node_and_generator_cpu_and_marks_a_limited_phase() -> None:
    light, heavy = _result("light", gen_s=0.05), _result("heavy", gen_s=0.9)
    table = format_table([light, heavy])
    header = table.splitlines()[0]
    for column in ("ops/s", "p50 ms", "p99 ms", "node us/op", "gen us/op", "gen core", "gen lag"):
        assert column in header
    rows = table.splitlines()[2:4]
    assert rows[0].split()[-4:] == ["250", "50", "5%", "-"]  # no lag measured
    assert rows[1].split()[-4:] == ["250", "900", f"90%{GEN_LIMITED_MARK}", "-"]
    assert table.splitlines()[-1] == GEN_LIMITED_NOTE
    assert rows[0] == format_row(light) and len(rows[0]) == len(header)
    assert GEN_LIMITED_NOTE not in format_table([light])


def test_quorum_measuring_above_one_is_flagged_as_noise() -> None:
    def level(name: str, ops_per_s: float) -> LoadResult:
        return _result(f"native rf3 {name}", ops_per_s=ops_per_s)

    ordered = [level("ONE", 5000), level("QUORUM", 4000), level("ALL", 3000)]
    for r in ordered:
        r.op = "put"
    gets = [_result(r.label, ops_per_s=r.ops_per_s) for r in ordered]
    for r in gets:
        r.op = "get"
    assert stronger_above_weaker(ordered + gets, ["ONE", "QUORUM", "ALL"], ["native"]) == []
    gets[1].ops_per_s = 5100  # QUORUM above ONE: planted noise
    warnings = stronger_above_weaker(ordered + gets, ["ONE", "QUORUM", "ALL"], ["native"])
    assert len(warnings) == 1 and warnings[0].startswith("noisy: native get at QUORUM")
    assert "5,100" in warnings[0] and "above ONE's 5,000" in warnings[0]


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else delayed ACKs hold each answer ~40 ms

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


def test_a_load_phase_reports_the_servers_cpu_per_op_and_its_generators(tmp_path: Path) -> None:
    # The server under test is a thread of this process, so this process is its "node".
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = run_load("tiny", f"http://127.0.0.1:{server.server_address[1]}", "/kv/{key}",
                          op="put", concurrency=2, duration_s=0.5, node_pids=[os.getpid()])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert result.ops > 0 and result.errors == 0
    assert result.server_cpu_us_per_op is not None and result.server_cpu_us_per_op > 0
    assert result.gen_cpu_us_per_op is not None and result.gen_cpu_us_per_op > 0
    assert result.gen_cpu_limited == (
        result.client_cpu_pct > 100 * proc_cpu.GEN_LIMITED_SHARE)
    assert result.gen_lag_ms is not None and result.gen_lag_ms >= 0  # the ticker ran
    assert result.gen_lag_limited == lag_limited(result.gen_lag_ms, result.p50_ms)
    assert result.gen_limited == (result.gen_cpu_limited or result.gen_lag_limited)
    assert result.to_json()["limited_by"] == result.limited_by
    row = format_row(result)
    assert row.split()[-4] == f"{result.server_cpu_us_per_op:.0f}"


def test_ycsb_table_and_plot_carry_cpu_and_the_generator_limited_mark(tmp_path: Path) -> None:
    from bench import ycsb

    light, heavy = _result("A update heavy", gen_s=0.05), _result("A update heavy", gen_s=0.9)
    light.consistency, heavy.consistency = "ONE", "QUORUM"
    table = ycsb.format_table([light, heavy])
    assert "node us/op" in table.splitlines()[0]
    assert table.splitlines()[3].endswith(f"90%{GEN_LIMITED_MARK}        -")
    assert table.splitlines()[-1] == GEN_LIMITED_NOTE
    pytest.importorskip("matplotlib")
    png = tmp_path / "ycsb.png"
    ycsb.plot([light, heavy], png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the event-loop lag rule (bench/loadgen.py): the client holding the requests in flight


def test_the_lag_rule_marks_a_loop_late_by_a_quarter_of_the_median_latency() -> None:
    assert not lag_limited(None, 1.0)  # not measured: never limited by it
    assert not lag_limited(0.9, 1.0)  # under the floor: timer granularity
    assert not lag_limited(LAG_FLOOR_MS, 1.0)
    assert lag_limited(1.1, 1.0)  # above the floor and above a quarter of 1 ms
    assert not lag_limited(2.4, 10.0)  # a quarter of 10 ms is 2.5
    assert lag_limited(2.6, 10.0)


def test_the_lag_is_the_loaded_median_less_the_idle_one() -> None:
    idle = [0.0002, 0.0003, 0.0004]  # the timer's own lateness: 0.3 ms
    assert loop_lag_ms(idle, []) is None
    assert loop_lag_ms(idle, [0.0001, 0.0002]) == 0.0  # never negative
    assert loop_lag_ms(idle, [0.001, 0.005, 0.005, 0.006, 0.1]) == pytest.approx(4.7)
    assert loop_lag_ms([], [0.002]) == pytest.approx(2.0)


def test_a_lagging_phase_is_marked_on_its_lag_with_its_own_note() -> None:
    calm, lagging = _result("calm", gen_s=0.05), _result("lagging", gen_s=0.05)
    calm.apply_lag(0.2)
    lagging.apply_lag(3.0)  # p50 is 1 ms: answers waited 3 ms in the generator
    assert (calm.gen_limited, calm.limited_by) == (False, "")
    assert (lagging.gen_limited, lagging.limited_by) == (True, "lag")
    table = format_table([calm, lagging])
    rows = table.splitlines()[2:4]
    assert rows[0].split()[-2:] == ["5%", "0.2ms"]
    assert rows[1].split()[-2:] == ["5%", f"3.0ms{GEN_LIMITED_MARK}"]
    assert table.splitlines()[-1] == GEN_LAG_NOTE and GEN_LIMITED_NOTE not in table
    both = _result("both", gen_s=0.9)
    both.apply_lag(3.0)
    assert both.limited_by == "cpu+lag"
    assert format_table([both]).splitlines()[-2:] == [GEN_LIMITED_NOTE, GEN_LAG_NOTE]


def test_the_ycsb_plot_has_a_legend_entry_for_limited_phases(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from bench import ycsb

    lagging = _result("A update heavy", gen_s=0.05)
    lagging.consistency = "ONE"
    lagging.apply_lag(3.0)
    drawn: list[str] = []
    original = matplotlib.axes.Axes.legend

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        drawn.extend(str(handle.get_label()) for handle in kwargs.get("handles", ()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", spy)
    png = tmp_path / "ycsb.png"
    ycsb.plot([lagging], png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(label.startswith(f"{GEN_LIMITED_MARK} generator-limited (lag")
               for label in drawn), drawn
