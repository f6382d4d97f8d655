"""Block-sparse attention vs dense FlashAttention, forward and forward+backward, on the GPU.

Variants (bf16, causal, GQA, q/k/v require grad):

- ``dense-flash`` / ``dense-cudnn``: ``scaled_dot_product_attention(is_causal=True)`` on the
  FlashAttention or the cuDNN backend; ``dense-cudnn-expanded``: cuDNN on key/value heads repeated
  to the query heads beforehand (cuDNN takes no ``enable_gqa``; the repeat is not timed, which
  favours this baseline); the fastest (per pass) is the baseline of every ratio, named in
  ``baseline``;
- ``lecompile``: the same SDPA call compiled by the ``longexposure`` backend with
  ``attn_density``: its rewrite replaces the SDPA by the pooled predictor and the block-sparse
  FlexAttention operator, exactly what a model's attention runs (at density 1.0 it stays dense).

With ``--max-autotune`` the ``lecompile`` rows compile under Inductor's ``max_autotune``, which
times FlexAttention's kernel configs instead of taking the GPU's default one (``autotuned`` in
the rows; Inductor prints the configs' times on stderr). ``--flex-option KEY=VALUE`` adds
FlexAttention kernel options (``USE_TMA=true``, ``fwd_num_warps=8``, ...) to the ones the
backend passes (``flex_options`` in the rows). ``--set NAME=VALUE`` adds backend settings to the
rows' configs (``settings`` in the rows), e.g. ``attn_kernel=flash`` (FlashAttention 4's kernels,
where ``flash_attn.cute`` is installed) or ``attn_expand_kv=true``.
``--layout band`` keeps a causal band of the same density instead of the predictor's layouts
(``layout`` in the rows): every key block then carries the same work, where a kept column (the
sink, always kept) is walked by every query block below it. ``--arms`` times several such
configurations in one process, against one measurement of the dense baselines: each arm is
``default`` or comma-separated ``NAME=VALUE`` settings, ``layout=band`` among them, e.g.
``--arms default attn_expand_kv=true layout=band attn_kernel=flash``. ``--masked`` gives the
compiled SDPA a boolean causal mask instead of ``is_causal``, as transformers' compiled models
call it (rows: ``masked``); an arm with ``attn_mask_blocks=true`` then rewrites it at density 1.0
too, exact blocks against Inductor's masked SDPA (the dense baselines keep ``is_causal``).

A second set of ratios (``*_vs_inductor_dense``) takes the density-1.0 ``lecompile`` row, the
SDPA as Inductor compiles it, as the baseline.

``density`` is the budget (share of the causal blocks); ``kept_density`` what the predictor kept
(the diagonal and the first key block are always kept). ``ideal_ratio = dense_ms * kept_density
/ ms``. Times are GPU time of CUDA-graph replays (``triton.testing.do_bench_cudagraph``).
"""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lecompile
from benchmarks.common import command_line, meta, write_results
from benchmarks.results_page import ATTENTION_KERNELS, attention_latest
from lecompile import LongExposureConfig
from lecompile.ops import block_attention
from lecompile.ops.block_attention import allowed_blocks
from lecompile.passes import rewrite_attention
from lecompile.predictors.attention import predict_blocks

#: (query heads, key/value heads, head dim)
SHAPES = {"llama-3.2-1b": (32, 8, 64), "llama-3-8b": (32, 8, 128), "opt-1.3b": (32, 32, 64)}
SEQS = (512, 1024, 2048, 4096, 8192)
DENSITIES = (1.0, 0.5, 0.25, 0.1)
TOKENS = 16384  # batch = TOKENS // seq


