"""A Jepsen-style run against real node processes: load, a nemesis, a history, checks.

Three nodes run as processes on 127.0.0.1, 127.0.0.2 and 127.0.0.3. Every
internode link goes through a ``FaultProxy`` (each node gossips its proxy's
address through ``--broadcast-internode``). Eight clients read and write a
few keys at QUORUM with unique values (each through its own
``ringkv.client.AsyncClient``) while a nemesis, on a schedule drawn
from the seed, cuts links (both ways, one way, a whole node), delays them,
resets connections, SIGKILLs a node and restarts it on the same data, and
SIGSTOPs a node and SIGCONTs it. Then everything heals, the cluster gets a
quiet period, and every key is read once more, at QUORUM and at ALL (which
read-repairs every replica). The history, a list of the simulator's ``Op``
records (also written to ``history.jsonl`` in the run's directory), is
judged by the simulator's checkers (``ringkv.sim.checkers``): no
acknowledged write lost, no stale read, no read of a value never written, no
write discarded by last-write-wins, and every replica equal at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ringkv.address import format_address
from ringkv.chaos.proxy import FaultProxy
from ringkv.client import AsyncClient
from ringkv.clock import SystemClock
from ringkv.errors import BadRequest, NoNodeAvailable, RingKVError
from ringkv.tools.launcher import NodeProcess, free_port, http
from ringkv.tools.local_cluster import LocalCluster
from ringkv.sim import checkers
from ringkv.sim.history import FAIL, INFO, OK, Op

_CLOCK = SystemClock()
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
FAULT_KINDS = ("cut-link", "cut-one-way", "isolate", "delay", "reset", "kill", "pause")
KEYSPACE = "default"
REQUEST_TIMEOUT_S = 5.0  # per client attempt; the nodes time out replicas after 2 s
WARMUP_S = 2.0  # load runs this long before the first fault
MAX_SLOT_S = 15.0  # longest fault slot (hold + calm); long runs hold faults long enough to be seen DOWN
RESET_EVERY_S = 1.0  # a reset fault resets every link this often while it lasts
FINAL_READ_ATTEMPTS = 10


@dataclass(frozen=True)
class Fault:
    """One nemesis action: ``kind`` on ``targets`` from ``at_s`` for ``hold_s``."""

    at_s: float
    kind: str
    targets: tuple[str, ...]  # node addresses (HOSTS)
    hold_s: float
    heal_reset: bool = False  # on heal, reset stalled connections instead of forwarding
    delay_s: float = 0.0  # for "delay"


@dataclass
class Report:
    seed: int
    history: list[Op]
    faults: list[Fault]
    verdicts: list[checkers.Verdict]
    run_dir: Path
    hosts: tuple[str, ...] = HOSTS
    kinds: tuple[str, ...] = FAULT_KINDS

    @property
    def ok(self) -> bool:
        return all(verdict.ok for verdict in self.verdicts)

    def verdict(self, name: str) -> checkers.Verdict:
        return next(verdict for verdict in self.verdicts if verdict.name == name)

    def summary(self) -> str:
        client_ops = [op for op in self.history if not op.final]
        writes = Counter(op.status for op in client_ops if op.kind == "write")
        reads = Counter(op.status for op in client_ops if op.kind == "read")
        kinds = Counter(fault.kind for fault in self.faults)
        return "\n".join([
            f"ringkv chaos: seed {self.seed}, {len(self.hosts)} nodes, history in "
            f"{self.run_dir / 'history.jsonl'}",
            f"ops: {len(client_ops)}; writes: {writes[OK]} acknowledged, {writes[FAIL]} failed, "
            f"{writes[INFO]} indeterminate; reads: {reads[OK]} ok, {reads[FAIL]} failed",
            "faults: " + ", ".join(f"{kind} {kinds[kind]}" for kind in self.kinds),
            *(verdict.render() for verdict in self.verdicts),
            "PASS" if self.ok else "FAIL",
        ])


# -- the nemesis schedule (pure) ---------------------------------------------------


def schedule(seed: int, duration_s: float, hosts: tuple[str, ...] = HOSTS) -> list[Fault]:
    """One fault at a time, every kind once (in a seeded order) before any repeats.

    Each fault gets a slot, short enough that every kind fits in ``duration_s``
    (at most MAX_SLOT_S); it is held for 40-75% of the slot and the rest is calm.
    Every fault is over a second before ``duration_s``.
    """
    rng = random.Random(seed)
    slot = min(MAX_SLOT_S, (duration_s - WARMUP_S - 2.0) / len(FAULT_KINDS))
    faults: list[Fault] = []
    kinds: list[str] = []
    at = WARMUP_S
    while True:
        if not kinds:
            kinds = rng.sample(FAULT_KINDS, len(FAULT_KINDS))
        kind = kinds.pop()
        hold = round(rng.uniform(0.4, 0.75) * slot, 2)
        if slot <= 0 or at + hold > duration_s - 1.0:
            return faults
        a, b = rng.sample(hosts, 2)
        targets = {"cut-link": (a, b), "cut-one-way": (a, b), "reset": hosts}.get(kind, (a,))
        faults.append(Fault(
            at_s=round(at, 2), kind=kind, targets=targets, hold_s=hold,
            heal_reset=rng.random() < 0.5,
            delay_s=round(rng.uniform(0.05, 1.0), 3) if kind == "delay" else 0.0,
        ))
        at += slot


def judge(history: list[Op], replicas: dict[str, dict[str, Any]]) -> list[checkers.Verdict]:
    """The simulator's checkers; one machine's clock, so every promise holds."""
    return [
        checkers.lost_writes(history),
        checkers.stale_reads(history, promised=True),
        checkers.phantom_reads(history),
        checkers.discarded_writes(history, promised=True),
        checkers.convergence(replicas),
    ]


def read_history(path: Path) -> list[Op]:
    """A ``history.jsonl`` written by a run, to judge it again."""
    with open(path) as lines:
        return [Op(**{**record, "ts": tuple(record["ts"]) if record["ts"] else None})
                for record in map(json.loads, lines)]


# -- the run -------------------------------------------------------------------------


class ChaosRun:
    """Three nodes on loopback behind fault proxies (see the module's docstring).

    A run on other hosts (``ringkv.chaos.netns_run``) overrides the cluster's
    start and stop, the schedule, and how faults are applied and healed.
    """

    hosts: tuple[str, ...] = HOSTS
    kinds: tuple[str, ...] = FAULT_KINDS

    def __init__(
        self,
        run_dir: Path,
        *,
        seed: int,
        duration_s: float,
        clients: int = 8,
        keys: int = 10,
        quiet_s: float = 5.0,
        say: Callable[[str], None] = print,
    ) -> None:
        self.run_dir = run_dir
        self.seed = seed
        self.duration_s = duration_s
        self.clients = clients
        self.keys = [f"k{i}" for i in range(keys)]
        self.quiet_s = quiet_s
        self.say = say
        self.history: list[Op] = []
        self.done: list[Fault] = []
        self.cluster: LocalCluster | None = None
        self.proxy: FaultProxy | None = None
        self.by_host: dict[str, NodeProcess] = {}
        self._t0 = 0.0
        self._index = itertools.count()

    def now(self) -> float:
        return _CLOCK.monotonic_s() - self._t0

    async def run(self) -> Report:
        faults = self.schedule()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._start_cluster()
            replicas = await self._load_and_faults(faults)
        finally:
            await self._stop_cluster()
        self._write_history()
        return Report(self.seed, self.history, self.done, self.judge(replicas), self.run_dir,
                      self.hosts, self.kinds)

    def schedule(self) -> list[Fault]:
        return schedule(self.seed, self.duration_s)

    def judge(self, replicas: dict[str, dict[str, Any]]) -> list[checkers.Verdict]:
        return judge(self.history, replicas)

    # -- cluster -----------------------------------------------------------------

    async def _start_cluster(self) -> None:
        """Proxies first (the seeds are proxy addresses), then the nodes one by one."""
        ports = {host: (free_port(host), free_port(host), free_port(host)) for host in HOSTS}
        self.proxy = FaultProxy({(host, proxy): (host, internode)
                                 for host, (_, internode, proxy) in ports.items()})
        await self.proxy.start()
        cluster = LocalCluster(self.run_dir, nodes=len(HOSTS), rf=3)
        config = cluster.config_file()
        seed = format_address(HOSTS[0], ports[HOSTS[0]][2])
        cluster.procs = [
            NodeProcess(
                f"node{i + 1}", self.run_dir, host=host, client_port=client,
                internode_port=internode, config_path=config,
                extra_args=["--seeds", seed, "--broadcast-internode", format_address(host, proxy)],
            )
            for i, (host, (client, internode, proxy)) in enumerate(ports.items())
        ]
        self.cluster = cluster
        self.by_host = dict(zip(HOSTS, cluster.procs))
        await asyncio.to_thread(cluster.up, 60.0)
        self.say(f"cluster up: {', '.join(p.node_id + ' ' + p.url for p in cluster.procs)}")

    async def _stop_cluster(self) -> None:
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.down)  # by PID; SIGCONTs a paused node first
        if self.proxy is not None:
            await self.proxy.stop()

    async def _heal_network(self) -> None:
        assert self.proxy is not None
        self.proxy.heal()

    async def _heal_everything(self) -> None:
        assert self.cluster is not None
        await self._heal_network()
        for proc in self.cluster.procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.signal(signal.SIGCONT)
            else:
                await asyncio.to_thread(proc.start)
        await asyncio.to_thread(self.cluster.wait_all_up, None, 60.0)

    # -- load and nemesis ----------------------------------------------------------

    async def _load_and_faults(self, faults: list[Fault]) -> dict[str, dict[str, Any]]:
        self._t0 = _CLOCK.monotonic_s()
        stop = asyncio.Event()
        workers = [asyncio.create_task(self._client(n, stop)) for n in range(self.clients)]
        nemesis = asyncio.create_task(self._nemesis(faults))
        try:
            await self._load_period(nemesis)
            stop.set()
            await asyncio.gather(*workers)
            await asyncio.wait_for(nemesis, timeout=60.0)  # its last heal may be running
        finally:
            for task in (*workers, nemesis):
                task.cancel()
        self.say(f"load stopped after {self.now():.1f}s; healing")
        await self._heal_everything()
        await asyncio.sleep(self.quiet_s)  # hints replay; correctness does not wait on it
        async with self._new_client("final") as kv:
            for key in self.keys:
                # At QUORUM, the level the writes promised; then at ALL, which
                # also read-repairs every replica before they are compared.
                self.history.append(await self._final_read(kv, key, "QUORUM"))
                self.history.append(await self._final_read(kv, key, "ALL"))
            return {key: await self._replicas(key, await kv.replicas(key)) for key in self.keys}

    async def _load_period(self, nemesis: asyncio.Task[None]) -> None:
        """How long the clients run: ``duration_s``, whenever the nemesis ends."""
        await asyncio.sleep(self.duration_s)

    def _new_client(self, process: str) -> AsyncClient:
        """One workload client (Jepsen's process): its own connections and ring view."""
        urls = [proc.url for proc in self.cluster.procs]  # type: ignore[union-attr]
        return AsyncClient(urls, keyspace=KEYSPACE, consistency="QUORUM",
                           timeout_s=REQUEST_TIMEOUT_S, rng=random.Random(f"{self.seed}/{process}"))

    async def _client(self, n: int, stop: asyncio.Event) -> None:
        process = f"c{n}"
        rng = random.Random(f"{self.seed}/{process}/ops")
        async with self._new_client(process) as kv:
            for seq in range(10_000_000):  # bounded; stop ends it
                if stop.is_set():
                    return
                key = rng.choice(self.keys)
                if rng.random() < 0.5:
                    op = await self._write(kv, process, key, f"{n}-{seq}")
                else:
                    op = await self._read(kv, process, key, "QUORUM")
                self.history.append(op)
                if op.status != OK:
                    await asyncio.sleep(0.05)  # pacing: do not spin while the cluster is down

    async def _write(self, kv: AsyncClient, process: str, key: str, value: str) -> Op:
        index, start = next(self._index), self.now()
        try:
            result = await kv.put(key, value)
        except RingKVError as exc:
            # The client retries, so even an Unavailable may follow an attempt
            # that timed out and still lands: only these prove nothing was sent.
            certain = isinstance(exc, BadRequest) or (
                isinstance(exc, NoNodeAvailable) and not exc.maybe_applied)
            return Op(index, process, "write", key, value, start, self.now(),
                      FAIL if certain else INFO, "client", "QUORUM", exc.code)
        return Op(index, process, "write", key, value, start, self.now(), OK, "client", "QUORUM",
                  ts=(result.timestamp[0], result.timestamp[1]))

    async def _read(self, kv: AsyncClient, process: str, key: str, level: str) -> Op:
        index, start = next(self._index), self.now()
        final = process == "final"
        try:
            record = await kv.get_with_meta(key, consistency=level)
        except RingKVError as exc:
            return Op(index, process, "read", key, None, start, self.now(), FAIL, "client", level,
                      exc.code, final)
        value = None if record is None else record.value
        ts = None if record is None else (record.timestamp[0], record.timestamp[1])
        return Op(index, process, "read", key, value, start, self.now(), OK, "client", level,
                  None, final, ts)

    async def _final_read(self, kv: AsyncClient, key: str, level: str) -> Op:
        """A read after healing; retried (bounded) while the cluster settles."""
        op = None
        for _ in range(FINAL_READ_ATTEMPTS):
            op = await self._read(kv, "final", key, level)
            if op.status == OK:
                return op
            await asyncio.sleep(0.5)
        assert op is not None
        return op

    async def _replicas(self, key: str, replica_ids: list[str]) -> dict[str, Any]:
        """What each replica of ``key`` holds (``?local=true``, which the client does
        not offer), as the convergence checker wants it: (value, ts) or None."""
        cells: dict[str, Any] = {}
        for proc in self.cluster.procs:  # type: ignore[union-attr]
            if replica_ids and proc.node_id not in replica_ids:
                continue  # with more nodes than RF, the others hold nothing of it
            status, body = await asyncio.to_thread(
                http, "GET", f"{proc.url}/v1/kv/{KEYSPACE}/{key}?local=true")
            cells[proc.node_id] = (body["value"], tuple(body["timestamp"])) if status == 200 \
                else None
        return cells

    async def _nemesis(self, faults: list[Fault]) -> None:
        """The schedule's faults in order, one at a time: each applied, held and healed
        by the hooks below (``_apply``, ``_hold``, ``_heal``: what differs between the
        proxy run and the namespace run), starting when ``_rescheduled`` says; ``done``
        records each fault as it actually ran."""
        for scheduled in faults:
            fault = self._rescheduled(scheduled)
            await asyncio.sleep(max(0.0, fault.at_s - self.now()))
            self.say(f"{self.now():6.1f}s nemesis: {fault.kind} {' '.join(fault.targets)} "
                     f"for {fault.hold_s}s")
            await self._apply(fault)
            self.done.append(fault)
            await self._hold(fault)
            await self._heal(fault)

    def _rescheduled(self, fault: Fault) -> Fault:
        """A scheduled fault as it will run: here, as scheduled."""
        return fault

    async def _apply(self, fault: Fault) -> None:
        proxy, target = self.proxy, fault.targets[0]
        assert proxy is not None
        if fault.kind in ("cut-link", "cut-one-way", "isolate"):
            for src, dst in _links(fault):
                proxy.cut(src, dst)
        elif fault.kind == "delay":
            for src, dst in _links(fault):
                proxy.delay(src, dst, fault.delay_s)
        elif fault.kind == "kill":
            await asyncio.to_thread(self.by_host[target].kill)
        elif fault.kind == "pause":
            self.by_host[target].signal(signal.SIGSTOP)

    async def _hold(self, fault: Fault) -> None:
        end = fault.at_s + fault.hold_s
        if fault.kind != "reset":
            await asyncio.sleep(max(0.0, end - self.now()))
            return
        while self.now() < end:  # a flapping network: every link reset again and again
            for a, b in itertools.combinations(HOSTS, 2):
                self.proxy.reset(a, b)  # type: ignore[union-attr]
            await asyncio.sleep(min(RESET_EVERY_S, max(0.0, end - self.now())))

    async def _heal(self, fault: Fault) -> None:
        if fault.kind == "kill":
            await asyncio.to_thread(self.by_host[fault.targets[0]].start)  # same data dir
        elif fault.kind == "pause":
            self.by_host[fault.targets[0]].signal(signal.SIGCONT)
        else:
            self.proxy.heal(reset=fault.heal_reset)  # type: ignore[union-attr]
        self.say(f"{self.now():6.1f}s nemesis: healed {fault.kind}")

    def _write_history(self) -> None:
        with open(self.run_dir / "history.jsonl", "w") as out:
            for op in self.history:
                out.write(json.dumps(op._asdict()) + "\n")


def _links(fault: Fault) -> list[tuple[str, str]]:
    """The directed links (source, destination) a proxy fault acts on."""
    if fault.kind == "cut-one-way":
        return [(fault.targets[0], fault.targets[1])]
    if fault.kind == "cut-link":
        return [(fault.targets[0], fault.targets[1]), (fault.targets[1], fault.targets[0])]
    node = fault.targets[0]  # isolate, delay: every link of one node, both ways
    return [link for other in HOSTS if other != node for link in ((node, other), (other, node))]


def run_chaos(run_dir: Path, *, seed: int, duration_s: float, **options: Any) -> Report:
    """Run one Jepsen-style test and return its report (``ringkv chaos``)."""
    return asyncio.run(ChaosRun(run_dir, seed=seed, duration_s=duration_s, **options).run())
