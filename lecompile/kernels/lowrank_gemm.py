"""A dense GEMM with a low-rank term in its reduction: ``y = a @ w.T + c @ e.T + bias``.

The base GEMM of a LoRA linear and LoRA's B-projection in one kernel: after the ``K`` steps of
``a @ w.T`` the same accumulator takes one more step of depth ``r`` (``c [M, r]``, ``e [N, r]``),
then the bias. The LoRA update ``[M, N]`` is never written to memory nor read back by an add,
which is the whole cost of the adapter's B-projection at PEFT's ranks. The backward's input
gradient has the same form: ``dx = dy @ W + dxa @ A`` is :func:`linear_low_rank` with ``w = W.T``
and ``e = A.T`` (views: each operand is read through a TMA descriptor in whichever of its two
layouts has unit stride).

The kernel is Triton's persistent TMA matmul (tutorial 09) with warp specialization: on the H100
with Triton 3.6 it ran at 0.85-1.04 of cuBLAS on the base GEMMs of OPT and LLaMA linears
(``benchmarks/results/profiles/lowrank_gemm.txt``). fp16 and bf16 operands, fp32 accumulation;
:func:`supports` says which calls it takes, from metadata only. :func:`linear_low_rank_ref` is
its PyTorch twin.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import AUTOTUNE_CACHE, _dot, _dot_fp32, _interpreting

if "warp_specialize" not in inspect.signature(tl.range).parameters:
    raise ImportError(f"lecompile.kernels.lowrank_gemm needs Triton >= 3.4, found {triton.__version__}")
Tensor = torch.Tensor
#: The largest depth of the kernel's low-rank step (:func:`rank_block`): ranks up to 64, or the
#: stacked ranks of linears sharing one A-projection (three of rank 16 round up to 64).
MAX_RANK = 64
_DTYPES = (torch.float16, torch.bfloat16)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, warp-specialized): the best of 18 configs on each
# OPT / LLaMA linear shape in the H100 sweep (profiles/lowrank_gemm.txt). The first came within 3%
# of the best on every shape where K <= N, the second within 3.2% where K > N, the third was the
# best of the 128x128 tilings (:func:`_configs_for_shape`).
_TILINGS = [(128, 256, 64, 8, 3, True), (128, 256, 64, 8, 3, False), (128, 128, 64, 4, 4, True),
            (128, 128, 64, 8, 4, True)]
#: A 128x128 tile's time over a 128x256 tile's of the same reduction, in the sweep's rows where
#: both tilings fill nearly whole rounds of the GPU's SMs (0.553-0.556).
_HALF_TILE_TIME = 0.556


def _configs():
    if _interpreting():  # the CPU interpreter: one small config keeps tests fast
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, WARP_SPECIALIZE=False), num_warps=1)]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, WARP_SPECIALIZE=ws), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s, ws in _TILINGS]


def _tiles(args, block_n: int) -> int:
    """How many ``128 x block_n`` tiles the launch's output has."""
    return triton.cdiv(args["M"], 128) * triton.cdiv(args["N"], block_n)


def _rounds(args, block_n: int) -> int:
    """How many tiles of ``128 x block_n`` each of the persistent kernel's programs takes, at most."""
    return triton.cdiv(_tiles(args, block_n), args["NUM_SMS"])


def _configs_for_shape(configs, named_args, **kwargs):
    """The configs worth compiling for this launch. Where the sweep's shapes say which (outputs
    that fill the GPU with 128x256 tiles, rank at most 16), one: 128x256 tiles, warp-specialized
    unless ``K > N`` (autotuning, which under ``torch.compile`` means Inductor compiles every
    config and times them all in the first step, gained at most 3.2% there), or 128x128 tiles
    where they take less time by rounds of tiles: 192 tiles of 128x256 (Qwen2's 1536-wide
    outputs at 4096 tokens) take two rounds on 132 SMs, the second with 60 tiles, 384 of 128x128
    three. That rule picks the faster of the two on all 16 rows of the sweep. Elsewhere every
    config that fits in shared memory, autotuned."""
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}
    configs = [c for c in configs if _fits(c, args)]
    swept = not args["LOW_RANK"] or args["RANK"] == 16
    if not swept or _tiles(args, 256) < args["NUM_SMS"]:
        return configs
    if _HALF_TILE_TIME * _rounds(args, 128) < _rounds(args, 256):
        return [next(c for c in configs if c.kwargs["BLOCK_N"] == 128 and c.num_warps == 4)]
    specialize = args["K"] <= args["N"]
    return [next(c for c in configs if c.kwargs["BLOCK_N"] == 256 and c.kwargs["WARP_SPECIALIZE"] == specialize)]


def _fits(config, args) -> bool:
    """Whether ``config`` fits in a Hopper SM's 227 KiB of shared memory: the warp-specialized
    128x256 tiling keeps the low-rank step's tiles beside its three stages: 220 KiB at rank 16,
    232 at 32, 256 at 64 (Triton 3.6 and 3.9 compiling for sm_90 agree)."""
    return not (config.kwargs["WARP_SPECIALIZE"] and config.kwargs["BLOCK_N"] == 256
                and args["LOW_RANK"] and args["RANK"] > 16)


