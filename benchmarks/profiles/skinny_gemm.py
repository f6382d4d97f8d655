"""LoRA's skinny GEMMs from one read of their big operand: a Triton kernel against cuBLAS.

The experiment behind skinny_gemm.txt (not part of the package: measured slower, not adopted).
A LoRA linear's adapter adds four rank-``r`` GEMMs against a ``[tokens, width]`` tensor:
``x @ A.T`` (forward), ``dy @ B`` and ``dB = dy.T @ xa`` (both read ``dy``) and ``dA = dxa.T @ x``.
They are bound by reading that tensor. :func:`skinny_matmuls` computes ``g @ e`` and ``g.T @ c``
in one pass over ``g``: a grid of ``[tokens_per_program, BLOCK_N]`` blocks of ``g``, each loaded
once in token tiles. Each product is reduced over one of the grid's two dimensions, so each
program writes fp32 partial sums (``g @ e`` per column block, ``g.T @ c`` per token block) that
the caller sums; under Inductor the sum and its cast fuse into one kernel.

``uses``: each use as the backend's backward would run it (4096 tokens, bf16, rank 16; 48 for
the stacked q/k/v A-projection), both ways compiled by Inductor: ``dy pass`` (``dy @ B`` and
``dy.T @ xa``), ``dA`` and ``A-projection``. GPU time of CUDA-graph replays; the error column is
the largest difference from fp32 math, next to cuBLAS's. ``sweep``: the kernel alone (no sums)
over block shapes, warps and stages.

Result (H200, skinny_gemm.txt): the kernel alone reaches at most 2.6 TB/s of the 4.8, below
cuBLAS's own skinny kernels on wide operands (3.1-3.9 TB/s); with its partial sums it is 0.39-0.88x
cuBLAS on 16 of the 18 uses (1.30x on ``dA`` at width 2048, 1.14x on the dy pass at 4096).
Inside the op (skinny_gemm_in_op.txt) the adapter's cost fell on q_proj-like linears and rose on
fc2 and LLaMA-3-8B q_proj: not adopted.

On the GPU, ``python skinny_gemm.py OUT_DIR [uses] [sweep]`` writes ``OUT_DIR/skinny_gemm.json``
and prints the tables. With ``TRITON_INTERPRET=1``, ``python skinny_gemm.py check`` checks the
kernel against PyTorch on small shapes.
"""
import contextlib
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from lecompile.kernels.common import AUTOTUNE_CACHE, _dot, _dot_fp32, _interpreting
from lecompile.kernels.lowrank_gemm import MAX_RANK, rank_block

Tensor = torch.Tensor

_DTYPES = (torch.float16, torch.bfloat16)


def _configs():
    if _interpreting():  # the CPU interpreter: one small config keeps the check fast
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


