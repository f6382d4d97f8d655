"""Neuron predictors against the oracle on a real pretrained model (SmolLM2-135M, pydoc text).

For every MLP layer, the recall of the exact activation mass (``sum h^2`` of the kept neurons,
as a share of what the oracle's top-k keeps) of the ``svd`` and ``learned`` predictors, per
sequence and per 128-token tile, at several densities, on held-out sequences; the learned
predictor is trained on other sequences first (``--train-steps`` optimizer steps per layer).
Also the time each predictor takes per layer call (CPU or GPU, as run). Writes
``predictor_quality.json`` and a plot.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import RESULTS, command_line, meta, write_results
from examples.data import load_model, token_splits
from lecompile.ops.adapted_linear import AdaptedLinear
from lecompile.predictors import clear_learned, learned_group_scores, oracle_group_scores, recall, svd_group_scores
from lecompile.predictors.learned import learned_factors, train_pending

DENSITIES = (0.5, 0.25)


def mlp_inputs(model, ids):
    """The input of every layer's MLP for ``ids``: ``{layer: [T, d]}``."""
    captured = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].detach()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {i: x.reshape(-1, x.shape[-1]) for i, x in captured.items()}


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--sequences", type=int, default=4, help="held-out sequences (and as many to train)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model()
    model.to(device).eval()
    splits = token_splits(tokenizer, args.seq)
    train = mlp_inputs(model, splits["train"][:args.sequences].to(device))
    held = mlp_inputs(model, splits["heldout"][:args.sequences].to(device))
    ffn = model.config.intermediate_size
    rows = []
    clear_learned()
    for layer in tqdm(range(len(model.model.layers)), desc="layers"):
        mlp = model.model.layers[layer].mlp
        gate, up = AdaptedLinear(mlp.gate_proj.weight.detach()), AdaptedLinear(mlp.up_proj.weight.detach())
        learned_group_scores(train[layer], gate, up, "silu", args.rank, args.seq, args.train_steps, 0)
        train_pending()
        learned_factors(gate.weight, args.rank).calls = 1 << 30  # trained: score only from now on
        for granularity, group in (("sequence", args.seq), ("tile", 128)):
            x = held[layer]
            exact, oracle_ms = timed(oracle_group_scores, x, gate, up, "silu", 0, group)
            scores = {"svd": timed(svd_group_scores, x, gate, up, "silu", args.rank, group),
                      "learned": timed(learned_group_scores, x, gate, up, "silu", args.rank, group, 1, 0)}
            for density in args.densities:
                k = max(1, round(density * ffn))
                for predictor, (s, ms) in scores.items():
                    rows.append(dict(case="smollm2-135m mlp", layer=layer, predictor=predictor,
                                     granularity=granularity, density=density, rank=args.rank,
                                     recall=round(recall(s, exact, k), 4), ms=round(ms, 3),
                                     oracle_ms=round(oracle_ms, 3), tokens=x.shape[0], device=device))
    data = {"meta": meta("predictor_quality", command_line(), model="SmolLM2-135M-Instruct (GGUF, fp32)",
                         text="pydoc_data.topics: learned trained on train rows, measured on held-out rows",
                         train_steps=args.train_steps), "rows": rows}
    path = write_results("predictor_quality", data, args.out)
    plot(rows, args.out / "predictor_quality.png")
    for predictor in ("svd", "learned"):
        for granularity in ("sequence", "tile"):
            for density in args.densities:
                sel = [r["recall"] for r in rows if r["predictor"] == predictor and r["granularity"] == granularity
                       and r["density"] == density]
                print(f"{predictor:8s} {granularity:8s} density {density}: mean recall {sum(sel) / len(sel):.3f} "
                      f"(min {min(sel):.3f})")
    print(path)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    densities = sorted({r["density"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(densities), figsize=(6 * len(densities), 4), squeeze=False)
    for ax, density in zip(axes[0], densities):
        for predictor, granularity, style in (("svd", "sequence", "o-"), ("learned", "sequence", "s-"),
                                              ("svd", "tile", "o--"), ("learned", "tile", "s--")):
            sel = sorted((r for r in rows if r["predictor"] == predictor and r["granularity"] == granularity
                          and r["density"] == density), key=lambda r: r["layer"])
            ax.plot([r["layer"] for r in sel], [r["recall"] for r in sel], style, label=f"{predictor}, {granularity}")
        ax.set(xlabel="layer", ylabel="recall of the oracle's activation mass", ylim=(0, 1.02),
               title=f"SmolLM2-135M MLP, density {density}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
