"""Rewrite each matched MLP into ``predict_neurons`` + ``lecompile::sparse_mlp``."""

from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
from torch._dynamo.utils import counters, dynamo_timed

from ..ops import sparse_mlp  # noqa: F401  (registers torch.ops.lecompile.sparse_mlp)
from ..ops.adapted_linear import SLOTS, AdaptedLinear, pack_mlp
from ..ops.sparse_mlp import kernel_impl
from ..ops.token_groups import all_neurons, dense_first_order, dense_group_count, merge_groups, split_groups
from ..predictors.op import observe_mlp, predict_neurons, prepare_predictor
from .fold_adapters import LinearMatch
from .graph import devices, layer_index, meta_value, recompile, replace_uses, static_shape
from .labels import output_token_mask
from .match_mlp import MLPMatch

MAX_WALK = 32


def kept_neurons(density: float, ffn: int, align: int) -> int:
    """``k = round_up(density * ffn, align)``, capped at ``ffn``."""
    return min(ffn, math.ceil(density * ffn / align) * align)


@dataclass
class ContextSplit:
    """Context-only sparsity in one graph: the output-token mask, and which token groups of an
    MLP run dense (``dense_output_share`` of them, groups holding output tokens first)."""

    mask: Optional[fx.Node]
    tokens: int
    why_not: str
    share: float
    orders: Dict[int, Tuple[fx.Node, fx.Node]] = field(default_factory=dict)

    @classmethod
    def find(cls, graph: fx.Graph, share: float) -> "ContextSplit":
        return cls(*output_token_mask(graph), share=share) if share > 0 else cls(None, 0, "", 0.0)

    def dense_groups(self, tokens: int, group: int) -> Tuple[int, str]:
        """How many of the MLP's ``tokens / group`` groups run dense, and the report's note."""
        if self.share == 0:
            return 0, ""
        off = "context-only sparsity off: "
        if self.mask is None:
            return 0, off + self.why_not
        if tokens != self.tokens:
            return 0, off + f"the loss reads {self.tokens} tokens, the MLP {tokens}"
        n = tokens // group
        dense = dense_group_count(self.share, n)
        if dense == 0:
            return 0, off + f"dense_output_share={self.share} of {n} token group(s) leaves none dense"
        return dense, f"context-only: {dense} of {n} token groups dense, output tokens first"

    def order(self, graph: fx.Graph, group: int) -> Tuple[fx.Node, fx.Node]:
        """Nodes ``(order, inverse)`` of the groups of ``group`` tokens (one pair per size)."""
        if group not in self.orders:
            with graph.inserting_after(self.mask):
                pair = graph.call_function(dense_first_order, (self.mask, group))
            with graph.inserting_after(pair):
                order = graph.call_function(operator.getitem, (pair, 0))
            with graph.inserting_after(order):
                inverse = graph.call_function(operator.getitem, (pair, 1))
            self.orders[group] = (order, inverse)
        return self.orders[group]


