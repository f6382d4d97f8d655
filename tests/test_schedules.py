"""Sparsity schedules: per-layer MLP densities and the dense warm-up."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import lecompile
from lecompile import LongExposureConfig

from models import FFN, batch, tiny_model

SPARSE = dict(mlp_density=0.5, k_align=64, predictor="oracle")


def steps(model, backend, n, seed=1):
    """Losses of ``n`` SGD steps of ``model`` compiled with ``backend``."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for i in range(n):
        loss = compiled(**batch(seed + i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_layer_densities_set_k_per_layer():
    model = tiny_model("llama", "lora")
    report = lecompile.explain(model, **batch(), config=LongExposureConfig(**SPARSE, mlp_layer_densities=(1.0,)))
    by_layer = {e.layer: e for e in report.mlp}
    assert by_layer["model.layers.0.mlp"].k == FFN and not by_layer["model.layers.0.mlp"].rewritten
    assert by_layer["model.layers.1.mlp"].k == FFN // 2 and by_layer["model.layers.1.mlp"].rewritten


def test_layer_densities_from_environment_and_validation(monkeypatch):
    monkeypatch.setenv("LECOMPILE_MLP_LAYER_DENSITIES", "1.0, 0.5,0.25")
    assert LongExposureConfig.from_env().mlp_layer_densities == (1.0, 0.5, 0.25)
    assert LongExposureConfig(mlp_layer_densities=(1.0,)).mlp_density_of(3) == 0.5
    with pytest.raises(ValueError, match=r"mlp_layer_densities\[1\] must be in \(0, 1\]"):
        LongExposureConfig(mlp_layer_densities=(1.0, 0.0))
    with pytest.raises(ValueError, match="must be a tuple"):
        LongExposureConfig(mlp_layer_densities=[0.5])
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
        LongExposureConfig(warmup_steps=-1)


def test_dense_warmup_then_one_sparse_compile():
    warm, dense = tiny_model("llama", "lora"), tiny_model("llama", "lora")
    dense_losses = steps(dense, lecompile.longexposure(LongExposureConfig(mlp_density=1.0)), 2)

    torch._dynamo.reset()
    counters.clear()
    backend = lecompile.longexposure(LongExposureConfig(**SPARSE, warmup_steps=2))
    compiled = torch.compile(warm, backend=backend)
    opt = torch.optim.SGD([p for p in warm.parameters() if p.requires_grad], lr=0.5)
    losses, sparse_calls = [], []
    for i in range(3):
        if i == 2:
            after_warmup = copy.deepcopy(warm)
        loss = compiled(**batch(1 + i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        sparse_calls.append(counters["lecompile"]["sparse_mlp_calls"])
    assert sparse_calls[:2] == [0, 0] and sparse_calls[2] > 0, sparse_calls
    assert losses[:2] == pytest.approx(dense_losses, abs=1e-5), "warm-up steps are not the dense steps"
    assert len(backend.reports) == 2, "one dense graph, then exactly one sparse graph"
    assert [e.rewritten for e in backend.reports[1].mlp] == [True, True]
    # The first sparse step equals a model compiled sparse from the start with the same weights.
    sparse_loss = steps(after_warmup, lecompile.longexposure(LongExposureConfig(**SPARSE)), 1, seed=3)
    assert losses[2] == pytest.approx(sparse_loss[0], abs=1e-5)
