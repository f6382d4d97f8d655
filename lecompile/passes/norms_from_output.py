"""Norms of frozen weights whose backward reads their output, not their input.

Each ``F.layer_norm`` over the last dimension of a training graph, with frozen weight and bias,
becomes :func:`~lecompile.ops.layer_norm.layer_norm_from_output`, and each RMS norm as Hugging
Face writes it (LLaMA, Qwen, Mistral: ``x.to(float32)``, ``pow(2)``, ``mean(-1, keepdim=True)``,
``+ eps``, ``rsqrt``, ``x * rstd``, ``.to(dtype)``, ``weight *``) becomes
:func:`~lecompile.ops.rms_norm.rms_norm_from_output`: the backward keeps the norm's output (which
the LoRA linears and sparse MLPs after it keep anyway) instead of its input, one
``[tokens, hidden]`` tensor fewer per norm. Only where the output's rounding, scaled up by
``|bias| / |weight|``, stays within :data:`MAX_ROUNDING_GAIN` of its own (RMS norms: non-zero
weights); the weights are read when the graph compiles, which is why trainable norms are left
alone.
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from ..ops.layer_norm import layer_norm_from_output, output_rounding_gain
from ..ops.rms_norm import rms_norm_from_output
from ..report import NormEntry
from .graph import is_call, is_method, meta_value, only_user, recompile, replace_uses, shape, source_name

LAYER_NORM = (F.layer_norm, torch.layer_norm)
#: Largest :func:`~lecompile.ops.layer_norm.output_rounding_gain` allowed: the derived ``x_hat``
#: at most twice as far off as the rounding of the output itself (``|bias| <= |weight|``).
MAX_ROUNDING_GAIN = 2.0
_PARAMS = ("input", "normalized_shape", "weight", "bias", "eps")
_ADD, _MUL = (operator.add, torch.add), (operator.mul, torch.mul)


def norms_from_output(ctx) -> None:
    """Rewrite the norms that qualify; report every one of a training graph."""
    if not ctx.training:
        return
    changed = False
    for node in list(ctx.gm.graph.nodes):
        if is_call(node, LAYER_NORM):
            changed |= _layer_norm(node, ctx)
        elif is_call(node, (torch.rsqrt,)) or is_method(node, ("rsqrt",)):
            changed |= _rms_norm(node, ctx)
    if changed:
        recompile(ctx.gm)


def _layer_norm(node: fx.Node, ctx) -> bool:
    args = dict(zip(_PARAMS, node.args), **node.kwargs)
    why = _unsupported(args, ctx)
    ctx.report.norms.append(NormEntry(_name(args.get("weight"), node), not why, why))
    if why:
        return False
    node.target = layer_norm_from_output
    node.args, node.kwargs = (args["input"], args["normalized_shape"], args.get("weight"), args.get("bias"),
                              args.get("eps", 1e-5)), {}
    counters["lecompile"]["norm_from_output"] += 1
    return True


def _rms_norm(rsqrt: fx.Node, ctx) -> bool:
    """Hugging Face's RMS norm around ``rsqrt``, when every step of it is there and used only by
    the next (nodes of other formulas are left alone, unreported)."""
    found = _rms_norm_steps(rsqrt)
    if found is None:
        return False
    x, weight, eps, out = found
    why = _unsupported({"input": x, "normalized_shape": (shape(x)[-1],), "weight": weight}, ctx)
    ctx.report.norms.append(NormEntry(_name(weight, out), not why, why))
    if why:
        return False
    with ctx.gm.graph.inserting_before(out):
        replace_uses(out, ctx.gm.graph.call_function(rms_norm_from_output, (x, weight, eps)))
    counters["lecompile"]["norm_from_output"] += 1
    return True


def _rms_norm_steps(rsqrt: fx.Node) -> Optional[Tuple[fx.Node, fx.Node, float, fx.Node]]:
    """``(x, weight, eps, output)`` of ``weight * (x32 * rsqrt(mean(x32 ** 2, -1) + eps)).to(dtype)``
    with ``x32 = x.to(float32)``, or ``None``."""
    add = rsqrt.args[0] if rsqrt.args else None
    if not isinstance(add, fx.Node) or not (is_call(add, _ADD) or is_method(add, ("add",))) or len(add.args) != 2:
        return None
    mean, eps = add.args if isinstance(add.args[0], fx.Node) else add.args[::-1]
    if not (isinstance(mean, fx.Node) and isinstance(eps, (int, float)) and is_method(mean, ("mean",))
            and _is_last_dim_keepdim(mean)):
        return None
    square = mean.args[0]
    if not (isinstance(square, fx.Node) and is_method(square, ("pow",)) and square.args[1:] == (2,)):
        return None
    x32 = square.args[0]
    if not (isinstance(x32, fx.Node) and _casts_to(x32, torch.float32) and isinstance(x32.args[0], fx.Node)):
        return None
    scaled = only_user(rsqrt)
    if scaled is None or not is_call(scaled, _MUL) or set(scaled.args) != {x32, rsqrt}:
        return None
    cast = only_user(scaled)
    x = x32.args[0]
    x_value = meta_value(x)
    if cast is None or x_value is None or not _casts_to(cast, x_value.dtype):
        return None
    out = only_user(cast)
    if out is None or not is_call(out, _MUL) or len(out.args) != 2 or cast not in out.args:
        return None
    weight = out.args[0] if out.args[1] is cast else out.args[1]
    chain = (square, mean, add, rsqrt, cast)
    if not isinstance(weight, fx.Node) or set(x32.users) != {square, scaled} or any(
            len(n.users) != 1 for n in chain) or shape(weight) != (x_value.shape[-1],):
        return None
    return x, weight, float(eps), out


def _casts_to(node: fx.Node, dtype: torch.dtype) -> bool:
    if is_method(node, ("float",)):
        return dtype == torch.float32 and len(node.args) == 1
    if not is_method(node, ("to",)):
        return False
    target = node.kwargs.get("dtype", node.args[1] if len(node.args) == 2 else None)
    return target == dtype


def _is_last_dim_keepdim(mean: fx.Node) -> bool:
    x = meta_value(mean.args[0])
    dim = mean.kwargs.get("dim", mean.args[1] if len(mean.args) > 1 else None)
    keepdim = mean.kwargs.get("keepdim", mean.args[2] if len(mean.args) > 2 else False)
    dims = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
    return x is not None and keepdim is True and len(dims) == 1 and dims[0] in (-1, x.dim() - 1)


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
    if gain == float("inf"):
        return "a weight is 0: the input cannot be rebuilt from the output"
    if gain > MAX_ROUNDING_GAIN:
        return (f"|bias| / |weight| reaches {gain - 1:.3g} (> {MAX_ROUNDING_GAIN - 1:g}): the input would be "
                "rebuilt from the output too coarsely")
    return ""


def _name(weight, node: fx.Node) -> str:
    name = source_name(weight) if isinstance(weight, fx.Node) and weight.op == "placeholder" else node.name
    return name.rsplit(".", 1)[0] if name.endswith(".weight") else name
