"""Accuracy study: LoRA fine-tuning of SmolLM2-135M on pydoc text, dense vs sparse MLPs.

Every run starts from the same LoRA model and sees the same batches (fixed split and seed). The
task is continuation: the loss reads the second half of each row (the first half is context).
After ``--steps`` steps the fine-tuned model is evaluated dense on held-out rows (as it would be
served). Sparse runs keep, in every MLP, the neurons their predictor chooses per token
group; this is emulated by masking the MLP intermediate to those neurons (the compiled
``lecompile::sparse_mlp`` equals that masked dense computation, forward and backward:
``tests/test_models.py``), so the study runs anywhere without compiling.

Rows: ``predictor`` (oracle / svd / learned, or ``sparselora`` for SparseLoRA's recipe: SVD
estimator, one neuron set per batch, first ``--sparselora-dense-layers`` layers dense, dense
warm-up for the first 10% of steps, sparsity on context tokens only), ``recipe`` (``lecompile``
rows apply the same schedule with lecompile's own means: the learned predictor per 64-token tile,
``mlp_layer_densities`` for the dense layers, ``warmup_steps``, and ``dense_output_share=0.5``,
which runs the tiles holding output tokens dense), ``granularity``,
``mlp_density`` (requested), ``kept_density`` (after rounding k), ``heldout_loss``, and the loss
curve. Writes ``accuracy.json`` and a plot.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import RESULTS, command_line, meta, write_results
from examples.data import batches, load_model, token_splits
from examples.demo import lora_model
from lecompile.ops.adapted_linear import AdaptedLinear
from lecompile.ops.token_groups import dense_first_order, dense_group_count
from lecompile.passes.rewrite_mlp import kept_neurons
from lecompile.predictors import PREDICTORS, clear_learned, top_k

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
TILE = 64


def adapted(module) -> AdaptedLinear:
    """A PEFT LoRA linear (or a plain one) as the predictors' :class:`AdaptedLinear`."""
    base = getattr(module, "base_layer", module)
    if not hasattr(module, "lora_A"):
        return AdaptedLinear(base.weight.detach(), None if base.bias is None else base.bias.detach())
    return AdaptedLinear(base.weight.detach(), None if base.bias is None else base.bias.detach(),
                         lora_a=module.lora_A["default"].weight.detach(),
                         lora_b=module.lora_B["default"].weight.detach(),
                         lora_scale=float(module.scaling["default"]))


