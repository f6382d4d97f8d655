"""LoRA on MoE experts applied to the activations, never as a weight update.

PEFT adapts stacked expert weights ``W`` (``[experts, out, in]`` or ``[experts, in, out]``) by
adding ``ΔW = scale * B·A`` for every expert at every forward (traced by
:mod:`lecompile.peft_parameters`), and transformers multiplies the tokens, sorted by expert, with
``grouped_mm(x, W + ΔW, offsets)``. That forms an update as large as all the experts' weights, keeps
it for the backward, and makes the backward compute a gradient for the whole frozen stack only to
reduce it to the adapters'. Each such product becomes::

    grouped_mm(x, W, offsets) + scale * grouped_mm(grouped_mm(x, L, offsets), R, offsets)

with ``L·R`` the update in the product's orientation (``[experts, in, r]`` and ``[experts, r, out]``):
the same sum, with the adapters' products on the tokens each expert receives.
"""

from __future__ import annotations

import operator
from typing import Dict, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from ..ops import experts_first  # noqa: F401  (defines torch.ops.lecompile.experts_first)
from ..report import LinearEntry
from .graph import (
    grouped_mm_ops,
    is_call,
    is_cast,
    is_method,
    meta_value,
    mutates,
    recompile,
    replace_uses,
    source_name,
)

#: PEFT's ``ParamWrapper.get_delta_weight`` for stacked experts, by the layout of ``W`` it yields.
EQUATIONS = {"o r e, e r i -> e o i": "out_in", "o r e, e r i -> e i o": "in_out"}
NOTE = "MoE experts: the adapter's products run on each expert's tokens; the update B·A is never formed"


def lora_experts(ctx) -> None:
    """Rewrite each ``grouped_mm`` whose weight is a stacked expert weight plus its LoRA update."""
    graph, rewritten, products = ctx.gm.graph, 0, grouped_mm_ops()
    order = {n: i for i, n in enumerate(graph.nodes)}
    scalings = []  # PEFT's in-place scalings of updates no longer read
    for node in list(graph.nodes):
        if not (is_call(node, products) and len(node.args) >= 2):
            continue
        update = _update(node.args[1], order)
        if update is None:
            continue
        base, a, b, scale, layout, transposed, scaling = update
        x = node.args[0]
        why = _why_not(x)
        ctx.report.linears.append(LinearEntry(source_name(base), ["lora"], fused=not why, note=why or NOTE))
        if why:
            continue
        with graph.inserting_before(node):
            weight = _replay(graph, node.args[1], base)
            # Per expert, in the product's orientation, the update is lhs @ rhs (times scale); each
            # operand has a unit stride in one of its last two dimensions, as grouped GEMMs need.
            stacked_b = graph.call_function(torch.ops.lecompile.experts_first.default, (b,))  # [e, r, out]
            if (layout == "out_in") != transposed:
                lhs, rhs = graph.call_method("transpose", (stacked_b, -2, -1)), a  # [e, out, r], [e, r, in]
            else:
                lhs, rhs = graph.call_method("transpose", (a, -2, -1)), stacked_b  # [e, in, r], [e, r, out]
            value = meta_value(x)
            lhs, rhs = (graph.call_method("to", (t, value.dtype)) for t in (lhs, rhs))
            pad = _rank_padding(meta_value(a).shape[1], value.element_size())
            if pad:  # zero columns of lhs meet zero rows of rhs: the same product, aligned as grouped GEMMs need
                lhs = graph.call_function(F.pad, (lhs, (0, pad)))
                rhs = graph.call_function(F.pad, (rhs, (0, 0, 0, pad)))
            kwargs = dict(node.kwargs)
            offsets = node.args[2:]
            base_out = graph.call_function(node.target, (x, weight, *offsets), kwargs)
            down = graph.call_function(node.target, (x, lhs, *offsets), kwargs)
            up = graph.call_function(node.target, (down, rhs, *offsets), kwargs)
            out = graph.call_function(operator.add, (base_out, graph.call_function(operator.mul, (up, scale))))
        replace_uses(node, out)
        graph.erase_node(node)
        scalings.append(scaling)
        rewritten += 1
    if rewritten:
        counters["lecompile"]["lora_experts"] += rewritten
        graph.eliminate_dead_code(is_impure_node=mutates)  # the sums W + ΔW, now unread
        for scaling in scalings:  # in place, kept by the elimination: the update is formed only for them
            if scaling is not None and set(scaling.args[0].users) == {scaling} and not scaling.users:
                graph.erase_node(scaling)
        recompile(ctx.gm)


