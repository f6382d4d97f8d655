"""One static graph per size for graphs Dynamo compiled with symbolic sizes.

When a size changes between calls (a new sequence length or batch size), Dynamo recompiles the
graph with symbolic sizes ("automatic dynamic shapes"). lecompile's sparse MLP and attention
rewrites need static shapes, so for such a training graph the backend returns a
:class:`ShapeSpecialized`: for each new value of the symbolic sizes it copies the graph with the
values in place of the symbols, propagates static shapes through it with fake tensors, and
compiles that copy as a static graph (rewrites, dense warm-up and all). Up to :data:`MAX_SHAPES`
sizes, Dynamo's own recompile limit; past it, new sizes run the graph eagerly and the
``lecompile`` logger warns.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .passes.inline_checkpoints import is_checkpoint
from .warmup import copy_graph

log = logging.getLogger("lecompile")

#: Sizes compiled per graph: Dynamo's default ``recompile_limit``.
MAX_SHAPES = 8


def symbolic_inputs(example_inputs: Sequence) -> List[int]:
    """Positions of the graph inputs that are symbolic sizes."""
    return [i for i, x in enumerate(example_inputs) if isinstance(x, torch.SymInt)]


def specialize(gm: fx.GraphModule, args: Sequence, mode: Optional[FakeTensorMode] = None) -> fx.GraphModule:
    """A copy of ``gm`` for the sizes of ``args`` (the values its inputs take in one call; tensors
    real, or fakes of ``mode``): symbolic-size inputs replaced by their values, every node's
    ``example_value`` the static fake tensor those inputs give."""
    static = copy_graph(gm)
    _replace_symbols(static, args)
    static.recompile()
    mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [_fake(mode, a) if isinstance(a, torch.Tensor) else a for a in args]
    _StaticShapes(static, mode).propagate_dont_convert_inputs(*fakes)
    return static


def _replace_symbols(gm: fx.GraphModule, args: Sequence) -> None:
    """In ``gm``'s graph, each symbolic-size input's uses take its value in ``args``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, args):
        if isinstance(node.meta.get("example_value"), torch.SymInt):
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)


def concrete_inputs(example_inputs: Sequence, mode: FakeTensorMode) -> list:
    """Dynamo's example inputs at the sizes they were traced with: each symbolic size as its
    value (hint), each tensor a fake one of ``mode`` with that static shape."""
    def one(x):
        if isinstance(x, torch.SymInt):
            return _hint(x)
        if isinstance(x, torch.Tensor):
            with mode:
                return torch.empty_strided([_hint(s) for s in x.shape], [_hint(s) for s in x.stride()],
                                           dtype=x.dtype, device=x.device, requires_grad=x.requires_grad)
        return x
    return [one(x) for x in example_inputs]


class ShapeSpecialized:
    """Runs a graph traced with symbolic sizes as one static graph per value of those sizes:
    ``compile_static(static_gm, args)`` compiles the form for the sizes of ``args`` on their
    first call; past :data:`MAX_SHAPES` sizes the graph runs eagerly. ``traced``, if given, is
    the graph already made static for the sizes Dynamo traced with (:func:`concrete_inputs`),
    used for those sizes' form. Compiles are counted in
    ``torch._dynamo.utils.counters["lecompile"]["shape_specializations"]``."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence,
                 compile_static: Callable[[fx.GraphModule, list], Callable],
                 traced: Optional[fx.GraphModule] = None):
        self.template = copy_graph(gm)
        self.symbols = symbolic_inputs(example_inputs)
        self.compile_static = compile_static
        self.forms: Dict[Tuple[int, ...], Callable] = {}
        self._static = {} if traced is None else {tuple(_hint(example_inputs[i]) for i in self.symbols): traced}
        self._warned = False

    def __call__(self, *args):
        key = tuple(args[i] for i in self.symbols)
        form = self.forms.get(key)
        if form is None:
            form = self._new_form(key, list(args))
        return form(*args)

    def _new_form(self, key: tuple, args: list) -> Callable:
        if len(self.forms) >= MAX_SHAPES:
            if not self._warned:
                message = (f"lecompile: a graph met more than {MAX_SHAPES} sizes {key}; new sizes run eagerly, "
                           "without the rewrites. Pad batches to a few fixed lengths (e.g. pad_to_multiple_of)")
                log.warning(message)
                warnings.warn(message, stacklevel=3)
                self._warned = True
            return self.template
        log.info("lecompile: compiling a static graph for sizes %s (%d of at most %d)", key, len(self.forms) + 1,
                 MAX_SHAPES)
        counters["lecompile"]["shape_specializations"] += 1
        static = self._static.pop(key, None) or specialize(self.template, args)
        self.forms[key] = self.compile_static(static, args)
        return self.forms[key]


class _StaticShapes(FakeTensorProp):
    """Fake-tensor propagation that also sets Dynamo's ``example_value``, which the passes read,
    and propagates into the bodies of checkpointed regions, which the passes inline."""

    def __init__(self, module: fx.GraphModule, mode: FakeTensorMode):
        super().__init__(module, mode)
        self.mode = mode

    def run_node(self, n: fx.Node):
        if is_checkpoint(n):
            (body, *operands), _ = self.fetch_args_kwargs_from_env(n)
            static = copy_graph(body)  # the body is shared with the graph being copied: copy it too
            _replace_symbols(static, operands)
            static.recompile()
            setattr(self.module, n.args[0].target, static)
            _StaticShapes(static, self.mode).propagate_dont_convert_inputs(*operands)
        out = super().run_node(n)
        if "val" in n.meta:
            n.meta["example_value"] = n.meta["val"]
        return out


def _fake(mode: FakeTensorMode, t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch._subclasses.FakeTensor) and t.fake_mode is mode:
        return t
    return mode.from_tensor(t, static_shapes=True)


def _hint(size) -> int:
    return size.node.hint if isinstance(size, torch.SymInt) else size
