"""What the data commands (``ringkv get|put|del|scan|txn``) decide and print: the
exit code of an error, a command-line VALUE read as JSON or text, a transaction
document checked, and each result as a JSON document or a human table.

Pure: no I/O and no clock. ``data_cli.py`` is the shell that calls the client
and prints what these functions return.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ringkv.errors import BadRequest, NoNodeAvailable, RingKVError

if TYPE_CHECKING:  # only annotations: `ringkv node` need not import the client
    from ringkv.client.types import Record, TxnResult, WriteResult

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4
EXIT_TIMEOUT = 5
EXIT_NOT_APPLIED = 6
EXIT_UNAUTHORIZED = 7

# (exit code, what it means): the --help epilog and the README table say this.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "ok"),
    (EXIT_ERROR, "any other error (a 5xx the codes below do not cover)"),
    (EXIT_USAGE, "bad command line or input: a usage error, bad JSON, 400 bad_request, "
                 "413 too_large"),
    (EXIT_NOT_FOUND, "not found: `get` of an absent key, or an unknown keyspace (404)"),
    (EXIT_UNAVAILABLE, "unavailable: too few live replicas (503 unavailable), the node "
                       "overloaded, not joined or without a leader, or no node reachable"),
    (EXIT_TIMEOUT, "timeout: too few replicas answered in time (504), or no answer came "
                   "back (a write may have been applied)"),
    (EXIT_NOT_APPLIED, "not applied: a condition did not hold (409 condition_failed) or the "
                       "transaction aborted on a conflict (409 aborted)"),
    (EXIT_UNAUTHORIZED, "unauthorized: no or bad credentials (401), a missing permission "
                        "(403), or too many failed logins (429)"),
)

# A scan page: the most keys asked for at once (the nodes' default limits.max_scan_page).
SCAN_PAGE_KEYS = 1000
MAX_SCAN_LIMIT = 100_000
TXN_FIELDS = ("keyspace", "id", "reads", "conditions", "writes")


def exit_code(error: RingKVError) -> int:
    """The exit code a data command ends with after ``error``."""
    if isinstance(error, NoNodeAvailable):
        # Refused connections mean nothing was sent; a lost answer (or a spent
        # deadline) leaves the outcome unknown, as a timeout does.
        return EXIT_TIMEOUT if error.maybe_applied or error.timed_out else EXIT_UNAVAILABLE
    status = error.http_status
    if error.code == "not_found":
        return EXIT_NOT_FOUND
    if error.code in ("condition_failed", "aborted"):
        return EXIT_NOT_APPLIED
    if status in (401, 403, 429):
        return EXIT_UNAUTHORIZED
    if status in (408, 504):
        return EXIT_TIMEOUT
    if status == 503:
        return EXIT_UNAVAILABLE
    if status in (400, 413, 414, 431):
        return EXIT_USAGE
    return EXIT_ERROR


def error_line(error: RingKVError) -> str:
    """The one line a failed command prints on stderr: its code and message."""
    message = " ".join(error.message.split())  # one line, whatever the message holds
    return f"ringkv: error: {error.code}: {message}"


def parse_value(text: str, *, as_string: bool = False) -> Any:
    """A command-line VALUE: the JSON it parses as (``42``, ``true``, ``{"a": 1}``,
    ``"quoted"``), else the text itself as a string (``hello``). NaN and Infinity
    are not JSON values, so they stay strings. ``as_string``: always the text."""
    if as_string:
        return text
    try:
        return json.loads(text, parse_constant=_not_json)
    except ValueError:
        return text


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_json_argument(text: str, field: str) -> Any:
    """A command-line argument that must be JSON (``--if-equals``), or BadRequest naming it."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except ValueError as exc:
        raise BadRequest(f"{field} must be JSON: {exc}", field=field) from None


@dataclass
class TxnRequest:
    """A one-shot transaction as ``Client.txn`` takes it."""

    keyspace: str | None = None
    id: str | None = None
    reads: list[str] = field(default_factory=list)
    conditions: list[dict[str, Any]] = field(default_factory=list)
    writes: list[dict[str, Any]] = field(default_factory=list)


def parse_txn_document(text: str, source: str) -> TxnRequest:
    """A transaction document (the body of ``POST /v1/txn``: ``keyspace``, ``id``,
    ``reads``, ``conditions``, ``writes``), or BadRequest naming what is wrong.
    ``source`` names where the text came from (a file, or stdin)."""
    try:
        body = json.loads(text, parse_constant=_not_json)
    except ValueError as exc:
        raise BadRequest(f"the transaction in {source} is not JSON: {exc}", field=source) \
            from None
    if not isinstance(body, dict):
        raise BadRequest(f"the transaction in {source} must be a JSON object", field=source)
    unknown = sorted(set(body) - set(TXN_FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} in the transaction (expected "
                         f"{', '.join(TXN_FIELDS)})", field=unknown[0])
    request = TxnRequest()
    for name in ("keyspace", "id"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{name} must be a string", field=name)
        setattr(request, name, value)
    reads = body.get("reads", [])
    if not isinstance(reads, list) or not all(isinstance(key, str) for key in reads):
        raise BadRequest("reads must be a list of keys (strings)", field="reads")
    request.reads = list(reads)
    for name in ("conditions", "writes"):
        items = body.get(name, [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise BadRequest(f"{name} must be a list of JSON objects", field=name)
        setattr(request, name, [dict(item) for item in items])
    return request


# -- results as JSON documents (the shape of the HTTP API's answers) ---------------


def record_document(record: Record) -> dict[str, Any]:
    """A read as ``GET /v1/kv/{ks}/{key}`` answers it: ``version`` on a
    transactional keyspace, ``timestamp`` (and ``expires_at_us``) on an eventual one."""
    doc: dict[str, Any] = {"key": record.key}
    if transactional_receipt(record.receipt):
        doc["version"] = record.timestamp.wall_us
    else:
        doc["timestamp"] = record.timestamp.to_json()
        if record.expires_at_us is not None:
            doc["expires_at_us"] = record.expires_at_us
    doc["receipt"] = record.receipt
    doc["value"] = record.value
    return doc


def write_document(result: WriteResult) -> dict[str, Any]:
    """A put or delete as ``PUT``/``DELETE /v1/kv/{ks}/{key}`` answers it."""
    doc: dict[str, Any] = {"ok": True}
    if result.version is not None:  # a transactional keyspace: the commit timestamp
        doc["id"] = result.txn_id
        doc["version"] = result.version
    else:
        doc["timestamp"] = result.timestamp.to_json()
    doc["receipt"] = result.receipt
    if result.replayed:
        doc["replayed"] = True
    return doc


def scan_document(records: Sequence[Record], next_page_token: str | None,
                  scanned: int) -> dict[str, Any]:
    """A scan's keys as one ``GET /v1/kv/{ks}`` page answers them, however many pages
    it took; ``next_page_token`` resumes it (``--page-token``), ``scanned`` counts the
    keys it went through up to where it stopped (more than the items with ``--prefix``)."""
    return {
        "items": [{"key": r.key, "value": r.value, "timestamp": r.timestamp.to_json()}
                  for r in records],
        "next_page_token": next_page_token,
        "scanned": scanned,
    }


def txn_document(result: TxnResult) -> dict[str, Any]:
    """A one-shot transaction as ``POST /v1/txn`` answers it."""
    reads = []
    for key, got in result.reads.items():
        reads.append({"key": key, "found": got is not None,
                      "value": None if got is None else got.value,
                      "version": None if got is None else got.version})
    doc: dict[str, Any] = {"ok": True, "id": result.id, "committed": result.committed,
                           "commit_ts": result.commit_ts, "reads": reads,
                           "receipt": result.receipt}
    if result.replayed:
        doc["replayed"] = True
    if result.conflict_retries:
        doc["conflict_retries"] = result.conflict_retries
    return doc


def transactional_receipt(receipt: Mapping[str, Any] | None) -> bool:
    """Whether a read's receipt is the transactional tier's: it names the range's
    leader (or a snapshot's ``read_ts``), where an eventual read names its level."""
    return receipt is not None and ("leader" in receipt or "read_ts" in receipt)


# -- results as human tables ---------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, under a header row."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
             for line in [list(headers), *rows]]
    return "\n".join(lines)


def value_text(value: Any) -> str:
    """A value as compact JSON, so ``"42"`` (a string) and ``42`` (a number) differ."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def time_text(wall_us: int | None) -> str:
    """A timestamp in µs as UTC ISO 8601, to the microsecond; ``-`` for none."""
    if wall_us is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(wall_us / 1_000_000, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_table(record: Record) -> str:
    if transactional_receipt(record.receipt):
        return table(("KEY", "VALUE", "VERSION"),
                     [(record.key, value_text(record.value), str(record.timestamp.wall_us))])
    return table(("KEY", "VALUE", "WRITTEN", "EXPIRES"),
                 [(record.key, value_text(record.value), time_text(record.timestamp.wall_us),
                   time_text(record.expires_at_us))])


def write_table(op: str, key: str, result: WriteResult) -> str:
    receipt = result.receipt or {}
    if result.version is not None:
        return table(("KEY", "OP", "VERSION", "LEADER"),
                     [(key, op, str(result.version), str(receipt.get("leader", "-")))])
    acked = receipt.get("answered") or []
    return table(("KEY", "OP", "WRITTEN", "ACKED BY"),
                 [(key, op, time_text(result.timestamp.wall_us),
                   ",".join(str(n) for n in acked) or "-")])


def scan_table(records: Sequence[Record]) -> str:
    return table(("KEY", "VALUE", "WRITTEN"),
                 [(r.key, value_text(r.value), time_text(r.timestamp.wall_us))
                  for r in records])


def txn_table(result: TxnResult) -> str:
    rows = [(key, "(absent)" if got is None else value_text(got.value),
             "-" if got is None or got.version is None else str(got.version))
            for key, got in result.reads.items()]
    if result.commit_ts is not None:
        outcome = f"committed {result.id} at {result.commit_ts}"
    else:
        outcome = f"read {result.id} (no writes)"
    if result.replayed:
        outcome += " (an earlier attempt's commit; no reads come back)"
    return (table(("KEY", "VALUE", "VERSION"), rows) + "\n" if rows else "") + outcome


def exit_codes_help() -> str:
    """The exit codes as the data commands' --help lists them."""
    return "exit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES)
