"""Fault injection against real node processes: the fault proxy and the Jepsen-style run."""
