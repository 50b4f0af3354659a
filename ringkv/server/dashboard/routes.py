"""The dashboard's routes (shell): the page at ``/ui`` and the JSON it reads.

- ``GET /ui`` (and ``/ui/dashboard.js``, ``/ui/dashboard.css``): the page,
  plain HTML, CSS and JavaScript shipped in the package; nothing from the
  internet.
- ``GET /v1/dashboard/node``: this node's short metrics history and what
  ``/v1/status`` does not show per node: hints pending, the last repair,
  the transactional groups it knows with their leases, TrueTime's ε.
- ``GET /v1/dashboard/cluster``: the same for every node on the ring, this
  node asking each peer's client API under one deadline, so a page served
  by one node (one port forwarded, one origin, no CORS) shows them all. A
  peer that does not answer in time is shown with the error instead.

None of them is public: with ``auth.enabled`` each needs cluster admin, like
``/v1/status`` (``permissions.needs`` asks that of any route it does not
list). A browser gets the 401's Basic challenge, asks for a login, and sends
it on the page's own requests; the cluster view passes it on to the peers.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from importlib import resources
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import hdrs, web

from ringkv.config import TlsConfig
from ringkv.server.dashboard.sampler import Sampler
from ringkv.server.status import client_address

if TYPE_CHECKING:
    from ringkv.node import Node

SAMPLER_KEY: web.AppKey[Sampler] = web.AppKey("dashboard_sampler")
SESSION_KEY: web.AppKey[aiohttp.ClientSession] = web.AppKey("dashboard_session")
PEER_DEADLINE_S = 1.5  # a peer slower than this shows as unreachable, not a stuck page
MAX_PEER_BODY_BYTES = 4 * 1024 * 1024
HINTS_COUNT_LIMIT = 10_000  # counting hints scans them: past this the page says "10000+"
# The page's files: name -> content type. Only these are served.
STATIC_FILES = {
    "index.html": "text/html",
    "dashboard.js": "application/javascript",
    "dashboard.css": "text/css",
}
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _load_static() -> dict[str, bytes]:
    folder = resources.files("ringkv.server.dashboard") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_FILES}


def _json(body: Any) -> web.Response:
    return web.Response(body=_ENCODER.encode(body).encode(), content_type="application/json")


async def node_summary(node: Node, sampler: Sampler) -> dict[str, Any]:
    """This node's part of the dashboard (``GET /v1/dashboard/node``)."""
    pending = 0
    capped = False
    for target in sorted(node.hints.targets):
        pending += await node.hints.count(target, limit=HINTS_COUNT_LIMIT)
        if pending >= HINTS_COUNT_LIMIT:
            pending, capped = HINTS_COUNT_LIMIT, True
            break
    repair = node.repair.status()
    last_run = repair["last_run"] or {}
    summary: dict[str, Any] = {
        "node_id": node.node_id,
        "wall_ms": node.clock.wall_us() // 1000,
        "history": sampler.history.view(),
        "hints": {"pending": pending, "pending_capped": capped,
                  "targets": sorted(node.hints.targets), **vars(node.hints.stats)},
        "repair": {
            "running": repair["running"] is not None,
            "last_finished_ms": (last_run["finished_us"] // 1000
                                 if "finished_us" in last_run else None),
            "last_trigger": last_run.get("trigger"),
            "last_ranges_compared": last_run.get("ranges_compared"),
            "last_ranges_differed": last_run.get("ranges_differed"),
            "last_ranges_failed": last_run.get("ranges_failed"),
        },
        "transactional": _txn_summary(node) if node.txn.enabled else None,
    }
    return summary


def _txn_summary(node: Node) -> dict[str, Any]:
    now_s = node.clock.monotonic_s()
    groups = []
    for group_id, group in sorted(node.txn.groups.items()):
        runner = group.runner
        interval = runner.replica.lease_interval(now_s) if runner.replica is not None else None
        leads = runner.is_leader()
        groups.append({
            "group": group_id,
            "replicas": list(runner.group.replicas),
            "leader": runner.leader(),
            "leads": leads,
            # How long this node's lease has left, when it leads under one.
            "lease_remaining_ms": (round((interval[1] - now_s) * 1000, 1)
                                   if leads and interval is not None else None),
        })
    stats = node.txn.stats
    commits = stats.get("commits", 0)
    return {
        "truetime": node.txn.clock_status(),
        "groups": groups,
        "commits": commits,
        "commit_wait_mean_ms": (round(stats.get("commit_wait_us", 0) / commits / 1000, 3)
                                if commits else None),
    }


