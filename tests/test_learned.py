"""The learned predictor: trained on the exposer's labels it beats the SVD estimate on data
the SVD cannot see, keeps its state outside the model, and runs inside a compiled step."""

import pytest
import torch
from test_ops import make_mlp
from torch._dynamo.utils import counters

import lecompile
from lecompile import LongExposureConfig
from lecompile.predictors import clear_svd_cache
from lecompile.predictors.learned import clear_learned, learned_factors, learned_group_scores, train_pending
from lecompile.predictors.op import recall
from lecompile.predictors.oracle import oracle_group_scores
from lecompile.predictors.svd import svd_group_scores

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
    learned_group_scores(train, fc1, up, activation, RANK, 16, train_steps=300, refresh=0)
    assert counters["lecompile"]["learned_train_calls"] == 0  # scoring never trains
    assert train_pending() == 1
    assert counters["lecompile"]["learned_train_calls"] == 1 and counters["lecompile"]["learned_train_ms"] > 0
    exact = oracle_group_scores(test, fc1, up, activation, 0, 16)
    f1 = learned_factors(fc1.weight, RANK)
    f1.calls = 10  # past the initial training calls: score only
    learned = learned_group_scores(test, fc1, up, activation, RANK, 16, train_steps=300, refresh=0)
    svd = svd_group_scores(test, fc1, up, activation, RANK, 16)
    r_learned, r_svd = recall(learned, exact, 128), recall(svd, exact, 128)
    assert r_learned > r_svd + 0.05, (r_learned, r_svd)
    assert recall(exact, exact, 128) == pytest.approx(1.0)


def test_learned_schedule_trains_first_calls_then_every_refresh():
    clear_learned()
    fc1, _, _ = make_mlp(16, 128, torch.float32, False, "none")
    x = torch.randn(64, 16)
    counters.clear()
    for _ in range(7):
        learned_group_scores(x, fc1, None, "relu", RANK, 16, train_steps=1, refresh=5)
        train_pending()  # what each optimizer step does
    assert counters["lecompile"]["learned_train_calls"] == 4  # calls 0, 1, 2 and 5


def test_learned_predictor_trains_after_the_optimizer_step_outside_the_model():
    """The predictor op only scores; the training it asks for runs in the optimizer's post-step
    hook, outside the compiled step, and changes the factors the next step scores with."""
    clear_learned()
    model = tiny_model("llama", "lora")
    n_params = len(list(model.parameters()))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    counters.clear()
    torch._dynamo.reset()
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=0.5, k_align=64, predictor="learned",
                                                               learned_train_steps=3))
    loss = torch.compile(model, backend=backend)(**batch()).loss
    loss.backward()
    assert torch.isfinite(loss) and backend.report.mlp_rewritten == 2
    assert counters["lecompile"]["learned_train_calls"] == 0  # nothing trained inside the step
    factors = [f.p.detach().clone() for f in learned_factors.values()]
    opt.step()
    assert counters["lecompile"]["learned_train_calls"] == 2  # one per MLP, after the step
    assert any(not torch.equal(f.p, before) for f, before in zip(learned_factors.values(), factors))
    assert len(list(model.parameters())) == n_params
    assert not any(p.grad is None for p in model.parameters() if p.requires_grad)


def test_learned_with_cudagraphs_is_refused():
    with pytest.raises(ValueError, match="cudagraphs=False or predictor='svd'"):
        LongExposureConfig(predictor="learned", cudagraphs=True)


@pytest.mark.slow
def test_a_resumed_run_goes_on_exactly_with_the_saved_predictor():
    config = LongExposureConfig.create(mlp_density=0.5, k_align=64, predictor="learned", learned_train_steps=3,
                                       learned_refresh=2)

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
