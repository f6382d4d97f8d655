"""The density guard: per-layer MLP densities from the activation mass the predictor keeps,
raised where it is below the target, lowered where there is room, with no recompile per step;
under a loss budget, the mass target and a sparse attention's density follow the sparse loss."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import lecompile
from lecompile import LongExposureConfig
from lecompile.guard import FIRST_MASS_TARGET, MASS_TARGETS, DensityGuard, LossShadow, candidates, kept_mass
from lecompile.predictors import clear_learned

from models import LAYERS, VOCAB, batch, tiny_model


def test_kept_mass_is_the_share_of_exact_mass_the_predicted_neurons_hold():
    exact = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert kept_mass(exact, exact, 2) == pytest.approx(0.7)
    assert kept_mass(-exact, exact, 2) == pytest.approx(0.3)  # the predictor picks the two smallest
    assert kept_mass(exact, exact, 4) == 1.0


def mass_profile(ffn, head):
    """Exact mass per neuron: ``head`` of it on the first quarter of the neurons."""
    mass = torch.full((1, ffn), (1 - head) / (ffn - ffn // 4) * 100)
    mass[0, : ffn // 4] = head / (ffn // 4) * 100
    return mass


def compiled_run(config: LongExposureConfig, steps: int, inputs=None):
    """Train a tiny LLaMA through the backend under ``config`` for ``steps`` SGD steps on one
    batch (the guard measures the same thing each time), from a fresh calibration schedule; the
    backend."""
    clear_learned()  # and the calibration schedule
    counters.clear()
    torch._dynamo.reset()
    model = tiny_model("llama", "lora")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    backend = lecompile.longexposure(config)
    compiled = torch.compile(model, backend=backend)
    for _ in range(steps):
        loss = compiled(**(inputs or batch(1))).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)
    return backend


def test_guard_raises_a_layer_below_the_target_and_lowers_it_when_there_is_room(caplog):
    guard = DensityGuard(min_kept_mass=0.9, k_align=1)
    caplog.set_level(logging.INFO, logger="lecompile")
    spread = mass_profile(64, head=0.5)  # at 0.25 the best 16 neurons hold half the mass
    guard.measure(layer=1, density=0.25, scores=spread, exact=spread)
    assert guard.update()
    assert guard.densities[1] > 0.25 and "layer 1: MLP density 0.25 ->" in caplog.text
    raised = guard.densities[1]
    peaked = mass_profile(64, head=0.95)  # the adapters moved: the first quarter holds 95%
    guard.measure(layer=1, density=0.25, scores=peaked, exact=peaked)
    assert guard.update() and guard.densities[1] == 0.25
    assert guard.changes == [c for c in guard.changes if c.startswith("layer 1")] and len(guard.changes) == 2
    assert f"{raised:g} -> 0.25" in guard.changes[-1]
    guard.measure(layer=1, density=0.25, scores=peaked, exact=peaked)
    assert not guard.update()  # nothing moved: nothing logged, nothing to recompile
    assert guard.layer_densities(lambda i: 0.25) == ()  # every layer at its set density
    assert candidates(0.3) == (0.3, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def test_guard_in_a_compiled_run_recompiles_once_per_new_densities_never_per_step():
    backend = compiled_run(LongExposureConfig.create(mlp_density=0.25, k_align=16, min_kept_mass=0.9,
                                                     calibrate_every=3), steps=7)
    calls = counters["lecompile"]
    # steps 0, 3, 6 calibrate: 0 trains dense, 3 and 6 record in a dense forward and train sparse
    assert (calls["dense_graph_calls"], calls["shadow_graph_calls"], calls["sparse_graph_calls"]) == (1, 2, 6)
    assert counters["lecompile"]["guard_recompiles"] == 1, backend.report.guard
    report = backend.report
    assert len(report.guard) == LAYERS and all("-> " in c for c in report.guard)
    latest = backend.reports[-1].mlp  # the sparse form compiled for the guard's densities
    assert [e.density for e in latest] == [backend.guard.densities[i] for i in range(LAYERS)]
    assert all(d > 0.25 for d in backend.guard.densities.values())
    assert "density guard: layer 0" in str(report)


def test_a_loss_over_budget_raises_the_mass_target_and_one_well_under_lowers_it(caplog):
    caplog.set_level(logging.INFO, logger="lecompile")
    guard = DensityGuard(min_kept_mass=0.0, k_align=1, loss_budget=0.01)
    assert guard.min_kept_mass == FIRST_MASS_TARGET
    guard.record_losses(torch.tensor(2.05), torch.tensor(2.0))  # +2.5%
    guard.update()
    assert guard.min_kept_mass == MASS_TARGETS[MASS_TARGETS.index(FIRST_MASS_TARGET) + 1]
    assert "min_kept_mass 0.99 -> 0.995 (the sparse loss was +2.50%" in caplog.text
    guard.record_losses(torch.tensor(2.015), torch.tensor(2.0))  # +0.75%: within the budget, not under half
    guard.update()
    assert guard.min_kept_mass == 0.995 and len(guard.changes) == 1
    guard.record_losses(torch.tensor(2.001), torch.tensor(2.0))
    guard.update()
    assert guard.min_kept_mass == 0.995, "0.99 went over the budget: it is not tried again"
    guard.record_losses(torch.tensor(2.1), torch.tensor(2.0))
    guard.update()
    assert guard.min_kept_mass == 0.999
    spread = mass_profile(64, head=0.5)  # the target is what the layers are then held to
    guard.measure(layer=0, density=0.25, scores=spread, exact=spread)
    guard.record_losses(torch.tensor(2.001), torch.tensor(2.0))
    guard.update()
    assert guard.min_kept_mass == 0.999 and guard.densities[0] == 1.0 and len(guard.changes) == 3


@pytest.mark.parametrize("budget", [1e-6, 0.9])
def test_loss_budget_in_a_compiled_run_shadows_calibration_steps_and_moves_the_target(budget):
    backend = compiled_run(LongExposureConfig.create(mlp_density=0.25, k_align=16, loss_budget=budget,
                                                     calibrate_every=2), steps=5)
    calls = counters["lecompile"]
    assert calls["dense_graph_calls"] == 1 and calls["shadow_graph_calls"] == 2  # steps 0; 2, 4
    assert calls["sparse_graph_calls"] == 4  # the shadowed steps train sparse
    targets = [c for c in backend.report.guard if c.startswith("min_kept_mass")]
    assert len(targets) == (1 if budget < 0.01 else 2)  # a target over the budget is not tried again
    assert (backend.guard.min_kept_mass > FIRST_MASS_TARGET) == (budget < 0.01), targets
    assert calls["guard_recompiles"] <= 2


def test_a_guard_with_nothing_sparse_to_move_is_refused_by_name():
    with pytest.raises(ValueError, match="min_kept_mass=0.9.*set mlp_density below 1"):
        LongExposureConfig.create(min_kept_mass=0.9, attn_density=0.5)  # the mass target is the MLPs'
    with pytest.raises(ValueError, match="loss_budget=0.01.*set mlp_density or attn_density below 1"):
        LongExposureConfig.create(loss_budget=0.01)
    config = LongExposureConfig.create(attn_density=0.5, loss_budget=0.01)
    assert config.calibrated and not config.sparse_mlp


def test_a_loss_over_budget_raises_the_attention_density_and_one_well_under_lowers_it(caplog):
    caplog.set_level(logging.INFO, logger="lecompile")
    guard = DensityGuard(min_kept_mass=0.0, k_align=1, loss_budget=0.01, sparse_mlp=False, attn_density=0.25)
    assert guard.min_kept_mass == 0.0 and guard.form(lambda i: 1.0) == ()
    guard.record_losses(torch.tensor(2.05), torch.tensor(2.0))  # +2.5%
    guard.update()
    assert guard.attn_density == 0.375 and guard.min_kept_mass == 0.0  # no sparse MLP: no mass target
    assert guard.changes == ["attention density 0.25 -> 0.375 (the sparse loss was +2.50% of the dense one on "
                             "this batch; loss_budget=0.01)"]
    assert "lecompile guard: attention density 0.25 -> 0.375" in caplog.text
    assert guard.form(lambda i: 1.0) == ((), 0.375)
    guard.record_losses(torch.tensor(2.03), torch.tensor(2.0))
    guard.update()
    assert guard.attn_density == 0.5
    guard.record_losses(torch.tensor(2.001), torch.tensor(2.0))  # +0.05%: room, but 0.375 went over the budget
    guard.update()
    assert guard.attn_density == 0.5 and len(guard.changes) == 2
    for _ in range(6):
        guard.record_losses(torch.tensor(2.5), torch.tensor(2.0))
        guard.update()
    assert guard.attn_density == 1.0 and guard.form(lambda i: 1.0) == ((), 1.0)


def test_with_sparse_mlps_and_attention_a_loss_moves_both():
    guard = DensityGuard(min_kept_mass=0.0, k_align=1, loss_budget=0.01, attn_density=0.5)
    guard.record_losses(torch.tensor(2.1), torch.tensor(2.0))
    guard.update()
    assert (guard.min_kept_mass, guard.attn_density) == (0.995, 0.625)
    assert [c.split(" (")[0] for c in guard.changes] == ["min_kept_mass 0.99 -> 0.995",
                                                         "attention density 0.5 -> 0.625"]
    assert guard.form(lambda i: 0.25) == ((), 0.625)


def test_the_attention_density_never_falls_below_the_set_one():
    guard = DensityGuard(min_kept_mass=0.0, k_align=1, loss_budget=0.02, sparse_mlp=False, attn_density=0.3)
    guard.record_losses(torch.tensor(2.1), torch.tensor(2.0))
    guard.update()
    assert guard.attn_density == 0.375
    guard.attn_over_budget.clear()  # as if 0.3 had never gone over: room moves it back, and no further
    for _ in range(3):
        guard.record_losses(torch.tensor(1.9), torch.tensor(2.0))
        guard.update()
    assert guard.attn_density == 0.3 and guard.form(lambda i: 1.0) == ()


def test_loss_budget_moves_a_compiled_run_s_attention_density_with_one_recompile_per_density(monkeypatch):
    """Wiring: each calibration step's losses reach the guard, whose attention density the next
    sparse form is compiled with. The losses are made to exceed the budget (on a random tiny
    model sparse attention's cost has no fixed sign; the test above covers both directions)."""
    monkeypatch.setattr(LossShadow, "record", lambda self, sparse, dense: self.guard.record_losses(
        dense[self.index] * 1.5, dense[self.index]))
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))  # 4 blocks of 16 a row
    # 6 steps: 0 trains dense; 2 and 4 shadow (the guard moves after each); 3 and 5 compile a form
    backend = compiled_run(LongExposureConfig.create(attn_density=0.25, attn_block=16, loss_budget=0.01,
                                                     calibrate_every=2), steps=6,
                           inputs=dict(input_ids=ids, labels=ids, use_cache=False))
    calls = counters["lecompile"]
    assert (calls["dense_graph_calls"], calls["shadow_graph_calls"], calls["sparse_graph_calls"]) == (1, 2, 5)
    assert backend.guard.attn_density == 0.5 and calls["guard_recompiles"] == 2, backend.report.guard
    assert [c.split(" (")[0] for c in backend.report.guard] == ["attention density 0.25 -> 0.375",
                                                                "attention density 0.375 -> 0.5"]
    latest = backend.reports[-1].attention  # the sparse form compiled for the guard's last density
    assert len(latest) == LAYERS and all(e.rewritten and e.density == 0.5 for e in latest)
