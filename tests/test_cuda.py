"""On a CUDA machine: the compiled bf16 train step matches eager at density 1.0, and the sparse
kernel path runs inside compiled graphs (skipped elsewhere)."""

import pytest
import torch

import lecompile
from lecompile import LongExposureConfig

from models import LAYERS, batch, tiny_model, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_bf16_lora_step_on_cuda_matches_eager(arch):
    model = tiny_model(arch, "lora", dtype=torch.bfloat16).cuda()
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch().items()}
    eager_loss, eager_grads = train_step(model, model, inputs)
    backend = lecompile.longexposure(LongExposureConfig(mlp_density=1.0))
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    assert len(backend.report.mlp) == LAYERS
    torch.testing.assert_close(loss, eager_loss, atol=2e-2, rtol=2e-2)
    for name in grads:
        torch.testing.assert_close(grads[name].float(), eager_grads[name].float(), atol=3e-2, rtol=5e-2,
                                   msg=name)
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=0.5, k_align=64))
    torch._dynamo.reset()
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    assert torch.isfinite(loss) and backend.report.mlp_rewritten == LAYERS
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_linear_on_cuda_matches_peft(dtype):
    """The op's CUDA path (fp32-output GEMMs for the adapter gradients) against PEFT's math."""
    from test_lora_linear import TOL, grads_of, make, op, peft_linear
    args = [t.cuda().detach().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t
            for t in make(dtype, tokens=(4, 64), d_in=96, d_out=160, train_bias=True)]
    y, grads = grads_of(op, args)
    y_ref, grads_ref = grads_of(peft_linear, args)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_linear_in_gemm_on_cuda_matches_peft(dtype):
    """``in_gemm=True`` on the GPU (the low-rank GEMM kernel, forward and input gradient)."""
    from test_lora_linear import TOL, grads_of, make, peft_linear

    from lecompile.ops.lora_linear import lora_linear, runs_in_gemm
    args = [t.cuda().detach().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t
            for t in make(dtype, tokens=(4, 250), d_in=96, d_out=160, r=16, train_bias=True)]
    assert runs_in_gemm(args[0], [args[1]], [args[2]], [args[4]])
    y, grads = grads_of(lambda *a: lora_linear(*a, True), args)
    y_ref, grads_ref = grads_of(peft_linear, args)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref.float(), **TOL[dtype])


def test_lora_linear_in_gemm_compiles_with_dynamic_shapes():
    """Token counts that change between calls (Dynamo's dynamic shapes): one graph, whose kernel
    launches follow the shapes, with the eager op's values and gradients."""
    from test_lora_linear import TOL, make

    from lecompile.ops.lora_linear import lora_linear
    _, weight, bias, _, a, b, scale = [t.cuda().detach().requires_grad_(t.requires_grad) if torch.is_tensor(t)
                                       else t for t in make(torch.bfloat16, d_in=96, d_out=160, r=16)]
    compiled = torch.compile(lambda x: lora_linear(x, weight, bias, None, a, b, scale, True), dynamic=True,
                             fullgraph=True)
    for tokens in (40, 72, 136):
        x = torch.randn(2, tokens, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        results = []
        for fn in (compiled, lambda x: lora_linear(x, weight, bias, None, a, b, scale, True)):
            y = fn(x)
            results.append((y, *torch.autograd.grad(y.float().square().sum(), (x, a, b))))
        for got, want in zip(*results):
            scale_of = want.abs().max().item()
            torch.testing.assert_close(got.float(), want.float(), atol=TOL[torch.bfloat16]["atol"] * scale_of,
                                       rtol=TOL[torch.bfloat16]["rtol"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,r", [(1000, 328, 200, 8), (4096, 2048, 2048, 16), (512, 8192, 2048, 48),
                                     (384, 2048, 8192, 16), (4096, 2048, 8192, 16), (4096, 1536, 8960, 16)])
def test_low_rank_gemm_kernel_on_cuda_matches_reference(dtype, m, n, k, r):
    """The kernel's real configs (persistent; outputs that fill the GPU get 128x256 tiles,
    warp-specialized where K <= N, or 128x128 ones where those take less time by rounds of the SMs, as
    Qwen2's 1536-wide outputs do; narrower ones the autotuner's pick of all four) on ragged and
    model-sized shapes, the weight in both layouts, with and without bias and low-rank term."""
    from lecompile.kernels.lowrank_gemm import linear_low_rank, linear_low_rank_ref
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(dtype)
    c = torch.randn(m, r, device="cuda", generator=gen).to(dtype)
    e = torch.randn(n, r, device="cuda", generator=gen).to(dtype)
    bias = torch.randn(n, device="cuda", generator=gen).to(dtype)
    for weight in (w, w.t().contiguous().t()):
        for args in ((None, None), (bias, (c, e.t().contiguous().t()))):
            want = linear_low_rank_ref(a, weight, *args).float()
            got = linear_low_rank(a, weight, *args).float()
            torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=1e-2)


