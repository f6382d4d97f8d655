"""Put BLOOM-style attention in the form the attention matcher reads.

BLOOM merges the heads into the batch and adds its ALiBi bias inside the product::

    scores = bias.baddbmm(q3, k3t, beta=1, alpha=s).view(B, H, L, S)   # q3 [B*H, L, D]
    ... softmax ... probs.view(B * H, L, S).bmm(v3)                    # v3 [B*H, S, D]

When attention may be rewritten (``attn_density`` below 1, a training graph), this pass writes the
same math with the heads apart: ``q4 @ k4.T * s + bias4`` (``bias4 = bias.reshape(B, H, -1, S)``)
and ``(probs @ v4).reshape(B * H, L, D)``, so :mod:`match_attention` finds a scale and an additive
bias like any other eager attention. At density 1.0 the graph is left as it is.
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from .graph import (
    DROPOUT,
    MATMUL,
    SOFTMAX,
    VIEWS,
    is_call,
    is_cast,
    is_method,
    meta_value,
    recompile,
    replace_uses,
    shape,
    static_shape,
)

MAX_WALK = 16


def alibi_attention(ctx) -> None:
    """Rewrite every ``baddbmm`` attention of ``ctx.gm`` with its heads apart."""
    if ctx.config.attn_density >= 1.0 or not ctx.training or not ctx.config.enabled("rewrite_attention"):
        return
    changed = False
    for node in list(ctx.gm.graph.nodes):
        found = _baddbmm_attention(node)
        if found is not None:
            _rewrite(ctx.gm.graph, node, *found)
            counters["lecompile"]["alibi_attention"] += 1
            changed = True
    if changed:
        recompile(ctx.gm)


def _baddbmm_args(node: fx.Node) -> Optional[tuple]:
    """``(bias, batch1, batch2, beta, alpha)`` of a ``baddbmm`` call, method or function."""
    if not (is_method(node, ("baddbmm",)) or is_call(node, (torch.baddbmm,))):
        return None
    names = ("input", "batch1", "batch2")
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    if not all(isinstance(a.get(n), fx.Node) for n in names):
        return None
    return a["input"], a["batch1"], a["batch2"], a.get("beta", 1.0), a.get("alpha", 1.0)


def _baddbmm_attention(node: fx.Node) -> Optional[Tuple[tuple, fx.Node, fx.Node, fx.Node]]:
    """``(baddbmm args, 4-d view of the scores, 3-d view of the probabilities, probs @ v)``, or
    ``None`` if ``node`` is no merged-heads attention."""
    args = _baddbmm_args(node)
    if args is None or len(node.users) != 1:
        return None
    bias, q, kt, beta, alpha = args
    view = next(iter(node.users))
    view_shape, q_shape, kt_shape = static_shape(view), static_shape(q), static_shape(kt)  # dynamic: left dense
    if not (is_method(view, VIEWS) and view_shape and len(view_shape) == 4 and q_shape and kt_shape
            and len(q_shape) == 3 and len(kt_shape) == 3 and len(shape(bias) or ()) == 3
            and isinstance(beta, (int, float)) and isinstance(alpha, (int, float))):
        return None
    node_ = view
    for _ in range(MAX_WALK):  # scores -> masks -> softmax -> casts, dropout -> 3-d view -> bmm
        if len(node_.users) != 1:
            return None
        user = next(iter(node_.users))
        if is_method(user, VIEWS) and len(user.users) == 1:
            product = next(iter(user.users))
            if is_call(product, MATMUL) and product.args[0] is user and len(shape(product.args[1]) or ()) == 3:
                return args, view, user, product
            return None
        if not (is_call(user, SOFTMAX) or is_method(user, ("softmax",)) or is_cast(user) or is_call(user, DROPOUT)
                or is_call(user, (operator.add, torch.add))):
            return None
        node_ = user
    return None


def _rewrite(graph: fx.Graph, baddbmm: fx.Node, args: tuple, scores4: fx.Node, probs3: fx.Node,
             product: fx.Node) -> None:
    bias, q, kt, beta, alpha = args
    batch, heads, q_len, kv_len = shape(scores4)
    head_dim = shape(q)[-1]

    def add(kind: str, target, node_args: tuple, value: torch.Tensor) -> fx.Node:
        new = graph.create_node(kind, target, node_args)
        new.meta["example_value"] = value
        return new

    with graph.inserting_before(baddbmm):
        q4 = add("call_method", "reshape", (q, batch, heads, q_len, head_dim),
                 meta_value(q).reshape(batch, heads, q_len, head_dim))
        k_t = add("call_method", "transpose", (kt, -1, -2), meta_value(kt).transpose(-1, -2))
        k4 = add("call_method", "reshape", (k_t, batch, heads, kv_len, head_dim),
                 meta_value(k_t).reshape(batch, heads, kv_len, head_dim))
        k4_t = add("call_method", "transpose", (k4, -1, -2), meta_value(k4).transpose(-1, -2))
        product4 = add("call_function", torch.matmul, (q4, k4_t), meta_value(q4) @ meta_value(k4_t))
        scaled = add("call_function", operator.mul, (product4, alpha), meta_value(product4) * alpha)
        bias4 = add("call_method", "reshape", (bias, batch, heads, -1, kv_len),
                    meta_value(bias).reshape(batch, heads, -1, kv_len))
        if beta != 1.0:
            bias4 = add("call_function", operator.mul, (bias4, beta), meta_value(bias4) * beta)
        scores = add("call_function", operator.add, (scaled, bias4), meta_value(scaled) + meta_value(bias4))
    replace_uses(scores4, scores)
    v = product.args[1]
    probs4 = probs3.args[0]
    with graph.inserting_before(product):
        v4 = add("call_method", "reshape", (v, batch, heads, kv_len, head_dim),
                 meta_value(v).reshape(batch, heads, kv_len, head_dim))
        out4 = add("call_function", torch.matmul, (probs4, v4), meta_value(probs4) @ meta_value(v4))
        out = add("call_method", "reshape", (out4, batch * heads, q_len, head_dim),
                  meta_value(out4).reshape(batch * heads, q_len, head_dim))
    replace_uses(product, out)
