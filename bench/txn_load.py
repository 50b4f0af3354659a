"""A lean load generator for the transactional tier, in its own processes.

The asyncio client (``ringkv.client.AsyncClient`` over aiohttp) spends about
170 µs of CPU on each request: on a 2-core machine, at a few thousand
requests a second, that is most of a core taken from the nodes under test.
Like ``bench/loadgen.py``'s plain-HTTP phases (and wrk), this writes
prebuilt HTTP/1.1 requests on keep-alive connections and reads back only the
status, Content-Length and body; it parses JSON only where the operation
needs the answer (a CAS needs its new version, a commit its receipt).

It routes as the client does: a write goes to the leader the last receipt
named for its key (any node forwards to the leader otherwise), and a
snapshot read goes to a random node (any replica whose safe time has passed
serves it). Each child runs ``concurrency`` closed-loop workers on uvloop
when it is installed, and reports its latencies, commit waits, errors and
its own CPU time.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import time
from typing import Any

from bench import proc_cpu
from bench.loadgen import _Connection, _Target
from ringkv.ring import token_for
from ringkv.txn.ranges import slice_of

KEYSPACE = "txn"
RANGES = 4  # the bench keyspace's ``ranges``: txn2 and ro2 touch two of them
STALENESS_MS = 1000
PHASES = ("cas", "txn", "txn2", "ro2", "snapshot")


def key_pair(prefix: str, *, same_range: bool) -> tuple[str, str]:
    """Two keys in one range (``same_range``) or in two different ranges."""
    a = f"{prefix}-a"
    home = slice_of(token_for(a.encode()), RANGES)
    for i in range(10_000):
        b = f"{prefix}-b{i}"
        if (slice_of(token_for(b.encode()), RANGES) == home) == same_range:
            return a, b
    raise AssertionError("no key pair found")


class _Worker:
    """One closed loop: a connection per node, and where it last found its keys' leader."""

    def __init__(self, targets: list[_Target], leaders: dict[str, int], rng: random.Random) -> None:
        self.targets = targets
        self.leaders = leaders  # node id -> index into targets
        self.rng = rng
        self.conns: dict[int, _Connection] = {}
        self.leader_index: int | None = None

    def conn(self, index: int) -> _Connection:
        conn = self.conns.get(index)
        if conn is None:
            conn = self.conns[index] = _Connection(self.targets[index])
        return conn

    def write_target(self) -> int:
        if self.leader_index is None:
            return self.rng.randrange(len(self.targets))
        return self.leader_index

    def note_receipt(self, receipt: Any) -> float:
        """Remember the leader a commit's receipt names; its commit wait in ms."""
        if not isinstance(receipt, dict):
            return 0.0
        self.leader_index = self.leaders.get(receipt.get("leader", ""), self.leader_index)
        return float(receipt.get("commit_wait_ms", 0.0))

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


