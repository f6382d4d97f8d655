"""Block-sparse attention: layouts, predictor, operator vs masked dense reference, and the rewrite
of tiny models' SDPA and eager attention against an eager model running the reference."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import BlockMask, noop_mask

import lecompile
from lecompile import LongExposureConfig
from lecompile.ops.block_attention import (
    allowed_blocks,
    block_attention_flex,
    block_attention_ref,
    block_mask,
    kv_block_lists,
)
from lecompile.predictors.attention import (
    atomic_layouts,
    choose_layouts,
    choose_layouts_ref,
    predict_blocks,
    transformers_attention,
)

from models import ARCHS, LAYERS, VOCAB, tiny_model, train_step

BLOCK = 16


def qkv(B=2, H=4, Hkv=2, L=64, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def padded_mask(B, L, pad):
    """transformers' SDPA mask for left padding of ``pad`` tokens on the last sequence."""
    mask = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    mask[-1, :, :, :pad] = False
    mask[-1, :, :pad, :pad] = torch.eye(pad, dtype=torch.bool)
    return mask


def test_atomic_layouts_are_columns_and_diagonals():
    layouts, names = atomic_layouts(3, 4)
    assert layouts.shape == (4 + 6, 3, 4) and len(names) == 10
    assert names[0] == "column 0" and names[4] == "diagonal 0"
    assert layouts[0][:, 0].all() and layouts[0].sum() == 3
    diagonal_0 = layouts[4]  # query block i reads key block i + 1 (one more key block than query)
    assert diagonal_0.nonzero().tolist() == [[0, 1], [1, 2], [2, 3]]
    assert layouts.flatten(1).sum(0).min() >= 2, "every block is on one column and one diagonal"


def test_choose_layouts_respects_budget_and_keeps_sink_and_diagonal():
    n = 8
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    mass = torch.rand(2, 3, n, n).masked_fill(~allowed, 0)
    floor = 2 * n - 1  # the sink and the diagonal
    for density in (0.1, 0.5, 0.75):
        keep = choose_layouts(mass, allowed, density)
        assert keep.shape == (2, 3, n, n) and not (keep & ~allowed).any()
        assert (keep.sum((-1, -2)) <= max(density * allowed.sum(), floor)).all()
        assert keep[..., 0].all() and keep.diagonal(dim1=-2, dim2=-1).all()
    full = choose_layouts(mass, allowed, 1.0)
    assert full.sum() >= 0.9 * allowed.sum() * 6
    # A head whose mass sits on column 3 keeps that column.
    mass = torch.zeros(1, 1, n, n)
    mass[..., 3:, 3] = 1.0
    assert choose_layouts(mass, allowed, 0.6)[0, 0, 3:, 3].all()


