"""Projection: x -> theta, phi and the pooled gx, forward and backward (see README.md)."""
