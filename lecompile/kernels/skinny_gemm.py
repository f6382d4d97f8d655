"""LoRA's skinny GEMMs against a ``[T, N]`` activation, both from one read of it.

A LoRA linear's adapter adds four GEMMs of rank ``r`` against a ``[tokens, width]`` tensor:
``x @ A.T`` (forward), ``dy @ B`` and ``dB = dy.T @ xa`` (both read ``dy``) and ``dA = dxa.T @ x``.
They are bound by reading that tensor, and cuBLAS runs them at 40-55% of the H200's bandwidth
with a split-K reduction kernel after two of them (``benchmarks/results/profiles/adapter_kernels.txt``).
:func:`skinny_matmuls` computes ``g @ e`` and ``g.T @ c`` in one pass over ``g``: a grid of
``[tokens_per_program, BLOCK_N]`` blocks of ``g``, each loading its block once in token tiles.
Each product is reduced over one of the grid's two dimensions, so each program writes fp32
partial sums (``g @ e`` per column block, ``g.T @ c`` per token block) that the caller sums:
under Inductor that sum, its cast and whatever consumes it fuse into one kernel. Fixed order,
so the result is deterministic. :func:`skinny_matmuls_ref` is the PyTorch twin.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .gather_gemm import AUTOTUNE_CACHE, _dot, _dot_fp32, _interpreting
from .lowrank_gemm import MAX_RANK, rank_block

Tensor = torch.Tensor
_DTYPES = (torch.float16, torch.bfloat16)


def _configs():
    if _interpreting():  # the CPU interpreter: one small config keeps tests fast
        return [triton.Config(dict(BLOCK_T=16), num_warps=1)]
    return [triton.Config(dict(BLOCK_T=bt), num_warps=w, num_stages=s)
            for bt in (32, 64) for w in (4, 8) for s in (3, 4)]


@triton.autotune(configs=_configs(), key=["T", "N", "R_E", "R_C", "TOKENS_PER_PROGRAM", "BLOCK_N"], **AUTOTUNE_CACHE)
@triton.jit
def _skinny_kernel(g_ptr, e_ptr, c_ptr, ge_ptr, gc_ptr, T, N, R_E, R_C,
                   stride_gt, stride_en, stride_er, stride_ct, stride_cr,
                   HAS_E: tl.constexpr, HAS_C: tl.constexpr, RANK_E: tl.constexpr, RANK_C: tl.constexpr,
                   TOKENS_PER_PROGRAM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if HAS_E:
        offs_re = tl.arange(0, RANK_E)
        e = tl.load(e_ptr + offs_n[:, None] * stride_en + offs_re[None, :] * stride_er,
                    mask=mask_n[:, None] & (offs_re[None, :] < R_E), other=0)
    if HAS_C:
        offs_rc = tl.arange(0, RANK_C)
        gc = tl.zeros((BLOCK_N, RANK_C), dtype=tl.float32)
    first = pid_t * TOKENS_PER_PROGRAM
    for t in tl.range(first, first + TOKENS_PER_PROGRAM, BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        g = tl.load(g_ptr + offs_t[:, None] * stride_gt + offs_n[None, :], mask=mask_t[:, None] & mask_n[None, :],
                    other=0)
        if HAS_E:  # this column block's share of (g @ e)[tokens]
            ge = _dot(g, e, tl.zeros((BLOCK_T, RANK_E), dtype=tl.float32), "tf32", DOT_FP32)
            tl.store(ge_ptr + (pid_n * T + offs_t[:, None]) * R_E + offs_re[None, :], ge,
                     mask=mask_t[:, None] & (offs_re[None, :] < R_E))
        if HAS_C:
            c = tl.load(c_ptr + offs_t[:, None] * stride_ct + offs_rc[None, :] * stride_cr,
                        mask=mask_t[:, None] & (offs_rc[None, :] < R_C), other=0)
            gc = _dot(g.T, c, gc, "tf32", DOT_FP32)
    if HAS_C:  # this token block's share of (g.T @ c)[columns]
        tl.store(gc_ptr + (pid_t * N + offs_n[:, None]) * R_C + offs_rc[None, :], gc,
                 mask=mask_n[:, None] & (offs_rc[None, :] < R_C))


def split(tokens: int, width: int) -> Tuple[int, int]:
    """``(tokens per program, columns per program)`` for a ``[tokens, width]`` operand: blocks of
    256 x 256 where the operand is that large, so each partial sum is an eighth of the bytes of
    ``g`` at rank 16 and a 4096 x 2048 operand spreads over 128 programs."""
    if _interpreting():
        return 32, 32
    return 256, (256 if width >= 1024 else 128)


def supports(g: Tensor, e: Optional[Tensor] = None, c: Optional[Tensor] = None) -> bool:
    """Whether :func:`skinny_matmuls` takes these operands (metadata only, so a fake tensor gets
    the same answer): ``g [T, N]`` fp16/bf16 on CUDA (or Triton's CPU interpreter), ``e [N, r]``
    and ``c [T, r]`` of its dtype, ranks within :data:`~lecompile.kernels.lowrank_gemm.MAX_RANK`."""
    if e is None and c is None:
        return False
    if not (g.device.type == "cuda" or (g.device.type == "cpu" and _interpreting())):
        return False
    if g.dim() != 2 or g.dtype not in _DTYPES:
        return False
    for t, rows in ((e, g.shape[1]), (c, g.shape[0])):
        if t is not None and (t.dim() != 2 or t.shape[0] != rows or t.dtype != g.dtype or t.device != g.device
                              or rank_block(t.shape[1]) > MAX_RANK):
            return False
    return True


def skinny_matmuls(g: Tensor, e: Optional[Tensor] = None, c: Optional[Tensor] = None
                   ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Partial sums of ``g @ e`` and ``g.T @ c`` from one read of ``g [T, N]``: ``(ge [S, T, r_e],
    gc [P, N, r_c])`` in fp32, ``ge.sum(0) = g @ e`` and ``gc.sum(0) = g.T @ c`` (``None`` for an
    operand not given). Raises ``ValueError`` for operands :func:`supports` rejects. Traceable
    (``wrap_triton``), for a ``torch.library.triton_op``."""
    from torch.library import wrap_triton
    if not supports(g, e, c):
        raise ValueError(f"skinny_matmuls: unsupported operands: g {tuple(g.shape)} {g.dtype} on {g.device}, "
                         f"e {None if e is None else (tuple(e.shape), e.dtype)}, "
                         f"c {None if c is None else (tuple(c.shape), c.dtype)} (g [T, N] fp16/bf16 on CUDA, "
                         f"e [N, r] and c [T, r] of its dtype, r <= {MAX_RANK})")
    if g.stride(1) != 1:
        g = g.contiguous()
    tokens, width = g.shape
    per_program, block_n = split(tokens, width)
    grid = (triton.cdiv(tokens, per_program), triton.cdiv(width, block_n))
    r_e = e.shape[1] if e is not None else 0
    r_c = c.shape[1] if c is not None else 0
    ge = g.new_empty(grid[1], tokens, r_e, dtype=torch.float32) if e is not None else None
    gc = g.new_empty(grid[0], width, r_c, dtype=torch.float32) if c is not None else None
    if tokens == 0 or width == 0:
        return (None if ge is None else ge.zero_()), (None if gc is None else gc.zero_())
    e_, c_ = (e if e is not None else g), (c if c is not None else g)
    with torch.cuda.device(g.device) if g.is_cuda else contextlib.nullcontext():
        wrap_triton(_skinny_kernel)[grid](
            g, e_, c_, ge if ge is not None else g, gc if gc is not None else g, tokens, width, r_e, r_c,
            g.stride(0), e_.stride(0), e_.stride(1), c_.stride(0), c_.stride(1),
            HAS_E=e is not None, HAS_C=c is not None, RANK_E=rank_block(max(r_e, 1)),
            RANK_C=rank_block(max(r_c, 1)), TOKENS_PER_PROGRAM=per_program, BLOCK_N=block_n,
            DOT_FP32=_dot_fp32(g.dtype))
    return ge, gc


def skinny_matmuls_ref(g: Tensor, e: Optional[Tensor] = None, c: Optional[Tensor] = None
                       ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """PyTorch twin of :func:`skinny_matmuls`, already summed: ``(g @ e, g.T @ c)`` in fp32."""
    return (None if e is None else g.float() @ e.float()), (None if c is None else g.float().t() @ c.float())
