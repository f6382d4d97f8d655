"""Where a training step's GPU time goes, each part next to its own limit.

    python -m benchmarks.step_breakdown --models opt-1.3b llama-3.2-1b qwen2-1.5b

Per case, the PyTorch profiler records a few steps of lecompile at density 1.0 and of Inductor
with bf16 adapters (the strongest setup without CUDA graphs, whose replay hides the kernels),
and every GPU kernel's time goes to one part of the step, by the op that launched it:

- ``base_gemm``: matrix products of the frozen weights (and lecompile's LoRA-in-GEMM kernels),
  MoE experts' grouped products included;
- ``adapter_gemm``: products with a dimension of at most :data:`ADAPTER_DIM` (the LoRA ranks);
- ``sparse_mlp`` and ``predictor``: kernels of lecompile's sparse MLPs and their predictors
  (sparse variants, ``--densities``);
- ``attention``: SDPA and FlexAttention kernels;
- ``loss``: the cross-entropy kernels past the LM head's product;
- ``optimizer``: everything under ``Optimizer.step``;
- ``elementwise``: Inductor's Triton kernels and PyTorch's elementwise kernels and copies (norms,
  activations, residuals, RoPE, casts);
- ``rest``: anything else.

The GEMM and attention parts get a limit: their least FLOPs (:func:`benchmarks.e2e.step_flops`)
at the GPU's bf16 GEMM rate (:data:`benchmarks.e2e.GEMM_TFLOPS`). In a sparse variant the
rewritten MLPs leave ``base_gemm``'s limit for ``sparse_mlp``'s, the larger of their least FLOPs
at that rate and the weight rows their token groups read at the GPU's memory bandwidth
(:func:`sparse_mlp_work`): each group of tokens that shares a neuron set reads its own rows.
Beside the kernels, each row has the step's wall time without the profiler (``step_ms``), the
part of it the GPU ran no kernel (``idle_ms``: launches and host work it waited for), the
kernel launches and host synchronizations per step (:func:`host_counts`), and the host's
costliest events (:func:`top_host_ops`: which calls the host's time goes to).
Results go to ``step_breakdown.json`` (with each variant's costliest kernels) and a plot of the
parts against their limits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from benchmarks import e2e
from benchmarks.common import RESULTS, command_line, meta, write_results
from lecompile.config import LongExposureConfig

#: A product with a dimension this small is an adapter's (LoRA ranks, and q/k/v's stacked ranks).
ADAPTER_DIM = 64
PARTS = ("base_gemm", "adapter_gemm", "sparse_mlp", "predictor", "attention", "loss", "optimizer", "elementwise",
         "rest")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::_scaled_mm")
GROUPED_GEMM_OPS = ("aten::_grouped_mm",)  # [tokens, K] @ [experts, K, N]
#: lecompile's GEMMs with the LoRA product inside (``lecompile/kernels/lowrank_gemm.py``): their time is the
#: base product's, the adapter's share in them is small.
LORA_GEMM_KERNELS = ("_linear_low_rank_kernel",)
LECOMPILE_PARTS = {"lecompile::sparse_mlp": "sparse_mlp", "lecompile::predict_": "predictor"}
VARIANTS = ("inductor-bf16-adapters", "lecompile-d1")
#: HBM bandwidth in bytes/s (the spec sheet's) of each GPU, by a word of its name.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}


def _ancestors(event) -> Iterator:
    while event is not None:
        yield event
        event = event.cpu_parent


def part_of(kernel: str, op) -> str:
    """The part of the step a kernel belongs to, from its name and the op that launched it (a
    profiler ``FunctionEvent`` with ``input_shapes`` recorded)."""
    names = [e.name for e in _ancestors(op)]
    if any(n.startswith("Optimizer.step") for n in names):
        return "optimizer"
    for prefix, part in LECOMPILE_PARTS.items():
        if any(n.startswith(prefix) for n in names):
            return part
    if "flex_attention" in kernel or any("scaled_dot_product" in n for n in names):
        return "attention"
    if any(name in kernel for name in LORA_GEMM_KERNELS):
        return "base_gemm"
    if op.name in GEMM_OPS or op.name in GROUPED_GEMM_OPS:
        # mm: [M, K], [K, N]; addmm: the bias first; grouped: [T, K], [experts, K, N], then the offsets
        shapes = op.input_shapes[:2] if op.name in GROUPED_GEMM_OPS else op.input_shapes[-2:]
        dims = [d for shape in shapes for d in shape[-2:]]
        return "adapter_gemm" if dims and min(dims) <= ADAPTER_DIM else "base_gemm"
    if op.name in ("aten::bmm", "aten::baddbmm"):
        return "attention"
    if "cross_entropy" in kernel or any("cross_entropy" in n for n in names):
        return "loss"
    if kernel.startswith("triton_") or any(w in kernel for w in ("elementwise", "reduce", "copy", "Memcpy",
                                                                 "Memset")):
        return "elementwise"
    return "rest"


def sort_kernels(prof, steps: int) -> Dict[str, float]:
    """ms per step in each of :data:`PARTS`, over every kernel the profiled steps launched."""
    totals = dict.fromkeys(PARTS, 0.0)
    for op in prof.events():
        for kernel in getattr(op, "kernels", ()):
            totals[part_of(kernel.name, op)] += kernel.duration / 1e3 / steps
    return {k: round(v, 3) for k, v in totals.items()}


def _is_kernel(event) -> bool:
    """A GPU kernel or copy; not a user annotation (such as ``Optimizer.step``), whose GPU span
    covers the idle time between its kernels too."""
    return event.device_type.name == "CUDA" and not getattr(event, "is_user_annotation", False)


def host_counts(prof, steps: int) -> Dict[str, Optional[float]]:
    """Per step: GPU kernels and copies launched (``launches``), and the host's waits on the GPU
    (``syncs``: CUDA runtime synchronizations and blocking copies) past the one that closes the
    profiled steps; ``None`` where the profile has no CUDA runtime calls."""
    events = list(prof.events())
    launches = sum(len(getattr(op, "kernels", ())) for op in events)
    runtime = [e.name for e in events if e.device_type.name == "CPU" and e.name.startswith("cuda")]
    syncs = sum(1 for name in runtime if name.endswith("Synchronize") or name == "cudaMemcpy") - 1
    return dict(launches=round(launches / steps, 1), syncs=round(syncs / steps, 1) if runtime else None)


def step_wall_ms(step, steps: int) -> float:
    """Wall ms per step over ``steps`` steps, the GPU synchronized before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def top_kernels(prof, steps: int, n: int = 20) -> List[dict]:
    """The ``n`` GPU kernels with the most device time per step, with their launches per step."""
    kernels = sorted((e for e in prof.key_averages() if _is_kernel(e)), key=lambda e: e.self_device_time_total,
                     reverse=True)
    return [dict(name=e.key[:120], ms=round(e.self_device_time_total / 1e3 / steps, 3),
                 launches=round(e.count / steps, 1)) for e in kernels[:n]]


