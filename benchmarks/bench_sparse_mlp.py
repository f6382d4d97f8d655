"""Sparse MLP operator vs dense cuBLAS, forward and forward+backward, on the GPU.

Variants (bf16, frozen weights, the input requires grad):
- ``dense``: ``F.linear`` chain (cuBLAS), the baseline of every ratio;
- ``lecompile-tile`` / ``lecompile-sequence`` / ``lecompile-shared``: ``lecompile::sparse_mlp``
  with per-token-tile (128 tokens), per-sequence and shared indices;
- ``sparselora-eager``: SparseLoRA's recipe, ``index_select`` of the weights then dense matmuls
  (shared indices).

Groups of ``COMPACT_MIN_GROUP_TOKENS`` tokens or more (``lecompile.kernels.gather_gemm``: shared
indices, sequences of 2048 tokens) run on cuBLAS over a compact copy of their kept rows;
``--compact-min-group-tokens`` moves that threshold (a large value keeps them on the gather kernels).

``ideal_ratio = dense_ms * density / ms`` (1.0 = perfect scaling). Memory: the bytes the forward
keeps alive for backward (``saved_mib``) and the peak over forward+backward. ``ms`` is eager
wall time per call (Python and launch overhead included); ``graph_ms`` the same work replayed as
a CUDA graph, i.e. GPU time alone, with ``graph_ideal_ratio`` against dense replayed the same way.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.common import MLP_SHAPES, command_line, meta, write_results
from lecompile.activations import ACTIVATIONS
from lecompile.kernels import gather_gemm
from lecompile.ops.adapted_linear import AdaptedLinear, pack_mlp
from lecompile.ops.sparse_mlp import sparse_mlp

TOKENS = {"8x512": (8, 512), "4x2048": (4, 2048)}
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)
TILE = 128
VARIANTS = ("lecompile-tile", "lecompile-sequence", "lecompile-shared", "sparselora-eager")


def make_weights(d, ffn, gated, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = lambda o, i: (torch.randn(o, i, device="cuda", generator=g) / math.sqrt(i)).to(dtype)  # noqa: E731
    return w(ffn, d), (w(ffn, d) if gated else None), w(d, ffn)


def dense_fn(x, w1, wu, w2, act):
    h = ACTIVATIONS[act](F.linear(x, w1))
    if wu is not None:
        h = h * F.linear(x, wu)
    return F.linear(h, w2)


def sparselora_fn(x, w1, wu, w2, act, idx):
    shared = idx[0]
    h = ACTIVATIONS[act](F.linear(x, w1.index_select(0, shared)))
    if wu is not None:
        h = h * F.linear(x, wu.index_select(0, shared))
    return F.linear(h, w2.index_select(1, shared))


def lecompile_fn(x, w1, wu, w2, act, idx):
    params, slots, scales = pack_mlp(AdaptedLinear(w1), AdaptedLinear(wu) if wu is not None else None,
                                     AdaptedLinear(w2))
    return sparse_mlp(x, idx, params, slots, scales, act, 0.0)[0]


def indices(groups, ffn, k):
    return torch.stack([torch.randperm(ffn, device="cuda")[:k].sort().values for _ in range(groups)])


def measure(fn, x, passes):
    from triton.testing import do_bench, do_bench_cudagraph
    grad = torch.randn_like(x)

    def fwd():
        return fn(x)

    def fwd_bwd():
        fn(x).backward(grad)

    out = {}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    y = fn(x)
    out["saved_mib"] = (torch.cuda.memory_allocated() - base) / 2 ** 20
    del y
    for name in passes:
        step = fwd if name == "fwd" else fwd_bwd
        torch.cuda.reset_peak_memory_stats()
        ms = do_bench(step, warmup=25, rep=100, return_mode="median")
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        try:  # GPU time alone: replayed as a CUDA graph, without Python and launch overhead
            graph_ms = do_bench_cudagraph(step, rep=100, return_mode="median")
        except Exception:
            graph_ms = None
        out[name] = (ms, peak, graph_ms)
        x.grad = None
    return out


def run(shapes, tokens_list, densities, variants=VARIANTS, dtype=torch.bfloat16):
    rows = []
    cases = [(s, t) for s in shapes for t in tokens_list]
    for shape, tokens in tqdm(cases, desc="sparse_mlp"):
        rows += run_case(shape, tokens, densities, variants, dtype)
        torch.cuda.empty_cache()
    return rows


def run_case(shape, tokens, densities, variants, dtype):
    d, ffn, act, gated = MLP_SHAPES[shape]
    batch, seq = TOKENS[tokens]
    w1, wu, w2 = make_weights(d, ffn, gated, dtype)
    x = torch.randn(batch, seq, d, device="cuda", dtype=dtype, requires_grad=True)
    base = measure(lambda x: dense_fn(x, w1, wu, w2, act), x, ("fwd", "fwd+bwd"))
    common = dict(case=f"{shape} mlp", d=d, ffn=ffn, activation=act + ("_gated" if gated else ""),
                  tokens=batch * seq, batch=batch, seq=seq, dtype=str(dtype).replace("torch.", ""),
                  compact_min_group_tokens=gather_gemm.COMPACT_MIN_GROUP_TOKENS)
    rows = [dict(common, **{"pass": p}, variant="dense", density=1.0, k=ffn, ms=base[p][0],
                 baseline="dense", baseline_ms=base[p][0], speedup=1.0, ideal_ratio=1.0,
                 graph_ms=base[p][2], baseline_graph_ms=base[p][2],
                 peak_mem_gib=base[p][1], baseline_peak_mem_gib=base[p][1], saved_mib=base["saved_mib"])
            for p in ("fwd", "fwd+bwd")]
    for density in densities:
        k = min(ffn, math.ceil(density * ffn / 128) * 128)
        groups = {"lecompile-tile": batch * seq // TILE, "lecompile-sequence": batch, "lecompile-shared": 1,
                  "sparselora-eager": 1}
        fns = {}
        for name in variants:
            idx = indices(groups[name], ffn, k)
            fn = sparselora_fn if name == "sparselora-eager" else lecompile_fn
            fns[name] = lambda x, idx=idx, fn=fn: fn(x, w1, wu, w2, act, idx)
        for name, fn in fns.items():
            try:
                got = measure(fn, x, ("fwd", "fwd+bwd"))
            except Exception as err:  # a failed case is recorded, not dropped
                rows.append(dict(common, variant=name, density=density, k=k, error=repr(err)[:300]))
                continue
            for p in ("fwd", "fwd+bwd"):
                ms = got[p][0]
                rows.append(dict(common, **{"pass": p}, variant=name, density=round(k / ffn, 4),
                                 requested_density=density, k=k, ms=ms, baseline="dense",
                                 baseline_ms=base[p][0], speedup=base[p][0] / ms,
                                 ideal_ratio=base[p][0] * (k / ffn) / ms,
                                 graph_ms=got[p][2], baseline_graph_ms=base[p][2],
                                 graph_ideal_ratio=_ratio(base[p][2], k / ffn, got[p][2]),
                                 peak_mem_gib=got[p][1],
                                 baseline_peak_mem_gib=base[p][1], saved_mib=got["saved_mib"]))
    return rows


def _ratio(base_ms, density, ms):
    return base_ms * density / ms if base_ms and ms else None


def newest(rows):
    """The rows of the newest run (``run``; rows without one are older) of each case, variant,
    density and pass."""
    latest = {}
    for r in sorted(rows, key=lambda r: r.get("run", 0)):
        latest[(r["case"], r["batch"], r["seq"], r.get("variant"), r.get("density"), r.get("pass"))] = r
    return list(latest.values())


def plot(rows, path):
    """Ideal ratio against density per shape and token count, the newest run of each point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = newest(rows)
    cases = sorted({(r["case"], r["batch"], r["seq"]) for r in rows if "ms" in r})
    fig, axes = plt.subplots(2, len(cases) // 2 + len(cases) % 2, figsize=(4.5 * (len(cases) // 2 + 1), 8),
                             squeeze=False)
    for ax, (case, batch, seq) in zip(axes.flat, cases):
        for variant in VARIANTS:
            pts = sorted((r["density"], r.get("graph_ideal_ratio") or r["ideal_ratio"]) for r in rows
                         if r.get("variant") == variant and r["case"] == case and r["batch"] == batch
                         and r.get("pass") == "fwd+bwd" and "ms" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=variant)
        ax.axhline(0.8, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{case}, {batch}x{seq}, fwd+bwd", fontsize=9)
        ax.set_xlabel("density")
        ax.set_ylabel("ideal ratio, GPU time (1 = perfect scaling)")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(MLP_SHAPES), choices=list(MLP_SHAPES))
    parser.add_argument("--tokens", nargs="+", default=list(TOKENS), choices=list(TOKENS))
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--compact-min-group-tokens", type=int, default=gather_gemm.COMPACT_MIN_GROUP_TOKENS,
                        help="tokens per group from which the GEMMs run on cuBLAS over a compact copy of the "
                             "kept rows (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sparse_mlp: needs a CUDA GPU (CPU timings say nothing about this operator)")
    if args.compact_min_group_tokens < 1:
        parser.error(f"--compact-min-group-tokens must be positive, got {args.compact_min_group_tokens}")
    gather_gemm.COMPACT_MIN_GROUP_TOKENS = args.compact_min_group_tokens
    rows = run(args.shapes, args.tokens, args.densities, args.variants)
    data = {"meta": meta("sparse_mlp", command_line()), "rows": rows}
    path = write_results("sparse_mlp", data, args.out)
    plot(rows, args.out / "sparse_mlp.png")
    print(f"wrote {path}")
    for r in rows:
        if r.get("pass") == "fwd+bwd" and r.get("variant") != "dense" and "ms" in r:
            print(f"{r['case']:18s} {r['batch']}x{r['seq']:<5d} {r['variant']:20s} d={r['density']:.3f} "
                  f"{r['ms']:7.3f} ms  speedup {r['speedup']:5.2f}  ideal {r['ideal_ratio']:4.2f}  "
                  f"graph {r['graph_ms'] or float('nan'):7.3f} ms  "
                  f"ideal {r.get('graph_ideal_ratio') or float('nan'):4.2f}")


if __name__ == "__main__":
    main()
