"""Layer norms of frozen weights whose backward reads their output (``layer_norm_from_output``).

Each ``F.layer_norm`` over the last dimension of a training graph, with frozen weight and bias,
becomes :func:`~lecompile.ops.layer_norm.layer_norm_from_output`: the backward keeps the norm's
output (which the LoRA linears and sparse MLPs after it keep anyway) instead of its input, one
``[tokens, hidden]`` tensor fewer per norm. Only where the output's rounding, scaled up by
``|bias| / |weight|``, stays within :data:`MAX_ROUNDING_GAIN` of its own; the weights are read
when the graph compiles, which is why trainable norms are left alone.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from ..ops.layer_norm import layer_norm_from_output, output_rounding_gain
from ..report import NormEntry
from .graph import is_call, meta_value, recompile, source_name

LAYER_NORM = (F.layer_norm, torch.layer_norm)
#: Largest :func:`~lecompile.ops.layer_norm.output_rounding_gain` allowed: the derived ``x_hat``
#: at most twice as far off as the rounding of the output itself (``|bias| <= |weight|``).
MAX_ROUNDING_GAIN = 2.0
_PARAMS = ("input", "normalized_shape", "weight", "bias", "eps")


def norms_from_output(ctx) -> None:
    """Rewrite the layer norms that qualify; report every one of a training graph."""
    if not ctx.training:
        return
    changed = False
    for node in [n for n in ctx.gm.graph.nodes if is_call(n, LAYER_NORM)]:
        args = dict(zip(_PARAMS, node.args), **node.kwargs)
        why = _unsupported(args, ctx)
        ctx.report.norms.append(NormEntry(_name(args, node), not why, why))
        if why:
            continue
        node.target = layer_norm_from_output
        node.args, node.kwargs = (args["input"], args["normalized_shape"], args.get("weight"), args.get("bias"),
                                  args.get("eps", 1e-5)), {}
        counters["lecompile"]["norm_from_output"] += 1
        changed = True
    if changed:
        recompile(ctx.gm)


def _unsupported(args: dict, ctx) -> str:
    x = meta_value(args["input"])
    if x is None or tuple(args["normalized_shape"]) != (x.shape[-1],):
        return "normalizes more than the last dimension (or its input's shape is unknown)"
    params = [args.get(name) for name in ("weight", "bias")]
    values = [ctx.value_of(p) if p is not None else None for p in params]
    if any(p is not None and v is None for p, v in zip(params, values)):
        return "weight or bias is computed in the graph, not a parameter"
    if any(v is not None and v.requires_grad for v in values):
        return "trainable weight or bias: the check below holds only for frozen values"
    gain = output_rounding_gain(*values)
    if gain > MAX_ROUNDING_GAIN:
        return (f"|bias| / |weight| reaches {gain - 1:.3g} (> {MAX_ROUNDING_GAIN - 1:g}): the input would be "
                "rebuilt from the output too coarsely")
    return ""


def _name(args: dict, node: fx.Node) -> str:
    weight = args.get("weight")
    name = source_name(weight) if isinstance(weight, fx.Node) and weight.op == "placeholder" else node.name
    return name.rsplit(".", 1)[0] if name.endswith(".weight") else name
