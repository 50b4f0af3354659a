"""`python -m bench etcd` (bench/etcd.py): ringkv at QUORUM against a 3-member etcd.

The request and answer encoding of etcd's v3 JSON gateway and the ratio
lines against issue #14 §2's targets are pure and tested here directly; one
test runs the bench for real, with tiny phases, when an etcd binary is
installed (Debian: apt-get install -y etcd-server), and another interrupts
a run and finds none of its processes or files left behind.
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.etcd import (
    ETCD, GET_TARGET, PUT_TARGET, RINGKV_HTTP, RINGKV_NATIVE, etcd_put_request,
    etcd_range_request, etcd_range_value, find_etcd, target_ratios)
from bench.loadgen import LoadResult
from ringkv.tools.launcher import wait_until

ROOT = Path(__file__).resolve().parent.parent
NO_ETCD = "no etcd binary on PATH: apt-get install -y etcd-server to run the etcd comparison"


def _split(request: bytes) -> tuple[list[str], dict[str, object]]:
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines
                  if line.lower().startswith("content-length:"))
    assert length == len(body)  # the generator reads answers by Content-Length; etcd too
    return lines, json.loads(body)


def test_a_put_sends_key_and_value_base64_to_the_v3_gateway() -> None:
    lines, body = _split(etcd_put_request("127.0.0.1:2379", "key42", b"x" * 100))
    assert lines[0] == "POST /v3/kv/put HTTP/1.1"
    assert "Host: 127.0.0.1:2379" in lines
    assert body == {"key": base64.b64encode(b"key42").decode(),
                    "value": base64.b64encode(b"x" * 100).decode()}


def test_a_range_asks_for_one_key_and_stays_linearizable() -> None:
    lines, body = _split(etcd_range_request("[::1]:2379", "key7"))
    assert lines[0] == "POST /v3/kv/range HTTP/1.1"
    assert "Host: [::1]:2379" in lines
    # No range_end (one key) and no serializable flag (etcd then reads through Raft).
    assert body == {"key": base64.b64encode(b"key7").decode()}


def test_a_range_answer_gives_the_value_or_none_and_rejects_errors() -> None:
    header = '"header":{"cluster_id":"1","member_id":"2","revision":"2","raft_term":"2"}'
    found = ('{' + header + ',"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2",'
             '"version":"1","value":"YmFy"}],"count":"1"}').encode()
    assert etcd_range_value(found) == b"bar"
    assert etcd_range_value(('{' + header + '}').encode()) is None
    with pytest.raises(ValueError):
        etcd_range_value(b'{"error":"illegal base64 data at input byte 0","code":3}')
    with pytest.raises(ValueError):
        etcd_range_value(b"not json")


def _result(label: str, op: str, ops_per_s: float, cpu: float | None = None) -> LoadResult:
    return LoadResult(label=label, op=op, concurrency=50, ops=int(ops_per_s), errors=0,
                      duration_s=1.0, ops_per_s=ops_per_s, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0,
                      max_ms=4.0, client_cpu_pct=10.0, server_cpu_us_per_op=cpu)


def test_ratios_average_the_rounds_and_say_whether_each_target_is_met() -> None:
    results = []
    # Per round, ops/s of: etcd put, HTTP put, native put, etcd get, HTTP get, native get.
    for e_put, h_put, n_put, e_get, h_get, n_get in (
            (1000, 1400, 2000, 2000, 3000, 5000), (1000, 1700, 2200, 2000, 4200, 3000)):
        results += [_result(ETCD, "put", e_put, 400.0), _result(RINGKV_HTTP, "put", h_put, 300.0),
                    _result(RINGKV_NATIVE, "put", n_put, 200.0), _result(ETCD, "get", e_get),
                    _result(RINGKV_HTTP, "get", h_get), _result(RINGKV_NATIVE, "get", n_get)]
    records, lines = target_ratios(results)
    by_name = {r["name"]: r for r in records}
    assert len(records) == len(lines) == 4
    http_put = by_name[f"{RINGKV_HTTP} put / etcd put"]
    assert (http_put["ratio"], http_put["round_ratios"]) == (1.55, [1.4, 1.7])
    assert http_put["target"] == PUT_TARGET and http_put["met"] is True
    assert http_put["ours_server_cpu_us_per_op"] == 300
    assert http_put["base_server_cpu_us_per_op"] == 400
    assert http_put["cpu_ratio"] == round(400 / 300, 3)  # ops per server CPU-second
    unmeasured = by_name[f"{RINGKV_HTTP} get / etcd linearizable range"]
    assert "cpu_ratio" not in unmeasured
    http_get = by_name[f"{RINGKV_HTTP} get / etcd linearizable range"]
    assert (http_get["ratio"], http_get["target"], http_get["met"]) == (1.8, GET_TARGET, False)
    native_get = by_name[f"{RINGKV_NATIVE} get / etcd linearizable range"]
    assert (native_get["ratio"], native_get["met"]) == (2.0, True)  # exactly at the target
    line = next(line for line in lines if line.startswith(f"{RINGKV_HTTP} get"))
    assert "1.80x" in line and "target 2.0x" in line and "NOT met" in line
    line = next(line for line in lines if line.startswith(f"{RINGKV_HTTP} put"))
    assert " met " in line and "NOT" not in line
    assert "300 vs 400 us, ops per CPU-second 1.33x" in line


def test_no_ratios_without_etcd_phases() -> None:
    assert target_ratios([_result(RINGKV_HTTP, "put", 1000), _result(RINGKV_NATIVE, "get", 9)]) \
        == ([], [])


def test_find_etcd_takes_the_given_binary_or_the_one_on_path(tmp_path: Path) -> None:
    assert find_etcd(None, path=str(tmp_path)) is None
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\n")
    assert find_etcd(str(fake)) is None  # not executable
    fake.chmod(0o755)
    assert find_etcd(None, path=str(tmp_path)) == str(fake)
    assert find_etcd(str(fake)) == str(fake)
    assert find_etcd(str(tmp_path / "missing")) is None


def _bench(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    # TMPDIR: the bench's data dirs go under tmp_path, where the test can look for leftovers.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    return subprocess.Popen(
        [sys.executable, "-m", "bench", "etcd", "--out", str(tmp_path / "etcd.json"), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _leftovers(tmp_path: Path) -> list[str]:
    """Processes still running with a path under tmp_path on their command line, and
    what the bench left in tmp_path besides its JSON."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        if str(tmp_path) in cmdline and "pytest" not in cmdline:
            found.append(f"pid {entry.name}: {cmdline[:200]}")
    found += [str(p) for p in tmp_path.iterdir() if p.name != "etcd.json"]
    return found


