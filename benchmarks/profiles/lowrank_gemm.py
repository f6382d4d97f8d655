"""The persistent TMA GEMM vs cuBLAS on LoRA linears' base GEMMs, and with LoRA's term inside.

The experiment behind lowrank_gemm.txt (not part of the package; the kernel it led to is
``lecompile/kernels/lowrank_gemm.py``): on the GPU, ``python lowrank_gemm.py OUT_DIR`` writes
``OUT_DIR/lora_gemm_exp.json`` (stored here as lowrank_gemm.json); with ``TRITON_INTERPRET=1`` it
checks the kernel against PyTorch on small shapes.

out = a @ b(.T) [+ c @ e.T]  where c [M, R], e [N, R]: the low-rank term as one extra K step.
NT: b is [N, K] (forward y = x @ W.T); NN: b is [K, N] (backward dx = dy @ W).
"""
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M: tl.constexpr):
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def gemm_kernel(a_ptr, b_ptr, c_ptr, e_ptr, out_ptr, M, N, K,
                R: tl.constexpr, NN: tl.constexpr, LORA: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                NUM_SMS: tl.constexpr, PERSIST: tl.constexpr, WS: tl.constexpr, FLAT: tl.constexpr):
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    if NN:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    o_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    if LORA:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, R], strides=[R, 1], block_shape=[BM, R])
        e_desc = tl.make_tensor_descriptor(e_ptr, shape=[N, R], strides=[R, 1], block_shape=[BN, R])
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BK)
    num_pid_in_group = GROUP_M * num_pid_n
    if PERSIST:
        start, step = tl.program_id(0), NUM_SMS
    else:
        start, step = tl.program_id(0), num_tiles
    for tile_id in tl.range(start, num_tiles, step, flatten=FLAT, warp_specialize=WS):
        pid_m, pid_n = _pid(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([om, ki * BK])
            if NN:
                acc = tl.dot(a, b_desc.load([ki * BK, on]), acc)
            else:
                acc = tl.dot(a, b_desc.load([on, ki * BK]).T, acc)
        if LORA:
            acc = tl.dot(c_desc.load([om, 0]), e_desc.load([on, 0]).T, acc)
        o_desc.store([om, on], acc.to(out_ptr.dtype.element_ty))


def num_sms():
    return torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 4


def gemm(a, b, nn, cfg, c=None, e=None):
    bm, bn, bk, gm, stages, warps, persist, ws = cfg
    M, K = a.shape
    N = b.shape[1] if nn else b.shape[0]
    out = torch.empty(M, N, device=a.device, dtype=a.dtype)
    lora = c is not None
    R = c.shape[1] if lora else 16
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    grid = (min(num_sms(), tiles),) if persist else (tiles,)
    gemm_kernel[grid](a, b, c if lora else a, e if lora else a, out, M, N, K, R, nn, lora, bm, bn, bk, gm,
                      num_sms(), persist, ws, ws, num_stages=stages, num_warps=warps)
    return out


def check():
    torch.manual_seed(0)
    for nn in (False, True):
        for lora in (False, True):
            M, N, K, R = 64, 96, 80, 16
            a = torch.randn(M, K)
            b = torch.randn(K, N) if nn else torch.randn(N, K)
            c, e = (torch.randn(M, R), torch.randn(N, R)) if lora else (None, None)
            out = gemm(a, b, nn, (32, 32, 16, 2, 2, 4, True, False), c, e)
            ref = a @ (b if nn else b.t())
            if lora:
                ref = ref + c @ e.t()
            print(nn, lora, (out - ref).abs().max().item())


CONFIGS = [(bm, bn, bk, 8, s, w, p, ws)
           for (bm, bn, bk) in ((128, 128, 64), (128, 256, 64))
           for (s, w) in ((3, 8), (4, 4), (4, 8)) if not (bn == 256 and s == 4)
           for (p, ws) in ((False, False), (True, False), (True, True))]

SHAPES = {"opt-1.3b q": (2048, 2048), "opt-1.3b fc1": (2048, 8192), "opt-1.3b fc2": (8192, 2048),
          "opt-2.7b q": (2560, 2560), "opt-2.7b fc1": (2560, 10240),
          "llama-8b q": (4096, 4096), "llama-8b gate": (4096, 14336), "llama-8b down": (14336, 4096)}


def bench(out_dir):
    from triton.testing import do_bench
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    T, R = 4096, 16
    rows = []
    cfg_ok = {}
    t0 = time.time()
    for name, (d_in, d_out) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(T, d_in, device="cuda", generator=g).bfloat16()
        w = (torch.randn(d_out, d_in, device="cuda", generator=g) / d_in ** 0.5).bfloat16()
        dy = torch.randn(T, d_out, device="cuda", generator=g).bfloat16()
        xa = torch.randn(T, R, device="cuda", generator=g).bfloat16()
        lb = torch.randn(d_out, R, device="cuda", generator=g).bfloat16()
        la_t = torch.randn(d_in, R, device="cuda", generator=g).bfloat16()
        dxa = torch.randn(T, R, device="cuda", generator=g).bfloat16()
        for nn in (False, True):
            a, b = (dy, w) if nn else (x, w)
            c, e = (dxa, la_t) if nn else (xa, lb)
            ref_fn = (lambda: a @ b) if nn else (lambda: a @ b.t())
            cub = do_bench(ref_fn, warmup=25, rep=100)
            ref = ((a.float() @ b.float()) if nn else (a.float() @ b.float().t()))
            two_fn = (lambda: torch.addmm(a @ b, c, e.t())) if nn else (lambda: torch.addmm(a @ b.t(), c, e.t()))
            # what Inductor emits today: the low-rank product as its own GEMM, the add in a pointwise kernel
            sep_fn = (lambda: (a @ b) + c @ e.t()) if nn else (lambda: (a @ b.t()) + c @ e.t())
            two = do_bench(two_fn, warmup=25, rep=100)
            sep = do_bench(sep_fn, warmup=25, rep=100)
            ref_lora = ((a.float() @ b.float()) if nn else (a.float() @ b.float().t())) + c.float() @ e.float().t()
            best = {}
            for cfg in CONFIGS:
                for lora in (False, True):
                    key = (cfg, lora, nn)
                    if cfg_ok.get(key) is False:
                        continue
                    try:
                        fn = (lambda: gemm(a, b, nn, cfg, c, e)) if lora else (lambda: gemm(a, b, nn, cfg))
                        o = fn().float()
                        err = ((o - (ref_lora if lora else ref)).abs().max() / ref.abs().max()).item()
                        ms = do_bench(fn, warmup=25, rep=100)
                        cfg_ok[key] = True
                    except Exception as exc:  # noqa: BLE001
                        cfg_ok[key] = False
                        print("fail", cfg, lora, nn, type(exc).__name__, str(exc)[:200], flush=True)
                        continue
                    rows.append(dict(case=name, layout="NN" if nn else "NT", cfg=list(cfg), lora=lora, ms=ms,
                                     err=err, cublas_ms=cub, cublas_addmm_ms=two, cublas_sep_ms=sep))
                    if err >= 2e-2:
                        print("bad", name, cfg, lora, nn, err, flush=True)
                    if err < 2e-2 and (lora not in best or ms < best[lora][0]):
                        best[lora] = (ms, cfg)
            if True not in best or False not in best:
                continue
            print(f"{name:14s} {'NN' if nn else 'NT'} cuBLAS {cub:.4f} addmm {two:.4f} sep {sep:.4f} | "
                  f"triton {best.get(False)} eff {cub / best[False][0]:.3f} | lora {best.get(True)} "
                  f"vs sep {sep / best[True][0]:.3f} vs addmm {two / best[True][0]:.3f}  [{time.time() - t0:.0f}s]",
                  flush=True)
    with open(os.path.join(out_dir, "lora_gemm_exp.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       rows=rows), f)


if __name__ == "__main__":
    if INTERP:
        check()
    else:
        bench(sys.argv[1] if len(sys.argv) > 1 else ".")
