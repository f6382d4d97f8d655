"""Rewrite every LoRA-wrapped linear the sparse MLP did not take into ``lecompile::lora_linear``.

Runs after ``rewrite_mlp``: linears inside a rewritten MLP already run their adapters in the
sparse op. The pattern is the canonical :class:`~.fold_adapters.LinearMatch`, so attention
projections, dense MLP linears and any other adapted linear are covered alike.
"""

from __future__ import annotations

import torch.fx as fx
from torch._dynamo.utils import counters

from ..ops.lora_linear import lora_linear
from ..report import LinearEntry
from .fold_adapters import LinearMatch
from .graph import meta_value, recompile


def fuse_lora(ctx) -> None:
    """Replace each remaining LoRA linear and record it in the report."""
    changed = False
    for lin in ctx.linears:
        if lin.adapted.lora_a is None or lin.consumed:
            continue
        why = _unsupported(lin, ctx)
        ctx.report.linears.append(LinearEntry(lin.name, lin.peft, not why, why))
        if why:
            continue
        _rewrite(ctx.gm.graph, lin)
        counters["lecompile"]["lora_linear"] += 1
        changed = True
    if changed:
        recompile(ctx.gm)


def _unsupported(lin: LinearMatch, ctx) -> str:
    a = lin.adapted
    if not ctx.config.fuse_adapters:
        return "fuse_adapters=False: PEFT's fp32 adapter math, compiled by Inductor"
    if not ctx.training:
        return "inference graph (nothing requires grad): left to Inductor"
    if a.in_scale is not None or a.out_scale is not None:
        return "LoRA together with IA3 on one linear: left to Inductor"
    x = meta_value(lin.x)
    if x is None:
        return "no example value for the layer input: left to Inductor"
    return ""


def _rewrite(graph: fx.Graph, lin: LinearMatch) -> None:
    a = lin.adapted
    with graph.inserting_before(lin.out):
        weight = graph.call_method("t", (a.weight,)) if lin.weight_transposed else a.weight
        y = graph.call_function(lora_linear, (lin.x, weight, a.bias, lin.dropped_lora_input, a.lora_a,
                                              a.lora_b, a.lora_scale))
        out_dtype = meta_value(lin.out).dtype
        if out_dtype != meta_value(lin.x).dtype:
            y = graph.call_method("to", (y, out_dtype))
    lin.out.replace_all_uses_with(y)
