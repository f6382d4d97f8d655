"""lecompile's custom ops (``torch.ops.lecompile.*``) with their PyTorch references."""

from .adapted_linear import ACTIVATIONS, SLOTS, AdaptedLinear, expand_linear, reduce_linear
from .lora_linear import lora_linear
from .sparse_mlp import sparse_mlp, sparse_mlp_backward, sparse_mlp_call, sparse_mlp_ref

__all__ = ["ACTIVATIONS", "SLOTS", "AdaptedLinear", "expand_linear", "lora_linear", "reduce_linear", "sparse_mlp",
           "sparse_mlp_backward", "sparse_mlp_call", "sparse_mlp_ref"]
