"""Compiled train steps of tiny Hugging Face models through the backend, against eager PyTorch.

Per (architecture, PEFT method), one model: at density 1.0 every MLP is matched and left dense,
and the compiled step matches eager (loss and every gradient); at density 0.5 with the oracle
predictor it matches an eager model whose MLP intermediate is masked to the oracle's
per-sequence top-k neurons.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import lecompile
from lecompile import LongExposureConfig

from models import ARCHS, BATCH, FFN, LAYERS, METHODS, batch, tiny_model, train_step

FC2_NAMES = {"opt": "fc2", "gpt2": "mlp.c_proj", "llama": "down_proj", "qwen2": "down_proj"}
TOL = dict(atol=2e-5, rtol=1e-4)


def mask_mlp_intermediate(model, fc2_name: str, k: int):
    """Eager reference: keep each sequence's top-``k`` MLP neurons by sum of ``h^2`` (the input of
    every module whose name ends with ``fc2_name``)."""
    def hook(module, args):
        h = args[0]
        grouped = h.reshape(BATCH, -1, h.shape[-1])
        top = grouped.detach().float().square().sum(1).topk(k, dim=-1).indices
        mask = torch.zeros(BATCH, 1, h.shape[-1], dtype=h.dtype).scatter_(-1, top.unsqueeze(1), 1.0)
        return ((grouped * mask).reshape(h.shape),) + args[1:]

    handles = [m.register_forward_pre_hook(hook) for name, m in model.named_modules()
               if name.endswith(fc2_name)]
    assert len(handles) == LAYERS
    return handles


def compiled_step(model, config, inputs):
    torch._dynamo.reset()
    counters.clear()
    backend = lecompile.longexposure(config)
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    return loss, grads, backend.report


@pytest.mark.parametrize("arch,method", [
    pytest.param(arch, method, marks=() if (arch, method) == ("llama", "lora") else pytest.mark.slow)
    for arch in ARCHS for method in METHODS])
def test_train_step_matches_eager(arch, method):
    model, inputs = tiny_model(arch, method), batch()
    eager_loss, eager_grads = train_step(model, model, inputs)
    assert eager_grads, "nothing trainable"

    loss, grads, report = compiled_step(model, LongExposureConfig(mlp_density=1.0), inputs)
    # One match per layer, unless a graph break made Dynamo compile the decoder layer as its own
    # frame (OPT in transformers < 5.23): then one graph serves every layer, or one per layer when
    # the layers' guards differ (PEFT wrappers).
    layer_frames = not any(part.isdigit() for e in report.mlp for part in e.layer.split("."))
    assert len(report.mlp) in ((1, LAYERS) if layer_frames else (LAYERS,)), str(report)
    assert all(e.k == FFN and not e.rewritten and "left dense" in e.note for e in report.mlp)
    assert counters["lecompile"]["sparse_mlp_calls"] == 0
    torch.testing.assert_close(loss, eager_loss, **TOL)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], **TOL, msg=name)

    handles = mask_mlp_intermediate(model, FC2_NAMES[arch], FFN // 2)
    ref_loss, ref_grads = train_step(model, model, inputs)
    for h in handles:
        h.remove()
    loss, grads, report = compiled_step(
        model, LongExposureConfig.create(mlp_density=0.5, predictor="oracle", k_align=64), inputs)
    assert counters["lecompile"]["sparse_mlp_calls"] == LAYERS, "each layer's MLP runs the op once"
    assert counters["lecompile"]["sparse_mlp"] == len(report.mlp)
    assert {e.k for e in report.mlp} == {FFN // 2} and all(e.rewritten for e in report.mlp), str(report)
    assert {e.granularity for e in report.mlp} == {"sequence"}
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert abs(loss.item() - eager_loss.item()) > 1e-6, "masking had no effect: the test cannot fail"
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)
