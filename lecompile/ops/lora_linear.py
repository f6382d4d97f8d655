"""``lecompile::lora_linear``: a linear layer with its LoRA adapter, on tensor cores.

PEFT keeps adapter weights in fp32 (``autocast_adapter_dtype=True``) and runs
``B(A(x.float())) * scale`` as fp32 GEMMs beside the bf16/fp16 base GEMM, with casts around
them: without TF32 those small GEMMs run on CUDA cores and cost as much as the base model. This
op runs every matmul in the activation dtype (tensor cores, fp32 accumulation) while the adapter
weights stay fp32, the optimizer's master copy (their gradients come back through the casts)::

    y = x @ W.T + bias + scale * (lora_input @ A.T) @ B.T

``lora_input`` is what ``A`` reads when LoRA dropout is active; ``None`` means ``x``. For fp32
activations the op is PEFT's exact math. ``lecompile::lora_linears`` is the same for several
linears of one input (attention's q, k and v projections): one GEMM for all their A-projections.

The op is ``CompositeImplicitAutograd``: it shows as one node in the graphs the passes emit, and
AOTAutograd traces it into plain matmuls, so Inductor fuses its casts and adds and derives its
backward. (A Python custom op with its own backward was measured on the H100: same GPU time,
but about 0.2 ms of Python per call, which over every linear of a model made the step CPU-bound.)

With ``in_gemm=True`` (fp16/bf16 on a Hopper GPU, ranks multiples of 8) LoRA's B-projection runs inside
the base GEMM's kernel (:mod:`lecompile.kernels.lowrank_gemm`): ``y = x @ W.T + (s x A.T) @ B.T
+ bias`` as one reduction, and in the backward ``dx = dy @ W + dxa @ A`` likewise, so neither
the ``[T, out]`` update nor the ``[T, in]`` gradient through ``A`` is written and re-read. An
autograd function traced by AOTAutograd holds the two kernel calls; the A-projection, ``dxa``
and the adapter gradients stay cuBLAS GEMMs.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import kernel_accesses

try:
    from ..kernels import lowrank_gemm
except ImportError:  # no Triton, or one too old: the cuBLAS GEMMs run everywhere
    lowrank_gemm = None

Tensor = torch.Tensor
#: Tests set this to run the ``in_gemm`` kernels on CPU tensors in Triton's interpreter.
INTERPRET_ON_CPU = False
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # read when the kernels are defined

_lib = torch.library.Library("lecompile", "FRAGMENT")
_lib.define("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_input, Tensor lora_a, "
            "Tensor lora_b, float scale, bool in_gemm=False) -> Tensor")
_lib.define("lora_linears(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor? lora_input, Tensor[] lora_a, "
            "Tensor[] lora_b, float[] scales, bool in_gemm=False) -> Tensor[]")


def _check(x, weight, lora_input, lora_a, lora_b):
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"lora_linear: weight must be [out, in={x.shape[-1]}], got {tuple(weight.shape)}")
    r = lora_a.shape[0]
    if lora_a.shape != (r, weight.shape[1]) or lora_b.shape != (weight.shape[0], r):
        raise ValueError(f"lora_linear: expected lora_a [r, {weight.shape[1]}] and lora_b "
                         f"[{weight.shape[0]}, r], got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if lora_input is not None and lora_input.shape != x.shape:
        raise ValueError(f"lora_linear: lora_input must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(lora_input.shape)}")


def lora_linears_impl(x: Tensor, weights: List[Tensor], biases: List[Optional[Tensor]],
                      lora_input: Optional[Tensor], lora_a: List[Tensor], lora_b: List[Tensor],
                      scales: List[float], in_gemm: bool = False) -> List[Tensor]:
    """Several LoRA linears reading one input (``lora_linears``); every matmul in ``x.dtype``.
    Their A-projections are one GEMM against the stacked ``A`` matrices, so ``x`` is read once
    for all of them, and the backward's ``dA`` and input gradient through ``A`` are one GEMM each.
    ``in_gemm``: B-projections inside the base GEMMs where :func:`runs_in_gemm` allows."""
    if not (len(weights) == len(biases) == len(lora_a) == len(lora_b) == len(scales)) or not weights:
        raise ValueError(f"lora_linears: expected as many weights, biases, lora_a, lora_b and scales (at "
                         f"least one), got {len(weights)}, {len(biases)}, {len(lora_a)}, {len(lora_b)}, "
                         f"{len(scales)}")
    for weight, a, b in zip(weights, lora_a, lora_b):
        _check(x, weight, lora_input, a, b)
    if in_gemm and runs_in_gemm(x, weights, biases, lora_a):
        return _in_gemm(x, weights, biases, lora_input, lora_a, lora_b, scales)
    # Batched (3-D) inputs, as in PEFT's own graph: each branch's matmul reads and writes through
    # views, so Inductor does not merge ``mm + add`` into an ``addmm``, which on CUDA copies one
    # addend into the output and re-reads it in the GEMM; the add fuses into the consumer instead.
    x3 = x if x.dim() > 2 else x.unsqueeze(0)
    lx = x3 if lora_input is None else lora_input.reshape(x3.shape).to(x.dtype)
    stacked = lora_a[0] if len(lora_a) == 1 else torch.cat(lora_a)
    xa = F.linear(lx, stacked.to(x.dtype))
    outs, start = [], 0
    for weight, bias, a, b, scale in zip(weights, biases, lora_a, lora_b, scales):
        part = xa if len(lora_a) == 1 else xa[..., start:start + a.shape[0]]
        up = F.linear(part, b.to(x.dtype))
        start += a.shape[0]
        y = F.linear(x3, weight, bias) + up * scale
        outs.append(y.reshape(*x.shape[:-1], weight.shape[0]))
    return outs


def lora_linear_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_input: Optional[Tensor],
                     lora_a: Tensor, lora_b: Tensor, scale: float, in_gemm: bool = False) -> Tensor:
    """The op's math; every matmul in ``x.dtype``."""
    return lora_linears_impl(x, [weight], [bias], lora_input, [lora_a], [lora_b], [scale], in_gemm)[0]


def runs_in_gemm(x: Tensor, weights: List[Tensor], biases: List[Optional[Tensor]], lora_a: List[Tensor]) -> bool:
    """Whether ``in_gemm=True`` takes the kernel path for these operands (metadata only): fp16/bf16
    on a Hopper GPU (:func:`lowrank_gemm.unsupported_device`), frozen base weights, widths and
    ranks the kernel takes (:func:`lowrank_gemm.supports_dims`)."""
    if lowrank_gemm is None or not (x.is_cuda or (INTERPRET_ON_CPU and _INTERPRETING)):
        return False
    if in_gemm_unavailable(x):
        return False
    return all(not w.requires_grad and w.dtype == x.dtype and (b is None or b.dtype == x.dtype)
               and lowrank_gemm.supports_dims(x.dtype, w.shape[1], w.shape[0], a.shape[0])
               for w, b, a in zip(weights, biases, lora_a))


def in_gemm_unavailable(x: Tensor) -> str:
    """Why ``in_gemm=True`` keeps the cuBLAS path on ``x``'s GPU (not a Hopper one), or ``""``."""
    if lowrank_gemm is None or not x.is_cuda:
        return ""
    return lowrank_gemm.unsupported_device(x.device)


class _InGemm(torch.autograd.Function):
    """``[x @ W_i.T + (x A_s.T)[:, cols_i] @ B_i.T + bias_i]`` for ``A_s``, the stacked A
    matrices with their scales, and ``B_i``, all in ``x.dtype``; ``x`` is ``[T, in]``."""

    @staticmethod
    def forward(ctx, x, lora_input, stacked_a, ranks, *linears):
        weights, biases, lora_b = linears[0::3], linears[1::3], linears[2::3]
        xa = (x if lora_input is None else lora_input) @ stacked_a.t()
        ys, start = [], 0
        for weight, bias, b, r in zip(weights, biases, lora_b, ranks):
            ys.append(torch.ops.lecompile.linear_low_rank(x, weight, bias, xa[:, start:start + r], b))
            start += r
        ctx.save_for_backward(x, lora_input, stacked_a, xa, *weights, *lora_b)
        ctx.ranks = ranks
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        x, lora_input, stacked_a, xa, *rest = ctx.saved_tensors
        weights, lora_b = rest[:len(ctx.ranks)], rest[len(ctx.ranks):]
        needs = ctx.needs_input_grad
        dxa = torch.cat([dy @ b for dy, b in zip(dys, lora_b)], 1)  # [T, R]
        dx = dlora_input = None
        if needs[0]:
            fused = lora_input is None and lowrank_gemm.supports(dys[0], weights[0].t(), (dxa, stacked_a.t()))
            dx = torch.ops.lecompile.linear_low_rank(dys[0], weights[0].t(), None, *(
                (dxa, stacked_a.t()) if fused else (None, None)))
            if lora_input is None and not fused:
                dx = dx + dxa @ stacked_a
            for dy, weight in zip(dys[1:], weights[1:]):
                dx = dx + dy @ weight
        if lora_input is not None and needs[1]:
            dlora_input = dxa @ stacked_a
        da = dxa.t() @ (x if lora_input is None else lora_input) if needs[2] else None
        grads, start = [], 0
        for i, (dy, r) in enumerate(zip(dys, ctx.ranks)):
            dbias = dy.sum(0) if needs[4 + 3 * i + 1] else None
            db = dy.t() @ xa[:, start:start + r] if needs[4 + 3 * i + 2] else None
            grads += [None, dbias, db]
            start += r
        return (dx, dlora_input, da, None, *grads)