@pytest.mark.parametrize("n, m", [(1, 1), (4, 4), (3, 5), (7, 3), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_choose_layouts_picks_what_the_reference_over_every_layout_picks(n, m, dtype):
    torch.manual_seed(n * m)
    causal = torch.ones(n, m, dtype=torch.bool).tril(m - n)
    padded = causal.clone()
    padded[:, : m // 2] = False  # left padding: a sequence whose first keys are masked
    padded[: n // 2] = causal[: n // 2] & torch.eye(n, m, dtype=torch.bool)[: n // 2]
    full = torch.ones(n, m, dtype=torch.bool)
    for allowed in (causal[None, None], full[None, None], torch.stack([causal, padded])[:, None]):
        mass = torch.rand(2, 3, n, m, dtype=dtype).masked_fill(~allowed, 0)
        for density in (0.05, 0.3, 0.5, 0.75, 1.0):
            assert torch.equal(choose_layouts(mass, allowed, density), choose_layouts_ref(mass, allowed, density))


def test_allowed_blocks_of_causal_and_padding_masks():
    L = 64
    any_c, all_c = allowed_blocks(["mul"], [0.25], True, L, L, BLOCK, "cpu")
    n = L // BLOCK
    assert torch.equal(any_c[0, 0], torch.ones(n, n, dtype=torch.bool).tril())
    assert torch.equal(all_c[0, 0], torch.ones(n, n, dtype=torch.bool).tril(-1))
    mask = padded_mask(2, L, 5)
    any_m, all_m = allowed_blocks(["mul", "mask"], [0.25, mask], False, L, L, BLOCK, "cpu")
    assert torch.equal(any_m[0, 0], any_c[0, 0]) and torch.equal(all_m[0, 0], all_c[0, 0])
    assert not all_m[1, 0, 1:, 0].any(), "blocks holding padded keys are partial"
    additive = torch.zeros(2, 1, L, L).masked_fill(~mask, torch.finfo(torch.float32).min)
    any_a, all_a = allowed_blocks(["add"], [additive], False, L, L, BLOCK, "cpu")
    assert torch.equal(any_a, any_m) and torch.equal(all_a, all_m)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,kv_len,block", [(64, 64, 16), (32, 96, 16), (128, 128, 32), (16, 64, 8)])
def test_allowed_blocks_without_masks_match_the_token_mask(causal, q_len, kv_len, block):
    """Causal-only scores get their blocks from the block corners: the same as reducing the token mask."""
    tokens = torch.ones(q_len, kv_len, dtype=torch.bool)
    if causal:
        tokens = tokens.tril(kv_len - q_len)
    tiles = tokens.reshape(q_len // block, block, kv_len // block, block)
    any_b, all_b = allowed_blocks(["mul"], [0.25], causal, q_len, kv_len, block, "cpu")
    assert torch.equal(any_b[0, 0], tiles.any(-1).any(-2)) and torch.equal(all_b[0, 0], tiles.all(-1).all(-2))
    assert any_b.shape == all_b.shape == (1, 1, q_len // block, kv_len // block)


def masked_dense(q, k, v, keep, mask, scale):
    """The reference spelled out: SDPA with the token mask of ``keep`` and ``mask`` combined."""
    tokens = keep.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1) & mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=tokens, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("masking", ["causal", "bool", "additive"])
@pytest.mark.parametrize("predictor", ["pooled", "oracle"])
def test_operator_matches_masked_dense_reference(density, heads, masking, predictor):
    q, k, v = qkv(H=heads[0], Hkv=heads[1])
    L, scale = q.shape[-2], q.shape[-1] ** -0.5
    mask = padded_mask(2, L, 5)
    steps, operands, causal = {
        "causal": (["mul"], [scale], True),
        "bool": (["mul", "mask"], [scale, mask], False),
        "additive": (["div", "add"], [torch.tensor(scale ** -1),
                                      torch.zeros(2, 1, L, L).masked_fill(~mask, -3e38)], False),
    }[masking]
    if masking == "causal":
        mask = torch.ones(L, L, dtype=torch.bool).tril()
    any_b, all_b = allowed_blocks(steps, operands, causal, L, L, BLOCK, "cpu")
    keep = predict_blocks(q, k, any_b, steps, operands, causal, BLOCK, density, predictor)
    assert keep.shape == (2, heads[0], L // BLOCK, L // BLOCK) and not keep.requires_grad
    if density < 1.0:
        assert (keep.sum((-1, -2)) < any_b.sum((-1, -2))).all(), "nothing was dropped: the test cannot fail"

    expected = masked_dense(q, k, v, keep, mask, scale)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    for impl in ("ref", "flex"):
        if impl == "ref":
            out = block_attention_ref(q, k, v, keep, steps, operands, causal, BLOCK, enable_gqa=True)
        else:
            out = block_attention_flex(q, k, v, keep, all_b, steps, operands, causal, BLOCK, enable_gqa=True)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=impl)
        for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), expected_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=impl)


@pytest.mark.parametrize("predictor", ["pooled", "oracle"])
def test_soft_capped_scores_match_the_spelled_out_reference(predictor):
    """Gemma 2's soft-capping (``div c, tanh, mul c``) before an additive mask, after a per-head
    ALiBi-like bias ``[B, H, 1, S]``; an additive step before the ``tanh`` no longer masks, so it
    does not make blocks unallowed."""
    q, k, v = qkv(H=4, Hkv=2)
    L, scale, cap = q.shape[-2], q.shape[-1] ** -0.5, 0.5
    additive = torch.zeros(2, 1, L, L).masked_fill(~padded_mask(2, L, 5), -3e38)
    alibi = torch.linspace(-1, 1, 4)[None, :, None, None] * torch.arange(L)[None, None, None, :] / L
    alibi = alibi.expand(2, 4, 1, L)
    steps, operands = ["mul", "add", "div", "tanh", "mul", "add"], [scale, alibi, cap, None, cap, additive]
    any_b, all_b = allowed_blocks(steps, operands, False, L, L, BLOCK, "cpu")
    keep = predict_blocks(q, k, any_b, steps, operands, False, BLOCK, 0.5, predictor)
    assert (keep.sum((-1, -2)) < any_b.sum((-1, -2))).all(), "nothing was dropped: the test cannot fail"
    tokens = keep.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1) & padded_mask(2, L, 5)
    kv = [t.repeat_interleave(2, dim=1) for t in (k, v)]
    scores = cap * torch.tanh((q @ kv[0].transpose(-1, -2) * scale + alibi) / cap)
    expected = scores.masked_fill(~tokens, float("-inf")).softmax(-1) @ kv[1]
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    outs = {"ref": block_attention_ref(q, k, v, keep, steps, operands, False, BLOCK, enable_gqa=True),
            "flex": block_attention_flex(q, k, v, keep, all_b, steps, operands, False, BLOCK, enable_gqa=True)}
    for impl, out in outs.items():
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=impl)
        for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), expected_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=impl)
    before_tanh = ["mul", "add", "tanh"], [scale, additive, None]
    assert allowed_blocks(*before_tanh, False, L, L, BLOCK, "cpu")[0].all()


