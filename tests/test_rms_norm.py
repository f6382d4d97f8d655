"""``rms_norm_from_output`` against Hugging Face's RMS norm: outputs, gradients, what it keeps."""

import pytest
import torch
from test_layer_norm import assert_same_forward_and_gradients_as_good
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lecompile.ops.rms_norm import rms_norm_from_output

EPS = 1e-6


def hf_rms_norm(x, weight):
    """``LlamaRMSNorm.forward`` with ``weight`` as its parameter (autograd through it)."""
    norm = LlamaRMSNorm(x.shape[-1], eps=EPS).to(weight.dtype)
    return torch.func.functional_call(norm, {"weight": weight}, (x,))


def exact_rms_norm(x, weight):
    """The same math in float64 throughout (Hugging Face's computes in float32 even for float64)."""
    x, weight = x.double(), weight.double()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def make(dtype, shape=(3, 5, 72), *, train_weight=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3 + 1).to(dtype).requires_grad_(True)
    weight = ((torch.rand(shape[-1], generator=g) + 0.5) * torch.sign(torch.randn(shape[-1], generator=g)))
    return x, weight.to(dtype).requires_grad_(train_weight)


def grads(fn, x, weight):
    leaves = [t for t in (x, weight) if t.requires_grad]
    y = fn(x, weight)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_matches_hugging_face(dtype, train_weight):
    args = make(dtype, train_weight=train_weight)
    exact = grads(exact_rms_norm, *[t.detach().double().requires_grad_(t.requires_grad) for t in args])
    want = grads(hf_rms_norm, *args)
    got = grads(lambda x, w: rms_norm_from_output(x, w, EPS), *args)
    assert_same_forward_and_gradients_as_good(got, want, exact)


def test_gradcheck_float64():
    x, weight = make(torch.float64, shape=(2, 3, 12), train_weight=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm_from_output(x, w, EPS), (x, weight))


def test_keeps_output_not_input():
    x, weight = make(torch.float32)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = rms_norm_from_output(x * 2, weight, EPS)
    assert any(t is y or (t.shape == y.shape and torch.equal(t, y)) for t in kept)
    assert all(t.shape != x.shape or torch.equal(t, y) for t in kept), "the input was kept"


def test_rejects_a_weight_of_another_width():
    x, weight = make(torch.float32, shape=(2, 4, 6))
    with pytest.raises(ValueError, match=r"weight must be \[6\] \(the last dimension of x\), got \(4,\)"):
        rms_norm_from_output(x, weight[:4], EPS)
