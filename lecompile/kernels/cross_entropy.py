"""Cross-entropy rows and their logit gradients in one pass pair, without fp32 logits in memory.

One program per token row: an online max / sum-of-exponentials over the vocabulary gives the
row's log-sum-exp and loss, then a second sweep writes ``(softmax - onehot) * scale`` in the
logits' dtype. Hugging Face's causal-LM loss instead upcasts the whole ``[tokens, vocab]`` logits
to fp32 and keeps them, or their gradient, for the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _interpreting


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, target_ptr, scale_ptr, loss_ptr, grad_ptr, V, stride_row, width,
                               ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    picked = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
    scale = tl.load(scale_ptr)
    for v0 in range(0, width, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        g = (tl.exp(x - lse) - (offs == target).to(tl.float32)) * scale
        g = tl.where(valid, g, 0.0)
        tl.store(grad_ptr + row * width + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < width)


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                       ignore_index: int, loss_rows: torch.Tensor, width: int) -> torch.Tensor:
    """Per-row losses into ``loss_rows [N]`` (fp32, 0 where ``target == ignore_index``); returns
    the logits' gradient ``(softmax - onehot) * scale`` as ``[N, width]`` in the logits' dtype,
    zero in the columns past the vocabulary (``width >= V`` pads a GEMM's reduction dimension).
    ``scale`` is a one-element fp32 tensor (it stays on the device: no host sync). PyTorch twin:
    :func:`lecompile.ops.lm_head_loss.cross_entropy_rows_ref`."""
    n, vocab = logits.shape
    if width < vocab:
        raise ValueError(f"cross_entropy_rows: width {width} is narrower than the vocabulary ({vocab})")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad = torch.empty(n, width, dtype=logits.dtype, device=logits.device)
    block = 128 if _interpreting() else min(4096, triton.next_power_of_2(vocab))
    _cross_entropy_rows_kernel[(n,)](logits, target.contiguous(), scale, loss_rows, grad, vocab,
                                     logits.stride(0), width, ignore_index, BLOCK_V=block,
                                     num_warps=1 if _interpreting() else 8)
    return grad
