"""Match MLP blocks on the canonical graph: ``fc2(act(fc1(x)))`` and ``down(act(gate(x)) * up(x))``.

The activation is whatever elementwise region lies between the linears (``F.gelu``, GPT-2's
hand-written tanh formula, ``silu``, casts...). An activation function in the region names the
activation by its op (``F.relu``, ``F.gelu`` and its ``approximate`` argument, ``F.silu``; any
other, such as ``hardtanh``, is refused); a region without one must be a formula built on
``tanh``, ``erf`` or ``sigmoid`` (a hand-written GELU or SiLU). Either way the region is then evaluated on probe values
and compared with that activation, which checks the gating order and the formula's constants.

A gate and an up projection fused into one linear whose output is split in two by ``chunk``
(Phi-3's ``gate_up_proj``) count as two linears, each reading its half of the weight, bias, LoRA
``B`` and IA3 vector (LoRA's ``A`` is shared); when the MLP is rewritten the fused linear goes with
it, otherwise it stays one linear for the other passes.

Only decoder MLPs are matched: inside a repeated block (a module path with a layer index,
``model.layers.3.mlp``) or writing into a residual stream (graphs of one layer, whose paths start
at the layer). A head on top of the model that happens to read Linear -> activation -> Linear is
reported and left to Inductor.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import ddp
from ..activations import ACTIVATIONS
from ..ops.adapted_linear import AdaptedLinear
from .fold_adapters import LinearMatch
from .graph import (
    DROPOUT,
    common_prefix,
    grouped_mm_ops,
    is_activation,
    is_call,
    is_cast,
    is_custom_function,
    is_elementwise,
    is_method,
    is_nonlinear,
    layer_index,
    static_shape,
)

log = logging.getLogger("lecompile")
EXPERTS = ("an MoE block's routed experts (grouped_mm): no sparse MLP inside experts; they run dense, with LoRA on "
           "them applied to each expert's tokens")
MAX_REGION = 64
DDP_SPLIT = ("DDP's graph splitting cut the block at a gradient-bucket boundary: "
             "torch._dynamo.config.optimize_ddp was set to True or 'ddp_optimizer' after lecompile was imported "
             "(importing it sets False); set it to False, and the backend compiles DDP models whole; adapter "
             "gradients are small, so overlapping their all-reduce with the backward gains little; see "
             "docs/training-stacks.md")


@dataclass
class MLPMatch:
    fc1: LinearMatch                 # fc1, or the gate of a gated MLP
    up: Optional[LinearMatch]
    fc2: LinearMatch
    activation: str
    name: str

    @property
    def pattern(self) -> str:
        return f"{self.activation}_gated" if self.up is not None else self.activation

    @property
    def ffn(self) -> int:
        return self.fc1.out_features

    @property
    def peft(self) -> List[str]:
        roles = (("fc1" if self.up is None else "gate", self.fc1), ("up", self.up), ("fc2", self.fc2))
        return [f"{role}:{label}" for role, lin in roles if lin is not None for label in lin.peft]


def match_mlp(ctx) -> None:
    """Fill ``ctx.mlps``; candidates that fail a check go to the report with the reason, and so
    does every activation left outside any candidate (a graph break between an MLP's linears
    shows up this way)."""
    seen: Set[fx.Node] = set()
    halves: Dict[fx.Node, LinearMatch] = {}
    for fc2 in ctx.linears:
        sources, region, failure = _region(fc2.x, ctx.linear_by_out, halves)
        if sources is None:
            continue
        seen |= region
        match = failure or _match(fc2, sources, region)
        if isinstance(match, str):
            ctx.unmatched(fc2.name, f"MLP candidate ending in {fc2.name}: {match}")
        else:
            ctx.mlps.append(match)
    cause = DDP_SPLIT if ddp.splits_graphs() else ("not an MLP, a graph break splits it, or an unsupported "
                                                   "PEFT wrapper such as DoRA or LoHa; see docs/supported.md")
    cut = [node for node in ctx.gm.graph.nodes if node not in seen
           and (is_activation(node) or (is_nonlinear(node) and _in_experts(node)))]
    for node in cut:
        if _in_experts(node):
            ctx.unmatched(node.name, f"activation `{_describe(node)}`: {EXPERTS}")
            continue
        ctx.unmatched(node.name, f"activation `{_describe(node)}` is not between two linear layers "
                                 f"lecompile recognizes ({cause})")
    if cut and cause is DDP_SPLIT:
        log.warning("lecompile: %d MLP block(s) run dense: %s", len(cut), DDP_SPLIT)


def _in_experts(activation: fx.Node, depth: int = 6) -> bool:
    """Whether the activation reads a grouped GEMM's output within a few ops (an expert MLP)."""
    frontier, products = {activation}, grouped_mm_ops()
    for _ in range(depth):
        frontier = {a for n in frontier for a in n.all_input_nodes}
        if any(is_call(n, products) for n in frontier):
            return True
    return False


