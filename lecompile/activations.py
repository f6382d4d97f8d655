"""The MLP activations lecompile computes, by the name ops, kernels and reports use, with their
derivatives written out (backward kernels and their PyTorch twins run below autograd)."""

import torch
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


#: Activations the MLP matcher recognizes, by the name used in ops and reports.
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "silu": F.silu}

_SQRT_HALF, _INV_SQRT_2PI, _TANH_C = 0.7071067811865476, 0.3989422804014327, 0.7978845608028654


def _relu_grad(a):
    return a.clamp_min(0), (a > 0).to(a.dtype)


def _gelu_grad(a):
    cdf = 0.5 * (1.0 + torch.erf(a * _SQRT_HALF))
    return a * cdf, cdf + a * _INV_SQRT_2PI * torch.exp(-0.5 * a * a)


def _gelu_tanh_grad(a):
    t = torch.tanh(_TANH_C * (a + 0.044715 * a ** 3))
    return 0.5 * a * (1 + t), 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * _TANH_C * (1 + 3 * 0.044715 * a * a)


def _silu_grad(a):
    s = torch.sigmoid(a)
    return a * s, s * (1 + a * (1 - s))


#: ``name -> f(a) = (act(a), act'(a))``, written out: backward kernels run below autograd.
ACTIVATION_GRADS = {"relu": _relu_grad, "gelu": _gelu_grad, "gelu_tanh": _gelu_tanh_grad, "silu": _silu_grad}
