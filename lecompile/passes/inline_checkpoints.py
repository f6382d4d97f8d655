"""Make regions under ``torch.utils.checkpoint`` visible to the matchers, and keep them recomputed.

Dynamo hands a checkpointed region (Hugging Face's ``gradient_checkpointing_enable()``, either
``use_reentrant`` mode) to the backend as one ``tag_activation_checkpoint`` higher-order op whose
body is a subgraph: the decoder layer's MLP and attention are inside it, out of the matchers'
sight. :func:`inline_checkpoints` copies each body into the graph and tags every copied node the
way the higher-order op itself does when AOTAutograd traces it (``recompute`` =
``PREFER_RECOMPUTE``, one ``ac_graph_id`` per region); AOTAutograd keeps these tags on the nodes
it traces, and its partitioner recomputes tagged nodes in the backward instead of saving them.
After the rewrites, :func:`tag_rewritten_nodes` gives the nodes the passes created the tag of the
region they sit in, so a rewritten region is recomputed as the original would have been.

Selective checkpointing (a ``context_fn`` policy) and bodies with nested subgraphs are left as
they are and reported.
"""

from __future__ import annotations

import itertools
import operator
from typing import Dict, Optional

import torch
import torch.fx as fx

#: The tags the partitioner reads (``torch._functorch.partitioners.must_recompute``).
RECOMPUTE, REGION = "recompute", "ac_graph_id"
_region_ids = itertools.count(1)


def is_checkpoint(node: fx.Node) -> bool:
    """A checkpointed region as Dynamo traces it (the ``tag_activation_checkpoint`` op)."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    return node.op == "call_function" and hop is not None and node.target is hop


def inline_checkpoints(ctx) -> None:
    """Copy every plain checkpointed region's body into ``ctx.gm`` with recompute tags."""
    from torch.utils.checkpoint import CheckpointPolicy

    gm, graph = ctx.gm, ctx.gm.graph
    for node in list(graph.nodes):
        if not is_checkpoint(node):
            continue
        body_attr, *operands = node.args
        body = getattr(gm, body_attr.target)
        reason = _why_not_inlined(body, node)
        if reason:
            ctx.unmatched(node.name, f"gradient checkpointing: {reason}; the region is compiled by Inductor as "
                                     "it is (its MLP and attention blocks are not matched)")
            continue
        region = next(_region_ids)
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        env: Dict[fx.Node, fx.Node] = dict(zip(placeholders, operands))
        before = set(graph.nodes)
        with graph.inserting_before(node):
            outputs = graph.graph_copy(body.graph, env)
        for copied in graph.nodes:
            if copied not in before:
                copied.meta[RECOMPUTE] = CheckpointPolicy.PREFER_RECOMPUTE
                copied.meta[REGION] = region
        _replace_outputs(node, outputs)
        graph.erase_node(node)
        if not body_attr.users:
            graph.erase_node(body_attr)
            delattr(gm, body_attr.target)
        ctx.report.checkpointed += 1
    if ctx.report.checkpointed:
        gm.recompile()


def _why_not_inlined(body: fx.GraphModule, node: fx.Node) -> Optional[str]:
    if "_checkpoint_context_fn" in body.meta:
        return "selective checkpointing (a context_fn policy) decides per op what to save"
    if any(n.op in ("get_attr", "call_module") for n in body.graph.nodes):
        return "the region holds nested subgraphs"
    if set(node.kwargs) - {"use_reentrant", "preserve_rng_state", "determinism_check", "debug"}:
        return f"the region takes keyword arguments {sorted(node.kwargs)}"
    return None


def _replace_outputs(node: fx.Node, outputs) -> None:
    """Point the users of ``node`` (``getitem`` of its output tuple, or the value itself) at ``outputs``."""
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and isinstance(outputs, (tuple, list)):
            user.replace_all_uses_with(outputs[user.args[1]])
            user.graph.erase_node(user)
        else:
            user.replace_input_with(node, outputs)


def tag_rewritten_nodes(ctx) -> None:
    """Give the nodes the rewrites created inside a checkpointed region that region's tags: the
    region of the nodes that use them (a value computed for a region), else of their inputs."""
    if not ctx.report.checkpointed:
        return
    nodes = [n for n in ctx.gm.graph.nodes if n.op in ("call_function", "call_method")]
    tags = {n: (n.meta[RECOMPUTE], n.meta[REGION]) for n in nodes if REGION in n.meta}
    new = [n for n in nodes if n not in tags]
    for node in reversed(new):
        regions = sorted({tags[u] for u in node.users if u in tags}, key=lambda t: t[1])
        if regions:
            tags[node] = regions[0]
    for node in new:
        if node not in tags:
            regions = {tags[i] for i in node.all_input_nodes if i in tags}
            if len(regions) == 1:
                tags[node] = regions.pop()
    for node in new:
        if node in tags:
            node.meta[RECOMPUTE], node.meta[REGION] = tags[node]
