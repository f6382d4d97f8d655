"""Where the LoRA adapters' GPU time goes: per linear, and per training step.

The measurement behind adapter_kernels.txt (a development script, not part of the package).

``linear``: one LoRA linear (r=16, bf16, 4096 tokens) fwd+bwd as the backend compiles it
(``lora_linear(..., in_gemm=True)`` through Inductor) against the same linear without its adapter
(``x @ W.T + b``, input gradient only), as CUDA-graph GPU time, with each kernel of the adapted one
(torch.profiler over graph replays): the difference is what the adapter costs.

``step``: one training step of a model (random init) as ``lecompile-d1-cg`` with LoRA on every
linear and with only the norms trained; kernels grouped by kind, so the difference between the
two steps says which kinds of kernel the adapters add.

``python adapter_kernels.py OUT_DIR [linear] [step]`` writes ``OUT_DIR/adapter_kernels.json``
and prints the tables.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.step_breakdown import _is_kernel
from lecompile.ops.lora_linear import lora_linear

SHAPES = {"opt-1.3b q_proj": (2048, 2048), "opt-1.3b fc1": (2048, 8192), "opt-1.3b fc2": (8192, 2048),
          "llama-3-8b q_proj": (4096, 4096)}
RANK, SCALE, TOKENS = 16, 2.0, 4096

#: Kernel kinds by a piece of their name, first match wins.
KINDS = [("base GEMM (Triton, low-rank step)", ("_linear_low_rank_kernel",)),
         ("cuBLAS split-K reduce", ("splitKreduce",)),
         ("cuBLAS GEMM", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
         ("attention", ("sdpa", "flash", "fmha", "cudnn")),
         ("optimizer", ("multi_tensor_apply",)),
         ("loss", ("cross_entropy",)),
         ("Inductor elementwise/reduction", ("triton_",)),
         ("memset/memcpy", ("Memset", "Memcpy"))]


def kind(name):
    return next((k for k, keys in KINDS if any(key in name for key in keys)), "other")


def kernels(fn, reps=5):
    """``[(name, us per call, launches per call)]`` of ``fn`` over ``reps`` calls, most time first."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / reps, e.count / reps) for e in prof.key_averages() if _is_kernel(e)]
    return sorted(rows, key=lambda r: -r[1])


def graphed(step):
    """``step`` captured once as a CUDA graph; returns its replay."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def linear_rows():
    from triton.testing import do_bench_cudagraph
    rows = []
    for name, (d_in, d_out) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(TOKENS, d_in, device="cuda", generator=g).bfloat16().requires_grad_()
        w = (torch.randn(d_out, d_in, device="cuda", generator=g) / d_in ** 0.5).bfloat16()
        b = torch.zeros(d_out, device="cuda").bfloat16()
        dy = torch.randn(TOKENS, d_out, device="cuda", generator=g).bfloat16()
        a = (torch.randn(RANK, d_in, device="cuda", generator=g) / d_in ** 0.5).requires_grad_()
        lb = (torch.randn(d_out, RANK, device="cuda", generator=g) / RANK).requires_grad_()
        dense = torch.compile(lambda x: F.linear(x, w, b))
        adapted = torch.compile(lambda x: lora_linear(x, w, b, None, a, lb, SCALE, True))

        def dense_step():
            dense(x).backward(dy)
            x.grad = None

        def adapted_step():
            adapted(x).backward(dy)
            x.grad = a.grad = lb.grad = None
        row = dict(case=name, d_in=d_in, d_out=d_out, tokens=TOKENS, rank=RANK)
        for vname, step in (("dense", dense_step), ("lora in-gemm", adapted_step)):
            row[f"{vname} us"] = round(do_bench_cudagraph(step, rep=100, return_mode="median") * 1e3, 1)
        row["adapter us"] = round(row["lora in-gemm us"] - row["dense us"], 1)
        row["kernels"] = [dict(name=k[:100], us=round(us, 2), launches=n)
                          for k, us, n in kernels(graphed(adapted_step))]
        rows.append(row)
    return rows


def step_rows(model="opt-1.3b"):
    from benchmarks.e2e import Case, training_step, variants
    variant = next(v for v in variants((1.0,), baselines=False, cudagraphs=True) if v.name == "lecompile-d1-cg")
    out = {}
    for method in ("lora", "norms"):
        case = Case(model, method, 8, 512)
        step = training_step(case, variant, "cuda")
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        ks = kernels(step, reps=3)
        groups = defaultdict(lambda: [0.0, 0.0])
        for name, us, n in ks:
            groups[kind(name)][0] += us / 1e3
            groups[kind(name)][1] += n
        out[method] = dict(case=case.name, variant=variant.name, kernels_ms=round(sum(k[1] for k in ks) / 1e3, 3),
                           groups={k: dict(ms=round(v[0], 3), launches=v[1]) for k, v in groups.items()},
                           top=[dict(name=k[:100], ms=round(us / 1e3, 3), launches=n) for k, us, n in ks[:40]])
    return out


def main(out_dir, parts):
    from benchmarks.common import command_line, meta
    data = {"meta": meta("adapter_kernels", command_line())}
    if "linear" in parts:
        data["linear"] = linear_rows()
        for r in data["linear"]:
            print(f"{r['case']:20s} dense {r['dense us']:7.1f} us  lora {r['lora in-gemm us']:7.1f} us  "
                  f"adapter {r['adapter us']:6.1f} us")
            for k in r["kernels"]:
                print(f"    {k['us']:8.2f} us x{k['launches']:.0f}  {k['name']}")
    if "step" in parts:
        data["step"] = step_rows()
        for method, s in data["step"].items():
            print(f"=== {s['case']} {s['variant']}: kernels {s['kernels_ms']} ms/step")
            for k, v in sorted(s["groups"].items(), key=lambda kv: -kv[1]["ms"]):
                print(f"  {v['ms']:8.3f} ms {v['launches']:7.0f} launches  {k}")
            for k in s["top"]:
                print(f"    {k['ms']:7.3f} ms x{k['launches']:.0f}  {k['name']}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "adapter_kernels.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["linear", "step"])
