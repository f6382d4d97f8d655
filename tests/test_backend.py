"""The backend on hand-written modules: renamed layers, adapters, fallbacks, dumps, entry point."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lecompile
from lecompile import LongExposureConfig
from lecompile.passes import LAYER_GRAPH

from models import needs_opt_one_graph

SPARSE_HALF = LongExposureConfig(mlp_density=0.5)


class RenamedMLP(nn.Module):
    """An MLP whose names match no known model, with a bottleneck adapter after it."""

    def __init__(self, d=32, ffn=256, activation=nn.GELU(), between=nn.Identity(), adapter=True):
        super().__init__()
        self.widen, self.squash, self.between, self.narrow = nn.Linear(d, ffn), activation, between, nn.Linear(ffn, d)
        self.adapter = nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, d)) if adapter else None
        for p in (*self.widen.parameters(), *self.narrow.parameters()):
            p.requires_grad_(False)
        self.widen.bias.requires_grad_(True)  # BitFit on one bias

    def forward(self, x):
        y = self.narrow(self.between(self.squash(self.widen(x))))
        if self.adapter is not None:
            y = y + self.adapter(y)
        return x + y


class Repeated(nn.Module):
    """``block`` as layer 0 of a stack, where decoder MLPs sit in a model (``layers.0.widen``):
    lecompile rewrites only MLPs inside a repeated block."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([block])

    def forward(self, x):
        return self.layers[0](x)


def run(model, backend, x):
    out = torch.compile(model, backend=backend)(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def assert_same_as_eager(model, config, x):
    torch._dynamo.reset()
    eager_out, eager_grads = run(model, "eager", x)
    backend = lecompile.longexposure(config)
    out, grads = run(model, backend, x)
    torch.testing.assert_close(out, eager_out, atol=2e-5, rtol=1e-4)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=2e-5, rtol=1e-4, msg=name)
    return backend.report


def test_renamed_gelu_mlp_with_bottleneck_adapter_matches():
    torch.manual_seed(0)
    report = lecompile.explain(Repeated(RenamedMLP()), torch.randn(2, 8, 32), config=SPARSE_HALF)
    by_pattern = {e.pattern: e for e in report.mlp}
    assert by_pattern["gelu"].rewritten and by_pattern["gelu"].layer == "layers.0"
    assert by_pattern["gelu"].peft == ["fc1:bias"] and by_pattern["gelu"].k == 128
    # The adapter itself is a tiny ReLU MLP: matched, but k covers all 8 neurons.
    assert by_pattern["relu"].ffn == 8 and by_pattern["relu"].k == 8 and not by_pattern["relu"].rewritten
    assert "covers all 8 neurons" in by_pattern["relu"].note
    report = assert_same_as_eager(Repeated(RenamedMLP()), LongExposureConfig(mlp_density=1.0), torch.randn(2, 8, 32))
    assert len(report.mlp) == 2 and report.mlp_rewritten == 0


def test_activation_dropout_is_reported_and_left_dense():
    torch.manual_seed(0)
    model = Repeated(RenamedMLP(between=nn.Dropout(0.0), adapter=False))
    report = assert_same_as_eager(model, LongExposureConfig(mlp_density=0.5), torch.randn(2, 8, 32))
    assert report.mlp == []
    assert any("dropout" in u.reason and "not elementwise" in u.reason for u in report.unmatched), str(report)


def test_unknown_activation_is_reported():
    torch.manual_seed(0)
    model = Repeated(RenamedMLP(activation=nn.Softplus(), adapter=False))
    report = assert_same_as_eager(model, LongExposureConfig(mlp_density=0.5), torch.randn(2, 8, 32))
    assert report.mlp == [] and "activation `call_function softplus` is not one lecompile computes" in str(report)


