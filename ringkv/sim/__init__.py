"""Deterministic whole-cluster simulation: the real node code on virtual time.

``run.simulate(SimSettings(seed=...))`` boots a cluster of real ``Node``
objects (gossip, coordinator, hints, read repair, ``LocalStore`` on the
memory engine) on one virtual-time event loop with a simulated network, runs
a client workload under nemeses, heals, and checks the recorded history.

This package imports nothing itself, so that importing its pure parts
(``history``, ``checkers``) does not pull in the whole simulator.
"""
