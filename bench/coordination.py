"""Coordination against etcd (issue #17): watch event latency and lock acquisitions per second.

    python -m bench coordination [--watch-events 500] [--watch-rate 50] [--burst-events 200]
                                 [--lock-duration 10] [--contenders 1,4] [--etcd-bin PATH]
                                 [--ranges 4] [--commit-sync periodic|batch]
                                 [--watch-protocol http|native]

The same two clusters as ``bench etcd`` (bench/etcd.py's ``side_by_side``): a
3-member etcd and a 3-node RF=3 ringkv cluster on 127.0.0.1, the ringkv
keyspace ``txn`` transactional over ``--ranges`` ranges (4, as ``bench txn``). Phases alternate
between the systems, etcd first.

**Watch latency.** A writer commits one key after another under a prefix, a
watcher on the whole prefix records when each event reaches it; both are
threads of this process and read one monotonic clock. The latency of an
event is its delivery time minus the time the writer *sent* the put: the
commit, then the delivery. From the put's *acknowledgment* instead (the
``after ack`` figures, ``ack_*`` in the JSON) it is a lower bound of commit
to delivery, and negative on etcd, whose watchers hear of a put as it is
applied, before its answer reaches the writer. Two phases: ``paced`` (``--watch-rate`` puts a
second: the latency of a quiet system) and ``burst`` (back to back: how the
watch keeps up). ringkv: ``Client.put`` on ``txn`` and ``Client.watch(txn,
prefix, prefix=True)``, whose node polls its ranges as a commit is applied there
(else every ``txn.watch_poll_ms``, 50 ms by default; a range with nothing
written since the last poll answers without a read; the polls of one range are
shared by every watch the node serves); etcd:
``POST /v3/kv/put`` and a streaming ``POST /v3/watch`` with a
``create_request`` for the prefix (key and range_end), both through the v3
JSON gateway. Each watch starts at a marker write made just before the
phase (from its version or revision), so no event is lost to the watch's
connection time. events/s: events delivered over the time from the first
send to the last delivery. ``--watch-protocol``: the ringkv watcher's protocol
(``http``, the NDJSON stream, or ``native``, the binary protocol's watch
frames); the writer uses HTTP either way.

**Lock acquisitions per second.** ``C`` contenders (threads, one client
each) loop for ``--lock-duration`` s: acquire one lock, a fenced no-op,
release. The no-op hands the fencing token to a shared fence that accepts
only tokens above the last one it accepted and counts holders at once: both
must stay clean (tokens strictly increasing, never two holders). Reported:
acquisitions/s and the acquire latency (p50/p99/max). ringkv:
``Client.lock`` (ringkv/client/recipes.py: on the client's own session, one lease
kept alive in the background; per acquisition one transaction that creates the
contender's key on that lease and appends it to the lock's queue, a watch of the
contender ahead while waiting, and a delete of the key to release). etcd:
its lock service through the gateway, ``POST /v3/lock/lock`` with a lease
from ``POST /v3/lease/grant`` (one per contender), then
``POST /v3/lock/unlock``; the fencing token is the revision in the lock
answer's header (at or above the lock key's create revision, and above the
previous holder's unlock: strictly increasing).

Each phase also reports the server processes' CPU per operation (event or
acquisition) from /proc, as ``bench etcd`` does. Without an etcd binary only
the ringkv phases run, and the report says why.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import itertools
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import proc_cpu
from bench.etcd import (
    APT_HINT,
    etcd_put_body,
    etcd_version,
    find_etcd,
    ringkv_node_pids,
    side_by_side,
)
from bench.loadgen import percentile
from bench.txn import wait_ready
from bench.txn_load import RANGES
from ringkv.client import Client
from ringkv.client.recipes import LockLost
from ringkv.errors import RingKVError

RESULTS = Path(__file__).resolve().parent / "results"
KEYSPACE = "txn"
ETCD = "etcd"
RINGKV = "ringkv"
LOCK_NAME = "bench-lock"
LEASE_TTL_S = 60  # longer than any phase: no keepalive is needed mid-phase on either system
HTTP_TIMEOUT_S = 30.0
WATCH_DRAIN_S = 30.0  # after the last put, how long the watcher may take to see the rest
WARM_KEYS_PER_RANGE = 4  # first writes under each prefix: every range has a leader before timing


# --- figures (pure) ---

def latency_stats(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of ``latencies_s``, in ms (0.0 each when there are none)."""
    ordered = sorted(1000 * x for x in latencies_s)
    return {"p50_ms": round(percentile(ordered, 50), 3),
            "p99_ms": round(percentile(ordered, 99), 3),
            "max_ms": round(ordered[-1], 3) if ordered else 0.0}


