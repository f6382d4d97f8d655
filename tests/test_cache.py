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


def test_values_from_frozen_weights_come_back_from_disk_in_another_process(monkeypatch, tmp_path):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lecompile.cache import on_disk
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    calls = []

    def compute(weight, rank):
        calls.append(rank)
        return weight[:rank].t().clone(), weight.sum(0, keepdim=True)

    cached = on_disk(compute, "test")
    w = torch.randn(6, 4, dtype=torch.bfloat16)
    first = cached(w, 2)
    again = cached(w.clone(), 2)  # another tensor of the same bytes, as a second process has
    assert calls == [2] and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(first, again))
    cached(w, 3)  # other arguments
    cached(w + 1, 2)  # other bytes
    assert calls == [2, 3, 2]
    entries = list((tmp_path / "lecompile" / "test").glob("*.pt"))
    assert len(entries) == 3 and not list((tmp_path / "lecompile" / "test").glob("*.tmp"))
    for entry in entries:
        entry.write_bytes(b"torn")  # an unreadable entry is computed again and replaced
    cached(w, 2)
    assert calls == [2, 3, 2, 2]
    cached(w, 2)
    assert calls == [2, 3, 2, 2]  # the rewritten entry is read back
    with torch._guards.tracing(torch._guards.TracingContext(FakeTensorMode())):  # as the passes run in Dynamo
        inside = cached(w, 2)
    assert len(calls) == 4 and all(torch.equal(a, b) for a, b in zip(inside, first))
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)
    cached(w, 2)
    assert len(calls) == 5  # caches off: computed every time


def test_traced_weights_are_computed_not_read_from_disk(monkeypatch, tmp_path):
    """Tracing hands the ops fake and meta tensors: their values come from ``compute`` (fake ones,
    for a fake weight), and nothing reaches the disk."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lecompile.cache import on_disk
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cached = on_disk(lambda weight: (weight.t() * 2,), "test")
    with FakeTensorMode() as mode:
        fake, = cached(mode.from_tensor(torch.randn(4, 3)))
    meta, = cached(torch.randn(4, 3, device="meta"))
    assert fake.shape == meta.shape == (3, 4) and meta.device.type == "meta"
    assert not (tmp_path / "lecompile").exists()


def test_no_usable_cache_directory_only_costs_the_computation(monkeypatch, tmp_path):
    from lecompile.cache import on_disk
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(blocked))
    w = torch.randn(4, 4)
    p, = on_disk(lambda weight: (weight * 2,), "test")(w)
    torch.testing.assert_close(p, w * 2)
