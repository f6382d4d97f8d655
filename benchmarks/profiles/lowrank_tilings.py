"""Each tiling of lecompile's low-rank GEMM on the bench zoo's linear shapes, the rule's pick
beside them.

The check of ``lowrank_gemm._configs_for_shape`` (not part of the package): the rule was fitted to
the OPT / LLaMA-8B sweep (lowrank_gemm.txt), and this times the package's own kernel in each of
its configs on the shapes the zoo trains, Qwen2-1.5B's 1536-wide outputs among them. On a Hopper
GPU, ``python -m benchmarks.profiles.lowrank_tilings OUT_DIR`` writes
``OUT_DIR/lowrank_tilings.json``: per shape, layout (NT: the forward's ``x @ W.T + (x A.T) @ B.T``,
NN: the input gradient's ``dy @ W + dxa @ A``) and token count, bf16, rank 16, the ms of every
config forced, of the rule's pick, and of cuBLAS (``torch.mm`` alone, and with the low-rank term
as ``addmm``), each with ``triton.testing.do_bench``.
"""

import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

from lecompile.kernels import lowrank_gemm

#: name: (in features, out features) of one linear
SHAPES = {"qwen2-1.5b q": (1536, 1536), "qwen2-1.5b k": (1536, 256), "qwen2-1.5b gate": (1536, 8960),
          "qwen2-1.5b down": (8960, 1536), "llama-3.2-1b q": (2048, 2048), "llama-3.2-1b k": (2048, 512),
          "llama-3.2-1b gate": (2048, 8192), "llama-3.2-1b down": (8192, 2048), "phi-3-mini qkv": (3072, 9216),
          "phi-3-mini o": (3072, 3072), "phi-3-mini gate_up": (3072, 16384), "phi-3-mini down": (8192, 3072),
          "mistral-7b q": (4096, 4096), "mistral-7b k": (4096, 1024), "mistral-7b gate": (4096, 14336),
          "mistral-7b down": (14336, 4096)}
TOKENS = (4096, 8192)
RANK = 16


def _time(fn):
    return do_bench(fn, warmup=25, rep=100)


def _forced(config, fn):
    """``fn`` run with the kernel held to ``config``, its time and output."""
    kernel = lowrank_gemm._linear_low_rank_kernel
    saved = kernel.configs
    kernel.configs, kernel.cache = [config], {}
    try:
        return _time(fn), fn()
    finally:
        kernel.configs, kernel.cache = saved, {}


def _label(config):
    kw = config.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{config.num_warps} s{config.num_stages}" + (
        " ws" if kw["WARP_SPECIALIZE"] else "")


def main(out_dir):
    lowrank_gemm._ensure_allocator()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for tokens in TOKENS:
        for name, (d_in, d_out) in SHAPES.items():
            g = torch.Generator(device="cuda").manual_seed(0)
            randn = lambda *shape: torch.randn(*shape, device="cuda", generator=g).bfloat16()  # noqa: E731
            x, dy = randn(tokens, d_in), randn(tokens, d_out)
            w = (torch.randn(d_out, d_in, device="cuda", generator=g) / d_in ** 0.5).bfloat16()
            xa, dxa, a, b = randn(tokens, RANK), randn(tokens, RANK), randn(RANK, d_in), randn(d_out, RANK)
            for layout, operands in (("NT", (x, w, (xa, b))), ("NN", (dy, w.t(), (dxa, a.t())))):
                inp, weight, low_rank = operands
                fn = lambda: lowrank_gemm.linear_low_rank(inp, weight, None, low_rank)  # noqa: E731
                want = lowrank_gemm.linear_low_rank_ref(inp, weight, None, low_rank).float()
                n, k = weight.shape
                args = dict(M=tokens, N=n, K=k, LOW_RANK=True, RANK=RANK, NUM_SMS=sms)
                configs = lowrank_gemm._configs_for_shape(lowrank_gemm._linear_low_rank_kernel.configs, args)
                row = dict(case=name, layout=layout, tokens=tokens, n=n, k=k,
                           rule=_label(configs[0]) if len(configs) == 1 else "autotuned",
                           cublas_ms=_time(lambda: inp @ weight.t()),
                           cublas_addmm_ms=_time(lambda: torch.addmm(inp @ weight.t(), low_rank[0], low_rank[1].t())),
                           rule_ms=_time(fn), configs={})
                for config in lowrank_gemm._linear_low_rank_kernel.configs:
                    if not lowrank_gemm._fits(config, args):
                        continue
                    ms, got = _forced(config, fn)
                    err = ((got.float() - want).abs().max() / want.abs().max()).item()
                    row["configs"][_label(config)] = dict(ms=ms, err=err)
                best = min(row["configs"], key=lambda c: row["configs"][c]["ms"])
                print(f"{tokens:5d} {name:20s} {layout} N={n:5d} K={k:5d} rule {row['rule']} {row['rule_ms']:.4f} | "
                      f"best {best} {row['configs'][best]['ms']:.4f} | cuBLAS {row['cublas_ms']:.4f}", flush=True)
                rows.append(row)
    with open(os.path.join(out_dir, "lowrank_tilings.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       sms=sms, rank=RANK, rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
