"""Grouped-query attention on the key/value heads themselves, not on copies repeated per query head.

Under ``torch.compile`` transformers hands SDPA a mask, and so repeats each key/value head for its
query heads (``repeat_kv``: ``x[:, :, None].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)``):
a copy of K and V in the forward, and a sum of their gradients over the copies in the backward.
Once :mod:`~lecompile.passes.causal_masks` has dropped a mask that was only the causal mask, SDPA
can read the grouped heads itself: this pass hands it ``key`` and ``value`` from before
``repeat_kv``, with ``enable_gqa=True``, where SDPA's fused kernels take grouped heads: no mask,
no dropout, equal key and value head dims of at most 256, and on CUDA bf16 or fp16 on sm80 or
newer with FlashAttention's or cuDNN's kernels enabled (the memory-efficient kernel takes no
grouped heads: SDPA would fall back to its math kernel). The values are SDPA's on the repeated
heads; the key and value gradients sum over each group inside the kernel.

Block-sparse attention (``block_attention``, from rewrite_attention) keeps the repeated heads:
FlexAttention on grouped heads made the whole step slower, 2% on LLaMA-3.2-1B and 10% on
Qwen2-1.5B (4 layers, 8192 tokens, half the blocks, H100; ``benchmarks/results/e2e.json`` run 146).
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from .graph import SDPA, VIEWS, is_call, is_method, meta_value, recompile, static_shape
from .match_attention import sdpa_arguments, set_sdpa_arguments

NOTE = ("grouped_query_attention: {n} attention call(s) read the key/value heads themselves (enable_gqa), "
        "not copies repeated for each query head")
MAX_HEAD_DIM = 256


def grouped_query_attention(ctx) -> None:
    """Hand every qualifying SDPA call the key/value heads before ``repeat_kv`` (see the module docstring)."""
    rewritten = 0
    for node in ctx.gm.graph.nodes:
        if not is_call(node, SDPA):
            continue
        a = sdpa_arguments(node)
        if not _fused_kernels_take_groups(a):
            continue
        key, value = _repeated_heads(a["key"]), _repeated_heads(a["value"])
        if key is None or value is None or key[1] != value[1]:
            continue
        set_sdpa_arguments(node, key=key[0], value=value[0], enable_gqa=True)
        rewritten += 1
        counters["lecompile"]["grouped_query_attention"] += 1
    if rewritten:
        recompile(ctx.gm)
        ctx.report.notes.append(NOTE.format(n=rewritten))


def _fused_kernels_take_groups(a: dict) -> bool:
    """Whether SDPA with these arguments and ``enable_gqa=True`` runs a fused kernel (see the module docstring)."""
    if a.get("attn_mask") is not None or a.get("dropout_p", 0.0) != 0.0 or a.get("enable_gqa", False):
        return False
    q, k, v = (meta_value(a.get(name)) for name in ("query", "key", "value"))
    if q is None or k is None or v is None or q.dim() != 4 or not k.shape[-1] == v.shape[-1] <= MAX_HEAD_DIM:
        return False
    if q.device.type == "cpu":
        return True
    if q.device.type != "cuda" or torch.version.hip or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    return (torch.cuda.get_device_capability(q.device) >= (8, 0)
            and (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.cudnn_sdp_enabled()))


def _repeated_heads(node) -> Optional[Tuple[fx.Node, int]]:
    """``(x, n)`` when ``node`` is ``x`` (``[b, kv, s, d]``) with each head repeated ``n`` times
    next to itself, as ``repeat_kv`` writes it; else ``None``."""
    if not isinstance(node, fx.Node) or not (is_method(node, VIEWS) or is_call(node, (torch.reshape,))):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and is_method(expand, ("expand",))):
        return None
    unsqueezed = expand.args[0]
    if not isinstance(unsqueezed, fx.Node) or not (_new_axis_2(unsqueezed) or (
            is_method(unsqueezed, ("unsqueeze",)) and unsqueezed.args[1:] == (2,) and not unsqueezed.kwargs)):
        return None
    x = unsqueezed.args[0]
    shapes = [static_shape(n) for n in (x, unsqueezed, expand, node)]
    if any(s is None for s in shapes) or len(shapes[0]) != 4:
        return None
    (b, kv, s, d), _, expanded, repeated = shapes
    n = expanded[2]
    if shapes[1] != (b, kv, 1, s, d) or expanded != (b, kv, n, s, d) or repeated != (b, kv * n, s, d):
        return None
    return x, n


def _new_axis_2(node: fx.Node) -> bool:
    """``x[:, :, None]`` (full slices, a new axis at dim 2, optionally full slices after it)."""
    if not is_call(node, (operator.getitem,)) or not isinstance(node.args[1], tuple):
        return False
    index = node.args[1]
    full = slice(None)
    return len(index) >= 3 and index[:3] == (full, full, None) and all(i == full for i in index[3:])
