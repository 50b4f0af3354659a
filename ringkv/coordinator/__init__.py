"""The coordinator: plans a request, drives it over pure cores, and answers.

``driver.Coordinator`` is the thin asyncio driver; the decisions are made by
``replica_plan``, ``read_resolver``, ``snitch`` and ``scan`` here, and by
``ringkv.quorum.ResponseTracker``.
"""

from ringkv.coordinator.driver import Coordinator, HintSink
from ringkv.coordinator.results import ReadResult, Receipt, ScanPage, WriteResult
from ringkv.keyspaces import KeyspaceSettings

__all__ = [
    "Coordinator",
    "HintSink",
    "KeyspaceSettings",
    "ReadResult",
    "Receipt",
    "ScanPage",
    "WriteResult",
]
