"""The list-append checker: isolation anomalies inferred from a history (pure).

Kingsbury and Alvaro, "Elle: Inferring Isolation Anomalies from Experimental
Observations" (VLDB 2020). Transactions append values to lists and read whole
lists; every value appended to a key is unique, so a value read names the
transaction that appended it (traceability), and because a list keeps every
append in order, the longest read of a key reveals that key's version order
(recoverability). From those orders the checker infers Adya's dependencies
("Weak Consistency", 1999):

* ``ww``: T1 appended a value and T2 appended the next one in the key's order;
* ``wr``: T2 read a list whose last element T1 appended;
* ``rw``: T1 read a list and T2 appended the element that follows it;
* ``rt``: T1 completed before T2 was invoked (real time, for strict
  serializability).

A cycle among them is an anomaly, named by Adya's phenomena: G0 (``ww``
only), G1c (``ww`` and ``wr``), G-single (exactly one ``rw``), G2 (two or more
``rw``), and each with ``-realtime`` appended when the cycle needs an ``rt``
edge (serializable, but not strictly). Anomalies seen without cycles: G1a
(a read of a failed transaction's append), G1b (a read ending at a value that
is not its transaction's last append to the key), incompatible order (two
reads of a key, neither a prefix of the other), duplicate elements in a read,
garbage (a value nobody appended), and internal (a transaction's read that
does not show its own earlier appends and reads).

A transaction whose outcome is unknown (``info``) may or may not have
committed: its appends may be read and order like any other, and reading them
is no G1a. Its reads are not known.

Cycle search is polynomial and bounded: strongly connected components
(networkx); then, for each kind in turn, a candidate edge is tried only if a
path of the allowed kinds leads back from its head to its tail (reachability
bitsets over the condensation), and closed by a shortest path (a breadth-first
search over (transaction, rw edges used) states). At most ``MAX_TRIES``
candidates per component and kind, ``MAX_STEPS`` search states in all, and
``MAX_PER_KIND`` cycles reported per kind; ``Report.truncated`` says when a
bound cut a search short.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

# networkx ships no type information; it finds the strongly connected components.
import networkx as nx  # type: ignore[import-untyped]

OK, FAIL, INFO = "ok", "fail", "info"
APPEND, READ = "append", "r"
WW, WR, RW, RT = "ww", "wr", "rw", "rt"

MAX_PER_KIND = 8  # cycles reported per anomaly kind (the first few say what broke)
MAX_TRIES = 256  # candidate edges tried per component and kind: bounds the search
MAX_NON_CYCLE = 64  # non-cycle anomalies reported per kind
SHOWN_ELEMENTS = 6  # a long list is printed as its last few elements
MAX_STEPS = 1_000_000  # search states expanded in one check, in all: bounds the time
MAX_BITSET_NODES = 20_000  # reachability bitsets up to this many transactions (50 MB)

# When one pair of transactions has several dependencies, a cycle is explained by
# the weakest: it needs real time only if nothing else closes it.
_LABEL_ORDER = (WW, WR, RW, RT)

Key = Hashable
MicroOp = tuple[str, Key, object]  # ("append", key, value) or ("r", key, [values] | None)


@dataclass(frozen=True)
class Txn:
    """One transaction: what it did, how it ended and when.

    ``ops`` are ("append", key, value) and ("r", key, values) in program order;
    a read's values are the list it saw (None until known: an ``info`` or
    ``fail`` transaction's reads are unknown). ``invoke`` and ``complete`` are
    seconds on the clients' shared clock; ``complete`` is None when no answer came.
    """

    id: int
    process: str
    ops: tuple[MicroOp, ...]
    status: str  # OK, FAIL or INFO
    invoke: float
    complete: float | None = None

    def __post_init__(self) -> None:
        if self.status not in (OK, FAIL, INFO):
            raise ValueError(f"txn {self.id}: status {self.status!r}")
        for op in self.ops:
            if op[0] not in (APPEND, READ) or len(op) != 3:
                raise ValueError(f"txn {self.id}: micro-op {op!r}")
        if self.status == OK and self.complete is None:
            raise ValueError(f"txn {self.id}: ok without a completion time")

    def describe(self) -> str:
        parts = []
        for f, key, value in self.ops:
            if f == APPEND:
                parts.append(f"append {key} {value!r}")
            else:
                parts.append(f"r {key} {'?' if value is None else _short(_values(value))}")
        end = "..." if self.complete is None else f"{self.complete:.3f}"
        return (f"T{self.id} ({self.process} {self.status} {self.invoke:.3f}-{end}): "
                f"[{', '.join(parts)}]")


@dataclass(frozen=True)
class Edge:
    """One step of a cycle: ``src`` -kind-> ``dst``, and the observation behind it."""

    src: int
    kind: str
    dst: int
    why: str


@dataclass(frozen=True)
class Anomaly:
    kind: str  # "G0", "G1c-realtime", "incompatible-order", ...
    txns: tuple[int, ...]
    detail: str
    cycle: tuple[Edge, ...] = ()
    lines: tuple[str, ...] = ()  # the transactions involved, as operations

    def render(self) -> str:
        head = f"{self.kind}: {self.detail}"
        steps = [f"  T{e.src} -{e.kind}-> T{e.dst}  ({e.why})" for e in self.cycle]
        return "\n".join([head, *steps, *(f"    {line}" for line in self.lines)])


@dataclass
class Report:
    anomalies: list[Anomaly]
    txns: int = 0
    edges: dict[str, int] = field(default_factory=dict)  # edges of each kind
    components: int = 0  # strongly connected components with a cycle
    truncated: bool = False  # a search hit MAX_TRIES: a cycle may have gone unreported

    @property
    def ok(self) -> bool:
        return not self.anomalies

    def kinds(self) -> set[str]:
        return {a.kind for a in self.anomalies}

    def summary(self) -> str:
        """One line, for a run's report."""
        edges = ", ".join(f"{n} {k}" for k, n in sorted(self.edges.items()))
        found = ", ".join(f"{n} {k}" for k, n in sorted(_count(self.anomalies).items()))
        tail = "; search cut short by its bounds" if self.truncated else ""
        return (f"{self.txns} transactions, edges: {edges or 'none'}; "
                f"{found or 'no anomalies'}{tail}")

    def render(self) -> str:
        return "\n".join([self.summary(), *(a.render() for a in self.anomalies)])


