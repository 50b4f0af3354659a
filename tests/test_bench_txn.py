"""``python -m bench txn``'s own arithmetic: the leader profile summary and a phase's line."""

from __future__ import annotations

from pathlib import Path

from bench.txn import HEADER, phase_line, summarise_profile


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
    result = {"phase": "cas", "ops_per_s": 663.2, "p50_ms": 38.5, "p99_ms": 156.1,
              "commit_wait_share": 0.004, "commit_wait_p50_ms": 0.02,
              "server_cpu_us_per_op": 712.0, "leader_cpu_us_per_op": 450.0, "leader_cpu_pct": 60.0,
              "client_cpu_pct": 16.0, "errors": 0}
    line = phase_line(result)
    assert len(line) == len(HEADER)
    assert line.split()[:5] == ["cas", "663", "38.50", "156.10", "0%"]
    assert phase_line({**result, "commit_wait_share": None}).split()[4] == "-"
