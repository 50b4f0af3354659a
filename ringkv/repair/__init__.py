"""Bringing replicas back in step: hinted handoff (``handoff``, ``hints``,
``hint_window``) and the Merkle trees of anti-entropy repair (``merkle``);
the repair session that exchanges trees and streams differences comes next."""