class SparseMLPs:
    """Hooks that keep, in every MLP, the neurons ``predictor`` chooses per token group."""

    def __init__(self, model, predictor, granularity, density, align, dense_layers=0, context_only=False,
                 dense_output_share=0.0):
        self.predictor, self.granularity, self.density = predictor, granularity, density
        self.align, self.dense_layers, self.context_only = align, dense_layers, context_only
        self.dense_output_share = dense_output_share
        self.active, self.context, self.kept = True, None, []
        self.handles = []
        for i, layer in enumerate(model.base_model.model.model.layers):
            if i >= dense_layers:
                self.handles.append(layer.mlp.register_forward_pre_hook(self._capture))
                self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._mask(layer.mlp)))

    def _capture(self, mlp, args):
        mlp._lecompile_x = args[0].detach()

    def _mask(self, mlp):
        def hook(module, args):
            if not self.active:
                return None
            h, x = args[0], mlp._lecompile_x
            batch, seq, ffn = h.shape
            k = kept_neurons(self.density, ffn, self.align)
            group = {"sequence": seq, "tile": TILE, "batch": batch * seq}[self.granularity]
            scores = PREDICTORS[self.predictor](x.reshape(-1, x.shape[-1]), adapted(mlp.gate_proj),
                                                adapted(mlp.up_proj), "silu", 8, group)
            idx = top_k(scores, k)
            mask = torch.zeros(idx.shape[0], ffn, dtype=h.dtype, device=h.device).scatter_(-1, idx, 1.0)
            mask = mask.repeat_interleave(group, 0).reshape(batch, seq, ffn)
            if self.context_only:  # SparseLoRA: output tokens (labels != -100) stay dense
                mask = torch.where(self.context.unsqueeze(-1), mask, torch.ones_like(mask))
            if self.dense_output_share:  # lecompile's dense_output_share: whole groups, outputs first
                order, _ = dense_first_order(~self.context.reshape(-1), group)
                dense = dense_group_count(self.dense_output_share, idx.shape[0])
                grouped = mask.reshape(idx.shape[0], group, ffn)
                grouped[order[:dense]] = 1.0
                mask = grouped.reshape(batch, seq, ffn)
            self.kept.append(mask.mean().item())
            return (h * mask,) + args[1:]
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def continuation_labels(ids):
    """Labels whose loss covers exactly the positions of the second half (the causal-LM loss
    shifts labels by one)."""
    labels = ids.clone()
    labels[:, : ids.shape[1] // 2 + 1] = -100
    return labels


def run(start, name, train, heldout, lr, hooks_fn=None, warmup=0):
    model = copy.deepcopy(start)
    hooks = hooks_fn(model) if hooks_fn else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step, ids in enumerate(tqdm(train, desc=name, leave=False)):
        labels = continuation_labels(ids)
        if hooks:
            hooks.active = step >= warmup
            # context: positions the loss does not read (its targets are the labels shifted by one)
            hooks.context = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) == -100
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    kept = 1.0
    if hooks and hooks.kept:  # compute share of the MLPs during sparse steps, dense layers included
        layers = len(start.base_model.model.model.layers)
        kept = (sum(hooks.kept) / len(hooks.kept) * (layers - hooks.dense_layers) + hooks.dense_layers) / layers
    if hooks:
        hooks.remove()
    model.eval()
    with torch.no_grad():
        held = sum(model(input_ids=h, labels=continuation_labels(h), use_cache=False).loss.item()
                   for h in heldout) / len(heldout)
    return held, kept, losses


