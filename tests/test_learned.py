"""The learned predictor: trained on the exposer's labels it beats the SVD estimate on data
the SVD cannot see, keeps its state outside the model, and runs inside a compiled step."""

import dataclasses

import pytest
import torch
from test_ops import make_mlp
from torch._dynamo.utils import counters

import lecompile
from lecompile import LongExposureConfig, calibration
from lecompile.predictors import clear_svd_cache, learned
from lecompile.predictors.learned import (
    clear_learned,
    learned_factors,
    learned_group_scores,
    observe,
    train_pending,
)
from lecompile.predictors.op import recall
from lecompile.predictors.oracle import oracle_group_scores
from lecompile.predictors.svd import svd_factors, svd_group_scores

from models import batch, tiny_model

RANK = 4


def subspace_tokens(d, n, seed):
    """Tokens on a ``RANK``-dimensional subspace: a data distribution the SVD of the weight ignores."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(RANK, d, generator=torch.Generator().manual_seed(0))
    return torch.randn(n, RANK, generator=g) @ basis


@pytest.mark.parametrize("activation,gated", [("relu", False), ("silu", True)])
def test_learned_recall_beats_svd_on_held_out_tokens(activation, gated):
    clear_learned()
    clear_svd_cache()
    fc1, up, _ = make_mlp(64, 512, torch.float32, gated, "lora")
    train, test = subspace_tokens(64, 512, 1), subspace_tokens(64, 256, 2)
    counters.clear()
    observe(train, fc1, up, activation, RANK, train_steps=300)
    assert counters["lecompile"]["learned_train_calls"] == 0  # recording never trains
    assert train_pending() == 1
    assert counters["lecompile"]["learned_train_calls"] == 1 and counters["lecompile"]["learned_train_ms"] > 0
    exact = oracle_group_scores(test, fc1, up, activation, 0, 16)
    learned = learned_group_scores(test, fc1, up, activation, RANK, 16)
    svd = svd_group_scores(test, fc1, up, activation, RANK, 16)
    r_learned, r_svd = recall(learned, exact, 128), recall(svd, exact, 128)
    assert r_learned > r_svd + 0.05, (r_learned, r_svd)
    assert recall(exact, exact, 128) == pytest.approx(1.0)


@pytest.mark.parametrize("activation,gated,adapters", [("relu", False, "lora"), ("silu", True, "lora-dropout"),
                                                       ("gelu", False, "ia3")])
def test_mlps_of_one_shape_train_together_as_each_alone(activation, gated, adapters, monkeypatch):
    """Three MLPs trained as one batch (stacked tensors) end with the factors and Adam state each
    gets trained alone, over two calibrations (the second resumes each one's Adam state).
    ``lora-dropout``: LoRA's A reads its own input (dropout applied), drawn with the same rows."""
    real_train, batch_sizes = learned._train, []

    def spy(jobs):
        batch_sizes.append(len(jobs))
        real_train(jobs)

    monkeypatch.setattr(learned, "_train", spy)

    def train(batch_bytes):
        monkeypatch.setattr(learned, "TRAIN_BATCH_BYTES", batch_bytes)
        batch_sizes.clear()
        clear_learned()
        mlps = [make_mlp(32, 256, torch.float32, gated, adapters.split("-")[0], seed=seed) for seed in range(3)]
        counters.clear()
        for calibration_step in range(2):
            for i, (fc1, up, _) in enumerate(mlps):
                g = torch.Generator().manual_seed(10 * calibration_step + i)
                x = torch.randn(192, 32, generator=g)
                if adapters == "lora-dropout":
                    dropped = x * (torch.rand(x.shape, generator=g) > 0.1) / 0.9
                    fc1, up = (dataclasses.replace(lin, lora_input=dropped) for lin in (fc1, up))
                observe(x, fc1, up, activation, RANK, train_steps=5)
            assert train_pending() == 3
        assert counters["lecompile"]["learned_train_calls"] == 6
        assert batch_sizes == ([3, 3] if batch_bytes else [1] * 6)
        trained = [learned_factors(lin.weight, RANK) for fc1, up, _ in mlps for lin in (fc1, up) if lin is not None]
        return [(f.calls, [t.detach().clone() for t in (f.p, f.q)],
                 [{k: v.clone() for k, v in f.optimizer.state[t].items()} for t in (f.p, f.q)]) for f in trained]

    batched, alone = train({"cpu": 1 << 30}), train({})
    untrained = svd_factors(make_mlp(32, 256, torch.float32, gated, "none", seed=0)[0].weight, RANK)
    assert not torch.allclose(batched[0][1][0], untrained[0].float()), "no training happened: the test cannot fail"
    for (calls, factors, states), (calls_alone, factors_alone, states_alone) in zip(batched, alone):
        assert calls == calls_alone
        for t, t_alone in zip(factors, factors_alone):
            torch.testing.assert_close(t, t_alone, rtol=1e-5, atol=1e-6)
        for state, state_alone in zip(states, states_alone):
            assert state.keys() == state_alone.keys() and float(state["step"]) == float(state_alone["step"]) == 10
            for k in learned._MOMENTS:
                torch.testing.assert_close(state[k], state_alone[k], rtol=1e-4, atol=1e-8)


def test_calibration_is_due_first_then_once_every_calibrate_every_steps():
    clear_learned()
    fc1, _, _ = make_mlp(16, 128, torch.float32, False, "none")
    assert calibration.due(every=4)  # nothing calibrated yet
    learned_group_scores(torch.randn(64, 16), fc1, None, "relu", RANK, 16)
    assert calibration.due(every=4)  # scoring alone calibrates nothing
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    calibrated = []
    for _ in range(9):  # a step (recording when due), then the optimizer's post-step hook
        due = calibration.due(every=4)
        if due:
            observe(torch.randn(64, 16), fc1, None, "relu", RANK, train_steps=1)
        opt.step()
        calibrated.append(due)
    assert calibrated == [True, False, False, False] * 2 + [True]
    assert learned_factors(fc1.weight, RANK).calls == 3
    assert not calibration.due(every=0)  # calibrated once: never again


def _compile_patches(monkeypatch):
    """The Inductor config patches of every graph the backend compiles, in order."""
    import torch._inductor.compile_fx as compile_fx
    seen, real, depth = [], compile_fx.compile_fx, [0]

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        if depth[0] == 0:  # compile_fx calls itself once the patches are applied
            seen.append(dict(config_patches or {}))
        depth[0] += 1
        try:
            return real(gm, example_inputs, config_patches=config_patches, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(compile_fx, "compile_fx", spy)
    return seen


def test_learned_predictor_calibrates_on_dense_steps_and_trains_after_them(monkeypatch):
    """Step 0 runs dense and records each MLP's input; the training runs in the optimizer's
    post-step hook, outside the compiled step; then sparse steps, with one calibration step in
    every ``calibrate_every`` that records in a dense forward and trains sparse. The calibration
    graph is never a CUDA graph."""
    clear_learned()
    model = tiny_model("llama", "lora")
    n_params = len(list(model.parameters()))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    counters.clear()
    torch._dynamo.reset()
    patches = _compile_patches(monkeypatch)
    backend = lecompile.longexposure(LongExposureConfig.create(
        mlp_density=0.5, k_align=64, predictor="learned", learned_train_steps=3, calibrate_every=3, cudagraphs=True))
    compiled = torch.compile(model, backend=backend)
    sparse_calls, trainings = [], []
    for step in range(7):
        calls = counters["lecompile"]["sparse_mlp_calls"]
        loss = compiled(**batch(step)).loss
        loss.backward()
        assert torch.isfinite(loss)
        if step == 0:
            assert counters["lecompile"]["learned_train_calls"] == 0  # nothing trained inside the step
            factors = [f.p.detach().clone() for f in learned_factors.values()]
        opt.step()
        if step == 0:
            assert any(not torch.equal(f.p, before) for f, before in zip(learned_factors.values(), factors))
        sparse_calls.append(counters["lecompile"]["sparse_mlp_calls"] - calls)
        trainings.append(counters["lecompile"]["learned_train_calls"])
    assert [c > 0 for c in sparse_calls] == [False] + [True] * 6
    assert trainings == [2, 2, 2, 4, 4, 4, 6]  # one per MLP after each calibration step
    assert (counters["lecompile"]["dense_graph_calls"], counters["lecompile"]["shadow_graph_calls"]) == (1, 2)
    assert [p.get("triton.cudagraphs", False) for p in patches] == [False, True]  # calibration, sparse
    assert backend.report.mlp_rewritten == 2
    assert len(list(model.parameters())) == n_params
    assert not any(p.grad is None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_a_resumed_run_goes_on_exactly_with_the_saved_predictor():
    config = LongExposureConfig.create(mlp_density=0.5, k_align=64, predictor="learned", learned_train_steps=3,
                                       calibrate_every=2)

    def fresh():  # a new process, as far as lecompile and Dynamo know
        clear_learned()
        torch._dynamo.reset()
        model = tiny_model("llama", "lora")
        return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)

    def steps(model, opt, seeds):
        compiled = torch.compile(model, backend=lecompile.longexposure(config))
        losses = []
        for seed in seeds:
            loss = compiled(**batch(seed)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    model, opt = fresh()
    steps(model, opt, (1, 2))
    checkpoint = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(),
                  lecompile.predictor_state_dict(model))
    assert checkpoint[2], "no learned predictor state was saved"
    uninterrupted = steps(model, opt, (3, 4))
    resumed, without_predictor = [], []
    for out, load_predictor in ((resumed, True), (without_predictor, False)):
        model, opt = fresh()
        model.load_state_dict(checkpoint[0])
        opt.load_state_dict(checkpoint[1])
        if load_predictor:
            lecompile.load_predictor_state_dict(model, checkpoint[2])
        out += steps(model, opt, (3, 4))
    assert resumed == uninterrupted
    assert without_predictor != uninterrupted  # the predictor's state is what the equality needs


def test_both_forms_of_a_switched_graph_know_their_parameters(monkeypatch):
    """The dense and the sparse graph of a warm-up get the same static (parameter) inputs from
    AOTAutograd: a copied graph that lost Dynamo's metadata had none, and a CUDA graph then
    copied every weight at each replay."""
    import torch._inductor.compile_fx as compile_fx
    static, real = [], compile_fx.get_static_input_idxs

    def spy(num_fixed):
        static.append(tuple(real(num_fixed)))
        return static[-1]

    monkeypatch.setattr(compile_fx, "get_static_input_idxs", spy)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # compile both forms, cached or not
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    model = tiny_model("llama", "lora")
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=0.5, k_align=64, warmup_steps=1))
    torch.compile(model, backend=backend)(**batch()).loss.backward()
    assert len(static) == 2 and static[0] and static[0] == static[1], static  # the two forward graphs