@pytest.mark.parametrize("masking", ["causal", "additive", "softcap"])
def test_operator_under_users_torch_compile(masking):
    """Traced by Dynamo (benchmarks, users' own compiled functions) the operator goes through the
    public flex_attention; same results as the reference, also with Gemma 2's soft-capping.
    (FlexAttention does not train on the CPU: tests/test_cuda.py checks the gradients of this path.)"""
    q, k, v = (t.detach() for t in qkv(H=4, Hkv=2))
    L, scale = q.shape[-2], q.shape[-1] ** -0.5
    steps, operands, causal = {
        "causal": (["mul"], [scale], True),
        "additive": (["div", "add"], [torch.tensor(scale ** -1),
                                      torch.zeros(2, 1, L, L).masked_fill(~padded_mask(2, L, 5), -3e38)], False),
        "softcap": (["mul", "div", "tanh", "mul"], [scale, 2.0, None, 2.0], True)}[masking]
    any_b, all_b = allowed_blocks(steps, operands, causal, L, L, BLOCK, "cpu")
    keep = predict_blocks(q, k, any_b, steps, operands, causal, BLOCK, 0.5, "pooled")
    torch._dynamo.reset()
    compiled = torch.compile(block_attention_flex, backend="eager", fullgraph=True)
    out = compiled(q, k, v, keep, all_b, steps, operands, causal, BLOCK, enable_gqa=True)
    expected = block_attention_ref(q, k, v, keep, steps, operands, causal, BLOCK, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_key_value_heads_repeated_to_the_query_heads_give_the_same_attention():
    """``attn_expand_kv``: the kernels see as many key/value heads as query heads, same result.
    (Gradients: tests/test_cuda.py.)"""
    q, k, v = (t.detach() for t in qkv(H=4, Hkv=2))
    any_b, all_b = allowed_blocks(["mul"], [0.25], True, q.shape[-2], q.shape[-2], BLOCK, "cpu")
    keep = predict_blocks(q, k, any_b, ["mul"], [0.25], True, BLOCK, 0.5, "pooled")
    torch._dynamo.reset()
    compiled = torch.compile(block_attention_flex, backend="eager", fullgraph=True)
    out = compiled(q, k, v, keep, all_b, ["mul"], [0.25], True, BLOCK, enable_gqa=True, expand_kv=True)
    expected = block_attention_ref(q, k, v, keep, ["mul"], [0.25], True, BLOCK, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_traced_for_inductor_the_mask_reads_no_block_table():
    """Traced for Inductor (fake tensors, as in the backend's graph) mask_mod gets only the
    model's masks: the kernels skip unlisted blocks, and a per-element lookup of the kept-block
    table made them 4x slower on the H100. Eager calls still need it (math implementation)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = (t.detach() for t in qkv(B=1, H=2, Hkv=2, L=64, D=16))
    any_b, all_b = allowed_blocks(["mul"], [0.25], True, 64, 64, 16, "cpu")
    keep = any_b.expand(1, 2, 4, 4).clone()
    traced = make_fx(lambda q, k, v, keep, all_b: block_attention_flex(q, k, v, keep, all_b, ["mul"], [0.25],
                                                                         True, 16), tracing_mode="fake")
    calls = [n for n in traced(q, k, v, keep, all_b).graph.nodes if "flex_attention" in str(n.target)]
    assert len(calls) == 1 and calls[0].args[-1] == (), calls[0].args[-1]


def test_reference_gradcheck_float64():
    q, k, v = (t.detach().double().requires_grad_() for t in qkv(B=1, H=2, Hkv=1, L=32, D=4))
    keep = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)[None, None].expand(1, 2, 2, 2)
    keep = keep.clone()
    keep[0, 1, 1, 0] = False
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_attention_ref(q, k, v, keep, ["mul"], [0.5], True, BLOCK, enable_gqa=True),
        (q, k, v))


def test_kv_block_lists_order_kept_blocks_first():
    blocks = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)[None, None]
    num, idx = kv_block_lists(blocks)
    assert num.tolist() == [[[2, 1]]] and idx[0, 0, 0, :2].tolist() == [1, 3] and idx[0, 0, 1, 0] == 0


def test_block_mask_has_the_query_block_lists_flex_attention_derives():
    keep = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.4
    full = keep & (torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.5)
    partial = keep & ~full
    ours = block_mask(partial, full, BLOCK, (6 * BLOCK, 6 * BLOCK), noop_mask)
    flex = BlockMask.from_kv_blocks(*kv_block_lists(partial), *kv_block_lists(full), BLOCK_SIZE=BLOCK,
                                    seq_lengths=(6 * BLOCK, 6 * BLOCK))
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                 "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, name), getattr(flex, name)), name
    assert ours.BLOCK_SIZE == flex.BLOCK_SIZE and ours.seq_lengths == flex.seq_lengths


def test_bad_inputs_name_the_problem():
    q, k, v = qkv()
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="step must be one of"):
        block_attention_ref(q, k, v, keep, ["pow"], [2.0], True, BLOCK, True)
    with pytest.raises(ValueError, match="needs a bool tensor"):
        block_attention_ref(q, k, v, keep, ["mask"], [torch.ones(4)], True, BLOCK, True)
    with pytest.raises(ValueError, match="'mask' step before 'tanh'"):
        block_attention_ref(q, k, v, keep, ["mask", "tanh"], [torch.ones(4, dtype=torch.bool), None], True, BLOCK, True)
    with pytest.raises(ValueError, match="method must be one of"):
        predict_blocks(q, k, keep, ["mul"], [1.0], True, BLOCK, 0.5, "magic")
    with pytest.raises(ValueError, match="density must be in"):
        predict_blocks(q, k, keep, ["mul"], [1.0], True, BLOCK, 0.0, "pooled")


# --- the rewrite on tiny models -------------------------------------------------------------------

SEQ = 64


def reference_attention(density, block=BLOCK):
    """An SDPA replacement for transformers running the same predictor and the reference op."""
    return transformers_attention(density, block)


def attention_batch(padded: bool):
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    if padded:
        mask = torch.ones_like(ids)
        mask[-1, :7] = 0
        inputs["attention_mask"] = mask
        # Also the first real token: its label is predicted from the last pad, a query with no
        # allowed key, whose output differs by implementation (zeros here and in SDPA).
        inputs["labels"] = ids.masked_fill(mask == 0, -100).index_fill(1, torch.tensor([7]), -100)
    return inputs


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_rewrite_matches_reference_model(arch, impl, monkeypatch):
    model = tiny_model(arch, "lora")
    model.base_model.model.config._attn_implementation = impl
    inputs = attention_batch(padded=arch in ("llama", "opt"))
    _, dense_grads = train_step(model, model, inputs)

    counters.clear()
    torch._dynamo.reset()
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=1.0, attn_density=0.5, attn_block=BLOCK))
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    assert len(backend.report.attention) == LAYERS and all(e.rewritten for e in backend.report.attention), \
        str(backend.report)
    assert counters["lecompile"]["block_attention"] == LAYERS

    model.base_model.model.config._attn_implementation = "sdpa"
    monkeypatch.setitem(transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS, "sdpa", reference_attention(0.5))
    ref_loss, ref_grads = train_step(model, model, inputs)
    effect = max((ref_grads[n] - dense_grads[n]).abs().max().item() for n in ref_grads)
    assert effect > 1e-3, "sparsity had no effect: the test cannot fail"
    torch.testing.assert_close(loss, ref_loss, atol=2e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_masked_attention_at_density_one_runs_as_exact_blocks():
    """``attn_mask_blocks``: at density 1.0 the model's masked SDPA (padded rows) becomes block
    attention over every block its mask allows: the same loss and gradients as the SDPA; an SDPA
    without a token mask stays as it is."""
    model, inputs = tiny_model("llama", "lora"), attention_batch(padded=True)
    torch._dynamo.reset()
    ref_loss, ref_grads = train_step(torch.compile(model, backend=lecompile.longexposure(
        LongExposureConfig.create(mlp_density=1.0))), model, inputs)
    torch._dynamo.reset()
    config = LongExposureConfig.create(mlp_density=1.0, attn_block=BLOCK, attn_mask_blocks=True)
    backend = lecompile.longexposure(config)
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    assert backend.report.attention_rewritten == LAYERS, str(backend.report)
    assert all(e.note.startswith("attn_mask_blocks: exact") for e in backend.report.attention)
    torch.testing.assert_close(loss, ref_loss, atol=2e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    q = torch.randn(1, 2, SEQ, 16, requires_grad=True)
    report = lecompile.explain(causal, q, q, q, config=config)
    assert report.attention and not report.attention[0].rewritten
    assert report.attention[0].note == "attn_density 1.0: dense"


@pytest.mark.slow
def test_gemma2_soft_capped_attention_matches_the_reference_model(monkeypatch):
    """Gemma 2's eager attention soft-caps its scores (``tanh``) before the mask: rewritten, the
    step equals the reference attention with the same soft-capping and predictor."""
    import peft
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attn_logit_softcapping=1.0))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                                       init_lora_weights=False)).train()
    model.base_model.model.config._attn_implementation = "eager"
    inputs = attention_batch(padded=False)
    backend = lecompile.longexposure(LongExposureConfig.create(attn_density=0.5, attn_block=BLOCK))
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    assert backend.report.attention_rewritten == LAYERS, str(backend.report)

    model.base_model.model.config._attn_implementation = "sdpa"
    monkeypatch.setitem(transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS, "sdpa", reference_attention(0.5))
    ref_loss, ref_grads = train_step(model, model, inputs)
    monkeypatch.setitem(transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS, "sdpa",
                        lambda *a, softcap=None, **kw: reference_attention(0.5)(*a, **kw))
    uncapped_loss, _ = train_step(model, model, inputs)
    assert abs(uncapped_loss - ref_loss) > 1e-4, "soft-capping had no effect: the test cannot fail"
    torch.testing.assert_close(loss, ref_loss, atol=2e-5, rtol=1e-4)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


SLIDING_WINDOW = 16  # tokens: a quarter of SEQ, so the window hides most of each row's keys


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_attention_matches_the_reference_model(arch, monkeypatch):
    """Mistral's and Gemma 3's sliding windows reach the attention as its mask: rewritten, the
    blocks wholly outside the window are never allowed and the step equals the reference
    attention under the same mask (long-context fine-tuning meets such windows past 1-4k tokens)."""
    import peft

    def model(window):
        torch.manual_seed(0)
        common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      sliding_window=window)
        base = (transformers.MistralForCausalLM(transformers.MistralConfig(**common)) if arch == "mistral" else
                transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(head_dim=16, **common)))
        m = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                                      init_lora_weights=False)).train()
        m.base_model.model.config._attn_implementation = "eager"
        return m

    inputs = attention_batch(padded=False)
    windowed = model(SLIDING_WINDOW)
    backend = lecompile.longexposure(LongExposureConfig.create(attn_density=0.5, attn_block=BLOCK))
    loss, grads = train_step(torch.compile(windowed, backend=backend), windowed, inputs)
    assert backend.report.attention_rewritten == LAYERS, str(backend.report)

    monkeypatch.setitem(transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS, "sdpa", reference_attention(0.5))
    references = {}
    for window in (SLIDING_WINDOW, SEQ):
        reference = model(window)
        reference.base_model.model.config._attn_implementation = "sdpa"
        references[window] = train_step(reference, reference, inputs)
    ref_loss, ref_grads = references[SLIDING_WINDOW]
    assert abs(references[SEQ][0] - ref_loss) > 1e-4, "the window had no effect: the test cannot fail"
    torch.testing.assert_close(loss, ref_loss, atol=2e-5, rtol=1e-4)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_bloom_alibi_attention_is_rewritten_and_exact_when_every_block_is_kept():
    """BLOOM's merged-heads ``baddbmm`` attention (ALiBi inside the product) is put in the 4-d form
    and rewritten; at 32 tokens in blocks of 16 every causal block is kept (the first key block
    and the diagonal always are), so loss and gradients equal eager BLOOM's."""
    import peft
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=LAYERS,
                                                                   n_head=4))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                                       init_lora_weights=False)).train()
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    eager_loss, eager_grads = train_step(model, model, inputs)
    counters.clear()
    backend = lecompile.longexposure(LongExposureConfig.create(attn_density=0.5, attn_block=BLOCK))
    loss, grads = train_step(torch.compile(model, backend=backend), model, inputs)
    assert backend.report.attention_rewritten == LAYERS and counters["lecompile"]["alibi_attention"] == LAYERS
    torch.testing.assert_close(loss, eager_loss, atol=2e-5, rtol=1e-4)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_density_one_and_other_reasons_leave_attention_dense():
    model, inputs = tiny_model("llama", "lora"), attention_batch(padded=False)
    report = lecompile.explain(model, **inputs, config=LongExposureConfig(mlp_density=1.0))
    assert all(not e.rewritten and "attn_density 1.0" in e.note for e in report.attention)
    report = lecompile.explain(model, **inputs, config=LongExposureConfig.create(attn_density=0.5, attn_block=48))
    assert all(not e.rewritten and "not multiples of attn_block=48" in e.note for e in report.attention)
    report = lecompile.explain(model, **inputs, config=LongExposureConfig.create(attn_density=0.5, attn_block=16,
                                                                          disable={"rewrite_attention"}))
    assert all(not e.rewritten and "disabled (disable={'rewrite_attention'})" in e.note for e in report.attention)
    with torch.no_grad():
        report = lecompile.explain(model, **inputs, config=LongExposureConfig.create(attn_density=0.5, attn_block=16))
    assert all(not e.rewritten and "inference graph" in e.note for e in report.attention)


