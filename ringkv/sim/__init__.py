"""Deterministic whole-cluster simulation: the real node code on virtual time.

``simulate(SimSettings(seed=...))`` boots a cluster of real ``Node`` objects
(gossip, coordinator, hints, read repair, ``LocalStore`` on the memory
engine) on one virtual-time event loop with a simulated network, runs a
client workload under nemeses, heals, and checks the recorded history.
"""

from ringkv.sim.run import SimResult, SimSettings, format_report, simulate

__all__ = ["SimResult", "SimSettings", "format_report", "simulate"]
