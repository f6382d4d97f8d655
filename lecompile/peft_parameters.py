"""PEFT's LoRA on parameters (``LoraConfig(target_parameters=...)``, MoE experts) under Dynamo.

PEFT adapts a parameter that is not a linear layer's weight (the 3-D expert weights of Mixtral-style
MoE blocks, which ``target_modules="all-linear"`` reaches on such models, or a router's weight) with
a ``ParamWrapper``: around every forward it registers a parametrization that adds the adapter's
``ΔW`` to the parameter, and removes it after. Dynamo cannot trace that (``Tensor.set_`` on a
parameter, ``type.__delattr__``), so such a model compiles as many small graphs with the experts
in eager between them. Importing the backend gives ``ParamWrapper`` a forward that, while Dynamo
traces, calls the wrapped module with ``weight + ΔW`` through ``torch.func.functional_call``: the
same math, in one graph. Outside tracing PEFT's own forward runs.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.fx as fx

log = logging.getLogger("lecompile")

TRACED = ("LoRA on {n} parameter(s) through PEFT's ParamWrapper (target_parameters: MoE experts, routers) traced "
          "into this graph, which PEFT's parametrization alone breaks into pieces")
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _param_wrapper() -> Optional[type]:
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # a PEFT without LoRA on parameters
        return None
    return ParamWrapper


def make_traceable() -> None:
    """Give PEFT's ``ParamWrapper`` a forward Dynamo can trace (once; PEFT's forward outside tracing)."""
    wrapper = _param_wrapper()
    if wrapper is None or getattr(wrapper.forward, "_lecompile_traceable", False):
        return
    wrapper.forward = _traceable(wrapper.forward, wrapper)
    log.debug("PEFT's ParamWrapper.forward traces as weight + delta under torch.compile")


def _traceable(peft_forward, wrapper: type):
    @functools.wraps(peft_forward)
    def forward(self, x, *args, **kwargs):
        if not torch.compiler.is_compiling():
            return peft_forward(self, x, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if (self.disable_adapters or self.merged or not adapters or kwargs.get("adapter_names") is not None
                or self.get_param().dtype not in _COMPUTE_DTYPES):
            return peft_forward(self, x, *args, **kwargs)
        weight = self.get_param()
        for adapter in adapters:
            weight = weight + self.get_delta_weight(adapter)
        path, module = [self.parameter_name], self.base_layer
        while isinstance(module, wrapper):  # wrappers of other parameters of the same module
            path.insert(0, "base_layer")
            module = module.base_layer
        return torch.func.functional_call(self.base_layer, {".".join(path): weight}, (x, *args), kwargs)

    forward._lecompile_traceable = True
    return forward


def traced_wrappers(gm: fx.GraphModule) -> int:
    """How many ``ParamWrapper`` modules ``gm`` traced through."""
    wrapper = _param_wrapper()
    if wrapper is None:
        return 0
    return len({path for node in gm.graph.nodes for path, kind in (node.meta.get("nn_module_stack") or {}).values()
                if kind is wrapper})