def _update(weight: fx.Node, order: Dict[fx.Node, int]) -> Optional[tuple]:
    """``(W, A, B, scale, layout, transposed, scaling)`` when ``weight`` is ``W + scale * einsum(B, A)``
    (casts around the update, a transpose of the sum; ``scaling``: the ``mul_`` node where the
    update is scaled in place, as PEFT 0.22 does, before the sum reads it, else ``None``); else
    ``None``. ``order``: each node's place in the graph."""
    transposed = False
    node = weight
    while isinstance(node, fx.Node) and (is_cast(node) or is_method(node, ("transpose",))):
        if is_method(node, ("transpose",)):
            if sorted(node.args[1:3]) not in ([-2, -1], [1, 2]) or transposed:
                return None
            transposed = True
        node = node.args[0]
    if not (isinstance(node, fx.Node) and is_call(node, (operator.add,)) and len(node.args) == 2):
        return None
    base, delta = node.args
    if not (isinstance(base, fx.Node) and base.op in ("placeholder", "get_attr") and isinstance(delta, fx.Node)):
        return None
    while is_cast(delta):
        delta = delta.args[0]
    scaling = None
    if is_call(delta, (operator.mul,)) and isinstance(delta.args[1], (int, float)):
        product, scale = delta.args
    else:
        product, scaling = delta, _scaled_in_place(delta, order)
        if scaling is None:
            return None
        scale = scaling.args[1]
    if not (isinstance(product, fx.Node) and is_call(product, (torch.functional.einsum, torch.einsum))
            and product.args[0] in EQUATIONS and len(product.args) == 3):
        return None
    b, a = product.args[1:]
    if any(meta_value(t) is None or meta_value(t).dim() != 3 for t in (a, b, base)):
        return None
    return base, a, b, float(scale), EQUATIONS[product.args[0]], transposed, scaling


def _scaled_in_place(product: fx.Node, order: Dict[fx.Node, int]) -> Optional[fx.Node]:
    """The one ``product.mul_(number)`` node, placed before every other reader of ``product``; else ``None``."""
    scalings = [u for u in product.users if is_method(u, ("mul_",))]
    if len(scalings) != 1:
        return None
    scaling = scalings[0]
    if (len(scaling.args) != 2 or scaling.kwargs or scaling.args[0] is not product
            or not isinstance(scaling.args[1], (int, float))):
        return None
    if any(order.get(u, -1) < order.get(scaling, len(order)) for u in product.users if u is not scaling):
        return None
    return scaling


def _replay(graph: fx.Graph, weight: fx.Node, base: fx.Node) -> fx.Node:
    """The chain of casts and transposes from the sum to ``weight``, applied to ``W`` instead."""
    chain = []
    node = weight
    while not is_call(node, (operator.add,)):
        chain.append(node)
        node = node.args[0]
    out = base
    for step in reversed(chain):
        out = graph.call_method(step.target, (out, *step.args[1:]), dict(step.kwargs))
    return out


def _rank_padding(rank: int, itemsize: int) -> int:
    """Zero ranks to add so a row of ``rank`` elements is a multiple of 16 bytes (PyTorch's
    grouped GEMMs require it of both operands' strides)."""
    per_row = 16 // itemsize if 16 % itemsize == 0 else 1
    return -rank % per_row


def _why_not(x: fx.Node) -> str:
    """Why the products cannot run on the tokens ("" when they can)."""
    value = meta_value(x) if isinstance(x, fx.Node) else None
    if value is None or value.dim() != 2:
        return "MoE experts: the tokens are not one [tokens, features] matrix; B·A is formed as PEFT forms it"
    return ""