def watch_figures(sent_s: dict[int, float], acked_s: dict[int, float],
                  delivered_s: dict[int, float]) -> dict[str, Any]:
    """A watch phase's figures from when each put ``i`` was sent, acknowledged and delivered
    (one monotonic clock): latency from the send (``p50_ms``...: the commit itself, then the
    delivery), from the acknowledgment (``ack_p50_ms``...: negative when the event overtook
    the put's answer), events delivered, puts acknowledged but never delivered
    (``missing``), and events/s over the first send to the last delivery."""
    delivered = [i for i in acked_s if i in delivered_s]
    figures: dict[str, Any] = latency_stats([delivered_s[i] - sent_s[i] for i in delivered])
    after_ack = latency_stats([delivered_s[i] - acked_s[i] for i in delivered])
    figures.update({f"ack_{name}": value for name, value in after_ack.items()})
    span_s = (max(delivered_s[i] for i in delivered) - min(sent_s.values())) if delivered else 0.0
    figures.update({"ops": len(delivered), "missing": len(acked_s) - len(delivered),
                    "ops_per_s": round(len(delivered) / span_s, 1) if span_s > 0 else 0.0})
    return figures


class Fence:
    """The resource a lock protects: it takes a holder's fencing token and accepts it only
    above the last one it accepted (what a storage service fenced by the lock would do), and
    counts holders inside at once. ``stale`` and ``overlaps`` must stay 0."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self.last_token: int | None = None
        self.tokens: list[int] = []
        self.stale = 0
        self.overlaps = 0
        self._inside = 0

    def enter(self, token: int) -> None:
        with self._mutex:
            self._inside += 1
            if self._inside > 1:
                self.overlaps += 1
            if self.last_token is not None and token <= self.last_token:
                self.stale += 1
            else:
                self.last_token = token
            self.tokens.append(token)

    def leave(self) -> None:
        with self._mutex:
            self._inside -= 1


def strictly_increasing(tokens: Sequence[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(tokens))


def lock_figures(acquire_s: Sequence[float], elapsed_s: float, fence: Fence) -> dict[str, Any]:
    figures: dict[str, Any] = latency_stats(acquire_s)
    figures.update({
        "ops": len(acquire_s),
        "ops_per_s": round(len(acquire_s) / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "tokens_increasing": fence.stale == 0 and strictly_increasing(fence.tokens),
        "stale_tokens": fence.stale, "overlaps": fence.overlaps})
    return figures


def compare(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """ringkv against etcd, phase by phase: for a watch phase the latency ratios (ringkv's
    over etcd's: lower is better), for a lock phase acquisitions/s (ringkv's over etcd's:
    higher is better); for both, operations per server CPU-second, ringkv's over etcd's.
    Nothing for a phase that one system did not run."""
    out: list[dict[str, Any]] = []
    lines: list[str] = []
    by_key = {(r["phase"], r["system"]): r for r in records}
    for phase in dict.fromkeys(r["phase"] for r in records):
        ours, base = by_key.get((phase, RINGKV)), by_key.get((phase, ETCD))
        if ours is None or base is None:
            continue
        rec: dict[str, Any] = {"phase": phase}
        if ours["kind"] == "watch":
            for name in ("p50_ms", "p99_ms"):
                rec[f"{name}_ratio"] = round(ours[name] / base[name], 2) if base[name] else None
            text = (f"{phase:<20} put to delivery p50 {ours['p50_ms']:.1f} vs "
                    f"{base['p50_ms']:.1f} ms ({_x(rec['p50_ms_ratio'])}), p99 "
                    f"{ours['p99_ms']:.1f} vs {base['p99_ms']:.1f} ms ({_x(rec['p99_ms_ratio'])}); "
                    f"after the put's answer p50 {ours['ack_p50_ms']:.1f} vs "
                    f"{base['ack_p50_ms']:.1f} ms")
        else:
            rec["ops_ratio"] = (round(ours["ops_per_s"] / base["ops_per_s"], 2)
                                if base["ops_per_s"] else None)
            text = (f"{phase:<20} acquisitions/s {ours['ops_per_s']:,.1f} vs "
                    f"{base['ops_per_s']:,.1f} ({_x(rec['ops_ratio'])}), acquire p50 "
                    f"{ours['p50_ms']:.1f} vs {base['p50_ms']:.1f} ms")
        ours_cpu, base_cpu = ours["server_cpu_us_per_op"], base["server_cpu_us_per_op"]
        if ours_cpu and base_cpu:
            rec["cpu_ratio"] = round(base_cpu / ours_cpu, 2)
            text += (f"; server CPU/op {ours_cpu:,.0f} vs {base_cpu:,.0f} us, "
                     f"ops per CPU-second {rec['cpu_ratio']:.2f}x")
        out.append(rec)
        lines.append(text)
    return out, lines


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


HEADER = (f"{'phase':<20} {'system':<7} {'ops':>6} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'CPU µs/op':>10} {'errors':>6}  checks")


def format_row(r: dict[str, Any]) -> str:
    if r["kind"] == "watch":
        checks = (f"after ack p50 {r['ack_p50_ms']:.2f} p99 {r['ack_p99_ms']:.2f} ms, "
                  f"missing {r['missing']}")
    else:
        checks = ("tokens increasing" if r["tokens_increasing"] else "TOKENS NOT INCREASING") + \
            ("" if not r["overlaps"] else f", {r['overlaps']} OVERLAPS")
    cpu = r["server_cpu_us_per_op"]
    return (f"{r['phase']:<20} {r['system']:<7} {r['ops']:>6} {r['ops_per_s']:>8.1f} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} "
            f"{'-' if cpu is None else f'{cpu:,.0f}':>10} {r['errors']:>6}  {checks}")


def format_table(records: Sequence[dict[str, Any]]) -> str:
    return "\n".join([HEADER, *(format_row(r) for r in records)])


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range_end for every key starting with ``prefix``: the prefix with its last
    byte below 0xff incremented (etcd's clientv3.GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _key_index(key: str, prefix: str) -> int | None:
    tail = key[len(prefix):]
    return int(tail) if tail.isdigit() else None


# --- watch phases (shell) ---

@dataclass
class WatchRun:
    """What one watch phase saw; the watcher thread fills ``delivered_s``."""

    sent_s: dict[int, float] = field(default_factory=dict)
    acked_s: dict[int, float] = field(default_factory=dict)
    delivered_s: dict[int, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


def _write_all(run: WatchRun, count: int, rate_per_s: float | None,
               put: Callable[[int], None]) -> None:
    """Put 0..count-1, paced at ``rate_per_s`` (None: back to back), timing each."""
    start_s = time.monotonic()
    for i in range(count):
        if rate_per_s is not None:
            pause_s = start_s + i / rate_per_s - time.monotonic()
            if pause_s > 0:
                time.sleep(pause_s)
        run.sent_s[i] = time.monotonic()
        try:
            put(i)
        except (RingKVError, OSError, http.client.HTTPException, ValueError) as exc:
            run.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            continue
        run.acked_s[i] = time.monotonic()


def _finish(run: WatchRun, watcher: threading.Thread, count: int) -> None:
    """Wait for the watcher to see the stop marker (bounded), then give up on the rest."""
    if not run.done.wait(WATCH_DRAIN_S):
        run.errors.append(f"the watcher saw {len(run.delivered_s)} of {count} events "
                          f"within {WATCH_DRAIN_S:.0f} s of the last put")
    watcher.join(timeout=1.0)


def ringkv_watch(urls: list[str], prefix: str, count: int,
                 rate_per_s: float | None, protocol: str = "http") -> WatchRun:
    run = WatchRun()
    with Client(urls, keyspace=KEYSPACE, protocol="http", timeout_s=HTTP_TIMEOUT_S) as kv:
        start_version = kv.put(f"{prefix}start", 0).version
        if start_version is None:
            raise RuntimeError(f"{KEYSPACE} answered a put without a version: not transactional?")

        def watcher() -> None:
            with Client(urls, keyspace=KEYSPACE, protocol=protocol) as watching:
                watching.refresh_ring()  # the nodes' native addresses come with the ring
                # From just before the marker: the watch sees it, and everything after.
                for event in watching.watch(KEYSPACE, prefix, prefix=True,
                                            from_version=start_version - 1):
                    now_s = time.monotonic()
                    index = _key_index(event.key, prefix)
                    if index is not None:
                        run.delivered_s.setdefault(index, now_s)
                    elif event.key == f"{prefix}start":
                        run.ready.set()
                    elif event.key == f"{prefix}stop":
                        run.done.set()
                        return

        thread = threading.Thread(target=watcher, name="ringkv-watcher", daemon=True)
        thread.start()
        if not run.ready.wait(HTTP_TIMEOUT_S):
            raise RuntimeError("the ringkv watch did not start")

        def put(i: int) -> None:
            kv.put(f"{prefix}{i:06d}", i)

        _write_all(run, count, rate_per_s, put)
        kv.put(f"{prefix}stop", 0)
        _finish(run, thread, count)
    return run


def _etcd_post(conn: http.client.HTTPConnection, path: str, body: dict[str, Any] | bytes
               ) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = json.loads(response.read())
    if response.status != 200 or not isinstance(answer, dict) or "error" in answer:
        raise ValueError(f"etcd {path}: {response.status} {str(answer)[:200]}")
    return answer


def _connect(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT_S)


def etcd_watch(urls: list[str], prefix: str, count: int, rate_per_s: float | None) -> WatchRun:
    run = WatchRun()
    writer = _connect(urls[0])
    watch_conn = _connect(urls[1 % len(urls)])  # the watcher on another member, as it may be
    try:
        marker = _etcd_post(writer, "/v3/kv/put", etcd_put_body(f"{prefix}start", b"0"))
        start_revision = int(marker["header"]["revision"])

        def watcher() -> None:
            body = json.dumps({"create_request": {
                "key": _b64(prefix.encode()), "range_end": _b64(prefix_range_end(prefix.encode())),
                "start_revision": str(start_revision)}}).encode()
            try:
                watch_conn.request("POST", "/v3/watch", body=body,
                                   headers={"Content-Type": "application/json"})
                response = watch_conn.getresponse()
                for _ in range(10 * count + 100):  # bounded: events come a few to a line
                    line = response.readline()
                    if not line:
                        return
                    now_s = time.monotonic()
                    for event in json.loads(line).get("result", {}).get("events", []):
                        key = base64.b64decode(event["kv"]["key"]).decode()
                        index = _key_index(key, prefix)
                        if index is not None:
                            run.delivered_s.setdefault(index, now_s)
                        elif key == f"{prefix}start":
                            run.ready.set()
                        elif key == f"{prefix}stop":
                            run.done.set()
                            return
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if not run.done.is_set():
                    run.errors.append(f"watch: {type(exc).__name__}: {exc}"[:200])

        thread = threading.Thread(target=watcher, name="etcd-watcher", daemon=True)
        thread.start()
        if not run.ready.wait(HTTP_TIMEOUT_S):
            raise RuntimeError(f"the etcd watch did not start: {run.errors}")

        def put(i: int) -> None:
            _etcd_post(writer, "/v3/kv/put", etcd_put_body(f"{prefix}{i:06d}", str(i).encode()))

        _write_all(run, count, rate_per_s, put)
        _etcd_post(writer, "/v3/kv/put", etcd_put_body(f"{prefix}stop", b"0"))
        _finish(run, thread, count)
    finally:
        writer.close()
        watch_conn.close()  # ends the stream, and the watcher thread with it
    return run


# --- lock phases (shell) ---

Holder = Callable[[], AbstractContextManager[int]]  # enter: the lock is held; its fencing token


def run_contenders(holders: Sequence[Holder], duration_s: float,
                   fence: Fence) -> tuple[list[float], list[str], float]:
    """Each holder in its own thread: acquire, a fenced no-op, release, until ``duration_s``
    is over. The acquire latencies, the errors, and the elapsed time."""
    acquire_s: list[float] = []
    errors: list[str] = []
    start_s = time.monotonic()
    stop_at_s = start_s + duration_s

    def contend(hold: Holder) -> None:
        while time.monotonic() < stop_at_s:
            began_s = time.monotonic()
            try:
                with hold() as token:
                    acquire_s.append(time.monotonic() - began_s)
                    fence.enter(token)  # the fenced no-op
                    fence.leave()
            except (RingKVError, LockLost, OSError, http.client.HTTPException,
                    ValueError) as exc:  # LockTimeout is an OSError (a TimeoutError)
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    threads = [threading.Thread(target=contend, args=(h,), daemon=True) for h in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration_s + HTTP_TIMEOUT_S)
    if any(thread.is_alive() for thread in threads):
        errors.append("a contender did not finish its last acquisition in time")
    return acquire_s, errors, time.monotonic() - start_s


def ringkv_holders(urls: list[str], contenders: int, name: str
                   ) -> tuple[list[Holder], Callable[[], None]]:
    """One client per contender, each taking ``Client.lock`` in turn; the holders and what
    closes the clients."""
    clients = [Client(urls, keyspace=KEYSPACE, protocol="http", timeout_s=HTTP_TIMEOUT_S)
               for _ in range(contenders)]

    def holder(kv: Client) -> Holder:
        @contextmanager
        def hold() -> Iterator[int]:
            with kv.lock(name, keyspace=KEYSPACE, timeout_s=HTTP_TIMEOUT_S) as held:
                yield held.fencing_token
        return hold

    def close() -> None:
        for kv in clients:
            kv.close()

    return [holder(kv) for kv in clients], close


class EtcdLock:
    """One contender of etcd's lock service through the gateway, on a lease of its own."""

    def __init__(self, url: str, name: str) -> None:
        self.conn = _connect(url)
        self.name = _b64(name.encode())
        self.lease_id = _etcd_post(self.conn, "/v3/lease/grant", {"TTL": LEASE_TTL_S})["ID"]

    @contextmanager
    def hold(self) -> Iterator[int]:
        answer = _etcd_post(self.conn, "/v3/lock/lock", {"name": self.name,
                                                          "lease": self.lease_id})
        try:
            yield int(answer["header"]["revision"])
        finally:
            _etcd_post(self.conn, "/v3/lock/unlock", {"key": answer["key"]})

    def close(self) -> None:
        try:
            _etcd_post(self.conn, "/v3/lease/revoke", {"ID": self.lease_id})
        finally:
            self.conn.close()