def peer_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """How this node reaches its peers' HTTPS client APIs: their certificates checked
    against ``tls.client.ca_file``, else the cluster CA (``tls.internode.ca_file``), else
    the system's trusted CAs; this node's client-API certificate shown, which a peer with
    a client ``ca_file`` requires. With the cluster's own CA, host names are not checked:
    peers are dialled at gossiped addresses (as ``net/tls.py`` explains); with the
    system's CAs they are, or any public certificate would pass."""
    ca_file = tls.client.ca_file or tls.internode.ca_file
    context = ssl.create_default_context(cafile=ca_file)  # None: the system's CAs
    context.check_hostname = ca_file is None
    assert tls.client.cert_file is not None and tls.client.key_file is not None
    context.load_cert_chain(tls.client.cert_file, tls.client.key_file)
    return context


async def _peer_summary(node: Node, session: aiohttp.ClientSession, node_id: str,
                        authorization: str | None,
                        ssl_context: ssl.SSLContext | None) -> dict[str, Any]:
    address = client_address(node, node_id)
    if not address:
        return {"node_id": node_id, "error": "its client address is not known yet"}
    scheme = "https" if ssl_context is not None else "http"
    headers = {hdrs.AUTHORIZATION: authorization} if authorization else {}
    try:
        async with asyncio.timeout(PEER_DEADLINE_S):
            async with session.get(f"{scheme}://{address}/v1/dashboard/node", headers=headers,
                                   ssl=ssl_context or True) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > MAX_PEER_BODY_BYTES:  # bounded in bytes as well as in time
                        return {"node_id": node_id, "error": "its answer is too large"}
                    chunks.append(chunk)
                body = b"".join(chunks)
                if response.status != 200:
                    return {"node_id": node_id,
                            "error": f"it answered {response.status}: {body[:200]!r}"}
    except TimeoutError:
        return {"node_id": node_id, "error": f"no answer within {PEER_DEADLINE_S} s"}
    except (aiohttp.ClientError, OSError) as exc:
        return {"node_id": node_id, "error": f"unreachable: {exc.__class__.__name__}: {exc}"}
    try:
        summary = json.loads(body)
    except ValueError:
        return {"node_id": node_id, "error": "its answer is not JSON"}
    if not isinstance(summary, dict):
        return {"node_id": node_id, "error": "its answer is not a JSON object"}
    return summary


def add_routes(app: web.Application, node: Node) -> None:
    """Register the dashboard's routes, and run its sampler while the app runs."""
    static = _load_static()
    sampler = Sampler(node.metrics, node.clock,
                      txn_stats=(lambda: node.txn.stats) if node.txn.enabled else None)
    app[SAMPLER_KEY] = sampler

    async def started(app: web.Application) -> None:
        sampler.start()
        app[SESSION_KEY] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=PEER_DEADLINE_S))

    async def stopped(app: web.Application) -> None:
        await sampler.stop()
        if SESSION_KEY in app:
            await app[SESSION_KEY].close()

    app.on_startup.append(started)
    app.on_cleanup.append(stopped)

    async def page(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        if name not in static:
            raise web.HTTPNotFound()
        return web.Response(body=static[name], content_type=STATIC_FILES[name],
                            headers={"Cache-Control": "no-cache"})

    async def node_view(request: web.Request) -> web.Response:
        return _json(await node_summary(node, sampler))

    async def cluster_view(request: web.Request) -> web.Response:
        session = request.app[SESSION_KEY]
        authorization = request.headers.get(hdrs.AUTHORIZATION)
        peers = [n for n in node.ring.node_ids if n != node.node_id]
        tls = node.config.tls
        # Built per view (cheap), so certificates rotated on disk are picked up.
        ssl_context = peer_ssl_context(tls) if peers and tls.client.enabled else None
        answers = await asyncio.gather(
            node_summary(node, sampler),
            *(_peer_summary(node, session, peer, authorization, ssl_context) for peer in peers))
        return _json({"node_id": node.node_id,
                      # Keyed by the ring's ids: what a peer says of itself is not trusted.
                      "nodes": dict(zip([node.node_id, *peers], answers))})

    app.router.add_get("/ui", page, name="ui", allow_head=False)
    app.router.add_get("/ui/", page, name="ui_slash", allow_head=False)
    app.router.add_get("/ui/{name}", page, name="ui_file", allow_head=False)
    app.router.add_get("/v1/dashboard/node", node_view, name="dashboard_node",
                       allow_head=False)
    app.router.add_get("/v1/dashboard/cluster", cluster_view, name="dashboard_cluster",
                       allow_head=False)
