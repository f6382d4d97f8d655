"""``layer_norm_from_output`` against ``F.layer_norm``: outputs, gradients, what it keeps, errors."""

import pytest
import torch
import torch.nn.functional as F

from lecompile.ops.layer_norm import layer_norm_from_output, output_rounding_gain

#: The op's gradients may be off the float64 reference by this much more than PyTorch's own layer
#: norm in the same dtype (it derives x_hat from the rounded output, |bias| <= |weight| here as
#: the pass requires), plus an absolute slack for fp32's last bits.
ERROR_RATIO, SLACK = 1.5, 1e-6


def make(dtype, shape=(3, 5, 72), *, affine=True, train_affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3 + 1).to(dtype).requires_grad_(True)
    if not affine:
        return x, None, None
    d = shape[-1]
    weight = (torch.rand(d, generator=g) + 0.5).to(dtype).requires_grad_(train_affine)
    bias = (torch.rand(d, generator=g) - 0.5).mul(weight.detach().float()).to(dtype).requires_grad_(train_affine)
    return x, weight, bias


def grads(fn, x, weight, bias):
    leaves = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    y = fn(x, (x.shape[-1],), weight, bias, 1e-5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine,train_affine", [(True, True), (True, False), (False, False)])
def test_matches_layer_norm(dtype, affine, train_affine):
    args = make(dtype, affine=affine, train_affine=train_affine)
    exact = grads(F.layer_norm, *[t if t is None else t.detach().double().requires_grad_(t.requires_grad)
                                  for t in args])
    want = grads(F.layer_norm, *args)
    got = grads(layer_norm_from_output, *args)
    assert_same_forward_and_gradients_as_good(got, want, exact)


def assert_same_forward_and_gradients_as_good(got, want, exact):
    """``(y, *grads)`` of the op, of PyTorch's version in the same dtype and in float64: the same
    output, and gradients off the float64 ones by at most ``ERROR_RATIO`` times PyTorch's error
    plus ``SLACK``."""
    assert len(got) == len(want) == len(exact)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    for i, (g, w, e) in enumerate(zip(got[1:], want[1:], exact[1:])):
        assert g.dtype == w.dtype
        bound = ERROR_RATIO * (w.double() - e).abs().max().item() + SLACK
        assert (g.double() - e).abs().max().item() <= bound, f"gradient {i}"


def test_gradcheck_float64():
    x, weight, bias = make(torch.float64, shape=(2, 3, 12))
    assert torch.autograd.gradcheck(lambda *a: layer_norm_from_output(a[0], (12,), *a[1:]), (x, weight, bias))


def test_keeps_output_not_input():
    x, weight, bias = make(torch.float32, train_affine=False)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = layer_norm_from_output(x * 2, (x.shape[-1],), weight, bias)
    assert any(t is y or (t.shape == y.shape and torch.equal(t, y)) for t in kept)
    assert all(t.shape != x.shape or torch.equal(t, y) for t in kept), "the input was kept"


def test_rejects_other_normalized_shapes():
    x, weight, bias = make(torch.float32, shape=(2, 4, 6))
    with pytest.raises(ValueError, match=r"normalized_shape must be \(6,\), got \(4, 6\)"):
        layer_norm_from_output(x, (4, 6), None, None)


def test_output_rounding_gain():
    w = torch.tensor([1.0, -2.0, 0.5])
    assert output_rounding_gain(None, None) == 1.0
    assert output_rounding_gain(w, None) == 1.0
    assert output_rounding_gain(w, torch.tensor([0.5, 3.0, -0.25])) == pytest.approx(2.5)
    assert output_rounding_gain(torch.tensor([1.0, 0.0]), torch.zeros(2)) == float("inf")
