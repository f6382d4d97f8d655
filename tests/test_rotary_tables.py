"""lecompile.passes.rotary_tables: rotary cos/sin tables computed once, values unchanged."""

import copy
import re

import torch
from torch._inductor.utils import run_and_get_code

import lecompile
from lecompile import LongExposureConfig
from lecompile.passes import rotary_tables, run_passes

from models import batch, dynamo_graphs, tiny_model, train_step


def _captured(fn, *args, **kwargs):
    """The one graph Dynamo hands a backend for ``fn(*args, **kwargs)``, and its example inputs."""
    graphs = dynamo_graphs(fn, *args, **kwargs)
    assert len(graphs) == 1
    return graphs[0]


def _tables(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is rotary_tables.REALIZE]


def test_the_cos_and_sin_tables_of_a_llama_end_in_one_realization_each():
    gm, example_inputs = _captured(tiny_model("llama", "lora"), **batch())
    report = run_passes(gm, example_inputs, LongExposureConfig())
    tables = _tables(gm)
    assert len(tables) == 2, gm.code
    for table in tables:  # after cos/sin, the scaling by attention_scaling and the cast
        node = table.args[0]
        assert node.target == "to"
        assert {u.target for u in table.users} == {"unsqueeze"} and len(table.users) == 2  # both layers read it
        while node.target not in ("cos", "sin"):
            node = node.args[0]
    assert rotary_tables.NOTE.format(n=2) in report.notes


def test_disabled_by_name_or_outside_training():
    gm, example_inputs = _captured(tiny_model("llama", "lora"), **batch())
    run_passes(gm, example_inputs, LongExposureConfig(disable=frozenset({"rotary_tables"})))
    assert not _tables(gm)
    model = tiny_model("llama", "lora").eval()
    gm, example_inputs = _captured(model, **batch())
    run_passes(gm, example_inputs, LongExposureConfig(), module_training=False)
    assert not _tables(gm)


def _compiled_step(config, dtype=torch.float32):
    model = tiny_model("llama", "lora", dtype=dtype)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lecompile.LongExposureBackend(config))
    return run_and_get_code(lambda: train_step(compiled, model, batch()))


def _kernels_computing(code: str, op: str) -> int:
    """How many of Inductor's CPU kernels in ``code`` evaluate ``op`` (``.cos()`` on vectors)."""
    kernels = re.split(r"async_compile\.cpp_pybinding", code)[1:]
    return sum(1 for kernel in kernels if re.search(rf"[.:]{op}\(", kernel.split("'''")[1]))


def test_inductor_evaluates_each_table_once_and_the_step_is_unchanged():
    (loss, grads), codes = _compiled_step(LongExposureConfig())
    (plain_loss, plain_grads), plain_codes = _compiled_step(LongExposureConfig(disable=frozenset({"rotary_tables"})))
    for op in ("cos", "sin"):
        assert sum(_kernels_computing(c, op) for c in codes) == 1, op
        assert sum(_kernels_computing(c, op) for c in plain_codes) > 1, op  # inlined into every rotary kernel
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_bf16_model_keeps_fp32_tables_and_inductors_numbers():
    """The table is realized before the cast to bf16, and the backward recomputes that cast
    rather than keeping the rounded table: the step's numbers are exactly Inductor's."""
    gm, example_inputs = _captured(tiny_model("llama", "lora", dtype=torch.bfloat16), **batch())
    run_passes(gm, example_inputs, LongExposureConfig())
    tables = _tables(gm)
    assert len(tables) == 2 and all(t.args[0].meta["example_value"].dtype == torch.float32 for t in tables)
    assert all([u.kwargs.get("dtype") for u in t.users] == [torch.bfloat16] for t in tables), gm.code

    (loss, grads), _ = _compiled_step(LongExposureConfig(), torch.bfloat16)
    (plain_loss, plain_grads), _ = _compiled_step(LongExposureConfig(disable=frozenset({"rotary_tables"})),
                                                  torch.bfloat16)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)


def _angles(x, theta, w):
    return (x * torch.cos(theta) * 2.0).sum() + (torch.sin(theta * w) * x).sum()


def test_tables_that_need_a_gradient_or_mix_in_another_tensor_are_left_alone():
    x = torch.randn(4, 8, requires_grad=True)
    theta = torch.randn(4, 8, requires_grad=True)  # trainable angles: sin(theta * w) needs a gradient
    w = torch.randn(4, 8)
    gm, example_inputs = _captured(_angles, x, theta, w)
    run_passes(gm, example_inputs, LongExposureConfig())
    assert not _tables(gm), gm.code

    theta = torch.randn(4, 8)  # now cos(theta) qualifies; "x * cos" mixes in x, so it ends at cos itself
    gm, example_inputs = _captured(_angles, x, theta, w)
    run_passes(gm, example_inputs, LongExposureConfig())
    tables = _tables(gm)
    assert len(tables) == 2
    assert {t.args[0].target for t in tables} == {torch.cos, torch.sin}
    expected = _angles(x, theta, w)
    torch.testing.assert_close(gm(*example_inputs)[0], expected)


def test_the_pass_keeps_a_copy_of_the_graph_valid_to_rerun():
    gm, example_inputs = _captured(tiny_model("qwen2", "lora"), **batch())
    before = copy.deepcopy(gm)
    run_passes(gm, example_inputs, LongExposureConfig())
    assert len(_tables(gm)) == 2
    torch.testing.assert_close(gm(*example_inputs)[0], before(*example_inputs)[0])


def _bias_in_place(x, bias):
    out = x * 2
    out[0].add_(bias)  # its result unused, as GPT-OSS's experts add their biases
    return out


def test_the_rewrites_recompile_keeps_in_place_ops_whose_result_is_unused():
    """The passes' dead-code elimination (after this pass's insertions too) keeps ``add_`` on a view:
    dropping it had left GPT-OSS's expert biases without gradients."""
    from lecompile.passes.graph import recompile
    gm = torch.fx.symbolic_trace(_bias_in_place)
    x, bias = torch.randn(3, 4), torch.randn(4)
    recompile(gm)
    assert any(n.target == "add_" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x, bias), _bias_in_place(x, bias))
