"""Inputs and states users run into, across architectures: each case matches its reference
(eager PEFT, or the same step without the state in question) or raises a clear error."""

import logging

import peft
import pytest
import torch

import lecompile
from lecompile import LongExposureConfig

from models import ARCHS, LAYERS, batch, tiny_model, train_step

SPARSE = LongExposureConfig.create(mlp_density=0.5, k_align=64, predictor="oracle")
EXACT = LongExposureConfig()
TOL = dict(atol=2e-5, rtol=1e-4)


def arch_params(quick="llama"):
    """Every tiny architecture; all but ``quick`` run with the slow tests."""
    return [pytest.param(a, marks=() if a == quick else pytest.mark.slow) for a in ARCHS]


def compiled(model, config):
    torch._dynamo.reset()
    backend = lecompile.longexposure(config)
    return torch.compile(model, backend=backend), backend


@pytest.mark.parametrize("mode", ["eval", "no_grad", "inference_mode"])
@pytest.mark.parametrize("arch", arch_params())
def test_modes_other_than_training_run_as_written(arch, mode):
    model = tiny_model(arch, "lora")
    inputs = batch()
    if mode == "eval":
        model.eval()
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    with context():
        expected = model(**inputs).logits
        fn, backend = compiled(model, SPARSE)
        logits = fn(**inputs).logits
    torch.testing.assert_close(logits, expected, **TOL)
    assert backend.report.mlp_rewritten == 0 and backend.report.linears_fused == 0, str(backend.report)


@pytest.mark.parametrize("state", ["merged", "disabled"])
@pytest.mark.parametrize("arch", arch_params())
def test_merged_or_disabled_adapter_computes_like_eager(arch, state):
    """Nothing trains (the base weights hold the merged LoRA, or the adapter is off): the graph
    runs as written."""
    model = tiny_model(arch, "lora")
    if state == "merged":
        model.merge_adapter()
    with model.disable_adapter() if state == "disabled" else torch.enable_grad():
        expected = model(**batch()).logits
        fn, backend = compiled(model, SPARSE)
        torch.testing.assert_close(fn(**batch()).logits, expected, **TOL)
    assert backend.report.mlp_rewritten == 0


@pytest.mark.parametrize("arch", arch_params())
def test_a_second_adapter_switched_to_trains_like_eager(arch):
    model = tiny_model(arch, "lora")
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=ARCHS[arch][1], init_lora_weights=False))
    model.set_adapter("second")
    inputs = batch()
    want_loss, want_grads = train_step(model, model, inputs)
    fn, backend = compiled(model, EXACT)
    loss, grads = train_step(fn, model, inputs)
    assert grads and all("second" in name for name in grads)
    torch.testing.assert_close(loss, want_loss, **TOL)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], **TOL, msg=name)
    assert len(backend.report.mlp) == LAYERS, str(backend.report)


@pytest.mark.parametrize("arch", arch_params())
def test_padded_batch_trains_like_eager_at_density_one(arch):
    model = tiny_model(arch, "lora")
    inputs = batch()
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, -5:] = 0
    labels = inputs["labels"].masked_fill(mask == 0, -100)
    inputs = {**inputs, "attention_mask": mask, "labels": labels}
    want_loss, want_grads = train_step(model, model, inputs)
    fn, _ = compiled(model, EXACT)
    loss, grads = train_step(fn, model, inputs)
    torch.testing.assert_close(loss, want_loss, **TOL)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], **TOL, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_steps_stay_close_to_eager(dtype):
    model = tiny_model("llama", "lora", dtype=dtype)
    want_loss, want_grads = train_step(model, model, batch())
    fn, backend = compiled(model, EXACT)
    loss, grads = train_step(fn, model, batch())
    assert backend.report.linears_fused > 0
    torch.testing.assert_close(loss.float(), want_loss.float(), atol=2e-2, rtol=2e-2)
    for name in grads:
        torch.testing.assert_close(grads[name].float(), want_grads[name].float(), atol=3e-2, rtol=5e-2, msg=name)


def test_a_rewritten_graph_inductor_cannot_compile_runs_as_plain_inductor(monkeypatch, caplog):
    """Inductor failing on the rewritten graph (a lowering it does not support, say) costs the
    rewrites, not the step: the graph as Dynamo gave it compiles instead, with a warning, and the
    report says which rewrites were undone and why."""
    import torch._inductor.compile_fx as compile_fx_module

    own = compile_fx_module.compile_fx

    def refuse_lecompile_ops(gm, example_inputs, **kwargs):
        if "lecompile" in gm.code:
            raise RuntimeError("no lowering for this op\nmore detail")
        return own(gm, example_inputs, **kwargs)

    model = tiny_model("llama", "lora")
    ref_loss, ref_grads = train_step(torch.compile(model, backend="inductor"), model, batch())
    monkeypatch.setattr(compile_fx_module, "compile_fx", refuse_lecompile_ops)
    torch._dynamo.reset()
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=1.0))
    with caplog.at_level(logging.WARNING, logger="lecompile"):
        loss, grads = train_step(torch.compile(model, backend=backend), model, batch())
    report = backend.report
    why = "Inductor could not compile the rewritten graph (RuntimeError: no lowering for this op): it runs as plain"
    assert report.linears and report.linears_fused == 0 and all(why in e.note for e in report.linears), str(report)
    assert any(why in n for n in report.notes) and why.split(":")[0] in caplog.text
    torch.testing.assert_close(loss, ref_loss, atol=2e-5, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_undone_attention_rewrites_name_no_kernel():
    from lecompile.report import AttentionEntry, Report

    report = Report(attention=[AttentionEntry("layers.0.self_attn", "sdpa", 4, 512, 16, ["q_proj:lora"], 0.5, 64,
                                              rewritten=True, kernel="triton")])
    assert report.attention_kernels == ["triton"]
    report.compiled_plain("InductorError: no lowering")
    assert [(e.rewritten, e.kernel) for e in report.attention] == [(False, "")] and report.attention_kernels == []
