"""Gradient checkpointing keeps the rewrites: the MLPs inside checkpointed layers are matched and
rewritten, the layers are still recomputed in the backward, and the results equal the same
config compiled without checkpointing."""

import pytest
import torch

import lecompile
from lecompile import LongExposureConfig

from models import LAYERS, batch, tiny_model

SPARSE = LongExposureConfig.create(mlp_density=0.5, k_align=64, predictor="oracle")


def step(checkpointing=None, config=SPARSE):
    """Loss, LoRA gradients, the report and the bytes of activations saved for the backward (the
    parameters not counted) of one compiled training step of a tiny LoRA LLaMA."""
    model = tiny_model("llama", "lora")
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    torch._dynamo.reset()
    backend = lecompile.longexposure(config)
    compiled = torch.compile(model, backend=backend)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compiled(**batch()).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, backend.report, sum(saved)


@pytest.fixture(scope="module")
def without_checkpointing():
    return step()


@pytest.mark.parametrize("use_reentrant", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_checkpointed_layers_are_rewritten_and_recomputed(use_reentrant, without_checkpointing):
    ref_loss, ref_grads, ref_report, ref_saved = without_checkpointing
    loss, grads, report, saved = step(checkpointing=use_reentrant)
    assert report.checkpointed == LAYERS and "gradient checkpointing: 2 region(s)" in str(report)
    assert report.mlp_rewritten == ref_report.mlp_rewritten == LAYERS
    assert report.linears_fused == ref_report.linears_fused > 0
    assert saved < 0.5 * ref_saved, (saved, ref_saved)
    torch.testing.assert_close(loss, ref_loss, atol=2e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 5 * LAYERS  # A and B of five linears
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_checkpointed_block_attention_is_rewritten_and_recomputed(monkeypatch):
    """Block-sparse attention inside checkpointed layers: rewritten, recomputed in the backward with
    the rest of its region, the same loss and gradients as without checkpointing."""
    from torch.utils.checkpoint import CheckpointPolicy

    from lecompile import passes
    from lecompile.ops.block_attention import block_attention
    from lecompile.passes.inline_checkpoints import RECOMPUTE

    tags = []
    record = passes.Pass("record_tags", lambda ctx: tags.extend(
        (n.target is block_attention, n.meta.get(RECOMPUTE)) for n in ctx.gm.graph.nodes if RECOMPUTE in n.meta))
    monkeypatch.setattr(passes, "PASSES", (*passes.PASSES, record))
    config = LongExposureConfig.create(mlp_density=1.0, attn_density=0.5, attn_block=16)
    ref_loss, ref_grads, ref_report, _ = step(config=config)
    assert not tags and ref_report.attention_rewritten == LAYERS
    loss, grads, report, _ = step(checkpointing=False, config=config)
    assert report.attention_rewritten == LAYERS, str(report)
    assert sum(is_attention for is_attention, _ in tags) == LAYERS
    assert {policy for _, policy in tags} == {CheckpointPolicy.PREFER_RECOMPUTE}
    torch.testing.assert_close(loss, ref_loss, atol=2e-5, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)
