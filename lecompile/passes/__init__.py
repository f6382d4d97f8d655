"""lecompile's graph passes, run in order on the FX graph Dynamo hands the backend.

Each pass is a plain function ``(ctx: PassContext) -> None``; :data:`PASSES` lists them in order.
``LongExposureConfig(disable={...})`` turns off any of :data:`OPTIONAL_PASSES` by name. Passes only
emit op calls; they never launch kernels.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx

from .. import ddp, peft_parameters
from ..config import LongExposureConfig
from ..report import MLPEntry, Report, Unmatched

# Modules, not their pass functions: ``lecompile.passes.fuse_lora`` stays the module.
from . import (
    alibi_attention,
    causal_masks,
    fold_adapters,
    fuse_lora,
    fuse_loss,
    grouped_query_attention,
    inline_checkpoints,
    known_functions,
    lora_experts,
    match_attention,
    match_mlp,
    norms_from_output,
    rewrite_attention,
    rewrite_mlp,
    rotary_tables,
)
from .fold_adapters import LinearMatch
from .graph import layer_index
from .match_attention import AttentionMatch
from .match_mlp import MLPMatch
from .rewrite_mlp import kept_neurons

log = logging.getLogger("lecompile")


@dataclass
class PassContext:
    """What the passes share about one graph."""

    gm: fx.GraphModule
    config: LongExposureConfig
    trainable: Dict[fx.Node, bool]
    #: Why this graph is not rewritten as a training graph ("" when it is): nothing requires grad,
    #: or the module is in evaluation mode.
    not_training: str
    dense_warmup: bool = False     # the dense graph of warmup_steps: match and report, no sparsity
    guard: int = -1                # key of the backend's density guard (lecompile.guard), -1: none
    report: Report = field(default_factory=lambda: Report(graphs=1))
    linears: List[LinearMatch] = field(default_factory=list)
    linear_by_out: Dict[fx.Node, LinearMatch] = field(default_factory=dict)
    mlps: List[MLPMatch] = field(default_factory=list)
    attention: List[AttentionMatch] = field(default_factory=list)
    inputs: Dict[fx.Node, object] = field(default_factory=dict)  # placeholder -> example input

    @property
    def training(self) -> bool:
        return not self.not_training

    def value_of(self, node: fx.Node) -> Optional[torch.Tensor]:
        """The tensor behind a placeholder (its example input) or a ``get_attr`` node, else ``None``."""
        value = self.inputs.get(node) if node.op == "placeholder" else None
        if node.op == "get_attr":
            value = self.gm
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
        return value if isinstance(value, torch.Tensor) else None

    def unmatched(self, where: str, reason: str) -> None:
        self.report.unmatched.append(Unmatched(where, reason))

    def report_mlp(self, mlp: MLPMatch, k: int, granularity: str, note: str) -> MLPEntry:
        entry = MLPEntry(mlp.name, mlp.pattern, mlp.peft, mlp.ffn, k, k / mlp.ffn, granularity,
                         rewritten=False, note=note)
        self.report.mlp.append(entry)
        return entry


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[PassContext], None]
    #: ``"skip"``: ``disable`` skips the pass; ``"report"``: it still runs, to say in the report
    #: what it would have rewritten, and rewrites nothing; ``None``: it cannot be turned off.
    when_disabled: Optional[str] = "skip"


#: The pipeline, in order.
PASSES: Sequence[Pass] = (
    Pass("inline_checkpoints", inline_checkpoints.inline_checkpoints),
    Pass("known_functions", known_functions.known_functions),
    Pass("fold_adapters", fold_adapters.fold_adapters, when_disabled=None),
    Pass("lora_experts", lora_experts.lora_experts),
    Pass("match_mlp", match_mlp.match_mlp, when_disabled=None),
    Pass("alibi_attention", alibi_attention.alibi_attention),
    Pass("match_attention", match_attention.match_attention),
    Pass("causal_masks", causal_masks.causal_masks),
    Pass("rewrite_mlp", rewrite_mlp.rewrite_mlp, when_disabled="report"),
    Pass("rewrite_attention", rewrite_attention.rewrite_attention, when_disabled="report"),
    Pass("grouped_query_attention", grouped_query_attention.grouped_query_attention),
    Pass("fuse_lora", fuse_lora.fuse_lora, when_disabled="report"),
    Pass("fuse_loss", fuse_loss.fuse_loss, when_disabled="report"),
    Pass("norms_from_output", norms_from_output.norms_from_output),
    Pass("rotary_tables", rotary_tables.rotary_tables),
    Pass("tag_rewritten_nodes", inline_checkpoints.tag_rewritten_nodes, when_disabled=None),
)
LAYER_GRAPH = ("decoder layer(s) without a layer index in their module paths: Dynamo compiled a decoder layer as "
               "its own graph (a graph break in the model's forward, or a layer compiled alone); the rewrites apply "
               "in each such graph, and mlp_layer_densities cannot tell the layers apart")
#: The passes ``LongExposureConfig(disable=...)`` can turn off.
OPTIONAL_PASSES = tuple(p.name for p in PASSES if p.when_disabled is not None)


def run_passes(gm: fx.GraphModule, example_inputs, config: LongExposureConfig,
               dense_warmup: bool = False, module_training: bool = True, guard: int = -1) -> Report:
    """Run :data:`PASSES` on ``gm`` in place; return the report. ``dense_warmup``: the warm-up
    (or calibration) graph, where MLPs and attention stay dense (adapters are still fused).
    ``module_training``: the compiled module's ``training`` flag; in evaluation mode the graph
    runs as written. ``guard``: the density guard the calibration graph measures for."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    trainable = {n: isinstance(t, torch.Tensor) and t.requires_grad
                 for n, t in zip(placeholders, example_inputs)}
    if not module_training:
        not_training = "evaluation mode (model.eval())"
    elif not is_training_graph(example_inputs):
        not_training = "inference graph (nothing requires grad)"
    else:
        not_training = ""
    ctx = PassContext(gm, config, trainable, not_training, dense_warmup, guard,
                      inputs=dict(zip(placeholders, example_inputs)))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ctx.report.rank, ctx.report.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    _graph_level_notes(ctx, example_inputs)
    for p in PASSES:
        if config.enabled(p.name) or p.when_disabled == "report":
            p.run(ctx)
    _check_layer_densities(ctx)
    if ctx.mlps and all(layer_index(m.name) is None for m in ctx.mlps):
        ctx.report.notes.append(LAYER_GRAPH)
    return ctx.report