# --- phases ---

@dataclass(frozen=True)
class Phase:
    name: str
    kind: str  # "watch" or "lock"
    count: int = 0  # watch: puts
    rate_per_s: float | None = None  # watch: None = back to back
    contenders: int = 0  # lock


def phases_of(args: argparse.Namespace) -> list[Phase]:
    return [Phase(f"watch paced {args.watch_rate:g}/s", "watch", args.watch_events,
                  args.watch_rate),
            Phase("watch burst", "watch", args.burst_events),
            *(Phase(f"lock C={c}", "lock", contenders=c) for c in args.contenders)]


def run_phase(phase: Phase, system: str, urls: list[str], pids: list[int], index: int,
              lock_duration_s: float, watch_protocol: str = "http") -> dict[str, Any]:
    base: dict[str, Any] = {"phase": phase.name, "system": system, "kind": phase.kind}
    with proc_cpu.PhaseMeter(pids, in_process_gen=True) as meter:
        if phase.kind == "watch":
            prefix = f"watch{index}/"
            if system == ETCD:
                run = etcd_watch(urls, prefix, phase.count, phase.rate_per_s)
            else:
                run = ringkv_watch(urls, prefix, phase.count, phase.rate_per_s, watch_protocol)
                base["protocol"] = f"watch over {watch_protocol}"
            figures = watch_figures(run.sent_s, run.acked_s, run.delivered_s)
            errors = run.errors
        else:
            name = f"{LOCK_NAME}-{index}"
            if system == ETCD:
                etcd_locks = [EtcdLock(urls[i % len(urls)], name)
                              for i in range(phase.contenders)]
                holders: list[Holder] = [lock.hold for lock in etcd_locks]
                base["protocol"] = "etcd v3lock (gateway)"

                def close() -> None:
                    for lock in etcd_locks:
                        lock.close()
            else:
                holders, close = ringkv_holders(urls, phase.contenders, name)
                base["protocol"] = "Client.lock"
            try:
                fence = Fence()
                acquire_s, errors, elapsed_s = run_contenders(holders, lock_duration_s, fence)
            finally:
                close()
            figures = lock_figures(acquire_s, elapsed_s, fence)
    cpu = meter.result(figures["ops"])
    return {**base, **figures, "errors": len(errors), "first_errors": sorted(set(errors))[:3],
            "server_cpu_us_per_op": cpu.node_us_per_op, "gen_cpu_us_per_op": cpu.gen_us_per_op}


