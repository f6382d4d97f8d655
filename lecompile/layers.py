"""Compile a model's decoder layer once instead of once per layer.

Dynamo traces a whole model into one graph, so Inductor compiles each of its N identical decoder
layers again: compile time grows with the depth, by minutes for deep models at long sequences.
A graph break before every decoder layer makes each layer a frame of its own; Dynamo compiles the
layer's code once and runs that compiled code for every layer (the layers' parameters are inputs
of the graph, not constants in it), recompiling only where a layer differs (its guards fail).

Each layer's graph then gets the model's attention mask as an input, whose values the backend
cannot read at compile time (in one whole graph the ``causal_masks`` pass drops a mask built from
constants alone). So the break itself, running eagerly, checks the mask once per forward: where it
is only the causal mask and the layer's attention is transformers' SDPA, the layer gets no mask and
its SDPA runs ``is_causal`` (the causal kernels, and block-sparse attention without a token mask).
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch._dynamo.utils import counters

from .passes.causal_masks import is_causal

log = logging.getLogger("lecompile")

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
    break inside a checkpointed region would leave the layer uncompiled. An ``attention_mask``
    that is only the causal mask is not passed to layers whose attention is transformers' SDPA
    (see the module docstring); a padding or packing mask is. Returns the changed layers;
    ``.remove()`` restores their classes. A model without such layers is a ``ValueError``.
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
            args, kwargs = _without_causal_mask(self, args, kwargs)
            return cls.__call__(self, *args, **kwargs)

        _BREAKING_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                              "__qualname__": cls.__qualname__})
    return _BREAKING_CLASSES[cls]


#: The last attention mask checked (a weak reference), its version then, and whether it was causal
#: only: every layer of a forward gets the same mask, which is checked once.
_last_mask: list = [None, -1, False]


@torch._dynamo.disable
def _without_causal_mask(layer: nn.Module, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """``args`` and ``kwargs`` without the ``attention_mask`` (by name, or by its place in
    ``layer.forward``'s parameters, as GPT-2 passes it) where that is only the causal mask and
    ``layer``'s attention, transformers' SDPA, then runs causal; else as they are."""
    position = _mask_position(type(layer))
    by_name = "attention_mask" in kwargs
    if not by_name and (position is None or position >= len(args)):
        return args, kwargs
    mask = kwargs["attention_mask"] if by_name else args[position]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or not _runs_causal_sdpa(layer):
        return args, kwargs
    ref, version, causal = _last_mask
    if ref is None or ref() is not mask or version != mask._version:
        q_len, kv_len = mask.shape[-2:]
        causal = q_len == kv_len and is_causal(mask, "mask" if mask.dtype == torch.bool else "add", q_len, kv_len)
        _last_mask[:] = [weakref.ref(mask), mask._version, causal]
        log.debug("lecompile: the %s attention mask is %s", tuple(mask.shape),
                  "only causal: decoder layers run causal SDPA without it" if causal else "not only causal: it stays")
        counters["lecompile"]["causal_mask_dropped_at_layers" if causal else "mask_kept_at_layers"] += 1
    if not causal:
        return args, kwargs
    if by_name:
        return args, {**kwargs, "attention_mask": None}
    return args[:position] + (None,) + args[position + 1:], kwargs


@functools.lru_cache(maxsize=None)
def _mask_position(cls: type) -> Optional[int]:
    """Where ``cls.forward`` takes ``attention_mask`` among its positional arguments (after self)."""
    names = list(inspect.signature(cls.forward).parameters)[1:]
    return names.index("attention_mask") if "attention_mask" in names else None


#: Each decoder layer's modules that carry a config or ``is_causal``, found on its first call: a walk
#: over all of a LoRA layer's modules costs more per call than the rest of the check.
_attention_modules: "weakref.WeakKeyDictionary[nn.Module, List[nn.Module]]" = weakref.WeakKeyDictionary()


def _runs_causal_sdpa(layer: nn.Module) -> bool:
    """Whether every attention in ``layer`` is transformers' SDPA attention, which runs causal
    without a mask (an ``eager`` attention would run unmasked); read at every call, so a changed
    attention implementation counts."""
    if layer not in _attention_modules:
        _attention_modules[layer] = [m for m in layer.modules() if hasattr(m, "config") or hasattr(m, "is_causal")]
    modules = _attention_modules[layer]
    implementations = {getattr(m.config, "_attn_implementation", None) for m in modules if hasattr(m, "config")}
    return implementations == {"sdpa"} and all(getattr(m, "is_causal", True) is True for m in modules)
