"""The ``longexposure`` Dynamo backend: lecompile's passes, then Inductor."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
from pathlib import Path
from typing import List, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import dynamo_timed
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from . import calibration, ddp, peft_parameters
from .cache import cacheable_functions
from .config import LongExposureConfig
from .graph_breaks import GraphBreaks
from .guard import DensityGuard, LossShadow
from .passes import is_training_graph, run_passes
from .passes.fuse_loss import with_returned_logits
from .passes.graph import loss_output
from .report import Report
from .specialize import ShapeSpecialized, concrete_inputs, specialize, symbolic_inputs
from .warmup import WarmupSwitch, copy_graph, optimizer_steps
from .weight_cache import finish_prefetches

log = logging.getLogger("lecompile")
UNTRACEABLE_GROUPED_MM = (
    "this graph calls transformers' grouped_mm fallback (MoE experts that are not bf16), whose backward in this "
    "transformers release calls tolist(), which no backend can compile (Inductor neither): Dynamo runs the model "
    "in pieces. Train the experts in bf16, or upgrade transformers (docs/troubleshooting.md)")
_graph_ids = itertools.count()
NO_LOSS = ("loss_budget: this graph returns no loss (the loss is computed outside the compiled model, or after a "
           "graph break), so its calibration steps train dense and its MLPs follow min_kept_mass as the graphs "
           "with the loss move it")


def _compile_checkpointed_layers() -> None:
    """Let Dynamo compile layers under ``torch.utils.checkpoint`` whose forward has a Python side
    effect. transformers 5.2x sets a context variable in each decoder layer (its ``kernels`` hub
    layers) and resets it on exit; inside a checkpointed region Dynamo refuses that mutation and
    runs every checkpointed layer eagerly, under any backend. Replaying a set-and-reset in the
    backward's recompute changes nothing, so the replay is skipped (set once, when the backend is
    imported, which ``torch.compile(backend="longexposure")`` does)."""
    dynamo_config = torch._dynamo.config
    if hasattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        log.debug("set torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True")


_compile_checkpointed_layers()
ddp.turn_off_graph_splitting()  # before torch.compile(backend="longexposure") sees its first frame
peft_parameters.make_traceable()


class LongExposureBackend:
    """A Dynamo backend: ``torch.compile(model, backend=LongExposureBackend(config))``.

    Runs :data:`lecompile.passes.PASSES` on each FX graph, then compiles the result with
    Inductor (``compile_fx``), so everything the passes leave alone gets ordinary Inductor
    fusion forward and backward. The report of every graph is kept in :attr:`reports`.
    ``torch.compile``'s ``mode=`` and ``options=`` are handed to Inductor as they would be with
    ``backend="inductor"``.
    """

    def __init__(self, config: Optional[LongExposureConfig] = None, *, inductor: bool = True):
        if config is not None and not isinstance(config, LongExposureConfig):
            raise TypeError(f"config must be a LongExposureConfig, got {type(config).__name__}")
        self.config = config if config is not None else LongExposureConfig.from_env()
        self.inductor = inductor
        self.reports: List[Report] = []
        self._warmup_until: Optional[int] = None  # optimizer step that ends the dense warm-up
        tuning = self.config.tuning
        self.guard = DensityGuard(tuning.min_kept_mass, tuning.k_align, tuning.loss_budget, self.config.sparse_mlp,
                                  self.config.attn_density) if tuning.guarded else None
        self._warned_python_bound = False
        self.graph_breaks = GraphBreaks()

    def __call__(self, gm: fx.GraphModule, example_inputs, mode: Optional[str] = None,
                 options: Optional[dict] = None):
        self.graph_breaks.collect()
        patches = _inductor_patches(mode, options, self.config)
        module_training = _compiled_module_training()
        traced = self._specialized(gm, example_inputs, module_training)
        if traced is not None:
            return ShapeSpecialized(gm, example_inputs, functools.partial(
                self._compile_graph, patches=patches, module_training=module_training), traced)
        return self._compile_graph(gm, example_inputs, patches, module_training)

    def _compile_graph(self, gm: fx.GraphModule, example_inputs, patches: dict, module_training: bool):
        calibrated = self.config.calibrated
        if (self.inductor and (self.config.dense_warmup_steps or calibrated) and module_training
                and is_training_graph(example_inputs)):
            if self._warmup_until is None:
                self._warmup_until = optimizer_steps() + self.config.dense_warmup_steps
            if optimizer_steps() < self._warmup_until or calibrated:
                return self._switch(gm, example_inputs, patches, calibrated)
        return self._compile(gm, example_inputs, patches, module_training=module_training)

    def _specialized(self, gm: fx.GraphModule, example_inputs, module_training: bool) -> Optional[fx.GraphModule]:
        """For a graph to compile once per size (:mod:`lecompile.specialize`): a training graph
        with symbolic sizes, under a config with sparse rewrites, that can be made static; its
        static copy at the sizes Dynamo traced it with. ``None`` for any other graph."""
        if not (self.inductor and self.config.sparse and module_training and symbolic_inputs(example_inputs)
                and is_training_graph(example_inputs)):
            return None
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        try:
            return specialize(gm, concrete_inputs(example_inputs, mode), mode)
        except Exception as e:  # noqa: BLE001 (any failure: the graph stays dynamic, dense, and reported)
            log.info("lecompile: a graph with symbolic sizes cannot be made static (%s: %s)", type(e).__name__,
                     str(e).splitlines()[0] if str(e) else "")
            return None

    def _switch(self, gm: fx.GraphModule, example_inputs, patches: dict, calibrated: bool) -> WarmupSwitch:
        """The dense and sparse forms of a graph behind a :class:`WarmupSwitch`. Both are compiled
        now, inside Dynamo's compile, so Inductor knows which inputs are parameters (a CUDA graph
        must not copy them at each replay); with the density guard, a sparse form for new
        per-layer MLP densities or a new attention density is compiled when the guard first picks
        them."""
        template = copy_graph(gm)
        # The calibration graph records in Python: never a CUDA graph.
        dense_patches = {k: v for k, v in patches.items() if k != "triton.cudagraphs"} if calibrated else patches
        dense = self._compile(gm, example_inputs, dense_patches, dense_warmup=True)
        sparse = self._compile(copy_graph(template), example_inputs, patches)
        calibrate = functools.partial(calibration.due, self.config.tuning.calibrate_every) if calibrated else None
        densities = compile_for = shadow = None
        if self.guard is not None:
            densities = functools.partial(self.guard.form, self.config.mlp_density_of)
            compile_for = lambda form, args: self._compile(  # noqa: E731
                copy_graph(template), args, patches, config=self.config.replace(
                    mlp_layer_densities=form[0] or self.config.mlp_layer_densities, attn_density=form[1]))
            if self.guard.loss_budget:
                loss = loss_output(template)  # the graph as Dynamo gave it: the passes add outputs
                if loss is None:
                    self.reports[-1].notes.append(NO_LOSS)
                    log.info("lecompile: %s", NO_LOSS)
                else:
                    shadow = LossShadow(loss, self.guard)
        return WarmupSwitch(dense, sparse, self._warmup_until, calibrate, densities, compile_for, shadow)

    def _compile(self, gm: fx.GraphModule, example_inputs, patches: dict, dense_warmup: bool = False,
                 module_training: bool = True, config: Optional[LongExposureConfig] = None):
        graph_id = next(_graph_ids)
        config = config or self.config
        dump_dir = self.config.resolved_dump_dir()
        before = gm.code if dump_dir else None
        original = copy_graph(gm) if self.inductor else None  # compiled instead if the rewritten graph cannot be
        with dynamo_timed("lecompile_passes"):  # in torch._dynamo.utils.compile_times(), beside Inductor's phases
            report = run_passes(gm, example_inputs, config, dense_warmup=dense_warmup, module_training=module_training,
                                guard=self.guard.key if self.guard is not None and dense_warmup else -1)
        if self.guard is not None:
            report.guard = list(self.guard.changes)
        self.reports.append(report)
        log.info("graph %d%s%s: %d MLP block(s) rewritten of %d matched, %d attention block(s) (%d rewritten), "
                 "%d unmatched", graph_id, report.who, " (dense warm-up)" if dense_warmup else "", report.mlp_rewritten,
                 len(report.mlp), len(report.attention), report.attention_rewritten, len(report.unmatched))
        log.debug("graph %d report:\n%s", graph_id, report)
        if dump_dir:
            _dump(Path(dump_dir), graph_id, before, gm.code, report)
        if self.inductor and not self._warned_python_bound and python_bound(report, example_inputs, patches):
            self._warned_python_bound = True
            log.warning("%d sparse MLP(s) on CUDA without CUDA graphs: each costs about 2 ms of Python on the CPU "
                        "per training step, which on an H100 made OPT-1.3B's sparse steps slower than dense ones "
                        "(docs/design-notes.md). Set LongExposureConfig(cudagraphs=True) (LECOMPILE_CUDAGRAPHS=1) or "
                        "torch.compile(..., mode=\"reduce-overhead\"); not with FSDP2 "
                        "(docs/training-stacks.md).", report.mlp_rewritten)
        try:
            compiled = self._lower(gm, example_inputs, patches, config)
        except DataDependentOutputException:
            if _calls_untraceable_grouped_mm(gm):
                report.notes.append(UNTRACEABLE_GROUPED_MM)
                log.warning("lecompile: %s", UNTRACEABLE_GROUPED_MM)
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the rewritten graph: compile the original
            if original is None or gm.code == original.code:
                raise
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            report.compiled_plain(why)
            log.warning("lecompile: graph %d%s: Inductor could not compile the rewritten graph (%s); it compiles as "
                        "plain Inductor, without lecompile's rewrites (the report says so)", graph_id, report.who, why)
            compiled = self._lower(original, example_inputs, patches, config)
            if dump_dir:
                _dump(Path(dump_dir), graph_id, before, original.code, report)
        # The predictor factors the passes started on the background thread, computed while Inductor compiled.
        with dynamo_timed("lecompile_weight_caches_wait"):
            finish_prefetches()
        return compiled

    def _lower(self, gm: fx.GraphModule, example_inputs, patches: dict, config: LongExposureConfig):
        """The rewritten graph through AOTAutograd and Inductor."""
        if not self.inductor:  # explain(): AOTAutograd as the real path runs it, without Inductor's codegen
            from torch._dynamo.backends.common import aot_autograd
            from torch._functorch.aot_autograd import make_boxed_func
            nop = aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))
            return with_returned_logits(nop(gm, example_inputs), gm)
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        patches = {**patches, "unsafe_marked_cacheable_functions": {
            **inductor_config.unsafe_marked_cacheable_functions, **cacheable_functions(gm)}}
        with _partitioner(config):
            return with_returned_logits(compile_fx(gm, example_inputs, config_patches=patches), gm)

    @property
    def report(self) -> Report:
        """All graphs' reports merged, with the density guard's changes and Dynamo's graph breaks so far."""
        merged = Report()
        for r in self.reports:
            merged = merged.merge(r)
        if self.guard is not None:
            merged.guard = list(self.guard.changes)
        breaks = self.graph_breaks.note()
        if breaks:
            merged.notes.append(breaks)
        return merged


