"""``lecompile::lm_head_cross_entropy``: the LM head's cross-entropy with its input gradient
computed in the forward, chunk by chunk.

Hugging Face's causal-LM loss upcasts the ``[tokens, vocab]`` logits to fp32; autograd then keeps
logits for the backward and materializes the fp32 logit gradient there, on top of every saved
activation: at 4096 tokens and OPT's 50272-token vocabulary about 1.2 GiB at the step's peak. With
the LM head frozen (every PEFT method), the loss only needs ``dL/dhidden = g @ W`` where ``g`` is
the logit gradient, so this op computes it in the forward, ``chunk`` tokens at a time, and saves
only ``dL/dhidden [tokens, hidden]``::

    loss = cross_entropy(logits.float(), target, ignore_index, reduction)
    grad_hidden = dloss/dlogits @ weight

``logits`` are the model's own (still returned to the user; the op reads them detached, and
:func:`returned_logits` gives the returned ones their gradient outside the compiled graph).
On CUDA each chunk's rows run one Triton kernel (``kernels/cross_entropy.py``); elsewhere its
PyTorch twin.
"""

from __future__ import annotations

import os

import torch

from ..weight_cache import WeightCache

try:
    from ..kernels.cross_entropy import cross_entropy_rows
except ImportError:  # no Triton: the reference runs everywhere
    cross_entropy_rows = None

Tensor = torch.Tensor

#: Most logit elements per chunk (64 Mi: 128 MiB of bf16 gradient in flight). Chunks are equal:
#: each chunk's gradient GEMM must fill the GPU (4096 tokens of OPT: four chunks of 1024 rows).
CHUNK_ELEMENTS = 1 << 26
REDUCTIONS = ("mean", "sum")
#: Tests set this to run the Triton kernel on CPU tensors in Triton's interpreter.
INTERPRET_ON_CPU = False


