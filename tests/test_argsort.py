"""``lecompile::argsort`` against ``torch.argsort``, and the backend's sorts reaching Inductor through it."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from lecompile.ops.argsort import argsort
from lecompile.ops.block_attention import kv_block_lists
from lecompile.ops.token_groups import dense_first_order
from lecompile.predictors.attention import choose_layouts


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float32])
def test_matches_torch_argsort(descending, dtype):
    x = torch.randint(0, 3, (2, 3, 37), generator=torch.Generator().manual_seed(0)).to(dtype)
    stable = argsort(x, descending=descending, stable=True)
    assert torch.equal(stable, torch.argsort(x, dim=-1, descending=descending, stable=True))
    # ties in any order: the sorted values agree
    order = argsort(x, descending=descending)
    assert torch.equal(x.gather(-1, order), x.sort(-1, descending=descending).values)


def test_opcheck_on_a_transposed_input():
    # the block lists of the backward read transposed masks: the fake must match the real output
    x = (torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5).to(torch.int8).transpose(-2, -1)
    torch.library.opcheck(argsort, (x,), {"descending": True, "stable": True})


def test_compiles_as_a_call_to_the_op():
    x = torch.randn(4, 300)
    traced = make_fx(lambda x: argsort(x, descending=True), tracing_mode="fake")(x)
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"] == [torch.ops.lecompile.argsort.default]
    compiled = torch.compile(lambda x: argsort(x * 2, descending=True), backend="inductor", fullgraph=True)
    assert torch.equal(compiled(x), torch.argsort(x * 2, dim=-1, descending=True))


def sorts(fn, *args):
    """The sort ops of ``fn``'s graph, as AOTAutograd would hand it to Inductor."""
    graph = make_fx(fn, tracing_mode="fake")(*args).graph
    return sorted({str(n.target) for n in graph.nodes if n.op == "call_function" and "sort" in str(n.target)})


def test_the_backends_sorts_go_through_the_op():
    blocks = torch.rand(1, 2, 8, 8) > 0.5
    mass = torch.rand(1, 2, 8, 8).softmax(-1)
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()
    outputs = torch.rand(64) > 0.7
    assert sorts(kv_block_lists, blocks) == ["lecompile.argsort.default"]
    assert sorts(lambda m, a: choose_layouts(m, a, 0.5), mass, allowed) == ["lecompile.argsort.default"]
    assert sorts(lambda o: dense_first_order(o, 8), outputs) == ["lecompile.argsort.default"]


def test_dense_first_order_and_its_inverse():
    outputs = torch.zeros(6 * 4, dtype=torch.bool)
    outputs[[5, 17, 23]] = True  # groups 1, 4 and 5 hold output tokens
    order, inverse = dense_first_order(outputs, 4)
    assert order.tolist() == [1, 4, 5, 0, 2, 3]
    assert torch.equal(order[inverse], torch.arange(6)) and torch.equal(inverse[order], torch.arange(6))
