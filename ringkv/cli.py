"""The ``ringkv`` command."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from ringkv.arguments import fraction, non_negative_float, positive_float, positive_int
from ringkv.auth.admin_cli import operator_headers
from ringkv.config import load_config
from ringkv.errors import RingKVError

if TYPE_CHECKING:
    from ringkv.sim.run import SimSettings


def _node_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Per-node command-line flags, so that several nodes can share one config file."""
    flags = {
        "cluster.node_id": args.id,
        "cluster.listen_host": args.host,
        "cluster.client_port": args.client_port,
        "cluster.internode_port": args.internode_port,
        "cluster.native_port": args.native_port,
        "cluster.broadcast_internode": args.broadcast_internode,
        "cluster.broadcast_client": args.broadcast_client,
        "cluster.data_dir": args.data_dir,
        "cluster.seeds": args.seeds.split(",") if args.seeds is not None else None,
        "storage.commit_sync": args.commit_sync,
        "storage.engine": args.engine,
        # Only ever turned on from the command line; the file may also say true.
        "cluster.bootstrap_new_cluster": True if args.bootstrap_new_cluster else None,
        "streaming.auto_bootstrap": False if args.no_auto_bootstrap else None,
        "cluster.replace_node_id": args.replace,
    }
    return {key: value for key, value in flags.items() if value is not None}


def cmd_node(args: argparse.Namespace) -> int:
    from ringkv.server.runner import install_event_loop_policy, serve

    config = load_config(args.config, _node_overrides(args))
    if args.restore:
        from pathlib import Path

        from ringkv.clock import SystemClock
        from ringkv.storage.snapshot import restore

        restore(config, Path(args.restore), now_us=SystemClock().wall_us(),
                overwrite=args.restore_overwrite)
    loop_name = install_event_loop_policy()
    logging.getLogger(__name__).info("event loop: %s", loop_name)
    asyncio.run(serve(config))
    return 0


def _tls_context(args: argparse.Namespace) -> Any:
    """The SSL context the --ca-file/--cert-file/--key-file flags ask for, or None."""
    from ringkv.client.base import tls_context

    return tls_context(args.ca_file, args.cert_file, args.key_file)


