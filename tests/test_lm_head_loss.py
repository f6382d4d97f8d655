"""``lecompile::lm_head_cross_entropy`` and the pass that uses it, against PyTorch's cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from lecompile.ops import lm_head_loss
from lecompile.ops.lm_head_loss import cross_entropy_rows_ref, lm_head_cross_entropy


def _case(n=24, d=16, vocab=300, dtype=torch.float32, ignored=(3, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(vocab, d, generator=gen).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[list(ignored)] = -100
    return hidden, weight, target


def _reference(hidden, weight, target, reduction):
    logits = hidden @ weight.t()
    loss = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction=reduction)
    return loss, torch.autograd.grad(loss, hidden)[0]


@pytest.fixture(params=["reference", "kernel"])
def path(request, monkeypatch):
    """The op's PyTorch rows, or its Triton kernel in the interpreter on CPU tensors."""
    import os
    if request.param == "kernel":
        if os.environ.get("TRITON_INTERPRET") != "1" or lm_head_loss.cross_entropy_rows is None:
            pytest.skip("the kernel on CPU tensors needs Triton and TRITON_INTERPRET=1")
        monkeypatch.setattr(lm_head_loss, "INTERPRET_ON_CPU", True)
    return request.param


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_matches_cross_entropy_loss_and_gradient(path, reduction, dtype, monkeypatch):
    monkeypatch.setattr(lm_head_loss, "CHUNK_ELEMENTS", 300 * 10)  # three chunks of 10 rows
    hidden, weight, target = _case(dtype=dtype)
    logits = (hidden @ weight.t()).detach()
    loss, _ = lm_head_cross_entropy(logits, hidden, weight, target, -100, reduction)
    grad = torch.autograd.grad(2.0 * loss, hidden)[0]
    want_loss, want_grad = _reference(hidden, weight, target, reduction)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss, want_loss, **tol)
    torch.testing.assert_close(grad.float(), 2.0 * want_grad.float(), **tol)
    assert grad.dtype == dtype


@pytest.mark.parametrize("layout", ["fp32 logits", "transposed hidden"])
def test_gradient_comes_back_in_the_hidden_states_dtype_and_layout(layout, monkeypatch):
    """A model that upcasts its logits, or hands the op a transposed view of its hidden states:
    the gradient is written in the hidden states' dtype and layout, not the logits'."""
    monkeypatch.setattr(lm_head_loss, "CHUNK_ELEMENTS", 300 * 10)
    hidden, weight, target = _case(dtype=torch.bfloat16)
    if layout == "transposed hidden":
        hidden = hidden.detach().t().contiguous().t().requires_grad_()
    logits = (hidden @ weight.t()).detach()
    if layout == "fp32 logits":
        logits = logits.float()
    loss, grad = lm_head_cross_entropy(logits, hidden, weight, target, -100, "mean")
    assert grad.dtype == torch.bfloat16 and grad.stride() == hidden.stride()
    want_loss, want_grad = _reference(hidden, weight, target, "mean")
    torch.testing.assert_close(loss, want_loss, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad.float(), want_grad.float(), atol=2e-2, rtol=2e-2)


def test_rows_of_ignored_targets_get_no_loss_and_no_gradient(path):
    hidden, weight, target = _case(n=4, ignored=(0, 1, 2, 3))
    loss_rows = torch.full((4,), 7.0)
    rows = lm_head_loss._rows_fn(hidden.device)
    grad = rows(hidden.detach() @ weight.t(), target, torch.ones(1), -100, loss_rows, 300)
    assert torch.equal(loss_rows, torch.zeros(4)) and torch.equal(grad, torch.zeros_like(grad))


def test_kernel_rows_match_reference_rows():
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" or lm_head_loss.cross_entropy_rows is None:
        pytest.skip("needs Triton and TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 333, generator=gen) * 5
    target = torch.tensor([0, 332, -100, 5, 100, 7])
    got_rows, want_rows = torch.empty(6), torch.empty(6)
    got = lm_head_loss.cross_entropy_rows(logits, target, torch.tensor([0.25]), -100, got_rows, 336)
    want = cross_entropy_rows_ref(logits, target, torch.tensor([0.25]), -100, want_rows, 336)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_rows, want_rows)
    assert got.shape == (6, 336) and torch.equal(got[:, 333:], torch.zeros(6, 3))  # padding columns
    with pytest.raises(ValueError, match="width 300 is narrower than the vocabulary"):
        lm_head_loss.cross_entropy_rows(logits, target, torch.tensor([0.25]), -100, got_rows, 300)