def top_host_ops(prof, steps: int, n: int = 25) -> List[dict]:
    """The ``n`` host events (ops, kernel launches, CUDA runtime calls) with the most self CPU
    time per step, each with its inclusive time and calls per step. Profiled, so every call
    costs a little more than it does unprofiled."""
    events = sorted((e for e in prof.key_averages() if e.device_type.name == "CPU"),
                    key=lambda e: e.self_cpu_time_total, reverse=True)
    return [dict(name=e.key[:120], self_ms=round(e.self_cpu_time_total / 1e3 / steps, 3),
                 total_ms=round(e.cpu_time_total / 1e3 / steps, 3), calls=round(e.count / steps, 1))
            for e in events[:n]]


def sparse_mlp_work(entries, config, case: e2e.Case, hidden: int) -> Dict[str, float]:
    """The least work of the rewritten MLPs among ``entries`` (the report's ``MLPEntry`` rows) in
    one step of ``case`` under ``config``: ``flops``, ``weight_bytes`` (bf16 weights), and
    ``dense_flops``, what the same MLPs take dense. Per MLP of ``p`` projections (3 gated, else 2)
    over ``G`` token groups of ``g`` tokens (a tile, a sequence or the batch: the granularity its
    rewrite used), ``D`` of them dense
    (``dense_output_share``) and the rest at ``k`` neurons: FLOPs ``4 g hidden p (D ffn + (G - D) k)``
    (the forward and the input gradient; frozen weights get no weight gradient), weight bytes
    ``2 * 2 p hidden ((ffn if D else 0) + (G - D) k)`` (both passes read the rows: a dense group
    shares one read of each weight, a sparse group reads its own ``k`` rows)."""
    from lecompile.ops.token_groups import dense_group_count
    tokens = case.batch * case.seq
    work = dict(flops=0.0, weight_bytes=0.0, dense_flops=0.0)
    for e in entries:
        if not e.rewritten:
            continue
        group = {"tile": config.tuning.tile_size, "sequence": case.seq}.get(e.granularity, tokens)
        groups = tokens // group
        dense = dense_group_count(config.dense_output_share, groups) if config.dense_output_share else 0
        p = 3 if e.pattern.endswith("_gated") else 2
        work["flops"] += 4.0 * group * hidden * p * (dense * e.ffn + (groups - dense) * e.k)
        work["weight_bytes"] += 2 * 2.0 * p * hidden * ((e.ffn if dense else 0) + (groups - dense) * e.k)
        work["dense_flops"] += 4.0 * tokens * hidden * p * e.ffn
    return work


