"""Test-side names for the process launcher."""

from pathlib import Path

from ringkv.tools.launcher import NodeProcess, free_port, http, wait_until

REPO = Path(__file__).resolve().parent.parent

__all__ = ["REPO", "NodeProcess", "free_port", "http", "wait_until"]
