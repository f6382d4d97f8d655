"""`LongExposureConfig`: every knob of the backend, validated on construction."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from dataclasses import dataclass, fields
from typing import Optional, Tuple

ENV_PREFIX = "LECOMPILE_"
#: ``LECOMPILE_*`` variables that are not config fields (the examples' model cache).
OTHER_ENV = ("LECOMPILE_CACHE",)

PREDICTORS = ("oracle", "svd", "learned")
ATTN_PREDICTORS = ("pooled", "oracle")
GRANULARITIES = ("sequence", "tile", "batch")


@dataclass(frozen=True)
class LongExposureConfig:
    """Configuration of the ``longexposure`` backend.

    Every field can also be set through an environment variable ``LECOMPILE_<FIELD>``
    (for example ``LECOMPILE_MLP_DENSITY=0.25``) when the config is built with
    :meth:`from_env`, which is what the registered ``"longexposure"`` backend does.
    """

    #: Share of MLP neurons kept per group of tokens, in (0, 1]. 1.0 (the default) keeps every
    #: neuron: the step is exact, and lecompile's gain is adapter fusion alone. Lower values are
    #: opt-in: they cost held-out loss on real models (docs/results.md, Quality). The kept count
    #: is ``k = round_up(mlp_density * ffn, k_align)``, capped at ``ffn``.
    mlp_density: float = 1.0
    #: Per-layer MLP densities (SparseLoRA's non-uniform sparsity): entry ``i`` is the density
    #: of decoder layer ``i`` (the first number in the MLP's module path, e.g.
    #: ``model.layers.3.mlp``); layers past the end use ``mlp_density``. ``(1.0, 1.0)`` keeps
    #: the first two layers dense. From the environment: comma-separated numbers.
    mlp_layer_densities: Tuple[float, ...] = ()
    #: Share of the allowed (causal) attention blocks each head of each sequence computes, in
    #: (0, 1]. 1.0 leaves attention dense. The diagonal and the first key block are always
    #: kept, so very low values keep about ``2 / (L / attn_block)``.
    attn_density: float = 1.0
    #: Tokens per attention block (queries and keys): a positive multiple of 16; 64 or 128 on
    #: the GPU. Sequences must be a multiple of it for attention to be rewritten.
    attn_block: int = 128
    #: How attention blocks are chosen: ``"pooled"`` (block-mean queries against block-mean
    #: keys, then the atomic layouts with the most mass per block) or ``"oracle"`` (the same
    #: choice on the exact attention mass; costs a dense pass, for studies).
    attn_predictor: str = "pooled"
    #: Dense warm-up: during the first ``warmup_steps`` optimizer steps (``torch.optim``
    #: ``step()`` calls in the process, counted from the backend's first graph) the dense
    #: graphs run (fused adapters only); then each graph is recompiled once with sparsity.
    warmup_steps: int = 0
    #: Dense warm-up as a share of the run, in [0, 1): the first
    #: ``ceil(warmup_fraction * total_steps)`` optimizer steps run dense. Needs ``total_steps``;
    #: use it or ``warmup_steps``, not both.
    warmup_fraction: float = 0.0
    #: Optimizer steps the run will take (for ``warmup_fraction``; 0: unknown).
    total_steps: int = 0
    #: Context-only sparsity (SparseLoRA): share of the token groups (tiles or sequences, see
    #: ``granularity``) whose MLPs run dense, in [0, 1). The groups holding output tokens
    #: (those whose label is not the loss's ``ignore_index``, usually -100) fill it first,
    #: then context groups; when output groups outnumber it, the rest run sparse. Needs the
    #: labels in the graph (``model(..., labels=...)``). 0 turns it off.
    dense_output_share: float = 0.0
    #: How neuron indices are predicted: ``"oracle"`` (exact top-k of the dense activation,
    #: costs a dense pass; for tests and upper bounds), ``"svd"`` (training-free rank-r
    #: estimate from the frozen weights, plus the exact low-rank adapter terms) or
    #: ``"learned"`` (the SVD estimator's factors trained on the exact activations of the
    #: first batches and refreshed every ``learned_refresh`` calls; not with ``cudagraphs``).
    predictor: str = "svd"
    #: Tokens that share one neuron set: ``"sequence"`` (each sequence of the batch),
    #: ``"tile"`` (each ``tile_size`` consecutive tokens of a sequence) or ``"batch"``.
    granularity: str = "sequence"
    #: Tokens per tile when ``granularity="tile"``: a positive multiple of 16.
    tile_size: int = 128
    #: Rank of the SVD and learned predictors' estimate, at least 1.
    svd_rank: int = 8
    #: Learned predictor: optimizer steps per training call (each on up to 1024 tokens).
    learned_train_steps: int = 20
    #: Learned predictor: retrain every this many calls per MLP (0: only the first calls).
    learned_refresh: int = 100
    #: ``k`` is rounded up to a multiple of this (kernel tile; unaligned k was measured
    #: 2-3x slower), at least 1.
    k_align: int = 128
    #: Rewrite matched MLP blocks into the sparse-MLP op. Off: MLPs are only reported.
    rewrite_mlp: bool = True
    #: Run LoRA's matmuls on tensor cores in the activation dtype (fp16/bf16 operands, fp32
    #: accumulation), fused with the base linear (``lecompile::lora_linear``) or inside the
    #: sparse MLP; adapter weights and their gradients stay fp32. ``False`` keeps PEFT's exact
    #: fp32 adapter math. fp32 models compute in fp32 either way.
    fuse_adapters: bool = True
    #: With ``fuse_adapters``: LoRA linears that read one input (the q, k and v projections)
    #: compute their A-projections as one GEMM against their stacked ``A`` matrices, so the input
    #: is read once for all of them, in the forward and again for the input and ``A`` gradients.
    share_lora_input: bool = True
    #: With ``fuse_adapters``: LoRA's B-projection inside the base GEMM's kernel (a Triton GEMM
    #: with the low-rank term as one more reduction step, forward and input gradient; fp16/bf16
    #: on CUDA, frozen base weights, widths and ranks multiples of 8), so the ``[tokens, out]``
    #: update is never written and re-read. ``False``: cuBLAS GEMMs, the adds left to Inductor.
    lora_in_gemm: bool = True
    #: Compute Hugging Face's causal-LM loss on a frozen LM head as
    #: ``lecompile::lm_head_cross_entropy``: the hidden state's gradient is made in the forward,
    #: a chunk of tokens at a time, so neither fp32 logits nor their gradient are kept for the
    #: backward (about 1.2 GiB at 4096 tokens and a 50k vocabulary). Same loss and gradients.
    fuse_loss: bool = True
    #: Let the backward recompute cheap pointwise results that lecompile's ops read (the norms'
    #: outputs that the LoRA linears and sparse MLPs take, dtype casts of adapter weights) instead
    #: of keeping them: AOTAutograd's partitioner with ``ban_recompute_materialized_backward`` off.
    #: With ``norm_backward_from_output`` off: about 1.5 fewer ``[tokens, hidden]`` tensors kept per
    #: decoder layer (OPT-2.7B at 8x512: peak 13.2 -> 11.9 GiB) for 1-2% longer steps on the H100;
    #: with it on (the default) little is left to recompute (11.93 -> 11.89 GiB). README, Results.
    recompute_pointwise: bool = False
    #: Layer norms with frozen weights keep their output for the backward instead of their input
    #: (Apex's memory-efficient layer norm): the output is what the LoRA linears and sparse MLPs
    #: after them keep anyway, so each norm holds one ``[tokens, hidden]`` tensor fewer, at the
    #: same cost. The input is rebuilt as ``(y - bias) / weight``, so a norm qualifies only where
    #: ``|bias| <= |weight|`` in every channel when the graph compiles (the report lists the rest).
    #: Hugging Face's RMS norms (LLaMA, Qwen, Mistral) likewise, where no weight is 0.
    norm_backward_from_output: bool = True
    #: Replay each compiled graph as a CUDA graph (what ``mode="reduce-overhead"`` does for
    #: Inductor): removes the Python and launch overhead of many small ops. Inputs are copied
    #: into static buffers and outputs are overwritten by the next replay (see PyTorch's
    #: CUDA graph trees); frozen weights must not be replaced in place between steps.
    cudagraphs: bool = False
    #: Match attention blocks (for the report and the rewrite).
    match_attention: bool = True
    #: Rewrite matched attention into block-sparse attention when ``attn_density < 1``.
    rewrite_attention: bool = True
    #: Folder for graph dumps (FX code before and after the passes, and the report).
    #: ``None`` reads ``LECOMPILE_DUMP_DIR`` when a graph is compiled.
    dump_dir: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("mlp_density", "attn_density", "warmup_fraction", "dense_output_share"):
            object.__setattr__(self, name, _as_float(getattr(self, name)))
        if isinstance(self.mlp_layer_densities, tuple):
            object.__setattr__(self, "mlp_layer_densities", tuple(map(_as_float, self.mlp_layer_densities)))
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
        _check_choice("predictor", self.predictor, PREDICTORS)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("attn_predictor", self.attn_predictor, ATTN_PREDICTORS)
        _check_int("attn_block", self.attn_block, "a positive multiple of 16",
                   lambda v: v > 0 and v % 16 == 0)
        _check_int("tile_size", self.tile_size, "a positive multiple of 16",
                   lambda v: v > 0 and v % 16 == 0)
        _check_int("svd_rank", self.svd_rank, "an integer >= 1", lambda v: v >= 1)
        _check_int("k_align", self.k_align, "an integer >= 1", lambda v: v >= 1)
        _check_int("learned_train_steps", self.learned_train_steps, "an integer >= 1", lambda v: v >= 1)
        _check_int("learned_refresh", self.learned_refresh, "an integer >= 0", lambda v: v >= 0)
        for name in ("rewrite_mlp", "fuse_adapters", "share_lora_input", "lora_in_gemm", "fuse_loss",
                     "recompute_pointwise", "norm_backward_from_output", "cudagraphs", "match_attention",
                     "rewrite_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LongExposureConfig.{name} must be a bool, "
                                 f"got {getattr(self, name)!r}")
        if self.predictor == "learned" and self.cudagraphs:
            raise ValueError("LongExposureConfig: predictor='learned' trains inside the step, which a CUDA "
                             "graph cannot replay: use cudagraphs=False or predictor='svd'")
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise ValueError(f"LongExposureConfig.dump_dir must be a path or None, "
                             f"got {self.dump_dir!r}")

    @classmethod
    def parse_settings(cls, items) -> dict:
        """``["mlp_density=0.25", "cudagraphs=true", ...]`` as typed field values (what
        ``python -m benchmarks.e2e --set`` takes); an unknown field or a bad value names itself."""
        by_name = {f.name: f for f in fields(cls)}
        values = {}
        for item in items:
            name, sep, raw = (part.strip() for part in item.partition("="))
            if not sep or name not in by_name:
                raise ValueError(f"setting {item!r} is not FIELD=VALUE with FIELD one of {sorted(by_name)}")
            values[name] = _parse(by_name[name], name, raw)
        return values

    @classmethod
    def from_env(cls, **overrides) -> "LongExposureConfig":
        """Defaults, then ``LECOMPILE_<FIELD>`` environment variables, then ``overrides``. A
        ``LECOMPILE_*`` variable that names no field is an error (a misspelt setting)."""
        values = {}
        by_env = {ENV_PREFIX + f.name.upper(): f for f in fields(cls)}
        for key, raw in os.environ.items():
            if key in by_env:
                values[by_env[key].name] = _parse(by_env[key], f"environment variable {key}", raw)
            elif key.startswith(ENV_PREFIX) and key not in OTHER_ENV:
                close = difflib.get_close_matches(key, by_env, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ValueError(f"environment variable {key} is not a lecompile setting; {hint}"
                                 f"the settings are {sorted(by_env)}")
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes) -> "LongExposureConfig":
        """A copy with ``changes`` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def mlp_density_of(self, layer: Optional[int]) -> float:
        """The MLP density of decoder layer ``layer`` (``None``: index unknown)."""
        if layer is not None and layer < len(self.mlp_layer_densities):
            return self.mlp_layer_densities[layer]
        return self.mlp_density

    @property
    def sparse(self) -> bool:
        """Whether any MLP or attention density is below 1."""
        return min(self.mlp_density, self.attn_density, *self.mlp_layer_densities) < 1.0

    @property
    def dense_warmup_steps(self) -> int:
        """Optimizer steps of dense warm-up, from ``warmup_steps`` or ``warmup_fraction``."""
        return self.warmup_steps or math.ceil(self.warmup_fraction * self.total_steps)

    def resolved_dump_dir(self) -> Optional[str]:
        return self.dump_dir if self.dump_dir is not None else os.environ.get("LECOMPILE_DUMP_DIR")


def _parse(field, key, raw):
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    try:
        if kind == "float":
            return float(raw)
        if kind == "int":
            return int(raw)
        if kind.startswith("Tuple"):
            return tuple(float(v) for v in raw.split(",") if v.strip())
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