def _compiled_module_training() -> bool:
    """The ``training`` flag of the module whose ``forward`` Dynamo is compiling (``self`` of the
    frame being traced), so that ``model.eval()`` runs the graph as written; ``True`` when the
    frame has no module (a function, or a Dynamo without this hook)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
    except (ImportError, AttributeError, AssertionError):
        return True
    module = getattr(tx, "f_locals", {}).get("self") if tx is not None else None
    return module.training if isinstance(module, torch.nn.Module) else True


def python_bound(report: Report, example_inputs, patches: dict) -> bool:
    """Whether this graph's sparse MLPs will run on CUDA without CUDA graphs, where the custom
    ops' Python (launches, dispatch) rather than the GPU sets the step time."""
    on_cuda = any(getattr(t, "is_cuda", False) for t in example_inputs)
    return on_cuda and report.mlp_rewritten > 0 and not patches.get("triton.cudagraphs")


def _partitioner(config: LongExposureConfig):
    """AOTAutograd's partitioner settings for ``config`` (``recompute_pointwise``)."""
    from torch._functorch import config as functorch_config
    if not config.tuning.recompute_pointwise:
        return contextlib.nullcontext()
    return functorch_config.patch(ban_recompute_materialized_backward=False)


def _inductor_patches(mode: Optional[str], options: Optional[dict], config: LongExposureConfig) -> dict:
    """Inductor config patches for ``torch.compile(mode=..., options=...)`` plus ``cudagraphs``."""
    from torch._inductor import list_mode_options

    modes = list_mode_options()
    if mode is not None and mode not in modes:
        raise ValueError(f"torch.compile(mode={mode!r}) with backend longexposure: mode must be one of "
                         f"{sorted(modes)}")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"torch.compile(options=...) must be a dict of Inductor options, got {options!r}")
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(options or {})
    if config.cudagraphs:
        patches["triton.cudagraphs"] = True
    return patches


