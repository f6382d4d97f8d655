"""Calibration steps: steps whose dense graph records each MLP's input (``lecompile::observe_mlp``)
for the learned predictor's training and the density guard's measurements. The first (and the
dense warm-up's) trains through the dense graph; a later one runs the dense graph's forward
without gradients to record, then trains through the sparse graph
(:class:`~lecompile.warmup.WarmupSwitch`).

The first training step calibrates, then one in every ``every`` optimizer steps (:func:`due`). What
a calibration step recorded is used after that step's ``optimizer.step()`` (a ``torch.optim``
post-step hook), outside every compiled step; the sparse steps in between only read its results.
"""

from __future__ import annotations

from typing import Callable, List, Optional

from . import warmup

_steps_since: Optional[int] = None  # optimizer steps since the last calibration; None: none yet
_work: List[Callable[[], None]] = []  # what runs after the current step; empty: it is no calibration step


def due(every: int) -> bool:
    """Whether the next step must calibrate: none has yet, or the last one was ``every - 1``
    optimizer steps ago (``every`` 0: never again)."""
    return _steps_since is None or (every > 0 and _steps_since >= every - 1)


def recorded(work: Callable[[], None]) -> None:
    """Called while a calibration step records: ``work()`` runs after its optimizer step."""
    warmup.after_each_step(_after_step)
    if work not in _work:
        _work.append(work)


def counts() -> None:
    """Count the current step as a calibration step whatever records in it (a guard of attention
    alone records nothing on the first)."""
    recorded(_nothing)


def _nothing() -> None:
    pass


def steps_since() -> Optional[int]:
    """Optimizer steps since the last calibration (``None``: none yet)."""
    return _steps_since


def resume(steps: Optional[int]) -> None:
    """Continue a saved run's calibration schedule (:func:`steps_since` when it was saved)."""
    global _steps_since
    _steps_since = steps


def reset() -> None:
    """Forget the schedule: the next step calibrates."""
    global _steps_since
    _steps_since = None
    _work.clear()


def _after_step() -> None:
    global _steps_since
    if not _work:
        if _steps_since is not None:
            _steps_since += 1
        return
    work = list(_work)
    _work.clear()
    _steps_since = 0
    for job in work:
        job()
