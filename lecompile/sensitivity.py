"""Per-layer MLP densities from a measured sensitivity pass (SparseLoRA's non-uniform sparsity).

``auto_layer_densities(model, batch, 0.5)`` sparsifies one layer's MLP at a time (the oracle's
per-sequence top-k at ``probe_density``), measures how much the loss on ``batch`` rises, and
spreads the density budget so that the most sensitive layers keep the most neurons, with the
mean over layers equal to the target. The result goes into
``LongExposureConfig(mlp_layer_densities=...)``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from .passes.graph import layer_index

#: Names of the MLP's second linear, per architecture (its input is the MLP intermediate).
DOWN_PROJECTIONS = ("mlp.down_proj", "fc2", "mlp.c_proj")
MIN_DENSITY = 0.05


def _down_projections(model: torch.nn.Module) -> Dict[int, torch.nn.Module]:
    found = {}
    for name, module in model.named_modules():
        clean = name.replace(".base_layer", "")
        layer = layer_index(clean)
        if layer is not None and clean.endswith(DOWN_PROJECTIONS) and layer not in found:
            found[layer] = module
    return found


def _mask_top_k(density: float, batch_size: int):
    def hook(module, args):
        h = args[0]
        grouped = h.reshape(batch_size, -1, h.shape[-1])
        k = max(1, round(density * h.shape[-1]))
        top = grouped.detach().float().square().sum(1).topk(k, dim=-1).indices
        mask = torch.zeros(batch_size, 1, h.shape[-1], dtype=h.dtype, device=h.device)
        mask.scatter_(-1, top.unsqueeze(1), 1.0)
        return ((grouped * mask).reshape(h.shape),) + args[1:]
    return hook


@torch.no_grad()
def layer_sensitivity(model: torch.nn.Module, input_ids: torch.Tensor, probe_density: float = 0.25
                      ) -> Dict[int, float]:
    """Loss increase on ``input_ids`` when only layer ``i``'s MLP keeps ``probe_density`` of its
    neurons (oracle top-k per sequence), for every layer ``i``."""
    downs = _down_projections(model)
    if not downs:
        raise ValueError("layer_sensitivity: no MLP down projection found (looked for modules named "
                         f"*{DOWN_PROJECTIONS} inside numbered layers)")
    was_training = model.training
    model.eval()
    try:
        dense = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.item()
        out = {}
        for layer, module in sorted(downs.items()):
            handle = module.register_forward_pre_hook(_mask_top_k(probe_density, input_ids.shape[0]))
            try:
                out[layer] = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.item() - dense
            finally:
                handle.remove()
        return out
    finally:
        model.train(was_training)


def auto_layer_densities(model: torch.nn.Module, input_ids: torch.Tensor, mean_density: float,
                         spread: float = 0.5, probe_density: float = 0.25) -> Tuple[float, ...]:
    """Per-layer MLP densities with mean ``mean_density``: a linear ramp of relative width
    ``spread`` over the layers ordered by :func:`layer_sensitivity` (least sensitive lowest),
    clipped to ``[0.05, 1]``."""
    if not 0.0 < mean_density <= 1.0:
        raise ValueError(f"auto_layer_densities: mean_density must be in (0, 1], got {mean_density!r}")
    if not 0.0 <= spread <= 1.0:
        raise ValueError(f"auto_layer_densities: spread must be in [0, 1], got {spread!r}")
    sensitivity = layer_sensitivity(model, input_ids, probe_density)
    layers = sorted(sensitivity, key=sensitivity.get)
    n = len(layers)
    densities = {}
    for rank, layer in enumerate(layers):
        position = 2 * rank / (n - 1) - 1 if n > 1 else 0.0
        densities[layer] = min(1.0, max(MIN_DENSITY, mean_density * (1 + spread * position)))
    return tuple(round(densities.get(i, mean_density), 4) for i in range(max(densities) + 1))
