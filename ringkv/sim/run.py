"""One simulated run: boot a cluster, run the workload under nemeses, heal, check.

Everything comes from ``SimSettings.seed``: the network's behaviour, the
faults, the clients' choices, each node's randomness. The same settings give
the same history, and so the same history hash.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ringkv.clock import SystemClock
from ringkv.config import Config, config_from_dict
from ringkv.coordinator import Coordinator
from ringkv.quorum import ConsistencyLevel, block_for
from ringkv.sim import bank, checkers, list_append
from ringkv.sim.bank_workload import BankSpec, BankWorkload
from ringkv.sim.checkers import Verdict
from ringkv.sim.cluster import SimCluster
from ringkv.sim.faults import FAULTS, NODE_FAULTS, TWO_PC_FAULTS, TXN_FAULTS
from ringkv.sim.history import FAIL, INFO, OK, Op, history_hash
from ringkv.sim.jepsen_history import Event, from_bank, from_list_append, from_register_history
from ringkv.sim.list_append_workload import ListAppendSpec, ListAppendWorkload
from ringkv.sim.linearizability import linearizable
from ringkv.sim.snapshot_reads import check_snapshot_reads, check_staleness
from ringkv.sim.loop import VirtualTimeLoop
from ringkv.sim.nemesis import NEMESES, TOPOLOGY, TWO_PC, FaultLog, Nemesis
from ringkv.sim.network import NetworkConditions, SimNetwork
from ringkv.sim.txn_client import TxnClient, warm_up
from ringkv.node import Node
from ringkv.txn.service import Op as TxnOp
from ringkv.sim.workload import (
    CommitObserver,
    RegisterSpec,
    RegisterWorkload,
    SafeTimeObserver,
    Workload,
    WorkloadSpec,
)

BOOT_TIMEOUT_S = 400.0  # virtual seconds for the cluster to form (joins stream one at a time)
HEAL_TIMEOUT_S = 60.0  # virtual seconds for every node to see every other UP again
QUIET_S = 10.0  # after healing: gossip and hint replay (replay also retries every 5 s)
SETTLE_S = 2.0  # after the final reads (whose read repair blocks), before replicas are compared
KEYSPACE = "default"
BOOT_MODES = ("join", "together", "provisioned")
# "eventual": writes and reads on an eventual keyspace; "register": single-key
# compare-and-set registers on a transactional one (RF 3), judged for linearizability;
# "bank" and "list-append": transactions across the ranges of a transactional
# keyspace (two-phase commit over their Paxos groups), judged by sim/bank.py and
# by sim/list_append.py (strict serializability).
TXN_WORKLOADS = ("bank", "list-append")
WORKLOADS = ("eventual", "register", *TXN_WORKLOADS)
TXN_KEYSPACE = "txn"
# The register workload's TrueTime floor: within Spanner's 1-7 ms, and above a
# commit's replication time here, so commit wait is what keeps ``s`` in the past.
REGISTER_MIN_UNCERTAINTY_MS = 5.0
# Spare machines for the join and wipe nemeses (each join or replacement uses one).
SPARES = 3
WARMUP_TIMEOUT_S = 30.0  # virtual seconds for clocks to sync and the groups to elect leaders


@dataclass(frozen=True)
class SimSettings:
    seed: int
    nodes: int = 5
    rf: int = 3
    ops: int = 2000
    clients: int = 10
    keys: int = 20
    read_cl: str = "QUORUM"
    write_cl: str = "QUORUM"
    nemesis: tuple[str, ...] = ()
    fault: str | None = None  # a deliberately broken coordinator, from faults.FAULTS
    duration_s: float = 60.0  # virtual seconds the workload is spread over
    commit_sync: str = "periodic"
    hints: bool = True
    write_fraction: float = 0.5
    max_skew_s: float = 0.25
    # "join": each node joins the ring in turn; "together": all start at once and
    # join; "provisioned": tokens preset (faster)
    boot: str = "join"
    workload: str = "eventual"
    # Share of the eventual workload's writes that are deletes (0: none).
    deletes: float = 0.0
    # timing.gc_grace_s (None: the config's default, 10 days); the repair
    # scheduler then runs every half of it, and tombstones are swept every quarter.
    gc_grace_s: int | None = None
    # The bank and list-append workloads: the transactional keyspace's ranges
    # (each its own Paxos group; every transaction spans at least two).
    ranges: int = 4

    def __post_init__(self) -> None:
        for kind in self.nemesis:
            if kind not in NEMESES:
                raise ValueError(f"unknown nemesis {kind!r}; choose from {', '.join(NEMESES)}")
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, "
                             f"not {self.workload!r}")
        if self.workload != "eventual" and (self.topology or self.deletes):
            raise ValueError("the topology nemeses and deletes are for the eventual workload")
        two_pc = [kind for kind in self.nemesis if kind in TWO_PC]
        if two_pc and self.workload not in TXN_WORKLOADS:
            raise ValueError(f"the nemeses {', '.join(two_pc)} are for the workloads "
                             f"{', '.join(TXN_WORKLOADS)}")
        if self.workload in TXN_WORKLOADS and not 2 <= self.ranges <= 64:
            raise ValueError(f"ranges must be 2 to 64 (transactions span ranges), "
                             f"not {self.ranges}")
        if not 0.0 <= self.deletes <= 1.0:
            raise ValueError(f"deletes must be a fraction of the writes (0 to 1), "
                             f"not {self.deletes}")
        if self.gc_grace_s is not None and self.gc_grace_s < 2:
            raise ValueError(f"gc_grace must be at least 2 s, not {self.gc_grace_s}")
        faults = (list(TXN_FAULTS) if self.workload == "register"
                  else [*TXN_FAULTS, *TWO_PC_FAULTS] if self.workload in TXN_WORKLOADS
                  else [*FAULTS, *NODE_FAULTS])
        if self.fault is not None and self.fault not in faults:
            raise ValueError(f"unknown fault {self.fault!r} for the {self.workload} workload; "
                             f"choose from {', '.join(faults)}")
        if self.boot not in BOOT_MODES:
            raise ValueError(f"boot must be one of {', '.join(BOOT_MODES)}, not {self.boot!r}")
        ConsistencyLevel.parse(self.read_cl, write=False)
        ConsistencyLevel.parse(self.write_cl, write=True)

    def command(self) -> str:
        """The command line that replays this run."""
        parts = [f"ringkv sim --seed {self.seed} --nodes {self.nodes} --ops {self.ops}",
                 f"--nemesis {','.join(self.nemesis) or 'none'}"]
        defaults = SimSettings(seed=0)
        for name, flag in (("rf", "--rf"), ("clients", "--clients"), ("keys", "--keys"),
                           ("read_cl", "--read"), ("write_cl", "--write"), ("fault", "--fault"),
                           ("duration_s", "--duration"), ("commit_sync", "--commit-sync"),
                           ("write_fraction", "--write-fraction"), ("max_skew_s", "--max-skew"),
                           ("boot", "--boot"), ("workload", "--workload"),
                           ("deletes", "--deletes"), ("gc_grace_s", "--gc-grace"),
                           ("ranges", "--ranges")):
            value = getattr(self, name)
            if value != getattr(defaults, name):
                parts.append(f"{flag} {value}")
        if not self.hints:
            parts.append("--no-hints")
        return " ".join(parts)

    @property
    def topology(self) -> tuple[str, ...]:
        """The topology nemeses among ``nemesis``."""
        return tuple(kind for kind in self.nemesis if kind in TOPOLOGY)

    @property
    def spares(self) -> int:
        """Machines held back for joins and replacements (none without those nemeses)."""
        return SPARES if {"join", "wipe"} & set(self.nemesis) else 0


@dataclass
class SimResult:
    settings: SimSettings
    history: list[Op]
    faults: list[str]
    fault_count: int
    verdicts: list[Verdict]
    history_hash: str
    network: str
    network_stats: dict[str, int]
    virtual_s: float
    wall_s: float = 0.0
    # The client history in Jepsen's form (bank and list-append; the others' is
    # derived from ``history``).
    events: list[Event] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)

    def verdict(self, name_start: str) -> Verdict:
        return next(v for v in self.verdicts if v.name.startswith(name_start))

    @property
    def client_ops(self) -> int:
        return sum(1 for op in self.history if not op.final)

    def jepsen_events(self) -> list[Event]:
        """The client history as Jepsen's invoke/ok/fail/info events (``--history-out``)."""
        return self.events if self.events is not None else from_register_history(self.history)