def test_activation_equal_to_relu_on_probes_is_matched_by_its_op_and_refused():
    """``hardtanh(x, 0, 10)`` equals ReLU on [-8, 8]; it is refused by its op, and computed as written."""
    torch.manual_seed(0)
    model = Repeated(RenamedMLP(activation=nn.Hardtanh(0.0, 10.0), adapter=False))
    report = assert_same_as_eager(model, LongExposureConfig(mlp_density=0.5), 20 * torch.randn(2, 8, 32))
    assert report.mlp == [] and "activation `call_function hardtanh` is not one lecompile computes" in str(report)


def test_mlp_outside_a_repeated_block_is_left_to_inductor_and_named():
    """A head on top of the model (Linear -> ReLU -> Linear, no layer index) is no decoder MLP."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", Repeated(RenamedMLP(adapter=False)))
    model.add_module("value_head", nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 1)))
    report = lecompile.explain(model, torch.randn(2, 8, 32), config=LongExposureConfig(mlp_density=0.5))
    assert [(e.layer, e.rewritten) for e in report.mlp] == [("body.layers.0", True)], str(report)
    assert any("`value_head` is not a decoder MLP" in u.reason for u in report.unmatched), str(report)


def test_decoder_layer_compiled_alone_keeps_its_mlp():
    """Dynamo compiles one graph per decoder layer for some models (OPT on transformers 5.17):
    module paths then start at the layer, without a layer index; the MLP writes the residual."""
    from models import BATCH, HIDDEN, SEQ, tiny_model
    layer = tiny_model("opt", "lora").base_model.model.model.decoder.layers[0]
    hidden = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    config = LongExposureConfig.create(mlp_density=0.5, k_align=64, predictor="oracle")
    report = lecompile.explain(layer, hidden, config=config)
    assert [(e.layer, e.rewritten) for e in report.mlp] == [("fc1->fc2", True)], str(report)
    assert report.notes == [LAYER_GRAPH] and "note: decoder layer(s) without a layer index" in str(report)


def test_layers_compiled_one_by_one_share_a_graph_and_stay_exact():
    """Regional compilation (``layer.compile(...)`` per decoder layer, PyTorch's recipe for short
    compiles): identical layers after the first reuse one graph, rewritten like a whole model's."""
    import copy

    import peft
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=8, target_modules="all-linear"))
    eager = copy.deepcopy(model)
    backend = lecompile.LongExposureBackend(LongExposureConfig())
    for layer in model.base_model.model.model.layers:
        layer.compile(backend=backend)
    ids = torch.randint(0, 256, (2, 64))
    losses = [m(input_ids=ids, labels=ids, use_cache=False).loss for m in (model, eager)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (model, eager)]
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, msg=name)
    # the first layer's input needs no gradient (frozen embeddings): a graph of its own
    assert len(backend.reports) == 2
    assert all(r.linears_fused == 7 and len(r.mlp) == 1 and r.notes == [LAYER_GRAPH] for r in backend.reports)


def test_graph_without_mlp_compiles_as_inductor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    report = assert_same_as_eager(model, None, torch.randn(3, 16))
    assert report.graphs == 1 and report.mlp == [] and report.unmatched == []


def test_inference_graph_is_left_dense():
    torch.manual_seed(0)
    model = Repeated(RenamedMLP(adapter=False))
    x = torch.randn(2, 8, 32)
    backend = lecompile.longexposure(LongExposureConfig(mlp_density=0.5))
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        torch.testing.assert_close(out, model(x))
    [entry] = backend.report.mlp
    assert not entry.rewritten and "inference graph" in entry.note


@pytest.mark.parametrize("granularity,seq,expected,note", [
    ("tile", 32, "tile", ""), ("tile", 24, "sequence", "not a multiple of tile_size"),
    ("batch", 32, "batch", ""), ("sequence", 32, "sequence", "")])
