"""``python -m bench txn``'s own arithmetic: the leader profile summary and a phase's line."""

from __future__ import annotations

from pathlib import Path

from bench.proc_cpu import GEN_LIMITED_MARK, PhaseCpu
from bench.txn import HEADER, phase_line, summarise, summarise_profile


def test_profile_summary_counts_inclusive_and_self(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.write_text("main (cli.py:1);serve (api.py:9);write (leveldb.py:3) 3\n"
                   "main (cli.py:1);serve (api.py:9) 1\n")
    text = summarise_profile(raw)
    assert text.startswith("4 samples")
    inclusive, own = text.split("self:")
    assert "100.0%  main cli.py" in inclusive and " 75.0%  write leveldb.py" in inclusive
    assert " 75.0%  write leveldb.py" in own and " 25.0%  serve api.py" in own
    assert "main cli.py" not in own


def test_phase_line_lines_up_with_the_header() -> None:
    cpu = PhaseCpu(ops=4, elapsed_s=2.0, node_cpu_s={11: 0.002, 12: 0.0004, 13: 0.0008},
                   gen_cpu_s=(0.0002,))
    result = summarise("cas", [0.010, 0.020, 0.030, 0.040], [0.02, 0.02, 0.03, 0.01], ["409"],
                       cpu, roles={11: "leader", 12: "follower-1", 13: "follower-2"},
                       fsyncs={11: 2, 12: 1, 13: 1})
    line = phase_line(result)
    assert len(line) == len(HEADER)
    # 4 ops in 2 s; commit wait 0.08 ms of 100 ms; CPU µs/op: leader, followers, all, loadgen,
    # and the generator's share of a core; fsyncs per op: the leader's, a follower's.
    assert line.split()[:5] == ["cas", "2", "30.00", "40.00", "0.1%"]
    assert line.split("|")[1].split() == ["500", "100", "200", "800", "50", "0%"]
    assert line.split("|")[2].split() == ["0.50", "0.25"]
    assert line.split("|")[3].split() == ["1"]
    assert phase_line({**result, "commit_wait_share": None}).split()[4] == "-"
    assert result["nodes"][0] == {"pid": 11, "role": "leader", "cpu_us_per_op": 500.0,
                                  "cpu_pct": 0.1, "fsyncs_per_op": 0.5}


def test_a_generator_above_80_percent_of_a_core_is_marked_in_the_line() -> None:
    # Two generator processes at 60% of a core each are not limited (120% in all); one at
    # 90% is.
    for gen_cpu_s, limited in (((1.2, 1.2), False), ((1.8,), True)):
        cpu = PhaseCpu(ops=1000, elapsed_s=2.0, node_cpu_s={11: 0.5}, gen_cpu_s=gen_cpu_s)
        result = summarise("snapshot", [0.001] * 1000, [], [], cpu, roles={11: "leader"})
        assert result["gen_limited"] is limited
        line = phase_line(result)
        assert len(line) == len(HEADER)
        assert line.split("|")[1].split()[-1] == f"{result['loadgen_cpu_pct']:.0f}%" + (
            GEN_LIMITED_MARK if limited else "")
