"""LoRA's A-projection inside the base GEMM's kernel: does sharing the input read pay?

The experiment behind lora_a_in_gemm.txt (not part of the package). lecompile's forward of a LoRA
linear runs two kernels: cuBLAS ``xa = x @ A_s.T`` (rank r), then ``linear_low_rank``, whose
reduction takes ``xa @ B.T`` as one more step. Here one kernel also accumulates ``x @ A_s.T`` in
its K loop, from the same ``x`` tiles it loads for ``x @ W.T`` (the shared read the issue asks
for), and writes ``xa`` (the backward's input to ``dB``) from the first column of tiles. Every
output tile must then compute its own ``xa`` rows: ``r / BLOCK_N`` more MMA work.

On the GPU, ``python lora_a_in_gemm.py OUT_DIR`` writes ``OUT_DIR/lora_a_in_gemm.json`` and prints
the table; GPU time of CUDA-graph replays (``do_bench_cudagraph``), as the backend's steps run.
With ``TRITON_INTERPRET=1`` it checks the fused kernel against PyTorch on small shapes.
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

from lecompile.kernels.common import _interpreting
from lecompile.kernels.lowrank_gemm import _num_sms, _tile, linear_low_rank, rank_block


@triton.jit
def fused_kernel(x_ptr, w_ptr, la_ptr, lb_ptr, xa_ptr, out_ptr, M, N, K, R, NUM_SMS: tl.constexpr,
                 RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 WS: tl.constexpr, GROUP_M: tl.constexpr):
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    la_desc = tl.make_tensor_descriptor(la_ptr, shape=[R, K], strides=[K, 1], block_shape=[RANK, BLOCK_K])
    lb_desc = tl.make_tensor_descriptor(lb_ptr, shape=[N, R], strides=[R, 1], block_shape=[BLOCK_N, RANK])
    xa_desc = tl.make_tensor_descriptor(xa_ptr, shape=[M, R], strides=[R, 1], block_shape=[BLOCK_M, RANK])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=WS, warp_specialize=WS):
        pid_m, pid_n = _tile(tile_id, tiles_m, tiles_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_a = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = x_desc.load([om, k])
            acc = tl.dot(x, w_desc.load([on, k]).T, acc)
            acc_a = tl.dot(x, la_desc.load([0, k]).T, acc_a)
        xa = acc_a.to(out_ptr.dtype.element_ty)
        acc = tl.dot(xa, lb_desc.load([on, 0]).T, acc)
        if pid_n == 0:
            xa_desc.store([om, 0], xa)
        out_desc.store([om, on], acc.to(out_ptr.dtype.element_ty))


def num_sms():
    return _num_sms(0) if torch.cuda.is_available() else 4  # the interpreter's check: a few programs


def fused(x, w, la, lb, cfg):
    """``(x @ w.T + (x @ la.T) @ lb.T, x @ la.T)`` in one launch; ``la [r, K]``, ``lb [N, r]``."""
    bm, bn, bk, stages, warps, ws = cfg
    m, n, r = x.shape[0], w.shape[0], la.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    xa = torch.empty(m, r, device=x.device, dtype=x.dtype)
    grid = (min(num_sms(), triton.cdiv(m, bm) * triton.cdiv(n, bn)),)
    fused_kernel[grid](x, w, la, lb, xa, out, m, n, x.shape[1], r, num_sms(), rank_block(r),
                       bm, bn, bk, ws, 8, num_stages=stages, num_warps=warps)
    return out, xa


def two_kernels(x, w, la, lb):
    """What the backend runs: the A-projection on cuBLAS, then the base GEMM with ``xa @ lb.T`` inside."""
    xa = x @ la.t()
    return linear_low_rank(x, w, low_rank=(xa, lb)), xa


def reference(x, w, la, lb):
    xa = (x.float() @ la.float().t()).to(x.dtype)
    return (x.float() @ w.float().t() + xa.float() @ lb.float().t()).to(x.dtype), xa


def check():
    torch.manual_seed(0)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    for m, n, k, r in ((64, 96, 80, 16), (48, 64, 32, 8)):
        # fp16: Triton's CPU interpreter gets bf16 dots wrong (see gather_gemm._dot)
        x, w = torch.randn(m, k).half(), (torch.randn(n, k) / k ** 0.5).half()
        la, lb = (torch.randn(r, k) / k ** 0.5).half(), torch.randn(n, r).half()
        got, want = fused(x, w, la, lb, (16, 32, 16, 2, 1, False)), reference(x, w, la, lb)
        for g, ref in zip(got, want):
            torch.testing.assert_close(g.float(), ref.float(), atol=5e-2, rtol=2e-2)
    print("fused kernel matches PyTorch")


CONFIGS = [(128, 256, 64, 3, 8, True), (128, 256, 64, 3, 8, False), (128, 128, 64, 4, 4, True),
           (128, 128, 64, 4, 8, True)]
# (input width, output width) of LoRA linears that read their input alone (no A-projection shared
# with another linear): attention out-projections and MLP linears
SHAPES = {"opt-1.3b out_proj": (2048, 2048), "opt-1.3b fc1": (2048, 8192), "opt-1.3b fc2": (8192, 2048),
          "llama-3.2-1b down_proj": (8192, 2048), "opt-2.7b out_proj": (2560, 2560),
          "llama-3-8b o_proj": (4096, 4096), "llama-3-8b down_proj": (14336, 4096)}


def bench(out_dir):
    from triton.testing import do_bench_cudagraph
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    tokens, rows = 4096, []
    for name, (d_in, d_out) in SHAPES.items():
        for r in (16, 32):
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(tokens, d_in, device="cuda", generator=g).bfloat16()
            w = (torch.randn(d_out, d_in, device="cuda", generator=g) / d_in ** 0.5).bfloat16()
            la = (torch.randn(r, d_in, device="cuda", generator=g) / d_in ** 0.5).bfloat16()
            lb = torch.randn(d_out, r, device="cuda", generator=g).bfloat16()
            want = reference(x, w, la, lb)
            two_kernels(x, w, la, lb)  # autotune outside the graph
            two_ms = do_bench_cudagraph(lambda: two_kernels(x, w, la, lb), rep=100)
            base_ms = do_bench_cudagraph(lambda: linear_low_rank(x, w, low_rank=(want[1], lb)), rep=100)
            best = None
            for cfg in CONFIGS:
                try:
                    got = fused(x, w, la, lb, cfg)
                    err = max(((g_.float() - w_.float()).abs().max() / w_.float().abs().max()).item()
                              for g_, w_ in zip(got, want))
                    ms = do_bench_cudagraph(lambda: fused(x, w, la, lb, cfg), rep=100)
                except Exception as exc:  # noqa: BLE001  (a config the compiler refuses is recorded)
                    rows.append(dict(case=name, rank=r, cfg=list(cfg), error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                    continue
                rows.append(dict(case=name, rank=r, cfg=list(cfg), fused_ms=ms, err=err, two_kernels_ms=two_ms,
                                 base_gemm_ms=base_ms))
                if err < 2e-2 and (best is None or ms < best[0]):
                    best = (ms, cfg)
            if best is None:
                print(f"{name:24s} r={r:2d}  no fused config ran", flush=True)
                continue
            print(f"{name:24s} r={r:2d}  two kernels {two_ms * 1e3:7.1f} us (GEMM alone {base_ms * 1e3:7.1f})  "
                  f"fused {best[0] * 1e3:7.1f} us {best[1]}  speedup {two_ms / best[0]:.3f}", flush=True)
    with open(os.path.join(out_dir, "lora_a_in_gemm.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       tokens=tokens, rows=rows), f, indent=1)


if __name__ == "__main__":
    if _interpreting():
        check()
    else:
        bench(sys.argv[1] if len(sys.argv) > 1 else ".")