def test_blocks_inductors_flex_backward_cannot_tile_leave_attention_dense(monkeypatch):
    from lecompile.passes import rewrite_attention
    model, inputs = tiny_model("llama", "lora"), attention_batch(padded=False)
    config = LongExposureConfig.create(mlp_density=1.0, attn_density=0.5, attn_block=16)
    monkeypatch.setattr(rewrite_attention, "flex_backward_tiles", lambda q: [(64, 128, 128, 64)])  # H100's
    report = lecompile.explain(model, **inputs, config=config)
    assert report.attention and all(not e.rewritten and "attn_block=16 is not a multiple of (use attn_block=128)"
                                    in e.note for e in report.attention), str(report)
    monkeypatch.setattr(rewrite_attention, "flex_backward_tiles", lambda q: [(64, 128, 128, 64), (16, 16, 16, 16)])
    assert all(e.rewritten for e in lecompile.explain(model, **inputs, config=config).attention)


def test_flash_kernels_are_asked_for_by_name_and_their_absence_is_reported(monkeypatch):
    from lecompile.ops import block_attention
    from lecompile.passes import rewrite_attention
    assert block_attention.flex_options(128, "flash") == {"BACKEND": "FLASH"}
    assert block_attention.flex_options(64, "triton") == block_attention.kernel_options(64)
    with pytest.raises(ValueError, match="attn_kernel"):
        LongExposureConfig.create(attn_kernel="cute")
    model, inputs = tiny_model("llama", "lora"), attention_batch(padded=False)
    config = LongExposureConfig.create(mlp_density=1.0, attn_density=0.5, attn_block=16, attn_kernel="flash")
    find_spec = importlib.util.find_spec
    installed = {"flash_attn.cute": False, "cutlass": False}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (object() if installed[name] else None) if name in installed else find_spec(name, *a)))
    report = lecompile.explain(model, **inputs, config=config)
    assert report.attention and all(
        e.rewritten and e.kernel == "triton" and "attn_kernel='flash' needs FlashAttention 4's CuTe kernels" in e.note
        and e.note.endswith("FlexAttention's Triton kernels instead") for e in report.attention), str(report)
    # flash-attn-4 installed where Python cannot import the CUTLASS DSL (a pip --target install):
    # Inductor's generated code would fail to import, so the Triton kernels run it, saying why.
    installed["flash_attn.cute"] = True
    assert "`cutlass` module, which is not importable" in block_attention.flash_missing()
    assert all(e.kernel == "triton" and "dsl_packages folder on PYTHONPATH" in e.note
               for e in lecompile.explain(model, **inputs, config=config).attention)
    installed["cutlass"] = True  # the CPU runs the reference
    assert block_attention.flash_missing() == ""
    assert all(e.rewritten and e.kernel == "flash" for e in lecompile.explain(model, **inputs, config=config).attention)
    # On a GPU the kernels take bf16/fp16 on Hopper or newer, and no token mask; elsewhere the Triton
    # kernels run attention, the note saying why.
    cuda = lambda dtype: SimpleNamespace(dtype=dtype, device=torch.device("cuda"))  # noqa: E731
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    why = rewrite_attention._why_not_flash
    assert why(cuda(torch.float32), False) == "runs bf16 and fp16 attention only, not float32"
    assert why(cuda(torch.bfloat16), False) == "needs a Hopper GPU or newer (sm90+), not sm80"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert why(cuda(torch.bfloat16), False) == ""
    assert why(cuda(torch.bfloat16), True) == rewrite_attention.FLASH_TOKEN_MASK


