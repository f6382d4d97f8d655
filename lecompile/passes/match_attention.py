"""Find attention blocks: ``scaled_dot_product_attention`` calls and eager softmax attention.

They are recorded in the report with their shapes and the adapters on their projections;
the block-sparse rewrite comes with the attention operator.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import List, Optional

import torch.fx as fx

from .graph import MATMUL, SDPA, SOFTMAX, DROPOUT, is_call, is_cast, is_elementwise, is_method, shape

MAX_WALK = 64


@dataclass
class AttentionMatch:
    node: fx.Node                 # the SDPA call, or the softmax of eager attention
    kind: str                     # "sdpa" or "eager"
    name: str
    heads: Optional[int]
    query_len: Optional[int]
    head_dim: Optional[int]
    peft: List[str]


def match_attention(ctx) -> None:
    """Fill ``ctx.attention``."""
    for node in ctx.gm.graph.nodes:
        if is_call(node, SDPA):
            ctx.attention.append(_describe(ctx, node, "sdpa", node.args[0]))
        elif is_call(node, SOFTMAX) or is_method(node, ("softmax",)):
            query = _eager_query(node)
            if query is not None:
                ctx.attention.append(_describe(ctx, node, "eager", query))


def _eager_query(softmax: fx.Node) -> Optional[fx.Node]:
    """The query of ``softmax(q @ k.T * s + mask) @ v``, or ``None`` if this is no attention."""
    scores = softmax.args[0]
    while isinstance(scores, fx.Node) and not is_call(scores, MATMUL) and is_elementwise(scores):
        scores = scores.args[0]
    if not (isinstance(scores, fx.Node) and is_call(scores, MATMUL)):
        return None
    probs = softmax
    while len(probs.users) == 1:
        user = next(iter(probs.users))
        if is_call(user, MATMUL) and user.args[0] is probs:
            return scores.args[0]
        if not (is_cast(user) or is_call(user, DROPOUT)):
            return None
        probs = user
    return None


def _projections(ctx, start: fx.Node):
    """The linear layers feeding ``start`` (the nearest ones, walking back)."""
    seen, queue, found = {start}, deque([start]), []
    while queue and len(seen) < MAX_WALK:
        node = queue.popleft()
        if node in ctx.linear_by_out:
            found.append(ctx.linear_by_out[node])
            continue
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                queue.append(arg)
    return found


def _describe(ctx, node: fx.Node, kind: str, query: fx.Node) -> AttentionMatch:
    q_shape = shape(query) or ()
    heads, q_len, head_dim = (q_shape[-3], q_shape[-2], q_shape[-1]) if len(q_shape) >= 3 else (None,) * 3
    projections = _projections(ctx, node)
    name = projections[0].name.rsplit(".", 1)[0] if projections else node.name
    peft = sorted({f"{p.name.rsplit('.', 1)[-1]}:{label}" for p in projections for label in p.peft})
    return AttentionMatch(node, kind, name, heads, q_len, head_dim, peft)
