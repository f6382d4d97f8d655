"""Find attention blocks: ``scaled_dot_product_attention`` calls and eager softmax attention.

A softmax whose probabilities multiply the values but whose scores are not ``q @ k.T`` with a
scale and masks (BLOOM's ``baddbmm`` adds its ALiBi bias inside the product) is still recorded, as
a block that cannot be rewritten, so the report names it. Each match records what the block-sparse
rewrite needs: ``q``, ``k``, ``v``, the steps from
``q @ k.T`` to the softmax (scale, masks; see :mod:`lecompile.ops.block_attention`), the node
whose value the rewrite replaces, and, when it cannot be rewritten, why.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.fx as fx

from .graph import (
    DROPOUT,
    MATMUL,
    SDPA,
    SOFTMAX,
    VIEWS,
    dropout_p,
    is_call,
    is_cast,
    is_elementwise,
    is_method,
    meta_value,
    shape,
)

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
    q: Optional[fx.Node] = None
    k: Optional[fx.Node] = None
    v: Optional[fx.Node] = None
    out: Optional[fx.Node] = None   # the node whose value the rewrite replaces
    steps: Tuple[str, ...] = ()
    operands: Tuple[Union[float, fx.Node], ...] = ()
    causal: bool = False
    enable_gqa: bool = False
    why_not: str = ""              # why this block cannot be rewritten ("" if it can)
    mask_was_causal: bool = False  # its token mask, the causal mask, left the steps (passes.causal_masks)


SCORE_STEPS = {operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
               operator.add: "add", torch.add: "add"}


def match_attention(ctx) -> None:
    """Fill ``ctx.attention``."""
    for node in ctx.gm.graph.nodes:
        if is_call(node, SDPA):
            match = _describe(ctx, node, "sdpa", node.args[0])
            _read_sdpa(node, match)
            ctx.attention.append(match)
        elif is_call(node, SOFTMAX) or is_method(node, ("softmax",)):
            found = _eager_attention(node)
            if found is not None:
                scores, out = found
                match = _describe(ctx, node, "eager", scores.args[0])
                _read_eager(node, scores, out, match)
                ctx.attention.append(match)
            elif _weighs_values(node):
                match = _describe(ctx, node, "eager", None)
                source = _scores_source(node)
                match.why_not = (f"its scores come from `{source}`, not from `q @ k.T` with a scale and masks"
                                 + (" (a logit joined to the scores, such as GPT-OSS's attention sinks)"
                                    if source == "cat" else ""))
                ctx.attention.append(match)


def _eager_attention(softmax: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """``(q @ k.T, probs @ v)`` of ``softmax(q @ k.T * s + mask) @ v``, or ``None`` if this is no
    attention."""
    scores = softmax.args[0]
    while isinstance(scores, fx.Node) and not is_call(scores, MATMUL) and is_elementwise(scores):
        scores = scores.args[0]
    if not (isinstance(scores, fx.Node) and is_call(scores, MATMUL)):
        return None
    probs = softmax
    while len(probs.users) == 1:
        user = next(iter(probs.users))
        if is_call(user, MATMUL) and user.args[0] is probs:
            return scores, user
        if not (is_cast(user) or is_call(user, DROPOUT)):
            return None
        probs = user
    return None


def _weighs_values(softmax: fx.Node) -> bool:
    """Whether the softmax's probabilities (through casts, dropout, views and slices) are the left
    operand of a matrix product: attention, whatever its scores are."""
    probs = softmax
    while len(probs.users) == 1:
        user = next(iter(probs.users))
        if is_call(user, MATMUL):
            return user.args[0] is probs
        if not (is_cast(user) or is_call(user, DROPOUT) or is_method(user, VIEWS)
                or is_call(user, (operator.getitem,))):
            return False
        probs = user
    return False


def _scores_source(softmax: fx.Node) -> str:
    """The op that makes the scores, past elementwise ops, casts and views."""
    node = softmax.args[0]
    while isinstance(node, fx.Node) and node.args and (is_elementwise(node) or is_cast(node)
                                                       or is_method(node, VIEWS)):
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return repr(node)
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_arguments(node: fx.Node) -> dict:
    """An SDPA call's arguments by name (:data:`SDPA_ARGUMENTS`), those it passes, by position or keyword."""
    return {**dict(zip(SDPA_ARGUMENTS, node.args)), **node.kwargs}