def _in_gemm(x, weights, biases, lora_input, lora_a, lora_b, scales):
    x2 = x.reshape(-1, x.shape[-1])
    lx = None if lora_input is None else lora_input.reshape(x2.shape).to(x.dtype)
    stacked_a = torch.cat([(a * s).to(x.dtype) for a, s in zip(lora_a, scales)])
    linears = [t for w, bias, b in zip(weights, biases, lora_b) for t in (w, bias, b.to(x.dtype))]
    ys = _InGemm.apply(x2, lx, stacked_a, [a.shape[0] for a in lora_a], *linears)
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


def _linear_low_rank(a: Tensor, weight: Tensor, bias: Optional[Tensor], c: Optional[Tensor],
                     e: Optional[Tensor]) -> Tensor:
    """:func:`lowrank_gemm.linear_low_rank` as an op ``a @ weight.T + c @ e.T + bias``."""
    return lowrank_gemm.linear_low_rank(a, weight, bias, None if c is None else (c, e))


if lowrank_gemm is not None and not _INTERPRETING:
    # A triton_op: Inductor writes the kernel's launch into its own code (no Python per call).
    torch.library.triton_op("lecompile::linear_low_rank", _linear_low_rank, mutates_args=())
    kernel_accesses.memoize(lowrank_gemm._linear_low_rank_kernel)
else:  # Triton's CPU interpreter cannot run under fake tensors: a plain custom op for the tests
    torch.library.custom_op("lecompile::linear_low_rank", _linear_low_rank, mutates_args=()).register_fake(
        lambda a, weight, bias, c, e: a.new_empty(a.shape[0], weight.shape[0]))


_lib.impl("lora_linear", lora_linear_impl, "CompositeImplicitAutograd")
_lib.impl("lora_linears", lora_linears_impl, "CompositeImplicitAutograd")

#: ``lora_linear(x, weight, bias, lora_input, lora_a, lora_b, scale, in_gemm=False) -> y``
lora_linear = torch.ops.lecompile.lora_linear.default
#: ``lora_linears(x, weights, biases, lora_input, lora_a, lora_b, scales, in_gemm=False) -> [y, ...]``:
#: several LoRA linears of one input, their A-projections as one GEMM.
lora_linears = torch.ops.lecompile.lora_linears.default