def test_low_rank_gemm_is_analysed_once_per_signature_when_compiled(monkeypatch):
    """Three launches of one signature in a compiled graph: Torch works out which tensors the
    kernel writes once per signature (a traced form of the launch), not at every launch and
    trace, and the values stay exact. Caches off: a cached graph is not traced at all."""
    from torch._higher_order_ops import triton_kernel_wrap

    from lecompile.kernels.lowrank_gemm import linear_low_rank_ref
    from lecompile.ops import kernel_accesses
    asked, analysed = [], []
    name = kernel_accesses.analysis_name()
    torch_analysis = getattr(triton_kernel_wrap, name).__wrapped__
    analyse = kernel_accesses.memoized(lambda *args: analysed.append(args) or torch_analysis(*args))
    monkeypatch.setattr(triton_kernel_wrap, name, lambda *args: asked.append(args) or analyse(*args))
    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(136, 256, device="cuda", generator=gen).bfloat16()
    weights = [(torch.randn(384, 256, device="cuda", generator=gen) / 16).bfloat16() for _ in range(3)]
    lr = torch.ops.lecompile.linear_low_rank
    with torch._inductor.config.patch(force_disable_caches=True):
        got = torch.compile(lambda x: sum(lr(x, w, None, None, None) for w in weights), fullgraph=True)(x)
    want = sum(linear_low_rank_ref(x, w).float() for w in weights)
    torch.testing.assert_close(got.float(), want, atol=3e-2 * want.abs().max().item(), rtol=2e-2)
    signatures = {kernel_accesses.signature(*args) for args in asked}
    counts = f"asked {len(asked)}, analysed {len(analysed)}, signatures {len(signatures)}"
    assert len(asked) >= 3 and len(analysed) == len(analyse.answers) == len(signatures) < len(asked), counts


@pytest.mark.parametrize("warmup_steps", [0, 2])
def test_cudagraphs_with_sparse_mlp_matches_without(warmup_steps):
    """``cudagraphs=True`` records the sparse ops (their weight caches stay outside the graph
    pool, for every layer that shares one compiled graph) and gives the same steps, also when
    the sparse graph is compiled after a dense warm-up."""
    losses = {}
    for cg in (False, True):
        torch._dynamo.reset()
        model = tiny_model("opt", "lora", dtype=torch.bfloat16).cuda()
        inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch().items()}
        backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=0.5, k_align=64, cudagraphs=cg,
                                                                   warmup_steps=warmup_steps))
        compiled = torch.compile(model, backend=backend)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[cg] = []
        for _ in range(4 + warmup_steps):
            loss = compiled(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[cg].append(loss.item())
        assert backend.report.mlp_rewritten >= 1
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), atol=2e-2, rtol=2e-2)


