"""``lecompile::lora_linear``: a linear layer with its LoRA adapter, on tensor cores.

PEFT keeps adapter weights in fp32 (``autocast_adapter_dtype=True``) and runs
``B(A(x.float())) * scale`` as fp32 GEMMs beside the bf16/fp16 base GEMM, with casts around
them: on a GPU without TF32 those small GEMMs cost as much as the base model. This op runs every
matmul in the activation dtype (tensor cores, fp32 accumulation) while the adapter weights and
their gradients stay fp32, the optimizer's master copy::

    y = x @ W.T + bias + scale * (lora_input @ A.T) @ B.T

The LoRA up-projection, its scale and the add are one ``addmm`` epilogue on the base output;
backward adds LoRA's input gradient into the base one the same way. Saved for backward: the
layer input and the ``[T, r]`` projection ``x @ A.T`` (PEFT's autograd saves an fp32 copy of
``x`` instead). ``lora_input`` is what ``A`` reads when LoRA dropout is active; ``None`` means
``x``. For fp32 activations the op is PEFT's exact math.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

Tensor = torch.Tensor


def lora_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_input: Optional[Tensor],
                    lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """The op's math in plain PyTorch: adapter matmuls in ``x.dtype``."""
    lx = x if lora_input is None else lora_input.to(x.dtype)
    lora = F.linear(F.linear(lx, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return F.linear(x, weight, bias) + scale * lora


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


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("lecompile::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_input: Optional[Tensor],
                lora_a: Tensor, lora_b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Forward. Returns ``(y, xa)``: the output and ``lora_input @ A.T`` ``[T, r]`` for backward."""
    _check(x, weight, lora_input, lora_a, lora_b)
    counters["lecompile"]["lora_linear_calls"] += 1
    x2 = _flat(x)
    lx = x2 if lora_input is None else _flat(lora_input).to(x.dtype)
    xa = lx @ lora_a.to(x.dtype).t()
    y = F.linear(x2, weight, bias)
    y.addmm_(xa, lora_b.to(x.dtype).t(), alpha=scale)
    return y.reshape(*x.shape[:-1], weight.shape[0]), xa


@lora_linear.register_fake
def _(x, weight, bias, lora_input, lora_a, lora_b, scale):
    tokens = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(tokens, lora_a.shape[0])


def _matmul_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` accumulated and returned in fp32 (adapter weight gradients)."""
    if a.dtype == torch.float32 or a.device.type != "cuda":
        return a.float() @ b.float()
    return torch.mm(a, b, out_dtype=torch.float32)


@torch.library.custom_op("lecompile::lora_linear_backward", mutates_args=())
def lora_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_input: Optional[Tensor],
                         lora_a: Tensor, lora_b: Tensor, xa: Tensor, scale: float,
                         wanted: list[bool]) -> list[Tensor]:
    """Gradients for ``[x, weight, bias, lora_input, lora_a, lora_b]`` flagged in ``wanted``."""
    want_x, want_w, want_bias, want_li, want_a, want_b = wanted
    dy = _flat(grad_y)
    a = lora_a.to(x.dtype)
    g = dy @ lora_b.to(x.dtype)  # [T, r], LoRA's gradient before A (scale applied below)
    grads = []
    if want_x:
        dx = dy @ weight
        if lora_input is None:
            dx.addmm_(g, a, alpha=scale)
        grads.append(dx.reshape(x.shape))
    if want_w:
        grads.append(_matmul_fp32(dy.t(), _flat(x)).to(weight.dtype))
    if want_bias:
        grads.append(dy.sum(0, dtype=torch.float32))
    if want_li:
        grads.append((scale * (g @ a)).reshape(lora_input.shape).to(lora_input.dtype))
    if want_a:
        lx = _flat(x) if lora_input is None else _flat(lora_input).to(x.dtype)
        grads.append(scale * _matmul_fp32(g.t(), lx))
    if want_b:
        grads.append(scale * _matmul_fp32(dy.t(), xa))
    return grads


@lora_linear_backward.register_fake
def _(grad_y, x, weight, lora_input, lora_a, lora_b, xa, scale, wanted):
    shapes = [(x.shape, x.dtype), (weight.shape, weight.dtype), ((weight.shape[0],), torch.float32),
              (x.shape, lora_input.dtype if lora_input is not None else x.dtype),
              (lora_a.shape, torch.float32), (lora_b.shape, torch.float32)]
    return [x.new_empty(s, dtype=d) for (s, d), w in zip(shapes, wanted) if w]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_input, lora_a, lora_b, scale = inputs
    ctx.wanted = [t is not None and t.requires_grad for t in (x, weight, bias, lora_input, lora_a, lora_b)]
    ctx.scale = scale
    ctx.dtypes = [t.dtype if t is not None else None for t in (bias, lora_a, lora_b)]
    ctx.save_for_backward(x, weight, lora_input, lora_a, lora_b, output[1])


def _backward(ctx, grad_y, _grad_xa):
    x, weight, lora_input, lora_a, lora_b, xa = ctx.saved_tensors
    grads = iter(lora_linear_backward(grad_y.contiguous(), x, weight, lora_input, lora_a, lora_b,
                                      xa, ctx.scale, ctx.wanted))
    out = [next(grads) if w else None for w in ctx.wanted]
    bias_dtype, a_dtype, b_dtype = ctx.dtypes
    for i, dtype in ((2, bias_dtype), (4, a_dtype), (5, b_dtype)):
        if out[i] is not None:
            out[i] = out[i].to(dtype)
    return (*out, None)


lora_linear.register_autograd(_backward, setup_context=_setup_context)
