"""Triton kernels for lecompile's ops (CUDA). Kernels only: no graphs, no autograd glue."""