def _calibrated_run(steps: int, cudagraphs: bool, **settings):
    """``steps`` training steps of a tiny bf16 model on CUDA under a calibrated config: the
    backend, the losses and the counters of the run."""
    from torch._dynamo.utils import counters

    from lecompile.predictors import clear_learned
    torch._dynamo.reset()
    clear_learned()
    counters.clear()
    model = tiny_model("llama", "lora", dtype=torch.bfloat16).cuda()
    backend = lecompile.longexposure(LongExposureConfig.create(k_align=64, cudagraphs=cudagraphs, **settings))
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch(step).items()}
        loss = compiled(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return backend, torch.tensor(losses), dict(counters["lecompile"])


def test_loss_budget_shadow_under_cudagraphs_matches_without():
    """Under a loss budget the shadowed calibration steps train through the sparse CUDA graph
    after the dense (never captured) forward: the same losses and target moves as without."""
    runs = {cg: _calibrated_run(5, cg, mlp_density=0.25, loss_budget=0.01, calibrate_every=2) for cg in (False, True)}
    moves = {cg: [c.split(" (")[0] for c in backend.report.guard if c.startswith("min_kept_mass")]
             for cg, (backend, _, _) in runs.items()}
    assert moves[True] == moves[False]
    assert all(calls["shadow_graph_calls"] == 2 for _, _, calls in runs.values())
    torch.testing.assert_close(runs[True][1], runs[False][1], atol=2e-2, rtol=2e-2)


def test_learned_predictor_under_cudagraphs_matches_without():
    """The learned predictor's sparse steps replay as CUDA graphs and read the factors that the
    calibration steps' training updated in place: the same losses as without CUDA graphs, over
    three calibrations (the first dense, the later ones a dense forward beside a sparse step)."""
    runs = {cg: _calibrated_run(7, cg, mlp_density=0.5, predictor="learned", calibrate_every=3)
            for cg in (False, True)}
    for _, _, calls in runs.values():
        assert (calls["dense_graph_calls"], calls["shadow_graph_calls"], calls["sparse_graph_calls"]) == (1, 2, 6)
        assert calls["learned_train_calls"] == 3 * LAYERS
    torch.testing.assert_close(runs[True][1], runs[False][1], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("opt", "sdpa"), ("gpt2", "eager")])
def test_block_sparse_attention_on_cuda_matches_reference_model(arch, impl, monkeypatch):
    """The FlexAttention path (Inductor's fused kernels, forward and backward) against an eager
    model whose attention runs the reference op with the same predictor."""
    import transformers
    from test_attention import reference_attention

    torch.manual_seed(0)
    model = tiny_model(arch, "lora").cuda()
    model.base_model.model.config._attn_implementation = impl
    seq, block = 256, 64
    ids = torch.randint(0, 128, (2, seq), device="cuda")
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=1.0, attn_density=0.5, attn_block=block))
    torch._dynamo.reset()
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    assert backend.report.attention_rewritten == LAYERS, str(backend.report)
    model.base_model.model.config._attn_implementation = "sdpa"
    monkeypatch.setitem(transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS, "sdpa",
                        reference_attention(0.5, block))
    ref_loss, ref_grads = train_step(model, model, inputs)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-3, rtol=1e-3, msg=name)


def test_checkpointed_block_sparse_attention_on_cuda_matches_without_checkpointing():
    """Gradient checkpointing with block-sparse attention on FlexAttention's kernels: rewritten (the
    model's mask, computed in the graph, failed FlexAttention's lowering in torch 2.11; it now
    reaches FlexAttention with a fixed layout), loss and gradients as without checkpointing."""
    torch.manual_seed(0)
    model = tiny_model("llama", "lora").cuda()
    ids = torch.randint(0, 128, (1, 512), device="cuda")
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    config = LongExposureConfig.create(mlp_density=1.0, attn_density=0.5, attn_block=64)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        backend = lecompile.longexposure(config)
        torch._dynamo.reset()
        results.append(train_step(torch.compile(model, backend=backend), model, inputs))
        assert backend.report.attention_rewritten == LAYERS, str(backend.report)
        assert backend.report.checkpointed == (LAYERS if checkpointing else 0), str(backend.report)
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-3, rtol=1e-3, msg=name)


