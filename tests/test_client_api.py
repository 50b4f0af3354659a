"""The client's public surface, and its sans-I/O core driven by hand.

``Client`` and ``AsyncClient`` each spell out every public method; these
tests keep the two from drifting apart (same names, parameters, defaults,
annotations and docstrings; the asyncio client's I/O calls are coroutine
functions, its scans async iterators). The core test steps the plan of a
``put`` with a manual clock and made-up outcomes: no socket, no loop.
"""

from __future__ import annotations

import inspect
import json
import random
from typing import Any

import pytest

from ringkv.client import AsyncClient, Client
from ringkv.client.operations import IDEMPOTENCY_HEADER, REPLAYED_HEADER, Operations
from ringkv.client.plan import Failure, Reply, Send, Sleep
from ringkv.client.types import WriteResult
from ringkv.clock import ManualClock
from ringkv.errors import NoNodeAvailable
from ringkv.hlc import Timestamp
from ringkv.ring import TokenRing

# Calls that run the plan of the same name in ``Operations``: awaited on the asyncio client.
CALLS = {"get", "get_with_meta", "put", "delete", "batch", "refresh_ring", "get_versioned", "txn",
         "txn_status", "exists", "ttl_s", "get_many", "ensure_ring"}
# Plans that stream: an ``Iterator``, or an ``AsyncIterator`` on the asyncio client.
STREAMS = {"scan", "scan_pages"}
# Streams with no plan in ``Operations``: a watch runs over its own connection (client/watch.py).
WATCHES = {"watch"}
# Only the client's own state: plain functions on both clients (``close`` does I/O, so awaited).
LOCAL = {"__init__"}
# The ring as the client knows it, fetched first if it never was: awaited on the asyncio
# client (no plan of the same name: each runs ``ensure_ring``, then reads the ring).
RING_VIEWS = {"nodes", "replicas"}
PROPERTIES = {"keyspace", "consistency"}
# Interactive transactions: ``transaction`` is local on both (the asyncio one's object is
# used with ``async with``), ``run_transaction`` awaited; their annotations name each
# client's own transaction class.
TRANSACTIONS = {"transaction", "run_transaction"}
# Session leases: awaited on the asyncio client; each client returns its own lease class.
LEASES = {"lease"}
# Coordination recipes (client/recipes.py, recipes_aio.py): local calls that return each
# client's own recipe object (its waits awaited on the asyncio client); ``watch_config``
# streams like a watch.
RECIPES = {"session", "lock", "election", "group"}
WATCHES = WATCHES | {"watch_config"}


