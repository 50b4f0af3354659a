"""The baseline for bench/single_node.py: the least an aiohttp + plyvel KV server can do.

No validation, no timestamps, no metrics, no group commit: PUT stores the
request body under the key, GET returns it. ringkv is measured against this.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import plyvel
from aiohttp import web


def build(db: plyvel.DB) -> web.Application:
    async def put(request: web.Request) -> web.Response:
        db.put(request.match_info["key"].encode(), await request.read())
        return web.json_response({"ok": True})

    async def get(request: web.Request) -> web.Response:
        value = db.get(request.match_info["key"].encode())
        if value is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.Response(body=value, content_type="application/json")

    app = web.Application()
    app.router.add_put("/kv/{key}", put)
    app.router.add_get("/kv/{key}", get)
    return app


async def main(port: int, path: str) -> None:
    db = plyvel.DB(path, create_if_missing=True)
    runner = web.AppRunner(build(db), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"bare server listening on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    db.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args.port, args.path))
