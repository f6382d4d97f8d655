"""Held-out loss of a real pretrained model (SmolLM2-135M, pydoc text) with block-sparse attention.

Every attention layer runs :func:`~lecompile.ops.block_attention.block_attention_ref` with the
blocks chosen by a predictor, at several attention densities, and the held-out loss is compared
with dense attention on the same tokens. Predictors:

- ``pooled``: lecompile's default (block-mean queries against block-mean keys, atomic layouts);
- ``oracle``: the same layout choice on the exact attention mass (upper bound of the layouts);
- ``local``: a fixed sink + local window of the same budget for every head (StreamingLLM-like),
  the baseline that per-head prediction has to beat.

No training: this measures what the patterns lose on the pretrained model. Writes
``attention_accuracy.json`` and a plot.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import RESULTS, command_line, meta, write_results
from examples.data import load_model, token_splits
from lecompile.predictors.attention import choose_layouts, transformers_attention

DENSITIES = (0.75, 0.5, 0.35, 0.25)
PREDICTORS = ("pooled", "oracle", "local")


def local_mass(n: int, m: int) -> torch.Tensor:
    """A mass that prefers the nearest diagonals: choose_layouts then keeps a local window."""
    i = torch.arange(n)[:, None] + (m - n)
    j = torch.arange(m)[None, :]
    return (1.0 / (1.0 + (i - j).clamp(min=0).float()))[None, None]


def sparse_attention(predictor: str, density: float, block: int, kept: list):
    """An SDPA replacement for transformers running the reference op on the chosen blocks."""
    def local(query, key, allowed):
        B, H, L, S = query.shape[0], query.shape[1], query.shape[-2], key.shape[-2]
        return choose_layouts(local_mass(L // block, S // block).expand(B, H, -1, -1), allowed, density)
    return transformers_attention(density, block, method=predictor, choose=local if predictor == "local" else None,
                                  kept=kept)


@torch.no_grad()
def heldout_loss(model, rows, batch):
    losses = [model(input_ids=rows[i:i + batch], labels=rows[i:i + batch], use_cache=False).loss.item()
              for i in range(0, len(rows), batch)]
    return sum(losses) / len(losses)


def plot(rows, dense, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for predictor in PREDICTORS:
        sel = sorted((r for r in rows if r["predictor"] == predictor), key=lambda r: r["kept_density"])
        ax.plot([r["kept_density"] for r in sel], [r["heldout_loss"] for r in sel], "o-", label=predictor)
    ax.axhline(dense, color="gray", ls="--", label="dense attention")
    ax.axhline(dense * 1.01, color="gray", ls=":", label="dense + 1%")
    ax.set(xlabel="attention blocks kept (share of causal blocks)", ylabel="held-out loss",
           title="SmolLM2-135M, pydoc held-out, block-sparse attention")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--sequences", type=int, default=8, help="held-out sequences")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--predictors", nargs="+", default=list(PREDICTORS), choices=PREDICTORS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, tokenizer = load_model()
    model.eval()
    model.config._attn_implementation = "sdpa"
    rows_tokens = token_splits(tokenizer, args.seq, heldout_share=0.2)["heldout"][:args.sequences]
    dense = heldout_loss(model, rows_tokens, args.batch)
    rows = []
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    try:
        for predictor, density in tqdm([(p, d) for p in args.predictors for d in args.densities]):
            kept: list = []
            ALL_ATTENTION_FUNCTIONS["sdpa"] = sparse_attention(predictor, density, args.block, kept)
            loss = heldout_loss(model, rows_tokens, args.batch)
            rows.append(dict(case="smollm2-135m attention", predictor=predictor, attn_density=density,
                             kept_density=sum(kept) / len(kept), block=args.block, seq=args.seq,
                             sequences=len(rows_tokens), heldout_loss=loss, dense_heldout_loss=dense,
                             loss_vs_dense=loss / dense))
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original
    rows.append(dict(case="smollm2-135m attention", variant="dense", predictor="dense", attn_density=1.0,
                     kept_density=1.0, block=args.block, seq=args.seq, sequences=len(rows_tokens),
                     heldout_loss=dense, dense_heldout_loss=dense, loss_vs_dense=1.0))
    data = {"meta": meta("attention_accuracy", command_line(), model="SmolLM2-135M-Instruct (GGUF, fp32)",
                         text="pydoc_data.topics held-out split"), "rows": rows}
    path = write_results("attention_accuracy", data, args.out)
    plot(rows[:-1], dense, args.out / "attention_accuracy.png")
    for r in rows:
        print(f"{r['predictor']:7s} density {r['attn_density']:.2f} kept {r['kept_density']:.3f} "
              f"loss {r['heldout_loss']:.4f} ({100 * (r['loss_vs_dense'] - 1):+.2f}%)")
    print(path)


if __name__ == "__main__":
    main()