def test_granularity(granularity, seq, expected, note):
    model = Repeated(RenamedMLP(adapter=False))
    config = LongExposureConfig.create(mlp_density=0.5, granularity=granularity, tile_size=16)
    report = lecompile.explain(model, torch.randn(2, seq, 32), config=config)
    [entry] = report.mlp
    assert entry.granularity == expected and note in entry.note and entry.k == 128


def test_report_names_groups_on_compact_copies(monkeypatch):
    """Groups of ``COMPACT_MIN_GROUP_TOKENS`` tokens or more (lowered here) run their GEMMs on
    cuBLAS over compact copies of the kept rows, and the report says so."""
    from lecompile.kernels import gather_gemm
    monkeypatch.setattr(gather_gemm, "COMPACT_MIN_GROUP_TOKENS", 64)
    notes = {}
    for granularity in ("batch", "sequence"):
        config = LongExposureConfig(mlp_density=0.5, granularity=granularity)
        [entry] = lecompile.explain(Repeated(RenamedMLP(adapter=False)), torch.randn(2, 32, 32), config=config).mlp
        notes[granularity] = entry.note
    assert "64-token groups: on CUDA the GEMMs run on cuBLAS over compact copies" in notes["batch"]
    assert "compact copies" not in notes["sequence"]


def test_explain_report_and_dumps(tmp_path, monkeypatch):
    monkeypatch.setenv("LECOMPILE_DUMP_DIR", str(tmp_path))
    torch._dynamo.reset()
    report = lecompile.explain(Repeated(RenamedMLP()), torch.randn(2, 8, 32), config=SPARSE_HALF)
    assert "gelu" in str(report) and "lecompile report: 1 graph(s)" in str(report)
    data = json.loads(report.to_json())
    assert data["mlp"][0]["pattern"] == "gelu" and data["mlp"][0]["k"] == 128
    names = sorted(p.name.split("_", 3)[-1] for p in tmp_path.iterdir())
    assert names == ["after.py", "before.py", "report.json", "report.txt"]
    after = next(tmp_path.glob("*_after.py")).read_text()
    before = next(tmp_path.glob("*_before.py")).read_text()
    assert "lecompile.sparse_mlp" in after and "predict_neurons" in after
    assert "sparse_mlp" not in before and "gelu" in before


def test_backend_rejects_wrong_config_type():
    with pytest.raises(TypeError, match="LongExposureConfig"):
        lecompile.longexposure({"mlp_density": 0.5})


def run_fresh(code: str, **env) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LECOMPILE_MLP_DENSITY": "0.5", **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return out


TINY_STEP = (
    "mlp = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))\n"
    "f = torch.compile(torch.nn.Sequential(mlp), backend='longexposure')  # the MLP as layer 0 of a stack\n"
    "f(torch.randn(2, 4, requires_grad=True)).sum().backward()\n"
)


@pytest.mark.skipif("longexposure" not in importlib.metadata.entry_points(group="torch_dynamo_backends").names,
                    reason="lecompile is not pip-installed, so its entry point is not registered")
def test_entry_point_resolves_in_fresh_interpreter():
    out = run_fresh("import sys, torch\nassert 'lecompile' not in sys.modules\n" + TINY_STEP +
                    "from torch._dynamo.utils import counters\n"
                    "print('lecompile' in sys.modules, counters['lecompile']['sparse_mlp'])\n")
    assert out.stdout.split() == ["True", "1"]


def test_torch_logs_reach_the_lecompile_logger():
    out = run_fresh("import torch\n" + TINY_STEP, TORCH_LOGS="+lecompile")
    assert "1 MLP block(s) rewritten of 1 matched" in out.stderr  # INFO
    assert "lecompile report:" in out.stderr  # DEBUG (the "+")


