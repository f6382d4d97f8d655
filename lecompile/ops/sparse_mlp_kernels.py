"""The sparse MLP on CUDA: forward and backward built on the gather-GEMM kernels.

Every large GEMM is a kernel launch on neuron-major weights (``lecompile.kernels.gather_gemm``;
with every neuron kept, ``k == ffn``, or token groups of ``COMPACT_MIN_GROUP_TOKENS`` or more, the
GEMMs run on cuBLAS and the N-gathers' epilogues in their kernel):

| GEMM | kernel |
|---|---|
| fc1 (and up) forward, LoRA + bias + activation fused | N-gather on ``W1`` |
| fc2 forward, + bias | K-gather on ``W2T`` |
| fc2 input gradient, + LoRA, * IA3 scale (and its gradient) | N-gather on ``W2T`` |
| fc1 input gradient (gate and up in one launch) | K-gather on ``W1`` |

Adapter, bias and IA3 gradients come from compact ``[T, k]`` and ``[T, r]`` tensors with torch.
Forward saves the compact pre-activations only. ``W2.T`` is made contiguous once per weight
version and cached. Layouts the kernels do not cover (IA3 on fc1/up or on fc2's output, token
groups not a multiple of 16, CPU tensors) use the PyTorch reference instead: see :func:`supported`.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch

from ..activations import ACTIVATION_GRADS
from ..kernels.gather_gemm import (
    MIN_GROUP_TOKENS,
    Neurons,
    kgather_matmul,
    ngather_matmul,
    ngather_matmul_grad,
    uses_compact_copies,  # noqa: F401  (the rewrite report asks it here)
)
from ..weight_cache import WeightCache
from .adapted_linear import SLOTS, AdaptedLinear, _neuron_vector, _scale

Tensor = torch.Tensor
_UNSUPPORTED_SLOTS = {li * len(SLOTS) + SLOTS.index(s) for li, s in
                      ((0, "in_scale"), (0, "out_scale"), (1, "in_scale"), (1, "out_scale"),
                       (2, "out_scale"))}
#: Tests set this to run the kernels on CPU tensors in Triton's interpreter.
INTERPRET_ON_CPU = False


def supported(x: Tensor, idx: Tensor, slots: List[int]) -> bool:
    """Whether the kernel path handles this call (decided from metadata only, so the fake
    implementation agrees with the real one)."""
    tokens = x.numel() // x.shape[-1]
    on_device = x.device.type == "cuda" or (INTERPRET_ON_CPU and os.environ.get("TRITON_INTERPRET") == "1")
    return (on_device and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and idx.shape[0] > 0 and (tokens // idx.shape[0]) % MIN_GROUP_TOKENS == 0
            and not _UNSUPPORTED_SLOTS.intersection(slots))


#: ``weight.t().contiguous()``, cached per weight version (frozen weights convert once).
neuron_major = WeightCache(lambda weight: weight.t().contiguous())


def neuron_rows(weight: Tensor) -> Tensor:
    """``weight [ffn, d]`` with contiguous rows, as the kernels read it: GPT-2's ``Conv1D``
    weights reach the op transposed, and are copied once per weight version."""
    return weight if weight.stride(-1) == 1 else neuron_major(weight.t())


def prepare(fc1: Tensor, up: Optional[Tensor], fc2: Tensor) -> None:
    """Fill :data:`neuron_major` for the weights of one MLP as the op will receive them."""
    for w in (fc1, up):
        if w is not None:
            neuron_rows(w)
    neuron_major(fc2)


def _lora_input(lin: AdaptedLinear, x2: Tensor) -> Tensor:
    """What LoRA's ``A`` reads, ``[T, in]`` in the adapter dtype."""
    lx = x2 if lin.lora_input is None else lin.lora_input.reshape(x2.shape[0], -1)
    return lx.to(lin.lora_a.dtype)


def _lora_u(lin: AdaptedLinear, x2: Tensor) -> Optional[Tensor]:
    return None if lin.lora_a is None else _lora_input(lin, x2) @ lin.lora_a.t()


def _neurons(lin: AdaptedLinear, u: Optional[Tensor]) -> Neurons:
    return Neurons(neuron_rows(lin.weight), lora=(u, lin.lora_b, lin.lora_scale) if u is not None else None,
                   bias=lin.bias)


def _per_group(t: Tensor, groups: int) -> Tensor:
    return t.reshape(groups, -1, t.shape[-1])


