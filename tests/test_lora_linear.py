"""``lecompile::lora_linear`` against PEFT's own fp32-adapter math, gradients included."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from lecompile.ops.lora_linear import lora_linear, lora_linears

#: fp32 activations compute exactly what PEFT computes; bf16/fp16 ones round LoRA's [T, r]
#: projection, its output and the adapter gradients to the activation dtype (PEFT rounds only
#: the final sum, and keeps fp32 gradients).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}


def peft_linear(x, weight, bias, lora_input, a, b, scale):
    """PEFT's LoRA forward with ``autocast_adapter_dtype=True``: fp32 adapters, casts around them."""
    lx = x if lora_input is None else lora_input
    result = F.linear(x, weight, bias)
    return (result + F.linear(F.linear(lx.to(a.dtype), a), b) * scale).to(x.dtype)


def make(dtype, tokens=(2, 24), d_in=40, d_out=56, r=8, *, bias=True, train_bias=False,
         train_weight=False, dropout=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, dt=dtype, grad=False):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dt).requires_grad_(grad)
    x = t(*tokens, d_in, grad=True)
    weight = t(d_out, d_in, grad=train_weight)
    b = t(d_out, grad=train_bias) if bias else None
    a, lb = t(r, d_in, dt=torch.float32, grad=True), t(d_out, r, dt=torch.float32, grad=True)
    lora_input = None
    if dropout:  # what PEFT's LoRA dropout hands A: a masked fp32 copy of x, on x's graph
        lora_input = x.float() * (torch.rand(x.shape, generator=g) > 0.25) / 0.75
    return [x, weight, b, lora_input, a, lb, 0.5]


def grads_of(fn, args):
    leaves = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf]
    for t in leaves:
        t.grad = None
    y = fn(*args)
    torch.manual_seed(3)
    dy = torch.randn(y.shape).to(y.device, y.dtype)
    (y.float() * dy.float()).sum().backward(retain_graph=True)
    return y.detach(), [t.grad.clone() for t in leaves]


def op(*args):
    return lora_linear(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["plain", "no_bias", "train_bias", "train_weight", "dropout"])
def test_matches_peft(dtype, case):
    args = make(dtype, bias=case != "no_bias", train_bias=case == "train_bias",
                train_weight=case == "train_weight", dropout=case == "dropout")
    y, grads = grads_of(op, args)
    y_ref, grads_ref = grads_of(peft_linear, args)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert len(grads) == len(grads_ref) >= 3
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad and a.is_leaf]
    for g, g_ref, t in zip(grads, grads_ref, leaves):
        assert g.dtype == t.dtype, "gradients come back in each parameter's own dtype (fp32 adapters)"
        torch.testing.assert_close(g.float(), g_ref.float(), **TOL[dtype])


def test_compiles_without_graph_breaks_and_matches_eager():
    """Inductor traces the op into plain matmuls (forward and the backward it derives)."""
    args = make(torch.bfloat16, train_bias=True)
    y, grads = grads_of(op, args)
    compiled = torch.compile(op, backend="inductor", fullgraph=True)
    y_c, grads_c = grads_of(compiled, args)
    torch.testing.assert_close(y_c, y, **TOL[torch.bfloat16])
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g, **TOL[torch.bfloat16])


def test_gradcheck_float64():
    args = make(torch.float64, tokens=(5,), d_in=6, d_out=7, r=2, train_bias=True, train_weight=True)
    args[4], args[5] = (t.detach().double().requires_grad_() for t in args[4:6])
    assert torch.autograd.gradcheck(lambda *a: op(*a, 0.5), args[:6])


def test_transposed_weight_view():
    """GPT-2's Conv1D stores ``W`` as ``[in, out]``; the pass hands the op ``W.t()``."""
    args = make(torch.float32)
    stored = args[1].t().contiguous()
    args[1] = stored.t()
    torch.testing.assert_close(op(*args), peft_linear(*args))


