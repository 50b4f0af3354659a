"""Gossip-based membership (Dynamo §4.8.1, Cassandra's Gossiper): pure cores.

* ``failure_detector``: phi accrual failure detector.
* ``state``: endpoint state, merge rules, Syn/Ack/Ack2 messages and their wire codec.
* ``gossiper``: the Gossiper state machine that an asyncio shell drives.

None of these modules performs I/O, reads a clock or draws unseeded randomness.
"""