def rewrite_mlp(ctx) -> None:
    """Replace every MLP in ``ctx.mlps`` and record each decision in the report."""
    cfg = ctx.config
    sparse_graph = ctx.mlps and ctx.training and not ctx.dense_warmup and cfg.enabled("rewrite_mlp")
    split = ContextSplit.find(ctx.gm.graph, cfg.dense_output_share if sparse_graph else 0.0)
    for mlp in ctx.mlps:
        layer = layer_index(mlp.name)
        density = cfg.mlp_density_of(layer)
        k = kept_neurons(density, mlp.ffn, cfg.tuning.k_align)
        group_size, granularity, note = _group_size(mlp.fc1.x, cfg)
        if cfg.mlp_layer_densities and layer is None:
            note = _join(note, "layer index not in the module path: mlp_density used")
        entry = ctx.report_mlp(mlp, k, granularity, note)
        why_dense = _why_dense(ctx, mlp, density, k)
        if ctx.dense_warmup:
            entry.note = _join(entry.note, f"dense warm-up graph ({cfg.dense_warmup_steps} steps)"
                               if cfg.dense_warmup_steps else "dense calibration graph")
            if not why_dense and (cfg.predictor == "learned" or ctx.guard >= 0):
                _observe(ctx.gm.graph, mlp, cfg, group_size, layer, density, ctx.guard)
                users = [name for name, on in (("learned predictor", cfg.predictor == "learned"),
                                               ("density guard", ctx.guard >= 0)) if on]
                entry.note = _join(entry.note, f"calibration: records the MLP input ({' and '.join(users)})")
            continue
        if why_dense:
            entry.note = _join(entry.note, why_dense)
            continue
        tokens = math.prod(static_shape(mlp.fc1.x)[:-1])
        dense_groups, split_note = split.dense_groups(tokens, group_size)
        entry.note = _join(entry.note, split_note)
        if kernel_impl is not None and kernel_impl.uses_compact_copies(group_size):
            entry.note = _join(entry.note, f"{group_size}-token groups: on CUDA the GEMMs run on cuBLAS over "
                                           "compact copies of the kept rows")
        groups = (*split.order(ctx.gm.graph, group_size), dense_groups) if dense_groups else None
        _rewrite(ctx.gm.graph, mlp, k, group_size, cfg, groups)
        _fill_weight_caches(ctx, mlp)
        for lin in (mlp.fc1, mlp.up, mlp.fc2):
            if lin is not None:
                lin.consumed = True
                if lin.fused is not None:
                    lin.fused.consumed = True
        entry.rewritten = True
        counters["lecompile"]["sparse_mlp"] += 1
    if ctx.mlps:
        recompile(ctx.gm)


def _why_dense(ctx, mlp: MLPMatch, density: float, k: int) -> str:
    """Why this MLP stays dense in a sparse graph, or ``""``."""
    cfg = ctx.config
    if k == mlp.ffn:
        why = "density 1.0" if density == 1.0 else (
            f"k rounded up to a multiple of {cfg.tuning.k_align} covers all {mlp.ffn} neurons")
        return f"{why}: left dense to Inductor"
    if not ctx.training:
        return f"{ctx.not_training}: left dense"
    if not cfg.enabled("rewrite_mlp"):
        return "disabled (disable={'rewrite_mlp'}): left dense"
    on = devices(node for lin in (mlp.fc1, mlp.up, mlp.fc2) if lin is not None
                 for node in (lin.x, *vars(lin.adapted).values()))
    if len(on) > 1:
        return (f"input and weights on different devices ({', '.join(sorted(on))}): left dense; place each "
                "block's weights on one device")
    return ""


def _fill_weight_caches(ctx, mlp: MLPMatch) -> None:
    """Compute what the sparse MLP caches per frozen weight at compile time (the predictor's
    factors start on the background thread, and the backend waits for them once Inductor is
    done; the neuron-major copies now): a graph compiled after a dense warm-up may be captured as
    a CUDA graph at its first call, where such work cannot run (an SVD there fails)."""
    def value(lin):
        w = ctx.value_of(lin.adapted.weight) if lin is not None else None
        return w.t() if w is not None and lin.weight_transposed else w

    fc1, up, fc2 = value(mlp.fc1), value(mlp.up), value(mlp.fc2)
    if fc1 is None or fc2 is None or (mlp.up is not None and up is None):
        return
    with dynamo_timed("lecompile_weight_caches"):
        prepare_predictor(ctx.config.predictor, [w for w in (fc1, up) if w is not None], ctx.config.tuning.svd_rank)
        if kernel_impl is not None and fc2.is_cuda:
            kernel_impl.prepare(fc1, up, fc2)


