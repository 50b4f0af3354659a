"""ringkv against etcd on this machine: 3 members each, puts and linearizable reads.

    python -m bench etcd [--duration 10] [--rounds 2] [--concurrency 50] [--keys 10000]
                         [--value-size 100] [--etcd-bin PATH] [--commit-sync periodic|batch]

Issue #14 §2's targets: a 3-node RF=3 ringkv cluster at QUORUM does at least
1.5x etcd's puts and 2x etcd's linearizable reads. A 3-member etcd cluster
and a 3-node ringkv cluster run side by side on 127.0.0.1, both loaded by
the lean keep-alive HTTP/1.1 generator of bench/loadgen.py (its own process,
``--concurrency`` connections' worth of workers spread over the members):
etcd through its v3 JSON gateway (``POST /v3/kv/put``, ``POST /v3/kv/range``
without ``serializable``, so each read goes through Raft's ReadIndex), ringkv
with QUORUM puts and gets over HTTP and over the native protocol (the lean
pipelined native generator). Same key space and value size for all; every
key is written to both before the first phase, so reads find their keys.
Phases alternate between the systems (etcd put, ringkv HTTP put, ringkv
native put, etcd get, ...) for ``--rounds`` rounds, so drift on a shared
machine hits both alike; the idle system stays up meanwhile.

Per phase: ops/s, p50/p99, errors, the server processes' CPU per op (from
/proc, bench/proc_cpu.py) and the generator's. Then each ringkv figure over
etcd's (ops/s averaged over the rounds), with its target and whether it is
met, and the ratio of ops per server CPU-second (steadier than ops/s when
neighbours load the machine). etcd comes from the ``etcd`` binary on PATH or
``--etcd-bin`` (Debian: ``apt-get install -y etcd-server``); without one,
only the ringkv phases run.
etcd fsyncs its log before it answers a put; ringkv's default ``periodic``
commit sync does not (``--commit-sync batch`` makes it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import client as http_client
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult, _Connection, _Target, format_row, format_table, run_load
from ringkv.tools.launcher import free_port_block, http, wait_until
from ringkv.tools.local_cluster import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results"
APT_HINT = "apt-get install -y etcd-server"
PUT_TARGET = 1.5  # issue #14 §2: ringkv QUORUM puts against etcd's
GET_TARGET = 2.0  # ... and QUORUM gets against etcd's linearizable ranges
ETCD = "etcd"
RINGKV_HTTP = "ringkv http QUORUM"
RINGKV_NATIVE = "ringkv native QUORUM"
RINGKV_PATH = "/v1/kv/default/{key}?consistency=QUORUM"
ETCD_HEALTH_DEADLINE_S = 30.0
ETCD_STOP_DEADLINE_S = 10.0
PRELOAD_CONCURRENCY = 32


# --- etcd's v3 JSON gateway: keys and values travel base64-encoded (pure) ---

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# Formatted by hand rather than by json.dumps: the generator builds one per request, and
# base64 text never needs JSON escaping.
def etcd_put_body(key: str, value: bytes) -> bytes:
    return f'{{"key":"{_b64(key.encode())}","value":"{_b64(value)}"}}'.encode()


def etcd_range_body(key: str) -> bytes:
    """A range of one key; no ``serializable``, so the read is linearizable (etcd's default)."""
    return f'{{"key":"{_b64(key.encode())}"}}'.encode()


def _post(host_header: str, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def etcd_put_request(host_header: str, key: str, value: bytes) -> bytes:
    """The whole HTTP/1.1 request for a put of ``key`` = ``value``."""
    return _post(host_header, "/v3/kv/put", etcd_put_body(key, value))


def etcd_range_request(host_header: str, key: str) -> bytes:
    """The whole HTTP/1.1 request for a linearizable read of ``key``."""
    return _post(host_header, "/v3/kv/range", etcd_range_body(key))


def etcd_range_value(body: bytes) -> bytes | None:
    """The value in a range answer's body; None when the key is absent.

    ValueError for an error answer ({"error": ..., "code": ...}) or a body that is not one.
    """
    answer = json.loads(body)
    if not isinstance(answer, dict) or "error" in answer or "header" not in answer:
        raise ValueError(f"not a range answer: {body[:200]!r}")
    kvs = answer.get("kvs") or []
    return base64.b64decode(kvs[0].get("value", "")) if kvs else None


def ringkv_put_request(host_header: str, key: str, value: object, consistency: str) -> bytes:
    body = json.dumps({"value": value}).encode()
    return (f"PUT /v1/kv/default/{key}?consistency={consistency} HTTP/1.1\r\n"
            f"Host: {host_header}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def find_etcd(etcd_bin: str | None, path: str | None = None) -> str | None:
    """The etcd binary to run: ``etcd_bin`` if given (and executable), else ``etcd`` on
    ``path`` (default: $PATH); None when there is none."""
    if etcd_bin is not None:
        return etcd_bin if os.path.isfile(etcd_bin) and os.access(etcd_bin, os.X_OK) else None
    return shutil.which("etcd", path=path)


# --- ratios against the targets (pure) ---

def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _cpu(results: Sequence[LoadResult]) -> float | None:
    measured = [r.server_cpu_us_per_op for r in results if r.server_cpu_us_per_op is not None]
    return round(_mean(measured), 1) if measured else None


def target_ratios(results: Sequence[LoadResult]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each ringkv QUORUM figure over etcd's, against its target: JSON records and lines.

    ``results`` holds the phases of every round in order; a ratio is the mean ops/s of
    ringkv's phases over the mean of etcd's, and each round's own ratio goes beside it.
    Nothing when etcd did not run.
    """
    records: list[dict[str, Any]] = []
    lines: list[str] = []
    base_names = {"put": "etcd put", "get": "etcd linearizable range"}
    for ours_label in (RINGKV_HTTP, RINGKV_NATIVE):
        for op, target in (("put", PUT_TARGET), ("get", GET_TARGET)):
            ours = [r for r in results if r.label == ours_label and r.op == op]
            base = [r for r in results if r.label == ETCD and r.op == op]
            if not ours or not base:
                continue
            base_ops = _mean([r.ops_per_s for r in base])
            ours_ops = _mean([r.ops_per_s for r in ours])
            ratio = ours_ops / base_ops if base_ops else 0.0
            rounds = [round(o.ops_per_s / b.ops_per_s, 3) if b.ops_per_s else 0.0
                      for o, b in zip(ours, base)]
            name = f"{ours_label} {op} / {base_names[op]}"
            met = ratio >= target
            record: dict[str, Any] = {
                "name": name, "op": op, "ours": ours_label, "base": ETCD,
                "ratio": round(ratio, 3), "round_ratios": rounds, "target": target, "met": met,
                "ours_ops_per_s": round(ours_ops, 1), "base_ops_per_s": round(base_ops, 1),
                "ours_server_cpu_us_per_op": _cpu(ours), "base_server_cpu_us_per_op": _cpu(base)}
            records.append(record)
            cpu = ""
            ours_cpu = record["ours_server_cpu_us_per_op"]
            base_cpu = record["base_server_cpu_us_per_op"]
            if ours_cpu and base_cpu:
                # Ops per server CPU-second, ringkv's over etcd's: what the ops/s ratio tends to
                # when both are CPU-bound, and far steadier than it on a shared machine.
                record["cpu_ratio"] = round(base_cpu / ours_cpu, 3)
                cpu = (f"; server CPU/op {ours_cpu:.0f} vs {base_cpu:.0f} us, "
                       f"ops per CPU-second {base_cpu / ours_cpu:.2f}x")
            lines.append(
                f"{name:<59}{ratio:>6.2f}x  target {target:.1f}x "
                f"{'met' if met else 'NOT met':<8}(rounds "
                f"{' '.join(f'{r:.2f}x' for r in rounds)}; {ours_ops:,.0f} vs {base_ops:,.0f} "
                f"ops/s{cpu})")
    return records, lines


# --- processes ---

def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the bench dies without cleaning up."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class EtcdCluster:
    """``members`` etcd processes on 127.0.0.1, one Raft group, data under ``data_dir``."""

    binary: str
    data_dir: Path
    members: int = 3
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    client_ports: list[int] = field(default_factory=list)

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.client_ports]

    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def _log(self, index: int) -> Path:
        return self.data_dir / f"etcd{index}.log"

    def up(self) -> None:
        """Start every member, then wait until each reports itself healthy (a leader is
        elected and it can serve). Whatever was started is stopped again if that fails."""
        client = free_port_block(self.members)
        peer = free_port_block(self.members)
        self.client_ports = [client + i for i in range(self.members)]
        peers = [f"http://127.0.0.1:{peer + i}" for i in range(self.members)]
        initial = ",".join(f"etcd{i}={url}" for i, url in enumerate(peers))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i, (client_url, peer_url) in enumerate(zip(self.urls(), peers)):
                with open(self._log(i), "ab") as log:
                    self.procs.append(subprocess.Popen(
                        [self.binary, "--name", f"etcd{i}",
                         "--data-dir", str(self.data_dir / f"etcd{i}"),
                         "--listen-client-urls", client_url,
                         "--advertise-client-urls", client_url,
                         "--listen-peer-urls", peer_url,
                         "--initial-advertise-peer-urls", peer_url,
                         "--initial-cluster", initial, "--initial-cluster-state", "new",
                         "--initial-cluster-token", "ringkv-bench",
                         "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"],
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        preexec_fn=_die_with_parent))
            wait_until(self._healthy, timeout_s=ETCD_HEALTH_DEADLINE_S, interval_s=0.2,
                       what="the etcd members to report healthy")
        except BaseException:
            self.down()
            raise

    def _healthy(self) -> bool:
        for i, (proc, url) in enumerate(zip(self.procs, self.urls())):
            if proc.poll() is not None:
                tail = "\n".join(self._log(i).read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"etcd{i} exited with {proc.returncode}:\n{tail}")
            try:
                status, body = http("GET", f"{url}/health", timeout_s=2)
            except (OSError, http_client.HTTPException):
                return False
            if status != 200 or not isinstance(body, dict) or body.get("health") != "true":
                return False
        return True

    def down(self) -> None:
        """SIGKILL every member and reap it. Not SIGTERM: members stopping together each wait
        seconds for the others (a leader handing over to peers that are going too), and the
        data is thrown away anyway."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(timeout=ETCD_STOP_DEADLINE_S)
        self.procs = []


def etcd_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return first.split(":", 1)[-1].strip() or "unknown"


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process we started.
    SIGINT is taken too, explicitly: a run started in the background by a
    non-interactive shell inherits SIGINT ignored, and Ctrl-C must still stop it."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)



def ringkv_node_pids(cluster: LocalCluster) -> list[int]:
    return [node.proc.pid for node in cluster.procs if node.proc is not None]


@contextmanager
def side_by_side(binary: str | None, prefix: str, ringkv_overrides: dict[str, Any]
                 ) -> Iterator[tuple[EtcdCluster | None, LocalCluster]]:
    """A 3-member etcd (none when ``binary`` is None) and a 3-node RF=3 ringkv cluster
    (``ringkv_overrides`` on its config) on 127.0.0.1, both up and healthy, their data in
    one temporary directory named after ``prefix``. Everything started is stopped and the
    directory removed on the way out, on SIGTERM and Ctrl-C too."""
    with _sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        etcd = EtcdCluster(binary, Path(tmp) / "etcd") if binary else None
        ringkv = LocalCluster(Path(tmp) / "ringkv", nodes=3, rf=3,
                              base_client_port=free_port_block(3),
                              base_internode_port=free_port_block(3),
                              config_overrides=ringkv_overrides)
        try:
            if etcd is not None:
                etcd.up()
            ringkv.up()
            yield etcd, ringkv
        finally:
            try:
                ringkv.down()
            finally:
                if etcd is not None:
                    etcd.down()


async def _preload(urls: list[str], key_count: int,
                   make_request: Callable[[str, str], bytes]) -> int:
    """Write key0..key{key_count-1} once each over ``PRELOAD_CONCURRENCY`` connections spread
    over ``urls``; the number of writes that did not answer 200."""
    keys = iter(range(key_count))
    failed = 0

    async def worker(index: int) -> None:
        nonlocal failed
        target = _Target.parse(urls[index % len(urls)])
        conn = _Connection(target)
        try:
            for n in keys:
                if await conn.request(make_request(target.host_header, f"key{n}")) != 200:
                    failed += 1
        finally:
            conn.close()

    await asyncio.gather(*(worker(i) for i in range(PRELOAD_CONCURRENCY)))
    return failed


async def _etcd_reads_back(urls: list[str], key: str, value: bytes) -> list[str]:
    """What is wrong with a linearizable read of ``key`` through each member (empty: none)."""
    wrong = []
    for url in urls:
        target = _Target.parse(url)
        conn = _Connection(target)
        try:
            status, body = await conn.exchange(etcd_range_request(target.host_header, key))
        finally:
            conn.close()
        problem = ""
        try:
            got = etcd_range_value(body) if status == 200 else None
        except ValueError as exc:
            got, problem = None, f" ({exc})"
        if got != value:
            wrong.append(f"{url}: status {status}{problem}, value {got!r}")
    return wrong


def preload_etcd(urls: list[str], key_count: int, value: bytes) -> None:
    failed = asyncio.run(_preload(
        urls, key_count, lambda host, key: etcd_put_request(host, key, value)))
    wrong = asyncio.run(_etcd_reads_back(urls, "key0", value))
    if failed or wrong:
        raise RuntimeError(f"etcd preload: {failed} puts failed; read-back: {wrong}")


def preload_ringkv(urls: list[str], key_count: int, value: object) -> None:
    # At ALL: every replica holds every key, so no read meets a missing or stale replica.
    failed = asyncio.run(_preload(
        urls, key_count, lambda host, key: ringkv_put_request(host, key, value, "ALL")))
    wrong = []
    for url in urls:
        status, body = http("GET", f"{url}/v1/kv/default/key0?consistency=QUORUM")
        if status != 200 or not isinstance(body, dict) or body.get("value") != value:
            wrong.append(f"{url}: status {status}")
    if failed or wrong:
        raise RuntimeError(f"ringkv preload: {failed} puts failed; read-back: {wrong}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench etcd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of (put, get) phases, systems alternating")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--keys", type=int, default=10_000, help="key space (all preloaded)")
    parser.add_argument("--value-size", type=int, default=100, help="value bytes")
    parser.add_argument("--etcd-bin", default=None, help="the etcd binary (default: etcd on PATH)")
    parser.add_argument("--commit-sync", choices=("periodic", "batch"), default="periodic",
                        help="ringkv's storage.commit_sync (etcd always fsyncs before answering)")
    parser.add_argument("--out", type=Path, default=RESULTS / "etcd.json", help="JSON results")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.keys < 1 or args.value_size < 1 or args.concurrency < 1:
        raise SystemExit("--rounds, --keys, --value-size and --concurrency must be at least 1")

    binary = find_etcd(args.etcd_bin)
    if binary is None:
        where = args.etcd_bin if args.etcd_bin else "etcd on PATH"
        print(f"no etcd binary ({where}): install it with `{APT_HINT}`; "
              f"running the ringkv phases alone", flush=True)
    value = "x" * args.value_size
    results: list[LoadResult] = []
    rounds: dict[int, int] = {}  # id(result) -> its round, for the table
    leading: tuple[tuple[str, str, Callable[[LoadResult], object]], ...] = (
        ("round", "<6", lambda r: rounds[id(r)]),
        ("system", "<22", lambda r: r.label),
        ("op", "<5", lambda r: r.op),
    )
    with side_by_side(binary, "ringkv-bench-etcd-",
                      {"storage.commit_sync": args.commit_sync}) as (etcd, ringkv):
        if etcd is not None:
            preload_etcd(etcd.urls(), args.keys, value.encode())
        ringkv_urls = ringkv.endpoints()
        ringkv_pids = ringkv_node_pids(ringkv)
        preload_ringkv(ringkv_urls, args.keys, value)
        print(format_table([], leading), flush=True)
        for round_no in range(1, args.rounds + 1):
            for op in ("put", "get"):
                phases: list[tuple[str, list[str], list[int], str]] = []
                if etcd is not None:
                    phases.append((ETCD, etcd.urls(), etcd.pids(), "etcd"))
                phases.append((RINGKV_HTTP, ringkv_urls, ringkv_pids, "http"))
                phases.append((RINGKV_NATIVE, ringkv_urls, ringkv_pids, "native"))
                for label, urls, pids, protocol in phases:
                    result = run_load(
                        label, urls, RINGKV_PATH, op=op, concurrency=args.concurrency,
                        duration_s=args.duration, key_count=args.keys, value=value,
                        protocol=protocol, node_pids=pids,
                        consistency=None if protocol == "etcd" else "QUORUM")
                    rounds[id(result)] = round_no
                    results.append(result)
                    print(format_row(result, leading), flush=True)
    print()
    print(format_table(results, leading))
    print()
    ratios, lines = target_ratios(results)
    for line in lines:
        print(line)
    if etcd is None:
        print(f"no ratios: etcd did not run (`{APT_HINT}`)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "duration_s": args.duration, "rounds": args.rounds, "concurrency": args.concurrency,
        "keys": args.keys, "value_bytes": args.value_size, "commit_sync": args.commit_sync,
        "etcd": {"binary": binary, "version": etcd_version(binary)} if binary else None,
        "targets": {"put": PUT_TARGET, "get": GET_TARGET},
        "results": [{"round": rounds[id(r)],
                     "system": ETCD if r.label == ETCD else "ringkv", **r.to_json()}
                    for r in results],
        "ratios": ratios}, indent=2))
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
