"""The low-rank GEMM kernel (``a @ w.T + c @ e.T + bias``) against its PyTorch twin (Triton's
interpreter on CPU machines)."""

import json
from pathlib import Path

import pytest
import torch

lowrank_gemm = pytest.importorskip("lecompile.kernels.lowrank_gemm")

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Against fp32 math rounded once: the kernel accumulates in fp32 and rounds once, so the
#: difference is the output's rounding (and the interpreter's bf16-to-fp32 conversions).
TOL = {torch.float16: dict(atol=2e-2, rtol=1e-2), torch.bfloat16: dict(atol=6e-2, rtol=2e-2)}


def rand(*shape, dtype, gen):
    return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.25).to(dtype=dtype, device=DEVICE)


# (M, N, K, r): ragged edges in every dimension (the interpreter's tiles are 16 x 32 x 32),
# ranks below, at and above the 16-deep step, a stacked q/k/v rank
SHAPES = [(40, 48, 56, 8), (64, 32, 24, 16), (33, 40, 72, 24), (16, 96, 64, 48)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,r", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(dtype, m, n, k, r, bias):
    gen = torch.Generator().manual_seed(0)
    a, w = rand(m, k, dtype=dtype, gen=gen), rand(n, k, dtype=dtype, gen=gen)
    low_rank = (rand(m, r, dtype=dtype, gen=gen), rand(n, r, dtype=dtype, gen=gen))
    b = rand(n, dtype=dtype, gen=gen) if bias else None
    for terms in (None, low_rank):
        got = lowrank_gemm.linear_low_rank(a, w, b, terms)
        assert got.dtype == dtype and got.shape == (m, n)
        torch.testing.assert_close(got, lowrank_gemm.linear_low_rank_ref(a, w, b, terms), **TOL[dtype])


@pytest.mark.parametrize("layout", ["transposed_weights", "strided_rows", "column_major_input"])
def test_any_layout_of_the_operands(layout):
    """``w`` and ``e`` are read in whichever layout has unit stride (the backward passes
    ``W.T`` and ``A.T``); ``a`` and ``c`` are slices of wider tensors (q/k/v's shared ``x A.T``)
    or copied when no layout fits TMA."""
    gen = torch.Generator().manual_seed(1)
    dtype = torch.float16
    a, w = rand(48, 40, dtype=dtype, gen=gen), rand(56, 40, dtype=dtype, gen=gen)
    c, e = rand(48, 16, dtype=dtype, gen=gen), rand(56, 16, dtype=dtype, gen=gen)
    want = lowrank_gemm.linear_low_rank_ref(a, w, None, (c, e))
    if layout == "transposed_weights":
        w, e = w.t().contiguous().t(), e.t().contiguous().t()
    elif layout == "strided_rows":
        c = torch.cat([torch.zeros_like(c), c, torch.zeros_like(c)], 1)[:, 16:32]
        a = torch.cat([a, a], 1)[:, 40:]
    else:
        a = a.t().contiguous().t()
    torch.testing.assert_close(lowrank_gemm.linear_low_rank(a, w, None, (c, e)), want, **TOL[dtype])


def test_supports_and_errors_name_the_operands():
    x = torch.zeros(16, 40, dtype=torch.bfloat16, device=DEVICE)
    w = torch.zeros(24, 40, dtype=torch.bfloat16, device=DEVICE)
    assert lowrank_gemm.supports(x, w)
    assert not lowrank_gemm.supports(x.float(), w.float())
    assert not lowrank_gemm.supports(x[:, :36], w[:, :36])  # K not a multiple of 8
    assert not lowrank_gemm.supports(x, w, (x[:, :4], w[:, :4]))  # rank 4
    assert not lowrank_gemm.supports(x, w, (x.new_zeros(16, 72), w.new_zeros(24, 72)))  # rank 72 > MAX_RANK
    assert lowrank_gemm.supports_dims(torch.float16, 2048, 8192, 48)
    assert not lowrank_gemm.supports_dims(torch.float16, 2048, 8192, 96)  # past MAX_RANK
    with pytest.raises(ValueError, match=r"weight \(24, 36\).*multiples of 8"):
        lowrank_gemm.linear_low_rank(x[:, :36], w[:, :36])


def test_each_launch_gets_one_config_by_its_shape_unless_its_output_is_narrow(monkeypatch):
    """One config per launch, so nothing is compiled or timed for the others: 128x256 tiles,
    warp-specialized unless the reduction is deeper than the output is wide (the H100 sweep's
    best on each side), or 128x128 tiles where 128x256 ones leave much of their last round of
    the GPU's SMs empty; an output with fewer 128x256 tiles than the GPU has SMs, or a rank the
    sweep did not cover, keeps every config that fits, autotuned."""
    monkeypatch.setattr(lowrank_gemm, "_interpreting", lambda: False)
    configs = lowrank_gemm._configs()
    prune = lowrank_gemm._configs_for_shape
    for low_rank in (False, True):
        for m, k, n, block_n, specialized in ((4096, 2048, 8192, 256, True), (4096, 4096, 4096, 256, True),
                                              (4096, 8192, 2048, 256, False), (8192, 8960, 1536, 256, False),
                                              (4096, 8960, 1536, 128, True), (4096, 1536, 1536, 128, True),
                                              (4096, 2560, 2560, 128, True)):
            (picked,) = prune(configs, dict(M=m, N=n, K=k, LOW_RANK=low_rank, RANK=16), NUM_SMS=132)
            assert (picked.kwargs["BLOCK_N"], picked.kwargs["WARP_SPECIALIZE"]) == (block_n, specialized), (m, k, n)
    assert prune(configs, dict(M=4096, N=512, K=2048, LOW_RANK=True, RANK=16), NUM_SMS=132) == configs  # 64 tiles
    for n in (512, 8192):  # rank 64: all but the warp-specialized 128x256 config, which does not fit
        assert prune(configs, dict(M=4096, N=n, K=2048, LOW_RANK=True, RANK=64), NUM_SMS=132) == configs[1:]
    assert prune(configs[:1], dict(M=1, N=8, K=64, LOW_RANK=False, RANK=16), NUM_SMS=132) == configs[:1]
    assert lowrank_gemm._linear_low_rank_kernel.early_config_prune is prune


def test_the_tiling_rule_agrees_with_the_sweep(monkeypatch):
    """On every row of the H100 sweep (4096 tokens, rank 16, forward and input-gradient layouts)
    the config the rule picks was timed no slower than the other tiling it weighs (the 128x256
    config it would take, or the 128x128 one)."""
    from benchmarks.profiles.lowrank_gemm import SHAPES
    monkeypatch.setattr(lowrank_gemm, "_interpreting", lambda: False)
    configs = lowrank_gemm._configs()
    sweep = json.loads((ROOT / "benchmarks/results/profiles/lowrank_gemm.json").read_text())
    timed = {(r["case"], r["layout"], tuple(r["cfg"])): r["ms"] for r in sweep["rows"] if r["lora"]}

    def ms(case, layout, config):  # the sweep's row of the persistent kernel in this config
        kw = config.kwargs
        return timed[case, layout, (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], 8, config.num_stages,
                                    config.num_warps, True, kw["WARP_SPECIALIZE"])]

    narrow = next(c for c in configs if c.kwargs["BLOCK_N"] == 128 and c.num_warps == 4)
    for case, (d_in, d_out) in SHAPES.items():
        for layout, n, k in (("NT", d_out, d_in), ("NN", d_in, d_out)):
            wide = next(c for c in configs if c.kwargs["BLOCK_N"] == 256 and c.kwargs["WARP_SPECIALIZE"] == (k <= n))
            (picked,) = lowrank_gemm._configs_for_shape(configs, dict(M=4096, N=n, K=k, LOW_RANK=True, RANK=16),
                                                        NUM_SMS=132)
            other = narrow if picked is wide else wide
            assert ms(case, layout, picked) <= ms(case, layout, other), (case, layout)