def test_vocabulary_is_padded_to_16_bytes_for_the_gradient_gemm():
    assert lm_head_loss._aligned_vocab(50257, torch.bfloat16) == 50264
    assert lm_head_loss._aligned_vocab(50257, torch.float32) == 50260
    assert lm_head_loss._aligned_vocab(50272, torch.bfloat16) == 50272
    weight = torch.randn(5, 3)
    padded = lm_head_loss._padded_weights(weight, torch.bfloat16, 8)
    assert padded.shape == (8, 3) and padded.dtype == torch.bfloat16
    assert torch.equal(padded[:5], weight.bfloat16()) and not padded[5:].any()
    assert lm_head_loss._padded_weights(weight, torch.bfloat16, 8) is padded  # made once
    weight.add_(1.0)  # an in-place update is noticed
    assert torch.equal(lm_head_loss._padded_weights(weight, torch.bfloat16, 8)[:5], weight.bfloat16())


def test_bad_inputs_are_named():
    hidden, weight, target = _case()
    logits = (hidden @ weight.t()).detach()
    with pytest.raises(ValueError, match="reduction must be one of"):
        lm_head_cross_entropy(logits, hidden, weight, target, -100, "none")
    with pytest.raises(ValueError, match="expected hidden"):
        lm_head_cross_entropy(logits, hidden, weight[:, :5], target, -100, "mean")
    bad = target.clone()
    bad[0] = 300  # == vocab
    with pytest.raises(RuntimeError, match=r"a target is outside \[0, 300\)"):
        lm_head_cross_entropy(logits, hidden, weight, bad, -100, "mean")
    with pytest.raises(ValueError, match="must not require grad"):
        lm_head_cross_entropy(logits, hidden, weight.requires_grad_(), target, -100, "mean")


def test_opcheck():
    hidden, weight, target = _case()
    logits = (hidden @ weight.t()).detach()
    torch.library.opcheck(torch.ops.lecompile.lm_head_cross_entropy.default,
                          (logits, hidden, weight, target, -100, "mean"))


def _compiled_step(arch, method, config, inputs=None):
    import lecompile

    from models import batch, tiny_model, train_step
    model = tiny_model(arch, method)
    inputs = inputs or batch()
    want = train_step(model, model, inputs)
    torch._dynamo.reset()
    backend = lecompile.longexposure(config)
    got = train_step(torch.compile(model, backend=backend), model, inputs)
    return got, want, backend.report


@pytest.mark.slow
@pytest.mark.parametrize("arch,density", [("opt", 1.0), ("llama", 1.0), ("opt", 0.5)])
def test_backend_fuses_the_loss_with_the_same_loss_and_gradients(arch, density):
    from lecompile import LongExposureConfig
    (loss, grads), (want_loss, want_grads), report = _compiled_step(
        arch, "lora", LongExposureConfig.create(mlp_density=density, k_align=64))
    assert [e.fused for e in report.losses] == [True]
    assert "loss" in str(report) and "lm_head_cross_entropy" not in {u.where for u in report.unmatched}
    if density < 1.0:  # sparse MLPs: the same backend without the loss rewrite is the reference
        (want_loss, want_grads), _, _ = _compiled_step(
            arch, "lora", LongExposureConfig.create(mlp_density=density, k_align=64, disable={"fuse_loss"}))
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("method,config,reason", [
    ("lora", dict(disable={"fuse_loss"}), "disabled (disable={'fuse_loss'})"),
    ("plain", {}, "the LM head trains"),
])
@pytest.mark.slow
def test_losses_left_to_inductor_are_reported_and_still_right(method, config, reason):
    from lecompile import LongExposureConfig
    (loss, grads), (want_loss, want_grads), report = _compiled_step(
        "opt", method, LongExposureConfig.create(mlp_density=1.0, **config))
    assert [e.fused for e in report.losses] == [False] and reason in report.losses[0].note
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.slow
def test_gpt2_graph_break_before_the_loss_is_named_and_the_documented_fix_works():
    import lecompile
    from lecompile import LongExposureConfig

    from models import batch, tiny_model
    for fix in (False, True):
        model = tiny_model("gpt2", "lora")
        if fix:
            model.get_base_model().loss_type = "ForCausalLM"
        torch._dynamo.reset()
        backend = lecompile.longexposure(LongExposureConfig(mlp_density=1.0))
        torch.compile(model, backend=backend)(**batch()).loss.backward()
        assert [e.fused for e in backend.report.losses] == [fix]
        if not fix:
            assert "loss_type = 'ForCausalLM'" in backend.report.losses[0].note