def forward(x: Tensor, idx: Tensor, fc1: AdaptedLinear, up: Optional[AdaptedLinear],
            fc2: AdaptedLinear, activation: str, keep: Optional[Tensor], p: float):
    """``(y, pre1, pre2)``: output and the compact pre-activations saved for backward."""
    tokens, d = x.numel() // x.shape[-1], x.shape[-1]
    groups = idx.shape[0]
    n = tokens // groups
    x2 = x.reshape(tokens, d)
    first = _neurons(fc1, _lora_u(fc1, x2))
    second = _neurons(up, _lora_u(up, x2)) if up is not None else None
    if second is None:
        h, pre1 = ngather_matmul(x2, idx, n, first, activation=activation, save_pre=True)
        pre2 = x.new_empty(0)
    else:
        h, pre1, pre2 = ngather_matmul(x2, idx, n, first, second, activation=activation, save_pre=True)
    y = _fc2_forward(h, idx, n, fc2, keep, p)
    return y.reshape(*x.shape[:-1], -1), pre1, pre2


def _fc2_input(h: Tensor, idx: Tensor, fc2: AdaptedLinear) -> Tensor:
    if fc2.in_scale is None:
        return h
    return _scale(_per_group(h, idx.shape[0]), _neuron_vector(fc2.in_scale, idx)).reshape(h.shape)


def _fc2_lora_input(hs: Tensor, fc2: AdaptedLinear, keep: Optional[Tensor], p: float) -> Tensor:
    lh = hs.to(fc2.lora_a.dtype)
    return lh * keep / (1.0 - p) if keep is not None else lh


def _fc2_forward(h, idx, n, fc2, keep, p):
    hs = _fc2_input(h, idx, fc2)
    low_rank = None
    if fc2.lora_a is not None:  # LoRA's B-projection and scale join the K-gather's epilogue
        lh = _per_group(_fc2_lora_input(hs, fc2, keep, p), idx.shape[0])
        u2 = torch.bmm(lh, fc2.lora_a.t()[idx])  # [G, n, r]
        low_rank = (fc2.lora_scale * u2.reshape(h.shape[0], -1), fc2.lora_b.t())
    return kgather_matmul(hs, neuron_major(fc2.weight), idx, n, bias=fc2.bias, low_rank=low_rank)


def backward(grad_y: Tensor, x: Tensor, idx: Tensor, fc1: AdaptedLinear, up: Optional[AdaptedLinear],
             fc2: AdaptedLinear, activation: str, keep: Optional[Tensor], p: float,
             pre1: Tensor, pre2: Tensor, wants: Dict[str, bool]) -> Dict[str, Tensor]:
    """Gradients keyed ``"x"`` and ``"<linear>.<slot>"`` for every ``wants`` entry that is True."""
    tokens, d = x.numel() // x.shape[-1], x.shape[-1]
    groups = idx.shape[0]
    n = tokens // groups
    x2, dy = x.reshape(tokens, d), grad_y.reshape(tokens, -1)
    grads: Dict[str, Tensor] = {}

    # The fused path: dh never exists alone, the N-gather applies the activation's derivative
    # (and IA3's scale on fc2's input with its gradient; it recomputes the compact intermediate
    # ``h`` when the adapters need it).
    fused = fc2.lora_a is None or keep is None
    need_h = fc2.lora_a is not None or wants.get("fc2.weight")
    if not fused:  # recompute the compact intermediate from the saved pre-activations
        act1, dact1 = ACTIVATION_GRADS[activation](pre1.float())
        h = (act1 * pre2.float() if up is not None else act1).to(x.dtype)

    w2t = neuron_major(fc2.weight)
    lora_v = a2t = None
    if fc2.lora_a is not None:
        a2t = fc2.lora_a.t().contiguous()  # [ffn, r], small: not cached (it changes every step)
        lora_v = dy.to(fc2.lora_b.dtype) @ fc2.lora_b  # [T, r]
    if fused:
        m2 = Neurons(w2t, lora=(lora_v, a2t, fc2.lora_scale) if lora_v is not None else None,
                     out_scale=fc2.in_scale)
        scale_grad = fc2.in_scale is not None
        res = ngather_matmul_grad(dy.to(x.dtype), idx, n, m2, activation, pre1,
                                  pre2 if up is not None else None, return_h=bool(need_h),
                                  return_scale_grad=scale_grad)
        res = list(res) if isinstance(res, tuple) else [res]
        if scale_grad:
            per_group = res.pop()
            _put(grads, wants, "fc2.in_scale", lambda: _scatter_rows(fc2.in_scale, idx, per_group))
        if need_h:
            h = res.pop()
        das = [(fc1, "fc1", res[0])] if up is None else [(fc1, "fc1", res[0]), (up, "up", res[1])]
    hs = _fc2_input(h, idx, fc2) if need_h or not fused else None

    # fc2's adapters and weight, from the compact intermediate.
    if lora_v is not None:
        lh = _fc2_lora_input(hs, fc2, keep, p)
        u2 = torch.bmm(_per_group(lh, groups), a2t[idx]).reshape(tokens, -1)
        _put(grads, wants, "fc2.lora_b", lambda: dy.t().to(u2.dtype) @ (fc2.lora_scale * u2))
        _put(grads, wants, "fc2.lora_a", lambda: _scatter_cols(
            fc2.lora_a, idx, torch.bmm((fc2.lora_scale * _per_group(lora_v, groups)).transpose(1, 2),
                                       _per_group(lh, groups))))
    _put(grads, wants, "fc2.bias", lambda: dy.sum(0, dtype=torch.float32).to(fc2.bias.dtype))
    _put(grads, wants, "fc2.weight", lambda: _scatter_cols(
        fc2.weight, idx, torch.bmm(_per_group(dy, groups).transpose(1, 2), _per_group(hs, groups))))
    if not fused:
        dhs = ngather_matmul(dy.to(x.dtype), idx, n, Neurons(w2t)).float()
        if lora_v is not None:
            dl = torch.bmm(_per_group(lora_v, groups), a2t[idx].transpose(1, 2))
            dl = fc2.lora_scale * dl.reshape(tokens, -1)
            dhs = dhs + (dl * keep / (1.0 - p) if keep is not None else dl)
        dh = dhs
        if fc2.in_scale is not None:
            s = fc2.in_scale[idx].unsqueeze(1).float()
            _put(grads, wants, "fc2.in_scale", lambda: _scatter_rows(
                fc2.in_scale, idx, (_per_group(dhs, groups) * _per_group(h, groups).float()).sum(1)))
            dh = (_per_group(dhs, groups) * s).reshape(tokens, -1)
        if up is None:
            das = [(fc1, "fc1", dh * dact1)]
        else:
            das = [(fc1, "fc1", dh * pre2.float() * dact1), (up, "up", dh * act1)]

    # fc1 (and up): adapters, bias and weight; their input gradient in one K-gather.
    through_lora = []
    for lin, role, da in das:
        term = _linear_input_grads(lin, role, da, x2, idx, groups, grads, wants)
        if term is not None:
            through_lora.append(term)
        _put(grads, wants, f"{role}.bias", lambda: _scatter_rows(
            lin.bias, idx, _per_group(da, groups).sum(1, dtype=torch.float32)))
        _put(grads, wants, f"{role}.weight", lambda: _scatter_rows(
            lin.weight, idx, torch.bmm(_per_group(da.to(x.dtype), groups).transpose(1, 2), _per_group(x2, groups))))
    if wants.get("x"):
        second = (das[1][2].to(x.dtype), neuron_rows(up.weight)) if up is not None else None
        low_rank = None
        if len(through_lora) == 1:
            low_rank = through_lora[0]
        elif through_lora:  # gate's and up's ``s * v @ A`` as one low-rank term: ranks concatenated
            low_rank = (torch.cat([v for v, _ in through_lora], 1), torch.cat([a for _, a in through_lora], 0))
        dx = kgather_matmul(das[0][2].to(x.dtype), neuron_rows(fc1.weight), idx, n, second=second,
                            low_rank=low_rank)
        grads["x"] = dx.reshape(x.shape)
    return grads


