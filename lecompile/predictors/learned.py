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
from typing import Dict, Iterator, List, Optional

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
#: Per device type, the bytes of exposer labels (fp32 ``|h|`` of the recorded tokens) that one batch
#: of MLPs trains on: on the GPU one launch per op for several MLPs saves what the launches cost; on
#: the CPU one MLP at a time keeps its tensors in cache (stacked, a CPU trained 4x slower).
TRAIN_BATCH_BYTES = {"cuda": 512 << 20}


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
    that step's ``torch.optim`` step. MLPs of one shape train together (:func:`_batches`)."""
    jobs = list(_pending.values())
    _pending.clear()
    for batch in _batches(jobs):
        _train(batch)
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


_MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's per-element state


def _batches(jobs: List[tuple]) -> Iterator[List[tuple]]:
    """The pending trainings in batches that train as one: MLPs whose recorded tensors have the
    same shapes, with the same activation, steps and training history (so the same token draws and
    Adam step count), at most :data:`TRAIN_BATCH_BYTES` of labels each (else one at a time)."""
    groups: Dict[tuple, List[tuple]] = {}
    for job in jobs:
        groups.setdefault(_signature(job), []).append(job)
    for group in groups.values():
        x, fc1 = group[0][0], group[0][1]
        size = max(1, TRAIN_BATCH_BYTES.get(x.device.type, 0) // (x.shape[0] * fc1.weight.shape[0] * 4))
        for i in range(0, len(group), size):
            yield group[i:i + size]


def _signature(job: tuple) -> tuple:
    x, fc1, up, activation, f1, f2, steps = job

    def linear(lin):
        return None if lin is None else (lin.lora_scale, *(None if t is None else (tuple(t.shape), t.dtype)
                                                            for t in lin.tensors()))

    def history(f):
        return None if f is None else (tuple(f.p.shape), f.calls, *(float(st["step"]) if st else None for st in (
            f.optimizer.state.get(f.p), f.optimizer.state.get(f.q))))

    return tuple(x.shape), x.dtype, x.device, linear(fc1), linear(up), activation, steps, history(f1), history(f2)


def _stacked(lins: List[Optional[AdaptedLinear]]) -> Optional[AdaptedLinear]:
    """One linear of several MLPs' terms as :func:`~lecompile.predictors.svd.low_rank` takes them
    (the frozen weights stay out: the factors stand in for them)."""
    if lins[0] is None:
        return None

    def stack(slot, vector=False):
        tensors = [getattr(lin, slot) for lin in lins]
        if tensors[0] is None:
            return None
        stacked = torch.stack(tensors)
        return stacked.unsqueeze(-2) if vector else stacked

    return AdaptedLinear(None, stack("bias", True), stack("lora_input"), stack("lora_a"), stack("lora_b"),
                         stack("in_scale", True), stack("out_scale", True), lins[0].lora_scale)


def _train(jobs: List[tuple]) -> None:
    """Train the predictors of ``jobs`` (one :func:`_signature`) ``steps`` Adam steps each to
    match the exposer's labels of their recorded tokens, all at once: their tensors stacked along a
    leading dim, so each op runs once for all of them. Each MLP's loss and Adam state are its own
    (the gradient of the losses' sum is each MLP's), so this is each MLP trained alone."""
    start = time.perf_counter()
    x, fc1, up, activation, f1, f2, steps = jobs[0]
    with torch.no_grad():
        target = torch.empty(len(jobs), x.shape[0], fc1.weight.shape[0], device=x.device)
        for i, job in enumerate(jobs):
            target[i] = mlp_intermediate(job[0], job[1], job[2], activation).float().abs()
        scale = target.square().mean((-2, -1)).clamp(min=1e-12)
    xs = torch.stack([job[0] for job in jobs])
    first, second = _stacked([job[1] for job in jobs]), _stacked([job[2] for job in jobs])
    # Per factor of each linear: the MLPs' tensors stacked into one leaf, its Adam state likewise.
    owners = [[job[4] for job in jobs]] + ([[job[5] for job in jobs]] if f2 is not None else [])
    pairs = [(fs, name, torch.stack([getattr(f, name).detach() for f in fs]).requires_grad_())
             for fs in owners for name in ("p", "q")]
    leaves = [leaf for _, _, leaf in pairs]
    optimizer = torch.optim.Adam(leaves, lr=LEARNING_RATE)
    optimizer._lecompile_internal = True  # not a training step of the user's model
    for fs, name, leaf in pairs:
        states = [f.optimizer.state.get(getattr(f, name)) for f in fs]
        if states[0]:
            optimizer.state[leaf] = {"step": states[0]["step"].clone(),
                                     **{k: torch.stack([st[k] for st in states]) for k in _MOMENTS}}
    g = torch.Generator(device=x.device).manual_seed(f1.calls)
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(0, x.shape[0], (min(TOKENS_PER_STEP, x.shape[0]),), generator=g, device=x.device)
            per_mlp = (slice(None), rows)  # the same rows of every MLP's tokens
            x_rows = xs[per_mlp]
            h2 = low_rank(x_rows, second.rows(per_mlp), 0, factors=leaves[2:]) if second is not None else None
            est = estimate(*low_rank(x_rows, first.rows(per_mlp), 0, factors=leaves[:2]), activation, h2)
            loss = ((est.abs() - target[per_mlp]).square().mean((-2, -1)) / scale).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        for fs, name, leaf in pairs:
            state = optimizer.state[leaf]
            for i, f in enumerate(fs):
                getattr(f, name).copy_(leaf[i])
                f.optimizer.state[getattr(f, name)] = {"step": state["step"].clone(),
                                                       **{k: state[k][i].clone() for k in _MOMENTS}}
    for f in (job[4] for job in jobs):
        f.calls += 1
    counters["lecompile"]["learned_train_calls"] += len(jobs)
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
