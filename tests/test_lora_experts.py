"""LoRA on stacked MoE experts: applied to each expert's tokens, the update B·A never formed
(``lecompile.passes.lora_experts`` and ``lecompile::experts_first``)."""

import pytest
import torch

import lecompile
from lecompile.ops.experts_first import experts_first
from lecompile.passes import run_passes

from models import (
    FP32_MOE_COMPILES,
    batch,
    dynamo_graphs,
    gpt_oss_with_lora_on_experts,
    mixtral_with_lora_on_experts,
    needs_fp32_moe_compile,
    train_step,
)

E, IN, OUT, R, SCALE = 3, 16, 24, 4, 2.0
OFFSETS = torch.tensor([5, 5, 12], dtype=torch.int32)  # the second expert receives no token


def test_experts_first_matches_permute_forward_and_backward():
    b = torch.randn(OUT, R, E, dtype=torch.double, requires_grad=True)
    out = experts_first(b)
    assert out.shape == (E, R, OUT) and out.is_contiguous()
    torch.testing.assert_close(out, b.permute(2, 1, 0))
    torch.autograd.gradcheck(experts_first, (b,))


def test_experts_first_names_a_bad_shape():
    with pytest.raises(ValueError, match=r"\[out, r, experts\], got shape \(4, 4\)"):
        experts_first(torch.randn(4, 4))


def _peft_expert_product(layout: str, transposed: bool, in_place: bool = False):
    """transformers' grouped product with PEFT's update of stacked experts, both orientations;
    ``in_place``: the update scaled in place, as PEFT 0.22 scales it."""
    equation = {"out_in": "o r e, e r i -> e o i", "in_out": "o r e, e r i -> e i o"}[layout]

    def product(x, w, a, b):
        delta = torch.einsum(equation, b.reshape(-1, R, E), a.reshape(E, R, -1))
        if in_place:
            delta.mul_(SCALE)
        else:
            delta = delta * SCALE
        weight = w + delta
        return torch._grouped_mm(x, weight.transpose(-2, -1) if transposed else weight, offs=OFFSETS)

    return product


def _assert_near(got, want, tol=0.02):
    assert (got.float() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("layout, transposed, in_place", [("out_in", True, False), ("in_out", False, False),
                                                          ("in_out", True, False), ("out_in", False, False),
                                                          ("out_in", True, True), ("in_out", False, True)])
def test_grouped_product_with_the_update_equals_it_on_the_tokens(layout, transposed, in_place):
    """In bf16 (the dtype PyTorch's grouped GEMM compiles for), against the fp32 product."""
    torch.manual_seed(0)
    rows, cols = (OUT, IN) if layout == "out_in" else (IN, OUT)
    tensors = [torch.randn(12, cols if transposed else rows), torch.randn(E, rows, cols), torch.randn(E * R, IN),
               torch.randn(OUT, R * E)]
    product = _peft_expert_product(layout, transposed, in_place)
    x, w, a, b = (t.clone().requires_grad_(i != 1) for i, t in enumerate(tensors))
    want = product(x, w, a, b)
    want_grads = torch.autograd.grad(want.square().sum(), (x, a, b))

    x, w, a, b = (t.to(torch.bfloat16).requires_grad_(i != 1) for i, t in enumerate(tensors))
    torch._dynamo.reset()
    backend = lecompile.longexposure(lecompile.LongExposureConfig())
    got = torch.compile(product, backend=backend)(x, w, a, b)
    got_grads = torch.autograd.grad(got.float().square().sum(), (x, a, b))

    assert [e.fused for e in backend.report.linears] == [True]
    _assert_near(got, want)
    for g, w_ in zip(got_grads, want_grads):
        _assert_near(g, w_)


@pytest.mark.parametrize("in_place", [False, True])
def test_the_rewritten_graph_forms_no_update(in_place):
    tensors = [torch.randn(12, IN), torch.randn(E, OUT, IN), torch.randn(E * R, IN), torch.randn(OUT, R * E)]
    x, w, a, b = (t.to(torch.bfloat16).requires_grad_(i != 1) for i, t in enumerate(tensors))
    (gm, example_inputs), = dynamo_graphs(_peft_expert_product("out_in", True, in_place), x, w, a, b)
    assert any(n.target == "mul_" for n in gm.graph.nodes) == in_place
    run_passes(gm, example_inputs, lecompile.LongExposureConfig())
    assert not any(n.target in (torch.functional.einsum, torch.einsum, "mul_") for n in gm.graph.nodes), gm.code


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@needs_fp32_moe_compile
def test_mixtral_experts_never_form_the_update(tmp_path):
    model = mixtral_with_lora_on_experts()
    eager_loss, eager_grads = train_step(model, model, batch())
    torch._dynamo.reset()
    backend = lecompile.longexposure(lecompile.LongExposureConfig(dump_dir=str(tmp_path)))
    loss, grads = train_step(torch.compile(model, backend=backend), model, batch())

    experts = [e for e in backend.report.linears if ".experts." in e.layer]
    assert sorted(e.layer for e in experts) == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                                      for p in ("gate_up_proj", "down_proj"))
    assert all(e.fused for e in experts)
    assert "einsum" not in next(tmp_path.glob("*_after.py")).read_text()
    torch.testing.assert_close(loss, eager_loss, atol=2e-5, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=2e-5, rtol=1e-4, msg=name)
    reasons = [u.reason for u in backend.report.unmatched]
    assert reasons and all("MoE block's routed experts" in r for r in reasons)