def test_sparse_mlps_on_cuda_without_cuda_graphs_are_flagged():
    from types import SimpleNamespace

    from lecompile.backend import python_bound
    from lecompile.report import Report
    report = lecompile.explain(Repeated(RenamedMLP()), torch.randn(2, 8, 32, requires_grad=True),
                               config=LongExposureConfig(mlp_density=0.5, granularity="batch"))
    assert report.mlp_rewritten == 1
    on_cuda = [SimpleNamespace(is_cuda=True)]  # stands for a CUDA example input
    assert python_bound(report, on_cuda, {})
    assert not python_bound(report, on_cuda, {"triton.cudagraphs": True})
    assert not python_bound(report, [torch.randn(2)], {})
    assert not python_bound(Report(), on_cuda, {})


class BrokenMLP(RenamedMLP):
    def forward(self, x):
        h = self.squash(self.widen(x))
        torch._dynamo.graph_break()
        return self.narrow(h)


def test_graph_break_inside_an_mlp_is_reported():
    report = lecompile.explain(Repeated(BrokenMLP(adapter=False)), torch.randn(2, 8, 32))
    assert report.graphs == 2 and report.mlp == []
    assert any("not between two linear layers" in u.reason for u in report.unmatched), str(report)


def test_lora_dropout_and_steady_steps_without_recompiles():
    """LoRA with dropout > 0 still matches (fc1's dropout stays in the graph, fc2's moves into
    the op), every adapter gets a gradient, and new batches of the same shape reuse the graph."""
    import peft

    from models import ARCHS, batch, tiny_model

    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_model("llama", "plain"), peft.LoraConfig(
        r=4, target_modules=ARCHS["llama"][1], lora_dropout=0.1, init_lora_weights=False))
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=0.5, k_align=64))
    compiled = torch.compile(model, backend=backend)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        loss = compiled(**batch(seed=step)).loss
        loss.backward()
        assert torch.isfinite(loss)
    assert len(backend.reports) == 1, "a new batch recompiled the graph"
    assert backend.report.mlp_rewritten == 2 and all("fc2:lora" in e.peft for e in backend.report.mlp)
    lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(g is not None and g.abs().sum() > 0 for g in lora.values())


@pytest.mark.slow
def test_fuse_adapters_switch_and_bf16_step_close_to_peft():
    """Every LoRA linear outside a sparse MLP becomes ``lora_linear`` (and none with
    ``fuse_adapters=False``); a bf16 step with adapters on tensor cores stays within bf16
    tolerance of PEFT's fp32-adapter eager step, and its adapter gradients stay fp32."""
    from torch._dynamo.utils import counters

    from models import ARCHS, LAYERS, batch, tiny_model, train_step

    model, inputs = tiny_model("llama", "lora", dtype=torch.bfloat16), batch()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    eager_loss, eager_grads = train_step(model, model, inputs)
    lora_linears = LAYERS * len(ARCHS["llama"][1])
    for fuse, fused in ((False, 0), (True, lora_linears)):
        torch._dynamo.reset()
        counters.clear()
        backend = lecompile.longexposure(LongExposureConfig(mlp_density=1.0, disable=() if fuse else {"fuse_lora"}))
        loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
        assert counters["lecompile"]["lora_linear"] == fused, str(backend.report)
        assert backend.report.linears_fused == fused
        torch.testing.assert_close(loss, eager_loss, atol=2e-2, rtol=2e-2)
        for name, g in grads.items():
            assert g.dtype == eager_grads[name].dtype, name
            scale = eager_grads[name].abs().max().item()
            torch.testing.assert_close(g, eager_grads[name], atol=5e-2 * scale, rtol=0, msg=name)
    assert "disable={'fuse_lora'}" not in str(backend.report)


