"""SparseLoRA's training-free estimator: a rank-r SVD of each frozen weight.

``x @ W.T ~= (x @ V_r) @ (U_r S_r).T`` costs ``T * r * (d + ffn)`` instead of ``T * d * ffn``.
Unlike SparseLoRA we add the exact adapter terms (LoRA is itself low rank, IA3 and biases are
vectors), so the estimate follows the adapters as they train at almost no extra cost.

Each linear's estimate is one low-rank product ``U @ V.T + b`` (SVD and LoRA coordinates side
by side); on CUDA the per-group scores come from a fused kernel that never writes the
``[T, ffn]`` estimate (:mod:`lecompile.kernels.group_scores`).
"""

from typing import Optional, Tuple

import torch

from ..activations import ACTIVATIONS
from ..cache import on_disk
from ..ops.adapted_linear import AdaptedLinear, _scale
from ..weight_cache import WeightCache

try:
    from ..kernels.group_scores import group_scores
except ImportError:  # no Triton
    group_scores = None


def _factorize(weight: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` truncated SVD of ``weight [out, in]`` as ``(P = V_r [in, r], Q = U_r S_r
    [out, r])``, from the top eigenvectors of the smaller Gram matrix (``W.T W`` or ``W W.T``) in
    float64: the factors of ``torch.linalg.svd`` to float32 precision, without a full SVD of the
    weight (1.6x faster on the CPU for Qwen2-1.5B's MLP weights)."""
    w = weight.double()
    r = min(rank, *w.shape)
    if w.shape[0] >= w.shape[1]:
        p = torch.linalg.eigh(w.t() @ w).eigenvectors[:, -r:].flip(1)
        q = w @ p
    else:
        values, vectors = torch.linalg.eigh(w @ w.t())
        u, s = vectors[:, -r:].flip(1), values[-r:].flip(0).clamp_min(0).sqrt()
        q, p = u * s, (w.t() @ u) / torch.where(s > 0, s, 1.0)
    return p.contiguous().to(weight.dtype), q.contiguous().to(weight.dtype)


#: ``svd_factors(weight, rank) -> (P [in, r], Q [out, r])`` with ``weight ~= Q @ P.T``, computed
#: once per weight version (an in-place update of the weight is noticed) and kept on disk for the
#: next process (:func:`~lecompile.cache.on_disk`).
svd_factors = WeightCache(on_disk(_factorize, "svd"))


def clear_svd_cache() -> None:
    """Forget every factorization cached in this process (those on disk stay: they are keyed on
    the weights' bytes, so they never serve another weight)."""
    svd_factors.clear()


def low_rank(x: torch.Tensor, lin: AdaptedLinear, rank: int, factors=None):
    """``(U [T, R], V [ffn, R], b)`` with ``U @ V.T + b`` the estimate of ``lin(x)``: the
    rank-``rank`` SVD of the frozen weight (or the given ``factors`` ``(P, Q)``) plus the exact
    LoRA, IA3 and bias terms. With ``factors``, every tensor may carry one more leading dim (several
    MLPs at once; bias and IA3 vectors as ``[L, 1, n]``)."""
    p, q = factors if factors is not None else svd_factors(lin.weight, rank)
    xs = x if lin.in_scale is None else _scale(x, lin.in_scale)
    us, vs = [(xs.to(p.dtype) @ p).float()], [q.float()]
    if lin.lora_a is not None:
        lx = xs if lin.lora_input is None else lin.lora_input
        us.append(lin.lora_scale * (lx.to(lin.lora_a.dtype) @ lin.lora_a.mT).float())
        vs.append(lin.lora_b.float())
    u, v = torch.cat(us, -1), torch.cat(vs, -1)
    b = lin.bias.float() if lin.bias is not None else None
    if lin.out_scale is not None:
        s = lin.out_scale.float()
        v, b = v * s.reshape(*v.shape[:-1], 1), (b * s if b is not None else None)
    return u, v, b


def estimate(u, v, bias, activation: str, second=None) -> torch.Tensor:
    """The estimated intermediate ``h = act(U @ V.T + b) [* (U2 @ V2.T + b2)]``: ``[T, ffn]``."""
    h = u.float() @ v.float().mT
    if bias is not None:
        h = h + bias.float()
    h = ACTIVATIONS[activation](h)
    if second is not None:
        u2, v2, b2 = second
        h2 = u2.float() @ v2.float().mT
        h = h * (h2 + b2.float() if b2 is not None else h2)
    return h


def group_scores_ref(u, v, bias, group: int, activation: str, second=None) -> torch.Tensor:
    """``sum over each group of tokens of h^2`` of :func:`estimate`, in PyTorch (materializes the
    ``[T, ffn]`` estimate)."""
    h = estimate(u, v, bias, activation, second)
    return h.square().reshape(-1, group, h.shape[-1]).sum(1)


def svd_group_scores(x: torch.Tensor, fc1: AdaptedLinear, up: Optional[AdaptedLinear],
                     activation: str, rank: int, group: int) -> torch.Tensor:
    """Estimated ``sum |h|^2`` per group of ``group`` tokens and neuron: ``[T / group, ffn]``."""
    first = low_rank(x, fc1, rank)
    second = low_rank(x, up, rank) if up is not None else None
    fused = group_scores is not None and x.is_cuda
    return (group_scores if fused else group_scores_ref)(*first, group, activation, second)
