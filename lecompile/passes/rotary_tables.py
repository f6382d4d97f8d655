"""Rotary embeddings' cos and sin tables computed once per graph, not in every kernel that reads them.

Hugging Face models compute ``cos`` and ``sin`` of the rotary angles once per forward (``[batch,
seq, head_dim]``) and hand them to every decoder layer. Inductor inlines such cheap-looking
pointwise producers into their consumers, so each layer's rotary kernels, forward and backward,
evaluate ``cos`` and ``sin`` again for every element of ``q`` and ``k``: once per head, in
precise fp32 math, which makes those memory-bound kernels compute-bound. This pass ends each
``cos``/``sin`` (with the scalar scaling and casts that follow it, up to a cast to a narrower
dtype) in ``prims.inductor_force_stride_order``, which makes Inductor write the table to memory
once; the rotary kernels then only read it. Values are unchanged: the op is the identity on a
tensor of those strides, and the table keeps its widest dtype, so a cast to bf16 after it still
fuses into the rotary kernels, which (as without this pass) compute with the fp32 value; the
backward recomputes such a cast rather than keep its rounded output.
"""

from __future__ import annotations

import numbers

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
import torch.fx as fx
from torch._dynamo.utils import counters
from torch.utils.checkpoint import CheckpointPolicy

from .graph import CASTS, is_call, is_method, meta_value, only_user, recompile, replace_uses

_TRIG_FUNCTIONS = (torch.cos, torch.sin)
_TRIG_METHODS = ("cos", "sin")
_SCALINGS = ("mul", "div", "__mul__", "__truediv__")
#: Inductor realizes its input in these strides (no copy when they are the input's own).
REALIZE = torch.ops.prims.inductor_force_stride_order.default
NOTE = "rotary_tables: {n} cos/sin table(s) computed once per step, not in each rotary kernel that reads them"


def rotary_tables(ctx) -> None:
    """Make Inductor compute every qualifying ``cos``/``sin`` table once (see the module docstring)."""
    if not ctx.training:
        return
    graph = ctx.gm.graph
    ends = dict.fromkeys(_table_end(node) for node in graph.nodes  # graph order: the same code every time
                         if is_call(node, _TRIG_FUNCTIONS) or is_method(node, _TRIG_METHODS))
    ends = [end for end in ends if _qualifies(end)]
    for end in ends:
        value = meta_value(end)
        with graph.inserting_after(end):
            table = graph.call_function(REALIZE, (end, list(value.stride())))
        replace_uses(end, table, delete_user_cb=lambda user: user is not table)
        for cast in (user for user in table.users if is_method(user, CASTS)):
            # Saved for the backward, a cast to bf16 would hand its rotary kernels rounded tables.
            cast.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        counters["lecompile"]["rotary_tables"] += 1
    if ends:
        recompile(ctx.gm)
        ctx.report.notes.append(NOTE.format(n=len(ends)))


def _table_end(node: fx.Node) -> fx.Node:
    """``node`` followed through the single-use scalar scalings and casts after it, up to the last
    step in its widest dtype."""
    chain = [node]
    while (user := only_user(chain[-1])) is not None and _rescales(user, chain[-1]):
        chain.append(user)
    widths = [_width(n) for n in chain]
    return chain[max(i for i, w in enumerate(widths) if w == max(widths))]


def _width(node: fx.Node) -> int:
    value = meta_value(node)
    return value.element_size() if value is not None else 0


def _rescales(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` only casts ``node`` or scales it by a number (no other tensor)."""
    others = [a for a in (*user.args, *user.kwargs.values()) if a is not node]
    if any(isinstance(a, fx.Node) for a in others):
        return False
    if is_method(user, CASTS):
        return True
    scales = is_method(user, _SCALINGS) or (user.op == "call_function" and getattr(user.target, "__name__", "")
                                            in ("mul", "truediv", "div"))
    return scales and all(isinstance(a, numbers.Number) for a in others)


def _qualifies(end: fx.Node) -> bool:
    """A floating-point table of static strides that needs no gradient (an angle of positions)."""
    value = meta_value(end)
    return (value is not None and value.is_floating_point() and not value.requires_grad
            and all(type(s) is int for s in (*value.shape, *value.stride())) and bool(end.users))
