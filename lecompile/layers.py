"""Compile a model's decoder layer once instead of once per layer.

Dynamo traces a whole model into one graph, so Inductor compiles each of its N identical decoder
layers again: compile time grows with the depth, by minutes for deep models at long sequences.
A graph break before every decoder layer makes each layer a frame of its own; Dynamo compiles the
layer's code once and runs that compiled code for every layer (the layers' parameters are inputs
of the graph, not constants in it), recompiling only where a layer differs (its guards fail).
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class LayerHooks:
    """The hooks :func:`compile_layers_once` registered; :meth:`remove` takes them off again."""

    def __init__(self, layers: List[nn.Module], handles: List[RemovableHandle]):
        self.layers = layers
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def compile_layers_once(model: nn.Module) -> LayerHooks:
    """Have ``torch.compile`` compile ``model``'s decoder layer once and run it for every layer.

    Call it before the model's first compiled step::

        lecompile.compile_layers_once(model)
        model = torch.compile(model, backend="longexposure")

    It puts a Dynamo graph break before every decoder layer (a forward pre-hook), so the backend
    gets one graph per distinct layer, plus the graphs around the layers. The rewrites apply in
    each layer's graph as usual, gradient checkpointing included; what needs the whole model in one
    graph does not: ``mlp_layer_densities`` cannot tell the layers apart (``mlp_density`` applies to
    all) and ``dense_output_share`` cannot see the loss. Each break costs a graph launch per layer.

    The decoder layers are the modules of the classes a Hugging Face model lists in
    ``_no_split_modules``, else the longest ``nn.ModuleList`` of modules of one class. Returns the
    hooks; ``.remove()`` takes them off. A model without such layers is a ``ValueError``.
    """
    layers = decoder_layers(model)
    return LayerHooks(layers, [layer.register_forward_pre_hook(_graph_break) for layer in layers])


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """``model``'s decoder layers (see :func:`compile_layers_once`), in order."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if len(layers) > 1:
        return layers
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
              and len({type(child) for child in m}) == 1]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no decoder layers to compile once: no module of a class in "
                         f"its _no_split_modules and no nn.ModuleList of two or more modules of one class")
    return list(max(stacks, key=len))


def _graph_break(module: nn.Module, args) -> None:
    torch._dynamo.graph_break()
