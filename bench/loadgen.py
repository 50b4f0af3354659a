"""A closed-loop HTTP load generator that runs in its own process.

Each of ``concurrency`` workers keeps one request in flight on its own
keep-alive connection. Latencies are recorded per request; the generator also
reports its own CPU use, so a saturated client shows up in the results rather
than silently capping the server's numbers.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import resource
import time
from dataclasses import asdict, dataclass

import aiohttp


@dataclass
class LoadResult:
    label: str
    op: str
    concurrency: int
    ops: int
    errors: int
    duration_s: float
    ops_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    client_cpu_pct: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(round(pct / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _run(
    base_url: str | list[str], path_template: str, op: str, concurrency: int, duration_s: float,
    key_count: int, value: object, seed: int,
) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    body = json.dumps({"value": value}).encode()
    headers = {"Content-Type": "application/json"}
    deadline = time.perf_counter() + duration_s
    rng = random.Random(seed)
    # Several base URLs spread the load over a cluster's coordinators.
    base_urls = [base_url] if isinstance(base_url, str) else list(base_url)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            url = rng.choice(base_urls) + path_template.format(
                key=f"key{rng.randrange(key_count)}"
            )
            started = time.perf_counter()
            try:
                if op == "put":
                    async with session.put(url, data=body, headers=headers) as response:
                        await response.read()
                        ok = response.status == 200
                else:
                    async with session.get(url) as response:
                        await response.read()
                        ok = response.status in (200, 404)
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed


def _child(conn, kwargs: dict[str, object]) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    latencies, errors, elapsed = asyncio.run(_run(**kwargs))  # type: ignore[arg-type]
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    conn.send((latencies, errors, elapsed, cpu_s))
    conn.close()


def run_load(
    label: str, base_url: str | list[str], path_template: str, *, op: str, concurrency: int,
    duration_s: float, key_count: int = 10_000, value: object = "x" * 100, seed: int = 1,
) -> LoadResult:
    """Run one load phase in a separate process and summarise it."""
    parent, child = multiprocessing.Pipe(duplex=False)
    kwargs = dict(base_url=base_url, path_template=path_template, op=op, concurrency=concurrency,
                  duration_s=duration_s, key_count=key_count, value=value, seed=seed)
    process = multiprocessing.get_context("spawn").Process(target=_child, args=(child, kwargs))
    process.start()
    try:
        if not parent.poll(duration_s + 60):
            raise RuntimeError(f"load generator for {label} did not report in time")
        latencies, errors, elapsed, cpu_s = parent.recv()
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    ordered = sorted(latencies)
    ms = [value * 1000 for value in ordered]
    return LoadResult(
        label=label, op=op, concurrency=concurrency, ops=len(ordered), errors=errors,
        duration_s=round(elapsed, 2), ops_per_s=round(len(ordered) / elapsed, 1),
        p50_ms=round(percentile(ms, 50), 3), p95_ms=round(percentile(ms, 95), 3),
        p99_ms=round(percentile(ms, 99), 3), max_ms=round(ms[-1] if ms else 0.0, 3),
        client_cpu_pct=round(100 * cpu_s / elapsed, 1),
    )


def format_table(results: list[LoadResult]) -> str:
    header = f"{'target':<14}{'op':<5}{'conc':>5}{'ops/s':>10}{'p50 ms':>9}{'p95 ms':>9}" \
             f"{'p99 ms':>9}{'max ms':>9}{'errors':>8}{'client cpu':>12}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.label:<14}{r.op:<5}{r.concurrency:>5}{r.ops_per_s:>10.0f}{r.p50_ms:>9.2f}"
            f"{r.p95_ms:>9.2f}{r.p99_ms:>9.2f}{r.max_ms:>9.1f}{r.errors:>8}"
            f"{r.client_cpu_pct:>11.0f}%"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - manual use
    print(os.getpid())
