"""Rewrite each matched MLP into ``predict_neurons`` + ``lecompile::sparse_mlp``."""

from __future__ import annotations

import math
import operator
import re
from collections import deque
from typing import Optional, Tuple

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from ..ops import sparse_mlp  # noqa: F401  (registers torch.ops.lecompile.sparse_mlp)
from ..ops.adapted_linear import SLOTS, AdaptedLinear, pack_mlp
from ..predictors.op import predict_neurons
from .fold_adapters import LinearMatch
from .graph import meta_value, recompile, static_shape
from .match_mlp import MLPMatch

MAX_WALK = 32


def kept_neurons(density: float, ffn: int, align: int) -> int:
    """``k = round_up(density * ffn, align)``, capped at ``ffn``."""
    return min(ffn, math.ceil(density * ffn / align) * align)


def rewrite_mlp(ctx) -> None:
    """Replace every MLP in ``ctx.mlps`` and record each decision in the report."""
    cfg = ctx.config
    for mlp in ctx.mlps:
        layer = layer_index(mlp.name)
        density = cfg.mlp_density_of(layer)
        k = kept_neurons(density, mlp.ffn, cfg.k_align)
        group_size, granularity, note = _group_size(mlp.fc1.x, cfg)
        if cfg.mlp_layer_densities and layer is None:
            note = _join(note, "layer index not in the module path: mlp_density used")
        entry = ctx.report_mlp(mlp, k, granularity, note)
        if ctx.dense_warmup:
            entry.note = _join(entry.note, f"dense warm-up graph (warmup_steps={cfg.warmup_steps})")
            continue
        if k == mlp.ffn:
            why = "density 1.0" if density == 1.0 else (
                f"k rounded up to a multiple of {cfg.k_align} covers all {mlp.ffn} neurons")
            entry.note = _join(entry.note, f"{why}: left dense to Inductor")
            continue
        if not ctx.training:
            entry.note = _join(entry.note, "inference graph (nothing requires grad): left dense")
            continue
        if not cfg.rewrite_mlp:
            entry.note = _join(entry.note, "rewrite_mlp=False: left dense")
            continue
        _rewrite(ctx.gm.graph, mlp, k, group_size, cfg)
        for lin in (mlp.fc1, mlp.up, mlp.fc2):
            if lin is not None:
                lin.consumed = True
        entry.rewritten = True
        counters["lecompile"]["sparse_mlp"] += 1
    if ctx.mlps:
        recompile(ctx.gm)


def layer_index(name: str) -> Optional[int]:
    """The decoder layer of a module path: its first number (``model.layers.3.mlp`` -> 3)."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def _group_size(x: fx.Node, cfg) -> Tuple[int, str, str]:
    """Tokens per neuron set, the granularity actually used, and a note when it differs."""
    x_shape = static_shape(x)
    tokens = math.prod(x_shape[:-1])
    seq = _sequence_length(x, tokens)
    if cfg.granularity == "batch":
        return tokens, "batch", ""
    if seq is None:
        return tokens, "batch", "sequence length not found in the graph: one neuron set per batch"
    if cfg.granularity == "tile":
        if seq % cfg.tile_size == 0:
            return cfg.tile_size, "tile", ""
        return seq, "sequence", (f"sequence length {seq} is not a multiple of tile_size="
                                 f"{cfg.tile_size}: per-sequence neuron sets")
    return seq, "sequence", ""


def _sequence_length(x: fx.Node, tokens: int) -> Optional[int]:
    """Tokens per sequence: dim 1 of ``x`` if it is ``[B, S, d]``, else of the nearest
    ``[B, S, d]`` tensor it was flattened from (OPT runs its MLP on ``[B * S, d]``)."""
    seen, queue = {x}, deque([x])
    while queue and len(seen) < MAX_WALK:
        node = queue.popleft()
        s = static_shape(node)
        if s is not None and len(s) == 3 and s[0] * s[1] == tokens:
            return s[1]
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                queue.append(arg)
    return None


def _rewrite(graph: fx.Graph, mlp: MLPMatch, k: int, group_size: int, cfg) -> None:
    out = mlp.fc2.out
    with graph.inserting_before(out):
        dtype = meta_value(mlp.fc1.x).dtype if cfg.fuse_adapters else None
        fc1 = _operand(graph, mlp.fc1, dtype)
        up = _operand(graph, mlp.up, dtype) if mlp.up else None
        fc2 = _operand(graph, mlp.fc2, dtype)
        fc2.lora_input = None  # fc2's LoRA reads the compact intermediate inside the op
        params, slots, scales = pack_mlp(fc1, up, fc2)
        x = mlp.fc1.x
        n = sum(s < 2 * len(SLOTS) for s in slots)  # the predictor reads fc1 and up only
        idx = graph.call_function(predict_neurons, (
            x, params[:n], slots[:n], scales, mlp.activation, cfg.predictor, k, group_size,
            cfg.svd_rank, [cfg.learned_train_steps, cfg.learned_refresh]))
        result = graph.call_function(torch.ops.lecompile.sparse_mlp.default, (
            x, idx, params, slots, scales, mlp.activation, mlp.fc2.lora_dropout))
        y = graph.call_function(operator.getitem, (result, 0))
    out.replace_all_uses_with(y)


def _operand(graph: fx.Graph, lin: LinearMatch, adapter_dtype: Optional[torch.dtype]) -> AdaptedLinear:
    """The op's view of a matched linear: weight as ``[out, in]``, nodes as arguments.

    With ``adapter_dtype`` (``fuse_adapters``), LoRA's weights are cast to it in the graph (the
    cast's backward hands fp32 gradients to the fp32 weights), and LoRA reads the layer input
    itself unless dropout makes a separate one.
    """
    a = lin.adapted
    weight = graph.call_method("t", (a.weight,)) if lin.weight_transposed else a.weight
    lora_input, lora_a, lora_b = a.lora_input, a.lora_a, a.lora_b
    if adapter_dtype is not None and lora_a is not None:
        lora_a = graph.call_method("to", (lora_a, adapter_dtype))
        lora_b = graph.call_method("to", (lora_b, adapter_dtype))
        lora_input = lin.dropped_lora_input
    return AdaptedLinear(weight, a.bias, lora_input, lora_a, lora_b, a.in_scale, a.out_scale,
                         a.lora_scale)


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b
