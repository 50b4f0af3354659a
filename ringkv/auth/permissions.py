"""Who may do what (pure): grants, what each route needs, and ``authorize``.

A grant is a permission on a keyspace (``read``, ``write``, ``admin``) or
cluster-wide ``admin``, written ``read:default``, ``admin:default``,
``admin``. ``admin`` on a keyspace implies ``read`` and ``write`` on it, and
lets its holder grant and revoke them there (Cassandra's AUTHORIZE);
cluster ``admin`` implies everything, and alone reaches the status,
metrics, repair, snapshot and topology endpoints and manages users. ``ring`` needs a
login only: every client fetches it to route keys (as any Cassandra user
reads ``system.peers``). ``system_auth`` is reachable through
``/v1/auth`` only, so no grant opens its raw records.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ringkv.errors import BadRequest, Forbidden

READ, WRITE, ADMIN = "read", "write", "admin"
PERMISSIONS = (READ, WRITE, ADMIN)
CLUSTER = None  # the "keyspace" of a cluster-wide grant
SYSTEM_KEYSPACE = "system_auth"
KEYSPACE_NAME = re.compile(r"[A-Za-z0-9_.~-]{1,48}")

# Routes anyone may call: liveness probes, and the login itself.
PUBLIC_ROUTES = frozenset({"health", "auth_token"})
# Routes any logged-in user may call (their keyspace was checked when it was named).
# The user-management routes check the principal themselves (one may change one's own
# password; a keyspace admin grants on that keyspace).
LOGIN_ONLY_ROUTES = frozenset({"ring", "openapi", "txn_commit", "txn_abort", "auth_whoami", "auth_users",
                               "auth_user_add", "auth_user_delete", "auth_passwd",
                               "auth_grant", "auth_revoke", "auth_secret_rotate"})
CLUSTER_ADMIN_ROUTES = frozenset({"status", "metrics", "repair", "repair_status",
                                  "decommission", "removenode",
                                  "snapshot_create", "snapshot_list", "snapshot_delete",
                                  # the web dashboard shows the whole cluster, as status does
                                  "ui", "ui_slash", "ui_file", "dashboard_node",
                                  "dashboard_cluster"})
# Routes whose keyspace is in the path (or query), and what they need on it.
_KEYSPACE_ROUTES: Mapping[str, str] = {
    "get": READ, "scan": READ, "txn_get": READ, "txn_status": READ,
    "watch": READ, "watch_keyspace": READ,
    "put": WRITE, "delete": WRITE, "txn_put": WRITE, "txn_delete": WRITE,
    # Session leases: their keyspace is in the body or the lease id, so the
    # handler (server/lease_http.py) checks again once it knows it.
    "lease_grant": WRITE, "lease_keepalive": WRITE, "lease_revoke": WRITE, "lease_get": READ,
}


@dataclass(frozen=True)
class Need:
    permission: str
    keyspace: str | None  # None: cluster-wide


@dataclass(frozen=True)
class Principal:
    name: str
    grants: frozenset[str]
    generation: int = 0  # the user's password generation when it logged in


def grant_text(permission: str, keyspace: str | None) -> str:
    return permission if keyspace is None else f"{permission}:{keyspace}"


def parse_grant(permission: object, keyspace: object) -> str:
    """A grant from untrusted input, or BadRequest naming the field."""
    if permission not in PERMISSIONS:
        raise BadRequest(f"permission must be one of {', '.join(PERMISSIONS)}",
                         field="permission")
    assert isinstance(permission, str)
    if keyspace is None:
        if permission != ADMIN:
            raise BadRequest(f"{permission!r} is granted on a keyspace: name it (only admin is "
                             "also cluster-wide)", field="keyspace")
        return permission
    if not isinstance(keyspace, str) or not KEYSPACE_NAME.fullmatch(keyspace):
        raise BadRequest("keyspace must be a keyspace name", field="keyspace")
    if keyspace == SYSTEM_KEYSPACE:
        raise BadRequest(f"{SYSTEM_KEYSPACE} takes no grants: it is managed through /v1/auth",
                         field="keyspace")
    return grant_text(permission, keyspace)


def may_manage(principal: Principal, target: str, grant: str | None) -> None:
    """Whether ``principal`` may change user ``target``: set its password (``grant`` None:
    cluster admin, or oneself) or grant/revoke ``grant`` (cluster admin; a keyspace admin
    for read and write on that keyspace). ``Forbidden`` naming what is missing otherwise."""
    if ADMIN in principal.grants:
        return
    if grant is None:
        if target == principal.name:
            return
        raise Forbidden(f"user {principal.name!r} may change only its own password",
                        permission=ADMIN, keyspace=None, user=principal.name)
    permission, _, keyspace = grant.partition(":")
    if keyspace and permission != ADMIN:
        authorize(principal, [Need(ADMIN, keyspace)])  # a keyspace admin grants read/write
        return
    authorize(principal, [Need(ADMIN, CLUSTER)])


def has(principal: Principal, need: Need) -> bool:
    grants = principal.grants
    if ADMIN in grants:
        return True
    if need.keyspace is None:
        return need.permission in grants
    return (f"{need.permission}:{need.keyspace}" in grants
            or f"{ADMIN}:{need.keyspace}" in grants)


def authorize(principal: Principal, needs: Sequence[Need]) -> None:
    """Nothing when ``principal`` holds every need, else ``Forbidden`` naming the first missing."""
    for need in needs:
        if need.keyspace == SYSTEM_KEYSPACE:
            raise Forbidden(f"keyspace {SYSTEM_KEYSPACE} is managed through /v1/auth only",
                            permission=need.permission, keyspace=need.keyspace,
                            user=principal.name)
        if not has(principal, need):
            where = "cluster-wide" if need.keyspace is None else f"on keyspace {need.keyspace!r}"
            raise Forbidden(f"user {principal.name!r} lacks {need.permission!r} {where}",
                            permission=need.permission, keyspace=need.keyspace,
                            user=principal.name)


def needs(route: str, keyspace: str, query: Mapping[str, str], body: bytes) -> list[Need]:
    """What ``route`` needs: ``keyspace`` is the path's; batch and transactions name theirs
    in the body. A body too broken to read needs nothing more here: the operation refuses
    it before running anything."""
    if route in PUBLIC_ROUTES or route in LOGIN_ONLY_ROUTES:
        return []
    if route in CLUSTER_ADMIN_ROUTES:
        return [Need(ADMIN, CLUSTER)]
    permission = _KEYSPACE_ROUTES.get(route)
    if permission is not None:
        named = keyspace or query.get("keyspace", "")
        return [Need(permission, named)] if named else []
    if route == "batch":
        return _batch_needs(_json(body))
    if route == "txn":
        return _txn_needs(_json(body))
    if route == "txn_begin":
        doc = _json(body) if body.strip() else {}
        begun = doc.get("keyspace") if isinstance(doc, dict) else None
        return [Need(READ, begun)] if isinstance(begun, str) else []
    # Anything else (an unknown path) needs cluster admin: never an open door.
    return [Need(ADMIN, CLUSTER)]


def _json(body: bytes) -> object:
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _batch_needs(doc: object) -> list[Need]:
    ops = doc.get("ops") if isinstance(doc, dict) else None
    if not isinstance(ops, list):
        return []
    found: list[Need] = []
    for op in ops:
        if not isinstance(op, dict):
            continue
        keyspace = op.get("keyspace", "default")
        if isinstance(keyspace, str):
            need = Need(READ if op.get("op") == "get" else WRITE, keyspace)
            if need not in found:
                found.append(need)
    return found


def _txn_needs(doc: object) -> list[Need]:
    if not isinstance(doc, dict) or not isinstance(doc.get("keyspace"), str):
        return []
    keyspace = doc["keyspace"]
    found = [Need(READ, keyspace)]
    if doc.get("writes") not in (None, []):
        found.append(Need(WRITE, keyspace))
    return found
