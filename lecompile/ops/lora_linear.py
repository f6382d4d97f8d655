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
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

_lib = torch.library.Library("lecompile", "FRAGMENT")
_lib.define("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_input, Tensor lora_a, "
            "Tensor lora_b, float scale) -> Tensor")
_lib.define("lora_linears(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor? lora_input, Tensor[] lora_a, "
            "Tensor[] lora_b, float[] scales) -> Tensor[]")


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
                      scales: List[float]) -> List[Tensor]:
    """Several LoRA linears reading one input (``lora_linears``); every matmul in ``x.dtype``.
    Their A-projections are one GEMM against the stacked ``A`` matrices, so ``x`` is read once
    for all of them, and the backward's ``dA`` and input gradient through ``A`` are one GEMM each."""
    if not (len(weights) == len(biases) == len(lora_a) == len(lora_b) == len(scales)) or not weights:
        raise ValueError(f"lora_linears: expected as many weights, biases, lora_a, lora_b and scales (at "
                         f"least one), got {len(weights)}, {len(biases)}, {len(lora_a)}, {len(lora_b)}, "
                         f"{len(scales)}")
    for weight, a, b in zip(weights, lora_a, lora_b):
        _check(x, weight, lora_input, a, b)
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
                     lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """The op's math; every matmul in ``x.dtype``."""
    return lora_linears_impl(x, [weight], [bias], lora_input, [lora_a], [lora_b], [scale])[0]


_lib.impl("lora_linear", lora_linear_impl, "CompositeImplicitAutograd")
_lib.impl("lora_linears", lora_linears_impl, "CompositeImplicitAutograd")

#: ``lora_linear(x, weight, bias, lora_input, lora_a, lora_b, scale) -> y``
lora_linear = torch.ops.lecompile.lora_linear.default
#: ``lora_linears(x, weights, biases, lora_input, lora_a, lora_b, scales) -> [y, ...]``: several
#: LoRA linears of one input, their A-projections as one GEMM.
lora_linears = torch.ops.lecompile.lora_linears.default
