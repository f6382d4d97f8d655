"""The oracle: exact MLP activations, so its top-k is the best any predictor can choose."""

from typing import Optional

import torch

from ..activations import ACTIVATIONS
from ..ops.adapted_linear import AdaptedLinear, expand_linear


def mlp_intermediate(x: torch.Tensor, fc1: AdaptedLinear, up: Optional[AdaptedLinear],
                     activation: str) -> torch.Tensor:
    """The exact dense intermediate ``act(fc1(x)) [* up(x)]``, adapters included: ``[T, ffn]``."""
    h = ACTIVATIONS[activation](expand_linear(x, fc1))
    return h * expand_linear(x, up) if up is not None else h


def oracle_group_scores(x: torch.Tensor, fc1: AdaptedLinear, up: Optional[AdaptedLinear],
                        activation: str, rank: int, group: int) -> torch.Tensor:
    """``sum |h|^2`` per group of ``group`` consecutive tokens and neuron, ``h`` the exact dense
    intermediate (adapters included): ``[T / group, ffn]``.

    ``x`` is ``[T, d]``; ``rank`` is unused (same signature as the other predictors).
    """
    h = mlp_intermediate(x, fc1, up, activation)
    return h.float().square().reshape(-1, group, h.shape[-1]).sum(1)
