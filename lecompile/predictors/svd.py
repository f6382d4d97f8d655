"""SparseLoRA's training-free estimator: a rank-r SVD of each frozen weight.

``x @ W.T ~= (x @ V_r) @ (U_r S_r).T`` costs ``T * r * (d + ffn)`` instead of ``T * d * ffn``.
Unlike SparseLoRA we add the exact adapter terms (LoRA is itself low rank, IA3 and biases are
vectors), so the estimate follows the adapters as they train at almost no extra cost.
"""

from typing import Optional, Tuple

import torch

from ..weight_cache import WeightCache
from ..ops.adapted_linear import ACTIVATIONS, AdaptedLinear, _scale, expand_linear

def _factorize(weight: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    r = min(rank, s.numel())
    return vh[:r].t().contiguous().to(weight.dtype), (u[:, :r] * s[:r]).contiguous().to(weight.dtype)


#: ``svd_factors(weight, rank) -> (P [in, r], Q [out, r])`` with ``weight ~= Q @ P.T``, computed
#: once per weight version (an in-place update of the weight is noticed).
svd_factors = WeightCache(_factorize)


def clear_svd_cache() -> None:
    """Forget every cached factorization."""
    svd_factors.clear()


def _estimate(x: torch.Tensor, lin: AdaptedLinear, rank: int) -> torch.Tensor:
    p, q = svd_factors(lin.weight, rank)
    xs = x if lin.in_scale is None else _scale(x, lin.in_scale)
    return expand_linear(x, lin, base=(xs @ p) @ q.t())


def svd_scores(x: torch.Tensor, fc1: AdaptedLinear, up: Optional[AdaptedLinear],
               activation: str, rank: int = 8) -> torch.Tensor:
    """Estimated ``|h|^2`` per token and neuron from rank-``rank`` weights plus exact adapters."""
    h = ACTIVATIONS[activation](_estimate(x, fc1, rank))
    if up is not None:
        h = h * _estimate(x, up, rank)
    return h.float().square()