def test_bad_shapes_name_the_problem():
    x, w, b, li, a, lb, s = make(torch.float32)
    with pytest.raises(ValueError, match="lora_b"):
        lora_linear(x, w, b, li, a, lb.t(), s)
    with pytest.raises(ValueError, match="weight must be"):
        lora_linear(x, torch.cat([w, w], 1), None, li, a, lb, s)


def test_shared_read_experiment_computes_the_op():
    """The benchmark's one-GEMM-against-[W; A] variant is the same math (values and gradients),
    with A's rows of its buffer refreshed every call."""
    from benchmarks.bench_lora_linear import RANK, SCALE, SharedReadLoRA
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=gen, requires_grad=True)
    w, b = torch.randn(40, 48, generator=gen), torch.randn(40, generator=gen)
    a = torch.randn(RANK, 48, generator=gen, requires_grad=True)
    lb = torch.randn(40, RANK, generator=gen, requires_grad=True)
    buf = torch.cat([w, torch.zeros(RANK, 48)])  # stale A rows
    dy = torch.randn(64, 40, generator=gen)
    got = SharedReadLoRA.apply(x, b, a, lb, buf)
    want = lora_linear(x, w, b, None, a, lb, SCALE)
    torch.testing.assert_close(got, want)
    for g, h in zip(torch.autograd.grad(got, (x, a, lb), dy), torch.autograd.grad(want, (x, a, lb), dy)):
        torch.testing.assert_close(g, h)


@pytest.mark.parametrize("tokens", [(2, 24), (48,)])
def test_no_sum_directly_over_a_matmul_forward_or_backward(tokens):
    """Inductor turns ``mm + tensor`` into ``addmm``, which on CUDA copies the addend into the
    output and re-reads it in the GEMM; the op's graph keeps views between its matmuls and the
    adds (as PEFT's does), so the sums fuse into their consumers. Forward and backward."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lecompile.ops.lora_linear import lora_linear_impl
    args = make(torch.bfloat16, tokens=tokens, bias=False)

    def step(x, weight, a, b):
        y = lora_linear_impl(x, weight, None, None, a, b, 0.5)
        return torch.autograd.grad(y.sum(), (x, a, b))

    graph = make_fx(step)(args[0], args[1], args[4], args[5]).graph
    matmuls = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    adds = [n for n in graph.nodes if n.target == torch.ops.aten.add.Tensor]
    assert adds, "the forward's sum and the input gradient's sum are traced"
    for add in adds:
        assert not any(getattr(arg, "target", None) in matmuls for arg in add.args), add.format_node()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [False, True])
def test_linears_of_one_input_match_peft(dtype, dropout):
    """``lora_linears``: linears of one input (different widths, ranks and biases) with their
    A-projections as one GEMM match PEFT's separate linears, gradients included."""
    parts = [make(dtype, d_out=56, r=8, dropout=dropout, seed=1), make(dtype, d_out=24, r=4, bias=False, seed=2),
             make(dtype, d_out=40, r=8, train_bias=True, seed=3)]
    x, lora_input = parts[0][0], parts[0][3]
    flat = [x] + [t for p in parts for t in (p[1], p[2], p[4], p[5])]
    scales = [0.5, 2.0, 1.0]

    def split(flat):
        return flat[0], [flat[i:i + 4] for i in range(1, len(flat), 4)]

    def ours(*flat):
        x, ps = split(flat)
        return torch.cat(lora_linears(x, [p[0] for p in ps], [p[1] for p in ps], lora_input, [p[2] for p in ps],
                                      [p[3] for p in ps], scales), -1)

    def peft(*flat):
        x, ps = split(flat)
        return torch.cat([peft_linear(x, w, b, lora_input, a, lb, s) for (w, b, a, lb), s in zip(ps, scales)], -1)

    y, grads = grads_of(ours, flat)
    y_ref, grads_ref = grads_of(peft, flat)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert len(grads) == len(grads_ref) == 8  # x, three A, three B, one trainable bias
    for g, g_ref in zip(grads, grads_ref):  # sums of several rounded terms: tolerance to scale
        assert g.dtype == g_ref.dtype
        scale = g_ref.abs().max().item()
        torch.testing.assert_close(g.float(), g_ref.float(), atol=TOL[dtype]["atol"] * scale, rtol=TOL[dtype]["rtol"])


