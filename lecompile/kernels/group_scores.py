"""Per-group neuron scores from a low-rank estimate, without the ``[T, ffn]`` estimate in memory.

``scores[g, n] = sum over tokens t of group g of h[t, n]^2`` where
``h = act(U @ V.T + b)`` (or ``act(U @ V.T + b) * (U2 @ V2.T + b2)`` for gated MLPs).
``U [T, R]`` holds a token's low-rank coordinates (SVD projection and LoRA's ``A`` output),
``V [ffn, R]`` the matching per-neuron factors. Each program owns a block of neurons of one
group and runs over the group's tokens, so the estimate lives in registers only: the SVD
predictor reads ``T * R`` and ``ffn * R`` values instead of writing and re-reading
``T * ffn`` several times.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import ACT_CODES, AUTOTUNE_CACHE, _activate, _interpreting


@triton.jit
def _lowrank_block(u_ptr, v_ptr, b_ptr, rows, row_mask, offs_n, n_mask, R, stride_u, stride_v,
                   HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_R)
    u = tl.load(u_ptr + rows[:, None] * stride_u + offs_r[None, :],
                mask=row_mask[:, None] & (offs_r[None, :] < R), other=0.0)
    v = tl.load(v_ptr + offs_n[:, None] * stride_v + offs_r[None, :],
                mask=n_mask[:, None] & (offs_r[None, :] < R), other=0.0)
    h = tl.dot(u, tl.trans(v))  # TF32 on GPUs: scores only rank neurons
    if HAS_BIAS:
        h += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    return h


def _configs():
    tiles = ((16, 32, 1),) if _interpreting() else ((64, 128, 4), (128, 128, 8), (64, 64, 4), (32, 128, 4))
    return [triton.Config({"BLOCK_T": bt, "BLOCK_N": bn}, num_warps=w) for bt, bn, w in tiles]


@triton.autotune(configs=_configs(), key=["FFN", "GROUP", "R", "R2", "GATED", "ACT"], **AUTOTUNE_CACHE)
@triton.jit
def _group_scores_kernel(u_ptr, v_ptr, b_ptr, u2_ptr, v2_ptr, b2_ptr, out_ptr, GROUP, FFN, R, R2,
                         stride_u, stride_v, stride_u2, stride_v2,
                         HAS_BIAS: tl.constexpr, GATED: tl.constexpr, HAS_BIAS2: tl.constexpr,
                         ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_R2: tl.constexpr):
    g = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < FFN
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t0 in range(0, GROUP, BLOCK_T):
        local = t0 + tl.arange(0, BLOCK_T)
        row_mask = local < GROUP
        rows = g * GROUP + local
        h = _activate(_lowrank_block(u_ptr, v_ptr, b_ptr, rows, row_mask, offs_n, n_mask, R, stride_u,
                                     stride_v, HAS_BIAS, BLOCK_R), ACT)
        if GATED:
            h *= _lowrank_block(u2_ptr, v2_ptr, b2_ptr, rows, row_mask, offs_n, n_mask, R2, stride_u2,
                                stride_v2, HAS_BIAS2, BLOCK_R2)
        h = tl.where(row_mask[:, None], h, 0.0)
        acc += tl.sum(h * h, axis=0)
    tl.store(out_ptr + g * FFN + offs_n, acc, mask=n_mask)


def _fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.float().contiguous() if t is not None else None


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def group_scores(u: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], group: int,
                 activation: str, second=None) -> torch.Tensor:
    """``[T / group, ffn]`` fp32 scores. ``second = (U2, V2, b2)`` for gated MLPs (no activation
    on it). Inputs are used in fp32 (products in TF32 on GPUs). PyTorch twin:
    :func:`lecompile.predictors.svd.group_scores_ref`."""
    tokens, ffn = u.shape[0], v.shape[0]
    if tokens % group:
        raise ValueError(f"group_scores: {tokens} tokens do not split into groups of {group}")
    if u.shape[1] != v.shape[1]:
        raise ValueError(f"group_scores: U is [T, {u.shape[1]}] but V is [ffn, {v.shape[1]}]")
    u, v, b = (_fp32(t) for t in (u, v, bias))
    u2, v2, b2 = (_fp32(t) for t in (second or (None, None, None)))
    gated = u2 is not None
    out = torch.empty(tokens // group, ffn, device=u.device, dtype=torch.float32)
    grid = lambda meta: (tokens // group, triton.cdiv(ffn, meta["BLOCK_N"]))  # noqa: E731
    r2 = u2.shape[1] if gated else 1
    # Absent operands get any valid pointer (``u``): the constexpr flags keep them unread.
    _group_scores_kernel[grid](
        u, v, b if b is not None else u, u2 if gated else u, v2 if gated else u,
        b2 if b2 is not None else u, out, group, ffn, u.shape[1], r2, u.stride(0), v.stride(0),
        u2.stride(0) if gated else 0, v2.stride(0) if gated else 0,
        HAS_BIAS=b is not None, GATED=gated, HAS_BIAS2=b2 is not None,
        ACT=ACT_CODES[activation], BLOCK_R=_block_r(u.shape[1]), BLOCK_R2=_block_r(r2))
    return out
