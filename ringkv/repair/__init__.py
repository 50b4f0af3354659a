"""Bringing replicas back in step: hinted handoff today (``handoff``, ``hints``,
``hint_window``); Merkle-tree anti-entropy and streaming come next."""