def test_linears_of_one_input_check_their_lists():
    x, w, b, li, a, lb, s = make(torch.float32)
    with pytest.raises(ValueError, match="as many weights"):
        lora_linears(x, [w, w], [b], li, [a, a], [lb, lb], [s, s])
    with pytest.raises(ValueError, match="lora_b"):
        lora_linears(x, [w], [b], li, [a], [lb.t()], [s])


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """``in_gemm`` runs the low-rank GEMM kernel on CPU tensors in Triton's interpreter; yields
    a list of the kernel's calls (``(a shape, with low-rank term)``)."""
    module = importlib.import_module("lecompile.ops.lora_linear")
    if module.lowrank_gemm is None:
        pytest.skip("needs Triton >= 3.4")
    monkeypatch.setattr(module, "INTERPRET_ON_CPU", True)
    calls, launch = [], module.lowrank_gemm.linear_low_rank

    def counted(a, weight, bias=None, low_rank=None):
        calls.append((tuple(a.shape), low_rank is not None))
        return launch(a, weight, bias, low_rank)
    monkeypatch.setattr(module.lowrank_gemm, "linear_low_rank", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["plain", "no_bias", "train_bias", "dropout"])
def test_in_gemm_matches_peft(dtype, case, kernel_on_cpu):
    """``in_gemm=True``: the B-projection inside the base GEMM's kernel, forward and input
    gradient (the gradient through ``A`` joins it unless LoRA dropout gives ``A`` its own input)."""
    args = make(dtype, bias=case != "no_bias", train_bias=case == "train_bias", dropout=case == "dropout")
    y, grads = grads_of(lambda *a: lora_linear(*a, True), args)
    assert kernel_on_cpu == [((48, 40), True), ((48, 56), case != "dropout")]
    y_ref, grads_ref = grads_of(peft_linear, args)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad and a.is_leaf]
    for g, g_ref, t in zip(grads, grads_ref, leaves):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g.float(), g_ref.float(), **TOL[dtype])


@pytest.mark.parametrize("case", ["fp32", "train_weight", "rank_4"])
def test_in_gemm_falls_back_where_the_kernel_does_not_apply(case, kernel_on_cpu):
    """fp32 activations (PEFT's exact math), trainable base weights and ranks that are not a
    multiple of 8 keep the cuBLAS path, with the same results as ``in_gemm=False``."""
    args = make(torch.float32 if case == "fp32" else torch.bfloat16, train_weight=case == "train_weight",
                r=4 if case == "rank_4" else 8)
    y, grads = grads_of(lambda *a: lora_linear(*a, True), args)
    y_ref, grads_ref = grads_of(lambda *a: lora_linear(*a, False), args)
    assert kernel_on_cpu == []
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [False, True])
def test_linears_of_one_input_in_gemm_match_separate_ops(dropout, kernel_on_cpu):
    """``lora_linears(in_gemm=True)``: each linear's slice of the shared A-projection goes into
    its own kernel; the backward's first input-gradient GEMM also takes every linear's gradient
    through the stacked ``A``. Same values and gradients as one op per linear."""
    dtype = torch.bfloat16
    parts = [make(dtype, d_out=56, r=8, dropout=dropout, seed=1), make(dtype, d_out=24, r=16, bias=False, seed=2),
             make(dtype, d_out=40, r=8, train_bias=True, seed=3)]
    x, lora_input = parts[0][0], parts[0][3]
    flat = [x] + [t for p in parts for t in (p[1], p[2], p[4], p[5])]
    scales = [0.5, 2.0, 1.0]
    weights, biases, lora_a, lora_b = (list(ts) for ts in zip(*(p[1:3] + p[4:6] for p in parts)))

    def fused(x, *params):
        return torch.cat(lora_linears(x, weights, biases, lora_input, lora_a, lora_b, scales, True), -1)

    def separate(x, *params):
        return torch.cat([lora_linear(x, *linear, s, False)
                          for *linear, s in zip(weights, biases, [lora_input] * 3, lora_a, lora_b, scales)], -1)

    y, grads = grads_of(fused, flat)
    assert len(kernel_on_cpu) == 4 and kernel_on_cpu[-1][1] == (not dropout)
    y_ref, grads_ref = grads_of(separate, flat)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for g, g_ref in zip(grads, grads_ref):
        scale = g_ref.abs().max().item()
        torch.testing.assert_close(g.float(), g_ref.float(), atol=TOL[dtype]["atol"] * scale, rtol=TOL[dtype]["rtol"])