def _observe(graph: fx.Graph, mlp: MLPMatch, cfg, group_size: int, layer: Optional[int], density: float,
             guard: int) -> None:
    """Route the MLP's output through ``observe_mlp``, which records the MLP's input (a
    calibration step of the learned predictor, the density guard's measurement)."""
    y = mlp.fc2.out
    with graph.inserting_before(y.next):
        dtype = meta_value(mlp.fc1.x).dtype if cfg.enabled("fuse_lora") else None
        fc1 = _operand(graph, mlp.fc1, dtype)
        up = _operand(graph, mlp.up, dtype) if mlp.up else None
        params, slots, scales = pack_mlp(fc1, up, None)
        seen = graph.call_function(observe_mlp, (
            y, mlp.fc1.x, params, slots, scales, mlp.activation, cfg.predictor, cfg.tuning.svd_rank,
            cfg.tuning.learned_train_steps, group_size, -1 if layer is None else layer, density, guard))
    replace_uses(y, seen, delete_user_cb=lambda user: user is not seen)
    counters["lecompile"]["observed_mlp"] += 1


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
        if seq % cfg.tuning.tile_size == 0:
            return cfg.tuning.tile_size, "tile", ""
        return seq, "sequence", (f"sequence length {seq} is not a multiple of tile_size="
                                 f"{cfg.tuning.tile_size}: per-sequence neuron sets")
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


def _rewrite(graph: fx.Graph, mlp: MLPMatch, k: int, group_size: int, cfg,
             groups: Optional[Tuple[fx.Node, fx.Node, int]]) -> None:
    """``groups = (order, inverse, dense)``: the first ``dense`` token groups of ``order`` run
    dense, the rest sparse (context-only sparsity); ``None``: every group sparse."""
    out = mlp.fc2.out
    with graph.inserting_before(out):
        dtype = meta_value(mlp.fc1.x).dtype if cfg.enabled("fuse_lora") else None
        fc1 = _operand(graph, mlp.fc1, dtype)
        up = _operand(graph, mlp.up, dtype) if mlp.up else None
        fc2 = _operand(graph, mlp.fc2, dtype)
        fc2.lora_input = None  # fc2's LoRA reads the compact intermediate inside the op
        params, slots, scales = pack_mlp(fc1, up, fc2)
        x = mlp.fc1.x

        def call_op(x, params, idx=None):  # idx None: the predictor's
            if idx is None:
                n = sum(s < 2 * len(SLOTS) for s in slots)  # the predictor reads fc1 and up only
                idx = graph.call_function(predict_neurons, (
                    x, params[:n], slots[:n], scales, mlp.activation, cfg.predictor, k, group_size,
                    cfg.tuning.svd_rank))
            result = graph.call_function(torch.ops.lecompile.sparse_mlp.default, (
                x, idx, params, slots, scales, mlp.activation, mlp.fc2.lora_dropout))
            return graph.call_function(operator.getitem, (result, 0))

        if groups is None:
            y = call_op(x, params)
        else:
            order, inverse, dense = groups

            def parts(t):  # token-aligned tensor -> (dense groups' rows, sparse groups' rows)
                pair = graph.call_function(split_groups, (t, order, group_size, dense))
                return tuple(graph.call_function(operator.getitem, (pair, i)) for i in (0, 1))

            x_dense, x_sparse = parts(x)
            p_dense, p_sparse = list(params), list(params)
            for i, s in enumerate(slots):
                if SLOTS[s % len(SLOTS)] == "lora_input":
                    p_dense[i], p_sparse[i] = parts(params[i])
            y_dense = call_op(x_dense, p_dense, graph.call_function(all_neurons, (x, mlp.ffn)))
            y_sparse = call_op(x_sparse, p_sparse)
            y = graph.call_function(merge_groups, (y_dense, y_sparse, inverse, group_size, static_shape(x)))
    replace_uses(out, y)


def _operand(graph: fx.Graph, lin: LinearMatch, adapter_dtype: Optional[torch.dtype]) -> AdaptedLinear:
    """The op's view of a matched linear: weight as ``[out, in]``, nodes as arguments.

    With ``adapter_dtype`` (the ``fuse_lora`` pass on), LoRA's weights are cast to it in the graph (the
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