def _skinny_op(g: Tensor, e: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`skinny_matmuls` as an op; an empty ``e`` or ``c`` (and result) stands for ``None``."""
    ge, gc = skinny_matmuls(g, e if e.numel() else None, c if c.numel() else None)
    return ge if ge is not None else g.new_empty(0), gc if gc is not None else g.new_empty(0)


if os.environ.get("TRITON_INTERPRET") != "1":  # a triton_op: Inductor writes the launch into its code
    torch.library.triton_op("lecompile_experiment::skinny_matmuls", _skinny_op, mutates_args=())


def skinny(g, e, c):
    """``(g @ e, g.T @ c)`` in ``g.dtype`` (either operand ``None``) through the op, summed."""
    empty = g.new_empty(0)
    ge, gc = torch.ops.lecompile_experiment.skinny_matmuls(g, empty if e is None else e, empty if c is None else c)
    return (None if e is None else ge.sum(0).to(g.dtype)), (None if c is None else gc.sum(0).to(g.dtype))


def check():
    """The kernel's partial sums against PyTorch on small shapes (Triton's CPU interpreter)."""
    torch.manual_seed(0)
    for tokens, width, r_e, r_c, dtype in [(40, 48, 8, 16, torch.float16), (70, 100, 24, 8, torch.float16),
                                           (33, 64, None, 48, torch.bfloat16), (64, 72, 16, None, torch.bfloat16)]:
        g = torch.randn(tokens, width, dtype=dtype)
        e = None if r_e is None else torch.randn(width, r_e, dtype=dtype)
        c = None if r_c is None else torch.randn(tokens, r_c, dtype=dtype)
        for got, want in zip(skinny_matmuls(g, e, c), skinny_matmuls_ref(g, e, c)):
            if got is not None:
                torch.testing.assert_close(got.sum(0), want, atol=1e-4, rtol=1e-4)
    print("skinny_matmuls matches PyTorch")


TOKENS = 4096
#: (name, width of the big operand, rank)
SHAPES = [("opt-1.3b hidden", 2048, 16), ("opt-1.3b ffn", 8192, 16), ("opt-1.3b q/k/v stacked", 2048, 48),
          ("llama-3.2-1b k/v", 512, 16), ("llama-3-8b hidden", 4096, 16), ("llama-3-8b ffn", 14336, 16)]


def uses(width, rank):
    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(TOKENS, width, device="cuda", generator=g).bfloat16()
    low = torch.randn(TOKENS, rank, device="cuda", generator=g).bfloat16()
    w = (torch.randn(width, rank, device="cuda", generator=g) / width ** 0.5).bfloat16()
    return {"dy pass": ((big, w, low), lambda g, e, c: (g @ e, g.t() @ c), skinny),
            "dA": ((big, low), lambda g, c: g.t() @ c, lambda g, c: skinny(g, None, c)[1]),
            "A-projection": ((big, w), lambda g, e: g @ e, lambda g, e: skinny(g, e, None)[0])}


def error(out, args, fn):
    ref = fn(*[a.float() for a in args])
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    return max(((o.float() - r).abs().max() / r.abs().max()).item() for o, r in zip(outs, refs))


def sweep():
    """GPU time of the kernel alone per tiling (``do_bench``, median), for three uses."""
    from triton.testing import do_bench
    cases = [("dy pass", 2048, True, True), ("dy pass", 8192, True, True), ("dA", 8192, False, True)]
    rows = []
    for (use, width, has_e, has_c), tb, bn in itertools.product(cases, (256, 512), (128, 256)):
        g = torch.randn(TOKENS, width, device="cuda").bfloat16()
        e = torch.randn(width, 16, device="cuda").bfloat16()
        c = torch.randn(TOKENS, 16, device="cuda").bfloat16()
        grid = (triton.cdiv(TOKENS, tb), triton.cdiv(width, bn))
        ge = torch.empty(grid[1], TOKENS, 16, device="cuda")
        gc = torch.empty(grid[0], width, 16, device="cuda")
        best = None
        for bt, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 2, 3, 4)):
            def launch():
                _skinny_kernel.fn[grid](
                    g, e, c, ge, gc, TOKENS, width, 16, 16, g.stride(0), e.stride(0), e.stride(1), c.stride(0),
                    c.stride(1), HAS_E=has_e, HAS_C=has_c, RANK_E=16, RANK_C=16, TOKENS_PER_PROGRAM=tb,
                    BLOCK_N=bn, DOT_FP32=False, BLOCK_T=bt, num_warps=warps, num_stages=stages)
            try:
                us = do_bench(launch, warmup=5, rep=20) * 1e3
            except Exception as err:  # a tiling that does not fit (shared memory): skipped, said so
                print(f"  skip {use} {width} tb={tb} bn={bn} bt={bt} w={warps} s={stages}: {type(err).__name__}")
                continue
            row = dict(use=use, width=width, tokens_per_program=tb, block_n=bn, block_t=bt, warps=warps,
                       stages=stages, us=round(us, 2), gb_s=round(TOKENS * width * 2 / us / 1e3))
            rows.append(row)
            best = row if best is None or row["us"] < best["us"] else best
        print("best", best)
    return rows


def main(out_dir, parts):
    from triton.testing import do_bench_cudagraph

    from benchmarks.common import command_line, meta
    data = {"meta": meta("skinny_gemm", command_line())}
    if "sweep" in parts:
        data["sweep"] = sweep()
    rows = data["uses"] = []
    for name, width, rank in SHAPES if "uses" in parts else ():
        for use, (args, cublas, kernel) in uses(width, rank).items():
            row = dict(shape=name, tokens=TOKENS, width=width, rank=rank, use=use)
            for vname, fn in (("cublas", cublas), ("kernel", kernel)):
                compiled = torch.compile(fn)
                out = compiled(*args)
                row[f"{vname} us"] = round(do_bench_cudagraph(lambda: compiled(*args), rep=100) * 1e3, 2)
                row[f"{vname} rel err"] = float(f"{error(out, args, cublas):.2e}")
            row["speedup"] = round(row["cublas us"] / row["kernel us"], 3)
            mb = (TOKENS * width * 2) / 1e6
            row["kernel GB/s of the big operand"] = round(mb / row["kernel us"] * 1e3, 0)
            rows.append(row)
            print(f"{name:24s} {use:13s} cuBLAS {row['cublas us']:7.2f} us  kernel {row['kernel us']:7.2f} us  "
                  f"x{row['speedup']:.2f}  ({row['kernel GB/s of the big operand']:.0f} GB/s; rel err "
                  f"{row['kernel rel err']:.1e} vs cuBLAS {row['cublas rel err']:.1e})")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "skinny_gemm.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    if sys.argv[1:] == ["check"]:
        check()
    else:
        main(sys.argv[1], sys.argv[2:] or ["uses"])
