"""``lecompile::sparse_mlp``: an MLP block that computes only the predicted neurons.

``y = fc2(act(fc1(x))[idx])`` (or ``fc2((act(gate(x)) * up(x))[idx])`` for gated MLPs), with
every linear an :class:`~lecompile.ops.adapted_linear.AdaptedLinear` carrying its PEFT adapters,
passed packed by :func:`~lecompile.ops.adapted_linear.pack_mlp`.

Index layout: ``idx [G, k]`` int64, each row sorted and unique. The ``T`` tokens of ``x``
(all leading dims flattened) form ``G`` equal groups of consecutive tokens, and group ``g`` uses
neurons ``idx[g]``: ``G = 1`` shares one set over the batch, ``G = batch`` is per sequence,
``G = T / tile`` is per token tile. ``k == ffn`` means every neuron: the op runs dense.

On CUDA the op runs the Triton gather-GEMM kernels (``sparse_mlp_kernels``) for the layouts
they cover (in the dense case, ``k == ffn``, too: every GEMM then runs on cuBLAS, as for token
groups of 2048 tokens or more); everywhere else it runs the PyTorch reference below. The
reference backward recomputes the compact forward (only ``[T, k]`` tensors) and differentiates
it, so it saves no activation beyond its inputs and the compact LoRA dropout mask, and it is
exact for every input: adapters, biases, IA3 vectors, the input, and base weights too when they
require grad (their gradient is non-zero on the kept neurons only).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch._dynamo.utils import counters

from ..activations import ACTIVATIONS
from .adapted_linear import (
    MLP_LINEARS,
    SLOTS,
    AdaptedLinear,
    expand_linear,
    pack_mlp,
    reduce_linear,
    unpack_mlp,
)

try:
    from . import sparse_mlp_kernels as kernel_impl
except ImportError:  # no Triton: the reference runs everywhere
    kernel_impl = None

Tensor = torch.Tensor


_FC2_WEIGHT = 2 * len(SLOTS)
_FC2_LORA_A = 2 * len(SLOTS) + SLOTS.index("lora_a")


def sparse_mlp_ref(x: Tensor, idx: Tensor, fc1: AdaptedLinear, up: Optional[AdaptedLinear],
                   fc2: AdaptedLinear, activation: str, lora_keep: Optional[Tensor] = None,
                   lora_dropout: float = 0.0) -> Tensor:
    """Reference sparse MLP. ``lora_keep``: fc2's LoRA dropout keep-mask ``[G, n, k]``."""
    groups = idx.shape[0]
    dense = idx.shape[-1] == fc1.weight.shape[0]
    gidx = None if dense else idx

    def grouped(t):
        return t.reshape(groups, -1, t.shape[-1])

    def regroup(lin):
        if lin is None or lin.lora_input is None:
            return lin
        return AdaptedLinear(**{**lin.__dict__, "lora_input": grouped(lin.lora_input)})

    xg = grouped(x)
    h = ACTIVATIONS[activation](expand_linear(xg, regroup(fc1), gidx))
    if up is not None:
        h = h * expand_linear(xg, regroup(up), gidx)
    y = reduce_linear(h, fc2, gidx, lora_keep, lora_dropout)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _check(x, idx, params, slots, lora_scales, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"sparse_mlp: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if len(lora_scales) != 3 or len(params) != len(slots):
        raise ValueError(f"sparse_mlp: expected 3 lora_scales and one slot per param, got "
                         f"{len(lora_scales)} scales, {len(params)} params, {len(slots)} slots")
    if _FC2_WEIGHT not in slots:
        raise ValueError(f"sparse_mlp: fc2's weight (slot {_FC2_WEIGHT}) is missing from slots {list(slots)}")
    if idx.dim() != 2 or idx.dtype != torch.int64:
        raise ValueError(f"sparse_mlp: idx must be int64 [G, k], got {idx.dtype} {tuple(idx.shape)}")
    tokens = x.numel() // x.shape[-1]
    if tokens % idx.shape[0]:
        raise ValueError(f"sparse_mlp: {tokens} tokens do not split into {idx.shape[0]} equal groups")
    if idx.shape[1] > params[0].shape[0]:
        raise ValueError(f"sparse_mlp: k={idx.shape[1]} exceeds ffn={params[0].shape[0]}")


def _grouped_keep(keep, idx):
    return keep.reshape(idx.shape[0], -1, idx.shape[1]) if keep.numel() else None


def _has_fc2_lora(slots):
    return _FC2_LORA_A in slots


def _uses_kernels(x, idx, params, slots) -> bool:
    # With every neuron kept too: the kernel path saves the pre-activation, where the reference
    # would recompute its forward in the backward.
    return kernel_impl is not None and kernel_impl.supported(x, idx, slots)


@torch.library.custom_op("lecompile::sparse_mlp", mutates_args=())
def sparse_mlp(x: Tensor, idx: Tensor, params: List[Tensor], slots: List[int], lora_scales: List[float],
               activation: str, fc2_lora_dropout: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sparse MLP forward. Returns ``(y, lora_keep, pre1, pre2)``: ``lora_keep`` is fc2's LoRA
    dropout keep-mask ``[T, k]`` (bool), empty without such dropout; ``pre1``/``pre2`` are the
    compact pre-activations ``[T, k]`` the CUDA kernels save for backward (of fc1 or gate, and
    of up), empty on the reference path."""
    _check(x, idx, params, slots, lora_scales, activation)
    counters["lecompile"]["sparse_mlp_calls"] += 1
    fc1, up, fc2 = unpack_mlp(params, slots, lora_scales)
    if _has_fc2_lora(slots) and fc2_lora_dropout > 0.0:
        keep = torch.rand(x.numel() // x.shape[-1], idx.shape[1], device=x.device) >= fc2_lora_dropout
    else:
        keep = x.new_empty(0, dtype=torch.bool)
    kept = keep if keep.numel() else None
    if _uses_kernels(x, idx, params, slots):
        y, pre1, pre2 = kernel_impl.forward(x, idx, fc1, up, fc2, activation, kept, fc2_lora_dropout)
        return y, keep, pre1, pre2
    y = sparse_mlp_ref(x, idx, fc1, up, fc2, activation, _grouped_keep(keep, idx), fc2_lora_dropout)
    return y, keep, x.new_empty(0), x.new_empty(0)


@sparse_mlp.register_fake
def _(x, idx, params, slots, lora_scales, activation, fc2_lora_dropout):
    tokens = x.numel() // x.shape[-1]
    y = x.new_empty(*x.shape[:-1], params[slots.index(_FC2_WEIGHT)].shape[0])
    keep = x.new_empty(0, dtype=torch.bool)
    if _has_fc2_lora(slots) and fc2_lora_dropout > 0.0:
        keep = x.new_empty(tokens, idx.shape[1], dtype=torch.bool)
    pre1, pre2 = x.new_empty(0), x.new_empty(0)
    if _uses_kernels(x, idx, params, slots):
        pre1 = x.new_empty(tokens, idx.shape[1])
        if slots.count(len(SLOTS)):  # gated: up's weight is present
            pre2 = x.new_empty(tokens, idx.shape[1])
    return y, keep, pre1, pre2


@torch.library.custom_op("lecompile::sparse_mlp_backward", mutates_args=())
def sparse_mlp_backward(grad_y: Tensor, x: Tensor, idx: Tensor, params: List[Tensor],
                        slots: List[int], lora_scales: List[float], activation: str,
                        fc2_lora_dropout: float, lora_keep: Tensor, pre1: Tensor, pre2: Tensor,
                        wanted: List[bool]) -> List[Tensor]:
    """Gradients of :func:`sparse_mlp` for the inputs ``[x, *params]`` flagged in ``wanted``:
    with the kernels when the forward saved pre-activations, else by differentiating the
    compact recomputed reference forward."""
    if pre1.numel():
        fc1, up, fc2 = unpack_mlp(params, slots, lora_scales)
        keys = ["x"] + [f"{MLP_LINEARS[s // len(SLOTS)]}.{SLOTS[s % len(SLOTS)]}" for s in slots]
        grads = kernel_impl.backward(grad_y, x, idx, fc1, up, fc2, activation,
                                     lora_keep if lora_keep.numel() else None, fc2_lora_dropout,
                                     pre1, pre2, dict(zip(keys, wanted)))
        flat = [x, *params]
        return [grads[k].to(t.dtype).contiguous() for k, t, w in zip(keys, flat, wanted) if w]
    flat = [x, *params]
    keep = _grouped_keep(lora_keep, idx)

    def forward(*wanted_inputs):
        it = iter(wanted_inputs)
        full = [next(it) if w else t for t, w in zip(flat, wanted)]
        fc1, up, fc2 = unpack_mlp(full[1:], slots, lora_scales)
        return sparse_mlp_ref(full[0], idx, fc1, up, fc2, activation, keep, fc2_lora_dropout)

    # torch.func.vjp, not torch.autograd.grad: a custom op's kernel runs below the autograd
    # dispatch key, where only functorch's own transforms still record a graph.
    _, vjp = torch.func.vjp(forward, *[t for t, w in zip(flat, wanted) if w])
    return [g.contiguous() for g in vjp(grad_y)]


@sparse_mlp_backward.register_fake
def _(grad_y, x, idx, params, slots, lora_scales, activation, fc2_lora_dropout, lora_keep, pre1,
      pre2, wanted):
    return [t.new_empty(t.shape) for t, w in zip([x, *params], wanted) if w]


def _setup_context(ctx, inputs, output):
    x, idx, params, slots, lora_scales, activation, p = inputs
    ctx.wanted = [t.requires_grad for t in (x, *params)]
    ctx.args = (slots, lora_scales, activation, p)
    ctx.save_for_backward(idx, output[1], output[2], output[3], x, *params)


def _backward(ctx, grad_y, _grad_keep, _grad_pre1, _grad_pre2):
    idx, keep, pre1, pre2, x, *params = ctx.saved_tensors
    slots, lora_scales, activation, p = ctx.args
    grads = iter(sparse_mlp_backward(grad_y.contiguous(), x, idx, params, slots, lora_scales,
                                     activation, p, keep, pre1, pre2, ctx.wanted))
    out = [next(grads) if w else None for w in ctx.wanted]
    return out[0], None, out[1:], None, None, None, None


sparse_mlp.register_autograd(_backward, setup_context=_setup_context)


def sparse_mlp_call(x: Tensor, idx: Tensor, fc1: AdaptedLinear, up: Optional[AdaptedLinear],
                    fc2: AdaptedLinear, activation: str, fc2_lora_dropout: float = 0.0) -> Tensor:
    """The op on :class:`AdaptedLinear` arguments, returning ``y`` only."""
    params, slots, scales = pack_mlp(fc1, up, fc2)
    return sparse_mlp(x, idx, params, slots, scales, activation, fc2_lora_dropout)[0]
