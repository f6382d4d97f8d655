"""Main-loop variants of the N-gather (y = x @ M[idx].T) and K-gather (y = h @ M[idx]) vs cuBLAS.

The experiment behind gather_gemm_main_loops.txt (not part of the package): on the GPU,
``python gather_gemm_main_loops.py`` writes ``$OUT/kexp.json``; with ``TRITON_INTERPRET=1`` it
checks the variants against PyTorch on small shapes. Its config list includes 256-token tiles,
which straddle two index groups at G=128: those rows are wrong by design and left out of the
summary.
"""
import json
import os

import torch
import triton
import triton.language as tl

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def tile_ids(nt, nc, GM: tl.constexpr):
    """(token tile, column tile) of this program: token tiles fastest, or with GM > 1 in groups of
    GM token tiles per column band."""
    pid = tl.program_id(0)
    if GM > 1:
        width = GM * nc
        first = (pid // width) * GM
        size = min(nt - first, GM)
        return first + (pid % width) % size, (pid % width) // size
    return pid % nt, pid // nt


@triton.jit
def ng_kernel(x_ptr, idx_ptr, m_ptr, out_ptr, T, D, KSEL, G, stride_idx,
              VAR: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, GM: tl.constexpr):
    pid_t, pid_n = tile_ids(tl.cdiv(T, BT), tl.cdiv(KSEL, BN), GM)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_n = pid_n * BN + tl.arange(0, BN)
    group = (pid_t * BT) // G
    rows = tl.load(idx_ptr + group * stride_idx + offs_n)
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    if VAR == 0:  # current: masks, offsets recomputed
        mask_t = offs_t < T
        mask_n = offs_n < KSEL
        rows64 = rows.to(tl.int64)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            mask_d = offs_d < D
            xt = tl.load(x_ptr + offs_t[:, None].to(tl.int64) * D + offs_d[None, :],
                         mask=mask_t[:, None] & mask_d[None, :], other=0.0)
            mt = tl.load(m_ptr + rows64[None, :] * D + offs_d[:, None],
                         mask=mask_d[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(xt, mt, acc)
    elif VAR == 1:  # no masks, pointer increments, int32 row offsets
        offs_d = tl.arange(0, BD)
        xp = x_ptr + (pid_t * BT).to(tl.int64) * D + tl.arange(0, BT)[:, None] * D + offs_d[None, :]
        mp = m_ptr + rows.to(tl.int32)[None, :] * D + offs_d[:, None]
        for d0 in range(0, D, BD):
            acc = tl.dot(tl.load(xp), tl.load(mp), acc)
            xp += BD
            mp += BD
    elif VAR == 2:  # weight loaded row-major [BN, BD], transposed in the dot
        offs_d = tl.arange(0, BD)
        xp = x_ptr + (pid_t * BT).to(tl.int64) * D + tl.arange(0, BT)[:, None] * D + offs_d[None, :]
        mp = m_ptr + rows.to(tl.int32)[:, None] * D + offs_d[None, :]
        for d0 in range(0, D, BD):
            acc = tl.dot(tl.load(xp), tl.trans(tl.load(mp)), acc)
            xp += BD
            mp += BD
    else:  # TMA descriptor for x, pointers for the weight
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, D], strides=[D, 1], block_shape=[BT, BD])
        offs_d = tl.arange(0, BD)
        mp = m_ptr + rows.to(tl.int32)[None, :] * D + offs_d[:, None]
        for d0 in range(0, D, BD):
            acc = tl.dot(x_desc.load([pid_t * BT, d0]), tl.load(mp), acc)
            mp += BD
    out = out_ptr + offs_t[:, None].to(tl.int64) * KSEL + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty))


@triton.jit
def kg_kernel(h_ptr, m_ptr, idx_ptr, out_ptr, T, D, KSEL, G, stride_idx,
              VAR: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, GM: tl.constexpr):
    pid_t, pid_d = tile_ids(tl.cdiv(T, BT), tl.cdiv(D, BD), GM)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_d = pid_d * BD + tl.arange(0, BD)
    group = (pid_t * BT) // G
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    if VAR == 0:
        mask_t = offs_t < T
        mask_d = offs_d < D
        for j0 in range(0, KSEL, BK):
            offs_j = j0 + tl.arange(0, BK)
            mask_j = offs_j < KSEL
            rows = tl.load(idx_ptr + group * stride_idx + offs_j, mask=mask_j, other=0).to(tl.int64)
            ht = tl.load(h_ptr + offs_t[:, None].to(tl.int64) * KSEL + offs_j[None, :],
                         mask=mask_t[:, None] & mask_j[None, :], other=0.0)
            mt = tl.load(m_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_j[:, None] & mask_d[None, :],
                         other=0.0)
            acc = tl.dot(ht, mt, acc)
    elif VAR == 1:
        hp = (h_ptr + (pid_t * BT).to(tl.int64) * KSEL + tl.arange(0, BT)[:, None] * KSEL
              + tl.arange(0, BK)[None, :])
        ip = idx_ptr + group * stride_idx + tl.arange(0, BK)
        for j0 in range(0, KSEL, BK):
            rows = tl.load(ip).to(tl.int32)
            mt = tl.load(m_ptr + rows[:, None] * D + offs_d[None, :])
            acc = tl.dot(tl.load(hp), mt, acc)
            hp += BK
            ip += BK
    else:
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[T, KSEL], strides=[KSEL, 1], block_shape=[BT, BK])
        ip = idx_ptr + group * stride_idx + tl.arange(0, BK)
        for j0 in range(0, KSEL, BK):
            rows = tl.load(ip).to(tl.int32)
            mt = tl.load(m_ptr + rows[:, None] * D + offs_d[None, :])
            acc = tl.dot(h_desc.load([pid_t * BT, j0]), mt, acc)
            ip += BK
    tl.store(out_ptr + offs_t[:, None].to(tl.int64) * D + offs_d[None, :], acc.to(out_ptr.dtype.element_ty))


