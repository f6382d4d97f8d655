"""Block-sparse attention: attention restricted to a chosen set of (query block, key block) pairs.

The scores are described the way the model's graph computes them: ``q @ k.T`` followed by
``steps``, each one of

- ``("mul", x)`` / ``("div", x)``: multiply or divide by a number or a broadcastable tensor;
- ``("add", m)``: add a broadcastable tensor (an additive mask);
- ``("mask", m)``: keep scores where the boolean tensor ``m`` is True (SDPA's boolean mask);
- ``("tanh", None)``: ``tanh`` of the scores (Gemma 2's logit soft-capping ``c * tanh(s / c)`` is
  ``div c``, ``tanh``, ``mul c``); masks belong after it, where they still mask;

plus ``causal`` (query ``i`` sees keys ``j <= i``). The block mask ``keep [B, H, L / block,
S / block]`` says which blocks are computed; everything outside is masked out, so the result is
the dense attention of the same scores with the blocks outside ``keep`` masked.

Two implementations with the same semantics, picked by device:

- :func:`block_attention_ref`: dense scores, masked, softmax, ``@ v`` (the reference; CPU);
- :func:`block_attention_flex`: FlexAttention with a :class:`~torch.nn.attention.flex_attention.BlockMask`
  built directly from ``keep`` (no per-step mask evaluation); blocks whose every position is
  allowed skip the mask function. Inside a compiled graph Inductor lowers it to its fused Triton
  kernels, forward and backward.

These are plain functions, not custom ops: the compiler traces through them, so FlexAttention's
higher-order op reaches Inductor.
"""

from __future__ import annotations

import importlib.util
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_hop
from torch._subclasses.fake_tensor import is_fake
from torch.nn.attention.flex_attention import BlockMask, _apply_kernel_options, flex_attention

from .argsort import argsort

Tensor = torch.Tensor
Operand = Union[float, int, Tensor, None]

STEP_KINDS = ("mul", "div", "add", "mask", "tanh")


def check_steps(steps: Sequence[str], operands: Sequence[Operand]) -> None:
    if len(steps) != len(operands):
        raise ValueError(f"block attention: {len(steps)} steps but {len(operands)} operands")
    for kind, x in zip(steps, operands):
        if kind not in STEP_KINDS:
            raise ValueError(f"block attention: step must be one of {STEP_KINDS}, got {kind!r}")
        if kind in ("add", "mask") and not isinstance(x, Tensor):
            raise ValueError(f"block attention: a {kind!r} step needs a tensor, got {type(x).__name__}")
        if kind == "mask" and x.dtype != torch.bool:
            raise ValueError(f"block attention: a 'mask' step needs a bool tensor, got {x.dtype}")
        if kind in ("mul", "div") and not isinstance(x, (int, float, Tensor)):
            raise ValueError(f"block attention: a {kind!r} step needs a number or a tensor, got {type(x).__name__}")
    if "tanh" in steps and "mask" in steps[:_last_tanh(steps)]:
        raise ValueError("block attention: a 'mask' step before 'tanh' would not mask")


def _last_tanh(steps: Sequence[str]) -> int:
    """The index of the last ``tanh`` step, or -1: additive masks before it no longer mask."""
    # A plain loop: Dynamo traces this inside a user's torch.compile, and it cannot trace
    # ``max`` over a generator with ``default``
    last = -1
    for i, kind in enumerate(steps):
        if kind == "tanh":
            last = i
    return last


def leading_scale(steps: Sequence[str], operands: Sequence[Operand]) -> Tuple[float, int]:
    """The product of the leading scalar ``mul``/``div`` steps, and how many steps that is."""
    scale, n = 1.0, 0
    for kind, x in zip(steps, operands):
        if kind not in ("mul", "div") or isinstance(x, Tensor):
            break
        scale = scale * x if kind == "mul" else scale / x
        n += 1
    return scale, n


