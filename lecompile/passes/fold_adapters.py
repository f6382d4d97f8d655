"""Canonicalize: fold each linear and the PEFT wrappers around it into one :class:`LinearMatch`.

Recognized around a base ``linear(x, W, b)`` (or GPT-2's Conv1D ``addmm(b, x.view(-1, d), W)``,
or Falcon's ``x @ W.T + b``):

- LoRA: ``out + B(A(dropout(x.to(dtype)))) * scale``, then ``.to(result_dtype)``;
- IA3 on the output: ``(out * s).to(dtype)``; IA3 on a feed-forward input: ``W @ (x * s)``;
- trainable biases and base weights (BitFit, full fine-tuning), told by ``requires_grad``.

Matching looks at graph structure and shapes only, never at module names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

import torch
import torch.fx as fx

from ..ops.adapted_linear import AdaptedLinear
from .graph import (
    ADDMM,
    DROPOUT,
    LINEAR,
    VIEWS,
    dropout_p,
    is_call,
    is_cast,
    is_method,
    linear_args,
    only_user,
    shape,
    source_name,
    strip_casts,
)

ADD = (operator.add, torch.add)
MUL = (operator.mul, torch.mul)
PARAM_VIEWS = ("flatten", "view", "reshape", "squeeze", "to", "float", "half", "bfloat16")


@dataclass
class LinearMatch:
    """A linear layer with its adapters, as found in the graph."""

    adapted: AdaptedLinear          # fields hold graph nodes
    x: fx.Node                      # the layer input (before IA3 input scaling)
    out: fx.Node                    # the node holding the adapted output
    name: str                       # parameter path of the base weight's module
    in_features: int
    out_features: int
    weight_transposed: bool = False  # Conv1D stores W as [in, out]
    lora_dropout: float = 0.0
    nodes: Set[fx.Node] = field(default_factory=set)  # every node folded into this linear
    peft: List[str] = field(default_factory=list)
    consumed: bool = False          # rewritten as part of a larger op (the sparse MLP)
    fused: Optional["LinearMatch"] = None  # the fused projection this is one half of (Phi-3's gate_up_proj)

    @property
    def dropped_lora_input(self) -> Optional[fx.Node]:
        """What LoRA's ``A`` reads when dropout makes it differ from ``x``; ``None`` when it is
        ``x`` behind casts only, so fused ops can read ``x`` in its own dtype."""
        return self.adapted.lora_input if self.lora_dropout > 0.0 else None


def fold_adapters(ctx) -> None:
    """Find every linear layer; fill ``ctx.linears`` and ``ctx.linear_by_out``."""
    folded: Set[fx.Node] = set()
    for node in list(ctx.gm.graph.nodes):
        if node in folded:
            continue
        match = _fold(node, ctx.trainable)
        if match is not None:
            folded |= match.nodes
            ctx.linears.append(match)
            ctx.linear_by_out[match.out] = match


def _placeholder_2d(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder" and len(shape(node) or ()) == 2


def _base(node: fx.Node):
    """``(x, weight, bias, transposed, out, nodes)`` of a base linear, or ``None``."""
    if is_call(node, LINEAR):
        x, weight, bias = linear_args(node)
        if _placeholder_2d(weight):
            return x, weight, bias, False, node, {node}
    if is_call(node, (operator.matmul, torch.matmul)) and len(node.args) == 2:
        wt = node.args[1]
        if (isinstance(wt, fx.Node) and is_call(wt, (getattr,)) and wt.args[1] == "T"
                and _placeholder_2d(wt.args[0]) and only_user(wt) is node):
            weight, add = wt.args[0], only_user(node)
            bias = add.args[1] if add is not None and is_call(add, ADD) and add.args[0] is node else None
            if isinstance(bias, fx.Node) and bias.op == "placeholder" and shape(bias) == (shape(weight)[0],):
                return node.args[0], weight, bias, False, add, {wt, node, add}
            return node.args[0], weight, None, False, node, {wt, node}
    if is_call(node, ADDMM) and len(node.args) == 3 and _placeholder_2d(node.args[2]):
        flat = node.args[1]
        if isinstance(flat, fx.Node) and is_method(flat, VIEWS) and only_user(flat) is node:
            back = only_user(node)
            if back is not None and is_method(back, VIEWS):
                return flat.args[0], node.args[2], node.args[0], True, back, {flat, node, back}
    return None


def _fold(node: fx.Node, trainable: Dict[fx.Node, bool]) -> Optional[LinearMatch]:
    base = _base(node)
    if base is None:
        return None
    x, weight, bias, transposed, out, nodes = base
    w_shape = shape(weight)
    in_f, out_f = (w_shape[0], w_shape[1]) if transposed else (w_shape[1], w_shape[0])
    adapted = AdaptedLinear(weight=weight, bias=bias)
    match = LinearMatch(adapted, x, out, source_name(weight).rsplit(".", 1)[0], in_f, out_f,
                        transposed, nodes=nodes)
    _fold_input_scale(match)
    while _fold_lora(match) or _fold_output_scale(match):
        pass
    match.peft = _peft_labels(match, trainable)
    return match


def _fold_input_scale(match: LinearMatch) -> None:
    """IA3 on a feed-forward layer: ``linear((x.to(s.dtype) * s).to(x.dtype), W)``."""
    chain = [match.x]
    node = match.x
    while is_cast(node) and only_user(node) is not None:
        node = node.args[0]
        chain.append(node)
    if not is_call(node, MUL) or only_user(node) is None:
        return
    a, b = node.args[:2]
    for vec, other in ((b, a), (a, b)):
        if _param_vector(vec, match.in_features):
            match.adapted.in_scale = vec
            match.nodes |= set(chain)
            new_x = other
            while is_cast(new_x) and only_user(new_x) is node:
                match.nodes.add(new_x)
                new_x = new_x.args[0]
            match.x = new_x
            return


def _fold_lora(match: LinearMatch) -> bool:
    user = only_user(match.out)
    if user is None or not is_call(user, ADD) or len(user.args) != 2 or match.adapted.lora_a is not None:
        return False
    branch = user.args[1] if user.args[0] is match.out else user.args[0]
    lora = _lora_branch(branch, match.x)
    if lora is None:
        return False
    a, b, scale, lora_input, p, branch_nodes = lora
    match.adapted.lora_a, match.adapted.lora_b, match.adapted.lora_scale = a, b, scale
    match.adapted.lora_input = lora_input
    match.lora_dropout = p
    match.nodes |= branch_nodes | {user}
    match.out = user
    _fold_trailing_cast(match)
    return True


def _lora_branch(branch, x):
    """``(A, B, scale, lora_input, dropout_p, nodes)`` of ``B(A(dropout(x))) * scale``."""
    if not isinstance(branch, fx.Node) or only_user(branch) is None:
        return None
    scale, nodes = 1.0, {branch}
    if is_call(branch, MUL):
        numbers = [a for a in branch.args if isinstance(a, (int, float))]
        tensors = [a for a in branch.args if isinstance(a, fx.Node)]
        if len(numbers) != 1 or len(tensors) != 1:
            return None
        scale, branch = float(numbers[0]), tensors[0]
        nodes.add(branch)
    lb = branch
    if not (is_call(lb, LINEAR) and _placeholder_2d(lb.args[1]) and _no_bias(lb)):
        return None
    la = lb.args[0]
    if not (isinstance(la, fx.Node) and is_call(la, LINEAR) and _placeholder_2d(la.args[1])
            and _no_bias(la) and only_user(la) is lb and only_user(lb) is not None):
        return None
    nodes |= {la, lb}
    lora_input = la.args[0]
    p, node = 0.0, lora_input
    while node is not x and node is not strip_casts(x):
        if not isinstance(node, fx.Node):
            return None
        if is_call(node, DROPOUT):
            p = dropout_p(node)
        elif not is_cast(node):
            return None
        nodes.add(node)
        node = node.args[0]
    return la.args[1], lb.args[1], scale, lora_input, p, nodes


def _no_bias(linear: fx.Node) -> bool:
    return linear_args(linear)[2] is None


def _fold_output_scale(match: LinearMatch) -> bool:
    user = only_user(match.out)
    if user is None or not is_call(user, MUL) or match.adapted.out_scale is not None:
        return False
    a, b = user.args[:2]
    vec = b if a is match.out else a
    if not _param_vector(vec, match.out_features):
        return False
    match.adapted.out_scale = vec
    match.nodes.add(user)
    match.out = user
    _fold_trailing_cast(match)
    return True


def _fold_trailing_cast(match: LinearMatch) -> None:
    user = only_user(match.out)
    if user is not None and is_cast(user):
        match.nodes.add(user)
        match.out = user


def _param_vector(node, n: int) -> bool:
    """A 1-D ``[n]`` tensor computed from a single parameter (PEFT's ``1 * ia3_l.flatten()``)."""
    if not isinstance(node, fx.Node) or shape(node) != (n,):
        return False
    while node.op != "placeholder":
        if is_method(node, PARAM_VIEWS):
            node = node.args[0]
        elif is_call(node, MUL):
            tensors = [a for a in node.args if isinstance(a, fx.Node)]
            if len(tensors) != 1:
                return False
            node = tensors[0]
        else:
            return False
        if not isinstance(node, fx.Node):
            return False
    return True


def _peft_labels(match: LinearMatch, trainable: Dict[fx.Node, bool]) -> List[str]:
    a = match.adapted
    labels = []
    if a.lora_a is not None:
        labels.append("lora")
    if a.in_scale is not None or a.out_scale is not None:
        labels.append("ia3")
    if a.bias is not None and trainable.get(a.bias, False):
        labels.append("bias")
    if trainable.get(a.weight, False):
        labels.append("weight")
    return labels