@pytest.mark.skipif(FP32_MOE_COMPILES, reason="this transformers compiles fp32 MoE experts")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_experts_no_backend_can_compile_are_named_in_the_report():
    """transformers 5.17's fp32 experts: its grouped_mm fallback's backward calls tolist()."""
    torch._dynamo.reset()
    backend = lecompile.longexposure(lecompile.LongExposureConfig())
    model = mixtral_with_lora_on_experts()
    train_step(torch.compile(model, backend=backend), model, batch())
    assert lecompile.backend.UNTRACEABLE_GROUPED_MM in backend.report.notes


@needs_fp32_moe_compile
def test_gpt_oss_experts_stored_in_by_out_with_biases_train_exactly():
    model = gpt_oss_with_lora_on_experts()
    eager_loss, eager_grads = train_step(model, model, batch())
    torch._dynamo.reset()
    backend = lecompile.longexposure(lecompile.LongExposureConfig())
    loss, grads = train_step(torch.compile(model, backend=backend), model, batch())
    assert sum(e.fused for e in backend.report.linears if ".experts." in e.layer) == 4
    torch.testing.assert_close(loss, eager_loss, atol=2e-5, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=2e-5, rtol=1e-4, msg=name)


@needs_fp32_moe_compile
def test_gpt_oss_sinks_and_experts_are_reported():
    """Its attention (a learned sink logit joined to the scores, the probabilities sliced) and its
    experts' sigmoid-gated activation are named in the report, not passed over."""
    torch._dynamo.reset()
    report = lecompile.explain(gpt_oss_with_lora_on_experts(), **batch(),
                               config=lecompile.LongExposureConfig.create(attn_density=0.5, attn_block=16))
    assert len(report.attention) == 2 and report.attention_rewritten == 0
    assert all("GPT-OSS's attention sinks" in e.note for e in report.attention)
    assert [u.where for u in report.unmatched] == ["sigmoid", "sigmoid_1"]
    assert all("MoE block's routed experts" in u.reason for u in report.unmatched)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_bf16_experts_are_as_close_to_fp32_as_inductors(device):
    """bf16 with LoRA rank 4 (8 bytes a row: padded to 16 for the grouped GEMM): no further from
    the fp32 step (on the CPU) than Inductor's bf16 step, which forms the update."""
    model = mixtral_with_lora_on_experts()
    _, reference = train_step(model, model, batch())
    model = model.to(device, torch.bfloat16)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch().items()}

    def error(grads):
        return max(((g.float().cpu() - reference[n]).abs().max() / reference[n].abs().max()).item()
                   for n, g in grads.items())

    torch._dynamo.reset()
    _, inductor = train_step(torch.compile(model, backend="inductor"), model, inputs)
    torch._dynamo.reset()
    backend = lecompile.longexposure(lecompile.LongExposureConfig())
    _, ours = train_step(torch.compile(model, backend=backend), model, inputs)
    assert sum(e.fused for e in backend.report.linears if ".experts." in e.layer) == 4
    assert error(ours) <= 1.25 * error(inductor)