@pytest.mark.parametrize("expand_kv", [False, True], ids=["gqa", "expanded"])
@pytest.mark.parametrize("softcap", [False, True], ids=["plain", "softcap"])
@pytest.mark.parametrize("block", [64, 128])
def test_block_attention_under_users_torch_compile_trains(block, softcap, expand_kv):
    """The operator inside a user's torch.compile (public flex_attention, Inductor's kernels):
    outputs and q/k/v gradients match the masked dense reference, with Gemma 2's soft-capping
    (a ``tanh`` in FlexAttention's score_mod) too, and with key/value heads repeated to the query
    heads (``attn_expand_kv``: the key/value gradients summed back over each group)."""
    from lecompile.ops.block_attention import allowed_blocks, block_attention_flex, block_attention_ref
    from lecompile.predictors.attention import predict_blocks

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 512, 64, device="cuda", requires_grad=True) for h in (8, 2, 2))
    steps, operands = (["mul", "div", "tanh", "mul"], [0.125, 2.0, None, 2.0]) if softcap else (["mul"], [0.125])
    any_b, all_b = allowed_blocks(steps, operands, True, 512, 512, block, "cuda")
    keep = predict_blocks(q, k, any_b, steps, operands, True, block, 0.5, "pooled")
    torch._dynamo.reset()
    out = torch.compile(block_attention_flex, fullgraph=True)(q, k, v, keep, all_b, steps, operands, True, block,
                                                               enable_gqa=True, expand_kv=expand_kv)
    ref = block_attention_ref(q, k, v, keep, steps, operands, True, block, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def _needs_flash():
    from lecompile.ops.block_attention import flash_missing
    missing = flash_missing()
    if missing:
        pytest.skip(f"attn_kernel='flash' {missing}")


@pytest.mark.parametrize("density", [0.5, 0.25])
def test_block_attention_on_flash_kernels_matches_reference(density):
    """``kernel="flash"`` (FlexAttention's FlashAttention 4 backend, bf16 only) inside a user's
    torch.compile: outputs and q/k/v gradients match the masked dense reference in fp32."""
    from lecompile.ops.block_attention import allowed_blocks, block_attention_flex, block_attention_ref
    from lecompile.predictors.attention import predict_blocks

    _needs_flash()
    torch.manual_seed(0)
    seq, block, steps, operands = 1024, 128, ["mul"], [128 ** -0.5]
    q, k, v = (torch.randn(2, h, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (8, 2, 2))
    any_b, all_b = allowed_blocks(steps, operands, True, seq, seq, block, "cuda")
    keep = predict_blocks(q, k, any_b, steps, operands, True, block, density, "pooled")
    torch._dynamo.reset()
    out = torch.compile(block_attention_flex, fullgraph=True)(q, k, v, keep, all_b, steps, operands, True, block,
                                                               enable_gqa=True, kernel="flash")
    ref = block_attention_ref(*(x.float() for x in (q, k, v)), keep, steps, operands, True, block, enable_gqa=True)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad.float())):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_backend_on_flash_kernels_matches_triton_kernels():
    """The backend's rewrite with ``attn_kernel="flash"`` against the same rewrite on FlexAttention's
    Triton kernels (same predictor, same blocks): outputs and q/k/v gradients agree."""
    import torch.nn.functional as F

    _needs_flash()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (8, 2, 2))
    grad = torch.randn(1, 8, 2048, 128, device="cuda", dtype=torch.bfloat16)
    results = []
    for kernel in ("triton", "flash"):
        backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=1.0, attn_density=0.5,
                                                                   attn_kernel=kernel))
        torch._dynamo.reset()
        out = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                            backend=backend, fullgraph=True)(q, k, v)
        assert backend.report.attention_rewritten == 1, str(backend.report)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def _bf16_llama(padded: bool = False):
    """A bf16 LoRA LLaMA with head dim 128 (FlashAttention 4 takes it) and a batch for it;
    ``padded``: its last row left-padded, so the model's token mask depends on the batch."""
    import peft
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16),
                                peft.LoraConfig(r=4, target_modules="all-linear"), autocast_adapter_dtype=False).train()
    ids = torch.randint(0, 128, (2, 1024), device="cuda")
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    if padded:
        mask = torch.ones_like(ids)
        mask[-1, :100] = 0
        # The first real token's label too: the last pad predicts it, a query with no allowed key.
        inputs.update(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100).index_fill(
            1, torch.tensor([100], device="cuda"), -100))
    return model, inputs


def _on_triton_then_flash(model, inputs):
    """Loss, LoRA gradients and report of a step with block-sparse attention (density 0.5) asked
    for on the Triton kernels, then on FlashAttention 4's."""
    runs = []
    for kernel in ("triton", "flash"):
        backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=1.0, attn_density=0.5,
                                                                   attn_kernel=kernel))
        torch._dynamo.reset()
        runs.append((*train_step(torch.compile(model, backend=backend), model, inputs), backend.report))
    return runs


def test_mask_blocks_on_cuda_match_the_masked_sdpa():
    """``attn_mask_blocks`` at density 1.0: the model's masked SDPA as exact block attention on
    FlexAttention's Triton kernels; loss and LoRA gradients match the SDPA Inductor compiles."""
    model, inputs = _bf16_llama(padded=True)
    results = []
    for settings in ({}, {"attn_mask_blocks": True}):
        backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=1.0, **settings))
        torch._dynamo.reset()
        results.append(train_step(torch.compile(model, backend=backend), model, inputs))
        assert backend.report.attention_rewritten == (2 if settings else 0), str(backend.report)
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=2e-2)
    for name in grads:
        torch.testing.assert_close(grads[name].float(), ref_grads[name].float(), atol=5e-2, rtol=5e-2, msg=name)


