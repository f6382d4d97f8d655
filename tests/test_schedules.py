"""Sparsity schedules: per-layer MLP densities and the dense warm-up."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import lecompile
from lecompile import LongExposureConfig

from models import FFN, batch, needs_opt_one_graph, tiny_model, train_step

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
    report = lecompile.explain(model, **batch(), config=LongExposureConfig.create(**SPARSE, mlp_layer_densities=(1.0,)))
    by_layer = {e.layer: e for e in report.mlp}
    assert by_layer["model.layers.0.mlp"].k == FFN and not by_layer["model.layers.0.mlp"].rewritten
    assert by_layer["model.layers.1.mlp"].k == FFN // 2 and by_layer["model.layers.1.mlp"].rewritten


def test_layer_densities_from_environment_and_validation(monkeypatch):
    monkeypatch.setenv("LECOMPILE_MLP_LAYER_DENSITIES", "1.0, 0.5,0.25")
    assert LongExposureConfig.from_env().mlp_layer_densities == (1.0, 0.5, 0.25)
    assert LongExposureConfig(mlp_density=0.5, mlp_layer_densities=(1.0,)).mlp_density_of(3) == 0.5
    with pytest.raises(ValueError, match=r"mlp_layer_densities\[1\] must be a number in \(0, 1\]"):
        LongExposureConfig(mlp_layer_densities=(1.0, 0.0))
    with pytest.raises(ValueError, match="must be a tuple"):
        LongExposureConfig(mlp_layer_densities=[0.5])
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
        LongExposureConfig(warmup_steps=-1)


def test_warmup_as_a_fraction_of_the_run_and_validation():
    assert LongExposureConfig(warmup_fraction=0.1, total_steps=25).dense_warmup_steps == 3
    assert LongExposureConfig(warmup_steps=4).dense_warmup_steps == 4
    assert LongExposureConfig().dense_warmup_steps == 0
    with pytest.raises(ValueError, match="warmup_fraction=0.1 needs total_steps"):
        LongExposureConfig(warmup_fraction=0.1)
    with pytest.raises(ValueError, match=r"set warmup_steps \(2\) or warmup_fraction \(0.1\), not both"):
        LongExposureConfig(warmup_steps=2, warmup_fraction=0.1, total_steps=10)
    with pytest.raises(ValueError, match=r"warmup_fraction must be a number in \[0, 1\), got 1.0"):
        LongExposureConfig(warmup_fraction=1.0, total_steps=10)
    with pytest.raises(ValueError, match="total_steps must be an integer >= 0"):
        LongExposureConfig(total_steps=-5)


@pytest.mark.slow
@pytest.mark.parametrize("warmup", [dict(warmup_steps=2), dict(warmup_fraction=0.2, total_steps=10)])
def test_dense_warmup_then_one_sparse_compile(warmup):
    warm, dense = tiny_model("llama", "lora"), tiny_model("llama", "lora")
    dense_losses = steps(dense, lecompile.longexposure(LongExposureConfig(mlp_density=1.0)), 2)

    torch._dynamo.reset()
    counters.clear()
    backend = lecompile.longexposure(LongExposureConfig.create(**SPARSE, **warmup))
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
    sparse_loss = steps(after_warmup, lecompile.longexposure(LongExposureConfig.create(**SPARSE)), 1, seed=3)
    assert losses[2] == pytest.approx(sparse_loss[0], abs=1e-5)


FC2 = {"llama": "down_proj", "opt": "fc2"}


def context_only_inputs(tile, device="cpu"):
    """Two sequences of four tiles; the loss reads the last two tiles of each (labels shift by one)."""
    ids = torch.randint(0, 128, (2, 4 * tile), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, : 2 * tile + 1] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device), "use_cache": False}


def context_only_reference(model, arch, inputs, tile, dense_tiles):
    """Loss and gradients of ``model`` with each MLP intermediate kept to the oracle's per-tile
    top half of neurons, except the tiles in ``dense_tiles`` (all neurons)."""
    def mask_tiles(module, args):
        grouped = args[0].reshape(-1, tile, FFN)
        top = grouped.detach().square().sum(1).topk(FFN // 2, dim=-1).indices
        keep = torch.zeros(grouped.shape[0], 1, FFN, device=grouped.device).scatter_(-1, top.unsqueeze(1), 1.0)
        keep[dense_tiles] = 1.0
        return ((grouped * keep).reshape(args[0].shape),) + args[1:]

    handles = [m.register_forward_pre_hook(mask_tiles) for n, m in model.named_modules() if n.endswith(FC2[arch])]
    try:
        return train_step(model, model, inputs)
    finally:
        for h in handles:
            h.remove()


def check_context_only(arch, share, dense_tiles, loss_tol, grad_tol):
    """Compile the tiny model with context-only sparsity over 16-token tiles and compare its loss
    and gradients with the eager model masked the same way; returns the backend."""
    model, tile = tiny_model(arch, "lora"), 16
    inputs = context_only_inputs(tile)
    ref_loss, ref_grads = context_only_reference(model, arch, inputs, tile, dense_tiles)
    torch._dynamo.reset()
    backend = lecompile.longexposure(LongExposureConfig.create(**SPARSE, granularity="tile", tile_size=tile,
                                                        dense_output_share=share))
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    torch.testing.assert_close(loss, ref_loss, **loss_tol)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **grad_tol, msg=name)
    return backend


@pytest.mark.slow
@pytest.mark.parametrize("share,dense_tiles", [(0.5, [2, 3, 6, 7]), (0.25, [2, 3])])
@pytest.mark.parametrize("arch", ["llama", pytest.param("opt", marks=needs_opt_one_graph)])
def test_context_only_runs_output_tiles_dense(arch, share, dense_tiles):
    """Output tokens' tiles (the second half of each sequence) run dense, the others keep the
    oracle's per-tile top-k: loss and gradients match an eager model masked that way."""
    tol = dict(atol=2e-5, rtol=1e-4)
    backend = check_context_only(arch, share, dense_tiles, tol, tol)
    notes = {e.note for e in backend.report.mlp}
    assert all(e.rewritten for e in backend.report.mlp)
    assert notes == {f"context-only: {len(dense_tiles)} of 8 token groups dense, output tokens first"}, notes


