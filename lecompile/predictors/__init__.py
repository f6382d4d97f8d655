"""Neuron predictors: which MLP neurons each group of tokens keeps.

A predictor scores every neuron for every token (``[T, ffn]``, larger = more important);
:func:`top_k_per_group` turns scores into the sparse-MLP op's sorted ``idx [G, k]``. The
``lecompile::predict_neurons`` op runs a predictor inside the compiled graph with static shapes.
"""

from .oracle import oracle_scores
from .svd import svd_scores, clear_svd_cache
from .op import predict_neurons, top_k_per_group, PREDICTORS

__all__ = ["oracle_scores", "svd_scores", "clear_svd_cache", "predict_neurons", "top_k_per_group",
           "PREDICTORS"]
