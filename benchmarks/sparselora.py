"""SparseLoRA-style eager sparse MLPs: the end-to-end benchmark's baseline for sparse fine-tuning.

What SparseLoRA's public code does (``../shared/papers/public-code-notes.md``): a rank-8 SVD of the
frozen weights scores the MLP's neurons, the top-k are kept for the whole batch, and the sparse
compute is slicing the base weights (``index_select`` every step) followed by dense PyTorch
matmuls, with no custom kernels. :func:`sparsify_mlps` does that to a Hugging Face model, in eager
mode, with the same ``k`` lecompile keeps at the same density, so the two compare like for like.

LoRA branches see the kept neurons only (rows of ``B`` for the MLP's input linears, columns of
``A`` for its output linear); biases are sliced too, so BitFit trains the kept entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

#: Per architecture: the MLP's input linears (the first one is scored), its output linear and its
#: activation, as attribute paths below the decoder layer.
MLP_LAYOUT = {
    "opt": (("fc1",), "fc2", "activation_fn"),
    "gpt2": (("mlp.c_fc",), "mlp.c_proj", "mlp.act"),
    "llama": (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "mlp.act_fn"),
}


@dataclass
class MLPBlock:
    """One decoder layer's MLP: where its linears are and its activation."""

    layer: nn.Module
    inputs: Tuple[str, ...]
    output: str
    activation: Callable[[Tensor], Tensor]


def mlp_blocks(model: nn.Module, model_type: str) -> Iterator[MLPBlock]:
    """The MLP of every decoder layer of a (PEFT-wrapped) Hugging Face model."""
    if model_type not in MLP_LAYOUT:
        raise ValueError(f"no MLP layout for model type {model_type!r}; known: {sorted(MLP_LAYOUT)}")
    inputs, output, act = MLP_LAYOUT[model_type]
    suffix = "." + inputs[0]
    for name, _ in list(model.named_modules()):
        if name.endswith(suffix):
            layer = model.get_submodule(name[: -len(suffix)])
            yield MLPBlock(layer, inputs, output, layer.get_submodule(act))


def replace(layer: nn.Module, path: str, module: nn.Module) -> None:
    """Set the submodule at ``path`` (dotted, below ``layer``) to ``module``."""
    parent, _, leaf = path.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, leaf, module)


def _base_and_loras(linear: nn.Module):
    """The frozen base layer and ``(A, B, scale, dropout)`` of each active LoRA adapter."""
    if not hasattr(linear, "base_layer"):
        return linear, []
    if not hasattr(linear, "lora_A"):
        raise ValueError(f"SparseLoRA-style MLPs support LoRA and plain linears, not {type(linear).__name__}")
    active = [a for a in linear.active_adapters if a in linear.lora_A]
    if any(getattr(linear, "use_dora", {}).get(a) for a in active):
        raise ValueError("SparseLoRA-style MLPs do not implement DoRA (its magnitude vector would be ignored)")
    loras = [(linear.lora_A[a], linear.lora_B[a], linear.scaling[a], linear.lora_dropout[a]) for a in active]
    return linear.base_layer, loras


def _weight_out_in(base: nn.Module) -> Tensor:
    """The weight as ``[out, in]`` (GPT-2's ``Conv1D`` stores ``[in, out]``)."""
    return base.weight if isinstance(base, nn.Linear) else base.weight.t()


class KeptNeurons:
    """The neurons one MLP keeps for the current batch, shared by its linears."""

    idx: Optional[Tensor] = None


