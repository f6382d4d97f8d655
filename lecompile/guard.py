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

With a loss budget (``loss_budget``, also experimental) the target itself moves: on calibration
steps after the first, the step trains through the sparse graph while a dense forward of the same
batch (no gradient, before the sparse one, so their activations are never held together) gives
the loss sparsity is measured against. A sparse loss more than the budget above the dense one
moves ``min_kept_mass`` one notch up :data:`MASS_TARGETS`, one under half the budget one notch
down (never back to a target that exceeded the budget: with the layers it made dense, a higher
target measures no cost), before the layers' densities are chosen.
"""

from __future__ import annotations

import itertools
import logging
from typing import Dict, List, Optional, Set, Tuple

import torch

from . import calibration

log = logging.getLogger("lecompile")

#: The densities a layer can move between.
DENSITIES = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
#: The values ``min_kept_mass`` moves between under a loss budget.
MASS_TARGETS = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
#: The target a loss budget starts from when ``min_kept_mass`` is not set.
FIRST_MASS_TARGET = 0.99

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

    def __init__(self, min_kept_mass: float, k_align: int, loss_budget: float = 0.0):
        self.min_kept_mass = min_kept_mass or (FIRST_MASS_TARGET if loss_budget else 0.0)
        self.k_align, self.loss_budget = k_align, loss_budget
        self.densities: Dict[int, float] = {}        # layer -> density now
        self.measured: Dict[int, Dict[float, float]] = {}  # layer -> density -> kept mass, this step
        self.losses: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (sparse, dense), this step
        self.over_budget: Set[float] = set()  # targets whose sparse loss exceeded the budget: never tried again
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

    def record_losses(self, sparse: torch.Tensor, dense: torch.Tensor) -> None:
        """The step's loss through the sparse graph and through the dense one, on one batch."""
        self.losses = (sparse.detach().clone(), dense.detach().clone())
        calibration.recorded(self.update)

    def _follow_loss(self) -> None:
        """Move :attr:`min_kept_mass` one notch along :data:`MASS_TARGETS` by the loss the
        sparse graph cost on this step's batch."""
        sparse, dense = (float(x) for x in self.losses)
        self.losses = None
        cost = sparse / dense - 1.0 if dense > 0 else 0.0
        if cost > self.loss_budget:
            self.over_budget.add(self.min_kept_mass)
            notches = [t for t in MASS_TARGETS if t > self.min_kept_mass]
        elif cost < self.loss_budget / 2:
            notches = [t for t in reversed(MASS_TARGETS) if t < self.min_kept_mass][:1]
            notches = [t for t in notches if t not in self.over_budget]
        else:
            notches = []
        if notches:
            change = (f"min_kept_mass {self.min_kept_mass:g} -> {notches[0]:g} (the sparse loss was {100 * cost:+.2f}% "
                      f"of the dense one on this batch; loss_budget={self.loss_budget:g})")
            self.min_kept_mass = notches[0]
            self.changes.append(change)
            log.info("lecompile guard: %s", change)

    def update(self) -> bool:
        """Move each measured layer to the lowest density that keeps :attr:`min_kept_mass` (first
        moved by the step's losses, under a loss budget); return whether any layer moved."""
        if self.losses is not None:
            self._follow_loss()
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


class LossShadow:
    """What a graph's warm-up switch needs for the loss budget: which of the graph's outputs is
    its loss (``index``), and the guard to give the two losses of a calibration step."""

    def __init__(self, index: int, guard: DensityGuard):
        self.index, self.guard = index, guard

    def record(self, sparse_out, dense_out) -> None:
        self.guard.record_losses(sparse_out[self.index], dense_out[self.index])