def _region(h: fx.Node, by_out: Dict[fx.Node, LinearMatch], halves: Dict[fx.Node, LinearMatch]):
    """Walk back from fc2's input through elementwise ops to linear outputs.

    Returns ``(sources, region, failure)``. ``failure`` is the reason when a non-linear region
    reaching a linear holds something else (the walk steps over one such op with a single
    input, such as an activation dropout, to tell). ``sources`` is ``None`` when this is no MLP
    candidate: no linear output or no non-linearity behind ``h``.
    """
    sources: List[LinearMatch] = []
    region: Set[fx.Node] = set()
    stack, nonlinear, failure, stopped = [h], False, None, False
    while stack:
        node = stack.pop()
        source = by_out.get(node) or _fused_half(node, by_out, halves)
        if source is not None:
            if source not in sources:
                sources.append(source)
            continue
        if node in region:
            continue
        inputs = node.all_input_nodes
        if is_call(node, (operator.getitem,)) and isinstance(node.args[0], fx.Node) \
                and is_custom_function(node.args[0]):
            pass  # the Function's output, unpacked: walk on to the Function
        elif is_custom_function(node):  # opaque, presumably an activation: report it, do not guess
            inputs = [n for n in inputs if n.op != "get_attr"]  # its forward/backward subgraphs
            if failure or len(inputs) != 1:
                stopped = True
                break
            failure = ("a custom autograd.Function between the linears: lecompile cannot read its math (it "
                       "replaces only those listed in lecompile.passes.known_functions, such as BLOOM's GeLU)")
            nonlinear = True
        elif not is_elementwise(node):
            if failure or len(inputs) != 1:
                stopped = True
                break
            failure = f"`{_describe(node)}` between the linears is not elementwise"
        region.add(node)
        nonlinear |= is_nonlinear(node)
        if len(region) > MAX_REGION:
            return None, region, None
        stack.extend(inputs)
    candidate = nonlinear and sources and (failure or not stopped)
    return (sources if candidate else None), region, failure


def _fused_half(node: fx.Node, by_out: Dict[fx.Node, LinearMatch],
                halves: Dict[fx.Node, LinearMatch]) -> Optional[LinearMatch]:
    """``node`` as one half of a fused projection, ``getitem(chunk(linear_out, 2, dim=-1), i)``:
    a :class:`LinearMatch` whose tensors are the halves of the fused one's (``narrow`` nodes, made
    once per half: ``halves`` keeps them by ``node``)."""
    if node in halves:
        return halves[node]
    if not (is_call(node, (operator.getitem,)) and node.args[1] in (0, 1)):
        return None
    chunk = node.args[0]
    if not (isinstance(chunk, fx.Node) and (is_method(chunk, ("chunk",)) or is_call(chunk, (torch.chunk,)))):
        return None
    fused = by_out.get(chunk.args[0])
    if fused is None or fused.weight_transposed or fused.out_features % 2:
        return None
    args = {**dict(zip(("chunks", "dim"), chunk.args[1:])), **chunk.kwargs}
    out_shape = static_shape(fused.out)
    if args.get("chunks") != 2 or out_shape is None or args.get("dim", 0) not in (-1, len(out_shape) - 1):
        return None
    halves[node] = _half(fused, node, node.args[1])
    return halves[node]


