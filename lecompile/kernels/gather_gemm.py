"""Gather-GEMMs on neuron-major weights: the two primitives of the sparse MLP.

``M [ffn, d]`` holds one row per neuron (``W1`` as is, ``W2.T`` made contiguous), ``idx [G, k]``
the kept neurons of each group of ``group_tokens`` consecutive tokens (each row sorted):

- N-gather ``y = x @ M[idx].T``: output column ``j`` is neuron ``idx[g, j]`` (fc1, gate/up, and
  the input gradient of fc2). Epilogue: ``+ s * u @ B[idx].T`` (LoRA), ``+ bias[idx]``,
  ``* out_scale[idx]`` (IA3), saving the pre-activation, then the activation; a second weight
  computed in the same launch gives gated MLPs ``act(gate) * up``.
- K-gather ``y = h @ M[idx]``: the reduction runs over the kept neurons (fc2, and the input
  gradient of fc1); optionally a second ``(h2, M2)`` pair (gated backward), a low-rank term
  ``+ v @ a`` (LoRA's B-projection; the input gradient through LoRA's A) and ``+ bias``.

The rows are gathered inside the kernel, along the contiguous ``d`` axis of ``M``: no gathered
weight copy is written to memory. fp32 accumulation; fp16, bf16 and fp32 inputs.
Each launcher has a PyTorch twin (``*_ref``) that the tests compare it with.

Two cases run the GEMM on cuBLAS instead, faster than these main loops: every row kept (``k``
equals ``M``'s rows, so each sorted row of ``idx`` is ``arange``: a plain GEMM), and groups of at
least :data:`COMPACT_MIN_GROUP_TOKENS` tokens, whose kept rows are copied once per call into a
compact ``[G, k, d]`` tensor for a batched GEMM. The K-gather's terms are then added by
``baddbmm``/``addmm``, and the N-gather's epilogue runs as its kernel with the main loop replaced
by a load of cuBLAS's output (written over in place: no extra ``[T, k]`` buffer).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..activations import ACTIVATION_GRADS, ACTIVATIONS
from .common import (
    ACT_CODES,
    ACT_NONE,
    AUTOTUNE_CACHE,
    _activate,
    _activate_with_grad,
    _dot,
    _dot_fp32,
    _interpreting,
)

#: Token tiles must not straddle groups: ``group_tokens`` must be a multiple of this.
MIN_GROUP_TOKENS = 16
#: Groups of at least this many tokens gather their kept rows into a compact copy (``[G, k, d]``,
#: alive for one GEMM) and run the GEMM on cuBLAS. The copy moves ``4 k d`` bytes for ``2 k d``
#: flops per token of the group: on the H100 (3.35 TB/s, about 990 dense bf16 TFLOP/s) about
#: 590 / group_tokens of the GEMM's time, less from about 2048 tokens per group on than the gather
#: main loops lose to cuBLAS (22-43%, ``benchmarks/results/profiles/gather_gemm_main_loops.txt``
#: and ``benchmarks/results/sparse_mlp.json``).
COMPACT_MIN_GROUP_TOKENS = 2048


# (token tile, neuron or feature tile, reduction tile, warps, stages)
_TILINGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4), (128, 128, 32, 8, 4), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3),
            (128, 256, 64, 8, 3), (128, 128, 64, 4, 5), (128, 128, 128, 8, 3), (64, 256, 64, 8, 4)]


def _configs(tile_names):
    if _interpreting():  # the CPU interpreter: one small config keeps tests fast
        return [triton.Config(dict(zip(tile_names, (16, 32, 32))), num_warps=1)]
    return [triton.Config(dict(zip(tile_names, (bt, bn, bk))), num_warps=w, num_stages=s)
            for bt, bn, bk, w, s in _TILINGS]


def group_align(group_tokens: int) -> int:
    """Largest power of two up to 128 dividing ``group_tokens``: the autotune key for groups
    (token tiles must not straddle groups), so group sizes that allow the same tiles share
    one tuning."""
    return min(128, group_tokens & -group_tokens)


def _prune_by_group(configs, named_args, **kwargs):
    group = named_args["GROUP_ALIGN"]
    kept = [c for c in configs if group % c.kwargs["BLOCK_T"] == 0]
    return kept or [triton.Config({**configs[0].kwargs, "BLOCK_T": MIN_GROUP_TOKENS},
                                  num_warps=configs[0].num_warps)]


def _prune_ngather(configs, named_args, **kwargs):
    """:func:`_prune_by_group`; with the GEMM precomputed only the epilogue runs, so configs that
    differ only in the reduction tile or the pipeline depth are one."""
    kept = _prune_by_group(configs, named_args, **kwargs)
    if not kwargs.get("PRECOMPUTED"):
        return kept
    distinct = {}
    for c in kept:
        distinct.setdefault((c.kwargs["BLOCK_T"], c.kwargs["BLOCK_N"], c.num_warps), c)
    return list(distinct.values())


@triton.jit
def _load(ptrs, mask, EVEN: tl.constexpr):
    """A main-loop load: unmasked when the tile cannot cross the edge."""
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _ngather_tile(x_ptr, m_ptr, base_ptr, rows, offs_t, offs_n, T, D, KSEL, stride_xt, stride_m,
                  u_ptr, b_ptr, R, lora_scale, bias_ptr, oscale_ptr,
                  HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OSCALE: tl.constexpr,
                  PRECOMPUTED: tl.constexpr, R_PAD: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    mask_t = offs_t < T
    mask_n = offs_n < KSEL
    if PRECOMPUTED:  # ``x @ M[idx].T`` came from cuBLAS (every row kept, or a compact copy), [T, KSEL]
        acc = tl.load(base_ptr + offs_t[:, None].to(tl.int64) * KSEL + offs_n[None, :],
                      mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        # The main loop needs masks only for a ragged D: token tiles divide T (they divide the group,
        # see _prune_by_group), and columns past KSEL read row idx 0 (``rows`` is loaded with other=0)
        # and are never stored.
        x_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt + offs_d[None, :]
        m_ptrs = m_ptr + rows[None, :] * stride_m + offs_d[:, None]
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask_d = d0 + offs_d < D
            acc = _dot(_load(x_ptrs, mask_d[None, :], EVEN_D), _load(m_ptrs, mask_d[:, None], EVEN_D), acc,
                       PRECISION, DOT_FP32)
            x_ptrs += BLOCK_D
            m_ptrs += BLOCK_D
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        ut = tl.load(u_ptr + offs_t[:, None].to(tl.int64) * R + offs_r[None, :],
                     mask=mask_t[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + rows[None, :] * R + offs_r[:, None],
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc += lora_scale * tl.dot(ut, bt, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_OSCALE:
        acc *= tl.load(oscale_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.autotune(configs=_configs(("BLOCK_T", "BLOCK_N", "BLOCK_D")),
                 key=["D", "KSEL", "GROUP_ALIGN", "R", "GATED", "HAS_LORA", "ACT", "GRAD_ACT", "PRECOMPUTED"],
                 prune_configs_by={"early_config_prune": _prune_ngather},
                 restore_value=["base_ptr", "base2_ptr"], **AUTOTUNE_CACHE)  # outputs may overwrite them
@triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
@triton.jit
def _ngather_kernel(x_ptr, idx_ptr, out_ptr, out2_ptr, pre_ptr, pre2_ptr, h_ptr, sgrad_ptr,
                    m_ptr, u_ptr, b_ptr, bias_ptr, oscale_ptr, base_ptr,
                    m2_ptr, u2_ptr, b2_ptr, bias2_ptr, oscale2_ptr, base2_ptr,
                    T, D, KSEL, group_tokens, GROUP_ALIGN, R, lora_scale, lora_scale2,
                    stride_xt, stride_m, stride_m2, stride_idx,
                    ACT: tl.constexpr, GRAD_ACT: tl.constexpr, GATED: tl.constexpr,
                    SAVE_PRE: tl.constexpr, STORE_H: tl.constexpr, SCALE_GRAD: tl.constexpr, CHUNK: tl.constexpr,
                    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OSCALE: tl.constexpr,
                    HAS_LORA2: tl.constexpr, HAS_BIAS2: tl.constexpr, HAS_OSCALE2: tl.constexpr,
                    PRECOMPUTED: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                    EVEN_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < KSEL
    group = (pid_t * BLOCK_T) // group_tokens
    rows = tl.load(idx_ptr + group * stride_idx + offs_n, mask=mask_n, other=0).to(tl.int64)
    a = _ngather_tile(x_ptr, m_ptr, base_ptr, rows, offs_t, offs_n, T, D, KSEL, stride_xt, stride_m,
                      u_ptr, b_ptr, R, lora_scale, bias_ptr, oscale_ptr, HAS_LORA, HAS_BIAS,
                      HAS_OSCALE, PRECOMPUTED, R_PAD, EVEN_D, BLOCK_T, BLOCK_N, BLOCK_D, PRECISION, DOT_FP32)
    out_offs = offs_t[:, None].to(tl.int64) * KSEL + offs_n[None, :]
    mask = (offs_t < T)[:, None] & mask_n[None, :]
    if GRAD_ACT != 0:  # backward: ``a`` is dL/dh; chain through the saved pre-activation(s)
        g = tl.load(pre_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
        act_g, dact_g = _activate_with_grad(g, GRAD_ACT)
        if GATED:
            u = tl.load(pre2_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
        if SCALE_GRAD:  # ``a`` is dL/d(h * s) for a scale ``s`` on h: dL/ds sums ``a * h`` over tokens,
            # here per CHUNK tokens (rows of sgrad), which stays exact under autotuning's repeated runs
            h_full = act_g * u if GATED else act_g
            part = tl.sum(tl.reshape(tl.where(mask, a * h_full, 0.0), (BLOCK_T // CHUNK, CHUNK, BLOCK_N)), axis=1)
            chunks = pid_t * (BLOCK_T // CHUNK) + tl.arange(0, BLOCK_T // CHUNK)
            tl.store(sgrad_ptr + chunks[:, None].to(tl.int64) * KSEL + offs_n[None, :], part,
                     mask=(chunks * CHUNK < T)[:, None] & mask_n[None, :])
            a = a * tl.load(oscale_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            tl.store(out2_ptr + out_offs, (a * act_g).to(out2_ptr.dtype.element_ty), mask=mask)
            a = a * u * dact_g
            act_g = act_g * u
        else:
            a = a * dact_g
        if STORE_H:  # the forward's compact output, recomputed for the adapters' gradients
            tl.store(h_ptr + out_offs, act_g.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + out_offs, a.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if SAVE_PRE:
            tl.store(pre_ptr + out_offs, a.to(pre_ptr.dtype.element_ty), mask=mask)
        h = _activate(a, ACT)
        if GATED:
            b = _ngather_tile(x_ptr, m2_ptr, base2_ptr, rows, offs_t, offs_n, T, D, KSEL, stride_xt, stride_m2,
                              u2_ptr, b2_ptr, R, lora_scale2, bias2_ptr, oscale2_ptr, HAS_LORA2,
                              HAS_BIAS2, HAS_OSCALE2, PRECOMPUTED, R_PAD, EVEN_D, BLOCK_T, BLOCK_N, BLOCK_D,
                              PRECISION, DOT_FP32)
            if SAVE_PRE:
                tl.store(pre2_ptr + out_offs, b.to(pre2_ptr.dtype.element_ty), mask=mask)
            h = h * b
        tl.store(out_ptr + out_offs, h.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(("BLOCK_T", "BLOCK_D", "BLOCK_K")),
                 key=["D", "KSEL", "GROUP_ALIGN", "TWO", "R"],
                 prune_configs_by={"early_config_prune": _prune_by_group}, **AUTOTUNE_CACHE)
@triton.heuristics({"EVEN_K": lambda args: args["KSEL"] % args["BLOCK_K"] == 0,
                    "EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
@triton.jit
def _kgather_kernel(h_ptr, m_ptr, h2_ptr, m2_ptr, idx_ptr, bias_ptr, v_ptr, a_ptr, res_ptr, out_ptr,
                    T, D, KSEL, group_tokens, GROUP_ALIGN, R, stride_m, stride_m2, stride_idx,
                    stride_ar, stride_ad, stride_res,
                    TWO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOW_RANK: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr,
                    R_PAD: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                    EVEN_K: tl.constexpr, EVEN_D: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < D
    group = (pid_t * BLOCK_T) // group_tokens
    # As in the N-gather, masks only for ragged edges: a ragged KSEL (padded neurons read row
    # idx 0 with a zero h), a ragged D. Token tiles divide T.
    offs_j = tl.arange(0, BLOCK_K)
    h_offs = offs_t[:, None].to(tl.int64) * KSEL + offs_j[None, :]
    idx_ptrs = idx_ptr + group * stride_idx + offs_j
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, KSEL, BLOCK_K):
        mask_j = j0 + offs_j < KSEL
        rows = _load(idx_ptrs, mask_j, EVEN_K).to(tl.int64)
        acc = _dot(_load(h_ptr + h_offs, mask_j[None, :], EVEN_K),
                   _load(m_ptr + rows[:, None] * stride_m + offs_d[None, :], mask_d[None, :], EVEN_D),
                   acc, PRECISION, DOT_FP32)
        if TWO:
            acc = _dot(_load(h2_ptr + h_offs, mask_j[None, :], EVEN_K),
                       _load(m2_ptr + rows[:, None] * stride_m2 + offs_d[None, :], mask_d[None, :], EVEN_D),
                       acc, PRECISION, DOT_FP32)
        h_offs += BLOCK_K
        idx_ptrs += BLOCK_K
    if HAS_LOW_RANK:  # + v @ a, rank R (LoRA's B-projection, or the input gradient through A)
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        vt = tl.load(v_ptr + offs_t[:, None].to(tl.int64) * R + offs_r[None, :],
                     mask=mask_t[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        at = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_d[None, :] * stride_ad,
                     mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(vt, at, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    mask_out = mask_t[:, None] & mask_d[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs_t[:, None].to(tl.int64) * stride_res + offs_d[None, :], mask=mask_out,
                       other=0.0).to(tl.float32)
    out_offs = offs_t[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


class Neurons:
    """The per-neuron terms of one N-gather weight: ``M [ffn, d]`` and optional
    ``lora = (u [T, r], B [ffn, r], scale)``, ``bias [ffn]``, ``out_scale [ffn]``."""

    def __init__(self, m: torch.Tensor, lora: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
                 bias: Optional[torch.Tensor] = None, out_scale: Optional[torch.Tensor] = None):
        self.m, self.lora, self.bias, self.out_scale = m, lora, bias, out_scale


def _check_common(name, a, m, idx, group_tokens):
    if a.dim() != 2 or m.dim() != 2 or idx.dim() != 2:
        raise ValueError(f"{name}: expected 2-D input, weight and idx, got {a.dim()}, {m.dim()}, {idx.dim()}")
    if m.stride(1) != 1:
        raise ValueError(f"{name}: the neuron-major weight must have contiguous rows")
    if idx.dtype != torch.int64 or not idx.is_contiguous():
        raise ValueError(f"{name}: idx must be contiguous int64")
    tokens = a.shape[0]
    if group_tokens <= 0 or tokens % group_tokens or idx.shape[0] != tokens // group_tokens:
        raise ValueError(f"{name}: {tokens} tokens, group_tokens={group_tokens} and {idx.shape[0]} "
                         "index rows do not agree")
    if group_tokens % MIN_GROUP_TOKENS:
        raise ValueError(f"{name}: group_tokens={group_tokens} must be a multiple of {MIN_GROUP_TOKENS}")


def _keeps_every_row(idx, m) -> bool:
    """Whether ``idx`` keeps all of ``M``'s rows: each sorted row of it is then ``arange``, and the
    gather-GEMM is a plain GEMM."""
    return idx.shape[1] == m.shape[0]


def uses_compact_copies(group_tokens: int) -> bool:
    """Whether groups of ``group_tokens`` tokens run their GEMMs on cuBLAS over compact copies of
    their kept rows rather than in the gather main loops."""
    return group_tokens >= COMPACT_MIN_GROUP_TOKENS


def _on_cublas(idx, m, group_tokens) -> bool:
    """Whether the GEMM runs on cuBLAS rather than in the gather main loop (see the module doc)."""
    return _keeps_every_row(idx, m) or uses_compact_copies(group_tokens)


def _batched(a, m, idx, group_tokens):
    """``a [T, *]`` per group and ``M``'s kept rows per group, ``([G, n, *], [G, k, d])``, the
    operands of a batched GEMM; with every row kept, one group of all tokens and ``M`` itself."""
    if _keeps_every_row(idx, m):
        return a.unsqueeze(0), m.unsqueeze(0)
    groups, ksel = idx.shape
    return (a.reshape(groups, group_tokens, a.shape[1]),
            m.index_select(0, idx.reshape(-1)).view(groups, ksel, m.shape[1]))


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def ngather_matmul(x: torch.Tensor, idx: torch.Tensor, group_tokens: int, first: Neurons,
                   second: Optional[Neurons] = None, activation: Optional[str] = None,
                   save_pre: bool = False):
    """``act(first(x)) [* second(x)]`` for the kept neurons: ``[T, k]``.

    ``first(x) = ((x @ M[idx].T) + s * u @ B[idx].T + bias[idx]) * out_scale[idx]``. With
    ``save_pre``, also returns the pre-activations (``first``, and ``second`` when given).
    """
    return _launch_ngather(x, idx, group_tokens, first, second, activation, save_pre, None)


def ngather_matmul_grad(dy: torch.Tensor, idx: torch.Tensor, group_tokens: int, m: Neurons,
                        activation: str, pre: torch.Tensor, pre_up: Optional[torch.Tensor] = None,
                        return_h: bool = False, return_scale_grad: bool = False):
    """Backward of the activation fused into the N-gather: with ``dh = m(dy)`` (``dy @ M[idx].T``
    plus its LoRA term, times ``m.out_scale[idx]``), returns ``dh * act'(pre)``, or for a gated
    MLP ``(dh * up * act'(gate), dh * act(gate))`` with ``pre = gate``, ``pre_up = up``. With
    ``return_h``, also the forward's output ``h = act(pre) [* up]``. With ``return_scale_grad``
    (``m.out_scale`` is then the scale ``s`` the next layer applied to ``h``, IA3 on fc2's input),
    also ``dL/ds`` per group and kept neuron, ``[G, k]`` fp32, last."""
    if return_scale_grad and m.out_scale is None:
        raise ValueError("ngather_matmul_grad: return_scale_grad needs the scale as m.out_scale")
    return _launch_ngather(dy, idx, group_tokens, m, None, None, False, (activation, pre, pre_up), return_h,
                           return_scale_grad)


def _launch_ngather(x, idx, group_tokens, first, second, activation, save_pre, grad_of, return_h=False,
                    scale_grad=False):
    _check_common("ngather_matmul", x, first.m, idx, group_tokens)
    x = x.contiguous()
    tokens, d = x.shape
    ksel = idx.shape[1]
    s2 = second or first
    cublas = _on_cublas(idx, first.m, group_tokens)
    gated = second is not None or (grad_of is not None and grad_of[2] is not None)

    def gemm(n: Neurons):
        xg, mg = _batched(x, n.m, idx, group_tokens)
        return torch.bmm(xg, mg.transpose(1, 2)).view(tokens, ksel)

    # On cuBLAS, the GEMMs' outputs are the buffers the kernel writes over: each program reads its
    # tile of them before it stores to the same tile of ``out`` and the pre-activations.
    base = gemm(first) if cublas else None
    base2 = gemm(s2) if cublas and second is not None else None
    out = base if base is not None and (grad_of is not None or not save_pre) else x.new_empty(tokens, ksel)
    out2 = x.new_empty(tokens, ksel) if grad_of is not None and gated else out
    if grad_of is not None:
        pre, pre2 = grad_of[1].contiguous(), (grad_of[2].contiguous() if gated else out)
    else:
        pre = (base if cublas else x.new_empty(tokens, ksel)) if save_pre else out
        pre2 = (base2 if cublas else x.new_empty(tokens, ksel)) if save_pre and gated else out
    h = x.new_empty(tokens, ksel) if return_h else out
    sgrad = torch.empty(tokens // MIN_GROUP_TOKENS, ksel, dtype=torch.float32, device=x.device) if scale_grad else out

    def lora(n: Neurons):
        if n.lora is None:
            return out, out, 0.0, 0
        u, b, scale = n.lora
        return u.contiguous(), b.contiguous(), float(scale), u.shape[1]

    u1, b1, sc1, r1 = lora(first)
    u2, b2, sc2, r2 = lora(s2)
    if first.lora is not None and second is not None and second.lora is not None and r1 != r2:
        raise ValueError(f"ngather_matmul: gate and up LoRA ranks differ ({r1} vs {r2})")
    rank = max(r1, r2)
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_T"]), triton.cdiv(ksel, meta["BLOCK_N"]))  # noqa: E731
    _ngather_kernel[grid](
        x, idx, out, out2, pre, pre2, h, sgrad,
        first.m, u1, b1, first.bias if first.bias is not None else out,
        first.out_scale if first.out_scale is not None else out, base if cublas else out,
        s2.m, u2, b2, s2.bias if s2.bias is not None else out,
        s2.out_scale if s2.out_scale is not None else out, base2 if base2 is not None else out,
        tokens, d, ksel, group_tokens, group_align(group_tokens), rank, sc1, sc2,
        x.stride(0), first.m.stride(0), s2.m.stride(0), idx.stride(0),
        ACT=ACT_CODES[activation], GRAD_ACT=ACT_CODES[grad_of[0]] if grad_of else ACT_NONE,
        GATED=gated, SAVE_PRE=save_pre, STORE_H=return_h, SCALE_GRAD=scale_grad, CHUNK=MIN_GROUP_TOKENS,
        HAS_LORA=first.lora is not None, HAS_BIAS=first.bias is not None,
        HAS_OSCALE=first.out_scale is not None and not scale_grad,
        HAS_LORA2=second is not None and second.lora is not None,
        HAS_BIAS2=second is not None and second.bias is not None,
        HAS_OSCALE2=second is not None and second.out_scale is not None, PRECOMPUTED=cublas,
        R_PAD=max(16, triton.next_power_of_2(max(rank, 1))), PRECISION=_precision(x.dtype),
        DOT_FP32=_dot_fp32(x.dtype))
    if grad_of is not None:
        grads = (out, out2) if gated else (out,)
        grads += (h,) if return_h else ()
        grads += (sgrad.reshape(idx.shape[0], -1, ksel).sum(1),) if scale_grad else ()
        return grads if len(grads) > 1 else out
    if not save_pre:
        return out
    return (out, pre, pre2) if gated else (out, pre)


def kgather_matmul(h: torch.Tensor, m: torch.Tensor, idx: torch.Tensor, group_tokens: int,
                   bias: Optional[torch.Tensor] = None,
                   second: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   low_rank: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``h @ M[idx] (+ h2 @ M2[idx]) + v @ a + bias + residual``: ``[T, d]`` from compact
    ``h [T, k]``; ``low_rank = (v [T, r], a [r, d])`` and ``residual [T, d]`` (a residual stream,
    rows of unit stride) are added in fp32 before the single rounding (on cuBLAS, see the module
    doc, each term's ``baddbmm``/``addmm``/``add`` rounds once)."""
    _check_common("kgather_matmul", h, m, idx, group_tokens)
    tokens, ksel = h.shape
    d = m.shape[1]
    if low_rank is not None and (low_rank[0].shape[0] != tokens or low_rank[1].shape != (low_rank[0].shape[1], d)):
        raise ValueError(f"kgather_matmul: low_rank shapes {tuple(low_rank[0].shape)} and "
                         f"{tuple(low_rank[1].shape)} do not fit {tokens} tokens and d={d}")
    if residual is not None and (tuple(residual.shape) != (tokens, d) or residual.stride(1) != 1):
        raise ValueError(f"kgather_matmul: residual of shape {tuple(residual.shape)} and strides "
                         f"{residual.stride()} is not [{tokens}, {d}] with rows of unit stride")
    if _on_cublas(idx, m, group_tokens):
        return _kgather_cublas(h, m, idx, group_tokens, bias, second, low_rank, residual)
    h = h.contiguous()
    out = h.new_empty(tokens, d)
    h2, m2 = second if second is not None else (h, m)
    v, a = low_rank if low_rank is not None else (out, out)
    rank = v.shape[1] if low_rank is not None else 0
    v = v.contiguous()
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_T"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    res = residual if residual is not None else out
    _kgather_kernel[grid](h, m, h2.contiguous(), m2, idx, bias if bias is not None else out, v, a, res, out,
                          tokens, d, ksel, group_tokens, group_align(group_tokens), rank, m.stride(0),
                          m2.stride(0), idx.stride(0), a.stride(0), a.stride(1), res.stride(0),
                          TWO=second is not None, HAS_BIAS=bias is not None, HAS_LOW_RANK=low_rank is not None,
                          HAS_RESIDUAL=residual is not None,
                          R_PAD=max(16, triton.next_power_of_2(max(rank, 1))),
                          PRECISION=_precision(h.dtype), DOT_FP32=_dot_fp32(h.dtype))
    return out


def _kgather_cublas(h, m, idx, group_tokens, bias, second, low_rank, residual):
    hg, mg = _batched(h, m, idx, group_tokens)
    out = torch.bmm(hg, mg) if bias is None else torch.baddbmm(bias.to(h.dtype), hg, mg)
    if second is not None:
        h2g, m2g = _batched(second[0].to(h.dtype), second[1], idx, group_tokens)
        out.baddbmm_(h2g, m2g)
    out = out.view(h.shape[0], -1)
    if low_rank is not None:
        v, a = low_rank
        out.addmm_(v.to(h.dtype), a.to(h.dtype))
    if residual is not None:
        out.add_(residual)
    return out


# ---- PyTorch twins -------------------------------------------------------------------------

def _grouped_rows(t, idx):
    return t[idx]  # [G, k, ...]


def _neurons_ref(x, idx, group_tokens, n: Neurons):
    g = idx.shape[0]
    xg = x.reshape(g, group_tokens, -1).float()
    a = xg @ _grouped_rows(n.m, idx).float().transpose(1, 2)
    if n.lora is not None:
        u, b, scale = n.lora
        a = a + scale * (u.reshape(g, group_tokens, -1).float() @ _grouped_rows(b, idx).float().transpose(1, 2))
    if n.bias is not None:
        a = a + n.bias[idx].float().unsqueeze(1)
    if n.out_scale is not None:
        a = a * n.out_scale[idx].float().unsqueeze(1)
    return a.reshape(x.shape[0], -1)


def _act_ref(a, activation):
    return a if activation is None else ACTIVATIONS[activation](a)


def ngather_matmul_ref(x, idx, group_tokens, first, second=None, activation=None, save_pre=False):
    """PyTorch twin of :func:`ngather_matmul` (fp32 math, output in ``x.dtype``)."""
    a = _neurons_ref(x, idx, group_tokens, first)
    h = _act_ref(a, activation)
    b = None
    if second is not None:
        b = _neurons_ref(x, idx, group_tokens, second)
        h = h * b
    if not save_pre:
        return h.to(x.dtype)
    pres = (a.to(x.dtype),) + ((b.to(x.dtype),) if b is not None else ())
    return (h.to(x.dtype),) + pres


def ngather_matmul_grad_ref(dy, idx, group_tokens, m, activation, pre, pre_up=None, return_h=False,
                            return_scale_grad=False):
    """PyTorch twin of :func:`ngather_matmul_grad`."""
    scale = m.out_scale
    dh = _neurons_ref(dy, idx, group_tokens, Neurons(m.m, m.lora, m.bias))
    act, dact = ACTIVATION_GRADS[activation](pre.float())
    h = act if pre_up is None else act * pre_up.float()
    scale_grad = (dh * h).reshape(idx.shape[0], group_tokens, -1).sum(1) if return_scale_grad else None
    if scale is not None:
        dh = (dh.reshape(idx.shape[0], group_tokens, -1) * scale[idx].float().unsqueeze(1)).reshape(dh.shape)
    if pre_up is None:
        grads = ((dh * dact).to(dy.dtype),)
    else:
        grads = (dh * pre_up.float() * dact).to(dy.dtype), (dh * act).to(dy.dtype)
    grads += (h.to(dy.dtype),) if return_h else ()
    grads += (scale_grad,) if return_scale_grad else ()
    return grads if len(grads) > 1 else grads[0]


def kgather_matmul_ref(h, m, idx, group_tokens, bias=None, second=None, low_rank=None, residual=None):
    """PyTorch twin of :func:`kgather_matmul`."""
    g = idx.shape[0]
    out = h.reshape(g, group_tokens, -1).float() @ _grouped_rows(m, idx).float()
    if second is not None:
        h2, m2 = second
        out = out + h2.reshape(g, group_tokens, -1).float() @ _grouped_rows(m2, idx).float()
    out = out.reshape(h.shape[0], -1)
    if low_rank is not None:
        v, a = low_rank
        out = out + v.float() @ a.float()
    if bias is not None:
        out = out + bias.float()
    if residual is not None:
        out = out + residual.float()
    return out.to(h.dtype)
