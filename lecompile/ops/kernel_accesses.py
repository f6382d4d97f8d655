"""Which tensors the backend's own Triton kernels write, worked out once per signature.

Each time a ``torch.library.triton_op``'s kernel is traced (functionalization, AOTAutograd's joint
graph, Inductor's lowering and scheduling), Torch lowers the kernel to Triton IR to find the
tensors it writes (``identify_accessed_tensors``; ``identify_mutated_tensors`` before Torch
2.13), and a model calls the LoRA GEMM at every linear of every layer. The answer depends only
on what Triton is given: the kernel, its arguments' dtypes and values, fake tensors replaced by
empty tensors of their dtype, symbolic sizes by 2, an autotuner's first config folded in. So
for the kernels passed to :func:`memoize` it is kept per such signature; every other kernel is
analysed as before. (pytorch/pytorch#193227 proposes the same cache for every kernel.)
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Dict, List, Optional

import torch

_KERNELS: List[Any] = []  # JITFunctions, compared by identity
_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")  # its names, newest first


def analysis_name() -> Optional[str]:
    """The name of Torch's analysis in ``torch._higher_order_ops.triton_kernel_wrap``, or ``None``
    where this Torch has none."""
    from torch._higher_order_ops import triton_kernel_wrap
    return next((name for name in _ANALYSES if hasattr(triton_kernel_wrap, name)), None)


def memoize(kernel) -> None:
    """Analyse ``kernel`` (a ``triton.jit`` function, or an autotuner around one) once per
    signature from now on, in this process."""
    fn = _jit_function(kernel)
    if not any(fn is k for k in _KERNELS):
        _KERNELS.append(fn)
    from torch._higher_order_ops import triton_kernel_wrap
    name = analysis_name()
    if name is None:  # a Torch without it: nothing to keep
        return
    analyse = getattr(triton_kernel_wrap, name)
    if not getattr(analyse, "_lecompile_memoized", False):
        setattr(triton_kernel_wrap, name, memoized(analyse))


def memoized(analyse: Callable) -> Callable:
    """``analyse`` (Torch's ``(kernel, kwargs, tma_descriptor_metadata)`` analysis) with its
    answers for the :func:`memoize`'d kernels kept per :func:`signature` (each caller gets a copy)."""
    answers: Dict[tuple, Any] = {}

    @functools.wraps(analyse)
    def analyse_once(kernel, kwargs, tma_descriptor_metadata, *args, **more):
        key = None if args or more else signature(kernel, kwargs, tma_descriptor_metadata)
        if key is None:
            return analyse(kernel, kwargs, tma_descriptor_metadata, *args, **more)
        if key not in answers:
            answers[key] = analyse(kernel, kwargs, tma_descriptor_metadata)
        return copy.deepcopy(answers[key])

    analyse_once._lecompile_memoized = True
    analyse_once.answers = answers
    return analyse_once


def _jit_function(kernel):
    """The ``triton.jit`` function inside ``kernel`` (itself, or what autotuners wrap)."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def signature(kernel, kwargs: dict, tma_descriptor_metadata) -> Optional[tuple]:
    """What Triton's IR of a launch of ``kernel`` with ``kwargs`` is made from, or ``None`` where
    the kernel is not :func:`memoize`'d or an argument is of a kind not covered (host-side TMA
    descriptors, values that cannot be compared)."""
    import sympy
    from torch._inductor.ir import TensorBox

    fn = _jit_function(kernel)
    if tma_descriptor_metadata or not any(fn is k for k in _KERNELS):
        return None
    configs = getattr(kernel, "configs", None) or ()
    first_config = tuple(sorted(configs[0].kwargs.items())) if configs else ()
    parts = []
    for name, value in sorted(kwargs.items()):
        if isinstance(value, torch.Tensor):
            parts.append((name, "tensor", value.dtype))
        elif isinstance(value, TensorBox):
            parts.append((name, "tensor", value.get_dtype()))
        elif isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
            parts.append((name, "symbolic"))
        elif value is None or isinstance(value, (bool, int, float, str)):
            parts.append((name, type(value).__name__, value))
        else:
            return None
    return fn, first_config, tuple(parts)