def frontier(rows):
    """Per series (predictor, granularity, schedule): the lowest MLP compute share whose held-out
    loss stays within 1% and within 3% of dense LoRA (None: no row does)."""
    dense = next(r["heldout_loss"] for r in rows if r["variant"] == "dense")
    out = []
    for key in sorted({(r["predictor"], r["granularity"], r.get("recipe", "none")) for r in rows
                       if r["variant"] != "dense"}):
        sel = [r for r in rows if (r["predictor"], r["granularity"], r.get("recipe", "none")) == key]
        best = {pct: min((r["kept_density"] for r in sel if r["heldout_loss"] <= dense * (1 + pct / 100)),
                         default=None) for pct in (1, 3)}
        out.append(dict(predictor=key[0], granularity=key[1], recipe=key[2],
                        lowest_density_within_1pct=best[1], lowest_density_within_3pct=best[3]))
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    dense = next(r for r in rows if r["variant"] == "dense")
    series = sorted({(r["predictor"], r["granularity"], r.get("recipe", "none")) for r in rows
                     if r["variant"] != "dense"})
    for predictor, granularity, recipe in series:
        sel = sorted((r for r in rows if (r["predictor"], r["granularity"], r.get("recipe", "none"))
                      == (predictor, granularity, recipe)), key=lambda r: r["kept_density"])
        label = f"{predictor}, {granularity}" + (", lecompile's schedule" if recipe == "lecompile" else "")
        ax1.plot([r["kept_density"] for r in sel], [r["heldout_loss"] for r in sel], "o-", label=label)
    for pct, style in ((1, ":"), (3, "-.")):
        ax1.axhline(dense["heldout_loss"] * (1 + pct / 100), color="gray", ls=style, label=f"dense + {pct}%")
    ax1.axhline(dense["heldout_loss"], color="black", lw=1, label="dense LoRA")
    ax1.set(xlabel="MLP compute kept (share of neurons over tokens and layers)", ylabel="held-out loss",
            title="SmolLM2-135M LoRA on pydoc: held-out loss vs density")
    ax1.legend(fontsize=7)
    for r in rows:
        if r["variant"] == "dense" or r["mlp_density"] == min(x["mlp_density"] for x in rows):
            ax2.plot(r["losses"], lw=1, label=r["variant"])
    ax2.set(xlabel="step", ylabel="training loss", title="loss curves (dense and the lowest density)")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=8, help="held-out batches")
    parser.add_argument("--densities", nargs="+", type=float, default=[0.7, 0.5, 0.35, 0.25])
    parser.add_argument("--predictors", nargs="+", default=["oracle", "svd", "learned"], choices=list(PREDICTORS))
    parser.add_argument("--granularities", nargs="+", default=["tile", "sequence"], choices=["tile", "sequence"])
    parser.add_argument("--recipes", nargs="*", default=["sparselora", "lecompile"],
                        choices=["sparselora", "lecompile"],
                        help="schedules run besides the plain predictor rows (--recipes alone: none)")
    parser.add_argument("--recipe-densities", nargs="+", type=float,
                        help="MLP densities of the schedules' rows (default: --densities)")
    parser.add_argument("--sparselora-dense-layers", type=int, default=3)
    parser.add_argument("--align", type=int, default=64, help="k is rounded up to a multiple of this")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    base, tokenizer = load_model()
    splits = token_splits(tokenizer, args.seq_len)
    train = batches(splits["train"], args.batch_size, args.steps, args.seed)
    heldout = batches(splits["heldout"], args.batch_size, args.heldout, args.seed + 1)
    torch.manual_seed(args.seed)
    start = lora_model(base, 8, TARGETS)
    common = dict(model="SmolLM2-135M-Instruct (GGUF, fp32)", steps=args.steps, batch=args.batch_size,
                  seq=args.seq_len, lora="r=8 on " + ",".join(TARGETS))
    rows = []
    held, _, losses = run(start, "dense", train, heldout, args.lr)
    rows.append(dict(variant="dense", predictor="dense", granularity="-", recipe="none", mlp_density=1.0,
                     kept_density=1.0, heldout_loss=round(held, 5), losses=losses, **common))
    configs = [(p, g, d, "none") for p in args.predictors for g in args.granularities for d in args.densities]
    configs += [({"sparselora": "sparselora", "lecompile": "learned"}[r], {"sparselora": "batch"}.get(r, "tile"), d, r)
                for r in args.recipes for d in (args.recipe_densities or args.densities)]
    for predictor, granularity, density, recipe in tqdm(configs, desc="runs"):
        clear_learned()
        name = f"{predictor}-{granularity}-d{density:g}" + ("-recipe" if recipe == "lecompile" else "")
        if recipe == "sparselora":
            hooks = lambda m, d=density: SparseMLPs(m, "svd", "batch", d, args.align,  # noqa: E731
                                                     args.sparselora_dense_layers, context_only=True)
        elif recipe == "lecompile":
            hooks = lambda m, d=density: SparseMLPs(m, "learned", "tile", d, args.align,  # noqa: E731
                                                     args.sparselora_dense_layers, dense_output_share=0.5)
        else:
            hooks = lambda m, p=predictor, g=granularity, d=density: SparseMLPs(m, p, g, d, args.align)  # noqa: E731
        warmup = args.steps // 10 if recipe != "none" else 0
        held, kept, losses = run(start, name, train, heldout, args.lr, hooks, warmup=warmup)
        rows.append(dict(variant=name, predictor=predictor, granularity=granularity, recipe=recipe,
                         mlp_density=density, kept_density=round(kept, 4), heldout_loss=round(held, 5),
                         losses=losses, **common))
        write_results("accuracy", {"meta": meta("accuracy", command_line()), "rows": rows}, args.out)
    data = {"meta": meta("accuracy", command_line(), text="pydoc_data.topics, fixed train/held-out split",
                         task="continuation: loss on the second half of each row", seed=args.seed),
            "frontier": frontier(rows), "rows": rows}
    path = write_results("accuracy", data, args.out)
    plot(rows, args.out / "accuracy.png")
    dense_loss = rows[0]["heldout_loss"]
    for r in rows:
        print(f"{r['variant']:28s} kept {r['kept_density']:.3f} held-out {r['heldout_loss']:.4f} "
              f"({100 * (r['heldout_loss'] / dense_loss - 1):+.2f}%)")
    print(path)


if __name__ == "__main__":
    main()
