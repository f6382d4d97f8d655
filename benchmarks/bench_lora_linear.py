"""One LoRA-wrapped linear, forward + backward: PEFT's math vs ``lecompile::lora_linear``, on the GPU.

Variants (bf16 activations and base weight, LoRA r=16, input and adapters require grad):
``peft`` (fp32 adapters, PEFT's default), ``peft-tf32`` (same with TF32 matmuls on),
``peft-bf16-adapters`` (``autocast_adapter_dtype=False``), each eager and through Inductor
(``+inductor``), ``lecompile`` (the op, eager and as the backend compiles it; cuBLAS GEMMs),
``lecompile-in-gemm`` (the op with ``in_gemm=True``: LoRA's B-projection inside the base GEMM's
Triton kernel, forward and input gradient; what the backend runs by default), and
``shared-read`` (eager; an experiment for the op's next step: LoRA's A-projection done inside the
base GEMM, ``x @ [W; A].T``, so ``x`` is read once; :class:`SharedReadLoRA`).
``ms`` is wall time per call (Python and launches included: at these sizes mostly overhead);
``graph_ms`` the same step replayed as a CUDA graph, i.e. GPU time. Ratios are to ``peft+inductor`` in the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import command_line, meta, write_results
from lecompile.ops.lora_linear import lora_linear

#: (in_features, out_features) of q_proj-like and fc1-like linears.
SHAPES = {"opt-1.3b q_proj": (2048, 2048), "opt-1.3b fc1": (2048, 8192), "opt-1.3b fc2": (8192, 2048),
          "llama-3-8b q_proj": (4096, 4096), "llama-3-8b gate_proj": (4096, 14336),
          "llama-3-8b down_proj": (14336, 4096)}
RANK, SCALE = 16, 2.0


def peft_linear(x, w, b, a, lb):
    """PEFT's LoRA forward: adapters in their own dtype, result cast back."""
    return (F.linear(x, w, b) + F.linear(F.linear(x.to(a.dtype), a), lb) * SCALE).to(x.dtype)


def lecompile_linear(x, w, b, a, lb):
    return lora_linear(x, w, b, None, a, lb, SCALE)


def lecompile_in_gemm(x, w, b, a, lb):
    return lora_linear(x, w, b, None, a, lb, SCALE, True)


class SharedReadLoRA(torch.autograd.Function):
    """``x @ W.T + b + SCALE * (x @ A.T) @ B.T`` with ``x @ [W; A].T`` as one GEMM. ``buf`` holds
    ``[W; A]`` in the activation dtype: ``W``'s rows written once, ``A``'s refreshed from the fp32
    adapter every call (``r x in``, small). Backward as ``lecompile::lora_linear``'s."""

    @staticmethod
    def forward(ctx, x, b, a, lb, buf):
        n = buf.shape[0] - a.shape[0]
        with torch.no_grad():
            buf[n:].copy_(a)
        both = x @ buf.t()  # [T, out + r]: base output and x @ A.T from one read of x
        xa = both[:, n:]
        y = torch.addmm(both[:, :n] + b, xa, lb.to(x.dtype).t(), alpha=SCALE)
        ctx.save_for_backward(x, xa, lb, buf)
        ctx.adapter_dtype = a.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, lb, buf = ctx.saved_tensors
        n = buf.shape[0] - xa.shape[1]
        dxa = SCALE * (dy @ lb.to(dy.dtype))
        dx = torch.addmm(dy @ buf[:n], dxa, buf[n:])
        da = (dxa.t() @ x).to(ctx.adapter_dtype)
        dlb = (SCALE * (dy.t() @ xa)).to(lb.dtype)
        return dx, None, da, dlb, None


def bench_case(name, d_in, d_out, tokens):
    from triton.testing import do_bench, do_bench_cudagraph
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, d_in, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(d_out, d_in, device="cuda", generator=g) / d_in ** 0.5).bfloat16()
    b = torch.zeros(d_out, device="cuda").bfloat16()
    dy = torch.randn(tokens, d_out, device="cuda", generator=g).bfloat16()
    rows, base = [], None
    for adapters in (torch.float32, torch.bfloat16):
        a = (torch.randn(RANK, d_in, device="cuda", generator=g) / d_in ** 0.5).to(adapters).requires_grad_()
        lb = (torch.randn(d_out, RANK, device="cuda", generator=g) / RANK).to(adapters).requires_grad_()
        variants = []
        if adapters == torch.float32:
            buf = torch.cat([w, a.detach().to(w.dtype)])

            def shared_read(x, w, b, a, lb):
                return SharedReadLoRA.apply(x, b, a, lb, buf)
            variants += [("peft", peft_linear, False), ("peft-tf32", peft_linear, True),
                         ("lecompile", lecompile_linear, False), ("lecompile-in-gemm", lecompile_in_gemm, False),
                         ("shared-read", shared_read, False)]
        else:
            variants += [("peft-bf16-adapters", peft_linear, False)]
        for vname, fn, tf32 in variants:
            compiled = [("", fn)] + ([("+inductor", torch.compile(fn))] if vname != "shared-read" else [])
            for suffix, f in compiled:
                torch.backends.cuda.matmul.allow_tf32 = tf32

                def step():
                    f(x, w, b, a, lb).backward(dy)
                    x.grad = a.grad = lb.grad = None
                ms = do_bench(step, warmup=25, rep=200)
                graph_ms = do_bench_cudagraph(step, rep=100, return_mode="median")
                torch.backends.cuda.matmul.allow_tf32 = False
                rows.append(dict(case=name, d_in=d_in, d_out=d_out, tokens=tokens, rank=RANK,
                                 dtype="bfloat16", adapters=str(adapters).split(".")[-1],
                                 **{"pass": "fwd+bwd"}, variant=vname + suffix, ms=round(ms, 4),
                                 graph_ms=round(graph_ms, 4)))
    for key in ("ms", "graph_ms"):
        base = next(r[key] for r in rows if r["variant"] == "peft+inductor")
        strongest = min(r[key] for r in rows if r["variant"].startswith("peft") and r["variant"].endswith("+inductor"))
        suffix = "" if key == "ms" else "_graph"
        for r in rows:
            r.update({f"baseline{suffix}_ms": base, f"speedup{suffix}": round(base / r[key], 3),
                      f"speedup{suffix}_vs_strongest_inductor": round(strongest / r[key], 3)})
    for r in rows:
        r["baseline"] = "peft+inductor"
    return rows


def plot(rows, path):
    """GPU time (CUDA graph replay) of each variant, per shape."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = list(dict.fromkeys(r["case"] for r in rows))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ms = {r["case"]: r["graph_ms"] for r in rows if r["variant"] == name}
        ax.bar([j + i * width for j in range(len(cases))], [ms.get(c, 0) for c in cases], width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(cases))], cases)
    ax.set(ylabel="fwd+bwd GPU time (ms, CUDA graph)",
           title=f"one LoRA linear (r={RANK}), bf16, {rows[0]['tokens']} tokens")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows = []
    for name, (d_in, d_out) in SHAPES.items():
        rows += bench_case(name, d_in, d_out, args.tokens)
    data = {"meta": meta("lora_linear", command_line()), "rows": rows}
    path = write_results("lora_linear", data, Path(args.out))
    plot(rows, Path(args.out) / "lora_linear.png")
    for r in rows:
        print(f"{r['case']:22s} {r['variant']:30s} {r['ms']:8.3f} ms  x{r['speedup']:.2f}  "
              f"graph {r['graph_ms']:8.3f} ms  x{r['speedup_graph']:.2f}")
    print("wrote", path)


if __name__ == "__main__":
    main()
