"""Watches and locks under real network partitions (issue #17), on node processes
in network namespaces (``ringkv.tools.netns``): iptables drops between hosts,
no RST, no error, just silence.

**Watches.** Writers in the root namespace (they reach every host, as Jepsen's
clients do) commit single-key puts and transactions across the ranges of a
transactional keyspace, each value unique, recording every acknowledged
commit with its version and every outcome they could not learn. Watchers
follow the prefix with the real client's ``watch(..., prefix=True)`` and its
automatic resume: one in a child process on the first node's host (isolating
that node cuts the watcher off with it) and one in the root namespace.
Meanwhile the nemesis isolates the node leading a range, isolates the
watcher's node, and (five hosts) splits the cluster 2|3 with the watcher's
node in the minority. After the heal a marker commit closes the span and
each stream is judged by ``sim/watch_stream.check_stream``: every
acknowledged commit exactly once in (version, key) order, an unknown one at
most once, nothing invented. Two planted watchers in the same run, one that
drops events and one that resumes "from now" after a fault, must be caught.

**Locks.** Three contenders, each a child process on its own node's host,
take ``lock("mx")`` in a loop and mark their critical section with fenced
writes (``enter``, then ``exit``) to a guarded resource. The nemesis waits for
a fresh holder and cuts its host off from the others (alone, or with one
other host in a 2|3 split): the holder's lease must lapse, another contender
take over, and the cut-off holder's late fenced writes be refused once it
can reach the cluster again. A root-namespace watch on the resource is what
the resource accepted, in commit order; ``sim/lock_fence.check_fenced_history``
judges it (tokens never go down, no two sections interleave). A stale
holder's write that skips the fence, planted after the run, must be caught.
Take-over time: from the cut to the next holder's acquire (TTL + ε expected,
more when the cut node led the lease's range: an election first).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ringkv.client import Client
from ringkv.errors import RingKVError
from ringkv.sim.lock_fence import check_fenced_history
from ringkv.sim.watch_stream import Write, check_stream
from ringkv.tools.launcher import http
from ringkv.tools.local_cluster import LocalCluster
from ringkv.tools.netns import NetnsHosts
from ringkv.txn.watch import Change
from tests.hosts import netns_hosts

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
KS = "co"
RANGES = 3
LEASE_S = 2.0  # txn.lease_s: a cut leader's ranges elect anew after this
SWEEP_MS = 100
TTL_S = 2  # the lock's session lease (three hosts)
CLIENT_TIMEOUT_S = 2.0
WATCH_PREFIX = "w/"
END_KEY = "w/~end"  # the marker commit that closes a watch's span
CALM_COMMITS = 20  # commits acknowledged before the first fault and after each heal
PLANTED_DROP_EVERY = 20  # the planted "drops" watcher loses one event in this many
RESOURCE = "mx-res"
RESOURCE_END = "mx-res~end"


def takeover_bound_s(ttl_s: int) -> float:
    """The next holder acquires within TTL (the last renewal, at most TTL/3 before
    the cut, plus TTL), a sweep, and an election when the cut node led the lease's
    range (leader lease + a round); plus the waiter's watch, a read and timeouts."""
    return ttl_s + LEASE_S + 6.0


# ---- the cluster and its children --------------------------------------------------

@contextmanager
def coordination_cluster(hosts: NetnsHosts, tmp: Path,
                         ranges: int = RANGES) -> Iterator[LocalCluster]:
    """A node on every host, keyspace ``KS`` transactional (RF 3, ``ranges`` ranges),
    each range with a leader before it is used; always taken down and healed."""
    keyspace: dict[str, Any] = {"replication_factor": 3, "tier": "transactional"}
    if ranges > 1:
        keyspace["ranges"] = ranges
    cluster = LocalCluster(tmp, rf=3, config_overrides={
        f"keyspaces.{KS}": keyspace,
        "txn.lease_s": LEASE_S, "txn.lease_sweep_ms": SWEEP_MS})
    cluster.build_on_hosts(hosts)
    try:
        cluster.up(90.0, together=True)
        url = cluster.procs[0].url
        for i in range(4 * ranges):  # keys land in every range: each has elected
            until(lambda i=i: http("PUT", f"{url}/v1/kv/{KS}/warm{i}", {"value": 0},
                                   timeout_s=5)[0] == 200, 60, f"a first write to warm{i}")
        yield cluster
    finally:
        hosts.heal()
        cluster.down()


