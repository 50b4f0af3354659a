"""Whether a replica that missed a write still gets a hint (pure).

Cassandra's ``max_hint_window``: hints are collected for a replica only for
so long after it went DOWN. A replica down for longer is brought up to date
by repair, not by an ever-growing pile of hints on every coordinator.
"""

from __future__ import annotations


class HintWindow:
    def __init__(self, max_hint_window_s: float) -> None:
        self.max_hint_window_s = max_hint_window_s
        self._down_since_s: dict[str, float] = {}

    def down(self, node_id: str, now_s: float) -> None:
        """Gossip marked ``node_id`` DOWN (the first report counts)."""
        self._down_since_s.setdefault(node_id, now_s)

    def up(self, node_id: str) -> None:
        self._down_since_s.pop(node_id, None)

    def accepts(self, node_id: str, now_s: float) -> bool:
        """A replica UP (it failed one write) or DOWN for less than the window gets a hint."""
        since_s = self._down_since_s.get(node_id)
        return since_s is None or now_s - since_s <= self.max_hint_window_s
