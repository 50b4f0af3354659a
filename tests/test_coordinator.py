"""The coordinator's read/write path against in-process fake replicas (Dynamo §4.5-§4.6).

Every scenario runs on the simulator's virtual-time loop, so a timeout of a
second costs no wall time and the same scenario always runs the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from ringkv.clock import Clock, ManualClock
from ringkv.hlc import HybridLogicalClock, Timestamp
from ringkv.coordinator import Coordinator, KeyspaceSettings
from ringkv.errors import CorruptRecord, PeerTimeout, PeerUnreachable, Timeout, Unavailable
from ringkv.quorum import ConsistencyLevel as CL
from ringkv.ring import TokenRing
from ringkv.sim.loop import VirtualTimeLoop
from ringkv.versioning import Cell, cell_digest

NODES = ("a", "b", "c")
RING = TokenRing({"a": [-(2**62)], "b": [0], "c": [2**62]})


class FakeReplicas:
    """Replicas as dicts; a node can be made to fail or to hang."""

    def __init__(self) -> None:
        self.data: dict[str, dict[bytes, Cell]] = {node: {} for node in NODES}
        self.failing: set[str] = set()
        self.hanging: set[str] = set()
        self.writes: list[str] = []
        self.hang_passes: tuple[ManualClock, float] | None = None  # time that passes in a hang
        self.corrupt: set[str] = set()  # reads fail their checksum until the key is rewritten
        self.slow_data: set[str] = set()  # full-data reads hang; digests still answer
        self.slow_writes: set[str] = set()  # writes hang
        self.digest_delay_s: dict[str, float] = {}  # digests answer after this long

    async def _gate(self, node: str) -> None:
        if node in self.failing:
            raise PeerUnreachable(f"{node} is down", node_id=node)
        if node in self.hanging:
            if self.hang_passes is not None:
                clock, seconds = self.hang_passes
                clock.advance(seconds)
            await asyncio.Event().wait()  # never answers; cancelled by the coordinator

    async def _time_out(self, node: str, timeout_s: float) -> None:
        """No answer: the request's own timer fires, as the transport's does."""
        await asyncio.sleep(timeout_s)
        raise PeerTimeout(f"{node} did not answer in {timeout_s}s", node_id=node, verb="fake",
                          timeout_s=timeout_s)

    async def write(self, node, keyspace, token, key, cell, timeout_s):
        await self._gate(node)
        if node in self.slow_writes:
            await self._time_out(node, timeout_s)
        self.writes.append(node)
        self.corrupt.discard(node)  # as LocalStore.apply replaces a corrupt record
        current = self.data[node].get(key)
        if current is None or cell.ts >= current.ts:
            self.data[node][key] = cell

    def read_here(self, node, key):
        """The coordinator's own replica, read at once (its ONE fast path)."""
        if node in self.corrupt:
            raise CorruptRecord("checksum mismatch")
        return self.data[node].get(key)

    async def read(self, node, keyspace, token, key, timeout_s):
        await self._gate(node)
        if node in self.slow_data:
            await self._time_out(node, timeout_s)
        if node in self.corrupt:
            raise CorruptRecord("checksum mismatch")
        return self.data[node].get(key)

    async def digest(self, node, keyspace, token, key, timeout_s):
        await self._gate(node)
        await asyncio.sleep(self.digest_delay_s.get(node, 0.0))
        if node in self.corrupt:
            raise CorruptRecord("checksum mismatch")
        return cell_digest(self.data[node].get(key))

    # The coordinator's ReplicaClient calls: each answer is a future (a task here).
    def write_future(self, node, keyspace, token, key, cell, timeout_s):
        return asyncio.ensure_future(self.write(node, keyspace, token, key, cell, timeout_s))

    def read_future(self, node, keyspace, token, key, timeout_s):
        return asyncio.ensure_future(self.read(node, keyspace, token, key, timeout_s))

    def digest_future(self, node, keyspace, token, key, timeout_s):
        return asyncio.ensure_future(self.digest(node, keyspace, token, key, timeout_s))

    async def scan(self, node, keyspace, after, end_token, limit, timeout_s):
        raise NotImplementedError


class Hints:
    def __init__(self) -> None:
        self.stored: list[str] = []

    async def store_hint(self, target, keyspace, token, key, cell) -> bool:
        self.stored.append(target)
        return True


def make(replicas: FakeReplicas, alive: set[str] | None = None, hints: Hints | None = None,
         timeout_s: float = 1.0, clock: Clock | None = None) -> Coordinator:
    alive = set(NODES) if alive is None else alive
    keyspaces: Mapping[str, KeyspaceSettings] = {"ks": KeyspaceSettings("ks", 3, CL.QUORUM)}
    clock = clock or LoopClock()
    return Coordinator(
        "a", ring=lambda: RING, is_alive=lambda n: n in alive, replicas=replicas,
        keyspaces=lambda: keyspaces, clock=clock, hlc=HybridLogicalClock(clock), hints=hints,
        read_timeout_s=timeout_s, write_timeout_s=timeout_s,
        local_read=lambda keyspace, token, key: replicas.read_here("a", key),
    )


