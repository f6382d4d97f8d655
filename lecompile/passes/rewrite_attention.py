"""Rewrite each matched attention block into ``predict_blocks`` + ``block_attention`` (at density
1.0 with ``attn_mask_blocks``, a masked attention into ``block_attention`` over the blocks its mask
allows).

Per graph, the allowed blocks of each distinct mask are built by one node, shared by every layer
that uses them.
"""

from __future__ import annotations

import math
import operator
from typing import Dict, Tuple

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from ..ops.block_attention import allowed_blocks, block_attention, flash_missing, flex_backward_tiles, token_masks
from ..predictors.attention import predict_blocks
from ..report import AttentionEntry
from .graph import meta_value, recompile, replace_uses, static_shape
from .match_attention import AttentionMatch


def rewrite_attention(ctx) -> None:
    """Replace every rewritable attention in ``ctx.attention``; report each decision."""
    cfg = ctx.config
    allowed: Dict[tuple, Tuple[fx.Node, fx.Node]] = {}
    changed = False
    for att in ctx.attention:
        entry = AttentionEntry(att.name, att.kind, att.heads, att.query_len, att.head_dim, att.peft,
                               density=cfg.attn_density, block=cfg.tuning.attn_block)
        ctx.report.attention.append(entry)
        causal = CAUSAL_MASK if att.mask_was_causal else ""
        entry.note = _why_dense(att, ctx)
        if entry.note:
            # An SDPA call runs causal without the mask; an eager attention left dense keeps it.
            entry.note = "; ".join(n for n in (entry.note, causal if att.kind == "sdpa" else "") if n)
            continue
        entry.kernel, not_flash = _kernel(att, cfg)
        _rewrite(ctx, att, allowed, entry.kernel)
        entry.rewritten = True
        mask_blocks = "attn_mask_blocks: exact block attention over the blocks the token mask allows"
        entry.note = "; ".join(n for n in (mask_blocks if cfg.attn_density == 1.0 else "", causal, not_flash) if n)
        counters["lecompile"]["block_attention"] += 1
        changed = True
    if changed:
        recompile(ctx.gm)


CAUSAL_MASK = "the model's token mask is the causal mask (built from constants): causal attention without it"


def _why_dense(att: AttentionMatch, ctx) -> str:
    cfg = ctx.config
    if cfg.attn_density == 1.0 and not (cfg.tuning.attn_mask_blocks and _token_mask(att)):
        return "attn_density 1.0: dense"
    if not cfg.enabled("rewrite_attention"):
        return "disabled (disable={'rewrite_attention'}): dense"
    if ctx.dense_warmup:
        return f"dense warm-up graph ({cfg.dense_warmup_steps} steps)"
    if not ctx.training:
        return f"{ctx.not_training}: dense"
    if att.why_not:
        return att.why_not + ": dense"
    q, k, v = (static_shape(n) for n in (att.q, att.k, att.v))
    if q is None or k is None or v is None:
        return "dynamic or unknown q/k/v shapes: dense"
    if len(q) != 4 or len(k) != 4 or len(v) != 4:
        return f"q/k/v are not [batch, heads, seq, dim] (q {q}, k {k}): dense"
    if q[1] != k[1] and not att.enable_gqa:
        return f"{q[1]} query heads but {k[1]} key heads without enable_gqa: dense"
    block = cfg.tuning.attn_block
    if q[-2] % block or k[-2] % block:
        return f"sequence lengths {q[-2]} / {k[-2]} are not multiples of attn_block={block}: dense"
    if q[-2] > k[-2]:
        return f"more queries ({q[-2]}) than keys ({k[-2]}): dense"
    tiles = flex_backward_tiles(meta_value(att.q))
    if _kernel(att, cfg)[0] == "triton" and tiles and not any(all(block % t == 0 for t in tile) for tile in tiles):
        need = max(math.lcm(*tile) for tile in tiles)
        return (f"Inductor's FlexAttention backward on this GPU (head dim {q[-1]}) only has tiles {tiles}, which "
                f"attn_block={block} is not a multiple of (use attn_block={need}): dense")
    return ""


def _token_mask(att: AttentionMatch) -> bool:
    """Whether the scores take a mask of token positions, which :func:`allowed_blocks` turns into blocks."""
    values = [meta_value(x) if isinstance(x, fx.Node) else x for x in att.operands]
    return bool(token_masks(att.steps, values))


#: Measured on an H100 with torch 2.11: FlexAttention's FlashAttention 4 code generation fails on a
#: mask function that reads a tensor at a constant index (a broadcast dim of the model's mask), and
#: on a view of it in its place.
FLASH_TOKEN_MASK = ("cannot read the model's token mask (FlexAttention's code generation for FlashAttention 4 "
                    "fails on it in torch 2.11)")


def _kernel(att: AttentionMatch, cfg) -> Tuple[str, str]:
    """The kernels ``att`` runs on: ``attn_kernel``'s, or FlexAttention's Triton kernels where
    FlashAttention 4's were asked for and cannot run it, with a note saying why."""
    if cfg.tuning.attn_kernel != "flash":
        return cfg.tuning.attn_kernel, ""
    why = _why_not_flash(meta_value(att.q), _token_mask(att))
    return ("triton", f"attn_kernel='flash' {why}: FlexAttention's Triton kernels instead") if why else ("flash", "")


def _why_not_flash(q: torch.Tensor, token_mask: bool) -> str:
    """Why FlashAttention 4's kernels cannot run attention on ``q`` (whose scores take a mask of
    token positions if ``token_mask``), or ``""`` (off CUDA the reference runs whatever the kernel)."""
    missing = flash_missing()
    if missing:
        return missing
    if q.device.type != "cuda":
        return ""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"runs bf16 and fp16 attention only, not {str(q.dtype).removeprefix('torch.')}"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major < 9:
        return f"needs a Hopper GPU or newer (sm90+), not sm{major}{minor}"
    if token_mask:
        return FLASH_TOKEN_MASK
    return ""


def _rewrite(ctx, att: AttentionMatch, allowed, kernel: str) -> None:
    cfg, graph = ctx.config, ctx.gm.graph
    q_len, kv_len = static_shape(att.q)[-2], static_shape(att.k)[-2]
    device = meta_value(att.q).device
    steps, operands = list(att.steps), list(att.operands)
    with graph.inserting_before(att.out):
        key = (tuple(steps), tuple(operands), att.causal, q_len, kv_len)
        if key not in allowed:
            both = graph.call_function(allowed_blocks, (steps, operands, att.causal, q_len, kv_len,
                                                        cfg.tuning.attn_block, device))
            allowed[key] = tuple(graph.call_function(operator.getitem, (both, i)) for i in range(2))
        any_block, all_block = allowed[key]
        keep = any_block if cfg.attn_density == 1.0 else graph.call_function(predict_blocks, (
            att.q, att.k, any_block, steps, operands, att.causal, cfg.tuning.attn_block, cfg.attn_density,
            cfg.tuning.attn_predictor))
        out = graph.call_function(block_attention, (att.q, att.k, att.v, keep, all_block, steps, operands,
                                                    att.causal, cfg.tuning.attn_block, att.enable_gqa,
                                                    kernel, cfg.tuning.attn_expand_kv))
        out_dtype = meta_value(att.out).dtype
        if out_dtype != meta_value(att.v).dtype:
            out = graph.call_function(torch.ops.aten._to_copy.default, (out,), {"dtype": out_dtype})
    replace_uses(att.out, out)
