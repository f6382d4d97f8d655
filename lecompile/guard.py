"""The density guard: per-layer MLP densities that keep a set share of the activation mass.

On each calibration step (:mod:`lecompile.calibration`) the guard measures, for every sparse MLP,
the share of the exact activation mass (``sum h^2`` over the step's token groups) that the
predictor's neurons keep at each candidate density of :data:`DENSITIES` at or above the layer's
set density. After the step it gives each layer the lowest density that keeps ``min_kept_mass``
(an experimental knob: ``LongExposureConfig.create(min_kept_mass=0.9)``): a layer below it moves
up, one with room moves back down, never below its set density. Densities change only on
calibration steps and only between those few values, so the sparse graph is recompiled at most
once per new set of densities (up to :data:`~lecompile.warmup.MAX_SPARSE_GRAPHS`), never per
step. Every change is logged (``lecompile`` logger), kept in :attr:`DensityGuard.changes` and
shown in the backend's report.
"""

from __future__ import annotations

import itertools
import logging
from typing import Dict, List, Optional, Tuple

import torch

log = logging.getLogger("lecompile")

#: The densities a layer can move between.
DENSITIES = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)

_guards: Dict[int, "DensityGuard"] = {}
_keys = itertools.count()


def candidates(density: float) -> Tuple[float, ...]:
    """``density`` and the :data:`DENSITIES` above it."""
    return (density, *(d for d in DENSITIES if d > density))


def kept_mass(scores: torch.Tensor, exact: torch.Tensor, k: int) -> float:
    """Share of the exact mass ``exact [G, ffn]`` that the top-``k`` neurons of ``scores`` keep."""
    from .predictors.op import top_k
    total = exact.sum()
    return 1.0 if k >= exact.shape[-1] or total == 0 else (exact.gather(-1, top_k(scores, k)).sum() / total).item()


class DensityGuard:
    """Per-layer densities for one backend; ``guard.key`` names it to the ops that measure."""

    def __init__(self, min_kept_mass: float, k_align: int):
        self.min_kept_mass, self.k_align = min_kept_mass, k_align
        self.densities: Dict[int, float] = {}        # layer -> density now
        self.measured: Dict[int, Dict[float, float]] = {}  # layer -> density -> kept mass, this step
        self.changes: List[str] = []
        self.key = next(_keys)
        _guards[self.key] = self

    def measure(self, layer: int, density: float, scores: torch.Tensor, exact: torch.Tensor) -> None:
        """Record, for decoder layer ``layer`` set to ``density``, the mass its predictor keeps
        (scores ``[G, ffn]``) of the exact per-group mass ``exact [G, ffn]`` at each candidate."""
        from .passes.rewrite_mlp import kept_neurons
        ffn = exact.shape[-1]
        self.measured[layer] = {d: kept_mass(scores, exact, kept_neurons(d, ffn, self.k_align))
                                for d in candidates(density)}

    def update(self) -> bool:
        """Move each measured layer to the lowest density that keeps :attr:`min_kept_mass`;
        return whether any moved."""
        moved = False
        for layer, masses in sorted(self.measured.items()):
            density = min((d for d, m in masses.items() if m >= self.min_kept_mass), default=1.0)
            before = self.densities.get(layer, min(masses))  # at first, the layer's set density
            self.densities[layer] = density
            if density != before:
                change = (f"layer {layer}: MLP density {before:g} -> {density:g} (keeps {masses[density]:.3f} of "
                          f"the activation mass; min_kept_mass={self.min_kept_mass:g})")
                self.changes.append(change)
                log.info("lecompile guard: %s", change)
                moved = True
        self.measured.clear()
        return moved

    def layer_densities(self, set_density) -> Tuple[float, ...]:
        """``mlp_layer_densities`` for the sparse graph: the guard's density for each layer it has
        measured, ``set_density(layer)`` for the others."""
        if not self.densities:
            return ()
        densities = tuple(self.densities.get(i, set_density(i)) for i in range(max(self.densities) + 1))
        return () if all(d == set_density(i) for i, d in enumerate(densities)) else densities


def guard_of(key: int) -> Optional[DensityGuard]:
    """The guard numbered ``key`` (``None`` for -1, no guard)."""
    return _guards.get(key)