def _half(fused: LinearMatch, out: fx.Node, index: int) -> LinearMatch:
    a, width = fused.adapted, fused.out_features // 2
    graph = out.graph

    def narrow(t):
        return None if t is None else graph.call_function(torch.narrow, (t, 0, index * width, width))

    with graph.inserting_before(out.args[0]):  # the chunk: the fused linear's tensors are all defined
        adapted = AdaptedLinear(narrow(a.weight), narrow(a.bias), a.lora_input, a.lora_a, narrow(a.lora_b),
                                a.in_scale, narrow(a.out_scale), a.lora_scale)
    return LinearMatch(adapted, fused.x, out, f"{fused.name}[{index}]", fused.in_features, width,
                       lora_dropout=fused.lora_dropout, nodes=fused.nodes | {out.args[0], out}, peft=fused.peft,
                       fused=fused)


def _match(fc2: LinearMatch, sources: List[LinearMatch], region: Set[fx.Node]) -> Union[MLPMatch, str]:
    if len(sources) not in (1, 2):
        return (f"the activation reads {len(sources)} linear outputs (expected 1, or 2 when gated; an adapter "
                "lecompile does not fold, such as PEFT's lora_bias=True or a second active LoRA adapter, leaves its "
                "linears separate: see docs/supported.md)")
    for src in sources:
        if src.out_features != fc2.in_features:
            return f"{src.name} has {src.out_features} outputs but fc2 reads {fc2.in_features}"
    if len(sources) == 2 and sources[0].x is not sources[1].x:
        return "gate and up read different inputs"
    inside = region | fc2.nodes
    for node in region:
        if node is not fc2.x and any(u not in inside for u in node.users):
            return f"the intermediate `{node.name}` is used outside the MLP"
    if any(u not in inside for u in fc2.x.users):
        return f"the intermediate `{fc2.x.name}` is used outside the MLP"
    for src in sources:
        if any(u not in region and u not in fc2.nodes for u in src.out.users):
            return f"the output of {src.name} is used outside the MLP"
    fused = [src.fused for src in sources if src.fused is not None]
    if fused and (len(fused) != 2 or fused[0] is not fused[1]):
        return "one half of a fused projection, without the other, feeds the activation"
    if fused:
        whole, chunk = fused[0], sources[0].out.args[0]
        if set(whole.out.users) != {chunk} or set(chunk.users) != {s.out for s in sources}:
            return f"the fused projection {whole.name} is also used outside the MLP"
    if static_shape(sources[0].x) is None:
        return "dynamic shapes are not supported yet"
    named = _activation_by_op(region)
    if named is not None and named not in ACTIVATIONS:
        return named
    found = _identify(fc2.x, sources, region, named)
    if found is None:
        return "the activation is none of " + ", ".join(ACTIVATIONS) + " (or their gated forms)"
    activation, gate_first = found
    if len(sources) == 2 and not gate_first:
        sources = sources[::-1]
    up = sources[1] if len(sources) == 2 else None
    name = common_prefix([s.name for s in sources] + [fc2.name]) or f"{sources[0].name}->{fc2.name}"
    if layer_index(name) is None and not _writes_residual(fc2.out):
        return (f"`{name}` is not a decoder MLP: its module path has no layer index and its output is added "
                "to no residual stream (a head on top of the model?); only decoder MLPs are rewritten")
    return MLPMatch(sources[0], up, fc2, activation, name)


