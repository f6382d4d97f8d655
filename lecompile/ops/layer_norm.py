"""Layer norm whose backward reads its output instead of its input.

A transformer's layer norms sit between the residual stream and LoRA linears or a sparse MLP, all
of which keep the norm's output ``y`` for their own backward. Autograd's layer norm keeps its
input ``x`` as well, so each norm holds two ``[tokens, hidden]`` tensors for the backward. Its
backward only needs ``x_hat = (x - mean) * rstd``, which is also ``(y - bias) / weight``; this op
saves ``y`` and ``rstd`` and derives ``x_hat`` from them (the memory-efficient layer norm of Apex
and Megatron-LM), so the input is not kept. Same math and traffic; one tensor fewer per norm.

``y`` is rounded to its dtype, so the derived ``x_hat`` carries that rounding scaled by
``|bias| / |weight|`` per channel (:func:`output_rounding_gain`); the pass only uses the op where
that gain is small. ``layer_norm_from_output`` is a plain ``torch.autograd.Function``, not a
custom op: AOTAutograd traces its forward and backward into aten ops that Inductor fuses.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


class _LayerNormFromOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
        y, _, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(y, rstd, weight, bias)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        y, rstd, weight, bias = ctx.saved_tensors
        x_hat = y.float()
        if bias is not None:
            x_hat = x_hat - bias.float()
        g = dy.float()
        if weight is not None:
            x_hat = x_hat / weight.float()
            g = g * weight.float()
        dx = rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))
        batch_dims = tuple(range(dy.dim() - 1))
        dw = (dy.float() * x_hat).sum(batch_dims).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = dy.float().sum(batch_dims).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx.to(ctx.x_dtype), dw, db, None


def layer_norm_from_output(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                           bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm`` over the last dimension whose backward keeps ``y`` and ``rstd``, not ``x``.

    Raises ``ValueError`` for a ``normalized_shape`` other than ``(x.shape[-1],)``.
    """
    if tuple(normalized_shape) != (x.shape[-1],):
        raise ValueError(f"layer_norm_from_output normalizes the last dimension only: normalized_shape must be "
                         f"({x.shape[-1]},), got {tuple(normalized_shape)}")
    return _LayerNormFromOutput.apply(x, weight, bias, eps)


def output_rounding_gain(weight: Optional[Tensor], bias: Optional[Tensor]) -> float:
    """How much larger than the rounding of ``y`` itself the error of the derived ``x_hat`` can be:
    ``1 + max(|bias| / |weight|)`` (``inf`` where a weight is 0; 1 without an affine transform)."""
    if weight is None:
        return 1.0
    w = weight.detach().float().abs()
    if bool((w == 0).any()):
        return float("inf")
    b = bias.detach().float().abs() if bias is not None else torch.zeros_like(w)
    return 1.0 + float((b / w).max())
