"""The SparseLoRA-style eager baseline (``benchmarks.sparselora``) against dense and masked models."""

import pytest
import torch

from benchmarks import e2e
from benchmarks.sparselora import SlicedOutput, mlp_blocks, sparsify_mlps

TINY = ["tiny-opt", "tiny-gpt2", "tiny-llama"]


def _model(name, method="lora"):
    model = e2e.build(e2e.Case(name, method, 2, 32), e2e.Variant("eager", "eager"), "cpu", dtype=torch.float32)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # PEFT starts B at zero, which would hide B's slicing from the forward
            p.data.normal_(0, 0.05)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    # the sliced model's names have the wrapper's ".linear" in them
    return loss.detach(), {n.replace(".linear.", "."): p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def _ids():
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))


def mask_to_kept(dense, kept):
    """Zero every MLP intermediate of ``dense`` outside the neurons the sliced model kept."""
    for block, k in zip(mlp_blocks(dense, dense.config.model_type), kept):
        mask = torch.zeros(256).index_fill_(0, k.idx, 1.0)
        block.layer.get_submodule(block.output).register_forward_pre_hook(lambda m, args, mask=mask: args[0] * mask)


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", TINY)
def test_density_one_matches_the_dense_model(name):
    dense, sliced = _model(name), _model(name)
    kept = sparsify_mlps(sliced, sliced.config.model_type, 1.0)
    ids = _ids()
    _assert_same(_loss_and_grads(sliced, ids), _loss_and_grads(dense, ids))
    assert all(k.idx.numel() == 256 for k in kept)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_sparse_mlps_match_the_masked_dense_model(name, method):
    if name == "tiny-llama" and method == "bitfit":
        pytest.skip("LLaMA has no biases")
    dense, sliced = _model(name, method), _model(name, method)
    kept = sparsify_mlps(sliced, sliced.config.model_type, 0.5)
    ids = _ids()
    got = _loss_and_grads(sliced, ids)
    assert all(k.idx.numel() == 128 for k in kept)
    mask_to_kept(dense, kept)
    _assert_same(got, _loss_and_grads(dense, ids))


def test_lora_bias_is_sliced_and_dora_is_refused():
    import peft
    from transformers import AutoModelForCausalLM

    def tiny(**lora):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(e2e.MODELS["tiny-llama"]())
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", **lora))
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.05)
        return model

    dense, sliced = tiny(lora_bias=True), tiny(lora_bias=True)
    kept = sparsify_mlps(sliced, "llama", 0.5)
    ids = _ids()
    got = _loss_and_grads(sliced, ids)
    mask_to_kept(dense, kept)
    _assert_same(got, _loss_and_grads(dense, ids))
    with pytest.raises(ValueError, match="do not implement DoRA"):
        sparsify_mlps(tiny(use_dora=True), "llama", 0.5)


def test_the_scored_neurons_are_the_svd_estimates_top_k():
    from lecompile.predictors.svd import svd_factors
    model = _model("tiny-opt")
    kept = sparsify_mlps(model, "opt", 0.5, rank=8)
    ids = _ids()
    seen = {}
    block = next(mlp_blocks(model, "opt"))
    block.layer.fc1.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model(input_ids=ids)
    p, q = svd_factors(block.layer.fc1.linear.base_layer.weight, 8)
    scores = torch.relu(seen["x"].reshape(-1, 64) @ p @ q.t()).abs().sum(0)
    assert set(kept[0].idx.tolist()) == set(scores.topk(128).indices.tolist())


def test_bad_density_and_unknown_architecture_are_named():
    model = _model("tiny-opt")
    with pytest.raises(ValueError, match="density must be in"):
        sparsify_mlps(model, "opt", 0.0)
    with pytest.raises(ValueError, match="no MLP layout for model type 'bert'"):
        sparsify_mlps(model, "bert", 0.5)
    with pytest.raises(ValueError, match="support LoRA and plain linears"):
        sparsify_mlps(_model("tiny-opt", "ia3"), "opt", 0.5)


@pytest.mark.slow
def test_the_benchmark_variant_slices_every_mlp():
    case = e2e.Case("tiny-opt", "lora", 2, 32)
    chosen = [v for v in e2e.variants(densities=(1.0, 0.5)) if v.name in ("eager", "sparselora-d0.5",
                                                                          "lecompile-d0.5")]
    rows = e2e.run_case(case, chosen, "cpu", steps=1, warmup=0)
    by = {r["variant"]: r for r in rows}
    assert by["sparselora-d0.5"]["mlp_rewritten"] == 2 and by["sparselora-d0.5"]["mlp_density"] == 0.5
    assert by["lecompile-d0.5"]["speedup_vs_sparselora"] == pytest.approx(
        by["sparselora-d0.5"]["ms"] / by["lecompile-d0.5"]["ms"], rel=1e-2)
    assert sum(isinstance(m, SlicedOutput) for m in e2e.build(case, chosen[1], "cpu").modules()) == 2