@dataclass(frozen=True)
class Promises:
    """What a run's settings promise, so a checker knows whether to judge or to measure."""

    synced_clocks: bool  # timestamps follow real time, so LWW keeps the latest write
    durable: bool  # no acknowledged write is lost
    fresh_reads: bool  # no read misses a write acknowledged before it began

    @classmethod
    def of(cls, settings: SimSettings) -> Promises:
        synced = "skew" not in settings.nemesis
        # A machine crash loses the last unsynced writes in periodic mode (documented):
        # two replicas of a key crashing within one sync interval lose them for good.
        survives_power = settings.commit_sync == "batch" or "power" not in settings.nemesis
        read_cl, write_cl = ConsistencyLevel(settings.read_cl), ConsistencyLevel(settings.write_cl)
        overlap = (block_for(read_cl, settings.rf) + block_for(write_cl, settings.rf)
                   > settings.rf)
        durable = synced and survives_power
        return cls(synced, durable, durable and overlap)


def network_conditions(rng: random.Random) -> NetworkConditions:
    """A network for this seed: mostly fast, sometimes slow, writes often split
    into pieces, and now and then a connection reset."""
    return NetworkConditions(
        latency_s=rng.uniform(0.0002, 0.002),
        jitter_s=rng.uniform(0.0001, 0.001),
        delay=rng.choice((0.0, 0.01, 0.05)),
        delay_max_s=rng.uniform(0.005, 0.1),
        split=rng.choice((0.05, 0.25, 0.5)),
        reset=rng.choice((0.0, 0.0, 0.0001, 0.001)),
    )