def until(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """``check()``'s first truthy answer (OSError and RingKVError count as not yet),
    or AssertionError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
        except (OSError, RingKVError):
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(interval_s)


class HostChildren:
    """Python child processes, each run inside one host's namespace; every one is
    killed at the end. Each writes JSON lines to its own file."""

    def __init__(self, hosts: NetnsHosts, tmp: Path) -> None:
        self.hosts = hosts
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, host: int, script: str, *args: str) -> None:
        out = self.tmp / f"{name}.jsonl"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.procs[name] = subprocess.Popen(
            [*self.hosts.wrapper(host), sys.executable, "-c", script, str(out), *args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def lines(self, name: str) -> list[dict[str, Any]]:
        out = self.tmp / f"{name}.jsonl"
        if not out.exists():
            return []
        # A line being written may be cut short: only whole lines count.
        return [json.loads(line) for line in out.read_text().split("\n")[:-1] if line.strip()]

    def wait(self, name: str, timeout_s: float) -> int:
        proc = self.procs[name]
        code = proc.wait(timeout=timeout_s)
        assert code == 0, f"{name} exited {code}: " + (
            proc.stderr.read().decode()[-3000:] if proc.stderr else "")
        return code

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            if proc.stderr:
                proc.stderr.close()


def leaders(cluster: LocalCluster) -> dict[int, list[str]]:
    """Host index -> the ranges its node says it leads (nodes that answer)."""
    led: dict[int, list[str]] = {}
    for i, proc in enumerate(cluster.procs):
        try:
            status, view = http("GET", f"{proc.url}/v1/status", timeout_s=2.0)
        except OSError:
            continue
        groups = view.get("transactional", {}).get("groups", {}) if status == 200 else {}
        led[i] = sorted(gid for gid, g in groups.items() if g.get("leads"))
    return led


def replica_hosts(cluster: LocalCluster) -> list[set[int]]:
    """The hosts of each range of ``KS``, as a node that answers knows them."""
    index = {proc.node_id: i for i, proc in enumerate(cluster.procs)}
    for proc in cluster.procs:
        try:
            status, view = http("GET", f"{proc.url}/v1/status", timeout_s=2.0)
        except OSError:
            continue
        groups = view.get("transactional", {}).get("groups", {}) if status == 200 else {}
        found = [{index[n] for n in g.get("replicas", []) if n in index}
                 for gid, g in groups.items() if gid.startswith(f"{KS}/")]
        if found:
            return found
    raise AssertionError("no node told its ranges")


@dataclass
class FaultLog:
    """What the nemesis did: (kind, cut hosts, at (wall), healed at (wall))."""

    faults: list[tuple[str, tuple[int, ...], float, float]] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [kind for kind, _, _, _ in self.faults]


def cut(hosts: NetnsHosts, minority: list[int]) -> None:
    """``minority``'s hosts cut off from every other (one host: isolated)."""
    rest = [h for i, h in enumerate(hosts.hosts) if i not in minority]
    hosts.partition([hosts.hosts[i] for i in minority], rest)


# ---- watches -----------------------------------------------------------------------

WATCHER = textwrap.dedent("""
    import json, sys
    from ringkv.client import Client
    out, urls, origin, end = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with open(out, "a") as f, Client(urls, keyspace="co", protocol="http", timeout_s=2) as kv:
        for e in kv.watch("co", "w/", prefix=True, from_version=origin, max_reconnects=200):
            f.write(json.dumps([e.type, e.key, e.value, e.version]) + "\\n")
            f.flush()
            if e.key == end:
                break
""")


def as_change(kind: str, key: str, value: Any, version: int) -> Change:
    return Change(key.encode(), None if kind == "delete" else json.dumps(value).encode(),
                  version)


def as_write(key: str, value: Any) -> Write:
    return key.encode(), json.dumps(value).encode()


@dataclass
class WatchRun:
    acked: dict[Write, int]
    unknown: set[Write]
    origin: int
    end: int
    streams: dict[str, list[Change]]  # watcher -> what it received, up to the marker
    faults: FaultLog
    commits: int  # acknowledged transactions (a transaction's writes share a version)

    def problems(self, watcher: str) -> list[str]:
        return check_stream(self.streams[watcher], self.acked, self.unknown,
                            start_us=self.origin, resolved_us=self.end)


class Writers:
    """Threads committing unique values under WATCH_PREFIX: single-key puts and
    transactions over several keys (most across ranges)."""

    def __init__(self, urls: list[str], count: int) -> None:
        self.urls = urls
        self.acked: dict[Write, int] = {}
        self.unknown: set[Write] = set()
        self.commits = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in range(count)]

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def wait_commits(self, count: int, timeout_s: float, what: str) -> None:
        """Until ``count`` more commits than now are acknowledged, at most ``timeout_s``."""
        with self._lock:
            target = self.commits + count
        until(lambda: self.commits >= target, timeout_s, what)

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        assert not any(t.is_alive() for t in self.threads), "a writer did not stop"

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        with Client(self.urls, keyspace=KS, protocol="http", timeout_s=CLIENT_TIMEOUT_S,
                    max_retries=2) as kv:
            for i in range(1_000_000):  # bounded; stop ends it
                if self.stop.is_set():
                    return
                keys = sorted({f"{WATCH_PREFIX}k{rng.randrange(30)}"
                               for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 4))})
                writes = {key: f"{n}-{i}-{j}" for j, key in enumerate(keys)}
                try:
                    if len(keys) == 1:
                        (key, value), = writes.items()
                        version = kv.put(key, value).version
                    else:
                        version = kv.txn(KS, writes=[{"op": "put", "key": k, "value": v}
                                                     for k, v in writes.items()]).commit_ts
                except RingKVError:
                    with self._lock:
                        self.unknown.update(as_write(k, v) for k, v in writes.items())
                    time.sleep(0.05)  # do not spin while a range has no leader
                    continue
                assert isinstance(version, int)
                with self._lock:
                    self.commits += 1
                    self.acked.update((as_write(k, v), version) for k, v in writes.items())


