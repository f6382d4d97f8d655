"""SparseLoRA's training-free estimator: a rank-r SVD of each frozen weight.

``x @ W.T ~= (x @ V_r) @ (U_r S_r).T`` costs ``T * r * (d + ffn)`` instead of ``T * d * ffn``.
Unlike SparseLoRA we add the exact adapter terms (LoRA is itself low rank, IA3 and biases are
vectors), so the estimate follows the adapters as they train at almost no extra cost.
"""

from typing import Dict, Optional, Tuple

import torch

from ..ops.adapted_linear import ACTIVATIONS, AdaptedLinear, expand_linear

# (data_ptr, shape, dtype, device, rank) -> (weight version, P [in, r], Q [out, r])
_FACTORS: Dict[tuple, Tuple[int, torch.Tensor, torch.Tensor]] = {}


def clear_svd_cache() -> None:
    """Forget every cached factorization."""
    _FACTORS.clear()


def svd_factors(weight: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with ``weight ~= Q @ P.T``, computed once per weight and cached.

    The cache key includes the tensor's version counter, so an in-place update of the weight
    (full fine-tuning, ``load_state_dict``) is noticed and the factors are recomputed.
    """
    key = (weight.data_ptr(), tuple(weight.shape), weight.dtype, weight.device, rank)
    version = weight._version
    hit = _FACTORS.get(key)
    if hit is None or hit[0] != version:
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        r = min(rank, s.numel())
        p = vh[:r].t().contiguous().to(weight.dtype)
        q = (u[:, :r] * s[:r]).contiguous().to(weight.dtype)
        hit = _FACTORS[key] = (version, p, q)
    return hit[1], hit[2]


def _estimate(x: torch.Tensor, lin: AdaptedLinear, rank: int) -> torch.Tensor:
    p, q = svd_factors(lin.weight, rank)
    xs = x if lin.in_scale is None else (x.to(lin.in_scale.dtype) * lin.in_scale).to(x.dtype)
    return expand_linear(x, lin, base=(xs @ p) @ q.t())


def svd_scores(x: torch.Tensor, fc1: AdaptedLinear, up: Optional[AdaptedLinear],
               activation: str, rank: int = 8) -> torch.Tensor:
    """Estimated ``|h|^2`` per token and neuron from rank-``rank`` weights plus exact adapters."""
    h = ACTIVATIONS[activation](_estimate(x, fc1, rank))
    if up is not None:
        h = h * _estimate(x, up, rank)
    return h.float().square()