def _request(method: str, target: _Target, path: str, body: bytes | None = None) -> bytes:
    head = f"{method} {target.prefix}{path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
    if body is None:
        return (head + "\r\n").encode()
    return (head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def _run(phase: str, urls: list[str], leaders: dict[str, int], concurrency: int,
               duration_s: float, keys: int, seed: int) -> dict[str, Any]:
    targets = [_Target.parse(url) for url in urls]
    latencies: list[float] = []
    waits: list[float] = []
    errors: list[str] = []
    stop_at = time.monotonic() + duration_s

    async def cas(w: _Worker, index: int) -> None:
        key = f"cas-{seed}-{index}"
        value, version = 0, 0
        while time.monotonic() < stop_at:
            body = {"value": value + 1, "if": {"version": version}} if version else {"value": 0}
            at = w.write_target()
            data = _request("PUT", targets[at], f"/v1/kv/{KEYSPACE}/{key}", json.dumps(body).encode())
            started = time.perf_counter()
            status, raw = await w.conn(at).exchange(data)
            elapsed = time.perf_counter() - started
            if status != 200:
                errors.append(f"{status} {raw[:160]!r}")
                w.leader_index = None
                if status == 409:  # another attempt of ours committed: take its version
                    detail = json.loads(raw).get("error", {})
                    value, version = detail.get("current_value") or 0, detail.get("current_version") or 0
                continue
            answer = json.loads(raw)
            value, version = (value + 1 if version else 0), answer["version"]
            latencies.append(elapsed)
            waits.append(w.note_receipt(answer.get("receipt")))

    async def txn(w: _Worker, index: int) -> None:
        await one_shot(w, index, *key_pair(f"t-{seed}-{index}", same_range=True))

    async def txn2(w: _Worker, index: int) -> None:
        await one_shot(w, index, *key_pair(f"t2-{seed}-{index}", same_range=False))

    async def ro2(w: _Worker, index: int) -> None:
        # Reads only: a lock-free snapshot of both keys at TT.now().latest.
        a, b = key_pair(f"t2-{seed}-{index}", same_range=False)
        body = json.dumps({"keyspace": KEYSPACE, "reads": [a, b]}).encode()
        prebuilt = [_request("POST", t, "/v1/txn", body) for t in targets]
        while time.monotonic() < stop_at:
            at = w.rng.randrange(len(targets))
            started = time.perf_counter()
            status, raw = await w.conn(at).exchange(prebuilt[at])
            elapsed = time.perf_counter() - started
            if status != 200:
                errors.append(f"{status} {raw[:160]!r}")
                continue
            latencies.append(elapsed)

    async def one_shot(w: _Worker, index: int, a: str, b: str) -> None:
        while time.monotonic() < stop_at:
            body = {"keyspace": KEYSPACE, "reads": [a],
                    "writes": [{"op": "put", "key": a, "value": w.rng.random()},
                               {"op": "put", "key": b, "value": index}]}
            at = w.write_target()
            data = _request("POST", targets[at], "/v1/txn", json.dumps(body).encode())
            started = time.perf_counter()
            status, raw = await w.conn(at).exchange(data)
            elapsed = time.perf_counter() - started
            if status != 200:
                errors.append(f"{status} {raw[:160]!r}")
                w.leader_index = None
                continue
            latencies.append(elapsed)
            waits.append(w.note_receipt(json.loads(raw).get("receipt")))

    # Prebuilt: one request per (node, key); a snapshot read only picks one.
    suffix = f"?max_staleness_ms={STALENESS_MS}"
    requests = [[_request("GET", t, f"/v1/kv/{KEYSPACE}/k-{k}{suffix}") for k in range(keys)]
                for t in targets] if phase == "snapshot" else []

    async def snapshot(w: _Worker, index: int) -> None:
        while time.monotonic() < stop_at:
            at = w.rng.randrange(len(targets))
            data = requests[at][w.rng.randrange(keys)]
            started = time.perf_counter()
            status, raw = await w.conn(at).exchange(data)
            elapsed = time.perf_counter() - started
            if status != 200:
                errors.append(f"{status} {raw[:160]!r}")
                continue
            latencies.append(elapsed)

    op = {"cas": cas, "txn": txn, "txn2": txn2, "ro2": ro2, "snapshot": snapshot}[phase]
    workers = [_Worker(targets, leaders, random.Random(seed * 100_003 + i))
               for i in range(concurrency)]
    try:
        await asyncio.gather(*(op(w, i) for i, w in enumerate(workers)))
    finally:
        for w in workers:
            w.close()
    return {"latencies_s": latencies, "waits_ms": waits, "errors": errors}


def _child(conn: Any, kwargs: dict[str, Any]) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    conn.recv()  # the parent's go: every child has started and imported
    before_s = proc_cpu.own_cpu_s()
    result = asyncio.run(_run(**kwargs))
    result["cpu_s"] = proc_cpu.own_cpu_s() - before_s
    conn.send(result)
    conn.close()


class Generators:
    """``procs`` child processes, started (and imported) before the phase's clock starts."""

    def __init__(self, phase: str, urls: list[str], leaders: dict[str, int], *, procs: int,
                 concurrency: int, duration_s: float, keys: int) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}")
        context = multiprocessing.get_context("spawn")
        self.duration_s = duration_s
        self.children = []
        per_proc = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
        for i, count in enumerate(per_proc):
            parent, child = context.Pipe()
            kwargs = dict(phase=phase, urls=urls, leaders=leaders, concurrency=count,
                          duration_s=duration_s, keys=keys, seed=i + 1)
            process = context.Process(target=_child, args=(child, kwargs), daemon=True)
            process.start()
            child.close()
            self.children.append((process, parent))

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self.children if process.pid is not None]

    def go(self) -> None:
        for _, parent in self.children:
            parent.send("go")

    def results(self) -> dict[str, Any]:
        """Every child's results merged; waits for them (bounded)."""
        # cpu_s: each child's own CPU over its run, one entry per process.
        merged: dict[str, Any] = {"latencies_s": [], "waits_ms": [], "errors": [], "cpu_s": []}
        try:
            for process, parent in self.children:
                if not parent.poll(self.duration_s + 60):
                    raise RuntimeError(f"load generator {process.pid} did not report in time")
                result = parent.recv()
                for name in ("latencies_s", "waits_ms", "errors"):
                    merged[name] += result[name]
                merged["cpu_s"].append(result["cpu_s"])
        finally:
            self.stop()
        return merged

    def stop(self) -> None:
        for process, _ in self.children:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