class LoopClock:
    """The running loop's time as the node's clock: virtual time in these tests."""

    def wall_us(self) -> int:
        return 1_700_000_000_000_000 + int(asyncio.get_running_loop().time() * 1_000_000)

    def monotonic_s(self) -> float:
        return asyncio.get_running_loop().time()

    def call_later(self, delay_s, callback, *args):
        return asyncio.get_running_loop().call_later(delay_s, callback, *args)

    async def sleep(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)


def run(coro):
    """Run ``coro`` on virtual time; a scenario stuck for a virtual minute fails."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout=60))
    finally:
        loop.dispose()


def cell(value: bytes, wall_us: int) -> Cell:
    return Cell(value, Timestamp(wall_us))


def test_unavailable_is_raised_before_anything_is_sent() -> None:
    replicas = FakeReplicas()
    coordinator = make(replicas, alive={"a", "b"})
    with pytest.raises(Unavailable) as error:
        run(coordinator.write("ks", b"k", cell(b"1", 1), CL.ALL))
    assert (error.value.required, error.value.alive) == (3, 2)
    assert replicas.writes == []


def test_quorum_write_with_a_failing_replica_acks_and_hints_it() -> None:
    replicas, hints = FakeReplicas(), Hints()
    replicas.failing.add("c")
    result = run(make(replicas, hints=hints).write("ks", b"k", cell(b"1", 1), CL.QUORUM))
    assert sorted(result.receipt.answered) == ["a", "b"]
    assert hints.stored == ["c"]


def test_too_few_acks_in_time_is_a_timeout_with_the_count() -> None:
    replicas = FakeReplicas()
    replicas.hanging.update({"b", "c"})
    with pytest.raises(Timeout) as error:
        run(make(replicas, timeout_s=0.2).write("ks", b"k", cell(b"1", 1), CL.QUORUM))
    assert (error.value.required, error.value.received) == (2, 1)


def test_any_succeeds_on_a_hint_alone() -> None:
    replicas, hints = FakeReplicas(), Hints()
    coordinator = make(replicas, alive={"a"}, hints=hints)
    replicas.failing.add("a")
    result = run(coordinator.write("ks", b"k", cell(b"1", 1), CL.ANY))
    assert result.receipt.hints_stored == 2  # b and c were down; a failed and is not hinted


def test_any_counts_hints_for_replicas_that_fail_while_thought_up() -> None:
    """Gossip still says b and c are UP, but both refuse the write: their
    hints are the acknowledgement ANY asks for, and the receipt counts them."""
    replicas, hints = FakeReplicas(), Hints()
    replicas.failing.update({"a", "b", "c"})
    result = run(make(replicas, hints=hints).write("ks", b"k", cell(b"1", 1), CL.ANY))
    assert sorted(hints.stored) == ["b", "c"]
    assert result.receipt.hints_stored >= 1 and result.receipt.answered == []
    with pytest.raises(Timeout):  # a hint is no acknowledgement at ONE
        run(make(replicas, hints=Hints()).write("ks", b"k", cell(b"1", 2), CL.ONE))


@pytest.mark.parametrize("level", [CL.ONE, CL.QUORUM])
def test_a_corrupt_local_record_is_read_elsewhere_and_repaired(level: CL) -> None:
    replicas = FakeReplicas()
    for node in NODES:
        replicas.data[node][b"k"] = cell(b'"v"', 1)
    replicas.corrupt.add("a")  # the coordinator's own replica
    result = run(make(replicas).read("ks", b"k", level))
    assert result.cell == cell(b'"v"', 1)
    assert "a" not in result.receipt.answered and "a" in result.receipt.repaired
    assert replicas.corrupt == set()


def test_digest_mismatch_triggers_blocking_read_repair() -> None:
    """Dynamo §4.5: the reconciled newest value is written back before the read answers."""
    replicas = FakeReplicas()
    key = b"k"
    replicas.data["a"][key] = cell(b'"old"', 1)
    replicas.data["b"][key] = cell(b'"new"', 2)
    replicas.data["c"][key] = cell(b'"new"', 2)
    result = run(make(replicas).read("ks", key, CL.QUORUM))
    assert result.cell == cell(b'"new"', 2)
    assert result.receipt.read_repair and result.receipt.repaired == ["a"]
    assert replicas.data["a"][key] == cell(b'"new"', 2)


def test_a_read_that_cannot_repair_does_not_claim_the_level() -> None:
    replicas = FakeReplicas()
    key = b"k"
    replicas.data["b"][key] = cell(b'"new"', 2)

    coordinator = make(replicas)

    async def scenario() -> None:
        original = replicas.write

        async def refuse_a(node, *args):
            if node == "a":
                raise PeerUnreachable("a refuses", node_id="a")
            await original(node, *args)

        replicas.write = refuse_a  # type: ignore[method-assign]
        with pytest.raises(Timeout):
            await coordinator.read("ks", key, CL.QUORUM)

    run(scenario())


def test_a_failed_replica_is_replaced_by_a_spare() -> None:
    replicas = FakeReplicas()
    replicas.failing.add("b")
    replicas.data["c"][b"k"] = cell(b"1", 1)
    replicas.data["a"][b"k"] = cell(b"1", 1)
    result = run(make(replicas).read("ks", b"k", CL.QUORUM))
    assert result.cell == cell(b"1", 1)
    assert "c" in result.receipt.answered
    # The receipt names every replica asked, the spare included.
    assert sorted(result.receipt.asked) == ["a", "b", "c"]
    assert result.receipt.speculative == ["c"]


def test_speculative_retry_backs_up_a_slow_replica() -> None:
    """A replica slower than the recent-latency percentile is backed up by a spare."""
    replicas = FakeReplicas()
    for node in NODES:
        replicas.data[node][b"k"] = cell(b"1", 1)
    coordinator = make(replicas, timeout_s=5.0)

    async def scenario() -> None:
        for _ in range(30):  # enough samples for a latency percentile
            await coordinator.read("ks", b"k", CL.QUORUM)
        slow = coordinator.snitch.by_proximity(("b", "c"))[0]  # the peer it will ask first
        replicas.hanging.add(slow)
        result = await coordinator.read("ks", b"k", CL.QUORUM)
        assert result.receipt.speculative, result.receipt
        assert slow not in result.receipt.answered

    run(scenario())


def test_a_replica_that_stops_answering_is_not_asked_first_again() -> None:
    """A replica that is UP but silent (a one-way partition) ranks by how long it kept
    the coordinator waiting, like Cassandra's dynamic snitch counting timeouts; and
    the spare's answer is timed from its own request, so speculating does not raise
    the next speculative threshold (it used to creep up with every read)."""
    clock = ManualClock()
    replicas = FakeReplicas()
    for node in NODES:
        replicas.data[node][b"k"] = cell(b"1", 1)
    coordinator = make(replicas, timeout_s=5.0, clock=clock)

    async def scenario() -> None:
        for _ in range(30):  # enough samples for a latency percentile
            await coordinator.read("ks", b"k", CL.QUORUM)
        silent = coordinator.snitch.by_proximity(("b", "c"))[0]  # the peer it will ask first
        replicas.hanging.add(silent)
        replicas.hang_passes = (clock, 1.0)  # one second passes while it does not answer
        first = await coordinator.read("ks", b"k", CL.QUORUM)
        assert first.receipt.speculative and silent not in first.receipt.answered
        # The last sample is the spare's: asked after the second passed, it answered at once.
        assert coordinator.snitch.latencies.samples[-1] == 0.0
        second = await coordinator.read("ks", b"k", CL.QUORUM)
        assert silent not in second.receipt.asked
        assert second.receipt.speculative == []

    run(scenario())


@pytest.mark.parametrize("stage", ["refetch after a digest mismatch", "blocking read repair"])
def test_one_deadline_bounds_the_whole_read(stage: str) -> None:
    """Cassandra's query start time: the digest-mismatch refetch and the read
    repair spend what is left of the read's one timeout; they do not each
    start a timeout of their own (which made a QUORUM read take up to
    read + read + write timeouts)."""
    replicas = FakeReplicas()
    replicas.data["a"][b"k"] = cell(b'"old"', 1)
    replicas.data["b"][b"k"] = cell(b'"new"', 2)
    replicas.data["c"][b"k"] = cell(b'"new"', 2)
    replicas.digest_delay_s = {"b": 0.6, "c": 0.6}  # the digest round takes 0.6 s
    if stage.startswith("refetch"):
        replicas.slow_data.update({"b", "c"})  # their digests answer, their data never
    else:
        replicas.slow_writes.add("a")  # the stale replica never takes the repair
    coordinator = make(replicas, timeout_s=1.0)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Timeout):
            await coordinator.read("ks", b"k", CL.QUORUM)
        return loop.time() - started

    assert run(scenario()) == pytest.approx(1.0)


def test_the_deadline_counts_from_when_the_request_arrived() -> None:
    """A request that waited before reaching the coordinator has less time left."""
    replicas = FakeReplicas()
    replicas.hanging.update({"b", "c"})
    coordinator = make(replicas, timeout_s=1.0)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        await asyncio.sleep(0.75)  # queued behind other work
        with pytest.raises(Timeout):
            await coordinator.write("ks", b"k", cell(b"1", 1), CL.QUORUM, started_s=arrived)
        return loop.time() - arrived

    assert run(scenario()) == pytest.approx(1.0)


def test_a_write_that_spent_its_timeout_before_it_arrived_sends_nothing() -> None:
    replicas, hints = FakeReplicas(), Hints()
    coordinator = make(replicas, alive={"a", "b"}, hints=hints, timeout_s=1.0)

    async def scenario() -> None:
        arrived = asyncio.get_running_loop().time()
        await asyncio.sleep(1.5)
        with pytest.raises(Timeout):
            await coordinator.write("ks", b"k", cell(b"1", 1), CL.ANY, started_s=arrived)

    run(scenario())
    assert replicas.writes == [] and hints.stored == []
