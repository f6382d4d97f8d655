"""A linear layer with its PEFT adapters folded in, and its PyTorch reference math.

The passes fold every PEFT wrapper around a linear (LoRA ``A``/``B``/scale with its dropout,
IA3 vectors, trainable biases, dtype casts) into one :class:`AdaptedLinear`; the ops take it
as a flat list of tensors (:data:`SLOTS`). The math mirrors PEFT's own forward, casts included,
so that at full density the ops reproduce the model bit for bit up to matmul order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, List, Optional, TypeVar

import torch

T = TypeVar("T")

#: Order of an adapted linear's tensors in the ops' flat argument lists.
SLOTS = ("weight", "bias", "lora_input", "lora_a", "lora_b", "in_scale", "out_scale")


@dataclass
class AdaptedLinear(Generic[T]):
    """``y = ((x * in_scale) @ weight.T + bias + lora_scale * B(A(lora_input))) * out_scale``.

    ``weight`` is ``[out, in]``. ``lora_input`` is what LoRA's ``A`` reads (the layer input
    after LoRA dropout and the cast to the adapter dtype); ``None`` means the layer input.
    ``in_scale`` (``[in]``) is IA3 on a feed-forward layer's input, ``out_scale`` (``[out]``)
    IA3 on its output. ``T`` is a tensor, or an FX node while the passes build the graph.
    """

    weight: T
    bias: Optional[T] = None
    lora_input: Optional[T] = None
    lora_a: Optional[T] = None
    lora_b: Optional[T] = None
    in_scale: Optional[T] = None
    out_scale: Optional[T] = None
    lora_scale: float = 1.0

    def tensors(self) -> List[Optional[T]]:
        return [getattr(self, slot) for slot in SLOTS]

    @classmethod
    def from_tensors(cls, tensors, lora_scale: float) -> "AdaptedLinear":
        if len(tensors) != len(SLOTS):
            raise ValueError(f"an adapted linear has {len(SLOTS)} slots {SLOTS}, got {len(tensors)}")
        return cls(*tensors, lora_scale=lora_scale)

    def rows(self, index) -> "AdaptedLinear":
        """This linear for a subset ``index`` of the tokens (LoRA's separate input is per token)."""
        if self.lora_input is None:
            return self
        return AdaptedLinear(**{**self.__dict__, "lora_input": self.lora_input[index]})

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None


#: Position of each linear of an MLP block in the packed layout.
MLP_LINEARS = ("fc1", "up", "fc2")


def pack_mlp(fc1, up, fc2):
    """Flatten an MLP's adapted linears for an op call: ``(params, slots, lora_scales)``.

    ``params`` holds only the tensors present; ``slots[i] = linear * len(SLOTS) + slot`` says
    where ``params[i]`` belongs (custom ops cannot differentiate through lists holding None).
    """
    params, slots = [], []
    for li, lin in enumerate((fc1, up, fc2)):
        if lin is None:
            continue
        for si, t in enumerate(lin.tensors()):
            if t is not None:
                params.append(t)
                slots.append(li * len(SLOTS) + si)
    scales = [lin.lora_scale if lin is not None else 1.0 for lin in (fc1, up, fc2)]
    return params, slots, scales


def unpack_mlp(params, slots, lora_scales):
    """Inverse of :func:`pack_mlp`: ``(fc1, up or None, fc2 or None)``."""
    table = [[None] * len(SLOTS) for _ in MLP_LINEARS]
    for t, s in zip(params, slots):
        table[s // len(SLOTS)][s % len(SLOTS)] = t
    lins = [AdaptedLinear.from_tensors(row, scale) if row[0] is not None else None
            for row, scale in zip(table, lora_scales)]
    if lins[0] is None:
        raise ValueError(f"an MLP needs fc1's weight (slot 0), got slots {list(slots)}")
    return lins[0], lins[1], lins[2]


def per_neuron(t: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows ``idx`` of a neuron-major tensor ``t [ffn, ...]``: ``[G, k, ...]``, or ``t`` if dense."""
    return t if idx is None else t[idx]


def _neuron_vector(v: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
    """A per-neuron vector ``[ffn]`` broadcast against ``[G, n, k]`` activations."""
    return v if idx is None else v[idx].unsqueeze(-2)


def _scale(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # PEFT's IA3 multiplies in the vector's dtype and casts back.
    return (t.to(s.dtype) * s).to(t.dtype)


def _add_lora(y: torch.Tensor, lora: torch.Tensor, scale: float) -> torch.Tensor:
    # PEFT adds the adapter in the promoted dtype, then casts back to the base dtype.
    return (y + lora * scale).to(y.dtype)


def expand_linear(x: torch.Tensor, lin: AdaptedLinear, idx: Optional[torch.Tensor] = None,
                  base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The adapted linear for output neurons ``idx`` only (fc1, gate, up).

    ``x`` is ``[G, n, in]`` (token groups), ``idx`` ``[G, k]`` or ``None`` for all neurons.
    ``base`` replaces ``x @ weight[idx].T`` when given (the SVD predictor's low-rank estimate).
    """
    xs = x if lin.in_scale is None else _scale(x, lin.in_scale)
    y = xs @ per_neuron(lin.weight, idx).transpose(-1, -2) if base is None else base
    if lin.bias is not None:
        y = y + _neuron_vector(lin.bias, idx)
    if lin.lora_a is not None:
        lx = xs if lin.lora_input is None else lin.lora_input
        lora = (lx.to(lin.lora_a.dtype) @ lin.lora_a.t()) @ per_neuron(lin.lora_b, idx).transpose(-1, -2)
        y = _add_lora(y, lora, lin.lora_scale)
    if lin.out_scale is not None:
        y = _scale(y, _neuron_vector(lin.out_scale, idx))
    return y


def reduce_linear(h: torch.Tensor, lin: AdaptedLinear, idx: Optional[torch.Tensor] = None,
                  lora_keep: Optional[torch.Tensor] = None, lora_dropout: float = 0.0) -> torch.Tensor:
    """The adapted linear reading input neurons ``idx`` only (fc2, down).

    ``h`` is the compact ``[G, n, k]`` intermediate; ``lora_keep`` the LoRA dropout keep-mask
    of the same shape (``None``: no dropout).
    """
    hs = h if lin.in_scale is None else _scale(h, _neuron_vector(lin.in_scale, idx))
    y = hs @ per_neuron(lin.weight.t(), idx)
    if lin.bias is not None:
        y = y + lin.bias
    if lin.lora_a is not None:
        lh = hs.to(lin.lora_a.dtype)
        if lora_keep is not None:
            lh = lh * lora_keep / (1.0 - lora_dropout)
        lora = (lh @ per_neuron(lin.lora_a.t(), idx)) @ lin.lora_b.t()
        y = _add_lora(y, lora, lin.lora_scale)
    if lin.out_scale is not None:
        y = _scale(y, lin.out_scale)
    return y