@pytest.mark.slow
def test_context_only_through_the_kernel_path_matches_reference_model(monkeypatch):
    """The dense token groups (every neuron kept) take the sparse MLP's kernel path too, its
    GEMMs on cuBLAS; here in Triton's interpreter on CPU tensors (CUDA: test_cuda.py)."""
    import os

    from lecompile.kernels import gather_gemm
    from lecompile.ops import sparse_mlp_kernels
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels on CPU tensors: needs TRITON_INTERPRET=1")
    monkeypatch.setattr(sparse_mlp_kernels, "INTERPRET_ON_CPU", True)
    # The flag changes the op's saved tensors but not Inductor's cache keys: no cache either way.
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)
    every_row = []
    kgather_cublas = gather_gemm._kgather_cublas

    def spy(h, m, idx, *args):
        every_row.append(gather_gemm._keeps_every_row(idx, m))
        return kgather_cublas(h, m, idx, *args)

    monkeypatch.setattr(gather_gemm, "_kgather_cublas", spy)
    check_context_only("llama", 0.5, [2, 3, 6, 7], dict(atol=1e-4, rtol=1e-4), dict(atol=1e-3, rtol=1e-3))
    assert every_row == [True] * 4, "each layer's dense groups: fc2 forward and the input gradient"


def test_context_only_without_labels_is_reported_and_validated():
    model = tiny_model("llama", "lora")
    report = lecompile.explain(model, input_ids=batch()["input_ids"], use_cache=False,
                               config=LongExposureConfig.create(**SPARSE, dense_output_share=0.5))
    assert all(e.rewritten and "context-only sparsity off: no cross-entropy loss" in e.note for e in report.mlp)
    report = lecompile.explain(model, **batch(), config=LongExposureConfig.create(**SPARSE, granularity="batch",
                                                                           dense_output_share=0.5))
    assert all("dense_output_share=0.5 of 1 token group(s) leaves none dense" in e.note for e in report.mlp)
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match=r"dense_output_share must be a number in \[0, 1\)"):
            LongExposureConfig(dense_output_share=bad)


@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
def test_layer_densities_reach_their_layers_without_peft(how):
    """Full fine-tuning, no PEFT wrapper: the module paths, and so the layer indices, are the model's."""
    model = tiny_model("llama", "plain")
    backend = lecompile.longexposure(LongExposureConfig.create(**SPARSE, mlp_layer_densities=(0.25, 1.0)))
    if how == "model.compile":
        model.compile(backend=backend)
        model(**batch())
    else:
        torch.compile(model, backend=backend)(**batch())
    k = {e.layer: e.k for e in backend.report.mlp}
    assert k == {"model.layers.0.mlp": FFN // 4, "model.layers.1.mlp": FFN}, k


def test_more_layer_densities_than_layers_is_an_error():
    model = tiny_model("llama", "lora")
    config = LongExposureConfig.create(**SPARSE, mlp_layer_densities=(1.0, 0.5, 0.5))
    with pytest.raises(Exception, match="mlp_layer_densities has 3 entries, but the model has 2 decoder layers"):
        torch.compile(model, backend=lecompile.longexposure(config))(**batch()).loss.backward()


def _switch_run(monkeypatch, calibrate, steps_done, n=4):
    """Forms called by a :class:`~lecompile.warmup.WarmupSwitch` warming up for 2 optimizer steps,
    each with whether gradients were on, and the optimizer step at each ``torch.cuda.empty_cache``."""
    from lecompile import calibration, warmup
    emptied, calls = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(warmup.optimizer_steps() - start))

    def form(name):
        return lambda x: calls.append((name, torch.is_grad_enabled())) or x

    start = warmup.optimizer_steps()
    switch = warmup.WarmupSwitch(form("dense"), form("sparse"), until=start + 2, calibrate=calibrate)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    calibration.resume(steps_done)
    try:
        for _ in range(n):
            switch(torch.ones(1))
            opt.step()
    finally:
        calibration.reset()
    return calls, emptied


def test_the_switch_to_sparse_hands_the_dense_steps_cached_memory_back(monkeypatch):
    calls, emptied = _switch_run(monkeypatch, calibrate=None, steps_done=None)
    assert calls == [("dense", True), ("dense", True), ("sparse", True), ("sparse", True)]
    assert emptied == [2]  # once, before the first sparse step: a CUDA graph's pool never reuses those blocks


def test_a_calibration_step_after_the_first_records_densely_and_trains_sparse(monkeypatch):
    calls, _ = _switch_run(monkeypatch, calibrate=lambda: True, steps_done=0)
    assert calls[:2] == [("dense", True), ("dense", True)]  # the warm-up trains dense
    assert calls[2:] == [("dense", False), ("sparse", True)] * 2  # a forward without gradients, then the step
    first, _ = _switch_run(monkeypatch, calibrate=lambda: True, steps_done=None, n=1)
    assert first == [("dense", True)]  # no calibration yet: the first trains dense