def public_names(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")} | {"__init__"}


def test_both_clients_have_the_same_public_methods() -> None:
    assert public_names(Client) == public_names(AsyncClient)
    # Every public name is one of the kinds below, so a new method must say which it is.
    assert public_names(Client) == (CALLS | STREAMS | WATCHES | LOCAL | RING_VIEWS | PROPERTIES
                                    | TRANSACTIONS | LEASES | RECIPES | {"close"})


@pytest.mark.parametrize("name", sorted(public_names(Client)))
def test_each_public_method_has_the_same_signature_and_docstring(name: str) -> None:
    blocking = inspect.getattr_static(Client, name)
    asynchronous = inspect.getattr_static(AsyncClient, name)
    if isinstance(blocking, property):
        assert isinstance(asynchronous, property)
        return
    assert inspect.getdoc(blocking), f"Client.{name} has no docstring"
    assert inspect.getdoc(blocking) == inspect.getdoc(asynchronous)
    sync_sig = inspect.signature(blocking)
    async_sig = inspect.signature(asynchronous)
    if name in TRANSACTIONS:
        assert [(p.name, p.kind, p.default) for p in sync_sig.parameters.values()] == \
            [(p.name, p.kind, p.default) for p in async_sig.parameters.values()]
        assert inspect.iscoroutinefunction(asynchronous) == (name == "run_transaction")
        return
    if name in RECIPES:
        assert list(sync_sig.parameters.values()) == list(async_sig.parameters.values())
        assert not inspect.iscoroutinefunction(asynchronous)
        assert async_sig.return_annotation == "Async" + sync_sig.return_annotation
        return
    if name in LEASES:
        assert list(sync_sig.parameters.values()) == list(async_sig.parameters.values())
        assert inspect.iscoroutinefunction(asynchronous)
        assert (sync_sig.return_annotation, async_sig.return_annotation) == ("Lease", "AsyncLease")
        return
    assert list(sync_sig.parameters.values()) == list(async_sig.parameters.values())
    assert not any(p.kind is p.VAR_KEYWORD for p in sync_sig.parameters.values()), \
        f"Client.{name} hides its parameters behind **kwargs"
    assert not inspect.iscoroutinefunction(blocking)
    if name in STREAMS | WATCHES:
        assert not inspect.iscoroutinefunction(asynchronous)
        assert sync_sig.return_annotation.startswith("Iterator[")
        assert async_sig.return_annotation == "Async" + sync_sig.return_annotation
    elif name in LOCAL:
        assert not inspect.iscoroutinefunction(asynchronous)
        assert sync_sig.return_annotation == async_sig.return_annotation
    else:
        assert inspect.iscoroutinefunction(asynchronous), f"AsyncClient.{name} is not async"
        assert sync_sig.return_annotation == async_sig.return_annotation


def test_both_transaction_classes_have_the_same_calls() -> None:
    """``Transaction`` and ``AsyncTransaction``: the same names and parameters and
    docstrings; the asyncio one's calls are awaited."""
    from ringkv.client.aio import AsyncTransaction
    from ringkv.client.blocking import Transaction

    names = {n for n in dir(Transaction) if not n.startswith("_")}
    assert names == {n for n in dir(AsyncTransaction) if not n.startswith("_")}
    assert {"get", "put", "delete", "commit", "abort", "begin"} <= names
    for name in names:
        blocking = inspect.getattr_static(Transaction, name)
        asynchronous = inspect.getattr_static(AsyncTransaction, name)
        if isinstance(blocking, property):
            assert isinstance(asynchronous, property)
            continue
        assert inspect.getdoc(blocking) == inspect.getdoc(asynchronous)
        assert inspect.signature(blocking).parameters == inspect.signature(asynchronous).parameters
        assert inspect.iscoroutinefunction(asynchronous) and not inspect.iscoroutinefunction(blocking)
    assert hasattr(Transaction, "__enter__") and hasattr(AsyncTransaction, "__aenter__")


def test_both_clients_recipe_objects_have_the_same_calls() -> None:
    """``Lock``/``AsyncLock``, ``Election``/``AsyncElection``, ``Group``/``AsyncGroup``:
    the same names and parameters; the asyncio ones' I/O is awaited; every wait bounded."""
    from ringkv.client import recipes, recipes_aio

    for blocking_cls, async_cls in ((recipes.Lock, recipes_aio.AsyncLock),
                                    (recipes.Election, recipes_aio.AsyncElection),
                                    (recipes.Group, recipes_aio.AsyncGroup)):
        names = {n for n in dir(blocking_cls) if not n.startswith("_")}
        assert names == {n for n in dir(async_cls) if not n.startswith("_")}
        for name in names:
            blocking = inspect.getattr_static(blocking_cls, name)
            asynchronous = inspect.getattr_static(async_cls, name)
            if isinstance(blocking, property):
                assert isinstance(asynchronous, property)
                continue
            assert inspect.signature(blocking).parameters == \
                inspect.signature(asynchronous).parameters, name
            assert not inspect.iscoroutinefunction(blocking)
            is_async = inspect.iscoroutinefunction(asynchronous) or \
                inspect.isasyncgenfunction(asynchronous)
            assert is_async, f"{async_cls.__name__}.{name} is not awaited"
    assert "timeout_s" in inspect.signature(recipes.Lock.acquire).parameters
    assert "timeout_s" in inspect.signature(recipes.Election.campaign).parameters


@pytest.mark.parametrize("name", sorted(CALLS | STREAMS))
def test_each_call_takes_the_parameters_of_its_plan(name: str) -> None:
    """A client method passes its parameters on to the plan of the same name."""
    plan = inspect.signature(getattr(Operations, name))
    method = inspect.signature(getattr(Client, name))
    assert list(method.parameters.values()) == list(plan.parameters.values())


def test_help_shows_the_real_parameters() -> None:
    text = inspect.getdoc(Client.put) or ""
    assert "ttl" in text and "idempotency_key" in text
    assert list(inspect.signature(Client.put).parameters) == [
        "self", "key", "value", "ttl", "keyspace", "consistency", "idempotency_key",
        "if_version", "if_absent", "if_equals", "txn_id", "lease",
    ]


def test_async_scan_is_an_async_iterator_and_sends_nothing_until_iterated() -> None:
    kv = AsyncClient("http://127.0.0.1:1")
    pages = kv.scan_pages(page_size=10)
    assert hasattr(pages, "__anext__")
    assert kv._session is None  # nothing was sent yet


# -- the sans-I/O core -----------------------------------------------------------------


def ring_body(urls: dict[str, str], rf: int) -> bytes:
    nodes = [
        {"node_id": node_id, "client_address": url.removeprefix("http://"),
         "tokens": [(i - 1) * 4 * 10**18], "up": True}
        for i, (node_id, url) in enumerate(urls.items())
    ]
    return json.dumps({"nodes": nodes, "keyspaces": {"default": {"replication_factor": rf}}}).encode()


def make_ops(clock: ManualClock, **options: Any) -> Operations:
    class NoLock:
        def acquire(self, blocking: bool = True) -> bool:
            return True

        def release(self) -> None:
            pass

    keys = iter(f"key-{i}" for i in range(100))
    return Operations(["http://127.0.0.1:7400"], clock=clock, rng=random.Random(3),
                      refresh_lock=NoLock(), new_idempotency_key=lambda: next(keys), **options)


def test_a_write_whose_answer_was_lost_is_retried_on_the_same_node_with_the_same_key() -> None:
    """The client half of at-most-once keyed writes (see ``ringkv.server.idempotency``)."""
    clock = ManualClock(monotonic_s=100.0)
    ops = make_ops(clock, timeout_s=2.0, max_retries=2)
    urls = {"n0": "http://127.0.0.1:7400", "n1": "http://127.0.0.1:7401",
            "n2": "http://127.0.0.1:7402"}
    plan = ops.put("user:1", {"a": 1})
    fetch = next(plan)
    assert isinstance(fetch, Send) and fetch.url == "http://127.0.0.1:7400/v1/ring"
    first = plan.send(Reply(200, ring_body(urls, rf=1), {}))
    assert isinstance(first, Send) and first.method == "PUT"
    ring = TokenRing({n: [(i - 1) * 4 * 10**18] for i, n in enumerate(urls)})
    (replica,) = ring.replicas_for_key(b"user:1", 1)
    assert first.url == urls[replica] + "/v1/kv/default/user%3A1"
    assert first.headers[IDEMPOTENCY_HEADER] == "key-0"
    assert json.loads(first.body or b"") == {"value": {"a": 1}}
    pause = plan.send(Failure("io", "connection lost"))
    assert isinstance(pause, Sleep) and 0.025 <= pause.seconds <= 0.05  # backoff_base_s, jittered
    clock.advance(pause.seconds)
    again = plan.send(None)
    assert isinstance(again, Send)
    assert (again.url, again.headers[IDEMPOTENCY_HEADER]) == (first.url, "key-0")
    answer = json.dumps({"timestamp": [5, 1], "receipt": {"answered": [replica]}}).encode()
    with pytest.raises(StopIteration) as done:
        plan.send(Reply(200, answer, {REPLAYED_HEADER: "true"}))
    assert done.value.value == WriteResult(Timestamp(5, 1), {"answered": [replica]}, replayed=True)


def test_a_call_ends_by_its_deadline_on_the_clock_passed_in() -> None:
    clock = ManualClock(monotonic_s=0.0)
    ops = make_ops(clock, timeout_s=1.0, max_retries=1, backoff_max_s=0.5)
    plan = ops.get("k")
    fetch = next(plan)  # the ring fetch, which never answers
    assert isinstance(fetch, Send) and fetch.timeout_s == 1.0
    clock.advance(1.0)
    attempt = plan.send(Failure("timeout", "no answer within 1 s"))
    assert isinstance(attempt, Send) and attempt.method == "GET"
    clock.advance(1.0)
    pause = plan.send(Failure("timeout", "no answer within 1 s"))
    assert isinstance(pause, Sleep)
    # Deadline: (max_retries + 1) * timeout_s + max_retries * backoff_max_s = 2.5 s.
    clock.advance(0.45)
    last = plan.send(None)
    assert isinstance(last, Send) and last.timeout_s == pytest.approx(0.05)
    clock.advance(0.05)
    with pytest.raises(NoNodeAvailable) as error:
        plan.send(Failure("timeout", "no answer within 0.05 s"))
    assert error.value.tried == ["http://127.0.0.1:7400"]


def test_a_node_that_left_an_attempt_unanswered_is_tried_last_by_the_next_calls() -> None:
    """A cut-off or paused node costs a whole timeout per call; as with a refused
    connect, the calls that follow try it last until it answers again (a lock whose
    lease is shorter than a few timeouts depends on this)."""
    clock = ManualClock(monotonic_s=100.0)
    ops = make_ops(clock, timeout_s=1.0, max_retries=1)
    urls = {"n0": "http://127.0.0.1:7400", "n1": "http://127.0.0.1:7401",
            "n2": "http://127.0.0.1:7402"}
    plan = ops.get("user:1")
    next(plan)
    first = plan.send(Reply(200, ring_body(urls, rf=3), {}))
    assert isinstance(first, Send)
    silent = first.url.split("/v1/")[0]
    clock.advance(1.0)
    pause = plan.send(Failure("timeout", "no answer within 1 s"))
    assert isinstance(pause, Sleep)
    clock.advance(pause.seconds)
    retry = plan.send(None)
    assert isinstance(retry, Send) and not retry.url.startswith(silent)
    with pytest.raises(StopIteration):
        plan.send(Reply(404, b'{"error":{"code":"not_found","message":"m","receipt":{}}}', {}))
    for _ in range(20):  # every later call, whatever the shuffle, asks another node first
        later = ops.get("user:1")
        attempt = next(later)
        assert isinstance(attempt, Send) and not attempt.url.startswith(silent)
        later.close()


def test_a_lease_renewal_gives_a_silent_node_a_share_of_the_ttl_not_the_clients_timeout() -> None:
    """Both clients' background renewals (``Lease``, ``AsyncLease``) run this plan: with
    the client's timeout_s as long as the TTL, a renewal that meets a silent node still
    renews through another before the lease's expiry; the ring fetch is bounded too."""
    clock = ManualClock(monotonic_s=100.0)
    ops = make_ops(clock, timeout_s=2.0, max_retries=3)
    urls = {"n0": "http://127.0.0.1:7400", "n1": "http://127.0.0.1:7401",
            "n2": "http://127.0.0.1:7402"}
    expires_at_s = 100.0 + 2 * 2 / 3  # renewed a third of a 2 s TTL ago
    plan = ops.lease_keepalive("txn:ab", ttl_s=2, expires_at_s=expires_at_s)
    fetch = next(plan)
    assert isinstance(fetch, Send) and fetch.url.endswith("/v1/ring") and fetch.timeout_s == 0.5
    first = plan.send(Reply(200, ring_body(urls, rf=3), {}))
    assert isinstance(first, Send) and first.url.endswith("/v1/lease/txn:ab/keepalive")
    assert first.timeout_s == 0.5  # a quarter of the TTL, not the client's 2 s
    clock.advance(first.timeout_s)
    pause = plan.send(Failure("timeout", "no answer within 0.5 s"))
    assert isinstance(pause, Sleep)
    clock.advance(pause.seconds)
    second = plan.send(None)
    assert isinstance(second, Send) and second.url.split("/v1/")[0] != first.url.split("/v1/")[0]
    assert clock.monotonic_s() + second.timeout_s <= expires_at_s  # answered in time
    with pytest.raises(StopIteration) as done:
        plan.send(Reply(200, b'{"remaining_ms": 1990}', {}))
    assert done.value.value == {"remaining_ms": 1990}
    # A renewal ends by the lease's expiry (or after one attempt, when that is nearer),
    # with the typed error: here every node stays silent.
    clock.advance(2.0)
    start_s = clock.monotonic_s()
    late = ops.lease_keepalive("txn:ab", ttl_s=2, expires_at_s=start_s + 0.3)
    effect = next(late)
    with pytest.raises(NoNodeAvailable):
        for _ in range(20):  # bounded: the renewal's deadline is one attempt away
            if isinstance(effect, Sleep):
                clock.advance(effect.seconds)
                effect = late.send(None)
                continue
            assert isinstance(effect, Send)
            assert clock.monotonic_s() + effect.timeout_s <= start_s + 0.5 + 1e-9
            clock.advance(effect.timeout_s)
            effect = late.send(Failure("timeout", "no answer"))
        raise AssertionError("the renewal did not end by its deadline")
    # Without the lease's bounds (the public ``keepalive()``), the client's timeout_s.
    plain = ops.lease_keepalive("txn:ab")
    assert next(plain).timeout_s == 2.0  # type: ignore[union-attr]
