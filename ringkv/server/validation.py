"""Turning untrusted HTTP input into typed values, or a BadRequest/TooLarge that names the field."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

import msgpack

from ringkv.config import LimitsConfig
from ringkv.errors import BadRequest, HeaderTooLarge, TooLarge
from ringkv.quorum import ConsistencyLevel
from ringkv.versioning import encode_json_value

# Cassandra's limit: 20 years. A larger TTL is almost certainly a unit mistake.
MAX_TTL_S = 20 * 365 * 24 * 3600
KV_PREFIX = "/v1/kv/"
# The operations of a batch (POST /v1/batch).
BATCH_OPS = ("put", "get", "delete")
# A snapshot read's bounds: a timestamp (µs) fits a signed 64-bit integer, and a
# bounded-staleness read is at most a day stale.
MAX_TIMESTAMP_US = 2**63 - 1
MAX_STALENESS_MS = 86_400_000
# One request header, name and value: aiohttp's and nginx's default line limit.
MAX_HEADER_BYTES = 8190


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Shared decoder: json.loads with options builds a new decoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_json_body(body: bytes) -> Any:
    try:
        return _DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        # RecursionError: absurdly deep nesting must not take the node down.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise BadRequest(f"request body is not valid JSON: {reason}", field="body") from None


def check_headers(raw_headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Each header, name and value, is at most MAX_HEADER_BYTES; the error names it."""
    for name, value in raw_headers:
        size = len(name) + len(value)
        if size > MAX_HEADER_BYTES:
            header = name.decode("latin-1")
            raise HeaderTooLarge(
                f"header {header} is {size} bytes; the limit is {MAX_HEADER_BYTES}",
                header=header,
                limit=MAX_HEADER_BYTES,
                size=size,
            )


def key_from_path(raw_path: str, limits: LimitsConfig) -> bytes:
    """The key of /v1/kv/{keyspace}/{key}, percent-decoded as strict UTF-8.

    Read from the raw path so that bytes which are not UTF-8 are rejected,
    rather than silently kept as literal "%FF" text.
    """
    rest = raw_path[len(KV_PREFIX) :] if raw_path.startswith(KV_PREFIX) else ""
    _, _, raw_key = rest.partition("/")
    return check_key(unquote_to_bytes(raw_key), limits, field="key")


def key_after(raw_path: str, segments: int, limits: LimitsConfig) -> bytes:
    """The key that ends a path after its first ``segments`` segments (5 in
    ``/v1/txn/{id}/kv/{keyspace}/{key}``), percent-decoded as strict UTF-8 as
    ``key_from_path`` does."""
    parts = raw_path.split("/", segments + 1)
    raw_key = parts[segments + 1] if len(parts) > segments + 1 else ""
    return check_key(unquote_to_bytes(raw_key), limits, field="key")


def check_key(raw: bytes, limits: LimitsConfig, *, field: str) -> bytes:
    if not raw:
        raise BadRequest("key must not be empty", field=field)
    if len(raw) > limits.max_key_bytes:
        raise TooLarge(
            f"key is {len(raw)} bytes; the limit is {limits.max_key_bytes}",
            field=field,
            limit=limits.max_key_bytes,
            size=len(raw),
        )
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("key is not valid UTF-8", field=field) from None
    return raw


