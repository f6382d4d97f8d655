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
target measures no cost), before the layers' densities are chosen. Sparse attention
(``attn_density`` below 1) follows the same loss: its density moves one notch up or down
:data:`DENSITIES`, never below the set density nor back to one that exceeded the budget.
"""

from __future__ import annotations

import itertools
import logging
from typing import Dict, List, Optional, Set, Tuple

import torch

from . import calibration

log = logging.getLogger("lecompile")

#: The densities a layer's MLP (or, under a loss budget, attention) can move between.
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

    def __init__(self, min_kept_mass: float, k_align: int, loss_budget: float = 0.0, sparse_mlp: bool = True,
                 attn_density: float = 1.0):
        self.min_kept_mass = min_kept_mass or (FIRST_MASS_TARGET if loss_budget and sparse_mlp else 0.0)
        self.k_align, self.loss_budget, self.sparse_mlp = k_align, loss_budget, sparse_mlp
        self.set_attn_density = self.attn_density = attn_density  # attention: as set, and now
        self.densities: Dict[int, float] = {}        # layer -> density now
        self.measured: Dict[int, Dict[float, float]] = {}  # layer -> density -> kept mass, this step
        self.losses: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (sparse, dense), this step
        self.over_budget: Set[float] = set()  # targets whose sparse loss exceeded the budget: never tried again
        self.attn_over_budget: Set[float] = set()  # the same for attention densities
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
        """Move :attr:`min_kept_mass` one notch along :data:`MASS_TARGETS`, and a sparse
        attention's density one along :data:`DENSITIES`, by the loss the sparse graph cost on
        this step's batch."""
        sparse, dense = (float(x) for x in self.losses)
        self.losses = None
        cost = sparse / dense - 1.0 if dense > 0 else 0.0
        why = f"the sparse loss was {100 * cost:+.2f}% of the dense one on this batch; loss_budget={self.loss_budget:g}"
        if self.sparse_mlp:
            target = _notch(self.min_kept_mass, MASS_TARGETS, cost, self.loss_budget, self.over_budget)
            if target != self.min_kept_mass:
                self._change(f"min_kept_mass {self.min_kept_mass:g} -> {target:g} ({why})")
                self.min_kept_mass = target
        if self.set_attn_density < 1.0:
            ladder = candidates(self.set_attn_density)
            density = _notch(self.attn_density, ladder, cost, self.loss_budget, self.attn_over_budget)
            if density != self.attn_density:
                self._change(f"attention density {self.attn_density:g} -> {density:g} ({why})")
                self.attn_density = density

    def _change(self, change: str) -> None:
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
                self._change(f"layer {layer}: MLP density {before:g} -> {density:g} (keeps {masses[density]:.3f} of "
                             f"the activation mass; min_kept_mass={self.min_kept_mass:g})")
                moved = True
        self.measured.clear()
        return moved

    def form(self, set_density) -> tuple:
        """The sparse graph the guard wants: ``()`` while every density is as configured, else
        ``(mlp_layer_densities, attn_density)`` (``set_density`` as in :meth:`layer_densities`)."""
        layers = self.layer_densities(set_density)
        return (layers, self.attn_density) if layers or self.attn_density != self.set_attn_density else ()

    def layer_densities(self, set_density) -> Tuple[float, ...]:
        """``mlp_layer_densities`` for the sparse graph: the guard's density for each layer it has
        measured, ``set_density(layer)`` for the others."""
        if not self.densities:
            return ()
        densities = tuple(self.densities.get(i, set_density(i)) for i in range(max(self.densities) + 1))
        return () if all(d == set_density(i) for i, d in enumerate(densities)) else densities


def _notch(value: float, ladder: Tuple[float, ...], cost: float, budget: float, over_budget: Set[float]) -> float:
    """``value`` moved along the ascending ``ladder`` by a loss ``cost``: one notch up when the cost
    is over ``budget`` (``value`` joins ``over_budget``), one down when under half of it (never
    onto a value in ``over_budget``), else where it is."""
    if cost > budget:
        over_budget.add(value)
        return next((v for v in ladder if v > value), value)
    if cost < budget / 2:
        lower = [v for v in ladder if v < value][-1:]
        return lower[0] if lower and lower[0] not in over_budget else value
    return value


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
