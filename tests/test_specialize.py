"""Graphs Dynamo recompiles with symbolic sizes run as one static graph per size."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import lecompile
from lecompile import LongExposureConfig
from lecompile import specialize as specialize_module
from lecompile.specialize import ShapeSpecialized, specialize, symbolic_inputs

from models import LAYERS, tiny_model

SPARSE = LongExposureConfig.create(mlp_density=0.5, k_align=64, predictor="oracle")


W = torch.randn(8, 4)


def f(x):
    return torch.relu(x @ W).sum(0)


def dynamic_graph():
    """The graph Dynamo recompiles for ``f`` once its input's length changes (inputs: the
    length, ``x``, ``W``), with its example inputs."""
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend)
    compiled(torch.randn(5, 8))
    compiled(torch.randn(7, 8))
    gm, example_inputs = captured[-1]
    assert isinstance(example_inputs[0], torch.SymInt) and len(example_inputs) == 3
    return gm, example_inputs


def call_args(length):
    return [length, torch.randn(length, 8), W]


def test_a_specialized_graph_has_static_shapes_and_computes_the_same():
    gm, example_inputs = dynamic_graph()
    assert symbolic_inputs(example_inputs) == [0]
    args = call_args(7)
    static = specialize(gm, args)
    shapes = [n.meta["example_value"].shape for n in static.graph.nodes
              if isinstance(n.meta.get("example_value"), torch.Tensor)]
    assert shapes and all(isinstance(d, int) for s in shapes for d in s)
    torch.testing.assert_close(static(*args), gm(*args))


def test_each_size_compiles_once_and_past_the_limit_runs_eagerly(monkeypatch):
    gm, example_inputs = dynamic_graph()
    compiled = []
    specialized = ShapeSpecialized(gm, example_inputs, lambda g, a: compiled.append(a[0]) or g)
    for length in (7, 7, 3):
        args = call_args(length)
        torch.testing.assert_close(specialized(*args)[0], f(args[1]))
    assert compiled == [7, 3]
    monkeypatch.setattr(specialize_module, "MAX_SHAPES", 2)
    longer = call_args(9)
    with pytest.warns(UserWarning, match="more than 2 sizes"):
        out = specialized(*longer)
    assert compiled == [7, 3]
    torch.testing.assert_close(out[0], f(longer[1]))


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_new_sequence_lengths_stay_sparse_and_match_a_static_compile(checkpointing, recwarn):
    """Without ``dynamic=False``: the second length makes Dynamo recompile with symbolic sizes;
    the backend compiles a static sparse graph per length (checkpointed layers included), which
    computes what a static compile of that length computes."""
    model = tiny_model("llama", "lora")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    counters["lecompile"].clear()
    backend = lecompile.longexposure(SPARSE)
    compiled = torch.compile(model, backend=backend)
    ids = {seq: torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(seq)) for seq in (16, 32, 48)}
    compiled(input_ids=ids[16], labels=ids[16], use_cache=False).loss.backward()
    model.zero_grad()
    loss = compiled(input_ids=ids[32], labels=ids[32], use_cache=False).loss
    loss.backward()
    compiled(input_ids=ids[48], labels=ids[48], use_cache=False).loss  # one more size, one more form
    assert counters["lecompile"]["shape_specializations"] >= 2  # each new length, in each graph it reaches
    with_mlps = [r for r in backend.reports if r.mlp]  # checkpointing adds graphs around the layers
    assert len(with_mlps) == 3 and all(r.mlp_rewritten == LAYERS for r in with_mlps)
    assert not [w for w in recwarn if "dynamic shapes" in str(w.message)]

    torch._dynamo.reset()
    static = torch.compile(reference, backend=lecompile.longexposure(SPARSE), dynamic=False)
    expected = static(input_ids=ids[32], labels=ids[32], use_cache=False).loss
    expected.backward()
    torch.testing.assert_close(loss, expected)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