def cross_entropy_rows_ref(logits, target, scale, ignore_index, loss_rows, width):
    """Twin of :func:`lecompile.kernels.cross_entropy.cross_entropy_rows` (fp32 math)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    loss_rows.copy_(torch.where(valid, lse - x.gather(1, safe.unsqueeze(1)).squeeze(1), 0.0))
    grad = (x - lse.unsqueeze(1)).exp_()
    grad[torch.arange(len(target), device=x.device)[valid], target[valid]] -= 1.0
    grad = torch.where(valid.unsqueeze(1), grad * scale, 0.0).to(logits.dtype)
    return torch.nn.functional.pad(grad, (0, width - logits.shape[1]))


def _rows_fn(device: torch.device):
    on_device = device.type == "cuda" or (INTERPRET_ON_CPU and os.environ.get("TRITON_INTERPRET") == "1")
    return cross_entropy_rows if cross_entropy_rows is not None and on_device else cross_entropy_rows_ref


def _aligned_vocab(vocab: int, dtype: torch.dtype) -> int:
    """``vocab`` rounded up to 16 bytes of ``dtype``: the reduction dimension of the gradient GEMM.
    cuBLAS runs an odd one (GPT-2's 50257) on a slow unaligned kernel, 5x slower on the H100."""
    per_16_bytes = max(1, 16 // dtype.itemsize)
    return -(-vocab // per_16_bytes) * per_16_bytes


def _padded_weight(weight: Tensor, dtype: torch.dtype, width: int) -> Tensor:
    return torch.nn.functional.pad(weight.to(dtype), (0, 0, 0, width - weight.shape[0]))


#: The LM head in the logits' dtype with zero rows up to the aligned vocabulary, made once per
#: weight version (GPT-2 XL: 160 MiB) instead of every step.
_padded_weights = WeightCache(_padded_weight)


def _check(logits, hidden, weight, target, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"lm_head_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    n, vocab = logits.shape
    if hidden.dim() != 2 or hidden.shape[0] != n or weight.shape != (vocab, hidden.shape[1]):
        raise ValueError(f"lm_head_cross_entropy: expected hidden [{n}, d] and weight [{vocab}, d], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if target.shape != (n,) or target.dtype.is_floating_point:
        raise ValueError(f"lm_head_cross_entropy: target must be integer [{n}], got {target.dtype} "
                         f"{tuple(target.shape)}")


@torch.library.custom_op("lecompile::lm_head_cross_entropy", mutates_args=())
def lm_head_cross_entropy(logits: Tensor, hidden: Tensor, weight: Tensor, target: Tensor,
                          ignore_index: int, reduction: str) -> tuple[Tensor, Tensor]:
    """``(loss, grad_hidden)`` for ``logits [N, V] = hidden [N, d] @ weight.T (+ bias)``."""
    _check(logits, hidden, weight, target, reduction)
    n, vocab = logits.shape
    kept = target != ignore_index
    # Checked on the device, without a host sync (CUDA graphs): the kernel would read out of bounds.
    torch._assert_async((~kept | ((target >= 0) & (target < vocab))).all(),
                        f"lm_head_cross_entropy: a target is outside [0, {vocab}) and is not ignore_index")
    valid = kept.sum().float()
    scale = (1.0 / valid if reduction == "mean" else torch.ones_like(valid)).reshape(1)
    loss_rows = torch.empty(n, dtype=torch.float32, device=logits.device)
    grad_hidden = torch.empty_like(hidden)
    rows = _rows_fn(logits.device)
    width = vocab if rows is cross_entropy_rows_ref else _aligned_vocab(vocab, logits.dtype)
    w = weight.to(logits.dtype) if width == vocab else _padded_weights(weight, logits.dtype, width)
    chunk = -(-n // -(-n * vocab // CHUNK_ELEMENTS))  # ceil(n / number of chunks)
    in_place = logits.dtype == hidden.dtype and grad_hidden.is_contiguous()
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        grad = rows(logits[part], target[part], scale, ignore_index, loss_rows[part], width)
        if in_place:
            torch.mm(grad, w, out=grad_hidden[part])  # the product written in place, not copied there
        else:
            grad_hidden[part] = grad @ w
    return loss_rows.sum() * scale[0], grad_hidden


@lm_head_cross_entropy.register_fake
def _(logits, hidden, weight, target, ignore_index, reduction):
    _check(logits, hidden, weight, target, reduction)
    return logits.new_empty((), dtype=torch.float32), torch.empty_like(hidden)


def _setup_context(ctx, inputs, output):
    logits, hidden, weight = inputs[:3]
    if weight.requires_grad or logits.requires_grad:
        raise ValueError("lm_head_cross_entropy: the LM head's weight and the logits must not require grad "
                         "(the op returns the gradient of its hidden input only)")
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_hidden_out):
    (grad_hidden,) = ctx.saved_tensors
    return None, (grad_hidden * grad_loss).to(grad_hidden.dtype), None, None, None, None


lm_head_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


class _ReturnedLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, hidden, weight):
        ctx.save_for_backward(weight)
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad_logits):
        (weight,) = ctx.saved_tensors
        grad = grad_logits.reshape(-1, weight.shape[0]) @ weight.to(grad_logits.dtype)
        return None, grad.reshape(ctx.hidden_shape).to(ctx.hidden_dtype), None


def returned_logits(logits: Tensor, hidden: Tensor, weight: Tensor) -> Tensor:
    """The model's logits, returned by the compiled graph without a gradient, given back their
    gradient path ``dL/dhidden = dL/dlogits @ weight`` (the LM head frozen) in an autograd node
    of their own.

    Inside the graph the logits would be one more differentiable output, and autograd hands a
    graph's backward zeros for each output nothing used: ``[tokens, vocab]`` of them (393 MiB at
    4096 tokens of OPT) and a GEMM of the LM head's size over them, every step, when only the
    fused loss trains. Here the node runs only if something differentiable reads the logits.
    """
    return _ReturnedLogits.apply(logits, hidden, weight)
