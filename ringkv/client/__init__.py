"""The Python client for ringkv: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

    from ringkv.client import Client

    with Client(["http://127.0.0.1:7400"], consistency="QUORUM") as kv:
        kv.put("user:42", {"name": "Ada"}, ttl=3600)
        kv.get("user:42")                     # {'name': 'Ada'}; None when absent
        for record in kv.scan():              # every key, in token order, page by page
            print(record.key, record.value)

What both clients do:

- **Token-aware routing.** The client fetches ``GET /v1/ring``, hashes each
  key with the server's partitioner (``ringkv.ring.token_for``) and sends the
  request to a live replica of the key, so the coordinator serves its own
  copy; any other live node is the fallback. The ring is fetched again every
  ``refresh_interval_s`` seconds, and soon after a connection error or an
  ``Unavailable`` answer.
- **Typed errors, in three kinds** (``errors.py``). An argument the client
  refuses itself, before sending anything, raises ``InvalidArgument`` (a
  ``ValueError``; ``InvalidArgumentType``, for a wrong type, is also a
  ``TypeError``) with ``field`` naming it. An error a node answered is raised
  as the ``ringkv.errors`` class of its code, a ``RingKVError`` carrying the
  server's ``code``, ``http_status`` and details (``Unavailable`` with
  ``required`` and ``alive``, ``Timeout`` with ``received``, ``BadRequest``
  with ``field`` ...). When no node answers at all, ``NoNodeAvailable`` (also a
  ``RingKVError``) says which nodes were tried and why each failed.
- **Keys and TTLs as Python has them.** A key is a ``str`` or UTF-8 ``bytes``;
  a TTL an ``int`` of seconds or a ``datetime.timedelta`` of whole seconds.
  ``exists``, ``ttl_s`` (the seconds a key has left, as the node counts them)
  and ``get_many`` (batched reads, split to the node's batch limit) round out
  ``get``; ``nodes()`` and ``replicas()`` fetch the ring if it never was.
- **Retries only where safe**, at most ``max_retries`` times, with bounded
  exponential backoff and jitter: reads; writes that carry an idempotency key
  (every write does, unless ``idempotent_writes=False``); and any request that
  provably did not run (the connection was refused, or the node answered
  ``Unavailable``, ``Overloaded`` or ``ShuttingDown``). A write whose answer
  was lost is retried *on the same node* with the same ``Idempotency-Key``,
  which that node de-duplicates (``ringkv.server.idempotency``): the retry
  returns the original result and timestamp instead of writing again.
- **The transactional tier.** On a transactional keyspace ``put`` and
  ``delete`` are single-key transactions and take one condition
  (``if_version``, ``if_absent``, ``if_equals``); ``get_versioned`` reads a
  key with its version (strongly, or at a snapshot), ``txn`` runs a one-shot
  transaction and ``txn_status`` asks for a transaction's outcome. Every
  transaction carries an id (the caller's, or one the client makes up), the
  same for all its attempts, so the leader runs it at most once: a lost
  answer is retried through any node, and a conflict abort (``Aborted``) is
  retried up to ``txn_retries`` times. A failed condition raises
  ``ConditionFailed`` (with ``current_value`` and ``current_version``) and is
  not retried. The range's leader, named by each answer's receipt, is tried
  first next time.
  ``transaction`` opens an interactive transaction (``with``/``async with``:
  commit on a clean exit, abort on an exception), whose calls all go to the
  node that began it; ``run_transaction`` reruns a function after an abort a
  rerun may not meet again, keeping its first priority, and commits at most
  once.
- **Watches.** ``for event in kv.watch("txn", "user:", prefix=True)`` (``async
  for`` on ``AsyncClient``) streams every commit to a key or prefix of a
  transactional keyspace as ``WatchEvent``s (type, key, value, version) in
  commit-timestamp order over HTTP, and resumes a cut stream, on another
  node if need be, after the last version received whole: nothing lost,
  nothing repeated (``client/watch.py``).
- **Coordination recipes**: ``lock`` (a mutex
  with fencing tokens and ``fenced_put``), ``election``, ``group`` and
  ``watch_config``, ZooKeeper's four recipes built on session leases,
  compare-and-set and watches as etcd's concurrency package builds them
  (``recipes.py``; what they decide, in ``recipes_core.py``).
- **The native protocol by default** (``docs/native-protocol.md``): after
  the first ring fetch, requests go over each node's native port (learned
  from the ring), pipelined in ``AsyncClient``; ``protocol="http"`` keeps
  everything on HTTP.
- **Pooled keep-alive connections** and a timeout on every attempt
  (``timeout_s``): a call takes at most about ``(max_retries + 1) *
  timeout_s`` plus the backoff (capped at 1 s per retry).

How it is built. The logic (routing, retries, ring refresh, encoding and
decoding) is written once, as plans: generators that yield the I/O they need
(an HTTP request, a pause) and receive its outcome. Two thin shells perform
that I/O, and each spells out every public method as a call into the plans:

    types.py       what the calls return: Record, WriteResult, BatchResult, Page, NodeView,
                   Versioned, TxnResult, TxnStatus, TxnHandle, TxnCommit
    errors.py      the client's own refusals: InvalidArgument, InvalidArgumentType
    plan.py        the effects a plan yields (Send, Sleep, Emit), their outcomes, a Stepper
    routing.py     the ring as last fetched, node order (token-aware), down-marking, deadlines
    operations.py  the plan of every call: encode, route, retry, decode (sans-I/O)
    transaction.py an interactive transaction's state and calls (TxnCore), when to rerun one
    watch.py       a watch's state across connections (WatchCore): resume point, repeats dropped
    recipes_core.py  the recipes' decisions: the contender queue, holder, fencing check
    recipes.py     Lock, Election, Group, watch_config on Client (shell)
    recipes_aio.py AsyncLock, AsyncElection, AsyncGroup, watch_config on AsyncClient (shell)
    native.py      a plan's HTTP request as a native-protocol operation, and its answer back
    base.py        what both clients share: the constructor, nodes(), replicas()
    blocking.py    Client: pooled http.client and native connections and a deadline
                   watchdog (shell), so it also works under gevent, e.g. in locust
    aio.py         AsyncClient: aiohttp and pipelined native connections (shell)

``types``, ``errors``, ``plan``, ``routing``, ``operations``, ``transaction`` and ``native`` are pure: no sockets,
threads, event loop or ``time``; ``base``, ``blocking`` and ``aio`` are the
shells around them.
"""