class ALiBiAttention(torch.nn.Module):
    """BLOOM's shape of attention: the bias enters inside the product (``baddbmm``)."""

    def __init__(self, heads=4, dim=16):
        super().__init__()
        self.heads, self.qkv = heads, torch.nn.Linear(heads * dim, 3 * heads * dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b * self.heads, n, -1) for t in self.qkv(x).chunk(3, dim=-1))
        bias = torch.arange(n, dtype=x.dtype).expand(b * self.heads, 1, n)
        scores = bias.baddbmm(q, k.transpose(1, 2), beta=1.0, alpha=0.25).view(b, self.heads, n, n)
        probs = F.softmax(scores, dim=-1).view(b * self.heads, n, n)
        return torch.bmm(probs, v).sum()


class EinsumAttention(ALiBiAttention):
    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        probs = F.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k), dim=-1)
        return (probs @ v).sum()


@pytest.mark.parametrize("module, disable, op", [(EinsumAttention, (), "einsum"),
                                                 (ALiBiAttention, ("alibi_attention",), "baddbmm")])
def test_attention_whose_scores_are_no_plain_product_is_reported(module, disable, op):
    config = LongExposureConfig.create(attn_density=0.5, attn_block=16, disable=frozenset(disable))
    report = lecompile.explain(module(), torch.randn(2, 32, 64), config=config)
    assert len(report.attention) == 1 and not report.attention[0].rewritten
    assert f"scores come from `{op}`" in report.attention[0].note


def test_alibi_attention_of_a_plain_module_is_rewritten():
    report = lecompile.explain(ALiBiAttention(), torch.randn(2, 32, 64),
                               config=LongExposureConfig.create(attn_density=0.5, attn_block=16))
    assert [e.rewritten for e in report.attention] == [True]