def test_in_gemm_compiles_without_graph_breaks(kernel_on_cpu):
    """AOTAutograd traces the op's autograd function and its kernel op (forward and backward)."""
    args = make(torch.float16, train_bias=True)
    fn = lambda *a: lora_linear(*a, True)  # noqa: E731
    y, grads = grads_of(fn, args)
    y_c, grads_c = grads_of(torch.compile(fn, backend="inductor", fullgraph=True), args)
    torch.testing.assert_close(y_c, y, **TOL[torch.float16])
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g, **TOL[torch.float16])


def test_linear_low_rank_op_passes_opcheck(kernel_on_cpu):
    gen = torch.Generator().manual_seed(0)
    a, w = torch.randn(32, 40, generator=gen).half(), torch.randn(24, 40, generator=gen).half()
    c, e, b = (torch.randn(*s, generator=gen).half() for s in ((32, 8), (24, 8), (24,)))
    torch.library.opcheck(torch.ops.lecompile.linear_low_rank.default, (a, w, b, c, e),
                          test_utils=("test_schema", "test_faketensor"))


def test_in_gemm_takes_the_kernel_on_hopper_gpus_only(monkeypatch):
    """On a GPU the kernel was not built for (here Ampere's 8.0) ``in_gemm=True`` keeps the cuBLAS
    path, and says why; metadata only, as for a fake tensor."""
    from types import SimpleNamespace

    module = importlib.import_module("lecompile.ops.lora_linear")
    if module.lowrank_gemm is None:
        pytest.skip("needs Triton >= 3.4")
    x = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.bfloat16)
    w, a = torch.empty(64, 32, dtype=torch.bfloat16), torch.empty(16, 32, dtype=torch.bfloat16)
    for capability, runs in (((9, 0), True), ((8, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert module.runs_in_gemm(x, [w], [None], [a]) is runs
        assert (module.in_gemm_unavailable(x) == "") is runs


def test_report_says_why_lora_stays_on_cublas_on_other_gpus(monkeypatch):
    """``lora_in_gemm`` on (the default) where the kernel does not run: a note names the GPU."""
    import lecompile
    from lecompile.config import LongExposureConfig
    from lecompile.passes import fuse_lora

    from models import batch, tiny_model, train_step

    why = "a GPU of compute capability 8.0 (the kernel is built for Hopper, 9.x)"
    monkeypatch.setattr(fuse_lora, "in_gemm_unavailable", lambda x: why)
    model, inputs = tiny_model("llama", "lora"), batch()
    torch._dynamo.reset()
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=1.0))
    train_step(torch.compile(model, backend=backend), model, inputs)
    assert backend.report.notes.count(f"lora_in_gemm: LoRA's B-projections stay on cuBLAS GEMMs on {why}") == 1
    assert all(e.fused and not e.in_gemm for e in backend.report.linears), str(backend.report)
    assert why in str(backend.report)