@pytest.mark.slow
def test_share_lora_input_groups_linears_of_one_input():
    """q_proj and v_proj read one input: with ``share_lora_input`` they become one
    ``lora_linears`` call (the report says so), with the same loss and gradients as without."""
    from models import batch, tiny_model, train_step

    model, inputs = tiny_model("llama", "lora"), batch()
    results = {}
    for share in (True, False):
        torch._dynamo.reset()
        backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=1.0, share_lora_input=share))
        results[share] = train_step(torch.compile(model, backend=backend), model, inputs)
        shared = {e.layer: e.shared_with for e in backend.report.linears if e.shared_with}
        if share:
            q = next(layer for layer in shared if layer.endswith("q_proj"))
            assert shared[q] == [q.replace("q_proj", "v_proj")], str(backend.report)
            assert "A-projection shared with" in str(backend.report)
        else:
            assert not shared, str(backend.report)
        assert backend.report.linears_fused == len(backend.report.linears) > 0
    (loss, grads), (loss_off, grads_off) = results[True], results[False]
    torch.testing.assert_close(loss, loss_off)
    assert grads.keys() == grads_off.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_off[name], msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_in_gemm_runs_the_kernel_with_the_same_loss_and_gradients(arch, monkeypatch):
    """``lora_in_gemm=True``: every LoRA linear of an fp16 model with rank-8 adapters takes the
    low-rank GEMM kernel (Triton's interpreter here; GPT-2's transposed Conv1D weights too), the
    report says so, and loss and gradients match ``False``."""
    from models import batch, tiny_model, train_step
    module = importlib.import_module("lecompile.ops.lora_linear")
    if module.lowrank_gemm is None:
        pytest.skip("needs Triton >= 3.4")
    monkeypatch.setattr(module, "INTERPRET_ON_CPU", True)
    model, inputs = tiny_model(arch, "lora", dtype=torch.float16, rank=8), batch()
    results = {}
    for mode in (True, False):
        torch._dynamo.reset()
        backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=1.0, lora_in_gemm=mode))
        results[mode] = train_step(torch.compile(model, backend=backend), model, inputs)
        in_gemm = [e.in_gemm for e in backend.report.linears]
        assert len(in_gemm) > 0 and all(e.fused for e in backend.report.linears)
        assert all(in_gemm) if mode else not any(in_gemm), str(backend.report)
    assert "B in GEMM" in str(backend.report)
    (loss, grads), (loss_off, grads_off) = results[True], results[False]
    torch.testing.assert_close(loss, loss_off, atol=1e-2, rtol=1e-3)
    assert grads.keys() == grads_off.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        scale = grads_off[name].abs().max().item()
        torch.testing.assert_close(grads[name], grads_off[name], atol=2e-2 * scale, rtol=0, msg=name)


def test_linears_of_one_input_join_only_when_their_operands_come_first():
    """A group's call goes before its first member's output: a linear whose bias is computed after
    that point keeps its own call; one reading only graph inputs joins."""
    import torch.fx as fx
    import torch.nn.functional as F

    from lecompile.ops.adapted_linear import AdaptedLinear
    from lecompile.passes.fold_adapters import LinearMatch
    from lecompile.passes.fuse_lora import _shared_input_groups

    graph = fx.Graph()
    x, *params = (graph.placeholder(name) for name in ("x", "w1", "a1", "b1", "w2", "a2", "b2", "w3", "a3", "b3"))

    def lin(name, w, a, b, bias=None):
        out = graph.call_function(F.linear, (x, w, bias))
        return LinearMatch(AdaptedLinear(w, bias, lora_a=a, lora_b=b), x, out, name, 4, 4)
    first = lin("q", *params[0:3])
    late_bias = graph.call_function(torch.neg, (params[0],))
    late = lin("k", *params[3:6], bias=late_bias)
    third = lin("v", *params[6:9])
    groups = _shared_input_groups(graph, [first, late, third])
    assert [[m.name for m in g] for g in groups] == [["q", "v"], ["k"]]


def test_cli_explain_and_dump_a_checkpoint(tmp_path, capsys):
    """``lecompile dump --model PATH`` prints the report and writes the graphs of a saved model."""
    from lecompile.cli import main

    from models import tiny_model

    tiny_model("llama", "plain").save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "dump"
    assert main(["dump", "--model", str(tmp_path / "ckpt"), "--out", str(out), "--seq", "16"]) == 0
    assert "MLP block(s) matched" in capsys.readouterr().out
    names = {p.name.split("_", 3)[-1] for p in out.iterdir()}
    assert {"before.py", "after.py", "report.txt", "report.json"} <= names


