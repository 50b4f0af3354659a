"""The scale report: what one join or leave costs at 10 to 1,000 nodes (pure).

Issue #12 §6 asks three questions of a large cluster, and each is answered
here by the real pure cores, driven directly (no asyncio, no sockets):

* **Gossip convergence after a join** (Dynamo §4.8.1): ``N`` real
  ``Gossiper`` state machines and one joining node, in rounds of the gossip
  interval. Each node ticks once a round at its own fixed phase (its timer's
  offset within the second, seeded), and a Syn -> Ack -> Ack2 exchange
  completes before the next tick, as it does with millisecond latency. The
  joiner runs the real ``membership.JoinPlanner`` each round, allocates its
  tokens with ``ring.allocate_tokens`` on the ring it learnt through gossip
  (``membership.ring_from_gossip``), then announces TOKENS and NORMAL, as
  ``Node.join`` does. Counted: rounds until every node has heard of the
  joiner, and rounds from its NORMAL until every node holds its tokens.

  Why not the whole simulator (``sim/run.py``)? It runs every node's
  coordinator, store, transport and asyncio tasks on virtual time; gossip
  at 1,000 nodes there means a million simulated connections' worth of
  frames a round. The gossip decisions are all in the pure ``Gossiper``, so
  driving it directly measures the same protocol in minutes.

* **Data moved by one join or one leave** (Dynamo §6.2; RF 3): the share of
  all replicated data (``rf`` copies of every key) that must be streamed,
  i.e. for every piece of the ring, the replicas that hold it after the
  change but not before, weighted by the piece's width, over ``rf`` times
  the ring. The ideal is the newcomer's fair share 1/(N+1) for a join and
  the leaver's 1/N for a leave. Also recorded: which nodes receive data (a
  join should stream to the joiner alone, Dynamo §4.2).

* **Coordinator messages per operation**: the messages a coordinator's real
  plan sends for QUORUM writes and reads at RF 3 (``plan_for``, then for
  reads ``ReadRound`` and ``resolve`` fed agreeing answers), requests plus
  replies, over a seeded set of keys through random coordinators. Flat in
  N by construction of the plan; ``network`` excludes the coordinator's own
  replica (3/N of operations), which is why it creeps up with N.

The base ring of N nodes is a balanced one (``balanced_ring``): N x 16
evenly spaced tokens dealt to the nodes in a seeded random order. Growing
it by the real allocator node by node costs O(N^2) allocations' work (a
single allocation at 1,000 nodes takes ~17 s), so only the step under
test, the join, uses ``allocate_tokens``; what a leave moves depends on the
leaver's share, which the balanced ring keeps near 1/N as the allocator
does.

``check`` judges a report against bounds generous enough for any healthy
run and tight enough that each planted fault (``FAULTS``) fails it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ringkv.config import ClusterConfig, TimingConfig
from ringkv.coordinator.read_resolver import ReadRound, resolve
from ringkv.coordinator.replica_plan import plan_for
from ringkv.gossip import state as gs
from ringkv.gossip.failure_detector import PhiAccrualFailureDetector
from ringkv.gossip.gossiper import Gossiper, Outgoing
from ringkv.hlc import Timestamp
from ringkv.membership import JoinPlanner, JoinStep, joiners_ahead, ring_from_gossip
from ringkv.quorum import ConsistencyLevel
from ringkv.ring import MIN_TOKEN, RING_SIZE, NodeInfo, TokenRing, allocate_tokens, token_for
from ringkv.versioning import Cell, cell_digest

__all__ = [
    "SIZES",
    "RF",
    "FAULTS",
    "ScaleRow",
    "balanced_ring",
    "moved_share",
    "gossip_join",
    "coordinator_messages",
    "measure",
    "report",
    "check",
]

SIZES = (10, 30, 100, 1000)
RF = 3
NUM_TOKENS = ClusterConfig().num_tokens  # the default a node takes
CLUSTER = "scale"
JOINER = "joiner"
SEED_COUNT = 3  # every node lists the first three nodes as seeds
# Half a gossip interval of acceptable pause, as node.py configures its detector.
ACCEPTABLE_PAUSE_INTERVALS = 0.5
MAX_ROUNDS = 200  # a join that has not converged by then is reported as not converging
OPS = 300  # keys per operation kind in the message count

# Planted faults that check() must catch, one per question:
#   no-relay   gossip passes the joiner's state on only from the joiner itself
#   rehash     a join redeals the whole ring (placement by hash mod N)
#   broadcast  the coordinator asks every node, not the key's replicas
FAULTS = ("no-relay", "rehash", "broadcast")


@dataclass
class ScaleRow:
    nodes: int
    rounds_to_hear: int | None  # from the joiner's first gossip until all N know of it
    rounds_to_converge: int | None  # from its NORMAL until all N hold its tokens
    max_rounds: int  # rounds simulated at most (None above: not within them)
    learn_rounds: int  # rounds the JoinPlanner spent before taking tokens
    gossip_msgs_per_node_round: float  # Syn + Ack + Ack2, per node per round
    join_moved: float  # share of replicated data streamed when the joiner joins
    join_ideal: float  # 1/(N+1)
    join_receivers: list[str]  # nodes that receive data on the join
    leave_moved: float  # share streamed when one node (seeded pick) leaves
    leave_ideal: float  # 1/N
    write_msgs: float  # QUORUM write at RF 3: requests + replies per op
    read_msgs: float  # QUORUM read at RF 3
    write_network_msgs: float  # the same, without the coordinator's own replica
    read_network_msgs: float
    seed: int
    fault: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- rings ----------------------------------------------------------------------


def node_id(i: int) -> str:
    return f"n{i:04d}"


def balanced_ring(n: int, rng: random.Random, num_tokens: int = NUM_TOKENS) -> TokenRing:
    """N nodes, ``num_tokens`` each, on evenly spaced tokens dealt in a seeded random order."""
    owners = [node_id(i) for i in range(n) for _ in range(num_tokens)]
    rng.shuffle(owners)
    step = RING_SIZE // len(owners)
    offset = rng.randrange(RING_SIZE)
    tokens: dict[str, list[int]] = {}
    for k, owner in enumerate(owners):
        tokens.setdefault(owner, []).append(MIN_TOKEN + (offset + k * step) % RING_SIZE)
    return TokenRing(tokens)


def moved_share(before: TokenRing, after: TokenRing, rf: int) -> tuple[float, list[str]]:
    """The share of replicated data to stream from ``before`` to ``after``, and who receives it.

    Every piece of the ring between consecutive tokens of either ring has one
    replica set in each; the replicas new to it must receive the piece.
    """
    bounds = sorted({t for t, _ in before.sorted_tokens} | {t for t, _ in after.sorted_tokens})
    copies = 0
    receivers: set[str] = set()
    for i, end in enumerate(bounds):
        width = (end - bounds[i - 1]) % RING_SIZE or RING_SIZE
        new = set(after.replicas(end, rf)) - set(before.replicas(end, rf))
        if new:
            copies += width * len(new)
            receivers |= new
    return copies / (RING_SIZE * rf), sorted(receivers)


# --- gossip ---------------------------------------------------------------------


def _address(i: int) -> str:
    return f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}:7000"


def _detector(timing: TimingConfig) -> PhiAccrualFailureDetector:
    interval_s = timing.gossip_interval_ms / 1000
    return PhiAccrualFailureDetector(
        threshold=timing.phi_threshold,
        acceptable_pause_s=ACCEPTABLE_PAUSE_INTERVALS * interval_s,
        first_heartbeat_estimate_s=interval_s,
        max_interval_s=timing.phi_max_interval_ms / 1000,
    )


def _gossiper(nid: str, address: str, seeds: list[str], timing: TimingConfig) -> Gossiper:
    g = Gossiper(nid, CLUSTER, seeds, generation=1, detector=_detector(timing))
    g.set_local(gs.INTERNODE_ADDR, address)
    g.set_local(gs.DC, "dc1")
    g.set_local(gs.RACK, "rack1")
    return g


@dataclass
class _GossipJoin:
    rounds_to_hear: int | None
    rounds_to_converge: int | None
    learn_rounds: int
    msgs_per_node_round: float
    tokens: list[int]


def gossip_join(
    base: TokenRing, rng: random.Random, *, fault: str | None = None, max_rounds: int = MAX_ROUNDS
) -> _GossipJoin:
    """Gossip a joiner into a cluster holding ``base``; see the module docstring.

    The N nodes first learn each other the way a restarted cluster's saved
    peers would give them: one Ack2 with everyone's state, a tick, and a
    second Ack2 (their heartbeats advanced), which marks every peer UP.
    """
    timing = TimingConfig()
    ids = list(base.node_ids)
    seeds = [_address(i) for i in range(min(SEED_COUNT, len(ids)))]
    nodes = {nid: _gossiper(nid, _address(i), seeds, timing) for i, nid in enumerate(ids)}
    for nid, g in nodes.items():
        g.set_local(gs.TOKENS, gs.format_tokens(base.tokens_of(nid)))
        g.set_local(gs.STATUS, gs.NORMAL)
    by_addr = {_address(i): nodes[nid] for i, nid in enumerate(ids)}

    def share_everything(now_s: float) -> None:
        everyone = {nid: g.endpoint_states()[nid] for nid, g in nodes.items()}
        for g in nodes.values():
            g.handle(seeds[0], gs.Ack2(everyone), now_s)
            g.drain_events()

    share_everything(0.0)
    for g in nodes.values():
        g.tick(0.5, rng)  # beats the heartbeat; the Syns are not sent
    share_everything(1.0)

    joiner = _gossiper(JOINER, _address(len(ids)), seeds, timing)
    joiner.set_local(gs.STATUS, gs.BOOT)
    everyone = {**nodes, JOINER: joiner}
    by_addr[_address(len(ids))] = joiner
    phase = {nid: rng.random() for nid in everyone}
    order = sorted(everyone, key=phase.__getitem__)
    planner = JoinPlanner(bootstrap_new_cluster=False)

    messages = 0

    def send(sender: Gossiper, out: Outgoing, now_s: float) -> None:
        nonlocal messages
        pending = [(sender, out)]
        while pending:  # Syn -> Ack -> Ack2, each delivered at once
            src, msg = pending.pop()
            dest = by_addr[msg.to_addr]
            payload = msg.msg
            if fault == "no-relay" and src is not joiner and isinstance(payload, gs.Ack | gs.Ack2):
                payload = _without(payload, JOINER)
            messages += 1
            src_addr = src.address_of(src.node_id)
            assert src_addr is not None
            pending.extend((dest, reply) for reply in dest.handle(src_addr, payload, now_s))

    tokens: list[int] = []
    learn_rounds = 0
    heard_at: int | None = None
    normal_at: int | None = None
    converged_at: int | None = None
    start_s = 2.0
    for r in range(max_rounds):
        for nid in order:
            now_s = start_s + r + phase[nid]
            g = everyone[nid]
            if g is joiner and normal_at is None:
                learn_rounds = r
                if _join_step(joiner, planner, now_s) is JoinStep.DONE:
                    tokens = _allocate(joiner, rng)
                    joiner.set_local(gs.TOKENS, gs.format_tokens(tokens))
                    joiner.set_local(gs.STATUS, gs.NORMAL)
                    normal_at = r
            for out in g.tick(now_s, rng):
                send(g, out, now_s)
            g.drain_events()
        if heard_at is None and all(JOINER in g.endpoint_states() for g in nodes.values()):
            heard_at = r + 1
        if normal_at is not None and all(
            g.tokens_of(JOINER) == tokens and g.status_of(JOINER) == gs.NORMAL
            for g in nodes.values()
        ):
            converged_at = r + 1
            break
    rounds = (converged_at or max_rounds)
    return _GossipJoin(
        rounds_to_hear=heard_at,
        rounds_to_converge=None if converged_at is None or normal_at is None
        else converged_at - normal_at,
        learn_rounds=learn_rounds,
        msgs_per_node_round=messages / (rounds * len(everyone)),
        tokens=tokens,
    )


def _without(msg: gs.Ack | gs.Ack2, node: str) -> gs.Ack | gs.Ack2:
    states = {n: s for n, s in msg.states.items() if n != node}
    return gs.Ack(msg.digests_requested, states) if isinstance(msg, gs.Ack) else gs.Ack2(states)


def _view(joiner: Gossiper) -> TokenRing:
    """The ring as the joiner sees it (it has no tokens yet), as Node._rebuild_ring builds it."""
    ring, _ = ring_from_gossip(joiner.endpoint_states(), {}, NodeInfo(JOINER), [])
    return ring


def _join_step(joiner: Gossiper, planner: JoinPlanner, now_s: float) -> JoinStep:
    states = joiner.endpoint_states()
    return planner.step(
        known_peers=len(states) - 1,
        ring_size=len(_view(joiner)),
        only_seed_is_self=False,
        joiners_ahead=joiners_ahead(states, JOINER, lambda n: joiner.may_be_alive(n, now_s)),
    )


def _allocate(joiner: Gossiper, rng: random.Random) -> list[int]:
    """The tokens Node._load_or_allocate_tokens picks (without its 2**-24 jitter)."""
    return allocate_tokens(_view(joiner), NUM_TOKENS, rng, rf=RF)


# --- coordinator messages -----------------------------------------------------------


def coordinator_messages(
    ring: TokenRing, rng: random.Random, *, ops: int = OPS, fault: str | None = None
) -> dict[str, float]:
    """Messages per QUORUM write and read at RF 3, through random coordinators.

    Every replica answers and agrees, as in a healthy cluster: a write's
    plan sends to each live replica and each acknowledges; a read's
    ``ReadRound`` asks one replica for data and the rest of its quorum for
    digests, and ``resolve`` finds nothing to repair.
    """
    rf = len(ring) if fault == "broadcast" else RF
    cell = Cell(b'"v"', Timestamp(1, 0))
    digest = cell_digest(cell)
    nodes = ring.node_ids
    totals = {"write": 0, "read": 0, "write_network": 0, "read_network": 0}

    def count(kind: str, coordinator: str, node: str) -> None:
        totals[kind] += 2  # the request and its reply
        if node != coordinator:
            totals[f"{kind}_network"] += 2

    for k in range(ops):
        token = token_for(f"key-{rng.randrange(2**32)}-{k}".encode())
        coordinator = rng.choice(nodes)
        plan = plan_for(ring, "default", token, rf, ConsistencyLevel.QUORUM, _alive, write=True)
        for node in plan.live:
            count("write", coordinator, node)
        plan = plan_for(ring, "default", token, rf, ConsistencyLevel.QUORUM, _alive, write=False)
        read = ReadRound(plan.live[: plan.block_for], plan.live[plan.block_for :], plan.block_for)
        asks = list(read.start())
        while asks:
            ask = asks.pop(0)
            count("read", coordinator, ask.node)
            more = read.on_data(ask.node, cell) if ask.data else read.on_digest(ask.node, digest)
            asks.extend(more)
        resolution = resolve(read.data, read.digests, read.corrupt)
        if not resolution.resolved or resolution.stale:
            raise AssertionError("agreeing replicas needed no repair")  # a bug here, not a figure
    return {kind: total / ops for kind, total in totals.items()}


def _alive(node: str) -> bool:
    return True


# --- the report ---------------------------------------------------------------------


def measure(
    n: int, seed: int, *, fault: str | None = None, ops: int = OPS, max_rounds: int = MAX_ROUNDS
) -> ScaleRow:
    """One row: a cluster of ``n`` nodes, one join, one leave, and the message counts."""
    if n < RF + 1:
        raise ValueError(f"nodes must be at least {RF + 1}, got {n}")
    rng = random.Random(seed * 1_000_003 + n)
    base = balanced_ring(n, rng)
    join = gossip_join(base, rng, fault=fault, max_rounds=max_rounds)
    notes: list[str] = []
    if join.tokens:
        joined = base.with_node(JOINER, join.tokens)
        if fault == "rehash":  # placement by hash mod N: the whole ring is dealt afresh
            fresh = balanced_ring(n + 1, random.Random(rng.random()))
            joined = TokenRing({(JOINER if nid == node_id(n) else nid): fresh.tokens_of(nid)
                                for nid in fresh.node_ids})
        join_moved, receivers = moved_share(base, joined, RF)
    else:
        join_moved, receivers = math.nan, []
        notes.append(f"the joiner took no tokens within {max_rounds} rounds")
    leaver = rng.choice(base.node_ids)
    leave_moved, _ = moved_share(base, base.without_node(leaver), RF)
    msgs = coordinator_messages(base, rng, ops=ops, fault=fault)
    return ScaleRow(
        nodes=n,
        rounds_to_hear=join.rounds_to_hear,
        rounds_to_converge=join.rounds_to_converge,
        max_rounds=max_rounds,
        learn_rounds=join.learn_rounds,
        gossip_msgs_per_node_round=round(join.msgs_per_node_round, 3),
        join_moved=join_moved,
        join_ideal=1 / (n + 1),
        join_receivers=receivers,
        leave_moved=leave_moved,
        leave_ideal=1 / n,
        write_msgs=msgs["write"],
        read_msgs=msgs["read"],
        write_network_msgs=msgs["write_network"],
        read_network_msgs=msgs["read_network"],
        seed=seed,
        fault=fault,
        notes=notes,
    )


def report(
    sizes: Sequence[int] = SIZES,
    seed: int = 1,
    *,
    fault: str | None = None,
    progress: Callable[[ScaleRow], None] | None = None,
) -> list[ScaleRow]:
    rows = []
    for n in sizes:
        row = measure(n, seed, fault=fault)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


# --- the checker ----------------------------------------------------------------------

# Bounds (generous: a healthy run sits well inside each).
MOVED_FACTOR = 2.0  # data moved by a join or leave <= this x the ideal share
ROUNDS_PER_LOG2 = 4.0  # convergence rounds <= ROUNDS_PER_LOG2 * log2(N + 1) + ROUNDS_SLACK
ROUNDS_SLACK = 4


def rounds_bound(n: int) -> float:
    return ROUNDS_PER_LOG2 * math.log2(n + 1) + ROUNDS_SLACK


def check(rows: Sequence[ScaleRow]) -> list[str]:
    """What is wrong with a report (empty when it is sane)."""
    problems: list[str] = []
    for row in rows:
        n = row.nodes
        for what, rounds in (("hear of the joiner", row.rounds_to_hear),
                             ("hold the joiner's tokens", row.rounds_to_converge)):
            if rounds is None:
                problems.append(f"N={n}: nodes did not {what} within {row.max_rounds} rounds")
            elif rounds > rounds_bound(n):
                problems.append(f"N={n}: {rounds} rounds to {what}, over "
                                f"{ROUNDS_PER_LOG2:g}*log2(N+1)+{ROUNDS_SLACK} = {rounds_bound(n):.1f}")
        for what, moved, ideal in (("join", row.join_moved, row.join_ideal),
                                   ("leave", row.leave_moved, row.leave_ideal)):
            if not (0 < moved <= MOVED_FACTOR * ideal):  # NaN fails too
                problems.append(f"N={n}: a {what} moves {moved:.4f} of the data, ideal "
                                f"{ideal:.4f}, bound {MOVED_FACTOR:g}x")
        if row.join_receivers != [JOINER]:
            shown = ", ".join(row.join_receivers[:5]) + ("..." if len(row.join_receivers) > 5 else "")
            problems.append(f"N={n}: a join streams to {len(row.join_receivers)} nodes ({shown}), "
                            "not to the joiner alone")
    for kind in ("write_msgs", "read_msgs"):
        counts = {row.nodes: getattr(row, kind) for row in rows}
        if len(set(counts.values())) > 1:
            problems.append(f"{kind.replace('_', ' ')} per op differ across N: {counts}")
    return problems


def table(rows: Sequence[ScaleRow]) -> str:
    """The report as a plain-text table."""
    head = (f"{'nodes':>6} {'hear':>5} {'conv':>5} {'bound':>6} {'gossip':>7} "
            f"{'join moved':>11} {'ideal':>7} {'leave moved':>12} {'ideal':>7} "
            f"{'write':>6} {'read':>5} {'w net':>6} {'r net':>6}")
    lines = [head]
    for row in rows:
        lines.append(
            f"{row.nodes:>6} {_rounds(row.rounds_to_hear):>5} {_rounds(row.rounds_to_converge):>5} "
            f"{rounds_bound(row.nodes):>6.1f} {row.gossip_msgs_per_node_round:>7.2f} "
            f"{row.join_moved:>11.4f} {row.join_ideal:>7.4f} {row.leave_moved:>12.4f} "
            f"{row.leave_ideal:>7.4f} {row.write_msgs:>6.2f} {row.read_msgs:>5.2f} "
            f"{row.write_network_msgs:>6.2f} {row.read_network_msgs:>6.2f}"
        )
    return "\n".join(lines)


def _rounds(value: int | None) -> str:
    return "-" if value is None else str(value)
