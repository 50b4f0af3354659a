"""Rotating the token secret on one real node process with auth.enabled
(``auth.previous_secrets`` at its default, 2).

Checked: only a cluster admin may rotate; a token issued before a rotation
still works after it (and after a second one), while new tokens name the new
secret's generation and work too; after the third rotation the first secret
is retired and its token is refused with 401 ``retired_secret`` saying why,
while the newer tokens still work; ``ringkv user rotate-secret`` rotates too.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from typing import Any

from ringkv.tools.launcher import NodeProcess
from tests.procs import REPO, http
from tests.test_auth_txn_owner import basic, node  # noqa: F401  (node: the fixture)


def token_of(proc: NodeProcess, who: dict[str, str]) -> tuple[str, int]:
    """A new token for ``who``, and the secret generation its payload names."""
    status, body = http("POST", f"{proc.url}/v1/auth/token", headers=who)
    assert status == 200, body
    payload = body["token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return body["token"], claims["k"]


def use(proc: NodeProcess, token: str) -> tuple[int, Any]:
    return http("GET", f"{proc.url}/v1/auth/whoami", headers={"Authorization": f"Bearer {token}"})


def rotate(proc: NodeProcess, who: dict[str, str]) -> tuple[int, Any]:
    return http("POST", f"{proc.url}/v1/auth/secret/rotate", headers=who)


def test_a_token_outlives_rotations_until_its_secret_is_retired(
        node: tuple[NodeProcess, str]) -> None:  # noqa: F811
    proc, admin_password = node
    admin = basic("admin", admin_password)
    status, body = http("POST", f"{proc.url}/v1/auth/users", {
        "name": "app", "password": "app-pw-123"}, headers=admin)
    assert status == 201, body
    app = basic("app", "app-pw-123")
    status, body = rotate(proc, app)
    assert (status, body["error"]["code"]) == (403, "forbidden"), body

    first, generation = token_of(proc, app)
    assert generation == 1
    assert use(proc, first) == (200, {"user": "app", "grants": []})

    status, body = rotate(proc, admin)
    assert status == 200 and body["secret_generation"] == 2, body
    assert body["previous_generations"] == [1]
    assert use(proc, first)[0] == 200  # still listed: it still works
    second, generation = token_of(proc, app)
    assert generation == 2 and use(proc, second)[0] == 200

    # The command line rotates too.
    done = subprocess.run(
        [sys.executable, "-m", "ringkv.cli", "user", "rotate-secret", "--url", proc.url],
        env={**os.environ, "RINGKV_PASSWORD": admin_password, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["secret_generation"], answer["previous_generations"]) == (3, [2, 1])
    assert use(proc, first)[0] == 200 and use(proc, second)[0] == 200

    status, body = rotate(proc, admin)
    assert (status, body["previous_generations"]) == (200, [3, 2]), body
    status, body = use(proc, first)
    error = body["error"]
    assert (status, error["code"], error["reason"]) == (401, "unauthenticated", "retired_secret")
    assert "generation 1" in error["message"] and "retired" in error["message"], error
    assert use(proc, second)[0] == 200
    fourth, generation = token_of(proc, app)
    assert generation == 4 and use(proc, fourth)[0] == 200
    status, metrics = http("GET", f"{proc.url}/metrics", headers=admin)
    assert status == 200 and 'ringkv_auth_failures_total{reason="retired_secret"} 1.0' in metrics
