"""Replace the custom ``autograd.Function``\\ s lecompile knows by the op they compute.

Dynamo traces a ``torch.autograd.Function`` into one ``autograd_function_apply`` higher-order op
whose forward and backward are subgraphs, out of the matchers' sight. Where both subgraphs are,
op for op and constant for constant, a pair of :data:`KNOWN` (BLOOM's ``GeLUFunction``: the tanh
GeLU with its hand-written derivative), the call becomes the op itself, whose own derivative is the
same formula. Any other Function stays as it is, and the MLP matcher reports it.
"""

from __future__ import annotations

import functools
import operator
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from .graph import is_custom_function, recompile, replace_uses


def bloom_gelu_forward(x):
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def bloom_gelu_backward(grad, x):
    tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    ff = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)
    return ff * grad


class Known(NamedTuple):
    forward: Callable
    backward: Callable
    op: Callable  # what the Function computes, as one op of the same derivative


#: The Functions replaced.
KNOWN = (Known(bloom_gelu_forward, bloom_gelu_backward, functools.partial(F.gelu, approximate="tanh")),)


def known_functions(ctx) -> None:
    """Replace each ``autograd_function_apply`` of a :data:`KNOWN` Function by its op."""
    graph, replaced = ctx.gm.graph, 0
    for node in list(graph.nodes):
        known = _known(ctx.gm, node)
        uses = list(node.users)
        if known is None or not all(u.target is operator.getitem and u.args[1] == 0 for u in uses):
            continue
        with graph.inserting_before(node):
            op = graph.call_function(known.op.func, (node.args[2],), dict(known.op.keywords))
        for use in uses:
            replace_uses(use, op)
            graph.erase_node(use)
        graph.erase_node(node)
        replaced += 1
    if replaced:
        counters["lecompile"]["known_function"] += replaced
        recompile(ctx.gm)


def _known(gm: fx.GraphModule, node: fx.Node) -> Optional[Known]:
    if not is_custom_function(node):
        return None
    forward, backward, *operands = node.args
    if len(operands) != 1 or not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (forward, backward)):
        return None
    bodies = [getattr(gm, a.target).graph for a in (forward, backward)]
    for known in KNOWN:
        if all(_ops(body) == _reference_ops(fn) for body, fn in zip(bodies, (known.forward, known.backward))) \
                and _returns_last(bodies[0]):
            return known
    return None


@functools.lru_cache(maxsize=None)
def _reference_ops(fn: Callable) -> List[tuple]:
    return _ops(fx.symbolic_trace(fn).graph)


def _computed(graph: fx.Graph) -> List[fx.Node]:
    """The graph's calls, without the grad-mode switches Dynamo wraps the bodies in."""
    return [n for n in graph.nodes
            if n.op in ("call_function", "call_method") and n.target is not torch._C._set_grad_enabled]


def _ops(graph: fx.Graph) -> List[tuple]:
    """The graph's computation as (target, arguments) with inputs and results numbered."""
    names = {n: ("input", i) for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder")}
    ops = []
    for n in _computed(graph):
        names[n] = ("result", len(ops))
        ops.append((n.target, fx.node.map_arg((n.args, n.kwargs), lambda a: names.get(a, a.op))))
    return ops


def _returns_last(graph: fx.Graph) -> bool:
    """Whether the forward body's first output is its last result (not an intermediate)."""
    computed = _computed(graph)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outputs = torch.utils._pytree.tree_leaves(output.args[0])
    return bool(computed and outputs) and outputs[0] is computed[-1]