def _dump(folder: Path, graph_id: int, before: str, after: str, report: Report) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"graph_{os.getpid()}_{graph_id:03d}"
    (folder / f"{stem}_before.py").write_text(before)
    (folder / f"{stem}_after.py").write_text(after)
    (folder / f"{stem}_report.txt").write_text(str(report) + "\n")
    (folder / f"{stem}_report.json").write_text(report.to_json() + "\n")
    log.info("graph %d dumped to %s/%s_*", graph_id, folder, stem)


def longexposure(config: Optional[LongExposureConfig] = None) -> LongExposureBackend:
    """A ``longexposure`` backend with ``config`` (default: :meth:`LongExposureConfig.from_env`).

    ``torch.compile(model, backend=lecompile.longexposure(LongExposureConfig(mlp_density=0.25)))``
    """
    return LongExposureBackend(config)


def longexposure_backend(gm: fx.GraphModule, example_inputs, mode: Optional[str] = None,
                         options: Optional[dict] = None):
    """The backend registered as ``"longexposure"`` (entry point group
    ``torch_dynamo_backends``): the default config, with ``LECOMPILE_*`` overrides. Every graph
    of one configuration goes to one :class:`LongExposureBackend`, so a graph Dynamo recompiles
    (a new batch shape) keeps the dense warm-up's progress and the reports stay together."""
    return registered_backend(LongExposureConfig.from_env())(gm, example_inputs, mode=mode, options=options)