def _count(anomalies: Iterable[Anomaly]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for anomaly in anomalies:
        counts[anomaly.kind] = counts.get(anomaly.kind, 0) + 1
    return counts


def check(history: Iterable[Txn], *, realtime: bool = True) -> list[Anomaly]:
    """Every anomaly found (bounded per kind); empty for a serializable history
    (strictly serializable, with ``realtime``)."""
    return analyse(history, realtime=realtime).anomalies


def analyse(history: Iterable[Txn], *, realtime: bool = True) -> Report:
    txns: dict[int, Txn] = {}
    for txn in history:
        if txn.id in txns:
            raise ValueError(f"two transactions with id {txn.id}")
        txns[txn.id] = txn
    anomalies: list[Anomaly] = []
    writer = _writers(txns)
    counts: dict[str, int] = {}

    def report(anomaly: Anomaly) -> None:
        counts[anomaly.kind] = counts.get(anomaly.kind, 0) + 1
        if counts[anomaly.kind] <= MAX_NON_CYCLE:
            anomalies.append(anomaly)

    for anomaly in _read_anomalies(txns, writer):
        report(anomaly)
    orders = _version_orders(txns, report)
    graph = _dependencies(txns, writer, orders)
    if realtime:
        _realtime_edges(txns, graph)
    result = Report(anomalies, txns=len(txns))
    for _, _, data in graph.edges(data=True):
        for kind in data["why"]:
            result.edges[kind] = result.edges.get(kind, 0) + 1
    _cycles(txns, graph, realtime, result)
    # The weakest isolation a cycle breaks first; non-cycle anomalies before all.
    rank = {kind: i for i, kind in enumerate(CYCLE_KINDS)}
    result.anomalies.sort(key=lambda a: rank.get(a.kind, -1))
    return result


# -- what the reads say, transaction by transaction ---------------------------------


def _short(values: Sequence[object], upto: int | None = None) -> str:
    """A list as printed in a report: its last few elements (the version it names),
    up to ``upto`` when that is where two reads part."""
    end = len(values) if upto is None else min(len(values), upto + 1)
    shown = [repr(v) for v in values[max(0, end - SHOWN_ELEMENTS):end]]
    if end > SHOWN_ELEMENTS:
        shown.insert(0, f"...{end - SHOWN_ELEMENTS} more")
    if end < len(values):
        shown.append(f"...{len(values) - end} more")
    return f"[{', '.join(shown)}]"


def _values(read: object) -> tuple[object, ...]:
    assert isinstance(read, (list, tuple)), f"a read's value must be a list, not {read!r}"
    return tuple(read)


def _writers(txns: dict[int, Txn]) -> dict[tuple[Key, object], tuple[int, bool]]:
    """(key, value) -> (the appending transaction, whether it is its last append there)."""
    writer: dict[tuple[Key, object], tuple[int, bool]] = {}
    for txn in txns.values():
        last: dict[Key, object] = {}
        for f, key, value in txn.ops:
            if f == APPEND:
                if (key, value) in writer:
                    other = writer[(key, value)][0]
                    raise ValueError(f"value {value!r} appended to {key!r} by T{other} and "
                                     f"T{txn.id}: values must be unique per key")
                writer[(key, value)] = (txn.id, False)
                last[key] = value
        for key, value in last.items():
            writer[(key, value)] = (txn.id, True)
    return writer


def _read_anomalies(txns: dict[int, Txn],
                    writer: dict[tuple[Key, object], tuple[int, bool]]) -> Iterable[Anomaly]:
    good: dict[Key, set[object]] = {}  # values known appended by a transaction that did not fail
    for txn in txns.values():
        if txn.status != OK:
            continue
        own: dict[Key, list[object]] = {}  # this transaction's appends so far, per key
        seen: dict[Key, list[object]] = {}  # what it knows each key holds (after a read)
        for f, key, value in txn.ops:
            if f == APPEND:
                own.setdefault(key, []).append(value)
                if key in seen:
                    seen[key].append(value)
                continue
            if value is None:
                continue
            read = list(_values(value))
            yield from _one_read(txn, key, read, own.get(key, []), seen.get(key), txns, writer,
                                 good)
            seen[key] = read


def _one_read(txn: Txn, key: Key, read: list[object], own: list[object],
              seen: list[object] | None, txns: dict[int, Txn],
              writer: dict[tuple[Key, object], tuple[int, bool]],
              good: dict[Key, set[object]]) -> Iterable[Anomaly]:
    where = f"T{txn.id} read {key} = {_short(read)}"
    if seen is not None and read != seen:
        yield Anomaly("internal", (txn.id,),
                      f"{where}, but its earlier read and appends say {_short(seen)}",
                      lines=(txn.describe(),))
    elif seen is None and own and read[-len(own):] != own:
        yield Anomaly("internal", (txn.id,),
                      f"{where}, which does not end with its own appends {own}",
                      lines=(txn.describe(),))
    distinct = set(read)
    if len(distinct) != len(read):
        dup = sorted({repr(v) for v in read if read.count(v) > 1})
        yield Anomaly("duplicate-elements", (txn.id,),
                      f"{where}: {', '.join(dup)} more than once", lines=(txn.describe(),))
    unchecked = distinct - good.setdefault(key, set())
    for v in (dict.fromkeys(x for x in read if x in unchecked) if unchecked else ()):
        if (key, v) not in writer:
            yield Anomaly("garbage", (txn.id,), f"{where}: {v!r} was never appended",
                          lines=(txn.describe(),))
            continue
        author = writer[(key, v)][0]
        if txns[author].status == FAIL:
            yield Anomaly("G1a", (txn.id, author),
                          f"{where}: {v!r} was appended by T{author}, which failed (aborted read)",
                          lines=(txn.describe(), txns[author].describe()))
        else:
            good[key].add(v)  # checked once: long reads cost set operations, not a loop
    others = read[: len(read) - len(own)] if own and read[-len(own):] == own else read
    if others and (key, others[-1]) in writer:
        author, final = writer[(key, others[-1])]
        if author != txn.id and not final:
            yield Anomaly("G1b", (txn.id, author),
                          f"{where}: {others[-1]!r} is not T{author}'s last append to {key} "
                          f"(intermediate read)", lines=(txn.describe(), txns[author].describe()))


# -- version orders and the dependency graph ----------------------------------------


def _reads(txns: dict[int, Txn]) -> Iterable[tuple[Txn, Key, list[object]]]:
    for txn in txns.values():
        if txn.status == OK:
            for f, key, value in txn.ops:
                if f == READ and value is not None:
                    yield txn, key, list(_values(value))


def _version_orders(txns: dict[int, Txn],
                    report: Callable[[Anomaly], None]) -> dict[Key, list[object]]:
    """Each key's order of appends: its longest read, if every read is a prefix of it.
    A key whose reads disagree has no known order, and gives no ww or rw edges."""
    longest: dict[Key, tuple[list[object], Txn]] = {}
    for txn, key, read in _reads(txns):
        if key not in longest or len(read) > len(longest[key][0]):
            longest[key] = (read, txn)
    bad: set[Key] = set()
    for txn, key, read in _reads(txns):
        full, by = longest[key]
        if key not in bad and full[: len(read)] != read:
            bad.add(key)
            at = next(i for i, (x, y) in enumerate(zip(read, full)) if x != y)
            report(Anomaly("incompatible-order", (txn.id, by.id),
                           f"T{txn.id} read {key} = {_short(read, at)} and T{by.id} read "
                           f"{_short(full, at)}: neither is a prefix of the other (they part "
                           f"at element {at})", lines=(txn.describe(), by.describe())))
    orders = {}
    for key, (full, _) in longest.items():
        if key not in bad:
            orders[key] = list(dict.fromkeys(full))  # a duplicate counts where first seen
    return orders


def _add(graph: nx.DiGraph, src: int, dst: int, kind: str, why: str) -> None:
    if src == dst:
        return
    if not graph.has_edge(src, dst):
        graph.add_edge(src, dst, why={})
    graph[src][dst]["why"].setdefault(kind, why)


def _dependencies(txns: dict[int, Txn], writer: dict[tuple[Key, object], tuple[int, bool]],
                  orders: dict[Key, list[object]]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(t.id for t in txns.values() if t.status != FAIL)

    def author(key: Key, value: object) -> int | None:
        found = writer.get((key, value))
        if found is None or txns[found[0]].status == FAIL:
            return None  # garbage or an aborted append: reported already, orders nothing
        return found[0]

    for key, order in orders.items():
        known = [(v, a) for v in order if (a := author(key, v)) is not None]
        for (v1, a1), (v2, a2) in pairwise(known):
            _add(graph, a1, a2, WW, f"{key}: {v1!r} then {v2!r}")
    for txn, key, read in _reads(txns):
        while read and author(key, read[-1]) == txn.id:
            read = read[:-1]  # its own appends: what it read from others came before
        last = next((a for v in reversed(read) if (a := author(key, v)) is not None), None)
        if last is not None:
            _add(graph, last, txn.id, WR, f"{key}: read {_short(read)} ending at T{last}'s append")
        versions = orders.get(key)
        if versions is None:
            continue
        later = versions[len(read):] if versions[: len(read)] == read else []
        nxt = next(((v, a) for v in later if (a := author(key, v)) is not None), None)
        if nxt is not None:
            _add(graph, txn.id, nxt[1], RW, f"{key}: read {_short(read)}, {nxt[0]!r} appended next")
    return graph


def _realtime_edges(txns: dict[int, Txn], graph: nx.DiGraph) -> None:
    """a -rt-> b when a completed before b was invoked, transitively reduced (Elle's
    realtime graph): at b's invocation, an edge from each transaction in the frontier,
    the completed ones no later completion has already put in real-time order after."""
    events: list[tuple[float, int, int]] = []  # (time, 0 invoke / 1 complete, txn)
    for txn in txns.values():
        if txn.status == FAIL:
            continue
        events.append((txn.invoke, 0, txn.id))
        if txn.status == OK:
            assert txn.complete is not None
            events.append((txn.complete, 1, txn.id))
    events.sort()  # at one instant, invocations first: simultaneous is concurrent
    frontier: list[int] = []
    for _, is_complete, tid in events:
        txn = txns[tid]
        if is_complete:
            frontier = [a for a in frontier if not _before(txns[a], txn)]
            frontier.append(tid)
        else:
            for a in frontier:
                complete = txns[a].complete
                if complete is not None and complete < txn.invoke:
                    _add(graph, a, tid, RT, f"completed {complete:.3f} < invoked {txn.invoke:.3f}")


def _before(a: Txn, b: Txn) -> bool:
    return a.complete is not None and a.complete < b.invoke


# -- cycles -------------------------------------------------------------------------

_NO_RW = frozenset({WW, WR})
CYCLE_KINDS = ("G0", "G1c", "G-single", "G2",
               "G0-realtime", "G1c-realtime", "G-single-realtime", "G2-realtime")


@dataclass(frozen=True)
class _Search:
    """Cycles closed through an edge of kind ``through`` by a path over ``path`` kinds
    with between ``min_rw`` and ``max_rw`` (None: any number) rw edges. Each edge counts
    as its weakest kind the search allows (ww, then wr, rw, rt)."""

    through: str
    path: frozenset[str]
    min_rw: int = 0
    max_rw: int | None = 0


# In this order, so each cycle is reported as the weakest anomaly that explains it.
_SEARCHES = (
    _Search(WW, frozenset({WW})),  # G0
    _Search(WR, _NO_RW),  # G1c
    _Search(RW, _NO_RW),  # G-single
    _Search(RW, _NO_RW | {RW}, min_rw=1, max_rw=None),  # G2
)
_REALTIME_SEARCHES = (
    _Search(RT, frozenset({WW, RT})),
    _Search(RT, _NO_RW | {RT}),
    _Search(RT, _NO_RW | {RT, RW}, min_rw=1, max_rw=1),
    _Search(RT, _NO_RW | {RT, RW}, min_rw=2, max_rw=None),
)


def _classify(cycle: Sequence[Edge]) -> str:
    kinds = [e.kind for e in cycle]
    rw = kinds.count(RW)
    if rw == 0:
        name = "G1c" if WR in kinds else "G0"
    else:
        name = "G-single" if rw == 1 else "G2"
    return f"{name}-realtime" if RT in kinds else name


def _cycles(txns: dict[int, Txn], graph: nx.DiGraph, realtime: bool, result: Report) -> None:
    found: dict[str, int] = {}
    searches = _SEARCHES + (_REALTIME_SEARCHES if realtime else ())
    budget = [MAX_STEPS]
    for component in nx.strongly_connected_components(graph):
        if len(component) < 2:
            continue
        result.components += 1
        seen_here: set[str] = set()
        inside = [(u, v, why) for u in component for v, data in graph.adj[u].items()
                  if v in component for why in (data["why"],)]
        reachability: dict[frozenset[str], Callable[[int, int], bool]] = {}
        for search in searches:
            if search.path not in reachability:
                reachability[search.path] = _reachability(component, inside, search.path)
            reaches = reachability[search.path]
            tries = 0
            for u, v, why in inside:
                if _label(why, search) != search.through or not reaches(v, u):
                    continue
                if tries == MAX_TRIES or budget[0] <= 0:
                    result.truncated = True
                    break
                tries += 1
                path = _shortest_path(graph, component, v, u, search, budget)
                if path is None:
                    continue
                walk = [Edge(u, search.through, v, why[search.through]), *path]
                reported = False
                for cycle in _simple_cycles(walk):
                    kind = _classify(cycle)
                    if kind in seen_here or found.get(kind, 0) >= MAX_PER_KIND:
                        continue
                    seen_here.add(kind)
                    found[kind] = found.get(kind, 0) + 1
                    result.anomalies.append(_cycle_anomaly(kind, cycle, txns))
                    reported = True
                if reported:
                    break


def _reachability(component: set[int], inside: list[tuple[int, int, dict[str, str]]],
                  kinds: frozenset[str]) -> Callable[[int, int], bool]:
    """Whether one transaction reaches another over edges of these kinds: a bitset per
    component of the condensation, so a candidate edge no path can close costs no search.
    Over MAX_BITSET_NODES transactions, every pair is assumed to (the search decides)."""
    if len(component) > MAX_BITSET_NODES:
        return lambda src, dst: True
    sub = nx.DiGraph()
    sub.add_nodes_from(component)
    sub.add_edges_from((u, v) for u, v, why in inside if not kinds.isdisjoint(why))
    dag = nx.condensation(sub)
    mapping: dict[int, int] = dag.graph["mapping"]
    reach: dict[int, int] = {}
    for c in reversed(list(nx.topological_sort(dag))):
        bits = 1 << c
        for after in dag.successors(c):
            bits |= reach[after]
        reach[c] = bits
    return lambda src, dst: bool(reach[mapping[src]] >> mapping[dst] & 1)


def _simple_cycles(walk: Sequence[Edge]) -> list[list[Edge]]:
    """A closed walk cut into simple cycles. The search's states count rw edges, so
    its shortest walk may pass a transaction twice; each simple cycle in it is real,
    and is named by its own edges."""
    stack: list[Edge] = []
    at = {walk[0].src: 0}  # node -> index in stack of the edge leaving it
    cycles = []
    for edge in walk:
        stack.append(edge)
        if edge.dst in at:
            start = at[edge.dst]
            cycle = stack[start:]
            del stack[start:]
            for step in cycle:
                at.pop(step.dst, None)
            at[edge.dst] = start
            cycles.append(cycle)
        else:
            at[edge.dst] = len(stack)
    return cycles


def _label(why: dict[str, str], search: _Search) -> str | None:
    """The weakest kind an edge counts as in this search (None: unusable)."""
    usable = [k for k in _LABEL_ORDER if k in why and (k in search.path or k == search.through)]
    return usable[0] if usable else None


def _shortest_path(graph: nx.DiGraph, component: set[int], src: int, dst: int,
                   search: _Search, budget: list[int]) -> list[Edge] | None:
    """Breadth first over (transaction, rw edges used so far, capped) inside one
    component: a shortest path from ``src`` to ``dst`` the search allows. Each state
    expanded spends one of ``budget``; None when none is left."""
    cap = search.min_rw if search.max_rw is None else search.max_rw
    start = (src, 0)
    parents: dict[tuple[int, int], tuple[tuple[int, int], Edge] | None] = {start: None}
    queue = deque([start])
    while queue:
        if budget[0] <= 0:
            return None
        budget[0] -= 1
        node, used = state = queue.popleft()
        if node == dst and used >= search.min_rw:
            steps: list[Edge] = []
            back = parents[state]
            while back is not None:
                state, edge = back
                steps.append(edge)
                back = parents[state]
            return steps[::-1]
        for nxt, data in graph[node].items():
            if nxt not in component:
                continue
            kind = next((k for k in _LABEL_ORDER if k in data["why"] and k in search.path), None)
            if kind is None:
                continue
            total = used + (kind == RW)
            if search.max_rw is not None and total > search.max_rw:
                continue
            following = (nxt, min(total, cap))
            if following not in parents:
                parents[following] = (state, Edge(node, kind, nxt, data["why"][kind]))
                queue.append(following)
    return None


def _cycle_anomaly(kind: str, cycle: Sequence[Edge], txns: dict[int, Txn]) -> Anomaly:
    ids = tuple(e.src for e in cycle)
    route = " ".join([*(f"T{e.src} -{e.kind}->" for e in cycle), f"T{cycle[0].src}"])
    lines = tuple(txns[i].describe() for i in ids)
    return Anomaly(kind, ids, f"cycle {route}", tuple(cycle), lines)
