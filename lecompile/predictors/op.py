"""``lecompile::predict_neurons``: a predictor as an opaque op with a static output shape; and
``lecompile::observe_mlp``, which records an MLP's input on calibration steps (for the learned
predictor and the density guard)."""

import functools
from typing import List

import torch

from .. import calibration
from ..guard import guard_of
from ..ops.adapted_linear import SLOTS, unpack_mlp
from ..weight_cache import after_prefetches
from .learned import RECORDED_TOKENS, learned_factors, learned_group_scores, observe
from .oracle import oracle_group_scores
from .svd import svd_factors, svd_group_scores

try:
    from ..kernels.top_k import MAX_ROW, top_k_sorted
except ImportError:  # no Triton
    top_k_sorted = None

Tensor = torch.Tensor

LORA_INPUT = SLOTS.index("lora_input")

#: Predictor name -> scoring function
#: ``(x [T, d], fc1, up, activation, rank, group) -> [T / group, ffn]`` (larger = keep).
PREDICTORS = {"oracle": oracle_group_scores, "svd": svd_group_scores, "learned": learned_group_scores}


def top_k(scores: Tensor, k: int) -> Tensor:
    """Sorted indices ``[G, k]`` of the ``k`` largest scores of each row of ``scores [G, ffn]``
    (on CUDA one Triton launch, whose ties keep the lowest indices; elsewhere ``torch.topk``)."""
    if not 0 < k <= scores.shape[-1]:
        raise ValueError(f"k must be in [1, {scores.shape[-1]}], got {k}")
    if top_k_sorted is not None and scores.is_cuda and scores.dim() == 2 and scores.shape[-1] <= MAX_ROW:
        return top_k_sorted(scores, k)
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def recall(scores: Tensor, exact: Tensor, k: int) -> float:
    """Share of the exact top-``k`` mass that the top-``k`` of ``scores`` keeps (1.0 = oracle):
    ``exact`` is the oracle's ``[G, ffn]`` scores of the same groups."""
    kept = exact.gather(-1, top_k(scores, k)).sum()
    return (kept / exact.topk(k, dim=-1).values.sum()).item()


@torch.library.custom_op("lecompile::predict_neurons", mutates_args=())
def _predict_neurons(x: Tensor, params: List[Tensor], slots: List[int], lora_scales: List[float],
                     activation: str, method: str, k: int, group_size: int, rank: int) -> Tensor:
    if method not in PREDICTORS:
        raise ValueError(f"predict_neurons: method must be one of {tuple(PREDICTORS)}, got {method!r}")
    tokens = x.numel() // x.shape[-1]
    if group_size <= 0 or tokens % group_size:
        raise ValueError(f"predict_neurons: {tokens} tokens do not split into groups of {group_size}")
    scores = PREDICTORS[method](*_unpack_predictor_inputs(x, params, slots, lora_scales), activation, rank,
                                group_size)
    return top_k(scores, k)


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


def prepare_predictor(method: str, weights: List[Tensor], rank: int) -> None:
    """Start the per-weight state ``method`` caches for these frozen weights (fc1's, up's): their
    SVD factors on the background thread (:meth:`~lecompile.weight_cache.WeightCache.prefetch`),
    the learned predictor's factors from them once :func:`~lecompile.weight_cache.finish_prefetches`
    has waited for those."""
    if method not in ("svd", "learned"):
        return
    for w in weights:
        svd_factors.prefetch(w, rank)
        if method == "learned":
            after_prefetches(functools.partial(learned_factors, w, rank))


def _unpack_predictor_inputs(x: Tensor, params: List[Tensor], slots: List[int], lora_scales: List[float]):
    flat = [t.reshape(-1, t.shape[-1]) if s % len(SLOTS) == LORA_INPUT else t
            for t, s in zip(params, slots)]
    fc1, up, _ = unpack_mlp(flat, slots, lora_scales)
    return x.reshape(-1, x.shape[-1]), fc1, up


# Returns a copy of the MLP's output that the graph reads on, so that the recording is not dead
# code; it is only in the dense calibration graphs, which are never replayed as CUDA graphs.
@torch.library.custom_op("lecompile::observe_mlp", mutates_args=())
def _observe_mlp(y: Tensor, x: Tensor, params: List[Tensor], slots: List[int], lora_scales: List[float],
                 activation: str, method: str, rank: int, train_steps: int, group_size: int, layer: int,
                 density: float, guard: int) -> Tensor:
    x, fc1, up = _unpack_predictor_inputs(x, params, slots, lora_scales)
    if method == "learned":
        observe(x, fc1, up, activation, rank, train_steps)
    density_guard = guard_of(guard)
    if density_guard is not None and layer >= 0:
        groups = max(1, min(x.shape[0], RECORDED_TOKENS) // group_size)
        rows = torch.arange(groups * group_size, device=x.device)
        first, second = fc1.rows(rows), up.rows(rows) if up is not None else None
        scores = PREDICTORS[method](x[rows], first, second, activation, rank, group_size)
        exact = oracle_group_scores(x[rows], first, second, activation, 0, group_size)
        density_guard.measure(layer, density, scores, exact)
        calibration.recorded(density_guard.update)
    return y.clone()


@_observe_mlp.register_fake
def _(y, x, params, slots, lora_scales, activation, method, rank, train_steps, group_size, layer, density, guard):
    return torch.empty_like(y)


def _observe_setup(ctx, inputs, output):
    ctx.n_params = len(inputs[2])


_observe_mlp.register_autograd(lambda ctx, grad: (grad, None, [None] * ctx.n_params) + (None,) * 10,
                               setup_context=_observe_setup)


def observe_mlp(y: Tensor, x: Tensor, params: List[Tensor], slots: List[int], lora_scales: List[float],
                activation: str, method: str, rank: int, train_steps: int, group_size: int, layer: int,
                density: float, guard: int) -> Tensor:
    """``y`` (the MLP's output), after the calibration step's records of the MLP input ``x`` and
    fc1/up (packed as for :func:`predict_neurons`): for the learned predictor's next training
    (``method="learned"``), and the kept activation mass at each candidate density for the density
    guard numbered ``guard`` (-1: none; ``layer`` -1: index unknown, not measured)."""
    return _observe_mlp(y, x.detach(), [t.detach() for t in params], slots, lora_scales, activation, method, rank,
                        train_steps, group_size, layer, density, guard)
