"""Transactional requests from untrusted JSON, or a BadRequest/TooLarge naming the field.

* a condition on a single-key PUT or DELETE (``"if"``), or in a one-shot
  transaction's ``conditions``: ``{"version": N}``, ``{"absent": true}`` or
  ``{"equals": <json>}`` (see ``txn/requests.py`` for what each means);
* a one-shot transaction, ``POST /v1/txn``: ``{"keyspace", "id"?,
  "reads": [keys], "conditions": [{"key", ...}], "writes": [{"op": "put" |
  "delete", "key", "value"?, "lease"?}]}``; each list may be left out, not all of
  them. A put with ``"lease": id`` attaches its key to that session lease (of
  the transaction's keyspace), as a single put's ``lease`` does.

Written values are kept as their canonical JSON bytes (``encode_json_value``),
as the eventual tier stores them; ``equals`` compares JSON values, whatever
the spacing or key order of either side. A transaction id is 1-64 characters of ``[A-Za-z0-9._:-]``.

Interactive transactions (``POST /v1/txn/begin``): the begin body
``{"keyspace"?, "read_only"?, "priority"?}`` (``parse_begin``), and the node a
transaction lives on, read from its id (``session_node``: the node that began
it named it ``<node id>:<counter>:<8 hex digits>``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ringkv.config import LimitsConfig
from ringkv.errors import BadRequest, TooLarge
from ringkv.server.validation import key_from_json, value_bytes
from ringkv.txn.leases import is_reserved, parse_id
from ringkv.txn.requests import CONDITION_KINDS, Condition, TxnRequest, Write, comparable_json

TXN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_TXN_FIELDS = frozenset({"keyspace", "id", "reads", "conditions", "writes"})
_WRITE_FIELDS = frozenset({"op", "key", "value", "lease"})
_BEGIN_FIELDS = frozenset({"keyspace", "read_only", "priority"})
# The ids the node that begins an interactive transaction gives it (txn/service.py).
_SESSION_ID = re.compile(r"^(.+):[0-9]+:[0-9a-f]{8}$")
MAX_PRIORITY_US = 2**63 - 1


@dataclass(frozen=True)
class Begin:
    """What ``POST /v1/txn/begin`` asked for (``keyspace`` None: the caller's default)."""

    keyspace: str | None
    read_only: bool
    priority_us: int | None


def parse_begin(body: Any) -> Begin:
    """The body of ``POST /v1/txn/begin`` (an empty body is ``{}``)."""
    if not isinstance(body, Mapping):
        raise BadRequest("the body of a begin is a JSON object", field="body")
    unknown = sorted(set(body) - _BEGIN_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; a begin takes "
                         f"{', '.join(sorted(_BEGIN_FIELDS))}", field=unknown[0])
    keyspace = body.get("keyspace")
    if keyspace is not None and (not isinstance(keyspace, str) or not keyspace):
        raise BadRequest("keyspace must be a non-empty string", field="keyspace")
    read_only = body.get("read_only", False)
    if not isinstance(read_only, bool):
        raise BadRequest("read_only must be true or false", field="read_only")
    priority = body.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                 or not 0 <= priority <= MAX_PRIORITY_US):
        raise BadRequest("priority must be the priority (µs) an earlier attempt's begin "
                         "answered", field="priority")
    return Begin(keyspace, read_only, priority)


def check_txn_id(txn_id: str) -> str:
    if not TXN_ID.match(txn_id):
        raise BadRequest("id must be 1-64 characters of letters, digits and . _ : -",
                         field="id")
    return txn_id


def session_node(txn_id: str) -> str | None:
    """The node that began the interactive transaction ``txn_id`` (None: not such an id)."""
    match = _SESSION_ID.match(txn_id)
    return None if match is None else match.group(1)


def parse_condition(obj: Any, key: bytes, limits: LimitsConfig, *, field: str) -> Condition:
    """One condition on ``key`` (from the path, or the condition's own ``key``)."""
    if not isinstance(obj, Mapping):
        raise BadRequest(f"{field} must be an object with one of {', '.join(CONDITION_KINDS)}",
                         field=field)
    kinds = [kind for kind in CONDITION_KINDS if kind in obj]
    unknown = sorted(set(obj) - set(CONDITION_KINDS) - {"key"})
    if unknown:
        raise BadRequest(f"{field} has unknown field {unknown[0]!r}; a condition is one of "
                         f"{', '.join(CONDITION_KINDS)}", field=f"{field}.{unknown[0]}")
    if len(kinds) != 1:
        raise BadRequest(f"{field} must name exactly one of {', '.join(CONDITION_KINDS)}",
                         field=field)
    kind = kinds[0]
    where = f"{field}.{kind}"
    if kind == "version":
        version = obj["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise BadRequest("version must be a commit timestamp: a whole number of "
                             "microseconds, 0 or more", field=where)
        return Condition(key, "version", version_us=version)
    if kind == "absent":
        if obj["absent"] is not True:
            raise BadRequest("absent must be true (to require a value, use version or equals)",
                             field=where)
        return Condition(key, "absent")
    value_bytes(obj["equals"], limits, field=where)  # a JSON value, within the value limit
    return Condition(key, "equals", equals=comparable_json(obj["equals"]))