class RootWatcher:
    """A watch in this (root) namespace, on a thread, until the marker commit (or,
    once ``past_us`` is set, any event after it: a planted watcher that restarted
    "from now" after the marker never sees the marker, and the test's tail writes
    end it). ``planted``: None (the real client), "drops" (loses one event in
    PLANTED_DROP_EVERY) or
    "from-now" (once ``resume_now`` is set, drops its watch and starts a new one
    from now, as a client that forgot where it was would)."""

    def __init__(self, urls: list[str], origin: int, planted: str | None = None) -> None:
        self.urls = urls
        self.origin = origin
        self.planted = planted
        self.got: list[Change] = []
        self.resume_now = threading.Event()
        self.past_us: int | None = None
        self.writers: Writers | None = None  # set once they write
        self.last_event_s: float | None = None  # when the last event came (monotonic)
        self.restarted_at_s: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def describe(self) -> str:
        """Where the watcher is, for a failure message."""
        now_s = time.monotonic()
        last = self.got[-1].version_us if self.got else None
        idle = "never" if self.last_event_s is None else f"{now_s - self.last_event_s:.1f} s ago"
        restarted = ("" if self.restarted_at_s is None
                     else f", restarted from now {now_s - self.restarted_at_s:.1f} s ago")
        return (f"{len(self.got)} events, the last at version {last}, the last event "
                f"{idle}{restarted}")

    def _run(self) -> None:
        try:
            with Client(self.urls, keyspace=KS, protocol="http", timeout_s=2) as kv:
                from_version: int | None = self.origin
                for _ in range(2):  # the planted "from-now" restarts once
                    for n, e in enumerate(kv.watch(KS, WATCH_PREFIX, prefix=True,
                                                   from_version=from_version,
                                                   max_reconnects=200)):
                        self.last_event_s = time.monotonic()
                        past_us = self.past_us
                        if e.key != END_KEY and past_us is not None and e.version > past_us:
                            return  # a tail write: the marker is behind this watch
                        if e.key == END_KEY or not (self.planted == "drops"
                                                      and n % PLANTED_DROP_EVERY == 1):
                            self.got.append(as_change(e.type, e.key, e.value, e.version))
                        if e.key == END_KEY:
                            return
                        if self.planted == "from-now" and self.resume_now.is_set() \
                                and from_version is not None:
                            # Commits go on meanwhile: the new watch misses them.
                            assert self.writers is not None
                            self.writers.wait_commits(3, 60, "commits while the planted "
                                                      "watcher restarts")
                            from_version = None
                            self.restarted_at_s = time.monotonic()
                            break
        except BaseException as exc:  # judged by the test
            self.error = exc


