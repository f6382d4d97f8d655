"""Rewrite every LoRA-wrapped linear the sparse MLP did not take into ``lecompile::lora_linear``.

Runs after ``rewrite_mlp``: linears inside a rewritten MLP already run their adapters in the
sparse op. The pattern is the canonical :class:`~.fold_adapters.LinearMatch`, so attention
projections, dense MLP linears and any other adapted linear are covered alike. With
``share_lora_input``, linears that read one input (attention's q, k and v projections) become
one ``lecompile::lora_linears`` call, their A-projections one GEMM. ``lora_in_gemm`` asks the
ops to run LoRA's B-projection inside the base GEMM's kernel where they can.
"""

from __future__ import annotations

import operator
from typing import Dict, List

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from ..ops.lora_linear import in_gemm_unavailable, lora_linear, lora_linears, runs_in_gemm
from ..report import LinearEntry
from .fold_adapters import LinearMatch
from .graph import meta_value, recompile, replace_uses


def fuse_lora(ctx) -> None:
    """Replace each remaining LoRA linear and record it in the report."""
    todo: List[LinearMatch] = []
    entries: Dict[fx.Node, LinearEntry] = {}  # by output node
    for lin in ctx.linears:
        if lin.adapted.lora_a is None or lin.consumed:
            continue
        why = _unsupported(lin, ctx)
        entries[lin.out] = LinearEntry(lin.name, lin.peft, not why, why)
        ctx.report.linears.append(entries[lin.out])
        if not why:
            todo.append(lin)
            entries[lin.out].in_gemm = ctx.config.tuning.lora_in_gemm and _runs_in_gemm(lin, ctx)
    no_kernel = in_gemm_unavailable(meta_value(todo[0].x)) if todo and ctx.config.tuning.lora_in_gemm else ""
    note = f"lora_in_gemm: LoRA's B-projections stay on cuBLAS GEMMs on {no_kernel}"
    if no_kernel and note not in ctx.report.notes:
        ctx.report.notes.append(note)
    groups = _shared_input_groups(ctx.gm.graph, todo) if ctx.config.tuning.share_lora_input else [[lin] for lin in todo]
    for group in groups:
        if len(group) == 1:
            _rewrite(ctx.gm.graph, group[0], ctx.config.tuning.lora_in_gemm)
        else:
            _rewrite_group(ctx.gm.graph, group, ctx.config.tuning.lora_in_gemm)
            for lin in group:
                entries[lin.out].shared_with = [other.name for other in group if other is not lin]
        counters["lecompile"]["lora_linear"] += len(group)
    if groups:
        recompile(ctx.gm)


def _unsupported(lin: LinearMatch, ctx) -> str:
    a = lin.adapted
    if not ctx.config.enabled("fuse_lora"):
        return "disabled (disable={'fuse_lora'}): PEFT's fp32 adapter math, compiled by Inductor"
    if not ctx.training:
        return f"{ctx.not_training}: left to Inductor"
    if a.in_scale is not None or a.out_scale is not None:
        return "LoRA together with IA3 on one linear: left to Inductor"
    x = meta_value(lin.x)
    if x is None:
        return "no example value for the layer input: left to Inductor"
    return ""


def _runs_in_gemm(lin: LinearMatch, ctx) -> bool:
    """Whether the op will take its kernel path for this linear (for the report; the op decides
    the same from the same metadata when AOTAutograd traces it)."""
    a = lin.adapted
    weight, lora_a = ctx.value_of(a.weight), ctx.value_of(a.lora_a)
    bias = ctx.value_of(a.bias) if isinstance(a.bias, fx.Node) else None
    if weight is None or lora_a is None or (isinstance(a.bias, fx.Node) and bias is None):
        return False
    return runs_in_gemm(meta_value(lin.x), [weight.t() if lin.weight_transposed else weight], [bias], [lora_a])


def _shared_input_groups(graph: fx.Graph, lins: List[LinearMatch]) -> List[List[LinearMatch]]:
    """Linears of one input (and one LoRA input), in graph order. A group's call goes before its
    first member's output, so a member joins only when everything it reads is defined by then."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups: Dict[tuple, List[LinearMatch]] = {}
    for lin in sorted(lins, key=lambda m: order[m.out]):
        key = (lin.x, lin.dropped_lora_input, getattr(meta_value(lin.adapted.lora_a), "dtype", None))
        group = groups.get(key)
        if group is not None and all(order[n] < order[group[0].out] for n in _reads(lin)):
            group.append(lin)
        else:
            groups[key if group is None else (*key, lin.out)] = [lin]
    return sorted(groups.values(), key=lambda g: order[g[0].out])


def _reads(lin: LinearMatch) -> List[fx.Node]:
    a = lin.adapted
    return [n for n in (a.weight, a.bias, a.lora_a, a.lora_b) if isinstance(n, fx.Node)]


def _weight(graph: fx.Graph, lin: LinearMatch) -> fx.Node:
    a = lin.adapted
    return graph.call_method("t", (a.weight,)) if lin.weight_transposed else a.weight


def _replace_output(graph: fx.Graph, lin: LinearMatch, y: fx.Node) -> None:
    out_dtype = meta_value(lin.out).dtype
    if out_dtype != meta_value(lin.x).dtype:
        y = graph.call_function(torch.ops.aten._to_copy.default, (y,), {"dtype": out_dtype})
    replace_uses(lin.out, y)


def _rewrite(graph: fx.Graph, lin: LinearMatch, in_gemm: bool) -> None:
    a = lin.adapted
    with graph.inserting_before(lin.out):
        y = graph.call_function(lora_linear, (lin.x, _weight(graph, lin), a.bias, lin.dropped_lora_input,
                                              a.lora_a, a.lora_b, a.lora_scale, in_gemm))
        _replace_output(graph, lin, y)


def _rewrite_group(graph: fx.Graph, group: List[LinearMatch], in_gemm: bool) -> None:
    first = group[0]
    with graph.inserting_before(first.out):
        ys = graph.call_function(lora_linears, (
            first.x, [_weight(graph, lin) for lin in group], [lin.adapted.bias for lin in group],
            first.dropped_lora_input, [lin.adapted.lora_a for lin in group],
            [lin.adapted.lora_b for lin in group], [lin.adapted.lora_scale for lin in group], in_gemm))
        for i, lin in enumerate(group):
            _replace_output(graph, lin, graph.call_function(operator.getitem, (ys, i)))
