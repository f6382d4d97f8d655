"""lecompile.compile_layers_once: one compiled graph serves every identical decoder layer."""

import copy

import pytest
import torch
from torch import nn

import lecompile
from lecompile.layers import decoder_layers

import models
from models import batch, tiny_model, train_step


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
    hooks = lecompile.compile_layers_once(model)
    assert all(len(layer._forward_pre_hooks) == 1 for layer in hooks.layers)
    hooks.remove()
    assert all(not layer._forward_pre_hooks for layer in hooks.layers)


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