class _HeadAndLoss(torch.nn.Module):
    """A trainable layer, a frozen LM head, and a loss written by hand."""

    def __init__(self, head_bias=False, **loss_kwargs):
        super().__init__()
        self.body, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 50, bias=head_bias)
        self.head.requires_grad_(False)
        self.loss_kwargs = loss_kwargs

    def forward(self, x, target):
        logits = self.head(torch.relu(self.body(x)))
        return F.cross_entropy(logits.float().view(-1, 50), target.view(-1), **self.loss_kwargs)


@pytest.mark.parametrize("loss_kwargs,fused,reason", [
    (dict(reduction="sum", ignore_index=3), True, ""),
    (dict(head_bias=True), True, ""),
    (dict(label_smoothing=0.1), False, "['label_smoothing']"),
    (dict(reduction="none"), False, "reduction='none'"),
])
def test_hand_written_losses(loss_kwargs, fused, reason):
    import lecompile
    from lecompile import LongExposureConfig
    gen = torch.Generator().manual_seed(2)
    model = _HeadAndLoss(**loss_kwargs)
    x, target = torch.randn(2, 8, 16, generator=gen), torch.randint(0, 50, (2, 8), generator=gen)
    backend = lecompile.longexposure(LongExposureConfig())
    torch._dynamo.reset()
    loss = torch.compile(model, backend=backend)(x, target)
    want = model(x, target)
    assert [e.fused for e in backend.report.losses] == [fused] and reason in backend.report.losses[0].note
    torch.testing.assert_close(loss, want)
    got = torch.autograd.grad(loss.sum(), model.body.weight)[0]
    torch.testing.assert_close(got, torch.autograd.grad(want.sum(), model.body.weight)[0])


def _logits_step(model, params_of, inputs):
    """The logits' grad_fn and the gradients of a step that also differentiates the logits."""
    for p in params_of.parameters():
        p.grad = None
    out = model(**inputs)
    (out.loss + out.logits.float().square().mean()).backward()
    return out.logits.grad_fn, {n: p.grad.clone() for n, p in params_of.named_parameters() if p.grad is not None}


def test_returned_logits_keep_their_gradient():
    import lecompile
    from lecompile import LongExposureConfig

    from models import batch, tiny_model
    model = tiny_model("opt", "lora")
    _, want = _logits_step(model, model, batch())
    torch._dynamo.reset()
    backend = lecompile.longexposure(LongExposureConfig(mlp_density=1.0))
    grad_fn, got = _logits_step(torch.compile(model, backend=backend), model, batch())
    assert [e.fused for e in backend.report.losses] == [True] and "ReturnedLogits" in type(grad_fn).__name__
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_backward_of_the_fused_loss_makes_nothing_of_the_vocabulary_size():
    """Logits nothing differentiates get no zero gradient of ``[tokens, vocab]`` (nor a GEMM of it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import lecompile
    from lecompile import LongExposureConfig

    from models import VOCAB, batch, tiny_model

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and VOCAB in t.shape:
                    self.seen.append((func, tuple(t.shape)))
            return out

    torch._dynamo.reset()
    backend = lecompile.longexposure(LongExposureConfig(mlp_density=1.0))
    model = torch.compile(tiny_model("opt", "lora"), backend=backend)
    loss = model(**batch()).loss
    with Shapes() as shapes:
        loss.backward()
    assert shapes.seen == []
