"""A determinism bug the join nemesis found: a node joining a ring chose its
tokens (Dynamo §4.2's token placement, balanced as Cassandra's allocator does)
by summing floats over a set of node ids, whose order follows string hashing,
so another process (another PYTHONHASHSEED) could pick other tokens and a
``ringkv sim`` command did not replay its run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Five nodes with tokens set as `--boot provisioned` sets them, then two joins.
PROGRAM = """
import random
from ringkv.ring import TokenRing, allocate_tokens
rng = random.Random("4/tokens")
tokens = allocate_tokens(None, 5 * 16, rng)
order = list(range(5))
rng.shuffle(order)
ring = {f"n{i + 1}": [t for j, t in enumerate(tokens) if order[j % 5] == i] for i in range(5)}
for joiner in ("n6", "n7"):
    ring[joiner] = allocate_tokens(TokenRing(ring), 16, random.Random(0))
print(ring["n6"], ring["n7"])
"""


def test_a_joiner_chooses_the_same_tokens_whatever_the_string_hashing() -> None:
    outputs = set()
    for hash_seed in ("1", "2", "3", "4"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        outputs.add(out.stdout)
    assert len(outputs) == 1, outputs