#: Compiles the kernel for sm_90 (no GPU needed: Triton's own ptxas) with every config the
#: pruning keeps, and with the one it drops, at each rank step; prints each one's shared memory.
COMPILE_FOR_HOPPER = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lecompile.kernels import lowrank_gemm
from lecompile.ops.kernel_accesses import _jit_function

fn = _jit_function(lowrank_gemm._linear_low_rank_kernel)
configs = lowrank_gemm._configs()
out = []
for rank in (16, 32, 64):
    args = dict(M=4096, N=512, K=2048, LOW_RANK=True, RANK=rank, W_KMAJOR=True, E_KMAJOR=False, HAS_BIAS=False,
                NUM_SMS=132, DOT_FP32=False, GROUP_M=8)
    kept = lowrank_gemm._configs_for_shape(configs, args)
    for config in configs:
        constants = dict(args, **config.kwargs)
        signature = {name: "constexpr" if name in constants and name not in ("M", "N", "K") else
                     "*bf16" if name.endswith("_ptr") else "i32" for name in fn.arg_names}
        source = ASTSource(fn, signature, {(fn.arg_names.index(name),): value for name, value in constants.items()
                                           if signature[name] == "constexpr"})
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        out.append(dict(rank=rank, kept=config in kept, shared=kernel.metadata.shared))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_every_config_kept_fits_in_hoppers_shared_memory():
    from process_helpers import json_from_compiling_script
    compiled = json_from_compiling_script(COMPILE_FOR_HOPPER, timeout=600)
    hopper = 232448  # bytes of shared memory one block may use on an H100 or H200
    assert all(c["shared"] <= hopper for c in compiled if c["kept"]), compiled
    assert all(c["shared"] > hopper for c in compiled if not c["kept"]), compiled
    assert sum(not c["kept"] for c in compiled) == 2  # ranks 32 and 64


def test_the_kernel_runs_on_hopper_gpus_and_in_the_interpreter_only(monkeypatch):
    """Compute capability 9.x runs it; Ampere, Ada and both Blackwells keep the cuBLAS path,
    named in the answer (their configs do not compile or do not fit: ``unsupported_device``)."""
    cuda = torch.device("cuda", 0)
    for capability, runs in (((9, 0), True), ((8, 0), False), ((8, 9), False), ((10, 0), False), ((12, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        why = lowrank_gemm.unsupported_device(cuda)
        assert (why == "") is runs and (runs or f"{capability[0]}.{capability[1]}" in why), (capability, why)
    assert lowrank_gemm.unsupported_device(torch.device("cpu")) == ""  # the tests' interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CPU" in lowrank_gemm.unsupported_device(torch.device("cpu"))
    x = torch.zeros(16, 40, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"does not run on the CPU"):
        lowrank_gemm.linear_low_rank(x, x[:24])