def hbm_bandwidth(device: str) -> Optional[float]:
    """This GPU's memory bandwidth in bytes/s (:data:`HBM_BYTES_PER_S`), ``None`` for other devices."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bandwidth for word, bandwidth in HBM_BYTES_PER_S.items() if word in name), None)


def limits_ms(step, case: e2e.Case, device: str) -> Dict[str, Optional[float]]:
    """The limit of each part of ``step`` (from :func:`benchmarks.e2e.training_step`) in ms: see the
    module's docstring; ``None`` on a GPU without a rate in :data:`benchmarks.e2e.GEMM_TFLOPS`."""
    rate = e2e.gemm_rate(device)
    flops = e2e.step_flops(step.model, case)
    if rate is None:
        return dict.fromkeys(flops)
    rate *= 1e12
    limits = {k: v / rate * 1e3 for k, v in flops.items()}
    backend = getattr(step, "backend", None)
    entries = {e.layer: e for r in backend.reports for e in r.mlp} if backend is not None else {}
    if any(e.rewritten for e in entries.values()):
        work = sparse_mlp_work(entries.values(), backend.config, case, step.model.config.hidden_size)
        limits["base_gemm"] -= work["dense_flops"] / rate * 1e3
        bandwidth = hbm_bandwidth(device)
        if bandwidth is not None:
            limits["sparse_mlp"] = max(work["flops"] / rate, work["weight_bytes"] / bandwidth) * 1e3
    return {k: round(v, 3) for k, v in limits.items()}


