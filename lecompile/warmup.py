"""Dense warm-up: run a graph dense for the first optimizer steps, then switch to its sparse form
(and back to dense on calibration steps: the learned predictor's, the density guard's).

Steps are counted with a process-wide ``torch.optim`` post-step hook (optimizers marked
``_lecompile_internal``, such as the learned predictor's, are not counted), so a warm-up of N
steps means N ``optimizer.step()`` calls of the user's training loop, whatever graph breaks or
layer-shared graphs the model has.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from . import calibration

log = logging.getLogger("lecompile")


#: Sparse forms one graph may compile for the density guard's per-layer densities.
MAX_SPARSE_GRAPHS = 4


class WarmupSwitch:
    """Two compiled forms of one graph: ``dense`` trains until the process has taken ``until``
    optimizer steps, and on the first calibration step (``calibrate()`` says when) if that comes
    later; ``sparse`` trains otherwise. A later calibration step runs the dense form's forward
    without gradients first, for what it records (``shadow_graph_calls``), then trains through
    the sparse form: the dense form's activations never sit beside the sparse form's (a CUDA graph
    keeps its own memory pool). With ``shadow`` (the density guard's loss budget),
    ``shadow.record(sparse_out, dense_out)`` sees both outputs of such a step. With ``densities``,
    the sparse form follows the density guard: for each new value of ``densities()`` (its
    :meth:`~lecompile.guard.DensityGuard.form`: ``()`` for the configured densities)
    ``compile_for`` compiles one more sparse form, up to :data:`MAX_SPARSE_GRAPHS`. Calls of
    either form are counted in ``torch._dynamo.utils.counters["lecompile"]``
    (``dense_graph_calls``, ``sparse_graph_calls``)."""

    def __init__(self, dense, sparse, until: int, calibrate: Optional[Callable[[], bool]] = None,
                 densities: Optional[Callable[[], tuple]] = None,
                 compile_for: Optional[Callable[[tuple, list], Callable]] = None, shadow=None):
        self.dense, self.until, self.calibrate = dense, until, calibrate
        self.densities, self.compile_for, self.shadow = densities, compile_for, shadow
        self.sparse_forms = {(): sparse}
        self.current: tuple = ()
        self._announced = False

    def __call__(self, *args):
        warming = optimizer_steps() < self.until
        if warming or (self.calibrate is not None and self.calibrate()):
            if not warming:
                calibration.counts()
            if warming or calibration.steps_since() is None:  # no predictor has been calibrated yet
                counters["lecompile"]["dense_graph_calls"] += 1
                return self.dense(*args)
            return self._shadowed(args)
        return self._sparse(args)

    def _shadowed(self, args):
        counters["lecompile"]["shadow_graph_calls"] += 1
        with torch.no_grad():  # first, so that its activations are gone before the sparse forward's
            dense_out = self.dense(*args)
        out = self._sparse(args)
        if self.shadow is not None:
            self.shadow.record(out, dense_out)
        return out

    def _sparse(self, args):
        counters["lecompile"]["sparse_graph_calls"] += 1
        if not self._announced:
            log.info("dense warm-up over (optimizer step %d): running the sparse graph", self.until)
            self._announced = True
            if self.calibrate is None:
                self.dense = None  # never runs again: let its memory (a CUDA graph pool) go
            if torch.cuda.is_available():  # the dense steps' cached blocks, never reused by a CUDA graph's own pool
                torch.cuda.empty_cache()
        if self.densities is not None:
            self._follow(self.densities(), args)
        return self.sparse_forms[self.current](*args)

    def _follow(self, wanted: tuple, args) -> None:
        if wanted == self.current:
            return
        if wanted not in self.sparse_forms:
            if len(self.sparse_forms) >= MAX_SPARSE_GRAPHS:
                log.warning("lecompile guard: %d sparse forms of this graph compiled already; keeping densities "
                            "%s instead of %s", MAX_SPARSE_GRAPHS, describe(self.current), describe(wanted))
                return
            log.info("lecompile guard: compiling the sparse graph for %s", describe(wanted))
            self.sparse_forms[wanted] = self.compile_for(wanted, list(args))
            counters["lecompile"]["guard_recompiles"] += 1
        self.current = wanted


def describe(form: tuple) -> str:
    """A guard's :meth:`~lecompile.guard.DensityGuard.form` in words."""
    if not form:
        return "the configured densities"
    layers, attention = form
    return f"per-layer MLP densities {layers or 'as configured'}, attention density {attention:g}"


_step_count = 0
_step_hook = None
_after_step: list = []


def optimizer_steps() -> int:
    """``torch.optim`` optimizer steps taken in this process since lecompile started counting
    (the first warm-up graph installs a global post-step hook)."""
    _install_step_hook()
    return _step_count


def after_each_step(callback) -> None:
    """Call ``callback()`` after every ``torch.optim`` step of the user's training loop (the
    predictors' own optimizers, marked ``_lecompile_internal``, do not count)."""
    _install_step_hook()
    if callback not in _after_step:
        _after_step.append(callback)


def _install_step_hook() -> None:
    global _step_hook
    if _step_hook is None:
        def count(optimizer, args, kwargs):
            global _step_count
            if not getattr(optimizer, "_lecompile_internal", False):  # the learned predictor's own
                _step_count += 1
                for callback in _after_step:
                    callback()
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _step_hook = register_optimizer_step_post_hook(count)


#: What Dynamo attaches to the graph modules it captures, beyond the graph: AOTAutograd reads it to
#: know which inputs are parameters (static addresses, which CUDA graphs must not copy).
_DYNAMO_ATTRIBUTES = ("_param_name_to_source", "_source_to_user_stacks", "compile_subgraph_reason")


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A second graph module over the same parameters, with its own copy of the graph, and
    Dynamo's metadata."""
    graph, copies = fx.Graph(), {}
    out = graph.graph_copy(gm.graph, copies)
    graph.output(out)
    for node, new in copies.items():
        if hasattr(node, "_dynamo_source"):
            new._dynamo_source = node._dynamo_source
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    for name in _DYNAMO_ATTRIBUTES:
        if hasattr(gm, name):
            setattr(copy, name, getattr(gm, name))
    return copy
