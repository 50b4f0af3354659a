"""The transactional tier (DESIGN.md: Paxos groups per range, 2PC, TrueTime commit wait).

Not built yet: no issue has asked for it so far. A keyspace whose config sets
``tier: transactional`` is refused at start-up until it is (see ``config.py``).
"""
