"""The learned predictor: the SVD estimator's factors, trained on the exposer's labels.

Long Exposure trains a small low-rank network per layer to predict which neurons each token
activates, and keeps training it as the adapters change. Ours is that network in the SVD
estimator's shape: per frozen weight, trainable factors ``P [in, r]``, ``Q [out, r]`` (initialized
from the rank-r SVD, so an untrained predictor is the SVD predictor), with the exact LoRA, IA3 and
bias terms added as in :func:`~lecompile.predictors.svd.low_rank`. Trained to match the exact
activation magnitudes ``|h|`` of the batch at hand (the exposer's labels; one dense pass), on
the first :data:`INITIAL_TRAIN_CALLS` calls for each MLP and then every ``refresh`` calls.

Its parameters live here, keyed by the frozen weight; they never enter the model or its
optimizer. Training time and calls are counted in ``torch._dynamo.utils.counters["lecompile"]``
(``learned_train_calls``, ``learned_train_ms``).
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch._dynamo.utils import counters

from ..ops.adapted_linear import AdaptedLinear
from ..weight_cache import WeightCache, on_helper_thread
from .oracle import mlp_intermediate
from .svd import _factorize, estimate, group_scores, group_scores_ref, low_rank

INITIAL_TRAIN_CALLS = 3
LEARNING_RATE = 1e-3
TOKENS_PER_STEP = 1024


class LearnedFactors:
    """Trainable rank-``r`` factors of one frozen weight and their Adam state."""

    def __init__(self, weight: torch.Tensor, rank: int):
        p, q = _factorize(weight, rank)
        self.p = p.float().requires_grad_()
        self.q = q.float().requires_grad_()
        self.optimizer = torch.optim.Adam([self.p, self.q], lr=LEARNING_RATE)
        self.optimizer._lecompile_internal = True  # not a training step of the user's model
        self.calls = 0


#: ``learned_factors(weight, rank)``: the factors of one frozen weight, created on first use.
learned_factors = WeightCache(LearnedFactors)


def clear_learned() -> None:
    """Forget every learned predictor."""
    learned_factors.clear()


def _estimate(x, fc1, up, activation, f1: LearnedFactors, f2: Optional[LearnedFactors]):
    second = low_rank(x, up, 0, factors=(f2.p, f2.q)) if up is not None else None
    return estimate(*low_rank(x, fc1, 0, factors=(f1.p, f1.q)), activation, second)


def _train(x, fc1, up, activation, f1, f2, steps: int) -> None:
    start = time.perf_counter()
    with torch.no_grad():
        target = mlp_intermediate(x, fc1, up, activation).float().abs()
        scale = target.square().mean().clamp(min=1e-12)
    optimizers = [f.optimizer for f in (f1, f2) if f is not None]
    g = torch.Generator(device=x.device).manual_seed(f1.calls)
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(0, x.shape[0], (min(TOKENS_PER_STEP, x.shape[0]),), generator=g,
                                 device=x.device)
            est = _estimate(x[rows], _rows(fc1, rows), _rows(up, rows), activation, f1, f2)
            loss = (est.abs() - target[rows]).square().mean() / scale
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
    counters["lecompile"]["learned_train_calls"] += 1
    counters["lecompile"]["learned_train_ms"] += (time.perf_counter() - start) * 1e3


def _rows(lin: Optional[AdaptedLinear], rows) -> Optional[AdaptedLinear]:
    """``lin`` for a subset of tokens (LoRA's separate input, when there is one, is per token)."""
    if lin is None or lin.lora_input is None:
        return lin
    return AdaptedLinear(lin.weight, lin.bias, lin.lora_input[rows], lin.lora_a, lin.lora_b, lin.in_scale,
                         lin.out_scale, lin.lora_scale)


def learned_group_scores(x: torch.Tensor, fc1: AdaptedLinear, up: Optional[AdaptedLinear], activation: str,
                         rank: int, group: int, train_steps: int = 20, refresh: int = 100) -> torch.Tensor:
    """Predicted ``sum |h|^2`` per group of ``group`` tokens and neuron: ``[T / group, ffn]``.
    Trains the factors first on the first calls and every ``refresh`` calls (0: never again)."""
    f1 = learned_factors(fc1.weight, rank)
    f2 = learned_factors(up.weight, rank) if up is not None else None
    if f1.calls < INITIAL_TRAIN_CALLS or (refresh > 0 and f1.calls % refresh == 0):
        # The predictor runs inside a custom op's kernel, below the autograd dispatch key, where
        # backward() records nothing; a fresh thread starts with autograd on.
        on_helper_thread(_train, x.device, x, fc1, up, activation, f1, f2, train_steps)
    f1.calls += 1
    with torch.no_grad():
        first = low_rank(x, fc1, 0, factors=(f1.p.detach(), f1.q.detach()))
        second = low_rank(x, up, 0, factors=(f2.p.detach(), f2.q.detach())) if up is not None else None
    fused = group_scores is not None and x.is_cuda
    return (group_scores if fused else group_scores_ref)(*first, group, activation, second)
