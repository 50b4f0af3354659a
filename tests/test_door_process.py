"""Hostile clients against a real node process: the door cannot be held open.

Each case was once a way to hold a node: about 1,000 idle sockets took every
file descriptor (and LevelDB then failed with "Too many open files"),
slowloris connections trickling header lines were held for minutes, and a
huge declared Content-Length was read for minutes with no 413. Each test is
bounded in time, and checks that the node keeps serving others and logs no
error.
"""

from __future__ import annotations

import re
import resource
import selectors
import socket
import sys
from pathlib import Path

import pytest

from ringkv.clock import SystemClock
from ringkv.door import INTERNODE_PEERS, LEVELDB_FILES, PROCESS_FILES
from tests.procs import NodeProcess, http, wait_until

pytestmark = pytest.mark.cluster

CLOCK = SystemClock()


def start_node(tmp_path: Path, name: str, limits: dict[str, object],
               wrapper: list[str] | None = None) -> NodeProcess:
    config = tmp_path / f"{name}.yaml"
    config.write_text("limits:\n" + "".join(f"  {k}: {v}\n" for k, v in limits.items()))
    node = NodeProcess(name, tmp_path, config_path=config, wrapper=wrapper or [])
    return node.start()


def closed_by_reason(node: NodeProcess) -> dict[str, float]:
    status, text = http("GET", f"{node.url}/metrics", timeout_s=5)
    assert status == 200
    return {match[1]: float(match[2]) for match in re.finditer(
        r'^ringkv_client_connections_closed_total\{reason="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def request_statuses(node: NodeProcess) -> set[str]:
    _, text = http("GET", f"{node.url}/metrics", timeout_s=5)
    return set(re.findall(r'^ringkv_requests_total\{.*status="(\d+)"\}', text, re.MULTILINE))


def assert_log_clean(node: NodeProcess) -> None:
    assert node.log_path is not None
    text = node.log_path.read_text(errors="replace")
    for bad in ("Traceback", " ERROR ", "Too many open files", "CRITICAL"):
        assert bad not in text, f"{bad!r} in the node's log:\n{node.log_tail(60)}"


def timed_health(node: NodeProcess) -> float:
    """Seconds a fresh client takes to get /v1/health (it must be 200)."""
    started = CLOCK.monotonic_s()
    status, body = http("GET", f"{node.url}/v1/health", timeout_s=5)
    assert status == 200, body
    return CLOCK.monotonic_s() - started


def connect(node: NodeProcess) -> socket.socket:
    return socket.create_connection((node.host, node.client_port), timeout=5)


def read_to_close(sock: socket.socket) -> bytes:
    """What the node sends until it closes (a reset counts as a close)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


# -- slowloris ----------------------------------------------------------------------

SLOWLORIS = 200
HEADER_TIMEOUT_S = 2.0
TRICKLE_S = 0.5


def test_slowloris_connections_are_closed_by_the_header_timeout_while_others_are_served(
    tmp_path: Path,
) -> None:
    """200 connections each trickle a header line every 0.5 s and never finish the
    head. Each is answered 408 and closed within the header timeout of its connect,
    and a normal client is served at once meanwhile."""
    node = start_node(tmp_path, "loris", {"header_timeout_s": HEADER_TIMEOUT_S})
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    try:
        for _ in range(SLOWLORIS):
            sock = connect(node)
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            opened[sock] = CLOCK.monotonic_s()
        held_s: list[float] = []
        answers: list[bytes] = []
        served_s: list[float] = []
        deadline = CLOCK.monotonic_s() + HEADER_TIMEOUT_S + 10
        next_trickle = CLOCK.monotonic_s()
        while opened and CLOCK.monotonic_s() < deadline:
            now = CLOCK.monotonic_s()
            if now >= next_trickle:
                for sock in list(opened):
                    try:
                        sock.send(b"X-Slow: 1\r\n")
                    except OSError:
                        pass  # closed under us: the read below sees it
                next_trickle = now + TRICKLE_S
                served_s.append(timed_health(node))
            for key, _ in selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                except BlockingIOError:
                    continue
                answers.append(data)
                selector.unregister(sock)
                held_s.append(CLOCK.monotonic_s() - opened.pop(sock))
                sock.close()
        assert not opened, f"{len(opened)} slowloris connections still open"
        print(f"slowloris: held {min(held_s):.2f}-{max(held_s):.2f} s; health served in "
              f"at most {max(served_s) * 1000:.0f} ms")
        assert max(held_s) < HEADER_TIMEOUT_S + 1.5
        assert len(served_s) >= 3 and max(served_s) < 1.0
        assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers if answer)
        assert sum(1 for answer in answers if b'"request_timeout"' in answer) >= SLOWLORIS // 2
        assert closed_by_reason(node)["header_timeout"] >= SLOWLORIS
        assert_log_clean(node)
    finally:
        for sock in opened:
            sock.close()
        node.stop()


# -- idle sockets with few file descriptors --------------------------------------------

NOFILE = 1300  # the node's open-files limit: a flood of idle sockets outnumbers it
RESERVED = LEVELDB_FILES + 2 * INTERNODE_PEERS + PROCESS_FILES
CAP = NOFILE - RESERVED
IDLE_SOCKETS = NOFILE + 200
# Runs the node with RLIMIT_NOFILE lowered (prlimit, in Python).
LOW_NOFILE = [sys.executable, "-c",
              ("import os, resource, sys; "
               f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE})); "
               "os.execv(sys.argv[1], sys.argv[1:])")]


def node_fds(node: NodeProcess) -> int:
    assert node.proc is not None
    return len(list(Path(f"/proc/{node.proc.pid}/fd").iterdir()))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_an_idle_socket_flood_never_takes_the_descriptors_leveldb_needs(tmp_path: Path) -> None:
    """With RLIMIT_NOFILE at 1,300, 1,500 idle sockets: the node sizes its cap to leave
    LevelDB and internode links their descriptors (and says so), closes the longest
    idle socket for each newcomer, and serves reads and writes throughout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_SOCKETS + 200:
        if hard != resource.RLIM_INFINITY and hard < IDLE_SOCKETS + 200:
            pytest.skip(f"this process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (IDLE_SOCKETS + 200, hard))
    # A header timeout far off: the cap, not the timeout, must protect the node here.
    node = start_node(tmp_path, "idle", {"header_timeout_s": 600.0}, wrapper=LOW_NOFILE)
    sockets: list[socket.socket] = []
    try:
        assert f"serving at most {CAP} client connections" in node.log_tail()
        for i in range(IDLE_SOCKETS):
            sockets.append(connect(node))
            if i % 250 == 0:
                assert node_fds(node) < NOFILE
        wait_until(lambda: closed_by_reason(node)["evicted"] >= IDLE_SOCKETS - CAP,
                   timeout_s=20, what="the idle flood to be evicted down to the cap")
        for i in range(50):  # reads and writes on fresh connections, mid-flood
            status, body = http("PUT", f"{node.url}/v1/kv/default/k{i}", {"value": i})
            assert status == 200, body
            sockets.append(connect(node))  # and the flood goes on
        for i in range(50):
            status, body = http("GET", f"{node.url}/v1/kv/default/k{i}")
            assert (status, body["value"]) == (200, i), body
        assert node_fds(node) < NOFILE - LEVELDB_FILES // 2
        for sock in sockets:
            sock.setblocking(False)
        still_open = 0
        for sock in sockets:
            try:
                still_open += sock.recv(1) != b""
            except BlockingIOError:
                still_open += 1  # nothing to read, not closed: the node holds it
            except ConnectionResetError:
                pass
        assert still_open <= CAP
        assert timed_health(node) < 1.0
        assert_log_clean(node)
    finally:
        for sock in sockets:
            sock.close()
        node.stop()


# -- bodies: declared too large, trickled and abandoned; idle keep-alive -------------

BODY_TIMEOUT_S = 3.0
IDLE_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def body_node(tmp_path_factory: pytest.TempPathFactory):
    node = start_node(tmp_path_factory.mktemp("bodies"), "bodies",
                      {"body_timeout_s": BODY_TIMEOUT_S, "idle_timeout_s": IDLE_TIMEOUT_S})
    yield node
    node.stop()


def test_a_huge_declared_content_length_gets_413_at_once_naming_the_limit(
    body_node: NodeProcess,
) -> None:
    """RFC 9110 §15.5.14: ``Content-Length: 100000000000`` and 10 bytes get 413 before
    the body is read, and the connection closes (it was held 2 minutes before)."""
    started = CLOCK.monotonic_s()
    with connect(body_node) as sock:
        sock.sendall(b"PUT /v1/kv/default/huge HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100000000000\r\n\r\n0123456789")
        answer = read_to_close(sock)
    took_s = CLOCK.monotonic_s() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"413", answer
    assert b"application/json" in head and b"Connection: close" in head
    assert b'"code":"too_large"' in body and b'"limit":4194304' in body, body
    assert b'"size":100000000000' in body and b"limits.max_request_bytes" in body
    assert took_s < 1.0
    assert timed_health(body_node) < 1.0
    assert closed_by_reason(body_node)["too_large"] >= 1
    assert_log_clean(body_node)


def test_an_aborted_upload_is_counted_as_client_closed_not_as_a_500(
    body_node: NodeProcess,
) -> None:
    before = closed_by_reason(body_node)["client_closed"]
    for _ in range(3):
        with connect(body_node) as sock:
            sock.sendall(b"PUT /v1/kv/default/gone HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 1000000\r\n\r\n"
                         + b'{"value": "' + b"x" * 1000)
            timed_health(body_node)  # meanwhile the node takes the request in hand
        # The client is gone with its body half sent, its handler waiting for the rest.
    wait_until(lambda: closed_by_reason(body_node)["client_closed"] >= before + 3,
               timeout_s=10, what="three aborted uploads counted as client_closed")
    assert not any(status.startswith("5") for status in request_statuses(body_node))
    status, body = http("PUT", f"{body_node.url}/v1/kv/default/after", {"value": 1})
    assert status == 200, body
    assert_log_clean(body_node)


def test_a_trickled_body_is_answered_408_at_the_body_timeout(body_node: NodeProcess) -> None:
    """mod_reqtimeout's body timeout with a minimum rate: a byte every 0.2 s buys
    nothing, so the body is cut at the body timeout, with a 408 naming the body."""
    started = CLOCK.monotonic_s()
    with connect(body_node) as sock:
        sock.sendall(b"PUT /v1/kv/default/slow HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 1000\r\n\r\n")
        sock.settimeout(0.2)
        answer = b""
        while not answer and CLOCK.monotonic_s() < started + BODY_TIMEOUT_S + 5:
            try:
                sock.send(b" ")
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
    took_s = CLOCK.monotonic_s() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"code":"request_timeout"' in answer and b'"field":"body"' in answer
    assert BODY_TIMEOUT_S - 0.5 < took_s < BODY_TIMEOUT_S + 1.5
    assert closed_by_reason(body_node)["body_timeout"] >= 1


def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout(
    body_node: NodeProcess,
) -> None:
    before = closed_by_reason(body_node)["idle_timeout"]
    with connect(body_node) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        answered = CLOCK.monotonic_s()
        answer = read_to_close(sock)  # the answer, then the node's close
        idle_s = CLOCK.monotonic_s() - answered
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"}"), answer
    assert IDLE_TIMEOUT_S - 0.2 < idle_s < IDLE_TIMEOUT_S + 1.5
    assert closed_by_reason(body_node)["idle_timeout"] == before + 1