def key_from_json(value: Any, limits: LimitsConfig, *, field: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest("key must be a string", field=field)
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("key is not valid UTF-8", field=field) from None
    return check_key(raw, limits, field=field)


def value_bytes(value: Any, limits: LimitsConfig, *, field: str) -> bytes:
    try:
        encoded = encode_json_value(value)
    except (ValueError, TypeError, RecursionError):
        raise BadRequest("value is not a JSON value", field=field) from None
    if len(encoded) > limits.max_value_bytes:
        raise TooLarge(
            f"value is {len(encoded)} bytes; the limit is {limits.max_value_bytes}",
            field=field,
            limit=limits.max_value_bytes,
            size=len(encoded),
        )
    return encoded


_TTL_WHAT = "ttl must be a whole number of seconds"
# A query parameter's number: ASCII digits only (int() would also take "1_0", " 10", "+10", "١٠").
_DIGITS = re.compile(r"[0-9]{1,19}")


def ttl_s(value: Any, *, field: str) -> int | None:
    """A TTL from a JSON body in whole seconds, or None for no TTL (absent, null or 0).

    Only a JSON integer: a string ("10"), a float (1.5, even 10.0) or a boolean is
    refused rather than guessed at."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{_TTL_WHAT} (a JSON integer), got {type(value).__name__} "
                         f"{_preview(value)}", field=field)
    return _ttl_range(value, field)


def ttl_from_query(text: str | None, *, field: str = "ttl") -> int | None:
    """A TTL given as the query parameter ``ttl``: decimal ASCII digits only."""
    if text is None:
        return None
    if not _DIGITS.fullmatch(text):
        raise BadRequest(f"{_TTL_WHAT} (decimal digits), got {_preview(text)}", field=field)
    return _ttl_range(int(text), field)


def _ttl_range(value: int, field: str) -> int | None:
    if not 0 <= value <= MAX_TTL_S:
        raise BadRequest(f"ttl must be between 0 and {MAX_TTL_S} seconds", field=field)
    return value or None


def _preview(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_query(query: Mapping[str, str]) -> None:
    """Each query parameter at most once: a repeated one is refused, naming it, rather
    than one of its values silently winning."""
    if len(query) < 2:
        return
    names = [name for name, _ in query.items()]  # a MultiDict's items: one per value
    if len(set(names)) == len(names):
        return
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise BadRequest(f"query parameter {name!r} is given {names.count(name)} times; "
                             "give it once", field=name)
        seen.add(name)


def check_fields(obj: Mapping[str, Any], allowed: Iterable[str], *, what: str,
                 where: str = "") -> None:
    """Refuse a field of a JSON object that is not in ``allowed``, naming it (at ``where``)."""
    allowed = tuple(allowed)
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        takes = ", ".join(allowed) if allowed else "no fields"
        raise BadRequest(f"unknown field {unknown[0]!r}; {what} takes {takes}", field=name)


# The levels by name as clients write them: a dict lookup on every request instead of
# an enum call (which is slow); anything not here is parsed, and refused, in full.
_LEVELS = {name: level for level in ConsistencyLevel
           for name in (level.value, level.value.lower())}


def consistency(value: Any, *, write: bool, field: str = "consistency") -> ConsistencyLevel | None:
    if value is None or value == "":
        return None
    level = _LEVELS.get(value) if isinstance(value, str) else None
    if level is not None and (write or level is not ConsistencyLevel.ANY):
        return level
    if not isinstance(value, str):
        raise BadRequest("consistency must be a string", field=field)
    return ConsistencyLevel.parse(value, field=field, write=write)


def bounded_int(value: Any, *, field: str, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not (isinstance(value, int) or (
            isinstance(value, str) and _DIGITS.fullmatch(value))):
        raise BadRequest(f"{field} must be an integer (decimal digits)", field=field)
    number = int(value)
    if not low <= number <= high:
        raise BadRequest(f"{field} must be between {low} and {high}", field=field)
    return number


def encode_page_token(after: tuple[int, bytes] | None) -> str | None:
    if after is None:
        return None
    packed = msgpack.packb([after[0], after[1]], use_bin_type=True)
    return base64.urlsafe_b64encode(packed).decode().rstrip("=")


def decode_page_token(token: str | None) -> tuple[int, bytes] | None:
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        value = msgpack.unpackb(base64.urlsafe_b64decode(padded), raw=False)
        position, key = value
        if not isinstance(position, int) or not isinstance(key, bytes):
            raise ValueError
        if not -(2**63) <= position < 2**63:
            raise ValueError
        return position, key
    except Exception:  # noqa: BLE001 - any garbage token is the client's mistake
        raise BadRequest("page_token is not a token this server issued", field="page_token") from None
