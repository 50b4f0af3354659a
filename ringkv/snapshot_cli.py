"""``ringkv snapshot create|list|delete`` (shell): the /v1/snapshots routes from the
command line, like ``nodetool snapshot``.

With ``--url`` a command goes to that node only. Without it, it goes to every
node of the cluster, found through one node's ``/v1/status`` (``$RINGKV_URL``,
else http://127.0.0.1:7400); ``create`` then names the snapshot once, so it
has the same name on every node. Credentials as for the other operator
commands (``$RINGKV_TOKEN``, or ``$RINGKV_USER`` and ``$RINGKV_PASSWORD``).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from http import client as http_client
from typing import Any

from ringkv.auth.admin_cli import DEFAULT_URL, URL_ENV, operator_headers
from ringkv.clock import SystemClock
from ringkv.errors import BadRequest
from ringkv.storage.snapshot_manifest import check_name, default_name


def add_parser(commands: Any, tls_flags: Any) -> None:
    snapshot = commands.add_parser(
        "snapshot", help="point-in-time copies of nodes' data: create, list, delete "
                         "(restore with `ringkv node --restore DIR`)")
    actions = snapshot.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        parser.add_argument("--url", default=None,
                            help="only this node (default: every node, found through "
                                 f"${URL_ENV} or {DEFAULT_URL})")
        parser.add_argument("--timeout", type=float, default=600.0,
                            help="seconds to wait for each node")
        tls_flags(parser)
        parser.set_defaults(func=run)
        return parser

    create = action("create", "snapshot one node (--url) or every node, under one name")
    create.add_argument("name", nargs="?", metavar="NAME",
                        help="the snapshot's name (default: snapshot-<UTC time>)")
    action("list", "list the snapshots: node, name, created, size, keys")
    delete = action("delete", "delete a snapshot from one node (--url) or every node")
    delete.add_argument("name", metavar="NAME")


def _context(args: argparse.Namespace) -> Any:
    from ringkv.client.base import tls_context

    return tls_context(args.ca_file, args.cert_file, args.key_file)


def _request(method: str, url: str, args: argparse.Namespace,
             body: Any = None) -> tuple[int, Any]:
    from ringkv.tools.launcher import http

    return http(method, url, body, timeout_s=args.timeout, context=_context(args),
                headers=operator_headers())


def _error(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        field = f" ({error['field']})" if "field" in error else ""
        return f"{error.get('code')}: {error.get('message')}{field}"
    return str(body)[:300]


def discover(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(node id, base URL) of every node of the cluster, or of ``--url`` alone."""
    if args.url:
        return [("", args.url.rstrip("/"))]
    base = os.environ.get(URL_ENV, DEFAULT_URL).rstrip("/")
    status, body = _request("GET", base + "/v1/status", args)
    if status != 200 or not isinstance(body, dict):
        raise OSError(f"{base} answered {status}: {_error(body)}")
    scheme = urllib.parse.urlsplit(base).scheme or "http"
    nodes = []
    for row in body.get("nodes", []):
        if row.get("status") == "LEFT":
            continue
        address = row.get("address")
        nodes.append((str(row.get("node_id")), f"{scheme}://{address}" if address else ""))
    return nodes


def run(args: argparse.Namespace) -> int:
    name = getattr(args, "name", None)
    if args.snapshot_command == "create" and name is None:
        name = default_name(SystemClock().wall_us())  # one name for every node
    try:
        if name is not None:
            check_name(name)
    except BadRequest as exc:
        print(f"ringkv: error: {exc.field}: {exc.message}", file=sys.stderr)
        return 2
    try:
        nodes = discover(args)
    except (OSError, http_client.HTTPException) as exc:
        print(f"ringkv: error: cannot find the cluster's nodes: {exc}", file=sys.stderr)
        return 1
    failed = 0
    rows: list[tuple[str, str, str, str, str]] = []
    for node_id, url in nodes:
        who = node_id or url
        if not url:
            print(f"{who}: no client address known", file=sys.stderr)
            failed += 1
            continue
        try:
            if args.snapshot_command == "create":
                status, body = _request("POST", url + "/v1/snapshots", args, {"name": name})
                ok = status == 201
                if ok:
                    print(f"{body['node_id']}: snapshot {body['name']} taken at "
                          f"{body['created']}: {body['keys']} keys, {body['size_bytes']} bytes")
            elif args.snapshot_command == "delete":
                status, body = _request("DELETE", url + "/v1/snapshots/" + str(name), args)
                ok = status == 200
                if ok:
                    print(f"{body['node_id']}: snapshot {name} deleted")
            else:
                status, body = _request("GET", url + "/v1/snapshots", args)
                ok = status == 200
                if ok:
                    for snap in body["snapshots"]:
                        rows.append((body["node_id"], snap["name"], snap.get("created", "?"),
                                     str(snap.get("size_bytes", "?")), str(snap.get("keys", "?"))))
        except (OSError, http_client.HTTPException) as exc:
            status, body, ok = 0, f"cannot reach {url}: {exc}", False
        if not ok:
            print(f"{who}: {_error(body)}", file=sys.stderr)
            failed += 1
    if args.snapshot_command == "list":
        print(format_table(rows))
    return 1 if failed else 0


def format_table(rows: list[tuple[str, str, str, str, str]]) -> str:
    header = ("NODE", "NAME", "CREATED", "SIZE_BYTES", "KEYS")
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in table)
