"""Affinity: G = theta^T phi, blocked, for callers who want G itself (see README.md)."""
