"""Operator and test tooling: starting node processes (``launcher``) and local
clusters (``local_cluster``)."""
