"""The transactional tier (DESIGN.md: Paxos groups per range, 2PC, TrueTime commit wait).

Being built (issue #11), from the pure cores up: ``truetime`` (the clock
interval and the ``clock_uncertain`` fence), ``ranges`` (a keyspace's ranges
and their groups), ``locks`` (two-phase locking with wound-wait),
``mvcc_keys``/``mvcc_gc``/``mvcc`` (the versioned store), ``paxos`` (the
replicated log with leader leases), ``paxos_messages`` (its wire codec and
coalesced batches) and the shell that runs one group on a node,
``paxos_log`` (its durable state) and ``group`` (``GroupRunner``). No node
serves the tier yet: a keyspace whose config sets ``tier: transactional`` is
refused at start-up (see ``config.py``) until the service that drives these
pieces exists.
"""