@functools.lru_cache(maxsize=None)
def registered_backend(config: LongExposureConfig) -> LongExposureBackend:
    """The one backend that :func:`longexposure_backend` uses for ``config``."""
    return LongExposureBackend(config)


# torch.compile(backend="longexposure") imports this module: a bad or misspelt LECOMPILE_*
# variable is named there, not at the first forward inside BackendCompilerFailed.
LongExposureConfig.from_env()


def explain(model: torch.nn.Module, *args, config: Optional[LongExposureConfig] = None,
            **kwargs) -> Report:
    """What the backend would rewrite in ``model`` for this input, and why not, without
    compiling anything with Inductor: runs one forward pass through Dynamo and the passes.

    ``report = lecompile.explain(model, **batch)``
    """
    backend = LongExposureBackend(config, inductor=False)
    compiled = torch.compile(model, backend=backend)
    compiled(*args, **kwargs)
    if not backend.reports:
        raise RuntimeError("explain: Dynamo compiled no graph for this call (its recompile limit for "
                           "this model's forward may be reached); call torch._dynamo.reset() first")
    return backend.report


def _calls_untraceable_grouped_mm(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` calls transformers' ``grouped_mm_fallback`` op of a release whose backward is
    Python calling ``tolist()`` (its own backward op came later)."""
    transformers_ops = getattr(torch.ops, "transformers", None)
    if transformers_ops is None or hasattr(transformers_ops, "grouped_mm_fallback_backward"):
        return False
    return any(node.op == "call_function" and "grouped_mm_fallback" in str(node.target) for node in gm.graph.nodes)
