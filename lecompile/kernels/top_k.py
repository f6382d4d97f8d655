"""Sorted top-k indices per row in one launch: the predictor's last step.

``torch.topk`` followed by ``sort`` of the indices is two kernels, each tens of microseconds for
an ``[8, 8192]`` score matrix, on every MLP of every step. Here one program owns one row, held in
registers: a bisection over the scores' bit patterns (floats mapped to order-preserving
integers) finds the k-th largest score, and a prefix sum writes the kept neurons in index order.
Ties at the threshold keep the lowest indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Longest row one program holds (larger rows use ``torch.topk``).
MAX_ROW = 32768


@triton.jit
def _top_k_kernel(scores_ptr, out_ptr, N, K, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    valid = offs < N
    s = tl.load(scores_ptr + row * stride_row + offs, mask=valid, other=0.0).to(tl.float32)
    bits = s.to(tl.int32, bitcast=True)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)  # float order as integer order
    key = tl.where(valid, key, -2147483649)  # below every score
    lo = tl.full((), -2147483648, tl.int64)  # invariant: at least K keys >= lo
    hi = tl.full((), 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((key >= mid).to(tl.int32), axis=0) >= K
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    greater = key > lo
    tied = key == lo
    room = K - tl.sum(greater.to(tl.int32), axis=0)
    take = greater | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + row * K + pos, offs.to(tl.int64), mask=take)


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[G, k]`` (int64, ascending) of the ``k`` largest entries of each row of
    ``scores [G, n]``; ties at the k-th score keep the lowest indices."""
    if scores.dim() != 2:
        raise ValueError(f"top_k_sorted: scores must be [G, n], got shape {tuple(scores.shape)}")
    n = scores.shape[1]
    if not 0 < k <= n or n > MAX_ROW:
        raise ValueError(f"top_k_sorted: needs 0 < k <= n <= {MAX_ROW}, got k={k}, n={n}")
    scores = scores.contiguous()
    out = torch.empty(scores.shape[0], k, dtype=torch.int64, device=scores.device)
    block = triton.next_power_of_2(n)
    _top_k_kernel[(scores.shape[0],)](scores, out, n, k, scores.stride(0), BLOCK=block,
                                      num_warps=min(32, max(4, block // 512)))
    return out
