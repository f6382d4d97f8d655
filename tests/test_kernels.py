"""Gather-GEMM kernels against their PyTorch twins (Triton's interpreter on CPU machines)."""

import pytest
import torch

from lecompile.kernels import gather_gemm
from lecompile.kernels.gather_gemm import (
    Neurons,
    kgather_matmul,
    kgather_matmul_ref,
    ngather_matmul,
    ngather_matmul_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


def rand(*shape, dtype=torch.float32, gen=None, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def sorted_idx(groups, ffn, k, gen):
    return torch.stack([torch.randperm(ffn, generator=gen)[:k].sort().values
                        for _ in range(groups)]).to(DEVICE)


# (tokens, group_tokens, d, ffn, k): odd d, k from 128 to 1024, 1 to 3 groups; d and k that fill
# the interpreter's tiles exactly (unmasked main loops) and a k that does not
SHAPES = [(32, 32, 33, 256, 128), (48, 16, 40, 512, 256), (64, 32, 17, 1024, 512),
          (16, 16, 24, 1024, 1024), (32, 16, 64, 256, 128), (32, 32, 64, 300, 72)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,group,d,ffn,k", SHAPES)
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
def test_ngather(dtype, tokens, group, d, ffn, k, activation, compact):
    gen = torch.Generator().manual_seed(0)
    x, m = rand(tokens, d, dtype=dtype, gen=gen), rand(ffn, d, dtype=dtype, gen=gen, scale=d ** -0.5)
    idx = sorted_idx(tokens // group, ffn, k, gen)
    first = Neurons(m, bias=rand(ffn, dtype=dtype, gen=gen))
    got = ngather_matmul(x, idx, group, first, activation=activation)
    torch.testing.assert_close(got, ngather_matmul_ref(x, idx, group, first, activation=activation), **TOL[dtype])


# How the tests below run the GEMM: the gather main loop; cuBLAS on a compact copy of the kept rows
# (groups of COMPACT_MIN_GROUP_TOKENS tokens or more: lowered here so that small groups take it); cuBLAS
# on the whole weight (every neuron kept). The epilogue stays in the kernel in the last two.
KEPT = {"gather": 256, "compact": 256, "every-row": 384}


def _route(monkeypatch, path):
    monkeypatch.setattr(gather_gemm, "COMPACT_MIN_GROUP_TOKENS", 16 if path == "compact" else 2 ** 40)


@pytest.fixture(params=list(KEPT))
def kept(request, monkeypatch):
    """Kept neurons of 384, for each GEMM path."""
    _route(monkeypatch, request.param)
    return KEPT[request.param]


@pytest.fixture(params=["gather", "compact"])
def compact(request, monkeypatch):
    """Some neurons kept: the gather main loop, or cuBLAS on a compact copy of the kept rows."""
    _route(monkeypatch, request.param)


def test_gemms_go_to_cublas_for_every_row_or_large_groups(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    m, idx = rand(384, 24, gen=gen), sorted_idx(2, 384, 256, gen)
    monkeypatch.setattr(gather_gemm, "COMPACT_MIN_GROUP_TOKENS", 64)
    assert gather_gemm._on_cublas(idx, m, 64) and not gather_gemm._on_cublas(idx, m, 48)
    assert gather_gemm._on_cublas(torch.arange(384, device=DEVICE)[None], m, 16)
    x = rand(128, 24, gen=gen)
    xg, mg = gather_gemm._batched(x, m, idx, 64)
    assert xg.shape == (2, 64, 24) and torch.equal(mg, m[idx])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [4, 16])
def test_ngather_gated_with_adapters_saves_pre(dtype, rank, kept):
    gen = torch.Generator().manual_seed(1)
    tokens, group, d, ffn = 48, 16, 40, 384
    x = rand(tokens, d, dtype=dtype, gen=gen)

    def neurons():
        return Neurons(rand(ffn, d, dtype=dtype, gen=gen, scale=d ** -0.5),
                       lora=(rand(tokens, rank, gen=gen), rand(ffn, rank, gen=gen, scale=0.1), 0.5),
                       bias=rand(ffn, dtype=dtype, gen=gen), out_scale=1 + rand(ffn, gen=gen, scale=0.1))

    gate, up = neurons(), neurons()
    idx = sorted_idx(tokens // group, ffn, kept, gen)
    got = ngather_matmul(x, idx, group, gate, up, activation="silu", save_pre=True)
    want = ngather_matmul_ref(x, idx, group, gate, up, activation="silu", save_pre=True)
    assert len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,group,d,ffn,k", SHAPES)
@pytest.mark.parametrize("two,bias,rank,residual", [(False, False, 0, False), (False, True, 0, False),
                                                    (True, False, 0, False), (False, True, 16, True),
                                                    (True, False, 40, True)])
def test_kgather(dtype, tokens, group, d, ffn, k, two, bias, rank, residual, compact):
    gen = torch.Generator().manual_seed(2)
    h, m = rand(tokens, k, dtype=dtype, gen=gen), rand(ffn, d, dtype=dtype, gen=gen, scale=k ** -0.5)
    idx = sorted_idx(tokens // group, ffn, k, gen)
    second = ((rand(tokens, k, dtype=dtype, gen=gen), rand(ffn, d, dtype=dtype, gen=gen, scale=k ** -0.5))
              if two else None)
    b = rand(d, dtype=dtype, gen=gen) if bias else None
    # LoRA's B is [d, r]: the low-rank factor arrives as its transposed view
    low_rank = (rand(tokens, rank, gen=gen), rand(d, rank, dtype=dtype, gen=gen).t()) if rank else None
    # the residual stream as a row slice of a wider tensor: rows of unit stride, not contiguous
    res = rand(tokens, d + 3, dtype=dtype, gen=gen)[:, :d] if residual else None
    got = kgather_matmul(h, m, idx, group, bias=b, second=second, low_rank=low_rank, residual=res)
    want = kgather_matmul_ref(h, m, idx, group, bias=b, second=second, low_rank=low_rank, residual=res)
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_kernels_reject_bad_layouts():
    x, m = rand(32, 16), rand(256, 16)
    idx = torch.arange(128, device=DEVICE).unsqueeze(0)
    with pytest.raises(ValueError, match="do not agree"):
        ngather_matmul(x, idx, 16, Neurons(m))
    with pytest.raises(ValueError, match="multiple of 16"):
        ngather_matmul(x[:24], idx, 24, Neurons(m))
    with pytest.raises(ValueError, match="contiguous rows"):
        kgather_matmul(rand(32, 128), m.t().contiguous().t(), idx, 32)
    with pytest.raises(ValueError, match="low_rank shapes"):
        kgather_matmul(rand(32, 128), m, idx, 32, low_rank=(rand(32, 4), rand(4, 15)))
    with pytest.raises(ValueError, match="residual of shape"):
        kgather_matmul(rand(32, 128), m, idx, 32, residual=rand(32, 15))
    with pytest.raises(ValueError, match="unit stride"):
        kgather_matmul(rand(32, 128), m, idx, 32, residual=rand(16, 32).t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("gated,lora,return_h", [(False, False, False), (True, False, False), (False, True, True),
                                                 (True, True, True)])
def test_ngather_grad_fuses_activation_derivative(dtype, activation, gated, lora, return_h, kept):
    from lecompile.kernels.gather_gemm import ngather_matmul_grad, ngather_matmul_grad_ref
    gen = torch.Generator().manual_seed(5)
    tokens, group, d, ffn = 48, 16, 40, 384
    dy = rand(tokens, d, dtype=dtype, gen=gen)
    m = Neurons(rand(ffn, d, dtype=dtype, gen=gen, scale=d ** -0.5),
                lora=(rand(tokens, 8, gen=gen), rand(ffn, 8, gen=gen, scale=0.1), 0.5) if lora else None)
    idx = sorted_idx(tokens // group, ffn, kept, gen)
    pre = rand(tokens, kept, dtype=dtype, gen=gen)
    pre_up = rand(tokens, kept, dtype=dtype, gen=gen) if gated else None
    got = ngather_matmul_grad(dy, idx, group, m, activation, pre, pre_up, return_h=return_h)
    want = ngather_matmul_grad_ref(dy, idx, group, m, activation, pre, pre_up, return_h=return_h)
    outputs = 1 + gated + return_h
    got, want = (got, want) if outputs > 1 else ((got,), (want,))
    assert len(got) == len(want) == outputs
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated,lora", [(False, False), (True, True)])
def test_ngather_grad_of_a_scale_on_its_output(dtype, gated, lora, kept):
    """IA3 on fc2's input: ``dh`` is scaled by ``s[idx]`` and ``dL/ds`` comes back per group."""
    from lecompile.kernels.gather_gemm import ngather_matmul_grad, ngather_matmul_grad_ref
    gen = torch.Generator().manual_seed(7)
    tokens, group, d, ffn = 64, 32, 40, 384
    dy = rand(tokens, d, dtype=dtype, gen=gen)
    s = rand(ffn, gen=gen).add(1.0).to(dtype)
    m = Neurons(rand(ffn, d, dtype=dtype, gen=gen, scale=d ** -0.5), out_scale=s,
                lora=(rand(tokens, 8, gen=gen), rand(ffn, 8, gen=gen, scale=0.1), 0.5) if lora else None)
    idx = sorted_idx(tokens // group, ffn, kept, gen)
    pre = rand(tokens, kept, dtype=dtype, gen=gen)
    pre_up = rand(tokens, kept, dtype=dtype, gen=gen) if gated else None
    got = ngather_matmul_grad(dy, idx, group, m, "relu", pre, pre_up, return_h=True, return_scale_grad=True)
    want = ngather_matmul_grad_ref(dy, idx, group, m, "relu", pre, pre_up, return_h=True, return_scale_grad=True)
    assert len(got) == len(want) == 3 + gated and got[-1].shape == (tokens // group, kept)
    for g, w in zip(got[:-1], want[:-1]):
        torch.testing.assert_close(g, w, **TOL[dtype])
    torch.testing.assert_close(got[-1], want[-1], atol=TOL[dtype]["atol"] * group, rtol=TOL[dtype]["rtol"])
    if dtype == torch.float32 and not lora:  # the twin's dL/ds against autograd through (h * s) @ M[idx]
        h = got[-2].reshape(-1, group, kept)
        sg = s[idx].clone().requires_grad_()
        y = (h * sg.unsqueeze(1)) @ m.m[idx]
        (y * dy.reshape(-1, group, d)).sum().backward()
        torch.testing.assert_close(want[-1], sg.grad, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="needs the scale"):
        ngather_matmul_grad(dy, idx, group, Neurons(m.m), "relu", pre, pre_up, return_scale_grad=True)


@pytest.mark.parametrize("groups,n,k", [(1, 256, 128), (3, 384, 256), (2, 1000, 7), (4, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_sorted_matches_torch(groups, n, k, dtype):
    from lecompile.kernels.top_k import top_k_sorted
    gen = torch.Generator().manual_seed(6)
    scores = torch.randn(groups, n, generator=gen).to(DEVICE) * 10  # negative and positive
    scores = scores.to(dtype).float() if dtype == torch.float32 else scores.to(dtype)
    if dtype == torch.bfloat16:  # rounding makes ties: compare kept values, not indices
        got = top_k_sorted(scores, k)
        assert (got.diff(dim=-1) > 0).all()
        kept = scores.float().gather(-1, got).sort(dim=-1).values
        torch.testing.assert_close(kept, scores.float().topk(k, dim=-1).values.sort(dim=-1).values)
        return
    want = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(top_k_sorted(scores, k), want)


def test_top_k_sorted_ties_keep_lowest_indices_and_bad_k_is_named():
    from lecompile.kernels.top_k import top_k_sorted
    scores = torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.0],
                           [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], device=DEVICE)
    assert top_k_sorted(scores, 4).tolist() == [[0, 1, 4, 6], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="k=9, n=8"):
        top_k_sorted(scores, 9)
