"""What the Triton kernels share: activation codes and their epilogue math, the dot with its
interpreter fallback, autotune caching, and whether Triton's CPU interpreter runs them."""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

ACT_NONE, ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU = 0, 1, 2, 3, 4
ACT_CODES = {None: ACT_NONE, "relu": ACT_RELU, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH,
             "silu": ACT_SILU}

#: Autotune results go to Triton's cache directory (Triton >= 3.4), so a new process with the same
#: shapes skips the benchmarking. (On the H100 a sparse model's first step took up to 174 s, about
#: 20 s when an earlier run in the same process had tuned the kernels.)
AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"

@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    if DOT_FP32:  # Triton's CPU interpreter gets bf16 dots wrong (triton 3.9): test in fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _activate(a, ACT: tl.constexpr):
    if ACT == 1:
        a = tl.maximum(a, 0.0)
    elif ACT == 2:
        a = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
    elif ACT == 3:
        inner = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        a = 0.5 * a * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACT == 4:
        a = a * tl.sigmoid(a)
    return a


@triton.jit
def _activate_with_grad(a, ACT: tl.constexpr):
    """``(act(a), act'(a))`` for the backward epilogue."""
    if ACT == 1:
        return tl.maximum(a, 0.0), (a > 0).to(tl.float32)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
        return a * cdf, cdf + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)
    elif ACT == 3:
        t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (a + 0.044715 * a * a * a)) - 1.0
        grad = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * a * a)
        return 0.5 * a * (1.0 + t), grad
    else:
        sig = tl.sigmoid(a)
        return a * sig, sig * (1.0 + a * (1.0 - sig))


def _dot_fp32(dtype):
    return _interpreting() and dtype == torch.bfloat16
