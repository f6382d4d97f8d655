"""Experiments that profile single kernels and steps; their outputs are in ``benchmarks/results/profiles/``."""
