"""Which tensors the backend's own Triton kernels write: Torch's analysis, kept per signature."""

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from process_helpers import json_from_compiling_script  # noqa: E402

from lecompile.ops import kernel_accesses  # noqa: E402


@triton.jit
def _scale(x_ptr, out_ptr, n, FACTOR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * FACTOR, mask=offs < n)


@triton.jit
def _other(x_ptr, n):
    pass


def analysis(monkeypatch):
    """``memoized`` around a stand-in for Torch's analysis that counts its calls; ``_scale`` memoized."""
    monkeypatch.setattr(kernel_accesses, "_KERNELS", [_scale])
    calls = []

    def analyse(kernel, kwargs, tma_descriptor_metadata):
        calls.append(kwargs)
        return {"writes": ["out_ptr"]}
    return kernel_accesses.memoized(analyse), calls


def launch(n=100, dtype=torch.float32, factor=2):
    return dict(x_ptr=torch.empty(n, dtype=dtype), out_ptr=torch.empty(n, dtype=dtype), n=n, FACTOR=factor, BLOCK=64)


def test_one_analysis_per_signature_and_each_caller_gets_a_copy(monkeypatch):
    identify, calls = analysis(monkeypatch)
    first = identify(_scale, launch(), {})
    first["writes"].append("x_ptr")  # a caller changing its answer changes no other's
    assert identify(_scale, launch(), {}) == {"writes": ["out_ptr"]}
    assert len(calls) == 1
    for changed in (launch(n=101), launch(dtype=torch.bfloat16), launch(factor=3)):
        identify(_scale, changed, {})
    assert len(calls) == 4 and len(identify.answers) == 4


def test_symbolic_sizes_share_one_answer_and_autotuners_key_on_their_first_config(monkeypatch):
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    identify, calls = analysis(monkeypatch)
    env = ShapeEnv()
    for _ in range(2):
        identify(_scale, dict(launch(), n=env.create_unbacked_symint()), {})
    assert len(calls) == 1
    tuned = [triton.autotune([triton.Config(dict(BLOCK=b))], key=["n"])(_scale) for b in (64, 64, 128)]
    for kernel in tuned:
        identify(kernel, {k: v for k, v in launch().items() if k != "BLOCK"}, {})
    assert len(calls) == 3  # BLOCK=64 twice, then 128


def test_other_kernels_and_host_descriptors_are_analysed_every_time(monkeypatch):
    identify, calls = analysis(monkeypatch)
    for _ in range(2):
        identify(_other, dict(x_ptr=torch.empty(4), n=4), {})
        identify(_scale, launch(), {"x_ptr": ("stable", ([64],))})
        identify(_scale, dict(launch(), n=[1]), {})  # an argument of a kind the key does not cover
    assert len(calls) == 6 and not identify.answers


def test_memoize_wraps_torchs_analysis_once(monkeypatch):
    from torch._higher_order_ops import triton_kernel_wrap
    monkeypatch.setattr(kernel_accesses, "_KERNELS", [])
    name = kernel_accesses.analysis_name()
    current = getattr(triton_kernel_wrap, name)
    original = getattr(current, "__wrapped__", current)
    monkeypatch.setattr(triton_kernel_wrap, name, original)
    kernel_accesses.memoize(_scale)
    wrapped = getattr(triton_kernel_wrap, name)
    kernel_accesses.memoize(triton.autotune([triton.Config(dict(BLOCK=64))], key=["n"])(_scale))
    assert getattr(triton_kernel_wrap, name) is wrapped and wrapped.__wrapped__ is original
    assert kernel_accesses._KERNELS == [_scale]


#: Traces the LoRA GEMM kernel as AOTAutograd does (``make_fx``, fake tensors), compiled for
#: sm_90 (Triton lowers to its IR without a GPU), then asks Torch three times per launch which
#: tensors it writes.
TRACE_LORA_GEMM = """
import json, torch, triton
from triton.backends.compiler import GPUTarget
from torch.fx.experimental.proxy_tensor import make_fx
from torch.library import wrap_triton
from torch._higher_order_ops import triton_kernel_wrap
import lecompile.ops.lora_linear
from lecompile.kernels import lowrank_gemm
from lecompile.ops import kernel_accesses
analysis = getattr(triton_kernel_wrap, kernel_accesses.analysis_name())

class Hopper:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(Hopper())
out = []
for k, n in ((128, 2048), (4096, 2048)):  # 32 x 8 tiles of 128x256 each: the GPU's 132 SMs filled
    def launch(a, w, y):
        wrap_triton(lowrank_gemm._linear_low_rank_kernel)[(4,)](
            a, w, a, w, y, y, 4096, n, k, 0, k, k, k, k, W_KMAJOR=True, E_KMAJOR=True, RANK=16, LOW_RANK=False,
            HAS_BIAS=False, NUM_SMS=132, DOT_FP32=False, GROUP_M=8)
        return y
    bf16 = dict(dtype=torch.bfloat16)
    graph = make_fx(launch, tracing_mode="fake")(torch.empty(4096, k, **bf16), torch.empty(n, k, **bf16),
                                                 torch.empty(4096, n, **bf16))
    (node,) = [n for n in graph.graph.nodes if n.op == "call_function"]
    kernel = triton_kernel_wrap.kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    kwargs = {k: v.meta["val"] if isinstance(v, torch.fx.Node) else v for k, v in node.kwargs["kwargs"].items()}
    writes = [triton_kernel_wrap.get_mutated_tensors(node.kwargs["kernel_idx"], node.kwargs["constant_args_idx"],
                                                     kwargs, {}) for _ in range(3)]
    out.append(dict(specialized=[c.kwargs["WARP_SPECIALIZE"] for c in kernel.configs], writes=writes))
print(json.dumps(dict(launches=out, analysed=len(analysis.answers))))
"""


def test_the_lora_gemm_traced_as_inductor_does_gets_one_config_and_one_analysis_per_signature():
    result = json_from_compiling_script(TRACE_LORA_GEMM, timeout=300)
    assert [launch["specialized"] for launch in result["launches"]] == [[True], [False]]  # K <= N, then K > N
    assert all(launch["writes"] == [["out_ptr"]] * 3 for launch in result["launches"])
    assert result["analysed"] == 2
