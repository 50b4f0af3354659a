"""``ringkv user add|passwd|grant|revoke|remove|list|rotate-secret`` (shell): the
/v1/auth routes from the command line.

The caller logs in as ``--user`` (default ``admin``) with the password in
``RINGKV_PASSWORD`` or typed at a prompt, or with a token in
``RINGKV_TOKEN``; a new password comes from ``RINGKV_NEW_PASSWORD`` or a
prompt (typed twice). No password is ever a command-line argument, where
``ps`` and shell histories would show it.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import sys
import urllib.parse
from typing import Any

PASSWORD_ENV = "RINGKV_PASSWORD"
USER_ENV = "RINGKV_USER"  # who the operator commands (status, repair...) log in as
NEW_PASSWORD_ENV = "RINGKV_NEW_PASSWORD"
TOKEN_ENV = "RINGKV_TOKEN"
URL_ENV = "RINGKV_URL"  # the node the data and snapshot commands start from
DEFAULT_URL = "http://127.0.0.1:7400"


def add_parser(commands: Any, tls_flags: Any) -> None:
    user = commands.add_parser(
        "user", help="manage users and grants (auth.enabled): add, passwd, grant, revoke, "
                     "remove, list, rotate-secret")
    actions = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        parser.add_argument("--url", default="http://127.0.0.1:7400",
                            help="any node's HTTP address")
        parser.add_argument("--user", default="admin",
                            help=f"who you log in as (password: ${PASSWORD_ENV} or a prompt; "
                                 f"or a token in ${TOKEN_ENV})")
        parser.add_argument("--timeout", type=float, default=10.0,
                            help="seconds to wait for the node")
        tls_flags(parser)
        parser.set_defaults(func=run)
        return parser

    add = action("add", "add a user (its password: $RINGKV_NEW_PASSWORD or a prompt)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--grant", action="append", default=[], metavar="PERMISSION[:KEYSPACE]",
                     help="grant at once, e.g. read:default (repeatable; admin alone: "
                          "cluster-wide)")
    passwd = action("passwd", "set a user's password ($RINGKV_NEW_PASSWORD or a prompt)")
    passwd.add_argument("name", metavar="NAME")
    for name, verb in (("grant", "grant"), ("revoke", "revoke")):
        parser = action(name, f"{verb} a permission: read, write or admin on --keyspace, or "
                              "admin cluster-wide without it")
        parser.add_argument("name", metavar="NAME")
        parser.add_argument("permission", choices=("read", "write", "admin"))
        parser.add_argument("--keyspace", help="the keyspace (omit only for cluster-wide admin)")
    remove = action("remove", "remove a user")
    remove.add_argument("name", metavar="NAME")
    action("list", "list the users and their grants")
    action("rotate-secret", "rotate the token secret: a new one signs; tokens signed by the "
                            "auth.previous_secrets before it still work, older ones are refused")


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def operator_headers() -> dict[str, str]:
    """The Authorization header the operator commands (``status``, ``repair``,
    ``decommission``, ``removenode``) send: a token from ``$RINGKV_TOKEN``, or
    ``$RINGKV_USER`` (default admin) with ``$RINGKV_PASSWORD``; none when neither
    is set (a cluster without auth)."""
    token = os.environ.get(TOKEN_ENV)
    if token:
        return {"Authorization": f"Bearer {token}"}
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        return {}
    return {"Authorization": basic_header(os.environ.get(USER_ENV, "admin"), password)}


def _authorization(args: argparse.Namespace) -> str:
    token = os.environ.get(TOKEN_ENV)
    if token:
        return f"Bearer {token}"
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        password = getpass.getpass(f"password for {args.user}: ")
    return basic_header(args.user, password)


def _new_password(name: str) -> str:
    password = os.environ.get(NEW_PASSWORD_ENV)
    if password is not None:
        return password
    first = getpass.getpass(f"new password for {name}: ")
    if getpass.getpass("again: ") != first:
        raise SystemExit("ringkv: error: the passwords differ")
    return first


def _grant_body(text: str) -> dict[str, Any]:
    permission, _, keyspace = text.partition(":")
    return {"permission": permission, "keyspace": keyspace or None}


def run(args: argparse.Namespace) -> int:
    from ringkv.client.base import tls_context
    from ringkv.tools.launcher import http

    base = args.url.rstrip("/") + "/v1/auth/users"
    command = args.user_command
    name = urllib.parse.quote(getattr(args, "name", "") or "", safe="")
    if command == "add":
        request: tuple[str, str, Any] = ("POST", base, {
            "name": args.name, "password": _new_password(args.name),
            "grants": [_grant_body(g) for g in args.grant]})
    elif command == "passwd":
        request = ("PUT", f"{base}/{name}/password", {"password": _new_password(args.name)})
    elif command in ("grant", "revoke"):
        request = ("POST" if command == "grant" else "DELETE", f"{base}/{name}/grants",
                   {"permission": args.permission, "keyspace": args.keyspace})
    elif command == "remove":
        request = ("DELETE", f"{base}/{name}", None)
    elif command == "rotate-secret":
        request = ("POST", args.url.rstrip("/") + "/v1/auth/secret/rotate", None)
    else:
        request = ("GET", base, None)
    method, url, body = request
    headers = {"Authorization": _authorization(args)}
    try:
        status, answer = http(method, url, body, timeout_s=args.timeout, headers=headers,
                              context=tls_context(args.ca_file, args.cert_file, args.key_file))
    except OSError as exc:
        print(f"ringkv: error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if status >= 300:
        error = answer.get("error", {}) if isinstance(answer, dict) else {}
        print(f"ringkv: error: {status} {error.get('code', '')}: "
              f"{error.get('message', answer)}", file=sys.stderr)
        return 1
    if command == "list":
        for user in answer["users"]:
            print(f"{user['name']:<24} {', '.join(user['grants']) or '-'}")
    else:
        print(json.dumps(answer))
    return 0