def node_configs(settings: SimSettings) -> list[Config]:
    """The members' configs, then the spare machines' (``settings.spares``)."""
    configs = []
    for i in range(settings.nodes + settings.spares):
        timing: dict[str, object] = {"max_hint_window_s": 10800 if settings.hints else 0}
        raw: dict[str, object] = {
            "cluster": {"name": "sim", "node_id": f"n{i + 1}", "listen_host": "127.0.0.1",
                        "client_port": 7400 + i, "internode_port": 7500 + i,
                        "seeds": ["127.0.0.1:7500"]},
            "keyspaces": {KEYSPACE: {"replication_factor": settings.rf}},
            "storage": {"engine": "memory", "commit_sync": settings.commit_sync},
            # 0 turns hinted handoff off.
            "timing": timing,
        }
        if settings.gc_grace_s is not None:
            # Tombstones may go within the run, once a repair (every half of
            # gc_grace: the default interval) has spread them (tombstone_gc: repair).
            timing["gc_grace_s"] = settings.gc_grace_s
            timing["tombstone_sweep_interval_s"] = max(1, settings.gc_grace_s // 4)
        if settings.workload == "register" or settings.workload in TXN_WORKLOADS:
            txn: dict[str, object] = {"replication_factor": 3, "tier": "transactional"}
            if settings.workload in TXN_WORKLOADS:
                txn["ranges"] = settings.ranges
            raw["keyspaces"] = {KEYSPACE: {"replication_factor": settings.rf},
                                TXN_KEYSPACE: txn}
            raw["truetime"] = {"min_uncertainty_ms": REGISTER_MIN_UNCERTAINTY_MS}
        configs.append(config_from_dict(raw))
    return configs


def simulate(settings: SimSettings, *, node_logs: bool = False) -> SimResult:
    """Run one simulation to the end (single-threaded, on virtual time).

    The nodes' own logging is muted unless ``node_logs``: hundreds of simulated
    outages would otherwise log thousands of (correct) warnings.
    """
    wall = SystemClock()
    started = wall.monotonic_s()
    loop = VirtualTimeLoop()
    ringkv_log = logging.getLogger("ringkv")
    saved_level = ringkv_log.level
    if not node_logs:
        ringkv_log.setLevel(logging.CRITICAL)
    # Reference counting alone frees objects at the same points in every run; the
    # cycle collector would run at points that depend on the process's past.
    gc_enabled = gc.isenabled()
    gc.disable()
    run = (_run_register if settings.workload == "register"
           else _run_txn if settings.workload in TXN_WORKLOADS else _run)
    try:
        result = loop.run_until_complete(run(settings, loop))
    finally:
        loop.dispose()
        if gc_enabled:
            gc.enable()
        ringkv_log.setLevel(saved_level)
    result.wall_s = wall.monotonic_s() - started
    return result


async def _run(settings: SimSettings, loop: VirtualTimeLoop) -> SimResult:
    seed = settings.seed
    conditions = network_conditions(random.Random(f"{seed}/network"))
    network = SimNetwork(loop, random.Random(f"{seed}/packets"), conditions)
    coordinator_class = FAULTS.get(settings.fault or "", Coordinator)
    cluster = SimCluster(loop, network, node_configs(settings), seed, coordinator_class,
                         NODE_FAULTS.get(settings.fault or ""), spares=settings.spares)
    log = FaultLog(loop)

    provision = random.Random(f"{seed}/tokens") if settings.boot == "provisioned" else None
    await cluster.boot(BOOT_TIMEOUT_S, provision=provision, together=settings.boot == "together")
    log.note(f"cluster of {settings.nodes} is up; workload starts")
    spec = WorkloadSpec(
        ops=settings.ops, clients=settings.clients, keys=settings.keys,
        write_fraction=settings.write_fraction,
        read_cl=ConsistencyLevel(settings.read_cl), write_cl=ConsistencyLevel(settings.write_cl),
        duration_s=settings.duration_s, delete_fraction=settings.deletes,
    )
    workload = Workload(spec, cluster, seed)
    stop = asyncio.Event()
    nemeses = [
        asyncio.ensure_future(Nemesis(kind, cluster, random.Random(f"{seed}/nemesis/{kind}"), log,
                                      max_skew_s=settings.max_skew_s, rf=settings.rf).run(stop))
        for kind in settings.nemesis
    ]
    await workload.run()
    stop.set()
    await asyncio.gather(*nemeses)
    await cluster.heal()
    log.note("workload done; every fault healed")
    healed = await cluster.wait_settled(HEAL_TIMEOUT_S)
    await asyncio.sleep(QUIET_S)
    await workload.final_reads(ConsistencyLevel.ALL)
    await asyncio.sleep(SETTLE_S)
    replicas = cluster.replicas(KEYSPACE, spec.key_names, settings.rf)
    cluster.stop_all()

    history = workload.history()
    promises = Promises.of(settings)
    verdicts = [
        checkers.lost_writes(history, promised=promises.durable),
        checkers.stale_reads(history, promised=promises.fresh_reads),
        checkers.phantom_reads(history),
        checkers.convergence(replicas),
        checkers.discarded_writes(history, promised=promises.synced_clocks),
        checkers.resurrected_reads(history, promised=promises.fresh_reads,
                                   final_promised=promises.durable),
        _health(healed, loop.errors, workload.unexpected),
    ]
    return SimResult(
        settings=settings, history=history, faults=log.lines, fault_count=log.count,
        verdicts=verdicts, history_hash=history_hash(history, log.lines),
        network=conditions.describe(), network_stats=dict(network.stats),
        virtual_s=loop.time(),
    )


async def _run_register(settings: SimSettings, loop: VirtualTimeLoop) -> SimResult:
    seed = settings.seed
    conditions = network_conditions(random.Random(f"{seed}/network"))
    network = SimNetwork(loop, random.Random(f"{seed}/packets"), conditions)
    observer = CommitObserver(loop)
    safe_time = SafeTimeObserver()
    plant = TXN_FAULTS[settings.fault] if settings.fault else None

    def hook(node: Node) -> None:
        if plant is not None:
            plant(node)
        observer.attach(node)
        safe_time.attach(node)

    cluster = SimCluster(loop, network, node_configs(settings), seed, Coordinator, hook)
    log = FaultLog(loop)
    provision = random.Random(f"{seed}/tokens") if settings.boot == "provisioned" else None
    await cluster.boot(BOOT_TIMEOUT_S, provision=provision, together=settings.boot == "together")
    spec = RegisterSpec(ops=settings.ops, clients=settings.clients, keys=settings.keys,
                        duration_s=settings.duration_s, keyspace=TXN_KEYSPACE)
    workload = RegisterWorkload(spec, cluster, seed)
    warm = await _warm_up(cluster, spec, loop)
    log.note(f"cluster of {settings.nodes} is up; "
             f"{'groups elected' if warm else 'groups not all ready'}; workload starts")
    stop = asyncio.Event()
    falsetickers = (settings.nodes - 1) // 2  # TrueTime tolerates a minority
    nemeses = [
        asyncio.ensure_future(Nemesis(kind, cluster, random.Random(f"{seed}/nemesis/{kind}"), log,
                                      max_skew_s=settings.max_skew_s,
                                      falsetickers=falsetickers).run(stop))
        for kind in settings.nemesis
    ]
    await workload.run()
    stop.set()
    await asyncio.gather(*nemeses)
    await cluster.heal()
    log.note("workload done; every fault healed")
    healed = await cluster.wait_settled(HEAL_TIMEOUT_S)
    await workload.resolve_unknown()
    await workload.final_reads()
    resolved = ", ".join(f"{n} {what}" for what, n in sorted(workload.resolved.items()))
    log.note(f"unknown outcomes asked by transaction id: {resolved or 'none'}")
    cluster.stop_all()
    history = workload.history()
    verdicts = [
        linearizable(workload.register_history()),
        observer.verdict(),
        check_snapshot_reads(workload.snapshot_reads, workload.known_writes()),
        check_staleness(workload.snapshot_reads),
        safe_time.verdict(),
        _health(healed, loop.errors, workload.unexpected),
    ]
    return SimResult(
        settings=settings, history=history, faults=log.lines, fault_count=log.count,
        verdicts=verdicts, history_hash=history_hash(history, log.lines),
        network=conditions.describe(), network_stats=dict(network.stats),
        virtual_s=loop.time(),
    )


async def _warm_up(cluster: SimCluster, spec: RegisterSpec, loop: VirtualTimeLoop) -> bool:
    """Read every key once (unrecorded, changes nothing), so clocks are synced and each
    key's group has a leader before the clients start; bounded."""
    deadline_s = loop.time() + WARMUP_TIMEOUT_S
    for key in spec.key_names:
        while loop.time() < deadline_s:
            machine = cluster.machines[0]
            node = machine.node
            assert node is not None
            task = machine.run(node.txn.execute(TxnOp("get", spec.keyspace, key=key.encode()),
                                                started_s=node.clock.monotonic_s(),
                                                timeout_s=1.0))
            await asyncio.wait([task])
            if task.exception() is None:
                break
            await asyncio.sleep(0.2)
    return loop.time() < deadline_s


# The bank and list-append workloads: what a run waits for, in virtual seconds.
OPEN_TIMEOUT_S = 30.0  # the accounts' opening transaction (before any fault)
SETTLE_2PC_S = 30.0  # after healing, for every prepared transaction to be decided
EXCERPT_TXN_LINES = 40  # lines of a list-append or bank report shown


async def _run_txn(settings: SimSettings, loop: VirtualTimeLoop) -> SimResult:
    seed = settings.seed
    conditions = network_conditions(random.Random(f"{seed}/network"))
    network = SimNetwork(loop, random.Random(f"{seed}/packets"), conditions)
    plants = {**TXN_FAULTS, **TWO_PC_FAULTS}
    plant = plants[settings.fault] if settings.fault else None
    cluster = SimCluster(loop, network, node_configs(settings), seed, Coordinator, plant)
    log = FaultLog(loop)
    provision = random.Random(f"{seed}/tokens") if settings.boot == "provisioned" else None
    await cluster.boot(BOOT_TIMEOUT_S, provision=provision, together=settings.boot == "together")
    workload: BankWorkload | ListAppendWorkload
    if settings.workload == "bank":
        workload = BankWorkload(BankSpec(
            ops=settings.ops, clients=settings.clients, accounts=settings.keys,
            ranges=settings.ranges, duration_s=settings.duration_s, keyspace=TXN_KEYSPACE),
            cluster, seed)
        keys = workload.accounts
    else:
        workload = ListAppendWorkload(ListAppendSpec(
            ops=settings.ops, clients=settings.clients, keys=settings.keys,
            ranges=settings.ranges, duration_s=settings.duration_s, keyspace=TXN_KEYSPACE),
            cluster, seed)
        keys = workload.keys
    warm = await warm_up(TxnClient(cluster, TXN_KEYSPACE, 1.0), keys, WARMUP_TIMEOUT_S)
    opened = (await workload.open(OPEN_TIMEOUT_S) if isinstance(workload, BankWorkload)
              else True)
    log.note(f"cluster of {settings.nodes} is up; "
             f"{'groups elected' if warm else 'groups not all ready'}; "
             f"{settings.ranges} ranges; workload starts")
    stop = asyncio.Event()
    falsetickers = (settings.nodes - 1) // 2  # TrueTime tolerates a minority
    nemeses = [
        asyncio.ensure_future(Nemesis(kind, cluster, random.Random(f"{seed}/nemesis/{kind}"), log,
                                      max_skew_s=settings.max_skew_s,
                                      falsetickers=falsetickers).run(stop))
        for kind in settings.nemesis
    ]
    await workload.run()
    stop.set()
    await asyncio.gather(*nemeses)
    await cluster.heal()
    log.note("workload done; every fault healed")
    healed = await cluster.wait_settled(HEAL_TIMEOUT_S)
    final = await workload.final_read()
    undecided = await _undecided_after(cluster, loop, SETTLE_2PC_S)
    cluster.stop_all()
    problems = [] if final else ["after healing, the final read never answered"]
    if not opened:
        problems.append("the accounts were never opened")
    if undecided:
        problems.append(f"{len(undecided)} transaction(s) still prepared and undecided "
                        f"{SETTLE_2PC_S:.0f} s after healing: {', '.join(undecided[:5])}")
    history = workload.history()
    events: list[Event]
    if isinstance(workload, BankWorkload):
        found = bank.check(workload.initial, workload.transfers, workload.snapshots)
        lines = [line for anomaly in found for line in anomaly.render().splitlines()]
        checked = sum(1 for s in workload.snapshots if s.status == OK)
        judged = Verdict("bank", True, f"{checked} read-only snapshots sum to the total and "
                         "hold no negative balance") if not found else Verdict(
            "bank", False, f"{len(found)} of {checked} read-only snapshots wrong "
            f"({', '.join(sorted({a.kind for a in found}))})", len(found),
            tuple(lines[:EXCERPT_TXN_LINES]))
        events = from_bank(workload.transfers, workload.snapshots)
    else:
        report = list_append.analyse(workload.txns, realtime=True)
        lines = report.render().splitlines()[1:]
        judged = Verdict("list-append", report.ok, report.summary(), len(report.anomalies),
                         tuple(lines[:EXCERPT_TXN_LINES]))
        events = from_list_append(workload.txns)
    verdicts = [judged, _health(healed, loop.errors, workload.unexpected + problems)]
    return SimResult(
        settings=settings, history=history, faults=log.lines, fault_count=log.count,
        verdicts=verdicts, history_hash=history_hash(history, log.lines),
        network=conditions.describe(), network_stats=dict(network.stats),
        virtual_s=loop.time(), events=events,
    )


async def _undecided_after(cluster: SimCluster, loop: VirtualTimeLoop,
                           timeout_s: float) -> list[str]:
    """Wait (bounded) until no replica holds a prepared transaction still undecided
    (nothing blocks forever: issue #13 §1); the ones left then."""
    deadline_s = loop.time() + timeout_s
    while True:
        left = sorted({f"{txn_id} in {gid} at {m.node_id}" for m in cluster.up()
                       if m.node is not None for gid, g in m.node.txn.groups.items()
                       for txn_id in g.runner.records.prepared()})
        if not left or loop.time() >= deadline_s:
            return left
        await asyncio.sleep(0.5)


def _health(healed: bool, loop_errors: list[str], unexpected: list[str]) -> Verdict:
    """The cluster healed, and no node raised anything but ringkv errors."""
    problems = ([] if healed else ["after healing, some node never saw every other UP"])
    problems += [f"unhandled: {e}" for e in loop_errors] + [f"unexpected: {e}" for e in unexpected]
    if problems:
        return Verdict("cluster health", False, f"{len(problems)} problem(s)", len(problems),
                       tuple(problems[:checkers.EXCERPT_LINES]))
    return Verdict("cluster health", True, "healed; no unhandled or unexpected exceptions")


def format_report(result: SimResult, *, show_history: bool = False) -> str:
    """Everything about one run: what ran, what the checkers said, how to replay it."""
    settings = result.settings
    history = result.history
    client_ops = [op for op in history if not op.final]
    counts = Counter((op.kind, op.status) for op in client_ops)
    register = settings.workload == "register"
    across = settings.workload in TXN_WORKLOADS
    kinds = (("write", "cas", "read", "snapshot") if register
             else ("transfer", "read") if settings.workload == "bank"
             else ("append", "read") if across
             else ("write", "delete", "read") if settings.deletes else ("write", "read"))
    lines = [
        f"$ {settings.command()}",
        f"network: {result.network}",
        (f"transactional keyspace {TXN_KEYSPACE!r} (rf 3, SERIAL)" if register else
         f"transactional keyspace {TXN_KEYSPACE!r} (rf 3) in {settings.ranges} ranges; "
         "reads are lock-free read-only transactions" if across else
         f"consistency: writes {settings.write_cl}, reads {settings.read_cl}, "
         f"rf {settings.rf}") + f"; fault switch: {settings.fault or 'none'}",
        "ops: " + "; ".join(
            f"{sum(counts[(kind, s)] for s in ('ok', 'fail', 'info'))} {kind}s "
            f"({counts[(kind, 'ok')]} ok, {counts[(kind, 'fail')]} fail, "
            f"{counts[(kind, 'info')]} indeterminate)"
            for kind in kinds
        ) + f"; {sum(1 for op in history if op.final)} final reads at "
        + ("SERIAL" if register or across else "ALL"),
        "streams: " + ", ".join(f"{k} {v}" for k, v in result.network_stats.items()),
        f"faults injected: {result.fault_count}",
        *(f"  {line}" for line in result.faults),
    ]
    if show_history:
        lines.append("history:")
        lines.extend(f"  {op.line()}" for op in history)
    lines.append(f"virtual time {result.virtual_s:.1f} s, wall time {result.wall_s:.2f} s "
                 f"({result.client_ops / max(result.wall_s, 1e-9):.0f} client ops/s)")
    lines.append("checkers:")
    lines.extend(f"  {verdict.render()}" for verdict in result.verdicts)
    lines.append(f"history hash: {result.history_hash}")
    if not result.ok:
        lines.append(f"FAILED; replay with: {settings.command()}")
    return "\n".join(lines)


def format_line(result: SimResult) -> str:
    """One line per run, for a series of seeds."""
    counts = run_counts(result)
    if result.settings.workload in TXN_WORKLOADS:
        what = "transfers" if result.settings.workload == "bank" else "appends"
        return (f"seed {result.settings.seed:>5}: {'ok    ' if result.ok else 'FAILED'} "
                f"{counts['ops']:>4} txns, {counts['committed']:>3} {what} committed, "
                f"{counts['aborted']:>3} not, {counts['unknown']:>3} unknown, "
                f"{counts['reads']:>4} read-only, {result.fault_count:>3} faults; "
                f"anomalies {counts['anomalies']}; hash {result.history_hash}")
    if result.settings.workload == "register":
        return (f"seed {result.settings.seed:>5}: {'ok    ' if result.ok else 'FAILED'} "
                f"{counts['ops']:>5} ops, {counts['acked']:>4} acked writes/cas, "
                f"{counts['unknown']:>3} unknown, {counts['commits']:>4} commits, "
                f"{counts['snapshots']:>4} snapshot reads, "
                f"{result.fault_count:>3} faults; not linearizable {counts['nonlinear']}, "
                f"commit wait broken {counts['early']}, snapshot reads wrong "
                f"{counts['snapshot_wrong']}, too stale {counts['too_stale']}, above safe time "
                f"{counts['unsafe']}; "
                f"hash {result.history_hash}")
    return (f"seed {result.settings.seed:>5}: {'ok    ' if result.ok else 'FAILED'} "
            f"{counts['ops']:>6} ops, {counts['acked']:>5} acked writes, {counts['reads']:>5} reads, "
            f"{result.fault_count:>3} faults; lost {counts['lost']}, stale {counts['stale']}, "
            f"discarded {counts['discarded']}"
            + (f", resurrected {counts['resurrected']}" if result.settings.deletes else "")
            + f"; hash {result.history_hash}")


def format_totals(results: list[SimResult]) -> str:
    """What a series of runs measured, summed (the figures README's Guarantees quote)."""
    total = series_counts(results)
    failed = [r for r in results if not r.ok]
    if results and results[0].settings.workload in TXN_WORKLOADS:
        bank_run = results[0].settings.workload == "bank"
        what = "transfers" if bank_run else "append transactions"
        lines = [
            f"{len(results)} runs, {len(failed)} failed: {total['ops']} client transactions "
            f"({total['committed']} {what} committed, {total['aborted']} certainly not, "
            f"{total['unknown']} unknown; {total['reads']} read-only transactions answered), "
            f"{total['faults']} faults injected",
            (f"  read-only snapshots that break the total or show a negative balance: "
             f"{total['anomalies']}" if bank_run else
             f"  anomalies (G0, G1a/b/c, G-single, G2, with real time): {total['anomalies']}"),
            f"  runs whose cluster was unhealthy after healing (incl. 2PC left undecided): "
            f"{total['unhealthy']}",
        ]
        lines.extend(f"FAILED; replay with: {r.settings.command()}" for r in failed)
        return "\n".join(lines)
    if results and results[0].settings.workload == "register":
        lines = [
            f"{len(results)} runs, {len(failed)} failed: {total['ops']} client ops "
            f"({total['acked']} acknowledged writes/cas, {total['unknown']} unknown), "
            f"{total['faults']} faults injected",
            f"  runs whose register history is not linearizable: {total['nonlinear']}",
            f"  commits acknowledged before true time reached s: {total['early']} "
            f"of {total['commits']}",
            f"  snapshot reads not returning the newest commit at or below their timestamp: "
            f"{total['snapshot_wrong']} of {total['snapshots']}",
            f"  bounded-staleness reads older than their bound: {total['too_stale']}",
            f"  snapshot reads served above the replica's safe time: {total['unsafe']}",
        ]
        lines.extend(f"FAILED; replay with: {r.settings.command()}" for r in failed)
        return "\n".join(lines)
    lines = [
        f"{len(results)} runs, {len(failed)} failed: {total['ops']} client ops, "
        f"{total['faults']} faults injected",
        f"  lost acknowledged writes: {total['lost']} of {total['acked']}",
        f"  stale reads: {total['stale']} of {total['reads']} "
        f"({100 * total['stale'] / max(1, total['reads']):.2f}%)",
        f"  reads of values never written: {total['phantom']}",
        f"  keys whose replicas differ after healing: {total['diverged']}",
        f"  acknowledged writes discarded by LWW: {total['discarded']} of {total['acked']}",
    ]
    if total["deletes"]:
        lines.append(f"  reads returning a value after its deletion was acknowledged: "
                     f"{total['resurrected']} ({total['deletes']} deletes acknowledged)")
    lines.extend(f"FAILED; replay with: {r.settings.command()}" for r in failed)
    return "\n".join(lines)


def series_counts(results: list[SimResult]) -> Counter[str]:
    """``run_counts`` summed over a series of runs."""
    total = Counter[str]()
    for result in results:
        total.update(run_counts(result))
    return total


def run_counts(result: SimResult) -> dict[str, int]:
    """The figures one run measured: client ops, acknowledged writes, successful
    reads, faults, and how many items each checker flagged."""
    client = [op for op in result.history if not op.final]
    if result.settings.workload in TXN_WORKLOADS:
        writes = [op for op in client if op.kind in ("transfer", "append")]
        return {
            "ops": len(client),
            "committed": sum(1 for op in writes if op.status == OK),
            "aborted": sum(1 for op in writes if op.status == FAIL),
            "unknown": sum(1 for op in writes if op.status == INFO),
            "reads": sum(1 for op in client if op.kind == "read" and op.status == OK),
            "anomalies": result.verdicts[0].count if result.verdicts else 0,
            "unhealthy": sum(1 for v in result.verdicts
                             if v.name == "cluster health" and not v.ok),
            "failed": int(not result.ok),
            "faults": result.fault_count,
        }
    if result.settings.workload == "register":
        early = result.verdict("commit wait")
        return {
            "ops": len(client),
            "acked": sum(1 for op in client if op.kind in ("write", "cas") and op.status == "ok"),
            "snapshots": sum(1 for op in client if op.kind == "snapshot" and op.status == "ok"),
            "snapshot_wrong": result.verdict("snapshot reads").count,
            "too_stale": result.verdict("bounded staleness").count,
            "unsafe": result.verdict("safe time").count,
            "failed": int(not result.ok),  # a negative control's run: caught
            "unknown": sum(1 for op in client if op.status == "info"),
            "nonlinear": int(not result.verdict("linearizable").ok),
            "early": early.count,
            # "N commits acknowledged ..." or "k of N commits acknowledged ..."
            "commits": int(early.summary.split()[0 if early.ok else 2]),
            "faults": result.fault_count,
        }
    return {
        "ops": len(client),
        "acked": sum(1 for op in client if op.kind in checkers.MUTATIONS and op.status == "ok"),
        "deletes": sum(1 for op in client if op.kind == "delete" and op.status == "ok"),
        "reads": sum(1 for op in client if op.kind == "read" and op.status == "ok"),
        "lost": result.verdict("lost").count,
        "stale": result.verdict("stale").count,
        "phantom": result.verdict("reads of values").count,
        "diverged": result.verdict("replicas").count,
        "discarded": result.verdict("writes discarded").count,
        "resurrected": result.verdict("resurrected").count,
        "faults": result.fault_count,
    }
