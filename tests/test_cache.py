"""Inductor's caches work with lecompile's graphs: a second compile of the same model and config
hits AOTAutograd's cache and the FX graph cache; another config or other lecompile code misses."""

import pytest
import torch
from torch._dynamo.utils import counters

import lecompile
from lecompile import LongExposureConfig
from lecompile.cache import cacheable_functions, source_hash

from models import batch, tiny_model


def compile_once(config):
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("llama", "lora")
    torch.compile(model, backend=lecompile.longexposure(config))(**batch()).loss.backward()
    return dict(counters["aot_autograd"]), dict(counters["inductor"])


@pytest.mark.slow
def test_second_compile_hits_the_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    config = LongExposureConfig.create(mlp_density=0.5, k_align=64)
    first, _ = compile_once(config)
    assert first.get("autograd_cache_bypass", 0) == 0, first
    second, inductor = compile_once(config)
    assert second.get("autograd_cache_hit") == 1 and inductor.get("fxgraph_cache_hit", 0) >= 1, (second, inductor)
    other, _ = compile_once(config.replace(mlp_density=0.25))
    assert other.get("autograd_cache_miss") == 1, other


def test_lecompile_functions_in_a_graph_are_keyed_on_the_source():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(lecompile.predictors.op.predict_neurons, (x,)))
    marked = cacheable_functions(torch.fx.GraphModule(torch.nn.Module(), graph))
    assert marked == {"lecompile.predictors.op.predict_neurons": source_hash()}
    assert len(source_hash()) == 64
