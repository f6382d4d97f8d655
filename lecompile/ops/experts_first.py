"""``lecompile::experts_first``: the LoRA B matrices of stacked experts, expert by expert.

PEFT keeps the B matrices of LoRA on ``E`` stacked experts as one ``[out, r * E]`` weight whose
view ``[out, r, E]`` has the expert index fastest in memory. A grouped GEMM needs each expert's
matrix with a unit stride in one of its two dimensions. Inductor lays out a copy in the order of
its source, so a permuted copy keeps the expert index fastest; a custom op's output keeps the
layout it is returned in: ``[E, r, out]``, contiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("lecompile::experts_first", mutates_args=())
def experts_first(b: Tensor) -> Tensor:
    """``b.permute(2, 1, 0)`` (``[out, r, E]`` to ``[E, r, out]``), contiguous."""
    if b.dim() != 3:
        raise ValueError(f"experts_first: expected B as [out, r, experts], got shape {tuple(b.shape)}")
    return b.permute(2, 1, 0).contiguous()


@experts_first.register_fake
def _(b: Tensor) -> Tensor:
    return b.new_empty(b.shape[2], b.shape[1], b.shape[0])


def _backward(ctx, grad: Tensor) -> Tensor:
    return grad.permute(2, 1, 0)


experts_first.register_autograd(_backward)