class SlicedInput(nn.Module):
    """An MLP input linear computing only the kept neurons: ``x @ W[idx].T + b[idx]`` plus LoRA
    with ``B[idx]``. The scored one (``k`` set) chooses ``idx`` for the batch first."""

    def __init__(self, linear: nn.Module, kept: KeptNeurons, k: Optional[int] = None, rank: int = 8,
                 activation: Optional[Callable[[Tensor], Tensor]] = None, up: Optional[nn.Module] = None):
        super().__init__()
        self.linear, self.kept, self.k, self.rank, self.activation = linear, kept, k, rank, activation
        # Resolved once (fails now on adapters other than LoRA); tuples, so not registered twice.
        self.parts = _base_and_loras(linear)
        # The frozen weights the estimator scores: this linear's and a gated MLP's up linear's.
        self.scored = (self.parts[0],) + ((_base_and_loras(up)[0],) if up is not None else ())

    def forward(self, x: Tensor) -> Tensor:
        if self.k is not None:
            self.kept.idx = self._choose(x)
        idx = self.kept.idx
        base, loras = self.parts
        bias = base.bias.index_select(0, idx) if base.bias is not None else None
        y = F.linear(x, _weight_out_in(base).index_select(0, idx), bias)
        for a, b, scale, dropout in loras:
            lx = dropout(x.to(a.weight.dtype))
            b_bias = b.bias.index_select(0, idx) if b.bias is not None else None  # PEFT's lora_bias
            y = y + (F.linear(a(lx), b.weight.index_select(0, idx), b_bias) * scale).to(y.dtype)
        return y

    @torch.no_grad()
    def _choose(self, x: Tensor) -> Tensor:
        """SparseLoRA's estimator: the rank-r SVD of the frozen weight(s), activation applied,
        absolute values summed over the batch's tokens, top-k."""
        from lecompile.predictors.svd import svd_factors
        x2 = x.reshape(-1, x.shape[-1])

        def estimate(base):
            p, q = svd_factors(_weight_out_in(base), self.rank)
            return (x2 @ p) @ q.t()

        h = self.activation(estimate(self.scored[0]))
        if len(self.scored) > 1:
            h = h * estimate(self.scored[1])
        return h.float().abs().sum(0).topk(self.k, sorted=False).indices.sort().values


class SlicedOutput(nn.Module):
    """An MLP output linear reading only the kept neurons: ``h @ W[:, idx].T + b`` plus LoRA with
    ``A[:, idx]``."""

    def __init__(self, linear: nn.Module, kept: KeptNeurons):
        super().__init__()
        self.linear, self.kept = linear, kept
        self.parts = _base_and_loras(linear)

    def forward(self, h: Tensor) -> Tensor:
        idx = self.kept.idx
        base, loras = self.parts
        y = F.linear(h, _weight_out_in(base).index_select(1, idx), base.bias)
        for a, b, scale, dropout in loras:
            lh = dropout(h.to(a.weight.dtype))
            y = y + (b(F.linear(lh, a.weight.index_select(1, idx))) * scale).to(y.dtype)
        return y


def sparsify_mlps(model: nn.Module, model_type: str, density: float, rank: int = 8,
                  align: int = 128) -> List[KeptNeurons]:
    """Make every MLP of ``model`` compute ``k = round_up(density * ffn, align)`` neurons per
    batch, SparseLoRA's way. Returns each MLP's kept-neuron holder (its ``idx`` after a forward)."""
    from lecompile.passes.rewrite_mlp import kept_neurons
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    kept_list = []
    for block in mlp_blocks(model, model_type):
        first = block.layer.get_submodule(block.inputs[0])
        ffn = _weight_out_in(_base_and_loras(first)[0]).shape[0]
        kept = KeptNeurons()
        up = block.layer.get_submodule(block.inputs[1]) if len(block.inputs) > 1 else None
        replace(block.layer, block.inputs[0], SlicedInput(first, kept, kept_neurons(density, ffn, align), rank,
                                                          block.activation, up))
        for path in block.inputs[1:]:
            replace(block.layer, path, SlicedInput(block.layer.get_submodule(path), kept))
        replace(block.layer, block.output, SlicedOutput(block.layer.get_submodule(block.output), kept))
        kept_list.append(kept)
    if not kept_list:
        raise ValueError(f"found no {model_type} MLP in {type(model).__name__}")
    return kept_list
