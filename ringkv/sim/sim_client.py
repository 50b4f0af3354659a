"""The real ``AsyncClient`` inside the simulator: its requests travel the simulated
network to simulated nodes, and are served there by the nodes' own handlers.

``SimClient`` is an ``AsyncClient`` whose only change is how a plan's ``Send``
is carried (``_perform``) and how a watch connection is opened
(``_watch_once``); every plan, the routing, the retries and the recipes above
them (``recipes_aio.AsyncLock`` ...) are the client's own. A client lives in a
simulated process of its own (so a nemesis can pause it: its lease renewals
stop too) on a machine of its own (``client_machine``), with its own drifting
``SimClock`` and a seeded ``random.Random``: one seed replays a run exactly.

One request is one message each way:

* the request reaches the node after a one-way delay drawn from the network;
  there it runs as the native listener would run it (``client/native.to_native``,
  then ``server/native._ROUTES`` over ``server/handlers.ApiCall``), minus the
  sockets, the lease operations included (``server/lease_http.py``'s calls,
  as both front ends make them);
* a node whose process is down refuses the connection (``Failure("connect")``
  after a round trip); a link cut either way when the request is sent gets no
  answer to the dial (``Failure("connect")`` at the timeout); a request or answer
  that reaches a cut link is lost (``Failure("timeout")``: it may have run); a
  node killed while serving resets the connection (``Failure("io")``).

A watch connection polls the node as the HTTP stream does (``watch_http.poll``
into a ``WatchBuffer``, one message each way per turn) and feeds the lines the
stream would send to the client's ``WatchCore``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

from ringkv.client.aio import AsyncClient, WatchConnectError, WatchIOError
from ringkv.client.native import REPLAYED_HEADER, to_native
from ringkv.client.plan import Effect, Failure, Outcome, Reply, Send, Sleep
from ringkv.client.watch import WatchCore, WatchEvent
from ringkv.errors import BadRequest, NotFound, RingKVError
from ringkv.net import native as native_core
from ringkv.net.codec import KIND_REQUEST, Frame
from ringkv.node import Node
from ringkv.server import handlers as h
from ringkv.server import lease_http
from ringkv.server import validation as v
from ringkv.server.idempotency import IdempotencyCache
from ringkv.server.native import _LEASE_ROUTES, _ROUTES
from ringkv.server.watch_http import PAGE_EVENTS, WatchSpec, poll, range_ends
from ringkv.sim.clock import SimClock
from ringkv.sim.cluster import PAUSED, UP, Machine, SimCluster
from ringkv.sim.loop import CRASHED, Process
from ringkv.txn.watch import WatchBuffer, event_json, fit, frame, start_version

RESET_CHECK_S = 0.05  # how often a waiting request looks for a reset (its node killed)


def client_machine(name: str) -> str:
    """The network name of a client's machine (links to it can be cut like a node's)."""
    return f"client-{name}"


class SimClient(AsyncClient):
    """An ``AsyncClient`` on the simulated network (see the module's docstring)."""

    def __init__(self, cluster: SimCluster, name: str, process: Process, clock: SimClock,
                 rng: random.Random, **options: Any) -> None:
        self.cluster = cluster
        self.name = name
        self.machine = client_machine(name)
        self.process = process
        self._by_address = {m.config.cluster.client_address: m for m in cluster.machines}
        seeds = [f"http://{address}" for address in self._by_address]
        super().__init__(seeds, rng=rng, protocol="http", **options)
        self._rng = rng
        # The simulator's clock and names: no real time, no uuid4 (one seed, one run).
        self._clock = clock  # type: ignore[assignment]
        ops: Any = self._ops
        ops._clock = clock
        counter = itertools.count(1)
        ops._new_idempotency_key = lambda: f"{name}-{next(counter)}"
        self.stats = dict.fromkeys(
            ("requests", "refused_connects", "unanswered_connects", "timeouts", "resets"), 0)
        # Each node incarnation's idempotency cache (one per node, as its front ends share).
        self.caches: dict[tuple[str, int], IdempotencyCache] = {}
        self.unexpected: list[str] = []  # what a node's handler raised untyped: bugs

    def _setup(self) -> None:
        self._session = None
        self._recipe_sessions = {}  # the recipes' default sessions, as AsyncClient keeps them

    async def close(self) -> None:
        return None

    # -- carrying a plan's effects -----------------------------------------------------

    async def _perform(self, effect: Effect) -> Outcome:
        if isinstance(effect, Send):
            return await self._send(effect)
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
        return None

    async def _send(self, effect: Send) -> Reply | Failure:
        self.stats["requests"] += 1
        machine = self._machine_for(effect.url)
        if machine is None:
            return Failure("connect", f"cannot connect: no node at {effect.url}")
        got = await self._exchange(
            machine, lambda node: serve(node, effect, self.caches, self.unexpected),
            effect.timeout_s)
        if isinstance(got, Failure):
            return got
        result: h.Answer = got
        return Reply(result.status, result.body,
                     {REPLAYED_HEADER: "true"} if result.replayed else {})

    def _machine_for(self, url: str) -> Machine | None:
        return self._by_address.get(urlsplit(url).netloc)

    def _cut(self, machine: Machine) -> bool:
        blocked = self.cluster.network.blocked
        return ((self.machine, machine.node_id) in blocked
                or (machine.node_id, self.machine) in blocked)

    async def _exchange(self, machine: Machine, work: Callable[[Node], Coroutine[Any, Any, Any]],
                        timeout_s: float) -> Any:
        """Send ``work`` to ``machine``'s node and wait for its answer: the answer, or
        the ``Failure`` a socket would have given."""
        loop = self.cluster.loop
        network = self.cluster.network
        if machine.state not in (UP, PAUSED) or machine.node is None:
            self.stats["refused_connects"] += 1
            await asyncio.sleep(2 * network._one_way_s())  # the kernel's reset comes back
            return Failure("connect", f"cannot connect: {machine.node_id} refused")
        if self._cut(machine):
            self.stats["unanswered_connects"] += 1
            await asyncio.sleep(timeout_s)
            return Failure("connect", f"cannot connect: no answer from {machine.node_id}")
        answer: asyncio.Future[Any] = loop.create_future()
        target = machine.process
        assert target is not None
        client_context = self.process.context

        def arrive() -> None:
            node = machine.node
            if machine.process is not target or node is None or self._cut(machine):
                return  # lost on the way: the client times out
            task = machine.run(work(node))
            task.add_done_callback(reply)

        def reply(task: asyncio.Task[Any]) -> None:
            if task.cancelled() or self._cut(machine):
                return
            exc = task.exception()
            result: Any = exc if exc is not None else task.result()
            loop.deliver_later(network._one_way_s(), client_context, settle, (result,))

        def settle(result: Any) -> None:
            if not answer.done():
                answer.set_result(result)

        loop.deliver_later(network._one_way_s(), network._kernel, arrive, ())
        deadline_s = loop.time() + timeout_s
        while True:  # bounded by deadline_s
            left_s = deadline_s - loop.time()
            if left_s <= 0:
                self.stats["timeouts"] += 1
                return Failure("timeout", f"no answer within {timeout_s:.3g} s")
            done, _ = await asyncio.wait([answer], timeout=min(left_s, RESET_CHECK_S))
            if done:
                result = answer.result()
                if isinstance(result, BaseException):
                    raise result
                return result
            if target.state == CRASHED:  # its kernel resets the connection
                self.stats["resets"] += 1
                await asyncio.sleep(network._one_way_s())
                return Failure("io", f"connection lost: {machine.node_id} reset it")

    # -- watches -------------------------------------------------------------------------

    def _watch_rng(self) -> random.Random:
        """A watch's reconnect jitter, drawn from the client's seeded rng."""
        return random.Random(self._rng.random())

    async def _watch_once(self, core: WatchCore, url: str) -> AsyncIterator[WatchEvent]:
        """One watch connection: the HTTP stream's own polls, one exchange per turn."""
        machine = self._machine_for(url)
        if machine is None:
            raise WatchConnectError(f"cannot connect: no node at {url}")
        timeout_s = machine.config.timing.read_timeout_ms / 1000
        poll_s = machine.config.txn.watch_poll_ms / 1000
        spec = WatchSpec(core.keyspace, core.key.encode(), core.prefix, core.resume_us, False)

        async def opening(node: Node) -> tuple[int, list[int | None]]:
            if spec.keyspace not in node.txn.keyspaces:
                raise BadRequest(f"keyspace {spec.keyspace!r} is not transactional",
                                 field="keyspace")
            return (start_version(spec.from_version, node.txn.snapshot_now_us()),
                    range_ends(node.txn, spec))

        opened = await self._watch_exchange(machine, opening, timeout_s, core)
        if opened is None:
            return
        start_us, ends = opened
        buffer = WatchBuffer(PAGE_EVENTS * 4, start_us, now_s=self._clock.monotonic_s())
        event = core.line(frame({"type": "progress", "version": start_us}, sse=False))
        assert event is None
        while True:  # bounded: the caller's wait ends it (each turn is bounded)
            since_us = buffer.offered_us

            async def turn(node: Node, since_us: int = since_us) -> Any:
                return await poll(node.txn, spec, ends, since_us,
                                  started_s=node.clock.monotonic_s(), timeout_s=timeout_s)

            merged = await self._watch_exchange(machine, turn, timeout_s + 1, core)
            if merged is None:
                return
            fitted = fit(merged, buffer.room)
            if fitted is not None:
                buffer.offer(fitted)
            while (item := buffer.pop(self._clock.monotonic_s())) is not None:
                got = core.line(frame(event_json(item), sse=False))  # progress lines too
                if got is not None:
                    yield got
            await asyncio.sleep(poll_s)

    async def _watch_exchange(self, machine: Machine, work: Callable[[Node], Coroutine[Any, Any, Any]],
                              timeout_s: float, core: WatchCore) -> Any:
        """One exchange of a watch connection; None: the stream ended (a failed poll,
        as the node would end it and the client resume)."""
        try:
            got = await self._exchange(machine, work, timeout_s)
        except RingKVError as exc:
            core.refused(exc.http_status, json.dumps(exc.to_json()).encode())
            return None
        if isinstance(got, Failure):
            if got.kind == "connect":
                raise WatchConnectError(got.reason)
            raise WatchIOError(got.reason)
        return got


async def serve(node: Node, effect: Send, caches: dict[tuple[str, int], IdempotencyCache],
                unexpected: list[str]) -> h.Answer:
    """Run one request on ``node`` as its front end would: the answer's status and body."""
    parts = urlsplit(effect.url)
    started_s = node.clock.monotonic_s()
    try:
        request = to_native(effect)
        if request is None or (request.verb not in _ROUTES and request.verb != "lease_grant"
                               and request.verb not in _LEASE_ROUTES):
            raise NotFound(f"no route for {effect.method} {parts.path}")
        parsed = native_core.request(Frame(native_core.STREAM_VERSION, KIND_REQUEST, 1,
                                           request.verb, dict(request.payload)),
                                     native_core.STREAM_VERSION)
        h.admit(node, native_core.OPERATIONS[parsed.verb])
        # The lease operations, as both front ends run them (the simulated cluster has
        # no auth, so every caller may).
        if parsed.verb == "lease_grant":
            return h.answer(await lease_http.grant(node, parsed.body, _anyone))
        if parsed.verb in _LEASE_ROUTES:
            return h.answer(await _LEASE_ROUTES[parsed.verb](node, parsed.lease_id, _anyone))
        key = (v.key_from_json(parsed.key, node.config.limits, field="key")
               if parsed.key else b"")
        cache = caches.setdefault((node.node_id, id(node)), IdempotencyCache(node.clock))
        call = h.ApiCall(node, started_s, parsed.keyspace, key, parsed.args, parsed.body,
                         parsed.idempotency_key, txn_id=parsed.txn_id, cache=cache)
        if parsed.idempotency_key is not None:  # as the native listener fingerprints it
            call.fingerprint_method = parsed.verb
            call.fingerprint_target = (f"{parsed.keyspace}/{parsed.key}?txn={parsed.txn_id}"
                                       f"&{sorted(parsed.args.items())}")
        return await _ROUTES[parsed.verb](call)
    except RingKVError as exc:
        return h.error_answer(exc)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the front end's boundary: a 500, noted
        unexpected.append(f"{effect.method} {parts.path}: {exc!r}")
        return h.INTERNAL_ERROR


async def _anyone(route: str, keyspace: str) -> None:
    """Every caller may: the simulated cluster runs without auth."""
