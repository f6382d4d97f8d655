"""Training-level check of adapter fusion: LoRA fine-tuning of SmolLM2-135M (bf16) on CPython's
pydoc text, PEFT's default fp32-adapter math compiled by plain Inductor against the longexposure
backend at MLP density 1.0 (the ``fuse_lora`` pass: LoRA matmuls in bf16 with fp32 accumulation), same
start, same batches. On CUDA the backend's default runs LoRA's B-projection inside the base GEMM's
Triton kernel (``lora_in_gemm``); a third run there keeps the cuBLAS path (``lora_in_gemm=False``),
which is also what the backend runs on the CPU.

Writes ``adapter_numerics.json`` (CPU) or ``adapter_numerics_cuda.json`` (held-out loss of every run,
its relative gap to PEFT's, loss curves, how many linears each path took) and a plot of the curves.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from benchmarks.common import RESULTS, command_line, meta, write_results
from examples.data import batches, load_model, token_splits
from examples.demo import lora_model, train
from lecompile import LongExposureBackend, LongExposureConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base, tokenizer = load_model(None, torch.bfloat16)
    splits = token_splits(tokenizer, args.seq)
    train_batches = batches(splits["train"], args.batch, args.steps, 0)
    heldout = batches(splits["heldout"], args.batch, 8, 1)
    torch.manual_seed(0)
    start = lora_model(base, 8, TARGETS).to(dev)
    variants = {"peft-fp32-adapters": "inductor",
                "lecompile-fused": LongExposureBackend(LongExposureConfig(mlp_density=1.0))}
    if dev.type == "cuda":
        variants["lecompile-fused-cublas"] = LongExposureBackend(LongExposureConfig.create(mlp_density=1.0,
                                                                                    lora_in_gemm=False))
    results_name = "adapter_numerics" if dev.type == "cpu" else f"adapter_numerics_{dev.type}"
    runs, paths = {}, {}
    for name, backend in variants.items():
        torch._dynamo.reset()
        runs[name] = train(copy.deepcopy(start), name, backend, train_batches, heldout, dev, args.lr)
        if isinstance(backend, LongExposureBackend):
            linears = backend.report.linears
            paths[name] = dict(lora_linears=len(linears), lora_linears_fused=sum(e.fused for e in linears),
                               lora_linears_in_gemm=sum(e.in_gemm for e in linears))
        # written after every variant: a run cut short keeps the variants it finished
        path, rows = _write(results_name, runs, paths, args, dev)
        print(f"{name}: held-out loss {runs[name].heldout_loss:.4f} (relative gap to PEFT's "
              f"{rows[-1]['heldout_rel_gap']:.4%}, target <= 0.5%), last train loss {runs[name].last_loss:.4f}, "
              f"{paths.get(name, 'plain Inductor')}; wrote {path}")


def _write(results_name, runs, paths, args, dev):
    """``(path, rows)``: the results file and plot of the variants run so far (the first is the baseline)."""
    ref = runs["peft-fp32-adapters"]
    rows = [dict(case="smollm2-135m lora r=8 all linear", variant=name, dtype="bfloat16", steps=args.steps,
                 tokens=args.batch * args.seq, heldout_loss=round(r.heldout_loss, 5),
                 first_loss=round(r.first_loss, 5), last_loss=round(r.last_loss, 5), losses=r.losses,
                 baseline="peft-fp32-adapters", heldout_rel_gap=round(abs(r.heldout_loss - ref.heldout_loss)
                                                                       / ref.heldout_loss, 6), **paths.get(name, {}))
            for name, r in runs.items()]
    data = {"meta": meta("adapter_numerics", command_line(), device_used=str(dev), lr=args.lr,
                         batch=args.batch, seq=args.seq), "rows": rows}
    path = write_results(results_name, data, Path(args.out))
    _plot(runs, Path(args.out) / f"{results_name}.png")
    return path, rows


def _plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        ax.plot(r.losses, label=f"{name} (held-out {r.heldout_loss:.3f})", lw=1)
    ax.set(xlabel="step", ylabel="train loss", title="SmolLM2-135M LoRA, bf16: PEFT's fp32 adapters vs fused")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