def set_sdpa_arguments(node: fx.Node, **changes) -> None:
    """Rewrite an SDPA call with ``changes`` to its arguments: query, key and value by position, the rest by name."""
    kwargs = {**sdpa_arguments(node), **changes}
    node.args = (kwargs.pop("query"), kwargs.pop("key"), kwargs.pop("value"))
    node.kwargs = kwargs


def _read_sdpa(node: fx.Node, match: AttentionMatch) -> None:
    defaults = (None, None, None, None, 0.0, False, None, False)
    a = {**dict(zip(SDPA_ARGUMENTS, defaults)), **sdpa_arguments(node)}
    match.q, match.k, match.v, match.out = a["query"], a["key"], a["value"], node
    match.causal, match.enable_gqa = bool(a["is_causal"]), bool(a["enable_gqa"])
    head_dim = (shape(a["query"]) or (None,))[-1]
    scale = a["scale"] if a["scale"] is not None else (head_dim ** -0.5 if head_dim else None)
    steps, operands = [], []
    if isinstance(scale, (int, float)):
        steps.append("mul")
        operands.append(float(scale))
    mask = a["attn_mask"]
    if isinstance(mask, fx.Node):
        value = meta_value(mask)
        steps.append("mask" if value is not None and value.dtype == torch.bool else "add")
        operands.append(mask)
    match.steps, match.operands = tuple(steps), tuple(operands)
    if not isinstance(scale, (int, float)):
        match.why_not = f"scale {scale!r} is not a number"
    elif mask is not None and not isinstance(mask, fx.Node):
        match.why_not = f"attn_mask {mask!r} is not a tensor"
    elif a["dropout_p"] != 0.0:
        match.why_not = f"attention dropout p={a['dropout_p']} (the block-sparse op has no dropout)"


def _read_eager(softmax: fx.Node, scores: fx.Node, out: fx.Node, match: AttentionMatch) -> None:
    match.q, match.out, match.v = scores.args[0], out, out.args[1]
    key_t = scores.args[1]
    if _is_last_two_transpose(key_t):
        match.k = key_t.args[0]
    steps, operands = [], []
    node = softmax.args[0]
    while node is not scores:
        if is_cast(node):
            node = node.args[0]
            continue
        if (is_call(node, (torch.tanh,)) or is_method(node, ("tanh",))) and len(node.args) == 1:
            steps.append("tanh")  # logit soft-capping: div c, tanh, mul c
            operands.append(None)
            node = node.args[0]
            continue
        kind = SCORE_STEPS.get(node.target) if node.op == "call_function" else None
        if kind is None or len(node.args) != 2 or node.kwargs:
            match.why_not = f"score op {node.format_node()[:80]!r} is not a scale or a mask"
            return
        chain, other = node.args if _depends_on(node.args[0], scores) else node.args[::-1]
        if kind == "div" and chain is not node.args[0]:
            match.why_not = "scores divide something"
            return
        steps.append(kind)
        operands.append(other)
        node = chain
    match.steps, match.operands = tuple(reversed(steps)), tuple(reversed(operands))
    dim = softmax.kwargs.get("dim", softmax.args[1] if len(softmax.args) > 1 else None)
    rank = len(shape(softmax) or ())
    if match.k is None:
        match.why_not = "the key is not a transpose of the last two dims"
    elif dim not in (-1, rank - 1):
        match.why_not = f"softmax over dim {dim}, not the keys"
    elif any(not isinstance(x, (int, float, fx.Node)) for kind, x in zip(match.steps, match.operands)
             if kind != "tanh"):
        match.why_not = "a score operand is neither a number nor a tensor"
    elif any(dropout_p(n) for n in _between(softmax, out) if is_call(n, DROPOUT)):
        match.why_not = "attention dropout p > 0 (the block-sparse op has no dropout)"


def _is_last_two_transpose(node) -> bool:
    if not isinstance(node, fx.Node) or len(shape(node) or ()) != 4:
        return False
    if not (is_method(node, ("transpose",)) or is_call(node, (torch.transpose,))):
        return False
    dims = {d % 4 for d in node.args[1:3]}
    return dims == {2, 3}


def _depends_on(node, target: fx.Node) -> bool:
    while isinstance(node, fx.Node):
        if node is target:
            return True
        node = node.args[0] if node.args else None
    return False


def _between(start: fx.Node, end: fx.Node) -> List[fx.Node]:
    nodes, node = [], next(iter(start.users))
    while node is not end:
        nodes.append(node)
        node = next(iter(node.users))
    return nodes


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