class MatmulLinear(nn.Linear):
    """A linear written as ``x @ W.T + b`` (Falcon's ``FalconLinear``)."""

    def forward(self, x):
        h = x @ self.weight.T
        return h if self.bias is None else h + self.bias


class MatmulMLP(nn.Module):
    def __init__(self, d=32, ffn=256):
        super().__init__()
        self.up, self.down = MatmulLinear(d, ffn, bias=False), MatmulLinear(ffn, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def test_linears_written_as_matmul_with_the_transposed_weight():
    import peft
    torch.manual_seed(0)
    model = peft.get_peft_model(Repeated(MatmulMLP()), peft.LoraConfig(r=4, target_modules=["up", "down"],
                                                             init_lora_weights=False))
    x = torch.randn(2, 16, 32)
    report = assert_same_as_eager(model, LongExposureConfig(mlp_density=1.0), x)
    assert len(report.mlp) == 1 and report.mlp[0].peft == ["fc1:lora", "fc2:lora"], str(report)
    assert report.linears_fused == 2
    assert_same_as_masked_reference(model, model.base_model.model.layers[0].down, x)


def assert_same_as_masked_reference(model, fc2, x):
    """At density 0.5 (oracle over the batch) the backend computes what eager computes with the
    intermediate masked to the top half of ``fc2``'s input neurons: outputs and gradients."""
    def keep_top_half(module, args):  # the oracle's choice over the whole batch, masked in eager
        h = args[0]
        top = h.detach().square().reshape(-1, h.shape[-1]).sum(0).topk(h.shape[-1] // 2).indices
        return (h * torch.zeros(h.shape[-1]).index_fill_(0, top, 1.0),)

    with torch.no_grad():
        dense_out = model(x)
    handle = fc2.register_forward_pre_hook(keep_top_half)
    torch._dynamo.reset()
    ref_out, ref_grads = run(model, "eager", x)
    handle.remove()
    backend = lecompile.longexposure(LongExposureConfig(mlp_density=0.5, predictor="oracle", granularity="batch"))
    out, grads = run(model, backend, x)
    assert backend.report.mlp_rewritten == 1
    assert not torch.allclose(ref_out, dense_out, atol=1e-3), "masking had no effect: the test cannot fail"
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


class TanhGelu(torch.autograd.Function):
    """An activation as a custom autograd.Function (BLOOM's GeLUFunction is one)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.gelu(x, approximate="tanh")

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.7978845608 * x * (1 + 0.044715 * x * x))
        return grad * (0.5 * x * (1 - t * t) * (0.7978845608 + 0.1070322243 * x * x) + 0.5 * (1 + t))


class FunctionMLP(RenamedMLP):
    def forward(self, x):
        return x + self.narrow(TanhGelu.apply(self.widen(x)))


def test_activation_in_a_custom_autograd_function_is_reported_and_left_dense():
    torch.manual_seed(0)
    model, x = Repeated(FunctionMLP(adapter=False)), torch.randn(2, 8, 32)
    report = assert_same_as_eager(model, LongExposureConfig(mlp_density=0.5), x)
    assert report.mlp_rewritten == 0
    assert any("custom autograd.Function" in u.reason for u in report.unmatched), str(report)


class BloomGelu(torch.autograd.Function):
    """BLOOM's GeLUFunction, as transformers writes it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, grad_output):
        x = ctx.saved_tensors[0]
        tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        ff = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)
        return ff * grad_output


class BloomGeluOtherBackward(BloomGelu):
    """The same forward with another backward: not the known Function."""

    @staticmethod
    def backward(ctx, grad_output):
        return 2 * grad_output


class BloomMLP(RenamedMLP):
    function = BloomGelu

    def forward(self, x):
        return x + self.narrow(self.function.apply(self.widen(x)))


def test_a_known_autograd_function_becomes_its_op_and_the_mlp_is_rewritten():
    torch.manual_seed(0)
    model, x = Repeated(BloomMLP(adapter=False)), torch.randn(2, 8, 32)
    report = assert_same_as_eager(model, LongExposureConfig(), x)
    assert [m.pattern for m in report.mlp] == ["gelu_tanh"], str(report)
    assert_same_as_masked_reference(model, model.layers[0].narrow, x)


def test_a_function_that_differs_from_a_known_one_is_left_alone():
    torch.manual_seed(0)
    mlp = BloomMLP(adapter=False)
    mlp.function = BloomGeluOtherBackward
    report = assert_same_as_eager(Repeated(mlp), LongExposureConfig(mlp_density=0.5), torch.randn(2, 8, 32))
    assert report.mlp_rewritten == 0
    assert any("custom autograd.Function" in u.reason for u in report.unmatched), str(report)


@pytest.mark.slow
def test_recompute_pointwise_keeps_less_for_the_backward_with_the_same_gradients():
    from models import batch, tiny_model

    model, inputs = tiny_model("opt", "lora"), batch()
    # the norms' outputs are what it recomputes; with their backward from the output they are kept anyway
    config = LongExposureConfig.create(mlp_density=0.5, k_align=64, disable={"norms_from_output"})
    kept, loss, grads, _ = saved_bytes_and_grads(model, inputs, config.replace(recompute_pointwise=True))
    kept_off, want_loss, want_grads, _ = saved_bytes_and_grads(model, inputs, config)
    assert kept < kept_off, (kept, kept_off)
    torch.testing.assert_close(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], msg=name)