def run_watches(hosts: NetnsHosts, cluster: LocalCluster, tmp: Path, kinds: list[str], *,
                hold_s: float, calm_s: float, say: Callable[[str], None]) -> WatchRun:
    children = HostChildren(hosts, tmp)
    urls = [p.url for p in cluster.procs]
    status, first = http("PUT", f"{urls[-1]}/v1/kv/{KS}/w/~origin", {"value": 0})
    assert status == 200, first
    origin = first["version"]
    watchers = {"client": RootWatcher(urls, origin),
                "planted drops": RootWatcher(urls, origin, "drops"),
                "planted from-now": RootWatcher(urls, origin, "from-now")}
    try:
        children.start("on-host-0", 0, WATCHER, json.dumps(urls), str(origin), END_KEY)
        for watcher in watchers.values():
            watcher.thread.start()
        log = FaultLog()
        with Writers(urls, 2) as writers:
            for watcher in watchers.values():
                watcher.writers = writers
            time.sleep(calm_s)
            writers.wait_commits(CALM_COMMITS, 60, "commits before the first fault")
            for kind in kinds:
                minority = watch_fault_targets(kind, cluster, hosts)
                at = time.time()
                cut(hosts, minority)
                say(f"{kind}: host(s) {minority} cut off for {hold_s} s")
                try:
                    time.sleep(hold_s)
                finally:
                    hosts.heal()
                log.faults.append((kind, tuple(minority), at, time.time()))
                watchers["planted from-now"].resume_now.set()
                time.sleep(calm_s)
                # However loaded the machine, each span after a heal has commits in it.
                writers.wait_commits(CALM_COMMITS, 60, f"commits after the {kind} heal")
        # The marker, acknowledged, closes every stream's span.
        with Client(urls, keyspace=KS, protocol="http", timeout_s=5) as kv:
            # One id for every attempt: a retry after a lost answer is the same commit.
            end = until(lambda: kv.put(END_KEY, "end", txn_id="end-marker").version, 60,
                        "the marker commit")
        writers.acked[as_write(END_KEY, "end")] = end
        drain = time.monotonic()
        for watcher in watchers.values():
            watcher.past_us = end
        children.wait("on-host-0", 60)
        tail_writes = tail_until_done(urls, list(watchers.values()), 60)
        for name, watcher in watchers.items():
            assert not watcher.thread.is_alive(), (
                f"watcher {name!r} did not reach the marker (version {end}) 60 s after the "
                f"on-host-0 watcher did: {watcher.describe()}")
            assert watcher.error is None, f"{name}: {watcher.error!r}"
        say(f"{tail_writes} tail writes after the marker")
        say(f"every watcher past the marker {time.monotonic() - drain:.1f} s after it")
    finally:
        children.close()
    streams = {name: w.got for name, w in watchers.items()}
    streams["on-host-0"] = [as_change(*line) for line in children.lines("on-host-0")]
    return WatchRun(writers.acked, writers.unknown, origin, end,
                    {name: [c for c in got if c.version_us <= end]
                     for name, got in streams.items()}, log, writers.commits)


def tail_until_done(urls: list[str], watchers: list[RootWatcher], timeout_s: float) -> int:
    """Commit a key after the marker every half second until every watcher's thread has
    ended (a planted watcher that restarted from now after the marker ends on one),
    at most ``timeout_s``; how many were committed."""
    deadline = time.monotonic() + timeout_s
    writes = 0
    with Client(urls, keyspace=KS, protocol="http", timeout_s=2) as kv:
        for watcher in watchers:
            while watcher.thread.is_alive() and time.monotonic() < deadline:
                try:
                    kv.put(f"{WATCH_PREFIX}~tail", writes)
                    writes += 1
                except RingKVError:
                    pass  # an outcome not learnt: the next one may land
                watcher.thread.join(timeout=0.5)
    return writes