@pytest.mark.skipif(find_etcd(None) is None, reason=NO_ETCD)
def test_the_bench_measures_both_systems_for_real(tmp_path: Path) -> None:
    proc = _bench(tmp_path, "--duration", "0.5", "--rounds", "1", "--keys", "200",
                  "--concurrency", "8")
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, out
    report = json.loads((tmp_path / "etcd.json").read_text())
    phases = {(r["label"], r["op"]): r for r in report["results"]}
    assert set(phases) == {(label, op) for label in (ETCD, RINGKV_HTTP, RINGKV_NATIVE)
                           for op in ("put", "get")}
    for (label, op), phase in phases.items():
        assert phase["ops"] > 0 and phase["errors"] == 0, (label, op, phase)
        # Measured (a tiny phase may round to 0 clock ticks, so not asserted positive).
        assert phase["server_cpu_us_per_op"] is not None, phase
        assert phase["gen_cpu_us_per_op"] is not None, phase
    assert phases[(ETCD, "put")]["system"] == "etcd"
    assert len(report["ratios"]) == 4 and all(r["ratio"] > 0 for r in report["ratios"])
    assert report["etcd"]["version"].startswith("3.")
    assert "target 1.5x" in out and "target 2.0x" in out
    assert _leftovers(tmp_path) == []


def _live_children(pid: int) -> dict[int, str]:
    """pid -> command line of the processes whose parent is ``pid`` (zombies left out)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == pid and state != "Z":
            children[int(entry.name)] = cmdline
    return children


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(find_etcd(None) is None, reason=NO_ETCD)
def test_an_interrupted_run_leaves_no_process_or_data_behind(tmp_path: Path) -> None:
    # A phase far longer than the wait below: only an interrupt that kills the
    # generator (rather than waiting for it) ends the run in time, with room for
    # the clusters' own shutdown on a busy machine.
    proc = _bench(tmp_path, "--duration", "180", "--keys", "50", "--concurrency", "4")
    children: dict[int, str] = {}
    try:
        assert proc.stdout is not None
        seen = ""
        while "ops/s" not in seen:  # the table's header: both clusters are up
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            line = proc.stdout.readline() if ready else ""
            assert line, f"the bench did not start its phases:\n{seen}"
            seen += line

        def all_started() -> dict[int, str]:
            # 3 etcd members, 3 ringkv nodes and the first phase's generator process.
            children = _live_children(proc.pid)
            lines = list(children.values())
            if (sum("--initial-cluster" in c for c in lines) == 3
                    and sum("ringkv.cli node" in c for c in lines) == 3
                    and any("multiprocessing" in c for c in lines)):
                return children
            return {}

        children = wait_until(all_started, timeout_s=30, interval_s=0.1,
                              what="the bench's servers and generator")
        proc.send_signal(signal.SIGINT)  # as Ctrl-C, but to the bench process alone
        # Well before the 180 s phase would end: the generator is killed, not waited for.
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
            for pid in children:  # the bench failed to: its servers must not outlive the test
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    # A moment for the kernel to finish tearing down whatever was killed last.
    wait_until(lambda: not any(_alive(pid) for pid in children), timeout_s=10, interval_s=0.1,
               what=f"every child of the bench to exit: {children}")
    assert _leftovers(tmp_path) == [], seen + out