def saved_for_backward(model, inputs, backend):
    """The tensors ``model``'s step compiled with ``backend`` keeps for the backward (parameters
    left out), and the loss; the backward has run."""
    saved = []

    def pack(t):
        if not isinstance(t, nn.Parameter):
            saved.append(t)
        return t

    torch._dynamo.reset()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.compile(model, backend=backend)(**inputs).loss
    loss.backward()
    return saved, loss.detach()


def saved_bytes_and_grads(model, inputs, config):
    """Bytes the compiled forward keeps for the backward (one entry per storage, parameters left
    out), the loss, the gradients and the backend's report."""
    backend = lecompile.longexposure(config)
    saved, loss = saved_for_backward(model, inputs, backend)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return sum(storages.values()), loss, grads, backend.report


def test_bf16_step_keeps_no_fp32_copy_of_an_activation():
    """PEFT casts each LoRA input to its fp32 adapters' dtype. Inductor keeps those fp32 copies for
    the backward (the positive control); lecompile's LoRA op keeps the bf16 input it already has."""
    from models import BATCH, HIDDEN, SEQ, batch, tiny_model

    def fp32_activations_kept(backend):
        saved, _ = saved_for_backward(tiny_model("llama", "lora", dtype=torch.bfloat16), batch(), backend)
        return [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.numel() >= BATCH * SEQ * HIDDEN]

    assert fp32_activations_kept("inductor"), "PEFT's fp32 casts of the LoRA inputs are kept under Inductor"
    assert fp32_activations_kept(lecompile.longexposure(LongExposureConfig())) == []