def watch_fault_targets(kind: str, cluster: LocalCluster, hosts: NetnsHosts) -> list[int]:
    """The hosts a fault cuts off: the watcher's (0), a range leader's, or both (split)."""
    led = leaders(cluster)
    others = [i for i, ranges in led.items() if ranges and i != 0]
    leader = max(others, key=lambda i: len(led[i])) if others else 0
    if kind == "isolate-leader":
        return [leader]
    if kind == "isolate-watcher-node":
        return [0]
    if kind == "split":  # the watcher's node and a leader in the minority
        assert len(hosts.hosts) == 5, "a 2|3 split needs five hosts"
        return [0, leader if leader != 0 else 1]
    raise ValueError(f"unknown fault {kind}")


def judge_watches(run: WatchRun, kinds: list[str], say: Callable[[str], None]) -> None:
    say(f"{run.commits} commits acknowledged ({len(run.acked)} writes), "
        f"{len(run.unknown)} writes unknown; faults: {', '.join(run.faults.kinds())}")
    assert run.faults.kinds() == kinds
    for name, got in run.streams.items():
        problems = run.problems(name)
        say(f"  watcher {name}: {len(got)} events checked, {len(problems)} problems"
            + (f" (first: {problems[0]})" if problems else ""))
        if name.startswith("planted"):
            assert problems, f"the planted watcher {name!r} went unnoticed"
        else:
            assert not problems, "\n".join(problems[:10])
            assert len(got) >= len([v for v in run.acked.values()
                                    if run.origin < v <= run.end])


