"""Small helpers to read the torch-level FX graphs Dynamo hands a backend."""

from __future__ import annotations

import operator
import re
from typing import Iterable, Optional, Set

import torch
import torch.fx as fx
import torch.nn.functional as F

LINEAR = (torch._C._nn.linear, F.linear)
ADDMM = (torch.addmm,)
DROPOUT = (F.dropout, torch.dropout)
SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
SOFTMAX = (F.softmax, torch.softmax)
MATMUL = (torch.matmul, operator.matmul, torch.bmm)
VIEWS = ("view", "reshape")
#: Methods that only change dtype or layout; the sparse ops compute in the base dtype.
CASTS = ("to", "float", "half", "bfloat16", "type", "contiguous")

#: Activation functions, known or not to the ops: any of them makes a region an MLP candidate.
ACTIVATION_FUNCTIONS = {torch.tanh, torch.erf, torch.sigmoid, torch.relu, F.relu, F.gelu, F.silu,
                        F.sigmoid, F.tanh, F.mish, F.leaky_relu, F.softplus, F.elu, F.selu, F.celu,
                        F.hardswish, F.hardtanh, F.relu6, F.softsign, F.logsigmoid, F.hardsigmoid}
#: Elementwise ops an activation region between two linears may contain.
ELEMENTWISE_FUNCTIONS = ACTIVATION_FUNCTIONS | {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.exp, torch.sqrt,
    torch.rsqrt,
}
ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "pow", "tanh", "erf", "sigmoid", "exp",
                       "relu", "sqrt", "rsqrt", *CASTS}
#: Ops that make an elementwise region non-linear: only those regions are MLP candidates.
NONLINEAR = ACTIVATION_FUNCTIONS | {"tanh", "erf", "sigmoid", "relu"}


def is_call(node: fx.Node, targets: Iterable) -> bool:
    return node.op == "call_function" and node.target in targets


def is_method(node: fx.Node, names: Iterable[str]) -> bool:
    return node.op == "call_method" and node.target in names


def grouped_mm_ops() -> tuple:
    """The ops that multiply tokens sorted by expert with stacked expert weights (MoE blocks):
    PyTorch's grouped GEMMs and transformers' fallback for them."""
    ops = [getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)]
    transformers_ops = getattr(torch.ops, "transformers", None)
    if transformers_ops is not None and hasattr(transformers_ops, "grouped_mm_fallback"):
        ops += [transformers_ops.grouped_mm_fallback, transformers_ops.grouped_mm_fallback.default]
    return tuple(op for op in ops if op is not None)


def is_custom_function(node: fx.Node) -> bool:
    """A ``torch.autograd.Function`` as Dynamo traces it (the ``autograd_function_apply`` op)."""
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "autograd_function_apply"


def is_cast(node: fx.Node) -> bool:
    return is_method(node, CASTS)


def linear_args(node: fx.Node) -> tuple:
    """``(input, weight, bias)`` of a ``linear`` call, passed by position or keyword (bias may be ``None``)."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return x, weight, bias


def is_elementwise(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS)
            or is_method(node, ELEMENTWISE_METHODS))


def is_activation(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS and node.target not in (
        torch.tanh, torch.erf, torch.sigmoid, F.tanh, F.sigmoid)  # also parts of other formulas


def is_nonlinear(node: fx.Node) -> bool:
    return node.target in NONLINEAR


def strip_casts(node: fx.Node) -> fx.Node:
    while is_cast(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def meta_value(node) -> Optional[torch.Tensor]:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def devices(nodes: Iterable) -> Set[str]:
    """The devices of the tensors behind ``nodes`` (nodes without an example tensor are skipped)."""
    return {str(v.device) for v in map(meta_value, nodes) if v is not None}


def shape(node) -> Optional[tuple]:
    value = meta_value(node)
    return tuple(value.shape) if value is not None else None


def static_shape(node) -> Optional[tuple]:
    """The node's shape if every dim is a plain int, else ``None`` (dynamic shapes)."""
    s = shape(node)
    return s if s is not None and all(type(d) is int for d in s) else None


def dropout_p(node: fx.Node) -> float:
    """The probability of a ``F.dropout`` call, 0.0 when it is not in training mode."""
    args = list(node.args) + [None] * 4
    p = node.kwargs.get("p", args[1] if args[1] is not None else 0.5)
    training = node.kwargs.get("training", args[2] if args[2] is not None else True)
    return float(p) if training else 0.0


def replace_uses(old: fx.Node, new: fx.Node, delete_user_cb=lambda user: True) -> None:
    """``old.replace_all_uses_with(new)``, and ``old``'s example value on ``new`` when it has
    none: both hold the same tensor, and AOTAutograd's cache tells tensors apart by that value."""
    if "example_value" in old.meta and "example_value" not in new.meta:
        new.meta["example_value"] = old.meta["example_value"]
    old.replace_all_uses_with(new, delete_user_cb=delete_user_cb)


def recompile(gm: fx.GraphModule) -> None:
    """After a rewrite: drop the nodes it left unused, check the graph, regenerate the code."""
    gm.graph.eliminate_dead_code(is_impure_node=mutates)
    gm.graph.lint()
    gm.recompile()


def mutates(node: fx.Node) -> bool:
    """Whether ``node`` has an effect beyond its result: FX's own test, and in-place tensor methods
    (``out[i].add_(bias)`` in GPT-OSS's experts), which FX's dead-code elimination would drop."""
    return node.is_impure() or (node.op == "call_method" and node.target.endswith("_")
                                and not node.target.startswith("_"))


def source_name(node: fx.Node) -> str:
    """The module path Dynamo recorded for a placeholder (``layers.0.mlp.fc1.weight``)."""
    grapharg = node.meta.get("grapharg")
    name = getattr(getattr(grapharg, "source", None), "name", None)
    if callable(name):
        name = name()
    if not isinstance(name, str):
        return node.name
    name = re.sub(r"\.?(?:__dict__\[')?_(?:modules|parameters|buffers)'?\]?\['([^']+)'\]", r".\1", name)
    name = re.sub(r"^L\['[^']+'\](?:\[\d+\])*\.?", "", name)  # the frame's local: self, or args[0]
    name = re.sub(r"\[(\d+)\]", r".\1", name)
    name = re.sub(r"^base_model\.model\.", "", name)
    return name.replace(".base_layer", "")


def layer_index(name: str) -> Optional[int]:
    """The decoder layer of a module path: its first number (``model.layers.3.mlp`` -> 3); ``None``
    outside a repeated block (a head on top of the model)."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def common_prefix(names: Iterable[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        prefix.append(pieces[0])
    return ".".join(prefix)


def loss_output(gm: fx.GraphModule) -> Optional[int]:
    """The position of the graph's loss among its outputs: the first 0-dim floating-point output
    that requires grad; ``None`` if there is none (a graph break before the loss)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    for i, node in enumerate(values):
        value = meta_value(node) if isinstance(node, fx.Node) else None
        if value is not None and value.dim() == 0 and value.is_floating_point() and value.requires_grad:
            return i
    return None
