"""The ``activation_in_gemm`` pass: a dense MLP's down projection takes the activation's inputs,
its backward GEMM ending in the activation's backward, with the loss and gradients of the pass
turned off (the kernel in Triton's interpreter on CPU machines)."""

import pytest
import torch
from test_activated_lora_linear import kernel_on_cpu  # noqa: F401  (the fixture)
from test_fused_projections import tiny_phi3
from torch._dynamo.utils import counters

import lecompile
from lecompile import LongExposureConfig
from lecompile.ops.activated_lora_linear import activated_lora_linear
from lecompile.passes import run_passes
from lecompile.passes.activation_in_gemm import NOTE

from models import LAYERS, batch, dynamo_graphs, tiny_model, train_step

#: every test here runs the kernel path in Triton's interpreter on CPU machines
pytestmark = pytest.mark.usefixtures("kernel_on_cpu")


def model_of(arch):
    if arch == "phi3":  # gate and up as the halves of one linear (gate_up_proj)
        return tiny_phi3("lora").half()
    return tiny_model(arch, "lora", dtype=torch.float16, rank=8)


def step(model, inputs, **config):
    torch._dynamo.reset()
    counters.clear()
    config = {"activation_in_gemm": True, **config}
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=1.0, **config))
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    return loss, grads, backend.report, counters["lecompile"]["activation_in_gemm"]


def check_against_the_pass_off(arch):
    model, inputs = model_of(arch), batch()
    if arch == "phi3":
        for module in model.modules():  # rank 8: what the kernel takes
            if hasattr(module, "lora_A"):
                module.lora_A["default"].weight.data = torch.randn(8, module.in_features) / module.in_features ** 0.5
                module.lora_B["default"].weight.data = torch.randn(module.out_features, 8) / 8
                module.r["default"] = 8
    loss, grads, report, rewritten = step(model, inputs)
    loss_off, grads_off, report_off, rewritten_off = step(model, inputs, disable=["activation_in_gemm"])
    assert rewritten == LAYERS and NOTE.format(n=LAYERS) in report.notes, str(report)
    assert rewritten_off == 0 and not any(n.startswith("activation_in_gemm") for n in report_off.notes)
    torch.testing.assert_close(loss, loss_off, atol=1e-2, rtol=1e-3)
    assert grads.keys() == grads_off.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        scale = grads_off[name].abs().max().item()
        torch.testing.assert_close(grads[name], grads_off[name], atol=2e-2 * scale, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_the_step_matches_the_pass_off(arch):
    """LLaMA: gated SiLU; GPT-2: a hand-written tanh GELU, ungated, Conv1D weights; Phi-3: gate and
    up as the halves of one linear."""
    check_against_the_pass_off(arch)


@pytest.mark.parametrize("setting", [dict(), dict(lora_in_gemm=False), dict(activation_in_gemm=False)])
def test_the_pass_needs_the_kernel_and_the_knob(setting):
    """With both, every MLP's down projection is rewritten; with ``lora_in_gemm=False`` (or no
    Hopper GPU) or the knob off (the default), none is (the passes alone, on the graph Dynamo
    hands the backend)."""
    assert LongExposureConfig().tuning.activation_in_gemm is False
    ((gm, example_inputs),) = dynamo_graphs(model_of("llama"), **batch())
    config = LongExposureConfig.create(mlp_density=1.0, **{"activation_in_gemm": True, **setting})
    report = run_passes(gm, example_inputs, config)
    ops = [n for n in gm.graph.nodes if n.target is activated_lora_linear]
    assert len(ops) == (LAYERS if not setting else 0)
    assert (NOTE.format(n=LAYERS) in report.notes) is (not setting), str(report)
