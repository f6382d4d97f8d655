"""Training steps on one GPU and on N GPUs with DDP or FSDP2: does lecompile's speedup hold?

    python -m benchmarks.distributed --nproc 2            # runs one GPU, then torchrun on 2

Every variant is timed on one process, then on ``--nproc`` processes for each of
``--parallelism`` (``torchrun``, NCCL; ``ddp`` with Dynamo's DDP graph splitting off, as importing
lecompile leaves it (docs/training-stacks.md), ``ddp-split`` with it on, or ``fsdp2``: ``fully_shard``
on every decoder layer and the model; each rank runs the same per-GPU batch, so the work per GPU is equal
and rank 0's loss at step 1 must equal the single-GPU loss). Rows carry ``world_size`` and
``parallelism``; the speedup over Inductor is taken within each way of running, and
``ratio_held`` = (speedup on N GPUs) / (speedup on one GPU).
``--device cpu`` runs the same on CPU processes over gloo (a smoke test, no speed claim).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import e2e
from benchmarks.common import RESULTS, command_line, meta, write_results
from lecompile.layers import decoder_layers

CUDA_GRAPHS = ("inductor", "inductor-bf16-adapters-cg", "lecompile-d1-cg", "lecompile-d0.25-cg")
NO_CUDA_GRAPHS = ("inductor", "inductor-bf16-adapters", "lecompile-d1", "lecompile-d0.25")
#: The variants each way of running times. ``ddp`` leaves Dynamo's DDP graph splitting as importing
#: lecompile leaves it (off); ``ddp-split`` turns it on to show what the splitting costs. FSDP2
#: runs without CUDA graphs, which its hooks between the graphs break.
PARALLELISMS = {"none": tuple(dict.fromkeys(CUDA_GRAPHS + NO_CUDA_GRAPHS)), "ddp": CUDA_GRAPHS,
                "ddp-split": ("inductor", "lecompile-d0.25-cg"), "fsdp2": NO_CUDA_GRAPHS}


def wrapper(parallelism: str, device: str):
    """How each rank wraps its model before compiling."""
    if parallelism.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel

        if parallelism == "ddp-split":
            torch._dynamo.config.optimize_ddp = "ddp_optimizer"

        def wrap(model):
            ids = [torch.device(device).index] if device.startswith("cuda") else None
            return DistributedDataParallel(model, device_ids=ids)
    else:
        from torch.distributed.fsdp import fully_shard

        def wrap(model):
            for layer in decoder_layers(model):
                fully_shard(layer)
            return fully_shard(model)
    return wrap


def measure(args, world_size: int, rank: int, device: str, parallelism: str = "none"):
    wrap = wrapper(parallelism, device) if world_size > 1 else None
    case = e2e.Case(args.model, "lora", *e2e.SHAPES[args.shape])
    names = [n for n in PARALLELISMS[parallelism] if args.variants is None or n in args.variants]
    chosen = [v for v in e2e.variants(densities=(1.0, 0.25), cudagraphs=True) if v.name in names]
    rows = []
    for v in chosen:
        row = dict(case=case.name, variant=v.name, world_size=world_size, parallelism=parallelism,
                   mlp_density=v.mlp_density, tokens_per_gpu=case.batch * case.seq, dtype="bfloat16")
        try:
            r = e2e.run_variant(case, v, device, args.steps, args.warmup, wrap=wrap)
            row.update(ms=round(r.ms, 3), loss_step1=round(r.loss_step1, 5), compile_s=round(r.compile_s, 1),
                       peak_mem_gib=round(r.peak_mem_gib, 3), **r.extra)
        except Exception as err:  # noqa: BLE001 - recorded, per BENCHMARKS.md
            row["error"] = repr(err)[:400]
        rows.append(row)
        if rank == 0:
            print(row, flush=True)
    return rows


def add_ratios(rows):
    base = {r["parallelism"]: r["ms"] for r in rows if r["variant"] == "inductor" and "ms" in r}
    for r in rows:
        if "ms" in r and r["parallelism"] in base:
            r.update(baseline="inductor", baseline_ms=base[r["parallelism"]],
                     speedup=round(base[r["parallelism"]] / r["ms"], 3))
    single = {r["variant"]: r for r in rows if r["world_size"] == 1 and "speedup" in r}
    for r in rows:
        one = single.get(r["variant"])
        if r["world_size"] > 1 and "speedup" in r and one is not None:
            r["ratio_held"] = round(r["speedup"] / one["speedup"], 3)
            r["loss_matches_single"] = abs(r["loss_step1"] - one["loss_step1"]) <= 1e-2 * abs(one["loss_step1"])


def plot(rows, path):
    """Speedup over Inductor per variant, one group of bars per way of running."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "speedup" in r]
    groups = list(dict.fromkeys(r["parallelism"] for r in ok))
    names = list(dict.fromkeys(r["variant"] for r in ok))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        bars = [(g + i * width, r["speedup"]) for g, p in enumerate(groups) for r in ok
                if r["parallelism"] == p and r["variant"] == name]
        ax.bar([x for x, _ in bars], [y for _, y in bars], width, label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    world = {r["parallelism"]: r["world_size"] for r in ok}
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))],
                  ["one GPU" if p == "none" else f"{p}, {world[p]} GPUs" for p in groups])
    ax.set(ylabel="speedup over Inductor", title=(ok[0]["case"] + ", bars: speedup over the Inductor row of the same "
                                                  "way of running") if ok else "")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def worker(args):
    """One torchrun rank over NCCL (gloo on CPU); rank 0 writes the rows to ``--part``."""
    import torch.distributed as dist

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    try:
        rows = measure(args, world, rank, device, args.part_parallelism)
        if rank == 0:
            Path(args.part).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-1.3b", choices=list(e2e.MODELS))
    parser.add_argument("--shape", default="8x512", choices=list(e2e.SHAPES))
    parser.add_argument("--variants", nargs="+", help="only these (default: each parallelism's own list)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--parallelism", nargs="+", default=["ddp", "ddp-split", "fsdp2"],
                        choices=("ddp", "ddp-split", "fsdp2"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--part", help=argparse.SUPPRESS)  # set for the torchrun ranks
    parser.add_argument("--part-parallelism", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return worker(args)
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs, found {torch.cuda.device_count()}")
    rows = measure(args, 1, 0, args.device)
    part = args.out / "distributed.part.json"
    args.out.mkdir(parents=True, exist_ok=True)
    for parallelism in args.parallelism:
        # Only the ranks' own options: torchrun's parser rejects any prefix of its options (--nproc).
        rank_args = ["--model", args.model, "--shape", args.shape, "--steps", str(args.steps),
                     "--warmup", str(args.warmup), "--device", args.device, "--part", str(part),
                     "--part-parallelism", parallelism, *(["--variants", *args.variants] if args.variants else [])]
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={args.nproc}", "-m", __spec__.name, *rank_args])
        if done.returncode != 0:
            rows.append(dict(variant="all", world_size=args.nproc, parallelism=parallelism,
                             error=f"torchrun exited with {done.returncode}"))
            continue
        rows += json.loads(part.read_text())
        part.unlink()
        add_ratios(rows)
        data = {"meta": meta("distributed", command_line(), steps=args.steps, warmup=args.warmup,
                             optimizer="AdamW", same_batch_on_every_rank=True,
                             fsdp2_wraps="every decoder layer, then the model"), "rows": rows}
        print(write_results("distributed", data, args.out))
    plot(rows, args.out / "distributed.png")


if __name__ == "__main__":
    main()
