"""Gating: out = x * spatial gate * channel gate, forward and backward (see README.md)."""
