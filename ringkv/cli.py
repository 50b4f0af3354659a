"""The ``ringkv`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from ringkv.config import load_config
from ringkv.errors import RingKVError


def _node_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Per-node command-line flags, so that several nodes can share one config file."""
    flags = {
        "cluster.node_id": args.id,
        "cluster.listen_host": args.host,
        "cluster.client_port": args.client_port,
        "cluster.internode_port": args.internode_port,
        "cluster.data_dir": args.data_dir,
        "cluster.seeds": args.seeds.split(",") if args.seeds is not None else None,
        "storage.commit_sync": args.commit_sync,
        "storage.engine": args.engine,
    }
    return {key: value for key, value in flags.items() if value is not None}


def cmd_node(args: argparse.Namespace) -> int:
    from ringkv.server.runner import install_event_loop_policy, serve

    config = load_config(args.config, _node_overrides(args))
    loop_name = install_event_loop_policy()
    logging.getLogger(__name__).info("event loop: %s", loop_name)
    asyncio.run(serve(config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringkv",
        description="ringkv: a Dynamo/Cassandra-style distributed key-value store.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = commands.add_parser("node", help="run one node in the foreground")
    node.add_argument("--config", default=None, help="YAML config file (default: built-in defaults)")
    node.add_argument("--id", help="node id (overrides cluster.node_id)")
    node.add_argument("--host", help="listen address (overrides cluster.listen_host)")
    node.add_argument("--client-port", type=int, help="HTTP API port (overrides cluster.client_port)")
    node.add_argument(
        "--internode-port", type=int, help="internode port (overrides cluster.internode_port)"
    )
    node.add_argument("--data-dir", help="data directory (overrides cluster.data_dir)")
    node.add_argument("--seeds", help="comma-separated internode host:port seeds")
    node.add_argument("--commit-sync", choices=("periodic", "batch"), help="storage.commit_sync")
    node.add_argument("--engine", choices=("leveldb", "memory"), help="storage.engine")
    node.set_defaults(func=cmd_node)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except RingKVError as exc:
        print(f"ringkv: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
