"""The custom ops and predictors against plain PyTorch references, gradients included."""

import pytest
import torch

from lecompile.activations import ACTIVATIONS
from lecompile.ops import AdaptedLinear, expand_linear, reduce_linear, sparse_mlp, sparse_mlp_call
from lecompile.ops.adapted_linear import pack_mlp, unpack_mlp
from lecompile.predictors import clear_learned, clear_svd_cache, predict_neurons, top_k
from lecompile.predictors.oracle import oracle_group_scores
from lecompile.predictors.svd import group_scores_ref, low_rank, svd_factors, svd_group_scores

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=1e-5, rtol=1e-4),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_linear(out_f, in_f, dtype, *, bias=True, lora=False, in_scale=False, out_scale=False,
                trainable_weight=False, gen=None):
    def t(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=dtype).div(in_f ** 0.5).requires_grad_(grad)
    return AdaptedLinear(
        weight=t(out_f, in_f, grad=trainable_weight),
        bias=t(out_f) if bias else None,
        lora_a=t(4, in_f) if lora else None, lora_b=t(out_f, 4) if lora else None,
        in_scale=(1 + t(in_f, grad=False)).requires_grad_() if in_scale else None,
        out_scale=(1 + t(out_f, grad=False)).requires_grad_() if out_scale else None,
        lora_scale=0.5)