@pytest.fixture(scope="module")
def three_hosts(tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[tuple[NetnsHosts, LocalCluster]]:
    """Three hosts and a node on each, shared by the short tests (each heals its cuts)."""
    with netns_hosts(3) as hosts:
        started = time.monotonic()
        with coordination_cluster(hosts, tmp_path_factory.mktemp("coordination")) as cluster:
            print(f"\nthree hosts: cluster up and every range led in "
                  f"{time.monotonic() - started:.1f} s")
            yield hosts, cluster


def test_watches_lose_repeat_and_reorder_nothing_through_leader_and_watcher_cuts(
        three_hosts: tuple[NetnsHosts, LocalCluster], tmp_path: Path) -> None:
    started = time.monotonic()
    hosts, cluster = three_hosts
    kinds = ["isolate-leader", "isolate-watcher-node"]
    run = run_watches(hosts, cluster, tmp_path, kinds, hold_s=LEASE_S + 1.5, calm_s=1.0,
                      say=print)
    judge_watches(run, kinds, print)
    assert run.commits >= CALM_COMMITS * (len(kinds) + 1)
    print(f"  the watch run took {time.monotonic() - started:.1f} s")


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_soak_watches_through_isolations_and_a_split_on_five_hosts(tmp_path: Path) -> None:
    kinds = ["isolate-leader", "isolate-watcher-node", "split", "isolate-leader", "split"]
    with netns_hosts(5) as hosts, coordination_cluster(hosts, tmp_path / "cluster") as cluster:
        run = run_watches(hosts, cluster, tmp_path, kinds, hold_s=LEASE_S + 4.0, calm_s=3.0,
                          say=print)
    judge_watches(run, kinds, print)
    assert run.commits >= max(300, CALM_COMMITS * (len(kinds) + 1))


# ---- locks -------------------------------------------------------------------------

CONTENDER = textwrap.dedent("""
    import json, os, sys, time
    from ringkv.client import Client
    from ringkv.client.recipes import FencingRejected, LockLost
    from ringkv.errors import RingKVError
    out, urls, name, hold_s = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    ttl_s, timeout_s = int(sys.argv[5]), float(sys.argv[6])
    f = open(out, "a")

    def record(**doc):
        doc.update(holder=name, at=time.time())
        f.write(json.dumps(doc) + "\\n")
        f.flush()

    def fenced(lock, token, event):
        # True when this write was accepted. After an unknown outcome (cut off),
        # late writes until one is refused (or accepted: still held after all).
        for _ in range(100):
            try:
                v = lock.fenced_put("mx-res", {"token": token, "holder": name, "event": event})
            except (LockLost, FencingRejected) as exc:
                record(refused=type(exc).__name__, token=token, event=event)
                return False
            except RingKVError as exc:
                record(unknown=repr(exc)[:300], token=token, event=event)
                event = "late"
                time.sleep(0.3)
                continue
            record(v=v, token=token, event=event)
            return event != "late"
        return False

    deadline = time.monotonic() + 300
    with Client(urls, keyspace="co", protocol="http", timeout_s=timeout_s, max_retries=2) as kv:
        while time.monotonic() < deadline and not os.path.exists(out + ".stop"):
            lock = kv.lock("mx", keyspace="co", ttl_s=ttl_s, timeout_s=10)
            try:
                if not lock.acquire():
                    continue
            except (RingKVError, LockLost) as exc:
                record(error=repr(exc)[:300])
                time.sleep(0.2)
                continue
            token = lock.fencing_token
            record(acquired=token, key=lock.key)
            try:
                if fenced(lock, token, "enter"):
                    time.sleep(hold_s)
                    fenced(lock, token, "exit")
            finally:
                try:
                    lock.release()
                except Exception as exc:
                    record(error=repr(exc)[:300])
                record(released=token)
            time.sleep(0.05)
""")
CONTENDERS = 3  # on hosts 0, 1 and 2
HOLD_IN_SECTION_S = 1.5  # between a holder's enter and exit
FRESH_S = 0.5  # a holder cut off this soon after acquiring is inside its section


@dataclass
class Takeover:
    kind: str
    victim: str
    token: int
    cut_hosts: tuple[int, ...]
    after_s: float | None  # from the cut to the next holder's acquire
    lapsed_s: float | None  # from the cut to the delete of the victim's key (its lease lapsed)
    refused_s: float | None  # from the heal to the victim's first refused late write
    led: tuple[str, ...]  # the ranges the victim's node led just before the cut


@dataclass
class LockRun:
    resource: list[dict[str, Any]]  # the writes the resource accepted, from its watch
    planted: list[dict[str, Any]]  # a stale holder's unfenced write, added after the run
    lines: dict[str, list[dict[str, Any]]]  # each contender's record
    takeovers: list[Takeover]
    ttl_s: int

    def accepted(self) -> list[dict[str, Any]]:
        return [d for lines in self.lines.values() for d in lines if "v" in d]


class ResourceWatch:
    """What the guarded resource accepted, in commit order, and when contenders'
    keys were deleted: a watch of the lock's prefix from the root namespace, until
    the marker key after it."""

    def __init__(self, urls: list[str], origin: int) -> None:
        self.got: list[dict[str, Any]] = []
        self.deleted: dict[str, int] = {}  # contender key -> the version it was deleted at
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(urls, origin), daemon=True)
        self.thread.start()

    def _run(self, urls: list[str], origin: int) -> None:
        try:
            with Client(urls, keyspace=KS, protocol="http", timeout_s=2) as kv:
                for e in kv.watch(KS, "mx", prefix=True, from_version=origin,
                                  max_reconnects=200):
                    if e.key == RESOURCE_END:
                        return
                    if e.type == "delete":
                        self.deleted[e.key] = e.version
                    if e.key == RESOURCE and isinstance(e.value, dict):
                        self.got.append({**e.value, "v": e.version})
        except BaseException as exc:  # judged by the test
            self.error = exc


def fresh_holder(children: HostChildren, since: float) -> tuple[str, int] | None:
    """A contender that acquired within FRESH_S, after ``since``, and still holds."""
    now = time.time()
    for name in children.procs:
        lines = children.lines(name)
        took = [d for d in lines if "acquired" in d]
        if took and since < took[-1]["at"] and now - took[-1]["at"] < FRESH_S \
                and not any(d.get("released") == took[-1]["acquired"] for d in lines):
            return name, int(took[-1]["acquired"])
    return None


def recent(children: HostChildren, since: float) -> str:
    """What each contender recorded since ``since`` (for a failure's message)."""
    return "\n".join(f"{name} +{d['at'] - since:.2f}s " + json.dumps(
        {k: str(v)[:120] for k, v in d.items() if k not in ("at", "holder")})
        for name in children.procs for d in children.lines(name)[-40:] if d["at"] >= since)


