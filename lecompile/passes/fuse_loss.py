"""Rewrite a causal-LM loss on a frozen LM head into ``lecompile::lm_head_cross_entropy``.

The pattern is Hugging Face's ``ForCausalLMLoss``: ``logits = linear(hidden, W[, b])``, then only
``contiguous`` / ``float`` / ``to(float32)`` / ``view`` / ``reshape`` down to ``[N, vocab]``, then
``cross_entropy(logits, target, ignore_index=..., reduction="mean" | "sum")``. The logits stay in
the graph (the model returns them); the loss reads them detached and returns the gradient of
``hidden`` itself, so nothing of size ``[N, vocab]`` is kept for the backward.

The graph returns the logits detached too, with the LM head's input and weight as extra outputs;
:func:`with_returned_logits` wraps the compiled graph to drop those again and give the logits
their gradient in a node of their own (:func:`lecompile.ops.lm_head_loss.returned_logits`), so
the backward gets no ``[N, vocab]`` of zeros for logits that nothing differentiates.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Callable, List, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from ..ops.lm_head_loss import REDUCTIONS, returned_logits
from ..report import LossEntry
from .graph import LINEAR, is_call, linear_args, meta_value, recompile, replace_uses

_SAME_DTYPE_VIEWS = ("contiguous", "view", "reshape")
_VIEWS = _SAME_DTYPE_VIEWS + ("float",)
#: ``gm.meta`` key: ``(logits, hidden, weight)`` output positions for :func:`with_returned_logits`.
RETURNED_LOGITS = "lecompile_returned_logits"
_CE_SIGNATURE = inspect.signature(F.cross_entropy)


def fuse_loss(ctx) -> None:
    """Rewrite every matching cross-entropy and record each one in the report."""
    graph = ctx.gm.graph
    changed = False
    for ce in [n for n in graph.nodes if is_call(n, (F.cross_entropy,))]:
        match = _match(ce, ctx)
        if isinstance(match, str):
            ctx.report.losses.append(LossEntry(ce.name, False, match))
            continue
        _rewrite(graph, ce, *match)
        _return_logits_detached(ctx.gm, match[0])
        ctx.report.losses.append(LossEntry(ce.name, True))
        counters["lecompile"]["lm_head_loss"] += 1
        changed = True
    if changed:
        recompile(ctx.gm)


def _is_fp32_cast(node: fx.Node) -> bool:
    args = list(node.args[1:]) + list(node.kwargs.values())
    return node.op == "call_method" and node.target == "to" and args == [torch.float32]


def _match(ce: fx.Node, ctx) -> Union[str, Tuple[fx.Node, fx.Node, fx.Node, int, str]]:
    """``(linear, logits view, target, ignore_index, reduction)``, or why not."""
    if not ctx.config.enabled("fuse_loss"):
        return "disabled (disable={'fuse_loss'}): left to Inductor"
    if not ctx.training:
        return f"{ctx.not_training}: left to Inductor"
    try:
        bound = _CE_SIGNATURE.bind(*ce.args, **ce.kwargs).arguments
    except TypeError:
        return "cross_entropy called with arguments it does not take"
    extra = {k: v for k, v in bound.items() if k not in ("input", "target", "ignore_index", "reduction")
             and v != _CE_SIGNATURE.parameters[k].default}
    if extra:
        return f"cross_entropy with {sorted(extra)}: left to Inductor"
    ignore_index = bound.get("ignore_index", -100)
    reduction = bound.get("reduction", "mean")
    if not isinstance(ignore_index, int) or reduction not in REDUCTIONS:
        return f"cross_entropy with ignore_index={ignore_index!r}, reduction={reduction!r}: left to Inductor"
    node = bound["input"]
    while isinstance(node, fx.Node) and (node.op == "call_method" and node.target in _VIEWS or _is_fp32_cast(node)):
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "placeholder":
        return ("the loss's input is a graph input: a graph break separates it from the LM head (GPT-2: "
                "transformers' loss_type warning; set model.loss_type = 'ForCausalLM', see docs/troubleshooting.md)")
    if not isinstance(node, fx.Node) or not is_call(node, LINEAR):
        return "the loss's input is not a linear layer's output (reshaped or cast to fp32 only)"
    hidden, weight, bias = linear_args(node)
    logits, scores, w = meta_value(node), meta_value(bound["input"]), meta_value(weight)
    target = meta_value(bound["target"])
    if any(v is None for v in (logits, scores, w, target)):
        return "no example values for the LM head: left to Inductor"
    if w.requires_grad or (bias is not None and getattr(meta_value(bias), "requires_grad", True)):
        return "the LM head trains (its weight or bias requires grad): left to Inductor"
    if scores.dim() != 2 or scores.shape[1] != logits.shape[-1] or scores.numel() != logits.numel():
        return f"the loss reads logits {tuple(scores.shape)}, not [tokens, vocab]: left to Inductor"
    if target.shape != (scores.shape[0],) or target.dtype.is_floating_point:
        return "the loss's target is not one class index per token: left to Inductor"
    if math.prod(logits.shape[:-1]) * w.shape[1] != meta_value(hidden).numel():
        return "the LM head's input is not [tokens, hidden]: left to Inductor"
    return node, bound["input"], bound["target"], ignore_index, reduction


def _rewrite(graph: fx.Graph, ce: fx.Node, linear: fx.Node, scores: fx.Node, target: fx.Node,
             ignore_index: int, reduction: str) -> None:
    hidden, weight, _ = linear_args(linear)
    vocab, width = meta_value(linear).shape[-1], meta_value(weight).shape[1]
    with graph.inserting_before(ce):
        # Functions, not methods, on nodes the passes made: AOTAutograd's cache reads them.
        logits = graph.call_function(torch.reshape, (graph.call_function(torch.detach, (linear,)), (-1, vocab)))
        rows = graph.call_function(torch.reshape, (hidden, (-1, width)))
        pair = graph.call_function(torch.ops.lecompile.lm_head_cross_entropy.default,
                                   (logits, rows, weight, target, ignore_index, reduction))
        loss = graph.call_function(operator.getitem, (pair, 0))
    replace_uses(ce, loss)
    graph.erase_node(ce)
    node = scores  # the fp32 copy and views of the logits, now unused
    while node is not linear and not node.users:
        parent = node.args[0]
        graph.erase_node(node)
        node = parent


def _return_logits_detached(gm: fx.GraphModule, linear: fx.Node) -> None:
    """Return the graph's outputs that are ``linear``'s logits (or views of them) detached, plus
    the LM head's input and weight, and note their positions in ``gm.meta``."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if not isinstance(output.args[0], (tuple, list)):
        return
    outs = list(output.args[0])
    hidden, weight, _ = linear_args(linear)
    logit_outputs = [i for i, node in enumerate(outs) if _views_of(node, linear)]
    if not logit_outputs:
        return
    with gm.graph.inserting_before(output):
        for i in logit_outputs:
            outs[i] = gm.graph.call_function(torch.detach, (outs[i],))
    plan = gm.meta.setdefault(RETURNED_LOGITS, [])
    plan += [(i, len(outs), len(outs) + 1) for i in logit_outputs]
    output.args = (type(output.args[0])(outs + [hidden, weight]),)


def _views_of(node, linear: fx.Node) -> bool:
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _SAME_DTYPE_VIEWS:
        node = node.args[0]
    return node is linear


def with_returned_logits(compiled: Callable, gm: fx.GraphModule) -> Callable:
    """``compiled`` (the graph ``gm`` after :func:`fuse_loss`, compiled) returning the outputs of
    the graph before the pass: the logits differentiable again, the extra outputs dropped."""
    plan = gm.meta.get(RETURNED_LOGITS)
    if not plan:
        return compiled
    extra = 2 * len({(h, w) for _, h, w in plan})

    def restore(outs) -> List:
        outs = list(outs)
        for logits, hidden, weight in plan:
            outs[logits] = returned_logits(outs[logits], outs[hidden], outs[weight])
        return outs[:-extra]

    return lambda *args: restore(compiled(*args))
