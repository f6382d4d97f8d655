"""Find which tokens the loss reads, for context-only sparsity."""

from __future__ import annotations

from typing import Optional, Tuple

import torch.fx as fx
import torch.nn.functional as F

from ..ops.token_groups import output_tokens
from .graph import is_call, meta_value


def output_token_mask(graph: fx.Graph) -> Tuple[Optional[fx.Node], int, str]:
    """A node computing bool ``[T]`` (True: an output token, one the loss reads), placed right
    after the graph's inputs, and ``T``; or ``(None, 0, why not)``.

    The tokens are those of the one ``cross_entropy`` whose target is computed from a single
    integer input (the labels, shifted as Hugging Face's causal-LM loss does); that computation
    moves to the top of the graph so the MLPs can use it.
    """
    losses = [n for n in graph.nodes if is_call(n, (F.cross_entropy,))]
    if len(losses) != 1:
        return None, 0, (f"{len(losses)} cross-entropy losses in the graph" if losses else
                         "no cross-entropy loss in the graph (pass labels to the model)")
    loss = losses[0]
    target = loss.kwargs.get("target", loss.args[1] if len(loss.args) > 1 else None)
    ignore_index = loss.kwargs.get("ignore_index", -100)
    if not isinstance(target, fx.Node) or not isinstance(ignore_index, int):
        return None, 0, "the loss's target or ignore_index is not a graph value and a number"
    chain = _ancestors(target)
    inputs = [n for n in chain if n.op == "placeholder"]
    value = meta_value(target)
    if (len(inputs) != 1 or value is None or value.dtype.is_floating_point
            or any(n.op not in ("placeholder", "call_function", "call_method") for n in chain)):
        return None, 0, "the loss's target is not computed from the labels input alone"
    first = next(n for n in graph.nodes if n.op != "placeholder" and n not in chain)
    for node in [n for n in graph.nodes if n in chain and n.op != "placeholder"]:
        first.prepend(node)
    with graph.inserting_before(first):
        mask = graph.call_function(output_tokens, (target, ignore_index))
    return mask, value.numel(), ""


def _ancestors(node: fx.Node) -> set:
    seen, stack = {node}, [node]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen
