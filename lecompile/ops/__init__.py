"""lecompile's custom ops (``torch.ops.lecompile.*``) with their PyTorch references."""

from ..activations import ACTIVATIONS
from .adapted_linear import SLOTS, AdaptedLinear, expand_linear, reduce_linear
from .lm_head_loss import lm_head_cross_entropy
from .lora_linear import lora_linear, lora_linears
from .sparse_mlp import sparse_mlp, sparse_mlp_backward, sparse_mlp_call, sparse_mlp_ref

__all__ = ["ACTIVATIONS", "SLOTS", "AdaptedLinear", "expand_linear", "lm_head_cross_entropy", "lora_linear",
           "lora_linears", "reduce_linear", "sparse_mlp", "sparse_mlp_backward", "sparse_mlp_call", "sparse_mlp_ref"]
