"""Compile a model's decoder layer once instead of once per layer.

Dynamo traces a whole model into one graph, so Inductor compiles each of its N identical decoder
layers again: compile time grows with the depth, by minutes for deep models at long sequences.
A graph break before every decoder layer makes each layer a frame of its own; Dynamo compiles the
layer's code once and runs that compiled code for every layer (the layers' parameters are inputs
of the graph, not constants in it), recompiling only where a layer differs (its guards fail).
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

#: Each decoder layer class and the subclass that breaks the graph before calling it: one per
#: class, so that all of a model's layers keep one type and Dynamo's guards pass for every layer.
_BREAKING_CLASSES: Dict[type, type] = {}


class LayerBreaks:
    """The layers :func:`compile_layers_once` changed; :meth:`remove` gives them their classes back."""

    def __init__(self, layers: List[nn.Module], classes: List[type]):
        self.layers = layers
        self._classes = classes

    def remove(self) -> None:
        for layer, cls in zip(self.layers, self._classes):
            layer.__class__ = cls
        self._classes = [type(layer) for layer in self.layers]


def compile_layers_once(model: nn.Module) -> LayerBreaks:
    """Have ``torch.compile`` compile ``model``'s decoder layer once and run it for every layer.

    Call it before the model's first compiled step::

        lecompile.compile_layers_once(model)
        model = torch.compile(model, backend="longexposure")

    It puts a Dynamo graph break before every decoder layer, so the backend gets one graph per
    distinct layer, plus the graphs around the layers. The rewrites apply in each layer's graph as
    usual, gradient checkpointing included; what needs the whole model in one graph does not:
    ``mlp_layer_densities`` cannot tell the layers apart (``mlp_density`` applies to all) and
    ``dense_output_share`` cannot see the loss. Each break costs a graph launch per layer.

    The decoder layers are the modules of the classes a Hugging Face model lists in
    ``_no_split_modules``, else the longest ``nn.ModuleList`` of modules of one class. The break
    comes before the layer's whole ``__call__`` (the way FSDP2's ``fully_shard`` does, each layer
    gets a subclass of its class, of the same name), so it stays outside a checkpoint that a layer
    class puts around its call (transformers 5.17 does) as well as around its ``forward``: a
    break inside a checkpointed region would leave the layer uncompiled. Returns the changed
    layers; ``.remove()`` restores their classes. A model without such layers is a ``ValueError``.
    """
    layers = decoder_layers(model)
    classes = [type(layer) for layer in layers]
    for layer in layers:
        layer.__class__ = _breaking_class(type(layer))
    return LayerBreaks(layers, classes)


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


def _breaking_class(cls: type) -> type:
    if cls in _BREAKING_CLASSES.values():  # compile_layers_once called twice
        return cls
    if cls not in _BREAKING_CLASSES:
        def __call__(self, *args, **kwargs):
            torch._dynamo.graph_break()
            return cls.__call__(self, *args, **kwargs)

        _BREAKING_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                              "__qualname__": cls.__qualname__})
    return _BREAKING_CLASSES[cls]
