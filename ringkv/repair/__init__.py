"""Bringing replicas back in step: hinted handoff (``handoff``, ``hints``,
``hint_window``) and anti-entropy repair: Merkle trees (``merkle``), what a
repair does (``session``), running it and its scheduler (``service``), and
when each range was last repaired (``history``)."""
