"""Topology changes: pending ranges while a node joins, and the streaming that
brings it the data of the ranges it takes over (Cassandra's bootstrap)."""
