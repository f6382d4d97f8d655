"""lecompile.compile_layers_once: one compiled graph serves every identical decoder layer."""

import copy

import pytest
import torch
from torch import nn

import lecompile
from lecompile.layers import decoder_layers

import models
from models import batch, dynamo_graphs, tiny_model, train_step


def test_decoder_layers_are_the_modules_of_hugging_faces_layer_classes():
    layers = decoder_layers(tiny_model("llama", "lora"))  # through PEFT's wrapper
    assert [type(layer).__name__ for layer in layers] == ["LlamaDecoderLayer"] * models.LAYERS


def test_without_layer_classes_the_longest_stack_of_one_class_is_taken():
    model = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)]),
                          nn.ModuleList([nn.Linear(2, 2) for _ in range(3)]),
                          nn.ModuleList([nn.Linear(2, 2) for _ in range(2)]))
    assert decoder_layers(model) == list(model[1])


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(ValueError, match="Linear has no decoder layers"):
        lecompile.compile_layers_once(nn.Linear(2, 2))


def test_remove_takes_the_graph_breaks_off_again():
    model = tiny_model("llama", "lora")
    originals = [type(layer) for layer in decoder_layers(model)]
    breaks = lecompile.compile_layers_once(model)
    lecompile.compile_layers_once(model)  # a second call changes nothing more
    assert len({type(layer) for layer in breaks.layers}) == 1  # one type: Dynamo's guards pass for every layer
    assert all(type(layer) is not cls and isinstance(layer, cls) and type(layer).__name__ == cls.__name__
               for layer, cls in zip(breaks.layers, originals))
    breaks.remove()
    assert [type(layer) for layer in breaks.layers] == originals


class _CallCheckpointedLayer(nn.Module):
    """Checkpoints its whole ``__call__``, hooks included, as transformers 5.17's layers do."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.linear(x))

    def __call__(self, x):
        return torch.utils.checkpoint.checkpoint(super().__call__, x, use_reentrant=False)


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_CallCheckpointedLayer() for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.sum()


def test_a_layer_checkpointed_around_its_call_still_compiles_once():
    model = _Stack()
    reference = copy.deepcopy(model)
    lecompile.compile_layers_once(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(4, 8, requires_grad=True)
    torch.compile(model, backend=backend)(x).backward()
    reference(x.detach().requires_grad_()).backward()
    # The break is outside the checkpoint: one layer graph, with the checkpoint in it, serves all three layers.
    checkpointed = [g for g in graphs if any(n.op == "call_function" and "checkpoint" in str(n.target)
                                             for n in g.graph.nodes)]
    assert len(checkpointed) == 1
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, msg=name)


def _layer_sdpa_calls(model, inputs):
    """The SDPA calls of the graphs Dynamo hands a backend for ``model(**inputs)`` (layers broken)."""
    return [n for g, _ in dynamo_graphs(model, **inputs) for n in g.graph.nodes
            if n.target is torch.nn.functional.scaled_dot_product_attention]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # GPT-2 passes the mask by position
def test_a_causal_only_mask_leaves_the_layers_which_run_causal_sdpa(arch):
    model = tiny_model(arch, "lora")
    reference = copy.deepcopy(model)
    lecompile.compile_layers_once(model)
    calls = _layer_sdpa_calls(model, batch())
    assert calls and all(n.kwargs.get("attn_mask") is None and n.kwargs["is_causal"] for n in calls)
    loss, grads = train_step(model, model, batch())  # eager, through the breaking calls
    ref_loss, ref_grads = train_step(reference, reference, batch())
    torch.testing.assert_close(loss, ref_loss)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_a_padding_mask_or_an_eager_attention_keeps_the_mask():
    model = tiny_model("llama", "lora")
    lecompile.compile_layers_once(model)
    padding = torch.ones(models.BATCH, models.SEQ, dtype=torch.long).index_fill(1, torch.tensor([0]), 0)
    padded = {**batch(), "attention_mask": padding}
    calls = _layer_sdpa_calls(model, padded)
    assert calls and all(n.kwargs.get("attn_mask") is not None for n in calls)
    eager = tiny_model("llama", "lora")
    eager.set_attn_implementation("eager")
    reference = copy.deepcopy(eager)
    lecompile.compile_layers_once(eager)
    torch._dynamo.reset()
    loss, _ = train_step(torch.compile(eager, backend="eager"), eager, batch())
    torch.testing.assert_close(loss, train_step(reference, reference, batch())[0])


@pytest.mark.slow
def test_every_layer_runs_one_compiled_graph_with_the_loss_and_gradients_of_eager(monkeypatch):
    graphs = {}
    for layers in (2, 4):
        monkeypatch.setattr(models, "LAYERS", layers)
        model = tiny_model("llama", "lora")
        reference = copy.deepcopy(model)
        lecompile.compile_layers_once(model)
        torch._dynamo.reset()
        backend = lecompile.LongExposureBackend(lecompile.LongExposureConfig())
        loss, grads = train_step(torch.compile(model, backend=backend), model, batch())
        ref_loss, ref_grads = train_step(reference, reference, batch())
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
        # Two versions of the layer: the first layer's input needs no gradient (frozen embeddings), the others' does.
        layer_graphs = [r for r in backend.reports if r.mlp]
        assert len(layer_graphs) == 2 and all(r.linears_fused == 5 for r in layer_graphs)  # q, v, gate, up, down
        graphs[layers] = len(backend.reports)
    assert graphs[2] == graphs[4]


@pytest.mark.slow
def test_checkpointed_layers_with_block_attention_train_as_in_one_graph():
    config = lecompile.LongExposureConfig.create(attn_density=0.5, attn_block=16)
    results = []
    for once in (False, True):
        model = tiny_model("llama", "lora")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if once:
            lecompile.compile_layers_once(model)
        torch._dynamo.reset()
        backend = lecompile.longexposure(config)
        results.append((*train_step(torch.compile(model, backend=backend), model, batch()), backend.report))
    (ref_loss, ref_grads, ref_report), (loss, grads, report) = results
    assert ref_report.attention_rewritten == ref_report.checkpointed == models.LAYERS
    # One layer graph for all: checkpointing makes the embeddings' output require grad, so every layer's input does.
    assert report.attention_rewritten == report.checkpointed == 1
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=2e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=2e-5, msg=name)
