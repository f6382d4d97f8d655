"""Attention block predictors: which (query block, key block) pairs each head computes.

Long Exposure's attention exposer finds that each head's attention concentrates on a few
*atomic* block layouts, different per head: attention sinks and other vertical columns (every
query block reads key block ``j``), the local window and other diagonal bands (query block ``i``
reads ``i - o``), :func:`atomic_layouts`. At run time a predictor scores them per (sequence,
head) and keeps the best ones under a block budget (:func:`choose_layouts`), always with the
diagonal block (every query sees itself) and the sink.

Scores (``[B, H, n, m]`` attention mass per block pair, rows summing to 1):

- ``"pooled"``: softmax of block-mean queries against block-mean keys: ``O(n m d)``, no dense pass;
- ``"oracle"``: exact block mass of the dense attention probabilities (costs a dense pass; tests
  and upper bounds).

The output is a bool block mask with static shape: the number of kept blocks varies, the
capacity does not.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from ..ops.argsort import argsort
from ..ops.block_attention import Operand, leading_scale, masked_scores

Tensor = torch.Tensor

SELECTION_ROUNDS = 2


def atomic_layouts(n: int, m: int, device=None) -> Tuple[Tensor, Tuple[str, ...]]:
    """The atomic layouts for ``n`` query blocks and ``m`` key blocks, as bool ``[P, n, m]``
    with their names: ``column j`` for every key block, ``diagonal o`` for every offset (query
    block ``i`` reads key block ``i + (m - n) - o``; ``diagonal 0`` is the causal diagonal).
    Callers intersect them with the positions the scores allow."""
    rows = torch.arange(n, device=device)[:, None]
    cols = torch.arange(m, device=device)[None, :]
    columns = (cols[None] == torch.arange(m, device=device)[:, None, None]).expand(m, n, m)
    offsets = sorted(range(1 - n, m), key=abs)  # diagonal 0 first
    diagonals = (rows + (m - n) - cols)[None] == torch.tensor(offsets, device=device)[:, None, None]
    names = tuple(f"column {j}" for j in range(m)) + tuple(f"diagonal {o}" for o in offsets)
    return torch.cat([columns, diagonals]), names


def choose_layouts(mass: Tensor, allowed: Tensor, density: float) -> Tensor:
    """Per (sequence, head), the union of the atomic layouts with the most attention mass per block,
    within ``density`` of the allowed blocks. ``mass [B, H, n, m]``, ``allowed`` bool broadcastable
    to it. Returns bool ``[B, H, n, m]``. The causal diagonal (``diagonal 0``) and the sink
    (``column 0``) are always kept. The same choice as :func:`choose_layouts_ref`, in ``O(n m)`` per
    head instead of ``O((n + m) n m)``: a layout's cost and gain are its column's or its
    diagonal's sums, and the grid skewed so that diagonals become columns sums them all at once."""
    B, H, n, m = mass.shape
    allowed = allowed.expand(B, H, n, m)
    offsets = sorted(range(1 - n, m), key=abs)  # the diagonals in atomic_layouts' order
    skewed_at = torch.tensor([o + n - 1 for o in offsets], device=mass.device)  # each one's skewed column
    rows = torch.arange(n, device=mass.device)[:, None]
    cols = torch.arange(m, device=mass.device)[None, :]
    diagonal_of = torch.empty(n + m - 1, dtype=torch.long, device=mass.device)
    diagonal_of[skewed_at] = torch.arange(n + m - 1, device=mass.device)
    diagonal_of = diagonal_of[rows - cols + m - 1]                        # [n, m]: each block's diagonal
    budget = density * allowed.flatten(2).sum(-1, keepdim=True)
    keep = allowed & ((cols == 0) | (diagonal_of == 0))                   # column 0, diagonal 0
    # Greedy by mass per new block; a layout's cost is the blocks it adds, which overlap makes
    # smaller once others are kept, so a second round spends what the first left over.
    for _ in range(SELECTION_ROUNDS):
        new = allowed & ~keep
        count, gained = new.float(), torch.where(new, mass, 0.0)
        cost = torch.cat([count.sum(-2), _diagonal_sums(count, skewed_at)], -1)       # [B, H, P]
        gain = torch.cat([gained.sum(-2), _diagonal_sums(gained, skewed_at)], -1)
        picked = _pick(cost, gain, keep, budget)
        added = picked[..., None, :m] | picked[..., m:][..., diagonal_of]
        keep = keep | added & allowed
    return keep


def _diagonal_sums(x: Tensor, skewed_at: Tensor) -> Tensor:
    """Sums of ``x [..., n, m]`` along each diagonal, in the order ``skewed_at`` gives: row ``i``
    of the columns-reversed grid shifted right by ``i`` puts diagonal ``o`` in column ``o + n - 1``."""
    *lead, n, m = x.shape
    padded = torch.nn.functional.pad(x.flip(-1), (0, n)).flatten(-2)
    return padded[..., : n * (n + m - 1)].reshape(*lead, n, n + m - 1).sum(-2).index_select(-1, skewed_at)