def test_a_models_causal_only_mask_runs_on_causal_kernels():
    """Without an ``attention_mask`` the model's token mask is the causal mask, which lecompile
    drops: at density 1.0 the SDPA runs causal (loss and gradients those of Inductor's masked SDPA),
    and block-sparse attention runs on FlashAttention 4's kernels where asked (those of the Triton
    kernels)."""
    from lecompile.passes.rewrite_attention import CAUSAL_MASK

    model, inputs = _bf16_llama()
    torch._dynamo.reset()
    ref_loss, ref_grads = train_step(torch.compile(model, backend="inductor"), model, inputs)
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=1.0))
    torch._dynamo.reset()
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    assert all(CAUSAL_MASK in e.note for e in backend.report.attention), str(backend.report)
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=2e-2)
    for name in grads:
        torch.testing.assert_close(grads[name].float(), ref_grads[name].float(), atol=5e-2, rtol=5e-2, msg=name)
    _needs_flash()
    (ref_loss, ref_grads, triton), (loss, grads, flash) = _on_triton_then_flash(model, inputs)
    assert [e.kernel for e in triton.attention] == ["triton"] * 2, str(triton)
    assert [e.kernel for e in flash.attention] == ["flash"] * 2, str(flash)
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=2e-2)
    for name in grads:
        torch.testing.assert_close(grads[name].float(), ref_grads[name].float(), atol=5e-2, rtol=5e-2, msg=name)


def test_grouped_query_attention_runs_on_a_fused_kernel_with_the_repeated_heads_numbers():
    """With the causal mask dropped, SDPA reads the 2 key/value heads themselves (``enable_gqa``)
    on FlashAttention's or cuDNN's kernels, not its math fallback, with the loss and gradients of
    the step that repeats them."""
    from lecompile.passes.grouped_query_attention import NOTE

    model, inputs = _bf16_llama()
    runs = []
    for disable in (frozenset({"grouped_query_attention"}), frozenset()):
        backend = lecompile.longexposure(LongExposureConfig(disable=disable))
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        train_step(compiled, model, inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            loss, grads = train_step(compiled, model, inputs)
            torch.cuda.synchronize()
        runs.append((loss, grads, backend.report, {e.key.lower() for e in prof.key_averages()}))
    (ref_loss, ref_grads, ref_report, _), (loss, grads, report, kernels) = runs
    assert NOTE.format(n=2) in report.notes and NOTE.format(n=2) not in ref_report.notes, str(report)
    assert any("flash" in k or "cudnn" in k or "fmha" in k for k in kernels), sorted(kernels)
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=2e-2)
    for name in grads:
        torch.testing.assert_close(grads[name].float(), ref_grads[name].float(), atol=5e-2, rtol=5e-2, msg=name)


def test_layer_breaks_drop_a_causal_only_mask_so_the_flash_kernels_take_every_layer():
    """Under ``compile_layers_once`` each layer's graph would get the model's mask as an input; the
    break drops it when it is only causal, so FlashAttention 4's kernels take the layers' attention,
    with the loss and gradients of the Triton kernels."""
    _needs_flash()
    model, inputs = _bf16_llama()
    breaks = lecompile.compile_layers_once(model)
    try:
        (ref_loss, ref_grads, triton), (loss, grads, flash) = _on_triton_then_flash(model, inputs)
    finally:
        breaks.remove()
    assert triton.attention and all(e.kernel == "triton" for e in triton.attention), str(triton)
    assert flash.attention and all(e.kernel == "flash" for e in flash.attention), str(flash)
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=2e-2)
    for name in grads:
        torch.testing.assert_close(grads[name].float(), ref_grads[name].float(), atol=5e-2, rtol=5e-2, msg=name)


