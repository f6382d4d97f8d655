"""lecompile.passes.causal_masks: a token mask that is only the causal mask leaves the attention."""

import copy
import operator
from types import SimpleNamespace

import pytest
import torch
import torch.fx as fx

import lecompile
from lecompile import LongExposureConfig
from lecompile.passes import causal_masks, run_passes
from lecompile.passes.graph import SDPA, is_call
from lecompile.passes.rewrite_attention import CAUSAL_MASK

from models import dynamo_graphs, tiny_model, train_step

SEQ = 32


def _captured(model, inputs):
    """The graph Dynamo hands a backend for ``model(**inputs)``, and its example inputs."""
    graphs = dynamo_graphs(model, **inputs)
    assert len(graphs) == 1
    return graphs[0]


def _inputs(padded: bool = False):
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    if padded:
        inputs["attention_mask"] = torch.ones_like(ids).index_fill(1, torch.tensor([0, 1]), 0)
    return inputs


def _sdpa_calls(gm):
    return [n for n in gm.graph.nodes if is_call(n, SDPA)]


def test_a_causal_only_mask_becomes_causal_sdpa_with_the_same_loss_and_gradients():
    model = tiny_model("llama", "lora")
    reference = copy.deepcopy(model)
    gm, example_inputs = _captured(model, _inputs())
    assert all(n.kwargs.get("attn_mask") is not None for n in _sdpa_calls(gm))  # transformers' mask under tracing
    report = run_passes(gm, example_inputs, LongExposureConfig())
    calls = _sdpa_calls(gm)
    assert calls and all(n.kwargs["is_causal"] and n.kwargs["attn_mask"] is None and len(n.args) == 3 for n in calls)
    assert all(e.note == f"attn_density 1.0: dense; {CAUSAL_MASK}" for e in report.attention), str(report)

    torch._dynamo.reset()
    backend = lecompile.LongExposureBackend(LongExposureConfig())
    loss, grads = train_step(torch.compile(model, backend=backend), model, _inputs())
    ref_loss, ref_grads = train_step(reference, reference, _inputs())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_mask_that_depends_on_the_inputs_stays():
    gm, example_inputs = _captured(tiny_model("llama", "lora"), _inputs(padded=True))
    report = run_passes(gm, example_inputs, LongExposureConfig())
    assert all(n.kwargs.get("attn_mask") is not None for n in _sdpa_calls(gm))
    assert report.attention and not any(CAUSAL_MASK in e.note for e in report.attention)


def test_block_attention_over_a_dropped_mask_reads_no_token_mask():
    gm, example_inputs = _captured(tiny_model("llama", "lora"), _inputs())
    report = run_passes(gm, example_inputs, LongExposureConfig.create(attn_density=0.5, attn_block=16))
    assert report.attention_rewritten == len(report.attention) > 0
    assert all(e.note == CAUSAL_MASK for e in report.attention), str(report)
    calls = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "block_attention"]
    assert calls and all(n.args[5] == ["mul"] and n.args[7] is True for n in calls)  # steps: the scale; causal


@pytest.mark.parametrize("kind, value, expected", [
    ("mask", torch.ones(4, 4, dtype=torch.bool).tril(), True),
    ("mask", torch.ones(2, 1, 4, 4, dtype=torch.bool).tril(), True),  # every row and head
    ("mask", torch.ones(4, 4, dtype=torch.bool).tril().logical_and(torch.ones(4, 4, dtype=torch.bool).triu(-1)),
     False),  # a sliding window
    ("mask", torch.ones(4, 4, dtype=torch.bool), False),
    ("mask", torch.ones(1, 1, 1, 4, dtype=torch.bool), False),  # padding only, broadcast over the queries
    ("mask", torch.ones(4, 4).tril(), False),  # not bool
    ("add", torch.zeros(4, 4).masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), torch.finfo(torch.float).min),
     True),
    ("add", torch.ones(4, 4).masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), torch.finfo(torch.float).min),
     False),  # a bias where it keeps
])
def test_is_causal(kind, value, expected):
    for rows in (4096, 3):  # all queries at once, and in a block of 3 then 1
        assert causal_masks.is_causal(value, kind, 4, 4, rows=rows) is expected


def test_is_causal_aligns_fewer_queries_to_the_last_keys():
    assert causal_masks.is_causal(torch.ones(4, 6, dtype=torch.bool).tril(2), "mask", 4, 6)
    assert not causal_masks.is_causal(torch.ones(4, 6, dtype=torch.bool).tril(), "mask", 4, 6)


def test_only_values_computed_from_constants_are_evaluated():
    root = torch.nn.Module()
    root.register_buffer("bias", torch.ones(1, 1, 8, 8, dtype=torch.bool).tril())  # GPT-2's causal buffer
    graph = fx.Graph()
    x = graph.placeholder("x")
    tril = graph.call_method("tril", (graph.call_function(torch.ones, (4, 4), {"dtype": torch.bool}),))
    sliced = graph.call_function(operator.getitem, (graph.get_attr("bias"), (Ellipsis, slice(4), slice(4))))
    noise = graph.call_function(operator.gt, (graph.call_function(torch.rand, (4, 4)), 0.5))
    from_input = graph.call_function(operator.gt, (x, 0))
    graph.output((tril, sliced, noise, from_input))
    ctx = SimpleNamespace(gm=fx.GraphModule(root, graph))
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    torch.testing.assert_close(causal_masks.constant_value(ctx, tril), causal)
    torch.testing.assert_close(causal_masks.constant_value(ctx, sliced), causal[None, None])
    assert causal_masks.constant_value(ctx, noise) is None
    assert causal_masks.constant_value(ctx, from_input) is None