def choose_layouts_ref(mass: Tensor, allowed: Tensor, density: float) -> Tensor:
    """Reference of :func:`choose_layouts`: every atomic layout of :func:`atomic_layouts` as an
    explicit mask, each one's cost and gain a reduction over the whole grid."""
    B, H, n, m = mass.shape
    allowed = allowed.expand(B, H, n, m)
    flat = atomic_layouts(n, m, mass.device)[0].flatten(1)                # bool [P, n*m]
    budget = density * allowed.flatten(2).sum(-1, keepdim=True)
    keep = allowed & (flat[0] | flat[m]).reshape(n, m)                    # column 0, diagonal 0
    for _ in range(SELECTION_ROUNDS):
        new = (allowed & ~keep).flatten(2)[:, :, None, :] & flat          # [B, H, P, n*m]
        cost = new.sum(-1, dtype=torch.float32)
        gain = torch.where(new, mass.flatten(2)[:, :, None, :], 0.0).sum(-1)
        picked = _pick(cost, gain, keep, budget)
        keep = keep | (picked[..., None] & flat).any(-2).reshape(B, H, n, m) & allowed
    return keep


def _pick(cost: Tensor, gain: Tensor, keep: Tensor, budget: Tensor) -> Tensor:
    """One greedy round: bool ``[B, H, P]``, the layouts taken in order of gain per new block while
    the blocks kept so far (``keep [B, H, n, m]``) and theirs (``cost [B, H, P]``) fit ``budget``."""
    ratio = torch.where(cost > 0, gain / cost.clamp(min=1), -1.0)
    order = argsort(ratio, descending=True, stable=True)
    spent = cost.gather(-1, order).cumsum(-1) + keep.flatten(2).sum(-1, keepdim=True)
    chosen = (spent <= budget) & (ratio.gather(-1, order) >= 0)
    return torch.zeros_like(chosen).scatter(-1, order, chosen)


def pooled_mass(q: Tensor, k: Tensor, allowed: Tensor, scale: float, block: int) -> Tensor:
    """Softmax over key blocks of block-mean queries against block-mean keys: ``[B, H, n, m]``."""
    B, H, L, D = q.shape
    q_blocks = q.float().reshape(B, H, L // block, block, D).mean(3)
    k_blocks = k.float().reshape(B, k.shape[1], k.shape[2] // block, block, D).mean(3)
    if k_blocks.shape[1] != H:
        k_blocks = k_blocks.repeat_interleave(H // k_blocks.shape[1], dim=1)
    scores = (q_blocks @ k_blocks.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1).nan_to_num(0.0)


def oracle_mass(q: Tensor, k: Tensor, steps: Sequence[str], operands: Sequence[Operand], causal: bool,
                block: int) -> Tensor:
    """Exact attention mass per block pair (mean over the queries of a block): ``[B, H, n, m]``."""
    probs = masked_scores(q, k, steps, operands, causal, enable_gqa=True).softmax(-1).nan_to_num(0.0)
    B, H, L, S = probs.shape
    return probs.reshape(B, H, L // block, block, S // block, block).sum(-1).mean(-2)


METHODS = ("pooled", "oracle")


@torch.no_grad()
def predict_blocks(q: Tensor, k: Tensor, allowed: Tensor, steps: Sequence[str], operands: Sequence[Operand],
                   causal: bool, block: int, density: float, method: str) -> Tensor:
    """The blocks each (sequence, head) computes: bool ``[B, H, L / block, S / block]``.

    ``allowed`` is the ``any`` half of :func:`~lecompile.ops.block_attention.allowed_blocks`;
    ``steps``/``operands``/``causal`` describe the scores as for
    :func:`~lecompile.ops.block_attention.block_attention`. Inputs are read without gradient.
    """
    if method not in METHODS:
        raise ValueError(f"predict_blocks: method must be one of {METHODS}, got {method!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"predict_blocks: density must be in (0, 1], got {density!r}")
    q, k = q.detach(), k.detach()
    if method == "pooled":
        mass = pooled_mass(q, k, allowed, leading_scale(steps, operands)[0], block)
    else:
        mass = oracle_mass(q, k, steps, operands, causal, block)
    return choose_layouts(mass, allowed, density)


def transformers_attention(density: float, block: int, method: str = "pooled", choose=None, kept=None):
    """An attention function for transformers' ``AttentionInterface`` (the SDPA signature) that
    runs the reference block-sparse attention with this module's predictor: the eager twin of
    what the backend compiles, for references and accuracy studies.

    ``choose(query, key, allowed) -> keep`` replaces the predictor; ``kept`` (a list) receives
    the share of allowed blocks each call keeps."""
    from ..ops.block_attention import allowed_blocks, block_attention_ref

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                  softcap=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        steps, operands = ["mul"], [scale]
        if softcap is not None:  # Gemma 2's logit soft-capping
            steps, operands = steps + ["div", "tanh", "mul"], operands + [softcap, None, softcap]
        causal = attention_mask is None
        if not causal:
            steps, operands = steps + ["mask"], operands + [attention_mask]
        any_b, _ = allowed_blocks(steps, operands, causal, query.shape[-2], key.shape[-2], block, query.device)
        if choose is not None:
            keep = choose(query, key, any_b)
        else:
            keep = predict_blocks(query, key, any_b, steps, operands, causal, block, density, method)
        if kept is not None:
            kept.append((keep.sum((-1, -2)).float() / any_b.sum((-1, -2))).mean().item())
        out = block_attention_ref(query, key, value, keep, steps, operands, causal, block, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return attention