def test_flash_kernels_hand_a_models_masked_attention_to_the_triton_kernels():
    """A token mask that depends on the batch (padding), which FlexAttention's FlashAttention 4
    code generation cannot read: with ``attn_kernel="flash"`` the model's attention runs on the
    Triton kernels, the report says why, and loss and gradients are those of ``attn_kernel="triton"``."""
    from lecompile.passes.rewrite_attention import FLASH_TOKEN_MASK

    _needs_flash()
    model, inputs = _bf16_llama(padded=True)
    (ref_loss, ref_grads, _), (loss, grads, flash) = _on_triton_then_flash(model, inputs)
    assert [e.kernel for e in flash.attention] == ["triton"] * 2, str(flash)
    assert all(FLASH_TOKEN_MASK in e.note for e in flash.attention), str(flash)
    torch.testing.assert_close(loss, ref_loss)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_context_only_on_cuda_matches_reference_model():
    """dense_output_share on CUDA (the dense token groups through the sparse-MLP kernels with
    every neuron): loss and gradients match the eager masked model."""
    from test_schedules import context_only_inputs, context_only_reference

    tile = 16
    model, inputs = tiny_model("llama", "lora").cuda(), context_only_inputs(tile, "cuda")
    ref_loss, ref_grads = context_only_reference(model, "llama", inputs, tile, [2, 3, 6, 7])
    torch._dynamo.reset()
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=0.5, k_align=64, predictor="oracle",
                                                        granularity="tile", tile_size=tile, dense_output_share=0.5))
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    assert all(e.rewritten and e.note.startswith("context-only: 4 of 8") for e in backend.report.mlp), \
        str(backend.report)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-3, rtol=1e-3, msg=name)