@triton.jit
def _tile(tile_id, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Row and column tile of ``tile_id``, in groups of ``GROUP_M`` row tiles per column band
    (L2 reuse of the weight tiles)."""
    per_group = GROUP_M * tiles_n
    first_m = (tile_id // per_group) * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (tile_id % per_group) % size_m, (tile_id % per_group) // size_m


@triton.jit
def _operand(ptr, rows, cols, stride, KMAJOR: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """TMA descriptor of a ``[rows, cols]`` operand stored as is (``KMAJOR``) or as its transpose."""
    if KMAJOR:  # a constexpr branch: each compiled kernel has one descriptor type here
        desc = tl.make_tensor_descriptor(ptr, shape=[rows, cols], strides=[stride, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_COLS])
    else:
        desc = tl.make_tensor_descriptor(ptr, shape=[cols, rows], strides=[stride, 1],
                                         block_shape=[BLOCK_COLS, BLOCK_ROWS])
    return desc


@triton.jit
def _dot_operand(acc, a, desc, row, col, KMAJOR: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc + a @ tile.T`` for the ``[rows, cols]`` operand's tile at ``(row, col)``."""
    if KMAJOR:
        acc = _dot(a, desc.load([row, col]).T, acc, "tf32", DOT_FP32)
    else:
        acc = _dot(a, desc.load([col, row]), acc, "tf32", DOT_FP32)
    return acc


@triton.autotune(configs=_configs(), key=["M", "N", "K", "W_KMAJOR", "RANK"],
                 prune_configs_by={"early_config_prune": _configs_for_shape}, **AUTOTUNE_CACHE)
@triton.jit
def _linear_low_rank_kernel(a_ptr, w_ptr, c_ptr, e_ptr, bias_ptr, out_ptr, M, N, K, R,
                            stride_a, stride_w, stride_c, stride_e,
                            W_KMAJOR: tl.constexpr, E_KMAJOR: tl.constexpr, RANK: tl.constexpr,
                            LOW_RANK: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_SMS: tl.constexpr,
                            DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, GROUP_M: tl.constexpr):
    # Descriptors made on the device: TMA fills tiles past the edges with zeros on loads (the
    # ragged K, and the rank padded to RANK) and drops them on stores.
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_a, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = _operand(w_ptr, N, K, stride_w, W_KMAJOR, BLOCK_N, BLOCK_K)
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    if LOW_RANK:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, R], strides=[stride_c, 1], block_shape=[BLOCK_M, RANK])
        e_desc = _operand(e_ptr, N, R, stride_e, E_KMAJOR, BLOCK_N, RANK)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=WARP_SPECIALIZE,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile(tile_id, tiles_m, tiles_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            acc = _dot_operand(acc, a_desc.load([om, k]), w_desc, on, k, W_KMAJOR, DOT_FP32)
        if LOW_RANK:  # one more reduction step, of depth RANK
            acc = _dot_operand(acc, c_desc.load([om, 0]), e_desc, on, 0, E_KMAJOR, DOT_FP32)
        if HAS_BIAS:
            offs_n = on + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out_desc.store([om, on], acc.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _unit_stride_dim(t: Tensor) -> Optional[int]:
    """The dimension of a 2-D ``t`` with unit stride whose other stride TMA can take (16-byte
    aligned), preferring the last; ``None`` if neither."""
    size = t.element_size()
    for dim in (1, 0):
        if t.stride(dim) == 1 and (t.stride(1 - dim) * size) % 16 == 0 and t.storage_offset() * size % 16 == 0:
            return dim
    return None


def rank_block(r: int) -> int:
    """The depth of the kernel's low-rank step for rank ``r``: ``r`` rounded up to a power of two
    of at least 16 (``tl.dot``'s smallest)."""
    return max(16, triton.next_power_of_2(r))


def supports_dims(dtype: torch.dtype, k: int, n: int, r: Optional[int] = None) -> bool:
    """Whether the kernel takes ``[M, k] @ [n, k].T`` (with a rank-``r`` term) in ``dtype``: fp16
    or bf16, ``k``, ``n`` and ``r`` multiples of 8 (TMA's 16-byte strides), ``r`` rounded up
    within :data:`MAX_RANK`."""
    return (dtype in _DTYPES and k % 8 == 0 and n % 8 == 0
            and (r is None or (r % 8 == 0 and rank_block(r) <= MAX_RANK)))


def unsupported_device(device: torch.device) -> str:
    """Why the kernel does not run on ``device``, or ``""`` where it does: a Hopper GPU (compute
    capability 9.x, where it was swept, timed and checked), or the CPU in Triton's interpreter.
    Compiled for other GPUs on the CPU (Triton 3.9): for Blackwell (sm_100) Triton rejects its
    warp-specialized configs, consumer Blackwell (sm_120) lacks the shared memory for any of them,
    and before Hopper (sm_80, sm_89) there is no TMA: it compiles without its pipelining and was
    never timed there."""
    if device.type == "cpu":
        return "" if _interpreting() else "the CPU (outside Triton's interpreter)"
    if device.type != "cuda":
        return f"a {device.type} device"
    major, minor = torch.cuda.get_device_capability(device)
    return "" if major == 9 else f"a GPU of compute capability {major}.{minor} (the kernel is built for Hopper, 9.x)"


def supports(a: Tensor, weight: Tensor, low_rank: Optional[Tuple[Tensor, Tensor]] = None,
             bias: Optional[Tensor] = None) -> bool:
    """Whether :func:`linear_low_rank` runs the kernel for these operands, decided from metadata
    only (so a fake tensor gets the same answer): a Hopper GPU (or Triton's CPU interpreter), one dtype
    throughout, 2-D operands of matching shapes and :func:`supports_dims`. Layouts do not
    matter: operands TMA cannot read as they are are made contiguous."""
    tensors = [a, weight] + list(low_rank or ()) + ([bias] if bias is not None else [])
    if unsupported_device(a.device):
        return False
    if any(t.dtype != a.dtype or t.device != a.device for t in tensors):
        return False
    if a.dim() != 2 or weight.dim() != 2 or a.shape[1] != weight.shape[1]:
        return False
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return False
    r = None
    if low_rank is not None:
        c, e = low_rank
        if c.dim() != 2 or e.dim() != 2 or c.shape[0] != a.shape[0] or tuple(e.shape) != (weight.shape[0], c.shape[1]):
            return False
        r = c.shape[1]
    return supports_dims(a.dtype, a.shape[1], weight.shape[0], r)


def _operand_layout(t: Tensor, transposable: bool) -> Tuple[Tensor, bool]:
    """``(storage view, K-major)``: the 2-D operand ``t`` (``[rows, K]`` as the GEMM reads it)
    as the kernel reads it, itself (K-major) or, for operands the kernel reads either way
    (``transposable``), its transpose. Other layouts are copied contiguous."""
    dim = _unit_stride_dim(t)
    if dim is None or (dim == 0 and not transposable):
        return t.contiguous(), True
    return (t, True) if dim == 1 else (t.t(), False)


def _allocate_descriptor_memory(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_allocator() -> None:
    """Device-side TMA descriptors live in scratch memory that Triton asks its allocator for;
    set one (a torch allocation) unless the user or Inductor already did."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_allocate_descriptor_memory)


def linear_low_rank(a: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                    low_rank: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """``a @ weight.T + c @ e.T + bias`` for ``low_rank = (c [M, r], e [N, r])``, in ``a.dtype``
    with fp32 accumulation; ``a [M, K]``, ``weight [N, K]`` in either layout. Raises
    ``ValueError`` for operands :func:`supports` rejects. Traceable (``wrap_triton``), so the op
    around it can be a ``torch.library.triton_op`` whose launch Inductor writes itself."""
    from torch.library import wrap_triton
    if not supports(a, weight, low_rank, bias):
        device = unsupported_device(a.device)
        raise ValueError(f"linear_low_rank: unsupported operands: a {tuple(a.shape)} {a.dtype} on {a.device}, "
                         f"weight {tuple(weight.shape)} {weight.dtype}"
                         + (f", low rank {tuple(low_rank[0].shape)} x {tuple(low_rank[1].shape)}" if low_rank else "")
                         + (f": the kernel does not run on {device}" if device else
                            f" (one dtype of fp16/bf16, K, N and r multiples of 8, r <= {MAX_RANK})"))
    m, n = a.shape[0], weight.shape[0]
    out = torch.empty(m, n, device=a.device, dtype=a.dtype)
    if m == 0 or n == 0:
        return out
    a, _ = _operand_layout(a, transposable=False)
    weight, w_kmajor = _operand_layout(weight, transposable=True)
    c, e, e_kmajor, r = a, weight, True, 0
    if low_rank is not None:
        c, _ = _operand_layout(low_rank[0], transposable=False)
        e, e_kmajor = _operand_layout(low_rank[1], transposable=True)
        r = low_rank[0].shape[1]
    if a.is_cuda:
        _ensure_allocator()
        sms = _num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device())
    else:
        sms = 4
    grid = lambda meta: (min(sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)  # noqa: E731
    # Triton launches on the current device (and the descriptors' scratch memory comes from it)
    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
        wrap_triton(_linear_low_rank_kernel)[grid](
            a, weight, c, e, bias if bias is not None else out, out, m, n, a.shape[1], r,
            a.stride(0), weight.stride(0), c.stride(0), e.stride(0), W_KMAJOR=w_kmajor, E_KMAJOR=e_kmajor,
            RANK=rank_block(r) if r else 16, LOW_RANK=low_rank is not None, HAS_BIAS=bias is not None,
            NUM_SMS=sms, DOT_FP32=_dot_fp32(a.dtype), GROUP_M=8)
    return out


def linear_low_rank_ref(a: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        low_rank: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """PyTorch twin of :func:`linear_low_rank`: fp32 math, one rounding to ``a.dtype``."""
    y = a.float() @ weight.float().t()
    if low_rank is not None:
        y = y + low_rank[0].float() @ low_rank[1].float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(a.dtype)
