"""The exposer's measurement: shadowy sparsity of a real pretrained model (SmolLM2-135M, pydoc text).

MLP: per token, the neurons that carry ``--mass`` of the intermediate's absolute activation
(``silu(gate) * up``, or exact non-zeros for ReLU models), and the union of those sets over
token tiles (16, 64, 128 tokens), whole sequences and the whole batch. Attention: per head, the
share of causal ``--block``-token blocks needed to hold ``--attn-mass`` of each query block's
attention. Writes ``shadowy_sparsity.json`` and a plot.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import RESULTS, command_line, meta, write_results
from examples.data import load_model, token_splits

TILES = (16, 64, 128)


def active_neurons(h: torch.Tensor, mass: float) -> torch.Tensor:
    """Boolean ``[..., ffn]``: per token, the fewest neurons holding ``mass`` of ``sum |h|``."""
    a = h.abs().float()
    top, order = a.sort(dim=-1, descending=True)
    cum = top.cumsum(-1)
    keep_sorted = (cum - top) < mass * cum[..., -1:]  # neurons needed before the mass is reached
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def union_density(active: torch.Tensor, scope: int) -> float:
    """Mean share of neurons active in any token of each group of ``scope`` consecutive tokens."""
    b, s, ffn = active.shape
    return active.reshape(b, s // scope, scope, ffn).any(2).float().mean().item()


def block_density(probs: torch.Tensor, block: int, mass: float) -> torch.Tensor:
    """Per head ``[H]``: share of causal key blocks kept when each query block keeps the fewest
    key blocks holding ``mass`` of its attention. ``probs`` is ``[B, H, S, S]``."""
    b, h, s, _ = probs.shape
    nb = s // block
    blocks = probs.float().reshape(b, h, nb, block, nb, block).sum((3, 5))  # [B, H, qb, kb]
    top, _ = blocks.sort(-1, descending=True)
    cum = top.cumsum(-1)
    kept = ((cum - top) < mass * cum[..., -1:]).sum(-1).float()  # [B, H, qb]
    causal = torch.arange(1, nb + 1, dtype=torch.float32)  # query block i sees i + 1 key blocks
    return (kept.sum(-1) / causal.sum()).mean(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--mass", type=float, default=0.9, help="share of MLP activation mass per token")
    parser.add_argument("--attn-mass", type=float, default=0.95)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    model, tokenizer = load_model(None, torch.float32)
    model.config._attn_implementation = "eager"  # attention probabilities are needed
    ids = token_splits(tokenizer, args.seq)["heldout"][:args.batch]
    captured = {}

    def grab(name):
        def hook(module, inputs):
            captured[name] = inputs[0].detach()
        return hook

    layers = model.model.layers
    handles = [layer.mlp.down_proj.register_forward_pre_hook(grab(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, output_attentions=True, use_cache=False)
    for h in handles:
        h.remove()
    rows = []
    for i in range(len(layers)):
        active = active_neurons(captured[i], args.mass)
        heads = block_density(out.attentions[i], args.block, args.attn_mass)
        rows.append(dict(case="smollm2-135m", layer=i, tokens=ids.numel(), seq=args.seq, mass=args.mass,
                         per_token=round(active.float().mean().item(), 4),
                         **{f"tile{t}": round(union_density(active, t), 4) for t in TILES},
                         sequence=round(union_density(active, args.seq), 4),
                         batch=round(active.any(1).any(0).float().mean().item(), 4),
                         attn_block=args.block, attn_mass=args.attn_mass,
                         attn_block_density=round(heads.mean().item(), 4),
                         attn_block_density_min_head=round(heads.min().item(), 4),
                         attn_block_density_max_head=round(heads.max().item(), 4)))
    data = {"meta": meta("shadowy_sparsity", command_line(), loss=round(out.loss.item(), 4)), "rows": rows}
    path = write_results("shadowy_sparsity", data, Path(args.out))
    plot(rows, Path(args.out) / "shadowy_sparsity.png")
    for r in rows:
        print(f"layer {r['layer']:2d}  token {r['per_token']:.2f}  tile16 {r['tile16']:.2f}  "
              f"tile128 {r['tile128']:.2f}  seq {r['sequence']:.2f}  batch {r['batch']:.2f}  "
              f"attn blocks {r['attn_block_density']:.2f}")
    print("wrote", path)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    layers = [r["layer"] for r in rows]
    for key in ("per_token", *(f"tile{t}" for t in TILES), "sequence", "batch"):
        ax1.plot(layers, [r[key] for r in rows], "o-", ms=3, label=key.replace("_", " "))
    ax1.set(xlabel="layer", ylabel="share of MLP neurons active",
            title=f"MLP: {rows[0]['mass']:.0%} of |activation| per token, union over scopes")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=7)
    ax2.plot(layers, [r["attn_block_density"] for r in rows], "o-", label="mean over heads")
    ax2.fill_between(layers, [r["attn_block_density_min_head"] for r in rows],
                     [r["attn_block_density_max_head"] for r in rows], alpha=0.3, label="min-max head")
    ax2.set(xlabel="layer", ylabel="share of causal blocks kept", ylim=(0, 1.02),
            title=f"attention: {rows[0]['attn_mass']:.0%} of mass, {rows[0]['attn_block']}-token blocks")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
