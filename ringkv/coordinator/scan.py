"""Range scans: the ring cut into pieces, and replica replies merged (pure).

A scan page walks the ring's ranges in token order. Each piece is read from
``block_for`` of its replicas; their replies are merged by last write wins.
A replica may stop short of the piece's end for its own bounds (items or
bytes, ``ScanReply.truncated``); the merge then ends at the *horizon*, the
(token, key) up to which every replica's answer is complete, and the next
page goes on from there.
"""

from __future__ import annotations

from collections.abc import Sequence

from ringkv.messages import ScanReply
from ringkv.ring import ring_pieces
from ringkv.versioning import Cell, reconcile

Item = tuple[int, bytes, Cell]

__all__ = ["Item", "merge_replies", "ring_pieces"]


def merge_replies(
    replies: Sequence[ScanReply], limit: int
) -> tuple[list[Item], tuple[int, bytes] | None]:
    """The replies' cells merged by LWW, and the horizon (None if every
    reply covered the whole piece). Only cells up to the horizon are returned."""
    merged: dict[tuple[int, bytes], Cell] = {}
    horizon: tuple[int, bytes] | None = None
    for reply in replies:
        if reply.truncated or len(reply.items) >= limit:
            last = reply.items[-1][:2]
            horizon = last if horizon is None else min(horizon, last)
        for token, key, cell in reply.items:
            winner = reconcile(merged.get((token, key)), cell)
            assert winner is not None  # reconcile of a cell never gives None
            merged[(token, key)] = winner
    complete = [place for place in sorted(merged) if horizon is None or place <= horizon]
    return [(token, key, merged[(token, key)]) for token, key in complete], horizon
