"""RMS norm whose backward reads its output instead of its input.

The RMS norm of LLaMA, Qwen and Mistral (Hugging Face's ``LlamaRMSNorm``)::

    x32 = x.float();  rstd = rsqrt(mean(x32 ** 2, -1) + eps);  y = weight * (x32 * rstd).to(x.dtype)

Like :mod:`lecompile.ops.layer_norm`: the LoRA linears and sparse MLPs after the norm keep ``y``
for their backward anyway, and the norm's backward only needs ``x_hat = x * rstd = y / weight``,
so saving ``y`` and ``rstd`` instead of ``x`` keeps one ``[tokens, hidden]`` tensor fewer per norm.
Without a bias the derived ``x_hat`` is as close to the true one as ``y``'s own rounding allows
(weights must be non-zero). A plain ``torch.autograd.Function``: AOTAutograd traces its forward
and backward into aten ops that Inductor fuses.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class _RMSNormFromOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 stays exact (gradcheck)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(y, rstd, weight)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        y, rstd, weight = ctx.saved_tensors
        x_hat = y.to(rstd.dtype) / weight.to(rstd.dtype)
        g = dy.to(rstd.dtype) * weight.to(rstd.dtype)
        dx = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy.to(rstd.dtype) * x_hat).sum(tuple(range(dy.dim() - 1))).to(weight.dtype)
        return dx.to(ctx.x_dtype), dw, None


def rms_norm_from_output(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Hugging Face's RMS norm over the last dimension (``weight * (x * rstd).to(x.dtype)``, the
    statistics in fp32, or fp64 for fp64 ``x``) whose backward keeps ``y`` and ``rstd``, not ``x``.
    ``weight`` must have no zero entries (the backward divides by it); raises ``ValueError`` for a
    ``weight`` that is not ``[hidden]``."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm_from_output: weight must be [{x.shape[-1]}] (the last dimension of x), "
                         f"got {tuple(weight.shape)}")
    return _RMSNormFromOutput.apply(x, weight, eps)
