"""The learned predictor: the SVD estimator's factors, trained on the exposer's labels.

Long Exposure trains a small low-rank network per layer to predict which neurons each token
activates, and keeps training it as the adapters change. Ours is that network in the SVD
estimator's shape: per frozen weight, trainable factors ``P [in, r]``, ``Q [out, r]`` (initialized
from the rank-r SVD, so an untrained predictor is the SVD predictor), with the exact LoRA, IA3 and
bias terms added as in :func:`~lecompile.predictors.svd.low_rank`. Trained to match the exact
activation magnitudes ``|h|`` (the exposer's labels) of the tokens of a calibration step.

Calibration steps (:mod:`lecompile.calibration`) are dense steps that record each MLP's input
(``lecompile::observe_mlp`` in the dense graph): the dense warm-up (at least its first step), then
one step in every ``calibrate_every``. The training runs after the user's ``optimizer.step()`` (a
``torch.optim`` post-step hook), outside every compiled step and op. Between calibrations the
predictor is frozen: the sparse graph's ``predict_neurons`` only reads the factors, so it can be
replayed as a CUDA graph (training updates the factors in place). Its parameters live here, keyed
by the frozen weight; they never enter the model or its optimizer. Training time and calls are
counted in ``torch._dynamo.utils.counters["lecompile"]`` (``learned_train_calls``,
``learned_train_ms``).
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch._dynamo.utils import counters

from .. import calibration
from ..ops.adapted_linear import AdaptedLinear
from ..weight_cache import WeightCache
from .oracle import mlp_intermediate
from .svd import estimate, group_scores, group_scores_ref, low_rank, svd_factors

LEARNING_RATE = 1e-3
TOKENS_PER_STEP = 1024
#: ``state_dict`` key of the calibration schedule's place.
CALIBRATION_KEY = "_calibration_steps_since"
#: Tokens of a calibration step kept per MLP for training (evenly strided over the batch).
RECORDED_TOKENS = 4096


class LearnedFactors:
    """Trainable rank-``r`` factors of one frozen weight and their Adam state."""

    def __init__(self, weight: torch.Tensor, rank: int):
        p, q = svd_factors(weight, rank)  # the SVD predictor's factors are where training starts
        self.p = p.float().clone().requires_grad_()
        self.q = q.float().clone().requires_grad_()
        self.optimizer = torch.optim.Adam([self.p, self.q], lr=LEARNING_RATE)
        self.optimizer._lecompile_internal = True  # not a training step of the user's model
        self.calls = 0  # trainings so far


#: ``learned_factors(weight, rank)``: the factors of one frozen weight, created on first use.
learned_factors = WeightCache(LearnedFactors)


#: Training due after this optimizer step, by the factors of the MLP's first linear: what the calibration step recorded.
_pending: dict = {}


def clear_learned() -> None:
    """Forget every learned predictor, its pending training and the calibration schedule."""
    learned_factors.clear()
    _pending.clear()
    calibration.reset()


def state_dict(model: torch.nn.Module) -> dict:
    """The learned predictors of ``model``'s weights, by parameter name (factors, their Adam
    state, trainings so far) and the calibration schedule's place: save it with the training
    state, so a resumed run goes on with the predictor it had instead of training a new one."""
    state = {}
    for name, weight in model.named_parameters():
        for (rank,), f in learned_factors.entries_of(weight).items():
            state[f"{name}@{rank}"] = {"p": f.p.detach().clone(), "q": f.q.detach().clone(), "calls": f.calls,
                                       "optimizer": f.optimizer.state_dict()}
    if state:
        state[CALIBRATION_KEY] = calibration.steps_since()
    return state


def load_state_dict(model: torch.nn.Module, state: dict) -> None:
    """Restore what :func:`state_dict` saved, after the model's own weights are loaded. Names
    that ``model`` lacks are an error."""
    weights = dict(model.named_parameters())
    state = dict(state)
    calibration.resume(state.pop(CALIBRATION_KEY, None))
    for key, saved in state.items():
        name, _, rank = key.rpartition("@")
        if name not in weights:
            raise KeyError(f"learned predictor state for {name!r}, which the model has no parameter of")
        weight = weights[name]
        f = LearnedFactors(weight.detach(), int(rank))
        with torch.no_grad():
            f.p.copy_(saved["p"])
            f.q.copy_(saved["q"])
        f.optimizer.load_state_dict(saved["optimizer"])
        f.calls = saved["calls"]
        learned_factors.put(weight, (int(rank),), f)


def train_pending() -> int:
    """Train every predictor whose calibration step recorded inputs; returns how many. Runs after
    that step's ``torch.optim`` step."""
    jobs = list(_pending.values())
    _pending.clear()
    for job in jobs:
        _train(*job)
    return len(jobs)


def observe(x: torch.Tensor, fc1: AdaptedLinear, up: Optional[AdaptedLinear], activation: str, rank: int,
            train_steps: int) -> None:
    """Keep up to :data:`RECORDED_TOKENS` tokens of one MLP's input (a calibration step) for
    :func:`train_pending`, which the next optimizer step runs."""
    f1 = learned_factors(fc1.weight, rank)
    f2 = learned_factors(up.weight, rank) if up is not None else None
    rows = torch.linspace(0, x.shape[0] - 1, min(x.shape[0], RECORDED_TOKENS), device=x.device).long()
    calibration.recorded(train_pending)
    kept_up = _kept(up.rows(rows)) if up is not None else None
    _pending[id(f1)] = (x[rows].clone(), _kept(fc1.rows(rows)), kept_up, activation, f1, f2, train_steps)


def _kept(lin: Optional[AdaptedLinear]) -> Optional[AdaptedLinear]:
    """``lin`` for training after the step: copies of every tensor but the frozen weight (a model
    parameter), since the compiled step may reuse the memory of its intermediates (activations,
    casts of the adapter weights)."""
    if lin is None:
        return None
    return AdaptedLinear(lin.weight, *(t.clone() if isinstance(t, torch.Tensor) else t for t in (
        lin.bias, lin.lora_input, lin.lora_a, lin.lora_b, lin.in_scale, lin.out_scale)), lin.lora_scale)


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
            est = _estimate(x[rows], fc1.rows(rows), up.rows(rows) if up is not None else None, activation, f1, f2)
            loss = (est.abs() - target[rows]).square().mean() / scale
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
    f1.calls += 1
    counters["lecompile"]["learned_train_calls"] += 1
    counters["lecompile"]["learned_train_ms"] += (time.perf_counter() - start) * 1e3


def learned_group_scores(x: torch.Tensor, fc1: AdaptedLinear, up: Optional[AdaptedLinear], activation: str,
                         rank: int, group: int) -> torch.Tensor:
    """Predicted ``sum |h|^2`` per group of ``group`` tokens and neuron: ``[T / group, ffn]``,
    from the factors as the last calibration left them (at first, the SVD's)."""
    f1 = learned_factors(fc1.weight, rank)
    f2 = learned_factors(up.weight, rank) if up is not None else None
    with torch.no_grad():
        first = low_rank(x, fc1, 0, factors=(f1.p.detach(), f1.q.detach()))
        second = low_rank(x, up, 0, factors=(f2.p.detach(), f2.q.detach())) if up is not None else None
    fused = group_scores is not None and x.is_cuda
    return (group_scores if fused else group_scores_ref)(*first, group, activation, second)