@pytest.mark.slow
@pytest.mark.parametrize("arch", [pytest.param("opt", marks=needs_opt_one_graph), "gpt2", "llama", "qwen2"])
def test_layer_norms_keep_their_output_with_the_same_gradients(arch):
    """Layer norms (OPT, GPT-2) and Hugging Face's decomposed RMS norms (LLaMA, Qwen2)."""
    from models import batch, tiny_model

    model, inputs = tiny_model(arch, "lora"), batch()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:  # |bias| <= |weight|, as the pass requires
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.rand_like(p) - 0.5)
    config = LongExposureConfig.create(mlp_density=0.5, k_align=64)
    kept, loss, grads, report = saved_bytes_and_grads(model, inputs, config)
    kept_off, want_loss, want_grads, _ = saved_bytes_and_grads(
        model, inputs, config.replace(disable={"norms_from_output"}))
    assert len(report.norms) == 2 * 2 + 1 and all(e.from_output for e in report.norms), str(report)
    assert f"layer norms: {len(report.norms)} of {len(report.norms)} keep their output" in str(report)
    hidden = inputs["input_ids"].numel() * model.config.hidden_size * 4
    # layer 0's first norm has no backward (nothing before it trains); the other three inputs go
    assert kept_off - kept >= 3 * hidden, (kept, kept_off)
    torch.testing.assert_close(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_rms_norms_with_a_zero_weight_or_trainable_keep_their_input():
    from models import batch, tiny_model

    model = tiny_model("llama", "lora")
    with torch.no_grad():
        model.base_model.model.model.norm.weight[3] = 0.0
    model.base_model.model.model.layers[1].input_layernorm.weight.requires_grad_(True)
    _, _, _, report = saved_bytes_and_grads(model, batch(), LongExposureConfig.create(mlp_density=0.5, k_align=64))
    notes = {e.layer: e.note for e in report.norms}
    assert "a weight is 0" in notes["model.norm"], notes
    assert "trainable weight" in notes["model.layers.1.input_layernorm"], notes
    assert "layer norms: 3 of 5 keep their output" in str(report)


@pytest.mark.slow
@needs_opt_one_graph
def test_layer_norms_with_large_biases_or_trainable_keep_their_input():
    from models import batch, tiny_model

    model = tiny_model("opt", "bias")  # BitFit: the norms' biases train
    with torch.no_grad():
        model.model.decoder.final_layer_norm.bias.fill_(3.0)
    model.model.decoder.final_layer_norm.bias.requires_grad_(False)
    _, _, _, report = saved_bytes_and_grads(model, batch(), LongExposureConfig.create(mlp_density=0.5, k_align=64))
    notes = {e.layer: e.note for e in report.norms}
    assert not any(e.from_output for e in report.norms), str(report)
    assert "|bias| / |weight| reaches 3 (> 1)" in notes["model.decoder.final_layer_norm"], notes
    assert "trainable weight or bias" in notes["model.decoder.layers.0.self_attn_layer_norm"], notes
    assert "layer norms: 0 of 5 keep their output" in str(report)


@pytest.mark.slow
def test_registered_backend_keeps_one_warmup_across_recompiles(monkeypatch):
    """backend="longexposure": a graph recompiled for a new batch shape after the dense warm-up
    is sparse at once, not warmed up again."""
    from lecompile.backend import registered_backend
    from lecompile.warmup import optimizer_steps

    from models import LAYERS, batch, tiny_model
    steps_before = optimizer_steps()
    monkeypatch.setenv("LECOMPILE_MLP_DENSITY", "0.5")
    monkeypatch.setenv("LECOMPILE_K_ALIGN", "64")
    monkeypatch.setenv("LECOMPILE_PREDICTOR", "oracle")
    monkeypatch.setenv("LECOMPILE_WARMUP_STEPS", "1")
    model = tiny_model("llama", "lora")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    compiled = torch.compile(model, backend="longexposure", dynamic=False)
    for seq in (16, 32):
        ids = batch()["input_ids"].repeat(1, seq // 16)
        compiled(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
    backend = registered_backend(LongExposureConfig.from_env())
    assert optimizer_steps() == steps_before + 2
    # The first shape's dense and sparse forms (both compiled at once), then the second shape's
    # sparse graph alone: no second warm-up.
    assert [r.mlp_rewritten for r in backend.reports] == [0, LAYERS, LAYERS], [str(r) for r in backend.reports]
