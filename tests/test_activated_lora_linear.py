"""``lecompile::activated_lora_linear`` against its composition, ``lora_linear(act(pre) * up)``,
gradients included (the kernel path in Triton's interpreter on CPU machines)."""

import importlib

import pytest
import torch

from lecompile.ops.activated_lora_linear import activate, activated_lora_linear
from lecompile.ops.lora_linear import lora_linear

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu"]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make(dtype, gated, tokens=(2, 24), ffn=48, d_out=40, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, dt=dtype, grad=False, scale=1.0):
        return (scale * torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dt).requires_grad_(grad)
    pre = t(*tokens, ffn, grad=True, scale=8.0)  # pre-activations around the non-linearity's bend
    up = t(*tokens, ffn, grad=True) if gated else None
    weight, bias = t(d_out, ffn), t(d_out, grad=True)
    a, b = t(r, ffn, dt=torch.float32, grad=True), t(d_out, r, dt=torch.float32, grad=True)
    return [pre, up, weight, bias, a, b, 0.5]


def composition(pre, up, activation, weight, bias, a, b, scale):
    return lora_linear(activate(pre, up, activation), weight, bias, None, a, b, scale, False)


def grads_of(fn, args):
    leaves = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    for t in leaves:
        t.grad = None
    y = fn(*args)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
    (y.float() * dy.float()).sum().backward()
    return y.detach(), [t.grad.clone() for t in leaves]


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """The kernel path on CPU tensors (Triton's interpreter); yields the activation-backward launches."""
    module = importlib.import_module("lecompile.ops.lora_linear")
    if module.lowrank_gemm is None:
        pytest.skip("needs Triton >= 3.4")
    monkeypatch.setattr(module, "INTERPRET_ON_CPU", True)
    calls, launch = [], module.lowrank_gemm.linear_low_rank_act_grad

    def counted(a, weight, low_rank, activation, pre, up=None):
        calls.append((activation, up is not None))
        return launch(a, weight, low_rank, activation, pre, up)
    monkeypatch.setattr(module.lowrank_gemm, "linear_low_rank_act_grad", counted)
    return calls


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gated", [False, True])
def test_in_gemm_matches_the_composition(activation, gated, kernel_on_cpu):
    """The backward GEMM ends in the activation's backward: the same output and gradients (``pre``,
    ``up``, ``A``, ``B``, the bias) as ``lora_linear`` of the activation, within bf16 rounding."""
    pre, up, *rest = make(torch.bfloat16, gated)
    args = [pre, up, activation, *rest]
    y, grads = grads_of(lambda *a: activated_lora_linear(*a, True), args)
    assert kernel_on_cpu == [(activation, gated)]
    y_ref, grads_ref = grads_of(composition, args)
    torch.testing.assert_close(y, y_ref, **TOL[torch.bfloat16])
    assert len(grads) == len(grads_ref) == (5 if gated else 4)
    for g, g_ref in zip(grads, grads_ref):
        scale = g_ref.abs().max().item()
        torch.testing.assert_close(g.float(), g_ref.float(), atol=3e-2 * scale, rtol=3e-2)


def test_without_the_kernel_it_is_the_composition(kernel_on_cpu):
    """fp32 activations (no kernel) and ``in_gemm=False`` compute exactly the composition."""
    for dtype, in_gemm in ((torch.float32, True), (torch.bfloat16, False)):
        pre, up, *rest = make(dtype, gated=True)
        args = [pre, up, "silu", *rest]
        y, grads = grads_of(lambda *a: activated_lora_linear(*a, in_gemm), args)
        y_ref, grads_ref = grads_of(composition, args)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    assert kernel_on_cpu == []


def test_compiles_without_graph_breaks(kernel_on_cpu):
    """AOTAutograd traces the op's autograd function and its kernel op (forward and backward)."""
    pre, up, *rest = make(torch.bfloat16, gated=True)
    args = [pre, up, "silu", *rest]
    fn = lambda *a: activated_lora_linear(*a, True)  # noqa: E731
    y, grads = grads_of(fn, args)
    y_c, grads_c = grads_of(torch.compile(fn, backend="inductor", fullgraph=True), args)
    assert kernel_on_cpu == [("silu", True)] * 2
    torch.testing.assert_close(y_c, y, **TOL[torch.bfloat16])
    for g, g_c in zip(grads, grads_c):
        scale = g.abs().max().item()
        torch.testing.assert_close(g_c.float(), g.float(), atol=3e-2 * scale, rtol=3e-2)


def test_bad_arguments_are_named():
    pre, up, *rest = make(torch.bfloat16, gated=True)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        activated_lora_linear(pre, up, "tanh", *rest)
    with pytest.raises(ValueError, match=r"up must match pre \(\(2, 24, 48\)"):
        activated_lora_linear(pre, up[..., :40], "silu", *rest)


def test_act_grad_op_passes_opcheck(kernel_on_cpu):
    gen = torch.Generator().manual_seed(0)
    a, w = torch.randn(32, 40, generator=gen).half(), torch.randn(24, 40, generator=gen).half()
    c, e = torch.randn(32, 8, generator=gen).half(), torch.randn(24, 8, generator=gen).half()
    pre, up = torch.randn(32, 24, generator=gen).half(), torch.randn(32, 24, generator=gen).half()
    for gate in (up, None):
        torch.library.opcheck(torch.ops.lecompile.linear_low_rank_act_grad.default, (a, w, c, e, pre, gate, "silu"),
                              test_utils=("test_schema", "test_faketensor"))