def lock_fault_targets(kind: str, victim_host: int, hosts: NetnsHosts,
                       cluster: LocalCluster) -> list[int]:
    if kind == "isolate-holder":
        return [victim_host]
    if kind == "split":  # the holder and another host in the minority of five
        assert len(hosts.hosts) == 5, "a 2|3 split needs five hosts"
        # One that leaves every range a majority of its replicas on the other side:
        # there another contender can take the lock over (else none can, anywhere).
        ranges = replica_hosts(cluster)
        fits = [h for h in range(len(hosts.hosts)) if h != victim_host
                and all(len(r & {victim_host, h}) <= 1 for r in ranges)]
        assert fits, f"no host splits off with {victim_host} without a range's majority"
        return [victim_host, fits[0]]
    raise ValueError(f"unknown fault {kind}")


def run_locks(hosts: NetnsHosts, cluster: LocalCluster, tmp: Path, kinds: list[str], *,
              calm_s: float, say: Callable[[str], None], ttl_s: int = TTL_S,
              timeout_s: float = CLIENT_TIMEOUT_S) -> LockRun:
    children = HostChildren(hosts, tmp)
    urls = [p.url for p in cluster.procs]
    names = [f"c{i}" for i in range(CONTENDERS)]
    status, first = http("PUT", f"{urls[-1]}/v1/kv/{KS}/{RESOURCE}~origin", {"value": 0})
    assert status == 200, first
    watch = ResourceWatch(urls, first["version"])
    takeovers: list[Takeover] = []
    try:
        for i, name in enumerate(names):
            children.start(name, i, CONTENDER, json.dumps(urls), name, str(HOLD_IN_SECTION_S),
                           str(ttl_s), str(timeout_s))
        since = 0.0
        for kind in kinds:
            time.sleep(calm_s)
            victim, token = until(lambda: fresh_holder(children, since), 60,
                                  "a contender to take the lock", interval_s=0.02)
            minority = lock_fault_targets(kind, names.index(victim), hosts, cluster)
            led = leaders(cluster)
            victim_key = next(d["key"] for d in children.lines(victim)
                              if d.get("acquired") == token)
            at = time.time()
            cut(hosts, minority)
            cut_off = {names[i] for i in minority if i < CONTENDERS}
            try:
                # Until a contender on the majority's side holds it, and has written.
                took = until(lambda: next(
                    (d for n in names if n not in cut_off for d in children.lines(n)
                     if d.get("acquired", 0) > token and d["at"] > at), None),
                    takeover_bound_s(ttl_s) + 5, f"a contender to take over from {victim}")
                # ... and a new holder's fenced write got through. Not necessarily the
                # first taker's: one whose renewals went to the cut-off node may lose its
                # lease before it writes, be refused at the resource, and the next take over.
                until(lambda: any("v" in d and d.get("token", 0) > token and d["at"] > at
                                  for n in names if n not in cut_off
                                  for d in children.lines(n)), 10,
                      "a new holder's first fenced write")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; {kind} of host(s) {minority} at {at:.2f}, "
                                     f"ranges on hosts {replica_hosts(cluster)}\n"
                                     + recent(children, at - 3)) from None
            finally:
                hosts.heal()
            healed = time.time()
            refused = until(lambda: next((d for d in children.lines(victim)
                                          if d.get("token") == token and "refused" in d), None),
                            30, f"{victim}'s late fenced write to be refused")
            gone = until(lambda: watch.deleted.get(victim_key), 30, f"{victim}'s key to go")
            takeovers.append(Takeover(kind, victim, token, tuple(minority), took["at"] - at,
                                      gone / 1e6 - at, max(0.0, refused["at"] - healed),
                                      tuple(led.get(names.index(victim), []))))
            say(f"{kind}: {victim} (token {token}, its node leading "
                f"{', '.join(led.get(names.index(victim), [])) or 'no range'}) cut off with "
                f"host(s) {minority}; its lease lapsed (its key deleted) {gone / 1e6 - at:.2f} s "
                f"later, {took['holder']} took over {took['at'] - at:.2f} s later; {victim}'s late "
                f"write refused ({refused['refused']}) {max(0.0, refused['at'] - healed):.2f} s "
                f"after the heal")
            since = healed
        time.sleep(calm_s)
        for name in names:
            (tmp / f"{name}.jsonl.stop").touch()
        for name in names:
            children.wait(name, 60)
        lines = {name: children.lines(name) for name in names}
        stale = takeovers[0] if takeovers else None
        with Client(urls, keyspace=KS, protocol="http", timeout_s=5) as kv:
            planted: list[dict[str, Any]] = []
            if stale is not None:  # a stale holder's write that skips the fence
                value = {"token": stale.token, "holder": stale.victim, "event": "late",
                         "planted": True}
                version = until(lambda: kv.put(RESOURCE, value, txn_id="planted").version,
                                30, "the planted stale write")
                planted.append({**value, "v": version})
            until(lambda: kv.put(RESOURCE_END, "end", txn_id="resource-end").version, 30,
                  "the resource's end marker")
        watch.thread.join(timeout=60)
        assert not watch.thread.is_alive(), "the resource's watch did not reach its marker"
        assert watch.error is None, repr(watch.error)
    finally:
        children.close()
    resource = [d for d in watch.got if not d.get("planted")]
    return LockRun(resource, planted, lines, takeovers, ttl_s)