def make_mlp(d, ffn, dtype, gated, adapters, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kw = dict(lora=adapters == "lora", trainable_weight=adapters == "full")
    fc1 = make_linear(ffn, d, dtype, out_scale=adapters == "ia3", gen=gen, **kw)
    up = make_linear(ffn, d, dtype, gen=gen, **kw) if gated else None
    fc2 = make_linear(d, ffn, dtype, in_scale=adapters == "ia3", gen=gen, **kw)
    return fc1, up, fc2


def masked_dense(x, idx, fc1, up, fc2, activation):
    """Dense MLP with the intermediate zeroed outside ``idx`` (per group of tokens)."""
    groups = idx.shape[0]
    xg = x.reshape(groups, -1, x.shape[-1])
    h = ACTIVATIONS[activation](expand_linear(xg, fc1))
    if up is not None:
        h = h * expand_linear(xg, up)
    mask = torch.zeros(groups, 1, h.shape[-1], dtype=h.dtype, device=h.device).scatter_(-1, idx.unsqueeze(1), 1.0)
    return reduce_linear(h * mask, fc2).reshape(*x.shape[:-1], -1)


def leaves(x, *lins):
    return [x] + [t for lin in lins if lin is not None for t in lin.tensors()
                  if t is not None and t.requires_grad]


def random_idx(groups, ffn, k, gen):
    return torch.stack([torch.randperm(ffn, generator=gen)[:k].sort().values for _ in range(groups)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("adapters", ["none", "lora", "ia3", "full"])
@pytest.mark.parametrize("activation,gated", [("relu", False), ("gelu", False),
                                              ("gelu_tanh", False), ("silu", True)])
@pytest.mark.parametrize("batch,seq,d,ffn,k,groups", [(1, 8, 24, 256, 128, 1), (3, 5, 33, 384, 256, 3),
                                                      (2, 16, 40, 256, 128, 8), (2, 4, 16, 128, 128, 2)])
def test_sparse_mlp_matches_masked_dense(dtype, adapters, activation, gated, batch, seq, d, ffn, k, groups):
    gen = torch.Generator().manual_seed(1)
    fc1, up, fc2 = make_mlp(d, ffn, dtype, gated, adapters)
    x = torch.randn(batch, seq, d, generator=gen, dtype=dtype, requires_grad=True)
    idx = random_idx(groups, ffn, k, gen)
    y = sparse_mlp_call(x, idx, fc1, up, fc2, activation)
    ref = masked_dense(x, idx, fc1, up, fc2, activation)
    torch.testing.assert_close(y, ref, **TOL[dtype])
    grad = torch.randn(y.shape, generator=gen, dtype=dtype)
    inputs = leaves(x, fc1, up, fc2)
    for got, want in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_sparse_mlp_gradcheck():
    fc1, up, fc2 = make_mlp(6, 256, torch.float64, True, "lora")
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    idx = random_idx(2, 256, 128, torch.Generator().manual_seed(0))

    def f(x, *params):
        it = iter(params)
        lins = [AdaptedLinear(*[next(it) if t is not None and t.requires_grad else t for t in lin.tensors()],
                              lora_scale=lin.lora_scale) for lin in (fc1, up, fc2)]
        return sparse_mlp_call(x, idx, *lins, "silu")

    assert torch.autograd.gradcheck(f, leaves(x, fc1, up, fc2))


def test_sparse_mlp_base_weight_grad_only_on_kept_rows():
    fc1, _, fc2 = make_mlp(8, 256, torch.float64, False, "full")
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    idx = torch.arange(0, 256, 2).unsqueeze(0)
    sparse_mlp_call(x, idx, fc1, None, fc2, "gelu").sum().backward()
    dropped = torch.arange(1, 256, 2)
    assert fc1.weight.grad[dropped].abs().max() == 0 and fc1.weight.grad[idx[0]].abs().max() > 0
    assert fc2.weight.grad[:, dropped].abs().max() == 0


def test_sparse_mlp_lora_dropout_uses_returned_mask():
    torch.manual_seed(0)
    fc1, _, fc2 = make_mlp(8, 256, torch.float64, False, "lora")
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    idx = random_idx(2, 256, 128, torch.Generator().manual_seed(0))
    params, slots, scales = pack_mlp(fc1, None, fc2)
    y, keep, _, _ = sparse_mlp(x, idx, params, slots, scales, "relu", 0.5)
    assert keep.shape == (8, 128) and keep.dtype == torch.bool and 0 < keep.float().mean() < 1
    from lecompile.ops.sparse_mlp import sparse_mlp_ref
    ref = sparse_mlp_ref(x, idx, fc1, None, fc2, "relu", keep.reshape(2, 4, 128), 0.5)
    torch.testing.assert_close(y, ref)
    inputs = leaves(x, fc1, fc2)
    for got, want in zip(torch.autograd.grad(y.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("gated,adapters,dropout", [(False, "lora", 0.0), (True, "ia3", 0.0),
                                                     (False, "lora", 0.25)])
def test_opcheck(gated, adapters, dropout):
    fc1, up, fc2 = make_mlp(12, 256, torch.float32, gated, adapters)
    x = torch.randn(2, 3, 12, requires_grad=True)
    idx = random_idx(2, 256, 128, torch.Generator().manual_seed(0))
    params, slots, scales = pack_mlp(fc1, up, fc2)
    # The dropout mask is random, so compare outputs only without dropout.
    tests = ("test_schema", "test_autograd_registration", "test_faketensor") if dropout else None
    kwargs = {"test_utils": tests} if tests else {}
    torch.library.opcheck(torch.ops.lecompile.sparse_mlp.default,
                          (x, idx, params, slots, scales, "silu" if gated else "relu", dropout), **kwargs)
    torch.library.opcheck(torch.ops.lecompile.predict_neurons.default,
                          (x.detach(), [p.detach() for p in params[:2]], slots[:2], scales, "relu", "svd",
                           128, 3, 4))
    torch.library.opcheck(torch.ops.lecompile.observe_mlp.default,
                          (torch.randn(2, 3, 12, requires_grad=True), x.detach(),
                           [p.detach() for p in params[:2]], slots[:2], scales, "relu", "learned", 4, 1, 3, 0, 0.5, -1))
    clear_learned()  # opcheck's calls recorded inputs for a training no optimizer step runs


def test_pack_unpack_roundtrip():
    fc1, up, fc2 = make_mlp(8, 128, torch.float32, True, "lora")
    params, slots, scales = pack_mlp(fc1, up, fc2)
    a, b, c = unpack_mlp(params, slots, scales)
    for orig, back in ((fc1, a), (up, b), (fc2, c)):
        assert [t is u for t, u in zip(orig.tensors(), back.tensors())] == [True] * 7
    with pytest.raises(ValueError, match="fc1"):
        unpack_mlp(params[1:], slots[1:], scales)


def test_bad_op_inputs_name_the_problem():
    fc1, _, fc2 = make_mlp(8, 128, torch.float32, False, "none")
    params, slots, scales = pack_mlp(fc1, None, fc2)
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match="activation"):
        sparse_mlp(x, torch.zeros(1, 128, dtype=torch.long), params, slots, scales, "swish", 0.0)
    with pytest.raises(ValueError, match="equal groups"):
        sparse_mlp(x, torch.zeros(4, 128, dtype=torch.long), params, slots, scales, "relu", 0.0)
    with pytest.raises(ValueError, match="exceeds ffn"):
        sparse_mlp(x, torch.zeros(1, 256, dtype=torch.long), params, slots, scales, "relu", 0.0)
    with pytest.raises(ValueError, match="int64"):
        sparse_mlp(x, torch.zeros(1, 128, dtype=torch.int32), params, slots, scales, "relu", 0.0)


def test_top_k():
    scores = torch.tensor([[0., 5, 1, 3], [9, 0, 0, 1]])
    assert top_k(scores, 2).tolist() == [[1, 3], [0, 3]]
    with pytest.raises(ValueError, match="k must be"):
        top_k(scores, 5)


def test_predict_neurons_rejects_uneven_groups():
    fc1, up, fc2 = make_mlp(16, 256, torch.float32, True, "lora")
    params, slots, scales = pack_mlp(fc1, up, fc2)
    with pytest.raises(ValueError, match="groups of 3"):
        predict_neurons(torch.randn(2, 8, 16), params, slots, scales, "silu", "svd", 128, 3, 4)


@pytest.mark.parametrize("adapters", ["lora", "ia3"])
def test_oracle_is_exact_and_full_rank_svd_equals_it(adapters):
    fc1, up, _ = make_mlp(16, 128, torch.float64, True, adapters)
    x = torch.randn(12, 16, dtype=torch.float64)
    h = (torch.nn.functional.silu(expand_linear(x, fc1)) * expand_linear(x, up)).float()
    per_group = h.square().reshape(3, 4, -1).sum(1)
    torch.testing.assert_close(oracle_group_scores(x, fc1, up, "silu", 0, 4), per_group)
    svd = svd_group_scores(x, fc1, up, "silu", 16, 4)  # computed in fp32
    torch.testing.assert_close(svd, per_group, rtol=2e-5, atol=1e-4)
    assert not torch.allclose(svd_group_scores(x, fc1, up, "silu", 2, 4), per_group)


@pytest.mark.parametrize("activation,gated,bias", [("relu", False, True), ("gelu", False, False),
                                                   ("gelu_tanh", False, True), ("silu", True, True)])
@pytest.mark.parametrize("tokens,group", [(48, 16), (64, 64), (40, 8)])
def test_group_scores_kernel_matches_reference(activation, gated, bias, tokens, group):
    """The fused Triton scoring kernel (interpreter on CPU) against its PyTorch twin."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernel on CPU tensors: needs TRITON_INTERPRET=1")
    from lecompile.kernels.group_scores import group_scores
    gen = torch.Generator().manual_seed(7)
    fc1, up, _ = make_mlp(24, 200, torch.float32, gated, "lora", seed=2)
    if not bias:
        fc1.bias = None
    x = torch.randn(tokens, 24, generator=gen)
    first = low_rank(x, fc1, 8)
    second = low_rank(x, up, 8) if gated else None
    assert first[0].shape == (tokens, 8 + 4)
    got = group_scores(*first, group, activation, second)
    want = group_scores_ref(*first, group, activation, second)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_svd_cache_notices_weight_updates():
    clear_svd_cache()
    w = torch.randn(64, 16)
    p1, q1 = svd_factors(w, 4)
    assert svd_factors(w, 4)[0] is p1
    with torch.no_grad():
        w.mul_(2)
    p2, q2 = svd_factors(w, 4)
    assert p2 is not p1
    torch.testing.assert_close(q2 @ p2.t(), 2 * (q1 @ p1.t()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["oracle", "svd", "learned"])
def test_predict_neurons_shapes_and_sorted(method):
    fc1, up, fc2 = make_mlp(16, 256, torch.float32, True, "lora")
    params, slots, scales = pack_mlp(fc1, up, fc2)
    x = torch.randn(4, 8, 16)
    idx = predict_neurons(x, params, slots, scales, "silu", method, 128, 8, 4)
    assert idx.shape == (4, 128) and idx.dtype == torch.int64
    assert (idx.diff(dim=-1) > 0).all()


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Route the op through its Triton kernel path, in Triton's interpreter on CPU tensors."""
    import os

    from lecompile.ops import sparse_mlp_kernels
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels on CPU tensors: needs TRITON_INTERPRET=1 (CUDA: test_cuda.py)")
    monkeypatch.setattr(sparse_mlp_kernels, "INTERPRET_ON_CPU", True)


@pytest.mark.parametrize("adapters", ["lora", "ia3", "lora+ia3", "full", "none"])
@pytest.mark.parametrize("activation,gated", [("relu", False), ("gelu_tanh", False), ("silu", True)])
@pytest.mark.parametrize("path,k", [("gather", 128), ("compact", 128), ("every-row", 256)])
def test_kernel_path_matches_reference(kernels_on_cpu, monkeypatch, adapters, activation, gated, path, k):
    """Forward and every gradient of the kernel path equal the reference path's, with the GEMMs in
    the gather kernels, on cuBLAS over a compact copy of the kept rows (lowered threshold: 16-token
    groups take it) or on cuBLAS over the whole weights (every neuron kept)."""
    from lecompile.kernels import gather_gemm
    from lecompile.ops.sparse_mlp import _uses_kernels
    monkeypatch.setattr(gather_gemm, "COMPACT_MIN_GROUP_TOKENS", 16 if path == "compact" else 2 ** 40)
    gen = torch.Generator().manual_seed(3)
    d, ffn, batch, seq = 24, 256, 2, 16
    fc1, up, fc2 = make_mlp(d, ffn, torch.float32, gated, adapters.split("+")[0])
    fc1.out_scale = None  # IA3 on fc1's output is a reference-only layout
    if adapters == "lora+ia3":  # IA3's scale on fc2's input and LoRA on fc2 in one backward launch
        fc2.in_scale = (1 + torch.randn(ffn, generator=gen) / 4).requires_grad_()
    if adapters == "lora":
        fc1.lora_input = torch.randn(batch, seq, d, generator=gen).requires_grad_()
    x = torch.randn(batch, seq, d, generator=gen, requires_grad=True)
    idx = random_idx(batch, ffn, k, gen)
    params, slots, scales = pack_mlp(fc1, up, fc2)
    assert _uses_kernels(x, idx, params, slots)
    y, _, pre1, _ = sparse_mlp(x, idx, params, slots, scales, activation, 0.0)
    assert pre1.shape == (batch * seq, k), "the kernel path saves compact pre-activations"
    ref = masked_dense(x, idx, fc1, up, fc2, activation)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    grad = torch.randn(y.shape, generator=gen)
    inputs = leaves(x, fc1, up, fc2)
    for got, want in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("gated", [False, True])
def test_kernel_path_takes_transposed_weights(kernels_on_cpu, gated):
    """GPT-2's Conv1D weights reach the op as transposed views ([ffn, d] with column-major rows)."""
    gen = torch.Generator().manual_seed(5)
    fc1, up, fc2 = make_mlp(24, 256, torch.float32, gated, "lora")
    for lin in (fc1, up, fc2):
        if lin is not None:
            lin.weight = lin.weight.t().contiguous().t()
    assert fc1.weight.stride(-1) != 1
    x = torch.randn(2, 16, 24, generator=gen, requires_grad=True)
    idx = random_idx(2, 256, 128, gen)
    params, slots, scales = pack_mlp(fc1, up, fc2)
    y = sparse_mlp(x, idx, params, slots, scales, "gelu_tanh", 0.0)[0]
    ref = masked_dense(x, idx, fc1, up, fc2, "gelu_tanh")
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    inputs = leaves(x, fc1, up, fc2)
    for got, want in zip(torch.autograd.grad(y.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_kernel_path_with_fc2_lora_dropout(kernels_on_cpu):
    from lecompile.ops.sparse_mlp import sparse_mlp_ref
    gen = torch.Generator().manual_seed(4)
    fc1, _, fc2 = make_mlp(24, 256, torch.float32, False, "lora")
    x = torch.randn(2, 16, 24, generator=gen, requires_grad=True)
    idx = random_idx(2, 256, 128, gen)
    params, slots, scales = pack_mlp(fc1, None, fc2)
    y, keep, pre1, _ = sparse_mlp(x, idx, params, slots, scales, "relu", 0.3)
    assert pre1.numel() and keep.shape == (32, 128)
    ref = sparse_mlp_ref(x, idx, fc1, None, fc2, "relu", keep.reshape(2, 16, 128), 0.3)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    inputs = leaves(x, fc1, fc2)
    for got, want in zip(torch.autograd.grad(y.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_grads_match_autograd(name):
    from lecompile.activations import ACTIVATION_GRADS
    a = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    out, grad = ACTIVATION_GRADS[name](a.detach())
    want = ACTIVATIONS[name](a)
    torch.testing.assert_close(out, want.detach())
    torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), a)[0])


@pytest.mark.parametrize("gated", [False, True])
def test_kernel_path_with_adapters_in_activation_dtype(kernels_on_cpu, gated):
    """With ``fuse_adapters`` the graph hands the op bf16 LoRA weights: the kernel path stays
    within bf16 rounding of a float64 masked dense reference (eager bf16 autograd does not: it
    rounds the pre-activations that the kernels keep in fp32)."""
    gen = torch.Generator().manual_seed(5)
    fc1, up, fc2 = make_mlp(24, 256, torch.bfloat16, gated, "lora")
    x = torch.randn(2, 16, 24, generator=gen).bfloat16().requires_grad_()
    idx = random_idx(2, 256, 128, gen)
    params, slots, scales = pack_mlp(fc1, up, fc2)
    act = "silu" if gated else "relu"
    y, _, pre1, _ = sparse_mlp(x, idx, params, slots, scales, act, 0.0)
    assert pre1.numel(), "kernel path"
    grad = torch.randn(y.shape, generator=gen).bfloat16()
    got = torch.autograd.grad(y, leaves(x, fc1, up, fc2), grad)

    def f64(lin):
        return None if lin is None else AdaptedLinear(**{
            k: v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
            for k, v in lin.__dict__.items()})
    ref = [f64(lin) for lin in (fc1, up, fc2)]
    x64 = x.detach().double().requires_grad_()
    y64 = masked_dense(x64, idx, *ref, act)
    want = torch.autograd.grad(y64, leaves(x64, *ref), grad.double())
    torch.testing.assert_close(y.double(), y64, atol=2e-2 * y64.abs().max().item(), rtol=0)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), w, atol=2e-2 * w.abs().max().item(), rtol=0)


@pytest.mark.parametrize("shape,rank", [((96, 24), 8), ((24, 96), 8), ((40, 6), 8), ((6, 40), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_svd_factors_are_the_truncated_svd(shape, rank, dtype):
    """Tall, wide, and ranks past the weight's: ``P`` holds the top right singular vectors and
    ``Q`` the left ones scaled by their singular values, as ``torch.linalg.svd`` gives them."""
    from lecompile.predictors.svd import _factorize
    g = torch.Generator().manual_seed(0)
    decay = torch.logspace(0, -2, min(shape))  # distinct singular values: the top vectors are unique
    u = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g)).Q
    v = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g)).Q
    w = ((u * decay) @ v.t()).to(dtype)
    p, q = _factorize(w, rank)
    r = min(rank, *shape)
    assert p.shape == (shape[1], r) and q.shape == (shape[0], r) and p.dtype == q.dtype == dtype
    uu, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    sign = torch.sign((p.double() * vh[:r].t()).sum(0))  # each pair's sign is arbitrary
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(p.double() * sign, vh[:r].t(), **tol)
    torch.testing.assert_close(q.double() * sign, uu[:, :r] * s[:r], **tol)