def profile_variant(case: e2e.Case, variant: e2e.Variant, device: str, steps: int = 3) -> dict:
    """One variant's step on the GPU, profiled after warm-up: ms per part, and the limits of the
    GEMM and attention parts (``None`` on a GPU without a rate in :data:`benchmarks.e2e.GEMM_TFLOPS`)."""
    from torch.profiler import ProfilerActivity, profile
    if torch.device(device).type != "cuda":
        raise ValueError(f"the step breakdown sorts GPU kernels: run it on a CUDA device, not {device!r}")
    step = e2e.training_step(case, variant, device)
    for _ in range(3 + (variant.config.dense_warmup_steps if variant.quality_setting else 0)):  # into the sparse phase
        step()
    wall = step_wall_ms(step, steps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    parts = sort_kernels(prof, steps)
    kernels = round(sum(parts.values()), 3)
    return dict(case=case.name, variant=variant.name, unit="ms per step", kernels_ms=kernels, parts=parts,
                step_ms=round(wall, 3), idle_ms=round(wall - kernels, 3), **host_counts(prof, steps),
                limits=limits_ms(step, case, device), top_kernels=top_kernels(prof, steps),
                top_host_ops=top_host_ops(prof, steps))


def plot(rows: List[dict], path: Path) -> None:
    """Per case and variant, the step's parts as stacked bars, with the GEMM and attention limits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 3), 5))
    labels = [f"{r['case']}\n{r['variant']}" + (f"\nrun {r['run']}" if "run" in r else "") for r in rows]
    bottom = [0.0] * len(rows)
    for part in PARTS:
        values = [r["parts"][part] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    limit = [sum(v for v in r["limits"].values() if v is not None) for r in rows]
    ax.scatter(labels, limit, marker="_", s=900, color="black", label="limit of the GEMMs and attention")
    ax.set(ylabel="GPU ms per step", title="Where the step goes (PyTorch profiler, no CUDA graphs)")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_breakdown", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["opt-1.3b", "llama-3.2-1b", "qwen2-1.5b"],
                        choices=list(e2e.MODELS))
    parser.add_argument("--shapes", nargs="+", default=["8x512"], choices=list(e2e.SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the published model")
    parser.add_argument("--densities", nargs="+", type=float, default=[1.0],
                        help="MLP densities of the lecompile variants to choose from")
    parser.add_argument("--attn-densities", nargs="+", type=float, default=[1.0])
    parser.add_argument("--mask-blocks", action="store_true",
                        help="add the density variants with attn_mask_blocks (e.g. lecompile-d1-mask-blocks; "
                             "on the harness's unpadded batches the same graphs since the causal_masks pass)")
    parser.add_argument("--quality-settings", nargs="+", default=[], metavar="SETTING",
                        help="lecompile variants configured as these settings of the quality harness, profiled "
                             "after their dense warm-up (e.g. schedule-learned-0.5)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="variants as named in e2e's results (e.g. lecompile-d0.5-a0.5, "
                             f"lecompile-schedule-learned-0.5); default: {', '.join(VARIANTS)} and the "
                             "--quality-settings")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="settings of every lecompile density variant, e.g. lora_in_gemm=false")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per variant")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(RESULTS), help="folder for step_breakdown.json and .png")
    args = parser.parse_args(argv)
    e2e.check_layers(args.layers)
    device = args.device
    settings = LongExposureConfig.parse_settings(args.set)
    available = e2e.variants(densities=args.densities, attn_densities=args.attn_densities, settings=settings,
                             quality_settings=args.quality_settings, mask_blocks=args.mask_blocks)
    if args.variants is None:
        args.variants = list(VARIANTS) + [f"lecompile-{setting}" for setting in args.quality_settings]
    unknown = sorted(set(args.variants) - {v.name for v in available})
    if unknown:
        raise ValueError(f"unknown variants {unknown}; with these densities: {[v.name for v in available]}")
    chosen = [v for v in available if v.name in args.variants]
    rows: List[dict] = []
    data = {"meta": meta("step_breakdown", command_line(), settings=dict(steps=args.steps, adapter_dim=ADAPTER_DIM,
                                                                         lecompile_settings=settings)),
            "rows": rows}
    out = Path(args.out)
    for model in args.models:
        for shape in args.shapes:
            case = e2e.Case(model, "lora", *e2e.SHAPES[shape], layers=args.layers)
            for variant in chosen:
                rows.append(profile_variant(case, variant, device, args.steps))
                print(rows[-1], flush=True)
                write_results("step_breakdown", data, out)
    plot(rows, out / "step_breakdown.png")
    print(f"wrote {out / 'step_breakdown.json'} and {out / 'step_breakdown.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
