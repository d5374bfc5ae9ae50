"""BatchNorm on the Triton path: in-kernel statistics, finalisation, folded rows (see README.md)."""
