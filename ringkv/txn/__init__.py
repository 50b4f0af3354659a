"""The transactional tier (DESIGN.md: Paxos groups per range, 2PC, TrueTime commit wait).

Being built (issue #11), from the pure cores up: ``truetime`` (the clock
interval and the ``clock_uncertain`` fence), ``ranges`` (a keyspace's ranges
and their groups), ``locks`` (two-phase locking with wound-wait),
``mvcc_keys``/``mvcc_gc``/``mvcc`` (the versioned store) and ``paxos`` (the
replicated log with leader leases). No node serves the tier yet: a keyspace
whose config sets ``tier: transactional`` is refused at start-up (see
``config.py``) until the service that drives these pieces exists.
"""