def ngather(x, m, idx, G, var, bt, bn, bd, w, s, gm=1):
    T, D = x.shape
    k = idx.shape[1]
    out = x.new_empty(T, k)
    grid = (triton.cdiv(T, bt) * triton.cdiv(k, bn),)
    ng_kernel[grid](x, idx, m, out, T, D, k, G, idx.stride(0), VAR=var, BT=bt, BN=bn, BD=bd, GM=gm,
                    num_warps=w, num_stages=s)
    return out


def kgather(h, m, idx, G, var, bt, bd, bk, w, s, gm=1):
    T, k = h.shape
    D = m.shape[1]
    out = h.new_empty(T, D)
    grid = (triton.cdiv(T, bt) * triton.cdiv(D, bd),)
    kg_kernel[grid](h, m, idx, out, T, D, k, G, idx.stride(0), VAR=var, BT=bt, BD=bd, BK=bk, GM=gm,
                    num_warps=w, num_stages=s)
    return out


def check():
    torch.manual_seed(0)
    dt = torch.float32
    T, D, F, k, G = 64, 64, 96, 32, 32
    x = torch.randn(T, D, dtype=dt)
    m = torch.randn(F, D, dtype=dt)
    idx = torch.stack([torch.randperm(F)[:k].sort().values for _ in range(T // G)])
    ref = torch.cat([x[g * G:(g + 1) * G] @ m[idx[g]].T for g in range(T // G)])
    for var in (0, 1, 2):
        for gm in (1, 2):
            y = ngather(x, m, idx, G, var, 16, 16, 16, 1, 1, gm)
            print("ng", var, gm, (y - ref).abs().max().item())
    h = torch.randn(T, k, dtype=dt)
    ref = torch.cat([h[g * G:(g + 1) * G] @ m[idx[g]] for g in range(T // G)])
    for var in (0, 1):
        for gm in (1, 2):
            y = kgather(h, m, idx, G, var, 16, 16, 16, 1, 1, gm)
            print("kg", var, gm, (y - ref).abs().max().item())


CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
           (128, 128, 64, 4, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (64, 256, 64, 4, 4)]


def sweep(op, launch, operands, ref, cublas_ms, where):
    """Every config of one variant: rows, and the best printed."""
    from triton.testing import do_bench
    rows = []
    for cfg in CONFIGS:
        try:
            err = (launch(*operands, where["var"], *cfg, where["gm"]).float() - ref.float()).abs().max().item()
            ms = do_bench(lambda: launch(*operands, where["var"], *cfg, where["gm"]), rep=30)
        except Exception as e:  # a config may not fit the chip's shared memory
            print(op, "fails", where, cfg, str(e)[:200])
            continue
        rows.append(dict(op=op, **where, cfg=list(cfg), ms=ms, cublas_ms=cublas_ms, eff=cublas_ms / ms, err=err))
    best = min(rows, key=lambda r: r["ms"], default=None)
    print(op, where, best and (best["cfg"], round(best["ms"], 4), round(best["eff"], 3)), flush=True)
    return rows


def bench():
    from triton.testing import do_bench

    def alloc(size, align, stream):
        return torch.empty(size, device="cuda", dtype=torch.int8)
    triton.set_allocator(alloc)
    dt = torch.bfloat16
    rows = []
    shapes = [("opt-2.7b", 4096, 2560, 10240), ("opt-1.3b", 4096, 2048, 8192), ("llama-8b", 4096, 4096, 14336)]
    for name, T, D, F in shapes:
        for dens in (1.0, 0.25):
            k = int(F * dens) // 128 * 128
            G = 128
            x = torch.randn(T, D, device="cuda", dtype=dt)
            m = torch.randn(F, D, device="cuda", dtype=dt) / 50
            idx = torch.stack([torch.randperm(F, device="cuda")[:k].sort().values for _ in range(T // G)])
            h = torch.randn(T, k, device="cuda", dtype=dt)
            wk = m[:k].contiguous()
            cub_n = do_bench(lambda: x @ wk.T, rep=50)
            cub_k = do_bench(lambda: h @ wk, rep=50)
            ref_n = torch.cat([x[g * G:(g + 1) * G] @ m[idx[g]].T for g in range(T // G)])
            ref_k = torch.cat([h[g * G:(g + 1) * G] @ m[idx[g]] for g in range(T // G)])
            cases = [("ngather", ngather, (x, m, idx, G), ref_n, cub_n, (0, 1, 2, 3)),
                     ("kgather", kgather, (h, m, idx, G), ref_k, cub_k, (0, 1, 2))]
            for op, launch, operands, ref, cublas_ms, variants in cases:
                for var in variants:
                    for gm in (1, 8):
                        rows += sweep(op, launch, operands, ref, cublas_ms, dict(case=name, density=dens, var=var,
                                                                                 gm=gm))
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "kexp.json"), "w"))


if __name__ == "__main__":
    check() if INTERP else bench()
