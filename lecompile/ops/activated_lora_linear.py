"""``lecompile::activated_lora_linear``: an MLP's down projection with LoRA, from the activation's inputs.

::

    y = lora_linear(act(pre) * up, weight, bias, None, lora_a, lora_b, scale)   # gated MLP
    y = lora_linear(act(pre), weight, bias, None, lora_a, lora_b, scale)        # up=None

The activation is computed as Inductor computes it (fp32 math on the inputs, one rounding). With
``in_gemm=True``, where :func:`~lecompile.ops.lora_linear.runs_in_gemm` takes the kernel, the
backward's input-gradient GEMM ``dh = dy @ W + dxa @ A`` ends in the activation's backward
(:func:`lecompile.kernels.lowrank_gemm.linear_low_rank_act_grad`): it writes ``dpre`` and ``dup``
directly, so ``dh [tokens, ffn]`` is neither written nor read back by a separate kernel.
Elsewhere the op is the composition above, which AOTAutograd traces as usual.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..activations import ACTIVATIONS
from .lora_linear import _INTERPRETING, lora_linear_impl, lowrank_gemm, runs_in_gemm

Tensor = torch.Tensor

_lib = torch.library.Library("lecompile", "FRAGMENT")
_lib.define("activated_lora_linear(Tensor pre, Tensor? up, str activation, Tensor weight, Tensor? bias, "
            "Tensor lora_a, Tensor lora_b, float scale, bool in_gemm=False) -> Tensor")


def activate(pre: Tensor, up: Optional[Tensor], activation: str) -> Tensor:
    """``act(pre) * up`` (``act(pre)`` without ``up``) in fp32 math, rounded once to ``pre.dtype``."""
    h = ACTIVATIONS[activation](pre.float())
    return (h if up is None else h * up.float()).to(pre.dtype)


def activated_lora_linear_impl(pre: Tensor, up: Optional[Tensor], activation: str, weight: Tensor,
                               bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: float,
                               in_gemm: bool = False) -> Tensor:
    """The op's math (see the module docstring)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activated_lora_linear: unknown activation {activation!r}; expected one of "
                         f"{sorted(ACTIVATIONS)}")
    if up is not None and (up.shape != pre.shape or up.dtype != pre.dtype):
        raise ValueError(f"activated_lora_linear: up must match pre ({tuple(pre.shape)}, {pre.dtype}), got "
                         f"{tuple(up.shape)}, {up.dtype}")
    if in_gemm and runs_in_gemm(pre, [weight], [bias], [lora_a]):
        pre2 = pre.reshape(-1, pre.shape[-1])
        up2 = None if up is None else up.reshape(pre2.shape)
        y = _ActivatedInGemm.apply(pre2, up2, activation, (lora_a * scale).to(pre.dtype), weight, bias,
                                   lora_b.to(pre.dtype))
        return y.reshape(*pre.shape[:-1], weight.shape[0])
    return lora_linear_impl(activate(pre, up, activation), weight, bias, None, lora_a, lora_b, scale, in_gemm)


class _ActivatedInGemm(torch.autograd.Function):
    """``h @ W.T + (h A.T) @ B.T + bias`` for ``h = act(pre) * up``; ``A`` carries the scale; all
    ``[tokens, features]`` in one dtype."""

    @staticmethod
    def forward(ctx, pre, up, activation, lora_a, weight, bias, lora_b):
        h = activate(pre, up, activation)
        xa = h @ lora_a.t()
        y = torch.ops.lecompile.linear_low_rank(h, weight, bias, xa, lora_b)
        ctx.save_for_backward(pre, up, h, xa, lora_a, weight, lora_b)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        pre, up, h, xa, lora_a, weight, lora_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dxa = dy @ lora_b
        grads = torch.ops.lecompile.linear_low_rank_act_grad(dy, weight.t(), dxa, lora_a.t(), pre, up,
                                                             ctx.activation)
        dpre, dup = grads[0], (grads[1] if up is not None else None)
        da = dxa.t() @ h if needs[3] else None
        dbias = dy.sum(0) if needs[5] else None
        db = dy.t() @ xa if needs[6] else None
        return dpre, dup, None, da, None, dbias, db


def _linear_low_rank_act_grad(a: Tensor, weight: Tensor, c: Tensor, e: Tensor, pre: Tensor, up: Optional[Tensor],
                              activation: str) -> List[Tensor]:
    """:func:`lowrank_gemm.linear_low_rank_act_grad` as an op; ``pre`` and ``up`` in any layout."""
    pre, up = (None if t is None else t if t.stride(-1) == 1 else t.contiguous() for t in (pre, up))
    return list(lowrank_gemm.linear_low_rank_act_grad(a, weight, (c, e), activation, pre, up))


def _fake(a, weight, c, e, pre, up, activation):
    return [a.new_empty(a.shape[0], weight.shape[0]) for _ in range(1 if up is None else 2)]


if lowrank_gemm is not None and not _INTERPRETING:
    # lora_linear has memoized the kernel's analysis (kernel_accesses) for both ops
    torch.library.triton_op("lecompile::linear_low_rank_act_grad", _linear_low_rank_act_grad, mutates_args=())
elif lowrank_gemm is not None:  # Triton's CPU interpreter cannot run under fake tensors: a plain custom op
    torch.library.custom_op("lecompile::linear_low_rank_act_grad", _linear_low_rank_act_grad,
                            mutates_args=()).register_fake(_fake)

_lib.impl("activated_lora_linear", activated_lora_linear_impl, "CompositeImplicitAutograd")

#: ``activated_lora_linear(pre, up, activation, weight, bias, lora_a, lora_b, scale, in_gemm=False) -> y``
activated_lora_linear = torch.ops.lecompile.activated_lora_linear.default