def _linear_input_grads(lin, role, da, x2, idx, groups, grads, wants) -> Optional[Tuple[Tensor, Tensor]]:
    """LoRA gradients of fc1/up. Returns the gradient its LoRA sends to ``x`` as a low-rank pair
    ``(s * v, A)`` (its product is the gradient), or ``None``."""
    if lin.lora_a is None:
        return None
    lx = _lora_input(lin, x2)
    u = lx @ lin.lora_a.t()
    da_g = _per_group(da.to(u.dtype), groups)
    sv = lin.lora_scale * torch.bmm(da_g, lin.lora_b[idx]).reshape(x2.shape[0], -1)  # [T, r]
    _put(grads, wants, f"{role}.lora_b", lambda: _scatter_rows(
        lin.lora_b, idx, torch.bmm(da_g.transpose(1, 2), _per_group(lin.lora_scale * u, groups))))
    _put(grads, wants, f"{role}.lora_a", lambda: sv.t() @ lx)
    if lin.lora_input is not None:
        _put(grads, wants, f"{role}.lora_input", lambda: (sv @ lin.lora_a).reshape(lin.lora_input.shape))
        return None
    return sv, lin.lora_a


def _put(grads, wants, key, compute):
    if wants.get(key):
        grads[key] = compute()


def _scatter_rows(param: Tensor, idx: Tensor, per_group: Tensor) -> Tensor:
    """Dense gradient of ``param [ffn, ...]`` (a vector too) from per-group rows ``[G, k, ...]``."""
    out = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
    out.index_add_(0, idx.reshape(-1), per_group.reshape(-1, *param.shape[1:]).float())
    return out.to(param.dtype)


def _scatter_cols(param: Tensor, idx: Tensor, per_group: Tensor) -> Tensor:
    """Dense gradient of ``param [..., ffn]`` from per-group columns ``[G, ..., k]``."""
    rows = per_group.transpose(1, 2)  # [G, k, ...]
    return _scatter_rows(param.t(), idx, rows).t()
