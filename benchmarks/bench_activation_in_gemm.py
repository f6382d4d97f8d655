"""An MLP down projection's backward ending in the activation's backward, on the GPU.

Three parts, written to ``activation_in_gemm.json``:

- ``registers``: registers and spills of the LoRA GEMM kernel's configs (compiled for the GPU at
  hand), plain and ending in a gated SiLU's backward;
- ``checks``: ``lecompile::activated_lora_linear(in_gemm=True)`` against the composition it
  replaces (``lora_linear`` of the activation), output and every gradient, as the largest error
  relative to the largest value, on LLaMA-, OPT- and Qwen2-like shapes;
- ``*_us``: the backward's input-gradient launch at LLaMA-3.2-1B's down projection (4096 tokens,
  2048 x 8192, r=16): ``fused`` (:func:`linear_low_rank_act_grad`), ``gemm_only`` (the GEMM alone),
  ``unfused`` (the GEMM, then Inductor's SiLU backward) and ``act_bwd_only``, by ``do_bench``.

    python -m benchmarks.bench_activation_in_gemm --out benchmarks/results/profiles
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.testing import do_bench

from benchmarks.common import command_line, meta, write_results
from lecompile.kernels import lowrank_gemm
from lecompile.ops.activated_lora_linear import activate, activated_lora_linear
from lecompile.ops.kernel_accesses import _jit_function
from lecompile.ops.lora_linear import lora_linear

DTYPE = torch.bfloat16
#: (tokens, ffn, hidden, activation, gated)
CHECKS = [(4096, 8192, 2048, "silu", True), (4096, 8192, 2048, "relu", False), (1000, 1536, 520, "gelu_tanh", False),
          (4096, 8960, 1536, "silu", True)]


def registers() -> list:
    fn = _jit_function(lowrank_gemm._linear_low_rank_kernel)
    out = []
    for act in (0, 4):
        args = dict(M=4096, N=8192, K=2048, LOW_RANK=True, RANK=16, W_KMAJOR=False, E_KMAJOR=False, HAS_BIAS=False,
                    ACT=act, GATED=act > 0, NUM_SMS=132, DOT_FP32=False, GROUP_M=8)
        for config in lowrank_gemm._configs():
            constants = dict(args, **config.kwargs)
            signature = {n: "constexpr" if n in constants and n not in ("M", "N", "K") else
                         "*bf16" if n.endswith("_ptr") else "i32" for n in fn.arg_names}
            source = ASTSource(fn, signature, {(fn.arg_names.index(n),): v for n, v in constants.items()
                                               if signature[n] == "constexpr"})
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                    options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
            kernel._init_handles()
            out.append(dict(act=act, config=str(config), regs=kernel.n_regs, spills=kernel.n_spills))
    return out


def rand(gen, *shape, grad=False, scale=1.0, dtype=DTYPE):
    t = scale * torch.randn(*shape, generator=gen, device="cuda") / shape[-1] ** 0.5
    return t.to(dtype).requires_grad_(grad)


def checks(gen) -> list:
    out = []
    for tokens, ffn, hidden, act, gated in CHECKS:
        pre, up = rand(gen, tokens, ffn, grad=True, scale=8.0), (rand(gen, tokens, ffn, grad=True) if gated else None)
        w, bias = rand(gen, hidden, ffn), rand(gen, hidden, grad=True)
        a, b = rand(gen, 16, ffn, grad=True, dtype=torch.float32), rand(gen, hidden, 16, grad=True, dtype=torch.float32)
        leaves = [x for x in (pre, up, bias, a, b) if x is not None]
        dy = rand(gen, tokens, hidden)
        y = activated_lora_linear(pre, up, act, w, bias, a, b, 0.5, True)
        y_ref = lora_linear(activate(pre, up, act), w, bias, None, a, b, 0.5, True)
        got = [y, *torch.autograd.grad(y, leaves, dy)]
        want = [y_ref, *torch.autograd.grad(y_ref, leaves, dy)]
        errors = [((g.float() - r.float()).abs().max() / r.float().abs().max()).item() for g, r in zip(got, want)]
        out.append(dict(shape=[tokens, ffn, hidden], act=act, gated=gated, max_rel_err=errors))
    return out


def timings(gen) -> dict:
    tokens, ffn, hidden = 4096, 8192, 2048
    pre, up, dy = rand(gen, tokens, ffn, scale=8.0), rand(gen, tokens, ffn), rand(gen, tokens, hidden)
    w, lora_a, dxa = rand(gen, hidden, ffn), rand(gen, 16, ffn), rand(gen, tokens, 16)

    @torch.compile
    def act_bwd(dh, pre, up):
        s, dh = torch.sigmoid(pre.float()), dh.float()
        return (dh * up.float() * s * (1 + pre.float() * (1 - s))).to(DTYPE), (dh * pre.float() * s).to(DTYPE)

    def gemm_only():
        return lowrank_gemm.linear_low_rank(dy, w.t(), None, (dxa, lora_a.t()))

    def fused():
        return lowrank_gemm.linear_low_rank_act_grad(dy, w.t(), (dxa, lora_a.t()), "silu", pre, up)

    dh = gemm_only()
    variants = {"unfused": lambda: act_bwd(gemm_only(), pre, up), "fused": fused, "gemm_only": gemm_only,
                "act_bwd_only": lambda: act_bwd(dh, pre, up)}
    out = {}
    for name, fn in variants.items():
        fn()
        out[f"{name}_us"] = do_bench(fn, warmup=50, rep=300) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profiles"))
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = dict(meta=meta("activation_in_gemm", command_line()), registers=registers(), checks=checks(gen),
                **timings(gen))
    print(write_results("activation_in_gemm", data, args.out))


if __name__ == "__main__":
    main()
