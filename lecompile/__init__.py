"""lecompile: a PyTorch compiler backend for sparse parameter-efficient fine-tuning.

::

    model = torch.compile(model, backend="longexposure")
    model = torch.compile(model, backend=lecompile.longexposure(lecompile.LongExposureConfig(mlp_density=0.25)))
    report = lecompile.explain(model, **batch)
    densities = lecompile.auto_layer_densities(model, input_ids, mean_density=0.5)
    lecompile.compile_layers_once(model)  # before torch.compile: each distinct decoder layer compiles once
"""

import logging

from .backend import LongExposureBackend, explain, longexposure
from .config import LongExposureConfig
from .layers import compile_layers_once
from .predictors.learned import load_state_dict as load_predictor_state_dict
from .predictors.learned import state_dict as predictor_state_dict
from .report import Report
from .sensitivity import auto_layer_densities

logging.getLogger("lecompile").addHandler(logging.NullHandler())


def _register_torch_logs() -> None:
    """Make ``TORCH_LOGS="lecompile"`` (INFO) and ``TORCH_LOGS="+lecompile"`` (DEBUG) work."""
    try:
        from torch._logging._internal import register_log
    except ImportError:  # a torch without it: the logging module still works
        return
    register_log("lecompile", "lecompile")


_register_torch_logs()

__version__ = "0.1.0"
__all__ = ["LongExposureBackend", "LongExposureConfig", "Report", "auto_layer_densities", "compile_layers_once",
           "explain", "load_predictor_state_dict", "longexposure", "predictor_state_dict"]
