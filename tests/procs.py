"""Test-side names for the process launcher."""

from pathlib import Path

from ringkv.tools.launcher import NodeProcess, free_port, http, wait_until

REPO = Path(__file__).resolve().parent.parent

# For clusters whose tests check what happens, not how soon membership notices:
# half-second gossip rounds halve a cluster's start-up (each joiner learns the ring
# in rounds) and the time to see a killed node DOWN or a restarted one UP. Tests
# of the failure detector's timing keep the default 1 s.
FAST_GOSSIP = {"timing.gossip_interval_ms": 500}

__all__ = ["FAST_GOSSIP", "REPO", "NodeProcess", "free_port", "http", "wait_until"]
