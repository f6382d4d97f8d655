"""``lecompile::predict_neurons``: a predictor as an opaque op with a static output shape."""

from typing import List

import torch

from ..ops.adapted_linear import SLOTS, unpack_mlp
from .oracle import oracle_scores
from .svd import svd_scores

Tensor = torch.Tensor

LORA_INPUT = SLOTS.index("lora_input")

#: Predictor name -> scoring function ``(x [T, d], fc1, up, activation, rank) -> [T, ffn]``.
PREDICTORS = {"oracle": oracle_scores, "svd": svd_scores}


def top_k_per_group(scores: Tensor, k: int, group_size: int) -> Tensor:
    """Sorted indices ``[T / group_size, k]`` of the ``k`` neurons with the largest summed score
    over each group of ``group_size`` consecutive tokens."""
    tokens, ffn = scores.shape
    if tokens % group_size:
        raise ValueError(f"{tokens} tokens do not split into groups of {group_size}")
    if not 0 < k <= ffn:
        raise ValueError(f"k must be in [1, {ffn}], got {k}")
    grouped = scores.reshape(tokens // group_size, group_size, ffn).sum(dim=1)
    return grouped.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


@torch.library.custom_op("lecompile::predict_neurons", mutates_args=())
def _predict_neurons(x: Tensor, params: List[Tensor], slots: List[int], lora_scales: List[float],
                     activation: str, method: str, k: int, group_size: int, rank: int) -> Tensor:
    if method not in PREDICTORS:
        raise ValueError(f"predict_neurons: method must be one of {tuple(PREDICTORS)}, got {method!r}")
    flat = [t.reshape(-1, t.shape[-1]) if s % len(SLOTS) == LORA_INPUT else t
            for t, s in zip(params, slots)]
    fc1, up, _ = unpack_mlp(flat, slots, lora_scales)
    scores = PREDICTORS[method](x.reshape(-1, x.shape[-1]), fc1, up, activation, rank)
    return top_k_per_group(scores, k, group_size)


@_predict_neurons.register_fake
def _(x, params, slots, lora_scales, activation, method, k, group_size, rank):
    tokens = x.numel() // x.shape[-1]
    return x.new_empty(tokens // group_size, k, dtype=torch.int64)


def predict_neurons(x: Tensor, params: List[Tensor], slots: List[int], lora_scales: List[float],
                    activation: str, method: str, k: int, group_size: int, rank: int) -> Tensor:
    """Predict neuron indices ``[T / group_size, k]`` for the MLP packed in ``params``/``slots``
    (:func:`~lecompile.ops.adapted_linear.pack_mlp`). Inputs are detached: indices carry no
    gradient, and the predictor's math never enters the backward graph."""
    return _predict_neurons(x.detach(), [t.detach() for t in params], slots, lora_scales,
                            activation, method, k, group_size, rank)
