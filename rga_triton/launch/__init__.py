"""How kernels launch: per-GPU tuned configuration files, autotuning on a miss, the config spaces,
and compiling a space ahead of timing. Shared by every step's kernels in ``ops/``."""
