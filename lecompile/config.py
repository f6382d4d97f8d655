"""`LongExposureConfig`: the backend's settings, validated on construction.

A dozen user-facing fields, :data:`PRESETS` by name, and one ``disable`` set of pass names. The
knobs of our own experiments (kernel tiles, predictor ranks, A/B switches inside a pass) live in
:class:`Tuning`, reached through the private ``_tuning`` field: not user API.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from dataclasses import dataclass, field, fields
from typing import FrozenSet, Optional, Tuple

ENV_PREFIX = "LECOMPILE_"
#: ``LECOMPILE_*`` variables that are not settings (the examples' model cache).
OTHER_ENV = ("LECOMPILE_CACHE",)

ATTN_PREDICTORS = ("pooled", "oracle")
ATTN_KERNELS = ("triton", "flash")
GRANULARITIES = ("sequence", "tile", "batch")


@dataclass(frozen=True)
class Tuning:
    """Experimental knobs, for A/B runs, studies and tests; not user API, may change any time."""

    #: Tokens per attention block (queries and keys): a positive multiple of 16, 64 or 128 on the
    #: GPU; sequences must be a multiple of it for attention to be rewritten.
    attn_block: int = 128
    #: ``"pooled"`` (block-mean queries against block-mean keys) or ``"oracle"`` (exact mass).
    attn_predictor: str = "pooled"
    #: Block-sparse attention's kernels on the GPU: FlexAttention's ``"triton"`` ones, or
    #: ``"flash"``, FlexAttention on FlashAttention 4's CuTe kernels (needs ``flash_attn.cute``,
    #: package ``flash-attn-4``; Hopper or newer).
    attn_kernel: str = "triton"
    #: Block-sparse attention with fewer key/value heads than query heads runs FlexAttention on
    #: key/value heads repeated to the query heads: no key block's backward program walks every
    #: query head of its group in turn, for a repeat and a sum of the key/value gradients.
    attn_expand_kv: bool = False
    #: At ``attn_density`` 1.0, attention with a token mask (transformers builds one for every
    #: causal LM under torch.compile) runs as block attention over every block the mask allows, on
    #: FlexAttention's Triton kernels (exact, no predictor), instead of SDPA with the mask, which
    #: reads an ``[L, S]`` mask and takes neither FlashAttention's nor cuDNN's causal kernels.
    attn_mask_blocks: bool = False
    #: Tokens per tile when ``granularity="tile"``: a positive multiple of 16.
    tile_size: int = 128
    #: Rank of the SVD and learned predictors' estimate, at least 1.
    svd_rank: int = 8
    #: Learned predictor: optimizer steps per training call (each on up to 1024 tokens).
    learned_train_steps: int = 20
    #: One calibration step (recording MLP inputs in a dense forward for the learned predictor's
    #: training and the density guard, both after the optimizer step; the first trains dense,
    #: later ones sparse) in every this many optimizer steps; 0: only the first.
    calibrate_every: int = 100
    #: Density guard (experimental until the quality harness has measured it): each sparse MLP
    #: keeps at least this share of its exact activation mass (``sum h^2`` over its token groups),
    #: measured on calibration steps; a layer below it moves to a higher density, one with room
    #: moves back down, never below its set density (``lecompile.guard``). In [0, 1); 0: off.
    min_kept_mass: float = 0.0
    #: Loss budget of the density guard (experimental): on each calibration step after the first
    #: (which trains through the sparse graph beside a dense forward of the same batch), where
    #: the sparse loss is more than this share above the dense one, ``min_kept_mass`` moves one
    #: notch up :data:`lecompile.guard.MASS_TARGETS` and a sparse attention's density one notch
    #: up :data:`lecompile.guard.DENSITIES`, where it is under half of it, one notch down (never
    #: below ``attn_density``). In [0, 1); 0: off. Starts from ``min_kept_mass`` (0.99 when that
    #: is 0).
    loss_budget: float = 0.0
    #: ``k`` is rounded up to a multiple of this (kernel tile; unaligned k ran 2-3x slower).
    k_align: int = 128
    #: LoRA linears that read one input (q, k, v) compute their A-projections as one GEMM.
    share_lora_input: bool = True
    #: LoRA's B-projection inside the base GEMM's Triton kernel (CUDA, fp16/bf16); else cuBLAS.
    lora_in_gemm: bool = True
    #: The backward recomputes norm outputs and casts that lecompile's ops read instead of keeping
    #: them (AOTAutograd's partitioner with ``ban_recompute_materialized_backward`` off).
    recompute_pointwise: bool = False

    @property
    def guarded(self) -> bool:
        """Whether the density guard runs (``min_kept_mass`` or ``loss_budget`` set)."""
        return self.min_kept_mass > 0 or self.loss_budget > 0

    def __post_init__(self) -> None:
        _check_choice("attn_predictor", self.attn_predictor, ATTN_PREDICTORS)
        _check_choice("attn_kernel", self.attn_kernel, ATTN_KERNELS)
        _check_int("attn_block", self.attn_block, "a positive multiple of 16", lambda v: v > 0 and v % 16 == 0)
        _check_int("tile_size", self.tile_size, "a positive multiple of 16", lambda v: v > 0 and v % 16 == 0)
        _check_int("svd_rank", self.svd_rank, "an integer >= 1", lambda v: v >= 1)
        _check_int("k_align", self.k_align, "an integer >= 1", lambda v: v >= 1)
        _check_int("learned_train_steps", self.learned_train_steps, "an integer >= 1", lambda v: v >= 1)
        _check_int("calibrate_every", self.calibrate_every, "0 or an integer >= 2", lambda v: v == 0 or v >= 2)
        for name in ("min_kept_mass", "loss_budget"):
            object.__setattr__(self, name, _as_float(getattr(self, name)))
            _check_share(name, getattr(self, name))
        for name in ("attn_expand_kv", "attn_mask_blocks", "share_lora_input", "lora_in_gemm", "recompute_pointwise"):
            _check_bool(name, getattr(self, name))


@dataclass(frozen=True)
class LongExposureConfig:
    """Configuration of the ``longexposure`` backend.

    ``LongExposureConfig()`` is exact: every MLP and attention block dense, the LoRA linears,
    loss and norms rewritten into faster equivalents. Sparsity is opt-in (``mlp_density``,
    ``attn_density`` below 1, or ``LongExposureConfig.preset("fast")``) and costs held-out loss
    on real models (docs/results.md). Every field can also be set through an environment
    variable ``LECOMPILE_<FIELD>`` when the config is built with :meth:`from_env`, which is what
    the registered ``"longexposure"`` backend does.
    """

    #: Share of MLP neurons kept per group of tokens, in (0, 1]. 1.0 (the default) keeps every
    #: neuron. The kept count is ``k = round_up(mlp_density * ffn, 128)``, capped at ``ffn``.
    mlp_density: float = 1.0
    #: Per-layer MLP densities: entry ``i`` is the density of decoder layer ``i`` (the first
    #: number in the MLP's module path, ``model.layers.3.mlp``); later layers use ``mlp_density``.
    #: From the environment: comma-separated numbers.
    mlp_layer_densities: Tuple[float, ...] = ()
    #: Share of the causal attention blocks each head of each sequence computes, in (0, 1]; 1.0
    #: leaves attention dense. The diagonal and the first key block are always kept.
    attn_density: float = 1.0
    #: How neuron indices are predicted: ``"svd"`` (training-free rank-8 estimate from the frozen
    #: weights plus the exact adapter terms), ``"learned"`` (those factors trained on the exact
    #: activations of calibration steps: the warm-up, at least one step, then one step in 100,
    #: which records in a dense forward and trains sparse; frozen in between) or ``"oracle"``
    #: (exact top-k of the dense activation: costs a dense pass; tests and upper bounds).
    predictor: str = "svd"
    #: Tokens that share one neuron set: ``"sequence"``, ``"tile"`` (128 consecutive tokens of a
    #: sequence) or ``"batch"``.
    granularity: str = "sequence"
    #: Dense warm-up: the first ``warmup_steps`` optimizer steps (``torch.optim`` ``step()`` calls
    #: in the process) run dense graphs; then each graph is recompiled once with sparsity.
    warmup_steps: int = 0
    #: Dense warm-up as a share of a run of ``total_steps`` optimizer steps, in [0, 1); use it or
    #: ``warmup_steps``, not both.
    warmup_fraction: float = 0.0
    #: Optimizer steps the run will take (for ``warmup_fraction``; 0: unknown).
    total_steps: int = 0
    #: Context-only sparsity (SparseLoRA): share of the token groups whose MLPs run dense, in
    #: [0, 1); groups holding output tokens (label not -100) fill it first. Needs ``labels``.
    dense_output_share: float = 0.0
    #: Replay each compiled graph as a CUDA graph (what ``mode="reduce-overhead"`` does for
    #: Inductor); recommended on GPUs, where steps are otherwise bound by Python and launches.
    cudagraphs: bool = False
    #: Folder for graph dumps (FX code before and after the passes, and the report); ``None``
    #: reads ``LECOMPILE_DUMP_DIR`` when a graph is compiled.
    dump_dir: Optional[str] = None
    #: Passes to turn off, by name (``lecompile.passes.OPTIONAL_PASSES``), for example
    #: ``{"fuse_loss"}``. From the environment: comma-separated names.
    disable: FrozenSet[str] = frozenset()
    #: Experimental knobs (:class:`Tuning`); not user API.
    _tuning: Tuning = field(default_factory=Tuning)

    def __post_init__(self) -> None:
        for name in ("mlp_density", "attn_density", "warmup_fraction", "dense_output_share"):
            object.__setattr__(self, name, _as_float(getattr(self, name)))
        if isinstance(self.mlp_layer_densities, tuple):
            object.__setattr__(self, "mlp_layer_densities", tuple(map(_as_float, self.mlp_layer_densities)))
        if isinstance(self.disable, (set, list, tuple)):
            object.__setattr__(self, "disable", frozenset(self.disable))
        _check_fraction("mlp_density", self.mlp_density)
        if not isinstance(self.mlp_layer_densities, tuple):
            raise ValueError(f"LongExposureConfig.mlp_layer_densities must be a tuple of densities, "
                             f"got {self.mlp_layer_densities!r}")
        for i, d in enumerate(self.mlp_layer_densities):
            _check_fraction(f"mlp_layer_densities[{i}]", d)
        _check_int("warmup_steps", self.warmup_steps, "an integer >= 0", lambda v: v >= 0)
        _check_int("total_steps", self.total_steps, "an integer >= 0", lambda v: v >= 0)
        _check_share("warmup_fraction", self.warmup_fraction)
        if self.warmup_fraction and self.warmup_steps:
            raise ValueError(f"LongExposureConfig: set warmup_steps ({self.warmup_steps}) or warmup_fraction "
                             f"({self.warmup_fraction}), not both")
        if self.warmup_fraction and not self.total_steps:
            raise ValueError(f"LongExposureConfig.warmup_fraction={self.warmup_fraction} needs total_steps, the "
                             f"run's number of optimizer steps (for example TrainingArguments.max_steps)")
        _check_fraction("attn_density", self.attn_density)
        _check_share("dense_output_share", self.dense_output_share)
        from .predictors import PREDICTORS
        _check_choice("predictor", self.predictor, tuple(PREDICTORS))
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_bool("cudagraphs", self.cudagraphs)
        self._check_disable()
        if not isinstance(self._tuning, Tuning):
            raise ValueError(f"LongExposureConfig._tuning must be a lecompile.config.Tuning, got {self._tuning!r}")
        if self._tuning.min_kept_mass and not self.sparse_mlp:
            raise ValueError(f"LongExposureConfig: the density guard (min_kept_mass={self._tuning.min_kept_mass}) "
                             f"moves MLP densities up from mlp_density, which is 1.0: set mlp_density below 1")
        if self._tuning.loss_budget and not self.sparse:
            raise ValueError(f"LongExposureConfig: the density guard (loss_budget={self._tuning.loss_budget}) moves "
                             f"MLP and attention densities up from mlp_density and attn_density, which are 1.0: "
                             f"set mlp_density or attn_density below 1")
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise ValueError(f"LongExposureConfig.dump_dir must be a path or None, "
                             f"got {self.dump_dir!r}")

    def _check_disable(self) -> None:
        from .passes import OPTIONAL_PASSES
        if not isinstance(self.disable, frozenset) or not all(isinstance(n, str) for n in self.disable):
            raise ValueError(f"LongExposureConfig.disable must be a set of pass names, got {self.disable!r}")
        unknown = sorted(self.disable - set(OPTIONAL_PASSES))
        if unknown:
            raise ValueError(f"LongExposureConfig.disable: unknown pass name(s) {unknown}; the passes that can "
                             f"be turned off are {list(OPTIONAL_PASSES)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "LongExposureConfig":
        """A named setting (:data:`PRESETS`), with ``overrides`` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; the presets are {sorted(PRESETS)}")
        return cls.create(**{**PRESETS[name], **overrides})

    @classmethod
    def create(cls, **values) -> "LongExposureConfig":
        """A config from flat settings: fields, and :class:`Tuning`'s knobs by their own names."""
        tuning_names = {f.name for f in fields(Tuning)}
        tuning = {k: values.pop(k) for k in list(values) if k in tuning_names}
        if tuning:
            values["_tuning"] = dataclasses.replace(values.get("_tuning", Tuning()), **tuning)
        return cls(**values)

    @classmethod
    def settings(cls) -> dict:
        """Every flat setting's name and type: the fields, then :class:`Tuning`'s knobs."""
        public = {f.name: f for f in fields(cls) if not f.name.startswith("_")}
        return {**public, **{f.name: f for f in fields(Tuning)}}

    @classmethod
    def parse_settings(cls, items) -> dict:
        """``["mlp_density=0.25", "k_align=64", ...]`` as typed values for :meth:`create` (what
        ``python -m benchmarks.e2e --set`` takes); an unknown setting or a bad value names itself."""
        by_name = cls.settings()
        values = {}
        for item in items:
            name, sep, raw = (part.strip() for part in item.partition("="))
            if not sep or name not in by_name:
                raise ValueError(f"setting {item!r} is not NAME=VALUE with NAME one of {sorted(by_name)}")
            values[name] = _parse(by_name[name], name, raw)
        return values

    @classmethod
    def from_env(cls, **overrides) -> "LongExposureConfig":
        """Defaults, then ``LECOMPILE_<SETTING>`` environment variables, then ``overrides``. A
        ``LECOMPILE_*`` variable that names no setting is an error (a misspelt setting)."""
        values = {}
        by_env = {ENV_PREFIX + name.upper(): f for name, f in cls.settings().items()}
        for key, raw in os.environ.items():
            if key in by_env:
                values[by_env[key].name] = _parse(by_env[key], f"environment variable {key}", raw)
            elif key.startswith(ENV_PREFIX) and key not in OTHER_ENV:
                close = difflib.get_close_matches(key, by_env, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ValueError(f"environment variable {key} is not a lecompile setting; {hint}"
                                 f"the settings are {sorted(by_env)}")
        values.update(overrides)
        return cls.create(**values)

    def replace(self, **changes) -> "LongExposureConfig":
        """A copy with ``changes`` (fields or :class:`Tuning` knobs) applied, validated."""
        return type(self).create(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    @property
    def tuning(self) -> Tuning:
        return self._tuning

    def enabled(self, pass_name: str) -> bool:
        """Whether the pass ``pass_name`` may rewrite (not in ``disable``)."""
        return pass_name not in self.disable

    def mlp_density_of(self, layer: Optional[int]) -> float:
        """The MLP density of decoder layer ``layer`` (``None``: index unknown)."""
        if layer is not None and layer < len(self.mlp_layer_densities):
            return self.mlp_layer_densities[layer]
        return self.mlp_density

    @property
    def sparse(self) -> bool:
        """Whether any MLP or attention density is below 1."""
        return self.sparse_mlp or self.attn_density < 1.0

    @property
    def sparse_mlp(self) -> bool:
        """Whether any MLP density is below 1."""
        return min((self.mlp_density, *self.mlp_layer_densities)) < 1.0

    @property
    def calibrated(self) -> bool:
        """Whether the run needs calibration steps: the learned predictor's, the guard's."""
        return (self.sparse_mlp and (self.predictor == "learned" or self.tuning.guarded)) or (
            self.attn_density < 1.0 and self.tuning.loss_budget > 0)

    @property
    def dense_warmup_steps(self) -> int:
        """Optimizer steps of dense warm-up, from ``warmup_steps`` or ``warmup_fraction``."""
        return self.warmup_steps or math.ceil(self.warmup_fraction * self.total_steps)

    def resolved_dump_dir(self) -> Optional[str]:
        return self.dump_dir if self.dump_dir is not None else os.environ.get("LECOMPILE_DUMP_DIR")


#: Settings by name (``LongExposureConfig.preset(name)``); docs/configuration.md says what each
#: costs and gains, from the results files.
PRESETS = {
    # Every block dense: the same loss and gradients as Inductor, adapters, loss and norms fused.
    "exact": {},
    # Sparse MLPs and attention with CUDA graphs, as timed in docs/results.md: faster, at a cost in
    # held-out loss (its quality table).
    "fast": {"mlp_density": 0.25, "attn_density": 0.5, "cudagraphs": True},
    # Half the attention blocks, dense MLPs: the setting that kept the quality harness's
    # long-context task at 4096 tokens (docs/results.md); for rows of thousands of tokens.
    "long-context": {"attn_density": 0.5},
}


def _parse(setting, key, raw):
    kind = setting.type if isinstance(setting.type, str) else setting.type.__name__
    try:
        if kind == "float":
            return float(raw)
        if kind == "int":
            return int(raw)
        if kind.startswith("Tuple"):
            return tuple(float(v) for v in raw.split(",") if v.strip())
        if kind.startswith("FrozenSet"):
            return frozenset(v.strip() for v in raw.split(",") if v.strip())
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not a valid {kind}") from None
    return raw


def _as_float(value):
    """A real number (Python, NumPy, or a one-element tensor) as a ``float``; anything else as it is."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(value, "ndim", None) == 0):
        return float(value)
    return value


def _check_fraction(name, value):
    if not isinstance(value, float) or not 0.0 < value <= 1.0:
        raise ValueError(f"LongExposureConfig.{name} must be a number in (0, 1], got {value!r}")


def _check_share(name, value):
    if not isinstance(value, float) or not 0.0 <= value < 1.0:
        raise ValueError(f"LongExposureConfig.{name} must be a number in [0, 1), got {value!r}")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"LongExposureConfig.{name} must be one of {allowed}, got {value!r}")


def _check_int(name, value, what, ok):
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ValueError(f"LongExposureConfig.{name} must be {what}, got {value!r}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"LongExposureConfig.{name} must be a bool, got {value!r}")