def test_attention_blocks_inductor_cannot_tile_stay_dense_and_train():
    """bf16, head dim 64, 64-token blocks: on an H100 Inductor's FlexAttention backward has only
    128-wide tiles for these, so the rewrite would not compile; the step must compile either way."""
    import peft
    import transformers
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16),
                                peft.LoraConfig(r=4, target_modules="all-linear")).train()
    ids = torch.randint(0, 128, (2, 256), device="cuda")
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=1.0, attn_density=0.5, attn_block=64))
    torch._dynamo.reset()
    loss = torch.compile(model, backend=backend)(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    entries = backend.report.attention
    assert entries and all(e.rewritten or "use attn_block=128" in e.note for e in entries), str(backend.report)


@pytest.mark.parametrize("activation,gated,adapters", [("relu", False, "lora"), ("silu", True, "lora"),
                                                       ("relu", False, "ia3"), ("silu", True, "ia3")])
@pytest.mark.parametrize("compact", [False, True])
def test_sparse_mlp_kernels_on_cuda_match_masked_reference(activation, gated, adapters, compact, monkeypatch):
    """The Triton kernel path in bf16 (LoRA on every linear, or IA3 on fc2's input, per-sequence
    neurons): output and every gradient against the masked dense MLP in fp32 from the same
    bf16-rounded values. ``compact``: the GEMMs on cuBLAS over compact copies of the kept rows
    (the threshold lowered to these 64-token sequences)."""
    from lecompile.kernels import gather_gemm
    from lecompile.ops.adapted_linear import AdaptedLinear, pack_mlp
    monkeypatch.setattr(gather_gemm, "COMPACT_MIN_GROUP_TOKENS", 64 if compact else 2 ** 40)
    from test_ops import leaves, make_mlp, masked_dense, random_idx

    from lecompile.ops.sparse_mlp import _uses_kernels, sparse_mlp
    gen = torch.Generator().manual_seed(0)
    batch, seq, d, ffn, k = 2, 64, 96, 512, 256

    def to(lins, dtype):
        return [None if lin is None else AdaptedLinear(**{
            name: t.detach().to("cuda", dtype).requires_grad_(t.requires_grad) if torch.is_tensor(t) else t
            for name, t in lin.__dict__.items()}) for lin in lins]

    lins = make_mlp(d, ffn, torch.float32, gated, adapters)
    lins[0].out_scale = None  # IA3 on fc1's output is a reference-only layout
    fast = to(lins, torch.bfloat16)
    ref = to(fast, torch.float32)
    x = torch.randn(batch, seq, d, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    x_ref = x.detach().float().requires_grad_()
    idx = random_idx(batch, ffn, k, gen).cuda()
    params, slots, scales = pack_mlp(*fast)
    assert _uses_kernels(x, idx, params, slots)
    y = sparse_mlp(x, idx, params, slots, scales, activation, 0.0)[0]
    y_ref = masked_dense(x_ref, idx, *ref, activation)
    torch.testing.assert_close(y.float(), y_ref, atol=3e-2, rtol=3e-2)
    dy = torch.randn(y.shape, generator=gen).cuda()
    got = torch.autograd.grad(y, leaves(x, *fast), dy.to(y.dtype))
    want = torch.autograd.grad(y_ref, leaves(x_ref, *ref), dy)
    assert len(got) == len(want) > (4 if adapters == "lora" else 2)
    # On cuBLAS the GEMMs' outputs are rounded to bf16 before the epilogue, as in PyTorch's own bf16
    # MLP: the band each gradient must stay within is that MLP's error, or the kernels' tolerance.
    y_bf16 = masked_dense(x, idx, *fast, activation)
    plain = torch.autograd.grad(y_bf16, leaves(x, *fast), dy.to(y.dtype))
    for g, w, p in zip(got, want, plain):
        torch.testing.assert_close(g.float(), w, atol=max(5e-2, 1.5 * (p.float() - w).abs().max().item()),
                                   rtol=5e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("vocab", [50272, 50257])  # OPT's, and GPT-2's odd one (padded for the GEMM)
def test_lm_head_loss_kernel_on_cuda_matches_cross_entropy(reduction, vocab):
    """The Triton rows kernel in bf16 at real vocabulary sizes, chunked, against PyTorch's loss."""
    import torch.nn.functional as F

    from lecompile.ops.lm_head_loss import lm_head_cross_entropy
    gen = torch.Generator().manual_seed(0)
    n, d = 1024, 64
    hidden = torch.randn(n, d, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen) * d ** -0.5).to("cuda", torch.bfloat16)
    target = torch.randint(0, vocab, (n,), generator=gen).cuda()
    target[::7] = -100
    logits = hidden @ weight.t()
    loss = lm_head_cross_entropy(logits.detach(), hidden, weight, target, -100, reduction)[0]
    want = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(loss, want, atol=1e-3, rtol=1e-3)
    got_grad = torch.autograd.grad(loss, hidden)[0]
    want_grad = torch.autograd.grad(want, hidden)[0]
    torch.testing.assert_close(got_grad.float(), want_grad.float(), atol=2e-2, rtol=2e-2)


def test_shape_specialized_forms_replay_as_cuda_graphs():
    """A new sequence length makes Dynamo recompile with symbolic sizes; the backend's static
    form per length (lecompile.specialize) runs sparse under CUDA graphs, with the loss of a
    ``dynamic=False`` compile of that length."""
    from torch._dynamo.utils import counters

    config = LongExposureConfig.create(mlp_density=0.5, k_align=64, predictor="oracle", cudagraphs=True)
    ids = {seq: torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(seq)).cuda()
           for seq in (16, 32)}
    model = tiny_model("llama", "lora", dtype=torch.bfloat16).cuda()
    torch._dynamo.reset()
    counters["lecompile"].clear()
    backend = lecompile.longexposure(config)
    compiled = torch.compile(model, backend=backend)
    losses = []
    for seq in (16, 32, 32):
        loss = compiled(input_ids=ids[seq], labels=ids[seq], use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
    assert counters["lecompile"]["shape_specializations"] >= 1
    assert all(r.mlp_rewritten == LAYERS for r in backend.reports if r.mlp)
    torch._dynamo.reset()
    static = torch.compile(model, backend=lecompile.longexposure(config), dynamic=False)
    expected = static(input_ids=ids[32], labels=ids[32], use_cache=False).loss.item()
    assert losses[1] == pytest.approx(expected, rel=1e-2) and losses[2] == pytest.approx(expected, rel=1e-2)


def test_bloom_alibi_attention_on_cuda_is_exact_when_every_block_is_kept():
    """BLOOM's ALiBi attention through FlexAttention (the bias a [B, H, 1, S] score operand): at
    two blocks of 128 every causal block is kept, so the step equals eager BLOOM's."""
    import peft
    import transformers
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=LAYERS,
                                                                   n_head=4))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                                       init_lora_weights=False)).cuda().train()
    ids = torch.randint(0, 128, (2, 256), generator=torch.Generator().manual_seed(1)).cuda()
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    eager_loss, eager_grads = train_step(model, model, inputs)
    torch._dynamo.reset()
    backend = lecompile.longexposure(LongExposureConfig.create(attn_density=0.5, attn_block=128))
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    assert backend.report.attention_rewritten == LAYERS, str(backend.report)
    torch.testing.assert_close(loss, eager_loss, atol=1e-4, rtol=1e-4)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-3, rtol=1e-3, msg=name)