def judge_locks(run: LockRun, kinds: list[str], say: Callable[[str], None]) -> None:
    tokens = {d["token"] for d in run.resource}
    problems = check_fenced_history(run.resource)
    refused = [d for lines in run.lines.values() for d in lines if "refused" in d]
    say(f"{len(tokens)} holders, {len(run.resource)} fenced writes accepted at the resource, "
        f"{len(refused)} refused; take-over after the cut: "
        + ", ".join(f"{t.after_s:.2f} s" for t in run.takeovers if t.after_s is not None)
        + f" (TTL {run.ttl_s} s); {len(problems)} problems")
    assert not problems, "\n".join(problems[:10])
    assert [t.kind for t in run.takeovers] == kinds
    assert all(t.after_s is not None and t.after_s < takeover_bound_s(run.ttl_s)
               for t in run.takeovers), run.takeovers
    # The lease lapsed no sooner than it could have: its last renewal came at most TTL/3
    # before the cut (renewals every TTL/3), so its deadline is over TTL/2 after the cut.
    assert all(t.lapsed_s is not None and t.lapsed_s > run.ttl_s / 2 for t in run.takeovers), \
        run.takeovers
    # Every write a contender saw accepted is at the resource, as it was sent.
    at_resource = {(d["v"], d["token"], d["event"]) for d in run.resource}
    assert {(d["v"], d["token"], d["event"]) for d in run.accepted()} <= at_resource
    assert len(tokens) >= 3  # they took turns
    # The planted stale write (the first victim's token, unfenced) is caught.
    caught = check_fenced_history(run.resource + run.planted)
    assert run.planted and any("went down" in p for p in caught), caught


def test_a_cut_off_lock_holder_is_replaced_and_its_late_writes_refused(
        three_hosts: tuple[NetnsHosts, LocalCluster], tmp_path: Path) -> None:
    started = time.monotonic()
    hosts, cluster = three_hosts
    run = run_locks(hosts, cluster, tmp_path, ["isolate-holder"], calm_s=1.0, say=print)
    judge_locks(run, ["isolate-holder"], print)
    print(f"  the lock run took {time.monotonic() - started:.1f} s")


@pytest.mark.soak
@pytest.mark.timeout(400)
def test_soak_lock_holders_cut_off_and_split_away_on_five_hosts(tmp_path: Path) -> None:
    kinds = ["isolate-holder", "split", "isolate-holder", "split", "isolate-holder", "split"]
    # One range (on three of the five hosts): a split can always leave it a majority
    # on the side without the holder, so a take-over is always possible.
    with netns_hosts(5) as hosts, \
            coordination_cluster(hosts, tmp_path / "cluster", ranges=1) as cluster:
        # A longer lease, and shorter client timeouts, than on three hosts: a request
        # to a silent host costs the whole timeout (only a refused connection marks a
        # node down), and with two of five silent a 2 s lease lapses under the
        # contender on the majority's side before it can queue (see the README).
        run = run_locks(hosts, cluster, tmp_path, kinds, calm_s=2.0, say=print, ttl_s=4,
                        timeout_s=1.0)
    judge_locks(run, kinds, print)
    assert len({d["token"] for d in run.resource}) >= 10
