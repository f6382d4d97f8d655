"""Drop a token mask that is only the causal mask, so attention runs as causal attention.

Under ``torch.compile`` transformers gives every causal LM's attention a ``[batch, 1, L, S]``
mask, even where it is the causal mask and nothing else (no ``attention_mask`` or
``position_ids`` passed: it checks the mask's values only outside tracing). SDPA with a mask
takes neither FlashAttention's nor cuDNN's causal kernels, and a mask function that reads it keeps
block-sparse attention off FlashAttention 4's. When the graph computes such a mask from constants
alone (no graph input among its ancestors), this pass evaluates it once at compile time; where it
equals the causal mask (equal query and key lengths, a training step's), the attention drops it:
an SDPA call becomes ``is_causal=True``, and the block-sparse rewrite sees a causal attention
without a token mask (an eager attention left dense keeps its mask).
"""

from __future__ import annotations

import functools
import logging
from typing import Dict, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch.fx.node import map_arg

from ..ops.block_attention import token_masks
from .graph import meta_value, static_shape
from .match_attention import set_sdpa_arguments

log = logging.getLogger("lecompile")

#: Ops whose values differ from call to call: a mask built with them is no constant.
RANDOM = ("rand", "randn", "randint", "randperm", "bernoulli", "dropout", "normal", "uniform", "multinomial")


def causal_masks(ctx) -> None:
    """For every matched attention, drop a token mask the graph computes from constants when it
    equals the causal mask (see the module docstring)."""
    values: Dict[fx.Node, Optional[torch.Tensor]] = {}
    changed = False
    for att in ctx.attention:
        if att.why_not or att.causal:
            continue
        q, k = static_shape(att.q), static_shape(att.k)
        if q is None or k is None or len(q) != 4 or len(k) != 4 or q[-2] != k[-2]:
            continue
        # The token masks as the block-sparse op reads them (after the last soft-capping tanh).
        metas = [meta_value(x) if isinstance(x, fx.Node) else x for x in att.operands]
        masks = token_masks(att.steps, metas)
        indices = [i for i, x in enumerate(metas) if any(x is m for m in masks)]
        if len(indices) != 1 or not isinstance(att.operands[indices[0]], fx.Node):
            continue
        i = indices[0]
        node = att.operands[i]
        if node not in values:
            values[node] = constant_value(ctx, node)
        if values[node] is None or not is_causal(values[node], att.steps[i], q[-2], k[-2]):
            continue
        att.steps, att.operands = att.steps[:i] + att.steps[i + 1:], att.operands[:i] + att.operands[i + 1:]
        att.causal = att.mask_was_causal = True
        if att.kind == "sdpa":  # the call without its mask
            set_sdpa_arguments(att.node, attn_mask=None, is_causal=True)
            changed = True
        counters["lecompile"]["causal_mask_dropped"] += 1
    if changed:
        # Code only: the matches hold nodes no user reads yet (a fused projection's halves), which
        # eliminating dead code now would take out from under the rewrites.
        ctx.gm.recompile()


def constant_value(ctx, node: fx.Node) -> Optional[torch.Tensor]:
    """``node``'s value, computed now, when no graph input, module call or random op leads to it
    (constants, ``get_attr`` attributes and what the graph computes from them); else ``None``."""
    needed, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        if n.op in ("placeholder", "call_module", "output") or _is_random(n):
            return None
        needed.add(n)
        stack.extend(n.all_input_nodes)
    env: Dict[fx.Node, object] = {}
    try:
        with torch.no_grad():
            for n in ctx.gm.graph.nodes:
                if n not in needed:
                    continue
                args, kwargs = map_arg((n.args, n.kwargs), env.__getitem__)
                if n.op == "get_attr":  # a buffer, or a subgraph a higher-order op runs (vmap's)
                    env[n] = functools.reduce(getattr, str(n.target).split("."), ctx.gm)
                elif n.op == "call_method":
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                else:
                    env[n] = n.target(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - whatever fails to run now stays in the graph, untouched
        log.debug("lecompile: %s could not be computed at compile time (%r); its attention keeps it", node, err)
        return None
    value = env[node]
    return value if isinstance(value, torch.Tensor) else None


def is_causal(value: torch.Tensor, kind: str, q_len: int, kv_len: int, rows: int = 4096) -> bool:
    """Whether a ``kind`` step (``"mask"``: True keeps; ``"add"``: an additive mask, ``finfo.min``
    masking, 0 keeping) with ``value`` masks exactly the causal positions (query ``i`` sees key
    ``j <= i + kv_len - q_len``, as :mod:`lecompile.ops.block_attention` reads ``causal``) of every
    batch row and head. Compares ``rows`` queries at a time (a 32k-token mask is 1 GiB) and reads
    the answer back once."""
    if value.dim() < 2 or tuple(value.shape[-2:]) != (q_len, kv_len):
        return False
    if (value.dtype != torch.bool) if kind == "mask" else not value.is_floating_point():
        return False
    keys = torch.arange(kv_len, device=value.device)
    equal = torch.ones((), dtype=torch.bool, device=value.device)
    for start in range(0, q_len, rows):
        block = value[..., start:start + rows, :]
        queries = torch.arange(start, start + block.shape[-2], device=value.device)
        causal = keys <= queries[:, None] + (kv_len - q_len)
        if kind == "mask":
            keep = block
        else:
            keep = block > torch.finfo(value.dtype).min / 2
            equal &= ~(keep & (block != 0)).any()  # a bias where it keeps is not only a mask
        equal &= (keep == causal).all()
    return bool(equal)


def _is_random(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return node.op in ("call_function", "call_method") and any(word in name for word in RANDOM)
