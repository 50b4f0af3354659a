"""``ringkv get|put|del|scan|txn`` (shell): reading and writing data from the command
line, through the Python client (``ringkv.client.Client``).

Every command takes the same options: ``--url`` (one or more nodes; else
``$RINGKV_URL``), ``--keyspace``, ``--consistency``, ``-o table|json``, the TLS
flags, and the credentials the operator commands use (``$RINGKV_TOKEN``, or
``$RINGKV_USER`` with ``$RINGKV_PASSWORD``). What an outcome looks like and which
exit code it ends with is decided in ``data_view.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from ringkv.auth.admin_cli import (
    DEFAULT_URL,
    PASSWORD_ENV,
    TOKEN_ENV,
    URL_ENV,
    USER_ENV,
)
from ringkv.client.errors import InvalidArgument
from ringkv.data_view import (
    EXIT_OK,
    MAX_SCAN_LIMIT,
    SCAN_PAGE_KEYS,
    TxnRequest,
    error_line,
    exit_code,
    exit_codes_help,
    parse_json_argument,
    parse_txn_document,
    parse_value,
    record_document,
    record_table,
    scan_document,
    scan_table,
    txn_document,
    txn_table,
    write_document,
    write_table,
)
from ringkv.errors import BadRequest, NotFound, RingKVError
from ringkv.quorum import ConsistencyLevel

if TYPE_CHECKING:
    from ringkv.client import Client
    from ringkv.client.types import Record

# A transaction document read from a file or stdin: well above any request a node takes.
MAX_TXN_DOCUMENT_BYTES = 16 * 1024 * 1024
# Pages one scan may fetch, whatever --max-scanned says (an empty page still counts).
MAX_SCAN_PAGES = 10_000

OUTPUT_HELP = """\
output (-o): table (default) prints a human table on stdout; json prints the
result as one JSON document, in the shape of the HTTP API's answer. On an
error one line naming the error code and message goes to stderr, and with
-o json the error document ({"error": {"code": ..., "message": ...}}) also
goes to stdout.
"""


def add_parser(commands: Any, tls_flags: Any) -> None:
    """Add ``get``, ``put``, ``del``, ``scan`` and ``txn`` to the ``ringkv`` subcommands;
    ``tls_flags(parser)`` adds --ca-file, --cert-file and --key-file."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None,
                        help=f"a node's HTTP URL, or several comma-separated (default: "
                             f"${URL_ENV}, else {DEFAULT_URL}); the client routes each key "
                             "to its replicas from there")
    common.add_argument("--keyspace", default=None,
                        help="the keyspace (default: default; for txn, the document's, "
                             "else default)")
    common.add_argument("--consistency", type=str.upper,
                        choices=[level.value for level in ConsistencyLevel],
                        help="the consistency level (default: the keyspace's own; a "
                             "transactional keyspace takes SERIAL only)")
    common.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="table (default) or json")
    common.add_argument("--timeout", type=float, default=5.0,
                        help="seconds each attempt waits for a node (default 5)")
    tls_flags(common)
    epilog = (OUTPUT_HELP + "\ncredentials: $RINGKV_TOKEN, or $RINGKV_USER (default admin) "
              "with\n$RINGKV_PASSWORD; none when neither is set.\n\n" + exit_codes_help())

    def command(names: list[str], help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(
            names[0], aliases=names[1:], parents=[common], help=help_text,
            description=help_text, epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.set_defaults(func=run, data_command=names[0])
        return parser

    get = command(["get"], "read a key")
    get.add_argument("key", metavar="KEY")

    put = command(["put"], "write a key: VALUE is JSON if it parses as JSON (42, true, "
                           "{\"a\": 1}, \"42\"), else the text as a string")
    put.add_argument("key", metavar="KEY")
    put.add_argument("value", metavar="VALUE")
    put.add_argument("--string", action="store_true",
                     help="store VALUE as a string even if it parses as JSON")
    put.add_argument("--ttl", type=int, metavar="SECONDS",
                     help="expire the value after this many seconds (eventual keyspaces)")
    _condition_flags(put)

    delete = command(["del", "delete"], "delete a key (an absent key deletes fine)")
    delete.add_argument("key", metavar="KEY")
    _condition_flags(delete)

    scan = command(["scan"], "list keys in token order, page by page (bounded by --limit "
                             "and --max-scanned)")
    scan.add_argument("--prefix", default="",
                      help="only keys that start with this (filtered as the pages arrive: "
                           "keys are in token order, not key order)")
    scan.add_argument("--limit", type=int, default=100,
                      help=f"the most keys to print (default 100, at most {MAX_SCAN_LIMIT})")
    scan.add_argument("--max-scanned", type=int, default=MAX_SCAN_LIMIT,
                      help=f"the most keys to read looking for --prefix (default "
                           f"{MAX_SCAN_LIMIT})")
    scan.add_argument("--page-token", default=None,
                      help="resume where an earlier scan stopped (its next_page_token)")

    txn = command(["txn"], "run a one-shot transaction on a transactional keyspace: the "
                           "JSON document of POST /v1/txn from --file or stdin, or the "
                           "--read/--put/--delete/--if-* flags")
    txn.add_argument("--file", default=None, metavar="FILE",
                     help='the transaction document, "-" for stdin: {"reads": [KEY...], '
                          '"conditions": [{"key": K, "version": N | "absent": true | '
                          '"equals": JSON}...], "writes": [{"op": "put", "key": K, "value": '
                          'JSON} | {"op": "delete", "key": K}...], "id": ID, "keyspace": KS}; the flags '
                          'below add to it')
    txn.add_argument("--read", action="append", default=[], metavar="KEY",
                     help="read KEY at the transaction's timestamp (repeatable)")
    txn.add_argument("--put", action="append", default=[], nargs=2, metavar=("KEY", "VALUE"),
                     help="write VALUE (JSON, else a string) under KEY (repeatable)")
    txn.add_argument("--delete", action="append", default=[], metavar="KEY",
                     help="delete KEY (repeatable)")
    txn.add_argument("--if-version", action="append", default=[], nargs=2,
                     metavar=("KEY", "VERSION"), help="only if KEY's version is VERSION")
    txn.add_argument("--if-absent", action="append", default=[], metavar="KEY",
                     help="only if KEY has no value")
    txn.add_argument("--if-equals", action="append", default=[], nargs=2,
                     metavar=("KEY", "JSON"), help="only if KEY's value equals JSON")
    txn.add_argument("--id", default=None,
                     help="the transaction's id (a resend of a committed id is answered "
                          "from its commit, never applied twice)")


def _condition_flags(parser: argparse.ArgumentParser) -> None:
    """Compare-and-set on a transactional keyspace: at most one condition."""
    conditions = parser.add_mutually_exclusive_group()
    conditions.add_argument("--if-version", type=int, metavar="VERSION",
                            help="only if the key's version (commit timestamp) is VERSION")
    conditions.add_argument("--if-absent", action="store_true",
                            help="only if the key has no value")
    conditions.add_argument("--if-equals", metavar="JSON",
                            help="only if the key's value equals this JSON")


def credentials() -> dict[str, str]:
    """The client's credentials from the environment, as the operator commands take
    them (``admin_cli.operator_headers``): a token, or a user and password."""
    token = os.environ.get(TOKEN_ENV)
    if token:
        return {"token": token}
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        return {}
    return {"user": os.environ.get(USER_ENV, "admin"), "password": password}


def seeds(args: argparse.Namespace) -> list[str]:
    text = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    urls = [url.strip() for url in text.split(",") if url.strip()]
    if not urls:
        raise BadRequest("--url names no node", field="url")
    return urls


def run(args: argparse.Namespace) -> int:
    """Run one data command; print its result, or its error; return the exit code."""
    from ringkv.client import Client

    try:
        login = credentials()
        try:
            client = Client(seeds(args), keyspace=args.keyspace or "default",
                            timeout_s=args.timeout, protocol="http", ca_file=args.ca_file,
                            cert_file=args.cert_file, key_file=args.key_file,
                            user=login.get("user"), password=login.get("password"),
                            token=login.get("token"))
        except (ValueError, OSError) as exc:  # a bad URL, or TLS files that do not load
            raise BadRequest(f"cannot set up the client: {exc}", field="url") from None
        with client:
            try:
                document, text = COMMANDS[args.data_command](client, args)
            except InvalidArgument as exc:  # the client refused an argument itself: a usage error
                raise BadRequest(exc.message, field=exc.field) from None
    except RingKVError as exc:
        print(error_line(exc), file=sys.stderr)
        if args.output == "json":
            print(json.dumps(exc.to_json()))
        return exit_code(exc)
    if args.output == "json":
        print(json.dumps(document))
    else:
        print(text)
    return EXIT_OK


Outcome = tuple[dict[str, Any], str]


def _get(client: Client, args: argparse.Namespace) -> Outcome:
    record = client.get_with_meta(args.key, consistency=args.consistency)
    if record is None:
        raise NotFound(f"key {args.key!r} not found in {client.keyspace!r}",
                       key=args.key, keyspace=client.keyspace)
    return record_document(record), record_table(record)


def _conditions(args: argparse.Namespace) -> dict[str, Any]:
    given: dict[str, Any] = {}
    if args.if_version is not None:
        given["if_version"] = args.if_version
    if args.if_absent:
        given["if_absent"] = True
    if args.if_equals is not None:
        given["if_equals"] = parse_json_argument(args.if_equals, "if_equals")
    return given


def _put(client: Client, args: argparse.Namespace) -> Outcome:
    value = parse_value(args.value, as_string=args.string)
    result = client.put(args.key, value, ttl=args.ttl, consistency=args.consistency,
                        **_conditions(args))
    return write_document(result), write_table("put", args.key, result)


def _delete(client: Client, args: argparse.Namespace) -> Outcome:
    result = client.delete(args.key, consistency=args.consistency, **_conditions(args))
    return write_document(result), write_table("del", args.key, result)


def _scan(client: Client, args: argparse.Namespace) -> Outcome:
    if not 1 <= args.limit <= MAX_SCAN_LIMIT:
        raise BadRequest(f"--limit must be 1..{MAX_SCAN_LIMIT}, got {args.limit}", field="limit")
    if args.max_scanned < 1:
        raise BadRequest(f"--max-scanned must be >= 1, got {args.max_scanned}",
                         field="max_scanned")
    shown: list[Record] = []
    token = args.page_token
    scanned = 0
    for _ in range(MAX_SCAN_PAGES):
        wanted = args.limit - len(shown)
        # Without --prefix every key read is shown: ask for no more than are wanted,
        # so that the page's token resumes right after the last key shown.
        size = min(SCAN_PAGE_KEYS, args.max_scanned - scanned,
                   SCAN_PAGE_KEYS if args.prefix else wanted)
        items, next_token = _page(client, args, size, token)
        matches = [r for r in items if r.key.startswith(args.prefix)]
        if len(matches) > wanted:
            # The page holds more matches than are wanted: read it again, up to the
            # last one wanted, so that its token resumes right after that key.
            last = items.index(matches[wanted - 1])
            items, next_token = _page(client, args, last + 1, token)
            matches = [r for r in items if r.key.startswith(args.prefix)][:wanted]
        scanned += len(items)
        shown.extend(matches)
        token = next_token
        if token is None or len(shown) >= args.limit or scanned >= args.max_scanned:
            break
    if token is not None and args.output == "table":
        print(f"ringkv: {len(shown)} keys shown ({scanned} read); more may remain: resume with "
              f"--page-token {token}", file=sys.stderr)
    return scan_document(shown, token, scanned), scan_table(shown)


def _page(client: Client, args: argparse.Namespace, size: int,
          token: str | None) -> tuple[list[Record], str | None]:
    """One page of ``size`` keys from ``token`` on: its items and the next token."""
    pages = client.scan_pages(consistency=args.consistency, page_size=size, page_token=token)
    try:
        page = next(pages, None)
    finally:
        close = getattr(pages, "close", None)  # a generator: one page only, the rest
        if close is not None:                  # is fetched by the next call
            close()
    return ([], None) if page is None else (page.items, page.next_page_token)


def _txn(client: Client, args: argparse.Namespace) -> Outcome:
    request = _txn_request(args)
    keyspace = args.keyspace or request.keyspace or client.keyspace
    if args.consistency not in (None, ConsistencyLevel.SERIAL.value):
        raise BadRequest(f"a transaction runs at SERIAL, not {args.consistency}",
                         field="consistency")
    result = client.txn(keyspace, reads=request.reads, conditions=request.conditions,
                        writes=request.writes, txn_id=request.id)
    return txn_document(result), txn_table(result)


def _txn_request(args: argparse.Namespace) -> TxnRequest:
    """The transaction: the document in --file (or on stdin), plus the flags' parts."""
    flags = (args.read or args.put or args.delete or args.if_version or args.if_absent
             or args.if_equals)
    if args.file is not None:
        request = parse_txn_document(*_read_document(args.file))
    elif not flags:
        if sys.stdin.isatty():
            raise BadRequest("no transaction: give its JSON document with --file FILE or on "
                             "stdin, or use --read/--put/--delete/--if-* flags", field="file")
        request = parse_txn_document(*_read_document("-"))
    else:
        request = TxnRequest()
    if args.id is not None:
        request.id = args.id
    request.reads += args.read
    for key, version in args.if_version:
        try:
            request.conditions.append({"key": key, "version": int(version)})
        except ValueError:
            raise BadRequest(f"--if-version {key}: VERSION must be a whole number, got "
                             f"{version!r}", field="if_version") from None
    request.conditions += [{"key": key, "absent": True} for key in args.if_absent]
    request.conditions += [{"key": key, "equals": parse_json_argument(text, "if_equals")}
                           for key, text in args.if_equals]
    request.writes += [{"op": "put", "key": key, "value": parse_value(text)}
                       for key, text in args.put]
    request.writes += [{"op": "delete", "key": key} for key in args.delete]
    return request


def _read_document(path: str) -> tuple[str, str]:
    """(the text, where it came from) of a transaction document, read with a bound."""
    source = "stdin" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_TXN_DOCUMENT_BYTES + 1)
        else:
            with open(path, "rb") as handle:
                data = handle.read(MAX_TXN_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise BadRequest(f"cannot read the transaction from {source}: {exc}", field="file") \
            from None
    if len(data) > MAX_TXN_DOCUMENT_BYTES:
        raise BadRequest(f"the transaction in {source} is over {MAX_TXN_DOCUMENT_BYTES} bytes",
                         field="file")
    try:
        return data.decode(), source
    except UnicodeDecodeError:
        raise BadRequest(f"the transaction in {source} is not UTF-8", field="file") from None


COMMANDS = {"get": _get, "put": _put, "del": _delete, "scan": _scan, "txn": _txn}
