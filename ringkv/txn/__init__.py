"""The transactional tier (DESIGN.md: Paxos groups per range, 2PC, TrueTime commit wait).

Not built yet: no issue has asked for it so far. Keyspaces whose config sets
``tier: transactional`` are refused at load time until it is (see config.py).