from typing import TYPE_CHECKING, Any

from ringkv.client.types import (
    BatchResult,
    NodeView,
    Page,
    Record,
    TxnCommit,
    TxnHandle,
    TxnResult,
    TxnStatus,
    Versioned,
    WriteResult,
)

from ringkv.client.watch import WatchEvent
from ringkv.client.recipes_core import FencingRejected, LockLost, LockTimeout
from ringkv.client.errors import InvalidArgument, InvalidArgumentType

# The errors calls raise, importable from here as they were from the old module.
from ringkv.errors import (  # noqa: F401
    Aborted,
    BadRequest,
    ConditionFailed,
    LeaseExpired,
    NoNodeAvailable,
    NotFound,
    Overloaded,
    RingKVError,
    ShuttingDown,
    Timeout,
    TooLarge,
    Unavailable,
)

# Internal names that code written against the old single module imports.
from ringkv.client.operations import Operations as _Operations  # noqa: F401
from ringkv.client.routing import Topology as _Topology  # noqa: F401
from ringkv.client.routing import parse_ring as _parse_ring  # noqa: F401

if TYPE_CHECKING:
    from ringkv.client.aio import AsyncClient
    from ringkv.client.blocking import Client


def __getattr__(name: str) -> Any:
    """The two clients are imported on first use (PEP 562), so that importing
    the pure modules of this package pulls in no sockets, threads or aiohttp."""
    if name == "Client":
        from ringkv.client.blocking import Client

        return Client
    if name == "AsyncClient":
        from ringkv.client.aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "BatchResult",
    "Client",
    "FencingRejected",
    "InvalidArgument",
    "InvalidArgumentType",
    "LockLost",
    "LockTimeout",
    "NodeView",
    "Page",
    "Record",
    "TxnCommit",
    "TxnHandle",
    "TxnResult",
    "TxnStatus",
    "Versioned",
    "WatchEvent",
    "WriteResult",
]