def parse_txn(body: Any, limits: LimitsConfig) -> TxnRequest:
    """A one-shot transaction from the body of ``POST /v1/txn``."""
    if not isinstance(body, Mapping):
        raise BadRequest("a transaction is a JSON object", field="body")
    unknown = sorted(set(body) - _TXN_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; a transaction has "
                         f"{', '.join(sorted(_TXN_FIELDS))}", field=unknown[0])
    keyspace = body.get("keyspace")
    if not isinstance(keyspace, str) or not keyspace:
        raise BadRequest("keyspace must be a non-empty string", field="keyspace")
    txn_id = body.get("id")
    if txn_id is not None and (not isinstance(txn_id, str) or not TXN_ID.match(txn_id)):
        raise BadRequest("id must be 1-64 characters of letters, digits and . _ : -",
                         field="id")
    reads = tuple(key_from_json(key, limits, field=f"reads[{i}]")
                  for i, key in enumerate(_list(body, "reads")))
    conditions = []
    for i, obj in enumerate(_list(body, "conditions")):
        where = f"conditions[{i}]"
        key = key_from_json(obj.get("key") if isinstance(obj, Mapping) else None, limits,
                            field=f"{where}.key")
        conditions.append(parse_condition(obj, key, limits, field=where))
    writes = [_write(obj, limits, field=f"writes[{i}]")
              for i, obj in enumerate(_list(body, "writes"))]
    if not (reads or conditions or writes):
        raise BadRequest("a transaction needs reads, conditions or writes", field="body")
    seen: set[bytes] = set()
    for i, write in enumerate(writes):
        if write.lease is not None and parse_id(write.lease).keyspace != keyspace:
            raise BadRequest(f"lease {write.lease} lives in keyspace "
                             f"{parse_id(write.lease).keyspace!r}, not {keyspace!r}",
                             field=f"writes[{i}].lease")
        if write.key in seen:
            raise BadRequest(f"key {write.key.decode()!r} is written twice in one transaction",
                             field=f"writes[{i}].key")
        seen.add(write.key)
    request = TxnRequest(keyspace, txn_id, reads, tuple(conditions), tuple(writes))
    touched = len(request.keys())
    if touched > limits.max_batch_ops:
        raise TooLarge(f"the transaction touches {touched} keys; the limit is "
                       f"{limits.max_batch_ops} (limits.max_batch_ops)", field="body",
                       limit=limits.max_batch_ops, size=touched)
    return request


def check_not_reserved(key: bytes, *, field: str) -> bytes:
    """Keys under ``\\x00lease/`` hold the session leases' records: no client writes them."""
    if is_reserved(key):
        raise BadRequest("keys starting with \\x00lease/ are reserved for session leases",
                         field=field)
    return key


def _list(body: Mapping[str, Any], name: str) -> list[Any]:
    items = body.get(name)
    if items is None:
        return []
    if not isinstance(items, list):
        raise BadRequest(f"{name} must be a list", field=name)
    return items


def _write(obj: Any, limits: LimitsConfig, *, field: str) -> Write:
    if not isinstance(obj, Mapping):
        raise BadRequest(f"{field} must be an object with op, key and value", field=field)
    unknown = sorted(set(obj) - _WRITE_FIELDS)
    if unknown:
        raise BadRequest(f"{field} has unknown field {unknown[0]!r}",
                         field=f"{field}.{unknown[0]}")
    key = check_not_reserved(key_from_json(obj.get("key"), limits, field=f"{field}.key"),
                             field=f"{field}.key")
    op = obj.get("op")
    if op == "put":
        if "value" not in obj:
            raise BadRequest("a put needs a value", field=f"{field}.value")
        lease = obj.get("lease")
        if lease is not None:
            lease = str(parse_id(lease, field=f"{field}.lease"))
        return Write(key, value_bytes(obj["value"], limits, field=f"{field}.value"), lease)
    if op == "delete":
        if "value" in obj:
            raise BadRequest("a delete takes no value", field=f"{field}.value")
        if "lease" in obj:
            raise BadRequest("a delete takes no lease (it detaches the key)",
                             field=f"{field}.lease")
        return Write(key, None)
    raise BadRequest("op must be \"put\" or \"delete\"", field=f"{field}.op")
