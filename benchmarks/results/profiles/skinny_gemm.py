"""LoRA's skinny GEMMs: cuBLAS against :mod:`lecompile.kernels.skinny_gemm`, per use.

The measurement behind skinny_gemm.txt (a development script, not part of the package). Each
use of a LoRA linear (4096 tokens, bf16, rank 16; rank 48 for the stacked q/k/v A-projection)
as the backend's backward runs it, both ways compiled by Inductor (the kernel's partial sums and
their cast fuse into one Inductor kernel): ``dy pass`` (``dy @ B`` and ``dy.T @ xa``), ``dA``
(``dxa.T @ x``) and ``A-projection`` (``x @ A.T``). GPU time of CUDA-graph replays; the error
column is the kernel's largest difference from fp32 math, next to cuBLAS's.

``sweep``: the kernel alone (no sums) over block shapes, warps and stages, for the
kernel's tiling choice.

``python skinny_gemm.py OUT_DIR [uses] [sweep]`` writes ``OUT_DIR/skinny_gemm.json`` and prints the tables.
"""
import importlib
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from lecompile.kernels import skinny_gemm  # noqa: E402

op = importlib.import_module("lecompile.ops.lora_linear")

TOKENS = 4096
#: (name, width of the big operand, rank)
SHAPES = [("opt-1.3b hidden", 2048, 16), ("opt-1.3b ffn", 8192, 16), ("opt-1.3b q/k/v stacked", 2048, 48),
          ("llama-3.2-1b k/v", 512, 16), ("llama-3-8b hidden", 4096, 16), ("llama-3-8b ffn", 14336, 16)]


def uses(width, rank):
    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(TOKENS, width, device="cuda", generator=g).bfloat16()
    low = torch.randn(TOKENS, rank, device="cuda", generator=g).bfloat16()
    w = (torch.randn(width, rank, device="cuda", generator=g) / width ** 0.5).bfloat16()
    return {"dy pass": ((big, w, low), lambda g, e, c: (g @ e, g.t() @ c), lambda g, e, c: op._skinny(g, e, c)),
            "dA": ((big, low), lambda g, c: g.t() @ c, lambda g, c: op._skinny(g, None, c)[1]),
            "A-projection": ((big, w), lambda g, e: g @ e, lambda g, e: op._skinny(g, e, None)[0])}


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
                skinny_gemm._skinny_kernel.fn[grid](
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

    from lecompile.results import command_line, meta
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
    main(sys.argv[1], sys.argv[2:] or ["uses"])