def _writes_residual(out: fx.Node, steps: int = 8) -> bool:
    """Whether ``out`` (through dropout, casts, views and scalings) is added to another tensor:
    a decoder block's MLP writes into the residual stream. Dynamo compiles one graph per layer
    for some models, where module paths start at the layer and hold no layer index."""
    for _ in range(steps):
        users = list(out.users)
        if any(_is_add(u) for u in users):
            return True
        if len(users) != 1 or not (is_call(users[0], DROPOUT) or is_elementwise(users[0])
                                   or is_method(users[0], ("view", "reshape"))):
            return False
        out = users[0]
    return False


def _is_add(node: fx.Node) -> bool:
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    return len(tensors) == 2 and (is_call(node, (operator.add, operator.iadd, torch.add))
                                  or is_method(node, ("add", "add_")))


def _activation_by_op(region: Set[fx.Node]) -> Optional[str]:
    """The activation the region's activation op names (a key of ``ACTIVATIONS``), a reason why
    it is refused, or ``None`` for a region without one (a formula, checked by its probes)."""
    calls = [n for n in region if is_activation(n) or is_method(n, ("relu",))]
    if not calls:
        formula = any(n.target in (torch.tanh, torch.erf, torch.sigmoid, F.sigmoid, F.tanh)
                      or is_method(n, ("tanh", "erf", "sigmoid")) for n in region)
        return None if formula else "the region between the linears holds no activation lecompile knows"
    if len(calls) > 1:
        return f"{len(calls)} activation ops between the linears"
    node = calls[0]
    if node.op == "call_method" or node.target in (torch.relu, F.relu):
        return "relu"
    if node.target is F.silu:
        return "silu"
    if node.target is F.gelu:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu_tanh" if approximate == "tanh" else "gelu"
    return f"activation `{_describe(node)}` is not one lecompile computes ({', '.join(ACTIVATIONS)})"


def _identify(h: fx.Node, sources: List[LinearMatch], region: Set[fx.Node], named: Optional[str]):
    """``(activation, gate_is_first_source)`` by evaluating the region on probe values: against
    ``named`` (from the region's op), or against each activation for a formula."""
    candidates = {named: ACTIVATIONS[named]} if named is not None else ACTIVATIONS
    order = {n: i for i, n in enumerate(h.graph.nodes)}
    nodes = sorted(region, key=order.__getitem__)
    gen = torch.Generator().manual_seed(0)
    if len(sources) == 1:
        a = torch.linspace(-8, 8, 2001, dtype=torch.float64)
        out = _evaluate(nodes, {sources[0].out: a}, h)
        for name, act in candidates.items():
            if out is not None and torch.allclose(out, act(a), atol=1e-6, rtol=1e-6):
                return name, True
        return None
    g = torch.randn(4096, generator=gen, dtype=torch.float64) * 4
    u = torch.randn(4096, generator=gen, dtype=torch.float64)
    for gate_first in (True, False):
        values = (g, u) if gate_first else (u, g)
        out = _evaluate(nodes, {sources[0].out: values[0], sources[1].out: values[1]}, h)
        for name, act in candidates.items():
            if out is not None and torch.allclose(out, act(g) * u, atol=1e-6, rtol=1e-6):
                return name, gate_first
    return None


def _evaluate(nodes: List[fx.Node], env: Dict[fx.Node, torch.Tensor], h: fx.Node):
    env = dict(env)

    def value(a):
        return fx.node.map_arg(a, lambda n: env[n])

    try:
        for node in nodes:
            args, kwargs = value(node.args), value(node.kwargs)
            if is_cast(node):
                env[node] = args[0]  # probes stay float64; the op computes in the base dtype
            elif node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                env[node] = node.target(*args, **kwargs)
        return env[h]
    except Exception:  # an op that does not accept probe values is simply not an activation
        return None


def _describe(node: fx.Node) -> str:
    target = node.target if node.op != "call_function" else getattr(node.target, "__name__", node.target)
    return f"{node.op} {target}"