def cmd_status(args: argparse.Namespace) -> int:
    from ringkv.tools.launcher import http
    from ringkv.tools.local_cluster import format_status

    try:
        status, body = http("GET", args.url.rstrip("/") + "/v1/status", timeout_s=args.timeout,
                            context=_tls_context(args), headers=operator_headers())
    except OSError as exc:
        print(f"ringkv: error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"ringkv: error: {args.url} answered {status}: {body}", file=sys.stderr)
        return 1
    print(format_status(body))
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    """Run an anti-entropy repair on the node at --url and print its progress."""
    import json
    import urllib.error
    import urllib.request

    body: dict[str, Any] = {}
    if args.keyspace is not None:
        body["keyspace"] = args.keyspace
    if args.range is not None:
        body["range"] = args.range
    request = urllib.request.Request(
        args.url.rstrip("/") + "/v1/admin/repair", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", **operator_headers()})
    report: dict[str, Any] | None = None
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            for line in response:  # one JSON event per line, as the repair goes
                event = json.loads(line)
                if event.get("event") == "start":
                    print(f"repairing {event['ranges']} ranges of "
                          f"{', '.join(event['keyspaces'])} on {event['node_id']}", flush=True)
                elif event.get("event") == "range":
                    start, end = event["range"]
                    outcome = (f"failed: {event['error']}" if not event["ok"] else
                               f"differed, {event['cells_streamed']} cells streamed"
                               if event["differed"] else "in step")
                    print(f"  [{event['done']}/{event['total']}] {event['keyspace']} "
                          f"({start}, {end}]: {outcome}", flush=True)
                elif event.get("event") == "done":
                    report = event
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
            message = error["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        print(f"ringkv: error: {message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"ringkv: error: repair via {args.url} broke off: {exc}", file=sys.stderr)
        return 1
    if report is None:
        print("ringkv: error: the node closed the connection before the repair finished",
              file=sys.stderr)
        return 1
    print(f"repair {'done' if report['ok'] else 'FAILED'} in {report['duration_s']:.1f}s: "
          f"{report['ranges_compared']} ranges compared, {report['ranges_differed']} differed, "
          f"{report['cells_streamed']} cells streamed, {report['ranges_failed']} failed")
    return 0 if report["ok"] else 1

def cmd_decommission(args: argparse.Namespace) -> int:
    """Ask the node at --url to leave the ring, then follow it until it has left."""
    body = _start_topology_change(args, "/v1/decommission", None, "decommission")
    if body is None:
        return 1
    node_id = body["node_id"]
    print(f"{node_id} is LEAVING; streaming its ranges to their new replicas")
    # The node stops once it has LEFT: losing it is how the command learns it is done.
    return _follow_streaming(
        args, done_when_unreachable=f"{node_id} has LEFT the ring and stopped",
        done_state=None,
        failed=(f"{node_id} could not stream its ranges; it stays NORMAL (see its log)"),
        timed_out=f"{node_id} had not left after {args.wait_s:.0f}s")


def cmd_removenode(args: argparse.Namespace) -> int:
    """Ask the node at --url to remove a dead node, then follow it until done."""
    body = _start_topology_change(args, "/v1/removenode", {"node_id": args.node_id},
                                  "removenode")
    if body is None:
        return 1
    print(f"{args.node_id} is LEAVING (removed by {body['node_id']}); streaming its ranges from "
          "the surviving replicas to their new owners")
    return _follow_streaming(
        args, done_when_unreachable=None,
        done_state=f"{args.node_id} is removed (LEFT): its ranges have RF copies again",
        failed=(f"the ranges of {args.node_id} could not be streamed; it stays LEAVING (see the "
                "log of the node at --url; run removenode again to resume)"),
        timed_out=f"{args.node_id} was not removed after {args.wait_s:.0f}s")


def _start_topology_change(args: argparse.Namespace, path: str, body: Any,
                           what: str) -> dict[str, Any] | None:
    """POST a topology change to --url: its 202 answer, or None after printing why not."""
    from ringkv.tools.launcher import http

    try:
        status, answer = http("POST", args.url.rstrip("/") + path, body, timeout_s=args.timeout,
                              headers=operator_headers())
    except OSError as exc:
        print(f"ringkv: error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return None
    if status != 202:
        error = answer.get("error", {}) if isinstance(answer, dict) else {}
        print(f"ringkv: error: {what} refused ({error.get('reason', status)}): "
              f"{error.get('message', answer)}", file=sys.stderr)
        return None
    return answer


def _follow_streaming(args: argparse.Namespace, *, done_when_unreachable: str | None,
                      done_state: str | None, failed: str, timed_out: str) -> int:
    """Print the streaming progress of the node at --url until it is done
    (its streaming state is "done", or it stops answering, per the flags),
    fails, or --wait-s passes."""
    from ringkv.clock import SystemClock
    from ringkv.tools.launcher import http

    url = args.url.rstrip("/")
    clock = SystemClock()
    deadline_s = clock.monotonic_s() + args.wait_s
    shown = None
    while clock.monotonic_s() < deadline_s:
        try:
            status, body = http("GET", url + "/v1/status", timeout_s=args.timeout,
                                headers=operator_headers())
        except OSError as exc:
            if done_when_unreachable is not None:
                print(done_when_unreachable)
                return 0
            print(f"ringkv: error: lost {args.url}: {exc}; run the command again (on any "
                  "node) to resume", file=sys.stderr)
            return 1
        view = body.get("streaming", {}) if status == 200 and isinstance(body, dict) else {}
        line = (f"  {view.get('state')}: ranges {view.get('ranges_done', 0)}/"
                f"{view.get('ranges_total', 0)}, {view.get('cells', 0)} cells, "
                f"{view.get('bytes', 0)} bytes, {view.get('rate_mib_s', 0)} MiB/s")
        if line != shown:
            print(line, flush=True)
            shown = line
        if done_state is not None and view.get("state") == "done":
            print(done_state)
            return 0
        if view.get("state") == "failed":
            print(f"ringkv: error: {failed}", file=sys.stderr)
            return 1
        clock.sleep_s(0.5)
    print(f"ringkv: error: {timed_out}", file=sys.stderr)
    return 1


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from contextlib import ExitStack
    from pathlib import Path

    from ringkv.tools.launcher import STOP_REQUESTED, Interrupted
    from ringkv.tools.local_cluster import LocalCluster, run_demo

    data_dir = args.data_dir or ("./data/hosts" if args.netns else "./data")
    cluster = LocalCluster(
        Path(data_dir).resolve(),
        nodes=args.nodes,
        rf=args.rf,
        base_client_port=args.base_port,
        base_internode_port=args.base_port + 100,
        base_native_port=args.base_port + 200,
        tls=args.tls,
        detached=args.detach,
    )
    if args.detach and args.netns:
        print("ringkv: error: --detach cannot be used with --netns (the namespace hosts "
              "live only as long as the process that built them)", file=sys.stderr)
        return 2
    refused = _refuse_a_running_cluster(cluster.data_dir)
    if refused is not None:
        return refused
    if args.racks and not args.netns:
        print("ringkv: error: --racks needs --netns (racks label namespace hosts)",
              file=sys.stderr)
        return 2
    if not 0 <= args.racks <= args.nodes:
        print(f"ringkv: error: --racks must be 0..{args.nodes} (the nodes), not {args.racks}",
              file=sys.stderr)
        return 2
    if args.netns:
        from ringkv.tools.netns import NetnsError, NetnsHosts, missing_tools, sweep_stale

        missing = missing_tools()
        if missing:
            print(f"ringkv: error: cluster up --netns needs {', '.join(missing)} "
                  "(it builds network namespaces and iptables rules)", file=sys.stderr)
            return 2
    stop = threading.Event()

    def on_sigterm(*_: object) -> None:
        # While the cluster starts or the demo runs, every wait gives up at its
        # next poll (Interrupted), so the finally below stops every node
        # started so far. Nothing is raised from here: an exception landing
        # inside subprocess.Popen would orphan the node being started.
        STOP_REQUESTED.set()
        stop.set()

    # Ctrl-C too: a KeyboardInterrupt raised inside subprocess.Popen would orphan
    # a node, and a SIGINT ignored since start-up (a shell's background job)
    # would leave no way to stop it but SIGTERM.
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
    with ExitStack() as cleanup:
        if args.netns:
            sweep_stale()  # namespaces a killed earlier run left behind
            hosts = NetnsHosts(args.nodes)
            try:
                hosts.up()
            except NetnsError as exc:
                print(f"ringkv: error: {exc}", file=sys.stderr)
                return 2
            # Runs as the block ends, once the finally below has stopped the nodes.
            cleanup.callback(_remove_hosts, hosts)
            cluster.build_on_hosts(hosts, racks=args.racks)
            where = f"on {args.nodes} namespace hosts {hosts.hosts[0]}..{hosts.hosts[-1]}"
        else:
            cluster.build()
            where = "on 127.0.0.1"
        reused = cluster.reuses_data()
        if reused:
            # Say so: the nodes come back with their data and tokens, and the
            # demo (which uses keys of its own run) does not start from empty.
            print(f"reusing the data of an earlier run under {cluster.data_dir} "
                  f"({', '.join(reused)}): nodes come back with their data and tokens; "
                  "delete that directory for a fresh cluster", flush=True)
        if args.tls:
            print(f"TLS on both links; CA and certificates in {cluster.certs_dir} (clients: "
                  f"--ca-file {cluster.certs_dir / 'ca.crt'})", flush=True)
        racks = f", {args.racks} racks" if args.racks else ""
        print(f"starting {args.nodes} nodes (rf={args.rf}{racks}) {where} under "
              f"{cluster.data_dir} ...", flush=True)
        left_running = False
        if args.detach:
            for proc in cluster.procs:
                proc.on_launch = functools.partial(_record_detached, cluster, args)
        try:
            cluster.up(together=args.netns)
            print("cluster is up; every node sees every other node UP:")
            for proc in cluster.procs:
                print(f"  {proc.node_id}: {proc.url}   (logs: {proc.log_path})")
            if args.demo:
                run_demo(cluster, say=lambda line: print(line, flush=True))
            if args.detach:
                path = _record_detached(cluster, args)
                left_running = True
                print(f"\ndetached: the nodes keep running (state in {path}); stop them with "
                      f"`ringkv cluster down --data-dir {cluster.data_dir}`, add one with "
                      f"`ringkv cluster add --data-dir {cluster.data_dir}`", flush=True)
                return 0
            print("\npress Ctrl-C to stop the cluster", flush=True)
            while not stop.wait(timeout=3600):  # sleeps until Ctrl-C or SIGTERM
                pass
        except (KeyboardInterrupt, Interrupted):
            pass
        finally:
            if not left_running:
                try:
                    print("\nstopping the cluster ...", flush=True)
                finally:  # even when the output is gone (a closed pipe): no orphans
                    cluster.down()
                    if args.detach:
                        from ringkv.tools.cluster_state import remove_state

                        remove_state(cluster.data_dir)
    return 0


def _refuse_a_running_cluster(data_dir: Any) -> int | None:
    """An exit code if a detached cluster still runs from ``data_dir`` (its nodes
    hold the ports and the data); None to go on. A stale state file (none of
    its nodes runs any more) is reported and removed."""
    from ringkv.tools.cluster_state import load_state, remove_state, state_path

    try:
        state = load_state(data_dir)
    except ValueError as exc:
        print(f"ringkv: error: {exc}", file=sys.stderr)
        return 1
    if state is None:
        return None
    live = state.live()
    if live:
        running = ", ".join(f"{node.node_id} (pid {node.pid})" for node in live)
        print(f"ringkv: error: a detached cluster already runs from {data_dir}: {running}; "
              f"stop it first with `ringkv cluster down --data-dir {data_dir}`", file=sys.stderr)
        return 1
    print(f"stale state file {state_path(data_dir)}: none of its nodes "
          f"({', '.join(node.node_id for node in state.nodes)}) runs any more; removing it",
          flush=True)
    remove_state(data_dir)
    return None


def _record_detached(cluster: Any, args: argparse.Namespace, *_: object) -> Any:
    """Write the state file of a detached cluster: every node started so far. Called
    as each node is launched too, so that whatever stops `cluster up` half-way
    (even SIGKILL), `cluster down` finds every node it left."""
    from ringkv.tools.cluster_state import ClusterState, save_state
    from ringkv.tools.local_cluster import node_record

    return save_state(ClusterState(
        data_dir=str(cluster.data_dir),
        flags={"nodes": args.nodes, "rf": args.rf, "base_port": args.base_port,
               "tls": args.tls, "demo": args.demo},
        nodes=[node_record(proc) for proc in cluster.procs if proc.proc is not None]))


def cmd_cluster_down(args: argparse.Namespace) -> int:
    """Stop the detached cluster recorded in DATA_DIR/cluster.json and remove that file."""
    from pathlib import Path

    from ringkv.tools.cluster_state import locked

    data_dir = Path(args.data_dir).resolve()
    with locked(data_dir):  # an add running meanwhile records its node first, or sees none
        return _stop_detached(data_dir, args.wait_s)


def _stop_detached(data_dir: Any, wait_s: float) -> int:
    from ringkv.tools.cluster_state import (
        load_state,
        remove_state,
        state_path,
        stop_nodes,
    )

    try:
        state = load_state(data_dir)
    except ValueError as exc:
        print(f"ringkv: error: {exc}", file=sys.stderr)
        return 1
    if state is None:
        # Stopping what is stopped is no failure: a script may run down twice.
        print(f"no detached cluster in {data_dir} (no {state_path(data_dir).name}): "
              "nothing to stop")
        return 0
    live = state.live()
    gone = [node.node_id for node in state.nodes if node not in live]
    if not live:
        print(f"stale state file {state_path(data_dir)}: none of its nodes "
              f"({', '.join(gone)}) runs any more; removed it")
        remove_state(data_dir)
        return 0
    print(f"stopping {', '.join(node.node_id for node in live)} ...", flush=True)
    killed = stop_nodes(live, deadline_s=wait_s)
    remove_state(data_dir)
    if gone:
        print(f"({', '.join(gone)} had already stopped)")
    if killed:
        print(f"{', '.join(killed)} did not stop within {wait_s:g}s of SIGTERM: killed")
    print(f"stopped the cluster in {data_dir}")
    return 0


def cmd_cluster_add(args: argparse.Namespace) -> int:
    """Start one more node that joins the detached cluster in DATA_DIR; wait until
    every node sees it UP and NORMAL; record it in the state file."""
    from pathlib import Path

    from ringkv.tools.cluster_state import load_state, locked, save_state
    from ringkv.tools.launcher import STOP_REQUESTED, Interrupted, trust

    def on_signal(*_: object) -> None:
        STOP_REQUESTED.set()  # the wait below gives up at its next poll

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    data_dir = Path(args.data_dir).resolve()
    with locked(data_dir):  # choosing the node's id and recording it: one add at a time
        started = _launch_one_more(data_dir)
    if isinstance(started, int):
        return started
    cluster, new = started
    for proc in cluster.procs:
        context = proc.client_context()
        if context is not None:
            trust(proc.url, context)
    try:
        cluster.wait_all_up(timeout_s=args.wait_s)
    except (TimeoutError, RuntimeError, Interrupted) as exc:
        print(f"ringkv: error: {new.node_id} did not join: {exc}; stopping it (its log: "
              f"{new.log_path})", file=sys.stderr)
        new.stop()
        with locked(data_dir):
            state = load_state(data_dir)
            if state is not None:
                state.nodes = [node for node in state.nodes if node.node_id != new.node_id]
                save_state(state)
        return 1
    print(f"{new.node_id} joined: every node sees it UP and NORMAL\n  {new.node_id}: "
          f"{new.url}   (logs: {new.log_path})")
    return 0


def _launch_one_more(data_dir: Any) -> Any:
    """Launch the next node of the detached cluster in ``data_dir`` and record it
    at once (so that `cluster down` stops it whatever happens to us); return the
    cluster (its live nodes and the new one) and the new node, or an exit code."""
    from pathlib import Path

    from ringkv.address import format_address
    from ringkv.tools.cluster_state import load_state, save_state
    from ringkv.tools.launcher import NodeProcess
    from ringkv.tools.local_cluster import LocalCluster, node_of_record, node_record

    try:
        state = load_state(data_dir)
    except ValueError as exc:
        print(f"ringkv: error: {exc}", file=sys.stderr)
        return 1
    if state is None:
        print(f"ringkv: error: no detached cluster in {data_dir}; start one with "
              f"`ringkv cluster up --detach --data-dir {data_dir}`", file=sys.stderr)
        return 1
    live = state.live()
    if not live:
        print(f"ringkv: error: stale state file in {data_dir}: none of its nodes runs any "
              f"more; clear it with `ringkv cluster down --data-dir {data_dir}`",
              file=sys.stderr)
        return 1
    tls = bool(state.flags.get("tls"))
    cluster = LocalCluster(data_dir, rf=int(state.flags.get("rf", 3)), tls=tls, detached=True)
    tls_dir = cluster.certs_dir if tls else None
    taken = {node.node_id for node in state.nodes}
    number = len(state.nodes) + 1
    while f"node{number}" in taken or (data_dir / f"node{number}").exists():
        number += 1  # a fresh data directory: the new node streams its ranges
    node_id = f"node{number}"
    ports = _ports_for(int(state.flags.get("base_port", 7400)), number - 1, live[0].host)
    config_path = (cluster.tls_config(node_id, host=live[0].host) if tls
                   else Path(live[0].config_path))
    seeds = ",".join(format_address(node.host, node.internode_port) for node in live)
    new = NodeProcess(node_id, data_dir, host=live[0].host, client_port=ports[0],
                      internode_port=ports[1], native_port=ports[2],
                      extra_args=["--seeds", seeds], config_path=config_path,
                      tls_dir=tls_dir, detached=True)
    print(f"starting {node_id} ({new.url}), joining through {seeds}; it streams its "
          f"ranges before it serves ...", flush=True)
    new.launch()
    state.nodes.append(node_record(new))
    save_state(state)
    cluster.procs = [*(node_of_record(node, data_dir, tls_dir) for node in live), new]
    return cluster, new


def _ports_for(base_port: int, index: int, host: str) -> tuple[int, int, int]:
    """The client, internode and native ports of the ``index``-th node (from 0) as
    `cluster up --base-port` numbers them, or free ones if any of those is taken."""
    from ringkv.tools.launcher import free_port, port_is_free

    wanted = (base_port + index, base_port + 100 + index, base_port + 200 + index)
    if all(port <= 65535 and port_is_free(host, port) for port in wanted):
        return wanted
    return free_port(host), free_port(host), free_port(host)


def _remove_hosts(hosts: Any) -> None:
    print(f"removing the namespace hosts {', '.join(hosts.namespaces)} ...", flush=True)
    hosts.down()


def cmd_certs_init(args: argparse.Namespace) -> int:
    import datetime
    from pathlib import Path

    from ringkv.tools.certs import init_ca

    try:
        path = init_ca(Path(args.dir), datetime.datetime.now(datetime.timezone.utc),
                       force=args.force)
    except FileExistsError as exc:
        print(f"ringkv: error: {exc}; pass --force to replace it (and reissue every "
              "certificate)", file=sys.stderr)
        return 1
    print(f"created the CA {path} (key {path.with_suffix('.key')}, mode 0600)")
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    import datetime
    import re
    from pathlib import Path

    from ringkv.tools.certs import issue

    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.name) or args.name in (".", ".."):
        print(f"ringkv: error: NAME: expected 1-64 characters from A-Z a-z 0-9 _ . -, got "
              f"{args.name!r}", file=sys.stderr)
        return 2
    if args.client and args.host:
        print("ringkv: error: --host names a server; a --client certificate has none",
              file=sys.stderr)
        return 2
    try:
        cert, key, serial = issue(Path(args.dir), args.name,
                                  datetime.datetime.now(datetime.timezone.utc),
                                  hosts=tuple(args.host or ()), client_only=args.client)
    except FileNotFoundError as exc:
        print(f"ringkv: error: no CA in {args.dir} ({exc.filename}); run `ringkv certs init "
              f"--dir {args.dir}` first", file=sys.stderr)
        return 1
    kind = "client" if args.client else "node"
    print(f"issued the {kind} certificate {cert} (key {key}, mode 0600), serial {serial:x}")
    if not args.client and not args.host:
        print("note: no --host: clients check that a node's certificate names the host they "
              "reach it at, and will refuse this one (internode links do not check)",
              file=sys.stderr)
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    import random
    import tempfile
    from pathlib import Path

    from ringkv.chaos.run import run_chaos  # lazy: only this command needs it

    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    # A fresh directory per run: old data would show up as values nobody wrote.
    run_dir = Path(tempfile.mkdtemp(prefix=f"seed{seed}-", dir=args.data_dir)).resolve()
    say = functools.partial(print, flush=True)
    if args.netns:
        from ringkv.chaos.netns_run import NetnsChaosRun
        from ringkv.tools.netns import NetnsError, NetnsHosts

        print(f"chaos run on 5 namespace hosts: seed {seed}, data under {run_dir}", flush=True)
        try:
            with NetnsHosts(5) as hosts:
                report = asyncio.run(NetnsChaosRun(run_dir, hosts, seed=seed, clients=args.clients,
                                                   keys=args.keys, say=say).run())
        except NetnsError as exc:
            print(f"ringkv: error: {exc}", file=sys.stderr)
            return 2
    else:
        print(f"chaos run: seed {seed}, {args.duration:g}s of faults, data under {run_dir}",
              flush=True)
        report = run_chaos(run_dir, seed=seed, duration_s=args.duration, clients=args.clients,
                           keys=args.keys, say=say)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    # Imported lazily: the benchmarks (and their extra dependencies) are optional.
    try:
        from bench.__main__ import main as bench_main
    except ImportError as exc:
        print(f"ringkv: error: the benchmarks are not installed ({exc}); "
              "install with: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    return bench_main(list(args.bench_args))

def sim_settings(args: argparse.Namespace) -> SimSettings:
    """The settings of ``ringkv sim`` (one seed: ``--seed``); ValueError if they are bad."""
    from ringkv.sim.run import SimSettings

    nemesis = tuple(n for n in args.nemesis.split(",") if n and n != "none")
    if args.workload == "eventual" and args.rf > args.nodes:
        raise ValueError(f"--rf {args.rf} is more than --nodes {args.nodes}: every key "
                         "would have fewer replicas than asked for")
    return SimSettings(
        seed=args.seed, nodes=args.nodes, rf=args.rf, ops=args.ops, clients=args.clients,
        keys=args.keys, read_cl=args.read.upper(), write_cl=args.write.upper(),
        nemesis=nemesis, fault=args.fault, duration_s=args.duration,
        commit_sync=args.commit_sync, hints=not args.no_hints,
        write_fraction=args.write_fraction, max_skew_s=args.max_skew, boot=args.boot,
        workload=args.workload, deletes=args.deletes, gc_grace_s=args.gc_grace,
        ranges=args.ranges,
    )


def _seed_path(path: str, seed: int) -> str:
    """One file per seed of a series: ``h.json`` -> ``h.seed7.json``."""
    base, dot, ext = path.rpartition(".")
    return f"{base}.seed{seed}.{ext}" if dot and "/" not in ext else f"{path}.seed{seed}"


def cmd_sim(args: argparse.Namespace) -> int:
    # Imported here: the simulator is not needed to run a node.
    from dataclasses import replace

    from ringkv.sim.jepsen_history import write_jepsen_history
    from ringkv.sim.run import format_line, format_report, format_totals, simulate

    try:
        settings = sim_settings(args)
    except ValueError as exc:
        print(f"ringkv sim: error: {exc}", file=sys.stderr)
        return 2
    if args.seeds == 1:
        result = simulate(settings, node_logs=args.node_logs)
        print(format_report(result, show_history=args.history))
        if args.history_out:
            write_jepsen_history(args.history_out, result.jepsen_events())
        return 0 if result.ok else 1
    results = []
    for seed in range(args.seed, args.seed + args.seeds):  # one line each, then totals
        results.append(simulate(replace(settings, seed=seed), node_logs=args.node_logs))
        print(format_line(results[-1]), flush=True)
        if args.history_out:
            write_jepsen_history(_seed_path(args.history_out, seed), results[-1].jepsen_events())
    print(format_totals(results))
    return 0 if all(r.ok for r in results) else 1


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
    node.add_argument(
        "--native-port", type=int,
        help="native protocol port, 0 for none (overrides cluster.native_port)",
    )
    node.add_argument(
        "--broadcast-internode",
        help="internode host:port told to peers, e.g. a proxy's (overrides cluster.broadcast_internode)",
    )
    node.add_argument(
        "--broadcast-client",
        help="client API host:port (or a host alone: the client port's) told to peers and "
             "clients (overrides cluster.broadcast_client)",
    )
    node.add_argument("--data-dir", help="data directory (overrides cluster.data_dir)")
    node.add_argument("--seeds", help="comma-separated internode host:port seeds")
    node.add_argument(
        "--bootstrap-new-cluster", action="store_true",
        help="start a new cluster alone if no seed answers (sets cluster.bootstrap_new_cluster)",
    )
    node.add_argument(
        "--replace", metavar="NODE_ID",
        help="take the place of this dead node: its tokens, and its data streamed from the "
             "other replicas (sets cluster.replace_node_id; start with an empty data dir)",
    )
    node.add_argument("--commit-sync", choices=("periodic", "batch"), help="storage.commit_sync")
    node.add_argument("--engine", choices=("leveldb", "memory"), help="storage.engine")
    node.add_argument("--no-auto-bootstrap", action="store_true",
                      help="go NORMAL at once without streaming (streaming.auto_bootstrap: false); "
                           "only for forming a new cluster that holds no data yet")
    node.add_argument("--restore", metavar="SNAPSHOT_DIR",
                      help="first make the node's data a copy of this snapshot "
                           "(DATA_DIR/NODE_ID/snapshots/NAME of `ringkv snapshot create`); "
                           "the data dir must hold nothing else")
    node.add_argument("--restore-overwrite", action="store_true",
                      help="with --restore: replace what the data dir holds (its snapshots stay)")
    node.set_defaults(func=cmd_node)

    status = commands.add_parser("status", help="print the cluster as one node sees it")
    status.add_argument("--url", default="http://127.0.0.1:7400", help="any node's HTTP address")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the node")
    status.add_argument("--ca-file", help="CA bundle (PEM) for an https:// node")
    status.add_argument("--cert-file", help="client certificate, for a node that requires one")
    status.add_argument("--key-file", help="the client certificate's key")
    status.set_defaults(func=cmd_status)

    repair = commands.add_parser(
        "repair", help="anti-entropy repair: compare Merkle trees with the other replicas of "
                       "every range a node replicates and stream what differs")
    repair.add_argument("--url", default="http://127.0.0.1:7400", help="the node to repair")
    repair.add_argument("--keyspace", help="only this eventual keyspace (default: all)")
    repair.add_argument("--range", help="only tokens in START:END (start exclusive, end inclusive)")
    repair.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds to wait for progress before giving up")
    repair.set_defaults(func=cmd_repair)
    leave = commands.add_parser(
        "decommission", help="make a node stream its data to the others, leave the ring and stop")
    leave.add_argument("--url", required=True, help="the HTTP address of the node to remove")
    leave.add_argument("--timeout", type=float, default=5.0, help="seconds to wait per request")
    leave.add_argument("--wait-s", type=float, default=3600.0,
                       help="seconds to follow the node until it has left")
    leave.set_defaults(func=cmd_decommission)
    remove = commands.add_parser(
        "removenode", help="remove a dead node: the surviving replicas stream its ranges to "
                           "their new owners, so every range has RF copies again")
    remove.add_argument("node_id", metavar="NODE_ID", help="the id of the dead node")
    remove.add_argument("--url", required=True,
                        help="the HTTP address of a live node, which coordinates the removal")
    remove.add_argument("--timeout", type=float, default=5.0, help="seconds to wait per request")
    remove.add_argument("--wait-s", type=float, default=3600.0,
                        help="seconds to follow the removal until it is done")
    remove.set_defaults(func=cmd_removenode)

    cluster = commands.add_parser("cluster", help="run a local cluster of node processes")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True,
                                              metavar="ACTION")
    up = cluster_commands.add_parser(
        "up", help="start N nodes on loopback (or namespace hosts); Ctrl-C stops them")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--rf", type=int, default=3, help="replication factor of the keyspaces default and txn")
    up.add_argument("--data-dir", default=None,
                    help="data directory, one folder per node (default ./data, with --netns "
                         "./data/hosts: nodes remember their peers' addresses, so the two "
                         "kinds of cluster keep apart)")
    up.add_argument("--base-port", type=int, default=7400,
                    help="node i serves HTTP on base+i, internode on base+100+i and the native "
                         "protocol on base+200+i")
    up.add_argument("--netns", action="store_true",
                    help="each node on its own network-namespace host, binding that host's "
                         "address (root, iproute2 and iptables); Ctrl-C also removes the hosts")
    up.add_argument("--racks", type=int, default=0,
                    help="with --netns: spread the nodes over R racks (cluster.rack), node i "
                         "in rack (i mod R) + 1")
    up.add_argument("--tls", action="store_true",
                    help="TLS on both links: a development CA and a certificate per node "
                         "under DATA_DIR/certs; clients use https:// and its ca.crt")
    up.add_argument("--demo", action="store_true",
                    help="run the demo: write, kill a node, read, restart, replay hints; then compare-and-set on txn across a leader kill")
    up.add_argument("--detach", action="store_true",
                    help="leave the nodes running and exit once every node is UP; their "
                         "pids, ports and paths go to DATA_DIR/cluster.json for `cluster "
                         "down` and `cluster add`")
    up.set_defaults(func=cmd_cluster_up)
    down = cluster_commands.add_parser(
        "down", help="stop the detached cluster of DATA_DIR (SIGTERM, then SIGKILL)")
    down.add_argument("--data-dir", default="./data", help="the data directory of the cluster")
    down.add_argument("--wait-s", type=float, default=15.0,
                      help="seconds to wait for the nodes after SIGTERM before SIGKILL")
    down.set_defaults(func=cmd_cluster_down)
    add = cluster_commands.add_parser(
        "add", help="start one more node that joins the detached cluster of DATA_DIR")
    add.add_argument("--data-dir", default="./data", help="the data directory of the cluster")
    add.add_argument("--wait-s", type=float, default=120.0,
                     help="seconds to wait for the node to stream its ranges and be UP "
                          "and NORMAL on every node")
    add.set_defaults(func=cmd_cluster_add)

    from ringkv import data_cli, snapshot_cli
    from ringkv.auth import admin_cli

    def tls_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ca-file", help="CA bundle (PEM) for an https:// node")
        parser.add_argument("--cert-file", help="client certificate, for a node that requires one")
        parser.add_argument("--key-file", help="the client certificate's key")

    admin_cli.add_parser(commands, tls_flags)
    snapshot_cli.add_parser(commands, tls_flags)
    data_cli.add_parser(commands, tls_flags)  # get, put, del, scan, txn

    certs = commands.add_parser(
        "certs", help="a development CA: create it, and issue node and client certificates")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    certs_init = certs_commands.add_parser("init", help="create a CA (ca.crt, ca.key) in --dir")
    certs_init.add_argument("--dir", required=True, help="directory for the CA and certificates")
    certs_init.add_argument("--force", action="store_true", help="replace an existing CA")
    certs_init.set_defaults(func=cmd_certs_init)
    certs_issue = certs_commands.add_parser(
        "issue", help="sign NAME.crt / NAME.key with the CA in --dir (again: rotate them)")
    certs_issue.add_argument("name", metavar="NAME", help="a node id, or a client's name")
    certs_issue.add_argument("--dir", required=True, help="the directory holding the CA")
    certs_issue.add_argument("--host", action="append",
                             help="a host name or IP the node is reached at (repeatable; "
                                  "clients check it)")
    certs_issue.add_argument("--client", action="store_true",
                             help="a client certificate (clientAuth only) instead of a node's")
    certs_issue.set_defaults(func=cmd_certs_issue)

    chaos = commands.add_parser(
        "chaos", help="Jepsen-style run: 3 nodes on 127.0.0.1-3, faults, load, history checks")
    chaos.add_argument("--duration", type=float, default=45.0,
                       help="seconds of load and faults (the --netns run has a fixed schedule)")
    chaos.add_argument("--netns", action="store_true",
                       help="5 nodes on network-namespace hosts, real packet drops (root, "
                            "iproute2 and iptables)")
    chaos.add_argument("--seed", type=int, help="seed of the fault schedule (default: random)")
    chaos.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    chaos.add_argument("--keys", type=int, default=10, help="keys the clients share (default 10)")
    chaos.add_argument("--data-dir", default="./data/chaos",
                       help="each run gets a fresh folder here (node data, logs, history.jsonl)")
    chaos.set_defaults(func=cmd_chaos)

    bench = commands.add_parser(
        "bench", help="run a benchmark: ringkv bench ycsb --quick (same as python -m bench)",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER,
                       help="a benchmark name and its options, e.g. ycsb --quick")
    bench.set_defaults(func=cmd_bench)

    sim = commands.add_parser(
        "sim", help="run a deterministic whole-cluster simulation from one seed",
        description="Real nodes on virtual time with a simulated network and faults; "
                    "the same options replay the same run (same history hash).")
    sim.add_argument("--seed", type=int, default=1, help="everything derives from it")
    sim.add_argument("--seeds", type=positive_int, default=1,
                     help="run this many seeds from --seed on, one line each, then totals")
    sim.add_argument("--nodes", type=positive_int, default=5, help="cluster size (default 5)")
    sim.add_argument("--rf", type=positive_int, default=3, help="replication factor (default 3)")
    sim.add_argument("--ops", type=positive_int, default=2000, help="client operations (default 2000)")
    sim.add_argument("--clients", type=positive_int, default=10, help="concurrent clients (default 10)")
    sim.add_argument("--keys", type=positive_int, default=20, help="distinct keys (default 20)")
    sim.add_argument("--read", default="QUORUM", help="read consistency level")
    sim.add_argument("--write", default="QUORUM", help="write consistency level")
    sim.add_argument("--nemesis", default="none",
                     help="comma-separated: partition,crash,power,pause,clog,skew,"
                          "isolate-repeat,leader, and the topology changes join,"
                          "decommission,removenode,wipe; with --workload bank or list-append "
                          "also kill-coordinator (the coordinator group's leader, between "
                          "prepare and commit) and cut-prepared (a participant's leader "
                          "holding a prepared transaction) (or none)")
    sim.add_argument("--fault", default=None,
                     help="plant a broken coordinator: ack-without-write, ack-before-write, "
                          "backdated-write, phantom-read, no-read-repair; or broken replicas: "
                          "purge-tombstones-at-once; with --workload register a broken "
                          "transactional node: skip-commit-wait, no-fencing, "
                          "snapshot-ignores-safe-time; with bank or list-append also a broken "
                          "two-phase commit participant: early-lock-release, skip-prepare-log")
    sim.add_argument("--duration", type=positive_float, default=60.0,
                     help="virtual seconds the workload is spread over (default 60)")
    sim.add_argument("--commit-sync", choices=("periodic", "batch"), default="periodic")
    sim.add_argument("--write-fraction", type=fraction, default=0.5,
                     help="share of the operations that are writes, 0 to 1 (default 0.5)")
    sim.add_argument("--max-skew", type=non_negative_float, default=0.25,
                     help="skew nemesis: largest clock offset, seconds (default 0.25)")
    sim.add_argument("--boot", choices=("join", "together", "provisioned"), default="join",
                     help="join: nodes join one by one (real token allocation); together: "
                          "all start at once and join; provisioned: tokens preset, faster")
    sim.add_argument("--workload", choices=("eventual", "register", "bank", "list-append"),
                     default="eventual",
                     help="eventual: writes and reads on an eventual keyspace; register: "
                          "compare-and-set registers on a transactional keyspace (RF 3), "
                          "checked for linearizability and commit wait; bank: transfers "
                          "between accounts in different ranges and read-only snapshots "
                          "(sums and signs checked); list-append: Elle-style transactions "
                          "across ranges, checked for strict serializability "
                          "(--keys: accounts or lists)")
    sim.add_argument("--ranges", type=positive_int, default=4,
                     help="bank and list-append: ranges of the transactional keyspace, each "
                          "its own Paxos group (default 4)")
    sim.add_argument("--history-out", default=None, metavar="FILE",
                     help="write the client history as Jepsen invoke/ok/fail/info events "
                          "(JSON); with --seeds, one file per seed (FILE.seedN.json)")
    sim.add_argument("--deletes", type=fraction, default=0.0,
                     help="share of the eventual workload's writes that are deletes "
                          "(default 0); reads after a delete are checked for resurrection")
    sim.add_argument("--gc-grace", type=positive_int, default=None,
                     help="timing.gc_grace_s of every node (default: the config's); repair "
                          "then runs every half of it and tombstones may be purged in the run")
    sim.add_argument("--no-hints", action="store_true", help="turn hinted handoff off")
    sim.add_argument("--history", action="store_true", help="print every operation")
    sim.add_argument("--node-logs", action="store_true",
                     help="let the nodes log (they are muted by default)")
    sim.set_defaults(func=cmd_sim)
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
