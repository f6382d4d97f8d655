"""lecompile's benchmarks, run from the repository root as ``python -m benchmarks.<name>``.

Results (data and plots) are written to ``benchmarks/results/``.
"""
