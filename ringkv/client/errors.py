"""The client's own refusals, kept apart from what a node answered.

Everything a call raises is one of three kinds:

- ``InvalidArgument`` (a ``ValueError``; ``InvalidArgumentType`` is also a
  ``TypeError``): the client refused the call's arguments itself, before
  anything was sent. ``field`` names the argument (``key``, ``ttl``,
  ``ops[2].value`` ...). Never retried, never seen by a node.
- a ``ringkv.errors.RingKVError`` subclass rebuilt from a node's answer
  (``BadRequest``, ``NotFound``, ``Unavailable``, ``Timeout``,
  ``ConditionFailed`` ...): the server's verdict, carrying its ``code``,
  ``http_status`` and details (``field``, ``required``, ``alive`` ...).
- ``ringkv.errors.NoNodeAvailable`` (also a ``RingKVError``, code
  ``no_node_available``): no node answered at all; ``tried``, ``reasons``
  and ``maybe_applied`` say what happened.

So ``except ValueError`` catches a caller's mistake, and ``except RingKVError``
what the cluster said (or that it said nothing).

Pure: no I/O.
"""

from __future__ import annotations


class InvalidArgument(ValueError):
    """An argument the client refused before sending anything; ``field`` names it."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgumentType(InvalidArgument, TypeError):
    """An argument of a type the call does not take (``field`` names it)."""