def causal_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def masked_sdpa(q, k, v, mask):
    """Causal attention as transformers' compiled models call it: a boolean ``[1, 1, L, S]`` mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


#: The dense baselines: SDPA on one backend each.
DENSE = {"dense-flash": "FLASH_ATTENTION", "dense-cudnn": "CUDNN_ATTENTION"}


def dense_sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


def expanded(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Key or value heads repeated to ``heads`` (a leaf that requires grad, as the inputs are)."""
    return x.detach().repeat_interleave(heads // x.shape[1], dim=1).requires_grad_()


def fastest_dense(q, k, v) -> dict:
    """Per pass, ``(name, ms, peak GiB)`` of the fastest dense baseline that runs these inputs."""
    timed = {}
    cases = [(name, backend, (q, k, v)) for name, backend in DENSE.items()]
    if k.shape[1] != q.shape[1]:
        cases.append(("dense-cudnn-expanded", "CUDNN_ATTENTION", (q, expanded(k, q.shape[1]), expanded(v, q.shape[1]))))
    for name, backend, inputs in cases:
        try:
            timed[name] = time_passes(dense_sdpa(backend), inputs)
        except RuntimeError:  # a backend without a kernel for these inputs (cuDNN: GQA, head dim)
            continue
    if not timed:
        raise RuntimeError("no dense SDPA backend ran these inputs")
    passes = next(iter(timed.values()))
    return {p: min(((name, *t[p]) for name, t in timed.items()), key=lambda x: x[1]) for p in passes}


def time_passes(fn, inputs):
    from triton.testing import do_bench_cudagraph

    grad = torch.randn_like(inputs[0])
    out = {}
    for name, run in (("fwd", lambda: fn(*inputs)), ("fwd+bwd", lambda: fn(*inputs).backward(grad))):
        run()  # compile / warm up outside the graph capture
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out[name] = (do_bench_cudagraph(run, rep=100), torch.cuda.max_memory_allocated() / 2**30)
    return out


#: What the ``lecompile`` rows keep: the predictor's layouts, or a causal band (:func:`band_blocks`).
LAYOUTS = ("predicted", "band")


def parse_flex_options(items) -> dict:
    """``["USE_TMA=true", "fwd_num_warps=8"]`` as FlexAttention kernel options (bools and ints)."""
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not (raw.lower() in ("true", "false") or raw.lstrip("-").isdigit()):
            raise ValueError(f"--flex-option {item!r} is not KEY=VALUE with VALUE true, false or an integer")
        options[key] = raw.lower() == "true" if raw.lower() in ("true", "false") else int(raw)
    return options


@contextlib.contextmanager
def extra_flex_options(options: dict):
    """The backend's FlexAttention calls get ``options`` on top of their own kernel options."""
    own = block_attention.kernel_options
    block_attention.kernel_options = lambda block: {**own(block), **options}
    try:
        yield
    finally:
        block_attention.kernel_options = own


def band_width(n: int, density: float) -> int:
    """The narrowest causal band (query block ``i`` reads key blocks ``i - w + 1 .. i``) over ``n``
    blocks that keeps ``density`` of the causal blocks: ``w n - w (w - 1) / 2 >= density n (n + 1) / 2``."""
    return next(w for w in range(1, n + 1) if w * n - w * (w - 1) // 2 >= density * n * (n + 1) / 2)


def band_blocks(allowed: torch.Tensor, density: float) -> torch.Tensor:
    """The causal band of :func:`band_width` within ``allowed [..., n, n]``: every key block but
    the first ``w - 1`` is read by ``w`` query blocks, so no kernel program walks a whole column."""
    n = allowed.shape[-1]
    rows, cols = torch.arange(n, device=allowed.device)[:, None], torch.arange(n, device=allowed.device)[None, :]
    return allowed & (rows - cols >= 0) & (rows - cols < band_width(n, density))


@contextlib.contextmanager
def band_layout():
    """The backend's rewrite keeps :func:`band_blocks` instead of the predictor's layouts: a probe of
    the sparse kernels' speed when every key block carries the same work."""
    own = rewrite_attention.predict_blocks

    def band(q, k, allowed, steps, operands, causal, block, density, method):
        return band_blocks(allowed, density).expand(q.shape[0], q.shape[1], -1, -1)

    rewrite_attention.predict_blocks = band
    try:
        yield
    finally:
        rewrite_attention.predict_blocks = own


def parse_arm(text: str) -> tuple:
    """``"default"`` or ``"NAME=VALUE,..."`` (backend settings, ``layout=...`` among them) as
    ``(settings, layout)``; a bad name or value raises here, before any GPU work. A comma starts a
    new setting only before ``NAME=``: tuple and set values keep theirs (``disable=a,b``)."""
    items = [] if text == "default" else re.split(r",(?=\w+=)", text)
    layouts = [i.partition("=")[2] for i in items if i.startswith("layout=")]
    if len(layouts) > 1 or any(layout not in LAYOUTS for layout in layouts):
        raise ValueError(f"--arms {text!r}: at most one layout=..., one of {LAYOUTS}")
    settings = LongExposureConfig.parse_settings([i for i in items if not i.startswith("layout=")])
    LongExposureConfig.create(**settings)
    return settings, (layouts[0] if layouts else "predicted")


def arm_points(arms, densities) -> list:
    """``(arm, density)`` to time: every arm at every density below 1.0, and density 1.0 once, with
    the first arm (it leaves attention to Inductor whatever the arm's settings), and again with each
    arm that sets ``attn_mask_blocks`` (which rewrites a masked attention at density 1.0)."""
    return [(arm, d) for i, arm in enumerate(arms) for d in densities
            if d < 1.0 or i == 0 or arm[0].get("attn_mask_blocks")]


def bench_seq(name, seq, densities, block, max_autotune=False, flex_options=None, arms=(({}, "predicted"),),
              masked=False):
    """Rows of every density for one shape and sequence length, per arm ``(settings, layout)``:
    ``settings`` are more of the backend's (:meth:`LongExposureConfig.create`), ``layout`` one of
    :data:`LAYOUTS`. ``masked``: the compiled SDPA takes a boolean causal mask instead of
    ``is_causal`` (:func:`masked_sdpa`); the dense baselines keep ``is_causal``."""
    heads, kv_heads, head_dim = SHAPES[name]
    batch = max(1, TOKENS // seq)
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda h: torch.randn(batch, h, seq, head_dim, device="cuda", generator=g,  # noqa: E731
                                 dtype=torch.bfloat16).requires_grad_()
    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    fn, inputs = causal_sdpa, (q, k, v)
    if masked:
        fn, inputs = masked_sdpa, (q, k, v, torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()[None, None])
    steps, operands = ["mul"], [head_dim ** -0.5]
    any_b, _ = allowed_blocks(steps, operands, True, seq, seq, block, "cuda")
    dense = fastest_dense(q, k, v)
    rows = []
    for (settings, layout), density in arm_points(arms, densities):
        if layout == "band":
            keep = band_blocks(any_b, density)
        else:
            keep = predict_blocks(q, k, any_b, steps, operands, True, block, density, "pooled")
        kept = (keep.sum((-1, -2)).float() / any_b.sum()).mean().item() if density < 1.0 else 1.0
        case = dict(case=f"{name} attention", batch=batch, seq=seq, heads=heads, kv_heads=kv_heads,
                    head_dim=head_dim, block=block, dtype="bfloat16", density=density, kept_density=kept,
                    autotuned=max_autotune, **({"flex_options": flex_options} if flex_options else {}),
                    **({"layout": layout} if layout != "predicted" else {}), **({"masked": True} if masked else {}),
                    **({"settings": settings} if settings else {}))
        config = LongExposureConfig.create(mlp_density=1.0, attn_density=density, attn_block=block, **(settings or {}))
        backend = lecompile.longexposure(config)
        torch._dynamo.reset()
        try:
            with torch._inductor.config.patch(max_autotune=max_autotune), extra_flex_options(flex_options or {}), \
                    (band_layout() if layout == "band" else contextlib.nullcontext()):
                timed = time_passes(torch.compile(fn, backend=backend, fullgraph=True), inputs)
        except Exception as e:  # noqa: BLE001 - recorded in the results, per BENCHMARKS.md
            rows.append({**case, "variant": "lecompile", "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        case["rewritten"] = backend.report.attention_rewritten
        case["kernels"] = backend.report.attention_kernels
        for p, (ms, mem) in timed.items():
            base, base_ms, base_mem = dense[p]
            rows.append({**case, "pass": p, "variant": "lecompile", "ms": ms, "baseline": base,
                         "baseline_ms": base_ms, "speedup": base_ms / ms, "ideal_ratio": base_ms * kept / ms,
                         "peak_mem_gib": mem, "baseline_peak_mem_gib": base_mem})
    return add_inductor_dense_ratios(rows)


def add_inductor_dense_ratios(rows):
    """Ratios to the strongest dense baseline too: the density-1.0 ``lecompile`` row is the SDPA
    as Inductor compiles it (no rewrite; on H100 it may pick cuDNN attention, faster than
    FlashAttention-2)."""
    dense = {(r["case"], r["seq"], r["pass"]): r["ms"] for r in rows
             if r.get("density") == 1.0 and r.get("rewritten") == 0 and "ms" in r}
    for r in rows:
        base = dense.get((r["case"], r["seq"], r.get("pass")))
        if base is not None and "ms" in r:
            r.update(inductor_dense_ms=base, speedup_vs_inductor_dense=base / r["ms"],
                     ideal_ratio_vs_inductor_dense=base * r["kept_density"] / r["ms"])
    return rows


def plot(rows, path) -> bool:
    """Speedup against sequence length per case, kernel and density; False (nothing drawn) when no
    row is plotted (experiments, such as masked rows, are not)."""
    # a results file holds several runs: the latest of each point, per kernel
    latest = {kernel: attention_latest({"rows": rows}, kernel=kernel) for kernel in ATTENTION_KERNELS}
    names = sorted({r["case"] for kernel_rows in latest.values() for r in kernel_rows})
    if not names:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        densities = sorted({r["density"] for kernel_rows in latest.values() for r in kernel_rows
                            if r["density"] < 1.0 and r["case"] == name}, reverse=True)
        for i, density in enumerate(densities):
            for kernel, marker in zip(ATTENTION_KERNELS, "o^"):
                sel = sorted((r for r in latest[kernel] if r["case"] == name and r["density"] == density),
                             key=lambda r: r["seq"])
                if not sel:
                    continue
                seqs = [r["seq"] for r in sel]
                ax.plot(seqs, [r["speedup"] for r in sel], marker=marker, color=f"C{i}",
                        label=f"density {density}, {kernel} kernels, vs the fastest dense SDPA")
                if kernel == "triton" and all("speedup_vs_inductor_dense" in r for r in sel):
                    ax.plot(seqs, [r["speedup_vs_inductor_dense"] for r in sel], marker="s", ls="--", color=f"C{i}",
                            label=f"density {density}, {kernel} kernels, vs Inductor's dense SDPA")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="sequence length", ylabel="speedup, forward+backward", title=name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b"], choices=list(SHAPES))
    parser.add_argument("--seqs", nargs="+", type=int, default=list(SEQS))
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--flex-option", nargs="+", default=[], metavar="KEY=VALUE",
                        help="FlexAttention kernel options added to the backend's, e.g. USE_TMA=true")
    parser.add_argument("--max-autotune", action="store_true",
                        help="compile the lecompile rows under Inductor's max_autotune (FlexAttention configs timed)")
    parser.add_argument("--layout", choices=LAYOUTS, default="predicted",
                        help="band: keep a causal band of the same density instead of the predictor's layouts "
                             "(a probe of the kernels' speed when every key block has the same work)")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                        help="backend settings for the lecompile rows, e.g. attn_kernel=flash attn_expand_kv=true")
    parser.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                        help="several configurations in one process, one dense baseline: each 'default' or "
                             "comma-separated NAME=VALUE settings, layout=band among them (replaces --set, --layout)")
    parser.add_argument("--masked", action="store_true",
                        help="the compiled SDPA takes a boolean causal mask, as transformers' compiled models pass "
                             "it (rows: masked), e.g. with an arm attn_mask_blocks=true at density 1.0")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    flex_options = parse_flex_options(args.flex_option)
    if args.arms and (args.set or args.layout != "predicted"):
        parser.error("--arms replaces --set and --layout: name those in the arms")
    # a bad value names itself here, before any GPU work
    if args.arms:
        arms = [parse_arm(a) for a in args.arms]
    else:
        settings = LongExposureConfig.parse_settings(args.set)
        LongExposureConfig.create(**settings)
        arms = [(settings, args.layout)]
    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse_attention needs a CUDA GPU")
    rows = []
    for n, s in tqdm([(n, s) for n in args.shapes for s in args.seqs], desc="attention"):
        rows += bench_seq(n, s, args.densities, args.block, args.max_autotune, flex_options, arms, args.masked)
        write_results("sparse_attention", {"meta": meta("sparse_attention", command_line(), tokens_per_case=TOKENS),
                                           "rows": rows}, args.out)
    data = {"meta": meta("sparse_attention", command_line(), tokens_per_case=TOKENS), "rows": rows}
    path = write_results("sparse_attention", data, args.out)
    if not plot(rows, args.out / "sparse_attention.png"):
        print("no plotted rows (experiments only): no plot")
    print(path)


if __name__ == "__main__":
    main()