def warm_ringkv(urls: list[str], phases: Sequence[Phase], ranges: int) -> None:
    """A first write under every prefix the phases use, so each range has a leader."""
    asyncio.run(wait_ready(urls))
    with Client(urls, keyspace=KEYSPACE, protocol="http", timeout_s=HTTP_TIMEOUT_S) as kv:
        for index, _ in enumerate(phases):
            for n in range(WARM_KEYS_PER_RANGE * ranges):
                kv.put(f"watch{index}/warm{n}", 0)
            kv.put(f"lock/{LOCK_NAME}-{index}-warm", 0)


def _contenders(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of counts, each at least 1")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench coordination", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watch-events", type=int, default=500, help="puts in the paced phase")
    parser.add_argument("--watch-rate", type=float, default=50.0, help="paced puts per second")
    parser.add_argument("--burst-events", type=int, default=200,
                        help="puts in the back-to-back phase")
    parser.add_argument("--lock-duration", type=float, default=10.0,
                        help="seconds per lock phase")
    parser.add_argument("--contenders", type=_contenders, default=[1, 4],
                        help="comma-separated: one lock phase per count of contenders")
    parser.add_argument("--ranges", type=int, default=RANGES,
                        help="ranges of ringkv's keyspace txn (each its own Paxos group)")
    parser.add_argument("--etcd-bin", default=None, help="the etcd binary (default: etcd on PATH)")
    parser.add_argument("--commit-sync", choices=("periodic", "batch"), default="periodic",
                        help="ringkv's storage.commit_sync (etcd always fsyncs before answering)")
    parser.add_argument("--watch-protocol", choices=("http", "native"), default="http",
                        help="the ringkv watcher's protocol")
    parser.add_argument("--out", type=Path, default=RESULTS / "coordination.json")
    args = parser.parse_args(argv)
    if min(args.watch_events, args.burst_events, args.ranges) < 1 or args.watch_rate <= 0 \
            or args.lock_duration <= 0:
        parser.error("--watch-events, --burst-events and --ranges must be at least 1, "
                     "--watch-rate and --lock-duration positive")
    binary = find_etcd(args.etcd_bin)
    skipped = None
    if binary is None:
        skipped = (f"no etcd binary ({args.etcd_bin or 'etcd on PATH'}): install it with "
                   f"`{APT_HINT}`; the etcd phases are skipped")
        print(skipped, flush=True)
    phases = phases_of(args)
    records: list[dict[str, Any]] = []
    overrides = {"storage.commit_sync": args.commit_sync,
                 f"keyspaces.{KEYSPACE}": {"replication_factor": 3, "tier": "transactional",
                                           "ranges": args.ranges}}
    with side_by_side(binary, "ringkv-bench-coordination-", overrides) as (etcd, ringkv):
        ringkv_urls = ringkv.endpoints()
        warm_ringkv(ringkv_urls, phases, args.ranges)
        systems: list[tuple[str, list[str], list[int]]] = []
        if etcd is not None:
            systems.append((ETCD, etcd.urls(), etcd.pids()))
        systems.append((RINGKV, ringkv_urls, ringkv_node_pids(ringkv)))
        print(HEADER, flush=True)
        for index, phase in enumerate(phases):
            for system, urls, pids in systems:
                record = run_phase(phase, system, urls, pids, index, args.lock_duration,
                                   args.watch_protocol)
                records.append(record)
                print(format_row(record), flush=True)
    ringkv_lock = next((r["protocol"] for r in records
                        if r["kind"] == "lock" and r["system"] == RINGKV), None)
    print()
    print(format_table(records))
    for record in records:
        for line in record["first_errors"]:
            print(f"  {record['phase']} {record['system']} error: {line}")
    print(f"\nwatch p50/p99/max: the put's send to the event's delivery (commit, then "
          f"delivery); 'after ack': from the put's answer instead. lock p50/p99/max: acquire "
          f"latency. CPU µs/op: the server processes' CPU per event or acquisition. "
          f"ringkv lock: {ringkv_lock}")
    ratios, lines = compare(records)
    for line in lines:
        print(line)
    if skipped:
        print(f"no comparison: {skipped}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "watch_events": args.watch_events, "watch_rate_per_s": args.watch_rate,
        "burst_events": args.burst_events, "lock_duration_s": args.lock_duration,
        "contenders": args.contenders, "commit_sync": args.commit_sync, "ranges": args.ranges,
        "watch_protocol": args.watch_protocol,
        "latency_from": "send (ack_*: acknowledgment)", "ringkv_lock": ringkv_lock,
        "etcd": {"binary": binary, "version": etcd_version(binary)} if binary else None,
        "etcd_skipped": skipped,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": records, "ratios": ratios}, indent=2))
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