def _check_layer_densities(ctx: PassContext) -> None:
    """``mlp_layer_densities`` entries past the model's last decoder layer are an error, found on
    a graph that holds the whole stack: decoder layer 0 through the loss."""
    entries = len(ctx.config.mlp_layer_densities)
    layers = {layer_index(m.name) for m in ctx.mlps} - {None}
    if entries and ctx.report.losses and 0 in layers and entries > max(layers) + 1:
        raise ValueError(f"LongExposureConfig.mlp_layer_densities has {entries} entries, but the model has "
                         f"{max(layers) + 1} decoder layers")


def is_training_graph(example_inputs) -> bool:
    """A graph runs for training when grad is enabled and some input requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in example_inputs)


def _graph_level_notes(ctx: PassContext, example_inputs) -> None:
    """Report what makes a whole graph, or parts of it, invisible to the matchers."""
    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        reason = ("dynamic shapes (dynamic=True, or sizes that changed between calls in a graph not compiled "
                  "per size): blocks with symbolic sizes are left to Inductor, dense; compile with "
                  "torch.compile(..., dynamic=False), which compiles each new batch shape as its own sparse graph "
                  "(up to Dynamo's recompile limit), or pad batches to a fixed shape")
        ctx.unmatched("graph", reason)
        if ctx.training and ctx.config.sparse:
            warnings.warn(f"lecompile: {reason}", stacklevel=2)
    if ddp.compiled_whole():
        ctx.report.notes.append(ddp.WHOLE)
        log.info("lecompile: %s", ddp.WHOLE)
    wrappers = peft_parameters.traced_wrappers(ctx.gm)
    if wrappers:
        ctx.report.notes.append(peft_parameters.TRACED.format(n=wrappers))
        log.info("lecompile: %s", ctx.report.notes[-1])
    for note in ctx.report.unmatched:
        log.warning("lecompile: %s", note.reason)


__all__ = ["LAYER_GRAPH", "OPTIONAL_PASSES", "PASSES", "Pass", "PassContext", "is_training_graph", "run_passes",
           "kept_neurons"]
