"""Training-level check of adapter fusion: LoRA fine-tuning of SmolLM2-135M (bf16) on CPython's
pydoc text, PEFT's fp32-adapter math vs ``fuse_adapters=True`` (LoRA matmuls in bf16 with fp32
accumulation), both compiled by Inductor at MLP density 1.0, same start, same batches.

Writes ``adapter_numerics.json`` (held-out loss of both runs and their relative gap, loss curves)
and a plot of the curves.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, command_line, meta, write_results  # noqa: E402
from lecompile import LongExposureBackend, LongExposureConfig  # noqa: E402
from lecompile.data import batches, load_model, token_splits  # noqa: E402
from lecompile.demo import lora_model, train  # noqa: E402

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
    runs = {}
    for name, fuse in (("peft-fp32-adapters", False), ("lecompile-fused", True)):
        torch._dynamo.reset()
        backend = LongExposureBackend(LongExposureConfig(mlp_density=1.0, fuse_adapters=fuse))
        result = train(copy.deepcopy(start), name, backend, train_batches, heldout, dev, args.lr)
        runs[name] = result
        print(f"{name}: held-out loss {result.heldout_loss:.4f}, last train loss {result.last_loss:.4f}")
    ref, fused = runs["peft-fp32-adapters"], runs["lecompile-fused"]
    gap = abs(fused.heldout_loss - ref.heldout_loss) / ref.heldout_loss
    rows = [dict(case="smollm2-135m lora r=8 all linear", variant=name, dtype="bfloat16", steps=args.steps,
                 tokens=args.batch * args.seq, heldout_loss=round(r.heldout_loss, 5),
                 first_loss=round(r.first_loss, 5), last_loss=round(r.last_loss, 5), losses=r.losses,
                 baseline="peft-fp32-adapters", heldout_rel_gap=round(abs(r.heldout_loss - ref.heldout_loss)
                                                                       / ref.heldout_loss, 6))
            for name, r in runs.items()]
    data = {"meta": meta("adapter_numerics", command_line(), device_used=str(dev), lr=args.lr,
                         batch=args.batch, seq=args.seq), "rows": rows}
    path = write_results("adapter_numerics", data, Path(args.out))
    _plot(runs, Path(args.out) / "adapter_numerics.png")
    print(f"held-out relative gap {gap:.4%} (target <= 0.5%); wrote {path}")


def _plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        ax.plot(r.losses, label=f"{name} (held-out {r.heldout_loss:.3f})", lw=1)
    ax.set(xlabel="step", ylabel="train loss", title="SmolLM2-135M LoRA, bf16: PEFT fp32 adapters vs fused")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
