"""Relation gate: A or tiled Z -> BatchNorm -> attention network -> logit, forward and backward (see README.md)."""
