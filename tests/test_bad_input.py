"""What users get wrong or try first: each case either works or says what to do."""

import peft
import pytest
import torch

import lecompile
from lecompile import LongExposureConfig

from models import ARCHS, LAYERS, batch, tiny_model, train_step

SPARSE = LongExposureConfig.create(mlp_density=0.5, k_align=64, predictor="oracle")


def llama():
    torch.manual_seed(0)
    return ARCHS["llama"][0]().train()


def compiled(model, config=SPARSE, **compile_kwargs):
    torch._dynamo.reset()
    backend = lecompile.longexposure(config)
    loss, grads = train_step(torch.compile(model, backend=backend, **compile_kwargs), model, batch())
    return loss, grads, backend.report


def assert_dense_and_same_as_eager(model, report_reason, **compile_kwargs):
    eager_loss, eager_grads = train_step(model, model, batch())
    loss, grads, report = compiled(model, **compile_kwargs)
    assert report.mlp_rewritten == 0
    assert any(report_reason in u.reason for u in report.unmatched), str(report)
    torch.testing.assert_close(loss, eager_loss, atol=2e-5, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["dora", "loha"])
def test_unsupported_peft_wrappers_run_dense_and_are_named(wrapper):
    targets = ["gate_proj", "up_proj", "down_proj"]
    config = (peft.LoraConfig(r=4, target_modules=targets, use_dora=True, init_lora_weights=False)
              if wrapper == "dora" else peft.LoHaConfig(r=4, target_modules=targets, init_weights=False))
    assert_dense_and_same_as_eager(peft.get_peft_model(llama(), config), "unsupported PEFT wrapper")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["lora_bias", "two adapters"])
def test_lora_variants_not_folded_run_dense_and_are_named(case):
    targets = ["gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=4, target_modules=targets, lora_bias=case == "lora_bias", init_lora_weights=False)
    model = peft.get_peft_model(llama(), config)
    if case == "two adapters":
        model.add_adapter("second", peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
        model.base_model.set_adapter(["default", "second"])
    assert_dense_and_same_as_eager(model, "lora_bias=True or a second active LoRA adapter")


@pytest.mark.slow
def test_dynamic_shapes_are_reported_and_warned():
    with pytest.warns(UserWarning, match=r"dynamic shapes .* torch.compile\(\.\.\., dynamic=False\)"):
        assert_dense_and_same_as_eager(tiny_model("llama", "lora"), "dynamic shapes", dynamic=True)


@pytest.mark.slow
def test_new_batch_shapes_stay_sparse_with_dynamic_false(recwarn):
    """Each new sequence length compiles its own static sparse graph; the old one is reused."""
    model = tiny_model("llama", "lora")
    torch._dynamo.reset()
    backend = lecompile.longexposure(SPARSE)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    for seq in (16, 32, 16):
        ids = batch()["input_ids"].repeat(1, seq // 16)
        compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert len(backend.reports) == 2 and backend.report.mlp_rewritten == 2 * LAYERS
    assert not [w for w in recwarn if "lecompile" in str(w.message)]


@pytest.mark.slow
def test_prompt_tuning_trains_with_the_rewrite():
    model = peft.get_peft_model(llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    loss, grads, report = compiled(model)
    assert report.mlp_rewritten == LAYERS and torch.isfinite(loss)
    assert [n for n in grads] == ["prompt_encoder.default.embedding.weight"]


@pytest.mark.slow
def test_compile_modes_reach_inductor():
    model = tiny_model("llama", "lora")
    loss, _, report = compiled(model, mode="max-autotune-no-cudagraphs")
    assert report.mlp_rewritten == LAYERS and torch.isfinite(loss)
    with pytest.raises(Exception, match="mode must be one of"):
        compiled(model, mode="fastest")


def test_model_with_nothing_to_match_compiles_as_inductor():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    x = torch.randn(4, 8)
    torch._dynamo.reset()
    backend = lecompile.longexposure(SPARSE)
    torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x))
    assert backend.report.mlp == [] and backend.report.attention == []


def test_block_with_weights_on_two_devices_is_left_dense_and_reported():
    """A model spread over devices: a block whose input and weights disagree runs dense. No second
    device here, so the graph is told that each ``down_proj`` weight lives on ``meta``."""
    torch._dynamo.reset()
    backend = lecompile.longexposure(SPARSE)

    def down_proj_on_meta(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if node.op == "placeholder" and "down_proj" in node.name and node.name.endswith("weight_"):
                node.meta["example_value"] = torch.empty(value.shape, dtype=value.dtype, device="meta")
        return backend(gm, example_inputs)

    model = tiny_model("llama", "lora")
    train_step(torch.compile(model, backend=down_proj_on_meta), model, batch())
    report = backend.report
    assert len(report.mlp) == LAYERS and report.mlp_rewritten == 0, str(report)
    assert all("different devices (cpu, meta)" in e.note for e in report.mlp), str(report)


def test_evaluation_mode_runs_as_written_with_grad_enabled():
    """A validation pass without ``torch.no_grad()``: ``model.eval()`` alone keeps it dense."""
    model = tiny_model("llama", "lora").eval()
    expected = model(**batch()).logits
    torch._dynamo.reset()
    backend = lecompile.longexposure(SPARSE)
    logits = torch.compile(model, backend=backend)(**batch()).logits
    report = backend.report
    assert len(report.mlp) == LAYERS and report.mlp_rewritten == 0 and report.linears_fused == 0
    assert all("evaluation mode (model.eval())" in e.note for e in report.mlp), str(report)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
    model.train()  # and training mode, on the same backend, is sparse again
    torch.compile(model, backend=backend)(**batch()).loss.backward()
    assert backend.report.mlp_rewritten == LAYERS


def test_explain_on_a_model_that_adds_into_the_mlp_output_in_place():
    """Falcon's parallel block adds the attention output into the MLP's output in place."""
    import transformers

    from models import FFN, HEADS, HIDDEN, VOCAB
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        ffn_hidden_size=FFN, new_decoder_architecture=False, parallel_attn=True, bias=False)).train()
    report = lecompile.explain(model, **batch(), config=SPARSE)
    assert report.mlp_rewritten == LAYERS, str(report)
