"""Neuron predictors: which MLP neurons each group of tokens keeps.

A predictor scores every neuron for every group of consecutive tokens (``[G, ffn]``, larger =
more important); :func:`top_k` turns scores into the sparse-MLP op's sorted ``idx [G, k]``. The
``lecompile::predict_neurons`` op runs a predictor inside the compiled graph with static shapes;
:func:`recall` measures a predictor against the oracle.
"""

from .learned import clear_learned, learned_group_scores
from .op import PREDICTORS, predict_neurons, recall, top_k
from .oracle import oracle_group_scores
from .svd import clear_svd_cache, svd_group_scores

__all__ = ["oracle_group_scores", "svd_group_scores", "learned_group_scores", "clear_svd_cache", "clear_learned",
           "predict_neurons", "recall", "top_k", "PREDICTORS"]
