"""The request/response core of internode messaging, independent of what carries the bytes.

What every request goes through, whether the bytes travel over TCP or over
the simulator's byte streams (the transport is the same code in both):

* a pending entry (``Pending``): the caller's future, the timer that fails it
  with ``PeerTimeout`` at its deadline, and how its answer is parsed;
* admission, per peer: at most ``max_inflight`` requests pending and at most
  ``max_queue`` frames waiting to be written; beyond either, ``Overloaded`` at
  once (``admission_error``);
* a bounded exponential backoff after a failed connect (``backoff_s``),
  during which requests fail fast with ``PeerUnreachable``;
* error mapping: a handler's failure becomes an error body
  (``failure_body``), and an error body becomes the caller's exception
  (``remote_error``: ``Overloaded`` for code "overloaded", else ``RemoteError``).

The serving side's fast path: a handler may offer
``answer_future(from_node_id, verb, payload)``, which returns an
``asyncio.Future`` of the answer for requests it can answer without a task
of its own (a local read: already done; a write: its group commit), or None
(the coroutine handler runs). ``Requester`` is what callers of a transport
rely on; the one ``Transport`` satisfies it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol

from ringkv.clock import Timer
from ringkv.errors import (
    Overloaded,
    PeerTimeout,
    RemoteError,
    RingKVError,
    ShuttingDown,
)

Handler = Callable[[str, str, Any], Awaitable[Any]]
AnswerFuture = Callable[[str, str, Any], "asyncio.Future[Any] | None"]

BASE_BACKOFF_S = 0.05


class Requester(Protocol):
    """What a caller needs of a transport (``Transport`` is the one implementation)."""

    async def request(self, node_id: str, verb: str, payload: Any, timeout_s: float) -> Any: ...

    def request_future(
        self,
        node_id: str,
        verb: str,
        payload: Any,
        timeout_s: float,
        convert: Callable[[Any], Any] | None = None,
    ) -> asyncio.Future[Any]: ...


class Pending(NamedTuple):
    """A request waiting for its answer, the timer that gives up on it, how
    its answer is parsed, and the future's done callback that frees the entry
    if the caller cancels (see ``Transport.request_future``; the answer's
    arrival removes it, which costs less than letting it run)."""

    future: asyncio.Future[Any]
    timer: Timer
    convert: Callable[[Any], Any] | None
    abandoned: Callable[[asyncio.Future[Any]], None]


def answer_future_of(handler: Handler) -> AnswerFuture | None:
    """The handler's fast path, if it has one (see the module docstring).

    Requests it takes are answered as their frame is decoded (a future that
    is already done) or from the future's callback, without a task: for a
    replica's reads and writes that task is most of the cost.
    """
    return getattr(handler, "answer_future", None)


def resolved_future(value: Any) -> asyncio.Future[Any]:
    """A future already holding ``value`` (an answer known at once)."""
    answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    answer.set_result(value)
    return answer


def backoff_s(failures: int, max_backoff_s: float) -> float:
    """How long to fail fast after ``failures`` consecutive failed connects."""
    return min(max_backoff_s, BASE_BACKOFF_S * 2 ** min(failures - 1, 30))


def admission_error(
    node_id: str, pending: int, max_inflight: int, queued: int, max_queue: int
) -> Overloaded | None:
    """Why one more request to ``node_id`` must be refused now, or None."""
    if queued >= max_queue:
        return Overloaded(f"send queue to node {node_id} is full ({max_queue} frames)",
                          node_id=node_id)
    if pending >= max_inflight:
        # The peer would refuse more than this in flight anyway; bound our table too.
        return Overloaded(f"{pending} requests already pending to node {node_id}",
                          node_id=node_id)
    return None


def timeout_error(node_id: str, verb: str, timeout_s: float) -> PeerTimeout:
    return PeerTimeout(f"node {node_id} did not answer {verb!r} within {timeout_s}s",
                       node_id=node_id, verb=verb, timeout_s=timeout_s)


def failure_body(error: BaseException) -> dict[str, Any]:
    """How an error response words a handler's failure: its own code, or "internal"."""
    if isinstance(error, RingKVError):
        return {"code": error.code, "message": error.message, "details": error.details}
    return {"code": "internal", "message": f"{type(error).__name__}: {error}", "details": {}}


def settle_answer(
    fut: asyncio.Future[Any], payload: Any, convert: Callable[[Any], Any] | None
) -> None:
    """Resolve a request's future with its answer, parsed by ``convert`` if given."""
    if convert is None:
        fut.set_result(payload)
        return
    try:
        fut.set_result(convert(payload))
    except RingKVError as exc:  # a malformed answer fails this request only
        fut.set_exception(exc)


def settled(answer: asyncio.Future[Any], node_id: str) -> tuple[BaseException | None, Any]:
    """(error, payload) of an ``answer_future`` future that is done; cancelled means stopping."""
    if answer.cancelled():
        return ShuttingDown(f"node {node_id} is stopping"), None
    error = answer.exception()
    return error, None if error is not None else answer.result()


def remote_error(node_id: str, verb: str, payload: Any) -> RingKVError:
    """Turn an error response into the exception the requester sees."""
    if isinstance(payload, dict):
        code = payload.get("code")
        message = payload.get("message")
        details = payload.get("details")
    else:
        code = message = details = None
    code = code if isinstance(code, str) else "internal"
    message = message if isinstance(message, str) else "malformed error response"
    details = details if isinstance(details, dict) else {}
    if code == Overloaded.code:
        # Whoever on the peer was overloaded, the caller's move is the same: back off.
        return Overloaded(f"node {node_id} is overloaded: {message}", node_id=node_id, verb=verb)
    return RemoteError(
        f"node {node_id} failed {verb!r}: [{code}] {message}",
        node_id=node_id,
        verb=verb,
        remote_code=code,
        remote_message=message,
        remote_details=details,
    )
