"""DistributedDataParallel models compile whole under the backend.

At Dynamo's default (``torch._dynamo.config.optimize_ddp = True``) its DDP optimizer cuts a DDP
model's graph at gradient-bucket boundaries, so that each bucket's all-reduce can overlap the rest
of the backward, and compiles each piece alone; a cut inside an MLP or attention block leaves it
dense. Adapter gradients are small (tens of MB), so the overlap buys little, and on two H200s the
cuts cost Inductor itself time (docs/training-stacks.md). Importing the backend therefore turns
the splitting off when it is at that default; ``"ddp_optimizer"`` asks for it by name and is kept.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("lecompile")

WHOLE = ("DDP model compiled whole (torch._dynamo.config.optimize_ddp = False, which importing lecompile sets "
         "in place of Dynamo's default True): no block is cut at a gradient-bucket boundary, and the adapters' "
         "gradients are all-reduced after the backward instead of during it")


def turn_off_graph_splitting() -> None:
    """Set ``torch._dynamo.config.optimize_ddp`` to ``False`` if it is at its default ``True``."""
    config = torch._dynamo.config
    if config.optimize_ddp is True:
        config.optimize_ddp = False
        log.debug("set torch._dynamo.config.optimize_ddp = False (DDP models compile whole)")


def _active_ddp_module() -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module() is not None


def splits_graphs() -> bool:
    """Whether Dynamo's DDP optimizer hands the backend pieces of a DDP model's graph, cut at
    gradient-bucket boundaries."""
    return torch._dynamo.utils.get_optimize_ddp_mode() == "ddp_optimizer" and _active_ddp_module()


def compiled_whole() -> bool:
    """Whether the graph being compiled is a whole DDP model's."""
    return torch._dynamo.utils.get_optimize_ddp_mode() == "no_optimization" and _active_ddp_module()