def allowed_blocks(steps: Sequence[str], operands: Sequence[Operand], causal: bool, q_len: int,
                   kv_len: int, block: int, device) -> Tuple[Tensor, Tensor]:
    """``(any, all)`` of the positions the scores allow, per block: bool ``[B', H', L/block, S/block]``
    (``B'``, ``H'`` are 1 where no mask has those dims). A position is allowed when it is causal
    (if ``causal``), every ``mask`` step is True there and every ``add`` step is above
    ``finfo.min / 2`` (transformers' additive masks use ``finfo.min``), counting only the steps
    after the last ``tanh``. Without such masks the blocks come from their corners: the graph
    computes ``n m`` values per step, not the ``L S`` of a token mask (a GiB at 32k tokens)."""
    masks = token_masks(steps, operands)
    if not masks:
        return _causal_blocks(causal, q_len, kv_len, block, device)
    allowed = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril(kv_len - q_len)
    for x in masks:
        allowed = allowed & (x if x.dtype == torch.bool else x > torch.finfo(x.dtype).min / 2)
    tiles = allowed.reshape(*allowed.shape[:2], q_len // block, block, kv_len // block, block)
    return tiles.any(-1).any(-2), tiles.all(-1).all(-2)


def token_masks(steps: Sequence[str], operands: Sequence[Operand]) -> List[Tensor]:
    """The operands that mask token positions: ``mask`` steps and additive ones of two dims or more
    (transformers' ``finfo.min`` masks), after the last ``tanh`` (before it they do not mask)."""
    start = _last_tanh(steps) + 1
    return [x for kind, x in zip(steps[start:], operands[start:])
            if kind == "mask" or (kind == "add" and isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2)]


def _causal_blocks(causal: bool, q_len: int, kv_len: int, block: int, device) -> Tuple[Tensor, Tensor]:
    """``(any, all)`` of the causal mask per block (query ``i`` sees key ``j <= i + kv_len - q_len``):
    a block has an allowed position if its last query sees its first key, and all allowed if its
    first query sees its last key. Without ``causal`` every block is full."""
    n, m = q_len // block, kv_len // block
    if not causal:
        full = torch.ones(1, 1, n, m, dtype=torch.bool, device=device)
        return full, full
    first_query = torch.arange(n, device=device)[:, None] * block + (kv_len - q_len)
    first_key = torch.arange(m, device=device)[None, :] * block
    any_b = first_query + block - 1 >= first_key
    all_b = first_query >= first_key + block - 1
    return any_b[None, None], all_b[None, None]


def block_attention_ref(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, steps: Sequence[str],
                        operands: Sequence[Operand], causal: bool, block: int,
                        enable_gqa: bool = False) -> Tensor:
    """Reference: dense scores with ``steps`` applied, blocks outside ``keep`` masked, softmax in
    fp32, ``@ v``. ``q [B, H, L, D]``, ``k``/``v [B, Hkv, S, D]``, ``keep`` bool
    ``[B | 1, H | 1, L / block, S / block]``."""
    scores = masked_scores(q, k, steps, operands, causal, enable_gqa)
    if enable_gqa and v.shape[1] != q.shape[1]:
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    allowed = keep.repeat_interleave(block, -2).repeat_interleave(block, -1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A query with no allowed key (left padding) gets zeros, as in FlexAttention and SDPA.
    return scores.softmax(-1).nan_to_num(0.0).to(v.dtype) @ v


def masked_scores(q: Tensor, k: Tensor, steps: Sequence[str], operands: Sequence[Operand], causal: bool,
                  enable_gqa: bool = False) -> Tensor:
    """The dense scores ``q @ k.T`` (fp32 at least) with ``steps`` and the causal mask applied (-inf where masked)."""
    check_steps(steps, operands)
    if enable_gqa and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
    for kind, x in zip(steps, operands):
        if kind == "mul":
            scores = scores * x
        elif kind == "div":
            scores = scores / x
        elif kind == "add":
            scores = scores + x
        elif kind == "tanh":
            scores = scores.tanh()
        else:
            scores = scores.masked_fill(~x, float("-inf"))
    if causal:
        q_len, kv_len = scores.shape[-2:]
        causal_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        scores = scores.masked_fill(~causal_mask, float("-inf"))
    return scores


def kv_block_lists(blocks: Tensor) -> Tuple[Tensor, Tensor]:
    """``(num [B, H, n], indices [B, H, n, m])`` of the True entries of ``blocks [B, H, n, m]``,
    each row's kept indices first and ascending (FlexAttention's ``kv_num_blocks``/``kv_indices``)."""
    num = blocks.sum(-1, dtype=torch.int32)
    order = argsort(blocks.to(torch.int8), descending=True, stable=True)
    return num, order.to(torch.int32)


def block_mask(partial: Tensor, full: Tensor, block: int, seq_lengths: Tuple[int, int], mask_mod) -> BlockMask:
    """FlexAttention's block mask of the blocks in ``partial`` (``mask_mod`` evaluated in them) and
    ``full`` (not), both bool ``[B, H, n, m]``. The query blocks' lists, which the backward reads,
    come from the transposed masks as the key blocks' do: ``BlockMask.from_kv_blocks`` would derive
    them with ``torch.argsort``, which Inductor compiles into a sort kernel of its own (see
    :mod:`.argsort`)."""
    (num, idx), (full_num, full_idx), (q_num, q_idx), (full_q_num, full_q_idx) = (
        kv_block_lists(x) for x in (partial, full, partial.transpose(-2, -1), full.transpose(-2, -1)))
    return BlockMask(seq_lengths=seq_lengths, kv_num_blocks=num, kv_indices=idx, full_kv_num_blocks=full_num,
                     full_kv_indices=full_idx, q_num_blocks=q_num, q_indices=q_idx, full_q_num_blocks=full_q_num,
                     full_q_indices=full_q_idx, BLOCK_SIZE=(block, block), mask_mod=mask_mod)


def flex_backward_tiles(q: Tensor) -> Optional[List[Tuple[int, int, int, int]]]:
    """The tiles ``(BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2)`` of the backward kernel configs
    Inductor tries for FlexAttention on ``q``'s GPU, or None where no limit is known (CPU, or a
    PyTorch without this query). Inductor drops the configs whose tiles do not divide the block
    size before our ``kernel_options`` apply, and fails to compile when none is left (H100, head
    dims 64 to 128: only 128-wide tiles, so 64-token blocks cannot train)."""
    if q.device.type != "cuda":
        return None
    try:
        from torch._inductor.choices import InductorChoices
        configs = InductorChoices().get_flex_attention_bwd_configs(q.shape[-1], q.dtype, "cuda")
    except (ImportError, AttributeError):
        return None
    return [(c.block_m1, c.block_n1, c.block_m2, c.block_n2) for c in configs]


def flash_missing() -> str:
    """What keeps FlashAttention 4's CuTe kernels (``flash_attn.cute``, on which FlexAttention's
    ``BACKEND="FLASH"`` runs) from importing here, or ``""``."""
    try:
        installed = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # a flash_attn without the cute subpackage
        installed = False
    if not installed:
        return "needs FlashAttention 4's CuTe kernels (flash_attn.cute, package flash-attn-4), which are not installed"
    if importlib.util.find_spec("cutlass") is None:
        # nvidia-cutlass-dsl puts ``cutlass`` on sys.path from a .pth file, which Python reads only in
        # site-packages; without it Inductor's generated code fails to import when it first runs.
        return ("needs the CUTLASS DSL's `cutlass` module, which is not importable (package nvidia-cutlass-dsl; "
                "installed with pip --target, put its nvidia_cutlass_dsl/dsl_packages folder on PYTHONPATH)")
    return ""


def flex_options(block: int, kernel: str) -> dict:
    """FlexAttention's kernel options for ``block`` on ``kernel`` (``"triton"`` or ``"flash"``)."""
    return {"BACKEND": "FLASH"} if kernel == "flash" else kernel_options(block)


def kernel_options(block: int) -> dict:
    """FlexAttention kernel tiles that divide ``block`` (its defaults assume blocks of 128)."""
    if block >= 128:
        return {}
    b = min(block, 64)
    half = max(16, b // 2)
    return {"fwd_BLOCK_M": b, "fwd_BLOCK_N": b,
            "bwd_BLOCK_M1": half, "bwd_BLOCK_N1": b, "bwd_BLOCK_M2": b, "bwd_BLOCK_N2": half}


def block_attention_flex(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, full: Tensor,
                         steps: Sequence[str], operands: Sequence[Operand], causal: bool, block: int,
                         enable_gqa: bool = False, kernel: str = "triton", expand_kv: bool = False) -> Tensor:
    """FlexAttention over the blocks in ``keep``; ``full`` marks kept blocks whose positions are
    all allowed (no mask evaluation there). Same semantics as :func:`block_attention_ref`.
    ``kernel``: FlexAttention's Triton kernels or, ``"flash"``, FlashAttention 4's; ``expand_kv``:
    key/value heads repeated to the query heads first (the kernels see no GQA)."""
    check_steps(steps, operands)
    if expand_kv and k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    B, H, q_len, _ = q.shape
    kv_len = k.shape[-2]
    keep = keep.expand(B, H, *keep.shape[-2:])
    full = full.expand(B, H, *full.shape[-2:]) & keep
    partial = keep & ~full
    scale, n_lead = leading_scale(steps, operands)
    rest = list(zip(steps[n_lead:], operands[n_lead:]))
    masks = [_fixed_layout(_as_4d(x)) for kind, x in rest if kind == "mask"]
    score_kinds = [kind for kind, _ in rest if kind != "mask"]
    score_operands = [_fixed_layout(_as_4d(x)) if isinstance(x, Tensor) else x for kind, x in rest if kind != "mask"]
    score_tensors = [x for x in score_operands if isinstance(x, Tensor)]
    offset = kv_len - q_len

    # Traced for Inductor (the backend's graph: fake tensors), blocks outside the lists are never
    # visited, so mask_mod needs only the model's own mask. FlexAttention's math implementation
    # (eager calls; Dynamo with another backend) evaluates mask_mod everywhere: there it must say
    # which blocks are kept too.
    dynamo = torch.compiler.is_dynamo_compiling()
    with_keep = dynamo or not is_fake(q)
    buffers = (keep, *masks) if with_keep else tuple(masks)

    def mask_mod(b, h, qi, ki, *buffers):
        ok = qi + offset >= ki if causal else qi >= 0
        if with_keep:
            keep, *buffers = buffers
            ok = ok & keep[b, h, qi // block, ki // block]
        for m in buffers:
            ok = ok & _at(m, b, h, qi, ki)
        return ok

    def score_mod(score, b, h, qi, ki, *tensors):
        tensors = iter(tensors)
        for kind, x in zip(score_kinds, score_operands):
            if kind == "tanh":
                score = torch.tanh(score)
                continue
            x = _at(next(tensors), b, h, qi, ki) if isinstance(x, Tensor) else x
            score = score * x if kind == "mul" else score / x if kind == "div" else score + x
        return score

    # Traced by Dynamo (a user's torch.compile around this function), the public API is called,
    # the one Dynamo reads; it lifts the tensors the closures capture as buffers.
    mask = block_mask(partial, full, block, (q_len, kv_len),
                      (lambda b, h, qi, ki: mask_mod(b, h, qi, ki, *buffers)) if dynamo else mask_mod)
    options = flex_options(block, kernel)
    if dynamo:
        return flex_attention(q, k, v, lambda s, b, h, qi, ki: score_mod(s, b, h, qi, ki, *score_tensors),
                              mask, scale=float(scale), enable_gqa=q.shape[1] != k.shape[1],
                              kernel_options=options)
    # The higher-order op itself, as flex_attention calls it under Dynamo: inside the backend's
    # graph AOTAutograd traces it and Inductor lowers it; run eagerly it is the unfused math
    # implementation, which also trains on the CPU.
    outputs = flex_attention_hop(q, k, v, score_mod, mask.as_tuple(), float(scale),
                                 _apply_kernel_options(q, k, v, False, options), tuple(score_tensors),
                                 tuple(buffers))
    return outputs[0]  # (out, logsumexp[, max_scores]) depending on the torch version


def _as_4d(x: Tensor) -> Tensor:
    return x if x.dim() in (0, 4) else x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))


def _fixed_layout(x: Tensor) -> Tensor:
    """``x``, the same view, through ``as_strided``, which Inductor lowers with the layout of ``x``'s
    storage fixed. Its FlexAttention lowering needs that of the tensors the mask and score functions
    read, and torch 2.11's does not fix it itself: a mask the graph computes (transformers' causal
    mask) failed it ("convert FlexibleLayout to FixedLayout first") under gradient checkpointing.
    Left as it is under Dynamo, which cannot trace ``storage_offset``."""
    if torch.compiler.is_dynamo_compiling():
        return x
    return x.as_strided(x.shape, x.stride(), x.storage_offset())


def _at(x: Tensor, b, h, qi, ki):
    """``x[b, h, qi, ki]`` of a 4-d (or 0-d) ``x``, broadcasting its size-1 dims."""
    if x.dim() == 0:
        return x
    index = [i if size > 1 else 0 for i, size in zip((b, h, qi, ki), x.shape)]
    return x[index[0], index[1], index[2], index[3]]


def block_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, full: Tensor, steps: List[str],
                    operands: List[Operand], causal: bool, block: int, enable_gqa: bool = False,
                    kernel: str = "triton", expand_kv: bool = False) -> Tensor:
    """Block-sparse attention: FlexAttention on CUDA (see :func:`block_attention_flex` for ``kernel``
    and ``expand_kv``), the dense reference elsewhere (FlexAttention's CPU kernels do not train).
    See the module docstring for the other arguments."""
    if q.device.type == "cuda":
        return block_attention_flex(q, k, v, keep, full, steps, operands, causal, block, enable_gqa, kernel,
                                    expand_kv)
    return block_attention_ref(q, k, v, keep, steps, operands, causal, block, enable_gqa)

