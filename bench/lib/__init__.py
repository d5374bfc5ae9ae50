"""What bench/sweep.py, the studies and the tests import: implementations, timing, hardware, cost model,
plots, reports."""
