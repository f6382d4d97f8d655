"""Grouped-query attention: SDPA on repeated K/V heads, or on the K/V heads themselves?

The experiment behind gqa_attention.json (not part of the package). Under ``torch.compile``,
transformers gives SDPA a mask and so repeats each K/V head for its query heads (``repeat_kv``, a
copy forward and a sum backward) instead of passing ``enable_gqa=True``; lecompile's causal_masks
pass drops that mask, after which ``enable_gqa`` would be possible. This times forward + backward
of both on LLaMA-3.2-1B's and Qwen2-1.5B's attention shapes (bf16, causal), under SDPA's default
choice of backend and under each of cuDNN and FlashAttention, with the kernels that ran and the
largest difference to the repeated form's output and gradients.

On the GPU, ``python gqa_attention.py OUT_DIR`` writes ``OUT_DIR/gqa_attention.json``.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

torch.manual_seed(0)
rows = []


def timed(fn, n=30):
    for _ in range(5):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / n


for name, B, S, H, KV, D in [("qwen2-1.5b", 8, 512, 12, 2, 128), ("llama-3.2-1b", 8, 512, 32, 8, 64),
                             ("qwen2-1.5b", 2, 2048, 12, 2, 128), ("llama-3.2-1b", 2, 2048, 32, 8, 64)]:
    rep = H // KV
    q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, KV, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, KV, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)

    def repeated():
        kr = k[:, :, None].expand(B, KV, rep, S, D).reshape(B, H, S, D)
        vr = v[:, :, None].expand(B, KV, rep, S, D).reshape(B, H, S, D)
        return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    def gqa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    ref = repeated()
    grads_ref = torch.autograd.grad(ref, (q, k, v), go)
    for label, fn, backends in [("repeat_kv default", repeated, None), ("gqa default", gqa, None),
                                ("repeat_kv cudnn", repeated, [SDPBackend.CUDNN_ATTENTION]),
                                ("gqa cudnn", gqa, [SDPBackend.CUDNN_ATTENTION]),
                                ("gqa flash", gqa, [SDPBackend.FLASH_ATTENTION]),
                                ("repeat_kv flash", repeated, [SDPBackend.FLASH_ATTENTION])]:
        try:
            ctx = sdpa_kernel(backends) if backends else torch.enable_grad()
            with ctx:
                out = fn()
                grads = torch.autograd.grad(out, (q, k, v), go)
                err = max((a.float() - b.float()).abs().max().item() for a, b in zip((out, *grads), (ref, *grads_ref)))
                ms = timed(lambda: torch.autograd.grad(fn(), (q, k, v), go))
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    torch.autograd.grad(fn(), (q, k, v), go)
                    torch.cuda.synchronize()
                kernels = sorted({e.key[:60] for e in prof.key_averages()})
            rows.append(dict(model=name, shape=f"{B}x{S}", variant=label, ms=round(ms, 4), max_err=err,
                             kernels=kernels))
        except Exception as ex:  # a backend that refuses these inputs
            rows.append(dict(model=name, shape=f"{B}x{S}", variant=label, error=str(ex)[:200]))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "kernels"}), flush=True)

os.makedirs(sys.argv[1], exist_ok=True)
with open(os.path.join(sys.argv[1], "gqa_attention.json"), "w") as f:
    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
