"""Stand-alone probes and studies, each run as a script: python bench/studies/<name>.py --help."""
