"""``lecompile::argsort``: ``torch.argsort`` along the last dimension, as an op Inductor leaves to ATen.

Inductor lowers a sort of rows of up to 512 entries into a Triton kernel of its own: a bitonic sort
unrolled into one persistent kernel, whose cold compile grows steeply with the row length and the
rows each program sorts (pytorch/pytorch#182060). The backend's graphs sort short rows on every
step (block lists of block-sparse attention, the block predictor's layouts, token groups), and at
long context those kernels took minutes to compile. ATen sorts such rows in microseconds, so the
backend sorts through this op, which Inductor calls as it is.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


@torch.library.custom_op("lecompile::argsort", mutates_args=())
def argsort(x: Tensor, descending: bool = False, stable: bool = False) -> Tensor:
    """``torch.argsort(x, dim=-1, descending=descending, stable=stable)``, contiguous."""
    return torch.argsort(x.contiguous(), dim=-1, descending=descending, stable=stable)


@argsort.register_fake
def _(x: Tensor, descending: bool = False, stable: bool = False) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.long)
