"""Token groups run dense or sparse: the regrouping behind context-only sparsity.

The tokens of an MLP input split into groups of ``group`` consecutive tokens (the predictor's
tiles or sequences). :func:`dense_first_order` orders the groups so that those holding output
tokens come first; the rewrite runs the first ``dense`` groups of that order dense and the rest
sparse, on contiguous tensors of static shape (:func:`split_groups`), then puts the rows back
(:func:`merge_groups`). Plain functions: the compiler traces through them, and their backward is
the gather's.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

from .argsort import argsort


def output_tokens(target: Tensor, ignore_index: int) -> Tensor:
    """Bool ``[T]``: the tokens the loss reads (``target != ignore_index``)."""
    return target.reshape(-1) != ignore_index


def dense_group_count(share: float, groups: int) -> int:
    """How many of ``groups`` token groups ``dense_output_share=share`` runs dense: the nearest
    whole number, leaving at least one group sparse."""
    return min(groups - 1, round(share * groups))


def dense_first_order(outputs: Tensor, group: int) -> Tuple[Tensor, Tensor]:
    """``(order, inverse)`` of the ``T / group`` groups: groups holding an output token first
    (each part in its original order), and the permutation that undoes it."""
    has_output = outputs.reshape(-1, group).any(-1)
    order = argsort((~has_output).to(torch.int8), stable=True)
    return order, torch.empty_like(order).scatter(0, order, torch.arange(order.numel(), device=order.device))


def split_groups(t: Tensor, order: Tensor, group: int, dense: int) -> Tuple[Tensor, Tensor]:
    """Rows of the token-aligned ``t [..., d]`` as ``([dense * group, d], [rest, d])``: the
    first ``dense`` groups of ``order``, then the others."""
    grouped = t.reshape(-1, group, t.shape[-1]).index_select(0, order)
    return grouped[:dense].reshape(-1, t.shape[-1]), grouped[dense:].reshape(-1, t.shape[-1])


def merge_groups(dense: Tensor, sparse: Tensor, inverse: Tensor, group: int, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`split_groups` for the results: rows back in token order, as
    ``[*shape[:-1], d]``."""
    d = dense.shape[-1]
    grouped = torch.cat([dense, sparse]).reshape(-1, group, d).index_select(0, inverse)
    return grouped.reshape(*shape[:-1], d)


def all_neurons(like: Tensor, ffn: int) -> Tensor:
    """Neuron indices ``[1, ffn]`` (every neuron, one group: the sparse-MLP op runs dense)."""
    return torch.arange(ffn, device=like.device).unsqueeze(0)
