"""lecompile.passes.grouped_query_attention: SDPA reads the grouped key/value heads, values unchanged."""

import copy

import pytest
import torch
import torch.nn.functional as F

import lecompile
from lecompile import LongExposureConfig
from lecompile.ops.block_attention import block_attention
from lecompile.passes import grouped_query_attention, run_passes
from lecompile.passes.graph import SDPA, is_call

from models import LAYERS, VOCAB, batch, dynamo_graphs, tiny_model, train_step


def _captured(fn, *args, **kwargs):
    graphs = dynamo_graphs(fn, *args, **kwargs)
    assert len(graphs) == 1
    return graphs[0]


def _sdpa_calls(gm):
    return [n for n in gm.graph.nodes if is_call(n, SDPA)]


def _grouped(gm) -> bool:
    """Whether every SDPA call of ``gm`` reads ``[b, kv, s, d]`` keys and values with ``enable_gqa``."""
    calls = _sdpa_calls(gm)
    return bool(calls) and all(n.kwargs.get("enable_gqa") and n.args[1].meta["example_value"].shape[1]
                               < n.args[0].meta["example_value"].shape[1] for n in calls)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_causal_gqa_model_hands_sdpa_its_key_value_heads(arch):
    gm, example_inputs = _captured(tiny_model(arch, "lora"), **batch())
    before = copy.deepcopy(gm)
    report = run_passes(gm, example_inputs, LongExposureConfig())
    assert _grouped(gm), gm.code
    assert grouped_query_attention.NOTE.format(n=2) in report.notes
    assert not any(n.target == "expand" for n in gm.graph.nodes), gm.code  # repeat_kv's copies are gone
    torch.testing.assert_close(gm(*example_inputs)[0], before(*example_inputs)[0])


def test_disabled_by_name_or_with_a_mask_left():
    gm, example_inputs = _captured(tiny_model("llama", "lora"), **batch())
    report = run_passes(gm, example_inputs, LongExposureConfig(disable=frozenset({"grouped_query_attention"})))
    assert not any(n.kwargs.get("enable_gqa") for n in _sdpa_calls(gm))
    assert not any(note.startswith("grouped_query_attention") for note in report.notes)
    # Without causal_masks the model's mask stays, and the fused kernels take no mask with grouped heads.
    gm, example_inputs = _captured(tiny_model("llama", "lora"), **batch())
    run_passes(gm, example_inputs, LongExposureConfig(disable=frozenset({"causal_masks"})))
    assert not any(n.kwargs.get("enable_gqa") for n in _sdpa_calls(gm))


def _compiled_step(config):
    model = tiny_model("llama", "lora")
    torch._dynamo.reset()
    return train_step(torch.compile(model, backend=lecompile.LongExposureBackend(config)), model, batch())


def test_the_compiled_step_has_the_same_loss_and_gradients():
    """In fp32 on the CPU; bf16 on the GPU's fused kernels: tests/test_cuda.py."""
    loss, grads = _compiled_step(LongExposureConfig())
    plain_loss, plain_grads = _compiled_step(LongExposureConfig(disable=frozenset({"grouped_query_attention"})))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and any("v_proj" in name for name in grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_block_attention_keeps_the_repeated_heads():
    """FlexAttention on grouped heads made the step slower (the module docstring): block attention
    reads the heads repeated for each query head, and the pass reports nothing."""
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[-1, :7] = 0  # left padding: the model's mask stays
    gm, example_inputs = _captured(tiny_model("llama", "lora"), input_ids=ids, labels=ids, attention_mask=mask,
                                   use_cache=False)
    report = run_passes(gm, example_inputs, LongExposureConfig.create(attn_density=0.5, attn_block=16))
    calls = [n for n in gm.graph.nodes if is_call(n, (block_attention,))]
    assert len(calls) == LAYERS, gm.code
    for node in calls:
        q, k, v = (n.meta["example_value"] for n in node.args[:3])
        assert q.shape[1] == k.shape[1] == v.shape[1] and not node.args[9], gm.code  # enable_gqa
    assert not any(note.startswith("grouped_query_attention") for note in report.notes)


B, KV, N, S, D = 2, 2, 3, 8, 4


def _attention(q, k, v, repeat):
    return F.scaled_dot_product_attention(q, repeat(k), repeat(v), is_causal=True)


def _repeat_kv(x):
    return x[:, :, None].expand(B, KV, N, S, D).reshape(B, KV * N, S, D)


def _repeat_kv_unsqueeze(x):
    return x.unsqueeze(2).expand(B, KV, N, S, D).reshape(B, KV * N, S, D)


def _tile_kv(x):
    """Each group of heads repeated as a whole (head order k0 k1 k0 k1 ...), not what enable_gqa computes."""
    return x[:, None].expand(B, N, KV, S, D).reshape(B, KV * N, S, D)


@pytest.mark.parametrize("repeat, grouped", [(_repeat_kv, True), (_repeat_kv_unsqueeze, True), (_tile_kv, False)])
def test_only_heads_repeated_next_to_themselves_are_grouped(repeat, grouped):
    q = torch.randn(B, KV * N, S, D, requires_grad=True)
    k, v = (torch.randn(B, KV, S, D, requires_grad=True) for _ in range(2))
    gm, example_inputs = _captured(_attention, q, k, v, repeat)
    run_passes(gm, example_inputs, LongExposureConfig())
    assert _grouped(gm) == grouped, gm.code
    out = gm(*example_inputs)[0]
    expected = _attention(q, k, v, repeat)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_attention_with_dropout_is_left_alone():
    q = torch.randn(B, KV * N, S, D, requires_grad=True)
    k, v = (torch.randn(B, KV, S, D, requires_grad=True) for _ in range(2))
    gm, example_inputs = _captured(lambda q, k, v: F.scaled_dot_product_attention(
        q, _repeat_kv(k), _repeat_kv(v), dropout_p=0.1, is_causal=True), q, k, v)
    run_passes(gm, example_inputs, LongExposureConfig())
    assert not any(n.kwargs.get("enable_gqa") for n in _sdpa_calls(gm))
